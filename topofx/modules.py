"""Runtime modules that rewritten graphs call.  They hold the *original* modules (same Parameter and
buffer objects) and compute fused results from them on every call, so gradients, optimizers and
checkpoints keep working on the original parameters.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cost import channels_last_pays, is_small, spans_image
from .ir import module_config


def conv_geometry(conv: nn.Conv2d) -> Hashable | None:
    """What two convolutions must share to be fused by concatenating output channels (None: never)."""
    return module_config(conv, ignore=("out_channels",))


class FusedConv2d(nn.Module):
    """Convolutions that read the same tensor with the same geometry, run as one convolution.

    The output holds the convolutions' outputs concatenated along channels, in order.  Exact.
    """

    is_conv = True

    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        geometry = {conv_geometry(c) for c in convs}
        if len(geometry) != 1 or None in geometry or any(type(c) is not nn.Conv2d or c.groups != 1 for c in convs):
            raise ValueError("FusedConv2d needs ungrouped nn.Conv2d modules of one geometry")
        self.convs = nn.ModuleList(convs)
        self.splits = [c.out_channels for c in convs]

    def forward(self, x: torch.Tensor, live: Sequence[bool] | None = None) -> torch.Tensor:
        """``live``: run only the convolutions marked True (``topofx.sparse``: this call's selected ones)."""
        convs = list(self.convs) if live is None else [c for c, on in zip(self.convs, live) if on]
        first = convs[0]
        weight = torch.cat([c.weight for c in convs]) if len(convs) > 1 else first.weight
        bias = (torch.cat([c.bias for c in convs]) if len(convs) > 1 else first.bias) if first.bias is not None else None
        return first._conv_forward(x, weight, bias)  # the stock path: honours padding_mode


def affine_dtype(bn: nn.BatchNorm2d, y: torch.Tensor) -> torch.dtype:
    """The dtype ``F.batch_norm`` needs for a computed affine weight: the BN's own (running statistics or
    parameters; under autocast a low-precision input meets full-precision BN state), else the input's."""
    state = bn.running_mean if bn.running_mean is not None else bn.weight
    return state.dtype if state is not None else y.dtype


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along dim 0; one tensor is returned as is when it is contiguous (no copy:
    per-call ops dominate the step of a small supernet, and one fused block -- a folded weight -- is
    the common case), else as the contiguous copy ``cat`` makes (an expanded scale: batch norm's
    channels-last kernel rounds differently on a stride-0 weight)."""
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0].contiguous()


def _scalar(s: torch.Tensor) -> torch.Tensor:
    """A one-element tensor as 0-dim (a 0-dim one as is: no view, no ``ViewBackward``)."""
    return s if s.dim() == 0 else s.reshape(())


def bn_config(bn: nn.BatchNorm2d) -> Hashable | None:
    """What batch norms must share to run as one batch norm over concatenated channels (None: never)."""
    return module_config(bn, ignore=("num_features",))


class FusedBatchNorm2d(nn.Module):
    """BatchNorm2d modules applied to consecutive channel blocks of one tensor, run as one call,
    each block optionally scaled by a scalar (an architecture weight folded into the affine map).

    ``forward(y, *scales)``: with ``scales`` (one 0-dim tensor or ``None`` per block) block k returns
    ``scale_k * BN_k(y_k)``, computed as one ``F.batch_norm`` whose affine weight (and bias) are
    multiplied by ``scale_k``: the normalized output is then not saved a second time for the
    multiplication's backward.  BN is per-channel, so one call over the concatenated channels equals
    the separate calls; running statistics are computed on a concatenated copy and written back
    into each original module's buffers (``num_batches_tracked`` included).  Exact.  When the
    modules disagree at run time (one switched to eval alone, different ``num_batches_tracked`` with
    cumulative momentum) it runs them one by one.  ``live`` (``topofx.sparse``) runs only the marked
    blocks: the others' statistics stay as they are.
    """

    is_bn = True

    def __init__(self, bns: Sequence[nn.BatchNorm2d]):
        super().__init__()
        configs = {bn_config(b) for b in bns}
        if len(configs) != 1 or None in configs or any(type(b) is not nn.BatchNorm2d for b in bns):
            raise ValueError("FusedBatchNorm2d needs stock BatchNorm2d modules of one configuration")
        self.bns = nn.ModuleList(bns)
        self.splits = [b.num_features for b in bns]

    @staticmethod
    def _uniform(bns: Sequence[nn.BatchNorm2d]) -> bool:
        first = bns[0]
        if any(b.training != first.training for b in bns):
            return False
        if first.momentum is None and first.track_running_stats:
            counts = {None if b.num_batches_tracked is None else int(b.num_batches_tracked) for b in bns}
            return len(counts) == 1
        return True

    @staticmethod
    def _affine(bns: Sequence[nn.BatchNorm2d], scales: Sequence[torch.Tensor | None], y: torch.Tensor):
        if not scales or all(s is None for s in scales):
            if not bns[0].affine:
                return None, None
            return _cat([b.weight for b in bns]), _cat([b.bias for b in bns])
        weights, biases = [], []
        for bn, s in zip(bns, scales):
            if bn.affine:
                weights.append(bn.weight if s is None else bn.weight * s)
            else:
                dtype = affine_dtype(bn, y)
                weights.append(y.new_ones(bn.num_features, dtype=dtype) if s is None else _scalar(s).to(dtype).expand(bn.num_features))
            if bn.affine:
                biases.append(bn.bias if s is None else bn.bias * s)
        return _cat(weights), (_cat(biases) if biases else None)

    def forward(self, y: torch.Tensor, *scales: torch.Tensor | None, live: Sequence[bool] | None = None) -> torch.Tensor:
        bns = list(self.bns) if live is None else [b for b, on in zip(self.bns, live) if on]
        if live is not None and scales:
            scales = tuple(s for s, on in zip(scales, live) if on)
        splits = [b.num_features for b in bns]
        if not self._uniform(bns):
            parts = [bn(part) for bn, part in zip(bns, y.split(splits, dim=1))]
            if scales:
                parts = [p if s is None else p * s for p, s in zip(parts, scales)]
            return torch.cat(parts, dim=1)
        first = bns[0]
        tracked = first.track_running_stats and first.running_mean is not None
        update = first.training and tracked
        factor = 0.0
        if update:
            for bn in bns:  # (a lowered functional BN has no counter: its momentum is a number)
                if bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(1)
            factor = first.momentum if first.momentum is not None else (
                1.0 / float(first.num_batches_tracked) if first.num_batches_tracked is not None else 0.0)
        elif first.training:
            factor = first.momentum if first.momentum is not None else 0.0
        mean = _cat([b.running_mean for b in bns]) if tracked else None  # one block: its own buffers,
        var = _cat([b.running_var for b in bns]) if tracked else None  # updated in place as BN does
        weight, bias = self._affine(bns, scales, y)
        use_batch_stats = first.training or not tracked
        out = F.batch_norm(y, mean, var, weight, bias, use_batch_stats, factor, first.eps)
        if update and len(bns) > 1:
            with torch.no_grad():
                for bn, m, v in zip(bns, mean.split(splits), var.split(splits)):
                    bn.running_mean.copy_(m)
                    bn.running_var.copy_(v)
        return out


def effective_kernel(conv: nn.Conv2d) -> tuple[int, int]:
    return tuple(d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation))  # type: ignore[return-value]


def conv_offset(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Padding beyond 'same' alignment; convs with equal offsets and strides produce aligned outputs."""
    ke = effective_kernel(conv)
    if any(k % 2 == 0 for k in ke) or isinstance(conv.padding, str):
        return None
    return tuple(p - (k - 1) // 2 for p, k in zip(conv.padding, ke))  # type: ignore[return-value]


def _dilated_padded(kernel: torch.Tensor, dilation: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Kernel with zeros inserted for its dilation, then zero-padded (centred) to ``size``."""
    if dilation != (1, 1):
        o, i, kh, kw = kernel.shape
        full = kernel.new_zeros(o, i, dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
        full[:, :, :: dilation[0], :: dilation[1]] = kernel
        kernel = full
    ph, pw = size[0] - kernel.shape[2], size[1] - kernel.shape[3]
    return F.pad(kernel, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class MergedConvBN(nn.Module):
    """Floating module sharing + kernel-normalized merge (TopoNAS, METHOD.md 5-6), for one or more
    mixed edges whose Conv->BN candidates read the same tensor ``r``.

    For edge e with candidates S_e and architecture weights w_i (i in S_e), W = sum w_i and
    a_i = w_i / W; per output channel o

        K_o = (sum_i a_i pad(K_io) / ||K_io||) / (sum_i a_i / ||K_io||)

    (the conv bias, where present, is mixed the same way), and the edge's BN-ended candidates are
    replaced by ``W * BN_e(conv(r, K))``: one batch norm with new running statistics, whose affine
    parameters (where the originals have them) are mixed with the a_i; ``W`` is folded into its
    affine weight.  All edges' merged kernels run as one convolution and one batch norm over the
    concatenated channels.  Vertex-exact: at a one-hot w, K is the selected kernel and the output
    equals the selected branch in train mode.  ``forward(r, *w)`` takes the weights edge by edge.

    With ``concat_inputs=True`` (one edge) the candidates' convolutions read *different* tensors
    x_i -- the pointwise stages of separable convolutions, each after its own depthwise conv -- and
    the merge is one convolution over the concatenated inputs, ``K = cat_i(a_i K_i / ||K_i||) /
    sum_i(a_i / ||K_i||)`` along input channels: at a one-hot w only the selected block is non-zero
    and equals K_j.  ``forward(x_1, ..., x_n, *w)``.
    """

    is_conv = True
    is_bn = True

    def __init__(
        self,
        groups: Sequence[Sequence[tuple[nn.Conv2d, nn.BatchNorm2d]]],
        eps: float = 1e-12,
        concat_inputs: bool = False,
    ):
        super().__init__()
        convs = [c for g in groups for c, _ in g]
        bns = [b for g in groups for _, b in g]
        if concat_inputs and (len(groups) != 1 or len({(c.kernel_size, c.dilation) for c in convs}) != 1):
            raise ValueError("concatenated-input merging takes one edge of convolutions of one kernel size")
        self.concat_inputs = concat_inputs
        if len({conv_offset(c) for c in convs}) != 1 or len({c.stride for c in convs}) != 1:
            raise ValueError("MergedConvBN needs convolutions with aligned outputs")
        layout = {(c.groups, c.bias is not None) if concat_inputs else (c.in_channels, c.groups, c.bias is not None) for c in convs}
        bn_configs = {bn_config(b) for b in bns}
        if len(bn_configs) != 1 or None in bn_configs or len(layout) != 1:
            raise ValueError("MergedConvBN needs one BN configuration and one conv input layout")
        if any(len({c.out_channels for c, _ in g}) != 1 for g in groups):
            raise ValueError("the candidates of one edge must have the same output channels")
        self.groups = nn.ModuleList(nn.ModuleList(nn.ModuleList([c, b]) for c, b in g) for g in groups)
        self.sizes = [len(g) for g in groups]
        self.splits = [g[0][0].out_channels for g in groups]
        self.batched = len(set(self.sizes)) == 1 and len(set(self.splits)) == 1  # all edges mix as one (E, K) batch
        kernels = [effective_kernel(c) for c in convs]
        self.kernel = (max(k[0] for k in kernels), max(k[1] for k in kernels))
        first_conv, first_bn = convs[0], bns[0]
        offset = conv_offset(first_conv)
        self.stride = first_conv.stride
        self.padding = tuple(o + (k - 1) // 2 for o, k in zip(offset, self.kernel))
        self.eps = eps
        self.has_bias = first_conv.bias is not None
        self.floated = nn.BatchNorm2d(
            sum(self.splits), eps=first_bn.eps, momentum=first_bn.momentum, affine=False,
            track_running_stats=first_bn.track_running_stats, device=first_conv.weight.device,
            dtype=first_bn.running_mean.dtype if first_bn.running_mean is not None else first_conv.weight.dtype,
        )
        self.mix_affine = first_bn.affine

    def _aligned(self, conv: nn.Conv2d) -> torch.Tensor:
        """The candidate's kernel on the merged conv's grid (dilation zeros inserted, padded)."""
        if self.concat_inputs or (conv.dilation == (1, 1) and tuple(conv.weight.shape[2:]) == self.kernel):
            return conv.weight
        return _dilated_padded(conv.weight, conv.dilation, self.kernel)

    def _merge(self, groups: Sequence[nn.ModuleList], w: torch.Tensor):
        """Kernel, bias, BN scale and shift of edges with equally many candidates of equal width,
        all at once: ``w`` is (E, K), tensors are stacked to (E, K, C_out, ...).  A few batched
        operations per merged conv instead of a dozen small ones per candidate."""
        pairs = [pair for g in groups for pair in g]

        def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(tensors).unflatten(0, w.shape)

        kernels = stacked([self._aligned(conv) for conv, _ in pairs])  # (E, K, O, I, kh, kw)
        w = w.to(kernels.dtype)  # float32 alphas of a .half() model mix half kernels
        total = w.sum(1, keepdim=True)
        a = w / (total + self.eps)
        coeff = a[..., None] / kernels.flatten(3).norm(dim=3).clamp_min(self.eps)  # (E, K, O)
        den = coeff.sum(1) + self.eps  # (E, O)
        terms = coeff[..., None, None, None] * kernels
        # side by side along input channels (concat_inputs), else summed
        num = terms.transpose(1, 2).flatten(2, 3) if self.concat_inputs else terms.sum(1)
        kernel = (num / den[..., None, None, None]).flatten(0, 1)
        bias = None
        if self.has_bias:
            bias = ((coeff * stacked([conv.bias for conv, _ in pairs])).sum(1) / den).flatten()
        if not self.mix_affine:
            return kernel, bias, total.expand(den.shape).flatten(), None
        gamma = (a[..., None] * stacked([bn.weight for _, bn in pairs])).sum(1)
        beta = (a[..., None] * stacked([bn.bias for _, bn in pairs])).sum(1)
        return kernel, bias, (total * gamma).flatten(), (total * beta).flatten()

    @property
    def n_inputs(self) -> int:
        """How many leading arguments of ``forward`` are image inputs (the rest are weights)."""
        return self.sizes[0] if self.concat_inputs else 1

    @property
    def geometry(self) -> tuple:
        """``(stride, padding, dilation, groups)`` of the merged convolution."""
        return self.stride, self.padding, self.groups[0][0][0].dilation if self.concat_inputs else (1, 1), 1

    def mixed(self, ws: Sequence[torch.Tensor]) -> tuple:
        """The merged kernel, conv bias (or None), BN scale and shift (or None) at weights ``ws``."""
        weights = torch.stack([t.reshape(()) for t in ws])
        if self.batched:
            blocks = [(list(self.groups), weights.view(len(self.sizes), self.sizes[0]))]
        else:
            blocks = [([g], w[None]) for g, w in zip(self.groups, weights.split(self.sizes))]
        kernel, bias, scale, shift = (list(parts) for parts in zip(*(self._merge(g, w) for g, w in blocks)))
        return (_cat(kernel), _cat(bias) if self.has_bias else None, _cat(scale),
                _cat(shift) if self.mix_affine else None)

    def normalized(self, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """The floated batch norm of the merged convolution's output ``y`` (updates its statistics)."""
        bn = self.floated
        factor = 0.0
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        use_batch_stats = bn.training or not bn.track_running_stats
        dtype = affine_dtype(bn, y)  # weights may be float32 alphas, y autocast to low precision
        return F.batch_norm(y, bn.running_mean, bn.running_var, scale.to(dtype),
                            shift.to(dtype) if shift is not None else None, use_batch_stats, factor, bn.eps)

    def batch_key(self) -> Hashable | None:
        """What merged modules must share for :class:`MergedKernels` to mix them as one batch (None:
        never): everything :meth:`_merge` reads from ``self``, and the shape its kernels stack to."""
        if not self.batched:
            return None
        conv = self.groups[0][0][0]
        shape = tuple(conv.weight.shape) if self.concat_inputs else (conv.out_channels, conv.in_channels, *self.kernel)
        return (self.concat_inputs, self.kernel, self.eps, self.has_bias, self.mix_affine, self.sizes[0], shape,
                conv.weight.dtype, conv.weight.device)

    def forward(self, *args: torch.Tensor, mixed: tuple | None = None) -> torch.Tensor:
        """``mixed``: this module's :meth:`mixed` result, computed by a :class:`MergedKernels` batch
        (``args`` are then the image inputs alone)."""
        n_inputs = self.n_inputs
        kernel, bias, scale, shift = self.mixed(args[n_inputs:]) if mixed is None else mixed
        r = torch.cat(args[:n_inputs], dim=1) if self.concat_inputs else args[0]
        return self.normalized(F.conv2d(r, kernel, bias, *self.geometry), scale, shift)


class MergedKernels(nn.Module):
    """The :meth:`MergedConvBN.mixed` results of several merged modules of one :meth:`~MergedConvBN.batch_key`
    (the edges of one cell, of cells of one width), computed as one batch each step.

    The merge is a few dozen small operations, forward and backward, whatever the size of its
    kernels; a supernet at a small size (C=4, 16x16, batch 2) spent a quarter of its step in them,
    one set per edge.  Batched, each set runs once for all the edges.  Same values: every edge's
    kernel, bias and BN affine map are computed from its own weights by the same operations
    (the batch dimension is the edge), recomputed on every call (autograd sees every weight and
    architecture weight).  ``forward(*w)`` takes the members' weights in member order and returns one
    ``(kernel, bias, scale, shift)`` per member, for its ``mixed=`` argument."""

    def __init__(self, members: Sequence[MergedConvBN]):
        super().__init__()
        keys = {m.batch_key() for m in members}
        if len(keys) != 1 or None in keys:
            raise ValueError("MergedKernels needs merged modules of one batch key")
        self.members = nn.ModuleList(members)

    def forward(self, *ws: torch.Tensor) -> tuple:
        first = self.members[0]
        groups = [g for m in self.members for g in m.groups]
        weights = torch.stack([t.reshape(()) for t in ws]).view(len(groups), first.sizes[0])
        rows = [len(m.groups) * first.splits[0] for m in self.members]
        parts = [[None] * len(rows) if t is None else t.split(rows) for t in first._merge(groups, weights)]
        return tuple(zip(*parts))


class _ScaledRecompute(torch.autograd.Function):
    """``(w_1 * fn(x), ..., w_n * fn(x))`` that saves only ``x`` and the ``w_i``; ``fn(x)`` is
    computed once in forward and once more in backward."""

    @staticmethod
    def forward(ctx, fn: nn.Module, x: torch.Tensor, *ws: torch.Tensor):  # type: ignore[override]
        ctx.fn = fn
        ctx.save_for_backward(x, *ws)
        with torch.no_grad():
            y = fn(x)
            return tuple(y * w for w in ws)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        x, *ws = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(ctx.needs_input_grad[1])
            y = ctx.fn(xd)
        grad_ws = [
            (g * y.detach()).sum().reshape(w.shape) if needed and g is not None else None
            for g, w, needed in zip(grads, ws, ctx.needs_input_grad[2:])
        ]
        grad_x = None
        if ctx.needs_input_grad[1]:
            total = sum(g * w for g, w in zip(grads, ws) if g is not None)
            grad_x = torch.autograd.grad(y, xd, total)[0]
        return (None, grad_x, *grad_ws)


class RecomputedScale(nn.Module):
    """``w_i * fn(x)`` for each weight ``w_i``, for a cheap stateless ``fn`` (pooling) shared by
    several edges: ``fn`` runs once, its output is not saved for backward (``x``, which the network
    keeps anyway, is) and is recomputed there once.  Returns a tuple, one term per weight.  Exact."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not torch.is_grad_enabled() or not (x.requires_grad or any(w.requires_grad for w in ws)):
            return self._scaled(x, *ws)
        if torch.compiler.is_compiling():  # the compiler's own recomputation (its backward cannot call autograd)
            return checkpoint(self._scaled, x, *ws, use_reentrant=False)
        return _ScaledRecompute.apply(self.fn, x, *ws)

    def _scaled(self, x: torch.Tensor, *ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.fn(x)
        return tuple(y * w for w in ws)


class ConvAvgPool2d(nn.Module):
    """``nn.AvgPool2d`` computed as a depthwise convolution with a ones kernel, divided by the
    per-position count of summed elements.  Same values (a sum of the same terms, then one
    division); several times faster than ``avg_pool2d``'s CPU kernel, which dominated the step
    time of NAS-Bench-201 supernets once their convolutions were fused.  It saves nothing for
    backward (the gradient of a linear map is its transpose, :class:`_LinearPool`).  On other
    devices it calls ``avg_pool2d`` itself."""

    def __init__(self, pool: nn.AvgPool2d):
        super().__init__()
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        self.kernel_size = pair(pool.kernel_size)
        self.stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)
        self.padding = pair(pool.padding)
        self.count_include_pad = bool(pool.count_include_pad)
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (C, H, W, dtype, device) -> (kernel, counts)

    @staticmethod
    def supports(pool: nn.Module) -> bool:
        return (type(pool) is nn.AvgPool2d and module_config(pool) is not None and not pool.ceil_mode
                and pool.divisor_override is None)

    def _kernel_and_counts(self, shape: torch.Size, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ones kernel and the per-position window sizes for inputs of ``shape`` (computed once)."""
        key = (shape[1], shape[-2], shape[-1], like.dtype, like.device)
        if key not in self._constants:
            with torch.no_grad():
                kernel = like.new_ones(shape[1], 1, *self.kernel_size)
                if self.count_include_pad:
                    counts = like.new_full((), float(self.kernel_size[0] * self.kernel_size[1]))
                else:
                    ones = like.new_ones(1, 1, shape[-2], shape[-1])
                    counts = F.conv2d(ones, kernel[:1], None, self.stride, self.padding)
            self._constants[key] = (kernel, counts)
        return self._constants[key]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        kernel, counts = self._kernel_and_counts(x.shape, x)
        return F.conv2d(x, kernel, None, self.stride, self.padding, 1, x.shape[1]) / counts

    def pool_transposed(self, g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The gradient of :meth:`pool` at an input of ``shape`` (the pooling is linear: this is its
        transpose, a transposed convolution with the same ones kernel, applied to ``g / counts``)."""
        kernel, counts = self._kernel_and_counts(shape, g)
        extra = tuple(size - ((out - 1) * s - 2 * p + k)
                      for size, out, s, p, k in zip(shape[-2:], g.shape[-2:], self.stride, self.padding, self.kernel_size))
        return F.conv_transpose2d(g / counts, kernel, None, self.stride, self.padding, extra, shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, False, self.count_include_pad)
        if torch.is_grad_enabled() and x.requires_grad:
            return _LinearPool.apply(self, x)
        return self.pool(x)


class _LinearPool(torch.autograd.Function):
    """:class:`ConvAvgPool2d` saving nothing for backward (autograd's convolution would keep the
    input alive): the gradient of a linear map is its transpose applied to ``g``."""

    @staticmethod
    def forward(ctx, pool: ConvAvgPool2d, x: torch.Tensor):  # type: ignore[override]
        ctx.pool, ctx.shape = pool, x.shape
        return pool.pool(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return None, ctx.pool.pool_transposed(g, ctx.shape)


def is_cpu_image(x: object) -> bool:
    """A 4-D floating-point tensor on the CPU (or on the meta device, where passes propagate shapes)."""
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point() and x.device.type in ("cpu", "meta")


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory layout when it is a 4-D float tensor on the CPU, else ``x``.

    Same values; oneDNN's CPU convolutions, depthwise ones above all, run several times faster on
    channels-last tensors at the narrow widths of NAS supernets, and conv/BN/pool/elementwise
    outputs keep the layout of their inputs."""
    return x.contiguous(memory_format=torch.channels_last) if is_cpu_image(x) else x


def to_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` back in the default (NCHW-contiguous) layout when :func:`to_channels_last` may have
    changed it, so callers get outputs with the strides the original returned."""
    return x.contiguous() if is_cpu_image(x) else x


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` without the product tensor: one ``dot`` over the two buffers when they are
    laid out alike and densely (the usual case), else the plain expression."""
    if a.shape == b.shape and a.stride() == b.stride() and a.is_contiguous() and a.dtype == b.dtype:
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


class _WeightedSum(torch.autograd.Function):
    """``sum_i w_i * t_i`` written into one buffer; backward returns ``g * w_i`` (``g`` itself for
    an unweighted term) and ``<g, t_i>`` for each weight."""

    @staticmethod
    def forward(ctx, weighted: tuple[bool, ...], *tensors: torch.Tensor):  # type: ignore[override]
        terms, weights = _unpack(weighted, tensors)
        ctx.weighted = weighted
        ctx.save_for_backward(*(x for t, w in zip(terms, weights) if w is not None for x in (t, w)))
        return _accumulate(terms, weights)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        needs = iter(ctx.needs_input_grad[1:])
        grads: list[torch.Tensor | None] = []
        for is_weighted in ctx.weighted:
            if not is_weighted:
                grads.append(g if next(needs) else None)
                continue
            t, w = next(saved), next(saved)
            grads.append(g * w if next(needs) else None)
            grads.append(inner(g, t).reshape(w.shape).to(w.dtype) if next(needs) else None)
        return (None, *grads)


def _unpack(weighted: Sequence[bool], tensors: Sequence[torch.Tensor]) -> tuple[list, list]:
    terms, weights, it = [], [], iter(tensors)
    for is_weighted in weighted:
        terms.append(next(it))
        weights.append(next(it) if is_weighted else None)
    return terms, weights


def _accumulate(terms: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | None]) -> torch.Tensor:
    out = terms[0] * weights[0] if weights[0] is not None else terms[0].clone()
    for t, w in zip(terms[1:], weights[1:]):
        if w is None:
            out.add_(t)
        else:
            out.addcmul_(t, w)
    return out


def _keeps_dtype(t: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``t * w`` surely has ``t``'s dtype: equal dtypes, or a 0-dim floating ``w`` times a
    dimensioned floating ``t`` (type promotion does not let such a ``w`` widen ``t``); other pairs take
    the plain expression.  Written with dtype attributes
    only, which ``torch.compile`` traces (``torch.result_type`` breaks its graph)."""
    return w.dtype == t.dtype or (w.dim() == 0 and t.dim() > 0 and w.is_floating_point() and t.is_floating_point())


def weighted_sum(terms: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``w_0 * t_0 + w_1 * t_1 + ...`` (a ``None`` weight is 1), left to right, in one output buffer.

    The node sums of a supernet (``sum(w * op(x) for ...)``, nested per edge and per node) otherwise
    allocate one tensor per product and one per partial sum, and their backward one more per weight
    gradient.  Terms of differing shape, dtype or device (autocast, broadcasting) take the plain
    expression."""
    first = terms[0]
    uniform = all(
        isinstance(t, torch.Tensor) and t.shape == first.shape and t.dtype == first.dtype and t.device == first.device
        and (w is None or (w.numel() == 1 and w.dim() <= t.dim() and w.device == first.device
                          and _keeps_dtype(first, w)))
        for t, w in zip(terms, weights)
    )
    if not uniform:
        out = None
        for t, w in zip(terms, weights):
            term = t if w is None else t * w
            out = term if out is None else out + term
        return out
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*terms, *weights) if x is not None):
        return _WeightedSum.apply(tuple(w is not None for w in weights),
                                  *(x for t, w in zip(terms, weights) for x in ((t,) if w is None else (t, w))))
    return _accumulate(terms, weights)


def is_depthwise(conv: nn.Module) -> bool:
    """A stock depthwise ``nn.Conv2d`` (``groups == in_channels == out_channels``) with zero padding
    given as numbers (what ``convolution_backward`` takes); with or without bias, any stride and dilation."""
    return (type(conv) is nn.Conv2d and module_config(conv) is not None and conv.groups == conv.in_channels == conv.out_channels
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _geometry(conv: nn.Conv2d) -> tuple:
    return conv.stride, conv.padding, conv.dilation, conv.groups


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: tuple,
          channels_last: bool = False) -> torch.Tensor:
    """``F.conv2d``; ``channels_last``: computed in channels-last layout, NCHW in and out."""
    if channels_last:
        return F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, *geometry).contiguous()
    return F.conv2d(x, weight, bias, *geometry)


def _conv_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, geometry: tuple,
                   mask: Sequence[bool], channels_last: bool = False) -> tuple:
    """The gradients of :func:`_conv` for input, weight and bias that ``mask`` asks for (else None):
    the call autograd's own convolution backward makes."""
    if channels_last:
        g, x = g.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    stride, padding, dilation, groups = geometry
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False, (0, 0), groups,
        (mask[0], mask[1], has_bias and mask[2]))
    return (gx.contiguous() if channels_last and gx is not None else gx), gw, gb


class ChannelsLastDepthwise(nn.Module):
    """A depthwise ``nn.Conv2d`` computed in channels-last layout on the CPU, NCHW in and out.

    oneDNN's NCHW depthwise kernels are several times slower than its channels-last ones on the CPU
    (forward+backward at 64x16x32x32: 5x5 28.8 -> 9.2 ms, dilated 3x3 16.5 -> 11.5 ms, conversions
    included); the rest of the graph stays NCHW (PyTorch's NCHW batch norm is the more accurate).
    Same output values; the weight gradient's summation order differs (~1e-6 relative).  Saves the
    NCHW input, as the convolution itself would; backward converts it again.  Other devices and
    layouts, and inputs where the layout does not pay (:mod:`topofx.cost`: small tensors, a kernel
    spanning more than the image), call the convolution as is."""

    is_conv = True

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and module_config(conv) is not None and conv.groups > 1 and conv.groups == conv.in_channels
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and channels_last_pays(conv))

    def applies(self, x: torch.Tensor) -> bool:
        """Whether an input is computed channels-last (else the convolution runs as is)."""
        return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and not is_small(x) and spans_image(self.conv, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.applies(x):
            return self.conv(x)
        return _ChannelsLastConv.apply(x, self.conv.weight, self.conv.bias, self.conv)


class _ChannelsLastConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d):  # type: ignore[override]
        ctx.geometry, ctx.has_bias = _geometry(conv), bias is not None
        ctx.save_for_backward(x, weight)
        return _conv(x, weight, bias, ctx.geometry, channels_last=True)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        return (*_conv_backward(g, x, weight, ctx.has_bias, ctx.geometry, ctx.needs_input_grad, channels_last=True), None)


def _conv_stage(consumer: nn.Module, rest: Sequence[torch.Tensor], mixed: tuple | None = None) -> tuple:
    """``(kernel, bias, geometry, finish)`` of a convolution reading depthwise outputs: a stock
    ``nn.Conv2d``, a :class:`FusedConv2d` or a :class:`MergedConvBN` (``rest``: its weights, or
    ``mixed``: its merge computed by a :class:`MergedKernels`; ``finish``: its batch norm, else None)."""
    if isinstance(consumer, MergedConvBN):
        kernel, bias, scale, shift = consumer.mixed(rest) if mixed is None else mixed
        return kernel, bias, consumer.geometry, lambda y: consumer.normalized(y, scale, shift)
    convs = list(consumer.convs) if isinstance(consumer, FusedConv2d) else [consumer]
    first = convs[0]
    kernel = torch.cat([c.weight for c in convs]) if len(convs) > 1 else first.weight
    bias = (torch.cat([c.bias for c in convs]) if len(convs) > 1 else first.bias) if first.bias is not None else None
    return kernel, bias, _geometry(first), None


def _depthwise_then_conv(slots: tuple, geometry: tuple, n: int, *tensors: torch.Tensor) -> torch.Tensor:
    """``conv(cat_i(dw_i(x_i)), kernel, bias)``; ``tensors``: the n ``x_i``, each slot's depthwise
    weight and bias (None for an input read as is), the kernel and bias; ``slots``: per input, the
    depthwise geometry (None: read as is) and whether it runs channels-last."""
    xs, params, (kernel, bias) = tensors[:n], tensors[n:3 * n], tensors[3 * n:]
    outs = [x if geom is None else _conv(x, params[2 * i], params[2 * i + 1], geom, cl)
            for i, (x, (geom, cl)) in enumerate(zip(xs, slots))]
    return F.conv2d(torch.cat(outs, dim=1) if n > 1 else outs[0], kernel, bias, *geometry)


class _DepthwiseRecompute(torch.autograd.Function):
    """:func:`_depthwise_then_conv` saving the ``x_i`` (and the kernel) but not the depthwise outputs:
    backward computes them again, then makes the convolution backward calls autograd would make."""

    @staticmethod
    def forward(ctx, slots: tuple, geometry: tuple, n: int, *tensors: torch.Tensor):  # type: ignore[override]
        ctx.slots, ctx.geometry, ctx.n, ctx.has_bias = slots, geometry, n, tensors[-1] is not None
        ctx.save_for_backward(*tensors[:-1])
        return _depthwise_then_conv(slots, geometry, n, *tensors)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        n, slots = ctx.n, ctx.slots
        saved = ctx.saved_tensors
        xs, params, kernel = saved[:n], saved[n:3 * n], saved[3 * n]
        needs = ctx.needs_input_grad[3:]
        grads: list[torch.Tensor | None] = [None] * (3 * n + 2)
        outs = [x if geom is None else _conv(x, params[2 * i], params[2 * i + 1], geom, cl)
                for i, (x, (geom, cl)) in enumerate(zip(xs, slots))]
        r = torch.cat(outs, dim=1) if n > 1 else outs[0]
        del outs
        gr, grads[3 * n], grads[3 * n + 1] = _conv_backward(g, r, kernel, ctx.has_bias, ctx.geometry,
                                                            (any(needs[:3 * n]), needs[3 * n], needs[3 * n + 1]))
        del r
        if gr is None:
            return (None, None, None, *grads)
        parts = gr.split([x.shape[1] for x in xs], dim=1) if n > 1 else (gr,)
        for i, (x, part, (geom, cl)) in enumerate(zip(xs, parts, slots)):
            if geom is None:
                grads[i] = part if needs[i] else None
                continue
            weight, bias = params[2 * i], params[2 * i + 1]
            grads[i], grads[n + 2 * i], grads[n + 2 * i + 1] = _conv_backward(
                part, x, weight, bias is not None, geom, (needs[i], needs[n + 2 * i], needs[n + 2 * i + 1]), cl)
        return (None, None, None, *grads)


class RecomputedDepthwise(nn.Module):
    """Depthwise convolutions and the one convolution that reads their outputs -- a separable or
    dilated convolution's pointwise stage: a stock ``nn.Conv2d``, a :class:`FusedConv2d`, or a
    :class:`MergedConvBN` over the concatenated outputs of several candidates' depthwise stages --
    computed in one autograd function that saves the depthwise *inputs* (the ReLU outputs the network
    keeps anyway) instead of the depthwise outputs, and computes those again in backward.  Exact:
    the same convolutions forward, the same ``convolution_backward`` calls backward.

    ``forward`` takes the consumer's arguments with each depthwise output replaced by the depthwise
    input (``depthwise[i]`` is None where the consumer reads its argument as is).  A
    :class:`ChannelsLastDepthwise` keeps its channels-last layout on the CPU.  Under ``torch.compile``
    it is a non-reentrant checkpoint (the compiler recomputes; one graph)."""

    is_conv = True

    def __init__(self, depthwise: Sequence[nn.Module | None], consumer: nn.Module):
        super().__init__()
        if any(m is not None and self.unwrap(m) is None for m in depthwise) or not self.reads(consumer):
            raise ValueError("RecomputedDepthwise needs depthwise convolutions and a supported convolution reading them")
        self.depthwise = nn.ModuleList(nn.Identity() if m is None else m for m in depthwise)
        self.consumer = consumer
        self.is_bn = bool(getattr(consumer, "is_bn", False))
        # per input: read as is, a depthwise conv, or a ChannelsLastDepthwise (decided here: forward stays traceable)
        self.kinds = tuple("as_is" if m is None else "channels_last" if type(m) is ChannelsLastDepthwise else "conv"
                           for m in depthwise)

    @staticmethod
    def reads(consumer: nn.Module) -> int:
        """How many leading arguments of a supported consumer are image inputs (0: not supported)."""
        if isinstance(consumer, MergedConvBN):
            return consumer.n_inputs
        if type(consumer) is FusedConv2d or (type(consumer) is nn.Conv2d and module_config(consumer) is not None):
            first = consumer.convs[0] if type(consumer) is FusedConv2d else consumer
            return int(first.padding_mode == "zeros" and not isinstance(first.padding, str))
        return 0

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Conv2d | None:
        """The depthwise convolution a module computes (itself or a :class:`ChannelsLastDepthwise`'s), or None."""
        conv = module.conv if type(module) is ChannelsLastDepthwise else module
        return conv if is_depthwise(conv) else None

    def forward(self, *args: torch.Tensor, mixed: tuple | None = None) -> torch.Tensor:
        """``mixed``: the :class:`MergedConvBN` consumer's merge, computed by a :class:`MergedKernels`."""
        n = len(self.depthwise)
        xs = args[:n]
        kernel, bias, geometry, finish = _conv_stage(self.consumer, args[n:], mixed)
        slots, params = [], []
        for x, m, kind in zip(xs, self.depthwise, self.kinds):
            conv = None if kind == "as_is" else m.conv if kind == "channels_last" else m
            slots.append((None, False) if conv is None else
                         (_geometry(conv), kind == "channels_last" and m.applies(x)))
            params += (None, None) if conv is None else (conv.weight, conv.bias)
        tensors = (*xs, *params, kernel, bias)
        slots = tuple(slots)
        if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
            y = _depthwise_then_conv(slots, geometry, n, *tensors)
        elif torch.compiler.is_compiling():  # the compiler's own recomputation
            y = checkpoint(_depthwise_then_conv, slots, geometry, n, *tensors, use_reentrant=False)
        else:
            y = _DepthwiseRecompute.apply(slots, geometry, n, *tensors)
        return finish(y) if finish is not None else y
