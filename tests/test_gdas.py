"""GDAS through adapters: the sampling runs eagerly, the cell is captured with every candidate gated
(``topofx.gate``), and the sparse run computes only the selected ones -- equal to GDAS in value,
in every gradient (alpha's included), in which parameters get one, and in BN statistics."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from sampled_step import one_step
from torch import nn

import topofx
from topofx import zoo
from topofx.adapters import adapter_for, hard_gumbel_sample, register_adapter
from topofx.ir import max_rel_error, preserved_state
from topofx.testing import seeded_outputs

GRAD_RTOL = 1e-5


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
    statistic moves that GDAS leaves alone.  Returns the original's buffers that moved."""
    with preserved_state(model):
        expected = _params_with_grad(model, model, x, seed)
    with preserved_state(model):
        got = _params_with_grad(model, simplified, x, seed)
    assert got == expected
    moved = _buffers_moved(model, simplified, x, seed)
    assert moved == _buffers_moved(model, model, x, seed)
    return moved


def assert_equals_gdas(model, simplified, x, seed):
    """Forward value, every parameter gradient and alpha's (float64 both sides, to 1e-5 of the largest),
    the set of parameters with a gradient, and every buffer after the step: GDAS's own."""
    out_ref, grads_ref, bufs_ref = one_step(model, model, x, seed)
    out, grads, bufs = one_step(model, simplified, x, seed)
    assert max_rel_error(out_ref, out) <= 1e-6
    assert set(grads) == set(grads_ref)
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for name, g in grads_ref.items():
        assert (grads[name] - g).abs().max().item() <= GRAD_RTOL * scale, name
    arch = [n for n in grads_ref if "arch" in n or n == "alpha"]
    assert arch, "alpha gets a gradient"
    for name in arch:  # the architecture gradient, on its own scale
        assert max_rel_error(grads_ref[name], grads[name]) <= GRAD_RTOL, name
    for name, b in bufs_ref.items():  # (topo mode's channels-last depthwise convolutions round alike, not equal)
        assert max_rel_error(bufs[name].double(), b.double()) <= 1e-6, name


@pytest.fixture(scope="module")
def nb201_gdas():
    model, (x,) = zoo.build("nb201-gdas", C=8, N=1, batch_size=4)
    return model, x, topofx.simplify(model, x, mode="topo")


def test_adapter_is_used_and_edges_are_gated(nb201_gdas):
    model, x, simplified = nb201_gdas
    assert adapter_for(model) is not None
    report = simplified.report
    assert report.fallback is None and report.adapter
    assert report.edges == 18 and report.sparse == 18 * 5
    assert "sparse: 90 candidates" in str(report)
    # the edges leaving one node share their ReLU and fuse their convolutions
    assert report.after["conv"] < report.before["conv"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nb201_gdas_topo_equals_gdas_for_the_same_sample(nb201_gdas, seed):
    model, x, simplified = nb201_gdas
    assert _same_sample_error(model, simplified, x, seed) <= 1e-6


@pytest.mark.parametrize("mode", ["topo", "exact"])
def test_nb201_gdas_gradients_are_gdas(mode):
    """float64 both sides: GDAS's straight-through gradient (each unselected ``hardwts[k]`` gets
    ``sum(dL/dy)``) reaches alpha exactly as in GDAS."""
    model, (x,) = zoo.build("nb201-gdas", C=8, N=1, batch_size=4)
    model, x = model.double(), x.double()
    simplified = topofx.simplify(model, x, mode=mode, strict=True)
    assert simplified.report.sparse
    for seed in (7, 8, 9):
        assert_equals_gdas(model, simplified, x, seed)
        _acts_like_gdas(model, simplified, x, seed)


@pytest.mark.parametrize("mode", ["topo", "exact"])
def test_darts_space_gdas_gradients_are_gdas(mode):
    """The DARTS-space GDAS adds nothing for unselected candidates: alpha's gradient flows through the
    selected probabilities only; unselected separable stages and factorized-reduce skips (fused
    across edges) get no gradient and keep their statistics."""
    model, (x,) = zoo.build("darts-space-gdas", C=4, N=1, batch_size=4)
    model, x = model.double(), x.double()
    simplified = topofx.simplify(model, x, mode=mode, strict=True)
    assert simplified.report.sparse and simplified.report.adapter
    for seed in (0, 1):
        assert_equals_gdas(model, simplified, x, seed)
        moved = _acts_like_gdas(model, simplified, x, seed)
        assert any(".edges." in n for n in moved)  # the selected candidates' BNs do move


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


@pytest.mark.parametrize("seed", [0, 35])  # at 35 the decision holds on the capture's fresh draws, not after
def test_a_decision_on_a_draw_in_forward_falls_back_naming_the_draw_and_the_adapter(seed):
    torch.manual_seed(seed)
    model = _TinyHardSampled()
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match="random draw made in forward at .*register an adapter"):
        simplified = topofx.simplify(model, x, mode="topo")
    assert simplified.report.fallback


def test_user_registered_adapter():
    torch.manual_seed(0)
    model = _TinyHardSampled()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        topofx.simplify(model, x, mode="topo")  # no adapter yet: eager fallback, with a warning
    assert any("random draw made in forward" in str(w.message) for w in caught)  # decided in its own forward

    def relaxed(m, x, hardwts):  # the original's `w * op(h) if i == k else w`, as gates
        h = m.stem(x)
        h = sum(topofx.gate(hardwts[0][i], op(h)) for i, op in enumerate(m.ops))
        return m.head(F.adaptive_avg_pool2d(h, 1).flatten(1))

    register_adapter(_TinyHardSampled, lambda m: {"hardwts": hard_gumbel_sample(m.alpha, m.tau)[0]}, relaxed, "tiny")
    simplified = topofx.simplify(model, x, mode="topo")
    assert simplified.report.adapter == "tiny" and simplified.report.sparse == 3
    for seed in range(4):
        assert _same_sample_error(model, simplified, x, seed) <= 1e-6
        _acts_like_gdas(model, simplified, x, seed)


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


def test_sparse_run_keeps_shared_modules():
    """Only what unselected candidates alone need is skipped (modules they call, parameters they read
    as attributes): a module also used outside the mixed edge keeps its gradient whichever
    candidate is drawn."""
    model = _SharedHardSampled()
    x = torch.randn(4, 3, 8, 8)

    def relaxed(m, x, hardwts):
        h = m.stem(x)
        h = sum(topofx.gate(hardwts[0][i], op(h)) for i, op in enumerate(m.candidates()))
        return m.head(F.adaptive_avg_pool2d(m.shared(h), 1).flatten(1))

    register_adapter(_SharedHardSampled, lambda m: {"hardwts": hard_gumbel_sample(m.alpha, m.tau)[0]}, relaxed)
    simplified = topofx.simplify(model, x, mode="topo")
    assert simplified.report.adapter is not None and simplified.report.sparse == 4
    drawn = set()
    for seed in range(12):
        with preserved_state(model):
            torch.manual_seed(seed)
            drawn.add(int(hard_gumbel_sample(model.alpha, model.tau)[1]))
        _acts_like_gdas(model, simplified, x, seed)
        assert_equals_gdas(model, simplified, x, seed)
        with preserved_state(model):
            assert "shared.weight" in _params_with_grad(model, simplified, x, seed)
    assert drawn >= {0, 1, 3}  # each candidate both selected and not
