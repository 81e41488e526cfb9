"""Python decisions forward takes on architecture values, and the units that decide per call.

A decision on architecture values (``if w > 0``, ``.item()`` of an alpha) is recorded with its value
(:class:`Decision`) and re-evaluated before every call by :class:`ValueGuard` (a few small ops, batched);
a change captures the model anew.  A module forward or method that decides differently from call to
call is a *unit* run per call, as written (:data:`PER_CALL`, :func:`unit_key`)."""
from __future__ import annotations

import dataclasses
import operator
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from ..ir import is_view, mutates

if TYPE_CHECKING:
    from .frames import UserFrame


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

    def __init__(self, unit: Unit, frame: UserFrame | None, gate_shaped: bool = False):
        super().__init__(str(unit))
        self.unit, self.frame = unit, frame  # a module, or (owner, method name); the decision's line
        self.gate_shaped = gate_shaped  # a bool of one element of the draw: a gate may stand for it


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
        batched program (:meth:`batched`) where it reproduces :meth:`changed`'s values."""
        batched = self.batched(root)
        return batched.holds(self, root) if batched is not None else not self.changed(root)

    def batched(self, root: nn.Module) -> "_BatchedDecisions | None":
        """The decisions as one program for ``root`` (built at the first use), ``None`` where it cannot
        reproduce them: then they are evaluated node by node."""
        entry = self._batched.get(id(root))
        if entry is None or entry[0] is not root:
            entry = self._batched[id(root)] = (root, _BatchedDecisions.build(self, root))
        return entry[1]

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
        self.same = _memo_check(root, self.leaves, [guard.held[target] for target in self.leaves])
        # (output, shape of the whole tensor, flat indices, the capture's bools) per group of decisions
        self.groups: list[tuple[int, torch.Size, torch.Tensor, torch.Tensor]] = []
        # (output, convert, expected) per distinct single decision
        self.singles = [(len(groups) + k, *guard.checks[i][:2]) for k, i in enumerate(singles)]
        # the leaves' values at the last run that held, with their dtypes and devices (read once, not per check)
        self.memo: tuple[list[torch.Tensor], list[torch.dtype], list[torch.device]] | None = None
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
        if self.same(root, self.memo):
            return True
        leaves = self._leaves(guard, root)
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
                self.memo = ([x.detach().clone() for x in leaves], [x.dtype for x in leaves], [x.device for x in leaves])
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


def _memo_check(root: nn.Module, targets: list[str], held: list[Any]) -> Callable[[nn.Module, list], bool]:
    """A generated function of ``(root, memo)``, straight-line code: true when each of ``targets`` read off
    ``root`` holds ``memo``'s tensor at its position -- the same dtype, device and values (``torch.equal``:
    another shape is not equal) -- false otherwise: also where a read or comparison raises (a module or
    attribute gone, another kind of object, another device), or there is no memo (``None``).  ``memo`` is
    ``(tensors, their dtypes, their devices)``: the memo's side of the dtype and device comparisons is read
    once, when it is taken (two tensor attribute reads and a ``torch.device`` fewer per tensor and check).

    It is called before every call of the simplified module, after a graph run has left little of what
    it reads in the CPU's caches, so it reads each module on the way once, through the dictionary that
    holds it (``root._modules['cells']._modules['3']``: no ``nn.Module.__getattr__`` call), and compares
    inline.  The dictionary is the one ``getattr`` finds the attribute in at build time: a submodule,
    parameter or buffer is found by ``getattr`` in its dictionary whenever the class and the instance's
    ``__dict__`` lack the name, and ``nn.Module.__setattr__`` / ``__delattr__`` keep each name in one of
    ``__dict__``, ``_parameters``, ``_buffers``, ``_modules`` (an attribute that moves to another one, a
    plain tensor made a parameter, is missing where this function looks: an exception, a change).  Not
    seen, as by :class:`topofx.capture.guards._Assignments`: a name written into ``__dict__`` bypassing
    ``__setattr__`` while a parameter, buffer or submodule has it.  A target the model lacks (a graph
    module's constant, ``held``) is read as :meth:`ValueGuard.leaf` reads it: ``held``'s object while
    none of the module's dictionaries has the name (no ``getattr`` that raises and catches
    ``AttributeError`` on every call); not seen: a class attribute of that name added later."""
    lines, names, reads = [], {(): "root"}, []
    for i, target in enumerate(targets):
        *path, field = target.split(".")
        obj: Any = root
        for depth, part in enumerate(path, 1):
            if tuple(path[:depth]) not in names:
                names[tuple(path[:depth])] = name = f"_m{len(names)}"
                lines.append(f"    {name} = {attribute_read(names[tuple(path[:depth - 1])], obj, part)}")
            obj = getattr(obj, part, None)
        reads.append(attribute_read(names[tuple(path)], obj, field, f"_held[{i}]"))
    checks = [f"(_x := {read}).dtype is _dt[{i}] and _x.device == _dv[{i}] and _equal(_x, _mt[{i}])"
              for i, read in enumerate(reads)]
    namespace: dict[str, Any] = {"_held": held, "_equal": torch.equal}
    source = ("def same(root, _memo):\n    try:\n        _mt, _dt, _dv = _memo\n" + "".join(f"    {line}\n" for line in lines)
              + f"        return {' and '.join(checks) or '_memo is not None'}\n    except Exception:\n        return False\n")
    exec(compile(source, "<topofx value guard memo>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace["same"]


def attribute_read(owner: str, obj: Any, name: str, default: str = "") -> str:
    """Generated code: an expression that gives ``getattr(owner, name)``, where the expression ``owner``
    gives ``obj`` now -- the dictionary item for a submodule, parameter or buffer of ``obj`` (no
    ``nn.Module.__getattr__`` call; a ``KeyError`` once the attribute moved or is gone: see
    :func:`_memo_check` for when it is the same), else ``getattr`` itself (with ``default`` where one is
    given)."""
    if isinstance(obj, nn.Module) and name not in vars(obj) and not hasattr(type(obj), name):
        for where in ("_modules", "_parameters", "_buffers"):
            if name in vars(obj)[where]:
                return f"{owner}.{where}[{name!r}]"
        if default:  # absent (a graph module's constant): the default, unless the module has it now
            absent = " and ".join(f"{name!r} not in {owner}.{where}" for where in ("__dict__", "_modules", "_parameters", "_buffers"))
            return f"({default} if {absent} else getattr({owner}, {name!r}, {default}))"
    return f"getattr({owner}, {name!r}{', ' + default if default else ''})"


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
