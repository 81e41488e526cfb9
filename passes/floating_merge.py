"""Floating module sharing + kernel-normalized merge (TopoNAS; approximate, vertex-exact).

Matches: on each mixed edge, the candidates that end ``Conv2d -> BatchNorm2d`` (ungrouped, zero-padded
conv and BN of one :func:`~topofx.ir.module_config` but kernel size, padding and dilation; each
node used only by the next) whose convolutions read the same tensor ``r`` (typically the ReLU shared
by prefix sharing) with aligned outputs (same stride, same padding offset); two or more per edge.
Edges whose such candidates read the same ``r`` with one geometry are taken together.  Candidates of
one edge whose convolutions read *different* tensors of one width with one kernel shape (the
pointwise stages of separable convolutions, each after its own depthwise conv) are merged too, as
one convolution over their concatenated inputs.  All groups of an edge (the projections of
ProxylessNAS's expand ratios 3 and 6: two widths) merge in one application and its sum is rebuilt
once, after the last (so do the edges of one sum: a ``functools.reduce`` over two edges' terms); an
edge whose sum reads one rebuilt in the same application waits for the next round.
Produces: one :class:`~topofx.modules.MergedConvBN` call per ``r``: the edge's BN-ended candidates
float past the weighted join as ``W * BN(conv(r, K))`` with the kernel-normalized merged kernel K
(METHOD.md 5-6), and all edges' merged kernels run as one convolution and one batch norm.  Each
edge's sum keeps its other terms and gains the slice of the merged output that belongs to it.
Not exact for mixed weights; exact at one-hot weights (vertex-exact) in train mode.
"""
from __future__ import annotations

from collections import defaultdict

import torch.fx as fx
from torch import nn

from topofx.ir import is_mutated, module_config, reads_mutated
from topofx.modules import MergedConvBN, conv_offset
from topofx.rewrite import PassContext, Rewrite, called_once, rebuild_chain, split_channels
from topofx.topology import Candidate, MixedEdge


def _conv_bn(gm: fx.GraphModule, cand: Candidate, once: set[int]) -> tuple[fx.Node, fx.Node] | None:
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
    if _geometry(conv, bn) is None or conv.padding_mode != "zeros" or conv.out_channels != bn.num_features:
        return None  # the merge pads kernels to one size: only zero padding commutes with that
    if any(id(m) not in once for m in (bn, conv)):
        return None
    if is_mutated(bn_node, gm) or reads_mutated(conv_node, gm):
        return None
    return conv_node, bn_node


def _geometry(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple | None:
    """What candidates must share to merge: the conv's configuration but its kernel size, padding,
    dilation (aligned through the padding offset instead) and input width (concatenated inputs may
    differ: the caller adds it where they must not), and the BN's whole configuration."""
    config = module_config(conv, ignore=("kernel_size", "padding", "dilation", "in_channels"))
    bn_full = module_config(bn)
    if config is None or bn_full is None or conv_offset(conv) is None:
        return None
    return (config, conv_offset(conv), bn_full)


def _match(ctx: PassContext) -> tuple[dict, list]:
    """Shared-input groups ``{(r, geometry): [(edge, members)]}`` across edges, and per-edge
    concatenated-input groups ``[(edge, members)]`` of the remaining same-kernel candidates."""
    gm = ctx.gm
    shared: dict[tuple, list[tuple[MixedEdge, list]]] = defaultdict(list)
    concat: list[tuple[MixedEdge, list]] = []
    once = called_once(gm)
    for edge in ctx.topology.edges:
        by_input: dict[tuple, list] = defaultdict(list)
        for cand in edge.candidates:
            found = _conv_bn(gm, cand, once)
            if found is not None:
                conv_node, bn_node = found
                conv, bn = gm.get_submodule(conv_node.target), gm.get_submodule(bn_node.target)
                key = (conv_node.args[0], _geometry(conv, bn) + (conv.in_channels,))
                by_input[key].append((cand, conv_node, bn_node))
        leftovers: dict[tuple, list] = defaultdict(list)
        for key, members in by_input.items():
            if len(members) >= 2:
                shared[key].append((edge, members))
            else:
                conv = gm.get_submodule(members[0][1].target)
                key = _geometry(conv, gm.get_submodule(members[0][2].target)) + (conv.kernel_size, conv.dilation, conv.in_channels)
                leftovers[key] += members  # one kernel shape: the merge stacks their kernels
        concat += [(edge, members) for members in leftovers.values() if len(members) >= 2]
    return shared, concat


def _merge(ctx: PassContext, edges: list[tuple[MixedEdge, list]], inputs: list[fx.Node], concat: bool,
           parts: dict[fx.Node, list]) -> list[Rewrite]:
    """One merged call for ``edges``' members; each edge's slice of its output goes to ``parts``
    under the edge's sum (rebuilt by :func:`_rebuild` once all of the sum's groups are merged)."""
    gm = ctx.gm
    module = MergedConvBN(
        [[(gm.get_submodule(c.target), gm.get_submodule(b.target)) for _, c, b in members] for _, members in edges],
        concat_inputs=concat,
    )
    name = ctx.add_module("merged", module)
    weights = [cand.weight for _, members in edges for cand, _, _ in members]
    with gm.graph.inserting_after(inputs[-1]):
        merged = gm.graph.call_module(name, (*inputs, *weights))
    records = []
    slices = split_channels(gm, merged, module.splits) if len(edges) > 1 else [merged]
    for (edge, members), part in zip(edges, slices):
        parts[edge.join].append((members, part))
        how = "one conv over their concatenated inputs" if concat else "one kernel-normalized conv"
        records.append(
            Rewrite(
                "floating_merge", "merged", [n.name for cand, c, b in members for n in (c, b, cand.mul)], merged.name,
                False, f"{len(members)} Conv->BN candidates floated past the join, merged into {how}",
            )
        )
    return records


def _rebuild(gm: fx.GraphModule, edge: MixedEdge, merged: list[tuple[list, fx.Node]]) -> None:
    """Rebuild the edge's sum once: its other terms and the slice of every group merged out of it."""
    muls = {cand.mul for members, _ in merged for cand, _, _ in members}
    rebuild_chain(gm, edge.chain.root, [t for t in edge.chain.terms if t not in muls] + [part for _, part in merged])
    for add in reversed(edge.chain.adds):
        if not add.users:
            gm.graph.erase_node(add)
    for members, _ in merged:
        for cand, conv_node, bn_node in members:
            for node in (cand.mul, bn_node, conv_node):
                gm.graph.erase_node(node)


def _sum_nodes(edge: MixedEdge) -> set[fx.Node]:
    return {n for n in (*edge.chain.adds, *edge.chain.terms) if isinstance(n, fx.Node)}


def floating_merge(ctx: PassContext) -> list[Rewrite]:
    shared, concat = _match(ctx)
    records = []
    # every group of every edge of a sum merges in one application and the sum is rebuilt once, after
    # all of them (a group left for the next round would meet weight folding first); an edge whose sum
    # reads another one rebuilt here (a chain that runs on into the node's sum) waits for the next
    # round, where the fixpoint comes back with fresh matches
    parts: dict[fx.Node, list] = defaultdict(list)
    taken: dict[fx.Node, MixedEdge] = {}
    touched: set[fx.Node] = set()

    def free(edge: MixedEdge) -> bool:
        if edge.join in taken:  # this edge's, or another edge's of the same sum (a reduce over both's terms)
            return True
        if _sum_nodes(edge) & touched:
            return False
        taken[edge.join] = edge
        touched.update(_sum_nodes(edge))
        return True

    for (r, _), group in shared.items():
        edges = [(edge, members) for edge, members in group if free(edge)]
        if edges:
            records += _merge(ctx, edges, [r], False, parts)
    for edge, members in concat:
        if free(edge):
            records += _merge(ctx, [(edge, members)], [c.args[0] for _, c, _ in members], True, parts)
    for root, merged in parts.items():
        _rebuild(ctx.gm, taken[root], merged)
    return records


floating_merge.name = "floating_merge"
floating_merge.exact = False
