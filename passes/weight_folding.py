"""Fold an architecture weight into the batch norm it multiplies (exact).

Matches: ``w * BN(y)`` (either operand order) where ``w`` is an architecture factor (a one-element
tensor independent of the inputs) and the ``BatchNorm2d`` output has no other user.
Produces: one :class:`~topofx.modules.FusedBatchNorm2d` call ``BN(y; scale=w)`` whose affine weight
and bias are multiplied by ``w``.  The value and the gradients of ``y``, the BN parameters and ``w``
are the same (up to float rounding), and the normalized output is no longer kept alive for the
multiplication's backward -- one saved activation less per conv candidate.  Horizontal fusion later
merges such scaled batch norms that follow fused convolutions.
Left out where the BN output is small (``topofx.cost.is_small_node``): the folded affine map costs more
per call than the product it saves, and the activation it frees is negligible there.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from topofx.cost import is_small_node
from topofx.ir import is_mutated, module_config, reads_mutated
from topofx.modules import FusedBatchNorm2d
from topofx.rewrite import PassContext, Rewrite, called_once
from topofx.topology import data_dependent, is_mul, weighted_term


def _plain_bn(gm: fx.GraphModule, node: fx.Node) -> nn.BatchNorm2d | None:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    mod = gm.get_submodule(node.target)
    if type(mod) is not nn.BatchNorm2d or module_config(mod) is None:
        return None
    return mod


def weight_folding(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    data = data_dependent(gm.graph)
    once = called_once(gm)
    records = []
    for node in list(gm.graph.nodes):
        if not is_mul(node):
            continue
        found = weighted_term(node, data)
        if found is None:
            continue
        weight, out = found
        bn = _plain_bn(gm, out)
        if (bn is None or id(bn) not in once or len(out.users) != 1 or is_mutated(out, gm) or reads_mutated(out, gm)
                or is_small_node(out)):
            continue
        name = ctx.add_module("bn", FusedBatchNorm2d([bn]))
        with gm.graph.inserting_before(node):
            folded = gm.graph.call_module(name, (out.args[0], weight))
        folded.meta.update(node.meta)
        node.replace_all_uses_with(folded)
        gm.graph.erase_node(node)
        gm.graph.erase_node(out)
        records.append(Rewrite("weight_folding", "fused", [node.name, out.name], folded.name, True, f"{weight.name} folded into {out.target}"))
    return records


weight_folding.name = "weight_folding"
weight_folding.exact = True
