"""Recompute cheap stateless branches in backward instead of saving them (exact).

Matches: a weighted term ``w * p`` (either operand order) where ``w`` is an architecture factor and
``p = pool(x)`` is a stateless module (no parameters, buffers or hooks; deterministic; not in
place) whose every user is such a product (a pooling shared by several edges) -- the pooling candidates of NAS-Bench-201 and DARTS.
Produces: :class:`~topofx.modules.RecomputedScale` ``(x, w)``, which computes the same value but
saves only ``x`` (already kept by the network: the skip candidate multiplies it) and ``w``, and
recomputes ``pool(x)`` in backward.  Exact (same arithmetic); trades a cheap pooling for one
activation per node.
"""
from __future__ import annotations

import torch.fx as fx

from topofx.modules import RecomputedScale
from topofx.rewrite import PassContext, Rewrite, is_mutated, is_pure, reads_mutated
from topofx.topology import data_dependent, weighted_term


def _stateless_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    mod = gm.get_submodule(node.target)
    return is_pure(node, gm) and not any(True for _ in mod.parameters()) and type(mod).__module__.startswith("torch.nn")


def recompute(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    data = data_dependent(gm.graph)
    records = []
    for out in list(gm.graph.nodes):
        if not _stateless_call(gm, out) or is_mutated(out, gm) or reads_mutated(out, gm):
            continue
        terms = [weighted_term(u, data) for u in out.users]
        if not out.users or not all(t is not None and t[1] is out for t in terms):
            continue  # some user needs the pooled value itself: keep it
        fn = gm.get_submodule(out.target)
        for mul, (weight, _) in zip(list(out.users), terms):
            name = ctx.add_module("recompute", RecomputedScale(fn))
            with gm.graph.inserting_before(mul):
                new = gm.graph.call_module(name, (out.args[0], weight))
            new.meta.update(mul.meta)
            mul.replace_all_uses_with(new)
            gm.graph.erase_node(mul)
            records.append(Rewrite("recompute", "fused", [mul.name, out.name], new.name, True, f"{out.target} recomputed in backward"))
        gm.graph.erase_node(out)
    return records


recompute.name = "recompute"
recompute.exact = True
