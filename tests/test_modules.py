"""The runtime modules that rewritten graphs call, against the torch modules they stand for."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from topofx.modules import ChannelsLastDepthwise, ConvAvgPool2d, FusedBatchNorm2d, RecomputedScale, inner, weighted_sum


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


def _saved_shapes(fn):
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_avg_pool_saves_nothing_and_keeps_layout(layout):
    """The pooling is linear: backward needs no saved input (autograd's conv would keep it)."""
    pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    x = torch.randn(2, 4, 7, 7).to(memory_format=layout).requires_grad_()
    got, saved = _saved_shapes(lambda: ConvAvgPool2d(pool)(x))
    assert saved == []
    _, saved_by_autograd = _saved_shapes(lambda: nn.functional.conv2d(x, torch.ones(4, 1, 3, 3), None, 1, 1, 1, 4))
    assert (2, 4, 7, 7) in saved_by_autograd  # what the custom backward avoids
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g)
    (gx_expected,) = torch.autograd.grad(pool(x), x, g)
    assert torch.allclose(gx, gx_expected, rtol=1e-6, atol=1e-7)
    assert gx.is_contiguous(memory_format=layout)


def _plain_sum(terms, weights):
    out = 0
    for t, w in zip(terms, weights):
        out = out + (t if w is None else t * w)
    return out


@pytest.mark.parametrize("first_weighted", [True, False])
def test_weighted_sum_equals_plain_expression(first_weighted):
    torch.manual_seed(0)
    terms = [torch.randn(2, 3, 5, 5, requires_grad=True) for _ in range(4)]
    weights = [torch.rand((), requires_grad=True) if first_weighted else None, torch.rand((), requires_grad=True),
               None, torch.rand(1, requires_grad=True)]
    expected = _plain_sum(terms, weights)
    got, saved = _saved_shapes(lambda: weighted_sum(terms, weights))
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert len(saved) == 2 * sum(w is not None for w in weights)  # each weighted term and its weight, nothing else
    leaves = terms + [w for w in weights if w is not None]
    g = torch.randn_like(expected)
    for e, o in zip(torch.autograd.grad(expected, leaves, g), torch.autograd.grad(got, leaves, g)):
        assert o.shape == e.shape and torch.allclose(o, e, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(weighted_sum(terms, weights), expected, rtol=1e-6, atol=1e-6)


def test_weighted_sum_mixed_dtypes_take_the_plain_expression():
    """Under autocast a conv term is low precision while a skip term is float32: no in-place accumulation."""
    a = torch.randn(2, 3, dtype=torch.bfloat16)
    b = torch.randn(2, 3)
    w = torch.tensor(0.5)
    got = weighted_sum([a, b], [w, None])
    assert got.dtype == torch.float32 and torch.equal(got, a * w + b)


def test_inner_is_the_sum_of_products():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.allclose(inner(a, b), (a * b).sum(), rtol=1e-5)
    assert torch.allclose(inner(a.transpose(0, 2), b.transpose(0, 2)), (a * b).sum(), rtol=1e-5)  # not contiguous


@pytest.mark.parametrize("kernel,dilation,stride,bias", [(3, 1, 1, False), (5, 1, 2, True), (3, 2, 1, False)])
def test_channels_last_depthwise_equals_the_convolution(kernel, dilation, stride, bias):
    conv = nn.Conv2d(6, 6, kernel, stride, dilation * (kernel - 1) // 2, dilation, groups=6, bias=bias)
    x = torch.randn(3, 6, 9, 9, requires_grad=True)
    params = [x, *conv.parameters()]
    expected = conv(x)
    got, saved = _saved_shapes(lambda: ChannelsLastDepthwise(conv)(x))
    assert got.is_contiguous() and torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert (3, 6, 9, 9) in saved and all(s in {(3, 6, 9, 9), tuple(conv.weight.shape)} for s in saved)  # the NCHW input only
    g = torch.randn_like(expected)
    for e, o in zip(torch.autograd.grad(expected, params, g), torch.autograd.grad(got, params, g)):
        assert o.shape == e.shape and torch.allclose(o, e, rtol=1e-5, atol=1e-5)
    assert ChannelsLastDepthwise.supports(conv)
    assert not ChannelsLastDepthwise.supports(nn.Conv2d(6, 6, 3, groups=3))  # grouped, not depthwise
    assert not ChannelsLastDepthwise.supports(nn.Conv2d(6, 6, 3, groups=6, padding_mode="reflect"))


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
