"""What a captured graph assumed about the model, checked before every call of the simplified module.

Tracing turns Python into a fixed graph, so Python-level facts the trace relied on are baked in:

* decisions taken on input shapes (PC-DARTS's ``if out.shape[2] == x.shape[2]``) hold for the
  shapes they were taken on;
* plain Python numbers that traced code reads (a flag, a count) are constants in the graph (only
  those of a traced module's attributes whose names the traced code uses are compared:
  :meth:`topofx.capture.reads.ReadRecorder.attributes_read`; all of them where it reads attributes by
  computed names, ``vars(self)``, ``getattr(self, f"op{i}")``), and so
  are tensors it reads out of a list, dict or plain object (DARTS-PT's ``candidate_flags``, an edge
  record's alpha) -- except floats used only in tensor arithmetic (a Gumbel temperature
  ``self.temp``), which are graph inputs (:mod:`topofx.capture.float_inputs`): the check gives the graph
  their live value;
  so are numbers read from anywhere else -- a module-level scheduler's ``decay_rate``, a global, a
  closure, a class attribute (the access paths :mod:`topofx.capture.reads` found in the traced code);
* ``get_attr`` tensors are the objects the model held at capture; a codebase that re-assigns
  ``self.alphas_normal = ...`` holds a new object;
* modules the graph no longer calls (traced through, or fused away by a pass) do not run hooks;
* the module tree is the one traced: a candidate the training loop sets to ``None`` (or swaps for
  another module) between steps changes what forward does.

:class:`Guards` records these facts at capture and checks them before each call (the graph itself is
not touched):

* a new input shape is traced again on meta tensors; if it takes other decisions, that call runs
  the original's eager forward, with a warning naming the decision's source line;
* a changed Python number (or an in-place write into a tensor held in a list or dict) is traced
  again; if the graph changes, the verdict is ``"recapture"`` and the simplified module simplifies
  the model again (floated-BN statistics carried over); if not, one warning names the attribute (a
  per-step counter would pay a re-trace every step);
* a re-assigned tensor of the same shape is re-bound in the graph module; another shape asks for
  a recapture;
* a tensor with autograd history stored where forward reads it (an optimizer's sample on an edge
  record, :mod:`topofx.capture.tensor_inputs`) is a graph input: the one stored now is handed to the
  graph before every call; none there, or another shape, dtype or device, asks for a recapture;
* a Python decision on architecture values (``if w != 0``, ``.tolist()`` of the alphas) is evaluated
  again (:class:`topofx.capture.ValueGuard`: the few small ops that compute it, no inputs); when one
  comes out differently the verdict is ``"recapture"`` (a projection, a stage switch);
* a hook on a module the graph does not call gets one warning naming the module;
* a changed module tree (any module's ``_modules``, compared by identity) asks for a recapture; the
  comparison runs only after some submodule was assigned (torch's global module registration hook
  counts assignments), so it costs nothing per call otherwise. Not seen: ``del``, ``pop`` or
  ``insert`` on a container between steps (torch calls no hook for them).

Guards are built once, at capture, and checked cheaply (the way ``torch._dynamo`` guards are): the
identity, number and container checks are compiled into one generated function (:class:`_Check`)
that reproduces, per attribute, the comparison of a fresh snapshot with the capture's (a module's
immutable attributes only after an assignment to it: :class:`_Assignments`), reading module attributes
through the dictionaries that hold them (:func:`topofx.capture.decisions.attribute_read`: no
``nn.Module.__getattr__`` call); the value decisions run as one batched computation
(:meth:`topofx.capture.ValueGuard.holds`), and not at all while the tensors it reads hold the values of
its last run (a generated comparison the check calls first); the modules the
graph does not call are scanned for hooks only after a hook was registered somewhere (torch's global
hook-handle counter moved).  Only when the compiled check fails does a call take the step-by-step
path above (re-bind, re-trace, name what changed), after which the check is compiled again where
numbers were snapshotted again.  The numbers read outside the traced modules (:mod:`topofx.capture.reads`) and
the module-tree check are part of the same function.
"""
from __future__ import annotations

import functools
import itertools
import operator
import time
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..ir import ATTRIBUTES_READ, FLOAT_INPUTS, HELD, READS, SHAPE_DECISIONS, TRACED_MODULES, VALUE_GUARD
from . import tensor_inputs as _tensors
from .decisions import attribute_read
from .driver import fingerprint, trace
from .frames import CaptureError
from .held import held_at
from .reads import MISSING

_SUBMODULES = operator.attrgetter("_modules")
_TREE_VERSION = [0]  # submodule assignments anywhere (``ops[k] = None``, ``cell.op = new``, ``add_module``)


def _count_assignment(module: nn.Module, name: str, value: Any) -> None:
    _TREE_VERSION[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_assignment)
_SCALARS = (bool, int, float, str, type(None))  # None: a mask or a flag that is set later (DrNAS pruning)


def retraces_same(root: nn.Module, inputs: Sequence[Any], decisions: tuple, read: list | None = None) -> bool:
    """Whether tracing ``root`` on ``inputs`` now takes the ``decisions`` (a :func:`~topofx.capture.fingerprint`);
    ``read``, when given, gets the names the re-trace read attributes under appended (``ATTRIBUTES_READ``)."""
    try:
        gm = trace(root, inputs)
    except CaptureError:
        return False
    if read is not None:
        read.append(gm.meta.get(ATTRIBUTES_READ))
    return fingerprint(gm) == decisions


def _signature(inputs: Sequence[Any]) -> tuple:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else type(x) for x in inputs)


def _scalars(modules: Sequence[nn.Module], live: set[int], names: frozenset[str] | None
             ) -> list[tuple[nn.Module, str, Any]]:
    """(module, name, snapshot) of every Python number, string or ``None`` the modules hold under one
    of ``names`` (what traced code can have read; ``None``: any name), and of every list, tuple or dict
    of them (DARTS-PT's ``candidate_flags``).  A tensor inside one counts by
    identity when the graph reads it live (``live``: a parameter, buffer or tensor attribute of a
    module; ``proj_weights[t][e] = new`` is a change), and by value otherwise: tracing read it as a
    constant, so an in-place write (``candidate_flags[t][e] = False``) is a change too."""
    return [(m, k, _snapshot(v, live)) for m in modules for k, v in vars(m).items()
            if (type(v) in _SCALARS or type(v) in (list, tuple, dict)) and k not in _MODULE_INTERNALS
            and (names is None or k in names)]


_MODULE_INTERNALS = set(vars(nn.Module())) | {"training"}  # _parameters, _modules, hooks: followed elsewhere


def _live_tensors(root: nn.Module) -> set[int]:
    """ids of the tensors a graph reads by ``get_attr`` (so: live) -- every module's parameters,
    buffers and plain tensor attributes."""
    return {id(t) for m in root.modules()
            for t in (*m._parameters.values(), *m._buffers.values(), *vars(m).values()) if isinstance(t, torch.Tensor)}


class _TensorValue:
    """A tensor held in a container, by identity and value (compared with ``torch.equal``); the
    snapshot taken at capture holds a copy, the one taken to compare with it the tensor itself."""

    __slots__ = ("id", "value")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, tensor: torch.Tensor, copy: bool):
        self.id, self.value = id(tensor), tensor.detach().clone() if copy else tensor.detach()

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _TensorValue) and self.id == other.id and self.value.shape == other.value.shape
                and self.value.dtype == other.value.dtype and self.value.device == other.value.device
                and torch.equal(self.value, other.value))  # (which raises across devices)


def _snapshot(value: Any, live: set[int], copy: bool = True, depth: int = 0) -> Any:
    if type(value) in _SCALARS:
        return (type(value), value)  # True and 1 differ
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value)) if id(value) in live else _TensorValue(value, copy)
    if type(value) in (list, tuple) and depth < 4:
        return (type(value), tuple(_snapshot(v, live, copy, depth + 1) for v in value))
    if type(value) is dict and depth < 4:
        return (dict, tuple((k, _snapshot(v, live, copy, depth + 1)) for k, v in value.items()))
    return ("object", id(value))


def _owner(root: nn.Module, target: str) -> tuple[Any, str]:
    *path, field = target.split(".")
    obj: Any = root
    for part in path:
        obj = getattr(obj, part, None)
    return obj, field


def _element(module: nn.Module, path: tuple) -> Any:
    """What ``module`` holds at ``path`` now (``None`` when it is gone): attributes through
    ``__dict__``, items by key, as capture found them."""
    try:
        return held_at(module, path)
    except (KeyError, IndexError, TypeError):
        return None


def _rebind(owner: nn.Module, field: str, value: torch.Tensor) -> None:
    """Make ``owner.field`` the tensor ``value``, keeping its kind (parameter, buffer or plain attribute)."""
    was_buffer = field in owner._buffers
    owner._parameters.pop(field, None)
    owner._buffers.pop(field, None)
    owner.__dict__.pop(field, None)
    if isinstance(value, nn.Parameter):
        owner.register_parameter(field, value)
    elif was_buffer:
        owner._buffers[field] = value
    else:
        object.__setattr__(owner, field, value)


def _hooks_registered() -> int:
    """How many hooks torch has registered so far, anywhere (every ``register_*hook`` makes a handle
    with the next id); -1 where torch does not count them: then every call scans."""
    return getattr(RemovableHandle, "next_id", -1)


_MISSING = object()  # an attribute that is gone


def _is_scalar(snapshot: Any) -> bool:
    return type(snapshot) is tuple and snapshot[0] in _SCALARS


def _is_flat(snapshot: Any) -> bool:
    """A list or tuple of numbers, names, ``None`` (a snapshot by :func:`_snapshot`)."""
    return type(snapshot) is tuple and snapshot[0] in (list, tuple) and all(map(_is_scalar, snapshot[1]))


def _by_module(scalars: list[tuple[nn.Module, str, Any]]) -> list[tuple[nn.Module, list[tuple[str, Any]]]]:
    groups: dict[int, tuple[nn.Module, list[tuple[str, Any]]]] = {}
    for module, key, snapshot in scalars:
        groups.setdefault(id(module), (module, []))[1].append((key, snapshot))
    return list(groups.values())


class _Check:
    """Checks compiled into one generated function, ``torch._dynamo``-style: :meth:`expect` adds, for a
    read (a Python expression) and a snapshot taken by :func:`_snapshot`, a condition that holds exactly
    when ``_snapshot(read) == snapshot`` -- a number by type and value, a container by type, length
    and items, a tensor by identity (or by value, where the snapshot holds its copy); :meth:`build`
    joins them with ``and`` into one function of no arguments."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = {"_snapshot": _snapshot, "Tensor": torch.Tensor, "_MISSING": _MISSING,
                                      "_chain": itertools.chain.from_iterable, "_equal": torch.equal, "_is": operator.is_}
        self.conditions: list[str] = []
        self._ids: dict[int, str] = {}
        self._shared: dict[int, tuple[str, Any]] = {}  # id of a container read -> (its name, its snapshot)
        self._constants: dict[tuple, str] = {}  # (type, ids of the items) -> name (:meth:`constant`)

    def bind(self, obj: Any) -> str:
        """A name for ``obj`` in the generated function (one per object)."""
        name = self._ids.get(id(obj))
        if name is None or self.names[name] is not obj:
            name = self._ids[id(obj)] = f"_c{len(self.names)}"
            self.names[name] = obj
        return name

    def constant(self, items: list | tuple) -> str:
        """A name for a list or tuple of a snapshot's items (or their types, lengths): one per sequence of
        the very same objects, so that equal snapshots (every cell's ``edge2index``) share one object, which
        a check reads from memory once."""
        key = (type(items), tuple(map(id, items)))  # the items stay alive: the bound object holds them
        if key not in self._constants:
            self._constants[key] = self.bind(items)
        return self._constants[key]

    def add(self, condition: str) -> None:
        self.conditions.append(f"({condition})")

    def expect(self, read: str, snapshot: Any, live: set[int], now: Any = _MISSING) -> None:
        """Hold when ``_snapshot(<read>, live, copy=False) == snapshot``.  ``now``: what ``read`` gives at
        compile time; a container that several reads give (every cell's ``primitives`` list) is compared
        item by item once, and by identity with the first read's value after that."""
        if type(now) not in (list, tuple, dict):
            self.add(self._same(read, snapshot, live, 0))
            return
        shared = self._shared.get(id(now))
        if shared is not None and shared[1] == snapshot:
            self.add(f"{read} is {shared[0]} or ({self._same(read, snapshot, live, 0)})")
            return
        name = self._shared.setdefault(id(now), (f"_s{len(self._shared)}", snapshot))[0]
        self.names.setdefault("_kept", []).append(now)  # (its id stays its own while compiling)
        self.add(self._same(f"({name} := {read})", snapshot, live, 0))

    def _same(self, read: str, snapshot: Any, live: set[int], depth: int) -> str:
        v = f"_v{depth}"
        head = f"({v} := {read})"
        if isinstance(snapshot, _TensorValue):  # _TensorValue.__eq__, inline (torch.equal compares shapes itself)
            held = snapshot.value
            return (f"isinstance({head}, Tensor) and id({v}) == {snapshot.id} and {v}.dtype is {self.bind(held.dtype)} "
                    f"and _equal({v}, {self.bind(held)})")
        kind, value = snapshot
        if kind in _SCALARS:  # (type, value): the value itself, or an equal one of the same type
            return f"{head} is {self.bind(value)} or (type({v}) is {self.bind(kind)} and {v} == {self.bind(value)})"
        if kind == "tensor":  # a tensor the graph reads live: by identity (its id is in ``live``)
            return f"isinstance({head}, Tensor) and id({v}) == {value}"
        if kind in (list, tuple):
            # in C: the very items of the snapshot (no item read), else the items' types, then (numbers,
            # names and None only: no tensor's ==) their values
            if not value:  # empty (a node's selected edges before any projection): its type and length say it all
                return f"type({head}) is {kind.__name__} and not {v}"
            if all(_is_scalar(item) for item in value):
                items = self.constant([x for _, x in value])
                return (f"type({head}) is {kind.__name__} and len({v}) == {len(value)} and (all(map(_is, {v}, {items})) "
                        f"or (list(map(type, {v})) == {self.constant([t for t, _ in value])} and list({v}) == {items}))")
            if all(_is_flat(item) for item in value):  # lists of lists of numbers or names (DARTS-PT's primitives)
                rows = self.constant([t for t, _ in value])
                leaves = self.constant([x for _, row in value for _, x in row])
                return (f"type({head}) is {kind.__name__} and list(map(type, {v})) == {rows} and "
                        f"list(map(len, {v})) == {self.constant([len(row) for _, row in value])} and "
                        f"(all(map(_is, _chain({v}), {leaves})) or "
                        f"(list(map(type, _chain({v}))) == {self.constant([t for _, row in value for t, _ in row])} "
                        f"and list(_chain({v})) == {leaves}))")
            items = [self._same(f"{v}[{i}]", item, live, depth + 1) for i, item in enumerate(value)]
            return " and ".join([f"type({head}) is {kind.__name__}", f"len({v}) == {len(value)}", *map("({})".format, items)])
        if kind is dict:
            keys = tuple(k for k, _ in value)
            if all(_is_scalar(item) for _, item in value):
                items = self.constant([x for _, (_, x) in value])
                return (f"type({head}) is dict and tuple({v}) == {self.constant(keys)} and "
                        f"(all(map(_is, {v}.values(), {items})) or "
                        f"(list(map(type, {v}.values())) == {self.constant([t for _, (t, _) in value])} and "
                        f"list({v}.values()) == {items}))")
            items = [self._same(f"{v}[{self.bind(k)}]", item, live, depth + 1) for k, item in value]
            return " and ".join([f"type({head}) is dict",  # the keys in order (their number too)
                                 f"tuple({v}) == {self.constant(keys)}", *map("({})".format, items)])
        # ("object", id): what _snapshot makes of anything else -- asked of _snapshot itself
        return f"_snapshot({head}, {self.bind(live)}, False, {depth}) == {self.bind(snapshot)}"

    def build(self) -> Callable[[], bool]:
        source = "def check():\n    return " + (" and ".join(self.conditions) or "True") + "\n"
        namespace = dict(self.names)
        exec(compile(source, "<topofx guards>", "exec"), namespace)  # noqa: S102 - our own generated code
        return namespace["check"]


def _immutable(snapshot: Any) -> bool:
    """A snapshot of a number, name, ``None`` or a tuple of them: its attribute changes only by assignment."""
    return _is_scalar(snapshot) or (type(snapshot) is tuple and snapshot[0] is tuple and all(map(_immutable, snapshot[1])))


def _current(check: _Check, current: Callable[[], Any]) -> str:
    """Generated code for ``current()`` (where the root holds a graph tensor now, :meth:`Guards._captured_tensors`):
    an attribute of a module read through the dictionary holding it (:func:`topofx.capture.decisions.attribute_read`:
    a ``KeyError`` where ``getattr`` would give ``None``, both a change), an element held below a module
    attribute read inline as :func:`_element` reads it (attributes through ``__dict__``, items by key: where
    ``_element`` gives ``None`` the read raises, and the check fails either way), else the call."""
    if isinstance(current, functools.partial) and current.func is getattr:
        owner, name = current.args[:2]
        return attribute_read(check.bind(owner), owner, name)
    if isinstance(current, functools.partial) and current.func is _element:
        module, path = current.args
        keys = [repr(key) if type(key) in (int, str) else check.bind(key) for _, key in path]
        return check.bind(module) + "".join(f".__dict__[{key}]" if kind == "attr" else f"[{key}]"
                                            for (kind, _), key in zip(path, keys))
    return f"{check.bind(current)}()"


class _Assignments:
    """Immutable module attributes, compared only after an assignment to one of ``modules``
    (``torch._dynamo.mutation_guard``: it wraps the modules' classes' ``__setattr__``, as dynamo does for
    the modules it compiles).  Not seen, as by dynamo: writes that bypass ``__setattr__``
    (``module.__dict__[k] = v``, ``object.__setattr__``)."""

    #: Calls in a row that found an assignment right after watching: then every call compares, unwatched
    #: (a training loop that assigns to a watched module every step would pay the watching every step).
    GIVE_UP = 3

    def __init__(self, modules: list[nn.Module], compare: Callable[[], bool]):
        self.modules, self.compare, self.assigned = modules, compare, True
        self.watchers = [_Watcher(self) for _ in modules]  # one per module: watched again only once it fired
        self.quiet, self.streak = True, 0  # a call found nothing assigned since watching; calls in a row that did not

    def hold(self) -> bool:
        """True when no watched module was assigned to since the last comparison that held.  The compiled
        check calls it only while :attr:`assigned` or not :attr:`quiet` (otherwise it would return True
        at once, changing nothing)."""
        if not self.assigned:
            self.quiet = True
            return True
        if not self.compare():
            return False
        self.streak = 0 if self.quiet else self.streak + 1
        if self.streak < self.GIVE_UP:
            from torch._dynamo import mutation_guard  # imported on first use: dynamo takes a second to import

            self.assigned, self.quiet = False, False
            for module, watcher in zip(self.modules, self.watchers):  # a tracker calls a watcher once
                if not watcher.armed:
                    watcher.armed = True
                    mutation_guard.watch(module, watcher)
        return True


class _Watcher:
    """What the mutation tracker calls on the next assignment to one watched module."""

    __slots__ = ("owner", "armed", "__weakref__")

    def __init__(self, owner: _Assignments):
        self.owner, self.armed = owner, False

    def invalidate(self, ref: Any) -> None:
        self.armed = False
        self.owner.assigned = True


class Guards:
    """The assumptions of one captured graph module (see the module docstring)."""

    def __init__(self, root: nn.Module, gm: fx.GraphModule, captured_code: tuple, example_inputs: Sequence[Any]):
        self.root = root
        self.code = captured_code
        self.shape_decisions = gm.meta.get(SHAPE_DECISIONS, [])
        self.value_guard = gm.meta.get(VALUE_GUARD)
        self.changed: list = []  # frames of the value decisions found changed by the last check
        self.moved: list[tuple[nn.Module, str]] = []  # module attributes whose change altered the graph, last check
        self.shapes_ok = {_signature(example_inputs): True}
        self.example_inputs = tuple(example_inputs)
        reads = gm.meta.get(READS, ())
        own = [r for r in reads if isinstance(r.root, nn.Module) and len(r.steps) == 1 and r.steps[0][0] == "attr"
               and r.steps[0][1] in vars(r.root)]  # a module's own attribute (a method's `self.x`): as traced modules'
        self.traced = list(dict.fromkeys([*gm.meta.get(TRACED_MODULES, [root]), *(r.root for r in own)]))
        self.attributes_read = gm.meta.get(ATTRIBUTES_READ)  # None (unknown): every attribute is compared
        self.live = _live_tensors(root) | {id(_element(m, p)) for _, m, p in gm.meta.get(HELD, ())}
        self.floats = list(gm.meta.get(FLOAT_INPUTS, ()))  # read as graph inputs: refreshed, not snapshotted
        self.inputs = list(gm.meta.get(_tensors.TENSOR_INPUTS, ()))  # tensors sampled before the call: likewise
        self.holder = gm  # holds the inputs' tensors
        self.scalars = self._numbers()
        self.reads = [(r, _snapshot(r.value(), self.live)) for r in reads
                      if r not in own and (id(r.root), r.steps) not in self._float_keys()]
        self.modules = list(root.modules())  # the module tree as captured: a candidate set to None or
        self.structure = [dict(m._modules) for m in self.modules]  # swapped asks for a new capture
        self.tree_version = _TREE_VERSION[0]
        self.tensors = self._captured_tensors(gm)
        own = {id(m) for m in root.modules()}
        targets = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
        # an original module the graph calls runs its hooks (and its children's); topofx's runtime
        # modules (fused, merged) read the original modules' tensors without calling them
        called = {id(c) for m in targets if id(m) in own for c in m.modules()}
        self.uncalled = [(n, m) for n, m in root.named_modules() if id(m) not in called]
        self.hooks_warned: set[int] = set()
        self.retrace_warned: set[str] = set()
        self.hooks_seen = _hooks_registered()
        self.warn_hooks()

    def _float_keys(self) -> set[tuple]:
        return {f.key for f in self.floats}

    def _numbers(self) -> list[tuple[nn.Module, str, Any]]:
        """:func:`_scalars` of the traced modules, less the floats the graph reads as inputs."""
        keys = self._float_keys()
        return [item for item in _scalars(self.traced, self.live, self.attributes_read) if (id(item[0]), (("attr", item[1]),)) not in keys]

    def floats_hold(self) -> bool:
        """Give the graph the live value of each float input; ``False`` when one is no float any more."""
        return all([f.refresh(self.holder) for f in self.floats])

    def inputs_hold(self) -> bool:
        """Give the graph the tensor inputs forward reads now; ``False`` when one is gone or changed shape,
        dtype or device."""
        return all([t.refresh(self.holder) for t in self.inputs])

    def holds(self) -> bool:
        """True when nothing :meth:`verdict` checks changed (having scanned for hooks where one was
        registered since the last scan); compiled by :meth:`compile` on first use (a copy of the model,
        ``copy.deepcopy``, compiles its own)."""
        self.compile()
        return self.holds()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("holds", None)  # generated code reads the objects it was compiled for
        state.pop("assignments", None)
        return state

    def compile(self) -> None:
        """Compile what :meth:`verdict` checks on every call (new hooks, re-bound tensors, Python numbers,
        value decisions) into :attr:`holds`, one function that is true when nothing changed since capture --
        or since the last call that found a change and dealt with it.

        A module attribute whose snapshot is immutable (a number, a name, a tuple of them) changes only
        by assignment, which ``torch._dynamo``'s mutation tracking sees (:class:`_Assignments`): those
        are compared only after some watched module was assigned to.  Lists and dicts (mutable in
        place), tensors held by value, and numbers outside the modules are compared on every call."""
        check, assigned = _Check(), _Check()
        guards = check.bind(self)
        counted = _hooks_registered() >= 0  # first, so that it runs whatever comes out after it
        check.add(f"{check.bind(RemovableHandle)}.next_id == {guards}.hooks_seen or {guards}.hooks_scanned()"
                  if counted else f"{guards}.hooks_scanned()")
        # the module tree: free unless a submodule was assigned
        check.add(f"{check.bind(_TREE_VERSION)}[0] == {guards}.tree_version or {guards}.structure_holds()")
        # the root still holds the graph's tensor there (the graph's side a constant: see graph_changed)
        for current, gm_owner, field in self.tensors:
            check.add(f"{_current(check, current)} is {check.bind(getattr(gm_owner, field))}")
        watched = []
        for module, items in _by_module(self.scalars):  # a module's __dict__ read once per check
            for target, part in ((assigned, [i for i in items if _immutable(i[1])]),
                                 (check, [i for i in items if not _immutable(i[1])])):
                attributes = f"(_d := {target.bind(module)}.__dict__)"
                for key, snapshot in part:
                    target.expect(f"{attributes}.get({key!r}, _MISSING)", snapshot, self.live, module.__dict__.get(key))
                    attributes = "_d"
            if any(_immutable(snapshot) for _, snapshot in items):
                watched.append(module)
        for float_input in self.floats:  # a float input that moved: its tensor is replaced (no re-trace)
            name, own = check.bind(float_input), float_input.own_attribute()
            now = f"{name}.current()" if own is None else f"{check.bind(own[0])}.__dict__.get({own[1]!r}, {check.bind(MISSING)})"
            check.add(f"{now} is {name}.last or {name}.refresh({check.bind(self.holder)})")
        for tensor_input in self.inputs:  # a new sample each call: the graph reads it (no re-trace)
            check.add(f"{check.bind(tensor_input.refresh)}({check.bind(self.holder)})")
        for read, snapshot in self.reads:  # numbers read outside the traced modules (topofx.capture.reads)
            check.expect(f"{check.bind(read.value)}()", snapshot, self.live, read.value())
        if self.value_guard is not None:  # the memo comparison first, then the rest of ValueGuard.holds
            batched, holds = self.value_guard.batched(self.root), f"{check.bind(self.value_guard.holds)}(root)"
            check.add(holds if batched is None else f"{check.bind(batched.same)}(root, {check.bind(batched)}.memo) or {holds}")
        check.names["root"] = self.root
        self.assignments = _Assignments(watched, assigned.build())
        assignments = check.bind(self.assignments)  # no call while nothing was assigned (and a call saw so)
        check.add(f"({assignments}.assigned is False and {assignments}.quiet) or {assignments}.hold()")
        self.holds = check.build()

    def _captured_tensors(self, gm: fx.GraphModule) -> list[tuple[Callable[[], Any], Any, str]]:
        """(where the root holds it now, graph-module owner, field) of every ``get_attr`` tensor that is
        (at capture) the root's own object: an attribute, or an element of a list or dict attribute."""
        read = dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "get_attr")
        for tensor_input in gm.meta.get(_tensors.TENSOR_INPUTS, ()):  # refreshed as inputs (inputs_hold)
            read.pop(tensor_input.target, None)
        out: list = []
        for target in read:
            (gm_owner, field), (owner, _) = _owner(gm, target), _owner(self.root, target)
            if gm_owner is not owner and getattr(gm_owner, field, None) is getattr(owner, field, None) is not None:
                out.append((functools.partial(getattr, owner, field, None), gm_owner, field))
        for target, module, path in gm.meta.get(HELD, ()):
            if target in read:  # a pass may have dropped the read (a flag only a decision used)
                out.append((functools.partial(_element, module, path), *_owner(gm, target)))
        for lowered in gm.modules():  # a functional call lowered to a module holds the root's tensors itself
            for field, target in getattr(lowered, "_topofx_tensors", {}).items():  # (passes/functional_modules.py)
                owner, name = _owner(self.root, target)
                if owner is not None and getattr(lowered, field, None) is getattr(owner, name, None) is not None:
                    out.append((functools.partial(getattr, owner, name, None), lowered, field))
        return out

    def shapes_allow(self, inputs: Sequence[Any]) -> bool:
        """Whether the graph's decisions on input shapes hold for ``inputs`` (traced once per new shape)."""
        if not self.shape_decisions:
            return True
        sig = _signature(inputs)
        if sig not in self.shapes_ok:
            self.shapes_ok[sig] = ok = retraces_same(self.root, inputs, self.code)
            if not ok:
                at = "; ".join(dict.fromkeys(str(f) for f, _ in self.shape_decisions))
                warnings.warn(
                    f"topofx: inputs of shape {sig} take another path through {type(self.root).__name__}.forward "
                    f"than the example inputs did (a decision on shapes at {at}); calls with this shape run the "
                    "original's eager forward. Simplify with an example of this shape to graph it instead.",
                    stacklevel=4,
                )
        return self.shapes_ok[sig]

    def structure_holds(self) -> bool:
        """Whether every module still has the submodules it had at capture: free unless some module was
        assigned since (torch's global module registration hook counts assignments, ``None`` included)."""
        if _TREE_VERSION[0] == self.tree_version:
            return True
        if list(map(_SUBMODULES, self.modules)) != self.structure:
            return False
        self.tree_version = _TREE_VERSION[0]
        return True

    def follow_tensors(self) -> bool:
        """Re-bind re-assigned tensors; ``False`` when one changed shape (the graph must be captured again)."""
        for current, gm_owner, field in self.tensors:
            now, held = current(), getattr(gm_owner, field)
            if now is held:
                continue
            if not isinstance(now, torch.Tensor) or now.shape != held.shape:
                return False
            _rebind(gm_owner, field, now)
            self.live.add(id(now))
            self.graph_changed()
        return True

    def graph_changed(self) -> None:
        """The graph module holds other tensors now (a re-bind; ``.double()``, ``.to()`` on the graph module):
        the compiled check, which holds the graph's tensors as constants, is compiled anew on the next call."""
        self.__dict__.pop("holds", None)

    def scalars_hold(self) -> bool:
        """Whether the Python numbers traced code read are unchanged, or their change does not alter the graph."""
        attributes = [(m, k) for m, k, v in self.scalars if _snapshot(m.__dict__.get(k, self), self.live, copy=False) != v]
        moved = [f"{type(m).__name__}.{k}" for m, k in attributes]
        moved += [r.where for r, v in self.reads if _snapshot(r.value(), self.live, copy=False) != v]
        self.moved = []
        if not moved:
            return True
        changed = sorted(set(moved))
        start, read = time.perf_counter(), []
        if not retraces_same(self.root, self.example_inputs, self.code, read):
            self.moved = attributes
            return False
        if self.attributes_read is not None:  # another path to the same graph may read other attributes
            self.attributes_read = None if None in read else self.attributes_read.union(*read)
        self.scalars = self._numbers()
        self.reads = [(r, _snapshot(r.value(), self.live)) for r, _ in self.reads]
        if not self.retrace_warned.issuperset(changed):
            self.retrace_warned.update(changed)
            warnings.warn(
                f"topofx: {', '.join(changed)} changed since capture; a re-trace ({time.perf_counter() - start:.1f} s) "
                "showed the graph does not depend on it, but every change is checked this way. Keep per-step "
                "counters off the modules whose forward is traced, or ignore this if it changes rarely.",
                stacklevel=4,
            )
        return True

    def warn_hooks(self) -> None:
        for name, module in self.uncalled:
            if (module._forward_hooks or module._forward_pre_hooks) and id(module) not in self.hooks_warned:
                self.hooks_warned.add(id(module))
                warnings.warn(
                    f"topofx: forward hooks on {name or 'the model'} ({type(module).__name__}) will not fire: the "
                    "simplified graph does not call this module (its forward was traced through or rewritten). "
                    "Hook a module the graph calls, or run the original model where the hook is needed.",
                    stacklevel=4,
                )

    def hooks_scanned(self) -> bool:
        """Scan for hooks on the modules the graph does not call (a hook was registered somewhere since
        the last scan: torch's global hook-handle counter moved) and warn; true: a hook only warns."""
        self.hooks_seen = _hooks_registered()
        self.warn_hooks()
        return True

    def values_hold(self) -> bool:
        """Whether the decisions forward took on architecture values at capture still come out the same
        (``if w != 0`` after a projection, a stage switch); ``changed`` names the ones that did not."""
        guard = self.value_guard
        self.changed = guard.changed(self.root) if guard is not None else []
        return not self.changed

    def verdict(self, inputs: Sequence[Any]) -> str:
        """``"graph"``, ``"eager"`` (this input shape takes another path) or ``"recapture"``."""
        try:  # the compiled check scans for hooks first where one was registered since the last scan
            unchanged = self.holds()
        except Warning:  # a warning turned into an error (``-W error``): the user's to see, as raised
            raise
        except Exception:  # noqa: BLE001 - a check that cannot run is a change: the step-by-step path says which
            unchanged = False
        if not unchanged:
            scalars = self.scalars
            if not (self.structure_holds() and self.follow_tensors() and self.floats_hold() and self.inputs_hold()
                    and self.scalars_hold()
                    and self.values_hold()):
                return "recapture"
            if self.scalars is not scalars:  # snapshotted again (the graph does not depend on the change)
                self.compile()
        return "graph" if not self.shape_decisions or self.shapes_allow(inputs) else "eager"
