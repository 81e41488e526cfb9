"""The rewrite engine: passes, their records, and a driver that applies them to a fixpoint.

A *pass* is a callable ``pass_(ctx) -> list[Rewrite]`` with two attributes: ``name`` and ``exact``.
It matches a pattern in ``ctx.gm.graph``, rewrites the matches it can prove, and returns one
:class:`Rewrite` record per rewrite (an empty list means "no match": the driver's fixpoint test).
After every pass that changed something the driver re-sorts the graph (keeping the order of random
draws and in-place updates, :class:`Effects`), removes dead code, lints, recompiles and re-propagates
meta values; if any invariant breaks (lint, output signature, a value that can no longer be
computed, the effect order, an exception inside the pass) the pass is undone and the graph before
it kept (:func:`_apply`) -- a pass never hands back a wrong graph silently.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.fx as fx
from torch import nn

from .ir import DECIDED_VALUE, STATIC, UNKNOWN, VALUE, Effects, is_pure, run_on_meta
from .topology import Topology, analyze


@dataclasses.dataclass
class Rewrite:
    """One rewrite, as the report shows it."""

    pass_name: str
    action: str  # removed | shared | fused | floated | merged | layout
    nodes: list[str]  # graph nodes that were rewritten away or into the result
    result: str  # the node that now computes it
    exact: bool
    detail: str = ""
    edges: tuple[str, ...] = ()  # the mixed edges whose nodes it rewrote (set by the driver, from ``owners``)


@dataclasses.dataclass
class PassContext:
    """What a pass sees: the graph module, the original model, the example inputs and a lazily
    computed topology."""

    gm: fx.GraphModule
    original: nn.Module
    example_inputs: Sequence[Any] = ()
    _topology: Topology | None = None
    _counter: int = 0

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = analyze(self.gm.graph, self.original)
        return self._topology

    def invalidate(self) -> None:
        self._topology = None

    def add_module(self, prefix: str, module: nn.Module) -> str:
        """Register a new module on the graph module under a fresh ``topofx_<prefix>_<n>`` name."""
        while hasattr(self.gm, name := f"topofx_{prefix}_{self._counter}"):
            self._counter += 1
        self._counter += 1
        self.gm.add_submodule(name, module)
        return name


class Pass(Protocol):
    name: str
    exact: bool

    def __call__(self, ctx: PassContext) -> list[Rewrite]: ...


# ---------------------------------------------------------------------------------------------
# helpers shared by passes
# ---------------------------------------------------------------------------------------------


def called_once(gm: fx.GraphModule) -> set[int]:
    """ids of the modules that exactly one ``call_module`` node calls (a module called twice updates
    its state twice, in order: fusing or merging it with others would change that)."""
    counts: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            for m in mod.modules():
                counts[id(m)] = counts.get(id(m), 0) + 1
    return {k for k, v in counts.items() if v == 1}


def is_stateless_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A pure one-argument module call without parameters (a pooling); ``is_pure`` already rules
    out unknown user modules."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    return is_pure(node, gm) and not any(True for _ in gm.get_submodule(node.target).parameters())


def swap_modules(gm: fx.GraphModule, supports: Callable[[nn.Module], bool],
                 wrap: Callable[[nn.Module], nn.Module], skip: Callable[[fx.Node], bool] | None = None) -> list[fx.Node]:
    """Replace the module of every one-argument call whose module ``supports`` accepts (and has no
    hooks) by ``wrap(module)``, at the same path of the graph module's own containers (the original
    model keeps its modules; cells and edges keep their names).  ``skip(node)``: calls left as they
    are (a cost rule on the call's shapes).  Returns the calls rewritten."""
    swapped = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or (skip is not None and skip(node)):
            continue
        module = gm.get_submodule(node.target)
        if not supports(module) or module._forward_hooks or module._forward_pre_hooks:
            continue
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent), leaf, wrap(module))
        swapped.append(node)
    return swapped


def rebuild_chain(gm: fx.GraphModule, root: fx.Node, terms: Sequence[Any]) -> fx.Node:
    """Replace the sum chain ending at ``root`` by a new left-deep chain over ``terms``.

    The old chain's adds become dead (dead-code elimination removes them); returns the new root.
    """
    anchor = max((t for t in terms if isinstance(t, fx.Node)), key=node_order(gm.graph), default=None)
    if anchor is None or node_order(gm.graph)(anchor) < node_order(gm.graph)(root):
        anchor = root.prev
    with gm.graph.inserting_after(anchor):
        acc = terms[0]
        for term in terms[1:]:
            acc = gm.graph.call_function(operator.add, (acc, term))
    root.replace_all_uses_with(acc)
    if isinstance(acc, fx.Node):
        acc.meta.update({k: v for k, v in root.meta.items() if k not in acc.meta})
    return acc


def split_channels(gm: fx.GraphModule, node: fx.Node, widths: Sequence[int]) -> list[fx.Node]:
    """Nodes for the channel blocks of ``node``'s output, right after it: one ``split`` call (its
    backward is one concatenation; per-block slicing would allocate a full-size gradient per block)."""
    with gm.graph.inserting_after(node):
        parts = gm.graph.call_method("split", (node, list(widths)), {"dim": 1})
    out, anchor = [], parts
    for i in range(len(widths)):
        with gm.graph.inserting_after(anchor):
            anchor = gm.graph.call_function(operator.getitem, (parts, i))
        out.append(anchor)
    return out


def node_order(graph: fx.Graph):
    """``key`` function: a node's position in ``graph``."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


def stable_toposort(graph: fx.Graph, extra_edges: Sequence[tuple[fx.Node, fx.Node]] = ()) -> None:
    """Reorder nodes topologically, keeping the current order wherever the data flow allows.

    Passes insert a fused node after the last of its inputs; its users may sit earlier.  networkx's
    lexicographical topological sort (key = current position) repairs that with minimal movement.
    ``extra_edges`` add the orderings that data flow does not show (:class:`Effects`); a cycle
    raises ``networkx.NetworkXUnfeasible``.
    """
    import networkx as nx

    from .topology import to_networkx

    g = to_networkx(graph)
    g.add_edges_from(extra_edges)
    order = list(nx.lexicographical_topological_sort(g, key=node_order(graph)))
    if order == list(graph.nodes):
        return
    prev = graph._root  # the sentinel before the first node
    for node in order:
        prev.append(node)
        prev = node


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Remove unused pure nodes; returns how many were removed."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: not is_pure(n, gm))
    return before - len(gm.graph.nodes)


def propagate_values(gm: fx.GraphModule, example_inputs: Sequence[Any], *, incremental: bool = False) -> None:
    """Recompute nodes' meta values (shape, dtype) by running the graph on meta tensors.

    ``incremental``: only nodes without a value (new ones) and nodes downstream of a value whose
    shape or dtype changed are recomputed -- rewrites preserve values, so after a correct pass
    only its new nodes run; a wrong shape still propagates to the output signature.
    """
    inputs = iter(example_inputs)
    changed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = next(inputs, node.meta.get(VALUE, UNKNOWN))  # a specialized argument keeps its value
            node.meta[VALUE] = value.detach().to("meta") if isinstance(value, torch.Tensor) else value
            continue
        if node.op == "output":
            continue
        if incremental and VALUE in node.meta and not any(a in changed for a in node.all_input_nodes):
            continue
        old = node.meta.get(VALUE, UNKNOWN)
        try:
            node.meta[VALUE] = run_on_meta(gm, node.op, node.target, node.args, node.kwargs)
        except Exception:  # noqa: BLE001 - unknown, unless capture took its shape as a decision (DECIDED_VALUE)
            node.meta[VALUE] = node.meta.get(DECIDED_VALUE, UNKNOWN)
        node.meta.setdefault(STATIC, False)
        if _sig(old) != _sig(node.meta[VALUE]):
            changed.add(node)


def output_signature(gm: fx.GraphModule) -> list[Any]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    sig: list[Any] = []
    fx.node.map_arg(out.args, lambda n: sig.append(_sig(n.meta.get(VALUE, UNKNOWN))))
    return sig


def _sig(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    return "?" if value is UNKNOWN else type(value).__name__


_FUNCTIONAL_CONV = {torch.conv1d, torch.conv2d, torch.conv3d, nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d}
_FUNCTIONAL_BN = {nn.functional.batch_norm, torch.batch_norm}


def node_counts(gm: fx.GraphModule) -> dict[str, int]:
    """Nodes, convolutions and batch norms in the graph (fused modules count their parts once;
    functional ``conv2d`` / ``batch_norm`` calls count as the modules they compute)."""
    counts = {"nodes": 0, "conv": 0, "bn": 0}
    for node in gm.graph.nodes:
        counts["nodes"] += 1
        if node.op == "call_function":
            counts["conv"] += node.target in _FUNCTIONAL_CONV
            counts["bn"] += node.target in _FUNCTIONAL_BN
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            counts["conv"] += isinstance(mod, nn.modules.conv._ConvNd) or getattr(mod, "is_conv", False)
            counts["bn"] += isinstance(mod, nn.modules.batchnorm._BatchNorm) or getattr(mod, "is_bn", False)
    return counts


class RewriteError(RuntimeError):
    """A pass's result was rejected (the graph before it is kept); the message says why."""


@dataclasses.dataclass
class PassRun:
    """Aggregate of one pass over the whole run, for the report."""

    name: str
    exact: bool
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    removed: dict[str, int] = dataclasses.field(default_factory=lambda: {"nodes": 0, "conv": 0, "bn": 0})
    rejected: list[str] = dataclasses.field(default_factory=list)  # why applications were undone


Check = Callable[[fx.GraphModule], "str | None"]  # an extra invariant: why the graph is wrong, or None


def _known(node: fx.Node) -> bool:
    return node.meta.get(VALUE, UNKNOWN) is not UNKNOWN


def _apply(ctx: PassContext, pass_: Pass, expected: list[Any], check: Check | None) -> list[Rewrite]:
    """Run one pass; keep its result only if every invariant holds, else restore the graph before it.

    Invariants: the graph lints; the output signature is unchanged; every node that had a value
    (shape, dtype) still has one and every new node has one (no unknown passes through); random
    draws and in-place updates keep their order (:class:`Effects`); and ``check``, if given.
    """
    gm = ctx.gm
    saved, modules_before = copy.deepcopy(gm.graph), set(gm._modules)
    called = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    effects = Effects.of(gm)
    known = {n: _known(n) for n in gm.graph.nodes}
    try:
        records = pass_(ctx)
        if not records:
            return []
        alive = set(gm.graph.nodes)
        stable_toposort(gm.graph, effects.order_edges(alive, gm))
        eliminate_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
        propagate_values(gm, ctx.example_inputs, incremental=True)
        lost = [n.name for n in gm.graph.nodes if n.op != "output" and known.get(n, True) and not _known(n)]
        problem = (
            (f"the value of {', '.join(lost[:5])} can no longer be computed" if lost else None)
            or ("it changed the output signature" if output_signature(gm) != expected else None)
            or effects.violation(gm)
            or (check(gm) if check else None)
        )
        if problem:
            raise RewriteError(problem)
        return records
    except Exception as exc:  # noqa: BLE001 - any failure of a pass leaves the graph as it was
        gm.graph = saved
        for name in set(gm._modules) - modules_before:
            delattr(gm, name)
        for target, module in called.items():  # modules a pass swapped in place (swap_modules)
            parent, _, leaf = target.rpartition(".")
            setattr(gm.get_submodule(parent), leaf, module)
        ctx.invalidate()
        reason = str(exc) if isinstance(exc, RewriteError) else f"{type(exc).__name__}: {exc}"
        raise RewriteError(reason) from exc


def _attribute(records: list[Rewrite], owners: dict[str, set[str]]) -> None:
    """One pass's rewrites: each belongs to the edges of the nodes it rewrote, as they were before the pass
    (a merged convolution that several records share is new: it belongs to each record's own edges only)."""
    for record in records:
        record.edges = tuple(sorted(set().union(*(owners.get(name, ()) for name in (*record.nodes, record.result)))))
    for record in records:
        if record.edges:
            owners.setdefault(record.result, set()).update(record.edges)


def run_to_fixpoint(
    gm: fx.GraphModule,
    original: nn.Module,
    passes: Sequence[Pass],
    example_inputs: Sequence[Any],
    *,
    max_rounds: int = 20,
    progress: Callable[[str], None] | None = None,
    check: Check | None = None,
    owners: dict[str, set[str]] | None = None,
) -> list[PassRun]:
    """Apply ``passes`` in order, repeatedly, until a full round rewrites nothing.

    A pass whose result breaks an invariant (see :func:`_apply`) is undone and recorded in its
    ``PassRun.rejected``; the others go on.  ``owners`` (node name -> labels of the mixed edges it
    belongs to, ``Topology.owners``): each rewrite's ``edges`` are those of the nodes it rewrote, and
    its result node inherits them (a later rewrite of a fused convolution counts for its edges too).
    """
    ctx = PassContext(gm, original, tuple(example_inputs))
    propagate_values(gm, example_inputs)
    expected = output_signature(gm)
    runs = {p.name: PassRun(p.name, p.exact) for p in passes}
    for _ in range(max_rounds):
        changed = False
        for pass_ in passes:
            run = runs[pass_.name]
            before = node_counts(gm)
            try:
                records = _apply(ctx, pass_, expected, check)
            except RewriteError as exc:
                if str(exc) not in run.rejected:
                    run.rejected.append(str(exc))
                continue
            if records:
                changed = True
                if owners is not None:
                    _attribute(records, owners)
                run.rewrites.extend(records)
                ctx.invalidate()
                if progress:
                    progress(f"{pass_.name}: {len(records)} rewrites")
            after = node_counts(gm)
            for key in run.removed:
                run.removed[key] += before[key] - after[key]
        if not changed:
            break
    return list(runs.values())
