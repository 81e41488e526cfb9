"""Sparse execution (``topofx.sparse``): gates, per-call liveness, fused blocks, one sync per call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sampled_step import one_step
from torch import nn

import topofx
from topofx import zoo
from topofx.adapters import hard_gumbel_sample, register_adapter
from topofx.ir import max_rel_error, preserved_state
from topofx.modules import FusedConv2d
from topofx.sparse import gate


def _conv(C: int, k: int) -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, k, padding=k // 2, bias=False), nn.BatchNorm2d(C))


class _FanOutCell(nn.Module):
    """GDAS-style: three edges leave the stem's output; each edge samples one of {conv3x3, conv1x1,
    avg-pool, skip}; the selected op runs (``index[e].item()``), the others add their bare weight."""

    def __init__(self, C: int = 4, edges: int = 3, dead: str = "weight"):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.edges = nn.ModuleList(
            nn.ModuleList([_conv(C, 3), _conv(C, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Identity()])
            for _ in range(edges))
        self.alpha = nn.Parameter(1e-3 * torch.randn(edges, 4))
        self.tau, self.dead = 10.0, dead
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        hardwts, index = hard_gumbel_sample(self.alpha, self.tau)
        h = self.stem(x)
        out = 0
        for e, ops in enumerate(self.edges):
            k = index[e].item()
            if self.dead == "weight":
                out = out + sum(hardwts[e][i] * op(h) if i == k else hardwts[e][i] for i, op in enumerate(ops))
            else:
                out = out + ops[k](h) * hardwts[e][k]
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _relaxed(m, x, hardwts):
    h = m.stem(x)
    out = 0
    for e, ops in enumerate(m.edges):
        out = out + sum(gate(hardwts[e][i], op(h), dead=m.dead) for i, op in enumerate(ops))
    return m.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


register_adapter(_FanOutCell, lambda m: {"hardwts": hard_gumbel_sample(m.alpha, m.tau)[0]}, _relaxed, "fan-out")


def test_gate_is_the_product_eagerly():
    w, t = torch.tensor(0.5), torch.randn(2, 3)
    assert torch.equal(gate(w, t), w * t) and torch.equal(gate(w, t, dead="nothing"), w * t)


@pytest.mark.parametrize("dead", ["weight", "nothing"])
@pytest.mark.parametrize("mode", ["topo", "exact"])
def test_sparse_run_equals_the_original(dead, mode):
    """Outputs, every gradient (alpha's: float64, 1e-5), which parameters get one, and BN statistics."""
    torch.manual_seed(0)
    model = _FanOutCell(dead=dead).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    simplified = topofx.simplify(model, x, mode=mode, strict=True)
    assert simplified.report.sparse == 12
    selected = set()
    for seed in range(8):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            selected |= {(e, int(k)) for e, k in enumerate(hard_gumbel_sample(model.alpha, model.tau)[1].flatten())}
        out_ref, grads_ref, bufs_ref = one_step(model, model, x, seed)
        out, grads, bufs = one_step(model, simplified, x, seed)
        assert max_rel_error(out_ref, out) <= 1e-12
        assert set(grads) == set(grads_ref)
        for name, g in grads_ref.items():
            assert max_rel_error(g, grads[name]) <= 1e-5, name
        for name, b in bufs_ref.items():
            assert torch.equal(b, bufs[name]), name
    assert len(selected) >= 6  # several candidates were drawn (and others not) on every edge


def test_only_the_selected_blocks_of_a_fused_convolution_run():
    """The three edges' 3x3 convolutions are fused into one; a call computes the selected ones only."""
    torch.manual_seed(0)
    model = _FanOutCell(C=4)
    x = torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact")
    fused = [m for m in simplified.graph_module.modules() if isinstance(m, FusedConv2d)]
    assert fused
    widths: list[int] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: widths.append(out.shape[1])) for m in fused]
    try:
        for seed in range(6):
            widths.clear()
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                index = hard_gumbel_sample(model.alpha, model.tau)[1].flatten().tolist()
            torch.manual_seed(seed)
            simplified(x)
            convs = sum(k in (0, 1) for k in index)  # the edges that selected a convolution
            assert sum(widths) == 4 * convs
    finally:
        for h in hooks:
            h.remove()


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return sum(seen.values())


def test_unselected_candidates_save_nothing_for_backward():
    torch.manual_seed(0)
    model = _FanOutCell(C=8)
    x = torch.randn(4, 3, 16, 16)
    simplified = topofx.simplify(model, x, mode="topo")
    gm, sparse = simplified.graph_module, simplified.sparse
    with preserved_state(model):
        simplified.relaxed.resample(gm)
        simplified.relaxed.release(gm)  # a leaf sample: both runs backpropagate into their own graph
        dense = _saved_bytes(lambda: gm(x))
        lean = _saved_bytes(lambda: sparse(gm, x))
    assert lean < dense
    assert sparse.live_fraction(sparse.pattern(gm)) < 1.0


def test_one_device_sync_per_call(monkeypatch):
    """The graph's run reads the zero pattern once (GDAS itself syncs once per edge); nothing else."""
    torch.manual_seed(0)
    model = _FanOutCell()
    x = torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="topo")
    simplified.relaxed.resample(simplified.graph_module)
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    simplified.sparse(simplified.graph_module, x)
    simplified.sparse(simplified.graph_module, x)  # a cached pattern: still one
    assert calls == ["tolist", "tolist"]


def test_liveness_plans_are_cached_per_pattern():
    torch.manual_seed(0)
    model = _FanOutCell()
    x = torch.randn(2, 3, 8, 8)
    sparse = topofx.simplify(model, x, mode="topo").sparse
    pattern = bytes([1, 0, 1, 1] * 3)
    assert sparse.plan(pattern) is sparse.plan(pattern)
    assert sparse.live_fraction(bytes(12)) > sparse.live_fraction(pattern)  # all live > one per edge


def test_softmax_supernets_do_not_run_sparsely():
    model, (x,) = zoo.build("nb201-darts", C=4, N=1, batch_size=2)
    simplified = topofx.simplify(model, x, mode="topo")
    assert simplified.report.sparse == 0 and simplified.__dict__.get("sparse") is None


def test_deepcopy_runs_its_own_modules():
    """DARTS-V2-style ``copy.deepcopy`` of a sparse simplified module: the copy runs its own modules."""
    import copy

    torch.manual_seed(0)
    model = _FanOutCell()
    x = torch.randn(2, 3, 8, 8)
    twin = copy.deepcopy(topofx.simplify(model, x, mode="topo"))
    with torch.no_grad():
        for p in twin.original.parameters():
            p.add_(0.5)
    for seed in range(3):
        out_ref, grads_ref, _ = one_step(twin.original, twin.original, x, seed)
        out, grads, _ = one_step(twin.original, twin, x, seed)
        assert max_rel_error(out_ref, out) <= 1e-6 and set(grads) == set(grads_ref)
        assert all(p.grad is None for p in model.parameters())  # nothing reached the original model


class _DenseRelaxed(_FanOutCell):
    """The same model with an adapter written as a plain weighted sum (no gates)."""


register_adapter(_DenseRelaxed, lambda m: {"hardwts": hard_gumbel_sample(m.alpha, m.tau)[0]},
                 lambda m, x, hardwts: m.head(F.adaptive_avg_pool2d(
                     sum(hardwts[e][i] * op(m.stem(x)) for e, ops in enumerate(m.edges) for i, op in enumerate(ops)),
                     1).flatten(1)), "dense")


def test_exact_mode_keeps_an_ungated_adapter_out():
    """A plain weighted sum gives unselected weights the gradient <dL/dy, op(x)>, not the original's:
    exact mode captures the model itself instead (here: its forward decides on `.item()`, so it
    falls back to its eager forward); topo mode uses the adapter, densely."""
    torch.manual_seed(0)
    model = _DenseRelaxed()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="random draw made in forward"):
        exact = topofx.simplify(model, x, mode="exact")
    assert exact.report.adapter is None and exact.graph_module is None
    topo = topofx.simplify(model, x, mode="topo")
    assert topo.report.adapter == "dense" and topo.report.sparse == 0 and topo.__dict__.get("sparse") is None

