"""Tests for topofx.bench.  No test asserts a wall-clock value.

``topofx.zoo`` and ``topofx.simplify`` are replaced by stand-ins (monkeypatching
``bench._zoo`` / ``bench._simplify_fn``) so that these tests do not depend on
them; one integration test uses the real ones when they are importable.
"""

from __future__ import annotations

import re
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from topofx import bench

F32 = 4  # bytes per float32 element


# ----------------------------------------------------------------- stand-ins


class TinyNet(nn.Module):
    """Conv-BN-ReLU-pool-Linear with an xautodl-like ``(features, logits)`` output
    and DARTS-like plain-tensor architecture parameters."""

    def __init__(self, extra_relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.alpha = (1e-3 * torch.randn(4)).requires_grad_()  # not registered
        self.extra_relu = extra_relu

    def arch_parameters(self) -> list[torch.Tensor]:
        return [self.alpha]

    def forward(self, x: torch.Tensor):
        h = F.relu(self.bn(self.conv(x)))
        h = h * torch.softmax(self.alpha, 0).view(1, -1, 1, 1)
        if self.extra_relu:
            h = F.relu(h * 2.0)
        feats = h.mean((2, 3))
        return feats, self.fc(feats)


class Shared(nn.Module):
    """What ``simplify`` returns, in miniature: a new module sharing the
    original's Parameter objects and forwarding to its methods."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def arch_parameters(self):
        return self.inner.arch_parameters()

    def forward(self, *args):
        return self.inner(*args)


def fake_zoo(with_child: bool = True) -> types.ModuleType:
    zoo = types.ModuleType("fake_zoo")
    zoo.names = lambda: ["tiny"]

    def build(name, *, batch_size=2, image_size=32, seed=0, **overrides):
        if name != "tiny":
            raise KeyError(name)
        torch.manual_seed(seed)
        return TinyNet(), (torch.randn(batch_size, 3, image_size, image_size),)

    zoo.build = build
    if with_child:
        zoo.build_child = lambda name, *, batch_size=2, image_size=32: (TinyNet(), None)
    return zoo


def fake_simplify(model, example_inputs, mode="topo", layout="keep"):
    if layout == "channels_last":
        return bench.ChannelsLastInput(Shared(model))
    if mode == "topo":
        raise NotImplementedError("topo not ready\nsecond line")
    return Shared(model)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(bench, "_zoo", lambda: fake_zoo())
    monkeypatch.setattr(bench, "_simplify_fn", lambda: fake_simplify)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, a in enumerate(bench._arch_parameters(model)):
        out[f"arch{i}"] = a.detach().clone()
    return out


def assert_same_state(before, after) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# ----------------------------------------------------------------- saved_activation_bytes


def test_linear_relu_chain_is_analytic():
    # linear1 saves its input x (for dW1; W1^T is a view of a parameter: excluded);
    # relu saves its output r; linear2 saves r again (same storage: counted once)
    # and a view of W2 (excluded).  Pre-activation and final output: not saved.
    B, i, h, o = 3, 8, 16, 4
    m = nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))
    x = torch.randn(B, i)
    assert bench.saved_activation_bytes(m, x) == F32 * (B * i + B * h)


def test_leaf_input_requiring_grad_is_excluded():
    B, i, h, o = 3, 8, 16, 4
    m = nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))
    x = torch.randn(B, i, requires_grad=True)
    assert bench.saved_activation_bytes(m, x) == F32 * B * h


class SavesTwice(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(n))
        self.b = nn.Parameter(torch.randn(n))

    def forward(self, x):
        h = torch.tanh(x * self.a)  # mul saves x; tanh saves its output h
        return (h * self.a).sum() + (h * self.b).sum()  # both muls save h


def test_distinct_storages_counted_once():
    x = torch.randn(2, 100)
    n = x.numel()
    got = bench.saved_activation_bytes(SavesTwice(100), x)
    assert got == F32 * (n + n)  # x and h; h is saved three times


class UsesParams(nn.Module):
    """Saves parameters, a view of a parameter, a plain leaf arch tensor and a view
    of it; only x and h are activations."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(n))
        self.w = nn.Parameter(torch.randn(3, n))  # big: a leak would show
        self.register_buffer("buf", torch.randn(n))
        self.alpha = torch.randn(2, n).requires_grad_()  # DARTS-style plain tensor

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        h = x * self.scale
        y = h * self.w[1] + h * self.alpha + h * self.alpha[0] + h * self.buf
        return y.sum() + (h @ self.w.t()).sum()  # mm saves h and a transposed view of w


def test_parameters_and_their_views_are_excluded():
    n = 50
    x = torch.randn(2, n)
    got = bench.saved_activation_bytes(UsesParams(n), x)
    assert got == F32 * (x.numel() + x.numel())


def test_views_of_one_storage_charge_the_whole_storage():
    class Slices(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8))

        def forward(self, x):
            h = x * 2.0 + 1.0  # fresh (8, 8) storage, does not require grad
            return (h[:2] * self.w).sum() + (h[2:4] * self.w).sum()

    x = torch.randn(8, 8)
    assert bench.saved_activation_bytes(Slices(), x) == F32 * 64


def test_loss_fn_is_measured_inside():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    without = bench.saved_activation_bytes(m, x)
    with_loss = bench.saved_activation_bytes(m, x, lambda out: torch.exp(out).sum())
    assert with_loss == without + F32 * 3 * 4  # exp saves its (3, 4) output


def test_saved_activation_bytes_restores_state_flags_and_rng():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    before = state_of(m)
    rng = torch.get_rng_state()
    a = bench.saved_activation_bytes(m, x)
    assert a > 0
    assert_same_state(before, state_of(m))
    assert int(m[1].num_batches_tracked) == 0
    assert not any(mod.training for mod in m.modules())
    assert torch.equal(rng, torch.get_rng_state())
    assert bench.saved_activation_bytes(m, x) == a  # reproducible (seeded dropout)


# ----------------------------------------------------------------- step_time


def test_step_time_restores_everything_and_trains_arch_params():
    torch.manual_seed(0)
    m = TinyNet()
    m.bn.running_mean.fill_(0.5)
    x = torch.randn(4, 3, 8, 8)
    before = state_of(m)
    seen: dict = {}

    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            seen["steps"] = seen.get("steps", 0) + 1
            seen.setdefault("start", []).append(m.conv.weight.detach().clone())
            seen.setdefault("grads", [p.grad is not None for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    def factory(params):
        seen["params"] = list(params)
        return CountingSGD(params, lr=0.1)

    t = bench.step_time(m, x, steps=2, warmup=1, optimizer_factory=factory)
    assert t > 0
    assert seen["steps"] == 3
    assert all(torch.equal(w, seen["start"][0]) for w in seen["start"])  # same start state
    assert any(p is m.alpha for p in seen["params"])  # plain-tensor arch parameter
    assert len(seen["params"]) == len(list(m.parameters())) + 1
    assert all(seen["grads"])  # every parameter got a gradient
    assert_same_state(before, state_of(m))
    assert int(m.bn.num_batches_tracked) == 0
    assert all(p.grad is None for p in m.parameters()) and m.alpha.grad is None
    assert m.training  # default flag kept


def test_xautodl_style_arch_parameter_attribute():
    class X(nn.Module):  # xautodl: arch_parameters is an nn.Parameter, get_alphas() a method
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.arch_parameters = nn.Parameter(torch.zeros(2))

        def get_alphas(self):
            return [self.arch_parameters]

        def forward(self, x):
            return self.lin(x) * torch.softmax(self.arch_parameters, 0)

    m = X()
    got = bench._trainable(m)
    assert len(got) == 3 and any(p is m.arch_parameters for p in got)
    before = state_of(m)
    bench.step_time(m, torch.randn(4, 3), steps=1, warmup=0)
    assert_same_state(before, state_of(m))


def test_default_loss_uses_last_floating_tensor():
    feats, logits = torch.randn(4, 7), torch.randn(4, 5)
    labels = bench._labels_for(logits)
    expected = F.cross_entropy(logits, labels)
    assert torch.allclose(bench.default_loss((feats, logits)), expected)
    # integer tensors are skipped: the logits are the last *floating* tensor
    assert torch.allclose(bench.default_loss((feats, logits, torch.arange(3))), expected)
    y = torch.randn(2, 3, 4)
    assert torch.allclose(bench.default_loss([logits, {"out": y}]), y.mean())
    with pytest.raises(TypeError):
        bench.default_loss((torch.arange(3),))


# ----------------------------------------------------------------- compare / table


def test_compare_rows_ratios_and_shared_state():
    torch.manual_seed(0)
    base = TinyNet()
    more = TinyNet(extra_relu=True)
    more.load_state_dict(base.state_dict())
    more.alpha = base.alpha
    x = torch.randn(2, 3, 8, 8)
    models = {"original": base, "wrapped": Shared(base), "bigger": more}
    before = state_of(base)
    ticks = []
    rows = bench.compare(models, (x,), steps=2, warmup=1, baseline="original", progress=ticks.append)
    assert [r.name for r in rows] == ["original", "wrapped", "bigger"]
    assert len(ticks) == 3 * (1 + 1 + 2)
    r0, r1, r2 = rows
    assert r0.time_ratio == 1.0 and r0.mem_ratio == 1.0
    assert r1.act_bytes == r0.act_bytes and r1.mem_ratio == 1.0
    # bigger saves one more (2, 4, 8, 8) relu output
    assert r2.act_bytes == r0.act_bytes + F32 * 2 * 4 * 8 * 8
    assert r2.mem_ratio == pytest.approx(r2.act_bytes / r0.act_bytes)
    for r in rows:
        assert r.step_time_s > 0
        assert r.time_ratio == pytest.approx(r0.step_time_s / r.step_time_s)
    assert_same_state(before, state_of(base))
    with pytest.raises(KeyError):
        bench.compare(models, (x,), steps=1, warmup=0, baseline="nope")


def test_format_table():
    rows = [
        bench.Row("original", 0.2, 3 * bench.MB, 1.0, 1.0),
        bench.Row("exact", 0.1, int(1.5 * bench.MB), 2.0, 0.5),
    ]
    text = bench.format_table(rows, "my title")
    lines = text.splitlines()
    assert lines[0] == "my title"
    for col in ("variant", "step time (ms)", "speed-up", "saved act. (MB)", "memory ratio"):
        assert col in lines[1]
    assert lines[3].split() == ["original", "200.0", "1.00", "3.0", "1.00"]
    assert lines[4].split() == ["exact", "100.0", "2.00", "1.5", "0.50"]
    assert "2**20" in text
    # fixed width: columns right-aligned to the header
    assert len(lines[3]) == len(lines[4]) == len(lines[1])


# ----------------------------------------------------------------- run / main


def test_run_with_stand_ins(stand_ins):
    text = bench.run("tiny", batch_size=2, image_size=8, steps=1, warmup=0, progress=False)
    assert "note: mode 'topo' skipped: NotImplementedError: topo not ready" in text
    assert "second line" not in text
    assert "exact/original activation memory: 1.00" in text
    assert re.search(r"^exact speed-up: \d+\.\d\dx$", text, re.M)
    assert "child (floor)" in text
    for name in ("original", "exact"):
        assert any(line.startswith(name) for line in text.splitlines())


def test_run_channels_last_rows(stand_ins):
    """--channels-last adds every variant in that layout, all against the original as built, and
    a per-layout floor ratio."""
    text = bench.run("tiny", modes=("exact",), batch_size=2, image_size=8, steps=1, warmup=0,
                     channels_last=True, progress=False)
    rows = [line.split("  ")[0] for line in text.splitlines()]
    for name in ("original", "original, channels-last", "exact", "exact, channels-last",
                 "child (floor)", "child (floor), channels-last"):
        assert name in rows, name
    assert re.search(r"^exact, channels-last speed-up: \d+\.\d\dx$", text, re.M)
    assert re.search(r"^exact, channels-last/floor, channels-last: step time \d+\.\d\dx", text, re.M)
    assert re.search(r"^exact/floor: step time \d+\.\d\dx, activation memory 1\.00x$", text, re.M)


def test_channels_last_input_feeds_channels_last():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return x.sum() * self.alpha.sum()

        def arch_parameters(self):
            return [self.alpha]

    wrapped = bench.ChannelsLastInput(Probe())
    wrapped(torch.randn(2, 3, 4, 4))
    assert seen == [True]
    assert bench._arch_parameters(wrapped) == [wrapped.model.alpha]


def test_run_without_child_floor(monkeypatch):
    monkeypatch.setattr(bench, "_zoo", lambda: fake_zoo(with_child=False))
    monkeypatch.setattr(bench, "_simplify_fn", lambda: fake_simplify)
    text = bench.run("tiny", modes=("exact",), batch_size=2, image_size=8, steps=1, warmup=0,
                     progress=True)
    assert "child" not in text and "note:" not in text
    text = bench.run("tiny", modes=("exact",), batch_size=2, image_size=8, steps=1, warmup=0,
                     child_floor=False, progress=False)
    assert "child" not in text


def test_run_simplify_missing(monkeypatch):
    monkeypatch.setattr(bench, "_zoo", lambda: fake_zoo(with_child=False))

    def missing():
        raise ImportError("no module named topofx.simplify")

    monkeypatch.setattr(bench, "_simplify_fn", missing)
    text = bench.run("tiny", batch_size=2, image_size=8, steps=1, warmup=0, progress=False)
    assert "topofx.simplify unavailable" in text and "original" in text


def test_main_unknown_name(stand_ins, capsys):
    assert bench.main(["nonexistent"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "nonexistent" in err and "Traceback" not in err


def test_main_list_and_usage_errors(stand_ins, capsys):
    assert bench.main(["--list"]) == 0
    assert capsys.readouterr().out.split() == ["tiny"]
    assert bench.main([]) == 2
    assert bench.main(["tiny", "--modes", "bogus"]) == 2
    assert bench.main(["tiny", "--steps", "0"]) == 2


def test_main_runs(stand_ins, capsys, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    argv = ["tiny", "--modes", "exact", "--batch-size", "2", "--image-size", "8",
            "--steps", "1", "--warmup", "0", "--threads", "1", "--no-progress"]
    assert bench.main(argv) == 0
    assert threads == [1]
    out = capsys.readouterr().out
    assert "exact speed-up:" in out and "original" in out


def test_simplify_fn_resolves_module_or_function(monkeypatch):
    import sys

    import topofx

    def fn(model, example_inputs, mode="topo"):
        return model

    mod = types.ModuleType("topofx.simplify")
    mod.simplify = fn
    monkeypatch.setitem(sys.modules, "topofx.simplify", mod)
    monkeypatch.setattr(topofx, "simplify", mod, raising=False)
    assert bench._simplify_fn() is fn
    monkeypatch.setattr(topofx, "simplify", fn, raising=False)
    assert bench._simplify_fn() is fn


# ----------------------------------------------------------------- real zoo (when present)


def test_run_real_zoo_when_available():
    try:
        zoo = bench._zoo()
        names = list(zoo.names())
        bench._simplify_fn()
    except (ImportError, AttributeError):
        pytest.skip("topofx.zoo / topofx.simplify not available yet")
    if "nb201-darts" not in names:
        pytest.skip("nb201-darts not in the zoo")
    text = bench.run("nb201-darts", modes=("exact",), batch_size=2, image_size=8, steps=1,
                     warmup=0, child_floor=False, progress=False, overrides={"N": 1, "C": 4})
    assert "exact/original activation memory:" in text or "note: mode 'exact' skipped" in text


# ----------------------------------------------------------------- --overhead


def test_overhead_command_prints_a_number_for_a_zoo_model(monkeypatch, capsys):
    """``topofx bench gdas-style --overhead`` on the real zoo model and ``simplify`` (a small build of it,
    a few calls: the command's plumbing and the measurement, not the figure)."""
    real = bench.overhead
    monkeypatch.setattr(bench, "overhead",
                        lambda name, calls: real(name, calls=calls, warmup=1, overrides={"C": 4, "N": 1}))
    assert bench.main(["gdas-style", "--overhead", "--calls", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("gdas-style"))
    size, overhead, arch_step, warm, graph_ms = row.split()[1:6]
    assert int(size) == bench.OVERHEAD_SIZES[0] and float(graph_ms) > 0
    float(overhead), float(arch_step), float(warm)  # numbers (whatever they are: no test asserts a time)
    assert "overhead us" in out and "arch step us" in out and "warm us" in out


def test_overhead_of_every_zoo_model_without_a_name(monkeypatch, capsys):
    seen = []

    def fake(name, calls):
        seen.append((name, calls))
        return bench.OverheadRow(name, 8, 12.0, 34.0, 5.0, calls, "", 56.0)

    monkeypatch.setattr(bench, "overhead", fake)
    assert bench.main(["--overhead", "--calls", "7", "--no-progress"]) == 0
    names = bench._zoo().names()
    assert seen == [(n, 7) for n in names]
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in [[n] for n in names]]
    assert [r[0] for r in rows] == names and all(r[2:5] == ["12", "34", "56"] for r in rows)


def test_overhead_of_a_model_that_does_not_graph(monkeypatch):
    """No graph (a fallback): no figure, the reason instead."""
    monkeypatch.setattr(bench, "_zoo", lambda: fake_zoo(with_child=False))

    class Fallback(nn.Module):
        graph_module = None
        report = types.SimpleNamespace(fallback="a decision on data")

    monkeypatch.setattr(bench, "_simplify_fn", lambda: (lambda model, inputs, mode: Fallback()))
    row = bench.overhead("tiny", calls=2, sizes=(8,))
    assert row.image_size == 8 and row.overhead_us != row.overhead_us and "a decision on data" in row.note
