"""Regression tests for issue 11: constructs on which ``simplify`` handed back a wrong module, crashed,
or only got away through its own self-check. One test (or parametrized group) per failure class.

The contract each test asserts, whatever the fix looks like:

* ``topofx.simplify(model, x, mode=M)`` does not raise, *captures* the model
  (``graph_module is not None``), and emits no warning about its self-check or a pass the rewrite
  driver undid (the construct must be handled at the root, not caught by the safety nets);
* exact mode: one training step of the simplified module equals the original's
  (:func:`topofx.testing.train_step_equivalence`: outputs, weight and architecture gradients, BN
  statistics; default tolerances);
* topo mode: at one-hot architecture weights (vertices) the train-mode output is within 1e-5 of the
  original's and the weight gradients are equal (architecture gradients and floated BN statistics
  legitimately differ in TopoNAS mode);
* something was still rewritten (``report.rewrites`` non-empty): not passing by doing nothing.

Classes 8 and 10 are about the self-check itself: a deliberately wrong pass is injected into the
exact pass list and ``simplify`` must refuse it (warn naming the pass, hand back a module equal to the
original; raise with ``strict=True``), never raise without ``strict`` nor hand back a wrong module.

Models live in ``never_wrong_models.py`` (DARTS, xautodl NAS-Bench-201, SNAS, ProxylessNAS styles).
"""
from __future__ import annotations

import operator
import warnings

import never_wrong_models as M
import pytest
import torch
from torch import nn

import topofx
from topofx import zoo
from topofx.ir import max_rel_error, preserved_state
from topofx.rewrite import Rewrite
from topofx.testing import find_arch_parameters, seeded_outputs, set_one_hot, train_step_equivalence

VERTEX_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _simplify(model, x, mode, **kwargs):
    """simplify with every warning recorded; asserts none is about the self-check."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simplified = topofx.simplify(model, x, mode=mode, **kwargs)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "self-check" in m or "was not applied" in m], messages
    return simplified


def _assert_simplified(simplified):
    assert simplified.graph_module is not None, simplified.report.fallback
    assert simplified.report.rewrites, "nothing was rewritten"


def _failures(report, categories):
    return [f"{c.category} {c.name}: rel {c.rel_error:.3g} {c.note}" for c in report.comparisons
            if not c.ok and c.category in categories]


def _assert_exact(model, simplified, x):
    report = train_step_equivalence(model, simplified, x)
    assert report.ok, str(report)


def _assert_vertices(model, simplified, x, picks):
    """At each one-hot vertex: train-mode outputs within 1e-5, output and weight gradients equal."""
    alphas = find_arch_parameters(model)
    assert alphas
    for pick in picks:
        with preserved_state(model, tensors=alphas):
            set_one_hot(alphas, pick)
            model.train()
            simplified.train()
            err = max_rel_error(*seeded_outputs(model, simplified, x))
            assert err <= VERTEX_RTOL, f"vertex error {err:.3g}"
            report = train_step_equivalence(model, simplified, x)
            assert not report.problems, report.problems
            bad = _failures(report, ("output", "weight_grad"))
            assert not bad, bad


def _input(batch=2, size=8, seed=1, dtype=torch.float32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


EACH = lambda k: (lambda r, n: k)  # noqa: E731  every edge picks candidate k
CYCLE = lambda r, n: r % n  # noqa: E731
CYCLE1 = lambda r, n: (r + 1) % n  # noqa: E731


# ---------------------------------------------------------------------------------------------
# 1. non-zero padding modes among the candidates of the edges leaving one node
# ---------------------------------------------------------------------------------------------
def _padding_model(padding_mode):
    ops = [M.conv(1), M.conv(3, padding_mode), M.conv(3), M.skip]
    return M.DartsNetwork(C=4, make_ops=ops, layers=1, steps=2), _input()


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padding_mode_candidates_exact(padding_mode):
    model, x = _padding_model(padding_mode)
    simplified = _simplify(model, x, "exact")
    _assert_simplified(simplified)
    _assert_exact(model, simplified, x)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padding_mode_candidates_topo_vertices(padding_mode):
    model, x = _padding_model(padding_mode)
    simplified = _simplify(model, x, "topo")
    _assert_simplified(simplified)
    _assert_vertices(model, simplified, x, [EACH(1), EACH(2), CYCLE, CYCLE1])


# ---------------------------------------------------------------------------------------------
# 2. random draws (DARTS drop_path) inside candidates keep their order
# ---------------------------------------------------------------------------------------------
def _drop_path_model():
    """Three intermediate nodes, so the convs of the edges leaving one state are fused/merged across
    nodes while other candidates' drop_path masks are drawn in between."""
    dp = M.with_drop_path
    ops = [M.conv(3), dp(M.pool("max")), M.conv(1), dp(M.pool("avg")), M.skip]
    return M.DartsNetwork(C=4, make_ops=ops, layers=1, steps=3), _input(batch=4)


def test_drop_path_candidates_exact():
    model, x = _drop_path_model()
    simplified = _simplify(model, x, "exact")
    _assert_simplified(simplified)
    _assert_exact(model, simplified, x)


def test_drop_path_candidates_topo_vertices():
    model, x = _drop_path_model()
    simplified = _simplify(model, x, "topo")
    _assert_simplified(simplified)
    _assert_vertices(model, simplified, x, [EACH(0), EACH(1), EACH(3), CYCLE, CYCLE1])


# ---------------------------------------------------------------------------------------------
# 3. in-place accumulation joins: out = w0 * op0(x); out.add_(w_i * op_i(x))
# ---------------------------------------------------------------------------------------------
def _inplace_join_model():
    ops = [M.zero, M.skip, M.pool("max"), M.conv(1), M.conv(3), M.sep(3)]
    return M.DartsNetwork(C=4, make_ops=ops, layers=1, steps=2, join="inplace"), _input()


def test_inplace_accumulation_join_exact():
    model, x = _inplace_join_model()
    simplified = _simplify(model, x, "exact")
    _assert_simplified(simplified)
    _assert_exact(model, simplified, x)


def test_inplace_accumulation_join_topo_vertices():
    model, x = _inplace_join_model()
    simplified = _simplify(model, x, "topo")
    _assert_simplified(simplified)
    _assert_vertices(model, simplified, x, [EACH(1), EACH(3), EACH(4), CYCLE, CYCLE1, lambda r, n: (r + 2) % n])


# ---------------------------------------------------------------------------------------------
# 4. candidates whose last convs read inputs of different widths (MBConv expansion 1/3/6)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratios", [(1, 3, 6), (3, 6)], ids=["e136", "e36"])
def test_mbconv_expansion_ratios_topo_vertices(ratios):
    model = M.ProxylessSuperNet(C=4, blocks=2, make_ops=[M.mbconv(e) for e in ratios])
    x = _input()
    simplified = _simplify(model, x, "topo")
    _assert_simplified(simplified)
    _assert_vertices(model, simplified, x, [EACH(k) for k in range(len(ratios))])


# ---------------------------------------------------------------------------------------------
# 5. functools.reduce(operator.add, ...) joins with `s = s + t` node sums / residual adds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [False, True], ids=["loop", "loop+residual"])
def test_reduce_join_with_loop_node_sum_topo(residual):
    ops = [M.zero, M.skip, M.pool("avg"), M.conv(1), M.conv(3)]
    model = M.DartsNetwork(C=4, make_ops=ops, layers=1, steps=2, join="reduce", node_sum="loop",
                           residual=residual)
    x = _input()
    simplified = _simplify(model, x, "topo")
    _assert_simplified(simplified)
    _assert_vertices(model, simplified, x, [EACH(3), EACH(4), CYCLE, CYCLE1])


# ---------------------------------------------------------------------------------------------
# 6. after zero elimination, two single-conv edges summed into one node are not one mixed edge
# ---------------------------------------------------------------------------------------------
def test_zero_eliminated_edges_not_merged_as_one_topo():
    model = M.DartsNetwork(C=4, make_ops=[M.zero, M.conv(3)], layers=1, steps=2, join="reduce")
    x = _input()
    simplified = _simplify(model, x, "topo")
    _assert_simplified(simplified)
    # every edge keeps its conv (W would be w1 + w2 = 2 if two edges were merged as one), and mixes
    _assert_vertices(model, simplified, x, [EACH(1), EACH(0), CYCLE, CYCLE1])


# ---------------------------------------------------------------------------------------------
# 7. model.double() before simplify(mode="topo")
# ---------------------------------------------------------------------------------------------
def test_double_model_topo():
    ops = [M.zero, M.skip, M.conv(1), M.conv(3), M.pool("avg")]
    model = M.NB201Network(C=4, make_ops=ops).double()
    x = _input(dtype=torch.float64)
    simplified = _simplify(model, x, "topo")
    _assert_simplified(simplified)
    out = simplified(x)
    assert all(t.dtype == torch.float64 for t in out)
    _assert_vertices(model, simplified, x, [EACH(2), EACH(3), CYCLE])


# ---------------------------------------------------------------------------------------------
# 9. BatchNorm2d(momentum=None) candidates, then a shape `if` in forward
# ---------------------------------------------------------------------------------------------
def _cumulative_bn_model():
    ops = [M.skip, M.conv(1, bn_momentum=None), M.conv(3, bn_momentum=None), M.pool("max")]
    return M.DartsNetworkShapeGuard(C=4, make_ops=ops, layers=2, steps=2), _input()


def test_cumulative_bn_with_shape_if_exact():
    model, x = _cumulative_bn_model()
    simplified = _simplify(model, x, "exact")
    _assert_simplified(simplified)
    _assert_exact(model, simplified, x)


def test_cumulative_bn_with_shape_if_topo_vertices():
    model, x = _cumulative_bn_model()
    simplified = _simplify(model, x, "topo")
    _assert_simplified(simplified)
    _assert_vertices(model, simplified, x, [EACH(1), EACH(2), CYCLE])


# ---------------------------------------------------------------------------------------------
# 8 & 10. the exact-mode self-check refuses a wrong pass, and never raises without strict
# ---------------------------------------------------------------------------------------------
def _once_per_graph(fn):
    """A pass that fires once per graph module (the driver repeats passes to a fixpoint)."""
    done = set()

    def pass_(ctx):
        if id(ctx.gm) in done:
            return []
        records = fn(ctx)
        if records:
            done.add(id(ctx.gm))
        return records

    return pass_


def make_scale_classifier_pass():
    """Deliberately WRONG: scales the classifier's logits by 1.5 (an O(1) output error)."""

    def rewrite(ctx):
        gm = ctx.gm
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
                with gm.graph.inserting_after(node):
                    scaled = gm.graph.call_function(operator.mul, (node, 1.5))
                node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
                return [Rewrite("nw_bad_scale", "fused", [node.name], scaled.name, True, "deliberately wrong")]
        return []

    bad = _once_per_graph(rewrite)
    bad.name, bad.exact = "nw_bad_scale", True
    return bad


def make_detach_weight_pass():
    """Deliberately WRONG for gradients only: ``w * op(x)`` becomes ``w.detach() * op(x)`` on one
    mixed edge -- the same values, but no gradient reaches the architecture parameters there."""

    def rewrite(ctx):
        gm = ctx.gm
        for edge in ctx.topology.edges:
            for cand in reversed(edge.candidates):  # the last (a conv in these models), not the Zero op
                mul, w = cand.mul, cand.weight
                if not any(a is w for a in mul.args):
                    continue
                with gm.graph.inserting_before(mul):
                    detached = gm.graph.call_method("detach", (w,))
                mul.args = tuple(detached if a is w else a for a in mul.args)
                return [Rewrite("nw_bad_detach", "fused", [mul.name], mul.name, True, "deliberately wrong")]
        return []

    bad = _once_per_graph(rewrite)
    bad.name, bad.exact, bad.first = "nw_bad_detach", True, True
    return bad


BAD_PASSES = {"scale": make_scale_classifier_pass, "detach": make_detach_weight_pass}


def _inject(monkeypatch, bad):
    from topofx.passes import EXACT_PASSES

    # first, while every mixed edge is still a plain ``sum w * op(x)`` (detach), or last (scale)
    passes = (bad, *EXACT_PASSES) if getattr(bad, "first", False) else (*EXACT_PASSES, bad)
    monkeypatch.setattr("topofx.passes.EXACT_PASSES", passes)


def _snas_model():
    """SNAS-style: Gumbel noise -log(-log(U)) from uniform_ in forward (float64 draws other numbers)."""
    ops = [M.zero, M.skip, M.pool("max"), M.conv(1), M.conv(3)]
    return M.SNASNetwork(C=4, make_ops=ops, layers=1, steps=2, temp=1.0), _input(batch=4)


def _darts_model():
    ops = [M.zero, M.skip, M.pool("avg"), M.conv(1), M.conv(3)]
    return M.DartsNetwork(C=4, make_ops=ops, layers=1, steps=2), _input(batch=4)


def _assert_refused(model, x, bad, caught_messages, simplified):
    named = [m for m in caught_messages if bad.name in m]
    assert named, f"no warning names the wrong pass {bad.name!r}: {caught_messages}"
    if simplified.graph_module is not None:  # kept a graph: it must be the original's behaviour
        report = train_step_equivalence(model, simplified, x)
        assert report.ok, str(report)


@pytest.mark.parametrize("kind", list(BAD_PASSES))
def test_self_check_refuses_wrong_pass_on_snas(monkeypatch, kind):
    model, x = _snas_model()
    bad = BAD_PASSES[kind]()
    _inject(monkeypatch, bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simplified = topofx.simplify(model, x, mode="exact", check=True)
    _assert_refused(model, x, bad, [str(w.message) for w in caught], simplified)
    with pytest.raises(Exception):
        topofx.simplify(model, x, mode="exact", check=True, strict=True)


@pytest.mark.parametrize("kind", list(BAD_PASSES))
def test_self_check_does_not_raise_without_strict(monkeypatch, kind):
    model, x = _darts_model()
    bad = BAD_PASSES[kind]()
    _inject(monkeypatch, bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simplified = topofx.simplify(model, x, mode="exact", check=True)  # must not raise
    _assert_refused(model, x, bad, [str(w.message) for w in caught], simplified)


def test_bad_passes_really_are_wrong_without_check(monkeypatch):
    """Guard for the two tests above: with check=False the injected passes do corrupt the result
    (outputs for ``scale``, architecture gradients only for ``detach``)."""
    model, x = _darts_model()
    for kind, category in (("scale", "output"), ("detach", "arch_grad")):
        bad = BAD_PASSES[kind]()
        with monkeypatch.context() as mp:
            _inject(mp, bad)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                simplified = topofx.simplify(model, x, mode="exact", check=False)
        assert any(r.pass_name == bad.name for r in simplified.report.rewrites), kind
        report = train_step_equivalence(model, simplified, x)
        assert _failures(report, (category,)), kind
        if kind == "detach":
            assert not _failures(report, ("output", "weight_grad", "buffer"))


def test_projected_darts_pt_graph_holds_only_the_projected_candidates():
    """DARTS-PT's projections zero the other candidates' weights and its join skips them (`if w != 0`):
    the captured graph leaves them out (a guarded decision), and a new projection captures anew.
    Was silently wrong (0.17 relative): the guard missed `weights[e].data.copy_(proj)` (a write
    through `.data`), so every call looked changed, the mixed ops were moved to run per call, and the
    next in-place write into `candidate_flags` (a tensor in a dict, read as a constant) went unseen."""
    from topofx.testing import assert_train_step_equivalent

    model, (x,) = zoo.build("darts-pt-projected", C=4, layers=3, projected=7, batch_size=2)
    full, _ = zoo.build("darts-pt", C=4, layers=3, batch_size=2)
    projected = topofx.simplify(model, x, mode="exact", strict=True)
    searched = topofx.simplify(full, x, mode="exact", strict=True)
    assert projected.report.before["conv"] < searched.report.before["conv"]
    assert projected.guards.values_hold() and not projected.report.decided_per_call
    assert_train_step_equivalent(model, projected, (x,))
    model.project_op(7, 2, "normal")  # one more projection: captured anew before the next call
    assert_train_step_equivalent(model, projected, (x,))
    assert projected.__dict__.get("recaptured")


def test_passes_may_read_a_storage_after_its_last_write():
    """The projected rows are written (`.data.copy_`) before any read of the weights: topo mode's
    passes add readers after those writes, which the driver accepts (nothing rejected) -- and the
    vertex self-check holds."""
    model, (x,) = zoo.build("darts-pt-projected", C=4, layers=3, projected=7, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simplified = topofx.simplify(model, x, mode="topo", strict=True)
    assert not any(run.rejected for run in simplified.report.passes)
    assert any(r.action == "merged" for r in simplified.report.rewrites)


class _FlagsInADict(nn.Module):
    """A projection flag kept in a dict (read as a constant when traced) and flipped in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.flags = {"normal": torch.tensor([True, False])}

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if self.flags["normal"][0] else y.relu()


def test_in_place_write_into_a_tensor_held_in_a_dict_is_seen():
    model, x = _FlagsInADict(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    assert torch.equal(simplified(x), model(x))
    model.flags["normal"][0] = False  # in place: the same tensor object
    assert torch.equal(simplified(x), model(x))


class _WriteThroughData(nn.Module):
    """A value decision on weights written through ``.data`` first (DARTS-PT's projected rows)."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(2, 3))
        self.proj = torch.tensor([0.0, 1.0, 0.0])
        self.ops = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1), nn.Identity()])

    def forward(self, x):
        weights = self.alpha.softmax(-1)
        weights[0].data.copy_(self.proj)
        return sum(w * op(x) for w, op in zip(weights[0], self.ops) if w != 0)


def test_value_guard_sees_writes_through_data():
    """The guard re-evaluates `w != 0` with the `.data` write: right after capture nothing changed."""
    model, x = _WriteThroughData(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    assert simplified.guards.values_hold()
    for _ in range(3):
        assert torch.allclose(simplified(x), model(x))
    assert not simplified.__dict__.get("recaptured")


class _SkipsZeroWeights(nn.Module):
    """DARTS-PT's join on plain alphas: ``if w != 0`` on each softmax weight."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(3))
        self.ops = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1), nn.Identity()])

    def forward(self, x):
        return sum(w * op(x) for w, op in zip(self.alpha.softmax(-1), self.ops) if w != 0)


def test_value_decision_on_a_tensor_reshaped_in_place_recaptures():
    """``alpha.data = <another shape>`` keeps the object (nothing to re-bind) but moves the elements the
    value decisions read: a decision that cannot be evaluated any more is a change, captured anew (the
    guard raised the IndexError of ``alpha[2]`` out of the call before)."""
    torch.manual_seed(0)
    model, x = _SkipsZeroWeights(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    graph = simplified.graph_module
    simplified(x)
    with torch.no_grad():
        model.alpha.data = torch.zeros(2)  # zip() now pairs two weights with the three ops
    assert torch.allclose(simplified(x), model(x))
    assert simplified.graph_module is not graph

