"""Decisions on random draws made in forward.  A decision that came out the same on
:data:`RESAMPLES` fresh draws at capture is *speculated*: the graph checks it per call
(:func:`speculation_check`, hoisted before any state change by :func:`hoist_speculation`) and a call whose
draw decides otherwise runs the original forward instead."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from ..ir import SPECULATION, STATIC, VALUE, Effects, is_decided_gate
from .decisions import ValueGuard, _same, computed_by

if TYPE_CHECKING:
    from .decisions import Decision


RESAMPLES = 4  # fresh draws a speculated decision must survive at capture


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
    RNG's (restored by the caller); the decisions of gates (``topofx.capture.gating``) too, so that the
    sparse executor draws the sample and reads them before it plans the call.  ``False``, graph
    untouched, when that would reorder random draws or an in-place update (``ir.Effects``)."""
    checks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is speculation_check]
    checks += [n.args[2] for n in gm.graph.nodes if is_decided_gate(n)]
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
