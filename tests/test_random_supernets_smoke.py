"""Smoke test of the random-supernet generator in ``tests/random_supernets.py``.

Why: property tests of the rewrites trust that every drawn model is a valid, trainable supernet;
this checks that forward + backward run and that the architecture weights receive gradients.
"""

import torch
from hypothesis import HealthCheck, given, settings

from random_supernets import supernets


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(supernets())
def test_forward_backward_runs(model_and_input):
    model, x = model_and_input
    assert model.training
    out = model(x)
    assert out.shape == (x.shape[0], model.spec["num_classes"])
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    arch = model.arch_parameters()
    assert arch and all(a.requires_grad for a in arch)
    # every edge is live unless its cell leaves nodes dead, so at least one arch grad exists
    assert any(a.grad is not None for a in arch)
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
