"""The style fuzzer (``topofx.fuzz``): a fixed-seed CI sample of generated supernets must hold topofx's
contracts, and the fuzzer itself must generate what it claims, build runnable models, set exact
vertices, keep a failure class while minimizing and report through the command line.

The CI sample is the first ``TOPOFX_FUZZ_N`` models (default 10) and then each model further along
that draws a style value none before it drew, split into chunks of 10 so that pytest-xdist spreads them; ``TOPOFX_FUZZ_N=1000 pytest tests/test_fuzz.py -k sample`` runs the full set (so does
``topofx fuzz --n 1000``).
"""
from __future__ import annotations

import functools
import itertools
import os
import re
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import topofx
import topofx.simplifier
from topofx import fuzz
from topofx.cli import main as cli_main
from topofx.testing import find_arch_parameters

SAMPLE_N = int(os.environ.get("TOPOFX_FUZZ_N", "10"))  # CI: a fixed sample; TOPOFX_FUZZ_N=40 or more for the full set
SAMPLE_SEED = 0
CHUNK = 10
SEQUENCE = functools.partial(fuzz._model_seed, SAMPLE_SEED)  # the fuzzer's own sequence of model seeds


def _style_values(spec: dict) -> set[tuple[str, object]]:
    """(dimension, value) of every style choice a spec makes, and ``(dimension, "drawn")`` for each
    capture-v2 construct it has."""
    return ({(dim, spec[dim]) for dim in fuzz.DIMENSIONS} | {("ops", op) for op in spec["ops"]}
            | {(dim, "drawn") for dim in fuzz.V2_DIMENSIONS if spec[dim] != "none"}
            | {("cell", spec["cell"]), ("reduction", bool(spec.get("reductions")))})


def _covering_sample(n: int, search: int = 2000) -> list[int]:
    """The first ``n`` seeds, then, further along the sequence, each seed that draws a style value none
    before it drew: a fixed sample that exercises every value (checked below)."""
    seeds = [SEQUENCE(i) for i in range(n)]
    seen = set().union(*(_style_values(fuzz._draw_spec(s)) for s in seeds))
    for i in range(n, n + search):
        new = _style_values(fuzz._draw_spec(SEQUENCE(i))) - seen
        if new:
            seeds.append(SEQUENCE(i))
            seen |= new
    return seeds


SAMPLE_SEEDS = _covering_sample(SAMPLE_N)
CHUNKS = [SAMPLE_SEEDS[i:i + CHUNK] for i in range(0, len(SAMPLE_SEEDS), CHUNK)]


def _first_seed(predicate) -> int:
    """The first seed of the sampling sequence (past the CI sample, if need be) whose spec satisfies ``predicate``."""
    return next(s for s in map(SEQUENCE, itertools.count()) if predicate(fuzz._draw_spec(s)))


# ---------------------------------------------------------------------------------------------
# the CI sample: no silent mismatch, no crash
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", range(len(CHUNKS)), ids=lambda i: f"seeds{CHUNKS[i][0]}-{CHUNKS[i][-1]}")
def test_sample_holds_contracts(chunk):
    outcomes = [o for seed in CHUNKS[chunk] for o in fuzz.check(seed, fuzz.MODES)]
    bad = [o for o in outcomes if o.failed]
    lines = [f"seed {o.seed} {o.mode} {o.outcome}: {o.key}\n  spec {o.spec}\n  "
             + "\n  ".join(o.message.strip().splitlines()[-6:]) for o in bad]
    assert not bad, f"{len(bad)} of {len(outcomes)} checks failed (reproduce: python -m topofx.fuzz):\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the fuzzer itself
# ---------------------------------------------------------------------------------------------
def test_sample_covers_every_style_value():
    seen: dict[str, set] = defaultdict(set)
    for seed in SAMPLE_SEEDS:
        for dim, value in _style_values(fuzz._draw_spec(seed)):
            seen[dim].add(value)
    for dim, values in fuzz.DIMENSIONS.items():
        assert seen[dim] == set(values), f"{dim}: never drawn {set(values) - seen[dim]}"
    assert seen["ops"] == set(fuzz.OP_POOL) | set(fuzz.CHAIN_OPS), set(fuzz.OP_POOL + fuzz.CHAIN_OPS) - seen["ops"]
    assert seen["cell"] == {"darts", "nb201", "chain"}
    assert seen["reduction"] == {True, False}


def test_capture_v2_values_are_drawn():
    """Every capture-v2 value within a few hundred models (the changes between steps are rarer than
    the rest: each costs a capture anew), and the CI sample has some of each dimension."""
    seen: dict[str, set] = defaultdict(set)
    for i in range(400):
        spec = fuzz._draw_spec(fuzz._model_seed(SAMPLE_SEED, i))
        for dim in fuzz.V2_DIMENSIONS:
            seen[dim].add(spec[dim])
    assert seen == {dim: set(values) for dim, values in fuzz.V2_DIMENSIONS.items()}
    sample = [fuzz._draw_spec(s) for s in SAMPLE_SEEDS]
    for dim in fuzz.V2_DIMENSIONS:
        assert any(spec[dim] != "none" for spec in sample), dim


def test_capture_v2_constructs_leave_the_other_dimensions_as_they_were():
    """The capture-v2 dimensions come from a stream of their own: every other value a seed draws is
    the one it drew before they existed, and ``v2=False`` gives that model back (``--v1``)."""
    for seed in SAMPLE_SEEDS[:10]:
        spec, old = fuzz._draw_spec(seed), fuzz._draw_spec(seed, v2=False)
        assert {k: v for k, v in spec.items() if k not in fuzz.V2_DIMENSIONS} == \
            {k: v for k, v in old.items() if k not in fuzz.V2_DIMENSIONS}
        assert all(old[dim] == "none" for dim in fuzz.V2_DIMENSIONS)
    assert any(fuzz._draw_spec(s) != fuzz._draw_spec(s, v2=False) for s in SAMPLE_SEEDS[:10])
    # a spec written before the dimensions existed (an old reproducer's) renders as they are off
    spec = fuzz._draw_spec(SAMPLE_SEEDS[3], v2=False)
    legacy = {k: v for k, v in spec.items() if k not in fuzz.V2_DIMENSIONS}
    strip = lambda text: re.sub(r"SPEC = \{.*?\}\n", "", text, flags=re.S)  # noqa: E731
    assert strip(fuzz.render(legacy)) == strip(fuzz.render(spec))



def test_a_refining_value_takes_a_share_of_the_value_it_refines_only(monkeypatch):
    """``closure_gate`` and ``ste_indexed`` came after seeds were relied on: each is drawn only where the
    value it refines was, so every other seed keeps its model (the CI sample and old reproducers stay what they were)."""
    specs = [fuzz._draw_spec(SEQUENCE(i)) for i in range(300)]
    functions = tuple(v for v in fuzz.V2_DIMENSIONS["function"] if v not in fuzz._REFINEMENTS)
    monkeypatch.setitem(fuzz.V2_DIMENSIONS, "function", functions)
    monkeypatch.setattr(fuzz, "_REFINEMENTS", {})
    before = [fuzz._draw_spec(SEQUENCE(i)) for i in range(300)]
    changed = [(b["function"], s["function"]) for b, s in zip(before, specs) if b != s]
    assert changed and set(changed) == {("binary_gate", "closure_gate"), ("ste_weights", "ste_indexed")}
    assert any(b["function"] == s["function"] == "binary_gate" for b, s in zip(before, specs))
    assert any(b["function"] == s["function"] == "ste_weights" for b, s in zip(before, specs))


def test_closure_gate_applies_a_function_given_closures_over_the_candidates():
    """The generated gate is ProxylessNAS's full_v2 idiom: apply is given two functions made in forward
    that close over the edge's candidates; capture holds them in one node per edge, and the backward
    closure gives every weight a gradient."""
    from topofx import capture

    spec = fuzz._draw_spec(_first_seed(lambda s: s["function"] == "closure_gate" and s["dtype"] == "float32"))
    model, inputs, _ = fuzz.build(fuzz.render(spec), spec)
    model.train()
    simplified = topofx.simplify(model, inputs, mode="exact", strict=True)
    applied = [m for m in simplified.graph_module.modules() if isinstance(m, capture.AppliedFunction)]
    assert applied and all(len(m.held) == 2 and all(callable(f) and f.__closure__ for f in m.held.values())
                           for m in applied)
    candidates = {id(c.cell_contents) for m in applied for f in m.held.values() for c in f.__closure__}
    assert candidates <= {id(m) for m in model.modules()}
    torch.manual_seed(0)
    fuzz._loss(simplified(*inputs)).backward()
    for a in find_arch_parameters(model):
        assert a.grad is not None and a.grad.abs().sum() > 0

def test_generation_is_deterministic_and_readable():
    source, spec = fuzz.generate(SAMPLE_SEEDS[3])
    assert fuzz.generate(SAMPLE_SEEDS[3]) == (source, spec)
    compile(source, "generated.py", "exec")
    assert "def build():" in source and "set_vertex" in source
    assert all(len(line) <= 130 for line in source.splitlines())


@pytest.mark.parametrize("flavor", fuzz.DIMENSIONS["flavor"])
def test_generated_model_trains_and_arch_parameters_get_gradients(flavor):
    seed = _first_seed(lambda s: s["flavor"] == flavor)
    spec = fuzz._draw_spec(seed)
    model, inputs, _ = fuzz.build(fuzz.render(spec), spec)
    alphas = find_arch_parameters(model)
    assert alphas and all(a.requires_grad for a in alphas)
    model.train()
    torch.manual_seed(0)
    fuzz._loss(model(*inputs)).backward()
    for a in alphas:
        assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0, (spec, a.shape)
    expected = torch.float64 if spec["dtype"] == "float64" else torch.float32
    assert all(p.dtype == expected for p in model.parameters())


class _RecordWeights(TorchFunctionMode):
    """Records the outputs of the functions that turn architecture parameters into weights."""

    def __init__(self, funcs):
        super().__init__()
        self.funcs = funcs
        self.outputs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.funcs:
            self.outputs.append(out.detach().clone())
        return out


_WEIGHT_FUNCS = {
    "softmax": (F.softmax,), "softmax_temp": (F.softmax,), "gumbel_manual": (F.softmax,),
    "sigmoid": (torch.sigmoid,), "gumbel_soft": (F.gumbel_softmax,), "gumbel_hard": (F.gumbel_softmax,),
    "relu_norm": (torch.Tensor.__truediv__, torch.Tensor.div),
}


@pytest.mark.parametrize("kind", sorted(_WEIGHT_FUNCS))
def test_vertex_setter_gives_one_hot_weights(kind):
    # PC-DARTS's betas are softmaxed too and are not part of the vertex: leave that flavor out here
    seed = _first_seed(lambda s: s["weights"] == kind and s["flavor"] != "pcdarts")
    spec = fuzz._draw_spec(seed)
    model, inputs, set_vertex = fuzz.build(fuzz.render(spec), spec)
    assert set_vertex is not None
    set_vertex(fuzz._vertex_choice(seed))
    model.train()
    recorder = _RecordWeights(_WEIGHT_FUNCS[kind])
    with torch.no_grad(), recorder:
        model(*inputs)
    assert recorder.outputs, spec
    n = len(spec["ops"])
    for w in recorder.outputs:
        rows = w.reshape(-1, n)
        assert ((rows == 0) | (rows == 1)).all() and (rows.sum(-1) == 1).all(), (spec, rows)


def test_dirichlet_has_no_vertex():
    seed = _first_seed(lambda s: s["weights"] == "dirichlet")
    spec = fuzz._draw_spec(seed)
    assert fuzz.build(fuzz.render(spec), spec)[2] is None


# ---------------------------------------------------------------------------------------------
# joins: every join syntax the fuzzer writes yields its mixed edges, merged in topo mode
# ---------------------------------------------------------------------------------------------
ONE_CELL = {"seed": 1, "flavor": "darts", "cell": "darts", "weights": "softmax", "where": "network",
            "storage": "parameter", "container": "modulelist", "dtype": "float32", "drop": "none",
            "bn": "no_affine", "C": 4, "ops": ["skip_connect", "conv_1x1", "conv_3x3"], "cells": 1,
            "reductions": [], "steps": 1}  # two mixed edges, each with two Conv->BN candidates to merge
JOINS = [(join, form) for join in fuzz.DIMENSIONS["join"] if join not in ("cond_ne", "cond_gt")
         for form in fuzz.JOIN_FORMS.get(join, (None,))]


def test_every_join_form_is_drawn():
    drawn = defaultdict(set)
    for i in range(400):
        spec = fuzz._draw_spec(fuzz._model_seed(SAMPLE_SEED, i))
        if spec["join"] in fuzz.JOIN_FORMS:
            drawn[spec["join"]].add(spec["join_form"])
        else:
            assert "join_form" not in spec
    assert drawn == {join: set(forms) for join, forms in fuzz.JOIN_FORMS.items()}


@pytest.mark.parametrize("join,form", JOINS, ids=[f"{j}-{f}" if f else j for j, f in JOINS])
def test_every_join_yields_its_mixed_edges_merged(join, form):
    spec = {**ONE_CELL, "join": join, **({"join_form": form} if form else {})}
    model, inputs, _ = fuzz.build(fuzz.render(spec), spec)
    report = topofx.simplify(model, inputs, mode="topo", check=False).report
    assert fuzz._edges_and_merges(report) == (2, 2), str(report)


def test_a_join_left_as_written_is_missed(monkeypatch):
    monkeypatch.setattr(topofx.simplifier, "canonicalize", lambda *args, **kwargs: [])
    outcome = fuzz.check_spec({**ONE_CELL, "join": "einsum", "join_form": "stack_first"}, "topo")
    assert outcome.outcome == "missed" and outcome.failed, (outcome.outcome, outcome.key, outcome.message)
    assert "einsum (stack_first)" in outcome.key and "0 mixed edges found" in outcome.message


def test_a_join_is_judged_on_the_model_as_built_not_after_a_candidate_is_dropped():
    """``drop_candidate`` leaves one candidate on the first edge (no mixed edge left to merge): the join
    contract compares the capture of the model as built with its ``+`` chain twin, also as built."""
    spec = {**ONE_CELL, "join": "stack_view", "join_form": "torch_sum", "drop_candidate": "last"}
    assert "def drop_candidate(" in fuzz.render(spec)
    outcome = fuzz.check_spec(spec, "topo")
    assert outcome.outcome == "ok", (outcome.outcome, outcome.key, outcome.message)


def test_topo_after_changes_compares_with_the_history_the_call_itself_makes():
    """Restoring the mixed weights after the vertex check changes a decision on them again, which makes
    the deciding units run per call from that very call: the fresh topo simplify it is compared with must
    copy that history (it was copied before the call: a false 'silent', seed 410100069)."""
    spec = {"C": 4, "alpha_list": "none", "bn": "no_affine", "cell": "darts", "cells": 1, "container": "modulelist",
            "drop": "none", "drop_candidate": "none", "dtype": "float32", "flavor": "darts", "function": "none",
            "join": "cond_ne", "ops": ["sep_conv_5x5", "dil_conv_3x3"], "reductions": [], "scalar": "global_dict",
            "seed": 410100069, "steps": 1, "storage": "parameter", "typecheck": "none", "weights": "softmax",
            "where": "network"}
    outcome = fuzz.check_spec(spec, "topo")
    assert outcome.outcome == "ok", (outcome.outcome, outcome.key, outcome.message)
    assert any("run per call" in w for w in outcome.warnings)  # the history this test is about was made


# ---------------------------------------------------------------------------------------------
# minimizer, run, command line (with deliberately broken simplify stand-ins)
# ---------------------------------------------------------------------------------------------
def _breaks_on_group_norm(model, example_inputs, mode="topo", **kwargs):
    """A broken simplify: raises on any model with a GroupNorm, else the real one."""
    if any(isinstance(m, torch.nn.GroupNorm) for m in model.modules()):
        raise KeyError("group norm not supported by this stand-in")
    return topofx.simplify(model, example_inputs, mode=mode, **kwargs)


def test_minimizer_keeps_the_failure_class():
    seed = _first_seed(lambda s: "conv_3x3_gn" in s["ops"] and len(s["ops"]) >= 3 and s["cell"] == "darts")
    spec = fuzz._draw_spec(seed)
    first = fuzz.check_spec(spec, "exact", simplify=_breaks_on_group_norm)
    assert first.outcome == "crash" and "KeyError" in first.key and "_breaks_on_group_norm" in first.key
    small, result = fuzz.minimize(spec, "exact", first.outcome, first.key, simplify=_breaks_on_group_norm)
    assert result.failure_class == first.failure_class
    assert small["ops"] == ["conv_3x3_gn"]
    assert small["cells"] == 1 and small["steps"] == 1 and not small["reductions"]
    assert all(small[dim] == value for dim, value in fuzz.DEFAULTS.items())
    assert small["flavor"] == "darts" and small["C"] == 4
    # the written reproducer fails the same way when run on its own
    source = fuzz.reproducer_source(small, "exact")
    assert 'topofx.simplify(model, inputs, mode="exact")' in source
    namespace: dict = {"__name__": "reproducer"}
    exec(compile(source, "reproducer.py", "exec"), namespace)
    model, inputs = namespace["build"]()
    with pytest.raises(KeyError):
        _breaks_on_group_norm(model, inputs, mode="exact")


def _edit_outputs(simplified, edit):
    """Replace each tensor the graph returns by ``edit(graph, node)`` (a wrong simplify that still runs)."""
    gm = simplified.graph_module
    if gm is not None:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            out.args = (torch.fx.node.map_arg(out.args[0], lambda v: edit(gm.graph, v)),)
        gm.recompile()
    return simplified


def _perturbs_output(model, example_inputs, mode="topo", **kwargs):
    """A wrong simplify that still runs its graph: scales the graph's output by (1 + 1e-3)."""
    return _edit_outputs(topofx.simplify(model, example_inputs, mode=mode, **kwargs),
                         lambda graph, v: graph.call_function(torch.mul, (v, 1.001)))


def test_run_classifies_silent_and_writes_one_reproducer_per_class(tmp_path):
    seeds = list(itertools.islice(
        (s for s in SAMPLE_SEEDS[:30] if fuzz.check_spec(fuzz._draw_spec(s), "exact").outcome == "ok"), 2))
    assert len(seeds) == 2
    summary = fuzz.Summary([fuzz.check_spec(fuzz._draw_spec(s), "exact", simplify=_perturbs_output) for s in seeds])
    assert [o.outcome for o in summary.outcomes] == ["silent", "silent"]
    assert {o.key for o in summary.outcomes} == {"exact: output"}
    fuzz._write_reproducers(summary, tmp_path, _perturbs_output, 60.0, 30.0, False)
    assert len(summary.reproducers) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact-silent-exact_output.py", "exact-silent-exact_output.txt"]
    text = (tmp_path / "exact-silent-exact_output.txt").read_text()
    assert "count: 2 of 2 models" in text and "FAIL output" in text
    assert "exact" in summary.table() and "silent" in summary.table()


def _perturbs_gradients(model, example_inputs, mode="topo", **kwargs):
    """A wrong simplify whose outputs are right: ``v + 1e-3 * (v - v.detach())``, same value, gradient
    times 1.001."""
    def edit(graph, v):
        delta = graph.call_function(torch.sub, (v, graph.call_method("detach", (v,))))
        return graph.call_function(torch.add, (v, graph.call_function(torch.mul, (delta, 1e-3))))
    return _edit_outputs(topofx.simplify(model, example_inputs, mode=mode, **kwargs), edit)


def test_wrong_gradients_stay_silent_after_the_float64_recheck():
    """Gradients outside 1e-5 in float32 are compared again in float64: a real error stays an error."""
    seed = next(s for s in SAMPLE_SEEDS[:30] if fuzz.check_spec(fuzz._draw_spec(s), "exact").outcome == "ok")
    outcome = fuzz.check_spec(fuzz._draw_spec(seed), "exact", simplify=_perturbs_gradients)
    assert (outcome.outcome, outcome.key) == ("silent", "exact: weight_grad")


def test_wrong_vertex_gradients_stay_silent_after_the_float64_recheck():
    """The topo contract's vertex gradients are judged as the exact contract's (float64, other draws
    where the original's gradient jumps): a real error stays an error."""
    seed = next(s for s in SAMPLE_SEEDS[:30] if fuzz._vertex_values(spec := fuzz._draw_spec(s)) is not None
                and fuzz.check_spec(spec, "topo").outcome == "ok")
    outcome = fuzz.check_spec(fuzz._draw_spec(seed), "topo", simplify=_perturbs_gradients)
    assert (outcome.outcome, outcome.key) == ("silent", "topo: vertex_weight_grad"), outcome.message


def _forgets_changes(model, example_inputs, mode="topo", **kwargs):
    """A wrong simplify: its guards forget the Python numbers read outside the modules' attributes (as
    constants or as graph inputs), the module tree and re-assigned tensors (a scheduled scale, a
    candidate set to None, a list's new alpha stay frozen in the graph)."""
    simplified = topofx.simplify(model, example_inputs, mode=mode, **kwargs)
    guards = simplified.__dict__.get("guards")
    if guards is not None:
        guards.reads, guards.floats = [], []
        guards.structure_holds = lambda: True
        guards.follow_tensors = lambda: True
    return simplified


@pytest.mark.parametrize("hook, mode", [("step_schedule", "exact"), ("drop_candidate", "topo"),
                                        ("new_epoch_alphas", "exact")])
def test_changes_between_steps_are_checked(hook, mode):
    """The check makes the change the generated training loop makes (``step_schedule()``,
    ``drop_candidate(model)``, ``new_epoch_alphas(model)``) and compares again: a graph that did not
    follow it is silent."""
    seed = next(s for s in (fuzz._model_seed(SAMPLE_SEED, i) for i in range(2000))
                if fuzz._hooks(spec := fuzz._draw_spec(s)) == [hook] and spec["function"] == "none"
                and spec["cell"] == "darts" and not spec["join"].startswith("cond"))  # (decided per call: eager)
    spec = fuzz._draw_spec(seed)
    assert f"def {hook}(" in fuzz.render(spec)
    frozen = fuzz.check_spec(spec, mode, simplify=_forgets_changes)
    assert (frozen.outcome, frozen.key) == ("silent", f"{mode}: after {hook}: output"), frozen.message


def test_cli_prints_table_and_exit_status(monkeypatch, tmp_path, capsys):
    real_check_spec = fuzz.check_spec

    def fake(fail_seed):
        def check_spec(spec, mode, **kwargs):
            if spec["seed"] == fail_seed:
                return fuzz.Outcome(spec["seed"], mode, "crash", "simplify: KeyError @stub: 'x'", "stub", spec=spec)
            return fuzz.Outcome(spec["seed"], mode, "ok", spec=spec)
        return check_spec

    monkeypatch.setattr(fuzz, "check_spec", fake(fail_seed=-1))
    assert cli_main(["fuzz", "--n", "3", "--seed", "0", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dimension" in out and "join" in out and "total" in out and "0 failing" in out
    assert not (tmp_path / "a").exists()

    monkeypatch.setattr(fuzz, "check_spec", fake(fail_seed=fuzz._model_seed(0, 1)))
    assert cli_main(["fuzz", "--n", "3", "--seed", "0", "--out", str(tmp_path / "b"), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "simplify: KeyError @stub" in out and "2 failing" in out
    assert len(list((tmp_path / "b").glob("*.py"))) == 2  # one class per mode

    monkeypatch.setattr(fuzz, "check_spec", real_check_spec)
    assert cli_main(["fuzz", "--mode", "bogus", "--n", "1"]) == 2


def test_cli_real_run_is_consistent(tmp_path, capsys):
    rc = cli_main(["fuzz", "--n", "2", "--seed", "0", "--mode", "exact", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "mode       exact" in out and "total" in out
    failing = int(out.strip().splitlines()[-1].split()[0])
    assert rc == (1 if failing else 0)
