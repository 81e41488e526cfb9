"""Tests of the equivalence helpers in :mod:`topofx.testing`.

Why: every rewrite test in the suite relies on these helpers, so they must (a) accept trivially
equal pairs — a model against itself (all tensors shared) and against a deepcopy (nothing shared),
including plain-tensor architecture weights, tuple outputs and Gumbel sampling — (b) reject pairs
that differ in outputs, in gradients only (frozen arch weights), or in BatchNorm statistics only,
and (c) leave both models exactly as they found them.
"""

import copy

import pytest
import torch
import torch.nn as nn

from topofx import zoo
from topofx.testing import (
    assert_eval_equivalent,
    assert_follows_alpha,
    assert_train_step_equivalent,
    eval_equivalence,
    find_arch_parameters,
    restore_state,
    snapshot_state,
    train_step_equivalence,
)

SMALL = {
    "darts-orig": dict(C=4, layers=3, steps=2, multiplier=2),
    "gdas-style": dict(C=4, N=1),
    "nb201-darts": dict(C=4, N=1),
    "pcdarts": dict(C=8, layers=2, steps=2, multiplier=2),
}


def small(name):
    return zoo.build(name, image_size=8, **SMALL[name])


def state_fingerprint(model):
    arch = model.arch_parameters() if callable(getattr(model, "arch_parameters", None)) else []
    tensors = [*model.parameters(), *model.buffers(), *arch]
    return ([t.detach().clone() for t in tensors],
            [None if t.grad is None else t.grad.clone() for t in tensors],
            [m.training for m in model.modules()],
            torch.get_rng_state().clone())


def assert_same_fingerprint(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1]):
        assert (x is None and y is None) or torch.equal(x, y)
    assert a[2] == b[2]
    assert torch.equal(a[3], b[3])


class Scaled(nn.Module):
    """Shares every tensor with ``inner`` but scales its output: must be caught."""

    def __init__(self, inner, factor):
        super().__init__()
        self.inner = inner
        self.factor = factor

    def arch_parameters(self):
        return self.inner.arch_parameters()

    def forward(self, x):
        return self.inner(x) * self.factor


def frozen_alpha_copy(model):
    """Same outputs, but the alphas used in forward are detached constants."""
    cand = copy.deepcopy(model)
    cand.alphas_normal = cand.alphas_normal.detach().clone()
    cand.alphas_reduce = cand.alphas_reduce.detach().clone()
    return cand


def test_snapshot_restore_roundtrip():
    model, (x,) = small("darts-orig")
    model(x).sum().backward()
    before = state_fingerprint(model)
    snap = snapshot_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.alphas_normal.grad = None
    model.eval()
    model(x)
    torch.rand(3)
    restore_state(model, snap)
    assert_same_fingerprint(before, state_fingerprint(model))


@pytest.mark.parametrize("name", ["darts-orig", "gdas-style", "pcdarts"])
def test_model_against_itself_shared(name):
    model, inputs = small(name)
    model(*inputs).sum().backward()  # pre-existing grads must survive the check
    before = state_fingerprint(model)
    report = train_step_equivalence(model, model, inputs)
    assert report.ok, str(report)
    assert set(report.max_rel_error) == {"output", "weight_grad", "arch_grad", "buffer"}
    assert all(v == 0.0 for v in report.max_rel_error.values())
    assert report.counts()["arch_grad"] == len(find_arch_parameters(model)) >= 1
    assert_same_fingerprint(before, state_fingerprint(model))


@pytest.mark.parametrize("name", ["darts-orig", "gdas-style", "nb201-darts"])
def test_model_against_deepcopy(name):
    model, inputs = small(name)
    cand = copy.deepcopy(model)
    before, before_c = state_fingerprint(model), state_fingerprint(cand)
    report = assert_train_step_equivalent(model, cand, inputs)
    assert report.max_rel_error["output"] == 0.0
    assert report.counts()["arch_grad"] >= 1
    assert_same_fingerprint(before, state_fingerprint(model))
    assert_same_fingerprint(before_c, state_fingerprint(cand))
    assert_eval_equivalent(model, cand, inputs)


def test_tuple_outputs_are_all_compared():
    model, inputs = small("nb201-darts")  # forward returns (features, logits)
    report = train_step_equivalence(model, model, inputs)
    assert report.ok
    assert report.counts()["output"] == 2


def test_sync_state_aligns_unshared_copies():
    model, inputs = small("darts-orig")
    cand = copy.deepcopy(model)
    with torch.no_grad():
        for p in cand.parameters():
            p.mul_(1.5)
        cand.alphas_normal.add_(0.3)
    assert train_step_equivalence(model, cand, inputs).ok
    assert not train_step_equivalence(model, cand, inputs, sync_state=False).ok
    # syncing must not leak into the candidate
    assert not torch.equal(cand.alphas_normal, model.alphas_normal)


def test_different_output_fails():
    model, inputs = small("darts-orig")
    report = train_step_equivalence(model, Scaled(model, 1.001), inputs)
    assert not report.ok
    assert report.max_rel_error["output"] == pytest.approx(1e-3, rel=1e-2)
    assert report.max_rel_error["arch_grad"] > 1e-4
    with pytest.raises(AssertionError, match="FAILED"):
        assert_train_step_equivalent(model, Scaled(model, 1.001), inputs)
    assert not eval_equivalence(model, Scaled(model, 1.001), inputs).ok
    # a tolerance loose enough accepts it
    assert train_step_equivalence(model, Scaled(model, 1.001), inputs, rtol=1e-2).ok


def test_frozen_alphas_fail_on_arch_grads_only():
    model, inputs = small("darts-orig")
    report = train_step_equivalence(model, frozen_alpha_copy(model), inputs)
    assert not report.ok
    failing = {c.category for c in report.failures}
    assert failing == {"arch_grad"}, str(report)
    assert "alphas_normal" in str(report)


def test_bn_statistics_difference_is_caught():
    model, inputs = small("darts-orig")
    cand = copy.deepcopy(model)
    bn = next(m for m in cand.modules() if isinstance(m, nn.BatchNorm2d))
    bn.momentum = 0.5
    report = train_step_equivalence(model, cand, inputs)
    assert {c.category for c in report.failures} == {"buffer"}, str(report)


def test_follows_alpha():
    model, inputs = small("darts-orig")
    before = state_fingerprint(model)
    assert_follows_alpha(model, model, inputs)
    assert_follows_alpha(model, copy.deepcopy(model), inputs)
    assert_same_fingerprint(before, state_fingerprint(model))
    with pytest.raises(AssertionError, match="did not follow"):
        assert_follows_alpha(model, frozen_alpha_copy(model), inputs)


def test_follows_alpha_stochastic_and_parameter_alphas():
    model, inputs = small("gdas-style")  # nn.Parameter attribute, hard Gumbel samples
    assert_follows_alpha(model, copy.deepcopy(model), inputs, scale=5.0)
