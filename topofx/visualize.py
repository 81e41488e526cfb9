"""Before/after pictures of a simplified supernet (graphviz).

``visualize(simplified, out_dir)`` writes ``before.<fmt>`` / ``after.<fmt>`` and their DOT sources
``before.dot`` / ``after.dot``:

* the *before* graph is the unmodified supernet, re-captured with :func:`topofx.capture.trace`;
  the *after* graph is ``simplified.graph_module``;
* one cluster per cell, one per mixed edge inside it (found by :func:`topofx.topology.analyze`) and
  one per candidate inside the edge, so the candidates of an edge stand side by side;
* nodes are labelled by primitive (``Conv2d 3x3``, ``BatchNorm2d``, ``ReLU``, ``AvgPool2d 3x3``,
  ``mul``, ``add``); data edges carry the tensor shape;
* architecture weights are not drawn as nodes: a product with one is labelled ``mul·w``;
* rewritten nodes are coloured by the action that touched them (before: the nodes a rewrite
  removed, shared away or fused; after: the nodes that now compute the result), nodes that dead-code
  elimination dropped are dashed, nodes a pass inserted are pale yellow; a legend explains them.

By default only the first cell that has mixed edges is drawn (with its inputs): a NAS supernet
repeats the same cell many times and a whole-network picture of thousands of nodes is unreadable.
``cell="cells.3"`` draws that cell, ``cell="all"`` the whole network (with ``collapse_repeated`` the
later cells of an already drawn type are one box each).

Without the ``dot`` program only the ``.dot`` files are written and one line says how to get it.
"""
from __future__ import annotations

import operator
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from .capture import CaptureError, trace
from .ir import VALUE
from .topology import Topology, analyze, data_dependent, is_add, is_mul

__all__ = ["visualize", "VisualizeResult", "ACTION_COLORS", "DOT_MISSING_HINT"]

#: fill colour per rewrite action (also used in the legend)
ACTION_COLORS = {
    "canonical": "#c7e9c0",
    "removed": "#fc9272",
    "shared": "#9ecae1",
    "fused": "#fdae6b",
    "floated": "#bcbddc",
    "merged": "#a1d99b",
    "layout": "#d9d9d9",
}
_DEAD_COLOR = "#f4f4f4"
_NEW_COLOR = "#ffffb3"
_PLAIN_COLOR = "#ffffff"
_APPROX_BORDER = "#c0392b"

_LEGEND = {
    "before": {
        "canonical": "canonical: join written other than as a + chain (stack reduced, einsum, add_)",
        "removed": "removed: zero term dropped from its sum",
        "shared": "shared: duplicate, now computed once",
        "fused": "fused: computed by one call with others (convs/BNs, folded weight, pooling)",
        "floated": "floated: BN moved past the weighted join",
        "merged": "merged into one kernel-normalized conv",
        "layout": "layout: runs channels-last on the CPU (graph input or depthwise conv)",
        "dead": "gone: dead after a rewrite",
    },
    "after": {
        "canonical": "canonical: the join as a + chain of weighted terms",
        "removed": "removed: sum without its zero terms",
        "shared": "shared: computed once, used by all",
        "fused": "fused: one call (concatenated convs/BNs, folded weights, recomputed pooling)",
        "floated": "floated BN after the weighted join",
        "merged": "merged conv (kernel-normalized, computed each step)",
        "layout": "layout: channels-last on the CPU (graph input or depthwise conv)",
        "new": "new: inserted by a pass (slice, sum, ...)",
    },
}

DOT_MISSING_HINT = (
    "topofx: the graphviz `dot` program is not installed, so only {files} were written; "
    "install it (`apt-get install graphviz`, `brew install graphviz` or `conda install graphviz`) "
    "and rerun, or run `dot -T{fmt} before.dot -o before.{fmt}`"
)

_FORMATS = ("svg", "png", "pdf", "jpg", "jpeg", "gif", "ps", "eps", "webp", "bmp", "tiff", "json", "plain")


class VisualizeResult(dict):
    """``{file name: Path}`` of the written files, plus a one-line-per-file :meth:`summary`."""

    def __init__(self, paths: dict[str, Path], lines: list[str], rendered: bool):
        super().__init__(paths)
        self.lines = lines
        self.rendered = rendered

    def summary(self) -> str:
        return "\n".join(self.lines)


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------
def _pair(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "x".join(str(int(x)) for x in v)
    return f"{v}x{v}"


def _first(v: Any) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def _module_label(mod: nn.Module) -> str:
    name = type(mod).__name__
    convs = getattr(mod, "convs", None)
    if isinstance(convs, nn.ModuleList) and len(convs) and isinstance(convs[0], nn.Conv2d):
        sizes = sorted({_pair(c.kernel_size) for c in convs})
        chans = "+".join(str(c.out_channels) for c in convs)
        return f"{name} {'/'.join(sizes)} x{len(convs)}\\n{chans} ch"
    sizes, kernel = getattr(mod, "sizes", None), getattr(mod, "kernel", None)
    if isinstance(sizes, (list, tuple)) and sizes and all(isinstance(s, int) for s in sizes) and kernel is not None:
        edges = f"{len(sizes)} edges" if len(sizes) > 1 else "1 edge"
        return f"{name} {_pair(kernel)}\\n{edges}, {'+'.join(map(str, sizes))} candidates"
    bns = getattr(mod, "bns", None)
    if isinstance(bns, nn.ModuleList) and len(bns):
        return f"{name} x{len(bns)}\\n" + "+".join(str(getattr(b, 'num_features', '?')) for b in bns) + " ch"
    if isinstance(mod, nn.modules.conv._ConvNd):
        extras = []
        if any(s != 1 for s in mod.stride):
            extras.append(f"s{mod.stride[0]}")
        if any(d != 1 for d in mod.dilation):
            extras.append(f"d{mod.dilation[0]}")
        if mod.groups > 1:
            extras.append("dw" if mod.groups == mod.in_channels else f"g{mod.groups}")
        return " ".join([f"{name} {_pair(mod.kernel_size)}"] + extras)
    if isinstance(mod, (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)):
        stride = getattr(mod, "stride", 1)
        s = f" s{_first(stride)}" if stride is not None and _first(stride) != 1 else ""
        return f"{name} {_pair(mod.kernel_size)}{s}"
    if isinstance(mod, nn.Linear):
        return f"{name} {mod.in_features}→{mod.out_features}"
    return name


def _channel_slice(index: Any) -> str | None:
    if isinstance(index, tuple) and len(index) >= 2 and all(i == slice(None) for i in index[:1]):
        s = index[1]
        if isinstance(s, slice) and s.step is None and len(index) == 2:
            return f"slice ch {s.start or 0}:{s.stop}"
    return None


def _function_label(node: fx.Node, weighted: bool) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    name = name.strip("_") or name
    if node.op == "call_function" and target is operator.getitem:
        idx = node.args[1] if len(node.args) > 1 else None
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_method" and src.target == "split" and isinstance(idx, int):
            widths = src.args[1] if len(src.args) > 1 else None
            if isinstance(widths, (list, tuple)) and idx < len(widths):  # a channel block of a split
                start = sum(widths[:idx])
                return f"slice ch {start}:{start + widths[idx]}"
        return _channel_slice(idx) or (f"getitem [{idx}]" if isinstance(idx, int) else "getitem")
    if is_mul(node) or name in ("mul", "imul"):
        consts = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if weighted:
            return "mul·w"
        if consts:
            return f"mul {consts[0]:g}"
        return "mul"
    if is_add(node) or name in ("add", "iadd"):
        return "add"
    return name


def _shape(node: fx.Node) -> str:
    value = node.meta.get(VALUE)
    if isinstance(value, torch.Tensor):
        return "x".join(str(int(d)) for d in value.shape) or "scalar"
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return "(" + ", ".join("x".join(str(int(d)) for d in v.shape) for v in value) + ")"
    return ""


# ---------------------------------------------------------------------------------------------
# what belongs where
# ---------------------------------------------------------------------------------------------
def _module_paths(node: fx.Node) -> list[str]:
    paths = list(node.meta.get("nn_module_stack", {}) or {})
    if node.op == "call_module":
        paths.append(str(node.target))
    return paths


def _cell_by_meta(node: fx.Node, cells: Sequence[str]) -> str | None:
    best = None
    for path in _module_paths(node):
        for cell in cells:
            if cell and (path == cell or path.startswith(cell + ".")) and (best is None or len(cell) > len(best)):
                best = cell
    return best


def _edge_title(edge, cell: str, gm: fx.GraphModule) -> str:
    has_modules = any(n.op == "call_module" for c in edge.candidates for n in c.branch)
    scope = ".".join(edge.scope) if has_modules else ""
    if cell and scope.startswith(cell + "."):
        scope = scope[len(cell) + 1:]
    where = f"{edge.input.name} → {edge.join.name}"
    name = f"edge {scope}" if scope else f"edge {where}"
    return name, f"{name}: {len(edge.candidates)} candidates ({where})"


class _Layout:
    """Per node (by name): cell, mixed edge index, candidate index."""

    def __init__(self) -> None:
        self.cell: dict[str, str | None] = {}
        self.edge: dict[str, int | None] = {}
        self.cand: dict[str, int | None] = {}


def _before_layout(gm: fx.GraphModule, topo: Topology, cells: list[str]) -> _Layout:
    lay = _Layout()
    edge_cell = {}
    for i, edge in enumerate(topo.edges):
        edge_cell[i] = edge.cell
        for k, cand in enumerate(edge.candidates):
            for n in cand.branch + [cand.mul]:
                lay.edge.setdefault(n.name, i)
                lay.cand.setdefault(n.name, k)
        for a in edge.chain.adds:
            lay.edge[a.name] = i
    for node in gm.graph.nodes:
        if node.name in lay.edge:
            lay.cell[node.name] = edge_cell[lay.edge[node.name]] or _cell_by_meta(node, cells)
        else:
            lay.cell[node.name] = _cell_by_meta(node, cells)
    return lay


def _weight_map(topo: Topology) -> dict[str, int]:
    """Architecture-weight node name -> position of the edge it weights inside its cell.

    A position, not an edge: passes may share one weight node among the cells that read the same
    architecture parameter (NAS-Bench-201 cells all index one ``softmax(alpha)``).
    """
    out: dict[str, int] = {}
    position: Counter = Counter()
    for edge in topo.edges:
        j = position[edge.cell]
        position[edge.cell] += 1
        for cand in edge.candidates:
            out.setdefault(cand.weight.name, j)
    return out


def _after_layout(
    gm: fx.GraphModule, before: _Layout, cells: list[str], data: set[fx.Node], weights: dict[str, int],
    topo: Topology, result_cells: dict[str, str],
) -> _Layout:
    """Place the rewritten graph's nodes in cells / edges / candidates.

    Nodes that kept their name keep their cell; inserted nodes take the cell of the rewrite that
    made them, of their module, or of their inputs.  Edges are anchored by the architecture weights a
    node consumes (a product ``w * b`` or a merged module taking weights belongs to the edge those
    weights mix; weights of several edges make it cell-level); a sum belongs to an edge when all its
    inputs do, any other node when all its users do.  What spans edges (a ReLU or pooling shared by
    several edges, a fused or merged convolution and the sums its slices join) stays at cell level.
    """
    lay = _Layout()
    nodes = list(gm.graph.nodes)
    cache: dict[str, frozenset] = {}
    edge_cells = {i: e.cell for i, e in enumerate(topo.edges)}
    edge_inputs = {e.input.name for e in topo.edges}
    cell_edges: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(topo.edges):
        cell_edges[e.cell].append(i)

    def weight_edges(node: fx.Node) -> frozenset:
        if node.name in weights:
            return frozenset({weights[node.name]})
        if node.name not in cache:
            cache[node.name] = frozenset()  # guards cycles (there are none in a DAG)
            acc: set[int] = set()
            for a in node.all_input_nodes:
                if a not in data:
                    acc |= weight_edges(a)
            cache[node.name] = frozenset(acc)
        return cache[node.name]

    anchors: dict[str, frozenset] = {}
    for node in nodes:
        if node in data and node.op not in ("placeholder", "output"):
            w = frozenset().union(*(weight_edges(a) for a in node.all_input_nodes if a not in data))
            if w:
                anchors[node.name] = w

    # cells
    for node in nodes:
        if node.name in before.cell:
            lay.cell[node.name] = before.cell[node.name]
            continue
        cell = result_cells.get(node.name) or _cell_by_meta(node, cells)
        if cell is None:
            known = [lay.cell.get(a.name) for a in node.all_input_nodes if a in data]
            known = [c for c in known if c]
            cell = known[-1] if known else None
        lay.cell[node.name] = cell
    for node in reversed(nodes):  # inserted nodes still unplaced: the users' cell, when they agree
        if node.name not in before.cell and lay.cell.get(node.name) is None and node in data:
            users = {lay.cell.get(u.name) for u in node.users} - {None}
            if len(users) == 1:
                lay.cell[node.name] = users.pop()

    # edges
    CELL = -1
    edge_of: dict[str, int] = {}
    for node in nodes:
        w = anchors.get(node.name)
        if w and node in data and len(w) == 1 and before.edge.get(node.name) is not None:
            edge_of[node.name] = before.edge[node.name]  # a product w * b that survived: its own edge
        elif w and node in data:
            local = cell_edges.get(lay.cell.get(node.name) or "", [])
            edges = {local[j] for j in w if j < len(local)}
            edge_of[node.name] = edges.pop() if len(edges) == 1 else CELL
    changed = True
    while changed:  # a sum joins an edge when all its inputs did; a node, when all its users did
        changed = False
        for node in nodes:
            if node in data and node.name not in edge_of and is_add(node):
                ins = [edge_of.get(a.name) for a in node.all_input_nodes if a in data]
                if ins and ins[0] is not None and ins[0] != CELL and all(e == ins[0] for e in ins):
                    edge_of[node.name] = ins[0]
                    changed = True
        for node in reversed(nodes):
            if (node not in data or node.name in edge_of or node.op in ("placeholder", "output")
                    or is_add(node) or node.name in edge_inputs):
                continue
            users = [edge_of.get(u.name) for u in node.users]
            if users and users[0] is not None and users[0] != CELL and all(u == users[0] for u in users):
                edge_of[node.name] = users[0]
                changed = True
    for name, e in edge_of.items():
        if e != CELL and (edge_cells.get(e) or None) != lay.cell.get(name):
            edge_of[name] = CELL  # never draw an edge cluster across cells
    lay.edge = {n: (e if e != CELL else None) for n, e in edge_of.items()}
    lay.cand = {n: before.cand.get(n) for n, e in lay.edge.items() if e is not None and before.edge.get(n) == e}
    return lay


def _cell_type(root: nn.Module, cell: str, edges: list, gm: fx.GraphModule) -> tuple:
    try:
        mod = root.get_submodule(cell)
    except AttributeError:
        mod = None
    ops = tuple(sorted({c.describe(gm) for e in edges for c in e.candidates}))
    return (type(mod).__name__, len(edges), getattr(mod, "reduction", None), ops)


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def _digraph(title: str):
    import graphviz

    g = graphviz.Digraph("topofx", format="svg")
    g.attr(rankdir="TB", newrank="true", compound="true", nodesep="0.12", ranksep="0.28",
           fontname="Helvetica", fontsize="14", label=title, labelloc="t", labeljust="l")
    g.attr("node", fontname="Helvetica", fontsize="10", shape="box", style="rounded,filled",
           fillcolor=_PLAIN_COLOR, height="0.3", margin="0.08,0.03", penwidth="1")
    g.attr("edge", fontname="Helvetica", fontsize="7", fontcolor="#666666", arrowsize="0.5",
           color="#555555")
    return g


def _node_attrs(node: fx.Node, gm: fx.GraphModule, data: set[fx.Node], fill: str, dashed: bool) -> dict:
    weighted = any(isinstance(a, fx.Node) and a not in data for a in node.all_input_nodes)
    attrs: dict[str, str] = {"fillcolor": fill, "tooltip": f"{node.name}: {node.format_node()[:160]}"}
    if node.op == "call_module":
        try:
            label = _module_label(gm.get_submodule(node.target))
        except AttributeError:
            label = str(node.target)
        if weighted:
            label += " ·w"
    elif node.op == "placeholder":
        label, attrs["shape"] = f"input {node.name}", "invhouse"
    elif node.op == "output":
        label, attrs["shape"] = "output", "house"
    elif node.op == "get_attr":
        label = f"get_attr {node.target}"
    else:
        label = _function_label(node, weighted)
        if label in ("add", "mul", "mul·w") or label.startswith("mul "):
            attrs.update(shape="ellipse", fontsize="8", height="0.22", width="0.4", margin="0.02,0.01")
        elif label.startswith("slice") or label.startswith("getitem"):
            attrs.update(fontsize="8", height="0.2", margin="0.04,0.01")
    attrs["label"] = label
    if dashed:
        attrs["style"] = "rounded,filled,dashed"
        attrs["fontcolor"] = "#888888"
        attrs["color"] = "#999999"
    return attrs


def _draw(
    gm: fx.GraphModule,
    *,
    which: str,
    title: str,
    layout: _Layout,
    edges_meta: dict[int, tuple[str, str]],
    selection: list[str] | None,
    collapsed: dict[str, str],
    colour: dict[str, str],
    dead: set[str],
    new: set[str],
    approx: set[str] = frozenset(),
):
    """Build the graphviz Digraph; returns (digraph, size stats, highlight counts)."""
    g = _digraph(title)
    graph = gm.graph
    data = data_dependent(graph)
    data |= {n for n in graph.nodes if n.op == "output"}
    nodes = [n for n in graph.nodes if n in data]
    sel = set(selection) if selection is not None else None
    if sel is not None:
        visible = [n for n in nodes if layout.cell.get(n.name) in sel]
    else:
        visible = nodes
    visible_set = set(visible)

    def gid(n: fx.Node) -> str:  # graph node id; a collapsed cell is one node
        c = layout.cell.get(n.name)
        return f"collapsed__{c}" if c in collapsed else n.name

    # clusters: cell -> edge -> candidate -> [node ids]
    tree: dict[Any, dict[Any, dict[Any, list[fx.Node]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    order_cells: list[Any] = []
    for n in visible:
        c = layout.cell.get(n.name)
        if c in collapsed:
            continue
        e = layout.edge.get(n.name)
        k = layout.cand.get(n.name) if e is not None else None
        if c not in order_cells:
            order_cells.append(c)
        tree[c][e][k].append(n)

    stats = Counter()
    actions = Counter()

    def add_node(sub, n: fx.Node) -> None:
        fill, dashed = _PLAIN_COLOR, False
        if n.name in colour:
            fill = ACTION_COLORS.get(colour[n.name], _PLAIN_COLOR)
            actions[colour[n.name]] += 1
        elif n.name in dead:
            fill, dashed = _DEAD_COLOR, True
            actions["dead"] += 1
        elif n.name in new:
            fill = _NEW_COLOR
            actions["new"] += 1
        attrs = _node_attrs(n, gm, data, fill, dashed)
        if n.name in approx:
            attrs.update(color=_APPROX_BORDER, penwidth="2.5")
            actions["approximate"] += 1
        sub.node(n.name, **attrs)
        stats["nodes"] += 1

    def add_edges(parent, edges) -> None:
        for e, cands in edges.items():
            if e is None:
                for n in cands[None]:
                    add_node(parent, n)
                continue
            label, _ = edges_meta.get(e, (f"edge {e}", ""))
            with parent.subgraph(name=f"cluster_edge_{e}") as eg:
                eg.attr(label=label, style="rounded,filled", fillcolor="#f7f9fc", color="#9bb3cf",
                        penwidth="1", fontsize="9", fontcolor="#36577d", labeljust="l")
                stats["edges"] += 1
                for k, members in cands.items():
                    if k is None:
                        for n in members:
                            add_node(eg, n)
                        continue
                    with eg.subgraph(name=f"cluster_cand_{e}_{k}") as kg:
                        kg.attr(label="", style="rounded,dashed", color="#c8d3e0", penwidth="0.7")
                        for n in members:
                            add_node(kg, n)

    for c in order_cells:
        if c is None:  # outside every cell (stem, head; edges of a network without cells)
            add_edges(g, tree[c])
            continue
        with g.subgraph(name=f"cluster_cell_{c}") as cg:
            cg.attr(label=f"cell {c}", style="rounded", color="#3b6ea5", penwidth="2", fontsize="13",
                    fontcolor="#3b6ea5", labeljust="l")
            stats["cells"] += 1
            add_edges(cg, tree[c])

    for c, rep in collapsed.items():
        if sel is not None and c not in sel:
            continue
        if any(layout.cell.get(n.name) == c for n in visible):
            g.node(f"collapsed__{c}", label=f"cell {c}\\n(same type as {rep}: not expanded)",
                   shape="box3d", style="filled", fillcolor="#e8eef6", color="#3b6ea5", fontsize="11")
            stats["collapsed"] += 1

    # external inputs of a one-cell view, and where the cell's results go
    external: dict[str, fx.Node] = {}
    sinks = False
    drawn_edges: set[tuple[str, str]] = set()
    labelled: set[str] = set()
    for n in visible:
        for a in n.all_input_nodes:
            if a not in data:
                continue
            if a not in visible_set:
                external.setdefault(a.name, a)
            src, dst = (gid(a) if a in visible_set else f"from__{a.name}"), gid(n)
            if src == dst or (src, dst) in drawn_edges:
                continue
            drawn_edges.add((src, dst))
            if src in labelled:  # one shape label per tensor: its first arrow
                g.edge(src, dst, tooltip=_shape(a))
            else:
                labelled.add(src)
                g.edge(src, dst, label=_shape(a))
        if sel is not None and any(u not in visible_set for u in n.users):
            sinks = True
            key = (gid(n), "to__next")
            if key not in drawn_edges:
                drawn_edges.add(key)
                g.edge(gid(n), "to__next", label=_shape(n), style="dashed")
    for name, a in external.items():
        prim = _node_attrs(a, gm, data, _PLAIN_COLOR, False)["label"]
        where = layout.cell.get(name)
        g.node(f"from__{name}", label=f"from {where or 'network'}: {prim}\\n({name})", shape="ellipse",
               style="dashed", color="#777777", fontcolor="#555555", fontsize="9")
    if sinks:
        g.node("to__next", label="to the rest of the network", shape="ellipse", style="dashed",
               color="#777777", fontcolor="#555555", fontsize="9")

    _legend(g, which, actions, actions["approximate"])
    stats["external"] = len(external)
    return g, stats, actions


def _legend(g, which: str, present: Counter, approx: int) -> None:
    """One HTML-table node: only the highlights that occur in this picture, with counts."""
    rows = []
    for key, text in _LEGEND[which].items():
        count = present.get(key, 0)
        if not count:
            continue
        fill = ACTION_COLORS.get(key, _DEAD_COLOR if key == "dead" else _NEW_COLOR)
        font = '<FONT COLOR="#777777">' if key == "dead" else "<FONT>"
        rows.append(f'<TR><TD BGCOLOR="{fill}" ALIGN="LEFT">{font}{_html(text)} ({count})</FONT></TD></TR>')
    if approx:
        rows.append(f'<TR><TD COLOR="{_APPROX_BORDER}" BORDER="2" ALIGN="LEFT">'
                    f'red border: approximate rewrite, vertex-exact ({approx})</TD></TR>')
    if not rows:
        rows.append('<TR><TD ALIGN="LEFT">no rewritten node in this view</TD></TR>')
    rows.append('<TR><TD BORDER="0" ALIGN="LEFT"><FONT POINT-SIZE="8" COLOR="#555555">'
                "mul·w: product with an architecture weight; labels on arrows: tensor shape</FONT></TD></TR>")
    table = ('<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="3" CELLPADDING="4">'
             '<TR><TD BORDER="0" ALIGN="LEFT"><B>legend</B></TD></TR>' + "".join(rows) + "</TABLE>>")
    with g.subgraph(name="cluster_legend") as lg:
        lg.attr(label="", style="rounded", color="#aaaaaa")
        lg.node("legend", label=table, shape="plain", fontsize="9")


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _note_graph(title: str, text: str):
    g = _digraph(title)
    g.node("note", label=text, shape="note", fillcolor="#fff3cd")
    return g


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
def _example_inputs(simplified: Any, example_inputs: Any) -> tuple | None:
    """The inputs to re-capture the original with: the argument, else ``simplified.example_inputs``,
    else zeros shaped like the simplified graph's placeholders."""

    def given(x: Any) -> bool:
        return isinstance(x, torch.Tensor) or (isinstance(x, (tuple, list)) and len(x) > 0)

    inputs = example_inputs if given(example_inputs) else getattr(simplified, "example_inputs", None)
    if given(inputs):
        return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    gm = getattr(simplified, "graph_module", None)
    if gm is not None:
        values = [n.meta.get(VALUE) for n in gm.graph.nodes if n.op == "placeholder"]
        if values and all(isinstance(v, torch.Tensor) for v in values):
            return tuple(torch.zeros(v.shape, dtype=v.dtype) for v in values)
    return None


def visualize(
    simplified: Any,
    out_dir: str | Path,
    fmt: str = "svg",
    *,
    cell: str | None = None,
    collapse_repeated: bool = True,
    example_inputs: Any = None,
) -> VisualizeResult:
    """Write before/after graphs of ``simplified`` (a :class:`~topofx.SimplifiedModule`) to ``out_dir``.

    Args:
        simplified: what :func:`topofx.simplify` returned.
        out_dir: folder for ``before.<fmt>``, ``after.<fmt>``, ``before.dot``, ``after.dot`` (created).
        fmt: any graphviz output format (``svg``, ``png``, ``pdf``, ...).
        cell: ``None`` (default: the first cell that has mixed edges, or the whole network when
            ``collapse_repeated`` is false), a cell name such as ``"cells.3"`` (that cell and its
            inputs), or ``"all"`` (the whole network).
        collapse_repeated: with ``cell="all"``, draw each later cell of an already drawn cell type as
            one box.
        example_inputs: inputs of the model to re-capture the original with (default:
            ``simplified.example_inputs``, else zeros shaped like the simplified graph's inputs).

    Returns:
        ``{file name: path}`` of the files written (only the ``.dot`` files when graphviz's ``dot``
        program is missing); ``.summary()`` gives one line per file.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ValueError(f"unknown picture format {fmt!r}; choose one of {', '.join(_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    original = getattr(simplified, "original", simplified)
    after_gm = getattr(simplified, "graph_module", None)
    report = getattr(simplified, "report", None)
    model_name = type(original).__name__
    mode = getattr(report, "mode", "?")
    inputs = _example_inputs(simplified, example_inputs)
    if inputs is None:
        raise ValueError(
            "visualize() needs the model's example inputs to re-capture the original: "
            "pass example_inputs=(x,)"
        )

    records = list(getattr(report, "rewrites", []) or [])
    before_colour: dict[str, str] = {}
    after_colour: dict[str, str] = {}
    before_approx: set[str] = set()
    after_approx: set[str] = set()
    for r in records:
        for name in r.nodes:
            before_colour[name] = r.action
            if not r.exact:
                before_approx.add(name)
        after_colour[r.result] = r.action
        if not r.exact:
            after_approx.add(r.result)

    notes: dict[str, str] = {}
    graphs: dict[str, Any] = {}
    traced = getattr(simplified, "__dict__", {}).get("relaxed") or original  # an adapter's relaxed forward (GDAS)
    try:
        before_gm = trace(traced, inputs)
    except CaptureError as exc:
        text = f"could not capture {model_name}:\\n{_wrap(str(exc))}"
        graphs["before"] = _note_graph(f"before: {model_name}", text)
        graphs["after"] = _note_graph(f"after: {model_name} (mode={mode})", text)
        notes["before"] = notes["after"] = "capture failed, note only"
    else:
        topo = analyze(before_gm.graph, traced)
        cells_map = topo.cells()
        cells = [c for c in cells_map if c]
        if cell not in (None, "all") and cell not in cells and _is_submodule(traced, cell):
            cells.append(cell)  # a module without mixed edges (a reduction block, the stem): draw it too
        selection, collapsed = _select(cell, collapse_repeated, cells, cells_map, traced, before_gm)
        what = ("whole network" if selection is None else
                f"cell {selection[0]}" + (" (first cell with mixed edges; cell='all' for all)" if cell is None else ""))
        before_lay = _before_layout(before_gm, topo, cells)
        titles = [_edge_title(e, e.cell, before_gm) for e in topo.edges]
        edges_meta = {i: (t[1], e.cell) for i, (t, e) in enumerate(zip(titles, topo.edges))}
        after_meta = {i: (t[0], e.cell) for i, (t, e) in enumerate(zip(titles, topo.edges))}
        fallback = after_gm is None
        after_names = {n.name for n in after_gm.graph.nodes} if after_gm is not None else set()
        before_names = {n.name for n in before_gm.graph.nodes}
        dead = set() if fallback else before_names - after_names - set(before_colour)
        g, stats, acts = _draw(
            before_gm, which="before", title=f"before: {model_name}, {what}", layout=before_lay,
            edges_meta=edges_meta, selection=selection, collapsed=collapsed,
            colour={} if fallback else before_colour, dead=dead, new=set(),
            approx=set() if fallback else before_approx,
        )
        graphs["before"] = g
        notes["before"] = _stats_text(what, stats, acts)
        if fallback:
            reason = getattr(report, "fallback", None) or "no graph"
            title = f"after: {model_name} runs its own eager forward (not captured: {_wrap(reason, 100)})"
            g2, stats2, acts2 = _draw(
                before_gm, which="after", title=title, layout=before_lay, edges_meta=edges_meta,
                selection=selection, collapsed=collapsed, colour={}, dead=set(), new=set(),
            )
            notes["after"] = "eager fallback, unchanged; " + _stats_text(what, stats2, acts2)
        else:
            data = data_dependent(after_gm.graph)
            result_cells = {r.result: r.cell for r in records if getattr(r, "cell", "") in cells}
            after_lay = _after_layout(after_gm, before_lay, cells, data, _weight_map(topo), topo, result_cells)
            new = after_names - before_names - set(after_colour)
            colour = dict(after_colour)
            for node in after_gm.graph.nodes:  # the fused BN right after a fused conv is part of the fusion
                if node.name in new and node.op == "call_module" and node.args:
                    src = node.args[0]
                    if isinstance(src, fx.Node) and colour.get(src.name) == "fused":
                        colour[node.name] = "fused"
                        new.discard(node.name)
            g2, stats2, acts2 = _draw(
                after_gm, which="after", title=f"after: {model_name} (mode={mode}), {what}",
                layout=after_lay, edges_meta=after_meta, selection=selection,
                collapsed=collapsed, colour=colour, dead=set(), new=new, approx=after_approx,
            )
            notes["after"] = _stats_text(what, stats2, acts2)
        graphs["after"] = g2

    paths: dict[str, Path] = {}
    lines: list[str] = []
    for which in ("before", "after"):
        dot_path = out / f"{which}.dot"
        dot_path.write_text(graphs[which].source, encoding="utf-8")
        paths[dot_path.name] = dot_path
    rendered = shutil.which("dot") is not None
    if rendered:
        import graphviz

        try:
            for which in ("before", "after"):
                pic = out / f"{which}.{fmt}"
                pic.write_bytes(graphs[which].pipe(format=fmt))
                paths[pic.name] = pic
                lines.append(f"{pic}: {which}, {notes[which]}")
        except graphviz.ExecutableNotFound:
            rendered = False
    if not rendered:
        for which in ("before", "after"):
            paths.pop(f"{which}.{fmt}", None)
        lines = []
        print(DOT_MISSING_HINT.format(files="before.dot and after.dot", fmt=fmt), file=sys.stderr)
    for which in ("before", "after"):
        dot_path = paths[f"{which}.dot"]
        lines.append(f"{dot_path}: graphviz source of the {which} graph" + ("" if rendered else f", {notes[which]}"))
    return VisualizeResult(paths, lines, rendered)


def _stats_text(what: str, stats: Counter, acts: Counter) -> str:
    parts = [f"{what}: {stats['nodes']} nodes"]
    if stats["edges"]:
        parts.append(f"{stats['edges']} mixed-edge clusters")
    if stats["collapsed"]:
        parts.append(f"{stats['collapsed']} repeated cells collapsed")
    coloured = ", ".join(f"{k} {v}" for k, v in acts.items() if v)
    if coloured:
        parts.append(f"highlighted: {coloured}")
    return "; ".join(parts)


def _wrap(text: str, width: int = 90) -> str:
    text = text.replace("\\", "/").replace('"', "'")
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    lines.append(cur)
    return "\\n".join(lines)


def _is_submodule(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
        return True
    except AttributeError:
        return False


def _select(
    cell: str | None,
    collapse_repeated: bool,
    cells: list[str],
    cells_map: dict[str, list],
    root: nn.Module,
    gm: fx.GraphModule,
) -> tuple[list[str] | None, dict[str, str]]:
    """(cells to draw or None for everything, {collapsed cell: the cell of the same type drawn})."""
    if cell is None:
        if collapse_repeated and cells:
            return [cells[0]], {}
        cell = "all"
    if cell == "all":
        collapsed: dict[str, str] = {}
        if collapse_repeated:
            seen: dict[tuple, str] = {}
            for c in cells:
                key = _cell_type(root, c, cells_map[c], gm)
                if key in seen:
                    collapsed[c] = seen[key]
                else:
                    seen[key] = c
        return None, collapsed
    if cell not in cells:
        known = ", ".join(c for c in cells_map if c) or "none (no mixed edges found)"
        raise ValueError(f"unknown cell {cell!r}; cells with mixed edges: {known}; or cell='all'")
    return [cell], {}
