"""Acceptance tests: supernets written in the coding styles of public NAS search code bases.

One group (class) per style; the models are the zoo's ``pdarts``, ``snas-full``, ``drnas-nb201``,
``drnas-darts``, ``darts-pt``, ``hard-gumbel``, ``gdas-style`` and ``path-arg`` (their module docstrings
in ``topofx/zoo/`` name each code base's idioms). Every group checks the same contract:

1. ``simplify(model, x, mode=m, strict=True)`` captures the model as one graph in both modes
   (``report.fallback is None``) and finds as many mixed edges as the model was built with (every
   mixed op of every search cell; for the hard-sampled styles, which run only the selected candidate,
   the edges a relaxed capture sees, as topofx's GDAS adapter reports them);
2. exact mode: one training step of the simplified module equals the original's -- outputs, gradients
   of every weight and architecture parameter, every buffer (BN running statistics);
3. topo mode: vertex-exactness -- at one-hot architecture weights (set with ``set_one_hot``; the
   hard-sampled styles' own samples; DrNAS: concentrations that make every Dirichlet sample one-hot to
   float32 precision) outputs and weight gradients equal the original's;
4. a second training step, after the architecture changed between steps the way each code base
   changes it (P-DARTS: ``update_p``; DARTS-PT: ``project_op``/``project_edge``; SNAS, DrNAS, GDAS,
   hard Gumbel: a new sample on the next call; path-arg: the other ``updateType``, positionally and
   by keyword), still equals the original's;
5. path-arg: ``simplified(x, 'weight')``, ``simplified(x, updateType='weight')`` and ``simplified(x)``
   each equal the original called the same way.

The original and the simplified module are separate deep copies with the same state (the reference
is copied before ``simplify``); :func:`topofx.testing.train_step_equivalence` pairs their tensors by
name and starts the simplified copy from the reference's values. Models are tiny (``C=4``, 3 cells,
2 steps; NAS-Bench-201: ``N=1``; batch 2, 16x16) and each is simplified once per mode.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import topofx
from topofx import zoo
from topofx.ir import preserved_state
from topofx.testing import (
    assert_train_step_equivalent,
    find_arch_parameters,
    flatten_tensors,
    set_one_hot,
    train_step_equivalence,
)
from topofx.zoo import (
    dartspt_style,
    drnas_style,
    gdas_style,
    hardgumbel_style,
    pdarts_style,
    snas_full_style,
)

DARTS_SMALL = dict(C=4, layers=3, steps=2, multiplier=2)
NB201_SMALL = dict(C=4, N=1)
SMALL = {
    "pdarts": DARTS_SMALL,
    "snas-full": DARTS_SMALL,
    "drnas-nb201": NB201_SMALL,
    "drnas-darts": DARTS_SMALL,
    "darts-pt": DARTS_SMALL,
    "hard-gumbel": DARTS_SMALL,
    "gdas-style": NB201_SMALL,
    "path-arg": NB201_SMALL,
}
BUILD = dict(batch_size=2, image_size=16)
MODES = ("exact", "topo")
# the mixed-op class of each DARTS-skeleton style and the attribute holding its candidates
DARTS_MIXED_OPS = {
    "pdarts": (pdarts_style.MixedOp, "m_ops"),
    "snas-full": (snas_full_style.MixedOp, "_ops"),
    "drnas-darts": (drnas_style.MixedOp, "_ops"),
    "darts-pt": (dartspt_style.MixedOp, "_ops"),
    "hard-gumbel": (hardgumbel_style.MixedOp, "_ops"),
}


def build(name: str, **overrides):
    model, (x,) = zoo.build(name, **BUILD, **{**SMALL[name], **overrides})
    return model, x


_CACHE: dict = {}


def simplified(name: str, mode: str):
    """``(reference, simplified, x)``, simplified once per session: the reference is a deep copy of
    the model taken before ``simplify(model, x, mode=mode, strict=True)``. A capture error is kept
    and raised again by every test that needs the pair. Checks restore both models' state."""
    key = (name, mode)
    if key not in _CACHE:
        model, x = build(name)
        reference = copy.deepcopy(model)
        try:
            _CACHE[key] = (reference, topofx.simplify(model, (x,), mode=mode, strict=True), x)
        except Exception as exc:  # noqa: BLE001 - re-raised by each test that needs it
            _CACHE[key] = exc
    got = _CACHE[key]
    if isinstance(got, Exception):
        raise got
    return got


def fresh_pair(name: str, mode: str):
    """Independent deep copies of the cached pair, for tests that change the models."""
    reference, simple, x = simplified(name, mode)
    return copy.deepcopy(reference), copy.deepcopy(simple), x


def expected_mixed_edges(name: str, model: nn.Module) -> int:
    """The mixed edges ``model`` was built with, counted from its construction."""
    if name in DARTS_MIXED_OPS:
        cls, attr = DARTS_MIXED_OPS[name]
        per_cell = sum(2 + i for i in range(model._steps))  # node i of a DARTS cell has 2 + i inputs
        mixed = [m for m in model.modules() if isinstance(m, cls)]
        assert len(mixed) == len(model.cells) * per_cell
        assert all(len(getattr(m, attr)) >= 2 for m in mixed)
        return len(model.cells) * per_cell
    # NAS-Bench-201 skeleton: 3N search cells of max_nodes nodes, one edge per pair of nodes
    search_cells = [c for c in model.cells if hasattr(c, "edges")]
    per_cell = model.max_nodes * (model.max_nodes - 1) // 2
    assert len(search_cells) == len(model.cells) - 2  # all but the two reduction blocks
    assert all(len(c.edges) == per_cell and all(len(e) >= 2 for e in c.edges.values())
               for c in search_cells)
    return len(search_cells) * per_cell


class Call(nn.Module):
    """``model(x, *args, **kwargs)`` as a one-input module, for the equivalence helpers."""

    def __init__(self, model: nn.Module, *args, **kwargs):
        super().__init__()
        self.model = model
        self.args, self.kwargs = args, kwargs

    def forward(self, x):
        return self.model(x, *self.args, **self.kwargs)

    def arch_parameters(self):
        return find_arch_parameters(self.model)


def sgd_step(model: nn.Module, inputs: tuple, seed: int, lr: float = 0.05) -> None:
    """One real training step (weights and architecture parameters) between two compared steps."""
    params = list({id(p): p for p in [*model.parameters(), *find_arch_parameters(model)]}.values())
    torch.manual_seed(seed)
    leaves = [t for _, t in flatten_tensors(model(*inputs)) if t.requires_grad]
    gen = torch.Generator().manual_seed(seed + 100)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in leaves)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(lr * g)


def assert_exact_step(reference, simple, inputs, seed: int = 0) -> None:
    """Outputs, every weight and architecture gradient and every buffer equal (default tolerances),
    and the comparison really covered all of them."""
    report = assert_train_step_equivalent(reference, simple, inputs, seed=seed)
    counts = report.counts()
    arch = find_arch_parameters(reference)
    assert counts["arch_grad"] == len(arch) > 0
    assert counts["weight_grad"] == sum(1 for _ in reference.parameters()) - sum(
        isinstance(a, nn.Parameter) for a in arch)
    assert counts["buffer"] == sum(1 for _ in reference.buffers()) > 0
    assert counts["output"] >= 1


def assert_vertex_step(reference, simple, inputs, seed: int = 0) -> None:
    """Topo mode at a vertex: outputs and weight gradients equal the original's (architecture
    gradients and floated BN statistics legitimately differ)."""
    report = train_step_equivalence(reference, simple, inputs, seed=seed)
    assert not report.problems, report.problems
    assert report.counts()["output"] >= 1
    bad = [f"{c.category} {c.name}: rel {c.rel_error:.3g} {c.note}" for c in report.comparisons
           if not c.ok and c.category in ("output", "weight_grad")]
    assert not bad, bad


def each(k: int):
    return lambda r, n: k  # every edge picks candidate k


def cycle(r: int, n: int) -> int:
    return (r + 1) % n


class _StyleTests:
    """The contract, shared by every style; subclasses name the style and say how its
    architecture is set to a vertex and changed between steps."""

    name: str
    picks: list = []  # set_one_hot choices for the vertex check (softmax-weighted styles)

    def set_vertex(self, alphas, pick) -> None:
        set_one_hot(alphas, pick)

    def change(self, model: nn.Module) -> None:
        """How the code base changes the architecture between two steps (default: nothing; the
        next call draws a new sample)."""

    # 1 ------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("mode", MODES)
    def test_captured_as_one_graph(self, mode):
        reference, simple, x = simplified(self.name, mode)
        report = simple.report
        assert report.fallback is None and simple.graph_module is not None, report.fallback
        assert report.mode == mode
        assert report.edges == expected_mixed_edges(self.name, reference), str(report)

    # 2 ------------------------------------------------------------------------------------------
    def test_exact_train_step(self):
        reference, simple, x = simplified(self.name, "exact")
        assert_exact_step(reference, simple, (x,))

    # 3 ------------------------------------------------------------------------------------------
    def test_topo_vertex_exact(self):
        reference, simple, x = simplified(self.name, "topo")
        alphas = find_arch_parameters(reference)
        assert alphas and self.picks
        for pick in self.picks:
            with preserved_state(reference, tensors=alphas):
                self.set_vertex(alphas, pick)  # the simplified copy gets them through the sync
                assert_vertex_step(reference, simple, (x,))

    # 4 ------------------------------------------------------------------------------------------
    def test_second_step_after_change(self):
        reference, simple, x = fresh_pair(self.name, "exact")
        assert_exact_step(reference, simple, (x,), seed=0)
        before = [a.detach().clone() for a in find_arch_parameters(reference)]
        for model in (reference, simple):
            sgd_step(model, (x,), seed=0)
            self.change(model)
        assert any(not torch.equal(a, b) for a, b in zip(before, find_arch_parameters(reference)))
        assert_exact_step(reference, simple, (x,), seed=1)


class _SoftmaxDartsStyle(_StyleTests):
    picks = [each(3), each(4), each(1), cycle]  # skip_connect, sep_conv_3x3, max_pool_3x3, mixed


class _HardSampledStyle(_StyleTests):
    """The model draws its own one-hot sample every call: each seed is a vertex.  Its mixed ops (or
    the cells that pick a candidate with ``.item()``) decide on a value drawn anew every call, so
    each runs per call, as written -- one node of the graph that runs only the selected candidate,
    as the original does (``report.decided_per_call``); the rest of the model is the graph."""

    deciding: type  # the class whose forward takes the per-call decision
    gated = False  # its decision is a gate on one candidate's own weight (capture.gating): no unit per call

    @pytest.mark.parametrize("mode", MODES)
    def test_captured_as_one_graph(self, mode):
        reference, simple, x = simplified(self.name, mode)
        report = simple.report
        assert report.fallback is None and simple.graph_module is not None, report.fallback
        deciding = {n for n, m in reference.named_modules() if isinstance(m, self.deciding)}
        mixed = expected_mixed_edges(self.name, reference)  # every mixed edge sits in one of them
        assert deciding and mixed > 0
        if self.gated:  # every candidate a gate of the one graph, run only when selected
            assert report.decided_per_call == () and report.sparse > 0 and report.edges == mixed, str(report)
        else:
            assert set(report.decided_per_call) == deciding and report.edges == 0, str(report)

    def test_topo_vertex_exact(self):
        reference, simple, x = simplified(self.name, "topo")
        for seed in (0, 1, 2):
            assert_vertex_step(reference, simple, (x,), seed=seed)


# ---------------------------------------------------------------------------------------------
# P-DARTS
# ---------------------------------------------------------------------------------------------
@pytest.mark.xdist_group("styles-pdarts")  # workers share the cached simplifications
class TestPDarts(_SoftmaxDartsStyle):
    name = "pdarts"

    def change(self, model):
        # P-DARTS sets a new skip-connect dropout rate every epoch (``model.p = ...;
        # model.update_p()``); 0.1 -> 0.4 here, a rate the captured graph did not see
        model.update_p(0.4)
        rates = [d.p for d in model.dropout_modules()]
        assert rates and all(r == 0.4 for r in rates)

    def test_stage_switch_drops_candidates(self):
        stage1, x = build(self.name)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for a in stage1.arch_parameters():
                a.copy_(torch.randn(a.shape, generator=gen))  # distinct rankings on every edge
        _, keep, p = pdarts_style.STAGES[1]
        switches_normal, switches_reduce = stage1.next_stage_switches(num_to_drop=8 - keep)
        assert all(sum(s) == keep for s in switches_normal + switches_reduce)
        assert len({tuple(s) for s in switches_normal}) > 1  # edges now hold different candidates
        stage2, x = build(self.name, switches_normal=switches_normal,
                          switches_reduce=switches_reduce, p=p)
        assert stage2.alphas_normal.shape == (len(switches_normal), keep)
        reference = copy.deepcopy(stage2)
        simple = topofx.simplify(stage2, (x,), mode="exact", strict=True)
        assert simple.report.fallback is None
        assert simple.report.edges == expected_mixed_edges(self.name, reference)
        assert_exact_step(reference, simple, (x,))


# ---------------------------------------------------------------------------------------------
# SNAS (authors' code)
# ---------------------------------------------------------------------------------------------
@pytest.mark.xdist_group("styles-snas-full")  # workers share the cached simplifications
class TestSnasFull(_SoftmaxDartsStyle):
    name = "snas-full"  # a 1e4 one-hot log-alpha makes the hand-written Gumbel softmax one-hot

    def test_returns_logits_and_penalty(self):
        model, x = build(self.name)
        out = model(x)
        assert isinstance(out, tuple) and len(out) == 2 and out[1].dim() == 0
        assert out[1].requires_grad  # the penalty depends on the sample, hence on the alphas


# ---------------------------------------------------------------------------------------------
# DrNAS
# ---------------------------------------------------------------------------------------------
def dirichlet_vertex(alphas, choose) -> None:
    """Dirichlet samples are never exactly one-hot. With alpha 0 at the chosen candidate and -15
    elsewhere the concentrations ``elu(alpha) + 1`` are 1 and ~3e-7: every sample is one-hot to
    float32 precision (the others' weights ~1e-38, the chosen one's 1 - 6e-8)."""
    with torch.no_grad():
        for a in alphas:
            rows = a.view(-1, a.shape[-1])
            rows.fill_(-15.0)
            for r in range(rows.shape[0]):
                rows[r, choose(r, rows.shape[-1])] = 0.0
        with preserved_state(tensors=alphas):  # the claim above, for the draws of a seed-0 forward
            torch.manual_seed(0)
            for a in alphas:
                w = drnas_style.process_step_matrix(a, "dirichlet", None)
                assert ((w < 1e-30) | (w > 1 - 1e-6)).all() and (w > 0.5).sum(-1).eq(1).all()


class _DrNASStyle(_StyleTests):
    def set_vertex(self, alphas, pick):
        dirichlet_vertex(alphas, pick)

    def test_second_step_after_pruning(self):
        """DrNAS's progressive learning prunes each edge to its strongest candidates between
        stages (a boolean mask; the pruned weights are exactly 0 and ``if not w == 0`` skips them)."""
        reference, simple, x = fresh_pair(self.name, "exact")
        for model in (reference, simple):
            sgd_step(model, (x,), seed=0)
            model.pruning(self.num_keep)
        assert_exact_step(reference, simple, (x,), seed=1)


@pytest.mark.xdist_group("styles-drnas-nb201")  # workers share the cached simplifications
class TestDrNASNB201(_DrNASStyle):
    name = "drnas-nb201"
    picks = [each(2), each(3), each(4), cycle]  # conv 1x1, conv 3x3, avg pool, mixed
    num_keep = 3


@pytest.mark.xdist_group("styles-drnas-darts")  # workers share the cached simplifications
class TestDrNASDarts(_DrNASStyle):
    name = "drnas-darts"
    picks = [each(3), each(4), each(1), cycle]
    num_keep = 4  # DrNAS's DARTS-space schedule keeps 7, then 4 of 8


# ---------------------------------------------------------------------------------------------
# DARTS-PT
# ---------------------------------------------------------------------------------------------
@pytest.mark.xdist_group("styles-darts-pt")  # workers share the cached simplifications
class TestDartsPT(_SoftmaxDartsStyle):
    name = "darts-pt"
    picks = [each(4), cycle]  # each vertex changes which ``w != 0`` terms run: fewer picks, less time

    def change(self, model):
        # one projection round of DARTS-PT: an edge of each cell type fixed to one operation, then a
        # node keeps its two best input edges (edge 4 of node 0's inputs 2, 3, 4 is dropped)
        model.project_op(0, 3, "normal")
        model.project_op(1, 4, "reduce")
        model.project_edge(0, [2, 3], "normal")
        assert not model.candidate_flags["normal"][0] and not model.candidate_flags_edge["normal"][0]

    def test_projection_evaluation_with_weights_dict(self):
        """DARTS-PT's selection step evaluates the supernet with one candidate of an edge masked out,
        ``model(x, weights_dict={cell_type: weights})``, forward only (its ``infer`` runs under
        ``torch.no_grad()``, in train mode): outputs and BN statistics equal the original's."""

        class ProjectionEval(nn.Module):
            def __init__(self, model, eid, opid):
                super().__init__()
                self.model, self.eid, self.opid = model, eid, opid

            def forward(self, x):
                weights = self.model.get_projected_weights("normal")
                proj_mask = torch.ones_like(weights[self.eid])
                proj_mask[self.opid] = 0
                weights[self.eid] = weights[self.eid] * proj_mask
                return self.model(x, weights_dict={"normal": weights})

            def arch_parameters(self):
                return self.model.arch_parameters()

        reference, simple, x = fresh_pair(self.name, "exact")
        for eid, opid in ((0, 4), (2, 0)):
            report = assert_train_step_equivalent(ProjectionEval(reference, eid, opid),
                                                  ProjectionEval(simple, eid, opid), (x,),
                                                  backward=False)
            counts = report.counts()
            assert counts["output"] == 1 and counts["buffer"] == sum(1 for _ in reference.buffers())
        # the masked candidate really changes the output (so the check above can fail)
        with torch.no_grad(), preserved_state(reference):
            torch.manual_seed(0)
            full = reference(x)
            torch.manual_seed(0)
            masked = ProjectionEval(reference, 0, 4)(x)
        assert (full - masked).abs().max() > 1e-4 * full.abs().max()


# ---------------------------------------------------------------------------------------------
# hard Gumbel-softmax and GDAS
# ---------------------------------------------------------------------------------------------
@pytest.mark.xdist_group("styles-hard-gumbel")  # workers share the cached simplifications
class TestHardGumbel(_HardSampledStyle):
    name = "hard-gumbel"
    deciding = hardgumbel_style.MixedOp
    gated = True


@pytest.mark.xdist_group("styles-gdas-style")  # workers share the cached simplifications
class TestGdasStyle(_HardSampledStyle):
    name = "gdas-style"
    deciding = gdas_style.SearchCell


# ---------------------------------------------------------------------------------------------
# a path-selecting forward argument (NASP's updateType)
# ---------------------------------------------------------------------------------------------
WEIGHT_CALLS = [pytest.param(("weight",), {}, id="positional"),
                pytest.param((), {"updateType": "weight"}, id="keyword")]
ALL_CALLS = WEIGHT_CALLS + [pytest.param((), {}, id="default"),
                            pytest.param((), {"updateType": "alpha"}, id="keyword-alpha")]


@pytest.mark.xdist_group("styles-path-arg")  # workers share the cached simplifications
class TestPathArg(_StyleTests):
    name = "path-arg"
    picks = [each(2), each(3), each(4), cycle]

    def test_paths_differ(self):
        """The checks of this group can fail: the two paths give different outputs at these alphas."""
        model, x = build(self.name)
        a, b = model(x), model(x, "weight")
        assert (a - b).abs().max() > 1e-3 * b.abs().max()

    @pytest.mark.parametrize("args, kwargs", ALL_CALLS)
    def test_exact_each_call_form(self, args, kwargs):
        reference, simple, x = simplified(self.name, "exact")
        assert_exact_step(Call(reference, *args, **kwargs), Call(simple, *args, **kwargs), (x,))

    @pytest.mark.parametrize("args, kwargs", WEIGHT_CALLS)
    def test_topo_weight_path_is_a_vertex(self, args, kwargs):
        """The 'weight' path's straight-through weights are one-hot at any alphas."""
        reference, simple, x = simplified(self.name, "topo")
        assert_vertex_step(Call(reference, *args, **kwargs), Call(simple, *args, **kwargs), (x,))

    def test_topo_alpha_path_by_keyword_vertex_exact(self):
        reference, simple, x = simplified(self.name, "topo")
        alphas = find_arch_parameters(reference)
        for pick in self.picks[:2]:
            with preserved_state(reference, tensors=alphas):
                set_one_hot(alphas, pick)
                assert_vertex_step(Call(reference, updateType="alpha"),
                                   Call(simple, updateType="alpha"), (x,))

    @pytest.mark.parametrize("args, kwargs", WEIGHT_CALLS)
    def test_second_step_other_path(self, args, kwargs):
        reference, simple, x = fresh_pair(self.name, "exact")
        assert_exact_step(reference, simple, (x,), seed=0)  # the architecture step's path
        for model in (reference, simple):
            sgd_step(model, (x,), seed=0)
        assert_exact_step(Call(reference, *args, **kwargs), Call(simple, *args, **kwargs), (x,), seed=1)
        assert_exact_step(reference, simple, (x,), seed=2)  # and back to the default path
