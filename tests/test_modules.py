"""The runtime modules that rewritten graphs call, against the torch modules they stand for."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from topofx.modules import ConvAvgPool2d, FusedBatchNorm2d, RecomputedScale


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (3, 2, 0)])
@pytest.mark.parametrize("include_pad", [False, True])
def test_conv_avg_pool_equals_avg_pool(kernel, stride, padding, include_pad):
    pool = nn.AvgPool2d(kernel, stride, padding, count_include_pad=include_pad)
    conv_pool = ConvAvgPool2d(pool)
    for shape in [(2, 3, 9, 9), (1, 4, 8, 11)]:  # odd and even sizes; a second shape uses a fresh cache entry
        x = torch.randn(*shape, requires_grad=True)
        expected = pool(x)
        got = conv_pool(x)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
        g = torch.randn_like(expected)
        (gx_expected,) = torch.autograd.grad(expected, x, g)
        (gx_got,) = torch.autograd.grad(got, x, g)
        assert torch.allclose(gx_got, gx_expected, rtol=1e-6, atol=1e-7)
    assert ConvAvgPool2d.supports(pool)
    assert not ConvAvgPool2d.supports(nn.AvgPool2d(3, 1, 1, ceil_mode=True))


def test_recomputed_scale_equals_weighted_terms():
    pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    ws = [torch.randn((), requires_grad=True) for _ in range(3)]
    gs = [torch.randn(2, 3, 6, 6) for _ in ws]
    expected = [w * pool(x) for w in ws]
    got = RecomputedScale(pool)(x, *ws)
    for e, o in zip(expected, got):
        assert torch.allclose(o, e)
    grads_expected = torch.autograd.grad(expected, [x, *ws], gs)
    grads_got = torch.autograd.grad(got, [x, *ws], gs)
    for e, o in zip(grads_expected, grads_got):
        assert torch.allclose(o, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("affine", [False, True])
def test_fused_batch_norm_with_scales_equals_scaled_bns(affine):
    torch.manual_seed(0)
    bns = [nn.BatchNorm2d(c, affine=affine) for c in (3, 5)]
    refs = [nn.BatchNorm2d(c, affine=affine) for c in (3, 5)]
    for ref, bn in zip(refs, bns):
        ref.load_state_dict(bn.state_dict())
    y = torch.randn(4, 8, 5, 5)
    scales = [torch.tensor(0.3), None]
    got = FusedBatchNorm2d(bns)(y, *scales)
    parts = y.split([3, 5], dim=1)
    expected = torch.cat([refs[0](parts[0]) * scales[0], refs[1](parts[1])], dim=1)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    for ref, bn in zip(refs, bns):
        assert torch.allclose(bn.running_mean, ref.running_mean) and torch.allclose(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1
