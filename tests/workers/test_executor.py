"""Device executors: the thread contract (shared by every backend), then cpu, cuda, mps."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from narun._process import blas_threads, set_blas_threads
from narun.errors import ConfigError, DeviceError, DTypeError, WaitTimeout
from workers.executor import (
    CpuExecutor,
    CudaExecutor,
    Executor,
    MpsExecutor,
    make_executor,
    parse_device,
    resolve_device,
)

pytestmark = pytest.mark.timeout(60)

try:
    import uvloop
except ImportError:  # uvloop is not built for Windows
    uvloop = None

LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio")]
if uvloop is not None:
    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))


def run_in_loop(factory: Callable[[], asyncio.AbstractEventLoop],
                coro: Coroutine[Any, Any, Any]) -> Any:
    loop = factory()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 30))
    finally:
        loop.close()


@pytest.fixture
def cpu():
    saved = blas_threads()
    ex = CpuExecutor(blas_threads=1)  # 2 shared cores: keep BLAS off the other one
    yield ex
    ex.close()
    if saved is not None:
        set_blas_threads(saved)


# -- device names -------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("cpu", ("cpu", None)), ("cuda", ("cuda", 0)), ("cuda:0", ("cuda", 0)),
    ("cuda:12", ("cuda", 12)), ("mps", ("mps", None)), ("auto", ("auto", None)),
])
def test_parse_device(name, expected):
    assert parse_device(name) == expected


@pytest.mark.parametrize("junk", ["gpu", "cuda:", "cuda:-1", "CUDA", "cpu:0", "", " cpu", None, 0])
def test_parse_device_rejects_junk_naming_the_key(junk):
    with pytest.raises(ConfigError, match="runtime.device") as e:
        parse_device(junk)
    assert repr(junk) in str(e.value)


def test_resolve_device_names_without_probing():
    assert resolve_device("cuda") == "cuda:0"
    assert resolve_device("cuda:3") == "cuda:3"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("mps") == "mps"


def fake_cupy(count: int | None) -> types.ModuleType:
    """A module that answers CuPy's device count (None: as without a usable driver)."""
    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count() -> int:
        if count is None:
            raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is "
                                   "insufficient for CUDA runtime version")
        return count

    cp = types.ModuleType("cupy")
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count,
                                    CUDARuntimeError=CUDARuntimeError)
    cp.cuda = types.SimpleNamespace(runtime=runtime)  # type: ignore[attr-defined]
    return cp


def fake_mlx(metal: bool) -> types.ModuleType:
    mx = types.ModuleType("mlx.core")
    mx.metal = types.SimpleNamespace(is_available=lambda: metal)  # type: ignore[attr-defined]
    return mx


def test_auto_prefers_cuda_then_metal_then_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(2))
    assert resolve_device("auto") == "cuda:0"
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(0))  # CuPy but no GPU
    monkeypatch.setitem(sys.modules, "mlx.core", fake_mlx(metal=True))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert resolve_device("auto") == "mps"
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(None))  # CuPy but no driver
    monkeypatch.setitem(sys.modules, "mlx.core", fake_mlx(metal=False))
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(sys, "platform", "linux")  # MLX's CPU build on Linux is not mps
    monkeypatch.setitem(sys.modules, "mlx.core", fake_mlx(metal=True))
    assert resolve_device("auto") == "cpu"
    monkeypatch.setitem(sys.modules, "cupy", None)  # neither imports
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    assert resolve_device("auto") == "cpu"


# -- the thread contract (shown on the cpu executor; the logic is all in Executor) --------

def test_work_runs_on_one_dedicated_thread(cpu):
    t1 = cpu.run_sync(threading.current_thread)
    t2 = cpu.run_sync(threading.current_thread)
    assert t1 is t2 and t1 is not threading.current_thread()
    assert t1.name.startswith("narun-executor-cpu")
    a = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(cpu.run_sync(np.matmul, a, a.T), a @ a.T)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_run_awaits_results_in_submission_order(cpu, loop_factory):
    order: list[int] = []

    def work(i: int) -> int:
        order.append(i)
        return i * i

    async def main() -> list[int]:
        return await asyncio.gather(*(cpu.run(work, i) for i in range(20)))

    assert run_in_loop(loop_factory, main()) == [i * i for i in range(20)]
    assert order == list(range(20))


def failing_step(x: float) -> float:
    raise ValueError(f"bad value {x}")


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_exceptions_reach_the_awaiting_coroutine_with_their_traceback(cpu, loop_factory):
    async def main() -> BaseException:
        try:
            await cpu.run(failing_step, 1.5)
        except ValueError as e:
            return e
        raise AssertionError("no exception")

    err = run_in_loop(loop_factory, main())
    assert str(err) == "bad value 1.5"
    frames = traceback.extract_tb(err.__traceback__)
    assert frames[-1].name == "failing_step"  # raised on the executor thread, frame kept
    assert cpu.run_sync(lambda: 7) == 7  # and the executor keeps serving


def test_run_sync_raises_the_original_exception(cpu):
    with pytest.raises(ValueError, match="bad value 2") as e:
        cpu.run_sync(failing_step, 2)
    assert traceback.extract_tb(e.value.__traceback__)[-1].name == "failing_step"


def busy_numpy(seconds: float) -> int:
    """Real compute for `seconds` (BLAS releases the GIL, as the engine's big ops do)."""
    a = np.random.default_rng(0).standard_normal((192, 192)).astype(np.float32)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = np.tanh(a @ a * 0.01)
        n += 1
    return n


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_heartbeats_keep_ticking_during_a_long_step(cpu, loop_factory):
    async def main() -> tuple[list[float], int, int]:
        ticks: list[float] = []

        async def heartbeat() -> None:
            while True:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.010)

        hb = asyncio.ensure_future(heartbeat())
        await asyncio.sleep(0.05)
        # Control: the same compute run on the loop itself stops the heartbeat dead.
        before = len(ticks)
        busy_numpy(0.2)
        on_loop = len(ticks) - before
        start = time.perf_counter()
        steps = await cpu.run(busy_numpy, 1.0)
        during = [t for t in ticks if t >= start]
        hb.cancel()
        return during, on_loop, steps

    during, on_loop, steps = run_in_loop(loop_factory, main())
    assert on_loop == 0 and steps > 0
    # ~95 ticks if the loop runs freely; a loaded 2-core box still gives far more than 25.
    assert len(during) >= 25, len(during)
    assert max(np.diff(during)) < 0.25


def test_close_finishes_queued_work_joins_and_is_idempotent():
    ex = CpuExecutor()
    thread = ex.run_sync(threading.current_thread)

    def slow_step(x: float) -> float:
        time.sleep(0.1)
        return float(ex.to_host(np.array([x]))[0])  # executor calls still work while draining

    async def main() -> list[float]:
        steps = [asyncio.ensure_future(ex.run(slow_step, float(i))) for i in range(3)]
        await asyncio.sleep(0.01)
        await ex.aclose()  # waits for the queued work, without blocking the loop
        return [s.result() for s in steps]

    assert run_in_loop(asyncio.new_event_loop, main()) == [0.0, 1.0, 2.0]
    assert not thread.is_alive() and ex.closed
    ex.close()
    with pytest.raises(DeviceError, match="closed"):
        ex.run_sync(len, [])
    with pytest.raises(DeviceError, match="closed"):
        ex.to_device(np.ones(2))
    with pytest.raises(DeviceError, match="closed"):
        asyncio.run(ex.run(len, []))


def test_run_sync_inside_the_executor_runs_inline(cpu):
    # Work on the executor may call run_sync/to_host itself without deadlocking.
    nested = cpu.run_sync(lambda: cpu.run_sync(threading.get_ident))
    assert nested == cpu.run_sync(threading.get_ident)
    with pytest.raises(DeviceError, match="own thread"):
        cpu.run_sync(cpu.close)
    assert not cpu.closed


def test_run_sync_timeout_names_the_work(cpu):
    def slow_step() -> None:
        time.sleep(0.3)

    with pytest.raises(WaitTimeout, match=r"'cpu'.*slow_step.*0\.05 s"):
        cpu.run_sync(slow_step, timeout=0.05)


class BrokenDevice(Executor):
    xp = np  # type: ignore[assignment]

    def _enter(self) -> None:
        raise RuntimeError("no such device")

    def _to_device(self, array: Any) -> Any:
        return array

    def _to_host(self, array: Any) -> np.ndarray:
        return np.asarray(array)


def test_a_device_that_fails_to_enter_fails_the_constructor_and_leaves_no_thread():
    with pytest.raises(RuntimeError, match="no such device"):
        BrokenDevice("broken")
    assert not [t for t in threading.enumerate() if t.name.startswith("narun-executor-broken")]


# -- cpu ----------------------------------------------------------------------------------

def test_cpu_executor_sets_blas_threads_and_tunes_malloc(cpu):
    if cpu.tuning.blas_threads is None:
        pytest.skip("no OpenBLAS loaded (NumPy built against another BLAS)")
    assert cpu.tuning.blas_threads == 1 == blas_threads()
    assert cpu.run_sync(blas_threads) == 1
    if sys.platform.startswith("linux"):
        assert cpu.tuning.malloc


def test_cpu_transfers_are_numpy_without_copies(cpu):
    a = np.arange(6, dtype=np.float32)
    assert cpu.to_device(a) is a and cpu.to_host(a) is a
    np.testing.assert_array_equal(cpu.to_device([1, 2]), np.array([1, 2]))
    assert cpu.xp is np and cpu.device == "cpu"
    cpu.synchronize()


def test_make_executor_cpu():
    with make_executor("cpu") as ex:
        assert isinstance(ex, CpuExecutor) and ex.device == "cpu"
        assert ex.run_sync(np.add, 2, 3) == 5


# -- cuda ---------------------------------------------------------------------------------

def test_cuda_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(DeviceError, match=r"needs CuPy.*narun\[cuda\]"):
        make_executor("cuda:0")


def test_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(1))
    with pytest.raises(DeviceError, match=r"'cuda:3' is out of range: 1 CUDA device\(s\).*cuda:0"):
        make_executor("cuda:3")


def test_cuda_without_a_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(None))
    with pytest.raises(DeviceError, match="CUDA is not usable here.*InsufficientDriver"):
        CudaExecutor(0)


def _gpu_count() -> int:
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # not installed, no driver: no GPU to test on
        return 0


@pytest.fixture
def gpu():
    ex = make_executor("cuda:0")
    yield ex
    ex.close()


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "bool", "float16"])
@pytest.mark.parametrize("shape", [(), (0, 3), (7,), (64, 33), (5_000_000,)])  # 5M: 3+ chunks
@pytest.mark.cuda
@pytest.mark.skipif(_gpu_count() == 0, reason="needs CuPy and a CUDA GPU")
def test_cuda_roundtrip(gpu, dtype, shape):
    import cupy
    rng = np.random.default_rng(1)
    host = np.asarray((rng.standard_normal(shape) * 100).astype(dtype))
    dev = gpu.to_device(host)
    assert isinstance(dev, cupy.ndarray) and dev.device.id == 0 and dev.shape == shape
    host[...] = 0  # the source is free for reuse as soon as to_device returns
    back = gpu.to_host(dev)
    assert isinstance(back, np.ndarray) and back.dtype == np.dtype(dtype) and back.shape == shape
    expected = (np.random.default_rng(1).standard_normal(shape) * 100).astype(dtype)
    np.testing.assert_array_equal(back, expected)


@pytest.mark.cuda
@pytest.mark.skipif(_gpu_count() == 0, reason="needs CuPy and a CUDA GPU")
def test_cuda_compute_runs_on_the_executor_stream(gpu):
    import cupy
    a = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]  # non-contiguous input

    def step(x: Any) -> tuple[Any, int, int]:
        y = x @ x.T
        return y, cupy.cuda.get_current_stream().ptr, cupy.cuda.Device().id

    y, stream_ptr, device_id = gpu.run_sync(step, gpu.to_device(a))
    assert stream_ptr == gpu._stream.ptr != 0 and device_id == 0
    np.testing.assert_allclose(gpu.to_host(y), a @ a.T)
    host = gpu.to_host(y)
    attrs = cupy.cuda.runtime.pointerGetAttributes(host.ctypes.data)
    assert attrs.type == cupy.cuda.runtime.memoryTypeHost  # pinned, not pageable


@pytest.mark.cuda
@pytest.mark.skipif(_gpu_count() == 0, reason="needs CuPy and a CUDA GPU")
def test_cuda_heartbeats_tick_during_gpu_work(gpu):
    import cupy

    def gpu_step() -> float:
        x = cupy.random.standard_normal((2048, 2048), dtype=cupy.float32)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            x = cupy.tanh(x @ x * 1e-3)
            cupy.cuda.get_current_stream().synchronize()
        return float(x.sum())

    async def main() -> int:
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.010)

        hb = asyncio.ensure_future(heartbeat())
        await gpu.run(gpu_step)
        hb.cancel()
        return ticks

    assert run_in_loop(asyncio.new_event_loop, main()) >= 20


# -- mps ----------------------------------------------------------------------------------

def test_mps_without_mlx_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    with pytest.raises(DeviceError, match=r"needs MLX.*narun\[mps\].*mlx\[cpu\]"):
        make_executor("mps")


def test_mps_needs_metal_for_the_gpu():
    pytest.importorskip("mlx.core", exc_type=ImportError)
    if sys.platform == "darwin":
        pytest.skip("this machine may well have Metal")
    with pytest.raises(DeviceError, match="Metal.*mlx_device='cpu'"):
        make_executor("mps")
    with pytest.raises(ValueError, match="'gpu' or 'cpu'"):
        MpsExecutor(mlx_device="metal")


@pytest.fixture
def mlx_cpu():
    pytest.importorskip("mlx.core", exc_type=ImportError)
    ex = MpsExecutor(mlx_device="cpu")
    yield ex
    ex.close()


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "int64", "uint8",
                                   "bool", "complex64"])
@pytest.mark.parametrize("shape", [(), (3, 5)])
def test_mps_roundtrip_keeps_dtype(mlx_cpu, dtype, shape):
    mx = mlx_cpu.xp
    host = np.asarray((np.random.default_rng(2).standard_normal(shape) * 10).astype(dtype))
    dev = mlx_cpu.to_device(host)
    assert isinstance(dev, mx.array) and str(dev.dtype) == f"mlx.core.{np.dtype(dtype).name}"
    back = mlx_cpu.to_host(dev)
    assert back.dtype == host.dtype and back.shape == shape
    np.testing.assert_array_equal(back, host)


def test_mps_compute_on_mlx_cpu_matches_numpy(mlx_cpu):
    mx = mlx_cpu.xp
    a = np.random.default_rng(3).standard_normal((8, 6))[:, ::2]  # float64, non-contiguous
    b = np.random.default_rng(4).standard_normal((3, 5))

    def step(x: Any, y: Any) -> tuple[np.ndarray, str]:
        z = mx.tanh(x @ y)  # lazy until to_host
        return mlx_cpu.to_host(z), str(mx.default_device())

    z, device = mlx_cpu.run_sync(step, mlx_cpu.to_device(a), mlx_cpu.to_device(b))
    assert device == "Device(cpu, 0)"
    np.testing.assert_allclose(z, np.tanh(a @ b), rtol=1e-12)
    mlx_cpu.synchronize()


def test_mps_refuses_dtypes_it_cannot_carry(mlx_cpu):
    mx = mlx_cpu.xp
    with pytest.raises(DTypeError, match="complex128"):
        mlx_cpu.to_device(np.ones(2, np.complex128))
    with pytest.raises(DTypeError, match="bfloat16.*float32"):
        mlx_cpu.to_host(mx.ones((2,), dtype=mx.bfloat16))


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_mps_run_from_the_loop(mlx_cpu, loop_factory):
    mx = mlx_cpu.xp

    def step(x: Any, scale: float) -> Any:  # builds the lazy graph on the executor thread
        return mx.sum(x * scale, axis=0)

    async def main() -> np.ndarray:
        x = await mlx_cpu.run(mlx_cpu.to_device, np.arange(5.0))
        y = await mlx_cpu.run(step, x, 2.0)
        return await mlx_cpu.run(mlx_cpu.to_host, y)

    assert run_in_loop(loop_factory, main()) == 20.0
