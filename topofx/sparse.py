"""Sparse execution: compute, on each call, only what the candidates selected for that call need.

A sampled supernet (GDAS, hard Gumbel) runs one candidate per edge and never computes the others.
Its relaxed form -- every candidate times its sampled weight -- has the same value but computes
everything, and gives the unselected weights another gradient.  :func:`gate` states, in a traceable
form, what such code does with one candidate: ``gate(w, op(x))`` is ``w * op(x)`` where ``w`` is not
exactly zero, and where it is, ``op(x)`` is not computed and the term is

* ``dead="weight"``: ``w`` itself, broadcast into the sum (xautodl's NAS-Bench-201 GDAS writes
  ``w[k] * op(x) if k == index else w[k]``: each unselected weight gets the gradient ``sum(dL/dy)``);
* ``dead="nothing"``: no term at all (``op[index](x) * w[index]``, ``if w != 0: s += w * op(x)``).

:class:`SparseForward` runs a rewritten graph whose gates read a *sample* (a tensor attribute set
anew before every call by an adapter's sampling step, ``topofx.adapters``): before the call it reads
which sampled weights are exactly zero (one device sync) and runs a forward generated once from the
graph in which every node is guarded by a liveness flag -- a node runs when a live node needs it;
a dead gate needs only its weight.  The flags are computed once per zero pattern and cached.
Horizontally fused convolutions and their fused batch norm (``passes/horizontal_fusion.py``) compute
only their live channel blocks, so the selected convolutions of all edges leaving one node still run
as one convolution; shared ReLUs and poolings (``passes/prefix_sharing.py``) run once when any
selected candidate needs them.  Unselected candidates' parameters get no gradient (``.grad`` stays
``None``) and their batch norms' statistics do not move: they are not run.
"""
from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.fx as fx

from .capture.decisions import computed_by
from .ir import SPARSE_FORWARD_MARK, Effects, is_decided_gate, is_mutated, is_pure
from .modules import FusedBatchNorm2d, FusedConv2d
from .topology import is_add, weighted_term

DEAD_RULES = ("weight", "nothing")
CHECK_RTOL = 1e-5
PATTERN_CACHE = 4096  # liveness patterns kept per graph (NAS-Bench-201 GDAS has at most 5**6)


def gate(weight: torch.Tensor, term: torch.Tensor, dead: str = "weight") -> torch.Tensor:
    """``weight * term``, where the original code does not compute ``term`` when ``weight`` is exactly
    zero and uses ``weight`` (``dead="weight"``) or nothing (``dead="nothing"``) in its place.

    Called eagerly it is the product (both rules have the product's value at ``weight == 0``); in a
    captured graph it is one node that :class:`SparseForward` skips, with its ``term``, when dead.
    Use it in an adapter's relaxed forward (``topofx.adapters.register_adapter``).
    """
    if dead not in DEAD_RULES:
        raise ValueError(f"gate(dead={dead!r}): choose one of {', '.join(map(repr, DEAD_RULES))}")
    proxy = next((a for a in (term, weight) if isinstance(a, fx.Proxy)), None)
    if proxy is not None:
        return proxy.tracer.create_proxy("call_function", gate, (weight, term), {"dead": dead})
    return weight * term


def is_gate(node: fx.Node) -> bool:
    """An adapter's :func:`gate`, or a gate capture made from the user's own decision
    (:func:`topofx.ir.decided_gate`: weight and term are its first two arguments too)."""
    return (node.op == "call_function" and node.target is gate) or is_decided_gate(node)


def weighted_or_gated(term: Any, data: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """``(weight, term)`` of a gate, else the weighted product ``topology.weighted_term`` reads: a sum's
    terms as the report counts mixed edges (``topology.analyze(..., terms=weighted_or_gated)``); passes
    read products only, so that no rewrite meant for a dense sum touches a gated one."""
    if isinstance(term, fx.Node) and is_gate(term):
        return term.args[0], term.args[1]
    return weighted_term(term, data)


def dead_rule(node: fx.Node) -> str:
    """What a dead gate stands for: its weight, or no term (a decided gate's default: the user's code adds nothing)."""
    return node.kwargs.get("dead", "nothing" if is_decided_gate(node) else "weight")


def gates(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if is_gate(node)]


def gateable(gm: fx.GraphModule, node: fx.Node, sample_names: Sequence[str]) -> bool:
    """A gate on a sampled weight, or on a decision in the graph, whose users only add it (so a dead
    term can be left out or replaced by its weight) and whose sums nothing mutates (a left-out term
    would alias)."""
    return (
        (is_decided_gate(node) or sample_position(gm, node.args[0], sample_names) is not None) and bool(node.users)
        and all(is_add(u) and not is_mutated(u, gm) for u in node.users) and not is_mutated(node, gm)
    )


def sample_position(gm: fx.GraphModule, weight: Any, sample_names: Sequence[str]) -> tuple[str, int] | None:
    """``(sample name, flat index)`` when ``weight`` indexes a sample by constants (``hardwts[e][k]``)."""
    indices = []
    node = weight
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        dynamic: list[fx.Node] = []
        fx.node.map_arg(node.args[1], dynamic.append)
        if dynamic or not isinstance(node.args[0], fx.Node):
            return None
        indices.append(node.args[1])
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node.target not in sample_names:
        return None
    flat = torch.arange(getattr(gm, node.target).numel()).reshape(getattr(gm, node.target).shape)
    for index in reversed(indices):
        flat = flat[index]
    return (node.target, int(flat)) if flat.numel() == 1 else None


def _add_nothing(a: Any, b: Any) -> Any:
    """``a + b`` where a dead ``dead="nothing"`` gate is ``None`` (no term)."""
    return a if b is None else b if a is None else a + b


class _FusedGroup:
    """A :class:`FusedConv2d` (optionally followed by a :class:`FusedBatchNorm2d`), its ``split`` and
    the ``getitem`` of each channel block: the blocks whose getitem is live are computed."""

    def __init__(self, conv: fx.Node, bn: fx.Node | None, split: fx.Node, items: list[fx.Node]):
        self.conv, self.bn, self.split, self.items = conv, bn, split, items
        self.widths = list(split.args[1])

    @staticmethod
    def match(gm: fx.GraphModule, conv: fx.Node) -> "_FusedGroup | None":
        if conv.op != "call_module" or not isinstance(gm.get_submodule(conv.target), FusedConv2d):
            return None
        if len(conv.args) != 1 or conv.kwargs or len(conv.users) != 1:
            return None
        bn = next(iter(conv.users))
        if bn.op == "call_module" and isinstance(gm.get_submodule(bn.target), FusedBatchNorm2d):
            if bn.args != (conv,) or bn.kwargs or len(bn.users) != 1:
                return None
            split = next(iter(bn.users))
        else:
            bn, split = None, bn
        source = bn or conv
        if not (split.op == "call_method" and split.target == "split" and split.args[:1] == (source,)
                and split.kwargs == {"dim": 1} and len(split.args) == 2):
            return None
        items = list(split.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in items):
            return None
        if is_mutated(conv, gm) or (bn is not None and is_mutated(bn, gm)):
            return None
        return _FusedGroup(conv, bn, split, items)


class SparseForward:
    """Runs a graph with gates on a sample, computing only what this call's live gates need."""

    def __init__(self, gm: fx.GraphModule, sample_names: Sequence[str]):
        nodes = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        gate_nodes = [g for g in gates(gm) if gateable(gm, g, sample_names)]
        if any(is_decided_gate(g) and g not in gate_nodes for g in gates(gm)):
            raise ValueError("a gate decided in the graph is used other than by sums: it cannot be left out")
        sampled = [g for g in gate_nodes if not is_decided_gate(g)]
        positions = [sample_position(gm, g.args[0], sample_names) for g in sampled]
        order = sorted(set(positions))  # distinct sampled weights (cells may share a sample's rows)
        names = sorted({name for name, _ in order})
        self.samples = [(name, torch.tensor([flat for n, flat in order if n == name])) for name in names]
        slot = {p: i for i, p in enumerate(order)}
        decisions = list(dict.fromkeys(g.args[2] for g in gate_nodes if is_decided_gate(g)))
        slot.update({d: len(order) + k for k, d in enumerate(decisions)})
        self.decided = bool(decisions)  # the plan waits for the decisions, computed first in the run
        # (node index, weight's node index, position in the call's zero pattern) per gate
        position_of = dict(zip(sampled, positions))
        self.gates = [(index[g], index[g.args[0]], slot[g.args[2] if is_decided_gate(g) else position_of[g]])
                      for g in gate_nodes]
        groups = [g for n in nodes if (g := _FusedGroup.match(gm, n)) is not None]
        # (channel widths, [(getitem's node index, block)]) per fused group
        self.groups = [(group.widths, [(index[item], item.args[1]) for item in group.items]) for group in groups]
        self._inputs = [[index[a] for a in n.all_input_nodes] for n in nodes]
        self._gate_weight = {g: w for g, w, _ in self.gates}
        self._roots = self._static_roots(gm, nodes, index, gate_nodes)
        self._cache: OrderedDict[bytes, tuple] = OrderedDict()
        self._flat_on: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.modules = [gm.get_submodule(n.target) if n.op == "call_module" else None for n in nodes]
        front = _decisions_first(gm, nodes, decisions)
        self._run = _generate(nodes, index, gate_nodes, groups, front, decisions)  # holds no node: deepcopy-safe

    def _static_roots(self, gm: fx.GraphModule, nodes: list[fx.Node], index: dict[fx.Node, int],
                      gate_nodes: list[fx.Node]) -> list[int]:
        """The output, and the nodes with effects that no gate's term governs (those always run)."""
        gated: set[int] = set()
        stack = [index[g.args[1]] for g in gate_nodes if isinstance(g.args[1], fx.Node)]
        while stack:
            i = stack.pop()
            if i not in gated:
                gated.add(i)
                stack.extend(self._inputs[i])
        output = len(nodes) - 1
        always = self._reach([output], frozenset(self._gate_weight))
        return [output] + [
            i for i, n in enumerate(nodes)
            if n.op not in ("placeholder", "output") and not is_pure(n, gm) and (i not in gated or i in always)
        ]

    def _reach(self, roots: list[int], dead: frozenset[int]) -> set[int]:
        """Nodes needed by ``roots``; a dead gate needs only its weight."""
        live: set[int] = set()
        stack = list(roots)
        while stack:
            i = stack.pop()
            if i in live:
                continue
            live.add(i)
            stack.extend([self._gate_weight[i]] if i in dead else self._inputs[i])
        return live

    def pattern(self, gm: fx.GraphModule) -> bytes:
        """Which gated weights are exactly zero on this call (the call's one device sync)."""
        if not self.samples:
            return b""
        picked = []
        for name, flat in self.samples:
            sample = getattr(gm, name).detach()
            if flat.device != sample.device:  # moved once per device, not copied on every call
                key = (name, sample.device)
                if key not in self._flat_on:
                    self._flat_on[key] = flat.to(sample.device)
                flat = self._flat_on[key]
            picked.append(sample.reshape(-1)[flat])
        return bytes((torch.cat(picked) == 0).tolist())

    def plan(self, pattern: bytes) -> tuple[list[int], dict[int, tuple]]:
        """Per node 0 (not run), 1 (run) or 2 (a dead gate: its substitute), and the live blocks of
        each fused group, for one zero pattern."""
        cached = self._cache.get(pattern)
        if cached is not None:
            self._cache.move_to_end(pattern)
            return cached
        dead = frozenset(g for g, _, slot in self.gates if pattern[slot])
        live = self._reach(self._roots, dead)
        flags = [(2 if i in dead else 1) if i in live else 0 for i in range(len(self._inputs))]
        blocks = {}
        for k, (widths, items) in enumerate(self.groups):
            on_block = [False] * len(widths)
            for item, block in items:
                on_block[block] = on_block[block] or bool(flags[item])
            live_widths = [w for w, b in zip(widths, on_block) if b]
            remap = {b: sum(on_block[:b]) for b in range(len(on_block))}
            blocks[k] = (None if all(on_block) else tuple(on_block), live_widths, remap)
        plan = self._cache[pattern] = (flags, blocks)
        if len(self._cache) > PATTERN_CACHE:
            self._cache.popitem(last=False)
        return plan

    def __call__(self, gm: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        if self.decided:  # the run draws the sample and computes the decisions, then asks for the plan
            return self._run(gm, self.modules, None, None, self._decide, *args, **kwargs)
        flags, blocks = self.plan(self.pattern(gm))
        return self._run(gm, self.modules, flags, blocks, None, *args, **kwargs)

    def _decide(self, gm: fx.GraphModule, decisions: tuple) -> tuple[list[int], dict[int, tuple]]:
        """The plan for this call's decisions (one device sync), after the sampled weights' zeros."""
        taken = torch.stack([d if d.dim() == 0 else d.reshape(()) for d in decisions]).tolist()  # (a reshape each
        # of hundreds of 0-dim decisions cost a few percent of a small sampled supernet's step on the CPU)
        return self.plan(self.pattern(gm) + bytes(not t for t in taken))

    def check(self, gm: fx.GraphModule, inputs: Sequence[Any]) -> str | None:
        """Why the sparse run's values differ from the graph's dense run on ``inputs`` (at the sample
        the graph holds now), or None -- a check of this module's liveness and code, not of the passes.
        In eval mode: a dropout in a candidate draws only where it runs, so train-mode draws differ."""
        from .ir import max_rel_error, preserved_state

        modes = [(m, m.training) for m in gm.modules()]
        try:
            gm.eval()
            devices = sorted({t.device.index or 0 for t in gm.parameters() if t.is_cuda})
            with torch.no_grad(), preserved_state(gm), torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)  # a decided gate's sample is drawn in the graph: the same draw for both
                dense = gm(*inputs)
                torch.manual_seed(0)
                sparse = self(gm, *inputs)
        except Exception as exc:  # noqa: BLE001 - a sparse run that fails is no equal either
            return f"sparse execution raised {type(exc).__name__}: {exc}"
        finally:
            for module, mode in modes:
                module.training = mode
        error = max_rel_error(dense, sparse)
        return None if error <= CHECK_RTOL else f"sparse execution differs from the graph by {error:.2e} (relative)"

    def live_fraction(self, pattern: bytes) -> float:
        """The share of the graph's nodes one pattern runs (the report's and tests' measure)."""
        flags, _ = self.plan(pattern)
        return sum(f == 1 for f in flags) / len(flags)


def _decisions_first(gm: fx.GraphModule, nodes: list[fx.Node], decisions: list[fx.Node]) -> list[fx.Node]:
    """What computes the decisions of decided gates (the sampling: draws from the alphas), which the run
    computes first, before it plans; ``ValueError`` where running it first would reorder random draws
    or in-place updates (``ir.Effects``)."""
    if not decisions:
        return []
    front = set(computed_by(decisions))
    order = [n for n in nodes if n.op == "placeholder"] + [n for n in nodes if n in front and n.op != "placeholder"] + [
        n for n in nodes if n not in front and n.op != "placeholder"]
    position = {n: i for i, n in enumerate(order)}
    if any(position[a] > position[b] for a, b in Effects.of(gm).order_edges(set(nodes), gm)):
        raise ValueError("the decisions of gates cannot be computed before the graph changes state")
    return [n for n in nodes if n in front and n.op != "placeholder"]


def _generate(nodes: list[fx.Node], index: dict[fx.Node, int], gate_nodes: list[fx.Node], groups: list[_FusedGroup],
              front: list[fx.Node] = (), decisions: list[fx.Node] = ()):
    """The guarded forward: ``run(gm, modules, L, P, D, *placeholders)``; ``L[i]`` says whether node i runs
    (1) or, for a gate, is dead (2); ``P[k]`` gives fused group k's live blocks.  With decided gates the
    run computes ``front`` first, unguarded, then ``L, P = D(gm, decisions)``."""
    env: dict[str, Any] = {"_add_nothing": _add_nothing}
    consts: list[Any] = []
    env["K"] = consts

    def const(value: Any) -> str:
        if value is None or isinstance(value, (bool, int, str)):
            return repr(value)
        consts.append(value)
        return f"K[{len(consts) - 1}]"

    def expr(a: Any) -> str:
        if isinstance(a, fx.Node):
            return f"v{index[a]}"
        if isinstance(a, tuple):
            return "(" + "".join(f"{expr(x)}, " for x in a) + ")"
        if isinstance(a, list):
            return "[" + ", ".join(expr(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{const(k)}: {expr(v)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            return f"slice({expr(a.start)}, {expr(a.stop)}, {expr(a.step)})"
        return const(a)

    def call_args(args: tuple, kwargs: dict, code: dict[str, str] | None = None) -> str:
        return ", ".join([expr(a) for a in args] + [f"{k}={expr(v)}" for k, v in kwargs.items()]
                         + [f"{k}={c}" for k, c in (code or {}).items()])

    gate_set = set(gate_nodes)
    nothing_adds = {u for g in gate_nodes if dead_rule(g) == "nothing" for u in g.users}
    unguarded = set(front)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    nodes = placeholders + list(front) + [n for n in nodes if n not in unguarded and n.op != "placeholder"]
    group_of = {}
    for k, group in enumerate(groups):
        group_of[group.conv] = (k, "conv")
        if group.bn is not None:
            group_of[group.bn] = (k, "bn")
        group_of[group.split] = (k, "split")
        for item in group.items:
            group_of[item] = (k, "item")
    last_use: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last_use[a] = n
    freed_after: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last_use.items():
        freed_after.setdefault(user, []).append(value)

    params, lines = [], []
    for n in nodes:
        i = index[n]
        v = f"v{i}"
        if n.op == "placeholder":
            default = f"={const(n.args[0])}" if n.args else ""
            params.append(f"{n.target}{default}")  # `*args` (a forward that takes varargs) keeps its star
            lines.append(f"{v} = {n.target.lstrip('*')}")
            continue
        if n.op == "output":
            lines.append(f"return {expr(n.args[0])}")
            break
        if n in gate_set:
            w, t = expr(n.args[0]), expr(n.args[1])
            dead = w if dead_rule(n) == "weight" else "None"
            lines.append(f"if L[{i}] == 1: {v} = {w} * {t}")
            lines.append(f"elif L[{i}] == 2: {v} = {dead}")
        elif n in nothing_adds:  # `is_add`: two operands, no keywords, as a function or a method
            lines.append(f"if L[{i}]: {v} = _add_nothing({expr(n.args[0])}, {expr(n.args[1])})")
        else:
            if n.op == "get_attr":
                env[f"A{i}"] = operator.attrgetter(n.target)
                code = f"A{i}(gm)"
            elif n.op == "call_module":
                k, role = group_of.get(n, (None, None))
                live = {"live": f"P[{k}][0]"} if role in ("conv", "bn") else {}
                code = f"modules[{i}]({call_args(n.args, n.kwargs, live)})"
            elif n.op == "call_method":
                k, role = group_of.get(n, (None, None))
                if role == "split":
                    code = f"{expr(n.args[0])}.split(P[{k}][1], dim=1)"
                else:
                    code = f"{expr(n.args[0])}.{n.target}({call_args(n.args[1:], n.kwargs)})"
            else:
                k, role = group_of.get(n, (None, None))
                if role == "item":
                    code = f"{expr(n.args[0])}[P[{k}][2][{n.args[1]}]]"
                else:
                    env[f"F{i}"] = n.target
                    code = f"F{i}({call_args(n.args, n.kwargs)})"
            lines.append(f"{v} = {code}" if n in unguarded else f"if L[{i}]: {v} = {code}")
            if front and n is front[-1]:
                lines.append(f"L, P = D(gm, ({''.join(f'v{index[d]}, ' for d in decisions)}))")
        frees = [f"v{index[a]}" for a in freed_after.get(n, []) if a.op != "placeholder"]
        if frees:
            lines.append(" = ".join(frees) + " = None")
    source = f"def run(gm, modules, L, P, D, {', '.join(params)}):\n" + "".join(f"    {line}\n" for line in lines)
    exec(compile(source, "<topofx.sparse>", "exec"), env)  # noqa: S102 - code generated from the graph above
    run = env["run"]
    run.source = source
    return run


class _SparseCodeGen(fx.graph.CodeGen):
    """A graph with decided gates means sparse execution wherever it runs: after the graph's own forward
    (kept as the code's text, which fingerprints compare) comes a ``forward`` that runs the graph through
    :class:`SparseForward`.  The code generator is the graph's, so copies of the graph (``deepcopy``, a
    new GraphModule on it) run sparsely too; each generation is a new token, so a rewritten graph gets a
    new executor."""

    def _gen_python_code(self, nodes: Any, root_module: str, namespace: Any, **kwargs: Any) -> Any:
        code = super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        name = namespace.create_name("_topofx_sparse", None)
        code.globals[name] = functools.partial(_run_sparse, token=object())
        code.src += f"{SPARSE_FORWARD_MARK}def forward(self, *args, **kwargs):\n    return {name}(self, args, kwargs)\n"
        return code


def _run_sparse(gm: fx.GraphModule, args: tuple, kwargs: dict, token: object) -> Any:
    cached = gm.__dict__.get("_topofx_sparse")
    if cached is None or cached[0] is not token:
        cached = gm.__dict__["_topofx_sparse"] = (token, SparseForward(gm, ()))
    return cached[1](gm, *args, **kwargs)


def run_sparsely(gm: fx.GraphModule) -> None:
    """Make ``gm`` (a graph with gates decided in it, ``topofx.capture.gating``) and its copies run
    only what each call's decisions select; ``ValueError`` where its code is not FX's plain forward."""
    if type(gm.graph._codegen) is not fx.graph.CodeGen:  # a pytree signature: its forward flattens first
        raise ValueError(f"a graph generated by {type(gm.graph._codegen).__name__} cannot run sparsely")
    gm.graph.set_codegen(_SparseCodeGen())
    gm.recompile()
