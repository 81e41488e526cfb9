"""Lower each node's weighted sum to one accumulation (topo mode; exact at one-hot weights).

Matches: an add tree (``sum(w * op(x) for ...)`` per edge, nested in the node's sum over edges)
whose inner adds feed only the tree, whose terms are tensors of the sum's shape and dtype (no
broadcasting) or the ``0`` that Python's ``sum`` starts from, and whose products ``w * t`` with an
architecture factor ``w`` feed only the tree.
Produces: one :func:`~topofx.modules.weighted_sum` call over the terms, left to right: one output
buffer instead of one tensor per product and per partial sum; backward computes each weight's
gradient as a dot product without materializing ``g * t``.
Exactness: the same terms summed in a different association (``(a + b) + (c + d)`` becomes
``((a + b) + c) + d``), so outputs can differ in the last bits at mixed weights -- exact mode's
contract is the original's arithmetic, so this pass runs in topo mode only.  At one-hot weights
(vertex-exactness) every dropped term is an exact zero and the result is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from topofx.capture import VALUE
from topofx.modules import weighted_sum as weighted_sum_fn
from topofx.rewrite import PassContext, Rewrite, is_mutated
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
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or len(adds) < 2:
            continue
        terms, weights, muls = [], [], []
        for leaf in leaves:
            if isinstance(leaf, (int, float)) and leaf == 0:
                continue  # Python's sum() starts from 0
            term = weighted_term(leaf, data)
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
            with gm.graph.inserting_before(root):
                node = gm.graph.call_function(weighted_sum_fn, (tuple(terms), tuple(weights)))
            node.meta.update(root.meta)
            root.replace_all_uses_with(node)
            done.update(adds)
            records.append(Rewrite("weighted_sum", "fused", [n.name for n in adds + muls], node.name, False,
                                   f"{len(terms)} terms ({len(muls)} weighted) accumulated in one buffer"))
    return records


weighted_sum.name = "weighted_sum"
weighted_sum.exact = False
