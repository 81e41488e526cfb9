"""DARTS-V2 second-order architecture step (Liu et al. 2019, eq. 7-8) through a simplified module:
a deep-copied unrolled model w' = w - eta * (grad_w L_train + wd * w), the validation gradient at
w', and the finite-difference Hessian-vector product at w +- R * grad_w' L_val.  In exact mode the
alpha gradient equals the one computed through the original model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topofx
from topofx import zoo
from topofx.capture import max_rel_error
from topofx.testing import find_arch_parameters


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = net(x)
    return F.cross_entropy(out[-1] if isinstance(out, tuple) else out, y)


def _split(net: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    alphas = find_arch_parameters(net)
    return [p for p in net.parameters() if all(p is not a for a in alphas)], alphas


def second_order_alpha_grads(net, x_train, y_train, x_val, y_val, eta=0.05, wd=3e-4, r=1e-2):
    weights, alphas = _split(net)
    grads = torch.autograd.grad(_loss(net, x_train, y_train), weights)
    unrolled = copy.deepcopy(net)
    u_weights, u_alphas = _split(unrolled)
    with torch.no_grad():
        for u, w, g in zip(u_weights, weights, grads):
            u.copy_(w - eta * (g + wd * w))
    val = torch.autograd.grad(_loss(unrolled, x_val, y_val), u_alphas + u_weights)
    d_alpha, vector = val[: len(alphas)], val[len(alphas):]
    radius = r / torch.cat([v.flatten() for v in vector]).norm()

    def alpha_grads_at(step: float):
        with torch.no_grad():
            for w, v in zip(weights, vector):
                w.add_(v, alpha=step)
        return torch.autograd.grad(_loss(net, x_train, y_train), alphas)

    plus = alpha_grads_at(radius.item())
    minus = alpha_grads_at(-2 * radius.item())
    alpha_grads_at(radius.item())
    return [d - eta * (p - m) / (2 * radius) for d, p, m in zip(d_alpha, plus, minus)]


@pytest.mark.parametrize("name,overrides", [("darts-orig", dict(C=4, layers=3)), ("nb201-darts", dict(C=8, N=1))])
def test_second_order_alpha_gradient_matches_original(name, overrides):
    model, (x,) = zoo.build(name, batch_size=4, **overrides)
    simplified = topofx.simplify(model, x, mode="exact")
    gen = torch.Generator().manual_seed(3)
    x_val = torch.randn(x.shape, generator=gen)
    y_train, y_val = torch.randint(0, 10, (4,), generator=gen), torch.randint(0, 10, (4,), generator=gen)
    original_path = copy.deepcopy(model)  # same starting state for both runs
    expected = second_order_alpha_grads(original_path, x, y_train, x_val, y_val)
    got = second_order_alpha_grads(simplified, x, y_train, x_val, y_val)
    assert len(got) == len(expected) > 0
    assert max_rel_error(got, expected) <= 1e-5
    assert all(g.abs().sum() > 0 for g in got)
