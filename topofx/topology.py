"""A networkx view of a captured supernet: weighted joins (mixed edges), their inputs and candidates.

Structure, not names, decides everything here:

* **architecture factor** -- a node whose value does not depend on the network's inputs (no path
  from a placeholder) and is a tensor of one element: ``softmax(alpha)[e][k]``, a Gumbel sample, a
  GDAS one-hot entry, a PC-DARTS edge-normalization weight.
* **sum chain** -- the left-deep chain of ``add`` nodes that Python's ``sum(...)``, ``a + b + c`` or a
  ``+=`` loop records; its *terms* are the right-hand operands plus the chain head's left operand.
  Each user-level ``sum`` keeps its own chain, so a cell's node sum over edges is not confused with
  the edges' own sums; an add of two ``sum(...)`` results (``sum(a) + sum(b)``) starts a chain of
  its own.
* **mixed edge** -- a sum chain with at least two terms ``w_k * b_k`` (architecture factor times a
  data tensor of the same shape as the product).  Its **input** is the nearest common dominator of
  the ``b_k`` in the data-flow graph (networkx ``immediate_dominators`` from a virtual source wired
  to the placeholders); each candidate's **branch** is the set of nodes on paths from the input to
  ``b_k``.  A chain whose branches contain another mixed edge's join is a *node join* (a cell's sum
  over weighted edges, as PC-DARTS's edge normalization writes it), not an edge -- unless the
  candidates are nested, each output on the branch of the next (a searchable depth: the outputs
  after 1, 2, ... blocks that may themselves be mixed edges); the input is then the shallowest
  output (often an identity candidate) and each deeper candidate holds the blocks in between.
* **cell** -- the longest module path an edge's candidates share with another edge's (module
  containers such as ``ModuleList``/``ModuleDict`` stripped): ``cells.3`` for both xautodl and DARTS.
"""
from __future__ import annotations

import dataclasses
import operator
import os
from collections import defaultdict
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.fx as fx

from .ir import draws, mutates, shape_of, stateless_module_key, value_of

_SOURCE = "__topofx_source__"
_ADD_TARGETS = {operator.add, torch.add}
_MUL_TARGETS = {operator.mul, torch.mul}


def is_add(node: fx.Node) -> bool:
    """``a + b`` without ``alpha``/``out`` keywords, as a function or a method."""
    if node.kwargs:
        return False
    if node.op == "call_function" and node.target in _ADD_TARGETS:
        return len(node.args) == 2
    return node.op == "call_method" and node.target in ("add", "__add__") and len(node.args) == 2


def is_mul(node: fx.Node) -> bool:
    if node.kwargs:
        return False
    if node.op == "call_function" and node.target in _MUL_TARGETS:
        return len(node.args) == 2
    return node.op == "call_method" and node.target in ("mul", "__mul__") and len(node.args) == 2


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Data-flow graph: an edge from every node to each of its users."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


def data_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes reachable from a placeholder (their values depend on the network's inputs)."""
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


@dataclasses.dataclass
class SumChain:
    """A left-deep chain of adds: ``((t0 + t1) + t2) + ...``; ``root`` is the last add."""

    root: fx.Node
    adds: list[fx.Node]  # head first
    terms: list[Any]  # nodes or python numbers, in order


def sum_chains(graph: fx.Graph) -> list[SumChain]:
    """Every maximal left-deep add chain of the graph, in topological order of their roots."""

    def python_sum(node: Any) -> bool:  # node ends a chain that starts ``0 + t0``, as sum(...) records
        if not isinstance(node, fx.Node) or not is_add(node):
            return False
        while isinstance(node.args[0], fx.Node) and is_add(node.args[0]):
            node = node.args[0]
        return isinstance(node.args[0], (int, float)) and node.args[0] == 0

    def continues(node: fx.Node) -> bool:  # node is an inner link of a longer chain
        if len(node.users) != 1:
            return False
        user = next(iter(node.users))
        # ``sum(a) + sum(b)``: the outer add joins two whole sums, it does not extend the first
        return is_add(user) and user.args[0] is node and not (python_sum(node) and python_sum(user.args[1]))

    chains = []
    for node in graph.nodes:
        if not is_add(node) or continues(node):
            continue
        adds = [node]
        while isinstance(adds[-1].args[0], fx.Node) and is_add(adds[-1].args[0]) and continues(adds[-1].args[0]):
            adds.append(adds[-1].args[0])
        adds.reverse()
        terms = [adds[0].args[0]] + [a.args[1] for a in adds]
        chains.append(SumChain(node, adds, terms))
    return chains


@dataclasses.dataclass
class Candidate:
    """One weighted term ``weight * output`` of a mixed edge."""

    mul: fx.Node
    weight: fx.Node
    output: fx.Node
    branch: list[fx.Node]  # nodes between the edge input (exclusive) and output (inclusive), topo order

    @property
    def is_identity(self) -> bool:
        return not self.branch

    def describe(self, gm: fx.GraphModule | None = None) -> str:
        if not self.branch:
            return "identity"
        return ">".join(primitive_name(n, gm) for n in self.branch)


@dataclasses.dataclass
class MixedEdge:
    """``y = sum_k w_k * op_k(x)`` found in the graph."""

    chain: SumChain
    input: fx.Node
    candidates: list[Candidate]
    other_terms: list[Any]  # unweighted terms of the chain (the 0 that ``sum`` starts from, ...)
    cell: str = ""

    @property
    def join(self) -> fx.Node:
        return self.chain.root

    @property
    def name(self) -> str:
        return f"{self.input.name}->{self.join.name}"

    @property
    def members(self) -> set[fx.Node]:
        """Every node of its candidate branches, its weighted terms and its join's adds."""
        return {n for c in self.candidates for n in (*c.branch, c.mul)} | set(self.chain.adds)

    @property
    def scope(self) -> list[str]:
        """Common module-path prefix of the candidates' modules (the edge's own module)."""
        paths = [n.target.split(".") for c in self.candidates for n in c.branch if n.op == "call_module"]
        if not paths:
            stack = list(self.join.meta.get("nn_module_stack", {}).keys())
            return stack[-1].split(".") if stack else []
        return os.path.commonprefix(paths)


@dataclasses.dataclass
class Topology:
    graph: fx.Graph
    nx_graph: nx.DiGraph
    edges: list[MixedEdge]
    node_joins: list[SumChain]

    def edges_by_input(self) -> dict[fx.Node, list[MixedEdge]]:
        groups: dict[fx.Node, list[MixedEdge]] = defaultdict(list)
        for edge in self.edges:
            groups[edge.input].append(edge)
        return dict(groups)

    def cells(self) -> dict[str, list[MixedEdge]]:
        groups: dict[str, list[MixedEdge]] = defaultdict(list)
        for edge in self.edges:
            groups[edge.cell].append(edge)
        return dict(groups)

    def owners(self) -> dict[str, set[str]]:
        """For each node name of a candidate branch, weighted term or join: the labels (``cell/input->join``)
        of the innermost mixed edges it belongs to -- the edges a rewrite of that node rewrote (a ReLU
        shared by sibling edges: both; a layer's node inside a depth choice's candidate: the layer's)."""
        nodes = [edge.members for edge in self.edges]
        holders: dict[fx.Node, list[int]] = defaultdict(list)
        for i, members in enumerate(nodes):
            for node in members:
                holders[node].append(i)
        label = [f"{e.cell}/{e.name}" if e.cell else e.name for e in self.edges]
        return {node.name: {label[i] for i in held if not any(j != i and self.edges[j].join in nodes[i] for j in held)}
                for node, held in holders.items()}


def primitive_name(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        ks = getattr(mod, "kernel_size", None)
        if isinstance(ks, tuple):
            return f"{type(mod).__name__}{ks[0]}x{ks[1]}"
        return type(mod).__name__
    if node.op == "call_module":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def architecture_factor(node: Any, data: set[fx.Node]) -> bool:
    """A one-element tensor that does not depend on the network's inputs."""
    if not isinstance(node, fx.Node) or node in data:
        return False
    value = value_of(node)
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()


def weighted_term(term: Any, data: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """``(weight, output)`` if ``term`` is ``w * b`` with w an architecture factor and b data of the product's shape."""
    if not isinstance(term, fx.Node) or not is_mul(term) or len(term.users) != 1:
        return None
    a, b = term.args
    for weight, out in ((a, b), (b, a)):
        if architecture_factor(weight, data) and isinstance(out, fx.Node) and out in data:
            if shape_of(out) is not None and shape_of(out) == shape_of(term):
                return weight, out
    return None


_INDEXING = {operator.getitem, torch.select}


def weight_provenance(weight: fx.Node) -> tuple[fx.Node | None, int | None]:
    """``(row, k)`` when the one-element ``weight`` is element ``k`` of the architecture vector
    ``row`` (``w[k]``, ``torch.select``, ``w.unbind()[k]``, then any one-input scalar ops:
    ``w[k] * 2``, ``w[k].squeeze()``); ``(None, None)`` when it is not read out of a vector.

    Two weighted terms belong to one mixed edge only if they index one row at different k: that is
    what keeps two edges whose terms land in one sum (a node sum after zero elimination, a
    ``functools.reduce`` chain running into the node's ``s = s + t``) apart.
    """
    node: Any = weight
    while isinstance(node, fx.Node):
        inputs = node.all_input_nodes
        if node.op == "call_function" and node.target in _INDEXING and isinstance(node.args[-1], int) and inputs:
            row = node.args[0]
            if row.op == "call_method" and row.target == "unbind" or (
                    row.op == "call_function" and row.target is torch.unbind):
                row = row.args[0]  # w.unbind()[k] reads element k of w
            value = value_of(row)
            if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() > 1:
                return _unsliced(row, node.args[-1] % value.numel())
            return None, None
        if len(inputs) != 1 or not isinstance(value_of(inputs[0]), torch.Tensor) or value_of(inputs[0]).numel() != 1:
            return None, None
        node = inputs[0]
    return None, None


def _unsliced(row: fx.Node, k: int) -> tuple[fx.Node, int]:
    """``(base, j)`` for element ``k`` of ``row`` read through 1-D slices of ``base`` (``w[1:][k]`` is
    ``w[1 + k]``: a weighted-sum helper that zips ``items[1:]`` with ``weights[1:]`` after taking
    ``weights[0]`` apart), so every term of the edge names the one row it indexes."""
    while row.op == "call_function" and row.target is operator.getitem and isinstance(row.args[1], slice) \
            and isinstance(row.args[0], fx.Node):
        base = value_of(row.args[0])
        if not isinstance(base, torch.Tensor) or base.dim() != 1:
            break
        start, _, step = row.args[1].indices(base.numel())
        row, k = row.args[0], start + k * step
    return row, k


def _stateless_config(node: fx.Node) -> Any:
    """The configuration by which prefix sharing merges a stateless module call (the softmax module
    of one cell and of another, on one shared architecture row), or None; None where the node's
    graph has no owning module to look the module up in."""

    gm = node.graph.owning_module
    if gm is None:
        return None
    try:
        return stateless_module_key(node, gm)
    except AttributeError:  # a target the owning module does not hold
        return None


class ValueNumbering:
    """Value numbering: equal numbers for nodes that compute the same value from the same attributes
    and inputs (``w[0]`` written twice is one row, and stays one after prefix sharing merges it).
    Stateless module calls (no parameters or buffers, a known configuration: ``nn.Softmax(-1)``) number
    by their configuration and arguments, as prefix sharing merges them: two cells' softmax modules on
    one shared architecture row are one row.  Other module calls, random draws, in-place writes and
    values written in place are each their own value (two Gumbel draws of one expression are two rows),
    named by their node: one instance numbers several copies of a graph consistently (the graph as
    captured, its rewritten and copied versions).
    """

    def __init__(self) -> None:
        self._table: dict[tuple, int] = {}
        self._nodes: dict[fx.Node, int] = {}

    def __call__(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return repr(node)
        if node not in self._nodes:
            if node.op in ("get_attr", "placeholder"):
                key: tuple = (node.op, str(node.target))
            elif draws(node) or mutates(node) or any(mutates(u) for u in node.users):
                key = ("unique", node.name)
            elif node.op == "call_module":
                config = _stateless_config(node)
                key = ("unique", node.name) if config is None else (
                    "call_module", config, repr(fx.node.map_aggregate((node.args, tuple(sorted(node.kwargs.items()))), self)))
            else:
                target = node.target if isinstance(node.target, str) else \
                    f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', node.target)}"
                key = (node.op, target, repr(fx.node.map_aggregate((node.args, tuple(sorted(node.kwargs.items()))), self)))
            self._nodes[node] = self._table.setdefault(key, len(self._table))
        return self._nodes[node]


def _edge_groups(weighted: list[tuple[Any, tuple[fx.Node, fx.Node]]], number: ValueNumbering) -> list[list]:
    """The weighted terms of one sum, split into mixed edges by the provenance of their weights:
    terms indexing one row (by value) at distinct positions form one group.  Terms whose weights are
    not read out of a vector form one group only when no term of the sum is (per-op scalars)."""
    by_row: dict[Any, list] = defaultdict(list)
    loose = []
    for term, wt in weighted:
        row, k = weight_provenance(wt[0])
        (by_row[number(row)] if row is not None else loose).append((term, wt, k))
    groups = [g for g in by_row.values() if len({k for *_, k in g}) == len(g)]
    if loose and not by_row:
        groups.append(loose)
    return [[(term, wt) for term, wt, _ in g] for g in groups if len(g) >= 2]


def _nearest_common_dominator(idom: dict, nodes: Iterable[fx.Node]) -> Any:
    chains = []
    for n in nodes:
        chain = [n]
        while chain[-1] in idom and idom[chain[-1]] is not chain[-1]:
            chain.append(idom[chain[-1]])
        chains.append(chain)
    common = set(chains[0]).intersection(*map(set, chains[1:]))
    return next((c for c in chains[0] if c in common), None)


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


def _submodule(root: torch.nn.Module, path: list[str]) -> torch.nn.Module | None:
    try:
        return root.get_submodule(".".join(path))
    except AttributeError:
        return None


def _assign_cells(edges: list[MixedEdge], root: torch.nn.Module | None) -> None:
    """Cell = the longest module prefix an edge shares with another edge, minus module containers."""
    scopes = [e.scope for e in edges]
    for i, edge in enumerate(edges):
        shared = [os.path.commonprefix([scopes[i], other]) for j, other in enumerate(scopes) if j != i]
        best: list[str] = max(shared, key=len, default=[])
        while best and root is not None and isinstance(_submodule(root, best), _CONTAINERS):
            best = best[:-1]
        edge.cell = ".".join(best)


Terms = Callable[[Any, set[fx.Node]], "tuple[fx.Node, fx.Node] | None"]  # a sum's term -> (weight, output)


def analyze(graph: fx.Graph, root: torch.nn.Module | None = None, terms: Terms = weighted_term) -> Topology:
    """Find the mixed edges, node joins and cells of a captured graph; ``terms`` reads a sum's weighted
    terms (products; ``topofx.sparse.weighted_or_gated`` reads gates too, for the report)."""
    g = to_networkx(graph)
    data = data_dependent(graph)
    flow = g.subgraph(data).copy()
    flow.add_node(_SOURCE)
    for node in graph.nodes:
        if node.op == "placeholder":
            flow.add_edge(_SOURCE, node)
    idom = nx.immediate_dominators(flow, _SOURCE)

    proposals: list[tuple[SumChain, fx.Node, list[Candidate], list[Any]]] = []
    number = ValueNumbering()
    for chain in sum_chains(graph):
        weighted = [(term, wt) for term in chain.terms if (wt := terms(term, data))]
        for group in _edge_groups(weighted, number):
            outputs = [wt[1] for _, wt in group]
            x = _nearest_common_dominator(idom, outputs)
            if x is None or x == _SOURCE:
                continue
            from_x = nx.descendants(flow, x)
            candidates = []
            for term, (weight, out) in group:
                branch = (nx.ancestors(flow, out) | {out}) & from_x if out is not x else set()
                candidates.append(Candidate(term, weight, out, sorted(branch, key=_order(graph))))
            members = {term for term, _ in group}
            proposals.append((chain, x, candidates, [t for t in chain.terms if t not in members]))

    joins = {chain.root for chain, *_ in proposals}
    # only the terms of proposed edges are weights: a lone product by a constant scalar inside an operation
    # (noise scaled by a decay rate the model keeps as a float) is part of that operation
    weighted_muls = {c.mul for _, _, candidates, _ in proposals for c in candidates}
    edges, node_joins = [], []
    for chain, x, candidates, others in proposals:
        inner = set().union(*(set(c.branch) for c in candidates))
        # a candidate that contains another join or another weighted term is a whole sub-network
        # (a node of the cell), not an operation: this sum joins nodes, not candidates -- unless the
        # candidates run on from one another (a depth choice), which no sum over a cell's edges does
        if (inner & (joins - {chain.root}) or inner & weighted_muls) and not _nested(candidates):
            node_joins.append(chain)
        else:
            edges.append(MixedEdge(chain, x, candidates, others))
    _assign_cells(edges, root)
    return Topology(graph, g, edges, node_joins)


def _nested(candidates: list[Candidate]) -> bool:
    """Each candidate's output lies on the branch of the next deeper one: the candidates are the
    outputs after 1, 2, ... blocks of one stack (a searchable depth), the shallowest possibly the
    edge input itself.  A cell's node sum never is: its edges' outputs feed only the sum."""
    by_depth = sorted(candidates, key=lambda c: len(c.branch))
    return all(shallow.output in deep.branch or shallow.is_identity for shallow, deep in zip(by_depth, by_depth[1:]))


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__
