"""GDAS through adapters: the sampling runs eagerly, the cell is captured as a weighted sum over all
candidates, and topo mode is vertex-exact for GDAS's own (always one-hot) samples."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topofx
from topofx import zoo
from topofx.adapters import adapter_for, hard_gumbel_sample, register_adapter
from topofx.capture import max_rel_error, preserved_state
from topofx.testing import seeded_outputs


def _same_sample_error(model, simplified, x, seed):
    return max_rel_error(*seeded_outputs(model, simplified, x, seed=seed))


def _params_with_grad(model, net, x, seed) -> set[str]:
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = net(x)
    out[-1].logsumexp(-1).sum().backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return names


def _buffers_moved(model, net, x, seed) -> set[str]:
    """Names of ``model``'s buffers that one train-mode call of ``net`` changes."""
    with preserved_state(model):
        before = {n: b.clone() for n, b in model.named_buffers()}
        torch.manual_seed(seed)
        net(x)
        return {n for n, b in model.named_buffers() if not torch.equal(before[n], b)}


def _acts_like_gdas(model, simplified, x, seed) -> set[str]:
    """Same parameters get gradients as in GDAS (unselected candidates' stay ``None``), and no BN
    statistic moves that GDAS leaves alone (topo's merged candidates update new, floated ones).
    Returns the original's buffers that moved."""
    with preserved_state(model):
        expected = _params_with_grad(model, model, x, seed)
    with preserved_state(model):
        got = _params_with_grad(model, simplified, x, seed)
    assert got == expected
    moved = _buffers_moved(model, simplified, x, seed)
    assert moved <= _buffers_moved(model, model, x, seed)
    return moved


@pytest.fixture(scope="module")
def nb201_gdas():
    model, (x,) = zoo.build("nb201-gdas", C=8, N=1, batch_size=4)
    return model, x, topofx.simplify(model, x, mode="topo")


def test_adapter_is_used_and_edges_are_merged(nb201_gdas):
    model, x, simplified = nb201_gdas
    assert adapter_for(model) is not None
    assert simplified.report.fallback is None and simplified.report.adapter
    assert len([r for r in simplified.report.rewrites if r.action == "merged"]) == simplified.report.edges == 18
    # about one convolution per edge: all edges leaving a node share one merged convolution
    assert simplified.report.after["conv"] < simplified.report.before["conv"] / 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nb201_gdas_topo_equals_gdas_for_the_same_sample(nb201_gdas, seed):
    model, x, simplified = nb201_gdas
    assert _same_sample_error(model, simplified, x, seed) <= 1e-5


def test_nb201_gdas_gradients_like_gdas(nb201_gdas):
    """Unselected candidates' parameters get no gradient (as in GDAS); alpha does."""
    model, x, simplified = nb201_gdas
    for seed in (7, 8):
        assert _acts_like_gdas(model, simplified, x, seed)  # the selected reduction blocks' BNs do move
    with preserved_state(model):
        torch.manual_seed(7)
        simplified(x)[-1].sum().backward()
        assert model.arch_parameters.grad is not None and torch.isfinite(model.arch_parameters.grad).all()
        assert model.arch_parameters.grad.abs().sum() > 0


def test_nb201_gdas_exact_mode_is_gdas():
    """Exact mode needs no adapter: the redraw loop is speculated, the cells run per call."""
    model, (x,) = zoo.build("nb201-gdas", C=8, N=1, batch_size=4)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    assert simplified.report.fallback is None and simplified.report.adapter is None
    assert simplified.report.decided_per_call
    for seed in (3, 4):
        assert _same_sample_error(model, simplified, x, seed=seed) == 0.0


def test_darts_space_gdas_vertex_exact():
    model, (x,) = zoo.build("darts-space-gdas", C=4, N=1, batch_size=4)
    simplified = topofx.simplify(model, x, mode="topo")
    assert simplified.report.adapter and simplified.report.edges > 0
    for seed in (0, 1):
        assert _same_sample_error(model, simplified, x, seed) <= 1e-5
    # unselected separable/dilated candidates (depthwise stages included) and factorized-reduce
    # skips (fused across edges, their weight folded into their BN) get no gradient, as in GDAS
    for seed in (7, 8):
        moved = _acts_like_gdas(model, simplified, x, seed)
        assert any(".edges." in n for n in moved)  # the selected factorized-reduce skips' BNs do


class _TinyHardSampled(nn.Module):
    """A user's GDAS-style model: hard sample, `.item()` to run only the selected op."""

    def __init__(self, C=4):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.ops = nn.ModuleList([
            nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C, affine=False)),
            nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C, affine=False)),
            nn.Identity(),
        ])
        self.alpha = nn.Parameter(1e-3 * torch.randn(1, 3))
        self.tau = 5.0
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        hardwts, index = hard_gumbel_sample(self.alpha, self.tau)
        h = self.stem(x)
        k = index[0].item()
        h = sum(hardwts[0][i] * op(h) if i == k else hardwts[0][i] for i, op in enumerate(self.ops))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_user_registered_adapter():
    model = _TinyHardSampled()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        topofx.simplify(model, x, mode="topo")  # no adapter yet: eager fallback, with a warning
    assert any("random draw made in forward" in str(w.message) for w in caught)  # decided in its own forward

    def relaxed(m, x, hardwts):
        h = m.stem(x)
        h = sum(hardwts[0][i] * op(h) for i, op in enumerate(m.ops))
        return m.head(F.adaptive_avg_pool2d(h, 1).flatten(1))

    register_adapter(_TinyHardSampled, lambda m: {"hardwts": hard_gumbel_sample(m.alpha, m.tau)[0]}, relaxed, "tiny")
    simplified = topofx.simplify(model, x, mode="topo")
    assert simplified.report.adapter == "tiny"
    assert [r.action for r in simplified.report.rewrites].count("merged") == 1
    for seed in range(4):
        assert _same_sample_error(model, simplified, x, seed) <= 1e-5


class _RawConv(nn.Module):
    """A candidate that reads its kernel as a plain attribute (``get_attr`` in the graph)."""

    def __init__(self, C):
        super().__init__()
        self.kernel = nn.Parameter(0.1 * torch.randn(C, C, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.kernel, padding=1)


class _SharedHardSampled(nn.Module):
    """GDAS-style, with a convolution used both by a candidate and after the edge's join."""

    def __init__(self, C=4):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.conv3 = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.shared = nn.Conv2d(C, C, 1)
        self.skip = nn.Identity()
        self.raw = _RawConv(C)
        self.alpha = nn.Parameter(1e-3 * torch.randn(1, 4))
        self.tau = 5.0
        self.head = nn.Linear(C, 10)

    def candidates(self):
        return [self.conv3, self.shared, self.skip, self.raw]

    def forward(self, x):
        hardwts, index = hard_gumbel_sample(self.alpha, self.tau)
        h = self.stem(x)
        k = index[0].item()
        h = sum(hardwts[0][i] * op(h) if i == k else hardwts[0][i] for i, op in enumerate(self.candidates()))
        return self.head(F.adaptive_avg_pool2d(self.shared(h), 1).flatten(1))


def test_freeze_leaves_shared_parameters_alone():
    """Only what unselected candidates alone use is frozen (modules they call, parameters they read
    as attributes): a module also used outside the mixed edge keeps its gradient whichever
    candidate is drawn."""
    model = _SharedHardSampled()
    x = torch.randn(4, 3, 8, 8)

    def relaxed(m, x, hardwts):
        h = m.stem(x)
        h = sum(hardwts[0][i] * op(h) for i, op in enumerate(m.candidates()))
        return m.head(F.adaptive_avg_pool2d(m.shared(h), 1).flatten(1))

    register_adapter(_SharedHardSampled, lambda m: {"hardwts": hard_gumbel_sample(m.alpha, m.tau)[0]}, relaxed)
    simplified = topofx.simplify(model, x, mode="topo")
    assert simplified.report.adapter is not None
    drawn = set()
    for seed in range(12):
        with preserved_state(model):
            torch.manual_seed(seed)
            drawn.add(int(hard_gumbel_sample(model.alpha, model.tau)[1]))
        _acts_like_gdas(model, simplified, x, seed)
        with preserved_state(model):
            assert "shared.weight" in _params_with_grad(model, simplified, x, seed)
    assert drawn >= {0, 1, 3}  # each candidate both selected and not
