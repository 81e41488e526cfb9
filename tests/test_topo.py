"""TopoNAS mode: vertex-exactness (one-hot architecture weights give the original's forward) and
gradient flow to every original kernel and architecture parameter."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from random_supernets import supernets

import topofx
from topofx import zoo
from topofx.ir import max_rel_error, preserved_state
from topofx.testing import find_arch_parameters, seeded_outputs, set_one_hot

VERTEX_RTOL = 1e-5


def _forward_pair(model, simplified, x):
    model.train()
    simplified.train()
    return max_rel_error(*seeded_outputs(model, simplified, x))


def _op_index(model, name: str) -> int | None:
    names = getattr(model, "op_names", None)
    return names.index(name) if names and name in names else None


@pytest.fixture(scope="module")
def nb201():
    model, (x,) = zoo.build("nb201-darts", C=8, N=1, batch_size=4)
    return model, x, topofx.simplify(model, x, mode="topo")


def test_topo_is_default_and_merges_every_edge(nb201):
    model, x, simplified = nb201
    assert simplified.report.mode == "topo"
    merged = [r for r in simplified.report.rewrites if r.action == "merged"]
    assert len(merged) == simplified.report.edges  # every NB201 edge has conv1x1 + conv3x3 candidates
    assert all(not r.exact and len(r.edges) == 1 and "/" in r.edges[0] for r in merged)  # cell/edge
    assert len({r.edges for r in merged}) == len(merged)
    assert simplified.report.after["conv"] < simplified.report.before["conv"] / 2


@pytest.mark.parametrize("choice", ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3", "random", "random2"])
def test_nb201_vertex_exact(nb201, choice):
    model, x, simplified = nb201
    alphas = find_arch_parameters(model)
    gen = torch.Generator().manual_seed(len(choice))
    if choice.startswith("random"):
        pick = lambda r, n: int(torch.randint(0, n, (1,), generator=gen))
    else:
        k = _op_index(model, choice)
        pick = lambda r, n: k
    with preserved_state(model, tensors=alphas):
        set_one_hot(alphas, pick)
        assert _forward_pair(model, simplified, x) <= VERTEX_RTOL


def test_nb201_mixed_weights_differ_but_gradients_flow(nb201):
    model, x, simplified = nb201
    alphas = find_arch_parameters(model)
    with preserved_state(model, tensors=alphas):
        with torch.no_grad():
            for a in alphas:
                a.normal_()
        assert _forward_pair(model, simplified, x) > 1e-6  # the approximation is visible at mixed weights
        for p in list(model.parameters()) + alphas:
            p.grad = None
        out = simplified(x)
        out[-1].logsumexp(-1).sum().backward()
        for name, p in model.named_parameters():
            if p.dim() == 4:  # every original conv kernel
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        for a in alphas:
            assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def _own_fp32_error(model, x) -> float:
    """How far the original's float32 forward is from its float64 forward (its own rounding noise)."""
    with preserved_state(model):
        expected = copy.deepcopy(model).double()(x.double())
        got = model(x)
    return max_rel_error(got, tuple(t.float() for t in expected))


def test_nb201_default_config_vertex_exact():
    """17 cells at batch 2: the original's own float32 error is ~3e-5 here, so the contract is
    'within 1e-5, or within twice the original's own float32 rounding error'."""
    model, (x,) = zoo.build("nb201-darts", batch_size=2)
    simplified = topofx.simplify(model, x)
    alphas = find_arch_parameters(model)
    k = _op_index(model, "nor_conv_3x3")
    with preserved_state(model, tensors=alphas):
        set_one_hot(alphas, lambda r, n: k)
        noise = _own_fp32_error(model, x)
        assert _forward_pair(model, simplified, x) <= max(VERTEX_RTOL, 2 * noise)


@pytest.mark.parametrize("name", ["darts-orig", "pcdarts", "snas", "snas-nb201", "pcdarts-nb201"])
def test_other_styles_vertex_exact(name):
    model, (x,) = zoo.build(name, **({"layers": 3} if name in ("darts-orig", "pcdarts", "snas") else {}))  # 3 cells: both kinds
    simplified = topofx.simplify(model, x, mode="topo")
    alphas = find_arch_parameters(model)
    gen = torch.Generator().manual_seed(1)
    with preserved_state(model, tensors=alphas):
        set_one_hot(alphas, lambda r, n: int(torch.randint(0, n, (1,), generator=gen)))
        assert _forward_pair(model, simplified, x) <= VERTEX_RTOL


@settings(max_examples=30)
@given(supernets())
def test_random_supernets_vertex_exact(case):
    model, x = case
    simplified = topofx.simplify(model, x, mode="topo")
    alphas = find_arch_parameters(model)
    gen = torch.Generator().manual_seed(2)
    segments = model._edge_sizes if model._flat else None
    with preserved_state(model, tensors=alphas):
        set_one_hot(alphas, lambda r, n: int(torch.randint(0, n, (1,), generator=gen)), segments)
        assert _forward_pair(model, simplified, x) <= VERTEX_RTOL


class _FadingNoise:
    """Noise scale that fades per epoch: ``start * 0.5 ** (epoch / half_life)`` (a plain object the
    training loop never touches; ``start`` is a float the capture reads as an input)."""

    def __init__(self, start: float = 0.3, half_life: int = 10):
        self.start, self.half_life = start, half_life

    def scale(self, epoch: int) -> float:
        return self.start * 0.5 ** (epoch / self.half_life)


class _NoisyIdentity(torch.nn.Module):
    """Identity candidate with additive Gaussian noise proportional to its input's spread, faded per epoch."""

    def __init__(self):
        super().__init__()
        self.fade = _FadingNoise()

    def forward(self, x, epoch):
        return x + torch.randn_like(x) * x.detach().std() * self.fade.scale(epoch)


class _NoisySkipSupernet(torch.nn.Module):
    """Two chained mixed edges (3x3 and 1x1 ReLU-conv-BN, noisy identity) taking the epoch as a forward argument."""

    def __init__(self, C: int = 4, edges: int = 2):
        super().__init__()

        def conv_bn(k: int) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(C, C, k, padding=k // 2, bias=False),
                                       torch.nn.BatchNorm2d(C))
        self.edges = torch.nn.ModuleList(torch.nn.ModuleList([conv_bn(3), conv_bn(1), _NoisyIdentity()])
                                         for _ in range(edges))
        self.alpha = torch.nn.Parameter(1e-3 * torch.randn(edges, 3))

    def forward(self, x, epoch):
        for row, ops in zip(self.alpha.softmax(-1), self.edges):
            x = sum(w * (op(x, epoch) if isinstance(op, _NoisyIdentity) else op(x)) for w, op in zip(row, ops))
        return x


@pytest.mark.parametrize("epoch", [0, 7])
def test_noise_decayed_per_epoch_inside_a_candidate_keeps_its_edge(epoch):
    """The decayed noise scale is a one-element constant of the graph multiplying the candidate's noise:
    it is part of that candidate, not a weight making the edge a join of sub-networks (found no edge:
    topo mode merged nothing, silently, and its vertex check compared two equal graphs)."""
    torch.manual_seed(0)
    model = _NoisySkipSupernet().train()
    x = torch.randn(2, 4, 8, 8)
    simplified = topofx.simplify(model, (x, epoch), mode="topo")
    assert simplified.report.fallback is None
    assert simplified.report.edges == 2
    assert simplified.report.rewritten_edges()["merged"] == 2
    alphas = [model.alpha]
    for k in range(3):
        with preserved_state(model, tensors=alphas):
            set_one_hot(alphas, lambda r, n: k)
            assert max_rel_error(*seeded_outputs(model, simplified, x, epoch)) <= VERTEX_RTOL
