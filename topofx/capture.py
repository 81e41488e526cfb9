"""Capture an unmodified supernet as a torch.fx graph at module granularity.

Why not ``torch.fx.symbolic_trace`` or ``torch.export``?  On DARTS-family supernets both fail
silently or loudly (see ``docs/capture.md``): ``symbolic_trace`` cannot iterate
``zip(self._ops, weights)`` and bakes ``softmax(alphas)`` in as a constant when the alphas are plain
tensors; ``torch.export`` turns plain-tensor alphas into constants whose ``.grad`` stays ``None``.

:class:`ValueTracer` is a ``torch.fx.Tracer`` that also *runs* every node on meta tensors while it
records it, so each proxy knows its value's shape and whether that value depends only on shapes
("static").  With that it can

* unroll ``iter(proxy)`` (``zip(ops, weights)``, ``for w in weights``) when the first dimension is known;
* answer ``len(proxy)``;
* resolve ``if``/``while`` conditions that depend on shapes only (PC-DARTS's
  ``if a.shape[2] == b.shape[2]``), and refuse -- naming the user's file:line -- conditions that depend
  on data (GDAS's ``.item()`` sampling loop).

Architecture weights that are plain ``requires_grad`` tensors stored as attributes (original DARTS)
are re-registered as non-persistent buffers for the duration of the trace, so they become live
``get_attr`` nodes; the original module is restored afterwards.  Leaf modules (``torch.nn`` modules)
become ``call_module`` nodes that reference the original module objects, so parameters and buffers
are shared by identity and optimizers built before capture keep working.

Every capture verifies itself (:func:`verify_capture`) before it is trusted.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import os
import traceback
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

VALUE = "topofx_value"  # node.meta key: meta-tensor (or python) value of the node
STATIC = "topofx_static"  # node.meta key: value depends on shapes/constants only
FROM_INPUT = "topofx_from_input"  # node.meta key: value is computed from a forward input
TRACED_MODULES = "topofx_traced_modules"  # GraphModule.meta key: modules whose forward was traced through
SHAPE_DECISIONS = "topofx_shape_decisions"  # GraphModule.meta key: user frames of decisions on input shapes
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


def _is_library_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(os.path.join(_TOPOFX_DIR, "zoo")):
        return False  # the built-in supernets are user code as far as error messages go
    return path.startswith(_TOPOFX_DIR) or path.startswith(_TORCH_DIR) or "<" in filename


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
    if not stock:
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
            return target(*args, **kwargs)
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


class _ValueProxy(fx.Proxy):
    """A proxy that knows its value's shape, so ``len()`` works on it."""

    def __len__(self) -> int:
        value = self.node.meta.get(VALUE, UNKNOWN)
        if isinstance(value, (torch.Tensor, tuple, list, torch.Size)):
            try:
                if isinstance(value, torch.Tensor):
                    self.tracer._note_shape_decision(self)  # type: ignore[attr-defined]
                return len(value)
            except TypeError:
                pass
        raise CaptureError(_where(f"len() of a value whose length is unknown at capture ({self.node.format_node()})"))


def _where(what: str, fix: str = "") -> str:
    frame = user_frame()
    at = f"at {frame}" if frame else "(no user frame found)"
    return f"{what} {at}" + (f". {fix}" if fix else "")


class ValueTracer(fx.Tracer):
    """FX tracer that propagates meta-tensor values through every node (see module docstring)."""

    def __init__(self, example_inputs: Sequence[Any]):
        super().__init__(param_shapes_constant=False)
        self.proxy_buffer_attributes = True
        self._examples: Iterator[Any] = iter(example_inputs)
        self.traced_modules: list[nn.Module] = []  # non-leaf modules whose Python forward became graph
        self.shape_decisions: list[UserFrame | None] = []  # Python decisions taken on input shapes

    _evaluating = False  # True while a leaf module runs on meta tensors: no recording then

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        if self._evaluating:
            return forward(*args, **kwargs)
        if not self.is_leaf_module(m, self.path_of_module(m)):
            self.traced_modules.append(m)
        return super().call_module(m, forward, args, kwargs)

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

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if VALUE in node.meta:  # create_proxy can be re-entered for the same node
            return proxy
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
            data_op = kind == "call_method" and target in {"item", "tolist", "__bool__", "nonzero"}
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
        frame = user_frame()
        if frame is not None:
            node.meta["topofx_user_frame"] = frame
        return proxy

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = obj.node.meta.get(VALUE, UNKNOWN)
        if obj.node.meta.get(STATIC) and value is not UNKNOWN:
            self._note_shape_decision(obj)
            return bool(value)
        raise CaptureError(
            _where(
                "data-dependent control flow (a Python `if`/`while`/`and`/`or` on a tensor value)",
                "Keep the condition on shapes only, register an adapter (topofx.adapters.register_adapter) "
                "that lifts the sampling out of forward, or call simplify without strict=True to run the "
                "model's own eager forward",
            )
        )

    def _note_shape_decision(self, obj: fx.Proxy) -> None:
        """A Python decision on a value computed from the inputs' shapes holds for those shapes only."""
        if obj.node.meta.get(FROM_INPUT):
            self.shape_decisions.append(user_frame())

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        value = obj.node.meta.get(VALUE, UNKNOWN)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            self._note_shape_decision(obj)
            return iter([obj[i] for i in range(value.shape[0])])
        if isinstance(value, (tuple, list, torch.Size)):
            return iter([obj[i] for i in range(len(value))])
        raise CaptureError(_where("iteration over a value whose length is unknown at capture"))

    def keys(self, obj: fx.Proxy) -> Any:
        value = obj.node.meta.get(VALUE, UNKNOWN)
        if isinstance(value, dict):
            return value.keys()
        raise CaptureError(_where("`**` unpacking of a traced value"))


# ---------------------------------------------------------------------------------------------
# loose requires_grad tensors -> temporary buffers
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _loose_tensors_as_buffers(model: nn.Module) -> Iterator[list[str]]:
    """Register plain ``requires_grad`` tensor attributes as buffers (same objects) while tracing."""
    moved: list[tuple[nn.Module, str, torch.Tensor]] = []
    for prefix, module in model.named_modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.requires_grad:
                del module.__dict__[name]
                module.register_buffer(name, value, persistent=False)
                moved.append((module, f"{prefix}.{name}" if prefix else name, value))
    try:
        yield [qualified for _, qualified, _ in moved]
    finally:
        for module, qualified, value in moved:
            name = qualified.rsplit(".", 1)[-1]
            module._buffers.pop(name, None)
            object.__setattr__(module, name, value)


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Capture:
    """Result of :func:`capture`: a graph module, or the reason the network fell back to eager."""

    graph_module: fx.GraphModule | None
    fallback_reason: str | None = None


def _concrete_args(model: nn.Module, n_inputs: int) -> dict[str, Any] | None:
    params = list(inspect.signature(model.forward).parameters.values())
    extra = {
        p.name: p.default
        for p in params[n_inputs:]
        if p.default is not inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    }
    return extra or None


def trace(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Trace ``model`` with :class:`ValueTracer`; raise :class:`CaptureError` naming the user's code."""
    tracer = ValueTracer(example_inputs)
    with _loose_tensors_as_buffers(model) as loose:
        try:
            graph = tracer.trace(model, concrete_args=_concrete_args(model, len(example_inputs)))
        except CaptureError:
            raise
        except Exception as exc:  # FX raises many kinds; name the user's line for all of them
            frame = user_frame(traceback.extract_tb(exc.__traceback__))
            at = f" at {frame}" if frame else ""
            raise CaptureError(
                f"cannot capture {type(model).__name__}{at}: {type(exc).__name__}: {exc}. "
                "Move the construct out of forward() or pass strict=False to fall back to eager control flow"
            ) from exc
        gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
        for name in loose:
            _unbuffer(gm, name)
    gm.meta[TRACED_MODULES] = [model, *dict.fromkeys(tracer.traced_modules)]
    gm.meta[SHAPE_DECISIONS] = tracer.shape_decisions
    return gm


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
    live_attrs: Sequence[str] = (),
) -> Capture:
    """Capture ``model``; on failure raise (``strict``) or warn and return an eager fallback.

    ``live_attrs`` name tensor attributes that are set anew before every call (an adapter's
    samples): they may carry autograd history.
    """
    try:
        gm = trace(model, example_inputs)
        if verify:
            verify_capture(model, gm, example_inputs, live_attrs=live_attrs)
        return Capture(gm)
    except CaptureError as exc:
        if strict:
            raise
        warnings.warn(
            f"topofx: {exc}. Falling back to the model's own eager forward (per-candidate ops unchanged); "
            "no rewrite is applied to this network.",
            stacklevel=3,
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
                t.copy_(value)
                t.grad = grad
        torch.set_rng_state(rng)


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
    """Check a captured graph before trusting it; raise :class:`CaptureError` on any failure."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in live_attrs:
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
                frame = node.meta.get("topofx_user_frame")
                raise CaptureError(
                    f"a tensor with autograd history, computed outside forward() or from a tensor the tracer "
                    f"cannot see (one kept in a Python list or dict), was frozen into the graph "
                    f"({node.target}{', used at ' + str(frame) if frame else ''}). Compute it inside forward() "
                    "from the model's parameters, buffers or tensor attributes"
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
        with preserved_state(model, tensors=attrs), torch.no_grad():
            gen = torch.Generator().manual_seed(1234)
            for t in attrs:
                t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) * 0.5)
            eager2 = run_seeded(model, example_inputs)
            with preserved_state(model):
                graphed2 = run_seeded(gm, example_inputs)
        if not max_rel_error(graphed2, eager2) <= rtol:
            raise CaptureError("captured graph does not follow the architecture weights (they were frozen as constants)")
    resample = getattr(model, "resample", None)  # an adapter's sampling step, run before every call
    with preserved_state(model, tensors=attrs):
        for _ in range(2):
            if live_attrs and callable(resample):
                resample(gm)
            leaves = _float_leaves(run_seeded(gm, example_inputs))
            loss = sum(leaf.float().sum() for leaf in leaves if leaf.requires_grad)
            if isinstance(loss, torch.Tensor):
                loss.backward()
