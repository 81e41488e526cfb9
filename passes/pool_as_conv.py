"""Average pooling as a depthwise convolution (exact).

Matches: ``nn.AvgPool2d`` calls (no ``ceil_mode``, no ``divisor_override``) -- the pooling candidates.
Produces: a :class:`~topofx.modules.ConvAvgPool2d` at the same module path of the graph module (the
original model is untouched: the graph module has its own containers): the same sum of the same window, divided by
the same count, computed by a depthwise convolution with a ones kernel.  On the CPU this is several
times faster than ``avg_pool2d``'s kernel; on other devices the module calls ``avg_pool2d``.
Exact up to float rounding of the division.
"""
from __future__ import annotations

from topofx.modules import ConvAvgPool2d
from topofx.rewrite import PassContext, Rewrite


def pool_as_conv(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    records = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        pool = gm.get_submodule(node.target)
        if not ConvAvgPool2d.supports(pool) or pool._forward_hooks or pool._forward_pre_hooks:
            continue
        parent, _, leaf = node.target.rpartition(".")  # same path: cells and edges keep their names
        setattr(gm.get_submodule(parent), leaf, ConvAvgPool2d(pool))  # the graph module's own container
        records.append(Rewrite("pool_as_conv", "fused", [node.name], node.name, True, "AvgPool2d as depthwise conv"))
    return records


pool_as_conv.name = "pool_as_conv"
pool_as_conv.exact = True
