"""The Optimizer base: parameter groups, per-parameter state, state dicts, and the chunked
in-place update loop the concrete optimizers share.

Updates run on `p.data` and `p.grad.data` directly (no autograd), with `out=` ufuncs into
the optimizer's state arrays. A parameter is processed in slices of 256 KiB per array, so
each of an update's elementwise passes (12 for Adam) reads and writes cache-resident memory
instead of going back to DRAM. Measured for Adam on 16M float32 parameters, one core: 55 ms
sliced vs 110 ms whole-array (torch.optim.Adam, foreach=False: 105 ms); on a 1.9M-parameter
MLP, which fits in L3, slicing still gains ~15%. The scratch slices are allocated once per
optimizer and dtype, so a steady-state step allocates nothing parameter-sized.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from narun.errors import CheckpointError, ConfigError
from narun.nn.utils import zero_grads
from narun.tensor import _backend
from narun.tensor._autograd import enable_grad, no_grad
from narun.tensor._tensor import Tensor

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

_CHUNK_BYTES = 256 * 1024


def _plain(value: Any) -> Any:
    """NumPy scalars as Python numbers, so a state dict is plain data (JSON/msgpack)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


class Optimizer:
    """Base class: holds `param_groups` (a list of dicts, each with "params" and its
    hyperparameters) and `state` (a dict per parameter). Subclasses implement
    `_update(group, p, grad, state)` on arrays; the base class does the rest.
    """

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.state: dict[Tensor, dict[str, Any]] = {}
        self.param_groups: list[dict[str, Any]] = []
        self._scratch_bufs: dict[tuple[str, str, str], list[Any]] = {}
        if isinstance(params, Tensor):
            raise TypeError("params should be an iterable of Tensors or of dicts, got a single "
                            "Tensor; wrap it in a list")
        if isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters need to be an ordered collection (the order "
                            "names them in state dicts); got a set, pass a list")
        groups = list(params)
        if not groups:
            raise ConfigError(f"{type(self).__name__} got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # ---- groups ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters, with per-group options overriding the defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        if "params" not in group:
            raise ConfigError("a param group needs a 'params' entry")
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters need to be an ordered collection (the order "
                            "names them in state dicts); got a set, pass a list")
        params = list(params)
        index = len(self.param_groups)
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"param group {index}: element {i} is a {type(p).__name__}, "
                                "not a Tensor")
            if not p.is_leaf:
                raise ConfigError(f"param group {index}: element {i} is not a leaf tensor "
                                  "(it was computed by an op); optimize leaves only")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or any(id(p) in seen for p in params):
            raise ConfigError(f"param group {index}: some parameters appear more than once "
                              "(within the group or in an earlier group)")
        group["params"] = params
        for key, default in self.defaults.items():
            group.setdefault(key, default)
        self._validate_group(group, index)
        self.param_groups.append(group)

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        lr = group.get("lr")
        if not isinstance(lr, numbers.Real) or lr < 0:
            raise ConfigError(f"param group {index}: lr must be a number >= 0, got {lr!r}")
        wd = group.get("weight_decay", 0.0)
        if not isinstance(wd, numbers.Real) or wd < 0:
            raise ConfigError(f"param group {index}: weight_decay must be >= 0, got {wd!r}")

    @staticmethod
    def _check_betas(group: dict[str, Any], index: int) -> None:
        betas = group["betas"]
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, numbers.Real) and 0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(f"param group {index}: betas must be two numbers in [0, 1), got "
                              f"{betas!r}")
        group["betas"] = tuple(betas)

    # ---- stepping ----------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's `.grad` (or fill it with zeros in place)."""
        zero_grads((p for g in self.param_groups for p in g["params"]), set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; returns `closure()`'s loss if given.

        Parameters whose `.grad` is None are skipped (their state does not advance).
        """
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        with no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state.get(p)
                    if state is None:
                        state = self.state[p] = {}
                    self._update(group, p.data, p.grad.data, state)
        _backend.settle(a for group in self.param_groups for p in group["params"]
                        for a in (p.data, *self.state.get(p, {}).values()))
        return loss

    def _update(self, group: dict[str, Any], param: Any, grad: Any,
                state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement _update")

    @staticmethod
    def _xp(array: Any) -> Any:
        return _backend.get_array_module(array)

    def _blocks(self, arrays: Sequence[Any], n_scratch: int) -> Iterator[list[Any]]:
        """Matching slices of same-shaped `arrays`, followed by `n_scratch` scratch slices.

        Contiguous arrays are walked in cache-sized flat slices (one slice on a GPU, where
        each pass is one kernel anyway); anything else is processed whole, with fresh
        scratch arrays.
        """
        first = arrays[0]
        xp = _backend.get_array_module(first)
        if not all(a.flags.c_contiguous for a in arrays):
            yield list(arrays) + [xp.empty(first.shape, first.dtype) for _ in range(n_scratch)]
            return
        n = first.size
        step = max(_CHUNK_BYTES // first.dtype.itemsize, 1) if xp is np else max(n, 1)
        scratch = self._scratch(xp, first, n_scratch, min(step, n))
        flats = [a.reshape(-1) for a in arrays]
        for i in range(0, n, step):
            j = min(i + step, n)
            yield [f[i:j] for f in flats] + [s[: j - i] for s in scratch]

    def _scratch(self, xp: Any, like: Any, count: int, size: int) -> list[Any]:
        key = (xp.__name__, like.dtype.str, _backend.device_of(like))
        bufs = self._scratch_bufs.get(key, [])
        if len(bufs) < count or (bufs and bufs[0].size < size):
            size = max(size, bufs[0].size if bufs else 0)
            bufs = [xp.empty(size, like.dtype) for _ in range(max(count, len(bufs)))]
            self._scratch_bufs[key] = bufs
        return bufs[:count]

    # ---- state dict --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as plain data: no objects, no pickle needed.

        {"state": {index: {"step": int, name: numpy array, ...}}, "param_groups": [{option:
        value, ..., "params": [index, ...]}]}. Parameters are numbered across groups in
        order, as torch does. Arrays are copies (a snapshot), on the host.
        """
        groups = []
        index_of: dict[int, int] = {}
        for group in self.param_groups:
            packed = {k: _plain(v) for k, v in group.items() if k != "params"}
            packed["params"] = []
            for p in group["params"]:
                index_of.setdefault(id(p), len(index_of))
                packed["params"].append(index_of[id(p)])
            groups.append(packed)
        state: dict[int, dict[str, Any]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self.state:
                    continue
                entry = {}
                for k, v in self.state[p].items():
                    if hasattr(v, "shape") and hasattr(v, "dtype"):
                        entry[k] = np.array(_backend.to_device(v, "cpu"), copy=True)
                    else:
                        entry[k] = _plain(v)
                state[index_of[id(p)]] = entry
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()` into this optimizer, whose groups must have the same
        sizes and parameter shapes. Hyperparameters come from the state dict; arrays are
        copied to each parameter's device and dtype. Errors name the group, index and key.
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise CheckpointError("optimizer state dict must be a dict with 'state' and "
                                  "'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise CheckpointError(f"optimizer state dict has {len(saved_groups)} parameter "
                                  f"groups, this {type(self).__name__} has "
                                  f"{len(self.param_groups)}")
        params: dict[int, tuple[Tensor, int]] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise CheckpointError(f"optimizer param group {gi}: the state dict has "
                                      f"{len(saved['params'])} parameters, this optimizer "
                                      f"has {len(group['params'])}")
            for idx, p in zip(saved["params"], group["params"]):
                params[int(idx)] = (p, gi)

        new_state: dict[Tensor, dict[str, Any]] = {}
        for raw_idx, entry in state_dict["state"].items():
            try:
                idx = int(raw_idx)
            except (TypeError, ValueError):
                raise CheckpointError(f"optimizer state key {raw_idx!r} is not a parameter "
                                      "index") from None
            if idx not in params:
                raise CheckpointError(f"optimizer state for parameter {idx}, which no param "
                                      f"group lists (there are {len(params)} parameters)")
            p, gi = params[idx]
            restored = {}
            for k, v in entry.items():
                arr = v.data if isinstance(v, Tensor) else v
                if hasattr(arr, "shape") and hasattr(arr, "dtype") and arr.ndim > 0:
                    if tuple(arr.shape) != tuple(p.shape):
                        raise CheckpointError(
                            f"optimizer state {k!r} of parameter {idx} (group {gi}) has shape "
                            f"{tuple(arr.shape)}, the parameter has shape {tuple(p.shape)}")
                    src = _backend.to_device(_backend.to_device(arr, "cpu"), p.device)
                    dtype = p.dtype if _backend.is_floating(arr.dtype) else arr.dtype
                    restored[k] = p.xp.array(src, dtype=dtype, copy=True, order="C")
                elif hasattr(arr, "shape") and hasattr(arr, "dtype"):
                    restored[k] = _plain(_backend.to_device(arr, "cpu")[()])
                else:
                    restored[k] = v
            new_state[p] = restored

        new_groups = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            merged = {k: v for k, v in saved.items() if k != "params"}
            for k, default in self.defaults.items():
                if isinstance(default, tuple) and isinstance(merged.get(k), list):
                    merged[k] = tuple(merged[k])  # JSON/msgpack turn tuples into lists
            merged["params"] = group["params"]
            self._validate_group(merged, gi)
            new_groups.append(merged)
        self.param_groups = new_groups
        self.state = new_state

    # ---- printing ----------------------------------------------------------------------
    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(group):
                if key != "params":
                    lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)
