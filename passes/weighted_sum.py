"""Lower each node's weighted sum to one accumulation, pooling once per node (topo mode).

Matches: an add tree (``sum(w * op(x) for ...)`` per edge, nested in the node's sum over edges)
whose inner adds feed only the tree, whose terms are tensors of the sum's shape and dtype (no
broadcasting) or the ``0`` that Python's ``sum`` starts from, and whose products ``w * t`` with an
architecture factor ``w`` feed only the tree.
Produces: one :func:`~topofx.modules.weighted_sum` call over the terms, left to right: one output
buffer instead of one tensor per product and per partial sum; backward computes each weight's
gradient as a dot product without materializing ``g * t``.  Weighted average poolings of the
node's inputs (``nn.AvgPool2d`` or its CPU lowering :class:`~topofx.modules.ConvAvgPool2d`, one
configuration) become one pooling of their weighted sum, ``sum_i w_i P(x_i) = P(sum_i w_i x_i)``
(the pooling is linear), so a node pools once instead of once per input and keeps no pooled tensor
(the CPU lowering saves nothing for backward; ``nn.AvgPool2d``'s autograd keeps the summed input).
Other weighted stateless calls (``w * maxpool(x)``) stay products, for ``recompute`` to run after
this pass (it saves only ``x`` and recomputes the pooling in backward).
Exactness: the same terms in a different association (``(a + b) + (c + d)`` becomes
``((a + b) + c) + d``; ``P(a) + P(b)`` becomes ``P(a + b)``), so results differ in the last bits,
more at mixed weights -- exact mode's contract is the original's arithmetic, so this pass runs in
topo mode only.  At one-hot weights a dropped term is an exact zero; only nodes whose several
selected edges are all poolings round differently (``P(a + b)``, ~1e-7 relative).
Left out where the sum is small (``topofx.cost.is_small_node``): the accumulation's fixed cost per
call exceeds what it saves there.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from topofx.cost import is_small_node
from topofx.ir import VALUE, is_mutated
from topofx.modules import ConvAvgPool2d
from topofx.modules import weighted_sum as weighted_sum_fn
from topofx.rewrite import PassContext, Rewrite, is_stateless_call
from topofx.topology import data_dependent, is_add, weighted_term


def _tree_terms(root: fx.Node) -> tuple[list[Any], list[fx.Node]]:
    """The leaves of the add tree at ``root`` (adds that feed only the tree are expanded) and its adds."""
    terms, adds = [], []

    def visit(x: Any, top: bool) -> None:
        if isinstance(x, fx.Node) and is_add(x) and (top or len(x.users) == 1):
            adds.append(x)
            visit(x.args[0], False)
            visit(x.args[1], False)
        else:
            terms.append(x)

    visit(root, True)
    return terms, adds


def _tensor_like(node: Any, like: torch.Tensor) -> bool:
    value = node.meta.get(VALUE) if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.shape == like.shape and value.dtype == like.dtype


def _pooled(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """A key shared by average poolings that can pool a sum of their inputs instead, or None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    pool = gm.get_submodule(node.target)
    if is_mutated(node, gm) or not (type(pool) is ConvAvgPool2d or ConvAvgPool2d.supports(pool)):
        return None
    pool = pool if type(pool) is ConvAvgPool2d else ConvAvgPool2d(pool)  # its configuration, normalized
    x = node.args[0].meta.get(VALUE) if isinstance(node.args[0], fx.Node) else None
    if not isinstance(x, torch.Tensor):
        return None
    return pool.kernel_size, pool.stride, pool.padding, pool.count_include_pad, x.shape, x.dtype


def _pool_once(gm: fx.GraphModule, root: fx.Node, terms: list, weights: list) -> tuple[list, list, int]:
    """Replace weighted poolings of one configuration by one pooling of their inputs' weighted sum."""
    groups: dict[tuple, list[int]] = {}
    for i, (term, weight) in enumerate(zip(terms, weights)):
        key = _pooled(gm, term) if weight is not None else None
        if key is not None:
            groups.setdefault(key, []).append(i)
    replaced: dict[int, fx.Node | None] = {}
    for members in groups.values():
        with gm.graph.inserting_before(root):
            inputs = tuple(terms[i].args[0] for i in members)
            total = gm.graph.call_function(weighted_sum_fn, (inputs, tuple(weights[i] for i in members)))
            total.meta[VALUE] = inputs[0].meta[VALUE]
            pooled = gm.graph.call_module(terms[members[0]].target, (total,))
            pooled.meta[VALUE] = terms[members[0]].meta[VALUE]
        replaced.update({i: None for i in members})
        replaced[members[0]] = pooled
    kept = [(replaced.get(i, t), None if i in replaced else w) for i, (t, w) in enumerate(zip(terms, weights))
            if replaced.get(i, t) is not None]
    return [t for t, _ in kept], [w for _, w in kept], len(groups)


def weighted_sum(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    data = data_dependent(gm.graph)
    records, done = [], set()
    for root in reversed(list(gm.graph.nodes)):  # outermost trees first; their inner adds are consumed
        if root in done or not is_add(root) or root not in data:
            continue
        if len(root.users) == 1 and is_add(next(iter(root.users))):
            continue  # an inner add of a larger tree
        value = root.meta.get(VALUE)
        leaves, adds = _tree_terms(root)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or len(adds) < 2 or is_small_node(root):
            continue
        terms, weights, muls = [], [], []
        for leaf in leaves:
            if isinstance(leaf, (int, float)) and leaf == 0:
                continue  # Python's sum() starts from 0
            term = weighted_term(leaf, data)
            if term is not None and is_stateless_call(gm, term[1]) and _pooled(gm, term[1]) is None:
                term = None  # w * maxpool(x): left to ``recompute``, which keeps only x for backward
            if term is not None and _tensor_like(term[1], value) and term[0].meta[VALUE].dim() <= value.dim():
                weights.append(term[0])
                terms.append(term[1])
                muls.append(leaf)
            elif _tensor_like(leaf, value):
                weights.append(None)
                terms.append(leaf)
            else:
                break
        else:
            if not terms or any(is_mutated(n, gm) for n in adds + muls + terms):
                continue
            terms, weights, pools = _pool_once(gm, root, terms, weights)
            with gm.graph.inserting_before(root):
                node = gm.graph.call_function(weighted_sum_fn, (tuple(terms), tuple(weights)))
            node.meta.update(root.meta)
            root.replace_all_uses_with(node)
            done.update(adds)
            records.append(Rewrite("weighted_sum", "fused", [n.name for n in adds + muls], node.name, False,
                                   f"{len(terms)} terms accumulated in one buffer"
                                   + (f", {pools} pooling(s) of weighted inputs" if pools else "")))
    return records


weighted_sum.name = "weighted_sum"
weighted_sum.exact = False
