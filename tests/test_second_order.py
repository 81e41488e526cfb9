"""DARTS-V2 second-order architecture step (Liu et al. 2019, eq. 7-8) through a simplified module:
a deep-copied unrolled model w' = w - eta * (grad_w L_train + wd * w), the validation gradient at
w', and the finite-difference Hessian-vector product at w +- R * grad_w' L_val.  In exact mode the
alpha gradient equals the one computed through the original model.  The computation is the library's
(``topofx.search.unrolled_arch_gradients``, what ``topofx search --algo darts-v2`` runs)."""
from __future__ import annotations

import copy

import pytest
import torch

import topofx
from topofx import zoo
from topofx.ir import max_rel_error
from topofx.search import unrolled_arch_gradients


def second_order_alpha_grads(net, x_train, y_train, x_val, y_val, eta=0.05, wd=3e-4, r=1e-2):
    return unrolled_arch_gradients(net, (x_train, y_train), (x_val, y_val), eta=eta, weight_decay=wd, r=r)


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
