"""Property test: ``simplify(mode="exact")`` is exact on random supernets.

Why: the zoo is a handful of models; users write supernets in many styles.  ``supernets()`` draws
small random cell DAGs with random candidate sets (conv / separable / dilated / pooling with or
without BN / skip / FactorizedReduce / zero), random BN flags (affine, track_running_stats), conv
biases, plain-tensor or Parameter architecture weights, per-edge or flat-sliced, and both
``w * op(x)`` and ``op(x) * w`` joins.  On every one of them a training step of the simplified
module must equal the original's: outputs, the gradient of every weight and architecture
parameter, and the BatchNorm running statistics after the step; eval outputs too.

Two properties:

* float64, ``rtol=1e-10``: an exact rewrite changes only the rounding, so in double precision the
  simplified and the original module agree to ~1e-14 on every drawn model.  This is the sharp test.
* float32 (what users run), at ``rtol=1e-5`` of each category's scale -- *plus* the original's own
  float32 error.  Some drawn supernets are ill-conditioned in float32: a node fed only by a zero
  edge makes the channels downstream constant, and a train-mode BatchNorm of a constant channel
  returns pure rounding noise amplified by ``1/sqrt(eps)``; a conv bias in front of a BatchNorm
  has an analytically-zero gradient that holds only noise.  There the original's float32 result
  itself is off by more than 1e-5 from the true (float64) value, and any rewrite, however exact,
  lands elsewhere in the same noise.  So each tensor of the simplified float32 step must be within
  ``1e-5 * scale + 4 * (the original's float32 error)`` of the original's.

Runtime: tiny models (8x8 inputs, <= 12 channels); the ``ci`` profile in ``conftest.py``
derandomizes the draws.  About a minute for the file on one thread.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from hypothesis import given, note, settings

import topofx
from topofx.testing import (
    assert_eval_equivalent,
    assert_train_step_equivalent,
    find_arch_parameters,
    restore_state,
    snapshot_state,
)

from random_supernets import build_supernet, supernets


def to_double(model: nn.Module) -> nn.Module:
    model.double()
    for a in find_arch_parameters(model):
        a.data = a.data.double()  # plain requires_grad tensors: .double() does not touch them
    return model


def check_simplified(model, simple):
    report = simple.report
    note(str(report))
    assert report.fallback is None, report.fallback
    assert report.approximate == []
    assert report.after["nodes"] <= report.before["nodes"]
    assert all(p is q for p, q in zip(simple.parameters(), model.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------
# float64: the sharp property
# ---------------------------------------------------------------------------------------------
@settings(max_examples=100)
@given(supernets())
def test_random_supernet_train_step_exact_float64(model_and_input):
    model, x = model_and_input
    note(f"spec={model.spec!r}")
    to_double(model)
    x = x.double()
    simple = topofx.simplify(model, x, mode="exact")
    check_simplified(model, simple)
    eq = assert_train_step_equivalent(model, simple, x, rtol=1e-10, atol=1e-12)
    assert eq.counts()["arch_grad"] == len(find_arch_parameters(model))  # plain tensors included
    assert_eval_equivalent(model, simple, x, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# float32: exact up to the original's own rounding error
# ---------------------------------------------------------------------------------------------
def train_step(module: nn.Module, state: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """One seeded train step of ``module``; outputs, grads, buffers read from ``state`` (the
    original, whose tensors the simplified module shares), in float64.  State is restored."""
    arch = find_arch_parameters(state)
    arch_ids = {id(a) for a in arch}
    weights = [p for p in state.parameters() if id(p) not in arch_ids]
    snap_m, snap_s = snapshot_state(module), snapshot_state(state)
    try:
        for t in [*weights, *arch]:
            t.grad = None
        module.train()
        torch.manual_seed(0)
        out = module(x)
        gen = torch.Generator().manual_seed(1)
        r = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (out * r.to(out.dtype)).sum().backward()
        grad = lambda t: (t.grad if t.grad is not None else torch.zeros_like(t)).detach().double().clone()
        return {
            "output": [out.detach().double().clone()],
            "weight_grad": [grad(p) for p in weights],
            "arch_grad": [grad(a) for a in arch],
            "buffer": [b.detach().double().clone() for b in state.buffers()],
        }
    finally:
        restore_state(module, snap_m)
        restore_state(state, snap_s)


def assert_close_up_to_fp32_noise(original, simple, x, rtol=1e-5, slack=4.0):
    reference = to_double(copy.deepcopy(original))  # the true values, near enough
    truth = train_step(reference, reference, x.double())
    want = train_step(original, original, x)
    got = train_step(simple, original, x)
    problems = []
    for category, tensors in truth.items():
        scale = max((t.abs().max().item() for t in tensors if t.numel()), default=0.0)
        for i, (t, w, g) in enumerate(zip(tensors, want[category], got[category], strict=True)):
            if not t.numel() or not t.is_floating_point():
                continue
            noise = (w - t).abs().max().item()
            diff = (g - w).abs().max().item()
            if not diff <= rtol * scale + slack * noise + 1e-12:
                problems.append(f"{category}[{i}]: |simplified - original| = {diff:.3e} > "
                                f"{rtol:g} * scale {scale:.3e} + {slack:g} * original's fp32 error {noise:.3e}")
    assert not problems, "\n".join(problems)


@settings(max_examples=100)
@given(supernets())
def test_random_supernet_train_step_exact_float32(model_and_input):
    model, x = model_and_input
    note(f"spec={model.spec!r}")
    # check=False: simplify's own output check has a fixed 1e-5 threshold that float32 noise on
    # ill-conditioned draws can exceed (see test_ill_conditioned_model_is_not_refused)
    simple = topofx.simplify(model, x, mode="exact", check=False)
    check_simplified(model, simple)
    assert_close_up_to_fp32_noise(model, simple, x)


# ---------------------------------------------------------------------------------------------
# a draw that is ill-conditioned in float32 (found by the property test, shrunk by hand)
# ---------------------------------------------------------------------------------------------
def _cand(kind, track=False, bias=False):
    return {"kind": kind, "k": 3, "affine": False, "track": track, "bias": bias}


ILL_CONDITIONED = {
    "seed": 3062381, "batch": 2, "size": 8, "C_stem": 4, "num_classes": 2,
    "arch_storage": "parameter", "arch_layout": "per_edge", "w_first": False,
    "cells": [{
        "C": 4, "reduction": False, "preprocess": True, "outputs": [2, 3, 4],
        "nodes": [
            # node 1 is fed by a zero edge only: everything computed from it is constant
            {"inputs": [0], "candidates": [[_cand("zero")]]},
            {"inputs": [0, 1], "candidates": [[_cand("conv_1")], [_cand("conv_5")]]},
            {"inputs": [1], "candidates": [[_cand("conv_1", bias=True)]]},
            {"inputs": [0, 1], "candidates": [[_cand("conv_1")], [_cand("conv_1", track=True, bias=True)]]},
        ],
    }],
}


def test_ill_conditioned_model_is_not_refused():
    """``simplify`` must not call a correct rewrite an "internal error" because float32 noise of
    an ill-conditioned model exceeds its fixed 1e-5 output check (its docstring promises to keep
    the original graph if the outputs differ, not to raise)."""
    model, x = build_supernet(ILL_CONDITIONED)
    simple = topofx.simplify(model, x, mode="exact")
    assert_close_up_to_fp32_noise(model, simple, x)


def test_ill_conditioned_model_is_exact_in_float64():
    model, x = build_supernet(ILL_CONDITIONED)
    to_double(model)
    simple = topofx.simplify(model, x.double(), mode="exact")
    assert_train_step_equivalent(model, simple, x.double(), rtol=1e-10, atol=1e-12)
