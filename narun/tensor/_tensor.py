"""The Tensor: an array (NumPy or CuPy) plus what autograd needs to differentiate through it."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from narun.errors import DeviceMismatchError, GradError
from narun.tensor import _autograd, _backend


class Tensor:
    """An n-d array on a device, with autograd.

    Make one with `narun.tensor(...)`; ops build new tensors and, when any input requires
    grad (and grad mode is on), remember how, so `loss.backward()` can fill `.grad` of every
    leaf tensor with `requires_grad=True`.
    """

    __slots__ = ("data", "grad", "requires_grad", "_node", "_retains_grad", "_grad_hooks",
                 "__weakref__")
    __array_priority__ = 1000  # so ndarray (op) Tensor defers to Tensor's reflected operators

    def __init__(self, data: Any, requires_grad: bool = False) -> None:
        self.data = data
        self.grad: Tensor | None = None
        self.requires_grad = bool(requires_grad)
        self._node: _autograd.Node | None = None
        self._retains_grad = False
        self._grad_hooks: list[Callable[[Tensor], None]] = []
        if self.requires_grad and not _backend.is_inexact(data.dtype):
            raise GradError(f"only floating-point tensors can require grad, got {data.dtype}")

    @classmethod
    def _wrap(cls, data: Any) -> Tensor:
        t = cls.__new__(cls)
        t.data = data
        t.grad = None
        t.requires_grad = False
        t._node = None
        t._retains_grad = False
        t._grad_hooks = []
        return t

    # ---- properties ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def device(self) -> str:
        return _backend.device_of(self.data)

    @property
    def xp(self) -> ModuleType:
        return _backend.get_array_module(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    @property
    def grad_fn(self) -> str | None:
        """Name of the op that made this tensor (None for leaves)."""
        return None if self._node is None else self._node.name

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(self.data.size)

    def dim(self) -> int:
        return self.data.ndim

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    # ---- conversion ------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The values as a NumPy array (a copy from the GPU; the same memory on the CPU)."""
        return self.data if isinstance(self.data, np.ndarray) else self.data.get()

    def item(self) -> Any:
        if self.data.size != 1:
            raise ValueError(f"item() needs a one-element tensor, got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self) -> Any:
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """The same values, cut off from the graph (shares memory)."""
        return Tensor._wrap(self.data)

    def to(self, device: str | None = None, dtype: Any = None) -> Tensor:
        """Move to a device and/or cast; differentiable. Returns self when nothing changes."""
        from narun.tensor._ops_elementwise import cast, move

        out = self
        if device is not None and _backend.normalize_device(device) != self.device:
            out = move(out, _backend.normalize_device(device))
        if dtype is not None and _backend.as_dtype(dtype) != out.dtype:
            out = cast(out, _backend.as_dtype(dtype))
        return out

    def cpu(self) -> Tensor:
        return self.to("cpu")

    def cuda(self, index: int = 0) -> Tensor:
        return self.to(f"cuda:{index}")

    def float(self) -> Tensor:
        return self.to(dtype=np.float32)

    def double(self) -> Tensor:
        return self.to(dtype=np.float64)

    def long(self) -> Tensor:
        return self.to(dtype=np.int64)

    # ---- autograd --------------------------------------------------------------------
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        _autograd.backward(self, grad, retain_graph=retain_graph)

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        if not self.is_leaf:
            raise GradError("requires_grad_() is for leaf tensors; use detach() first")
        if requires_grad and not _backend.is_inexact(self.dtype):
            raise GradError(f"only floating-point tensors can require grad, got {self.dtype}")
        self.requires_grad = requires_grad
        return self

    def retain_grad(self) -> None:
        """Keep `.grad` on this non-leaf tensor after backward."""
        self._retains_grad = True

    def register_post_accumulate_grad_hook(self, hook: Callable[[Tensor], None]) -> None:
        """Call `hook(tensor)` once this leaf's gradient is final for the current backward.

        Leaves finish in reverse order of use, so a trainer can send the last layer's
        gradients while backward is still computing the first layer's.
        """
        self._grad_hooks.append(hook)

    def zero_grad(self) -> None:
        self.grad = None

    # ---- printing --------------------------------------------------------------------
    def __repr__(self) -> str:
        body = np.array2string(self.numpy(), separator=", ", precision=4, threshold=64,
                               prefix="tensor(")
        extra = ""
        if self.device != "cpu":
            extra += f", device='{self.device}'"
        if self.dtype != _backend.DEFAULT_DTYPE:
            extra += f", dtype={self.dtype}"
        if self._node is not None:
            extra += f", grad_fn={self._node.name}"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    def __bool__(self) -> bool:
        if self.data.size != 1:
            raise ValueError(f"truth value of a tensor with {self.data.size} elements is "
                             "ambiguous; use .any() or .all()")
        return bool(self.data.reshape(()))

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if self.dtype.kind not in "iub":
            raise TypeError(f"only integer tensors can be used as an index, got {self.dtype}")
        return int(self.item())

    def __hash__(self) -> int:  # tensors are identities (dict keys, sets), like torch's
        return id(self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)


def make(data: Any, parents: tuple[Tensor, ...], backward: _autograd.BackwardFn,
         name: str) -> Tensor:
    """Wrap an op's result; record `backward` when grad mode is on and an input needs grad."""
    out = Tensor._wrap(data)
    if _autograd._mode.enabled:
        for p in parents:
            if p.requires_grad:
                out.requires_grad = True
                out._node = _autograd.Node(name, parents, backward)
                break
    return out


def check_same_device(op: str, *tensors: Tensor) -> None:
    first = tensors[0].device
    for t in tensors[1:]:
        if t.device != first:
            raise DeviceMismatchError(f"{op}: operands are on different devices, {first} and "
                                      f"{t.device}; move one with .to(device)")


def as_tensor_like(x: Any, like: Tensor) -> Tensor:
    """`x` as a (non-grad) tensor on `like`'s device; Tensors pass through unchanged."""
    if isinstance(x, Tensor):
        return x
    xp = like.xp
    if isinstance(x, np.ndarray) and xp is not np:
        raise DeviceMismatchError(f"a NumPy array (cpu) was mixed with a tensor on "
                                  f"{like.device}; move it with narun.tensor(x, device=...)")
    arr = xp.asarray(x)
    if (_backend.is_floating(arr.dtype) and _backend.is_floating(like.dtype)
            and not isinstance(x, np.ndarray)):
        arr = arr.astype(like.dtype)
    return Tensor._wrap(arr)
