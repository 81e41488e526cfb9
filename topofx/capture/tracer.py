""":class:`ValueTracer`: a ``torch.fx.Tracer`` that runs every node on meta tensors as it records it, so
the user's Python gets what it gets eagerly: a tensor for type checks, a shape for ``len``/``size``,
a Python number where one is needed and can be fixed (shapes, architecture values, speculated draws),
and a :class:`~topofx.capture.CaptureError` naming the line where it cannot."""
from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
import sys
import warnings
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..ir import (
    AS_FLOAT,
    DECIDED_VALUE,
    DRAWN,
    FLOATS,
    FROM_INPUT,
    LEGACY_TYPE,
    REAL,
    STATIC,
    UNKNOWN,
    VALUE,
    contains_unknown,
    draws,
    flat,
    host_generators,
    host_rng_changed,
    host_rng_state,
    meta_values,
    on_meta_device,
    run_on_meta,
    set_host_rng_state,
    to_meta,
)
from . import float_inputs as _floats
from . import gating as _gating
from . import tensor_inputs as _tensors
from .decisions import Decision, _DecidesPerCall
from .frames import _TORCH_DIR, CaptureError, _code_at, _is_library_file, _where, user_frame
from .held import _free_name
from .host_random import draws_reported
from .reads import Read
from .values import (
    AppliedFunction,
    DistributionCall,
    FloatValue,
    MethodCall,
    TracedValue,
    _RecordedMethod,
    _unwatched,
    closure_cells,
)

if TYPE_CHECKING:
    from .decisions import Unit
    from .frames import UserFrame


REAL_NUMEL = 1 << 16  # attributes up to this size get real values while tracing (architecture weights are small)


_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}


_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "get_device"}


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


def _float_inputs_in(a: Any) -> frozenset:
    """The float inputs (their stand-ins) that the traced values among ``a`` are computed from."""
    found: frozenset = frozenset()
    for x in flat(a):
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
    return x.node.meta[AS_FLOAT] if _is_number(x) else meta_values(x)


def _on_meta(kind: str, target: Any, args: Any, kwargs: Any) -> Any:
    """One operation on meta values (``UNKNOWN`` where it fails: eager would need real numbers)."""
    if kind == "call_module" or contains_unknown((args, kwargs)):
        return UNKNOWN
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "call_function":
                return on_meta_device(target, args, kwargs)
            return getattr(args[0], target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - not computable on meta: not an input then
        return UNKNOWN


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


_DATA_METHODS = {"item", "tolist", "numpy", "__bool__", "nonzero"}


_TO_PYTHON = {"item": lambda v: v.item(), "tolist": lambda v: v.tolist(), "numpy": lambda v: v.numpy()}


_LEGACY_CONSTRUCTORS = [n for n in dir(torch) if n.endswith("Tensor") and n != "Tensor" and isinstance(getattr(torch, n), LEGACY_TYPE)]


_ALWAYS_RECORDED = ["rand", "randn", "randint", "randperm", "empty"]  # fresh random or uninitialized tensors


def _called_by_user() -> bool:
    """Whether the torch call being dispatched comes from the user's code -- directly, or through a
    torch Python function dispatching itself (``F.dropout``); not from torch's own code on the user's
    behalf (a module built in forward initializing its weight)."""
    frame = sys._getframe(2)  # past this function and the mode's __torch_function__: the caller
    if frame.f_code.co_filename == torch.overrides.__file__:  # handle_torch_function, in the dispatching function
        frame = frame.f_back.f_back if frame.f_back is not None else None
    return frame is not None and not _is_library_file(frame.f_code.co_filename)


def _rng_states() -> list[torch.Tensor]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return [torch.default_generator.get_state(), *cuda]


class _UserTorchCalls(torch.overrides.TorchFunctionMode):
    """While tracing, the torch functions the user's code calls however it reached them (``from torch
    import rand``, a factory kept in a dict): one given a traced value is recorded as FX records it
    without the mode; the random and uninitialized factories (:data:`_ALWAYS_RECORDED`) become graph
    nodes, drawn per call; any other call runs as is, and one that draws random numbers for real -- on
    a tensor made at capture, which the graph would hold as a constant, drawn once -- is refused naming
    its line.  (``torch.<name>`` itself stays patched while tracing,
    :meth:`ValueTracer._recording_factories`: that wrapper sees sizes passed one by one, which torch's
    argument parser refuses, or turns into fixed numbers, before any mode is asked.)"""

    def __init__(self, tracer: "ValueTracer"):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.tracer._evaluating or not _called_by_user():
            return func(*args, **kwargs)
        if any(isinstance(a, fx.Proxy) for a in flat((args, kwargs))):
            return fx.Proxy.__torch_function__(func, types, args, kwargs)
        if func in _RECORDED_FUNCTIONS:
            return self.tracer.create_proxy("call_function", func, args, kwargs)
        before = _rng_states()
        result = func(*args, **kwargs)
        if not all(map(torch.equal, before, _rng_states())):
            raise CaptureError(_where(
                f"a random draw ({getattr(func, '__name__', func)}) on a tensor made at capture, which the graph "
                "would hold as a constant drawn once",
                "Make the tensor from the inputs (x.new_empty(n, 1, 1, 1), torch.empty(x.size(0), ...)) so it is "
                "drawn on every call"))
        return result


_RECORDED_FUNCTIONS = frozenset(getattr(torch, n) for n in _ALWAYS_RECORDED)


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
    if tracer is not None and not tracer._evaluating and any(isinstance(a, fx.Proxy) for a in flat((args, kwargs))):
        return _TracedDistribution(tracer, cls, args, kwargs)
    return object.__new__(cls)


_REGISTRATIONS = [0]  # parameters, buffers and submodules registered anywhere: ValueTracer's name index is stale


def _count_registration(module: nn.Module, name: str, value: Any) -> None:
    _REGISTRATIONS[0] += 1


for _register in (nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook,
                  nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


class ValueTracer(fx.Tracer):
    """FX tracer that propagates meta-tensor values through every node (see module docstring).

    Besides shapes it keeps, for small tensors computed from the model's attributes only (the
    architecture weights and what forward derives from them, never from the inputs or a random
    draw), their real values: a Python decision on such a value (``if w != 0``, ``.tolist()``) is
    taken at capture and recorded in a :class:`ValueGuard`, which asks for a new capture when it changes.
    """

    def __init__(self, example_inputs: Sequence[Any], opaque: frozenset[int] = frozenset(),
                 opaque_methods: frozenset[tuple[nn.Module, str]] = frozenset(),
                 floats: Sequence[_floats.FloatInput] = (), gated: frozenset = frozenset()):
        super().__init__(param_shapes_constant=False)
        self.floats = floats  # Python floats read through stand-ins, as graph inputs (topofx.capture.float_inputs)
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
        self.gated = gated  # ids of modules and (id(owner), method name) whose decisions on draws become gates
        self.gate_windows: list[_gating.Window] = []  # topofx.capture.gating
        self._window: _gating.Window | None = None  # the open one
        self.gate_taken = True  # how gate decisions come out (False: a probe of the other arms)
        self.reads: list[Read] = []  # Python values read outside the traced modules' attributes (topofx.capture.reads)
        self.attributes_read: frozenset[str] | None = None  # names the traced code reads attributes under (None: any)
        self._names: tuple[int, dict[int, str], dict[int, str]] | None = None  # see _registered_name

    _evaluating = False  # True while a leaf module runs on meta tensors: no recording then
    _generators: list = []  # the host generators forward may draw from (ir.host_generators; set by trace)

    before_forward: Callable[[], None] = staticmethod(lambda: None)  # type: ignore[assignment]  # once the graph exists

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return TracedValue(node, self)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        self.before_forward()
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    def trace(self, root, concrete_args=None):  # type: ignore[override]
        with self._recording_factories(), self._recording_methods(), _UserTorchCalls(self), \
                draws_reported(self._host_draw):
            self._generators = host_generators(root)
            before = host_rng_state(generators=self._generators)
            graph = super().trace(root, concrete_args)
            if host_rng_changed(before):  # by a name bound before tracing: no report came
                raise CaptureError(
                    f"forward of {type(root).__name__} ({_code_at(type(root).forward)}) draws from Python's or "
                    "NumPy's random generators, which a graph cannot draw anew (it would repeat the value drawn "
                    "while tracing on every call). Draw with torch (torch.randint, torch.multinomial: the graph "
                    "draws per call), move the draw into a method or submodule (which then runs per call), or draw "
                    "outside forward and store the choice on the model (compared before each call)")
            return graph

    def _host_draw(self, name: str) -> None:
        """Traced code draws from Python's or NumPy's generator (``topofx.capture.host_random``): the graph
        cannot draw it anew, so the method or submodule around the draw runs per call, else the line is named."""
        if self._evaluating:
            return
        unit = self._deciding_unit()
        if unit is not None:
            raise _DecidesPerCall(unit, user_frame())
        raise CaptureError(_where(
            f"forward draws from {name}, which a graph cannot draw anew (it would repeat the value drawn while "
            "tracing on every call)", "Draw with torch (torch.randint, torch.multinomial: the graph draws per "
            "call), move the draw into a method or submodule (which then runs per call), or draw outside forward "
            "and store the choice on the model (compared before each call)"))

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
        return self.create_proxy("call_module", self._held_on_root("topofx_method", MethodCall(owner, name)),
                                 (args, kwargs), {})

    def _held_on_root(self, prefix: str, module: nn.Module) -> str:
        """The name ``<prefix>_<k>`` a module of topofx's that a node calls is held under on the root while
        tracing: a plain attribute, not a registered child, so that the root's children stay as they are
        while its forward runs (an ``nn.Sequential`` root iterates them: registering one raised "dictionary
        changed size during iteration").  ``fx.GraphModule`` registers it on the graph's module; the trace's
        clean-up takes it off the root with FX's constants."""
        k = sum(isinstance(held, type(module)) for held in vars(self.root).values())
        target = _free_name(self.root, f"{prefix}_{k}")
        object.__setattr__(self.root, target, module)
        return target

    def _applied_function(self, function: type, args: tuple, kwargs: dict) -> Any:
        """One :class:`AppliedFunction` node for ``function.apply(*args, **kwargs)``; the arguments FX
        cannot write into a graph are held by the node's module."""
        held = {k: a for k, a in (*enumerate(args), *kwargs.items()) if not self._in_graph(a)}
        for a in held.values():  # held as captured, a traced value in it would be a stale proxy at every call
            if any(isinstance(leaf, fx.Proxy) for leaf in flat(a)):
                raise CaptureError(_where(
                    f"a custom autograd Function's apply is given a value computed in forward inside a "
                    f"{type(a).__name__} that also holds what a graph cannot (a function, an object)",
                    "Pass the tensors to apply as arguments of their own"))
            for cell in closure_cells(a):
                self._resolve_closed_over(cell)
        target = self._held_on_root("topofx_function", AppliedFunction(function, held))
        return self.create_proxy("call_module", target, tuple(a for i, a in enumerate(args) if i not in held),
                                 {k: v for k, v in kwargs.items() if k not in held})

    def _resolve_closed_over(self, cell: Any) -> None:
        """A held function made in forward closes over what forward had (ProxylessNAS's backward closure
        over ``self.AP_path_wb``): a stand-in for one of the model's own tensors (a ``get_attr``) becomes
        that tensor -- the object eager code closes over on every call; a value computed in forward is
        refused (the held function would read a stale stand-in at every call)."""
        value = cell.cell_contents
        if not isinstance(value, fx.Proxy):
            return
        if value.node.op != "get_attr":
            raise CaptureError(_where(
                "a custom autograd Function's apply is given a function that closes over a value computed in "
                "forward", "Pass that value to apply as an argument of its own"))
        cell.cell_contents = self._attribute(value.node.target)

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

        return all(writable(leaf) for leaf in flat(a))

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
                    isinstance(a, fx.Proxy) for a in flat((args, kwargs))):
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
        target = self._held_on_root("topofx_distribution", DistributionCall(dist._cls, name))
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
        before = host_rng_state(generators=self._generators)
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._within.pop()
        if host_rng_changed(before):  # a host draw no patched function reported
            raise _DecidesPerCall(m, _code_at(type(m).forward))
        return out

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.opaque or super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # type: ignore[override]
        """FX's ``getattr``, with the registered name of a tensor attribute looked up by identity in an index of
        the root's parameters and buffers instead of a walk over the whole module tree on every read: a forward
        traced through that reads ``self.weight`` (NNI's mixed operations: every conv and BN of a supernet) made
        each trace quadratic in the number of modules. The index is built once per trace and anew after any
        registration (torch's global hooks); a name that no longer holds the tensor, or a tensor it lacks,
        takes FX's walk, so the node is the one FX records."""
        if self._evaluating:
            return attr_val
        if isinstance(attr_val, torch.Tensor):
            name = self._registered_name(attr_val)
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _registered_name(self, tensor: torch.Tensor) -> str | None:
        """The name FX's ``getattr`` gives ``tensor`` (the first in ``named_parameters()`` for a parameter, in
        ``named_buffers()`` for any tensor), verified to still hold it; ``None`` where FX must search."""
        index = self._names
        if index is None or index[0] != _REGISTRATIONS[0]:
            parameters: dict[int, str] = {}
            buffers: dict[int, str] = {}
            for name, p in self.root.named_parameters():
                parameters.setdefault(id(p), name)
            for name, b in self.root.named_buffers():
                buffers.setdefault(id(b), name)
            index = self._names = (_REGISTRATIONS[0], parameters, buffers)
        _, parameters, buffers = index
        if isinstance(tensor, nn.Parameter):
            name = parameters.get(id(tensor))
            field = "_parameters"
        elif self.proxy_buffer_attributes:
            name = buffers.get(id(tensor))
            field = "_buffers"
        else:
            return None
        if name is None:
            return None
        owner, _, leaf = name.rpartition(".")
        try:
            held = getattr(self.root.get_submodule(owner), field).get(leaf)
        except AttributeError:
            held = None
        if held is not tensor:
            self._names = None
            return None
        return name

    def _run_on_meta(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        """``target`` run on meta tensors for its output's meta; a module or method run per call may draw
        from host generators here: their states are put back (the graph draws when it runs)."""
        self._evaluating = True
        host = host_rng_state(generators=self._generators)
        try:
            return run_on_meta(self.root, kind, target, args, kwargs)
        finally:
            self._evaluating = False
            if host_rng_changed(host):
                set_host_rng_state(host)

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
        if any(map(_is_number, flat((args, kwargs)))):  # (a tensor computed from floats is what eager has)
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
            value, static = to_meta(next(self._examples, UNKNOWN)), False
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
        if self._window is not None:
            self._window.spanned.append(node)
            if self._window.active():
                self._window.nodes.append(node)
        real = self._real(node, kind, target, args, kwargs)
        if real is not None:
            node.meta[REAL] = real
            if value is UNKNOWN and isinstance(real, torch.Tensor):
                self._shape_from_real(proxy, real)
        frame = user_frame()
        if frame is not None:
            node.meta["topofx_user_frame"] = frame
        if kind == "call_method" and target in _TO_PYTHON:  # Python needs the number(s), unless an
            source = node.args[0]  # `.item()` of data only feeds arithmetic: then it stays a graph op
            per_call = source.meta.get(DRAWN) and not source.meta.get(FROM_INPUT)
            if target != "item" or per_call or source.meta.get(REAL) is not None:
                return self.concrete(proxy, lambda v: v, f"the values of `.{target}()`")
        return proxy

    def _shape_from_real(self, proxy: fx.Proxy, real: torch.Tensor) -> None:
        """An op with no meta run whose real value is known (a custom Function whose forward needs Python
        numbers, ``int(w.argmax())``): its shape is that value's, taken as a decision -- guarded, or
        speculated where it is drawn -- so that every later use of the shape (iteration, mixed edges,
        rewrites) holds on the calls that run the graph."""
        self.concrete(proxy.size(), tuple, "the shape of an opaque call's output")
        proxy.node.meta[VALUE] = proxy.node.meta[DECIDED_VALUE] = to_meta(real)

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
        self._window = None  # a decision on values closes the open gate window
        if convert is bool and self.gated and node.meta.get(DRAWN) and not node.meta.get(FROM_INPUT):
            window = self._open_gate(node)
            if window is not None:
                return self.gate_taken
        source = node.args[0] if node.op == "call_method" and node.target in _TO_PYTHON else node
        real = source.meta.get(REAL) if isinstance(source, fx.Node) else None
        if real is not None:  # architecture values (guarded) or a draw made in forward (speculated)
            result = convert(_TO_PYTHON[node.target](real) if source is not node else real)
            decisions = self.speculated if node.meta.get(DRAWN) else self.value_decisions
            decisions.append((node, convert, result, Decision(user_frame(), self._deciding_unit())))
            return result
        if node.meta.get(DRAWN) and not node.meta.get(FROM_INPUT) and (unit := self._deciding_unit()) is not None:
            raise _DecidesPerCall(unit, user_frame(), convert is bool and _gating.weight_element(node) is not None)
        raise CaptureError(_where(*self._why_not_concrete(node, what)))

    def _open_gate(self, node: fx.Node) -> "_gating.Window | None":
        """At a decision on one element of a draw inside a gated unit: take it as taken and record what
        follows (``topofx.capture.gating``); None where the decision is not of that shape."""
        weight = _gating.weight_element(node)
        unit = self._deciding_unit() if weight is not None else None
        owner = unit if not isinstance(unit, tuple) else (id(unit[0]), unit[1])
        if unit is None or (id(owner) if isinstance(owner, nn.Module) else owner) not in self.gated:
            return None
        frame = _gating.deciding_frame()
        if frame is None:
            return None
        self._window = _gating.Window(node, weight, frame, Decision(user_frame(), unit))
        self.gate_windows.append(self._window)
        return self._window

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
            graphed = _on_meta(kind, target, meta_values(args), meta_values(kwargs))
        finally:
            self._evaluating = False
        if _acceptable(eager, graphed):
            return kind, target, args, kwargs, eager
        for number in filter(_is_number, flat((args, kwargs))):  # (tensors computed from floats were checked)
            for float_input in number.node.meta[FLOATS]:
                float_input.decides = True
        args, kwargs = fx.node.map_aggregate(args, _as_number), fx.node.map_aggregate(kwargs, _as_number)
        if kind == "call_module" or any(isinstance(a, fx.Proxy) for a in flat((args, kwargs))):
            return kind, target, args, kwargs, UNKNOWN
        return target(*args, **kwargs) if kind == "call_function" else getattr(args[0], target)(*args[1:], **kwargs)

    def _note_shape_decision(self, obj: fx.Proxy, value: Any) -> None:
        """A Python decision on a value computed from the inputs' shapes holds for those shapes only."""
        if obj.node.meta.get(FROM_INPUT):
            self.shape_decisions.append((user_frame(), value))

    def length(self, obj: fx.Proxy) -> int:
        """``len()`` of a traced value: from its shape (a shape decision where the shape comes from the
        inputs), else -- an opaque call's output, a custom Function's -- a number like any other: from
        the real value of architecture-only data (a value decision, guarded), or of a draw (speculated)."""
        value = obj.node.meta.get(VALUE, UNKNOWN)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            self._note_shape_decision(obj, value.shape[0])
            return value.shape[0]
        if isinstance(value, (tuple, list, torch.Size)):
            return len(value)
        return self.concrete(obj.size(0), operator.index, "the length of a value (`len()`, iteration)")

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        return iter([obj[i] for i in range(self.length(obj))])

    def keys(self, obj: fx.Proxy) -> Any:
        value = obj.node.meta.get(VALUE, UNKNOWN)
        if isinstance(value, dict):
            return value.keys()
        raise CaptureError(_where("`**` unpacking of a traced value"))
