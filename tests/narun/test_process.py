"""narun._process: glibc malloc thresholds (read back through mallinfo2 and page faults in
fresh processes, since they are process-wide) and OpenBLAS threads (set and read back)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from narun import _process
from narun._process import (
    MMAP_THRESHOLDS,
    blas_env,
    blas_threads,
    set_blas_threads,
    tune_process,
)


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


needs_glibc = pytest.mark.skipif(not _is_glibc(), reason="malloc tuning is glibc-only")


def run_fresh(code: str, env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line, returned as a dict."""
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def restore_blas():
    saved = blas_threads()
    yield
    if saved is not None:
        set_blas_threads(saved)


@needs_glibc
def test_tune_process_is_accepted_by_glibc(restore_blas):
    tuning = tune_process()
    assert tuning.malloc is True
    assert tuning.mmap_threshold in MMAP_THRESHOLDS


# mallinfo2 (glibc >= 2.33) counts mmapped blocks (hblks) and free bytes kept in the heap
# (fordblks).
MALLINFO = """
import ctypes, json, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks "
                                               "fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print(json.dumps({"skip": "glibc without mallinfo2"})); sys.exit()
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""


# After `setup`: is a freed 48 MiB block mmapped (then unmapped on free) or kept in the heap?
HEAP_PROBE = """
{setup}
size = 48 << 20
before = libc.mallinfo2()
p = libc.malloc(size)
during = libc.mallinfo2()
libc.free(p)
after = libc.mallinfo2()
print(json.dumps({{"mmapped": during.hblks - before.hblks,
                   "kept_in_heap": after.fordblks >= size}}))
"""
KEPT = {"mmapped": 0, "kept_in_heap": True}  # from the heap (M_MMAP_THRESHOLD), kept there
MAPPED = {"mmapped": 1, "kept_in_heap": False}  # glibc's defaults


def heap_probe(setup: str, env: dict[str, str] | None = None) -> dict:
    got = run_fresh(MALLINFO + HEAP_PROBE.format(setup=setup), env)
    if "skip" in got:
        pytest.skip(got["skip"])
    return got


@needs_glibc
@pytest.mark.parametrize("tuned", [False, True])
def test_large_blocks_stay_in_the_heap_after_free(tuned):
    setup = "from narun._process import tune_process; tune_process()" if tuned else ""
    # the untuned control shows that the tuned case means something
    assert heap_probe(setup) == (KEPT if tuned else MAPPED)


@needs_glibc
@pytest.mark.parametrize("opt_out", [False, True])
def test_importing_narun_keeps_freed_memory_unless_opted_out(opt_out):
    """A library user's process, with no narun process around it: `import narun` alone
    keeps a freed 48 MiB block for the next step; NARUN_TUNE_MALLOC=0 keeps glibc's way."""
    got = heap_probe("import narun", {"NARUN_TUNE_MALLOC": "0"} if opt_out else None)
    assert got == (MAPPED if opt_out else KEPT)


FAULTS = """
import json, resource, sys, threading
import numpy as np
if sys.argv[1] == "1":
    from narun._process import tune_process
    tune_process()
faults = []
def step_loop():
    n = (48 << 20) // 4  # 48 MiB temporaries, as a big activation or logits buffer
    for i in range(8):
        if i == 2:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(n, np.float32)
        b = a * 2.0
        del a, b
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 6)
t = threading.Thread(target=step_loop)  # compute runs on the executor's thread
t.start(); t.join()
print(json.dumps({"faults_per_step": faults[0]}))
"""


@needs_glibc
def test_a_compute_thread_reuses_its_temporaries_without_page_faults():
    def faults(tuned: bool) -> float:
        out = subprocess.run([sys.executable, "-c", FAULTS, "1" if tuned else "0"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["faults_per_step"]

    untuned, tuned = faults(False), faults(True)
    assert untuned > 100  # the control: every step faults its 96 MiB in again
    assert tuned < untuned / 10, (tuned, untuned)


def test_not_glibc_is_a_no_op(monkeypatch, restore_blas):
    monkeypatch.setattr(_process, "_glibc", lambda: None)
    tuning = tune_process()
    assert tuning.malloc is False and tuning.mmap_threshold is None


def test_blas_threads_set_and_read_back(restore_blas):
    if blas_threads() is None:
        pytest.skip("no OpenBLAS loaded (NumPy built against another BLAS, or not Linux)")
    assert set_blas_threads(1) == 1 == blas_threads()
    assert set_blas_threads(2) == 2 == blas_threads()
    assert tune_process(blas_threads=1).blas_threads == 1 == blas_threads()


@pytest.mark.parametrize("threads", [1, 2])
def test_blas_env_reaches_a_child_process(threads):
    got = run_fresh("""
import json
from narun._process import blas_threads
print(json.dumps({"threads": blas_threads()}))
""", env=blas_env(threads))
    if got["threads"] is None:
        pytest.skip("no OpenBLAS loaded")
    assert got["threads"] == threads


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_thread_counts_are_checked(bad):
    with pytest.raises(ValueError, match=r"int >= 1, got"):
        blas_env(bad)
    with pytest.raises(ValueError, match=r"int >= 1, got"):
        tune_process(blas_threads=bad)
