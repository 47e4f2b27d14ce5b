"""Packaging lives in pyproject.toml; this file builds the optional compiled extension echo._C (csrc/).

The extension is built with torch.utils.cpp_extension (ninja when installed) only when the build sees torch,
so use `pip install --no-build-isolation -e .` after installing torch (an isolated build has no torch and
skips it). C++ CPU ops are always built; the CUDA ops only when torch has CUDA and nvcc is found.
ECHO_BUILD_EXT=0 skips the build. A failed build is a warning: echo works without it (python -m echo info), and
it removes an earlier build, which may no longer match the sources.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
from pathlib import Path

from setuptools import setup


def load_build_config():
    spec = importlib.util.spec_from_file_location("csrc_build", Path(__file__).resolve().parent / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_setup() -> dict:
    if os.environ.get("ECHO_BUILD_EXT", "1") == "0":
        print("echo: ECHO_BUILD_EXT=0, not building the compiled extension")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("echo: torch is not importable in this build environment, not building the compiled extension "
              "(install torch first, then pip install --no-build-isolation -e .)")
        return {}
    compiler = shlex.split(os.environ.get("CXX", "c++"))[:1]  # CXX may carry a launcher or flags: "ccache g++"
    if not compiler or shutil.which(compiler[0]) is None:
        print("echo: no C++ compiler found, not building the compiled extension")
        return {}

    config = load_build_config()
    relative = lambda paths: [str(p.relative_to(Path(__file__).resolve().parent)) for p in paths]
    with_cuda = torch.version.cuda is not None and config.nvcc_path() is not None
    if with_cuda:
        extension = cpp_extension.CUDAExtension(
            "echo._C", relative(config.CPU_SOURCES + config.CUDA_SOURCES),
            extra_compile_args={"cxx": config.CXX_FLAGS, "nvcc": config.NVCC_FLAGS},
        )
    else:
        extension = cpp_extension.CppExtension(
            "echo._C", relative(config.CPU_SOURCES), extra_compile_args={"cxx": config.CXX_FLAGS}
        )

    class OptionalBuild(cpp_extension.BuildExtension):
        """A failed compile leaves echo without its compiled ops, never without echo."""

        def run(self):
            earlier_builds = self.extension_files()  # first: setuptools clears self.inplace while it builds
            try:
                super().run()
            except Exception as error:  # noqa: BLE001: any compiler or toolchain failure
                removed = [path for path in earlier_builds if os.path.exists(path)]
                for path in removed:
                    os.remove(path)
                removal = f"removed the earlier build, which may not match csrc/ ({', '.join(removed)}); " \
                    if removed else ""
                print(f"echo: WARNING: the compiled extension failed to build ({error}); {removal}"
                      "echo falls back to its torch ops (python -m echo info)")

        def extension_files(self) -> list[str]:
            """Where a build of the extension lands: the build folder, which an install copies, and with
            --inplace (or an editable install) the package, which Python imports. A failed build removes an
            earlier one from both: setuptools would keep it, and echo would run code older than its sources."""
            files = [os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
                     for ext in self.extensions]
            return files + ([self.get_ext_fullpath(ext.name) for ext in self.extensions] if self.inplace else [])

        def build_extension(self, ext):
            super().build_extension(ext)
            built = self.get_ext_fullpath(ext.name)
            problem = config.error_problem(built)
            if problem:  # never install an extension that crashes where it should raise
                os.remove(built)
                raise RuntimeError(f"the built extension was removed: {problem}")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuild.with_options(use_ninja=True)}}


setup(**extension_setup())
