"""The one helper every op test uses.

check_op(fn, ref, inputs) checks, for each case:
  * forward in float64 and float32 against a NumPy reference `ref`;
  * backward in float64 against central differences of narun's own forward, for a random
    upstream gradient (so every output element's gradient path is exercised);
  * the same, with inputs passed as non-contiguous views;
  * forward and backward against PyTorch when it is importable (`torch_fn`);
  * when MLX imports, the same op on device mlx:cpu: forward in float64 and float32 against
    the NumPy reference (or NumPy-run narun where there is none), backward in float64
    against the gradients the NumPy run computed for the same upstream gradient.

Without torch a comparison against it cannot run: `compare_with_torch` (which check_op
calls) notes it, and tests/conftest.py reports the test as skipped with the reason once its
other checks have passed, so a missing torch shows in pytest's summary (`-rs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import narun

try:
    import torch

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # tiny ops: worker threads only fight other tests for the cores
    TORCH_MISSING = ""
except ImportError as exc:  # torch is an optional oracle
    torch = None
    TORCH_MISSING = f"torch is not installed ({exc})"

HAS_TORCH = torch is not None

try:
    import mlx.core  # noqa: F401

    HAS_MLX = True
except ImportError:
    HAS_MLX = False

#: What the running test could not compare against torch (tests/conftest.py empties it
#: before each test and reports the test as skipped when it is not empty).
missed: list[str] = []


def compare_with_torch(what: str) -> bool:
    """True when torch is installed. Otherwise False, and the running test is reported as
    skipped (if it passes) with the reason: torch is missing, so `what` was not compared."""
    if torch is None:
        missed.append(what)
    return torch is not None


def noncontiguous(x: np.ndarray) -> np.ndarray:
    """The same values as a strided (non-C-contiguous) view."""
    if x.ndim == 0:
        return x
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1] + 1,), dtype=x.dtype)
    big[..., 1::2] = x
    view = big[..., 1::2]
    assert not view.flags.c_contiguous or x.shape[-1] <= 1
    return view


def _as_list(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _loss_weights(outs: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(np.shape(o)) for o in outs]


def _scalar_loss(outs: Sequence[Any], weights: Sequence[np.ndarray]) -> float:
    return float(sum(np.sum(np.asarray(o, dtype=np.float64) * w)
                     for o, w in zip(outs, weights)))


def check_op(
    fn: Callable[..., Any],
    ref: Callable[..., Any] | None,
    inputs: Sequence[np.ndarray],
    *,
    torch_fn: Callable[..., Any] | None = None,
    grad: Sequence[bool] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    eps: float = 1e-6,
    float32: bool = True,
    seed: int = 0,
) -> None:
    """Check op `fn` (narun tensors in, tensor or tuple of tensors out).

    `inputs`: NumPy arrays; floating ones are differentiated unless `grad` says otherwise,
    integer/bool ones (indices, masks) are passed through. `ref`: the same op on NumPy
    float64 arrays (None when there is no independent NumPy formulation, e.g. dropout).
    """
    rng = np.random.default_rng(seed)
    inputs = [np.asarray(x) for x in inputs]
    diff = [x.dtype.kind == "f" for x in inputs] if grad is None else list(grad)
    x64 = [x.astype(np.float64) if x.dtype.kind == "f" else x for x in inputs]

    def run(arrays: Sequence[np.ndarray], dtype: Any = np.float64, requires_grad: bool = True,
            device: str = "cpu"):
        ts = [narun.tensor(a.astype(dtype) if a.dtype.kind == "f" else a,
                           requires_grad=requires_grad and d, device=device)
              for a, d in zip(arrays, diff)]
        return ts, _as_list(fn(*ts))

    # forward, float64 and float32, against NumPy
    ts, outs = run(x64)
    expected = None
    if ref is not None:
        expected = _as_list(ref(*x64))
        assert len(expected) == len(outs), f"{len(outs)} outputs vs {len(expected)} expected"
        for o, e in zip(outs, expected):
            np.testing.assert_allclose(o.numpy(), e, rtol=1e-9, atol=1e-12,
                                       err_msg="float64 forward differs from NumPy")
        if float32:
            _, outs32 = run(x64, np.float32, requires_grad=False)
            for o, e in zip(outs32, expected):
                assert o.dtype == np.float32 or o.dtype.kind != "f", f"float32 gave {o.dtype}"
                np.testing.assert_allclose(o.numpy(), e, rtol=2e-4, atol=2e-5,
                                           err_msg="float32 forward differs from NumPy")

    # backward against central differences (float64)
    weights = _loss_weights([o.numpy() for o in outs], rng)
    total = None
    for o, w in zip(outs, weights):
        if o.requires_grad:
            term = (o * narun.tensor(w)).sum()
            total = term if total is None else total + term
    if total is None:  # nothing differentiable: the forward checks below still run
        assert not any(diff), "no output requires grad although an input does"
    else:
        total.backward()
    for i, (x, d) in enumerate(zip(x64, diff) if total is not None else ()):
        if not d:
            continue
        numeric = np.zeros_like(x)
        it = np.nditer(x, flags=["multi_index"])
        for _ in it:
            idx = it.multi_index
            plus, minus = [a.copy() for a in x64], [a.copy() for a in x64]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            with narun.no_grad():
                lp = _scalar_loss([o.numpy() for o in run(plus, requires_grad=False)[1]], weights)
                lm = _scalar_loss([o.numpy() for o in run(minus, requires_grad=False)[1]],
                                  weights)
            numeric[idx] = (lp - lm) / (2 * eps)
        analytic = ts[i].grad.numpy() if ts[i].grad is not None else np.zeros_like(x)
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i} differs from "
                                           "central differences")

    # non-contiguous inputs give the same values and gradients
    nts, nouts = run([noncontiguous(a) if a.ndim else a for a in x64])
    for o, r in zip(nouts, outs):
        np.testing.assert_allclose(o.numpy(), r.numpy(), rtol=1e-12, atol=1e-12,
                                   err_msg="non-contiguous input changed the forward")
    if total is not None:
        ntotal = sum(((o * narun.tensor(w)).sum() for o, w in zip(nouts, weights)
                      if o.requires_grad), start=narun.tensor(0.0, dtype=np.float64))
        ntotal.backward()
    for t, nt, d in zip(ts, nts, diff):
        if d and t.grad is not None:
            np.testing.assert_allclose(nt.grad.numpy(), t.grad.numpy(), rtol=1e-10,
                                       atol=1e-12, err_msg="non-contiguous input changed grads")

    if HAS_MLX:
        _check_mlx(run, x64, diff, [o.numpy() for o in outs], expected if ref else None,
                   weights, [t.grad.numpy() if t.grad is not None else None for t in ts],
                   float32)

    # PyTorch, when installed
    if torch_fn is not None and compare_with_torch("check_op's forward and backward"):
        tts = [torch.tensor(a, requires_grad=bool(d)) if a.dtype.kind == "f"
               else torch.tensor(a) for a, d in zip(x64, diff)]
        touts = _as_list(torch_fn(*tts))
        tl = None
        for to, o, w in zip(touts, outs, weights):
            np.testing.assert_allclose(to.detach().numpy(), o.numpy(), rtol=1e-9, atol=1e-12,
                                       err_msg="forward differs from torch")
            if to.requires_grad:
                term = (to * torch.tensor(w)).sum()
                tl = term if tl is None else tl + term
        if tl is not None:
            tl.backward()
            for tt, t, d in zip(tts, ts, diff):
                if d:
                    tg = tt.grad.numpy() if tt.grad is not None else 0 * tt.detach().numpy()
                    mine = t.grad.numpy() if t.grad is not None else np.zeros_like(tg)
                    np.testing.assert_allclose(mine, tg, rtol=1e-7, atol=1e-10,
                                               err_msg="gradient differs from torch")


_MLX64_RTOL, _MLX64_ATOL = 1e-6, 1e-6


def _check_mlx(run: Callable[..., Any], x64: Sequence[np.ndarray], diff: Sequence[bool],
               numpy_outs: Sequence[np.ndarray], expected: Sequence[Any] | None,
               weights: Sequence[np.ndarray], numpy_grads: Sequence[Any],
               float32: bool) -> None:
    """The op on mlx:cpu: forward against NumPy, backward against the NumPy run's grads.

    MLX 0.32 computes some float64 functions (exp, erf, sin) at float32 accuracy on its CPU
    (exp: 9e-8 relative against NumPy, erf: 2.5e-7 absolute), so float64 here is held to
    1e-6, not 1e-9."""
    reference = numpy_outs if expected is None else expected
    ts, outs = run(x64, device="mlx:cpu")
    assert len(outs) == len(reference)
    for o, e in zip(outs, reference):
        assert o.device == "mlx:cpu", f"an op on mlx:cpu returned a tensor on {o.device}"
        np.testing.assert_allclose(o.numpy(), e, rtol=_MLX64_RTOL, atol=_MLX64_ATOL,
                                   err_msg="mlx:cpu float64 forward differs from NumPy")
    if float32:
        _, outs32 = run(x64, np.float32, requires_grad=False, device="mlx:cpu")
        for o, e in zip(outs32, reference):
            assert o.dtype == np.float32 or o.dtype.kind != "f", f"float32 gave {o.dtype}"
            np.testing.assert_allclose(o.numpy(), e, rtol=2e-4, atol=2e-5,
                                       err_msg="mlx:cpu float32 forward differs from NumPy")
    total = None
    for o, w in zip(outs, weights):
        if o.requires_grad:
            term = (o * narun.tensor(w, device="mlx:cpu")).sum()
            total = term if total is None else total + term
    if total is None:
        return
    total.backward()
    for i, (t, d, g) in enumerate(zip(ts, diff, numpy_grads)):
        if not d:
            continue
        mine = t.grad.numpy() if t.grad is not None else np.zeros_like(x64[i])
        np.testing.assert_allclose(mine, g if g is not None else np.zeros_like(x64[i]),
                                   rtol=_MLX64_RTOL, atol=_MLX64_ATOL,
                                   err_msg=f"mlx:cpu gradient of input {i} differs from "
                                           "NumPy's")
