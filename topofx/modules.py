"""Runtime modules that rewritten graphs call.  They hold the *original* modules (same Parameter and
buffer objects) and compute fused results from them on every call, so gradients, optimizers and
checkpoints keep working on the original parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_geometry(conv: nn.Conv2d) -> tuple:
    """What two convolutions must share to be fused by concatenating output channels."""
    return (
        conv.in_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.padding_mode,
        conv.bias is not None,
        conv.weight.dtype,
    )


class FusedConv2d(nn.Module):
    """Convolutions that read the same tensor with the same geometry, run as one convolution.

    The output holds the convolutions' outputs concatenated along channels, in order.  Exact.
    """

    is_conv = True

    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        geometry = {conv_geometry(c) for c in convs}
        if len(geometry) != 1 or any(type(c) is not nn.Conv2d or c.groups != 1 for c in convs):
            raise ValueError("FusedConv2d needs ungrouped nn.Conv2d modules of one geometry")
        self.convs = nn.ModuleList(convs)
        self.splits = [c.out_channels for c in convs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.convs[0]
        weight = torch.cat([c.weight for c in self.convs])
        bias = torch.cat([c.bias for c in self.convs]) if first.bias is not None else None
        return F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation, first.groups)


def bn_config(bn: nn.BatchNorm2d) -> tuple:
    """What batch norms must share to run as one batch norm over concatenated channels."""
    return (type(bn), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)


class FusedBatchNorm2d(nn.Module):
    """BatchNorm2d modules applied to consecutive channel blocks of one tensor, run as one call.

    BN is per-channel, so one ``F.batch_norm`` over the concatenated channels equals the separate
    calls; running statistics are computed on a concatenated copy and written back into each
    original module's buffers (``num_batches_tracked`` included).  Exact.  When the modules
    disagree at run time (one switched to eval alone, different ``num_batches_tracked`` with
    cumulative momentum) it runs them one by one.
    """

    is_bn = True

    def __init__(self, bns: Sequence[nn.BatchNorm2d]):
        super().__init__()
        if len({bn_config(b) for b in bns}) != 1:
            raise ValueError("FusedBatchNorm2d needs batch norms of one configuration")
        self.bns = nn.ModuleList(bns)
        self.splits = [b.num_features for b in bns]

    def _uniform(self) -> bool:
        first = self.bns[0]
        if any(b.training != first.training for b in self.bns):
            return False
        if first.momentum is None and first.track_running_stats:
            return len({int(b.num_batches_tracked) for b in self.bns}) == 1
        return True

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        bns = list(self.bns)
        if not self._uniform():
            return torch.cat([bn(part) for bn, part in zip(bns, y.split(self.splits, dim=1))], dim=1)
        first = bns[0]
        tracked = first.track_running_stats and first.running_mean is not None
        update = first.training and tracked
        factor = 0.0
        if update:
            for bn in bns:
                bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(first.num_batches_tracked) if first.momentum is None else first.momentum
        elif first.training:
            factor = first.momentum if first.momentum is not None else 0.0
        mean = torch.cat([b.running_mean for b in bns]) if tracked else None
        var = torch.cat([b.running_var for b in bns]) if tracked else None
        weight = torch.cat([b.weight for b in bns]) if first.affine else None
        bias = torch.cat([b.bias for b in bns]) if first.affine else None
        use_batch_stats = first.training or not tracked
        out = F.batch_norm(y, mean, var, weight, bias, use_batch_stats, factor, first.eps)
        if update:
            with torch.no_grad():
                for bn, m, v in zip(bns, mean.split(self.splits), var.split(self.splits)):
                    bn.running_mean.copy_(m)
                    bn.running_var.copy_(v)
        return out
