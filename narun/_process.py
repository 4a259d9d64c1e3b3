"""Process-level tuning for compute processes: glibc malloc thresholds and BLAS threads.

Two defaults cost a training process time on every step:

- glibc malloc gives large freed blocks back to the OS (munmap, or trimming the heap top), so
  the next step's temporaries page-fault again. layer_norm forward+backward on 16x128x256
  float32, fresh process, 2 cores: 2017 minor faults per step untuned, 1.2 tuned, and 3.5x
  faster (4.1x on an executor thread). `tune_process` pins the thresholds so freed memory
  stays in the process (its RSS stays at its peak instead of shrinking between steps).
- OpenBLAS starts one thread per core; co-located worker processes then oversubscribe the
  cores. `tune_process(blas_threads=n)` sets the already-loaded OpenBLAS to n threads through
  its own C API (threadpoolctl is not a dependency); `blas_env(n)` is the environment for
  child processes, read by BLAS when it loads.

    >>> tune_process(blas_threads=1)  # doctest: +SKIP
    ProcessTuning(malloc=True, mmap_threshold=1073741824, blas_threads=1)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import structlog

__all__ = ["ProcessTuning", "blas_env", "blas_threads", "set_blas_threads", "tune_on_import",
           "tune_process"]

log = structlog.get_logger("narun.process")

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# Freed memory at the top of the heap is kept up to this much: a step's temporaries are
# reused by the next step instead of being returned and faulted in again.
TRIM_THRESHOLD = 1 << 30
# Blocks below this come from the heap (reusable), above it from mmap (unmapped on free).
# glibc 2.36 (measured here) accepts 1 GiB; older glibc refuses anything above
# HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit (mallopt returns 0), so that is the fallback.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)

# Variables read by OpenBLAS, OpenMP, MKL and Apple Accelerate when they load.
_BLAS_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                  "VECLIB_MAXIMUM_THREADS")
# (set, get) symbol pairs: numpy>=2 wheels (scipy-openblas, ILP64), numpy 1.x wheels, system.
_OPENBLAS_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


@dataclass(frozen=True)
class ProcessTuning:
    """What `tune_process` achieved: `malloc` is False where the libc is not glibc (or it
    refused a setting); `blas_threads` is the read-back thread count, None without OpenBLAS."""

    malloc: bool
    mmap_threshold: int | None
    blas_threads: int | None


def tune_process(blas_threads: int | None = None) -> ProcessTuning:
    """Keep freed memory in the process (glibc only) and set OpenBLAS to `blas_threads`.

    Call it early, before the compute thread starts: M_ARENA_MAX=1 applies to threads that
    have not allocated yet. It makes such a thread allocate from the main heap, where the
    thresholds hold for blocks of any size; a thread arena's heaps are 64 MiB, and there
    48 MiB temporaries still faulted on every step (measured; none with M_ARENA_MAX=1).
    Returns what took effect; `blas_threads=None` leaves BLAS as it is.
    """
    if blas_threads is not None:
        _check_threads(blas_threads)
    malloc_ok, mmap_threshold = _tune_malloc()
    if blas_threads is None:
        return ProcessTuning(malloc_ok, mmap_threshold, _read_blas_threads())
    threads = set_blas_threads(blas_threads)
    if threads is None:
        log.warning("blas_threads_unsupported", wanted=blas_threads,
                    reason="no OpenBLAS library is loaded in this process; "
                           "give child processes blas_env() instead")
    return ProcessTuning(malloc_ok, mmap_threshold, threads)


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it alone exports gnu_get_libc_version)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no dlopen(NULL)
        return None
    if not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def tune_on_import() -> bool:
    """What `import narun` does for every user: keep freed memory in the process (the heap
    thresholds of `tune_process`), so a training loop's temporaries are reused step after
    step instead of being unmapped and faulted in again, the job PyTorch's caching allocator
    does for its tensors (GPT step, 2 threads, plain script: 0.82x PyTorch untuned, 0.97x
    tuned). Not the arena limit, which only matters for threads started for compute.
    NARUN_TUNE_MALLOC=0 in the environment keeps glibc's defaults. True if it took effect."""
    if os.environ.get(TUNE_ENV, "1") == "0":
        return False
    return _tune_malloc(arenas=False)[0]


#: `NARUN_TUNE_MALLOC=0` opts a process that imports narun out of `tune_on_import`
TUNE_ENV = "NARUN_TUNE_MALLOC"


def _tune_malloc(arenas: bool = True) -> tuple[bool, int | None]:
    libc = _glibc()
    if libc is None:
        return False, None
    ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if arenas:
        ok &= libc.mallopt(_M_ARENA_MAX, 1) == 1
    # mallopt returns 1 on success and 0 when it refuses the value.
    applied = next((t for t in MMAP_THRESHOLDS if libc.mallopt(_M_MMAP_THRESHOLD, t) == 1), None)
    if not ok or applied is None:
        log.warning("mallopt_refused", trim_and_arena_ok=ok, mmap_threshold=applied)
    return ok and applied is not None, applied


def _check_threads(threads: int) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"blas threads must be an int >= 1, got {threads!r}")


def _openblas_libraries() -> list[tuple[str, ctypes.CDLL, str, str]]:
    """(path, handle, set symbol, get symbol) of every OpenBLAS mapped into this process.

    Linux only: the mapped libraries are read from /proc/self/maps, so the library found is
    the one NumPy really loaded (wheels ship it under a hashed name in numpy.libs/).
    """
    import numpy  # noqa: F401  (loads NumPy's BLAS, so that it is mapped below)

    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    paths: list[str] = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        path = fields[5] if len(fields) == 6 else ""
        name = os.path.basename(path).lower()
        if path.startswith("/") and "openblas" in name and path not in paths:
            paths.append(path)
    found = []
    for path in paths:
        try:  # RTLD_NOLOAD: a handle to the copy already loaded, never a second copy
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
        except OSError:
            continue
        for set_name, get_name in _OPENBLAS_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                found.append((path, lib, set_name, get_name))
                break
    return found


def set_blas_threads(threads: int) -> int | None:
    """Set every OpenBLAS loaded in this process to `threads`; returns the read-back count
    (of the first one, NumPy's), or None where no OpenBLAS is loaded (e.g. macOS Accelerate).
    """
    _check_threads(threads)
    libs = _openblas_libraries()
    for _, lib, set_name, _ in libs:
        fn = getattr(lib, set_name)
        fn.argtypes = [ctypes.c_int]
        fn.restype = None
        fn(threads)
    return _read_blas_threads()


def blas_threads() -> int | None:
    """Threads NumPy's OpenBLAS uses now (openblas_get_num_threads); None without OpenBLAS."""
    return _read_blas_threads()


def _read_blas_threads() -> int | None:  # tune_process's argument shadows blas_threads()
    libs = _openblas_libraries()
    if not libs:
        return None
    _, lib, _, get_name = libs[0]
    fn = getattr(lib, get_name)
    fn.argtypes = []
    fn.restype = ctypes.c_int
    return int(fn())


def blas_env(threads: int) -> dict[str, str]:
    """Environment variables that give a child process `threads` BLAS/OpenMP threads.

        >>> blas_env(2)["OPENBLAS_NUM_THREADS"]
        '2'
    """
    _check_threads(threads)
    return {name: str(threads) for name in _BLAS_ENV_VARS}


def rss_bytes() -> int | None:
    """This process's resident set size now (None where /proc is not available)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere a
    no-op), so a coordinator or service killed with -9 leaves no child running. Safe as a
    subprocess preexec_fn. With `parent`, exit at once if that parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # it died before prctl took effect
        os._exit(3)
