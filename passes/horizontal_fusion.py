"""Horizontal fusion of convolutions and the batch norms that follow them (exact).

Matches: two or more ungrouped ``nn.Conv2d`` nodes reading the same tensor with the same
configuration but their output width (:func:`topofx.ir.module_config`: kernel, stride, padding,
``padding_mode``, dilation, bias presence, dtype, ...) -- e.g. the 3x3 convolutions of every edge
leaving one node once their ReLU is shared.
Produces: one :class:`~topofx.modules.FusedConv2d` whose kernel is the concatenation of the original
kernels (computed from them each call: gradients and optimizers stay on the originals), followed by
a channel split for the former users (run through the stock ``_conv_forward``, so non-zero padding
modes stay what they were).  Where every slice feeds only a ``BatchNorm2d`` of one common
configuration, the batch norms become one :class:`~topofx.modules.FusedBatchNorm2d` over the
concatenated channels, which writes running statistics back to each original module; the slices
move after it.  Exact: convolution and BN act per output channel.
"""
from __future__ import annotations

from collections import defaultdict

import torch.fx as fx
from torch import nn

from topofx.ir import is_mutated, reads_mutated
from topofx.modules import FusedBatchNorm2d, FusedConv2d, bn_config, conv_geometry
from topofx.rewrite import PassContext, Rewrite, called_once, node_order, split_channels


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_plain_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = _module(gm, node)
    return (
        type(mod) is nn.Conv2d and mod.groups == 1 and len(node.args) == 1 and not node.kwargs
        and conv_geometry(mod) is not None
    )


def _is_plain_bn(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = _module(gm, node)
    return type(mod) is nn.BatchNorm2d and bn_config(mod) is not None


def _slice_outputs(gm: fx.GraphModule, fused: fx.Node, nodes: list[fx.Node], splits: list[int]) -> None:
    """Replace each of ``nodes`` by its channel block of ``fused``."""
    for node, part in zip(nodes, split_channels(gm, fused, splits)):
        node.replace_all_uses_with(part)


def _bn_consumer(gm: fx.GraphModule, conv: fx.Node) -> tuple[list[nn.BatchNorm2d], object] | None:
    """``([bn], scale)`` if the conv's only user is a plain BN or a one-block (scaled) fused BN."""
    if len(conv.users) != 1:
        return None
    user = next(iter(conv.users))
    if user.args[:1] != (conv,) or user.kwargs or is_mutated(user, gm):
        return None
    if _is_plain_bn(gm, user) and len(user.args) == 1:
        return [_module(gm, user)], None
    mod = _module(gm, user)
    if isinstance(mod, FusedBatchNorm2d) and len(mod.bns) == 1 and len(user.args) <= 2:
        return [mod.bns[0]], (user.args[1] if len(user.args) == 2 else None)
    return None


def _fuse_convs(ctx: PassContext, convs: list[fx.Node]) -> Rewrite:
    gm = ctx.gm
    mods = [_module(gm, c) for c in convs]
    fused_mod = FusedConv2d(mods)
    name = ctx.add_module("conv", fused_mod)
    with gm.graph.inserting_before(convs[0]):
        fused = gm.graph.call_module(name, (convs[0].args[0],))
    consumers = [_bn_consumer(gm, c) for c in convs]
    fuse_bn = all(consumers) and len({bn_config(c[0][0]) for c in consumers}) == 1
    if fuse_bn:
        bn_nodes = [next(iter(c.users)) for c in convs]
        scales = [scale for _, scale in consumers]
        bn_name = ctx.add_module("bn", FusedBatchNorm2d([c[0][0] for c in consumers]))
        args = (fused, *scales) if any(s is not None for s in scales) else (fused,)
        anchor = max((s for s in scales if isinstance(s, fx.Node)), key=node_order(gm.graph), default=fused)
        anchor = max(anchor, fused, key=node_order(gm.graph))
        with gm.graph.inserting_after(anchor):
            fused_bn = gm.graph.call_module(bn_name, args)
        _slice_outputs(gm, fused_bn, bn_nodes, fused_mod.splits)
        for b in bn_nodes:
            gm.graph.erase_node(b)
    else:
        _slice_outputs(gm, fused, convs, fused_mod.splits)
    for c in convs:
        gm.graph.erase_node(c)
    kernel = "x".join(map(str, mods[0].kernel_size))
    what = f"{len(convs)} conv{kernel}" + (" + their BNs" if fuse_bn else "")
    return Rewrite("horizontal_fusion", "fused", [c.name for c in convs], fused.name, True, what)


def horizontal_fusion(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    once = called_once(gm)
    for node in gm.graph.nodes:
        if (
            _is_plain_conv(gm, node) and isinstance(node.args[0], fx.Node) and not reads_mutated(node, gm)
            and id(_module(gm, node)) in once and all(id(_module(gm, u)) in once for u in node.users if u.op == "call_module")
        ):
            groups[(node.args[0], conv_geometry(_module(gm, node)))].append(node)
    return [_fuse_convs(ctx, convs) for convs in groups.values() if len(convs) >= 2]


horizontal_fusion.name = "horizontal_fusion"
horizontal_fusion.exact = True
