"""Drop-in robustness: the simplified module behaves like the original wherever a search script
uses it.  A matrix over {exact, topo} x the zoo's supernets x six groups:

1. other batch and spatial sizes;           4. DataParallel (DDP: tests/test_ddp.py);
2. dtypes, memory layouts, autocast;        5. train/eval, no_grad/inference_mode, hooks;
3. deepcopy, state_dict both ways, resume;  6. architecture-parameter edits, temperatures.

"Agrees" means: exact mode -- the output equals the original's (same RNG seed) within 1e-5;
topo mode -- with one-hot architecture weights (GDAS: its own one-hot samples) the output equals
the original's within 1e-5 (vertex-exactness).

The two slowest tests (checkpoint resume, temperature changes: each simplifies twice) run a fixed
sample of their matrix; ``TOPOFX_DROPIN_ALL=1`` runs all of it.
"""
from __future__ import annotations

import copy
import os
import random
import warnings

import pytest
import torch
from torch import nn

import topofx
from topofx import zoo
from topofx.ir import max_rel_error, preserved_state
from topofx.simplifier import FLOATED
from topofx.testing import find_arch_parameters, seeded_outputs, set_one_hot

MODELS = {
    "nb201-darts": dict(C=8, N=1),
    "darts-space": dict(C=4, N=1),
    "darts-orig": dict(C=4, layers=3),
    "pcdarts": dict(C=8, layers=3),
    "snas": dict(C=4, layers=3),
    "nb201-gdas": dict(C=8, N=1),
    "darts-space-gdas": dict(C=4, N=1),
    "gdas-style": dict(C=4, N=1),
}
HARD_SAMPLED = {"nb201-gdas", "darts-space-gdas", "gdas-style"}  # one-hot samples of their own
TEMPERATURE = {"snas": "set_temperature", "nb201-gdas": "set_tau", "darts-space-gdas": "set_tau", "gdas-style": "set_tau"}
MATRIX = [(name, mode) for name in MODELS for mode in ("exact", "topo")]
TOL = 1e-5
FULL = os.environ.get("TOPOFX_DROPIN_ALL") == "1"


def sampled(params: list, k: int) -> list:
    """All of ``params`` under ``TOPOFX_DROPIN_ALL=1``, else the same ``k`` of them on every run."""
    return params if FULL else sorted(random.Random(0).sample(params, k), key=params.index)


def _case_param(c: tuple[str, str]):
    return pytest.param(c, id=f"{c[0]}-{c[1]}", marks=pytest.mark.xdist_group(c[0]))

_built: dict[tuple[str, str], topofx.SimplifiedModule] = {}


@pytest.fixture(params=[_case_param(c) for c in MATRIX])
def case(request):
    """(name, mode, model, simplified, x): an independent copy of a cached simplification."""
    name, mode = request.param
    if (name, mode) not in _built:
        model, (x,) = zoo.build(name, batch_size=4, **MODELS[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GDAS-style models fall back to eager, with a warning
            _built[name, mode] = topofx.simplify(model, x, mode=mode)
    simplified = copy.deepcopy(_built[name, mode])
    return name, mode, simplified.original, simplified, simplified.example_inputs[0]


def _one_hot_choice(name: str, mode: str, model: nn.Module, alphas=None) -> None:
    """Topo mode on softmax models: random one-hot architecture weights (in place)."""
    if mode == "topo" and name not in HARD_SAMPLED:
        gen = torch.Generator().manual_seed(0)
        alphas = find_arch_parameters(model) if alphas is None else alphas
        set_one_hot(alphas, lambda r, n: int(torch.randint(0, n, (1,), generator=gen)))


def agreement(name, mode, model, simplified, *inputs, alphas=None) -> float:
    """Max relative error of the simplified output against the original's (see module docstring)."""
    alphas = find_arch_parameters(model) if alphas is None else alphas
    with preserved_state(model, tensors=alphas):
        _one_hot_choice(name, mode, model, alphas)
        return max_rel_error(*seeded_outputs(model, simplified, *inputs))


# 1. other shapes -------------------------------------------------------------------------------
# CI: a smaller batch and a smaller image; TOPOFX_DROPIN_ALL=1 adds a larger batch and a larger image
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 16, 16)] + ([(3, 3, 32, 32), (2, 3, 40, 40)] if FULL else []))
def test_other_shapes(case, shape):
    name, mode, model, simplified, _ = case
    y = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert agreement(name, mode, model, simplified, y) <= TOL


class _ShapeBranching(nn.Module):
    """A supernet whose forward takes a Python decision on the input's spatial size."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(2))
        self.a = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        w = self.alpha.softmax(0)
        y = w[0] * self.a(x) + w[1] * self.b(x)
        if y.shape[-1] > 8:  # large inputs are pooled first: the graph holds for large inputs only
            y = self.pool(y)
        return y.flatten(1).mean(1)


@pytest.mark.parametrize("mode", ["exact", "topo"])
def test_shape_decisions_are_guarded(mode):
    torch.manual_seed(0)
    model = _ShapeBranching()
    simplified = topofx.simplify(model, torch.randn(2, 3, 16, 16), mode=mode)
    big = torch.randn(3, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same decision: no warning, the graph runs
        got, expected = seeded_outputs(model, simplified, big)
    assert max_rel_error(got, expected) <= TOL or mode == "topo"
    small = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"another path.*test_dropin.py:\d+: `if y.shape\[-1\] > 8:"):
        got, expected = seeded_outputs(model, simplified, small)
    assert got.shape == expected.shape and max_rel_error(got, expected) <= TOL  # the original's own path


# 2. devices, dtypes, layouts -------------------------------------------------------------------
def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_devices_and_double(case):
    name, mode, model, simplified, x = case
    for device in _devices():
        simplified.to(device)
        assert agreement(name, mode, model, simplified, x.to(device)) <= TOL
    simplified.double()
    got, _ = seeded_outputs(model, simplified, x.double())
    assert all(t.dtype == torch.float64 for t in (got if isinstance(got, tuple) else (got,)))
    assert agreement(name, mode, model, simplified, x.double()) <= TOL


def test_channels_last(case):
    name, mode, model, simplified, x = case
    simplified.to(memory_format=torch.channels_last)
    assert agreement(name, mode, model, simplified, x.to(memory_format=torch.channels_last)) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(case, dtype):
    """Under autocast the simplified module is as close to the original as the original is to its
    own float32 forward (the rounding of the low-precision convolutions), or within 1e-5."""
    name, mode, model, simplified, x = case
    alphas = find_arch_parameters(model)
    with preserved_state(model, tensors=alphas):
        _one_hot_choice(name, mode, model)
        fp32, _ = seeded_outputs(model, model, x)
        with torch.autocast("cpu", dtype=dtype):
            got, expected = seeded_outputs(model, simplified, x)
    noise = max_rel_error(expected, fp32)
    assert 0 < noise < 0.2  # autocast ran, and in low precision
    assert max_rel_error(got, expected) <= max(TOL, 2 * noise)


def test_half(case):
    name, mode, model, simplified, x = case
    simplified.half()
    ref = copy.deepcopy(model).float()  # the original's float32 forward on the same half-rounded weights
    alphas = find_arch_parameters(model)
    with preserved_state(model, ref, tensors=alphas + find_arch_parameters(ref)):
        _one_hot_choice(name, mode, model)
        _one_hot_choice(name, mode, ref)
        got, expected = seeded_outputs(model, simplified, x.half())
        fp32, _ = seeded_outputs(ref, ref, x.half().float())
    noise = max_rel_error(expected, fp32)
    assert all(t.dtype == torch.float16 for t in (got if isinstance(got, tuple) else (got,)))
    assert max_rel_error(got, expected) <= max(TOL, 2 * noise)


# 3. copies and checkpoints ---------------------------------------------------------------------
def test_deepcopy_is_independent(case):
    name, mode, model, simplified, x = case
    clone = copy.deepcopy(simplified)
    assert clone.original is not model
    assert {id(p) for p in clone.parameters()}.isdisjoint(id(p) for p in model.parameters())
    assert agreement(name, mode, clone.original, clone, x) <= TOL
    with torch.no_grad():
        for a in find_arch_parameters(clone.original):
            a.uniform_(-3, 3)
    assert agreement(name, mode, clone.original, clone, x) <= TOL  # follows its own alphas
    assert agreement(name, mode, model, simplified, x) <= TOL  # the first one is untouched


def test_state_dict_both_ways(case):
    name, mode, model, simplified, x = case
    ours, theirs = simplified.state_dict(), model.state_dict()
    extra = set(ours) - set(theirs)
    assert set(theirs) <= set(ours) and all(k.startswith(f"{FLOATED}.") for k in extra)
    assert extra == set(simplified.floated_buffers()) and (mode == "topo" or not extra)
    fresh, _ = zoo.build(name, batch_size=4, seed=1, **MODELS[name])
    if not extra:
        fresh.load_state_dict(ours)
    result = fresh.load_state_dict(ours, strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) == extra  # only the floated statistics
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], theirs[k]) for k in theirs)
    other = copy.deepcopy(_built[name, mode])  # an original checkpoint loads strictly into a simplified module
    with torch.no_grad():
        for t in other.parameters():
            t.add_(1.0)
    other.load_state_dict(theirs)
    loaded = other.state_dict()
    assert all(torch.equal(loaded[k], theirs[k]) for k in theirs)
    other.load_state_dict(ours)
    loaded = other.state_dict()
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)


def _search_steps(simplified, x, steps: int, w_opt, a_opt) -> None:
    target = torch.arange(x.shape[0]) % 10
    for _ in range(steps):
        out = simplified(x)
        logits = out[-1] if isinstance(out, tuple) else out
        loss = nn.functional.cross_entropy(logits, target)
        w_opt.zero_grad()
        a_opt.zero_grad()
        loss.backward()
        w_opt.step()
        a_opt.step()


def _optimizers(model):
    arch = find_arch_parameters(model)
    weights = [p for p in model.parameters() if all(p is not a for a in arch)]
    return torch.optim.SGD(weights, lr=0.05, momentum=0.9, weight_decay=3e-4), torch.optim.Adam(arch, lr=3e-3)


@pytest.mark.parametrize("case", [_case_param(c) for mode in ("exact", "topo")
                                  for c in sampled([c for c in MATRIX if c[1] == mode], 3)], indirect=True)
def test_checkpoint_resume(case, tmp_path):
    """Save mid-search with torch.save, resume in a freshly built and simplified model: the resumed
    run ends exactly where the uninterrupted one does (parameters, BN and floated statistics)."""
    name, mode, model, simplified, x = case
    torch.manual_seed(0)
    w_opt, a_opt = _optimizers(model)
    _search_steps(simplified, x, 2, w_opt, a_opt)
    torch.save({"model": simplified.state_dict(), "w_opt": w_opt.state_dict(), "a_opt": a_opt.state_dict(),
                "alphas": find_arch_parameters(model), "rng": torch.get_rng_state()}, tmp_path / "ckpt.pt")
    _search_steps(simplified, x, 2, w_opt, a_opt)

    resumed_model, _ = zoo.build(name, batch_size=4, seed=5, **MODELS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = topofx.simplify(resumed_model, x, mode=mode)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    with torch.no_grad():  # plain-tensor alphas (original DARTS) are saved by the script itself
        for a, saved in zip(find_arch_parameters(resumed_model), ckpt["alphas"]):
            a.copy_(saved)
    w_opt2, a_opt2 = _optimizers(resumed_model)
    w_opt2.load_state_dict(ckpt["w_opt"])
    a_opt2.load_state_dict(ckpt["a_opt"])
    torch.set_rng_state(ckpt["rng"])
    _search_steps(resumed, x, 2, w_opt2, a_opt2)
    a, b = simplified.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6), k
    for p, q in zip(find_arch_parameters(model), find_arch_parameters(resumed_model)):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


# 4. wrappers -----------------------------------------------------------------------------------
def test_data_parallel_and_parameter_names(case):
    name, mode, model, simplified, x = case
    params = list(simplified.parameters())
    assert len(params) == len({id(p) for p in params})
    assert [n for n, _ in simplified.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(p is q for (_, p), (_, q) in zip(simplified.named_parameters(), model.named_parameters()))
    wrapped = nn.DataParallel(simplified)
    assert agreement(name, mode, model, wrapped, x) <= TOL


# 5. modes and hooks ----------------------------------------------------------------------------
def _buffers(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_train_eval_and_no_grad(case):
    name, mode, model, simplified, x = case
    simplified.eval()
    assert not model.training and all(not m.training for m in model.modules())
    before = _buffers(simplified)
    with torch.no_grad():
        got, expected = seeded_outputs(model, simplified, x)
        single, _ = seeded_outputs(model, simplified, x[:1])
    assert all(torch.equal(before[k], v) for k, v in _buffers(simplified).items())  # eval: statistics stay
    first = lambda out: (out[-1] if isinstance(out, tuple) else out)[:1]  # noqa: E731
    assert max_rel_error(first(single), first(got)) <= TOL  # eval BN: a sample's output ignores its batch
    if mode == "exact":
        assert max_rel_error(got, expected) <= TOL
    with torch.inference_mode():
        again, _ = seeded_outputs(model, simplified, x)
    assert max_rel_error(again, got) <= TOL
    simplified.train()
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        assert agreement(name, mode, model, simplified, x) <= TOL


def test_hooks_fire_or_warn(case):
    name, mode, model, simplified, x = case
    fired = []
    leaves = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inner = [m for m in model.modules() if len(list(m.children())) > 1 and m is not model]
    leaves[-1].register_forward_hook(lambda *a: fired.append("classifier"))
    inner[0].register_forward_hook(lambda *a: fired.append("cell"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simplified(x)
    assert "classifier" in fired  # the classifier is still called by the graph
    assert "cell" in fired or any("will not fire" in str(w.message) for w in caught)


# 6. architecture-parameter edits ----------------------------------------------------------------
def test_in_place_alpha_edits(case):
    name, mode, model, simplified, x = case
    alphas = find_arch_parameters(model)
    with torch.no_grad():
        for a in alphas:
            a.data.copy_(torch.randn_like(a) * 2)
            a.clamp_(-1, 1)
    assert agreement(name, mode, model, simplified, x) <= TOL


def _attribute_name(model: nn.Module, tensor: torch.Tensor) -> tuple[nn.Module, str]:
    for module in model.modules():
        for key, value in list(module._parameters.items()) + list(vars(module).items()):
            if value is tensor:
                return module, key
    raise AssertionError("architecture parameter not held as an attribute")


def test_reassigned_alphas_are_followed(case):
    name, mode, model, simplified, x = case
    new = []
    for a in find_arch_parameters(model):
        owner, key = _attribute_name(model, a)
        fresh = torch.randn_like(a).requires_grad_(True)
        fresh = nn.Parameter(fresh) if isinstance(a, nn.Parameter) else fresh
        if isinstance(a, nn.Parameter):
            del owner._parameters[key]
        setattr(owner, key, fresh)
        new.append(fresh)
    assert agreement(name, mode, model, simplified, x, alphas=new) <= TOL
    out = simplified(x)
    (out[-1] if isinstance(out, tuple) else out).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in new)


@pytest.mark.parametrize("name, mode", [pytest.param(n, m, id=f"{m}-{n}", marks=pytest.mark.xdist_group(n))
                                        for n, m in sampled([(n, m) for n in sorted(TEMPERATURE) for m in ("exact", "topo")], 4)])
def test_temperature_changes_are_followed(name, mode):
    """set_tau / set_temperature after simplify: the simplified module equals a module simplified
    afresh at the new temperature (and, in exact mode, the original)."""
    model, (x,) = zoo.build(name, batch_size=4, **MODELS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simplified = topofx.simplify(model, x, mode=mode)
        simplified(x)
        getattr(simplified, TEMPERATURE[name])(0.3)
        got, expected = seeded_outputs(model, simplified, x)
        afresh = topofx.simplify(model, x, mode=mode)
        reference, _ = seeded_outputs(model, afresh, x)
    assert max_rel_error(got, reference) <= TOL
    if mode == "exact":
        assert max_rel_error(got, expected) <= TOL


@pytest.mark.xdist_group("snas")
def test_temperature_change_after_moving_the_model():
    """A re-capture after ``.double()`` takes example inputs of the model's new dtype."""
    model, (x,) = zoo.build("snas", batch_size=4, **MODELS["snas"])
    simplified = topofx.simplify(model, x, mode="exact").double()
    model.set_temperature(0.4)
    got, expected = seeded_outputs(model, simplified, x.double())
    assert got.dtype == torch.float64 and max_rel_error(got, expected) <= 1e-10


class _Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)])

    def forward(self, x, w):
        return sum(wi * op(x) for wi, op in zip(w, self.ops))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(2))
        self.cell = _Cell()

    def forward(self, x):
        return self.cell(x, self.alpha.softmax(0))


def test_hook_on_a_traced_module_warns_at_simplify():
    model = _Net()
    fired = []
    model.cell.register_forward_hook(lambda *a: fired.append(1))
    with pytest.warns(UserWarning, match=r"hooks on cell \(_Cell\) will not fire"):
        simplified = topofx.simplify(model, torch.randn(2, 3, 8, 8), mode="exact")
    fired.clear()  # simplify ran the original eagerly to check the capture
    simplified(torch.randn(2, 3, 8, 8))
    assert not fired  # as the warning said


class _CountingNet(_Net):
    def forward(self, x):
        if self.steps_seen < 0:  # read by forward, but any count it takes keeps the same graph
            raise ValueError("negative step count")
        return super().forward(x)


def test_irrelevant_number_change_keeps_the_graph_and_says_so():
    model = _CountingNet()
    model.steps_seen = 0  # a per-step counter on a traced module, read by forward
    x = torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact")
    graph = simplified.graph_module
    model.steps_seen = 1
    with pytest.warns(UserWarning, match=r"_CountingNet.steps_seen changed since capture"):
        got, expected = seeded_outputs(model, simplified, x)
    assert simplified.graph_module is graph and max_rel_error(got, expected) <= TOL


def test_a_number_forward_never_reads_is_not_compared():
    model = _Net()
    model.steps_seen = 0  # a per-step counter on a traced module that forward never reads
    x = torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact")
    graph = simplified.graph_module
    model.steps_seen = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no re-trace, no warning
        got, expected = seeded_outputs(model, simplified, x)
    assert simplified.graph_module is graph and max_rel_error(got, expected) <= TOL


class _TemperedNet(_Net):
    """DOTS's idiom: the search loop assigns ``model.T`` and ``model.phase`` on the model it holds."""

    def __init__(self):
        super().__init__()
        self.T = 1.0
        self.phase = "op_pretrain"

    def forward(self, x):
        assert "op" in self.phase, "error"
        return self.cell(x, (self.alpha / self.T).softmax(0))


def test_attributes_assigned_on_the_simplified_module_reach_the_original():
    """``simplified.T = 0.5`` is the original's ``T`` (the graph follows it, exactly as eagerly) and
    ``del simplified.T`` removes it there; the simplified module's own state stays its own."""
    torch.manual_seed(0)
    model = _TemperedNet()
    with torch.no_grad():
        model.alpha.copy_(torch.tensor([0.3, -0.4]))
    x = torch.randn(2, 3, 8, 8)
    eager = copy.deepcopy(model)
    simplified = topofx.simplify(model, x, mode="exact")
    for value in (0.5, 3.0):
        simplified.T = value
        eager.T = value
        assert model.T == value and "T" not in simplified.__dict__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the graph's T is an input or a re-capture: either way followed
            got, expected = seeded_outputs(eager, simplified, x)
        assert max_rel_error(got, expected) <= TOL
    simplified.phase = "tp_pretrain"
    assert model.phase == "tp_pretrain"
    with pytest.raises(AssertionError, match="error"):
        simplified(x)  # the original's own assert, as eagerly
    simplified.new_attribute = 1
    del simplified.new_attribute
    assert not hasattr(model, "new_attribute")
    graph = simplified.graph_module
    simplified.train(False)
    assert not model.training and simplified.graph_module is graph
    replica = simplified._replicate_for_data_parallel()  # DataParallel's replicas set tensors and flags on themselves
    replica.alpha, replica.T = torch.zeros(2), 7.0
    assert isinstance(model.alpha, nn.Parameter) and model.T == 3.0 and not hasattr(model, "_is_replica")
