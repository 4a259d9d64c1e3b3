"""Module and Parameter: the containers a model is built from, with PyTorch's semantics.

A Module registers what is assigned to it: Parameters (learned, `requires_grad=True`),
sub-Modules, and buffers (non-learned tensors such as running statistics). Names follow
PyTorch's dotted form (`blocks.0.attn.weight`), so state dicts and optimizer groups line up
with torch's for an equivalent model.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

import numpy as np

from narun.errors import CheckpointError, DTypeError
from narun.tensor import _backend
from narun.tensor._tensor import Tensor

M = TypeVar("M", bound="Module")


class Parameter(Tensor):
    """A Tensor that a Module treats as learned: it requires grad by default.

    `Parameter(t)` shares `t`'s memory, as torch's does; so does `Parameter(ndarray)`.
    """

    __slots__ = ()

    def __init__(self, data: Any = None, requires_grad: bool = True) -> None:
        if data is None:
            data = np.empty((0,), dtype=_backend.DEFAULT_DTYPE)
        elif isinstance(data, Tensor):
            data = data.data
        elif not hasattr(data, "dtype"):
            probe = np.asarray(data)
            data = (probe.astype(_backend.DEFAULT_DTYPE) if _backend.is_floating(probe.dtype)
                    else probe)
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class IncompatibleKeys(NamedTuple):
    """What `load_state_dict(strict=False)` could not match, by name."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _addindent(text: str, spaces: int) -> str:
    lines = text.split("\n")
    if len(lines) == 1:
        return text
    return lines[0] + "\n" + "\n".join(" " * spaces + line for line in lines[1:])


class Module:
    """Base class of every layer and model; subclasses define `forward`.

        >>> class Net(narun.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = narun.nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         return self.fc(x).relu()
        >>> [name for name, _ in Net().named_parameters()]
        ['fc.weight', 'fc.bias']
    """

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent_buffers", set())
        object.__setattr__(self, "_modules", OrderedDict())

    # ---- calling -----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"Module [{type(self).__name__}] is missing the required "
                                  "\"forward\" function")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # ---- registration ------------------------------------------------------------------
    def _check_initialized(self, what: str) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot assign {what} before Module.__init__() call; "
                                 f"call super().__init__() first in "
                                 f"{type(self).__name__}.__init__")

    def _check_name(self, name: str, kind: str, store: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"{kind} name must be a string, got {type(name).__name__}")
        if not name or "." in name:
            raise KeyError(f"{kind} name must be non-empty and contain no '.', got {name!r}")
        taken = hasattr(type(self), name) or name in self.__dict__ or any(
            name in self.__dict__[other]
            for other in ("_parameters", "_buffers", "_modules") if other != store)
        if taken:
            raise KeyError(f"attribute {name!r} already exists on {type(self).__name__}; "
                           f"cannot register a {kind} under that name")

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Add a parameter under `name` (None reserves the name, e.g. a disabled bias)."""
        self._check_initialized("parameters")
        self._check_name(name, "parameter", "_parameters")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"cannot assign a {type(param).__name__} as parameter {name!r} "
                            "(narun.nn.Parameter or None expected)")
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Add a non-learned tensor; persistent buffers are part of `state_dict()`."""
        self._check_initialized("buffers")
        self._check_name(name, "buffer", "_buffers")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"cannot assign a {type(tensor).__name__} as buffer {name!r} "
                            "(narun.Tensor or None expected)")
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent_buffers.discard(name)
        else:
            self._non_persistent_buffers.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        """Add a child module under `name` (the same as assigning the attribute)."""
        self._check_initialized("submodules")
        self._check_name(name, "module", "_modules")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        self._modules[name] = module

    register_module = add_module

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        params = d.get("_parameters")
        if isinstance(value, Parameter):
            self._check_initialized("parameters")
            d.pop(name, None)
            d["_buffers"].pop(name, None)
            d["_modules"].pop(name, None)
            params[name] = value
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(f"cannot assign a {type(value).__name__} as parameter "
                                f"{name!r} (narun.nn.Parameter or None expected)")
            params[name] = None
        elif isinstance(value, Module):
            self._check_initialized("submodules")
            d.pop(name, None)
            params.pop(name, None)
            d["_buffers"].pop(name, None)
            d["_modules"][name] = value
        elif params is not None and name in d["_modules"]:
            if value is not None:
                raise TypeError(f"cannot assign a {type(value).__name__} as child module "
                                f"{name!r} (Module or None expected)")
            d["_modules"][name] = None
        elif params is not None and name in d["_buffers"]:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign a {type(value).__name__} as buffer {name!r} "
                                "(narun.Tensor or None expected)")
            d["_buffers"][name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: parameters, buffers and children live in
        # their own dicts so that assignment order and names are kept.
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            table = d.get(store)
            if table is not None and name in table:
                return table[name]
        msg = f"'{type(self).__name__}' object has no attribute {name!r}"
        if not name.startswith("__"):
            known = [k for store in ("_parameters", "_buffers", "_modules")
                     for k in d.get(store, ())] + list(d)
            close = difflib.get_close_matches(name, known, n=1)
            if close:
                msg += f"; did you mean {close[0]!r}?"
        raise AttributeError(msg)

    def __delattr__(self, name: str) -> None:
        for store in ("_parameters", "_buffers", "_modules"):
            table = self.__dict__[store]
            if name in table:
                del table[name]
                self._non_persistent_buffers.discard(name)
                return
        object.__delattr__(self, name)

    def __dir__(self) -> list[str]:
        extra = list(self._parameters) + list(self._buffers) + list(self._modules)
        return sorted(set(super().__dir__()) | set(extra))

    # ---- traversal ---------------------------------------------------------------------
    def named_modules(self, memo: set[int] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Module]]:
        """(name, module) for this module and every descendant, pre-order; '' is self."""
        if memo is None:
            memo = set()
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, module in self._modules.items():
            if module is None:
                continue
            sub = f"{prefix}.{name}" if prefix else name
            yield from module.named_modules(memo, sub, remove_duplicate)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple[str, Module]]:
        seen: set[int] = set()
        for name, module in self._modules.items():
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def _named_members(self, store: str, prefix: str, recurse: bool,
                       remove_duplicate: bool) -> Iterator[tuple[str, Any]]:
        modules = (self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
                   if recurse else [(prefix, self)])
        seen: set[int] = set()
        for mod_prefix, module in modules:
            for name, value in getattr(module, store).items():
                if value is None:
                    continue
                if remove_duplicate:
                    if id(value) in seen:
                        continue
                    seen.add(id(value))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), value

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter), each shared parameter once (under its first name)."""
        return self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        return self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def get_submodule(self, target: str) -> Module:
        """The descendant at dotted path `target` ('' is self)."""
        module: Module = self
        if not target:
            return module
        walked: list[str] = []
        for part in target.split("."):
            child = module._modules.get(part)
            if child is None:
                where = ".".join(walked) or type(self).__name__
                raise AttributeError(f"{where} has no submodule {part!r} (looking up "
                                     f"{target!r}); it has {sorted(module._modules)}")
            module = child
            walked.append(part)
        return module

    # ---- state dict --------------------------------------------------------------------
    def state_dict(self, destination: OrderedDict[str, Tensor] | None = None,
                   prefix: str = "", keep_vars: bool = False) -> OrderedDict[str, Tensor]:
        """Parameters and persistent buffers by dotted name, as detached tensors.

        The tensors share memory with the module (no copy), as torch's do; shared
        parameters appear under every name they are reachable by.
        """
        out: OrderedDict[str, Tensor] = OrderedDict() if destination is None else destination
        for name, p in self._parameters.items():
            if p is not None:
                out[prefix + name] = p if keep_vars else p.detach()
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers:
                out[prefix + name] = b if keep_vars else b.detach()
        for name, m in self._modules.items():
            if m is not None:
                m.state_dict(out, prefix + name + ".", keep_vars)
        return out

    def _state_targets(self) -> OrderedDict[str, Tensor]:
        return self.state_dict(keep_vars=True)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True
                        ) -> IncompatibleKeys:
        """Copy values into this module's parameters and buffers, in place.

        Values may be Tensors or NumPy (or CuPy) arrays. The existing arrays are overwritten,
        not replaced, so an optimizer holding the parameters keeps working. Shapes must match
        exactly; with `strict` (the default) the keys must match too. All problems are
        reported at once, by name, and nothing is copied unless everything fits.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict expects a mapping name -> tensor, got "
                            f"{type(state_dict).__name__}")
        targets = self._state_targets()
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        problems: list[str] = []
        plan: list[tuple[str, Tensor, Any]] = []
        for key, target in targets.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            arr = value.data if isinstance(value, Tensor) else value
            if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
                problems.append(f"value for {key!r} is a {type(value).__name__}, expected a "
                                "Tensor or an array")
                continue
            if tuple(arr.shape) != tuple(target.shape):
                problems.append(f"size mismatch for {key}: copying a param with shape "
                                f"{tuple(arr.shape)} from checkpoint, the shape in current "
                                f"model is {tuple(target.shape)}")
                continue
            if not np.can_cast(arr.dtype, target.dtype, casting="same_kind"):
                problems.append(f"dtype mismatch for {key}: checkpoint has {arr.dtype}, "
                                f"the model has {target.dtype}")
                continue
            plan.append((key, target, arr))
        if strict:
            if missing:
                problems.insert(0, "Missing key(s) in state_dict: "
                                + ", ".join(repr(k) for k in missing) + ".")
            if unexpected:
                problems.insert(int(bool(missing)), "Unexpected key(s) in state_dict: "
                                + ", ".join(repr(k) for k in unexpected) + ".")
        if problems:
            raise CheckpointError(f"Error(s) in loading state_dict for {type(self).__name__}:"
                                  "\n\t" + "\n\t".join(problems))
        for _key, target, arr in plan:
            src = _backend.to_device(arr, target.device)
            target.xp.copyto(target.data, src, casting="same_kind")
        return IncompatibleKeys(missing, unexpected)

    # ---- modes, grads, devices ---------------------------------------------------------
    def train(self: M, mode: bool = True) -> M:
        """Set training mode here and in every descendant (Dropout behaves differently)."""
        if not isinstance(mode, bool):
            raise TypeError(f"train(mode) expects a bool, got {type(mode).__name__}")
        object.__setattr__(self, "training", mode)
        for m in self.children():
            m.train(mode)
        return self

    def eval(self: M) -> M:
        return self.train(False)

    def requires_grad_(self: M, requires_grad: bool = True) -> M:
        """Freeze (False) or unfreeze every parameter."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's `.grad` (or fill it with zeros in place)."""
        from narun.nn.utils import zero_grads

        zero_grads(self.parameters(), set_to_none)

    def apply(self: M, fn: Callable[[Module], Any]) -> M:
        """Call `fn` on every descendant, children first, then on self (e.g. custom init)."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    def to(self: M, *args: Any, device: str | None = None, dtype: Any = None) -> M:
        """Move parameters and buffers to a device and/or cast floating ones to a dtype.

        In place: the same Parameter objects get new arrays (and their grads follow), so
        references held elsewhere stay valid. `to("cuda")`, `to(narun.float64)`,
        `to("cpu", narun.float32)`.
        """
        for a in args:
            if isinstance(a, str):
                device = a
            else:
                dtype = a
        dev = None if device is None else _backend.normalize_device(device)
        dt = None if dtype is None else _backend.as_dtype(dtype)
        if dt is not None and not _backend.is_inexact(dt):
            raise DTypeError(f"Module.to only casts to floating dtypes, got {dt}")

        def convert(arr: Any) -> Any:
            if dev is not None:
                arr = _backend.to_device(arr, dev)
            if dt is not None and _backend.is_inexact(arr.dtype) and arr.dtype != dt:
                arr = arr.astype(dt)
            return arr

        for m in self.modules():
            for p in m._parameters.values():
                if p is None:
                    continue
                p.data = convert(p.data)
                if p.grad is not None:
                    p.grad.data = convert(p.grad.data)
            for b in m._buffers.values():
                if b is not None:
                    b.data = convert(b.data)
        return self

    def cpu(self: M) -> M:
        return self.to("cpu")

    def cuda(self: M, index: int = 0) -> M:
        return self.to(f"cuda:{index}")

    def float(self: M) -> M:
        return self.to(dtype=np.float32)

    def double(self: M) -> M:
        return self.to(dtype=np.float64)

    # ---- printing ----------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The part inside the parentheses of this module's own line (override it)."""
        return ""

    def _get_name(self) -> str:
        return type(self).__name__

    def _child_lines(self) -> list[str]:
        return [f"({name}): {_addindent(repr(m), 2)}" for name, m in self._modules.items()]

    def __repr__(self) -> str:
        extra = self.extra_repr()
        extra_lines = extra.split("\n") if extra else []
        child_lines = self._child_lines()
        lines = extra_lines + child_lines
        body = ""
        if lines:
            if len(extra_lines) == 1 and not child_lines:
                body = extra_lines[0]
            else:
                body = "\n  " + "\n  ".join(lines) + "\n"
        return f"{self._get_name()}({body})"
