"""Recompute cheap stateless branches in backward instead of saving them (exact).

Matches: a weighted term ``w * p`` (either operand order) where ``w`` is an architecture factor and
``p = pool(x)`` is a stateless module (no parameters, buffers or hooks; deterministic; not in
place) whose every user is such a product (a pooling shared by several edges) -- the pooling
candidates of NAS-Bench-201 and DARTS.
Produces: one :class:`~topofx.modules.RecomputedScale` ``(x, w_1, ..., w_n)`` per pooling, whose
outputs are the n terms: the pooling runs once, only ``x`` (already kept by the network: the skip
candidate multiplies it) and the weights are saved, and the pooling is recomputed once in backward.
Exact (same arithmetic); trades one cheap pooling for one activation per node.  In topo mode it
runs after ``weighted_sum`` (which pools weighted sums of inputs instead, for average poolings) and
so handles the remaining ones (max pooling).
"""
from __future__ import annotations

import operator

from topofx.ir import is_mutated, reads_mutated
from topofx.modules import RecomputedScale
from topofx.rewrite import PassContext, Rewrite, is_stateless_call, node_order
from topofx.topology import data_dependent, weighted_term


def recompute(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    data = data_dependent(gm.graph)
    records = []
    for out in list(gm.graph.nodes):
        if not is_stateless_call(gm, out) or is_mutated(out, gm) or reads_mutated(out, gm):
            continue
        terms = [weighted_term(u, data) for u in out.users]
        if not out.users or not all(t is not None and t[1] is out for t in terms):
            continue  # some user needs the pooled value itself: keep it
        name = ctx.add_module("recompute", RecomputedScale(gm.get_submodule(out.target)))
        muls = list(out.users)
        with gm.graph.inserting_before(min(muls, key=node_order(gm.graph))):
            node = gm.graph.call_module(name, (out.args[0], *[w for w, _ in terms]))
        for i, mul in enumerate(muls):
            with gm.graph.inserting_after(node):
                term = gm.graph.call_function(operator.getitem, (node, i))
            term.meta.update(mul.meta)
            mul.replace_all_uses_with(term)
            gm.graph.erase_node(mul)
        records.append(Rewrite("recompute", "fused", [m.name for m in muls] + [out.name], node.name, True,
                               f"{out.target} shared by {len(muls)} weighted terms, recomputed in backward"))
        gm.graph.erase_node(out)
    return records


recompute.name = "recompute"
recompute.exact = True
