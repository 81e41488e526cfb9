"""Functional convolutions and batch norms on the model's own tensors as stock modules (exact).

Code written with functional calls (a one-shot library's mixed operations: ``F.conv2d(x,
self.weight, ...)``, ``F.batch_norm(y, self.running_mean, ..., self.training, 0.1, 1e-5)``) reaches
the captured graph as ``call_function`` nodes reading their tensors through ``get_attr``; the
rewrites match ``nn.Conv2d`` / ``nn.BatchNorm2d`` calls.  This pass states such a call as the stock
module that computes it, holding the very same tensor objects, so that every later pass sees it.

Matches, by structure only:

* ``torch.conv2d`` / ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` on a 4-D
  ``x``, where ``weight`` (and ``bias``, or ``None``) is a ``get_attr`` of a whole ``nn.Parameter``
  that a module of the model registers at that path (the graph module holds the same object), and
  stride, padding, dilation and groups are constants;
* ``F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)`` (or
  ``torch.batch_norm`` in its own argument order) on a 4-D ``y``: weight and bias both absent or
  both whole registered parameters, running statistics both absent or both whole registered
  buffers that nothing else in the graph reads, ``training``, ``momentum`` (a number) and ``eps``
  constants -- and the mode constant consistent with how the graph is served.  A stock BN follows
  ``.train()``/``.eval()``, the captured call does not: with running statistics the call is lowered
  only when ``simplify`` serves the graph in one mode only (forward reads ``self.training``, so the
  other mode runs the original's eager forward; :data:`SERVED_TRAINING`) and ``training`` is that
  mode; without them only ``training=True`` (a stock BN without statistics normalizes with batch
  statistics in both modes).  A sliced or computed tensor, a non-constant argument or a hard-coded
  mode the graph may be served against is left as it is.

Produces: one ``call_module`` of a stock ``nn.Conv2d`` / ``nn.BatchNorm2d`` per call (``padding_mode
"zeros"``; the BN's ``num_batches_tracked`` is ``None``, as the functional call has no counter and
its momentum is a number), registered on the graph module, whose parameters and buffers *are* the
tensors the call read: gradients land on the user's parameters and the statistics are updated in
the user's buffers.  Each module records where the model holds them (``_topofx_tensors``) so the
drop-in guards re-bind a tensor the model re-assigns (``topofx.capture.guards``).  Exact: the module's
forward makes the same ``F.conv2d`` / ``F.batch_norm`` call with the same tensors and constants.
"""
from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from topofx.ir import UNKNOWN, VALUE, reads_metadata
from topofx.rewrite import PassContext, Rewrite

SERVED_TRAINING = "topofx_served_training"  # GraphModule.meta: the only train/eval mode the graph serves, or None
TENSORS = "_topofx_tensors"  # lowered module attribute: {field: get_attr target} (private: not configuration)

_CONV = {torch.conv2d, F.conv2d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_BN_ARGS = {
    F.batch_norm: (("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                   {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}),
    torch.batch_norm: (("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                        "cudnn_enabled"), {}),
}
_MISSING = object()


def _bind(node: fx.Node, names: tuple, defaults: dict) -> dict[str, Any] | None:
    if len(node.args) > len(names):
        return None
    bound = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key in bound or key not in names:
            return None
        bound[key] = value
    for key in names:
        if key not in bound:
            if key not in defaults:
                return None
            bound[key] = defaults[key]
    return bound


def _constant(value: Any) -> bool:
    """No graph value anywhere inside (a number, a string, a tuple of them)."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return not found and not isinstance(value, torch.Tensor)


def _ints(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) in (1, 2) and all(type(v) is int for v in value)
    return type(value) is int


def _lookup(root: Any, target: str) -> tuple[Any, str, Any]:
    """(owner, field, value) of ``target`` under ``root``; owner None where the path breaks."""
    *path, field = target.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return None, field, None
    return owner, field, getattr(owner, field, None)


def _whole(ctx: PassContext, node: Any, kind: str) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads when it is a whole parameter (``kind="p"``) or buffer
    (``"b"``) that a module of the model registers at that path, held by the graph module as the same
    object; else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    _, _, held = _lookup(ctx.gm, node.target)
    owner, field, value = _lookup(ctx.original, node.target)
    if not isinstance(owner, nn.Module) or value is None or held is not value:
        return None
    table = owner._parameters if kind == "p" else owner._buffers
    if table.get(field) is not value:
        return None
    if kind == "p" and not isinstance(value, nn.Parameter):
        return None
    return value


def _image(node: Any) -> torch.Tensor | None:
    value = node.meta.get(VALUE, UNKNOWN) if isinstance(node, fx.Node) else UNKNOWN
    return value if isinstance(value, torch.Tensor) and value.dim() == 4 else None


def _conv(ctx: PassContext, node: fx.Node) -> tuple[nn.Module, dict[str, str]] | None:
    args = _bind(node, _CONV_ARGS, _CONV_DEFAULTS)
    if args is None or _image(args["input"]) is None:
        return None
    weight = _whole(ctx, args["weight"], "p")
    bias = None if args["bias"] is None else _whole(ctx, args["bias"], "p")
    if weight is None or (args["bias"] is not None and bias is None) or weight.dim() != 4:
        return None
    stride, padding, dilation, groups = (args[k] for k in ("stride", "padding", "dilation", "groups"))
    if not (_ints(stride) and _ints(dilation) and type(groups) is int and groups >= 1):
        return None
    if not (_ints(padding) or padding in ("same", "valid")):
        return None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return None
    if _image(args["input"]).shape[1] != weight.shape[1] * groups:
        return None
    try:
        conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                         padding=padding, dilation=dilation, groups=groups, bias=bias is not None, device="meta",
                         dtype=weight.dtype)
    except (ValueError, TypeError, RuntimeError):
        return None
    conv.weight = weight
    if bias is not None:
        conv.bias = bias
    fields = {"weight": args["weight"].target}
    if bias is not None:
        fields["bias"] = args["bias"].target
    return conv, fields


def _read_only_here(ctx: PassContext, node: fx.Node, tensors: list[torch.Tensor], readers: dict) -> bool:
    """Whether no other node of the graph reads these tensors' values (every ``get_attr`` of them is
    used by ``node`` alone, or only for its shape): their in-place statistics update then has no
    reader to be ordered against, and no other call updates them.  ``readers``: id of each held
    tensor -> its ``get_attr`` nodes (filled on first use)."""
    if not readers:
        for other in ctx.gm.graph.nodes:
            if other.op == "get_attr":
                readers.setdefault(id(_lookup(ctx.gm, other.target)[2]), []).append(other)
    reads = [a for t in tensors for a in readers.get(id(t), ())]
    if any(u is not node and not reads_metadata(u) for a in reads for u in a.users):
        return False
    return sum(a in reads for a in node.all_input_nodes) == len(tensors)


def _batch_norm(ctx: PassContext, node: fx.Node, readers: dict) -> tuple[nn.Module, dict[str, str]] | None:
    names, defaults = _BN_ARGS[node.target]
    args = _bind(node, names, defaults)
    if args is None:
        return None
    y = _image(args["input"])
    training, momentum, eps = args["training"], args["momentum"], args["eps"]
    if y is None or type(training) is not bool or not all(_constant(v) for v in (momentum, eps)):
        return None
    if not (isinstance(momentum, numbers.Real) and isinstance(eps, numbers.Real)) or isinstance(momentum, bool):
        return None
    if "cudnn_enabled" in args and type(args["cudnn_enabled"]) is not bool:
        return None
    C = y.shape[1]
    affine = args["weight"] is not None
    track = args["running_mean"] is not None
    if (args["bias"] is not None) != affine or (args["running_var"] is not None) != track:
        return None
    weight, bias = (_whole(ctx, args[k], "p") for k in ("weight", "bias")) if affine else (None, None)
    mean, var = (_whole(ctx, args[k], "b") for k in ("running_mean", "running_var")) if track else (None, None)
    if affine and (weight is None or bias is None or weight is bias):
        return None
    if track and (mean is None or var is None or mean is var or not _read_only_here(ctx, node, [mean, var], readers)):
        return None
    if any(t is not None and tuple(t.shape) != (C,) for t in (weight, bias, mean, var)):
        return None
    # the mode: a stock BN follows .train()/.eval(), the captured call does not
    if track and (ctx.gm.meta.get(SERVED_TRAINING) is not training or ctx.gm.training is not training):
        return None
    if not track and not training:
        return None
    dtype = next((t.dtype for t in (weight, mean) if t is not None), y.dtype)
    bn = nn.BatchNorm2d(C, eps=float(eps), momentum=float(momentum), affine=affine, track_running_stats=track,
                        device="meta", dtype=dtype)
    fields = {}
    if affine:
        bn.weight, bn.bias = weight, bias
        fields.update(weight=args["weight"].target, bias=args["bias"].target)
    if track:
        bn._buffers["running_mean"], bn._buffers["running_var"] = mean, var
        bn._buffers["num_batches_tracked"] = None
        fields.update(running_mean=args["running_mean"].target, running_var=args["running_var"].target)
    bn.train(ctx.gm.training)
    return bn, fields


def functional_modules(ctx: PassContext) -> list[Rewrite]:
    gm = ctx.gm
    records, readers = [], {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CONV:
            found, prefix = _conv(ctx, node), "conv"
        elif node.target in _BN_ARGS:
            found, prefix = _batch_norm(ctx, node, readers), "bn"
        else:
            continue
        if found is None:
            continue
        module, fields = found
        object.__setattr__(module, TENSORS, fields)
        name = ctx.add_module(prefix, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0] if node.args else node.kwargs["input"],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        reads = ", ".join(fields.values()) or "batch statistics"
        records.append(Rewrite("functional_modules", "lowered", [node.name], call.name, True,
                               f"{type(module).__name__} on {reads}"))
    return records


functional_modules.name = "functional_modules"
functional_modules.exact = True
