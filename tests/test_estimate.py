"""``topofx.estimate``: activation memory from fake tensors against what one real step saves."""
from __future__ import annotations

import pytest
import torch

import topofx
from topofx import zoo
from topofx.bench import saved_activation_bytes

GIB = 2**30


@pytest.mark.parametrize("name, sizes", [("nb201-darts", dict(C=4, N=1)), ("darts-space", dict(C=4, N=1))])
def test_estimate_matches_measured_saved_bytes(name, sizes):
    """Within 10% of the bytes a real training step saves (bench's measure), for the original and the
    simplified module, at the example's batch and extrapolated to twice it; the model is untouched."""
    model, (x,) = zoo.build(name, batch_size=4, image_size=16, **sizes)
    simplified = topofx.simplify(model, x)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    est = topofx.estimate(simplified, x)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    for batch in (4, 8):
        xb = torch.randn(batch, *x.shape[1:])
        for which, net in (("original", model), ("simplified", simplified)):
            measured = saved_activation_bytes(net, (xb,))
            assert abs(est.activations(which, batch) / measured - 1) <= 0.10, (which, batch)
    assert est.activations("simplified") < est.activations("original")


def test_max_batch_is_the_largest_that_fits():
    model, (x,) = zoo.build("nb201-darts", C=4, N=1, batch_size=2, image_size=16)
    est = topofx.estimate(model, x, mode="exact")
    for budget in (0.05 * GIB, 0.5 * GIB, 16 * GIB):
        for which in ("original", "simplified"):
            n = est.max_batch(budget, which)
            assert n >= 1 and est.peak(which, n) <= budget < est.peak(which, n + 1)
    assert est.max_batch(16 * GIB, "simplified") > est.max_batch(16 * GIB, "original")
    assert est.max_batch(est.state_bytes / 2) == 0
    assert "max batch 16 GiB" in str(est)
