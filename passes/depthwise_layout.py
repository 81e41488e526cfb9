"""Depthwise convolutions computed in channels-last layout on the CPU (topo mode's lowering).

Matches: ``nn.Conv2d`` calls that are depthwise (``groups == in_channels > 1``, zero padding, no
hooks) -- the first stages of DARTS's separable and dilated candidates.
Produces: a :class:`~topofx.modules.ChannelsLastDepthwise` at the same module path of the graph
module (the original model is untouched: the graph module has its own containers), which converts
its input to channels-last, convolves, and converts back: the rest of the graph stays NCHW.
Same output values (measured bit-equal); the weight gradient sums in another order (~1e-6
relative), so exact mode, whose contract is the original's arithmetic, does not run it.
"""
from __future__ import annotations

from topofx.modules import ChannelsLastDepthwise
from topofx.rewrite import PassContext, Rewrite


def depthwise_layout(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    records = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = gm.get_submodule(node.target)
        if not ChannelsLastDepthwise.supports(conv) or conv._forward_hooks or conv._forward_pre_hooks:
            continue
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent), leaf, ChannelsLastDepthwise(conv))
        records.append(Rewrite("depthwise_layout", "layout", [node.name], node.name, False,
                               "depthwise conv computed channels-last"))
    return records


depthwise_layout.name = "depthwise_layout"
depthwise_layout.exact = False
