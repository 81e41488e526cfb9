"""Zero elimination (exact).

Matches: a term of a sum chain that is identically zero -- ``x.mul(0.)``, ``zeros_like(x)``, a slice
or product of such a value -- alone or multiplied by an architecture weight.  The literal ``0`` that
Python's ``sum`` starts from is kept: it costs nothing to save and keeps a cell's sum over edges
structurally apart from the edges' own sums (topology reads sums as left-deep chains).
Produces: the same chain without those terms.  Their contribution to the sum and to the gradient of
every weight is zero, so outputs and gradients are unchanged.  The dead zero branch itself is then
removed by dead-code elimination only where it is pure (a branch that updates BN statistics stays).
A chain keeps at least one tensor term of the result's shape; values mutated in place are left alone.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from topofx.ir import is_mutated, shape_of, target_name
from topofx.rewrite import PassContext, Rewrite, rebuild_chain
from topofx.topology import is_mul, sum_chains

_ZERO_FACTORIES = {"zeros_like", "zeros", "new_zeros"}


def is_zero(node: object, gm: fx.GraphModule) -> bool:
    """Whether ``node`` is provably all zeros (finite inputs assumed, as in the supernets) and no
    in-place operation changes it."""
    if not isinstance(node, fx.Node) or is_mutated(node, gm):
        return False  # the literal 0 that ``sum`` starts from stays: it keeps nested sums apart
    if node.op in ("call_function", "call_method") and target_name(node) in _ZERO_FACTORIES:
        return True
    if is_mul(node):
        return any(_literal_zero(a) or is_zero(a, gm) for a in node.args)
    if node.op == "call_function" and node.target is operator.getitem:
        return is_zero(node.args[0], gm)
    return False


def _literal_zero(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def zero_elimination(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    records = []
    replaced: dict[fx.Node, fx.Node] = {}  # chain roots rewritten earlier in this pass
    for chain in sum_chains(gm.graph):
        shape = shape_of(chain.root)
        keep = [replaced.get(t, t) for t in chain.terms if not is_zero(t, gm)]
        if len(keep) == len(chain.terms) or not keep:
            continue
        if not any(isinstance(t, fx.Node) and shape_of(t) == shape for t in keep):
            continue
        if is_mutated(chain.root, gm) or any(isinstance(t, fx.Node) and is_mutated(t, gm) for t in keep):
            continue
        dropped = [t for t in chain.terms if is_zero(t, gm)]
        acc = rebuild_chain(gm, chain.root, keep)
        replaced[chain.root] = acc
        records.append(
            Rewrite(
                "zero_elimination", "removed", [t.name if isinstance(t, fx.Node) else repr(t) for t in dropped],
                acc.name, True, f"{len(dropped)} zero term(s) dropped from {chain.root.name}",
            )
        )
    return records


zero_elimination.name = "zero_elimination"
zero_elimination.exact = True
