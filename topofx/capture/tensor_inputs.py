"""Tensors with autograd history that forward reads where a module holds them: inputs of the graph.

An optimizer's step may compute the architecture's weights before the call and store them where
forward reads them: NASLib's GDAS and DrNAS draw each edge's weights from its alpha (a Gumbel or
Dirichlet sample, with autograd history back to alpha) into the edge's data dict, a training step may
set a mixed op's ``self.weights``.  Such a tensor is a new one on every call.  Capture reads it, like
any tensor a module holds below an attribute, through a ``get_attr`` node at its place
(``capture.held._loose_tensors_as_buffers``); a :class:`TensorInput` makes that node an input:

* while tracing, its value is unknown at capture (no real value) and new on every call, as a random
  draw made in forward is: a Python decision on it is a per-candidate gate (GDAS's ``if i == argmax``,
  ``topofx.capture.gating``) or runs per call (the deciding method, as one node), never a value
  decision that would capture anew on every sample;
* before every call the guards' compiled check hands the graph the tensor forward would read now
  (:meth:`TensorInput.refresh`), so autograd runs from the output through it to alpha as eagerly;
  one of another shape, dtype or device, or none at all, captures anew;
* simplify's checks run several forward and backward passes on the one stored tensor, whose history
  allows one backward: while they run it is replaced, at its place and in the graph, by a leaf alias
  of itself (:func:`as_leaves`); the checks then compare the gradients with respect to it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

TENSOR_INPUTS = "topofx_tensor_inputs"  # GraphModule.meta key: the TensorInputs the graph reads
_STAND_IN = "_topofx_tensor_input"  # set on the leaf aliases of as_leaves: inputs still, while they stand in


def is_input(value: Any) -> bool:
    """A tensor with autograd history (computed before the call, from tensors that require grad), or
    the leaf that stands in for one while simplify checks the graph."""
    return isinstance(value, torch.Tensor) and (value.grad_fn is not None or getattr(value, _STAND_IN, False))


class TensorInput:
    """The tensor ``module`` holds at ``path`` (``("attr", name)`` / ``("item", key)`` steps, as
    :mod:`topofx.capture.reads` spells access paths), read by the graph as its attribute ``target``."""

    def __init__(self, target: str, module: nn.Module, path: tuple):
        self.target, self.module, self.path = target, module, path
        self.where = type(module).__name__ + "".join(f".{k}" if kind == "attr" else f"[{k!r}]" for kind, k in path)

    def current(self) -> Any:
        """What forward would read now (``None`` when the path is gone)."""
        obj: Any = self.module
        try:
            for kind, key in self.path:
                obj = vars(obj)[key] if kind == "attr" else obj[key]
        except (KeyError, IndexError, TypeError):
            return None
        return obj

    def refresh(self, gm: fx.GraphModule) -> bool:
        """Give the graph the tensor forward would read now; ``False`` when there is none, or one of
        another shape, dtype or device (the graph must be captured anew)."""
        now, held = self.current(), _value(gm, self.target)
        if now is held:
            return True
        if not (is_input(now) and isinstance(held, torch.Tensor) and now.shape == held.shape
                and now.dtype == held.dtype and now.device == held.device):
            return False
        _rebind(gm, self.target, now)
        return True

    def place(self, value: torch.Tensor) -> None:
        """Put ``value`` where forward reads the tensor (a tuple is replaced in its parent)."""
        *above, (kind, key) = self.path
        parent = _at(self.module, tuple(above))
        if type(parent) is tuple:
            *top, tuple_step = above
            items = list(parent)
            items[key] = value
            _put(_at(self.module, tuple(top)), tuple_step, tuple(items))
        else:
            _put(parent, (kind, key), value)


def _at(module: nn.Module, path: tuple) -> Any:
    obj: Any = module
    for kind, key in path:
        obj = vars(obj)[key] if kind == "attr" else obj[key]
    return obj


def _put(container: Any, step: tuple, value: Any) -> None:
    """Through ``__dict__`` for an attribute: no ``__setattr__`` of the user's (or nn.Module's) runs."""
    kind, key = step
    if kind == "attr":
        vars(container)[key] = value
    else:
        container[key] = value


def _owner(gm: fx.GraphModule, target: str) -> tuple[Any, str]:
    *path, field = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, field


def read_by(gm: fx.GraphModule, places: Sequence[tuple[str, nn.Module, tuple]]) -> list[TensorInput]:
    """The ``(target, module, path)`` places whose tensor the graph reads and that are inputs (:func:`is_input`)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    return [TensorInput(target, module, path) for target, module, path in places
            if target in read and is_input(_value(gm, target))]


@contextlib.contextmanager
def as_leaves(gm: fx.GraphModule) -> Iterator[None]:
    """While the block runs, each input of ``gm`` is a leaf copy of itself (no history, no shared version
    counter: a check that writes into it and restores it leaves the original untouched;
    ``requires_grad`` as the tensor's), at its place in the model and in ``gm`` (and in the graph
    modules copied from ``gm`` meanwhile): checks may run any number of backward passes and compare
    the gradients with respect to it.  One tensor at several places (a dict that edges share) gets one
    copy.  The tensors are put back after."""
    leaves: dict[int, torch.Tensor] = {}
    saved = []
    for tensor_input in gm.meta.get(TENSOR_INPUTS, ()):
        held = _value(gm, tensor_input.target)
        if not isinstance(held, torch.Tensor) or held.grad_fn is None:  # a leaf already (an outer block's)
            continue
        if id(held) not in leaves:
            leaves[id(held)] = held.detach().clone().requires_grad_(held.requires_grad)
            setattr(leaves[id(held)], _STAND_IN, True)
        placed = tensor_input.current() is held
        saved.append((tensor_input, held, placed))
        if placed:
            tensor_input.place(leaves[id(held)])
        _rebind(gm, tensor_input.target, leaves[id(held)])
    try:
        yield
    finally:
        for tensor_input, held, placed in reversed(saved):
            if placed:
                tensor_input.place(held)
            _rebind(gm, tensor_input.target, held)


def _value(gm: fx.GraphModule, target: str) -> Any:
    """The graph module's plain attribute ``target`` (capture un-registers what it read as buffers)."""
    owner, field = _owner(gm, target)
    return owner.__dict__.get(field)


def _rebind(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, field = _owner(gm, target)
    owner.__dict__[field] = value
