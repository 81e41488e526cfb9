"""``topofx.derive``: the discrete child of a supernet, by graph surgery on its capture.

At a one-hot architecture (``1e4`` logits: softmax exactly one-hot in float32) the child computes what
the supernet computes, so a training step of each gives the same outputs, the same updated weights
and the same BN statistics; the child has no architecture parameters, fewer parameters, a
``state_dict`` that loads into a freshly derived child, and it trains on its own.
"""
from __future__ import annotations

import copy
import functools
import io
import itertools
import operator
from typing import Any

import pytest
import torch
from torch import nn

import topofx
from topofx import zoo
from topofx.derive import CHOICES
from topofx.testing import find_arch_parameters, set_one_hot

MODELS = {
    "nb201-darts": dict(batch_size=2, image_size=8, C=4, N=1),
    "darts-space": dict(batch_size=2, image_size=8, C=4, N=1),
    "darts-orig": dict(C=4, layers=3),
}


def choose(row: int, n: int) -> int:
    """Every candidate somewhere (zero, identity, pooling, convolutions), not always the first."""
    return (3 * row + 1) % n


def logits(out: Any) -> torch.Tensor:
    return out[-1] if isinstance(out, tuple) else out


@pytest.fixture(scope="module", params=list(MODELS))
def derived(request):
    torch.manual_seed(0)
    model, inputs = zoo.build(request.param, **MODELS[request.param])
    set_one_hot(find_arch_parameters(model), choose)
    child = topofx.derive(model, inputs)
    return model, child, inputs


def test_child_step_equals_supernet_at_one_hot(derived):
    model, child, inputs = derived
    supernet, child = copy.deepcopy(model).train(), copy.deepcopy(child).train()
    assert all(c.weights[c.index] == 1.0 for c in child.meta[CHOICES])  # the argmax is the one-hot candidate
    for net in (supernet, child):
        net.zero_grad()
    out_s, out_c = supernet(*inputs), child(*inputs)
    torch.testing.assert_close(out_c, out_s, rtol=1e-5, atol=1e-5)
    for net, out in ((supernet, out_s), (child, out_c)):
        logits(out).square().mean().backward()
        torch.optim.SGD(net.parameters(), lr=0.1).step()
    expected = supernet.state_dict()
    for name, value in child.state_dict().items():  # weights after the step, BN running statistics
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_child_has_no_architecture_parameters(derived):
    model, child, _ = derived
    arch = find_arch_parameters(model)
    assert arch
    named = itertools.chain(model.named_parameters(), model.named_buffers(), vars(model).items())
    arch_names = {name for name, t in named if any(t is a for a in arch)}
    state = child.state_dict()
    assert arch_names and not arch_names & set(state)
    assert not any(p is a for p in child.parameters() for a in arch)
    assert set(state) <= set(model.state_dict())  # the supernet's own module paths
    assert "softmax" not in child.code and "arch" not in child.code
    own = sum(p.numel() for p in child.parameters())
    assert own < sum(p.numel() for p in model.parameters() if not any(p is a for a in arch))


def test_state_dict_round_trip_and_retraining(derived):
    model, child, inputs = derived
    child = copy.deepcopy(child).train()
    target = torch.arange(inputs[0].shape[0]) % 10
    opt = torch.optim.SGD(child.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits(child(*inputs)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    buffer = io.BytesIO()
    torch.save(child.state_dict(), buffer)
    buffer.seek(0)
    indices = [c.index for c in child.meta[CHOICES]]
    fresh = topofx.derive(model, inputs, genotype=indices)  # the list form: one index per edge
    assert [c.index for c in fresh.meta[CHOICES]] == indices
    fresh.load_state_dict(torch.load(buffer))
    child.eval(), fresh.eval()
    torch.testing.assert_close(fresh(*inputs), child(*inputs), rtol=0, atol=0)


@pytest.fixture(scope="module")
def nb201():
    torch.manual_seed(0)
    model, inputs = zoo.build("nb201-darts", **MODELS["nb201-darts"])
    return model, inputs, topofx.derive(model, inputs)


def test_genotype_selects_a_non_argmax_candidate(nb201):
    model, inputs, child = nb201
    choices = child.meta[CHOICES]
    edge, k = next((c, k) for c in choices for k, d in enumerate(c.candidates) if k != c.index and "Conv2d3x3" in d)
    simplified = topofx.simplify(model, inputs)  # a simplified supernet derives from its original
    other = topofx.derive(simplified, inputs, genotype={edge.edge: k})
    picked = other.meta[CHOICES]
    assert picked[edge.edge].index == k
    assert [c.index for c in picked if c is not picked[edge.edge]] == [c.index for c in choices if c is not edge]
    kept = picked[edge.edge].modules
    assert kept and not any(m in edge.modules for m in kept)
    state, argmax_state = other.state_dict(), child.state_dict()
    weights = [f"{m}.weight" for m in kept if f"{m}.weight" in state]
    assert weights and not any(w in argmax_state for w in weights)
    for w in weights:  # copies of the supernet's values, not the same tensors
        torch.testing.assert_close(state[w], model.state_dict()[w], rtol=0, atol=0)
        assert state[w].data_ptr() != model.state_dict()[w].data_ptr()
    by_name = topofx.derive(model, inputs, genotype={edge.name: k})
    assert by_name.meta[CHOICES] == picked
    per_cell: dict[str, list[int]] = {}
    for c in picked:
        per_cell.setdefault(c.cell, []).append(c.index)
    nested = topofx.derive(model, inputs, genotype=list(per_cell.values()))  # one list per cell
    assert nested.meta[CHOICES] == picked


@pytest.mark.parametrize("genotype, message", [
    ([0, 1, 2], r"lists 3 choices, but the model has 18 mixed edges"),
    ({0: 5}, r"candidate 5 on edge 0 \(stem_1->add_4, cell cells.0\), which has 5 candidates"),
    ({18: 0}, r"genotype names edge 18"),
    ([[0] * 6, [0] * 6, [0] * 5], r"lists 5 choices for cell 'cells.4', which has 6 mixed edges"),
])
def test_genotype_errors_name_the_edge(nb201, genotype, message):
    model, inputs, _ = nb201
    with pytest.raises(ValueError, match=message):
        topofx.derive(model, inputs, genotype=genotype)


def test_model_without_mixed_edges_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="no mixed edges"):
        topofx.derive(net, (torch.randn(2, 3, 8, 8),))


class ReduceJoins(nn.Module):
    """Two edges joined by ``functools.reduce`` (a ``+`` chain without ``sum``'s 0) and added into one
    node: the second edge's sum is then a term of the first edge's chain."""

    def __init__(self):
        super().__init__()
        self.edges = nn.ModuleList(nn.ModuleList([nn.Identity(), nn.Conv2d(4, 4, 3, padding=1)]) for _ in range(2))
        self.alphas = nn.Parameter(torch.zeros(2, 2))

    def forward(self, x):
        w = torch.softmax(self.alphas, dim=-1)
        e0, e1 = (functools.reduce(operator.add, [w[i][k] * op(x) for k, op in enumerate(ops)])
                  for i, ops in enumerate(self.edges))
        return e0 + e1


def test_edge_sum_inside_another_edges_sum():
    torch.manual_seed(0)
    model, x = ReduceJoins(), torch.randn(2, 4, 8, 8)
    set_one_hot([model.alphas], lambda r, n: r)
    child = topofx.derive(model, (x,))
    assert sorted(c.index for c in child.meta[CHOICES]) == [0, 1]
    torch.testing.assert_close(child(x), model(x), rtol=1e-6, atol=1e-6)
