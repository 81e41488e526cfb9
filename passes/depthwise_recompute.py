"""Recompute depthwise convolutions in backward instead of saving their outputs (exact).

Matches: a convolution call -- a stock ``nn.Conv2d``, a :class:`~topofx.modules.FusedConv2d`, or a
:class:`~topofx.modules.MergedConvBN` (topo mode's merge of separable and dilated candidates, which
reads their depthwise stages' outputs concatenated) -- one or more of whose image inputs is the
output of a depthwise convolution (``groups == in_channels == out_channels``, zero padding; a plain
``nn.Conv2d`` or a :class:`~topofx.modules.ChannelsLastDepthwise`) that nothing else reads: the
pointwise stage of DARTS's separable and dilated candidates.  No hooks; no value involved is
mutated in place.
Produces: one :class:`~topofx.modules.RecomputedDepthwise` call per such convolution, reading the
depthwise convolutions' inputs: it saves those (the ReLU outputs the network keeps anyway: the
candidates of an edge share them) instead of the depthwise outputs the convolution would save, and
computes the depthwise outputs again in backward -- one depthwise convolution per stage more, one
activation per stage less.  Exact: the same convolutions forward and the same ``convolution_backward``
calls backward.  A consumer whose depthwise inputs all have fewer than
:data:`topofx.cost.SMALL_IMAGE` elements (known from the example inputs) is left as it is: the memory
freed is negligible there and the extra convolution call costs more than the step saves (measured in
:mod:`topofx.cost`).  Runs in topo mode's lowering after ``depthwise_layout`` (whose channels-last
layout it keeps) and before ``batched_merge``, on every device.
"""
from __future__ import annotations

import torch.fx as fx

from topofx.cost import is_small_node
from topofx.ir import is_mutated, reads_mutated
from topofx.modules import RecomputedDepthwise
from topofx.rewrite import PassContext, Rewrite


def _hooked(module) -> bool:
    return any(bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in module.modules())


def _depthwise_arg(gm: fx.GraphModule, consumer: fx.Node, arg: object) -> bool:
    """Whether ``arg`` is a depthwise convolution call read by ``consumer`` alone, once."""
    if not isinstance(arg, fx.Node) or arg.op != "call_module" or list(arg.users) != [consumer]:
        return False
    if consumer.args.count(arg) != 1 or len(arg.args) != 1 or arg.kwargs or not isinstance(arg.args[0], fx.Node):
        return False
    module = gm.get_submodule(arg.target)
    return (RecomputedDepthwise.unwrap(module) is not None and not _hooked(module)
            and not is_mutated(arg, gm) and not reads_mutated(arg, gm))


def depthwise_recompute(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    records = []
    for consumer in list(gm.graph.nodes):
        if consumer.op != "call_module" or consumer.kwargs:
            continue
        module = gm.get_submodule(consumer.target)
        n = RecomputedDepthwise.reads(module)
        if not n or _hooked(module) or (n == 1 and len(consumer.args) != 1) or len(consumer.args) < n:
            continue
        found = {i: arg for i, arg in enumerate(consumer.args[:n]) if _depthwise_arg(gm, consumer, arg)}
        if not found or all(is_small_node(arg.args[0]) for arg in found.values()):
            continue
        depthwise = [gm.get_submodule(found[i].target) if i in found else None for i in range(n)]
        name = ctx.add_module("depthwise_recompute", RecomputedDepthwise(depthwise, module))
        args = tuple(found[i].args[0] if i in found else arg for i, arg in enumerate(consumer.args))
        with gm.graph.inserting_before(consumer):
            node = gm.graph.call_module(name, args)
        node.meta.update(consumer.meta)
        consumer.replace_all_uses_with(node)
        gm.graph.erase_node(consumer)
        for dw in found.values():
            gm.graph.erase_node(dw)
        records.append(Rewrite("depthwise_recompute", "fused", [dw.name for dw in found.values()] + [consumer.name],
                               node.name, True, f"{len(found)} depthwise conv(s) before {consumer.target} "
                               "recomputed in backward"))
    return records


depthwise_recompute.name = "depthwise_recompute"
depthwise_recompute.exact = True
