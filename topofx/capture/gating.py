"""Per-candidate gates from the user's own code: a Python decision on a candidate's own sampled weight.

Hard Gumbel supernets draw a one-hot sample in forward and run a candidate only where its weight
passes a test (``if abs(w) > 1e-10: clist.append(w * op(x))``, ``sum(w * op(x) for w, op in ... if
abs(w) > 1e-10)``).  The decision changes from draw to draw, so it cannot be taken once at capture;
running the whole mixed op per call hides its candidates from topology.  Instead:

* at a Python ``bool`` of exact elementwise ops (``abs``, a comparison with a number) on one element
  of a tensor drawn in forward, or of ``argmax(row) == i`` (NASLib's GDAS: candidate ``i`` is the
  row's selected one; :func:`weight_element`), inside a module forward or method that could run per
  call, the tracer takes the decision as *taken* and opens a :class:`Window`: every node recorded while
  the deciding frame is on the stack, until the next decision on a value;
* after the trace, :func:`make_gates` proves each window holds exactly one *weighted term* -- a
  product of that same weight element and another value -- and nothing else that the original
  computes only when the decision holds: the term's computation is used by the term alone, writes
  nothing outside it, and every other node of the window is pure and uses the term only by adding it
  (the sum that collects the candidates);
* a *probe* trace takes every gate decision as not taken; :func:`dead_rules` reads from its windows
  what the other arm adds: nothing (``if abs(w) > eps``), or the bare weight element (``... else
  weights[i]``), anything else unproven.  The product becomes :func:`topofx.ir.decided_gate`
  ``(w, op(x), decision, dead=...)``: ``topofx.sparse`` draws the sample first, reads the decisions,
  and computes only the candidates they select;
* a window it cannot prove names its unit, which then runs per call as before (never a gate whose
  condition is not the original's).

What the windows cannot see is Python state: a list's length (MiLeNAS's ``clist[0] if len(clist) ==
1 else sum(clist)``) follows the speculated decisions, not the drawn ones, and a probe such code cannot
finish (``clist[0]`` of an empty list) leaves the rule "nothing".  The capture's verification, run
through the sparse executor on several draws, compares values, every gradient (alpha's: the dead
rule) and the BN statistics with the original's; a difference runs the unit per call.
"""
from __future__ import annotations

import dataclasses
import operator
import sys
import types
from typing import Any

import torch
import torch.fx as fx

from ..ir import DRAWN, FROM_INPUT, GATE_DECISIONS, VALUE, decided_gate, is_inplace, is_pure, mutates
from .decisions import _ELEMENTWISE, Decision
from .frames import _is_library_file


@dataclasses.dataclass
class Window:
    """Nodes recorded after a speculated gate decision while the frame that took it is on the stack
    (``nodes``), and all nodes recorded until the next decision (``spanned``: a ``sum`` adds the term
    while the generator that yields it is suspended)."""

    decision: fx.Node
    weight: tuple[fx.Node, tuple[int, ...]]  # the sampled weight element the decision reads
    frame: types.FrameType
    info: Decision
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    spanned: list[fx.Node] = dataclasses.field(default_factory=list)  # every node until the next decision

    def active(self) -> bool:
        """Whether the deciding frame is on the current stack (a suspended generator's is not)."""
        frame = sys._getframe(1)
        while frame is not None:
            if frame is self.frame:
                return True
            frame = frame.f_back
        return False


def element(node: Any) -> tuple[fx.Node, tuple[int, ...]] | None:
    """``(base, path)`` when ``node`` is ``base[i][j]...`` by constant ints."""
    path: list[int] = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if node.kwargs or not all(type(i) is int for i in index):
            return None
        path[:0] = index
        node = node.args[0]
    return (node, tuple(path)) if path and isinstance(node, fx.Node) else None


def _argmax_element(decision: fx.Node) -> tuple[fx.Node, tuple[int, ...]] | None:
    """``(base, path + (i,))`` when ``decision`` is ``argmax(v) == i`` (either order) over a 1-D ``v``
    (``base[path]``): candidate ``i`` is the one selected."""
    if decision.kwargs or len(decision.args) != 2 or not (
            (decision.op == "call_function" and decision.target in (operator.eq, torch.eq))
            or (decision.op == "call_method" and decision.target in ("eq", "__eq__"))):
        return None
    nodes = [a for a in decision.args if isinstance(a, fx.Node)]
    numbers = [a for a in decision.args if type(a) is int]
    if len(nodes) != 1 or len(numbers) != 1:
        return None
    argmax, i = nodes[0], numbers[0]
    if argmax.kwargs or len(argmax.args) != 1 or not isinstance(argmax.args[0], fx.Node) or not (
            (argmax.op == "call_function" and argmax.target is torch.argmax)
            or (argmax.op == "call_method" and argmax.target == "argmax")):
        return None
    row = argmax.args[0]
    value = row.meta.get(VALUE)
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or not 0 <= i < value.shape[0]:
        return None
    base, path = element(row) or (row, ())
    return base, (*path, i)


def weight_element(decision: fx.Node) -> tuple[fx.Node, tuple[int, ...]] | None:
    """The element of a tensor drawn in forward that ``decision`` tests by exact elementwise ops with
    numbers (``abs(w) > 1e-10``, ``w != 0``), or whose row's ``argmax`` it compares with its index
    (``i == argmax``); None otherwise."""
    found = _argmax_element(decision)
    if found is not None:
        return found if found[0].meta.get(DRAWN) and not found[0].meta.get(FROM_INPUT) else None
    node = decision
    while node.op in ("call_function", "call_method") and node.target in _ELEMENTWISE and not node.kwargs:
        at = [k for k, a in enumerate(node.args) if isinstance(a, fx.Node)]
        others = [a for k, a in enumerate(node.args) if k not in at]
        if len(at) != 1 or (node.op == "call_method" and at != [0]) or not all(type(a) in (int, float, bool) for a in others):
            return None
        node = node.args[at[0]]
    found = element(node)
    if found is None or found[0].meta.get(FROM_INPUT) or not found[0].meta.get(DRAWN):
        return None
    return found


def deciding_frame() -> types.FrameType | None:
    """The innermost frame of user code on the stack (where the ``if`` stands)."""
    frame = sys._getframe(1)
    while frame is not None and _is_library_file(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def _same_element(a: Any, key: tuple[fx.Node, tuple[int, ...]]) -> bool:
    found = element(a)
    return found is not None and found[0] is key[0] and found[1] == key[1]


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    return (node.op == "call_function" and node.target in (operator.add, torch.add)) or (
        node.op == "call_method" and node.target in ("add", "__add__"))


def _term(window: Window) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(product, weight operand, term operand)``: the window's one product of its weight element and
    another value (a candidate's output; the input itself for a skip)."""
    found = []
    for node in window.nodes:
        if node.kwargs or len(node.args) != 2 or not (
                (node.op == "call_function" and node.target in (operator.mul, torch.mul))
                or (node.op == "call_method" and node.target in ("mul", "__mul__"))):
            continue
        for w, t in (node.args, node.args[::-1]):
            if _same_element(w, window.weight) and isinstance(t, fx.Node) and not _same_element(t, window.weight):
                found.append((node, w, t))
    return found[0] if len(found) == 1 else None


def _proven(gm: fx.GraphModule, window: Window) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """The window's weighted term when nothing else in the window happens only because the decision
    held (see the module docstring), else None."""
    found = _term(window)
    if found is None:
        return None
    product = found[0]
    inside = set(window.nodes)
    term = {product}
    stack = [product]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in inside and a not in term:
                term.add(a)
                stack.append(a)
    for node in term - {product}:
        if any(u not in term for u in node.users):
            return None  # used by something else: it runs whatever the decision
        if (mutates(node) or is_inplace(node, gm)) and node.args and node.args[0] not in term:
            return None  # writes into a value computed outside the term
    for node in window.nodes:
        if node in term:
            continue
        if not is_pure(node, gm) or any(a in term and a is not product for a in node.all_input_nodes):
            return None
        if product in node.all_input_nodes and not _is_add(node):
            return None
    if not product.users or not all(_is_add(u) for u in product.users):
        return None
    return found


def dead_rules(probe: fx.GraphModule, windows: list[Window]) -> list[str | None]:
    """Per window of a probe trace, which took every gate decision as not taken: ``"nothing"`` where the
    other arm adds nothing, ``"weight"`` where it adds only the bare weight element (``... else w[i]``),
    None where it does anything else."""
    rules: list[str | None] = []
    for window in windows:
        arm = set(window.nodes)
        added = {a for n in window.spanned if _is_add(n) for a in n.all_input_nodes
                 if a in arm or _same_element(a, window.weight)}  # what the arm hands the sum (on the stack or not)
        used = {n for n in window.nodes if any(_is_add(u) for u in n.users)}
        if not all(is_pure(n, probe) for n in window.nodes) or not used <= added:
            rules.append(None)
        elif not added:
            rules.append("nothing")
        elif len(added) == 1 and _same_element(next(iter(added)), window.weight) and (
                added <= arm and all(_is_add(u) for u in next(iter(added)).users) or not added & arm):
            rules.append("weight")
        else:
            rules.append(None)
    return rules


def make_gates(gm: fx.GraphModule, windows: list[Window], rules: list[str | None] | None = None) -> Window | None:
    """Turn each window's weighted term into a :func:`decided_gate` on its decision, dead as ``rules``
    say (from :func:`dead_rules`; ``None``: no probe, the other arm adds nothing); the first window that
    cannot be proven (the graph is then left as traced), or None."""
    proven = []
    for k, window in enumerate(windows):
        found = _proven(gm, window)
        rule = "nothing" if rules is None else rules[k]
        if found is None or rule is None:
            return window
        proven.append((window, found, rule))
    for window, (product, weight, term), rule in proven:
        with gm.graph.inserting_before(product):
            kwargs = {} if rule == "nothing" else {"dead": rule}
            gate = gm.graph.call_function(decided_gate, (weight, term, window.decision), kwargs)
        gate.meta.update(product.meta)
        product.replace_all_uses_with(gate)
        gm.graph.erase_node(product)
    gm.meta[GATE_DECISIONS] = [window.info for window in windows]
    if proven:
        gm.recompile()
    return None
