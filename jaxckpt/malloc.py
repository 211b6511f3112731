"""The trainer's host memory allocator: TCMalloc where it is installed, instead of glibc's malloc.

On CPU, XLA allocates each step's temporaries in one block and frees it when the step ends (485 MB
for ``configs/small.py``). glibc serves a block that large from a fresh ``mmap`` every time, so every
step faults in and zeroes its temporaries again: 130,000 page faults a step. Under TCMalloc, which keeps
the freed block for the next step, the step took 0.75-0.80x as long on a 2-core VM (benchmarks/README.md
§2, "Eighteenth session"). Cloud TPU VM images preload it too.

``LD_PRELOAD`` only takes effect when a process starts, so :func:`reexec` starts the ``jaxckpt train``
or ``launch`` command again, once, before anything is imported: the same PID, arguments and environment
plus ``LD_PRELOAD`` and ``TCMALLOC_RELEASE_RATE=0`` (keep freed memory for the next step rather than hand
it back to the OS and fault it in again; set it yourself to change that). ``JAXCKPT_MALLOC=system`` keeps
glibc's malloc. Python callers of ``jaxckpt.trainer.train`` get whatever their interpreter started with.

Just before its first step the trainer hands back what start-up freed, except room for two steps' temporaries
at once and the step's outputs (:func:`release_free_memory`), so that the heap does not grow in the middle of a run.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ENV = "JAXCKPT_MALLOC"
CHOICES = ("tcmalloc", "system")
TRIED = "JAXCKPT_MALLOC_TRIED"  # set in the re-executed process: never try twice
LIBS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")  # Debian/Ubuntu: libtcmalloc-minimal4, libgoogle-perftools4
INSTALL = "apt install libtcmalloc-minimal4"
MADV_POPULATE_WRITE = 23
PAGE = mmap.PAGESIZE
POPULATE_CHUNK = 64 << 20  # bytes per call when backing memory: small enough for the threads to share evenly


def lib_dirs() -> list[Path]:
    """Where distributions put shared libraries, multiarch directory first."""
    return [Path(f"/usr/lib/{platform.machine()}-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"),
            Path("/usr/local/lib")]


def find_tcmalloc(dirs: list[Path] | None = None) -> Path | None:
    """The first TCMalloc library in ``dirs`` (default :func:`lib_dirs`), or None."""
    for d in lib_dirs() if dirs is None else dirs:
        for name in LIBS:
            if (d / name).is_file():
                return d / name
    return None


def choice(env: Mapping[str, str]) -> str:
    """``$JAXCKPT_MALLOC``: "tcmalloc" (the default) or "system"."""
    from jaxckpt.errors import ConfigError

    value = env.get(ENV, "tcmalloc").strip().lower() or "tcmalloc"
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={env[ENV]!r} is not one of {', '.join(CHOICES)}: unset it for TCMalloc "
                          f"where installed, or set {ENV}=system for glibc's malloc")
    return value


def malloc_library() -> str | None:
    """The file of the shared object whose ``malloc`` this process's code calls (``dladdr``), None if unknown.
    A TCMalloc that was only loaded (``dlopen``) is mapped, but does not serve malloc: this tells them apart."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                    ("saddr", ctypes.c_void_p)]

    try:
        scope = ctypes.CDLL(None)
        info = DlInfo()
        if scope.dladdr(ctypes.cast(scope.malloc, ctypes.c_void_p), ctypes.byref(info)) and info.fname:
            return info.fname.decode(errors="replace")
    except (OSError, AttributeError):  # no dladdr (not glibc)
        pass
    return None


def in_use(maps: Path = Path("/proc/self/maps")) -> str:
    """"tcmalloc" if TCMalloc serves this process's malloc, else "system". Where ``dladdr`` cannot say, it
    goes by whether a TCMalloc library is mapped at all (``maps``)."""
    lib = malloc_library()
    if lib is not None:
        return "tcmalloc" if "libtcmalloc" in Path(lib).name else "system"
    try:
        return "tcmalloc" if "libtcmalloc" in maps.read_text() else "system"
    except OSError:
        return "system"


def preload_env(env: Mapping[str, str], lib: Path | None) -> dict[str, str] | None:
    """The environment to start this command again in, under ``lib``; None to go on as we are."""
    if not sys.platform.startswith("linux") or choice(env) == "system" or env.get(TRIED) or lib is None:
        return None
    new = dict(env)
    new["LD_PRELOAD"] = " ".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    new.setdefault("TCMALLOC_RELEASE_RATE", "0")
    new[TRIED] = "1"
    return new


def reexec() -> None:
    """Replace this process with the same command under TCMalloc (see the module doc), if it applies."""
    if in_use() == "tcmalloc":
        return
    env = preload_env(os.environ, find_tcmalloc())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def release_free_memory(keep: Sequence[int] = ()) -> bool:
    """Under TCMalloc, hand its free memory back to the OS, except room for blocks of the sizes in ``keep``,
    which stays backed and free for what comes next; False elsewhere (nothing done).

    With a release rate of 0 TCMalloc would otherwise keep every block start-up freed (state init, a restore's
    buffers: 3.9x a 1 GB state in benchmarks/checkpoint.py's processes) for good. The trainer calls this
    once, just before its first step, keeping its step's temporaries twice over and its outputs: XLA frees a
    CPU step's temporaries after its outputs are ready, and now and then the next step allocates its own
    before that. Without room for two, TCMalloc then grows its heap in the middle of a run, and the step that
    gets the new block faults it all in (126,000 faults, ~1.5x T0 for ``configs/small.py``: benchmarks/README.md
    §2, "Nineteenth session")."""
    if in_use() != "tcmalloc":
        return False
    import ctypes

    release = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)
    if release is None:
        return False
    with _backed([n for n in keep if n > 0]):
        release()
    return True


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's estimate of memory available without swapping (``MemAvailable``), None if unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextlib.contextmanager
def _backed(sizes: list[int]) -> Iterator[None]:
    """Blocks of ``sizes`` allocated and backed (every page present) while inside, freed on leaving; none
    where they would take more than half the memory available."""
    available = available_bytes()
    if not sizes or (available is not None and sum(sizes) > available // 2):
        yield
        return
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    held = []
    try:
        for n in sizes:
            ptr = libc.malloc(n)
            if not ptr:
                break
            held.append((ptr, n))
        populate([((ptr + PAGE - 1) // PAGE * PAGE, (ptr + n) // PAGE * PAGE) for ptr, n in held])
        yield
    finally:
        for ptr, _ in held:
            libc.free(ptr)


def populate(spans: Sequence[tuple[int, int]], threads: int | None = None) -> None:
    """Back every page of each page-aligned ``[start, end)`` in ``spans``, on up to ``threads`` threads (default:
    the usable CPUs, at most 8). The kernel zeroes each new page, and on several cores it does that in parallel:
    2 x 508 + 129 MB took 0.18-0.24 s on two threads against 0.30-0.39 s on one (2-vCPU VM,
    benchmarks/README.md §3, twenty-sixth session); this runs before a process's first step, when the cores are
    free."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.madvise.restype, libc.madvise.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def back(chunk: tuple[int, int]) -> None:
        # MADV_POPULATE_WRITE (Linux 5.14): 0.13 s for 2 x 508 MB where touching every page took 0.30 s
        if libc.madvise(chunk[0], chunk[1], MADV_POPULATE_WRITE) != 0:
            ctypes.memset(chunk[0], 0, chunk[1])

    chunks = [(a, min(POPULATE_CHUNK, end - a)) for start, end in spans for a in range(start, end, POPULATE_CHUNK)]
    threads = threads or min(8, len(os.sched_getaffinity(0)))  # only under TCMalloc, so on Linux
    with ThreadPoolExecutor(max(1, min(threads, len(chunks)))) as pool:
        list(pool.map(back, chunks))


def describe() -> str:
    """One start-up line: which allocator this process runs on, and how to get TCMalloc without it."""
    if in_use() == "tcmalloc":
        return f"host allocator: TCMalloc (TCMALLOC_RELEASE_RATE={os.environ.get('TCMALLOC_RELEASE_RATE', '1')})"
    if choice(os.environ) == "system":
        return f"host allocator: glibc malloc ({ENV}=system)"
    if os.environ.get(TRIED):
        return f"host allocator: glibc malloc; TCMalloc did not load from LD_PRELOAD={os.environ.get('LD_PRELOAD')!r}"
    return (f"host allocator: glibc malloc; CPU steps take ~0.8x as long under TCMalloc ({INSTALL}; "
            "the jaxckpt command then uses it)")
