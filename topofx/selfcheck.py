"""The check ``simplify`` runs before it hands a graph back: one training step on the example inputs.

* **exact mode**: the simplified module against the original model -- outputs, the gradient of every
  parameter and of every architecture tensor the graph reads, and every buffer after the step
  (BN running statistics);
* **topo mode**: the rewritten graph against the graph as captured (which capture verified against
  the eager model), both evaluated at one *vertex*: every mixed edge's weights replaced by a one-hot
  choice, ``w * 0 + c`` (the value is exactly ``c``, the graph keeps its gradient paths).  Outputs,
  parameter gradients and buffers are compared, except the running statistics of batch norms that
  floated past a join (the floated BN keeps its own).  Architecture gradients are not part of the
  vertex contract: the TopoNAS estimator differs from the original's by design (docs/method.md).

Both sides run from the same RNG seed (random draws line up: the rewrite driver keeps their order).
Tolerance: 1e-5 relative, widened only to 4x the original's own float32 rounding error where that is
larger (BN over near-constant channels), and never beyond :data:`MAX_ALLOWANCE` -- an O(1) error can
never pass, whatever the model's random draws do to the rounding estimate.
"""
from __future__ import annotations

import copy
import operator
import zlib
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from .capture import graph_attr_tensors, max_rel_error, preserved_state, run_seeded
from .modules import MergedConvBN
from .testing import train_step_equivalence
from .topology import Topology, weight_provenance

RTOL = 1e-5
MAX_ALLOWANCE = 1e-3


def _canonical(node: Any, memo: dict) -> Any:
    """A key equal for nodes that compute the same value from the same attributes (value numbering),
    so that prefix sharing's merges of duplicate weight computations keep one choice per value."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node not in memo:
        if node.op in ("get_attr", "placeholder"):
            memo[node] = (node.op, str(node.target))
        else:
            target = getattr(node.target, "__name__", str(node.target))
            args = fx.node.map_aggregate((node.args, tuple(sorted(node.kwargs.items()))), lambda a: _canonical(a, memo))
            memo[node] = (node.op, target, repr(args))
    return memo[node]


def vertex_choice(topology: Topology) -> dict[str, float]:
    """A one-hot value for every edge weight of the captured graph, by node name.

    An edge whose weights index one architecture row picks one element of it (a hash of the row's
    canonical key, so equal rows pick alike and different edges pick differently).
    """
    memo: dict = {}
    choice: dict[str, float] = {}
    for edge in topology.edges:
        weights = [c.weight for c in edge.candidates]
        picks = []
        for w in weights:
            row, index = weight_provenance(w)
            size = row.meta.get("topofx_value").numel() if row is not None and hasattr(row.meta.get("topofx_value"), "numel") else 0
            if row is None or index is None or not size:
                picks = []
                break
            picks.append(index == zlib.crc32(repr(_canonical(row, memo)).encode()) % size)
        if not picks or not any(picks):
            picks = [k == zlib.crc32(edge.name.encode()) % len(weights) for k in range(len(weights))]
        for w, on in zip(weights, picks):
            choice[w.name] = 1.0 if on else 0.0
    return choice


def at_vertex(gm: fx.GraphModule, choice: dict[str, float]) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its modules) whose weight nodes named in ``choice`` read
    ``w * 0 + c``; weights merged away by a rewrite are represented by the node that replaced them."""
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.name not in choice:
            continue
        with graph.inserting_after(node):
            zero = graph.call_function(operator.mul, (node, 0.0))
        with graph.inserting_after(zero):
            fixed = graph.call_function(operator.add, (zero, choice[node.name]))
        node.replace_all_uses_with(fixed, delete_user_cb=lambda user: user is not zero)
    return fx.GraphModule(gm, graph)


def _floated_buffers(gm: fx.GraphModule) -> set[int]:
    return {id(b) for m in gm.modules() if isinstance(m, MergedConvBN) for g in m.groups for _, bn in g for b in bn.buffers()}


def mismatch(reference: nn.Module, candidate: nn.Module, example_inputs: Sequence[Any], *,
             arch: Sequence[torch.Tensor], skip_buffers: set[int] = frozenset(), check_arch: bool = True,
             own_error: Any = None) -> str | None:
    """Why ``candidate`` differs from ``reference`` in one step on ``example_inputs``, or None."""
    train = reference.training
    report = train_step_equivalence(reference, candidate, example_inputs, arch_params=list(arch),
                                    rtol=RTOL, atol=RTOL * 0.1, train=train)
    skipped = {n for n, b in reference.named_buffers() if id(b) in skip_buffers}
    failures = [c for c in report.failures
                if not (c.category == "buffer" and c.name in skipped) and (check_arch or c.category != "arch_grad")]
    if not failures and not report.problems:
        return None
    if report.problems:
        return "; ".join(report.problems)
    worst = max(failures, key=lambda c: c.rel_error)
    allowance = min(MAX_ALLOWANCE, 4 * own_error()) if own_error is not None else 0.0
    if all(c.rel_error <= allowance for c in failures):
        return None
    return f"{worst.category} {worst.name} differs by {worst.rel_error:.2e} (relative)"


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

    def __init__(self, model: nn.Module, captured: fx.GraphModule, topology: Topology, example_inputs: Sequence[Any], mode: str):
        self.model, self.mode, self.example_inputs = model, mode, tuple(example_inputs)
        self.arch = graph_attr_tensors(captured)
        if mode == "topo":
            self.choice = vertex_choice(topology)
            self.reference = at_vertex(captured, self.choice)
            self.reference.train(captured.training)
        self._own: float | None = None

    def _own_error(self) -> float:
        if self._own is None:
            self._own = own_rounding_error(self.model, self.example_inputs)
        return self._own

    def __call__(self, gm: fx.GraphModule, inputs: Sequence[Any]) -> str | None:
        """Why the rewritten ``gm`` is not the original's equal on ``inputs``, or None."""
        if self.mode == "exact":
            gm.train(self.model.training)
            return mismatch(self.model, gm, inputs, arch=self.arch, own_error=self._own_error)
        vertex = at_vertex(gm, self.choice)
        vertex.train(self.reference.training)
        return mismatch(self.reference, vertex, inputs, arch=self.arch, check_arch=False,
                        skip_buffers=_floated_buffers(gm), own_error=self._own_error)
