"""Canonical joins (exact): weighted joins written other than as ``+`` chains become ``+`` chains.

Matches, with ``w`` a 1-D architecture tensor of ``K`` elements (independent of the inputs: a row of
alpha, softmaxed or sampled, possibly ``torch.cat``-ed with zero slices) reached from the join through
shape-only ops, and ``S = torch.stack([out_0, ..., out_{K-1}], d)``:

* ``(S * v).sum(d)`` / ``torch.sum(S * v, d)``, ``v`` a view of ``w`` broadcast along axis ``d``
  (NNI's DARTS layer: ``w.view(-1, 1, 1, 1, 1)``; ``(torch.stack(outs, -1) * w).sum(-1)``), and
  ``S.sum(d)`` over stacked weighted terms ``w_k * out_k``;
* ``torch.einsum`` of ``w`` and ``S`` contracting exactly the stacked axis and keeping the others in
  order (``'k,knchw->nchw'``, ``'...k,k->...'``); ``torch.tensordot`` over the stacked axis;
  ``w @ S`` / ``S @ w`` where matmul contracts the stacked axis; ``(w @ S.flatten(1)).view(shape)``
  (``S`` stacked at 0, any row-major 2-D reshape, viewed back to the candidates' shape);
* an in-place accumulation ``out = t_0; out.add_(t_1); out.add_(t_2) ...`` into a fresh tensor that
  no node reads before the last ``add_`` (two or more ``t_i`` weighted terms ``w_k * out_k``), and
  ``torch.add(a, w_k * out_k, alpha=c)`` with ``c`` a number.

Produces: the left-deep chain ``w[0] * out_0 + w[1] * out_1 + ...`` that topology reads as a mixed
edge and every later pass rewrites (``w[k]`` reads the ``torch.cat`` piece that holds element k, so
the term of a zero slice is provably zero and zero elimination drops it); in-place adds become
out-of-place adds where they were, ``alpha=c`` a factor ``w_k * c`` of the term.
Exact: the same weighted sum in another summation order, each term weighted by the same element of
the same tensor, so outputs and the gradients of the candidates and of ``w`` are the original's.  Only
joins whose shapes and dtypes the nodes' meta values prove are rewritten; others are left untouched.
"""
from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from topofx.ir import Effects, aliases, is_inplace, is_mutated, target_name, value_of
from topofx.passes.zero_elimination import _ZERO_FACTORIES
from topofx.rewrite import PassContext, Rewrite, node_order
from topofx.topology import architecture_factor, data_dependent, is_mul

_SHAPE_ONLY = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten", "view_as", "reshape_as"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MATMUL = {operator.matmul, torch.matmul}

Join = tuple[fx.Node, fx.Node, fx.Node | None]  # (join node, the stack it reduces, weight row or None)


def _tensor(node: Any) -> torch.Tensor | None:
    value = value_of(node) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _kwargs(node: fx.Node) -> dict[str, Any]:
    """The keyword arguments that are set (the tracer records ``out=None`` and such)."""
    return {k: v for k, v in node.kwargs.items() if v is not None}


def _shape_only(node: Any) -> bool:
    """A call that only reshapes its first argument, keeping the row-major order of its elements."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_function" and node.target is operator.getitem:  # w[:, None, None]
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in index)
    name = target_name(node)
    reinterprets = any(isinstance(a, torch.dtype) for a in node.args)  # x.view(torch.int32)
    return name in _SHAPE_ONLY and not reinterprets and (node.op == "call_method" or getattr(torch, name, None) is node.target)


def _row(node: Any, k: int, data: set[fx.Node]) -> fx.Node | None:
    """The 1-D floating architecture tensor of ``k`` elements that ``node`` is (a reshaped view of)."""
    while isinstance(node, fx.Node) and node not in data:
        value = _tensor(node)
        if value is None or value.numel() != k or not value.is_floating_point():
            return None
        if value.dim() == 1:
            return node
        if not _shape_only(node):
            return None
        node = node.args[0]
    return None


def _weighted(node: Any, data: set[fx.Node]) -> bool:
    """``w * out``: an architecture factor times data of the product's shape (any number of users)."""
    if not isinstance(node, fx.Node) or not is_mul(node) or _tensor(node) is None:
        return False
    a, b = node.args
    return any(architecture_factor(w, data) and o in data and _tensor(o) is not None
               and _tensor(o).shape == _tensor(node).shape for w, o in ((a, b), (b, a)))


def _stack(node: Any) -> tuple[list[Any], int] | None:
    """``(outs, axis)`` when ``node`` is ``torch.stack(outs, axis)`` of two or more tensors."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not torch.stack \
            or set(_kwargs(node)) - {"tensors", "dim"}:
        return None
    outs = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    value = _tensor(node)
    if value is None or not isinstance(outs, (list, tuple)) or len(outs) < 2 or not isinstance(dim, int):
        return None
    if not all(_tensor(o) is not None and _tensor(o).dtype == value.dtype for o in outs):
        return None
    return list(outs), dim % value.dim()


def _zero_block(node: Any, gm: fx.GraphModule) -> torch.Tensor | None:
    """``zeros_like(S[:m])``, ``torch.zeros(...)``, ``x.new_zeros(...)`` (all zeros by construction),
    or the constant that tracing freezes ``torch.zeros`` of a fixed shape into (FX's
    ``_tensor_constant<i>``, no user's attribute, all zeros); read by nothing but the ``torch.cat``, and
    written by nothing.  Its value (the meta value; the constant itself), else None."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or is_mutated(node, gm):
        return None
    if node.op in ("call_function", "call_method"):
        return _tensor(node) if target_name(node) in _ZERO_FACTORIES else None
    if node.op != "get_attr":
        return None
    value = getattr(gm, node.target, None) if re.fullmatch(r"_tensor_constant\d+", node.target) else None
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and not value.requires_grad \
            and not bool(value.any()):
        return value
    return None


def _stacked(node: Any, gm: fx.GraphModule) -> tuple[list[Any], int] | None:
    """``(outs, axis)`` when ``node`` is ``torch.stack(outs, axis)`` of two or more tensors, or
    ``torch.cat`` along ``axis`` of such stacks and zero blocks (NNI 3.0's "none" candidate:
    ``torch.cat((S, torch.zeros_like(S[:1])), 0)``); a zero block's positions are None in ``outs``.
    The pieces' shapes and dtypes are proven from the meta values: each zero block is the stack's
    shape but for the stacked axis, and the cat promotes nothing."""
    stacked = _stack(node)
    if stacked is not None or not isinstance(node, fx.Node) or node.op != "call_function" \
            or node.target not in _CAT or set(_kwargs(node)) - {"tensors", "dim", "axis"}:
        return stacked
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    value = _tensor(node)
    if value is None or not isinstance(pieces, (list, tuple)) or isinstance(dim, bool) or not isinstance(dim, int):
        return None
    axis, outs, stacks = dim % max(value.dim(), 1), [], 0
    for piece in pieces:
        zero = _zero_block(piece, gm)
        t = _tensor(piece) if zero is None else zero
        if t is None or t.dtype != value.dtype or t.dim() != value.dim() \
                or t.shape[:axis] + t.shape[axis + 1:] != value.shape[:axis] + value.shape[axis + 1:]:
            return None
        found = _stack(piece)
        if found is not None and found[1] == axis:
            outs, stacks = outs + found[0], stacks + 1
        elif zero is not None:
            outs += [None] * t.shape[axis]
        else:
            return None
    return (outs, axis) if stacks and len(outs) == value.shape[axis] else None


def _along(v: torch.Tensor, s: torch.Tensor, axis: int) -> bool:
    """Whether ``v`` broadcast against ``s`` varies along ``axis`` only, with ``s``'s size there."""
    offset = s.dim() - v.dim()
    return offset >= 0 and offset <= axis and all(
        size == (s.shape[axis] if offset + j == axis else 1) for j, size in enumerate(v.shape))


def _reduce_sum(node: fx.Node, data: set[fx.Node], gm: fx.GraphModule) -> Join | None:
    """``(S * v).sum(d)`` / ``torch.sum(S * v, d)``; ``S.sum(d)`` over stacked weighted terms."""
    if not (node.op == "call_function" and node.target is torch.sum or node.op == "call_method" and node.target == "sum"):
        return None
    if set(_kwargs(node)) - {"dim", "keepdim"} or node.kwargs.get("keepdim", False) or len(node.args) > 2:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    prod = node.args[0]
    if not isinstance(dim, int) or not isinstance(prod, fx.Node):
        return None
    stacked = _stacked(prod, gm)
    if stacked is not None:  # torch.stack([w_k * out_k ...]).sum(0)
        outs, axis = stacked
        weighted = sum(_weighted(o, data) for o in outs)
        return (node, prod, None) if dim % _tensor(prod).dim() == axis and weighted >= 2 else None
    if not is_mul(prod) or _tensor(prod) is None:
        return None
    for s, v in (prod.args, prod.args[::-1]):
        stacked = _stacked(s, gm)
        if stacked is None or _tensor(v) is None or _tensor(prod).shape != _tensor(s).shape:
            continue
        outs, axis = stacked
        if dim % _tensor(s).dim() == axis and _along(_tensor(v), _tensor(s), axis):
            row = _row(v, len(outs), data)
            return (node, s, row) if row is not None else None
    return None


def _subscripts(sub: str, dims: int) -> list[str] | None:
    """One einsum operand's label per dimension (``...`` expanded to ``.0``, ``.1``, ...)."""
    head, dots, tail = sub.partition("...")
    if head + tail and not (head + tail).isalpha():
        return None
    if not dots:
        return list(sub) if len(sub) == dims else None
    n = dims - len(head) - len(tail)
    return list(head) + [f".{i}" for i in range(n)] + list(tail) if n >= 0 else None


def _einsum(node: fx.Node) -> tuple[Any, Any, int] | None:
    """``(w, S, axis)``: ``torch.einsum`` of a vector ``w`` and ``S`` summing ``S``'s ``axis`` against
    ``w`` and keeping ``S``'s other axes in order."""
    if node.op != "call_function" or node.target is not torch.einsum or _kwargs(node) or not node.args:
        return None
    eq, *ops = node.args
    ops = list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops
    if not isinstance(eq, str) or len(ops) != 2 or eq.count("->") != 1:
        return None
    inputs, out = eq.replace(" ", "").split("->")
    subs = inputs.split(",")
    if len(subs) != 2:
        return None
    for i in (0, 1):
        w, s = _tensor(ops[i]), _tensor(ops[1 - i])
        if w is None or s is None or w.dim() != 1:
            continue
        ws, ss, os_ = _subscripts(subs[i], 1), _subscripts(subs[1 - i], s.dim()), _subscripts(out, s.dim() - 1)
        if ws is None or ss is None or os_ is None or len(set(ss)) != len(ss) or ws[0] not in ss:
            continue
        if os_ == [t for t in ss if t != ws[0]]:
            return ops[i], ops[1 - i], ss.index(ws[0])
    return None


def _tensordot(node: fx.Node) -> tuple[Any, Any, int] | None:
    """``(w, S, axis)``: ``torch.tensordot`` of a vector ``w`` and ``S`` over ``S``'s ``axis``."""
    if node.op != "call_function" or node.target is not torch.tensordot or set(_kwargs(node)) - {"dims"}:
        return None
    a, b = node.args[:2]
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", 2)
    ta, tb = _tensor(a), _tensor(b)
    if ta is None or tb is None:
        return None
    if isinstance(dims, int) and dims == 1:
        axes = (ta.dim() - 1, 0)
    elif isinstance(dims, (list, tuple)) and len(dims) == 2:
        da, db = ([d] if isinstance(d, int) else list(d) for d in dims)
        if len(da) != 1 or len(db) != 1 or not all(isinstance(d, int) for d in da + db):
            return None
        axes = (da[0] % ta.dim(), db[0] % tb.dim())
    else:
        return None
    if ta.dim() == 1:
        return a, b, axes[1]
    return (b, a, axes[0]) if tb.dim() == 1 else None


def _matmul(node: Any) -> tuple[Any, Any, int] | None:
    """``(w, T, axis)``: ``w @ T`` (contracting ``T``'s axis -2) or ``T @ w`` (axis -1), ``w`` a vector."""
    if not isinstance(node, fx.Node) or _kwargs(node) or len(node.args) != 2 or not (
            node.op == "call_function" and node.target in _MATMUL
            or node.op == "call_method" and node.target in ("matmul", "__matmul__")):
        return None
    a, b = node.args
    ta, tb = _tensor(a), _tensor(b)
    if ta is None or tb is None:
        return None
    if ta.dim() == 1 and tb.dim() >= 2:
        return a, b, tb.dim() - 2
    return (b, a, ta.dim() - 1) if tb.dim() == 1 and ta.dim() >= 2 else None


def _contraction(node: fx.Node, data: set[fx.Node], gm: fx.GraphModule) -> Join | None:
    """einsum, tensordot or matmul of a weight vector with stacked candidates, over the stacked axis."""
    found = _einsum(node) or _tensordot(node) or _matmul(node)
    if found is None:
        return None
    w, s, axis = found
    stacked = _stacked(s, gm)
    if stacked is None or stacked[1] != axis:
        return None
    row = _row(w, len(stacked[0]), data)
    return (node, s, row) if row is not None else None


def _flat_matmul(node: fx.Node, data: set[fx.Node], gm: fx.GraphModule) -> Join | None:
    """``(w @ S.flatten(1)).view(shape)``: ``S`` stacked at 0, flattened to ``(K, M)``, viewed back."""
    if not _shape_only(node):
        return None
    found = _matmul(node.args[0])
    if found is None:
        return None
    w, flat, axis = found
    stacked = _stacked(flat.args[0], gm) if _shape_only(flat) else None
    if stacked is None or axis != 0 or stacked[1] != 0 or _tensor(flat).dim() != 2:
        return None
    outs = stacked[0]
    first = next(o for o in outs if o is not None)
    if _tensor(flat).shape[0] != len(outs) or _tensor(node) is None or _tensor(node).shape != _tensor(first).shape:
        return None
    row = _row(w, len(outs), data)
    return (node, flat.args[0], row) if row is not None else None


def _element(graph: fx.Graph, row: fx.Node, k: int) -> fx.Node:
    """``row[k]``, read from the ``torch.cat`` piece that holds it (a zero slice's element is then
    provably zero)."""
    pieces = row.args[0] if row.op == "call_function" and row.target in _CAT and row.args else None
    if isinstance(pieces, (list, tuple)) and all(_tensor(p) is not None and _tensor(p).dim() == 1 for p in pieces):
        for piece in pieces:
            if k < _tensor(piece).numel():
                return graph.call_function(operator.getitem, (piece, k))
            k -= _tensor(piece).numel()
    return graph.call_function(operator.getitem, (row, k))


def _stack_join(gm: fx.GraphModule, join: fx.Node, stack: fx.Node, row: fx.Node | None) -> fx.Node | None:
    """Replace ``join`` by ``row[0] * outs[0] + row[1] * outs[1] + ...`` over the stacked ``outs``
    (``outs`` alone without a row); None, graph untouched, where the chain's value would differ in
    shape or dtype.  A zero block's positions have no term: ``row[k] * 0`` adds exactly nothing to the
    sum, and its weight's gradient, ``<dL/dy, 0>``, is zero either way."""
    outs = [(k, o) for k, o in enumerate(_stacked(stack, gm)[0]) if o is not None]
    value, first = _tensor(join), _tensor(outs[0][1])
    # a one-element weight times a tensor takes the tensor's dtype (a float row never promotes it)
    if value is None or value.shape != first.shape or {_tensor(o).dtype for _, o in outs} != {value.dtype}:
        return None
    graph = gm.graph
    with graph.inserting_before(join):
        terms = [o for _, o in outs] if row is None else [
            graph.call_function(operator.mul, (_element(graph, row, k), out)) for k, out in outs]
        acc = terms[0]
        for term in terms[1:]:
            acc = graph.call_function(operator.add, (acc, term))
    acc.meta.update({k: v for k, v in join.meta.items() if k not in acc.meta})
    join.replace_all_uses_with(acc)
    return acc


def _settled(gm: fx.GraphModule, join: fx.Node, stack: fx.Node, accesses: list[list[fx.Node]], order: Any) -> bool:
    """No in-place write, between the stack and the join, to a storage that the stack, the join or
    what is computed from the stack reads: the chain reads the stacked outs at the join instead
    (drop-path's writes into candidate outputs before they are stacked are fine).  For a ``torch.cat``
    of stacks and zero blocks, from the first stack on, and what reads any of the stacks counts."""
    pieces = stack.args[0] if stack.target in _CAT and stack.args else ()
    stacks = [stack] + [p for p in pieces if _stack(p) is not None]
    reading = {join, *stacks, *(u for s in stacks for u in s.users)}
    start = min(order(s) for s in stacks)
    return not any(start < order(n) < order(join) and is_inplace(n, gm)
                   for access in accesses if reading & set(access) for n in access)


def _alpha(node: fx.Node) -> float | None:
    """The number an ``add``/``add_`` with ``alpha=`` scales its second operand by (1 without)."""
    alpha = node.kwargs.get("alpha", 1)
    if set(node.kwargs) - {"alpha"} or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    return alpha


def _is_add(node: fx.Node, inplace: bool) -> bool:
    if len(node.args) != 2 or _alpha(node) is None:
        return False
    if inplace:
        return node.op == "call_method" and node.target == "add_"
    return node.op == "call_method" and node.target == "add" or node.op == "call_function" and node.target is torch.add


def _scaled(graph: fx.Graph, term: Any, alpha: float, data: set[fx.Node]) -> Any:
    """``term * alpha`` as a weighted term: ``(w * alpha) * out`` for ``term = w * out``."""
    if alpha == 1:
        return term
    if _weighted(term, data) and len(term.users) == 1:
        a, b = term.args
        w, out = (a, b) if architecture_factor(a, data) else (b, a)
        return graph.call_function(operator.mul, (graph.call_function(operator.mul, (w, alpha)), out))
    return graph.call_function(operator.mul, (term, alpha))


def _inplace_chains(gm: fx.GraphModule, data: set[fx.Node]) -> list[tuple[fx.Node, list[fx.Node], list[fx.Node]]]:
    """``(root, writes, readers)``: ``root`` a fresh tensor (not a view or an input) that only the
    ``add_`` calls ``writes`` mutate, read by ``readers`` only after the last of them; the terms are
    tensors of the root's shape and dtype, two or more of them (the root included) weighted."""
    writes: dict[fx.Node, list[fx.Node]] = {}
    base: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if _is_add(node, inplace=True) and isinstance(node.args[0], fx.Node):
            base[node] = base.get(node.args[0], node.args[0])
            writes.setdefault(base[node], []).append(node)
    order = node_order(gm.graph)
    chains = []
    for root, adds in writes.items():
        value = _tensor(root)
        if value is None or root.op not in ("call_function", "call_method", "call_module") \
                or aliases(root, gm) or is_inplace(root, gm):
            continue
        members = {root, *adds}
        terms = [a.args[1] for a in adds]
        readers = {u for m in members for u in m.users} - set(adds)
        if any(not isinstance(t, fx.Node) or t in members or _tensor(t) is None or _tensor(t).shape != value.shape
               or _tensor(t).dtype != value.dtype for t in terms):
            continue
        if any(order(r) < order(adds[-1]) for r in readers) or sum(_weighted(t, data) for t in [root, *terms]) < 2:
            continue
        chains.append((root, adds, sorted(readers, key=order)))
    return chains


def canonical_joins(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    graph = gm.graph
    data = data_dependent(graph)
    accesses, order = Effects.of(gm).accesses, node_order(graph)
    records = []
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        found = _reduce_sum(node, data, gm) or _contraction(node, data, gm) or _flat_matmul(node, data, gm)
        if found is not None and _settled(gm, node, found[1], accesses, order):
            outs = _stacked(found[1], gm)[0]
            acc = _stack_join(gm, *found)
            if acc is not None:
                zeros = sum(o is None for o in outs)
                records.append(Rewrite("canonical_joins", "canonical", [node.name], acc.name, True,
                                       f"{target_name(node)} over {len(outs)} stacked terms -> + chain"
                                       + (f" ({zeros} zero-block terms dropped)" if zeros else "")))
        elif _is_add(node, inplace=False) and _alpha(node) != 1 and _weighted(node.args[1], data):
            with graph.inserting_before(node):
                acc = graph.call_function(operator.add, (node.args[0], _scaled(graph, node.args[1], _alpha(node), data)))
            acc.meta.update(node.meta)
            node.replace_all_uses_with(acc)
            records.append(Rewrite("canonical_joins", "canonical", [node.name], acc.name, True, "add(alpha=) -> a + w*c*b"))
    for root, adds, readers in _inplace_chains(gm, data):
        acc = root
        for add in adds:
            with graph.inserting_before(add):
                acc = graph.call_function(operator.add, (acc, _scaled(graph, add.args[1], _alpha(add), data)))
        for reader in readers:
            for member in (root, *adds):
                reader.replace_input_with(member, acc)
        for add in reversed(adds):
            graph.erase_node(add)
        records.append(Rewrite("canonical_joins", "canonical", [a.name for a in adds], acc.name, True,
                               f"{len(adds)} in-place add_ into {root.name} -> + chain"))
    return records


canonical_joins.name = "canonical_joins"
canonical_joins.exact = True
