"""glibc's malloc settings: the pretraining advice, the tunables it names, and the heap an encode keeps."""
import os
import platform
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest

from echo import host_memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")

MALLINFO = """
import ctypes, sys
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes, libc.mallinfo2.restype = ctypes.c_void_p, [ctypes.c_void_p], Info
"""

MAPPED_AFTER_A_FREE = MALLINFO + """
libc.free(libc.malloc(6 << 20))  # by default this free raises the mmap threshold past 6 MB
before = libc.mallinfo2().hblks
block = libc.malloc(6 << 20)
print(libc.mallinfo2().hblks - before)
"""

# A 40 MB block is over the largest mmap threshold glibc sets by itself (32 MB): by default it is mapped on its
# own and unmapped on free; kept, it comes from the heap and stays there after the free.
KEPT_AFTER_A_FREE = MALLINFO + """
import importlib.util  # the module alone: importing echo (and torch) would leave free heap to serve the block
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[1])
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)
print(host_memory.keep_freed_memory())
before = libc.mallinfo2()
block = libc.malloc(40 << 20)
print(libc.mallinfo2().hblks - before.hblks)
libc.free(block)
print(libc.mallinfo2().arena - before.arena >= 40 << 20)
"""


def python(code: str, tunables: str = "") -> list[str]:
    env = {**os.environ, "GLIBC_TUNABLES": tunables}
    return subprocess.run([sys.executable, "-c", code, host_memory.__file__], env=env, capture_output=True,
                          text=True, check=True).stdout.split()


def test_allocator_advice_on_a_glibc_cpu_run_only_and_the_recipe_follows_it():
    assert host_memory.TUNABLES in host_memory.allocator_advice("cpu", {}, "glibc")
    assert host_memory.allocator_advice("cuda", {}, "glibc") is None
    assert host_memory.allocator_advice("cpu", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc") is None
    assert host_memory.allocator_advice("cpu", {}, "") is None  # musl, macOS: other allocators
    recipe = (Path(__file__).resolve().parents[1] / "scripts" / "train_default.sh").read_text()
    assert f"GLIBC_TUNABLES:-{host_memory.TUNABLES}" in recipe


def test_allocator_advice_help_does_not_print_the_environment(monkeypatch):
    monkeypatch.setenv("ECHO_TEST_SECRET", "hunter2")  # a default of os.environ showed every variable in help()
    assert "hunter2" not in pydoc.render_doc(host_memory.allocator_advice)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert host_memory.allocator_advice("cpu", libc="glibc") is not None  # None still reads os.environ
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert host_memory.allocator_advice("cpu", libc="glibc") is None


@glibc_only
def test_glibc_takes_the_advised_tunables():
    """A misspelt tunable is ignored without a word: a 6 MB block after a free of one is mapped on its own under
    the advised settings, and comes from the heap under glibc's defaults."""
    assert python(MAPPED_AFTER_A_FREE) == ["0"]
    assert python(MAPPED_AFTER_A_FREE, host_memory.TUNABLES) == ["1"]


@glibc_only
def test_kept_heap_serves_large_blocks_and_keeps_them_after_a_free():
    assert python(KEPT_AFTER_A_FREE.replace("print(host_memory.keep_freed_memory())", "print(None)")) == [
        "None", "1", "False"]
    assert python(KEPT_AFTER_A_FREE) == ["True", "0", "True"]


@glibc_only
def test_malloc_tunables_of_the_user_are_left_alone():
    assert python(KEPT_AFTER_A_FREE, "glibc.malloc.arena_max=2") == ["False", "1", "False"]


PEAK_OF_A_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[1])
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)
print(host_memory.peak_rss_mb())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_childs_peak_memory_is_its_own_not_its_parents():
    """getrusage's ru_maxrss carries the parent's peak across fork and exec: the encode benchmark's workers all
    reported their launcher's ~600 MB."""
    ballast = bytearray(400 << 20)  # this process's peak passes 400 MB
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    child = float(python(PEAK_OF_A_CHILD)[0])
    assert host_memory.peak_rss_mb() > 400 and child < 200


PEAK_AFTER_A_FREE = PEAK_OF_A_CHILD.replace("print(host_memory.peak_rss_mb())", """
ballast = bytearray(300 << 20)
ballast[::4096] = b"x" * len(ballast[::4096])
del ballast  # a block this large is mapped on its own: the free gives it back to the kernel
print(host_memory.peak_rss_mb(), host_memory.current_rss_mb())
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_peak_is_the_most_held_not_what_is_held_now():
    """A benchmark reads the peak after its work has freed its memory: the resident size then is not the peak."""
    peak, now = map(float, python(PEAK_AFTER_A_FREE))
    assert peak > 300 and now < 200
