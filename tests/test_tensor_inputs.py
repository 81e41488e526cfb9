"""Tensors with autograd history that an optimizer's step computes before the call and stores where
forward reads them (NASLib's GDAS and DrNAS sample each edge's weights from its alpha and put them in
the edge's data dict) are graph inputs (``topofx.capture.tensor_inputs``): the simplified module reads the one
stored for this call, its output, every weight's gradient, alpha's gradient (through the stored
tensor's history) and the BN statistics equal the eager model's step after step, and a new tensor
each step costs no new capture.  A tensor of another shape or dtype captures anew."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Dirichlet

import topofx
from topofx.capture import guards

C = 4
NODES = 3  # nodes 1..3 of a cell, an edge u -> v for every u < v


class EdgeRecord:
    """An edge's data, as a graph-based search space keeps it: a private and a shared dict, read as
    attributes (``edge.alpha``, ``edge.sampled``)."""

    def __init__(self, alpha: nn.Parameter):
        self._private = {"alpha": alpha}
        self._shared: dict = {}

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        for table in (self._private, self._shared):
            if key in table:
                return table[key]
        raise AttributeError(key)

    def set(self, key, value):
        self._shared[key] = value

    def remove(self, key):
        self._shared.pop(key, None)


def _candidates() -> nn.ModuleList:
    return nn.ModuleList([
        nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)),
        nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C)),
        nn.AvgPool2d(3, 1, 1),
    ])


class SampledMix(nn.Module):
    """A mixed op weighted by the sample the optimizer stored on its edge."""

    def __init__(self):
        super().__init__()
        self.primitives = _candidates()

    def forward(self, x, edge):
        return sum(w * op(x) for w, op in zip(edge.sampled, self.primitives))


class HardMix(SampledMix):
    """GDAS's mixed op: only the arg-max candidate runs; the others add their bare weight."""

    def apply_weights(self, x, weights):
        argmax = torch.argmax(weights)
        return sum(weights[i] * op(x) if i == argmax else weights[i] for i, op in enumerate(self.primitives))

    def forward(self, x, edge):
        return self.apply_weights(x, edge.sampled)


class Cell(nn.Module):
    """One cell of a graph-based space: edge records in an adjacency dict of dicts (``adj[u][v]``),
    their mixed ops in a ModuleDict.  A copy of a cell shares its records' shared dicts (and so the
    alphas and the samples stored there) with the cell it was copied from."""

    def __init__(self, mix: type, like: "Cell | None" = None):
        super().__init__()
        self.adj = {u: {v: EdgeRecord(nn.Parameter(1e-1 * torch.randn(3))) for v in range(u + 1, NODES + 1)}
                    for u in range(1, NODES)}
        for u, row in self.adj.items():
            for v, edge in row.items():
                if like is not None:
                    edge._private, edge._shared = {}, like.adj[u][v]._shared
                else:
                    edge._shared["alpha"] = edge._private.pop("alpha")
        self.ops = nn.ModuleDict({f"{u}_{v}": mix() for u, row in self.adj.items() for v in row})

    def forward(self, x):
        nodes = {1: x}
        for v in range(2, NODES + 1):
            nodes[v] = sum(self.ops[f"{u}_{v}"](nodes[u], self.adj[u][v]) for u in range(1, v))
        return nodes[NODES]


class CellGraph(nn.Module):
    """Two cells, the second a copy of the first (shared alphas and samples), between a stem and a head."""

    def __init__(self, mix: type = SampledMix):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        first = Cell(mix)
        self.cells = nn.ModuleList([first, Cell(mix, like=first)])
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.head(x.mean((2, 3)))

    @property
    def adj(self):  # the first cell's records: the second shares their shared dicts
        return self.cells[0].adj


def alphas(model: nn.Module) -> list[torch.Tensor]:
    return [edge.alpha for row in model.adj.values() for edge in row.values()]


def sample_dirichlet(model: nn.Module) -> None:
    """DrNAS's step: a Dirichlet sample of ``elu(alpha) + 1`` onto every edge, before the call."""
    for row in model.adj.values():
        for edge in row.values():
            edge.set("sampled", Dirichlet(F.elu(edge.alpha) + 1).rsample())


def sample_hard(model: nn.Module) -> None:
    """GDAS's step: a straight-through hard Gumbel sample (one-hot in value, the soft sample's gradient)."""
    for row in model.adj.values():
        for edge in row.values():
            probs = F.softmax((edge.alpha.log_softmax(-1) - torch.empty(3).exponential_().log()) / 5.0, -1)
            edge.set("sampled", torch.zeros(3).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0) - probs.detach() + probs)


def remove_samples(model: nn.Module) -> None:
    """After the step the optimizer takes the samples off again: between calls the path is gone."""
    for row in model.adj.values():
        for edge in row.values():
            edge.remove("sampled")


class StoredMix(nn.Module):
    """A mixed op reading its weights from a plain tensor attribute the training step sets."""

    def __init__(self):
        super().__init__()
        self.primitives = _candidates()
        self.weights = None

    def forward(self, x):
        return sum(w * op(x) for w, op in zip(self.weights, self.primitives))


class AttributeWeights(nn.Module):
    """Two mixed ops whose weights the step stores as module attributes (not parameters or buffers)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.mixes = nn.ModuleList([StoredMix(), StoredMix()])
        self.alpha = nn.Parameter(1e-1 * torch.randn(2, 3))
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        for mix in self.mixes:
            x = mix(self.stem(x) if mix is self.mixes[0] else x)
        return self.head(x.mean((2, 3)))


def sample_attributes(model: nn.Module) -> None:
    noisy = F.softmax(model.alpha + 0.3 * torch.randn(2, 3), -1)
    for mix, w in zip(model.mixes, noisy):
        mix.weights = w


def no_removal(model: nn.Module) -> None:
    pass


CASES = {  # name: (model factory, sampling step, clean-up, alphas, mixed edges found; GDAS's arg-max decision
    # on the sample gates each candidate: capture.gating)
    "dirichlet_in_edge_dicts": (CellGraph, sample_dirichlet, remove_samples, alphas, 6),
    "hard_gumbel_in_edge_dicts": (lambda: CellGraph(HardMix), sample_hard, remove_samples, alphas, 6),  # gated
    "softmax_as_module_attributes": (AttributeWeights, sample_attributes, no_removal, lambda m: [m.alpha], 2),
}


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _pair(case: str, mode: str, monkeypatch) -> tuple:
    """(eager model, its simplified copy, the case's step and clean-up, alphas of each, re-trace counter)."""
    make, sample, clean, arch, _ = CASES[case]
    torch.manual_seed(0)
    eager = make()
    model = copy.deepcopy(eager)
    torch.manual_seed(1)
    sample(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simplified = topofx.simplify(model, (_x(),), mode=mode, strict=True)
    clean(model)
    traces = []
    real = guards.retraces_same
    monkeypatch.setattr(guards, "retraces_same", lambda *a: traces.append(1) or real(*a))
    return eager, simplified, sample, clean, arch(eager), arch(model), traces


def _train_step(model: nn.Module, sample, clean, seed: int, x: torch.Tensor, runner: nn.Module) -> tuple:
    """The optimizer's step: sample onto the edges, forward, backward; the grads (weights then alphas)."""
    torch.manual_seed(seed)
    sample(model)
    out = runner(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    clean(model)
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    return out.detach(), grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_steps_follow_the_stored_samples(case, monkeypatch):
    eager, simplified, sample, clean, eager_alphas, alphas_, traces = _pair(case, "exact", monkeypatch)
    model, graph = simplified.original, simplified.graph_module
    assert simplified.report.fallback is None
    assert simplified.report.edges == CASES[case][4]
    x = _x()
    opt_e = torch.optim.SGD(dict.fromkeys([*eager.parameters(), *eager_alphas]), lr=0.1)
    opt_s = torch.optim.SGD(dict.fromkeys([*model.parameters(), *alphas_]), lr=0.1)
    for step in range(3):
        opt_e.zero_grad()
        opt_s.zero_grad()
        want, want_grads = _train_step(eager, sample, clean, 10 + step, x, eager)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got, got_grads = _train_step(model, sample, clean, 10 + step, x, simplified)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for have, expected in zip(got_grads, want_grads):
            torch.testing.assert_close(have, expected, rtol=1e-4, atol=1e-6)
        for have, expected in zip(alphas_, eager_alphas):  # through the stored samples' history
            assert expected.grad is not None and expected.grad.abs().sum() > 0
            torch.testing.assert_close(have.grad, expected.grad, rtol=1e-4, atol=1e-6)
        for have, expected in zip(model.buffers(), eager.buffers()):
            torch.testing.assert_close(have, expected, rtol=1e-5, atol=1e-6)
        opt_e.step()
        opt_s.step()
        assert simplified.graph_module is graph, "a new sample captured anew"
    assert not traces, "a new sample was traced again"


@pytest.mark.parametrize("case", sorted(CASES))
def test_topo_steps_keep_one_graph_and_reach_alpha(case, monkeypatch):
    _, simplified, sample, clean, _, alphas_, traces = _pair(case, "topo", monkeypatch)
    assert simplified.report.fallback is None
    assert simplified.report.edges == CASES[case][4]
    model, graph = simplified.original, simplified.graph_module
    for step in range(3):
        for a in alphas_:
            a.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, _ = _train_step(model, sample, clean, 10 + step, _x(), simplified)
        assert torch.isfinite(out).all()
        assert all(a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0 for a in alphas_)
        assert simplified.graph_module is graph
    assert not traces


class RegisteredAlphas(CellGraph):
    """The alphas are also the model's parameters (a ParameterList), as an optimizer's arch list is,
    and forward reads them too: it returns their entropy beside the logits (a regulariser)."""

    def __init__(self):
        super().__init__()
        self.alphas = nn.ParameterList(alphas(self))

    def forward(self, x):
        entropy = sum(-(F.softmax(a, -1) * F.log_softmax(a, -1)).sum() for a in self.alphas)
        return super().forward(x), entropy


def test_the_sample_taken_before_simplify_still_backpropagates():
    """simplify's checks leave the alphas' version counters alone: the sample the optimizer drew before
    the call that simplifies (or captures anew) still reaches alpha."""
    torch.manual_seed(0)
    eager = RegisteredAlphas()
    model = copy.deepcopy(eager)
    for m in (eager, model):
        torch.manual_seed(1)
        sample_dirichlet(m)
    simplified = topofx.simplify(model, (_x(),), mode="exact", strict=True)
    for runner in (eager, simplified):
        logits, entropy = runner(_x())
        (logits.square().sum() + entropy).backward()
    for have, want in zip(alphas(model), alphas(eager)):
        torch.testing.assert_close(have.grad, want.grad, rtol=1e-4, atol=1e-6)


def test_a_sample_of_another_shape_captures_anew():
    """Two weights where the capture read three: eager mixes two candidates (``zip``); so must the graph."""
    torch.manual_seed(0)
    eager = CellGraph()
    model = copy.deepcopy(eager)
    sample_dirichlet(model)
    simplified = topofx.simplify(model, (_x(),), mode="exact", strict=True)
    graph = simplified.graph_module
    for m in (eager, model):
        torch.manual_seed(3)
        sample_dirichlet(m)
        m.adj[1][2].set("sampled", m.adj[1][2].sampled[:2])
    want = eager(_x())
    got = simplified(_x())
    assert simplified.graph_module is not graph
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
