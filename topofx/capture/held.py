"""Tensors a module holds outside its parameters and buffers -- in lists, dicts and plain objects
(``self.alphas[i]``, an edge's data record) -- are registered as buffers for the duration of a trace, so
the graph reads them live (``get_attr``) instead of baking their values in."""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn

from .frames import _reads_nothing
from .reads import plain_object

_MODULE_FIELDS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, hooks


Path = tuple  # of steps ("attr", name) / ("item", key), as topofx.capture.reads spells access paths


_HELD_DEPTH = 6  # containers and plain objects walked below a module attribute (NASLib: graph -> edge -> data)


def _held_tensors(module: nn.Module, named: set[int]) -> Iterator[tuple[Path, torch.Tensor]]:
    """(path, tensor) of every tensor ``module`` holds below a non-module attribute, through lists,
    tuples, dicts (int or str keys) and plain objects' ``__dict__``s -- ``self.alphas[i]``, NASLib's
    ``self._adj[u][v]._private["alpha"]`` -- that no module holds by name (``named``: read by that name)."""
    seen: set[int] = set()

    def walk(obj: Any, path: Path, depth: int) -> Iterator[tuple[Path, torch.Tensor]]:
        if id(obj) in seen or depth > _HELD_DEPTH:
            return
        seen.add(id(obj))
        if type(obj) is dict:
            items = ((("item", k), v) for k, v in obj.items() if isinstance(k, (int, str)))
        elif type(obj) in (list, tuple):
            items = ((("item", i), v) for i, v in enumerate(obj))
        elif plain_object(obj, _reads_nothing):  # an edge's data record
            items = ((("attr", k), v) for k, v in vars(obj).items())
        else:
            return
        for step, value in list(items):
            if isinstance(value, torch.Tensor):
                if id(value) not in named:
                    yield (*path, step), value
            elif not (type(obj) is tuple and type(value) is tuple):  # a tuple is replaced in its parent
                yield from walk(value, (*path, step), depth + 1)

    for name, value in list(vars(module).items()):
        if name not in _MODULE_FIELDS and not isinstance(value, (torch.Tensor, nn.Module)):
            yield from walk(value, (("attr", name),), 1)


def _slot(module: nn.Module, path: Path) -> str:
    """A fresh attribute name for a held tensor: ``topofx_held_`` + its path (``alphas_0``)."""
    return _free_name(module, "topofx_held_" + re.sub(r"\W", "_", "_".join(str(key) for _, key in path)))


def held_at(module: nn.Module, path: Path) -> Any:
    """What ``module`` holds at ``path``: attributes through ``__dict__``, items by key (no user code runs)."""
    obj: Any = module
    for kind, key in path:
        obj = vars(obj)[key] if kind == "attr" else obj[key]
    return obj


def _put(container: Any, step: tuple[str, Any], value: Any) -> None:
    """``container``'s element at ``step`` becomes ``value`` (a module's or plain object's attribute
    without ``__setattr__``: no registration, no user code)."""
    kind, key = step
    if kind == "attr":
        object.__setattr__(container, key, value) if isinstance(container, nn.Module) else vars(container).__setitem__(key, value)
    else:
        container[key] = value


@contextlib.contextmanager
def _loose_tensors_as_buffers(model: nn.Module, read: Callable[[str], Any]) -> Iterator[tuple[list[str], list, Callable]]:
    """Register plain tensor attributes as buffers (same objects) while tracing, so the graph reads them
    by name (live ``get_attr``) instead of freezing them as constants: plain-tensor alphas, masks that
    pruning or projection re-assign (``self._mask = new``, followed by ``topofx.capture.guards``).  Tensors
    held below an attribute, in lists, tuples, dicts or plain objects (``self.alphas[i]`` appended per
    edge; an edge record in a graph-based model), are registered as ``topofx_held_<path>`` (parameters
    as parameters) and recorded in ``gm.meta[HELD]``, so that the guards follow an element the training
    loop replaces; while the trace runs, each sits at its place as its ``get_attr`` value.  A plain tensor
    attribute that forward rebinds (ISTA-NAS's ``self.alphas_normal = torch.cat(...) - bias`` on every call)
    is left as forward wrote it, for the caller to see (a graph cannot replay the write; putting the old
    tensor back hid it, and a later call reading the attribute got a stale value).  One that a
    module also holds by name (``self._arch_parameters = [self.alphas_normal, ...]``) gets its slot as a
    plain attribute, not registered: FX finds the name of a registered tensor read by attribute by identity,
    so a second registration made the trace depend on the registration order; without a slot, forward
    reading it through the container (Beta-DARTS's NAS-Bench-1Shot1 ``self._arch_parameters[0]``) baked it in."""
    moved: list[tuple[nn.Module, str, torch.Tensor]] = []
    held: list[tuple[nn.Module, str, Path]] = []
    named = {id(t) for m in model.modules()  # also held by name (`self._arch_parameters = [self.alphas, ...]`)
             for t in (*m._parameters.values(), *m._buffers.values(), *vars(m).values()) if isinstance(t, torch.Tensor)}
    for prefix, module in model.named_modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                del module.__dict__[name]
                module.register_buffer(name, value, persistent=False)
                moved.append((module, f"{prefix}.{name}" if prefix else name, value))
        for path, tensor in list(_held_tensors(module, set())):
            slot = _slot(module, path)
            if id(tensor) in named:  # a plain attribute: FX maps a tensor read by name to the one name it is registered under
                object.__setattr__(module, slot, tensor)
            else:
                (module._parameters if isinstance(tensor, nn.Parameter) else module._buffers)[slot] = tensor
            held.append((module, f"{prefix}.{slot}" if prefix else slot, path))
    replaced: list[tuple[Any, tuple[str, Any], Any]] = []  # (container, step, original), innermost last

    def install() -> None:  # once the tracer has its graph: forward reads get_attr nodes at the tensors' places
        for module, qualified, path in held:
            *above, step = path
            parent = held_at(module, tuple(above))
            if type(parent) is tuple:  # immutable: a copy takes its place in the grandparent
                *top, tuple_step = above
                grandparent = held_at(module, tuple(top))
                copy_ = list(parent)
                copy_[step[1]] = read(qualified)
                replaced.append((grandparent, tuple_step, parent))
                _put(grandparent, tuple_step, tuple(copy_))
            else:
                replaced.append((parent, step, held_at(parent, (step,))))
                _put(parent, step, read(qualified))
    try:
        yield [qualified for _, qualified, _ in moved], [(q, m, p) for m, q, p in held], install
    finally:
        for container, step, original in reversed(replaced):
            _put(container, step, original)
        for module, qualified, value in moved:
            name = qualified.rsplit(".", 1)[-1]
            written = module._buffers.pop(name, None)
            object.__setattr__(module, name, value if written is None else written)
        for module, qualified, _ in held:
            slot = qualified.rsplit(".", 1)[-1]
            module._parameters.pop(slot, None)
            module._buffers.pop(slot, None)
            module.__dict__.pop(slot, None)


def tensors_held(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor a module of ``model`` holds outside its parameters and buffers: plain tensor attributes
    and tensors in containers (what :func:`_loose_tensors_as_buffers` registers).  A check's training step
    restores them (values and gradients) even where the graph does not read them: a method or module that
    runs per call reads them as written (DARTS-PT's alphas in a dict, read by ``get_projected_weights``)."""
    found = {id(t): t for m in model.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)}
    for module in model.modules():
        found.update((id(t), t) for _, t in _held_tensors(module, set(found)))
    return [t for t in found.values() if t.grad_fn is None]  # a result with history (a kept clone) is no state


def erase_unread(graph: fx.Graph, targets: set[str], decided: set[fx.Node]) -> None:
    """Erase the ``get_attr`` nodes of held tensors that the graph does not read: every held tensor sits at
    its place as a ``get_attr`` while forward runs, read or not, and one forward never reads (SmoothDARTS's
    ``_saved_arch_parameters``, clones kept across the step, with autograd history) is no part of the graph.
    A node nothing uses but a Python decision took on (``if self.flags[k]:``, in ``decided``) is read."""
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in targets and not node.users and node not in decided:
            graph.erase_node(node)


def _attribute_names(module: nn.Module) -> set[str]:
    return {*vars(module), *module._parameters, *module._buffers, *module._modules}


def _free_name(model: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first name ``model`` holds nothing under."""
    names, name, n = _attribute_names(model), base, 1
    while name in names:
        name, n = f"{base}_{n}", n + 1
    return name
