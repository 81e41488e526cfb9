"""Capture an unmodified supernet as a torch.fx graph at module granularity.

Why not ``torch.fx.symbolic_trace`` or ``torch.export``?  On DARTS-family supernets both fail
silently or loudly (see ``docs/capture.md``): ``symbolic_trace`` cannot iterate
``zip(self._ops, weights)`` and bakes ``softmax(alphas)`` in as a constant when the alphas are plain
tensors; ``torch.export`` turns plain-tensor alphas into constants whose ``.grad`` stays ``None``.

:class:`ValueTracer` is a ``torch.fx.Tracer`` that also *runs* every node on meta tensors while it
records it, so each proxy knows its value's shape and whether that value depends only on shapes
("static"), on the inputs, or on a random draw made in forward; small values computed from the
model's attributes alone (architecture weights, masks, samples) also get real values.  Where Python
needs a Python value (``if``, ``int()``, ``range``, ``.tolist()``, numpy) it is given one:

* from shapes: a *shape decision*, re-checked for every new input shape (``topofx.guards``);
* from architecture values: a *value decision*, re-evaluated before every call (:class:`ValueGuard`);
  a change captures the model anew;
* from a draw that decides the same on fresh draws: *speculated*, checked per call by a graph node
  that runs before any state change (:func:`hoist_speculation`);
* from a draw that decides differently: the innermost module forward or method around it runs per
  call, as one node, with the original's Python (:class:`MethodCall`, ``PER_CALL``);
* from the inputs' values: :class:`CaptureError` naming the user's line.

Python floats that forward uses only in tensor arithmetic (a Gumbel temperature, a decaying
coefficient) are graph inputs: 0-dim tensors the graph module holds, refreshed before each call
(:mod:`topofx.float_inputs`, :func:`_trace_with_float_inputs`); other Python numbers are constants,
guarded.  Non-tensor forward arguments are specialized (one graph per choice); legacy constructors and random
factories become graph nodes; distributions become :class:`DistributionCall` nodes; plain tensor
attributes are registered as non-persistent buffers for the duration of the trace, so they become
live ``get_attr`` nodes.  Leaf modules (``torch.nn`` modules) become ``call_module`` nodes that
reference the original module objects, so parameters and buffers are shared by identity and
optimizers built before capture keep working.

Every capture verifies itself (:func:`verify_capture`) before it is trusted.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import operator
import os
import re
import sys
import sysconfig
import traceback
import types
import warnings
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterator, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from . import float_inputs as _floats
from . import tensor_inputs as _tensors
from .reads import Read, ReadRecorder, plain_object

VALUE = "topofx_value"  # node.meta key: meta-tensor (or python) value of the node
STATIC = "topofx_static"  # node.meta key: value depends on shapes/constants only
FROM_INPUT = "topofx_from_input"  # node.meta key: value is computed from a forward input
TRACED_MODULES = "topofx_traced_modules"  # GraphModule.meta key: modules whose forward was traced through
SHAPE_DECISIONS = "topofx_shape_decisions"  # GraphModule.meta key: (user frame, value) of decisions on shapes
DECIDED_PER_CALL = "topofx_decided_per_call"  # GraphModule.meta key: paths of modules called as one node
HELD = "topofx_held"  # GraphModule.meta key: (get_attr target, module, path) of tensors read out of containers
READS = "topofx_reads"  # GraphModule.meta key: the Reads of Python values outside the traced modules' attributes
VALUE_GUARD = "topofx_value_guard"  # GraphModule.meta key: the ValueGuard of decisions on architecture values
REAL = "topofx_real"  # node.meta key (during tracing): the real value of a small tensor computed from attributes only
DRAWN = "topofx_drawn"  # node.meta key: value depends on a random draw made in forward, or on a tensor input
FLOATS = "topofx_floats"  # node.meta key (during tracing): the FloatInputs whose stand-ins the value depends on
AS_FLOAT = "topofx_as_float"  # node.meta key (during tracing): that value as eager computes it from the floats
FLOAT_INPUTS = "topofx_float_inputs"  # GraphModule.meta key: the FloatInputs the graph reads as 0-dim tensors
REAL_NUMEL = 1 << 16  # attributes up to this size get real values while tracing (architecture weights are small)
UNKNOWN = object()  # value that could not be computed

_TOPOFX_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "get_device"}


class CaptureError(RuntimeError):
    """The supernet could not be captured as one graph; the message names the user's code."""


@dataclasses.dataclass
class UserFrame:
    """The innermost frame of user code (outside torch and topofx) at some point of tracing."""

    filename: str
    lineno: int
    line: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}: `{self.line.strip()}`"


@functools.lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(os.path.join(_TOPOFX_DIR, "zoo")):
        return False  # the built-in supernets are user code as far as error messages go
    return path.startswith(_TOPOFX_DIR) or path.startswith(_TORCH_DIR) or "<" in filename


_STDLIB_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")})


@functools.lru_cache(maxsize=4096)
def _reads_nothing(filename: str) -> bool:
    """Code whose Python reads cannot be what the user changes between steps: the standard library,
    torch, topofx (other installed packages, NNI's model spaces say, are user code here)."""
    path = os.path.abspath(filename)
    in_stdlib = path.startswith(_STDLIB_DIRS) and "-packages" not in path
    return in_stdlib or _is_library_file(filename)


def user_frame(frames: Sequence[traceback.FrameSummary] | None = None) -> UserFrame | None:
    """The innermost frame not in torch or topofx (default: the current Python stack)."""
    frames = traceback.extract_stack() if frames is None else frames
    for fs in reversed(frames):
        if not _is_library_file(fs.filename):
            return UserFrame(fs.filename, fs.lineno or 0, fs.line or "")
    return None


# ---------------------------------------------------------------------------------------------
# value propagation on meta tensors
# ---------------------------------------------------------------------------------------------
def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("meta")
    return x


def _value(a: Any) -> Any:
    """Replace proxies by their recorded values and real tensors by meta copies."""

    def one(x: Any) -> Any:
        if isinstance(x, fx.Proxy):
            return x.node.meta.get(VALUE, UNKNOWN)
        if isinstance(x, fx.Node):
            return x.meta.get(VALUE, UNKNOWN)
        return _to_meta(x)

    return fx.node.map_aggregate(a, one)


def _contains_unknown(a: Any) -> bool:
    found = []
    fx.node.map_aggregate(a, lambda x: found.append(x is UNKNOWN))
    return any(found)


def _all_static(a: Any) -> bool:
    flags: list[bool] = []

    def one(x: Any) -> Any:
        if isinstance(x, fx.Proxy):
            flags.append(bool(x.node.meta.get(STATIC, False)))
        elif isinstance(x, torch.Tensor):
            flags.append(False)
        return x

    fx.node.map_aggregate(a, one)
    return all(flags)


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta tensors (tied ones stay tied).

    Running it gives output shapes without touching the real module's state (BN counters) and
    without copying any data.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().to("meta")
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():  # a cumulative average reads its batch count as a Python number,
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.momentum is None:
            m.momentum = 0.0  # which a meta tensor cannot give; the factor never changes shapes
    return clone


@contextlib.contextmanager
def _first_path_on_meta() -> Iterator[None]:
    """Python decisions on meta tensors take some path, so a module or method whose forward decides
    per call (called as one node, see ``trace``) still gets its output's shape: every path of a mixed
    op yields the same shape.  A ``bool`` is True the first time each source line asks and False
    after (a redraw-until-finite loop ends; a filtered sum keeps one term); ``.item()`` is 0
    (integers) or 1.0; ``.tolist()`` gives ones."""
    tensor = torch.Tensor
    plain = {name: getattr(tensor, name) for name in ("__bool__", "item", "tolist")}
    asked: set[tuple[Any, int]] = set()

    def first_time(t: torch.Tensor) -> bool:
        caller = sys._getframe(2)
        where = (caller.f_code, caller.f_lineno)
        fresh = where not in asked
        asked.add(where)
        return fresh

    def on_meta(name: str, meta_value: Callable[[torch.Tensor], Any]) -> Callable[..., Any]:
        return lambda t, *a, **k: meta_value(t) if t.is_meta else plain[name](t, *a, **k)

    tensor.__bool__ = on_meta("__bool__", first_time)  # type: ignore[method-assign]
    tensor.item = on_meta("item", lambda t: 1.0 if t.is_floating_point() else 0)  # type: ignore[method-assign]
    tensor.tolist = on_meta("tolist", lambda t: torch.ones(t.shape).tolist())  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, fn in plain.items():
            setattr(tensor, name, fn)


_STOCK_RESULTS: dict[tuple, Any] = {}  # meta output of a stock torch.nn module, by configuration and input metadata


def _signature_of(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.stride(), x.requires_grad)
    return ("value", repr(x))


def _run_module_on_meta(module: nn.Module, args: Any, kwargs: Any) -> Any:
    """Run ``module`` on meta inputs.  A stock ``torch.nn`` module without hooks is a function of its
    configuration (``extra_repr``), mode, parameter/buffer shapes and its inputs' metadata, so its
    meta output is computed once per such key (a supernet has thousands of identical BNs and convs)."""
    stock = type(module).__module__.startswith("torch.nn.modules") and not (
        module._forward_hooks or module._forward_pre_hooks
    )
    if isinstance(module, AppliedFunction):  # no state of its own: what it holds stays real (not copied)
        return module(*args, **kwargs)
    if not stock:  # a user's forward may draw with no device (torch.rand(())): real draws, on a forked RNG
        with _first_path_on_meta(), torch.random.fork_rng(devices=[]):
            return meta_copy(module)(*args, **kwargs)
    key = (
        type(module), module.extra_repr(), module.training,
        tuple((n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in [*module.named_parameters(), *module.named_buffers()]),
        tuple(_signature_of(a) for a in args),
        tuple((k, _signature_of(v)) for k, v in sorted(kwargs.items())),
    )
    if key not in _STOCK_RESULTS:
        out = meta_copy(module)(*args, **kwargs)
        aliased = []
        fx.node.map_aggregate((args, kwargs), lambda a: aliased.append(a is out))
        if any(aliased):  # in place or identity: the output is this call's input
            return out
        _STOCK_RESULTS[key] = out
    return _STOCK_RESULTS[key]


def run_on_meta(root: nn.Module, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
    """Execute one node on meta tensors; modules run as :func:`meta_copy` copies (no real state changes)."""
    args, kwargs = _value(args), _value(kwargs)
    if _contains_unknown((args, kwargs)):
        return UNKNOWN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "call_function":
            return _on_meta_device(target, args, kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return _run_module_on_meta(root.get_submodule(target), args, kwargs)
        if kind == "get_attr":
            obj: Any = root
            for part in target.split("."):
                obj = getattr(obj, part)
            return _to_meta(obj)
    return UNKNOWN


def _float_inputs_in(a: Any) -> frozenset:
    """The float inputs (their stand-ins) that the traced values among ``a`` are computed from."""
    found: frozenset = frozenset()
    for x in _flat(a):
        if isinstance(x, fx.Proxy):
            found |= x.node.meta.get(FLOATS, frozenset())
    return found


def _is_number(x: Any) -> bool:
    """A traced value that eager holds as a Python float (a :class:`FloatValue`)."""
    return isinstance(x, fx.Proxy) and AS_FLOAT in x.node.meta


def _as_number(x: Any) -> Any:
    """A traced value that eager holds as a Python float: that float (eager's value at capture)."""
    return x.node.meta[AS_FLOAT] if _is_number(x) else x


def _eager(x: Any) -> Any:
    """What eager holds for ``x`` while tracing, on meta: the float, or what tracing holds (a tensor
    computed from floats has eager's dtype and shape: its operations were checked)."""
    return x.node.meta[AS_FLOAT] if _is_number(x) else _value(x)


def _on_meta(kind: str, target: Any, args: Any, kwargs: Any) -> Any:
    """One operation on meta values (``UNKNOWN`` where it fails: eager would need real numbers)."""
    if kind == "call_module" or _contains_unknown((args, kwargs)):
        return UNKNOWN
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "call_function":
                return _on_meta_device(target, args, kwargs)
            return getattr(args[0], target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - not computable on meta: not an input then
        return UNKNOWN


_IS_TENSOR_CODE = torch.is_tensor.__code__
_LEGACY_TYPE = type(torch.FloatTensor)  # read at import: tracing replaces torch.FloatTensor by a recorder
_FACTORIES = {getattr(torch, n) for n in ("rand", "randn", "randint", "randperm", "empty", "zeros", "ones", "full",
                                          "arange", "linspace", "logspace", "eye", "normal")}


def _on_meta_device(target: Any, args: Any, kwargs: Any) -> Any:
    """Call a function on meta tensors; a factory given only Python numbers (``torch.rand(n, 1)``,
    ``torch.FloatTensor(n, c, h, w)``) makes a meta tensor too: no memory, no random draw."""
    if isinstance(target, _LEGACY_TYPE):  # legacy constructor: sizes only (otherwise its own error)
        sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        if not kwargs and all(isinstance(n, int) for n in sizes):
            return torch.empty(tuple(sizes), dtype=target.dtype, device="meta")
    if target in _FACTORIES and "device" not in kwargs and not any(isinstance(a, torch.Tensor) for a in _flat(args)):
        return target(*args, **kwargs, device="meta")
    return target(*args, **kwargs)


class TracedValue(fx.Proxy):
    """A proxy that knows its value's shape, so ``len()`` works on it, and that turns into a Python
    number where Python needs one (``range(n)``, ``torch.Size``, ``float(w)``, numpy) when the
    number is fixed by shapes or by architecture values (see :meth:`ValueTracer.concrete`)."""

    def __len__(self) -> int:
        value = self.node.meta.get(VALUE, UNKNOWN)
        if isinstance(value, (torch.Tensor, tuple, list, torch.Size)):
            try:
                if isinstance(value, torch.Tensor):
                    self.tracer._note_shape_decision(self, len(value))  # type: ignore[attr-defined]
                return len(value)
            except TypeError:
                pass
        raise CaptureError(_where(f"len() of a value whose length is unknown at capture ({self.node.format_node()})"))

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # type: ignore[override]
        """What ``isinstance`` sees: to the user's code a tensor, as eagerly (``assert isinstance(x,
        torch.Tensor)``, ``torch.is_tensor(w)``, type dispatch); to torch's and topofx's code the proxy."""
        frame = sys._getframe(1)
        if frame.f_code is _IS_TENSOR_CODE:  # torch.is_tensor(x), called by the user
            frame = frame.f_back
        return TracedValue if frame is None or _is_library_file(frame.f_code.co_filename) else torch.Tensor

    def __index__(self) -> int:
        return self.tracer.concrete(self, operator.index, "an int")  # type: ignore[attr-defined]

    def __setitem__(self, key: Any, value: Any) -> None:  # `pruned[mask] = w[mask]`: an in-place graph node
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __int__(self) -> int:
        return self.tracer.concrete(self, int, "an int")  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return self.tracer.concrete(self, float, "a float")  # type: ignore[attr-defined]

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


_REFLECTED = {operator.truediv: "__rtruediv__", operator.sub: "__rsub__", operator.pow: "__rpow__",
              operator.floordiv: "__rfloordiv__", operator.mod: "__rmod__"}  # eager's `float <op> tensor`


def _acceptable(eager: Any, graphed: Any) -> bool:
    """Whether a value computed from float inputs' stand-ins (``graphed``, on meta tensors) is what eager
    computes from the floats (``eager``): a float as a 0-dim float64 tensor, a tensor of the same dtype
    and shape (tuples and lists of them item by item)."""
    if type(eager) is float:
        return isinstance(graphed, torch.Tensor) and graphed.dim() == 0 and graphed.dtype == torch.float64
    if isinstance(eager, torch.Tensor):
        return isinstance(graphed, torch.Tensor) and (graphed.dtype, graphed.shape) == (eager.dtype, eager.shape)
    if type(eager) in (tuple, list):
        return type(graphed) is type(eager) and len(graphed) == len(eager) and all(map(_acceptable, eager, graphed))
    return False


def _where(what: str, fix: str = "") -> str:
    frame = user_frame()
    at = f"at {frame}" if frame else "(no user frame found)"
    return f"{what} {at}" + (f". {fix}" if fix else "")


_DATA_METHODS = {"item", "tolist", "numpy", "__bool__", "nonzero"}
_TO_PYTHON = {"item": lambda v: v.item(), "tolist": lambda v: v.tolist(), "numpy": lambda v: v.numpy()}
_LEGACY_CONSTRUCTORS = [n for n in dir(torch) if n.endswith("Tensor") and n != "Tensor" and isinstance(getattr(torch, n), _LEGACY_TYPE)]
_ALWAYS_RECORDED = ["rand", "randn", "randint", "randperm", "empty"]  # fresh random or uninitialized tensors


class DistributionCall(nn.Module):
    """One graph node for ``Distribution(*args).method(*margs)``: torch's argument validation (a
    Python branch on tensor values) runs at call time, inside the node, as in the original."""

    def __init__(self, cls: type, name: str):
        super().__init__()
        self.cls, self.name = cls, name

    def forward(self, args: tuple, kwargs: dict, margs: tuple | None, mkwargs: dict | None) -> Any:
        on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in _flat((args, kwargs)))
        dist = self.cls(*args, **({**kwargs, "validate_args": False} if on_meta else kwargs))
        attr = getattr(dist, self.name)
        if margs is None:
            return attr
        if on_meta and self.name in ("sample", "rsample"):  # samplers have no meta kernels: shape and dtype
            shape = margs[0] if margs else (mkwargs or {}).get("sample_shape", ())
            floats = (t.dtype for t in _flat((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point())
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
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in _flat((args, kwargs))):
            # shapes only, on meta copies of the owner and of modules passed as arguments: no draws,
            # no state changes
            owner, args, kwargs = meta_copy(_Bundle(self.owner, args, kwargs)).parts()
            with _first_path_on_meta():
                return getattr(owner, self.name)(*args, **kwargs)
        return getattr(self.owner, self.name)(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{type(self.owner).__name__}.{self.name}"


class _Bundle(nn.Module):
    """An owner and a call's arguments as one module, so that one ``meta_copy`` covers the modules
    among the arguments (``self.mixed(x, weights, self.edges[k])``) too."""

    def __init__(self, owner: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.owner = owner
        self.passed = nn.ModuleList([m for m in _flat((args, kwargs)) if isinstance(m, nn.Module)])
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


class _TracedDistribution:
    """What ``torch.distributions.X(proxy, ...)`` returns while tracing: its methods and properties
    become :class:`DistributionCall` nodes."""

    def __init__(self, tracer: "ValueTracer", cls: type, args: tuple, kwargs: dict):
        self._tracer, self._cls, self._args, self._kwargs = tracer, cls, args, kwargs

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if callable(getattr(self._cls, name, None)):
            return lambda *margs, **mkwargs: self._tracer.distribution_call(self, name, margs, mkwargs)
        return self._tracer.distribution_call(self, name, None, None)


_ACTIVE_TRACER: "ValueTracer | None" = None


def _new_distribution(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``Distribution.__new__`` (installed at the first capture; plain ``object.__new__`` otherwise):
    while a trace is active, a distribution built on traced values is a :class:`_TracedDistribution`.
    (Setting ``__new__`` for the duration of a trace only is not possible: CPython keeps the slot.)"""
    tracer = _ACTIVE_TRACER
    if tracer is not None and not tracer._evaluating and any(isinstance(a, fx.Proxy) for a in _flat((args, kwargs))):
        return _TracedDistribution(tracer, cls, args, kwargs)
    return object.__new__(cls)


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
    module: the passes treat the call as having unknown effects (:func:`topofx.rewrite.is_random`)."""

    def __init__(self, function: type, held: dict[int | str, Any]):
        super().__init__()
        self.function = function
        self.__dict__["held"] = held
        bound = (getattr(a, "__self__", None) if inspect.ismethod(a) else a for a in held.values())
        self.owners = nn.ModuleList(dict.fromkeys(m for m in bound if isinstance(m, nn.Module)))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rest = iter(args)
        count = len(args) + sum(isinstance(k, int) for k in self.held)
        args = tuple(self.held[i] if i in self.held else next(rest) for i in range(count))
        kwargs.update((k, v) for k, v in self.held.items() if isinstance(k, str))
        return self.function.apply(*args, **kwargs)

    def extra_repr(self) -> str:
        held = ", ".join(f"{k}={type(v).__name__}" for k, v in self.held.items())
        return f"{self.function.__name__}.apply" + (f", holding {held}" if held else "")


def _flat(a: Any) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate(a, out.append)
    return out


def _unwatched(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with :class:`topofx.reads.ReadRecorder` paused: it watches user code, and recording
    a node or calling a leaf module runs none (pausing keeps the trace as fast as without it)."""
    recorder = sys.gettrace()
    sys.settrace(None)
    try:
        return fn(*args)
    finally:
        sys.settrace(recorder)


class ValueTracer(fx.Tracer):
    """FX tracer that propagates meta-tensor values through every node (see module docstring).

    Besides shapes it keeps, for small tensors computed from the model's attributes only (the
    architecture weights and what forward derives from them, never from the inputs or a random
    draw), their real values: a Python decision on such a value (``if w != 0``, ``.tolist()``) is
    taken at capture and recorded in a :class:`ValueGuard`, which asks for a new capture when it changes.
    """

    def __init__(self, example_inputs: Sequence[Any], opaque: frozenset[int] = frozenset(),
                 opaque_methods: frozenset[tuple[nn.Module, str]] = frozenset(),
                 floats: Sequence[_floats.FloatInput] = ()):
        super().__init__(param_shapes_constant=False)
        self.floats = floats  # Python floats read through stand-ins, as graph inputs (topofx.float_inputs)
        self.float_inputs: list[_floats.FloatInput] = []  # those the graph reads (set after the trace)
        self.proxy_buffer_attributes = True
        self._examples: Iterator[Any] = iter(example_inputs)
        self.opaque = opaque  # ids of modules called as one node: their forward decides per call (see trace)
        self.opaque_methods = opaque_methods  # (owner, method name) called as one node
        self._within: list[nn.Module] = []  # the modules whose forward is being traced through, innermost last
        self.traced_modules: list[nn.Module] = []  # non-leaf modules whose Python forward became graph
        self.shape_decisions: list[tuple[UserFrame | None, Any]] = []  # Python decisions taken on input shapes
        self.value_decisions: list[tuple[fx.Node, Callable[[Any], Any], Any, Decision]] = []
        self.speculated: list[tuple[fx.Node, Callable[[Any], Any], Any, Decision]] = []  # decisions on draws
        self.reads: list[Read] = []  # Python values read outside the traced modules' attributes (topofx.reads)

    _evaluating = False  # True while a leaf module runs on meta tensors: no recording then

    before_forward: Callable[[], None] = staticmethod(lambda: None)  # type: ignore[assignment]  # once the graph exists

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return TracedValue(node, self)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        self.before_forward()
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    def trace(self, root, concrete_args=None):  # type: ignore[override]
        with self._recording_factories(), self._recording_methods():
            return super().trace(root, concrete_args)

    @contextlib.contextmanager
    def _recording_methods(self) -> Iterator[None]:
        """Methods in ``opaque_methods`` become :class:`MethodCall` nodes while tracing (for their
        owners only: on the class, a descriptor that binds the plain function for other instances,
        such as the meta copies that compute shapes)."""
        by_class: dict[tuple[type, str], set[int]] = defaultdict(set)
        for owner, name in self.opaque_methods:
            by_class[(type(owner), name)].add(id(owner))
        saved = []
        for (cls, name), owners in by_class.items():
            saved.append((cls, name, cls.__dict__.get(name)))
            setattr(cls, name, _RecordedMethod(self, getattr(cls, name), name, owners))
        try:
            yield
        finally:
            for cls, name, own in saved:
                if own is None:
                    delattr(cls, name)
                else:
                    setattr(cls, name, own)

    def _method_call(self, owner: nn.Module, name: str, *args: Any, **kwargs: Any) -> Any:
        target = f"topofx_method_{sum(isinstance(m, MethodCall) for m in self.root.children())}"
        self.root.add_module(target, MethodCall(owner, name))
        return self.create_proxy("call_module", target, (args, kwargs), {})

    def _applied_function(self, function: type, args: tuple, kwargs: dict) -> Any:
        """One :class:`AppliedFunction` node for ``function.apply(*args, **kwargs)``; the arguments FX
        cannot write into a graph are held by the node's module."""
        held = {k: a for k, a in (*enumerate(args), *kwargs.items()) if not self._in_graph(a)}
        for a in held.values():  # held as captured, a traced value in it would be a stale proxy at every call
            if any(isinstance(leaf, fx.Proxy) for leaf in _flat(a)):
                raise CaptureError(_where(
                    f"a custom autograd Function's apply is given a value computed in forward inside a "
                    f"{type(a).__name__} that also holds what a graph cannot (a function, an object)",
                    "Pass the tensors to apply as arguments of their own"))
        target = f"topofx_function_{sum(isinstance(m, AppliedFunction) for m in self.root.children())}"
        self.root.add_module(target, AppliedFunction(function, held))
        return self.create_proxy("call_module", target, tuple(a for i, a in enumerate(args) if i not in held),
                                 {k: v for k, v in kwargs.items() if k not in held})

    def _in_graph(self, a: Any) -> bool:
        """Whether FX can write ``a`` as a node's argument: values, tensors, the model's own modules,
        and tuples, lists, dicts and slices of them (not a bound method, a function, another object)."""
        def writable(leaf: Any) -> bool:
            if isinstance(leaf, nn.Module):
                try:
                    self.path_of_module(leaf)
                except NameError:
                    return False
                return True
            return leaf is None or leaf is Ellipsis or isinstance(leaf, (fx.Proxy, *fx.node.base_types))

        return all(writable(leaf) for leaf in _flat(a))

    @contextlib.contextmanager
    def _recording_factories(self) -> Iterator[None]:
        """While tracing, legacy constructors (``torch.FloatTensor(n, c, h, w)``) and random or
        uninitialized factories become graph nodes even when their arguments are Python ints (FX would
        call them once and freeze the result), distributions built on traced values become
        :class:`DistributionCall` nodes, a user's ``torch.autograd.Function`` one :class:`AppliedFunction`
        node (its own backward runs), and a legacy ``Variable(value)`` the detached alias it is."""
        patched: list[tuple[Any, str, Any]] = []

        def record(fn: Any) -> Any:
            def recorded(*args: Any, **kwargs: Any) -> Any:  # a call from torch's own code (a module's
                caller = sys._getframe(1).f_code.co_filename  # __init__ allocating its weight) runs as is
                if self._evaluating or os.path.abspath(caller).startswith(_TORCH_DIR):
                    return fn(*args, **kwargs)
                return self.create_proxy("call_function", fn, args, kwargs)
            return recorded

        apply = torch.autograd.Function.__dict__["apply"].__func__

        def recorded_apply(cls: type, *args: Any, **kwargs: Any) -> Any:  # a Function of the user's (not
            defined_in = inspect.getsourcefile(cls) or ""  # torch's own, whose backward is its forward's autograd)
            if self._evaluating or _is_library_file(defined_in) or not any(
                    isinstance(a, fx.Proxy) for a in _flat((args, kwargs))):
                return apply(cls, *args, **kwargs)
            return self._applied_function(cls, args, kwargs)

        patched.append((torch.autograd.Function, "apply", torch.autograd.Function.__dict__["apply"]))
        torch.autograd.Function.apply = classmethod(recorded_apply)  # type: ignore[assignment]

        def variable(cls: type, *args: Any, **kwargs: Any) -> Any:  # legacy `Variable(t, requires_grad=False)`:
            if not (args and isinstance(args[0], fx.Proxy)):  # a detached alias of t
                return type.__call__(cls, *args, **kwargs)
            detached = args[0].detach()
            return detached.requires_grad_() if kwargs.get("requires_grad", args[1:2] == (True,)) else detached

        patched.append((type(torch.autograd.Variable), "__call__", None))
        type(torch.autograd.Variable).__call__ = variable  # type: ignore[method-assign]
        for owner, names in ((torch, _LEGACY_CONSTRUCTORS + _ALWAYS_RECORDED), (torch.cuda, _LEGACY_CONSTRUCTORS)):
            for name in names:
                if hasattr(owner, name):
                    patched.append((owner, name, getattr(owner, name)))
                    setattr(owner, name, record(getattr(owner, name)))
        global _ACTIVE_TRACER
        if torch.distributions.Distribution.__new__ is not _new_distribution:
            torch.distributions.Distribution.__new__ = _new_distribution  # type: ignore[assignment]
        outer, _ACTIVE_TRACER = _ACTIVE_TRACER, self
        try:
            yield
        finally:
            _ACTIVE_TRACER = outer
            for owner, name, fn in patched:
                if fn is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, fn)

    def distribution_call(self, dist: _TracedDistribution, name: str, margs: tuple | None, mkwargs: dict | None) -> Any:
        target = f"topofx_distribution_{sum(isinstance(m, DistributionCall) for m in self.root.children())}"
        self.root.add_module(target, DistributionCall(dist._cls, name))
        return self.create_proxy("call_module", target, (dist._args, dist._kwargs, margs, mkwargs), {})

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        if self._evaluating:
            return forward(*args, **kwargs)
        try:
            path = self.path_of_module(m)
        except NameError:  # built inside forward(): not a submodule of the model
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                raise CaptureError(_where(
                    f"a {type(m).__name__} with parameters or buffers is built inside forward(); they would be new "
                    "on every call and no optimizer sees them", "Build it once in __init__ so it is a submodule",
                )) from None
            return forward(*args, **kwargs)  # parameter-free: traced through as the function it computes
        if self.is_leaf_module(m, path):
            return _unwatched(super().call_module, m, forward, args, kwargs)
        self.traced_modules.append(m)
        self._within.append(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._within.pop()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.opaque or super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # type: ignore[override]
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _run_on_meta(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        self._evaluating = True
        try:
            return run_on_meta(self.root, kind, target, args, kwargs)
        finally:
            self._evaluating = False

    def _drawn(self, node: fx.Node) -> bool:
        """Whether the node's value depends on a random draw made in forward."""
        if any(a.meta.get(DRAWN) for a in node.all_input_nodes):
            return True
        if node.op == "get_attr":  # a tensor sampled before the call: new on every call, as a draw
            return _tensors.is_input(self._attribute(node.target))
        if node.op == "call_module":
            module = self.root.get_submodule(node.target)
            return isinstance(module, (nn.modules.dropout._DropoutNd, MethodCall, AppliedFunction)) or (
                isinstance(module, DistributionCall) and module.name in ("sample", "rsample"))
        from .topology import draws  # topology imports this module
        return draws(node)

    def _attribute(self, target: str) -> Any:
        """The root's attribute at ``target`` (read as evaluating: no node is recorded)."""
        evaluating, self._evaluating = self._evaluating, True
        try:
            return functools.reduce(getattr, target.split("."), self.root)
        finally:
            self._evaluating = evaluating

    def _real(self, node: fx.Node, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        """The real value of a node computed from small attributes only (``None`` when there is none).
        In-place operations run on these copies, so a later read sees the write, as in eager."""
        if node.meta[FROM_INPUT]:  # (random draws run for real: the trace forks the RNG, see trace)
            return None
        self._evaluating = True  # attribute reads and calls below must not record nodes
        try:
            return self._real_of(kind, target, args, kwargs)
        finally:
            self._evaluating = False

    def _real_of(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "get_attr":
            obj = self._attribute(target)
            small = isinstance(obj, torch.Tensor) and obj.numel() <= REAL_NUMEL and not _tensors.is_input(obj)
            return obj.detach().clone() if small else None
        if kind not in ("call_function", "call_method", "call_module"):
            return None
        missing = []

        def real(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                a = a.node
            if isinstance(a, fx.Node):
                value = a.meta.get(REAL)
                if value is None:
                    value = a.meta.get(VALUE) if a.meta.get(STATIC) else None
                    if value is None:
                        missing.append(a)
                return value
            return a

        args, kwargs = fx.node.map_aggregate(args, real), fx.node.map_aggregate(kwargs, real)
        if missing:
            return None
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                module = self.root.get_submodule(target)
                stateless = not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
                return module(*args, **kwargs) if stateless and not isinstance(module, MethodCall) else None
        except Exception:  # noqa: BLE001 - no real value, as for a data value
            return None

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[override]
        return _unwatched(self._create_proxy, kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

    def _create_proxy(self, kind, target, args, kwargs, name, type_expr, proxy_factory_fn):  # type: ignore[no-untyped-def]
        floats = _float_inputs_in((args, kwargs)) if self.floats else frozenset()
        eager = UNKNOWN
        if any(map(_is_number, _flat((args, kwargs)))):  # (a tensor computed from floats is what eager has)
            use = self._float_use(kind, target, args, kwargs)
            if not isinstance(use, tuple):
                return use  # eager computes a Python value from the floats alone (`self.temp > 0.5`)
            kind, target, args, kwargs, eager = use
            floats = _float_inputs_in((args, kwargs))
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if VALUE in node.meta:  # create_proxy can be re-entered for the same node
            return proxy
        if floats:
            node.meta[FLOATS] = floats
        if type(eager) is float:
            node.meta[AS_FLOAT], proxy = eager, FloatValue(node, self)
        if kind == "placeholder":
            value, static = _to_meta(next(self._examples, UNKNOWN)), False
        else:
            try:
                value = self._run_on_meta(kind, target, args, kwargs)
            except Exception:  # noqa: BLE001 - an op without a meta kernel just has no known value
                value = UNKNOWN
            shape_accessor = (kind == "call_function" and target is getattr and args[1] in _SHAPE_ATTRS) or (
                kind == "call_method" and target in _SHAPE_METHODS
            )
            data_op = kind == "call_method" and target in _DATA_METHODS
            static = (
                kind not in ("get_attr", "call_module")
                and not isinstance(value, torch.Tensor)
                and not data_op
                and value is not UNKNOWN
                and (shape_accessor or _all_static((args, kwargs)))
            )
        node.meta[VALUE] = value
        node.meta[STATIC] = static
        node.meta[FROM_INPUT] = kind == "placeholder" or any(a.meta.get(FROM_INPUT) for a in node.all_input_nodes)
        node.meta[DRAWN] = kind != "placeholder" and self._drawn(node)
        real = self._real(node, kind, target, args, kwargs)
        if real is not None:
            node.meta[REAL] = real
        frame = user_frame()
        if frame is not None:
            node.meta["topofx_user_frame"] = frame
        if kind == "call_method" and target in _TO_PYTHON:  # Python needs the number(s), unless an
            source = node.args[0]  # `.item()` of data only feeds arithmetic: then it stays a graph op
            per_call = source.meta.get(DRAWN) and not source.meta.get(FROM_INPUT)
            if target != "item" or per_call or source.meta.get(REAL) is not None:
                return self.concrete(proxy, lambda v: v, f"the values of `.{target}()`")
        return proxy

    def concrete(self, obj: fx.Proxy, convert: Callable[[Any], Any], what: str) -> Any:
        """The Python value Python code asks of ``obj``: from shapes (a shape decision), from the real
        value of architecture-only data (a value decision), or a :class:`CaptureError` naming the line.
        A value computed from float inputs' stand-ins makes those floats constants (the model is traced
        again without their stand-ins); this trace goes on with eager's number."""
        node = obj.node
        for float_input in node.meta.get(FLOATS, ()):
            float_input.decides = True
        if AS_FLOAT in node.meta:
            return convert(node.meta[AS_FLOAT])
        value = node.meta.get(VALUE, UNKNOWN)
        if node.meta.get(STATIC) and value is not UNKNOWN:
            result = convert(value)
            self._note_shape_decision(obj, result)
            return result
        source = node.args[0] if node.op == "call_method" and node.target in _TO_PYTHON else node
        real = source.meta.get(REAL) if isinstance(source, fx.Node) else None
        if real is not None:  # architecture values (guarded) or a draw made in forward (speculated)
            result = convert(_TO_PYTHON[node.target](real) if source is not node else real)
            decisions = self.speculated if node.meta.get(DRAWN) else self.value_decisions
            decisions.append((node, convert, result, Decision(user_frame(), self._deciding_unit())))
            return result
        if node.meta.get(DRAWN) and not node.meta.get(FROM_INPUT) and (unit := self._deciding_unit()) is not None:
            raise _DecidesPerCall(unit, user_frame())
        raise CaptureError(_where(*self._why_not_concrete(node, what)))

    def _deciding_unit(self) -> Unit | None:
        """The innermost piece of user code around the current decision that can run as one node:
        the forward of a module traced through, or another method of a module (not ``forward``)."""
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            owner = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None  # `self`
            if not _is_library_file(frame.f_code.co_filename) and isinstance(owner, nn.Module):
                name = frame.f_code.co_name
                if name == "forward":
                    return owner if any(owner is m for m in self._within) else None
                method = getattr(type(owner), name, None)
                if getattr(method, "__code__", None) is frame.f_code:
                    return (owner, name)
            frame = frame.f_back
        return None

    def _why_not_concrete(self, node: fx.Node, what: str) -> tuple[str, str]:
        if node.meta.get(FROM_INPUT):
            return (f"Python needs {what} computed from the inputs' values (data-dependent control flow)",
                    "A graph fixes one path for all inputs: keep the Python decision on shapes only, or compute "
                    "it with tensor operations (torch.where, masks)")
        if node.meta.get(DRAWN):
            return (f"Python needs {what} computed from a random draw made in forward (the decision changes "
                    "on every call)", "Decide with tensor operations (multiply by the sampled weight), move the "
                    "decision into a method or submodule (which then runs per call), or register an adapter "
                    "(topofx.adapters.register_adapter) that draws the sample outside forward")
        return (f"Python needs {what} of a value unknown at capture (`{node.name}`, no meta kernel or too large)",
                "Compute it with tensor operations, or move it out of forward()")

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.concrete(obj, bool, "a bool (an `if`/`while`/`and`/`or` on a tensor)")

    def _float_use(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        """An operation on values computed from float inputs' stand-ins: ``(kind, target, args, kwargs,
        eager's value)`` to record, when it computes with the stand-ins what eager computes with the
        floats (:func:`_acceptable`; ``float / tensor`` as eager dispatches it, to the tensor's reflected
        method).  Otherwise the floats of its number operands become constants (:attr:`FloatInput.decides`) and the operation
        is what this trace would record with them: recorded on their numbers, or computed in Python."""
        first = args[0] if kind == "call_function" and len(args) == 2 else None
        if target in _REFLECTED and _is_number(first) and isinstance(_eager(args[1]), torch.Tensor):
            kind, target, args = "call_method", _REFLECTED[target], (args[1], first)
        self._evaluating = True
        try:
            eager = _on_meta(kind, target, fx.node.map_aggregate(args, _eager), fx.node.map_aggregate(kwargs, _eager))
            graphed = _on_meta(kind, target, _value(args), _value(kwargs))
        finally:
            self._evaluating = False
        if _acceptable(eager, graphed):
            return kind, target, args, kwargs, eager
        for number in filter(_is_number, _flat((args, kwargs))):  # (tensors computed from floats were checked)
            for float_input in number.node.meta[FLOATS]:
                float_input.decides = True
        args, kwargs = fx.node.map_aggregate(args, _as_number), fx.node.map_aggregate(kwargs, _as_number)
        if kind == "call_module" or any(isinstance(a, fx.Proxy) for a in _flat((args, kwargs))):
            return kind, target, args, kwargs, UNKNOWN
        return target(*args, **kwargs) if kind == "call_function" else getattr(args[0], target)(*args[1:], **kwargs)

    def _note_shape_decision(self, obj: fx.Proxy, value: Any) -> None:
        """A Python decision on a value computed from the inputs' shapes holds for those shapes only."""
        if obj.node.meta.get(FROM_INPUT):
            self.shape_decisions.append((user_frame(), value))

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        value = obj.node.meta.get(VALUE, UNKNOWN)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            self._note_shape_decision(obj, value.shape[0])
            return iter([obj[i] for i in range(value.shape[0])])
        if isinstance(value, (tuple, list, torch.Size)):
            return iter([obj[i] for i in range(len(value))])
        raise CaptureError(_where("iteration over a value whose length is unknown at capture"))

    def keys(self, obj: fx.Proxy) -> Any:
        value = obj.node.meta.get(VALUE, UNKNOWN)
        if isinstance(value, dict):
            return value.keys()
        raise CaptureError(_where("`**` unpacking of a traced value"))


Unit = Union[nn.Module, tuple[nn.Module, str]]  # a module's forward, or (owner, method name)


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where forward took a Python decision on architecture values: the line, and the innermost
    module forward or method around it (``None`` in the model's own forward)."""

    frame: UserFrame | None
    unit: Unit | None = dataclasses.field(compare=False)


PER_CALL: "weakref.WeakKeyDictionary[nn.Module, set[tuple[str, ...]]]" = weakref.WeakKeyDictionary()
"""Per model: units found to decide per call (on draws, or on architecture values that change every
few calls), by path (``unit_key``); later captures of the model run them as one node each from the start."""


def unit_key(model: nn.Module, unit: Unit) -> tuple[str, ...] | None:
    """``(module path,)`` or ``(owner path, method name)`` of a unit of ``model``."""
    owner, method = unit if isinstance(unit, tuple) else (unit, None)
    path = next((name for name, m in model.named_modules() if m is owner), None)
    return None if path is None else (path,) if method is None else (path, method)


def unit_name(model: nn.Module, key: tuple[str, ...]) -> str:
    """``cells.0._ops.3`` for a module, ``Network._resource_penalty`` / ``cells.0.sample`` for a method."""
    return ".".join([key[0] or type(model).__name__, *key[1:]]) if len(key) == 2 else key[0]


def _per_call_units(model: nn.Module, keys: set[tuple[str, ...]]) -> tuple[set[int], set[tuple[nn.Module, str]]]:
    """Ids of the modules and the methods that run as one node: a learned module's forward, and every
    module of its class (same code, same kind of decision)."""
    modules, methods = set(), set()
    for key in keys:
        owner = model.get_submodule(key[0])
        if len(key) == 2:
            methods.add((owner, key[1]))
        else:
            modules |= {id(m) for m in model.modules() if type(m) is type(owner)}
    return modules, methods


def computed_by(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """The nodes that compute ``nodes``, in graph order: their ancestors, and every in-place write
    (``p[mask] = w[mask]``, ``w.div_(s)``) into a storage they read, directly or through a view."""
    from .rewrite import is_view  # rewrite and topology import this module
    from .topology import mutates

    graph = nodes[0].graph if nodes else None
    included: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in included:
            continue
        included.add(node)
        stack.extend(node.all_input_nodes)
        views = [node]
        while views:  # writers of this storage: through its users, and the users of its views
            base = views.pop()
            for user in base.users:
                if not (user.args and user.args[0] is base):
                    continue
                if mutates(user):
                    stack.append(user)
                elif is_view(user):
                    views.append(user)
    return [n for n in graph.nodes if n in included] if graph is not None else []


class _DecidesPerCall(Exception):
    """Raised by the tracer at a Python decision on a value drawn anew on every call (a hard Gumbel
    sample's ``if abs(w) > 1e-10``, GDAS's ``index[e].item()``) inside ``module``'s forward."""

    def __init__(self, unit: Unit, frame: UserFrame | None):
        super().__init__(str(unit))
        self.unit, self.frame = unit, frame  # a module, or (owner, method name); the decision's line


class ValueGuard:
    """The Python decisions forward took on values computed from the model's attributes only
    (``if w != 0`` on projected weights, ``.tolist()`` of alphas): the nodes that compute them, copied
    out of the traced graph, and the values seen at capture.  :meth:`changed` evaluates them on the
    model's current attributes (no inputs, no gradients) and names the decisions that differ."""

    def __init__(self, gm: fx.GraphModule, decisions: list[tuple[fx.Node, Callable[[Any], Any], Any, Decision]]):
        self.graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in computed_by([node for node, *_ in decisions]):
            env[node] = self.graph.node_copy(node, lambda a: env[a])
        self.graph.output(tuple(env[node] for node, *_ in decisions))
        self.checks = [(convert, expected, decision) for _, convert, expected, decision in decisions]
        # what the model itself does not hold (FX's tensor constants: a tensor read from a dict) is read
        # from the graph module: the same objects, so in-place writes into them are seen
        self.held = {n.target: _resolve(gm, n.target) for n in self.graph.nodes if n.op == "get_attr"}
        self._batched: dict[int, Any] = {}  # id(root) -> (root, _BatchedDecisions or None), built at the first holds()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_batched": {}}  # built again for the copy's model

    def changed(self, root: nn.Module) -> list[Decision]:
        """The decisions whose value differs now (all of them when they cannot be evaluated any more: an
        attribute re-shaped in place, ``alphas.data = torch.zeros(other shape)``)."""
        try:
            with torch.no_grad():
                values = self._evaluate(root)
        except Exception:  # noqa: BLE001 - captured anew, the model decides again (or raises its own error)
            return [decision for *_, decision in self.checks]
        return [decision for value, (convert, expected, decision) in zip(values, self.checks)
                if not _same(convert(value), expected)]

    def holds(self, root: nn.Module) -> bool:
        """Whether every decision comes out as at capture: :meth:`changed` is empty -- computed as one
        batched program (:class:`_BatchedDecisions`) where it reproduces :meth:`changed`'s values."""
        entry = self._batched.get(id(root))
        if entry is None or entry[0] is not root:
            entry = self._batched[id(root)] = (root, _BatchedDecisions.build(self, root))
        batched = entry[1]
        return batched.holds(self, root) if batched is not None else not self.changed(root)

    def leaf(self, root: nn.Module, target: str) -> Any:
        """What a ``get_attr`` of the decisions reads: the model's attribute, else the graph module's constant."""
        try:
            return _resolve(root, target)
        except AttributeError:
            return self.held[target]

    def _evaluate(self, root: nn.Module) -> tuple:
        env: dict[fx.Node, Any] = {}
        for node in self.graph.nodes:
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "get_attr":
                obj: Any = self.leaf(root, node.target)
                env[node] = obj.detach().clone() if isinstance(obj, torch.Tensor) else obj
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                env[node] = root.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "output":
                return args[0]
        return ()


_COMPARISONS = {operator.ne, operator.eq, operator.lt, operator.le, operator.gt, operator.ge, torch.ne, torch.eq,
                torch.lt, torch.le, torch.gt, torch.ge, torch.logical_not, "ne", "eq", "lt", "le", "gt", "ge",
                "logical_not", "__ne__", "__eq__", "__lt__", "__le__", "__gt__", "__ge__"}
# exact elementwise ops: on a whole tensor, each element comes out as the op gives it alone
_ELEMENTWISE = _COMPARISONS | {operator.neg, operator.abs, torch.neg, torch.abs, "neg", "abs", "__neg__", "__abs__"}


class _BatchedDecisions:
    """A :class:`ValueGuard`'s decisions as one program, built once and checked cheaply:

    * its few ops, code-generated as one FX graph module whose inputs are the attributes they read,
      each computed once (common subexpressions merged: every cell reads the same ``weights[e]``);
    * a decision that is the Python ``bool`` of exact elementwise ops (``!=``, ``>``, ``abs``) on one
      element of a tensor (DARTS-PT's ``if w != 0`` over each ``w`` of ``weights[e]``, in every cell)
      is not computed alone: the ops run once on the whole tensor, and its decisions are gathered
      (``torch.take``) and compared with the capture's in one ``torch.equal``; other decisions are
      outputs of the program, converted and compared one by one, as :meth:`ValueGuard.changed` does;
    * the program is a function of the attributes it reads: when they hold the values they held at
      its last run that found every decision unchanged (a weight step leaves the alphas alone), it does
      not run again.

    Used only where it gives every decision the value the node-by-node evaluation gives it (checked
    when built)."""

    def __init__(self, guard: "ValueGuard", root: nn.Module):
        from .topology import mutates  # topology imports this module

        nodes = list(guard.graph.nodes)
        if any(n.op == "call_module" for n in nodes):
            raise ValueError("a module call: run node by node")
        position = {n: i for i, n in enumerate(nodes)}
        last_write = max((position[n] for n in nodes if mutates(n)), default=-1)
        decided = list(nodes[-1].args[0])
        lifted = [_lift(node, position, last_write) if convert is bool else None
                  for node, (convert, _, _) in zip(decided, guard.checks)]
        needed = [lift[0] if lift else node for node, lift in zip(decided, lifted)]
        graph, env, self.leaves = fx.Graph(), {}, []
        merged: dict[Any, fx.Node] = {}  # one node per distinct computation (none where the program writes in place)
        pure = last_write < 0 and not any("out" in n.kwargs for n in nodes)
        for node in computed_by(needed):
            key = None if not pure else (node.op, node.target) if node.op == "get_attr" else (
                node.op, node.target, _frozen(fx.node.map_arg(node.args, env.__getitem__)),
                _frozen(fx.node.map_arg(node.kwargs, env.__getitem__)))
            if key is not None and _hashable(key) and key in merged:
                env[node] = merged[key]
                continue
            if node.op == "get_attr":
                env[node] = graph.placeholder(f"leaf{len(self.leaves)}")
                self.leaves.append(node.target)
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
            if key is not None and _hashable(key):
                merged[key] = env[node]
        groups: dict[tuple, list[tuple[int, tuple[int, ...]]]] = {}  # (whole-tensor output, ops) -> [(decision, path)]
        singles: list[int] = []  # the decisions checked one by one: one per computation and expectation
        kept: dict[int, int] = {}  # decision -> the single that checks it
        for i, (node, lift) in enumerate(zip(decided, lifted)):
            if lift is not None:
                base, ops, path = lift
                groups.setdefault((env[base], ops), []).append((i, path))
                continue
            convert, expected, _ = guard.checks[i]
            kept[i] = next((j for j in singles if env[decided[j]] is env[node] and guard.checks[j][0] is convert
                            and _same(guard.checks[j][1], expected)), i)
            if kept[i] == i:
                singles.append(i)
        values = []
        for value, ops in groups:
            for op, target, before, after in ops:
                value = graph.create_node(op, target, (*before, value, *after))
            values.append(value)
        values += [env[decided[i]] for i in singles]
        graph.output(tuple(values))
        self.clone = any(mutates(n) for n in graph.nodes)  # writes in place (DARTS-PT's projected rows): into copies
        self.forward = fx.GraphModule(nn.Module(), graph).forward
        self.read = _reader(self.leaves, [guard.held[target] for target in self.leaves])
        # (output, shape of the whole tensor, flat indices, the capture's bools) per group of decisions
        self.groups: list[tuple[int, torch.Size, torch.Tensor, torch.Tensor]] = []
        # (output, convert, expected) per distinct single decision
        self.singles = [(len(groups) + k, *guard.checks[i][:2]) for k, i in enumerate(singles)]
        self.memo: list[torch.Tensor] | None = None  # the leaves' values at the last run that held
        with torch.no_grad():
            reference, outputs = guard._evaluate(root), self._run(self._leaves(guard, root))
        for k, members in enumerate(groups.values()):
            self.groups.append(_gather(k, outputs[k], members, reference, guard.checks))
        output = {i: len(groups) + k for k, i in enumerate(singles)}
        for i, j in kept.items():  # each decision: the value of the program's output that checks it
            convert = guard.checks[i][0]
            if not _same(convert(outputs[output[j]]), convert(reference[i])):
                raise ValueError("the program does not reproduce a decision: run node by node")

    @classmethod
    def build(cls, guard: "ValueGuard", root: nn.Module) -> "_BatchedDecisions | None":
        try:
            return cls(guard, root)
        except Exception:  # noqa: BLE001 - what cannot be generated, or comes out otherwise, runs node by node
            return None

    def _leaves(self, guard: "ValueGuard", root: nn.Module) -> list[Any]:
        try:
            return self.read(root)
        except AttributeError:  # one is not the model's any more: read one by one (the graph module's constant)
            return [guard.leaf(root, target) for target in self.leaves]

    def _run(self, leaves: list[Any]) -> tuple:
        if self.clone:
            leaves = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        return self.forward(*leaves)

    def holds(self, guard: "ValueGuard", root: nn.Module) -> bool:
        leaves = self._leaves(guard, root)
        memo = self.memo
        if memo is not None and all(map(_same_tensor, leaves, memo)):
            return True
        with torch.no_grad():
            outputs = self._run(leaves)
            for g, (k, shape, indices, expected) in enumerate(self.groups):
                whole = outputs[k]
                if whole.shape != shape:
                    return False
                if whole.device != indices.device:  # the model moved (.to()): the indices follow, once
                    indices, expected = indices.to(whole.device), expected.to(whole.device)
                    self.groups[g] = (k, shape, indices, expected)
                if not torch.equal(torch.take(whole, indices), expected):
                    return False
            if not all(_same(convert(outputs[k]), expected) for k, convert, expected in self.singles):
                return False
            if all(isinstance(x, torch.Tensor) for x in leaves):
                self.memo = [x.detach().clone() for x in leaves]
        return True


def _reader(targets: list[str], held: list[Any]) -> Callable[[nn.Module], list[Any]]:
    """A generated function that reads ``targets`` (dotted attribute paths) off a model, each module on
    the way read once (``cells.3.op_size`` and ``cells.4.op_size`` read ``cells`` once), and ``held``'s
    object where the last module lacks the attribute (:meth:`ValueGuard.leaf`; AttributeError where a
    module on the way is gone)."""
    lines, names = [], {(): "root"}
    for target in targets:
        *path, _ = target.split(".")
        for depth in range(1, len(path) + 1):
            if tuple(path[:depth]) not in names:
                names[tuple(path[:depth])] = name = f"_m{len(names)}"
                lines.append(f"    {name} = getattr({names[tuple(path[:depth - 1])]}, {path[depth - 1]!r})")
    reads = ", ".join(f"getattr({names[tuple(t.split('.')[:-1])]}, {t.split('.')[-1]!r}, _held[{i}])"
                      for i, t in enumerate(targets))
    namespace: dict[str, Any] = {"_held": held}
    exec(compile("def read(root):\n" + "".join(line + "\n" for line in lines) + f"    return [{reads}]\n",  # noqa: S102
                 "<topofx value guard>", "exec"), namespace)
    return namespace["read"]


def _same_tensor(now: torch.Tensor, then: torch.Tensor) -> bool:
    """``now`` holds ``then``'s values, of the same dtype, shape and device."""
    return (isinstance(now, torch.Tensor) and now.dtype == then.dtype and now.shape == then.shape
            and now.device == then.device and torch.equal(now, then))


def _frozen(a: Any) -> Any:
    """An argument as a key that tells ``1``, ``1.0`` and ``True`` apart (nodes by identity)."""
    if isinstance(a, fx.Node):
        return a
    if isinstance(a, (list, tuple)):
        return (type(a), tuple(_frozen(x) for x in a))
    if isinstance(a, dict):
        return (dict, tuple((k, _frozen(v)) for k, v in a.items()))
    return (type(a), a)


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _lift(node: fx.Node, position: dict[fx.Node, int], last_write: int) -> tuple | None:
    """``(base, ops, path)`` when ``node`` is exact elementwise ops on the element ``base[path]``, read by
    constant indices after the program's last in-place write; ``ops`` are ``(op, target, arguments
    before, arguments after)`` the element (each op's other arguments are numbers), innermost first,
    ending in a comparison (``!= 0``, Python's truth of a number, appended where they do not)."""
    ops: list[tuple] = []
    while node.op in ("call_function", "call_method") and node.target in _ELEMENTWISE and not node.kwargs:
        at = [k for k, a in enumerate(node.args) if isinstance(a, fx.Node)]
        others = [a for k, a in enumerate(node.args) if k not in at]
        if len(at) != 1 or (node.op == "call_method" and at != [0]) or not all(type(a) in (int, float, bool) for a in others):
            return None
        ops.append((node.op, node.target, tuple(node.args[:at[0]]), tuple(node.args[at[0] + 1:])))
        node = node.args[at[0]]
    path: list[int] = []
    while node.op == "call_function" and node.target is operator.getitem and not node.kwargs:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if not all(type(i) is int for i in index) or position[node] <= last_write:
            return None
        path[:0] = index
        node = node.args[0]
    if not path:
        return None
    ops.reverse()
    if not ops or ops[-1][1] not in _COMPARISONS:
        ops.append(("call_function", operator.ne, (), (0,)))
    return node, tuple(ops), tuple(path)


def _gather(output: int, whole: Any, group: list[tuple[int, tuple[int, ...]]], reference: tuple, checks: list) -> tuple:
    """``(output, shape, flat indices, expected)`` of a group of decisions, each an element of ``whole``
    (the program's output ``output``); ``ValueError`` unless each element is the Python bool that the
    node-by-node evaluation gives its decision."""
    if not isinstance(whole, torch.Tensor) or whole.dtype is not torch.bool:
        raise ValueError("not a tensor of bools")
    shape, flat = whole.shape, []
    for _, path in group:
        if len(path) != len(shape) or not all(-n <= p < n for p, n in zip(path, shape)):
            raise ValueError("not one element")
        index = 0
        for p, n in zip(path, shape):
            index = index * n + p % n
        flat.append(index)
    indices = torch.tensor(flat, dtype=torch.long, device=whole.device)
    if torch.take(whole, indices).tolist() != [bool(reference[i]) for i, _ in group]:
        raise ValueError("an element differs from its decision")
    if not all(type(checks[i][1]) is bool for i, _ in group):
        raise ValueError("a decision that is not a bool")
    expected = torch.tensor([checks[i][1] for i, _ in group], dtype=torch.bool, device=whole.device)
    return output, shape, indices, expected


def _resolve(root: Any, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    try:
        import numpy as np

        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return bool(np.array_equal(a, b))
    except ImportError:
        pass
    return bool(a == b)


# ---------------------------------------------------------------------------------------------
# plain tensor attributes -> temporary buffers
# ---------------------------------------------------------------------------------------------
_MODULE_FIELDS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, hooks


Path = tuple  # of steps ("attr", name) / ("item", key), as topofx.reads spells access paths
_HELD_DEPTH = 6  # containers and plain objects walked below a module attribute (NASLib: graph -> edge -> data)




def _held_tensors(module: nn.Module, named: set[int]) -> Iterator[tuple[Path, torch.Tensor]]:
    """(path, tensor) of every tensor ``module`` holds below a non-module attribute, through lists,
    tuples, dicts (int or str keys) and plain objects' ``__dict__``s -- ``self.alphas[i]``, NASLib's
    ``self._adj[u][v]._private["alpha"]`` -- that no module holds by name (``named``: read by that name)."""
    seen: set[int] = set()

    def walk(obj: Any, path: Path, depth: int) -> Iterator[tuple[Path, torch.Tensor]]:
        if id(obj) in seen or depth > _HELD_DEPTH:
            return
        seen.add(id(obj))
        if type(obj) is dict:
            items = ((("item", k), v) for k, v in obj.items() if isinstance(k, (int, str)))
        elif type(obj) in (list, tuple):
            items = ((("item", i), v) for i, v in enumerate(obj))
        elif plain_object(obj, _reads_nothing):  # an edge's data record
            items = ((("attr", k), v) for k, v in vars(obj).items())
        else:
            return
        for step, value in list(items):
            if isinstance(value, torch.Tensor):
                if id(value) not in named:
                    yield (*path, step), value
            elif not (type(obj) is tuple and type(value) is tuple):  # a tuple is replaced in its parent
                yield from walk(value, (*path, step), depth + 1)

    for name, value in list(vars(module).items()):
        if name not in _MODULE_FIELDS and not isinstance(value, (torch.Tensor, nn.Module)):
            yield from walk(value, (("attr", name),), 1)


def _slot(module: nn.Module, path: Path) -> str:
    """A fresh attribute name for a held tensor: ``topofx_held_`` + its path (``alphas_0``)."""
    return _free_name(module, "topofx_held_" + re.sub(r"\W", "_", "_".join(str(key) for _, key in path)))


def held_at(module: nn.Module, path: Path) -> Any:
    """What ``module`` holds at ``path``: attributes through ``__dict__``, items by key (no user code runs)."""
    obj: Any = module
    for kind, key in path:
        obj = vars(obj)[key] if kind == "attr" else obj[key]
    return obj


def _put(container: Any, step: tuple[str, Any], value: Any) -> None:
    """``container``'s element at ``step`` becomes ``value`` (a module's or plain object's attribute
    without ``__setattr__``: no registration, no user code)."""
    kind, key = step
    if kind == "attr":
        object.__setattr__(container, key, value) if isinstance(container, nn.Module) else vars(container).__setitem__(key, value)
    else:
        container[key] = value


@contextlib.contextmanager
def _loose_tensors_as_buffers(model: nn.Module, read: Callable[[str], Any]) -> Iterator[tuple[list[str], list, Callable]]:
    """Register plain tensor attributes as buffers (same objects) while tracing, so the graph reads them
    by name (live ``get_attr``) instead of freezing them as constants: plain-tensor alphas, masks that
    pruning or projection re-assign (``self._mask = new``, followed by ``topofx.guards``).  Tensors
    held below an attribute, in lists, tuples, dicts or plain objects (``self.alphas[i]`` appended per
    edge; an edge record in a graph-based model), are registered as ``topofx_held_<path>`` (parameters
    as parameters) and recorded in ``gm.meta[HELD]``, so that the guards follow an element the training
    loop replaces; while the trace runs, each sits at its place as its ``get_attr`` value."""
    moved: list[tuple[nn.Module, str, torch.Tensor]] = []
    held: list[tuple[nn.Module, str, Path]] = []
    named = {id(t) for m in model.modules()  # held elsewhere by name: read by that name (`self._arch_parameters`)
             for t in (*m._parameters.values(), *m._buffers.values(), *vars(m).values()) if isinstance(t, torch.Tensor)}
    for prefix, module in model.named_modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                del module.__dict__[name]
                module.register_buffer(name, value, persistent=False)
                moved.append((module, f"{prefix}.{name}" if prefix else name, value))
        for path, tensor in list(_held_tensors(module, named)):
            slot = _slot(module, path)
            (module._parameters if isinstance(tensor, nn.Parameter) else module._buffers)[slot] = tensor
            held.append((module, f"{prefix}.{slot}" if prefix else slot, path))
    replaced: list[tuple[Any, tuple[str, Any], Any]] = []  # (container, step, original), innermost last

    def install() -> None:  # once the tracer has its graph: forward reads get_attr nodes at the tensors' places
        for module, qualified, path in held:
            *above, step = path
            parent = held_at(module, tuple(above))
            if type(parent) is tuple:  # immutable: a copy takes its place in the grandparent
                *top, tuple_step = above
                grandparent = held_at(module, tuple(top))
                copy_ = list(parent)
                copy_[step[1]] = read(qualified)
                replaced.append((grandparent, tuple_step, parent))
                _put(grandparent, tuple_step, tuple(copy_))
            else:
                replaced.append((parent, step, held_at(parent, (step,))))
                _put(parent, step, read(qualified))
    try:
        yield [qualified for _, qualified, _ in moved], [(q, m, p) for m, q, p in held], install
    finally:
        for container, step, original in reversed(replaced):
            _put(container, step, original)
        for module, qualified, value in moved:
            name = qualified.rsplit(".", 1)[-1]
            module._buffers.pop(name, None)
            object.__setattr__(module, name, value)
        for module, qualified, _ in held:
            slot = qualified.rsplit(".", 1)[-1]
            module._parameters.pop(slot, None)
            module._buffers.pop(slot, None)


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Capture:
    """Result of :func:`capture`: a graph module, or the reason the network fell back to eager."""

    graph_module: fx.GraphModule | None
    fallback_reason: str | None = None


@functools.lru_cache(maxsize=None)
def _method_signature(function: Callable[..., Any]) -> inspect.Signature:
    signature = inspect.signature(function)
    return signature.replace(parameters=list(signature.parameters.values())[1:])  # without `self`


def forward_signature(model: nn.Module) -> inspect.Signature:
    """``model.forward``'s signature, computed once per forward function (every call binds to it)."""
    forward = model.forward
    function = getattr(forward, "__func__", None)
    return _method_signature(function) if function is not None else inspect.signature(forward)


def bind_call(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> inspect.BoundArguments:
    """``model.forward``'s parameters bound to a call's arguments, defaults filled in."""
    bound = forward_signature(model).bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    return bound


def call_key(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> tuple | None:
    """What selects a captured graph for a call of ``model``: the type and value of every non-tensor
    argument (defaults included) and which arguments are tensors; ``None`` when a value cannot be
    compared by hash (a list, a dict).  Raises ``TypeError`` when the call does not fit ``forward``."""
    if _has_var_args(model):
        items = [*enumerate(args), *sorted((kwargs or {}).items())]
    else:
        items = list(bind_call(model, args, kwargs).arguments.items())
    key = tuple((name, "tensor") if isinstance(v, torch.Tensor) else (name, type(v), v) for name, v in items)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _has_var_args(model: nn.Module) -> bool:
    kinds = {p.kind for p in forward_signature(model).parameters.values()}
    return bool(kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD})


def _specialize(graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """Name the placeholders of specialized (non-tensor) arguments after their parameters, so the
    graph module takes the original's keywords; FX's ``_assert`` on each value stays in the graph."""
    for node in graph.nodes:
        if node.op == "placeholder":
            name = node.target.rsplit("_", 1)[0] if node.target not in concrete else node.target
            if name in concrete and node.target != name:
                node.target = name


def trace(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Trace ``model`` with :class:`ValueTracer`; raise :class:`CaptureError` naming the user's code.

    Tensor arguments become graph inputs; every other argument of ``forward`` (strings, numbers,
    ``None``, defaults included) is specialized to its value in ``example_inputs`` and asserted in
    the graph, so one graph serves exactly one choice of them (``SimplifiedModule`` keeps one
    graph per choice).
    """
    if _has_var_args(model):
        values, concrete = list(example_inputs), None
    else:
        bound = bind_call(model, example_inputs)
        values = list(bound.arguments.values())
        concrete = {n: v for n, v in bound.arguments.items() if not isinstance(v, torch.Tensor)}
    learned = PER_CALL.setdefault(model, set())
    while True:
        opaque, methods = _per_call_units(model, learned)
        try:
            with _forked_rng(model), _traced_values_kept_out(model):  # draws made while tracing leave the
                gm, tracer = _trace_with_float_inputs(model, values, concrete, frozenset(opaque), frozenset(methods))
                volatile, why = _volatile(gm, tracer.speculated), "it comes out differently from draw to draw"
            if not volatile:
                _insert_speculation_checks(gm, tracer.speculated)
                if not hoist_speculation(gm):  # a check could not run before every state change
                    volatile = [decision for *_, decision in tracer.speculated]
                    why = "its check cannot run before the graph changes state (a draw or update comes first)"
        except _DecidesPerCall as exc:
            volatile, why = [Decision(exc.frame, exc.unit)], "it comes out differently from draw to draw"
        if not volatile:
            break
        before = set(learned)
        for decision in volatile:  # decides differently from draw to draw: runs per call, as written
            key = unit_key(model, decision.unit) if decision.unit is not None else None
            if key is None or key in before:
                raise CaptureError(
                    f"Python decides on a random draw made in forward at {decision.frame}, outside any method or "
                    f"submodule that could run per call, and {why}. Decide with tensor operations (multiply by "
                    "the sampled weight), move the decision into a method or submodule, or register an adapter "
                    "(topofx.adapters.register_adapter)")
            learned.add(key)
    gm.meta[DECIDED_PER_CALL] = sorted(
        {name for name, m in model.named_modules() if id(m) in opaque and name}
        | {unit_name(model, key) for key in learned if len(key) == 2})
    _hold_foreign_constants(gm)
    gm.meta[TRACED_MODULES] = [model, *dict.fromkeys(tracer.traced_modules)]
    gm.meta[SHAPE_DECISIONS] = tracer.shape_decisions
    gm.meta[READS] = tracer.reads
    gm.meta[VALUE_GUARD] = ValueGuard(gm, tracer.value_decisions) if tracer.value_decisions else None
    gm.meta[FLOAT_INPUTS] = tracer.float_inputs
    for node in gm.graph.nodes:
        for key in (REAL, FLOATS, AS_FLOAT):
            node.meta.pop(key, None)
    return gm


CONSTANT_FLOATS: "weakref.WeakKeyDictionary[nn.Module, set[tuple]]" = weakref.WeakKeyDictionary()
"""Per model: the locations (``FloatInput.key``) of floats whose captured graph did not follow them
(:func:`verify_float_inputs`); later traces keep them constants."""


def _trace_with_float_inputs(model: nn.Module, values: list[Any], concrete: dict[str, Any] | None,
                             opaque: frozenset[int], methods: frozenset[tuple[nn.Module, str]]
                             ) -> tuple[fx.GraphModule, "ValueTracer"]:
    """Trace with Python floats as constants; where the trace read floats (``topofx.float_inputs``), trace
    again with them as inputs, and again without those found used as numbers, until a trace uses every
    stand-in it installed as a tensor operand -- or none is left: then the first trace stands.  Each
    further trace leaves the modules' Python attributes as the first left them."""
    gm, tracer = _trace_once(model, values, concrete, opaque, methods)
    floats = _floats.candidates([model, *tracer.traced_modules], tracer.reads, _MODULE_FIELDS | {"training"},
                                _is_library_file, CONSTANT_FLOATS.get(model, set()))
    while floats:
        try:
            with _attributes_kept(model), _traced_values_kept_out(model):
                return_value = _trace_once(model, values, concrete, opaque, methods, floats)
        except Exception:  # noqa: BLE001 - a trace the stand-ins break: without the floats that decided
            return_value = None
        kept = [f for f in floats if not f.decides]
        if return_value is not None and len(kept) == len(floats):
            return return_value
        if len(kept) == len(floats):  # failed, no float named: constants all
            break
        floats = [_floats.FloatInput(f.read) for f in kept]
    return gm, tracer


@contextlib.contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Put back every module's attributes as they were (a forward that counts its calls counts one trace)."""
    before = [(m, dict(vars(m))) for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes in before:
            module.__dict__.clear()
            module.__dict__.update(attributes)


def _trace_once(model: nn.Module, values: list[Any], concrete: dict[str, Any] | None, opaque: frozenset[int],
                methods: frozenset[tuple[nn.Module, str]], floats: Sequence[_floats.FloatInput] = ()
                ) -> tuple[fx.GraphModule, "ValueTracer"]:
    tracer = ValueTracer(values, opaque, methods, floats)
    own = _attribute_names(model)
    proxies: dict[str, Any] = {}

    def read(qualified: str) -> Any:  # one get_attr node per held tensor, created where first read
        return proxies.get(qualified) or proxies.setdefault(qualified, tracer.create_proxy("get_attr", qualified, (), {}))

    with _loose_tensors_as_buffers(model, read) as (loose, held, install_held), \
            _stand_ins(model, tracer, floats) as install_floats, \
            ReadRecorder(_reads_nothing, lambda: tracer._evaluating) as recorder:
        tracer.before_forward = lambda: (install_held(), install_floats())  # type: ignore[method-assign]
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
            _specialize(graph, concrete or {})
            gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
        except (CaptureError, _DecidesPerCall):
            raise
        except Exception as exc:  # FX raises many kinds; name the user's line for all of them
            frame = user_frame(traceback.extract_tb(exc.__traceback__))
            at = f" at {frame}" if frame else ""
            raise CaptureError(f"cannot capture {type(model).__name__}{at}: {type(exc).__name__}: {exc}") from exc
        finally:  # FX keeps constants (and topofx its DistributionCall modules) on the root: take them off
            for name in _attribute_names(model) - own:
                delattr(model, name)
        for name in loose:
            _unbuffer(gm, name)
        read_by_graph = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        gm.meta[HELD] = [(target, module, path) for target, module, path in held if target in read_by_graph]
        for target, *_ in gm.meta[HELD]:
            _unbuffer(gm, target)
        attributes = [(q, model.get_submodule(q.rpartition(".")[0]), (("attr", q.rpartition(".")[2]),)) for q in loose]
        gm.meta[_tensors.TENSOR_INPUTS] = _tensors.read_by(gm, [*gm.meta[HELD], *attributes])
        tracer.float_inputs = _read_floats(gm, floats)
    traced = {id(m) for m in (model, *tracer.traced_modules)}
    tracer.reads = recorder.reads(skip=lambda root, steps: id(root) in traced and len(steps) == 1
                              and steps[0][1] in vars(root))  # a traced module's own attribute: guards.py
    return gm, tracer


@contextlib.contextmanager
def _stand_ins(model: nn.Module, tracer: "ValueTracer", floats: Sequence[_floats.FloatInput]) -> Iterator[Callable[[], None]]:
    """While tracing, each float of ``floats`` is read, where forward reads it, as a :class:`FloatValue`
    of a ``get_attr`` of its 0-dim tensor (``topofx_float_<k>``, a buffer of the model for the trace's
    duration); the floats are put back on exit.  Yields the step that installs them once the graph exists."""
    for k, float_input in enumerate(floats):
        float_input.target = _free_name(model, f"topofx_float_{k}")
        model.register_buffer(float_input.target, float_input.tensor(), persistent=False)

    def install() -> None:
        for float_input in floats:
            proxy = tracer.create_proxy("get_attr", float_input.target, (), {})
            proxy.node.meta[FLOATS], proxy.node.meta[AS_FLOAT] = frozenset([float_input]), float_input.last
            float_input.install(FloatValue(proxy.node, tracer))
    try:
        yield install
    finally:
        for float_input in floats:
            float_input.install(float_input.last)


def _free_name(model: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first name ``model`` holds nothing under."""
    names, name, n = _attribute_names(model), base, 1
    while name in names:
        name, n = f"{base}_{n}", n + 1
    return name


def _read_floats(gm: fx.GraphModule, floats: Sequence[_floats.FloatInput]) -> list[_floats.FloatInput]:
    """The floats the graph reads (their tensors become plain attributes of ``gm``, which ``.to()`` leaves
    on the CPU); the stand-ins no operation used are erased."""
    read = []
    for node in list(gm.graph.nodes):
        float_input = next((f for f in floats if node.op == "get_attr" and node.target == f.target), None)
        if float_input is None:
            continue
        _unbuffer(gm, node.target)
        if node.users:
            read.append(float_input)
        else:
            gm.graph.erase_node(node)
            delattr(gm, node.target)
    if len(read) < len(floats):
        gm.recompile()
    return read


SPECULATION = "topofx_speculation"  # GraphModule.meta key: the Decision of each speculation check, by index
RESAMPLES = 4  # fresh draws a speculated decision must survive at capture


class StoresTracedValues(CaptureError):
    """Forward stored traced values in module attributes (``self.flops = self.size * x.size(2) ** 2`` on a
    first call): the trace ran the user's Python on the real modules, and the model was restored."""

    def __init__(self, where: list[str]):
        self.where = where
        super().__init__(
            f"forward stores values computed while tracing in {', '.join(where[:4])}"
            f"{' and %d more' % (len(where) - 4) if len(where) > 4 else ''}, even after one eager warm-up call; "
            "a graph cannot replay Python state. Compute such values once, outside forward, or keep them as "
            "tensors (buffers)")


def _holds_proxy(value: Any, depth: int = 0) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if type(value) in (list, tuple) and depth < 2:
        return any(_holds_proxy(v, depth + 1) for v in value)
    if type(value) is dict and depth < 2:
        return any(_holds_proxy(v, depth + 1) for v in value.values())
    return False


@contextlib.contextmanager
def _traced_values_kept_out(model: nn.Module) -> Iterator[None]:
    """Raise :class:`StoresTracedValues` when the trace left traced values in module attributes, after
    putting back every attribute the trace changed (Python state the forward writes, ``got_flops = True``
    included: eagerly it is written with real values)."""
    before = [(m, dict(vars(m))) for m in model.modules()]
    yield
    where = [f"{type(m).__name__}.{k}" for m, _ in before for k, v in vars(m).items() if _holds_proxy(v)]
    if where:
        for module, attributes in before:
            module.__dict__.clear()
            module.__dict__.update(attributes)
        raise StoresTracedValues(sorted(set(where)))


class SpeculationFailed(RuntimeError):
    """A decision forward took on a random draw came out differently on this call than at capture."""

    def __init__(self, index: int):
        super().__init__(f"speculated decision {index} does not hold for this call's draw")
        self.index = index


def speculation_check(value: Any, expected: Any, index: int) -> None:
    """Graph node: raise :class:`SpeculationFailed` when this call's draw decides otherwise."""
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            return
        value = value.tolist() if isinstance(expected, (list, tuple)) else type(expected)(value)
    if not _same(value, expected):
        raise SpeculationFailed(index)


fx.node._side_effectful_functions.add(speculation_check)


@contextlib.contextmanager
def _forked_rng(model: nn.Module) -> Iterator[None]:
    devices = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
    with torch.random.fork_rng(devices=devices):
        yield


def _volatile(gm: fx.GraphModule, speculated: list) -> list[Decision]:
    """Speculated decisions that come out differently on fresh draws (a hard sample's ``abs(w) > 0``),
    as opposed to ones that hold on every draw (a Dirichlet weight is never exactly 0)."""
    if not speculated:
        return []
    guard = ValueGuard(gm, speculated)
    changed: dict[int, Decision] = {}
    for _ in range(RESAMPLES):
        for decision in guard.changed(gm):
            changed.setdefault(id(decision), decision)
    return list(changed.values())


def _insert_speculation_checks(gm: fx.GraphModule, speculated: list) -> None:
    """After each decision on a draw, a node that checks, per call, that it comes out as at capture."""
    for index, (node, _, expected, _) in enumerate(speculated):
        with gm.graph.inserting_after(node):
            check = gm.graph.call_function(speculation_check, (node, expected, index))
        check.meta[VALUE], check.meta[STATIC] = None, False
    gm.meta[SPECULATION] = [decision for *_, decision in speculated]
    if speculated:
        gm.recompile()


def hoist_speculation(gm: fx.GraphModule) -> bool:
    """Move the speculation checks and everything they depend on (the sampling: architecture values and
    draws, never the inputs) to the front of the graph, so that a failed check leaves no trace but the
    RNG's (restored by the caller).  ``False``, graph untouched, when that would reorder random draws or
    an in-place update (``rewrite.Effects``)."""
    from .rewrite import Effects  # rewrite imports this module

    checks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is speculation_check]
    if not checks:
        return True
    front = set(computed_by(checks))
    nodes = list(gm.graph.nodes)
    output = nodes[-1]
    order = ([n for n in nodes if n.op == "placeholder"] + [n for n in nodes if n in front and n.op != "placeholder"]
             + [n for n in nodes[:-1] if n not in front and n.op != "placeholder"] + [output])
    position = {n: i for i, n in enumerate(order)}
    if any(position[a] > position[b] for a, b in Effects.of(gm).order_edges(set(nodes), gm)):
        return False
    prev = gm.graph._root
    for node in order:
        prev.append(node)
        prev = node
    gm.recompile()
    return True


def _hold_foreign_constants(gm: fx.GraphModule) -> None:
    """Python values of foreign number types in the graph (a numpy scalar computed at capture from
    ``.tolist()`` of the alphas) are read from attributes: the generated code cannot name their types."""
    held: dict[int, fx.Node] = {}

    def hold(x: Any) -> Any:
        if isinstance(x, (int, float, complex, str)) and type(x).__module__ != "builtins" or type(x).__module__ == "numpy":
            if id(x) not in held:
                name = f"topofx_constant_{len(held)}"
                setattr(gm, name, x)
                with gm.graph.inserting_before(next(iter(gm.graph.nodes))), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # FX expects tensors or modules behind get_attr
                    held[id(x)] = gm.graph.get_attr(name)
            return held[id(x)]
        return x

    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            node.args, node.kwargs = fx.node.map_aggregate(node.args, hold), fx.node.map_aggregate(node.kwargs, hold)
    if held:
        gm.recompile()


def _attribute_names(module: nn.Module) -> set[str]:
    return {*vars(module), *module._parameters, *module._buffers, *module._modules}


def fingerprint(gm: fx.GraphModule) -> tuple:
    """What a trace decided: its code and the values of its Python decisions (a baked batch size
    may leave the code unchanged, e.g. inside a constant)."""
    guard = gm.meta.get(VALUE_GUARD)
    return (gm.code, tuple(repr(v) for _, v in gm.meta.get(SHAPE_DECISIONS, ())),
            tuple(repr(expected) for _, expected, _ in (guard.checks if guard else ())))


def _unbuffer(gm: fx.GraphModule, qualified: str) -> None:
    """Turn a graph-module buffer back into a plain attribute (the same tensor object), so that
    ``.to()``/``.double()`` on the simplified module leave it alone, as they do on the original."""
    *path, name = qualified.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return
    if isinstance(owner, nn.Module) and name in owner._buffers:
        object.__setattr__(owner, name, owner._buffers.pop(name))


def capture(
    model: nn.Module, example_inputs: Sequence[Any], *, strict: bool = False, verify: bool = True,
    live_attrs: Sequence[str] = (), stacklevel: int = 3,
) -> Capture:
    """Capture ``model``; on failure raise (``strict``) or warn and return an eager fallback.

    ``live_attrs`` name tensor attributes that are set anew before every call (an adapter's
    samples): they may carry autograd history.  ``stacklevel`` locates the warning at the user's call.
    """
    try:
        warmed = False
        while True:
            try:
                gm = trace(model, example_inputs)
            except StoresTracedValues:  # a first call stores Python state: make it eagerly, then trace
                if warmed:
                    raise
                warmed = True
                with preserved_state(model), torch.no_grad():
                    run_seeded(model, example_inputs)
                continue
            try:
                if verify:
                    verify_capture(model, gm, example_inputs, live_attrs=live_attrs)
                    verify_float_inputs(model, gm, example_inputs)
                return Capture(gm)
            except FloatsNotFollowed as failed:  # keep them constants, guarded
                CONSTANT_FLOATS.setdefault(model, set()).update(f.key for f in failed.floats)
            except SpeculationFailed as failed:  # a decision on draws changed after all: run it per call
                decision = gm.meta[SPECULATION][failed.index]
                key = unit_key(model, decision.unit) if decision.unit is not None else None
                if key is None or key in PER_CALL.get(model, ()):
                    raise CaptureError(
                        f"a decision on a random draw at {decision.frame} held on {RESAMPLES} fresh draws at "
                        "capture but not on the verification's draw, outside any method or submodule that could "
                        "run per call. Decide with tensor operations, or move the decision into a method or "
                        "submodule") from None
                PER_CALL.setdefault(model, set()).add(key)
    except CaptureError as exc:
        if strict:
            raise
        warnings.warn(
            f"topofx: {exc}. Falling back to the model's own eager forward (per-candidate ops unchanged); "
            "no rewrite is applied to this network.",
            stacklevel=stacklevel,
        )
        return Capture(None, str(exc))


# ---------------------------------------------------------------------------------------------
# self-verification
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_state(*modules: nn.Module, tensors: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Restore parameters, buffers, extra tensors, their grads and the RNG state on exit."""
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            seen[id(t)] = t
    for t in tensors:
        seen[id(t)] = t
    saved = [(t, t.detach().clone(), t.grad) for t in seen.values()]
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value, grad in saved:
                restore_value(t, value)
                t.grad = grad
        torch.set_rng_state(rng)


def restore_value(t: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``t`` where they differ.  An unchanged tensor is left alone: an in-place copy
    would move its version counter, and a tensor computed from it before the call (an optimizer's
    sample, ``topofx.tensor_inputs``) could no longer backpropagate through it."""
    if not torch.equal(t, value):
        t.copy_(value)


def _float_leaves(out: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    fx.node.map_aggregate(out, lambda x: leaves.append(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else None)
    return leaves


def max_rel_error(a: Any, b: Any) -> float:
    """Largest relative difference between the floating tensors of two output structures.

    Relative to ``max(max|b|, 1e-6)``: a tensor that is pure rounding noise (a sampled architecture
    that zeroes a whole cell gives features of ~1e-11) is compared absolutely.
    """
    la, lb = _float_leaves(a), _float_leaves(b)
    if len(la) != len(lb):
        return math.inf
    err = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return math.inf
        scale = max(y.detach().abs().max().item(), 1e-6) if y.numel() else 1.0
        err = max(err, ((x.detach() - y.detach()).abs().max().item() / scale) if x.numel() else 0.0)
    return err


def graph_attr_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Tensors the graph reads with ``get_attr`` that require grad (architecture weights and such)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor) and obj.requires_grad:
                out.append(obj)
    return out


def run_seeded(module: nn.Module, inputs: Sequence[Any], seed: int = 0) -> Any:
    """Run ``module`` from a fixed RNG state (random draws inside forward line up across runs)."""
    torch.manual_seed(seed)
    return module(*inputs)


def verify_capture(
    model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[Any], rtol: float = 1e-5,
    live_attrs: Sequence[str] = (),
) -> None:
    """Check a captured graph before trusting it; raise :class:`CaptureError` on any failure.  Its tensor
    inputs (``topofx.tensor_inputs``) are leaf aliases of themselves meanwhile."""
    with _tensors.as_leaves(gm):
        _verify(model, gm, example_inputs, rtol, live_attrs)


def _verify(model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[Any], rtol: float,
            live_attrs: Sequence[str]) -> None:
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in live_attrs:
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
                frame = node.meta.get("topofx_user_frame")
                raise CaptureError(
                    f"a tensor with autograd history that no module holds (a global, a closure, or computed in "
                    f"forward from one) was frozen into the graph ({node.target}"
                    f"{', used at ' + str(frame) if frame else ''}). Store it on a module (then the graph reads the "
                    "one stored for each call), or compute it inside forward() from the model's parameters, buffers "
                    "or the tensors its modules hold"
                )
    attrs = [t for t in graph_attr_tensors(gm) if not any(t is getattr(gm, n, None) for n in live_attrs)]
    with preserved_state(model, tensors=attrs):
        eager = run_seeded(model, example_inputs)
    with preserved_state(model, tensors=attrs):
        graphed = run_seeded(gm, example_inputs)
    err = max_rel_error(graphed, eager)
    if not err <= rtol:
        raise CaptureError(f"captured graph disagrees with eager forward (max relative error {err:.2e})")
    if attrs:
        with preserved_state(model, tensors=attrs), torch.no_grad(), _perturbed(attrs):
            eager2 = run_seeded(model, example_inputs)
            with preserved_state(model):
                graphed2 = run_seeded(gm, example_inputs)
            guard = gm.meta.get(VALUE_GUARD)
            decided_alike = guard is None or not guard.changed(model)  # else the graph is captured anew
        if decided_alike and not max_rel_error(graphed2, eager2) <= rtol:
            raise CaptureError("captured graph does not follow the architecture weights (they were frozen as constants)")
    resample = getattr(model, "resample", None)  # an adapter's sampling step, run before every call
    state = [*dict.fromkeys([*model.parameters(), *attrs, *model.buffers()])]
    if not live_attrs:  # backward too: a capture that changes it (a custom Function traced through) is caught
        with preserved_state(model, tensors=attrs):
            expected = _step(model, example_inputs, state)
        with preserved_state(model, tensors=attrs):
            got = _step(gm, example_inputs, state)
        grads = [w for name, w in expected if name == "gradient" and w is not None and w.numel()]
        scale = max((g.abs().max().item() for g in grads), default=0.0)  # an analytically zero gradient (a conv
        for (name, want), (_, have) in zip(expected, got):  # before a BN under `.sum()`) holds only float noise
            if not _close(have, want, rtol, scale if name == "gradient" else 0.0):
                raise CaptureError(f"captured graph's training step disagrees with eager forward+backward: the "
                                   f"{name} of a {tuple(want.shape) if want is not None else tuple(have.shape)} tensor "
                                   "differs (an operation whose backward is not its forward's autograd?)")
    with preserved_state(model, tensors=attrs):
        for _ in range(1 if not live_attrs else 2):  # forward+backward works twice (once above)
            if live_attrs and callable(resample):
                resample(gm)
            _backward(run_seeded(gm, example_inputs))


@contextlib.contextmanager
def _perturbed(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Each tensor holds other values (random, fixed seed) while the block runs: new storage through
    ``.data``, put back after, so no version counter moves (a tensor sampled from an alpha before the
    call, ``topofx.tensor_inputs``, can still backpropagate into it)."""
    gen = torch.Generator().manual_seed(1234)
    originals = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data + torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) * 0.5
        yield
    finally:
        for t, data in zip(tensors, originals):
            t.data = data


class FloatsNotFollowed(CaptureError):
    """The captured graph does not follow its float inputs: they are to stay constants."""

    def __init__(self, floats: list, err: float):
        super().__init__(f"the captured graph does not follow {', '.join(f.where for f in floats)} "
                         f"(max relative error {err:.2e} at other values)")
        self.floats = floats


def verify_float_inputs(model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[Any], rtol: float = 1e-5) -> None:
    """Run the graph against the eager model with every float input set to another value
    (:func:`topofx.float_inputs.perturbed`); raise :class:`FloatsNotFollowed` unless they agree (a
    stand-in took forward down another Python path than the float would, unseen by the trace)."""
    floats = gm.meta.get(FLOAT_INPUTS)
    if not floats:
        return
    attrs = graph_attr_tensors(gm)
    captured = [f.last for f in floats]
    try:
        for float_input in floats:
            float_input.install(_floats.perturbed(float_input.last))
            float_input.refresh(gm)
        with preserved_state(model, tensors=attrs):
            eager = run_seeded(model, example_inputs)
        with preserved_state(model, tensors=attrs):
            err = max_rel_error(run_seeded(gm, example_inputs), eager)
    except Exception:  # noqa: BLE001 - the model rejects other values: it depends on them otherwise
        err = math.inf
    finally:
        for float_input, value in zip(floats, captured):
            float_input.install(value)
            float_input.refresh(gm)
    if not err <= rtol:
        raise FloatsNotFollowed(floats, err)


def _backward(out: Any) -> None:
    leaves = _float_leaves(out)
    loss = sum(leaf.float().sum() for leaf in leaves if leaf.requires_grad)
    if isinstance(loss, torch.Tensor):
        loss.backward()


def _step(module: nn.Module, inputs: Sequence[Any], state: list[torch.Tensor]) -> list[tuple[str, Any]]:
    """One seeded forward+backward from cleared grads: every tensor's gradient, and every buffer after it."""
    for t in state:
        t.grad = None
    _backward(run_seeded(module, inputs))
    return [("gradient", t.grad) if t.requires_grad else ("value after the step", t.detach().clone()) for t in state]


def _close(have: torch.Tensor | None, want: torch.Tensor | None, rtol: float, floor: float = 0.0) -> bool:
    """Equal up to float noise, at the scale of the larger tensor (at least ``floor``: the model's largest
    gradient, for gradients); a missing gradient equals zeros."""
    if have is None or want is None:
        present = want if have is None else have
        return present is None or not present.numel() or not present.abs().max().item() > 10 * rtol * floor
    if have.shape != want.shape:
        return False
    if not want.is_floating_point():
        return torch.equal(have, want)
    scale = max(want.abs().max().item(), have.abs().max().item(), floor, 1e-6) if want.numel() else 1.0
    return not ((have - want).abs().max().item() > 10 * rtol * scale) if want.numel() else True
