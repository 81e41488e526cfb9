"""When the CPU lowerings pay: deterministic rules from shapes and module configuration, no timing.

A rewrite that replaces one kernel by another (average pooling as a convolution, a depthwise
convolution in channels-last layout) or trades compute for memory (recomputing a depthwise
convolution in backward) adds calls of fixed cost -- oneDNN primitive setup, layout copies,
autograd nodes, a few tens to hundreds of microseconds each on the CPU -- in exchange for work
that scales with the tensor.  On small tensors (the public codebases' smoke sizes: C=4, 16x16,
batch 2) the fixed costs exceed the savings and the simplified step ran slower than the original's.
Rules that change what autograd saves (pooling as a convolution saves nothing; a recomputed
depthwise convolution saves its input instead of its output; a weight folded into a batch norm saves
one activation less) are decided by the passes, from the
shapes of the example inputs (the nodes' meta values): the graph, and so its activation memory, is
one linear function of the batch (``topofx.estimate``).  The layout rule, which changes time only,
is asked by :class:`~topofx.modules.ChannelsLastDepthwise` on every call, from the input's shape.
The values are the same either way.

Measured (torch 2.13 CPU, 1 thread, forward + backward, CPU time per call, median):

* ``avg_pool2d`` against :class:`~topofx.modules.ConvAvgPool2d` (3x3, stride 1): the convolution
  takes 2.6x / 1.9x / 1.4x the time at 2k / 4k / 8k input elements, 0.93x at 16k, 0.3-0.8x from 32k.
* depthwise NCHW against channels-last (:class:`~topofx.modules.ChannelsLastDepthwise`): channels-last
  is 2.2-2.7x slower for dilated kernels at stride 2 at every size measured (3x3 and 5x5, 128k-1M
  elements); it pays for 5x5 kernels and stride-1 dilated ones from 4k-8k elements (0.4-0.9x), not
  below (0.9-1.2x at 2k), and not where the dilated kernel spans more than the image (5x5 dilation 2 on
  8x8: 1.4x); undilated 3x3 kernels measured 0.75-2.4x from run to run (left as they were).
* folding an architecture weight into the batch norm it multiplies (:class:`~topofx.modules.FusedBatchNorm2d`,
  ``passes/weight_folding.py``) against ``w * BN(y)``: 1.24-1.36x the time from 512 to 16k elements,
  1.10-1.23x at 32k-64k, 0.85-1.00x from 128k without affine parameters and 1.03-1.10x with them: it is
  for the saved activation, which it buys from 16k elements.
* a node's weighted sum as one accumulation (:func:`~topofx.modules.weighted_sum`, ``passes/weighted_sum.py``)
  against ``sum(w * t ...)`` over 5 terms: 1.22x / 1.14x / 1.06x the time at 2k / 8k / 16k elements,
  1.00x at 32k, 0.80x at 256k.
* recomputing a depthwise convolution in backward (:class:`~topofx.modules.RecomputedDepthwise`)
  against saving its output: 1.3-1.5x the time of the depthwise + pointwise pair at 2k-8k elements,
  1.0-1.1x from 128k -- there it buys the activation memory it is for.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .ir import shape_of

SMALL_IMAGE = 16384
"""Image tensors with fewer elements than this (64 KiB in float32) are run by the stock kernels: the
lowerings' fixed per-call costs outweigh their savings there, and the activation memory a
recomputation would free is negligible."""


def is_small(x: torch.Tensor) -> bool:
    """Whether ``x`` is below :data:`SMALL_IMAGE` elements (the stock kernel is the faster)."""
    return x.numel() < SMALL_IMAGE


def is_small_node(node: object) -> bool:
    """Whether a graph node's meta value is a tensor below :data:`SMALL_IMAGE` elements (an unknown
    shape is not small: the lowering applies, as it did before these rules)."""
    shape = shape_of(node)
    return shape is not None and math.prod(shape) < SMALL_IMAGE


def channels_last_pays(conv: nn.Conv2d) -> bool:
    """Whether a depthwise convolution's configuration may gain from channels-last layout on the CPU:
    all but dilated kernels at a stride above 1 (those run faster NCHW)."""
    return max(conv.dilation) == 1 or tuple(conv.stride) == (1, 1)


def spans_image(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the convolution's dilated kernel is no larger than ``x``'s spatial size (a larger one
    runs faster NCHW)."""
    span = [d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
    return all(s <= size for s, size in zip(span, x.shape[-2:]))
