"""The runtime modules that rewritten graphs call, against the torch modules they stand for."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import torch.nn.functional as F

from topofx import cost
from topofx.modules import (
    ChannelsLastDepthwise, ConvAvgPool2d, FusedBatchNorm2d, MergedConvBN, MergedKernels, RecomputedScale, inner,
    weighted_sum,
)


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
def test_conv_avg_pool_saves_nothing_and_keeps_layout(layout, any_size):
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
def test_channels_last_depthwise_equals_the_convolution(kernel, dilation, stride, bias, any_size):
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
    assert not ChannelsLastDepthwise.supports(nn.Conv2d(6, 6, 3, 2, 2, 2, groups=6))  # dilated, stride 2: NCHW is faster


def test_small_inputs_run_the_stock_depthwise_kernel():
    """Below ``topofx.cost.SMALL_IMAGE`` elements the depthwise convolution runs NCHW, as the original
    module does: the same values and gradients bit for bit, and autograd saves what the original saves."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert cost.is_small(x) and not cost.is_small(torch.empty(4, 16, 16, 16))
    conv = nn.Conv2d(4, 4, 5, 1, 2, groups=4)
    got, saved = _saved_shapes(lambda: ChannelsLastDepthwise(conv)(x))
    expected, saved_stock = _saved_shapes(lambda: conv(x))
    assert torch.equal(got, expected) and saved == saved_stock
    g = torch.randn_like(got)
    leaves = [x, *conv.parameters()]
    for o, e in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(expected, leaves, g)):
        assert torch.equal(o, e)
    wide = nn.Conv2d(4, 4, 5, 1, 8, 4, groups=4)  # a dilated kernel spanning 17 > 8 pixels
    assert ChannelsLastDepthwise.supports(wide) and not ChannelsLastDepthwise(wide).applies(torch.randn(64, 4, 8, 8))
    assert ChannelsLastDepthwise(conv).applies(torch.randn(64, 4, 8, 8))


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


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("scale_shape", [(), (1,), None])
def test_one_block_fused_batch_norm_equals_scaled_bn(affine, momentum, scale_shape):
    """One block (a folded architecture weight): the BN's own buffers are used directly, not a
    concatenated copy; outputs, gradients and running statistics stay the scaled BN's, step after step."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, affine=affine, momentum=momentum)
    ref = nn.BatchNorm2d(4, affine=affine, momentum=momentum)
    if affine:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    ref.load_state_dict(bn.state_dict())
    fused = FusedBatchNorm2d([bn])
    for train in (True, True, False):
        fused.train(train)
        ref.train(train)
        y = torch.randn(3, 4, 5, 5, requires_grad=True)
        w = torch.rand(scale_shape or (), requires_grad=True)
        got = fused(y, w) if scale_shape is not None else fused(y)
        expected = ref(y) * w if scale_shape is not None else ref(y)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(got)
        inputs = [y, w] if scale_shape is not None else [y]
        for o, e in zip(torch.autograd.grad(got, inputs + list(bn.parameters()), g),
                        torch.autograd.grad(expected, inputs + list(ref.parameters()), g)):
            assert o.shape == e.shape and torch.allclose(o, e, rtol=1e-4, atol=1e-5)
        for name, buf in ref.named_buffers():
            assert torch.allclose(getattr(bn, name), buf), name


def _edge(C, O, specs, bias):
    """Conv->BN candidates (kernel, dilation) of one edge, affine BNs with random parameters."""
    pairs = []
    for k, d in specs:
        conv = nn.Conv2d(C, O, k, padding=d * (k - 1) // 2, dilation=d, bias=bias).double()
        bn = nn.BatchNorm2d(O).double()
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
        pairs.append((conv, bn))
    return pairs


def _merged_reference(pairs, w, r, eps=1e-12):
    """METHOD.md's merge for one edge, written from the convolutions' linearity in their kernel:
    conv(r, sum_i c_i pad(K_i)) = sum_i c_i conv_i(r), c_i = a_i / ||K_io|| per output channel."""
    total = w.sum()
    a = w / (total + eps)
    coeff = [a[i] / conv.weight.flatten(1).norm(dim=1) for i, (conv, _) in enumerate(pairs)]
    den = sum(coeff) + eps
    y = sum(c[:, None, None] * F.conv2d(r, conv.weight, None, 1, conv.padding, conv.dilation) for c, (conv, _) in zip(coeff, pairs))
    if pairs[0][0].bias is not None:
        y = y + sum(c * conv.bias for c, (conv, _) in zip(coeff, pairs))[:, None, None]
    gamma = sum(a[i] * bn.weight for i, (_, bn) in enumerate(pairs))
    beta = sum(a[i] * bn.bias for i, (_, bn) in enumerate(pairs))
    return F.batch_norm(y / den[:, None, None], None, None, total * gamma, total * beta, True)


@pytest.mark.parametrize("edges,bias,batched", [
    ([(8, [(3, 1), (1, 1), (3, 2)]), (8, [(5, 1), (3, 1), (1, 1)])], False, True),  # one batch over all edges
    ([(8, [(3, 1), (1, 1)]), (6, [(3, 2), (3, 1), (1, 1)])], True, False),  # edges of other sizes: edge by edge
])
def test_merged_conv_bn_equals_the_formula(edges, bias, batched):
    torch.manual_seed(0)
    C = 5
    groups = [_edge(C, O, specs, bias) for O, specs in edges]
    merged = MergedConvBN(groups).double()
    assert merged.batched == batched
    r = torch.randn(4, C, 9, 9, dtype=torch.float64)
    weights = [torch.rand(len(g), dtype=torch.float64) for g in groups]
    got = merged(r, *(w_k for w in weights for w_k in w))
    expected = torch.cat([_merged_reference(g, w, r) for g, w in zip(groups, weights)], dim=1)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    # gradients reach every kernel and BN affine parameter, and every weight
    got.square().sum().backward()
    for g in groups:
        for conv, bn in g:
            assert conv.weight.grad.abs().sum() > 0 and bn.weight.grad.abs().sum() > 0


def test_merged_conv_bn_concatenated_inputs():
    """Pointwise stages after their own depthwise convs: one conv over the concatenated inputs."""
    torch.manual_seed(0)
    group = _edge(4, 6, [(1, 1), (1, 1), (1, 1)], False)
    merged = MergedConvBN([group], concat_inputs=True).double()
    xs = [torch.randn(2, 4, 7, 7, dtype=torch.float64) for _ in group]
    w = torch.rand(3, dtype=torch.float64)
    total, a = w.sum(), w / (w.sum() + 1e-12)
    coeff = [a[i] / conv.weight.flatten(1).norm(dim=1) for i, (conv, _) in enumerate(group)]
    y = sum(c[:, None, None] * F.conv2d(x, conv.weight) for c, x, (conv, _) in zip(coeff, xs, group)) / (sum(coeff) + 1e-12)[:, None, None]
    gamma = sum(a[i] * bn.weight for i, (_, bn) in enumerate(group))
    beta = sum(a[i] * bn.bias for i, (_, bn) in enumerate(group))
    expected = F.batch_norm(y, None, None, total * gamma, total * beta, True)
    assert torch.allclose(merged(*xs, *w), expected, rtol=1e-10, atol=1e-10)


def _merge_members(concat, bias):
    """Three merged modules of one batch key (two edges, one edge, two edges) and their weights."""
    specs = [(1, 1)] * 3 if concat else [(3, 1), (1, 1), (3, 2)]
    members = [MergedConvBN([_edge(5, 4, specs, bias) for _ in range(n)], concat_inputs=concat).double()
               for n in ((1, 1, 1) if concat else (2, 1, 2))]
    weights = [[torch.rand((), dtype=torch.float64, requires_grad=True) for _ in range(sum(m.sizes))] for m in members]
    return members, weights


@pytest.mark.parametrize("concat,bias", [(False, True), (False, False), (True, False)])
def test_merged_kernels_equal_each_members_own_merge(concat, bias):
    """One batch computes every member's kernel, bias and BN affine map as the member itself does, with
    the same gradients for kernels, BN parameters and architecture weights; a member given its part
    (``mixed=``) returns what it returns from its weights."""
    torch.manual_seed(0)
    members, weights = _merge_members(concat, bias)
    leaves = [p for m in members for p in m.parameters()] + [w for ws in weights for w in ws]
    batch = MergedKernels(members)(*(w for ws in weights for w in ws))
    own = [m.mixed(ws) for m, ws in zip(members, weights)]
    got, expected = [t for parts in batch for t in parts if t is not None], [t for parts in own for t in parts if t is not None]
    assert len(got) == len(expected) == len(members) * (3 + bias)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and torch.allclose(g, e, rtol=1e-12, atol=1e-12)
    probe = [torch.randn_like(t) for t in expected]
    grads = [torch.autograd.grad(sum((t * p).sum() for t, p in zip(ts, probe)), leaves, allow_unused=True)
             for ts in (got, expected)]
    for g, e in zip(*grads):
        assert (g is None) == (e is None) and (g is None or torch.allclose(g, e, rtol=1e-12, atol=1e-12))
    assert all(w.grad is None for w in leaves)  # (autograd.grad: nothing accumulated)
    xs = [torch.randn(2, 5, 6, 6, dtype=torch.float64) for _ in range(members[0].n_inputs)]
    with torch.no_grad():
        assert torch.allclose(members[0](*xs, mixed=batch[0]), members[0](*xs, *weights[0]), rtol=1e-12, atol=1e-12)


def test_merged_kernels_take_members_of_one_batch_key_only():
    torch.manual_seed(0)
    wide = MergedConvBN([_edge(5, 6, [(3, 1), (1, 1)], False)]).double()  # 6 output channels, not 4
    members, _ = _merge_members(False, False)
    with pytest.raises(ValueError):
        MergedKernels([members[0], wide])
    ragged = MergedConvBN([_edge(5, 4, [(3, 1), (1, 1)], False), _edge(5, 4, [(3, 1)] * 3, False)])
    assert ragged.batch_key() is None  # edges of different sizes mix one by one: no batch
    with pytest.raises(ValueError):
        MergedKernels([ragged, ragged])


def test_keeps_dtype_agrees_with_type_promotion():
    """weighted_sum's compile-traceable dtype check never claims a dtype torch.result_type would not
    give (a wrong yes would accumulate in the wrong dtype; a no only takes the plain expression), and
    says yes where supernets need it: equal dtypes, and a 0-dim alpha weight on an autocast activation."""
    from topofx.modules import _keeps_dtype

    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for t_dtype, w_dtype in itertools.product(dtypes, dtypes):
        for t_shape, w_shape in itertools.product(((), (2, 3)), ((), (1,))):
            t, w = torch.ones(t_shape, dtype=t_dtype), torch.ones(w_shape, dtype=w_dtype)
            promoted_keeps = torch.result_type(t, w) == t.dtype
            assert promoted_keeps or not _keeps_dtype(t, w), (t_dtype, t_shape, w_dtype, w_shape)
            if t_dtype == w_dtype or (t_shape and not w_shape):
                assert _keeps_dtype(t, w), (t_dtype, t_shape, w_dtype, w_shape)
