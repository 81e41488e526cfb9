"""Distribute an edge's weights over the skip sums its candidates end in (topo mode; vertex-exact).

Matches: a mixed edge two or more of whose candidates end in a sum with one shared summand,
``w_k * (x + c_k)`` (MobileNet / ProxylessNAS inverted-residual candidates: ``op(x) + x``; any
operand order, ``+`` / ``torch.add`` / ``.add``), where the sum and its summands have the product's
shape and dtype (no broadcasting), the sum feeds only its product, and none of them is written in
place.  The structure decides (an architecture factor times a sum over a shared tensor), never names.
Produces: ``w_k * c_k`` in each such term's place and one term ``(w_a + w_b + ...) * x`` at the
end of the edge's sum: ``sum_k w_k * (x + c_k) = sum_k w_k * c_k + (sum_k w_k) * x``.  The
candidates' own outputs ``c_k`` (a ``Conv -> BN`` stage) now meet the join, so floating merge,
which runs after this pass, can float and merge them; the skip is added once instead of once per
candidate.
Exactness: equal in real arithmetic, but ``w * x + w * c`` rounds differently from ``w * (x + c)``
(and each weight's gradient is two reductions, ``g.c + g.x``, instead of one) -- exact mode's
contract is the original's arithmetic, so, as ``weighted_sum``, this pass runs in topo mode only.
It is vertex-exact, bit for bit in the forward: at one-hot weights the sum of the weights is exactly
1, every other term is an exact zero, and ``c_j + x`` is ``x + c_j``.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx

from topofx.ir import reads_mutated, value_of
from topofx.rewrite import PassContext, Rewrite, rebuild_chain
from topofx.topology import Candidate, MixedEdge, is_add


def _same_layout(*nodes: Any) -> bool:
    """All are tensors of one shape and dtype (the product's: distributing adds no broadcast)."""
    values = [value_of(n) if isinstance(n, fx.Node) else None for n in nodes]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return False
    return len({(tuple(v.shape), v.dtype) for v in values}) == 1


def _summands(gm: fx.GraphModule, cand: Candidate) -> tuple[fx.Node, fx.Node] | None:
    """The two summands of the sum a candidate ends in, if distributing its weight over them is safe."""
    s = cand.output
    if not is_add(s) or set(s.users) != {cand.mul} or not all(isinstance(a, fx.Node) for a in s.args):
        return None
    a, b = s.args
    if a is b or not _same_layout(cand.mul, s, a, b):
        return None
    if reads_mutated(s, gm) or reads_mutated(cand.mul, gm):  # summands, the sum, the weight
        return None
    return a, b


def _skip_members(gm: fx.GraphModule, edge: MixedEdge) -> tuple[fx.Node, list[tuple[Candidate, fx.Node]]] | None:
    """``(x, [(candidate, c_k)])``: the summand most of the edge's skip-sum candidates share (two or
    more of them), with each one's other summand; None when no summand is shared."""
    by_summand: dict[fx.Node, list[tuple[Candidate, fx.Node]]] = defaultdict(list)
    for cand in edge.candidates:
        pair = _summands(gm, cand)
        if pair is not None:
            a, b = pair
            by_summand[a].append((cand, b))
            by_summand[b].append((cand, a))
    if not by_summand:
        return None
    x, members = max(by_summand.items(), key=lambda item: len(item[1]))
    return (x, members) if len(members) >= 2 else None


def _distribute(ctx: PassContext, edge: MixedEdge, x: fx.Node, members: list[tuple[Candidate, fx.Node]]) -> Rewrite:
    """Rebuild the edge's sum with ``w_k * c_k`` terms and one ``(sum_k w_k) * x`` term."""
    graph = ctx.gm.graph
    replaced: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(edge.chain.root):
        for cand, c in members:
            replaced[cand.mul] = graph.call_function(operator.mul, (cand.weight, c))
        total = members[0][0].weight
        for cand, _ in members[1:]:
            total = graph.call_function(operator.add, (total, cand.weight))
        skip = graph.call_function(operator.mul, (total, x))
    rebuild_chain(ctx.gm, edge.chain.root, [replaced.get(t, t) for t in edge.chain.terms] + [skip])
    return Rewrite(
        "distribute", "distributed", [n.name for cand, _ in members for n in (cand.mul, cand.output)], skip.name,
        False, f"{len(members)} weights distributed over the skip sums of their candidates (the skip {x.name} once)",
    )


def distribute(ctx: PassContext) -> list[Rewrite]:
    records = []
    touched: set[fx.Node] = set()  # a sum is rebuilt at most once per application (cf. floating_merge)
    for edge in ctx.topology.edges:
        found = _skip_members(ctx.gm, edge)
        sum_nodes = {n for n in (*edge.chain.adds, *edge.chain.terms) if isinstance(n, fx.Node)}
        if found is None or sum_nodes & touched:
            continue
        records.append(_distribute(ctx, edge, *found))
        touched |= sum_nodes
    return records


distribute.name = "distribute"
distribute.exact = False
