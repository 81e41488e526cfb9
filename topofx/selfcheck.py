"""The check ``simplify`` runs before it hands a graph back: one training step on the example inputs.

* **exact mode**: the simplified module against the original model -- outputs, the gradient of every
  parameter and of every architecture tensor the graph reads, and every buffer after the step
  (BN running statistics); for an adapter's graph, which reads a sample drawn outside it, against
  the graph as captured instead (capture verified it against the model);
* **topo mode**: the rewritten graph against the graph as captured (which capture verified against
  the eager model), both evaluated at one *vertex*: every mixed edge's weights replaced by a one-hot
  choice, ``w * 0 + c`` (the value is exactly ``c``, the graph keeps its gradient paths).  Outputs,
  parameter gradients and buffers are compared, except the running statistics of batch norms that
  floated past a join (the floated BN keeps its own).  Architecture gradients are not part of the
  vertex contract: the TopoNAS estimator differs from the original's by design (docs/method.md).

Both sides run from the same RNG seed (random draws line up: the rewrite driver keeps their order).
Values (outputs, buffers) are compared in the model's own dtype at 1e-5 relative (topo mode: 1e-4,
the rounding of the merged kernel's renormalization, amplified through deep networks), widened only to 4x
the original's own float32 rounding error where that is larger (BN over near-constant channels), and
never beyond :data:`MAX_ALLOWANCE` -- an O(1) error can never pass, whatever the model's random draws
do to the rounding estimate.  Values that still differ are judged again on float64 copies (a network
that normalizes nearly equal samples amplifies float32 rounding past any fixed allowance; float64 does
not).  Gradients are compared on float64 copies of both sides (see :func:`mismatch`), at 1e-5 of the
largest gradient -- at other random draws where the original's own gradient jumps (an input exactly
at a ReLU's kink, where any subgradient is right: :func:`_judged_off_kinks`).
"""
from __future__ import annotations

import contextlib
import copy
import io
import operator
import zlib
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from .capture import speculation_check
from .ir import float64_copies, graph_attr_tensors, max_rel_error, preserved_state, run_seeded, value_of
from .modules import MergedConvBN
from .testing import train_step_equivalence
from .topology import Topology, ValueNumbering, data_dependent, weight_provenance

RTOL = 1e-5
VERTEX_RTOL = 1e-4  # topo mode's values: the merged kernel is the selected one up to its renormalization's rounding
MAX_ALLOWANCE = 1e-3
GRAD_RTOL_FLOAT32 = 1e-4
KINK_NUDGE = 1e-7  # relative size of the parameter nudge that tells a kink's tie (:func:`_gradient_jumps`)
KINK_SEEDS = (1, 2, 3)  # other draws that judge gradients a tie at a kink left undecided
_GRADIENTS = ("weight_grad", "arch_grad")


def vertex_choice(topology: Topology, number: ValueNumbering) -> dict[Any, float]:
    """A one-hot value for every edge weight of the captured graph, by the weight's value number
    (a rewrite that merges two equal weight computations -- prefix sharing -- leaves one node with
    that number, which keeps the value).

    An edge whose weights index one architecture row picks one element of it (a hash of the row's
    value number, so equal rows pick alike and different edges pick differently); other edges pick
    by a hash of their name.
    """
    choice: dict[Any, float] = {}
    for edge in topology.edges:
        weights = [c.weight for c in edge.candidates]
        picks = []
        for w in weights:
            row, index = weight_provenance(w)  # a row is a 1-D tensor of at least two elements
            if row is None:
                picks = []
                break
            picks.append(index == zlib.crc32(repr(number(row)).encode()) % value_of(row).numel())
        if not picks or not any(picks):
            picks = [k == zlib.crc32(edge.name.encode()) % len(weights) for k in range(len(weights))]
        for w, on in zip(weights, picks):
            choice[number(w)] = 1.0 if on else 0.0
    return choice


def at_vertex(gm: fx.GraphModule, choice: dict[Any, float], number: ValueNumbering,
              live: Sequence[str] = ()) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its modules) whose weight nodes (by value number) in ``choice`` read
    ``w * 0 + c``.
    Speculation checks (``capture.SpeculationFailed``) are left out: the vertex is not a draw.
    ``live`` tensor attributes (an adapter's samples) are detached in the copy: the vertex fixes the
    weights they carry, and each run of the check must not backpropagate into one shared sample."""
    vertex = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # owns the copy: numbering looks modules up in it
    graph = vertex.graph
    for node in list(graph.nodes):  # the vertex is no draw: decisions speculated on draws are not checked
        if node.op == "call_function" and node.target is speculation_check:
            graph.erase_node(node)
    data = data_dependent(graph)
    for node in list(graph.nodes):
        key = number(node) if node not in data else None  # weights never depend on the inputs
        if key not in choice:
            continue
        with graph.inserting_after(node):
            zero = graph.call_function(operator.mul, (node, 0.0))
        with graph.inserting_after(zero):
            fixed = graph.call_function(operator.add, (zero, choice[key]))
        node.replace_all_uses_with(fixed, delete_user_cb=lambda user: user is not zero)
    vertex.recompile()
    for name in live:
        setattr(vertex, name, getattr(gm, name).detach())
    vertex.train(gm.training)
    return vertex


def _floated_buffers(gm: fx.GraphModule) -> set[int]:
    return {id(b) for m in gm.modules() if isinstance(m, MergedConvBN) for g in m.groups for _, bn in g for b in bn.buffers()}


def _failures(reference: nn.Module, candidate: nn.Module, inputs: Sequence[Any], arch: Sequence[torch.Tensor],
              skip_buffers: set[int], categories: set[str], rtol: float, seed: int = 0) -> tuple[list, list[str]]:
    """The comparisons of one step (random draws from ``seed``) outside ``rtol`` in ``categories`` (and
    structural problems); the forward alone where only values are asked for."""
    report = train_step_equivalence(reference, candidate, inputs, arch_params=list(arch), rtol=rtol,
                                    atol=rtol * 0.1, train=reference.training, seed=seed,
                                    backward=bool(categories - {"output", "buffer"}))
    skipped = {n for n, b in reference.named_buffers() if id(b) in skip_buffers}
    return [c for c in report.failures
            if c.category in categories and not (c.category == "buffer" and c.name in skipped)], report.problems


def mismatch(reference: nn.Module, candidate: nn.Module, example_inputs: Sequence[Any], *,
             arch: Sequence[torch.Tensor], skip_buffers: set[int] = frozenset(), check_arch: bool = True,
             own_error: Any = None, rtol: float = RTOL) -> str | None:
    """Why ``candidate`` differs from ``reference`` in one step on ``example_inputs``, or None.

    Values (outputs, buffers) are compared as the model runs, in its own dtype.  Gradients are
    compared on float64 copies of both: a conv bias before a train-mode BN has an analytically zero
    gradient that float32 fills with rounding noise of either sign, so only float64 separates a
    wrong gradient from noise.  (Both copies draw the same float64 random numbers from the same seed.)
    Values that differ beyond the float32 allowance are judged on the float64 copies too: a network
    that normalizes nearly equal samples (batch norm over a batch of two at 1x1 resolution) amplifies
    a reordered sum's rounding to percents in float32, where float64 still agrees to 1e-5 -- and a
    wrong rewrite differs in float64 as much as in float32.
    Where a model cannot run in float64 its float32 values are final and its float32 gradients are
    compared at 1e-4 of the largest.
    """
    values = {"output", "buffer"}
    grads = {"output", "weight_grad", "arch_grad"} if check_arch else {"output", "weight_grad"}
    failures, problems = _failures(reference, candidate, example_inputs, arch, skip_buffers, values, rtol)
    if problems:
        return "; ".join(problems)
    allowance = min(MAX_ALLOWANCE, 4 * own_error()) if failures and own_error is not None else 0.0
    failures = [c for c in failures if c.rel_error > allowance]
    wanted = grads | values if failures else grads
    try:  # (FX prints the traceback of a failing generated forward: keep that off the user's screen)
        with contextlib.redirect_stderr(io.StringIO()):
            (ref64, cand64), inputs64, arch64, memo = float64_copies((reference, candidate), example_inputs, arch)
            skip64 = {id(memo[i]) for i in skip_buffers if i in memo}
            failures, problems = _failures(ref64, cand64, inputs64, arch64, skip64, wanted, RTOL)
            if not problems:
                failures = _judged_off_kinks(ref64, cand64, inputs64, arch64, skip64, wanted, failures)
    except Exception:  # noqa: BLE001 - a model that cannot run in float64: its float32 verdict, gradients looser
        if not failures:
            failures, problems = _failures(reference, candidate, example_inputs, arch, skip_buffers, grads, GRAD_RTOL_FLOAT32)
    if problems:
        return "; ".join(problems)
    if not failures:
        return None
    worst = max(failures, key=lambda c: c.rel_error)
    return f"{worst.category} {worst.name} differs by {worst.rel_error:.2e} (relative)"


def _judged_off_kinks(reference: nn.Module, candidate: nn.Module, inputs: Sequence[Any],
                      arch: Sequence[torch.Tensor], skip_buffers: set[int], categories: set[str],
                      failures: list) -> list:
    """``failures`` (of the float64 step from seed 0), unless only gradients fail and the reference's own
    gradient jumps there: then the verdict of the first of :data:`KINK_SEEDS` whose draws give a
    point where it does not (the last one's failures if none does).

    Where an input of a kink is exactly at it in real arithmetic -- a ReLU after a batch norm of a
    sample that drop-path zeroed on every edge, whose other samples were normalized to mean zero --
    its side, and with it the gradient, is decided by the rounding of an equally exact summation
    order: no gradient is "the" gradient there.  Other draws move the point off the kink; a wrong
    gradient stays wrong there."""
    seed = 0
    for next_seed in KINK_SEEDS:
        if not failures or any(c.category not in _GRADIENTS for c in failures) or not _gradient_jumps(
                reference, inputs, arch, {c.name for c in failures}, seed):
            return failures
        seed = next_seed
        failures, _ = _failures(reference, candidate, inputs, arch, skip_buffers, categories, RTOL, seed)
    return failures


def _gradient_jumps(model: nn.Module, inputs: Sequence[Any], arch: Sequence[torch.Tensor], names: set[str],
                    seed: int) -> bool:
    """Whether a gradient in ``names`` of ``model`` (float64) differs between two copies whose parameters
    are nudged by a tiny ``+delta`` and ``-delta``: an input exactly at a kink lies on either side."""
    nudged = []
    for sign in (1.0, -1.0):
        memo: dict = {}
        twin = copy.deepcopy(model, memo)
        noise = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in twin.parameters():
                if p.is_floating_point():
                    scale = KINK_NUDGE * max(1.0, p.abs().max().item()) if p.numel() else 0.0
                    p.add_(torch.randn(p.shape, generator=noise, dtype=p.dtype), alpha=sign * scale)
        nudged.append((twin, [memo.get(id(t), t) for t in arch]))
    (plus, arch_plus), (minus, arch_minus) = nudged
    report = train_step_equivalence(plus, minus, inputs, arch_params=arch_plus, candidate_arch_params=arch_minus,
                                    rtol=RTOL, atol=RTOL * 0.1, train=model.training, seed=seed, sync_state=False)
    return any(c.name in names for c in report.failures if c.category in _GRADIENTS)


def own_rounding_error(model: nn.Module, example_inputs: Sequence[Any]) -> float:
    """How far the original's float32 output is from a float64 copy's: its own rounding error
    (may be large where random draws differ between dtypes; callers cap what they allow for it)."""
    try:
        with preserved_state(model):
            expected = run_seeded(model, example_inputs)
        ref = copy.deepcopy(model).double()
        with torch.random.fork_rng(devices=[]):
            exact = run_seeded(ref, [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                                     for x in example_inputs])
        return max_rel_error(expected, fx.node.map_aggregate(exact, lambda t: t.float() if isinstance(t, torch.Tensor) else t))
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 gets no allowance
        return 0.0


class SelfCheck:
    """The check for one simplification: built from the graph as captured, before any rewrite."""

    def __init__(self, model: nn.Module, captured: fx.GraphModule, topology: Topology, example_inputs: Sequence[Any],
                 mode: str, live: Sequence[str] = ()):
        self.model, self.mode, self.example_inputs, self.live = model, mode, tuple(example_inputs), tuple(live)
        self.arch = [t for t in graph_attr_tensors(captured) if t.is_leaf and not any(t is getattr(captured, n) for n in live)]
        if mode == "topo" or live:  # an adapter's graph reads its sample: compare against the graph as captured
            self.number = ValueNumbering()
            self.choice = vertex_choice(topology, self.number) if mode == "topo" else {}
            self.reference = at_vertex(captured, self.choice, self.number, live)
        self._own: float | None = None

    def _own_error(self) -> float:
        if self._own is None:
            self._own = own_rounding_error(self.model, self.example_inputs)
        return self._own

    def __call__(self, gm: fx.GraphModule, inputs: Sequence[Any]) -> str | None:
        """Why the rewritten ``gm`` is not the original's equal on ``inputs``, or None."""
        try:
            return self._compare(gm, inputs)
        except Exception as exc:  # noqa: BLE001 - a graph that cannot run a step is no equal either
            return f"one step raised {type(exc).__name__}: {exc}"

    def _compare(self, gm: fx.GraphModule, inputs: Sequence[Any]) -> str | None:
        if self.mode == "exact" and not self.live:
            return mismatch(self.model, gm, inputs, arch=self.arch, own_error=self._own_error)
        vertex = at_vertex(gm, self.choice, self.number, self.live)
        topo = self.mode == "topo"
        return mismatch(self.reference, vertex, inputs, arch=self.arch, check_arch=not topo,
                        skip_buffers=_floated_buffers(gm), own_error=self._own_error, rtol=VERTEX_RTOL if topo else RTOL)
