"""``simplify(..., compile=...)``: one compiled graph for every architecture, equal to the eager graph.

The supernets are small (one cell, 8x8 images): CPU inductor's first call compiles C++ with gcc, and
the graph's size is what costs.  Most tests use the ``eager`` backend (dynamo's capture without code
generation), which is where graph breaks and recompilations happen; one runs inductor end to end.
The DARTS space (dynamo traces its graph for ~50 s here) runs with ``TOPOFX_COMPILE_ALL=1``; CI runs
NAS-Bench-201 and the one-cell supernet, which holds every kind of DARTS-space candidate.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import topofx
from topofx import simplifier, zoo
from topofx.bench import default_loss
from topofx.modules import ConvAvgPool2d, ChannelsLastDepthwise
from topofx.testing import assert_train_step_equivalent, find_arch_parameters
from random_supernets import build_supernet


def _candidate(kind: str, k: int = 3) -> dict:
    return {"kind": kind, "k": k, "affine": False, "track": True, "bias": False}


def _one_cell(arch_storage: str = "tensor") -> tuple[torch.nn.Module, torch.Tensor]:
    """A DARTS-style cell with every kind of candidate the passes rewrite (conv, separable, dilated,
    average and max pooling, skip, zero), alphas as plain ``requires_grad`` tensors by default."""
    spec = {"seed": 0, "batch": 4, "size": 8, "C_stem": 8, "num_classes": 5, "arch_storage": arch_storage,
            "arch_layout": "per_edge", "w_first": True,
            "cells": [{"C": 8, "reduction": False, "preprocess": False, "outputs": [2], "nodes": [
                {"inputs": [0], "candidates": [[_candidate(k) for k in
                                                ("conv_3", "sep_1stage", "avg_pool", "max_pool", "skip", "zero")]]},
                {"inputs": [0, 1], "candidates": [[_candidate("conv_3"), _candidate("avg_pool"), _candidate("skip")],
                                                  [_candidate("dil"), _candidate("max_pool"), _candidate("conv_1")]]},
            ]}]}
    return build_supernet(spec)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def _search(compiled: torch.nn.Module, eager: torch.nn.Module, x: torch.Tensor, steps: int, **tolerance) -> None:
    """``steps`` search steps on the compiled model (weights by SGD, alphas by Adam: every step sees other
    alphas); before each, one training step of the compiled model is compared against the eager one's
    (outputs, weight and alpha gradients, BN statistics), the eager model starting from the same state."""
    alphas = find_arch_parameters(compiled)
    weights = [p for p in compiled.parameters() if all(p is not a for a in alphas)]
    w_opt, a_opt = torch.optim.SGD(weights, lr=0.05), torch.optim.Adam(alphas, lr=0.3)
    before = [a.detach().clone() for a in alphas]
    batches = torch.Generator().manual_seed(0)  # the same batches whatever ran before in this process
    for step in range(steps):
        batch = torch.randn(x.shape, generator=batches)
        assert_train_step_equivalent(eager, compiled, batch, arch_params=find_arch_parameters(eager),
                                     candidate_arch_params=alphas, **tolerance)
        w_opt.zero_grad(), a_opt.zero_grad()
        default_loss(compiled(batch)).backward()
        w_opt.step(), a_opt.step()
    assert all((a - b).abs().max() > 0.5 for a, b in zip(alphas, before)), "the alphas did not move"


def test_one_inductor_graph_serves_every_alpha_and_equals_eager():
    model, x = _one_cell()
    eager = topofx.simplify(copy.deepcopy(model), x)
    compiled = topofx.simplify(model, x, compile=True)
    _search(compiled, eager, x, steps=20, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # and error_on_recompile: no recompilation either


ZOO_CASES = [("nb201-darts", "topo"), ("nb201-darts", "exact")] + (
    [("darts-space", "topo")] if os.environ.get("TOPOFX_COMPILE_ALL") == "1" else [])


@pytest.mark.parametrize("name, mode", ZOO_CASES)
def test_zoo_supernets_compile_to_one_graph(name, mode):
    """No graph break (one graph in all) and no recompilation over search steps: dynamo's counters."""
    model, x = zoo.build(name, batch_size=2, image_size=8, C=4, N=1)
    eager = topofx.simplify(copy.deepcopy(model), x, mode=mode)
    compiled = topofx.simplify(model, x, mode=mode, compile={"backend": "eager"})
    _search(compiled, eager, x[0], steps=3)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_copy_compiles_its_own_graph():
    """DARTS-V2 deep-copies the model for its unrolled step: the copy must run its own parameters."""
    model, x = _one_cell()
    compiled = topofx.simplify(model, x, compile={"backend": "eager"})
    twin = copy.deepcopy(compiled)
    assert twin.runner._orig_mod is twin.graph_module
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert not torch.allclose(twin(x), compiled(x))
    assert torch.allclose(twin(x), twin.graph_module(x))


def test_recapture_compiles_the_new_graph():
    model, x = _one_cell()
    compiled = topofx.simplify(model, x, compile={"backend": "eager"})
    first = compiled.runner
    compiled.recapture()  # what a change the guards catch does (a temperature read as a Python number, ...)
    assert compiled.runner is not first and compiled.runner._orig_mod is compiled.graph_module
    assert torch.allclose(compiled(x), compiled.graph_module(x))


def test_lowering_follows_the_device(monkeypatch, any_size):
    """CUDA gets no CPU lowering (ones-kernel pooling, channels-last depthwise); its graph, checked here
    on the CPU, still equals the original's arithmetic where exact and passes the self-check."""
    model, x = _one_cell()
    monkeypatch.setattr(simplifier, "device_type", lambda model, inputs: "cuda")
    for mode in ("topo", "exact"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for_cuda = topofx.simplify(model, x, mode=mode, strict=True)
        kinds = {type(m) for m in for_cuda.graph_module.modules()}
        assert not kinds & {ConvAvgPool2d, ChannelsLastDepthwise}
        assert for_cuda.lowered_for == "cuda"
    topo = topofx.simplify(model, x).report.rewrites
    assert any("pooling(s) of weighted inputs" in r.detail for r in topo)  # nn.AvgPool2d pools once
    assert_train_step_equivalent(model, for_cuda, x)  # exact mode


def test_moving_to_another_device_type_lowers_again(any_size):
    model, x = _one_cell()
    simplified = topofx.simplify(model, x)
    simplified.__dict__["lowered_for"] = "cuda"  # as if simplified on a GPU, then moved to the CPU
    simplified.to(torch.float32)
    simplified(x)
    assert simplified.lowered_for == "cpu" and simplified.__dict__.get("recaptured")
    assert any(isinstance(m, ConvAvgPool2d) for m in simplified.graph_module.modules())


def test_empty_options_compile_with_the_defaults():
    """``compile={}`` asks for torch.compile's defaults; an empty dict is falsy and used to mean no compile."""
    model, (x,) = zoo.build("nb201-darts", batch_size=2, C=4, N=1, image_size=8)
    simplified = topofx.simplify(model, x, compile={})
    assert simplified.runner is not simplified.graph_module
    assert simplified.runner._orig_mod is simplified.graph_module
    plain = topofx.simplify(model, x, compile=False)
    assert plain.runner is plain.graph_module
