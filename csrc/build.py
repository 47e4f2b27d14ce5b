"""How csrc/ is compiled, in one place: setup.py builds echo._C from these sources and flags, and
`python csrc/build.py check-cuda` (a step of `make test`) compiles the CUDA sources to object code for every
target architecture, so their syntax and types are checked on machines that have nvcc but no GPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent
CPU_SOURCES = sorted(CSRC.glob("*.cpp"))
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
CUDA_ARCHS = ("80", "90")  # A100, H100
# No -std: torch.utils.cpp_extension passes the C++ standard its torch was built with (a mismatch crashes).
# -fopenmp: at::parallel_for is OpenMP code inlined from the torch headers. -Wno-psabi: the vector helpers take
# and return 64-byte vectors and are always inlined into the clones, so no call passes one by the ABI that GCC's
# note is about (a #pragma does not silence that note). -g0: Python's own CFLAGS ask for debug information, 9 of the
# extension's 11 MB in every install.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-psabi", "-g0"]
NVCC_FLAGS = ["-O3", *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS)]


def nvcc_path() -> str | None:
    """nvcc from CUDA_HOME, else PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def check_cuda() -> int:
    """Compile each .cu to an object file (no GPU needed); 0 when all compile or nvcc is absent."""
    nvcc = nvcc_path()
    if nvcc is None:
        print("csrc check-cuda: skipped, nvcc not found (set CUDA_HOME or put nvcc on PATH to check the CUDA sources)")
        return 0
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{path}" for path in include_paths()]
    with tempfile.TemporaryDirectory() as scratch:
        for source in CUDA_SOURCES:
            started = time.perf_counter()
            command = [nvcc, "-c", str(source), "-o", str(Path(scratch) / f"{source.stem}.o"), *includes,
                       *NVCC_FLAGS, "-std=c++20", "-DTORCH_EXTENSION_NAME=_C",  # torch 2.13's standard
                       # a CPU torch ships c10/cuda without its generated config header; it only sets
                       # export macros, which object code does not need
                       "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                print(f"csrc check-cuda: {source.name} failed to compile:\n{result.stdout}{result.stderr}")
                return 1
            print(f"csrc check-cuda: {source.name} compiles for sm_{', sm_'.join(CUDA_ARCHS)} "
                  f"({time.perf_counter() - started:.0f} s)")
    return 0


ERROR_PROBE = """
import sys, torch
torch.ops.load_library(sys.argv[1])
x = torch.zeros(2, 3)
try:
    torch.ops.echo.residual_layer_norm(x, x[:, :2].contiguous(), torch.ones(3), torch.zeros(3), 1e-5, False)
except RuntimeError:
    sys.exit(0)
sys.exit("a mis-shaped residual was accepted")
"""


def error_problem(library: str) -> str | None:
    """None when an op of the built library that refuses its input raises a Python error; else what happened.
    Why: a compiler that links its own C++ runtime into the library (seen: a custom GCC that Python was built
    with) makes an extension whose every C++ exception kills the process instead."""
    result = subprocess.run([sys.executable, "-c", ERROR_PROBE, library], capture_output=True, text=True)
    if result.returncode == 0:
        return None
    import torch

    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX")
    torch_compiler = next((line.strip(" -") for line in torch.__config__.show().splitlines()
                           if "GCC" in line or "clang" in line.lower()), "its compiler")
    outcome = "crashed the process" if result.returncode < 0 else "failed"
    return (f"an op that refuses its input {outcome} (exit {result.returncode}: {result.stderr.strip()[-300:]}) "
            f"instead of raising. The compiler ({compiler}) may link a C++ runtime of its own; torch was built "
            f"with {torch_compiler}: set CXX and CC to that compiler, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc")


if __name__ == "__main__":
    if sys.argv[1:] != ["check-cuda"]:
        sys.exit("usage: python csrc/build.py check-cuda")
    sys.exit(check_cuda())
