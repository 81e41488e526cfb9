"""Depthwise convolutions computed in channels-last layout on the CPU (topo mode's lowering).

Matches: ``nn.Conv2d`` calls that are depthwise (``groups == in_channels > 1``, zero padding, no
hooks) -- the first stages of DARTS's separable and dilated candidates.
Produces: a :class:`~topofx.modules.ChannelsLastDepthwise` at the same module path of the graph
module (the original model is untouched: the graph module has its own containers), which converts
its input to channels-last, convolves, and converts back: the rest of the graph stays NCHW.
Same output values (measured bit-equal); the weight gradient sums in another order (~1e-6
relative), so exact mode, whose contract is the original's arithmetic, does not run it.
Serves the CPU only: the gain is oneDNN's; on CUDA cuDNN runs NCHW depthwise convolutions natively and
a layout change per convolution would add two copies for no documented gain.
"""
from __future__ import annotations

from topofx.modules import ChannelsLastDepthwise
from topofx.rewrite import PassContext, Rewrite, swap_modules


def depthwise_layout(ctx: PassContext) -> list[Rewrite]:
    return [Rewrite("depthwise_layout", "layout", [node.name], node.name, False, "depthwise conv computed channels-last")
            for node in swap_modules(ctx.gm, ChannelsLastDepthwise.supports, ChannelsLastDepthwise)]


depthwise_layout.name = "depthwise_layout"
depthwise_layout.exact = False
depthwise_layout.devices = ("cpu",)
