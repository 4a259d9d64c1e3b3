"""conv2d (im2col + one GEMM per image), max_pool2d and avg_pool2d, over NCHW inputs.

Windows are strided views of the (padded) input, never Python loops over pixels. Backward
scatters window gradients back with one strided `+=` per kernel offset (kh * kw of them):
within one offset the windows hit distinct input pixels, and successive offsets accumulate,
so overlapping windows (stride < kernel) sum correctly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from narun.errors import ConfigError, ShapeError
from narun.nn.functional._common import pair, require_float, unbatched
from narun.tensor._tensor import Tensor, check_same_device, make

IntPair = int | tuple[int, int]


def _pad(xp: Any, x: Any, pads: tuple[int, int, int, int], value: float) -> Any:
    """x padded by (top, bottom, left, right) pixels of `value`."""
    if not any(pads):
        return x
    top, bottom, left, right = pads
    N, C, H, W = x.shape
    out = xp.full((N, C, H + top + bottom, W + left + right), value, dtype=x.dtype)
    out[:, :, top:top + H, left:left + W] = x
    return out


def _conv_padding(op: str, padding: IntPair | str, k: tuple[int, int], s: tuple[int, int],
                  d: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from an int, a pair, 'valid' or 'same' (torch's rules)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        if s != (1, 1):
            raise ConfigError(f"{op}: padding='same' needs stride 1, got stride {s}")
        # Odd totals put the extra pixel at the bottom/right, as torch does.
        th, tw = d[0] * (k[0] - 1), d[1] * (k[1] - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    if isinstance(padding, str):
        raise ConfigError(f"{op}: padding must be an int, a pair, 'valid' or 'same', "
                          f"got {padding!r}")
    ph, pw = pair(op, "padding", padding)
    if min(ph, pw) < 0:
        raise ConfigError(f"{op}: padding must be non-negative, got {(ph, pw)}")
    return (ph, ph, pw, pw)


def _out_size(op: str, size: int, k: int, s: int, d: int) -> int:
    n = (size - d * (k - 1) - 1) // s + 1
    if n < 1:
        raise ShapeError(f"{op}: a kernel of {k} (dilation {d}) does not fit an input of "
                         f"{size} (after padding)")
    return n


def _offsets(kh: int, kw: int, dh: int, dw: int, sh: int, sw: int, Ho: int,
             Wo: int) -> Iterator[tuple[int, tuple[slice, slice]]]:
    """(kernel offset number, the input slice its Ho x Wo window positions read)."""
    for i in range(kh):
        for j in range(kw):
            yield i * kw + j, (slice(i * dh, i * dh + sh * (Ho - 1) + 1, sh),
                               slice(j * dw, j * dw + sw * (Wo - 1) + 1, sw))


def _check_positive(op: str, **pairs: tuple[int, int]) -> None:
    for name, v in pairs.items():
        if min(v) < 1:
            raise ConfigError(f"{op}: {name} must be positive, got {v}")


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: IntPair = 1,
           padding: IntPair | str = 0, dilation: IntPair = 1) -> Tensor:
    """2-d cross-correlation, as torch.nn.functional.conv2d with groups=1.

    x (N, C, H, W) or (C, H, W); weight (O, C, kh, kw); bias (O,). `padding` (zeros) is an
    int, a pair, 'valid' or 'same'.
    """
    op = "conv2d"
    require_float(op, "input", x)
    require_float(op, "weight", weight)
    parents = (x, weight) if bias is None else (x, weight, bias)
    check_same_device(op, *parents)
    single = unbatched(op, x, 4, "input (N, C, H, W)")
    if weight.ndim != 4 or weight.shape[1] != x.shape[-3]:
        raise ShapeError(f"{op}: weight of shape {weight.shape} does not fit input of shape "
                         f"{x.shape}; expected (out_channels, {x.shape[-3]}, kh, kw)")
    O, C, kh, kw = weight.shape
    if bias is not None and bias.shape != (O,):
        raise ShapeError(f"{op}: bias has shape {bias.shape}, expected ({O},)")
    (sh, sw), (dh, dw) = pair(op, "stride", stride), pair(op, "dilation", dilation)
    _check_positive(op, stride=(sh, sw), dilation=(dh, dw))
    pads = _conv_padding(op, padding, (kh, kw), (sh, sw), (dh, dw))
    xp = x.xp
    x4 = x.data[None] if single else x.data
    N, _, H, W = x4.shape
    xpad = _pad(xp, x4, pads, 0.0)
    Ho = _out_size(op, xpad.shape[2], kh, sh, dh)
    Wo = _out_size(op, xpad.shape[3], kw, sw, dw)
    sN, sC, sH, sW = xpad.strides
    windows = xp.lib.stride_tricks.as_strided(
        xpad, (N, C, kh, kw, Ho, Wo), (sN, sC, sH * dh, sW * dw, sH * sh, sW * sw))
    K, P = C * kh * kw, Ho * Wo
    cols = windows.reshape(N, K, P)  # the im2col copy: (N, C*kh*kw, Ho*Wo)
    W2 = weight.data.reshape(O, K)
    out = xp.matmul(W2, cols)  # one GEMM per image, already in NCHW order
    if bias is not None:
        out += bias.data[:, None]
    out = out.reshape(N, O, Ho, Wo)

    def backward(g: Any) -> tuple[Any, ...]:
        g4 = g[None] if single else g
        g3 = g4.reshape(N, O, P)
        gx = gw = None
        if weight.requires_grad:
            gw = xp.matmul(g3, cols.swapaxes(1, 2)).sum(axis=0).reshape(weight.shape)
        if x.requires_grad:
            dcols = xp.matmul(W2.T, g3).reshape(N, C, kh, kw, Ho, Wo)
            dpad = xp.zeros(xpad.shape, dtype=dcols.dtype)
            for n, (rows, cols_) in _offsets(kh, kw, dh, dw, sh, sw, Ho, Wo):
                dpad[:, :, rows, cols_] += dcols[:, :, n // kw, n % kw]
            gx = dpad[:, :, pads[0]:pads[0] + H, pads[2]:pads[2] + W]
            if single:
                gx = gx[0]
        if bias is None:
            return gx, gw
        return gx, gw, (g4.sum(axis=(0, 2, 3)) if bias.requires_grad else None)

    return make(out[0] if single else out, parents, backward, "conv2d")


def _pool_args(op: str, x: Tensor, kernel_size: IntPair, stride: IntPair | None,
               padding: IntPair, dilation: IntPair = 1) -> tuple[tuple[int, int], ...]:
    k = pair(op, "kernel_size", kernel_size)
    s = k if stride is None else pair(op, "stride", stride)
    p = pair(op, "padding", padding)
    d = pair(op, "dilation", dilation)
    _check_positive(op, kernel_size=k, stride=s, dilation=d)
    for pi, ki, di in zip(p, k, d):
        if pi < 0 or pi > (di * (ki - 1) + 1) // 2:
            raise ConfigError(f"{op}: padding {p} must be between 0 and half the "
                              f"(dilated) kernel size {k}")
    return k, s, p, d


def max_pool2d(x: Tensor, kernel_size: IntPair, stride: IntPair | None = None,
               padding: IntPair = 0, dilation: IntPair = 1) -> Tensor:
    """Max over kh x kw windows, as torch.nn.functional.max_pool2d (ceil_mode=False).

    `stride` defaults to the kernel size; padding counts as -inf. The gradient goes to the
    first maximum of each window (row-major), as torch's CPU kernel picks it.
    """
    op = "max_pool2d"
    require_float(op, "input", x)
    single = unbatched(op, x, 4, "input (N, C, H, W)")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pool_args(op, x, kernel_size, stride, padding,
                                                        dilation)
    xp = x.xp
    x4 = x.data[None] if single else x.data
    xpad = _pad(xp, x4, (ph, ph, pw, pw), -xp.inf)
    Ho = _out_size(op, xpad.shape[2], kh, sh, dh)
    Wo = _out_size(op, xpad.shape[3], kw, sw, dw)
    out = arg = None
    for n, (rows, cols) in _offsets(kh, kw, dh, dw, sh, sw, Ho, Wo):
        window = xpad[:, :, rows, cols]
        if out is None:
            out = window.copy()
            arg = xp.zeros(out.shape, dtype=xp.int32)
            continue
        better = window > out  # strict: ties keep the earlier offset
        xp.copyto(out, window, where=better)
        arg[better] = n

    def backward(g: Any) -> tuple[Any]:
        g4 = g[None] if single else g
        dpad = xp.zeros(xpad.shape, dtype=g.dtype)
        for n, (rows, cols) in _offsets(kh, kw, dh, dw, sh, sw, Ho, Wo):
            dpad[:, :, rows, cols] += g4 * (arg == n)
        gx = dpad[:, :, ph:ph + x4.shape[2], pw:pw + x4.shape[3]]
        return (gx[0] if single else gx,)

    return make(out[0] if single else out, (x,), backward, "max_pool2d")


def avg_pool2d(x: Tensor, kernel_size: IntPair, stride: IntPair | None = None,
               padding: IntPair = 0, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """Mean over kh x kw windows, as torch.nn.functional.avg_pool2d (ceil_mode=False).

    Zero padding; `count_include_pad=False` divides by the number of real pixels in each
    window instead of kh * kw; `divisor_override` divides by that number instead.
    """
    op = "avg_pool2d"
    require_float(op, "input", x)
    single = unbatched(op, x, 4, "input (N, C, H, W)")
    (kh, kw), (sh, sw), (ph, pw), _ = _pool_args(op, x, kernel_size, stride, padding)
    if divisor_override is not None and divisor_override <= 0:
        raise ConfigError(f"{op}: divisor_override must be positive, got {divisor_override}")
    xp = x.xp
    x4 = x.data[None] if single else x.data
    H, W = x4.shape[2:]
    xpad = _pad(xp, x4, (ph, ph, pw, pw), 0.0)
    Ho = _out_size(op, H + 2 * ph, kh, sh, 1)
    Wo = _out_size(op, W + 2 * pw, kw, sw, 1)
    out = None
    for _, (rows, cols) in _offsets(kh, kw, 1, 1, sh, sw, Ho, Wo):
        window = xpad[:, :, rows, cols]
        if out is None:
            out = window.copy()
        else:
            out += window
    if divisor_override is not None:
        inv = 1.0 / divisor_override
    elif count_include_pad or (ph == 0 and pw == 0):
        inv = 1.0 / (kh * kw)
    else:
        # Real pixels per window = (real rows it covers) x (real columns it covers).
        def covered(n_out: int, s: int, k: int, p: int, size: int) -> Any:
            start = xp.arange(n_out) * s - p
            return xp.minimum(start + k, size) - xp.maximum(start, 0)

        counts = covered(Ho, sh, kh, ph, H)[:, None] * covered(Wo, sw, kw, pw, W)[None, :]
        inv = (1.0 / counts).astype(x.dtype)
    out *= inv

    def backward(g: Any) -> tuple[Any]:
        g4 = (g[None] if single else g) * inv
        dpad = xp.zeros(xpad.shape, dtype=g4.dtype)
        for _, (rows, cols) in _offsets(kh, kw, 1, 1, sh, sw, Ho, Wo):
            dpad[:, :, rows, cols] += g4
        gx = dpad[:, :, ph:ph + H, pw:pw + W]
        return (gx[0] if single else gx,)

    return make(out[0] if single else out, (x,), backward, "avg_pool2d")
