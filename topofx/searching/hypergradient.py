"""DARTS-V2's architecture gradient (Liu et al., ICLR 2019, eq. 7-8; ``cnn/architect.py``).

The validation loss is taken at one step of unrolled weights ``w' = w - xi * (m + grad_w L_train(w)
+ wd * w)`` (``m``: the weight optimizer's momentum buffer times its momentum, as ``architect.py``
does; ``xi``: the current weight learning rate), and its alpha gradient gets the second-order term
by a finite difference at ``w +- eps * grad_w' L_val(w')``, ``eps = r / ||grad_w' L_val(w')||``::

    grad_alpha L_val(w', alpha) - xi * (grad_alpha L_train(w+) - grad_alpha L_train(w-)) / (2 eps)

The unrolled model is a deep copy (a :class:`~topofx.SimplifiedModule` copies with its original), so
the computation runs through whatever module it is given; in exact mode a simplified module's result
equals the original's (``tests/test_second_order.py``).
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["unrolled_arch_gradients", "GradFn"]

Batch = tuple[torch.Tensor, torch.Tensor]
# (loss, params) -> one gradient per param (None where the loss does not depend on it)
GradFn = Callable[[torch.Tensor, Sequence[torch.Tensor]], list]


def _autograd(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list:
    return list(torch.autograd.grad(loss, list(params), allow_unused=True))


def _split(net: nn.Module, arch_of: Callable[[nn.Module], list]) -> tuple[list, list]:
    alphas = arch_of(net)
    ids = {id(a) for a in alphas}
    return [p for p in net.parameters() if p.requires_grad and id(p) not in ids], alphas


def unrolled_arch_gradients(
    net: nn.Module,
    train: Batch,
    val: Batch,
    *,
    eta: float,
    weight_decay: float = 3e-4,
    momentum_buffers: Mapping[int, torch.Tensor] | None = None,
    r: float = 1e-2,
    loss_of: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
    grad_fn: GradFn = _autograd,
    arch_of: Callable[[nn.Module], list] | None = None,
) -> list[torch.Tensor]:
    """The second-order DARTS gradient of the validation loss w.r.t. each architecture parameter.

    Args:
        net: the supernet (original or simplified); its weights are restored on return (up to the
            rounding of ``w + eps v - 2 eps v + eps v``, as in DARTS), BN statistics move as in DARTS.
        train, val: ``(x, y)`` batches.
        eta: the unrolling step ``xi`` (DARTS: the current weight learning rate).
        weight_decay: the weight optimizer's weight decay (part of the unrolled step).
        momentum_buffers: ``{id(weight): buffer}``: the weight optimizer's momentum buffers, already
            multiplied by its momentum (weights without one unroll without momentum).
        r: the finite-difference radius numerator (DARTS: 0.01).
        loss_of: ``(net, batch) -> loss`` (default: cross entropy of the logits).
        grad_fn: computes gradients (the search engine passes its own, which all-reduces them).
        arch_of: ``net -> architecture parameters`` (default: :func:`topofx.search.arch_parameters`).
    """
    from .step import arch_parameters, logits_of

    arch_of = arch_of or arch_parameters
    if loss_of is None:
        def loss_of(model: nn.Module, batch: Batch) -> torch.Tensor:
            return nn.functional.cross_entropy(logits_of(model(batch[0])), batch[1])

    weights, alphas = _split(net, arch_of)
    grads = grad_fn(loss_of(net, train), weights)
    unrolled = copy.deepcopy(net)
    u_weights, u_alphas = _split(unrolled, arch_of)
    with torch.no_grad():
        for u, w, g in zip(u_weights, weights, grads):
            step = (g if g is not None else torch.zeros_like(w)) + weight_decay * w
            m = momentum_buffers.get(id(w)) if momentum_buffers is not None else None
            if m is not None:
                step = step + m
            u.copy_(w - eta * step)
    val_grads = grad_fn(loss_of(unrolled, val), u_alphas + u_weights)
    d_alpha = [g if g is not None else torch.zeros_like(a) for g, a in zip(val_grads[:len(alphas)], alphas)]
    vector = [g if g is not None else torch.zeros_like(w) for g, w in zip(val_grads[len(alphas):], weights)]
    del unrolled
    radius = r / torch.cat([v.flatten() for v in vector]).norm()

    def alpha_grads_at(step: float) -> list:
        with torch.no_grad():
            for w, v in zip(weights, vector):
                w.add_(v, alpha=step)
        return [g if g is not None else torch.zeros_like(a)
                for g, a in zip(grad_fn(loss_of(net, train), alphas), alphas)]

    plus = alpha_grads_at(radius.item())
    minus = alpha_grads_at(-2 * radius.item())
    with torch.no_grad():
        for w, v in zip(weights, vector):
            w.add_(v, alpha=radius.item())
    return [d - eta * (p - m) / (2 * radius) for d, p, m in zip(d_alpha, plus, minus)]
