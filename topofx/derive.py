"""Derive the discrete child network of a one-shot supernet, as a standalone ``torch.fx.GraphModule``.

Why: at the end of a search, DARTS-family code rebuilds the chosen architecture by hand from a
genotype, with its own network class.  :func:`derive` gets it from the supernet's own graph instead:
it captures the supernet (:mod:`topofx.capture`), finds its mixed edges ``sum_k w_k * op_k(x)``
(:mod:`topofx.topology`) and, on each, keeps one candidate:

* by default the argmax of the values the edge's terms are weighted with (``softmax(alpha)[e][k]``:
  the argmax of the alpha row feeding the edge; the first one on a tie), read from the weight nodes
  topology records -- structure, not class or attribute names;
* or the candidate a ``genotype`` names (:data:`Genotype`).

The edge's sum is replaced by the kept candidate's output **without** its weight, as DARTS's derived
architectures are the operations themselves: the child's value equals the supernet's exactly when
the kept weight is 1 and the others 0 (a one-hot architecture, e.g. ``1e4`` logits under softmax).
A kept zero candidate (``x.mul(0.)``) stays in the graph, so that edge contributes zeros, as in the
supernet.  Sums over edges that are themselves weighted (PC-DARTS's edge normalization, a *node
join*) lose their weights too: the child sums its edges.  Everything that only fed the removed
candidates and the weights is then removed (dead code elimination): the child has no architecture
parameters and no softmax, only the kept candidates' modules and the rest of the network, deep-copied
under the supernet's own module paths (``child.state_dict()`` keys are a subset of the supernet's;
training the child leaves the supernet alone).  ``child.meta[CHOICES]`` lists what was kept.

The child runs the code the supernet ran on ``example_inputs``, in the train/eval mode the supernet
was in: Python decisions the forward takes on shapes or values (``if self.training:``) are fixed as
they were taken then.  Sampled supernets whose weights are drawn in forward (Gumbel, Dirichlet) have
no argmax to read: pass a ``genotype``.  Supernets whose candidates are gated (``topofx.gate``, GDAS
through its adapter) have no weighted sums and are refused, as any model without mixed edges.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any, Mapping, Sequence, Union

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .capture import capture, speculation_check
from .ir import DRAWN, is_inplace
from .simplifier import SimplifiedModule, canonicalize
from .topology import MixedEdge, Topology, analyze, data_dependent, weighted_term

CHOICES = "topofx_choices"  # child.meta key: the list of :class:`Choice` made, one per mixed edge

# Which candidate ``k`` each edge keeps: ``{edge: k}`` with edge an index into the edge order (graph
# order, ``Choice.edge``) or an edge's name (``Choice.name``), edges not named keeping their argmax;
# or a list of one ``k`` per edge, in edge order; or a list of one such list per cell, cells in the
# order their first edges come (``Choice.cell``).  ``[c.index for c in child.meta[CHOICES]]`` is the
# list form of a derived child's architecture.
Genotype = Union[Mapping[Union[int, str], int], Sequence[int], Sequence[Sequence[int]]]


@dataclasses.dataclass(frozen=True)
class Choice:
    """The candidate kept on one mixed edge of the supernet."""

    edge: int  # position in the edge order (graph order of the joins), the key a genotype uses
    name: str  # ``MixedEdge.name``: ``input->join`` in the captured graph
    cell: str
    index: int  # the kept candidate
    candidates: tuple[str, ...]  # every candidate, described (``Conv2d3x3>BatchNorm2d``, ``identity``)
    weights: tuple[float, ...] | None  # the weight values at derivation; None when drawn in forward
    modules: tuple[str, ...]  # module paths of the kept candidate (prefixes of its child state_dict keys)


def derive(model: nn.Module, example_inputs: Sequence[Any], genotype: Genotype | None = None) -> fx.GraphModule:
    """The discrete child network of ``model``: one candidate per mixed edge, no architecture weights.

    ``model`` is the supernet (a :class:`~topofx.simplifier.SimplifiedModule` is derived from its
    original); ``genotype`` picks candidates (:data:`Genotype`), the argmax of each edge's weights
    otherwise.  Raises ``ValueError`` naming the edge for a genotype that does not fit the edges,
    when the model has no mixed edges, or when an architecture parameter is still read elsewhere
    (a penalty computed from the alphas); :class:`~topofx.capture.CaptureError` when it cannot be
    captured.
    """
    root = model.original if isinstance(model, SimplifiedModule) else model
    gm = capture(root, tuple(example_inputs), strict=True).graph_module
    canonicalize(gm, root, example_inputs)
    topo = analyze(gm.graph, root)
    if not topo.edges:
        raise ValueError(
            f"{type(root).__name__} has no mixed edges (no weighted sum sum_k w_k * op_k(x) with architecture "
            "weights): there is no candidate to choose, nothing to derive")
    weights = _weight_values(gm, topo)
    picked = _genotype_indices(genotype, topo)
    choices = []
    for i, edge in enumerate(topo.edges):
        if i not in picked and weights[i] is None:
            raise ValueError(
                f"{_describe(i, edge)}: its weights are drawn at random in forward, there is no argmax to "
                "read; pass genotype= to choose its candidate")
        k = picked[i] if i in picked else max(range(len(edge.candidates)), key=weights[i].__getitem__)
        kept = edge.candidates[k].branch
        choices.append(Choice(i, edge.name, edge.cell, k, tuple(c.describe(gm) for c in edge.candidates),
                              weights[i], tuple(dict.fromkeys(n.target for n in kept if n.op == "call_module"))))
    architecture = _architecture_attributes(gm, topo)
    _unweight_node_joins(topo, data_dependent(gm.graph))
    _keep_selected(gm, topo, [c.index for c in choices])
    _eliminate_dead_code(gm)
    _check_no_architecture(gm, architecture)
    gm.graph.lint()
    child = _standalone(gm, f"{type(root).__name__}Child")
    child.meta[CHOICES] = choices
    return child


def _describe(i: int, edge: MixedEdge) -> str:
    return f"edge {i} ({edge.name}{', cell ' + edge.cell if edge.cell else ''})"


def _weight_values(gm: fx.GraphModule, topo: Topology) -> list[tuple[float, ...] | None]:
    """The value of every candidate's weight, per edge, computed from the model's current attributes;
    ``None`` for an edge whose weights depend on a random draw made in forward."""
    fixed = [not any(c.weight.meta.get(DRAWN) for c in e.candidates) for e in topo.edges]
    needed: set[fx.Node] = set()
    for edge, ok in zip(topo.edges, fixed):
        for c in edge.candidates if ok else ():
            needed |= nx.ancestors(topo.nx_graph, c.weight) | {c.weight}
    interpreter = fx.Interpreter(gm)
    with torch.no_grad():
        for node in gm.graph.nodes:  # graph order: every node's inputs are computed before it
            if node in needed:
                interpreter.env[node] = interpreter.run_node(node)
    return [tuple(float(interpreter.env[c.weight]) for c in e.candidates) if ok else None
            for e, ok in zip(topo.edges, fixed)]


def _genotype_indices(genotype: Genotype | None, topo: Topology) -> dict[int, int]:
    """``{edge index: candidate index}`` from any :data:`Genotype` form, checked against the edges."""
    edges = topo.edges
    if genotype is None:
        return {}
    if isinstance(genotype, Mapping):
        names = {e.name: i for i, e in enumerate(edges)}
        pairs = []
        for key, k in genotype.items():
            i = names.get(key) if isinstance(key, str) else _as_int(key, "genotype edge key")
            if i is None or not 0 <= i < len(edges):
                raise ValueError(f"genotype names edge {key!r}, but the model's {len(edges)} mixed edges are "
                                 f"0..{len(edges) - 1}, or their names ({next(iter(names))!r}, ...)")
            pairs.append((i, k))
    elif all(isinstance(row, Sequence) and not isinstance(row, str) for row in genotype):
        cells = list(topo.cells().items())
        if len(genotype) != len(cells):
            raise ValueError(f"genotype lists {len(genotype)} cells, but the model's mixed edges form {len(cells)} "
                             f"cells ({', '.join(repr(c) for c, _ in cells)})")
        index = {id(e): i for i, e in enumerate(edges)}
        pairs = []
        for (cell, cell_edges), row in zip(cells, genotype):
            if len(row) != len(cell_edges):
                raise ValueError(f"genotype lists {len(row)} choices for cell {cell!r}, which has "
                                 f"{len(cell_edges)} mixed edges")
            pairs += [(index[id(e)], k) for e, k in zip(cell_edges, row)]
    else:
        if len(genotype) != len(edges):
            raise ValueError(f"genotype lists {len(genotype)} choices, but the model has {len(edges)} mixed edges")
        pairs = list(enumerate(genotype))
    out = {}
    for i, k in pairs:
        k = _as_int(k, f"genotype choice for {_describe(i, edges[i])}")
        if not 0 <= k < len(edges[i].candidates):
            raise ValueError(f"genotype chooses candidate {k} on {_describe(i, edges[i])}, which has "
                             f"{len(edges[i].candidates)} candidates (0..{len(edges[i].candidates) - 1})")
        out[i] = k
    return out


def _as_int(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, not {value!r}") from None


def _architecture_attributes(gm: fx.GraphModule, topo: Topology) -> list[fx.Node]:
    """The ``get_attr`` nodes of learnable tensors the edges' weights are computed from."""
    out: dict[fx.Node, None] = {}
    for edge in topo.edges:
        for c in edge.candidates:
            for node in nx.ancestors(topo.nx_graph, c.weight) | {c.weight}:
                if node.op == "get_attr" and getattr(_attribute(gm, node.target), "requires_grad", False):
                    out[node] = None
    return list(out)


def _attribute(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _unweight_node_joins(topo: Topology, data: set[fx.Node]) -> None:
    """``sum_j w_j * edge_j`` (a node join) becomes ``sum_j edge_j``."""
    for chain in topo.node_joins:
        for term in chain.terms:
            if (wt := weighted_term(term, data)) is not None:
                term.replace_all_uses_with(wt[1])


def _keep_selected(gm: fx.GraphModule, topo: Topology, selected: list[int]) -> None:
    """Rebuild every sum holding mixed edges from its other terms and each edge's kept output.

    One sum may hold several edges (a ``functools.reduce`` over all their terms); adding the dropped ``0 * b`` terms and
    the ``0`` that ``sum`` starts from changes no value, so the rebuilt sum equals the supernet's at a
    one-hot architecture."""
    kept_output: dict[fx.Node, fx.Node] = {}
    dropped: set[fx.Node] = set()
    for edge, k in zip(topo.edges, selected):
        for j, c in enumerate(edge.candidates):
            if j == k:
                kept_output[c.mul] = c.output
            else:
                dropped.add(c.mul)
    # an edge's sum can be a term of another's (``reduce`` joins: ``e1 + e2``) or the kept output of
    # another's candidate (a depth choice over blocks that are mixed edges): both read the rebuilt sum
    rebuilt: dict[fx.Node, fx.Node] = {}
    for root in dict.fromkeys(edge.join for edge in topo.edges):
        chain = next(e.chain for e in topo.edges if e.join is root)
        kept = [kept_output.get(t, t) for t in chain.terms if t not in dropped and not (isinstance(t, (int, float)) and t == 0)]
        terms = [rebuilt.get(t, t) for t in kept]
        with gm.graph.inserting_before(root):
            total = terms[0]
            for term in terms[1:]:
                total = gm.graph.call_function(operator.add, (total, term))
        root.replace_all_uses_with(total)
        rebuilt[root] = total


def _eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove unused nodes (random draws included).  An in-place update whose result is unused stays
    while anything else reads the value it writes into; a speculation check (:mod:`topofx.capture`)
    stays while anything else reads the value it checks (a decision on the architecture weights'
    samples goes with them)."""
    inplace = {n for n in gm.graph.nodes if is_inplace(n, gm)}
    changed = True
    while changed:
        changed = False
        for node in reversed(gm.graph.nodes):
            if node.users:
                continue
            if node.target is speculation_check:
                if any(len(a.users) > 1 for a in node.all_input_nodes):
                    continue
            elif node.is_impure(impure_random=False):
                continue
            target = node.args[0] if node in inplace and node.args else None
            if isinstance(target, fx.Node) and len(target.users) > 1:
                continue
            gm.graph.erase_node(node)
            changed = True


def _check_no_architecture(gm: fx.GraphModule, architecture: list[fx.Node]) -> None:
    alive = set(gm.graph.nodes)
    for node in architecture:
        if node in alive:
            raise ValueError(
                f"architecture parameter {node.target} is still read after the mixed edges were derived "
                f"(by {', '.join(u.name for u in node.users)}): the child would keep it; derive needs a forward "
                "whose only use of the architecture weights is weighting candidates")


def _standalone(gm: fx.GraphModule, class_name: str) -> fx.GraphModule:
    """A GraphModule of ``gm``'s graph owning deep copies of the modules and tensors it uses (one
    copy of anything used under several names)."""
    memo: dict[int, Any] = {}
    targets = dict.fromkeys(n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr"))
    owned = {t: copy.deepcopy(_attribute(gm, t), memo) for t in targets}
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    child = fx.GraphModule(owned, graph, class_name=class_name)
    child.train(gm.training)
    return child
