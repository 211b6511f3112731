"""jaxckpt.malloc: which environment the ``jaxckpt`` command starts itself again in, and how it tells
which allocator a process runs on. tests/test_cli.py runs the command under it end to end."""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jaxckpt import malloc
from jaxckpt.errors import ConfigError

LIB = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def test_tcmalloc_goes_first_in_ld_preload_and_keeps_what_was_there() -> None:
    env = malloc.preload_env({"LD_PRELOAD": "/opt/libfoo.so", "HOME": "/root"}, LIB)
    assert env is not None
    assert env["LD_PRELOAD"] == f"{LIB} /opt/libfoo.so"
    assert env["TCMALLOC_RELEASE_RATE"] == "0" and env[malloc.TRIED] == "1" and env["HOME"] == "/root"
    assert malloc.preload_env({}, LIB)["LD_PRELOAD"] == str(LIB)


def test_a_release_rate_the_user_set_is_kept() -> None:
    assert malloc.preload_env({"TCMALLOC_RELEASE_RATE": "2"}, LIB)["TCMALLOC_RELEASE_RATE"] == "2"


@pytest.mark.parametrize("env, lib", [({malloc.ENV: "system"}, LIB), ({malloc.ENV: " System "}, LIB),
                                      ({malloc.TRIED: "1"}, LIB), ({}, None)])
def test_no_restart_when_turned_off_already_tried_or_not_installed(env: dict[str, str], lib: Path | None) -> None:
    assert malloc.preload_env(env, lib) is None


def test_an_unknown_choice_names_the_choices_and_the_fix() -> None:
    with pytest.raises(ConfigError, match="JAXCKPT_MALLOC='jemalloc' is not one of tcmalloc, system.*=system"):
        malloc.preload_env({malloc.ENV: "jemalloc"}, LIB)


def test_finds_the_first_library_in_the_first_directory_that_has_one(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    (b / "libtcmalloc.so.4").write_bytes(b"")
    (c / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert malloc.find_tcmalloc([a, b, c]) == b / "libtcmalloc.so.4"
    (b / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert malloc.find_tcmalloc([a, b, c]) == b / "libtcmalloc_minimal.so.4"
    assert malloc.find_tcmalloc([a]) is None


def test_in_use_reads_the_process_memory_map_where_dladdr_cannot_say(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(malloc, "malloc_library", lambda: None)
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert malloc.in_use(maps) == "system"
    maps.write_text(maps.read_text() + f"7f02-7f03 r-xp 0 08:01 2 {LIB}\n")
    assert malloc.in_use(maps) == "tcmalloc"
    assert malloc.in_use(tmp_path / "absent") == "system"


NEEDS_TCMALLOC = pytest.mark.skipif(malloc.find_tcmalloc() is None,
                                    reason=f"TCMalloc is not installed ({malloc.INSTALL})")
GLIBC = {"LD_PRELOAD": ""}  # added to os.environ: no preload


def tcmalloc_env() -> dict[str, str]:
    """This environment with TCMalloc preloaded, as the jaxckpt command restarts itself."""
    return malloc.preload_env({k: v for k, v in os.environ.items() if k != malloc.TRIED}, malloc.find_tcmalloc())


def run_script(script: str, env: dict[str, str], *args: str) -> list[str]:
    """The words ``python -c script args`` prints, run in ``env``."""
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


LOADED = """
import ctypes, sys
from jaxckpt import malloc
if sys.argv[1:]:
    ctypes.CDLL(sys.argv[1])  # loaded, as some library might, but malloc stays glibc's
print(malloc.in_use(), malloc.malloc_library())
"""


@NEEDS_TCMALLOC
def test_in_use_asks_which_library_serves_malloc_not_which_is_loaded() -> None:
    lib = str(malloc.find_tcmalloc())
    loaded = run_script(LOADED, os.environ | GLIBC, lib)
    assert loaded[0] == "system" and "libc" in loaded[1], loaded
    preloaded = run_script(LOADED, os.environ | {"LD_PRELOAD": lib})
    assert preloaded == ["tcmalloc", lib], preloaded


RELEASE = """
import numpy as np
from jaxckpt import malloc

def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) // 1024

a = np.ones(400 << 20, np.uint8)
del a
kept = rss_mb()
print(malloc.in_use(), kept, malloc.release_free_memory(), rss_mb())
"""


@NEEDS_TCMALLOC
def test_tcmalloc_keeps_freed_memory_until_told_to_release_it() -> None:
    out = run_script(RELEASE, tcmalloc_env())
    allocator, kept, released, after = out
    assert (allocator, released) == ("tcmalloc", "True")
    assert int(kept) - int(after) > 350, out  # the 400 MB array's pages went back to the OS only now
    glibc = run_script(RELEASE, os.environ | GLIBC)
    assert glibc[0] == "system" and glibc[2] == "False"


KEEP = """
import ctypes, resource, sys
from jaxckpt import malloc

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 200 << 20
if sys.argv[1] == "little-memory":  # keeping would take more than half of what is available: keep nothing
    malloc.available_bytes = lambda: 600 << 20
released = malloc.release_free_memory([n, n] if sys.argv[1] != "none" else [])
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
two = [libc.malloc(n) for _ in range(2)]  # two at once, as when XLA frees a step's temporaries late
for p in two:
    ctypes.memset(p, 1, n)
print(malloc.in_use(), released, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@NEEDS_TCMALLOC
def test_a_release_keeps_room_for_the_blocks_asked_for_backed_so_they_no_longer_fault() -> None:
    env = tcmalloc_env()
    allocator, released, faults = run_script(KEEP, env, "keep")
    assert (allocator, released) == ("tcmalloc", "True")
    assert int(faults) < 5_000, faults  # 400 MB in 4 KB pages would be 102,400 faults
    for how in ("none", "little-memory"):  # without the room kept, the same two blocks are fresh memory
        assert int(run_script(KEEP, env, how)[2]) > 50_000, how
    glibc = run_script(KEEP, os.environ | GLIBC, "keep")
    assert glibc[:2] == ["system", "False"]


def faults_writing(region: mmap.mmap) -> int:
    """Minor page faults while every page of ``region`` is written."""
    start, end = span(region)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(start, 1, end - start)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def span(region: mmap.mmap) -> tuple[int, int]:
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    return start, start + len(region)


@pytest.mark.parametrize("advice", ["populate", "refused"])
def test_populate_backs_every_page_so_writing_them_no_longer_faults(advice: str, monkeypatch) -> None:
    """With MADV_POPULATE_WRITE, and where the kernel refuses it (before Linux 5.14), by writing each page."""
    if advice == "refused":
        monkeypatch.setattr(malloc, "MADV_POPULATE_WRITE", -1)  # EINVAL
    monkeypatch.setattr(malloc, "POPULATE_CHUNK", 4 << 20)
    n = 32 << 20  # 8,192 pages
    fresh, backed = mmap.mmap(-1, n), mmap.mmap(-1, n)
    malloc.populate([span(backed)], threads=2)
    assert faults_writing(fresh) > 6_000
    assert faults_writing(backed) < 1_000


def test_populate_shares_the_pages_among_its_threads(monkeypatch) -> None:
    """Two threads each back a chunk at the same time: each waits at a barrier for the other."""
    monkeypatch.setattr(malloc, "MADV_POPULATE_WRITE", -1)  # every chunk through ctypes.memset, recorded here
    monkeypatch.setattr(malloc, "POPULATE_CHUNK", 1 << 20)
    meet, threads, memset = threading.Barrier(2, timeout=10), set(), ctypes.memset

    def recording(address: int, value: int, size: int) -> int:
        threads.add(threading.get_ident())
        meet.wait()
        return memset(address, value, size)

    monkeypatch.setattr(ctypes, "memset", recording)
    region = mmap.mmap(-1, 4 << 20)
    malloc.populate([span(region)], threads=2)
    assert len(threads) == 2 and threading.get_ident() not in threads
