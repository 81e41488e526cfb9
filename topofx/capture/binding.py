"""A forward's call signature: binding a call's arguments, the key of the graph a call takes (one graph
per choice of non-tensor arguments), and specializing a traced graph to those choices."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn


@functools.lru_cache(maxsize=None)
def _method_signature(function: Callable[..., Any]) -> inspect.Signature:
    signature = inspect.signature(function)
    return signature.replace(parameters=list(signature.parameters.values())[1:])  # without `self`


def forward_signature(model: nn.Module) -> inspect.Signature:
    """``model.forward``'s signature, computed once per forward function (every call binds to it)."""
    forward = model.forward
    function = getattr(forward, "__func__", None)
    return _method_signature(function) if function is not None else inspect.signature(forward)


def bind_call(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> inspect.BoundArguments:
    """``model.forward``'s parameters bound to a call's arguments, defaults filled in."""
    bound = forward_signature(model).bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    return bound


def call_key(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> tuple | None:
    """What selects a captured graph for a call of ``model``: the type and value of every non-tensor
    argument (defaults included) and which arguments are tensors; ``None`` when a value cannot be
    compared by hash (a list, a dict).  Raises ``TypeError`` when the call does not fit ``forward``."""
    if has_var_args(model):
        items = [*enumerate(args), *sorted((kwargs or {}).items())]
    else:
        items = list(bind_call(model, args, kwargs).arguments.items())
    key = tuple((name, "tensor") if isinstance(v, torch.Tensor) else (name, type(v), v) for name, v in items)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def tensors_in_containers(concrete: dict[str, Any]) -> list[str]:
    """The non-tensor arguments that hold tensors in a list, tuple or dict (Shapley-NAS's
    ``weights_dict={'normal': w, 'reduce': w}``): a graph is specialized to the value of each non-tensor
    argument, and tensors cannot be written into its code (FX's code generation raised a SyntaxError)."""
    return [name for name, value in concrete.items() if isinstance(value, (list, tuple, dict))
            and any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))]


def has_var_args(model: nn.Module) -> bool:
    kinds = {p.kind for p in forward_signature(model).parameters.values()}
    return bool(kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD})


def _specialize(graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """Name the placeholders of specialized (non-tensor) arguments after their parameters, so the
    graph module takes the original's keywords; FX's ``_assert`` on each value stays in the graph."""
    for node in graph.nodes:
        if node.op == "placeholder":
            name = node.target.rsplit("_", 1)[0] if node.target not in concrete else node.target
            if name in concrete and node.target != name:
                node.target = name
