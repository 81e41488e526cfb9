"""Compute the kernel-normalized merges of many edges as one batch (exact lowering of topo mode).

Matches: calls of :class:`~topofx.modules.MergedConvBN` modules (floating_merge's result), or of a
:class:`~topofx.modules.RecomputedDepthwise` whose consumer is one, without hooks, whose merged modules
share a :meth:`~topofx.modules.MergedConvBN.batch_key` (one kernel shape, candidates per edge, mixing
configuration): typically the edges of one cell, and of the cells of one width.  Calls join a batch
in graph order while every architecture weight they take is computed before the batch's first call,
and while no node between the first call and theirs may write a parameter (an in-place operation on a
value read with ``get_attr``, or a module topofx cannot vouch for): the batch reads the candidates'
kernels where its first call did.
Produces: one :class:`~topofx.modules.MergedKernels` call per batch, just before its first member,
taking all the members' weights; each member's call takes its image inputs and its part of the batch
(``mixed=``) instead of its weights.  Exact: every edge's kernel, bias and batch-norm affine map come
from its own weights by the same operations, computed on every call.  At a small size the merge's
fixed per-call costs (a few dozen tiny operations forward and backward per edge) were a quarter of a
supernet's step; batched, they are paid once per batch.  Runs last in topo mode's lowering, after
``depthwise_recompute`` (which matches merged calls by their arguments).
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch.fx as fx

from topofx.ir import aliases, is_inplace, is_pure, module_config
from topofx.modules import MergedConvBN, MergedKernels, RecomputedDepthwise
from topofx.rewrite import PassContext, Rewrite


def _merged_call(gm: fx.GraphModule, node: fx.Node) -> tuple[MergedConvBN, int] | None:
    """The merged module a call computes and how many of its leading arguments are images (None: not
    such a call, or one with hooks, keyword arguments, or weights given other than as graph nodes)."""
    if node.op != "call_module" or node.kwargs:
        return None
    module = gm.get_submodule(node.target)
    merged, n_inputs = module, getattr(module, "n_inputs", 0)
    if type(module) is RecomputedDepthwise:
        merged, n_inputs = module.consumer, len(module.depthwise)
    if type(merged) is not MergedConvBN or merged.batch_key() is None:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
        return None
    weights = node.args[n_inputs:]
    if len(weights) != sum(merged.sizes) or not all(isinstance(w, fx.Node) for w in weights):
        return None
    return merged, n_inputs


def _reads_attr(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node``'s value is (a view of) a value read with ``get_attr`` (a parameter or buffer)."""
    while node.op != "get_attr":
        if not (aliases(node, gm) and node.args and isinstance(node.args[0], fx.Node)):
            return False
        node = node.args[0]
    return True


def _may_write_parameters(node: fx.Node, gm: fx.GraphModule) -> bool:
    """An in-place write into a parameter or buffer, or a call of a module topofx cannot vouch for."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return not type(module).__module__.startswith("topofx.") and module_config(module) is None
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return first is not None and is_inplace(node, gm) and _reads_attr(first, gm)


def _hoisted(node: fx.Node, first: int, index: dict[fx.Node, int], gm: fx.GraphModule, moved: list[fx.Node]) -> bool:
    """Whether ``node`` can be computed before position ``first``: it is already, or it is a pure
    function call (an architecture weight taken out of a softmax: ``w[i][j]``) whose inputs can; the
    nodes to move there are added to ``moved``."""
    if index[node] < first or node in moved:
        return True
    if node.op not in ("call_function", "call_method") or not is_pure(node, gm):
        return False
    if not all(_hoisted(a, first, index, gm, moved) for a in node.all_input_nodes):
        return False
    moved.append(node)
    return True


def _batches(gm: fx.GraphModule, calls: list[fx.Node], n_inputs: dict[fx.Node, int]) -> list[tuple[list, list]]:
    """``calls`` (in graph order) cut into batches ``(calls, nodes to move before the first)``: a call
    joins the open batch when its weights can be computed before the batch's first call and nothing
    in between may write a parameter."""
    index, writes = {}, [0]  # writes[i]: how many of the first i nodes may write a parameter
    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        writes.append(writes[-1] + _may_write_parameters(n, gm))
    batches: list[tuple[list, list]] = []
    for call in calls:
        if batches:
            members, moved = batches[-1]
            first = index[members[0]]
            more = list(moved)
            if writes[index[call]] == writes[first + 1] and all(
                    _hoisted(w, first, index, gm, more) for w in call.args[n_inputs[call]:]):
                members.append(call)
                moved[:] = more
                continue
        batches.append(([call], []))
    return batches


def _lower(ctx: PassContext, batch: list[fx.Node], moved: list[fx.Node], members: list[MergedConvBN],
           n_inputs: dict[fx.Node, int]) -> Rewrite:
    """One :class:`MergedKernels` call before the batch's first call (the weights it needs moved there)."""
    gm = ctx.gm
    for node in moved:  # (in dependency order: each after its inputs)
        batch[0].prepend(node)
    name = ctx.add_module("merged_kernels", MergedKernels(members))
    with gm.graph.inserting_before(batch[0]):
        node = gm.graph.call_module(name, tuple(w for call in batch for w in call.args[n_inputs[call]:]))
        parts = [gm.graph.call_function(operator.getitem, (node, k)) for k in range(len(batch))]
    for call, part in zip(batch, parts):
        call.args = call.args[:n_inputs[call]]
        call.kwargs = {"mixed": part}
    return Rewrite("batched_merge", "fused", [call.name for call in batch], node.name, True,
                   f"the kernel-normalized merges of {len(batch)} merged convolutions computed as one batch")


def batched_merge(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    by_key: dict[tuple, list[fx.Node]] = defaultdict(list)
    merged: dict[fx.Node, MergedConvBN] = {}
    n_inputs: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        found = _merged_call(gm, node)
        if found is not None:
            merged[node], n_inputs[node] = found
            by_key[found[0].batch_key()].append(node)
    records = []
    for calls in by_key.values():
        for batch, moved in _batches(gm, calls, n_inputs):
            if len(batch) > 1:
                records.append(_lower(ctx, batch, moved, [merged[c] for c in batch], n_inputs))
    return records


batched_merge.name = "batched_merge"
batched_merge.exact = True
