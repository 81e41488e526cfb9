"""Floating module sharing + kernel-normalized merge (TopoNAS; approximate, vertex-exact).

Matches: on each mixed edge, the candidates that end ``Conv2d -> BatchNorm2d`` (ungrouped conv,
plain BN, each node used only by the next) whose convolutions read the same tensor ``r`` (typically
the ReLU shared by prefix sharing) with aligned outputs (same stride, same padding offset); two or
more per edge.  Edges whose such candidates read the same ``r`` with one geometry are taken together.
Produces: one :class:`~topofx.modules.MergedConvBN` call per ``r``: the edge's BN-ended candidates
float past the weighted join as ``W * BN(conv(r, K))`` with the kernel-normalized merged kernel K
(METHOD.md 5-6), and all edges' merged kernels run as one convolution and one batch norm.  Each
edge's sum keeps its other terms and gains the slice of the merged output that belongs to it.
Not exact for mixed weights; exact at one-hot weights (vertex-exact) in train mode.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch.fx as fx
from torch import nn

from topofx.modules import MergedConvBN, bn_config, conv_offset
from topofx.rewrite import PassContext, Rewrite, is_mutated, rebuild_chain
from topofx.topology import Candidate, MixedEdge


def _conv_bn(gm: fx.GraphModule, cand: Candidate) -> tuple[fx.Node, fx.Node] | None:
    """``(conv_node, bn_node)`` if the candidate ends Conv2d -> BatchNorm2d, each used once."""
    bn_node = cand.output
    if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs or len(bn_node.users) != 1:
        return None
    conv_node = bn_node.args[0]
    if not isinstance(conv_node, fx.Node) or conv_node.op != "call_module" or len(conv_node.users) != 1:
        return None
    if len(conv_node.args) != 1 or conv_node.kwargs or not isinstance(conv_node.args[0], fx.Node):
        return None
    bn, conv = gm.get_submodule(bn_node.target), gm.get_submodule(conv_node.target)
    if type(bn) is not nn.BatchNorm2d or type(conv) is not nn.Conv2d or conv.groups != 1:
        return None
    if conv.padding_mode != "zeros" or conv_offset(conv) is None or conv.out_channels != bn.num_features:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in (bn, conv)) or is_mutated(bn_node, gm):
        return None
    return conv_node, bn_node


def _geometry(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    return (conv.stride, conv_offset(conv), conv.in_channels, conv.bias is not None, conv.weight.dtype, bn_config(bn))


def floating_merge(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    # (r, geometry) -> [(edge, [(candidate, conv_node, bn_node), ...]), ...]
    groups: dict[tuple, list[tuple[MixedEdge, list]]] = defaultdict(list)
    for edge in ctx.topology.edges:
        by_key: dict[tuple, list] = defaultdict(list)
        for cand in edge.candidates:
            found = _conv_bn(gm, cand)
            if found is None:
                continue
            conv_node, bn_node = found
            conv, bn = gm.get_submodule(conv_node.target), gm.get_submodule(bn_node.target)
            by_key[(conv_node.args[0], _geometry(conv, bn), conv.out_channels)].append((cand, conv_node, bn_node))
        for (r, geometry, _), members in by_key.items():
            if len(members) >= 2:
                groups[(r, geometry)].append((edge, members))

    records = []
    for (r, _), edges in groups.items():
        module = MergedConvBN(
            [[(gm.get_submodule(c.target), gm.get_submodule(b.target)) for _, c, b in members] for _, members in edges]
        )
        name = ctx.add_module("merged", module)
        weights = [cand.weight for _, members in edges for cand, _, _ in members]
        with gm.graph.inserting_after(r):
            merged = gm.graph.call_module(name, (r, *weights))
        start, anchor = 0, merged
        for (edge, members), width in zip(edges, module.splits):
            with gm.graph.inserting_after(anchor):
                part = gm.graph.call_function(operator.getitem, (merged, (slice(None), slice(start, start + width))))
            anchor, start = part, start + width
            muls = {cand.mul for cand, _, _ in members}
            terms = [t for t in edge.chain.terms if t not in muls] + [part]
            rebuild_chain(gm, edge.chain.root, terms)
            for adds in reversed(edge.chain.adds):
                if not adds.users:
                    gm.graph.erase_node(adds)
            for cand, conv_node, bn_node in members:
                for node in (cand.mul, bn_node, conv_node):
                    gm.graph.erase_node(node)
            records.append(
                Rewrite(
                    "floating_merge", "merged", [n.name for cand, c, b in members for n in (c, b, cand.mul)], merged.name,
                    False, f"{len(members)} Conv->BN candidates floated and merged (kernel-normalized)",
                    edge=edge.name, cell=edge.cell,
                )
            )
    return records


floating_merge.name = "floating_merge"
floating_merge.exact = False
