"""What the tracer hands the user's Python, and the nodes for calls kept whole.

:class:`TracedValue` is a proxy that passes ``isinstance(x, torch.Tensor)`` in user code and turns into
a Python number where one is fixed by shapes or architecture values; :class:`FloatValue` stands in for
a float input.  :class:`MethodCall` runs a module's method per call, :class:`DistributionCall` builds a
``torch.distributions`` object per call, and :class:`AppliedFunction` applies a custom
``torch.autograd.Function`` as written, so its own backward runs."""
from __future__ import annotations

import copy
import functools
import inspect
import operator
import sys
import types
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..ir import AS_FLOAT, UNKNOWN, VALUE, first_path_on_meta, flat, meta_copy, meta_memo
from .frames import CaptureError, _is_library_file, _where

if TYPE_CHECKING:
    from .tracer import ValueTracer


_IS_TENSOR_CODE = torch.is_tensor.__code__


class TracedValue(fx.Proxy):
    """A proxy that knows its value's shape, so ``len()`` works on it, and that turns into a Python
    number where Python needs one (``range(n)``, ``torch.Size``, ``float(w)``, numpy) when the
    number is fixed by shapes or by architecture values (see :meth:`ValueTracer.concrete`)."""

    def __len__(self) -> int:
        return self.tracer.length(self)  # type: ignore[attr-defined]

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # type: ignore[override]
        """What ``isinstance`` sees: to the user's code the eager value's type -- a tensor (``assert
        isinstance(x, torch.Tensor)``, ``torch.is_tensor(w)``, type dispatch), or the ``int``, ``tuple``
        or ``torch.Size`` a shape is; to torch's and topofx's code the proxy.  (torch's C argument
        parser asks too, from the user's frame: a number that claimed to be a tensor would be read as
        one -- ``from torch import empty; empty(x.size(0), 1)`` crashed the interpreter.)"""
        frame = sys._getframe(1)
        if frame.f_code is _IS_TENSOR_CODE:  # torch.is_tensor(x), called by the user
            frame = frame.f_back
        if frame is None or _is_library_file(frame.f_code.co_filename):
            return TracedValue
        value = self.node.meta.get(VALUE, UNKNOWN)
        return type(value) if isinstance(value, (bool, int, float, tuple, list)) else torch.Tensor

    def __index__(self) -> int:
        return self.tracer.concrete(self, operator.index, "an int")  # type: ignore[attr-defined]

    def __setitem__(self, key: Any, value: Any) -> None:  # `pruned[mask] = w[mask]`: an in-place graph node
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __int__(self) -> int:
        return self.tracer.concrete(self, int, "an int")  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return self.tracer.concrete(self, float, "a float")  # type: ignore[attr-defined]

    def __deepcopy__(self, memo: dict) -> Any:
        """In a meta copy of a module holding it (a held tensor's ``get_attr`` stand-in in a dict or list,
        while a per-call method runs on meta: :func:`topofx.ir.meta_copy`): its meta value, shapes only."""
        if not self.tracer._evaluating:  # type: ignore[attr-defined]
            return super().__deepcopy__(memo)
        value = self.node.meta.get(VALUE, UNKNOWN)
        if isinstance(value, torch.Tensor):
            return value.clone()
        raise CaptureError(_where(f"a copy of a value unknown at capture ({self.node.format_node()})"))

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        array = self.tracer.concrete(self, lambda v: v.numpy() if isinstance(v, torch.Tensor) else v, "a numpy array")  # type: ignore[attr-defined]
        return array if dtype is None else array.astype(dtype)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__array"):  # numpy probes __array_struct__/__array_interface__ before __array__
            raise AttributeError(name)
        return super().__getattr__(name)


class FloatValue(TracedValue):
    """A traced value that eager code holds as a Python float (a float input's stand-in, ``self.temp * 2``):
    to the user's ``isinstance`` a ``float``; rounding and formatting ask for the number (which keeps
    the float a constant, see :meth:`ValueTracer.concrete`)."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # type: ignore[override]
        frame = sys._getframe(1)
        return TracedValue if frame is None or _is_library_file(frame.f_code.co_filename) else float

    def __round__(self, ndigits: Any = None) -> Any:
        return round(self.tracer.concrete(self, float, "a float"), ndigits)  # type: ignore[attr-defined]

    def __format__(self, spec: str) -> str:
        return format(self.tracer.concrete(self, float, "a float"), spec)  # type: ignore[attr-defined]

    def __deepcopy__(self, memo: dict) -> Any:  # a meta copy of a module holding it (shapes only): the number
        return self.node.meta[AS_FLOAT]


class DistributionCall(nn.Module):
    """One graph node for ``Distribution(*args).method(*margs)``: torch's argument validation (a
    Python branch on tensor values) runs at call time, inside the node, as in the original."""

    def __init__(self, cls: type, name: str):
        super().__init__()
        self.cls, self.name = cls, name

    def forward(self, args: tuple, kwargs: dict, margs: tuple | None, mkwargs: dict | None) -> Any:
        on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in flat((args, kwargs)))
        dist = self.cls(*args, **({**kwargs, "validate_args": False} if on_meta else kwargs))
        attr = getattr(dist, self.name)
        if margs is None:
            return attr
        if on_meta and self.name in ("sample", "rsample"):  # samplers have no meta kernels: shape and dtype
            shape = margs[0] if margs else (mkwargs or {}).get("sample_shape", ())
            floats = (t.dtype for t in flat((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point())
            dtype = torch.long if isinstance(dist, torch.distributions.Categorical) else next(floats, None)
            return torch.empty(dist._extended_shape(torch.Size(shape)), dtype=dtype, device="meta")
        return attr(*margs, **(mkwargs or {}))

    def extra_repr(self) -> str:
        return f"{self.cls.__name__}.{self.name}"


class MethodCall(nn.Module):
    """One graph node for ``owner.name(*args)``, a method whose Python decides on values drawn anew
    on every call (GDAS's redraw-until-finite sampling loop): it runs as written at every call."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: the owner may be the model itself
        self.name = name

    def forward(self, args: tuple, kwargs: dict) -> Any:
        return getattr(self.owner, self.name)(*args, **kwargs)

    def on_meta(self, args: tuple, kwargs: dict) -> Any:
        """The call's result on meta tensors (:func:`topofx.ir.run_on_meta`), shapes only: on meta copies
        of the owner and of modules passed as arguments (no draws, no state changes).  Told apart from
        a real call by the caller, not by the arguments: a method may take none (``self.weights()``)."""
        owner, args, kwargs = meta_copy(_Bundle(self.owner, args, kwargs)).parts()
        with first_path_on_meta():
            return getattr(owner, self.name)(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{type(self.owner).__name__}.{self.name}"


class _Bundle(nn.Module):
    """An owner and a call's arguments as one module, so that one ``meta_copy`` covers the modules
    among the arguments (``self.mixed(x, weights, self.edges[k])``) too."""

    def __init__(self, owner: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.owner = owner
        self.passed = nn.ModuleList([m for m in flat((args, kwargs)) if isinstance(m, nn.Module)])
        self.__dict__["call"] = (args, kwargs)  # not registered: one deepcopy copies each module once

    def parts(self) -> tuple[nn.Module, tuple, dict]:
        return self.owner, *self.call  # in a copy, ``call`` holds the same copies as ``passed``


class _RecordedMethod:
    """Class attribute standing for a method while tracing: on the traced owners it records a
    :class:`MethodCall` node; everywhere else (other instances, evaluation) it is the plain method."""

    def __init__(self, tracer: "ValueTracer", function: Callable[..., Any], name: str, owners: set[int]):
        self.tracer, self.function, self.name, self.owners = tracer, function, name, owners

    def __get__(self, instance: Any, cls: type) -> Any:
        if instance is None:
            return self.function
        if id(instance) in self.owners and not self.tracer._evaluating:
            return functools.partial(self.tracer._method_call, instance, self.name)
        return self.function.__get__(instance, cls)


_UNBOUND = object()


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # not yet bound
        return _UNBOUND


def closure_cells(obj: Any) -> list[Any]:
    """The closure cells of a function (a ``lambda``, a nested ``def``; a ``functools.partial``'s
    function), and of the functions they hold in turn."""
    cells, todo, seen = [], [obj], set()
    while todo:
        fn = todo.pop()
        fn = fn.func if isinstance(fn, functools.partial) else fn
        if not inspect.isfunction(fn) or id(fn) in seen:
            continue
        seen.add(id(fn))
        for cell in fn.__closure__ or ():
            if _contents(cell) is not _UNBOUND:
                todo.append(cell.cell_contents)
                cells.append(cell)
    return cells


def _copy_function(fn: Any, memo: dict) -> Any:
    """``fn`` whose closure's contents are deep copies through ``memo`` (functions in it copied alike), so a
    held closure over the model's modules follows a copy of the model, as a bound method does."""
    if isinstance(fn, functools.partial):
        return functools.partial(_copy_function(fn.func, memo), *copy.deepcopy(fn.args, memo),
                                 **copy.deepcopy(fn.keywords, memo))
    if not inspect.isfunction(fn) or not fn.__closure__:
        return copy.deepcopy(fn, memo)
    if id(fn) not in memo:  # registered before its cells are filled: a closure may hold itself
        cells = tuple(types.CellType() for _ in fn.__closure__)
        memo[id(fn)] = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
        for old, new in zip(fn.__closure__, cells):
            if _contents(old) is not _UNBOUND:
                new.cell_contents = _copy_function(old.cell_contents, memo)
    return memo[id(fn)]


def _held_key(obj: Any, seen: set[int]) -> Any:
    """Numbers and strings by value, functions by their code and what their closures hold, containers
    item by item, anything else (a module, a tensor, a bound method's object) by identity."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj)
    if id(obj) in seen:
        return id(obj)
    seen.add(id(obj))
    if isinstance(obj, functools.partial):
        return (_held_key(obj.func, seen), _held_key(obj.args, seen), _held_key(sorted(obj.keywords.items()), seen))
    if inspect.isfunction(obj):
        return (obj.__code__, tuple(_held_key(_contents(c), seen) for c in obj.__closure__ or ()))
    if inspect.ismethod(obj):
        return (obj.__func__, id(obj.__self__))
    if isinstance(obj, (tuple, list)):
        return tuple(_held_key(v, seen) for v in obj)
    return id(obj)


class AppliedFunction(nn.Module):
    """A custom ``torch.autograd.Function`` applied as written: one ``call_module`` node, so that its own
    ``backward`` runs.  Tracing through its ``forward`` would keep the forward and silently replace the
    backward by the forward's autograd (a binary gate's gradient for every path would be lost).

    Arguments a graph cannot hold (a bound method that the backward calls for the other paths, any
    callable or object) are held here by reference, by position or keyword: every call passes the very
    same objects.  The modules they run (a held module, a bound method's ``__self__``) are registered
    as ``owners``: the state the backward touches there (the other paths' BN statistics) is the graph
    module's own, so a check's snapshot restores it and a float64 or device copy converts it, and a
    ``copy.deepcopy`` (one memo) makes a bound method follow the copy of its module.  Not a stock
    module: the passes treat the call as having unknown effects (:func:`topofx.ir.is_random`)."""

    def on_meta(self, *args: Any, **kwargs: Any) -> Any:
        """The call on meta tensors (:func:`topofx.ir.run_on_meta`): the Function applied to copies of
        the held arguments whose modules are meta copies, so that running a path (a closure's BN
        counting a batch) leaves the real modules as they are."""
        memo = meta_memo(*self.owners)
        return self._apply({k: _copy_function(v, memo) for k, v in self.held.items()}, args, kwargs)

    def __init__(self, function: type, held: dict[int | str, Any]):
        super().__init__()
        self.function = function
        self.__dict__["held"] = held
        bound = (getattr(a, "__self__", None) if inspect.ismethod(a) else a for a in held.values())
        closed_over = (c.cell_contents for a in held.values() for c in closure_cells(a))
        self.owners = nn.ModuleList(dict.fromkeys(m for m in (*bound, *closed_over) if isinstance(m, nn.Module)))

    def held_key(self) -> tuple:
        """What the held arguments are, to compare two traces: a closure made in forward over the active
        path's index (ProxylessNAS) is another argument when the index is another (:func:`_held_key`)."""
        return tuple((k, _held_key(v, set())) for k, v in self.held.items())

    def __deepcopy__(self, memo: dict) -> "AppliedFunction":
        """A copy whose held functions follow the copy of what they close over (:func:`_copy_function`)."""
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.__dict__ = copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "held"}, memo)
        clone.__dict__["held"] = {k: _copy_function(v, memo) for k, v in self.held.items()}
        return clone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._apply(self.held, args, kwargs)

    def _apply(self, held: dict[int | str, Any], args: tuple, kwargs: dict) -> Any:
        rest = iter(args)
        count = len(args) + sum(isinstance(k, int) for k in held)
        args = tuple(held[i] if i in held else next(rest) for i in range(count))
        kwargs.update((k, v) for k, v in held.items() if isinstance(k, str))
        return self.function.apply(*args, **kwargs)

    def extra_repr(self) -> str:
        held = ", ".join(f"{k}={type(v).__name__}" for k, v in self.held.items())
        return f"{self.function.__name__}.apply" + (f", holding {held}" if held else "")


class AttributeStore(nn.Module):
    """``owner.name = value`` as a graph node: a tensor forward assigns to a module attribute on every call
    (SNAS's ``self.normal_weights = ...``, ISTA-NAS's projected ``self.alphas_normal``) is assigned by the
    graph too, so code that reads the attribute after a call (the next call, the training loop) sees this
    call's value, as eagerly.  The owner is held by reference, not registered (the graph's module tree is
    the model's); a copy made together with its model (one ``copy.deepcopy``) assigns into the copy's
    module, a graph copied alone into the module it was captured from.  On meta tensors it assigns
    nothing.  Not a stock module: the passes treat the call as having unknown effects."""

    _is_impure = True  # (torch.fx's dead-code elimination keeps it)

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self.__dict__["owner"], self.name = owner, name

    def forward(self, value: torch.Tensor) -> None:
        setattr(self.owner, self.name, value)

    def on_meta(self, value: Any) -> None:
        return None

    def __deepcopy__(self, memo: dict) -> "AttributeStore":
        clone = AttributeStore(memo.get(id(self.owner), self.owner), self.name)
        clone.training = self.training
        memo[id(self)] = clone
        return clone


def _unwatched(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with :class:`topofx.capture.reads.ReadRecorder` paused: it watches user code, and recording
    a node or calling a leaf module runs none (pausing keeps the trace as fast as without it)."""
    recorder = sys.gettrace()
    sys.settrace(None)
    try:
        return fn(*args)
    finally:
        sys.settrace(recorder)
