"""Constructs of public NAS search code that ``simplify`` now captures instead of falling back.

Each model below is written in the style of a public codebase (P-DARTS drop-path and a legacy
``torch.FloatTensor`` zero op, DrNAS Dirichlet sampling, DARTS-PT projection, hard Gumbel samples
filtered in Python) but is this file's own code.  For every construct:

* ``simplify(copy.deepcopy(model), (x,), mode=M, strict=True)`` captures it (no fallback) in exact
  and in topo mode;
* in exact mode the simplified module trains like the original for several SGD steps, the RNG
  seeded alike before every call on both sides: each step's outputs, weight and architecture
  gradients and BN statistics (:func:`topofx.testing.assert_train_step_equivalent`), then the
  parameters, architecture weights and buffers after the update;
* what makes the construct hard is checked on its own:

  1. shapes as ints / legacy constructors / random factories: another batch size runs the graph
     (not the eager forward) and equals the original; drop-path masks are drawn on every call, the
     graph holds no frozen tensor constant; capturing does not draw from the caller's generator,
     so the call that re-captures after a ``drop_path_prob`` change draws the original's masks;
  2. a parameter-free module built inside forward is traced through; one with parameters or
     buffers is refused naming the line;
  3. ``Dirichlet(...).rsample()``: fresh samples per call, validation at call time (same exception);
  4. a Python decision on projected weights (``if w != 0``): a projection re-captures (the code
     changes, the projected candidate's BN statistics stay put), no warning for projections far
     apart, a "changed again" warning when the decision flips on consecutive calls;
  5. ``.tolist()`` / numpy / ``.item()`` / ``float()`` of the alphas: the number returned with the
     logits follows every architecture step;
  7. a Python decision on a random draw in forward is refused naming the line ("random draw"), and
     falls back to the eager forward without ``strict``; inside a mixed op, whatever ``simplify``
     makes of it, the sample is never frozen.

The lines the errors must name carry a ``# CONSTRUCT:<tag>`` marker (see :func:`construct`).
"""
from __future__ import annotations

import copy
import functools
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Dirichlet

import topofx
from topofx.capture import DistributionCall, capture
from topofx.ir import UNKNOWN, VALUE
from topofx.testing import assert_train_step_equivalent, train_step_equivalence
from topofx.zoo.operations import Identity, ReLUConvBN, Zero

THIS_FILE = os.path.abspath(__file__)
C = 4  # channels of the search cell
N_CLASSES = 5
N_EDGES = 3  # node1 <- s0; node2 <- s0, node1


def construct(tag: str) -> tuple[int, str]:
    """(line number, stripped source text) of the line marked ``# CONSTRUCT:<tag>`` in this file."""
    marker = f"# CONSTRUCT:{tag}"
    with open(THIS_FILE) as f:
        for lineno, line in enumerate(f, 1):
            if line.rstrip().endswith(marker):
                return lineno, line[: line.index("#")].strip()
    raise LookupError(marker)


def assert_names_construct(message: str, tag: str) -> None:
    lineno, source = construct(tag)
    assert f"{THIS_FILE}:{lineno}" in message, f"expected {THIS_FILE}:{lineno} in: {message}"
    assert source in message, f"expected the source text {source!r} in: {message}"


# ---------------------------------------------------------------------------------------------
# DARTS-style building blocks
# ---------------------------------------------------------------------------------------------
class LegacyZero(nn.Module):
    """Zero op of older search code: a fresh zero tensor of the output's size (legacy constructor)."""

    def __init__(self, stride: int = 1):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        n, c, h, w = x.size()
        h //= self.stride
        w //= self.stride
        return torch.FloatTensor(n, c, h, w).fill_(0)  # CONSTRUCT:legacy_zero


def candidates(zero: type = Zero) -> list[nn.Module]:
    return [
        zero(1),
        Identity(),
        nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.BatchNorm2d(C, affine=False)),
        ReLUConvBN(C, C, 3, 1, 1, affine=False),
        ReLUConvBN(C, C, 1, 1, 0, affine=False),
    ]


N_OPS = len(candidates())


class MixedOp(nn.Module):
    def __init__(self):
        super().__init__()
        self._ops = nn.ModuleList(candidates())

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class Cell(nn.Module):
    """A DARTS cell with two intermediate nodes over one input state."""

    def __init__(self, mixed_op: type = MixedOp):
        super().__init__()
        self._ops = nn.ModuleList([mixed_op() for _ in range(N_EDGES)])

    def forward(self, s0, weights, *extra):
        s1 = self._ops[0](s0, weights[0], *extra)
        s2 = self._ops[1](s0, weights[1], *extra) + self._ops[2](s1, weights[2], *extra)
        return torch.cat([s1, s2], dim=1)


class Network(nn.Module):
    """stem -> one search cell -> global pooling -> classifier; ``arch_weights`` is what subclasses vary."""

    mixed_op: type = MixedOp

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cell = Cell(self.mixed_op)
        self.classifier = nn.Linear(2 * C, N_CLASSES)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(N_EDGES, N_OPS))

    def arch_parameters(self):
        return [self.alphas_normal]

    def arch_weights(self):
        return F.softmax(self.alphas_normal, dim=-1)

    def forward(self, x):
        s = self.cell(self.stem(x), self.arch_weights())
        return self.classifier(s.mean((2, 3)))


# ---------------------------------------------------------------------------------------------
# 1. P-DARTS-style drop-path with legacy constructors
# ---------------------------------------------------------------------------------------------
def drop_path(x, drop_prob):
    if drop_prob > 0.0:
        keep_prob = 1.0 - drop_prob
        mask = torch.FloatTensor(x.size(0), 1, 1, 1).bernoulli_(keep_prob)  # CONSTRUCT:drop_path_mask
        x.div_(keep_prob)
        x.mul_(mask)
    return x


class DropPathMixedOp(nn.Module):
    def __init__(self):
        super().__init__()
        self._ops = nn.ModuleList(candidates(LegacyZero))

    def forward(self, x, weights, drop_prob):
        res = []
        for w, op in zip(weights, self._ops):
            h = op(x)
            if not isinstance(op, Identity):
                h = drop_path(h, drop_prob)
            res.append(w * h)
        return sum(res)


class DropPathNetwork(Network):
    mixed_op = DropPathMixedOp

    def __init__(self, drop_path_prob: float = 0.4):
        super().__init__()
        self.drop_path_prob = drop_path_prob  # set by the training script each epoch

    def forward(self, x):
        s = self.cell(self.stem(x), self.arch_weights(), self.drop_path_prob)
        return self.classifier(s.mean((2, 3)))


# ---------------------------------------------------------------------------------------------
# 2. parameter-free module built inside forward (and one with parameters)
# ---------------------------------------------------------------------------------------------
class SoftmaxInForwardNetwork(Network):
    def arch_weights(self):
        softmax = nn.Softmax(dim=-1)
        return softmax(self.alphas_normal)  # CONSTRUCT:softmax_in_forward


class LinearInForwardNetwork(Network):
    def forward(self, x):
        s = self.cell(self.stem(x), self.arch_weights())
        head = nn.Linear(2 * C, N_CLASSES)
        return head(s.mean((2, 3)))  # CONSTRUCT:linear_in_forward


class BatchNormInForwardNetwork(Network):
    def forward(self, x):
        s = self.cell(self.stem(x), self.arch_weights())
        bn = nn.BatchNorm2d(2 * C, affine=False)
        s = bn(s)  # CONSTRUCT:bn_in_forward
        return self.classifier(s.mean((2, 3)))


# ---------------------------------------------------------------------------------------------
# 3. DrNAS-style Dirichlet architecture distribution
# ---------------------------------------------------------------------------------------------
class DirichletNetwork(Network):
    def arch_weights(self):
        return Dirichlet(F.elu(self.alphas_normal) + 1).rsample()  # CONSTRUCT:dirichlet


# ---------------------------------------------------------------------------------------------
# 4. DARTS-PT-style projection: candidates whose weight is zero are skipped in Python
# ---------------------------------------------------------------------------------------------
class ProjectedMixedOp(MixedOp):
    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops) if w != 0)  # CONSTRUCT:projected


class ProjectedNetwork(Network):
    mixed_op = ProjectedMixedOp

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.ones(N_EDGES, N_OPS))

    def arch_weights(self):
        return F.softmax(self.alphas_normal, dim=-1) * self.mask

    def project_op(self, edge: int, op: int) -> None:
        """Discard one candidate of an edge (perturbation-based projection removes the weakest)."""
        self.mask[edge, op] = 0


# ---------------------------------------------------------------------------------------------
# 5. numpy on architecture-only values: a cost penalty returned with the logits
# ---------------------------------------------------------------------------------------------
OP_COST = [0.0, 0.0, 0.1, 1.0, 0.3]  # per candidate, e.g. relative FLOPs


class PenaltyNetwork(Network):
    """Returns ``(logits, expected cost)``; the cost is a Python/numpy number computed from the alphas."""

    def __init__(self, style: str = "tolist"):
        super().__init__()
        self.style = style
        self.register_buffer("op_cost", torch.tensor(OP_COST))

    def expected_cost(self, w):
        if self.style == "tolist":
            return np.average(w.tolist(), axis=-1, weights=OP_COST).sum()  # CONSTRUCT:numpy_penalty
        if self.style == "asarray":
            return (np.asarray(w.detach()) @ np.asarray(OP_COST)).sum()
        if self.style == "item":
            return sum(row.dot(self.op_cost).item() for row in w)
        return float((w.detach() * self.op_cost).sum())

    def forward(self, x):
        w = self.arch_weights()
        logits = self.classifier(self.cell(self.stem(x), w).mean((2, 3)))
        return logits, self.expected_cost(w)


# ---------------------------------------------------------------------------------------------
# 7. hard Gumbel samples filtered in Python: a decision on a random draw
# ---------------------------------------------------------------------------------------------
class HardGumbelMixedOp(MixedOp):
    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops) if abs(w) > 1e-10)


class HardGumbelNetwork(Network):
    mixed_op = HardGumbelMixedOp

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.tau = tau

    def arch_weights(self):
        return F.gumbel_softmax(self.alphas_normal, tau=self.tau, hard=True, dim=-1)


class HardGumbelSingleEdgeNetwork(nn.Module):
    """One sampled edge written out in the network's own forward (no mixed-op module around it)."""

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.tau = tau
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self._ops = nn.ModuleList(candidates())
        self.classifier = nn.Linear(C, N_CLASSES)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(N_EDGES, N_OPS))

    def arch_parameters(self):
        return [self.alphas_normal]

    def forward(self, x):
        s0 = self.stem(x)
        weights = F.gumbel_softmax(self.alphas_normal[0], tau=self.tau, hard=True, dim=-1)
        s1 = sum(w * op(s0) for w, op in zip(weights, self._ops) if abs(w) > 1e-10)  # CONSTRUCT:gumbel_filter
        return self.classifier(s1.mean((2, 3)))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def build(cls: type, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(**kwargs)
    with torch.no_grad():  # architecture weights away from uniform, so every candidate matters
        model.alphas_normal.copy_(0.5 * torch.randn(N_EDGES, N_OPS))
    return model


def inputs(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def simplify_strict(model: nn.Module, x: torch.Tensor, mode: str):
    """``simplify`` of a copy under ``strict=True``; asserts the model was captured, not run eagerly."""
    twin = copy.deepcopy(model)
    simplified = topofx.simplify(twin, (x,), mode=mode, strict=True)
    assert simplified.report.fallback is None, simplified.report.fallback
    assert simplified.graph_module is not None
    return twin, simplified


def logits_of(out):
    return out[0] if isinstance(out, tuple) else out


def sgd_step(model: nn.Module, x: torch.Tensor, seed: int, lr: float = 0.2):
    """One real training step (weights and architecture together), RNG seeded before forward."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = model(x)
    logits = logits_of(out)
    r = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed + 7))
    (logits * r).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return out


def assert_same_state(model: nn.Module, simplified: nn.Module) -> None:
    """Parameters, architecture weights and buffers (BN running statistics) by state_dict key."""
    mine, theirs = simplified.state_dict(), model.state_dict()
    assert set(theirs) <= set(mine)
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def assert_trains_alike(model, simplified, batches, first_seed: int = 100, after_step=None) -> list:
    """Several SGD steps on both: each step equal (outputs, grads, BN statistics), then equal state."""
    outs = []
    for step, x in enumerate(batches):
        seed = first_seed + step
        assert_train_step_equivalent(model, simplified, (x,), seed=seed, sync_state=False)
        expected = sgd_step(model, x, seed)
        got = sgd_step(simplified, x, seed)
        torch.testing.assert_close(logits_of(got), logits_of(expected), rtol=1e-5, atol=1e-6)
        assert_same_state(model, simplified)
        outs.append((got, expected))
        if after_step is not None:
            after_step(step)
    return outs


def topofx_warnings(records) -> list[str]:
    return [str(r.message) for r in records if "topofx" in str(r.message)]


def count_eager_calls(module: nn.Module) -> list:
    """Record the original's eager forward calls on real tensors (tracing passes proxies and reads
    ``type(module).forward``); the wrapper keeps ``forward``'s signature."""
    calls: list = []
    forward = module.forward

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        if args and isinstance(args[0], torch.Tensor):
            calls.append(tuple(args[0].shape))
        return forward(*args, **kwargs)

    module.forward = counting
    return calls


# ---------------------------------------------------------------------------------------------
# 1. shapes as ints, legacy constructors, per-call random masks
# ---------------------------------------------------------------------------------------------
def test_drop_path_trains_like_the_original():
    model = build(DropPathNetwork)
    _, simplified = simplify_strict(model, inputs(2), "exact")
    assert_trains_alike(model, simplified, [inputs(2, seed=s) for s in range(3)])


def test_drop_path_captured_in_topo_mode():
    simplify_strict(build(DropPathNetwork), inputs(2), "topo")


def test_drop_path_other_batch_size_runs_the_graph():
    model = build(DropPathNetwork)
    twin, simplified = simplify_strict(model, inputs(2), "exact")
    eager = count_eager_calls(twin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (5, 6):
            assert_train_step_equivalent(model, simplified, (inputs(3, seed=seed),), seed=seed, sync_state=False)
    assert not topofx_warnings(caught)
    assert eager == [], f"batch 3 ran the original's eager forward: {eager}"


def test_drop_path_mask_drawn_on_every_call():
    model = build(DropPathNetwork)
    _, simplified = simplify_strict(model, inputs(2), "exact")
    x = inputs(4)
    with torch.no_grad():
        outs = {}
        for seed in (1, 2):
            torch.manual_seed(seed)
            expected = model(x)
            torch.manual_seed(seed)
            outs[seed] = simplified(x)
            torch.testing.assert_close(outs[seed], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(outs[1], outs[2]), "another seed gives the same drop-path masks"
        torch.manual_seed(3)
        first, second = simplified(x), simplified(x)
        assert not torch.equal(first, second), "two consecutive calls drew the same masks (frozen at capture?)"


def test_drop_path_graph_holds_no_frozen_mask_or_zeros():
    _, simplified = simplify_strict(build(DropPathNetwork), inputs(2), "exact")
    code = simplified.graph_module.code
    assert "_tensor_constant" not in code, code
    assert "bernoulli_" in code, code  # the mask is drawn by the graph
    assert not [n for n, b in simplified.graph_module.named_buffers() if "constant" in n]


def test_simplify_leaves_the_callers_rng_state_alone():
    """Capturing the drop-path masks must not draw from the global generator: a seeded search run
    draws the same masks with or without ``simplify`` (and a re-capture inside a call, below)."""
    model = build(DropPathNetwork)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    simplify_strict(model, inputs(2), "exact")
    assert torch.equal(torch.get_rng_state(), state), "simplify consumed random numbers of the global generator"


def test_drop_path_probability_change_is_followed():
    """The training script raises ``drop_path_prob`` every epoch (a Python number read by forward);
    the call right after the change (which captures anew) draws the masks the original draws."""
    model = build(DropPathNetwork, drop_path_prob=0.2)
    twin, simplified = simplify_strict(model, inputs(2), "exact")
    model.drop_path_prob = twin.drop_path_prob = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_trains_alike(model, simplified, [inputs(2, seed=s) for s in (9, 10)])
    assert "0.5" in simplified.graph_module.code  # keep_prob 0.5 now: captured anew


# ---------------------------------------------------------------------------------------------
# 2. modules built inside forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "topo"])
def test_softmax_built_in_forward_is_traced_through(mode):
    model = build(SoftmaxInForwardNetwork)
    _, simplified = simplify_strict(model, inputs(2), mode)
    if mode == "exact":
        assert_trains_alike(model, simplified, [inputs(2, seed=s) for s in range(3)])


@pytest.mark.parametrize("cls, tag", [
    (LinearInForwardNetwork, "linear_in_forward"),
    (BatchNormInForwardNetwork, "bn_in_forward"),
])
def test_module_with_state_built_in_forward_is_refused_naming_the_line(cls, tag):
    with pytest.raises(topofx.CaptureError) as info:
        topofx.simplify(build(cls), (inputs(2),), mode="exact", strict=True)
    message = str(info.value)
    assert "inside forward" in message, message
    assert_names_construct(message, tag)


# ---------------------------------------------------------------------------------------------
# 3. distributions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "topo"])
def test_dirichlet_sampling_captured(mode):
    model = build(DirichletNetwork)
    _, simplified = simplify_strict(model, inputs(2), mode)
    if mode == "exact":
        assert_trains_alike(model, simplified, [inputs(2, seed=s) for s in range(3)])


def test_dirichlet_samples_differ_between_calls():
    model = build(DirichletNetwork)
    _, simplified = simplify_strict(model, inputs(2), "exact")
    x = inputs(2)
    with torch.no_grad():
        torch.manual_seed(0)
        first, second = simplified(x), simplified(x)
    assert not torch.equal(first, second), "the Dirichlet sample was frozen at capture"


def test_dirichlet_sample_has_the_concentrations_dtype():
    """A float64 model's samples are float64 on meta too (a float32 meta value left what the sample
    weights without a value: the mixed edges it joins went unseen)."""
    model = build(DirichletNetwork).double()
    gm = capture(model, (inputs(2).double(),), strict=True).graph_module
    samples = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), DistributionCall)]
    assert samples and all(n.meta[VALUE].dtype == torch.float64 for n in samples)
    assert all(n.meta[VALUE] is not UNKNOWN for n in gm.graph.nodes if n.op != "output")


@pytest.mark.parametrize("bad", [float("-inf"), float("nan")])
def test_dirichlet_validation_runs_at_call_time(bad, monkeypatch):
    # on, whatever ran before in this process: torch.compile turns argument validation off for the process
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", True)
    model = build(DirichletNetwork)
    twin, simplified = simplify_strict(model, inputs(2), "exact")
    x = inputs(2)
    for m in (model, twin):
        with torch.no_grad():
            m.alphas_normal[1, 2] = bad  # concentration elu(-inf) + 1 == 0, or NaN: invalid
    with pytest.raises(Exception) as original_error:
        model(x)
    with pytest.raises(Exception) as simplified_error:
        simplified(x)
    assert type(simplified_error.value) is type(original_error.value), (simplified_error.value, original_error.value)
    assert "concentration" in str(original_error.value)
    assert "concentration" in str(simplified_error.value)


# ---------------------------------------------------------------------------------------------
# 4. decisions on architecture values: projection re-captures
# ---------------------------------------------------------------------------------------------
def test_projection_trains_like_the_original_and_recaptures():
    model = build(ProjectedNetwork)
    twin, simplified = simplify_strict(model, inputs(2), "exact")
    code_before = simplified.graph_module.code
    assert_trains_alike(model, simplified, [inputs(2, seed=s) for s in range(2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in (model, twin):
            m.project_op(1, 3)  # drop the 3x3 conv of edge 1
        assert_trains_alike(model, simplified, [inputs(2, seed=s) for s in range(2, 5)], first_seed=200)
    assert simplified.graph_module.code != code_before, "projection did not re-capture the graph"
    assert simplified.report.fallback is None
    assert not [m for m in topofx_warnings(caught) if "changed again" in m], topofx_warnings(caught)


def test_projection_graph_drops_the_candidate():
    """The projected conv's BN statistics stay put, as in the original (it is not run any more)."""
    model = build(ProjectedNetwork)
    twin, simplified = simplify_strict(model, inputs(2), "exact")
    for m in (model, twin):
        m.project_op(0, 4)
    bn = twin.cell._ops[0]._ops[4].op[2]
    before = bn.running_mean.clone()
    sgd_step(simplified, inputs(2, seed=3), seed=3)
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    sgd_step(model, inputs(2, seed=3), seed=3)
    assert_same_state(model, simplified)


def test_projection_captured_in_topo_mode():
    simplify_strict(build(ProjectedNetwork), inputs(2), "topo")


def test_projections_far_apart_do_not_warn():
    model = build(ProjectedNetwork)
    twin, simplified = simplify_strict(model, inputs(2), "exact")
    x = inputs(2)
    codes = [simplified.graph_module.code]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin.project_op(0, 3)
        with torch.no_grad():
            for _ in range(12):  # more calls than the "changed again" window (10)
                simplified(x)
        codes.append(simplified.graph_module.code)
        twin.project_op(2, 4)
        torch.manual_seed(0)
        got = simplified(x)
        codes.append(simplified.graph_module.code)
    assert len(set(codes)) == 3, "a projection did not re-capture"
    model.project_op(0, 3)
    model.project_op(2, 4)
    model.load_state_dict(twin.state_dict())  # the same BN statistics after the 12 calls
    torch.manual_seed(0)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)
    assert not [m for m in topofx_warnings(caught) if "changed again" in m], topofx_warnings(caught)


def test_decision_flipping_on_consecutive_calls_runs_it_per_call():
    """The second change within a few calls moves the deciding mixed op to run per call (one node, as
    written), with a warning naming the decision; results stay the original's throughout."""
    model = build(ProjectedNetwork)
    twin, simplified = simplify_strict(model, inputs(2), "exact")
    x = inputs(2)
    codes = [simplified.graph_module.code]
    flipped = []
    for k, (edge, op) in enumerate([(0, 3), (1, 4), (2, 2)]):
        for m in (model, twin):
            m.project_op(edge, op)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = train_step_equivalence(model, simplified, (x,), seed=k, sync_state=False)
        assert report.ok, str(report)
        codes.append(simplified.graph_module.code)
        flipped.append([m for m in topofx_warnings(caught) if "changed again" in m])
    assert codes[1] != codes[0], "the first projection did not re-capture"
    assert not flipped[0], flipped[0]  # the first change after capture: no warning
    assert flipped[1], "no warning when the decision changed again on the next call"
    assert THIS_FILE in flipped[1][0] and "w != 0" in flipped[1][0], flipped[1][0]  # names the decision
    assert "runs per call" in flipped[1][0] or "run per call" in flipped[1][0], flipped[1][0]
    assert simplified.report.decided_per_call, "the deciding mixed ops do not run per call"
    assert not flipped[2], flipped[2]  # per call now: the third projection needs no capture


# ---------------------------------------------------------------------------------------------
# 5. numpy / .tolist() on architecture-only values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "topo"])
def test_numpy_penalty_captured(mode):
    simplify_strict(build(PenaltyNetwork), inputs(2), mode)


def own_penalty(model) -> float:
    """The penalty recomputed eagerly from ``model``'s current alphas."""
    with torch.no_grad():
        return float(model.expected_cost(model.arch_weights()))


def test_numpy_penalty_follows_every_arch_step():
    model = build(PenaltyNetwork)
    twin, simplified = simplify_strict(model, inputs(2), "exact")
    penalties = []

    def check_penalty(_step):
        x = inputs(2, seed=50)
        with torch.no_grad():
            torch.manual_seed(0)
            expected_logits, expected = model(x)
            torch.manual_seed(0)
            got_logits, got = simplified(x)
        assert isinstance(got, np.floating), type(got)
        assert float(got) == own_penalty(twin)  # this step's alphas, not the captured ones
        assert float(got) == pytest.approx(float(expected), rel=1e-6)
        torch.testing.assert_close(got_logits, expected_logits, rtol=1e-5, atol=1e-6)
        penalties.append(float(expected))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the alphas change every step: a capture each step
        outs = assert_trains_alike(model, simplified, [inputs(2, seed=s) for s in range(4)], after_step=check_penalty)
    for got, expected in outs:
        assert float(got[1]) == pytest.approx(float(expected[1]), rel=1e-6)
    assert len(set(penalties)) == len(penalties), f"the arch steps did not change the penalty: {penalties}"


@pytest.mark.parametrize("style", ["asarray", "item", "float"])
def test_python_numbers_of_the_alphas_follow_arch_steps(style):
    model = build(PenaltyNetwork, style=style)
    twin, simplified = simplify_strict(model, inputs(2), "exact")
    x = inputs(2, seed=50)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            with torch.no_grad():
                torch.manual_seed(0)
                expected_logits, expected = model(x)
                torch.manual_seed(0)
                got_logits, got = simplified(x)
            assert float(got) == own_penalty(twin)
            assert float(got) == pytest.approx(float(expected), rel=1e-6)
            torch.testing.assert_close(got_logits, expected_logits, rtol=1e-5, atol=1e-6)
            seen.append(float(got))
            sgd_step(model, inputs(2, seed=step), seed=step, lr=1.0)
            sgd_step(simplified, inputs(2, seed=step), seed=step, lr=1.0)
            assert_same_state(model, simplified)
    assert len(set(seen)) == len(seen), seen


# ---------------------------------------------------------------------------------------------
# 7. decisions on a random draw
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "topo"])
def test_decision_on_random_draw_is_refused_naming_the_line(mode):
    with pytest.raises(topofx.CaptureError) as info:
        topofx.simplify(build(HardGumbelSingleEdgeNetwork), (inputs(2),), mode=mode, strict=True)
    message = str(info.value)
    assert "random draw" in message, message
    assert_names_construct(message, "gumbel_filter")


def test_decision_on_random_draw_falls_back_without_strict():
    model = build(HardGumbelSingleEdgeNetwork)
    with pytest.warns(UserWarning, match="random draw") as caught:
        simplified = topofx.simplify(copy.deepcopy(model), (inputs(2),), mode="exact")
    assert any(f"{THIS_FILE}:{construct('gumbel_filter')[0]}" in str(w.message) for w in caught)
    assert simplified.report.fallback is not None
    assert simplified.graph_module is None
    assert_trains_alike(model, simplified, [inputs(2, seed=s) for s in range(2)])


def test_hard_gumbel_filter_in_mixed_ops_never_freezes_the_sample():
    """Whatever ``simplify`` makes of a filter on the sample inside a mixed op (refuse, fall back,
    or run the op's Python per call), the simplified module draws a new selection every call."""
    model = build(HardGumbelNetwork)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simplified = topofx.simplify(copy.deepcopy(model), (inputs(2),), mode="exact")
    x = inputs(2)
    outs = []
    with torch.no_grad():
        for seed in range(4):
            torch.manual_seed(seed)
            expected = model(x)
            torch.manual_seed(seed)
            outs.append(simplified(x))
            torch.testing.assert_close(outs[-1], expected, rtol=1e-5, atol=1e-6)
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 1, "every seed selected the same candidates"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_trains_alike(model, simplified, [inputs(2, seed=s) for s in range(2)])
