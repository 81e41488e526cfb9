"""Average pooling as a depthwise convolution (exact).

Matches: ``nn.AvgPool2d`` calls (no ``ceil_mode``, no ``divisor_override``) -- the pooling candidates.
Produces: a :class:`~topofx.modules.ConvAvgPool2d` at the same module path of the graph module (the
original model is untouched: the graph module has its own containers): the same sum of the same window, divided by
the same count, computed by a depthwise convolution with a ones kernel.  On the CPU this is several
times faster than ``avg_pool2d``'s kernel; on other devices the module calls ``avg_pool2d``.
Exact up to float rounding of the division.  Pools whose input has fewer than
:data:`topofx.cost.SMALL_IMAGE` elements (known from the example inputs) are left as they are: there
the convolution's fixed per-call cost exceeds what it saves (measured in :mod:`topofx.cost`).
Serves the CPU only: there ``avg_pool2d``'s kernel is the slow one (measured, docs/benchmarks.md); on
CUDA ``avg_pool2d`` is cuDNN's native pooling, which a depthwise convolution (itself a slower class of
kernel on GPUs) cannot beat, so the graph keeps ``nn.AvgPool2d`` there (``weighted_sum`` still pools
once per node).
"""
from __future__ import annotations

from topofx.cost import is_small_node
from topofx.modules import ConvAvgPool2d
from topofx.rewrite import PassContext, Rewrite, swap_modules


def pool_as_conv(ctx: PassContext) -> list[Rewrite]:
    return [Rewrite("pool_as_conv", "fused", [node.name], node.name, True, "AvgPool2d as depthwise conv")
            for node in swap_modules(ctx.gm, ConvAvgPool2d.supports, ConvAvgPool2d, skip=lambda n: is_small_node(n.args[0]))]


pool_as_conv.name = "pool_as_conv"
pool_as_conv.exact = True
pool_as_conv.devices = ("cpu",)
