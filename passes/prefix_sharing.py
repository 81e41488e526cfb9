"""Partial module sharing / prefix sharing (exact).

Matches: two or more deterministic, stateless operations with equal configuration applied to the
same arguments -- e.g. every candidate's ``ReLU(x)`` on every edge leaving node ``x``, or the
``AvgPool2d`` of several edges.  Stateless modules (no parameters, no buffers, not random, not in
place) compare by :func:`topofx.ir.module_config` (stock ``torch.nn`` classes only), functions and
methods by target and arguments.
Produces: one node computing the value, feeding all former users.  Exact: the same function of the
same tensor, so outputs and gradients are unchanged.  Repeated to a fixpoint this shares whole
stateless prefixes.
"""
from __future__ import annotations

from typing import Any, Hashable

import torch
import torch.fx as fx

from topofx.ir import is_mutated, is_pure, reads_mutated, stateless_module_key
from topofx.rewrite import PassContext, Rewrite


def _key(node: fx.Node, gm: fx.GraphModule) -> Hashable | None:
    if node.op not in ("call_module", "call_function", "call_method") or not is_pure(node, gm):
        return None
    if node.op == "call_module":
        target: Any = stateless_module_key(node, gm)
        if target is None:
            return None
    else:
        target = node.target
    tensors: list[bool] = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: tensors.append(isinstance(a, torch.Tensor)))
    if any(tensors):  # constants compare by identity only; leave them alone
        return None
    try:
        args = repr((node.args, sorted(node.kwargs.items())))  # Nodes print as %name: unique per graph
        hash(target)
    except TypeError:
        return None
    return (node.op, target, args)


def prefix_sharing(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    seen: dict[Hashable, fx.Node] = {}
    records = []
    for node in list(gm.graph.nodes):
        key = _key(node, gm)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is node or is_mutated(node, gm) or is_mutated(first, gm) or reads_mutated(node, gm):
            continue
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        records.append(Rewrite("prefix_sharing", "shared", [node.name], first.name, True, f"{first.format_node()[:80]}"))
    return records


prefix_sharing.name = "prefix_sharing"
prefix_sharing.exact = True
