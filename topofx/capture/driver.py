""":func:`capture` and :func:`trace`: the outline of a capture (see :mod:`topofx.capture`).  One trace per
round of float inputs, the decisions and speculations recorded on the graph module, then
:func:`~topofx.capture.verify_capture` before the graph is trusted."""
from __future__ import annotations

import contextlib
import dataclasses
import dis
import traceback
import warnings
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..ir import (
    AS_FLOAT,
    ATTRIBUTES_READ,
    DECIDED_PER_CALL,
    FLOAT_INPUTS,
    FLOATS,
    GATE_DECISIONS,
    HELD,
    READS,
    REAL,
    SHAPE_DECISIONS,
    SPARSE_FORWARD_MARK,
    SPECULATION,
    STATIC,
    TRACED_MODULES,
    VALUE,
    VALUE_GUARD,
    max_rel_error,
    preserved_state,
    run_seeded,
)
from . import float_inputs as _floats
from . import tensor_inputs as _tensors
from .binding import _specialize, bind_call, has_var_args, tensors_in_containers
from .decisions import PER_CALL, Decision, ValueGuard, _DecidesPerCall, _per_call_units, unit_key, unit_name
from .frames import CaptureError, _is_library_file, _reads_nothing, user_frame
from .gating import dead_rules, make_gates, weight_element
from .held import _MODULE_FIELDS, _attribute_names, _free_name, _loose_tensors_as_buffers, erase_unread
from .reads import ReadRecorder, module_methods
from .speculation import (
    RESAMPLES,
    SpeculationFailed,
    _forked_rng,
    _insert_speculation_checks,
    _volatile,
    hoist_speculation,
)
from .tracer import ValueTracer
from .values import AppliedFunction, AttributeStore, FloatValue
from .verify import FloatsNotFollowed, verify_capture, verify_float_inputs


@dataclasses.dataclass
class Capture:
    """Result of :func:`capture`: a graph module, or the reason the network fell back to eager."""

    graph_module: fx.GraphModule | None
    fallback_reason: str | None = None


CONSTANT_FLOATS: "weakref.WeakKeyDictionary[nn.Module, set[tuple]]" = weakref.WeakKeyDictionary()
"""Per model: the locations (``FloatInput.key``) of floats whose captured graph did not follow them
(:func:`verify_float_inputs`); later traces keep them constants."""


WARMED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
"""Models a capture made one eager call of before tracing again (a first trace stored traced values in
attributes): what a trace still assigns after it, forward assigns on every call (:func:`_store_assigned_tensors`);
before it, it may be a first call's write (``if not self.got_flops: self.flops = ...``), made eagerly."""


_PARSER_HINT = (
    ". torch's argument parser refused a value computed in forward (a size or a tensor the tracer stands in "
    "for), as it does when several sizes are passed one by one to a factory reached other than as torch.<name> "
    "(`from torch import empty`, a legacy type kept in a variable): call it as torch.<name>(...) or "
    "x.new_empty(...)")


def _raised_by_c_from_user_code(exc: BaseException) -> bool:
    """Whether ``exc`` came out of C code (torch's argument parser) that a line of the user's called: the
    innermost frame is the user's and stands at a call, not at a ``raise``."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or _is_library_file(tb.tb_frame.f_code.co_filename):
        return False
    return dis.opname[tb.tb_frame.f_code.co_code[tb.tb_lasti]].startswith("CALL")


GATED: "weakref.WeakKeyDictionary[nn.Module, set[tuple[str, ...]]]" = weakref.WeakKeyDictionary()
"""Per model: units whose decisions on draws are tried as per-candidate gates (``topofx.capture.gating``)
before they run per call; a unit whose gate is not proven moves on to :data:`PER_CALL`."""


def _decided_on_a_draw(frame: str, why: str) -> CaptureError:
    """A decision on a random draw that no method or submodule around it could run per call."""
    return CaptureError(
        f"Python decides on a random draw made in forward at {frame}, outside any method or submodule that could "
        f"run per call, and {why}. Decide with tensor operations (multiply by the sampled weight), move the "
        "decision into a method or submodule, or register an adapter (topofx.adapters.register_adapter)")


def _gate_units(model: nn.Module, keys: set[tuple[str, ...]]) -> frozenset:
    """Ids of the modules, and ``(id(module), method name)`` of the methods, whose decisions the tracer
    makes gates: every module of a key's class (same code, same kind of decision), for a method too."""
    modules, methods = _per_call_units(model, keys)
    classes = {(type(owner), name) for owner, name in methods}
    return frozenset(modules | {(id(m), name) for m in model.modules() for cls, name in classes if type(m) is cls})


def _in_units(model: nn.Module, unit: Any, keys: set[tuple[str, ...]]) -> bool:
    """Whether ``unit`` is one of the units ``keys`` stand for as gates (class mates included)."""
    units = _gate_units(model, keys)
    return (id(unit[0]), unit[1]) in units if isinstance(unit, tuple) else id(unit) in units


def trace(model: nn.Module, example_inputs: Sequence[Any], gating: bool | None = None) -> fx.GraphModule:
    """Trace ``model`` with :class:`ValueTracer`; raise :class:`CaptureError` naming the user's code.

    Tensor arguments become graph inputs; every other argument of ``forward`` (strings, numbers,
    ``None``, defaults included) is specialized to its value in ``example_inputs`` and asserted in
    the graph, so one graph serves exactly one choice of them (``SimplifiedModule`` keeps one
    graph per choice).  With ``gating``, a decision on a draw that changes from draw to draw is first
    tried as per-candidate gates (``topofx.capture.gating``; the graph then needs a sparse executor),
    and runs its unit per call where they are not proven (``None``: as the model's last capture did, so
    a re-trace that the guards compare takes the same decisions).
    """
    if has_var_args(model):
        values, concrete = list(example_inputs), None
    else:
        bound = bind_call(model, example_inputs)
        values = list(bound.arguments.values())
        concrete = {n: v for n, v in bound.arguments.items() if not isinstance(v, torch.Tensor)}
        holding = tensors_in_containers(concrete)
        if holding:
            name = holding[0]
            raise CaptureError(
                f"{type(model).__name__}.forward's argument `{name}` holds tensors in a {type(concrete[name]).__name__}: "
                "every non-tensor argument is a constant of the graph (one graph per value) and tensors cannot be "
                "one. Pass the tensors as arguments of their own (forward(x, weights_normal, weights_reduce)), or "
                "keep them on the model")
    learned = PER_CALL.setdefault(model, set())
    gating = bool(GATED.get(model)) if gating is None else gating
    gated = GATED.setdefault(model, set()) if gating else set()
    while True:
        opaque, methods = _per_call_units(model, learned)
        gate_units = _gate_units(model, gated - learned)
        try:
            with _forked_rng(model), _traced_values_kept_out(model):  # draws made while tracing leave the
                gm, tracer = _trace_with_float_inputs(model, values, concrete, frozenset(opaque), frozenset(methods),
                                                      gate_units)
                volatile, why = _volatile(gm, tracer.speculated), "it comes out differently from draw to draw"
            shaped = {id(d) for node, convert, _, d in tracer.speculated if convert is bool and weight_element(node)}
            if not volatile:
                rules = _probe(model, values, concrete, frozenset(opaque), frozenset(methods), gate_units,
                               tracer.gate_windows) if tracer.gate_windows else None
                unproven = make_gates(gm, tracer.gate_windows, rules)
                volatile = [unproven.info] if unproven is not None else []
                why = "its gate is not proven (topofx.capture.gating)"
            if not volatile:
                _insert_speculation_checks(gm, tracer.speculated)
                if not hoist_speculation(gm):  # a check could not run before every state change
                    volatile = [decision for *_, decision in tracer.speculated] + gm.meta.get(GATE_DECISIONS, [])
                    why = "its check cannot run before the graph changes state (a draw or update comes first)"
        except _DecidesPerCall as exc:
            volatile, why = [Decision(exc.frame, exc.unit)], "it comes out differently from draw to draw"
            shaped = {id(volatile[0])} if exc.gate_shaped else set()
        if not volatile:
            break
        before, gated_before = set(learned), set(gated)
        for decision in volatile:  # decides differently from draw to draw: a gate, else runs per call, as written
            key = unit_key(model, decision.unit) if decision.unit is not None else None
            if key is None or key in before:
                raise _decided_on_a_draw(decision.frame, why)
            if gating and id(decision) in shaped and not _in_units(model, decision.unit, gated_before):
                gated.add(key)
            else:
                learned.add(key)
    gm.meta[DECIDED_PER_CALL] = sorted(
        {name for name, m in model.named_modules() if id(m) in opaque and name}
        | {unit_name(model, key) for key in learned if len(key) == 2})
    _hold_foreign_constants(gm)
    gm.meta[TRACED_MODULES] = [model, *dict.fromkeys(tracer.traced_modules)]
    gm.meta[SHAPE_DECISIONS] = tracer.shape_decisions
    gm.meta[READS] = tracer.reads
    gm.meta[ATTRIBUTES_READ] = tracer.attributes_read
    gm.meta[VALUE_GUARD] = ValueGuard(gm, tracer.value_decisions) if tracer.value_decisions else None
    gm.meta[FLOAT_INPUTS] = tracer.float_inputs
    for node in gm.graph.nodes:
        for key in (REAL, FLOATS, AS_FLOAT):
            node.meta.pop(key, None)
    return gm


def _probe(model: nn.Module, values: list[Any], concrete: dict[str, Any] | None, opaque: frozenset[int],
           methods: frozenset[tuple[nn.Module, str]], gated: frozenset, windows: list) -> list[str | None] | None:
    """What each gate's other arm adds (``gating.dead_rules``), from a trace that takes every gate decision
    as not taken; None where that trace fails (code that needs a selected candidate, a list's first
    element: the arms add nothing then, which the verification's gradients check); no rule for any
    window where the probe took other decisions."""
    try:
        with _forked_rng(model), _attributes_kept(model), _traced_values_kept_out(model):
            probe, tracer = _trace_once(model, values, concrete, opaque, methods, gated=gated, taken=False)
    except Exception:  # noqa: BLE001 - the model's Python cannot go on without a selected candidate
        return None
    if [w.info.frame for w in tracer.gate_windows] != [w.info.frame for w in windows]:
        return [None] * len(windows)
    return dead_rules(probe, tracer.gate_windows)


def _trace_with_float_inputs(model: nn.Module, values: list[Any], concrete: dict[str, Any] | None,
                             opaque: frozenset[int], methods: frozenset[tuple[nn.Module, str]],
                             gated: frozenset = frozenset()) -> tuple[fx.GraphModule, "ValueTracer"]:
    """Trace with Python floats as constants; where the trace read floats (``topofx.capture.float_inputs``), trace
    again with them as inputs, and again without those found used as numbers, until a trace uses every
    stand-in it installed as a tensor operand -- or none is left: then the first trace stands.  Each
    further trace leaves the modules' Python attributes as the first left them."""
    gm, tracer = _trace_once(model, values, concrete, opaque, methods, gated=gated)
    floats = _floats.candidates([model, *tracer.traced_modules], tracer.reads, _MODULE_FIELDS | {"training"},
                                _is_library_file, CONSTANT_FLOATS.get(model, set()))
    while floats:
        try:
            with _attributes_kept(model), _traced_values_kept_out(model):
                return_value = _trace_once(model, values, concrete, opaque, methods, floats, gated)
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
                methods: frozenset[tuple[nn.Module, str]], floats: Sequence[_floats.FloatInput] = (),
                gated: frozenset = frozenset(), taken: bool = True) -> tuple[fx.GraphModule, "ValueTracer"]:
    tracer = ValueTracer(values, opaque, methods, floats, gated)
    tracer.gate_taken = taken
    own = _attribute_names(model)
    before = [(m, dict(vars(m))) for m in model.modules()]  # what forward assigns: _store_assigned_tensors
    proxies: dict[str, Any] = {}

    def read(qualified: str) -> Any:  # one get_attr node per held tensor, created where first read
        return proxies.get(qualified) or proxies.setdefault(qualified, tracer.create_proxy("get_attr", qualified, (), {}))

    with _loose_tensors_as_buffers(model, read) as (loose, held, install_held), \
            _stand_ins(model, tracer, floats) as install_floats, \
            ReadRecorder(_reads_nothing, lambda: tracer._evaluating, module_methods(model)) as recorder:
        tracer.before_forward = lambda: (install_held(), install_floats())  # type: ignore[method-assign]
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
            _specialize(graph, concrete or {})
            erase_unread(graph, {target for target, *_ in held}, {node for node, *_ in tracer.value_decisions})
            gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
        except (CaptureError, _DecidesPerCall):
            raise
        except Exception as exc:  # FX raises many kinds; name the user's line for all of them
            frame = user_frame(traceback.extract_tb(exc.__traceback__))
            at = f" at {frame}" if frame else ""
            hint = _PARSER_HINT if isinstance(exc, TypeError) and _raised_by_c_from_user_code(exc) else ""
            raise CaptureError(f"cannot capture {type(model).__name__}{at}: {type(exc).__name__}: {exc}{hint}") from exc
        finally:  # FX keeps constants (and topofx its DistributionCall modules) on the root: take them off;
            for name in _attribute_names(model) - own:  # a traced value forward stored stays: _traced_values_kept_out
                if not _holds_proxy(vars(model).get(name)):
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
    if model in WARMED:
        _store_assigned_tensors(gm, before)
    traced = {id(m) for m in (model, *tracer.traced_modules)}
    tracer.reads = recorder.reads(skip=lambda root, steps: id(root) in traced and len(steps) == 1
                              and steps[0][1] in vars(root))  # a traced module's own attribute: guards.py
    tracer.attributes_read = recorder.attributes_read()  # which of those guards.py compares
    return gm, tracer


def _store_assigned_tensors(gm: fx.GraphModule, attributes: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """A tensor forward assigned to a module attribute (``self.normal_weights = weights`` on every call: a
    trace after the eager warm-up call, :data:`WARMED`) is assigned by the graph too, at its end (:class:`~topofx.capture.values.AttributeStore`), and the trace's
    stand-in comes off the attribute (``attributes``: every module's attributes before the trace).  Other
    traced values left in attributes (in lists, dicts) are refused by :func:`_traced_values_kept_out`."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    paths = {id(m): path for path, m in attributes[0][0].named_modules()}  # (the model comes first)
    for module, before in attributes:
        for name, value in list(vars(module).items()):
            if not isinstance(value, fx.Proxy) or value.node.graph is not gm.graph or \
                    not isinstance(value.node.meta.get(VALUE), torch.Tensor):
                continue
            _drop_unread_copy(gm, ".".join(filter(None, (paths.get(id(module)), name))), value)
            target = _free_name(gm, f"topofx_store_{name}")
            gm.add_submodule(target, AttributeStore(module, name))
            with gm.graph.inserting_before(output):
                store = gm.graph.call_module(target, (value.node,))
            store.meta[VALUE], store.meta[STATIC] = None, False
            if name in before:
                module.__dict__[name] = before[name]
            else:
                del module.__dict__[name]
    gm.recompile()


def _drop_unread_copy(gm: fx.GraphModule, qualified: str, value: fx.Proxy) -> None:
    """The graph module's copy of an attribute forward assigned while tracing (an existing tensor attribute
    is a buffer for the trace, copied by name with the stand-in in it), and its unused ``get_attr``."""
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == qualified and not n.users]:
        gm.graph.erase_node(node)
    *path, field = qualified.split(".")
    try:
        owner = gm.get_submodule(".".join(path))
    except AttributeError:
        return
    if vars(owner).get(field) is value or owner._buffers.get(field) is value:
        owner._buffers.pop(field, None)
        owner.__dict__.pop(field, None)


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


class StoresTracedValues(CaptureError):
    """Forward stored traced values in module attributes (``self.flops = self.size * x.size(2) ** 2`` on a
    first call): the trace ran the user's Python on the real modules, and the model was restored."""

    def __init__(self, where: list[str]):
        self.where = where
        super().__init__(
            f"forward stores values computed while tracing in {', '.join(where[:4])}"
            f"{' and %d more' % (len(where) - 4) if len(where) > 4 else ''}, even after one eager warm-up call; "
            "a graph cannot replay Python state (a list or dict forward assigns anew on every call, say; a tensor "
            "assigned as it is, the graph assigns too). Compute such values outside forward (or return them), or "
            "assign the tensors one by one")


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


def fingerprint(gm: fx.GraphModule) -> tuple:
    """What a trace decided: its code, the values of its Python decisions (a baked batch size may
    leave the code unchanged, e.g. inside a constant) and what its custom Functions' nodes hold."""
    guard = gm.meta.get(VALUE_GUARD)
    return (gm.code.split(SPARSE_FORWARD_MARK)[0], tuple(repr(v) for _, v in gm.meta.get(SHAPE_DECISIONS, ())),
            tuple(repr(expected) for _, expected, _ in (guard.checks if guard else ())),
            tuple(m.held_key() for m in gm.modules() if isinstance(m, AppliedFunction)))


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


def _raised_eagerly(model: nn.Module, example_inputs: Sequence[Any]) -> CaptureError | None:
    """After a failed capture: the error of the model's own forward on the example inputs, if it raises
    one.  A trace goes on past an operation that fails on meta tensors (it may only lack a meta kernel),
    so a bug of the model's (a shape mismatch) would otherwise be blamed on a later line."""
    try:
        with preserved_state(model), torch.no_grad():
            run_seeded(model, example_inputs)
    except Exception as error:  # noqa: BLE001 - any error of the user's forward is the one to report
        frame = user_frame(traceback.extract_tb(error.__traceback__))
        at = f" at {frame}" if frame else ""
        return CaptureError(f"the model's own forward raises on the example inputs{at}: {type(error).__name__}: "
                            f"{error}. Fix forward or the example inputs; capture needs a forward that runs")
    return None


def _verified(model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[Any], live_attrs: Sequence[str]) -> None:
    """Verify the capture against the model; a graph that raises where the model's forward and backward
    do not is no capture either (a held callable that kept a stand-in of the trace, say): CaptureError."""
    try:
        verify_capture(model, gm, example_inputs, live_attrs=live_attrs)
        verify_float_inputs(model, gm, example_inputs)
    except (CaptureError, FloatsNotFollowed, SpeculationFailed):
        raise
    except Exception as error:  # noqa: BLE001 - any error of the graph's is a failed capture
        frame = user_frame(traceback.extract_tb(error.__traceback__))
        at = f" (at {frame})" if frame else ""
        raise CaptureError(f"the captured graph raises in a training step where the model does not{at}: "
                           f"{type(error).__name__}: {error}") from error


def _gates_per_call(model: nn.Module, decisions: list[Decision]) -> None:
    """The units of gates that verification refuted run per call from now on."""
    for decision in decisions:
        key = unit_key(model, decision.unit) if decision.unit is not None else None
        if key is not None:
            PER_CALL.setdefault(model, set()).add(key)


def _verified_on_draws(model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """A graph with gates against the model on :data:`RESAMPLES` more draws (seeds): the Python around a
    gate (a list's length) follows the speculated decisions, which only the values show."""
    for seed in range(1, RESAMPLES + 1):
        with preserved_state(model):
            eager = run_seeded(model, example_inputs, seed)
        with preserved_state(model):
            graphed = run_seeded(gm, example_inputs, seed)
        error = max_rel_error(graphed, eager)
        if not error <= 1e-5:
            raise CaptureError(f"the graph's gates disagree with eager forward on another draw (max relative "
                               f"error {error:.2e})")


def capture(
    model: nn.Module, example_inputs: Sequence[Any], *, strict: bool = False, verify: bool = True,
    live_attrs: Sequence[str] = (), stacklevel: int = 3, sparse: Callable[[fx.GraphModule], None] | None = None,
) -> Capture:
    """Capture ``model``; on failure raise (``strict``) or warn and return an eager fallback.

    ``live_attrs`` name tensor attributes that are set anew before every call (an adapter's
    samples): they may carry autograd history.  ``stacklevel`` locates the warning at the user's call.
    ``sparse`` makes a graph with gates (``topofx.capture.gating``) run only its selected candidates
    (``topofx.sparse.run_sparsely``); without it decisions on draws run their unit per call.
    """
    try:
        warmed = False
        while True:
            try:
                gm = trace(model, example_inputs, gating=sparse is not None)
            except StoresTracedValues:  # a first call stores Python state: make it eagerly, then trace
                if warmed:
                    raise
                warmed = True
                with preserved_state(model), torch.no_grad():
                    run_seeded(model, example_inputs)
                WARMED.add(model)
                continue
            gated = gm.meta.get(GATE_DECISIONS)
            try:
                if gated and sparse is not None:
                    sparse(gm)
                if verify:
                    _verified(model, gm, example_inputs, live_attrs)
                    if gated:
                        _verified_on_draws(model, gm, example_inputs)
                return Capture(gm)
            except FloatsNotFollowed as failed:  # keep them constants, guarded
                CONSTANT_FLOATS.setdefault(model, set()).update(f.key for f in failed.floats)
            except SpeculationFailed as failed:  # a decision on draws changed after all: run it per call
                decision = gm.meta[SPECULATION][failed.index]
                key = unit_key(model, decision.unit) if decision.unit is not None else None
                if key is None or key in PER_CALL.get(model, ()):
                    raise _decided_on_a_draw(decision.frame, f"it held on {RESAMPLES} fresh draws at capture but "
                                             "not on the verification's draw") from None
                PER_CALL.setdefault(model, set()).add(key)
            except (CaptureError, ValueError):
                if not gated:
                    raise
                _gates_per_call(model, gated)  # not the original's (or not run sparsely): those units run per call
    except CaptureError as exc:
        exc = _raised_eagerly(model, example_inputs) or exc
        if strict:
            raise exc
        warnings.warn(
            f"topofx: {exc}. Falling back to the model's own eager forward (per-candidate ops unchanged); "
            "no rewrite is applied to this network.",
            stacklevel=stacklevel,
        )
        return Capture(None, str(exc))
