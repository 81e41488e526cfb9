"""Python floats a captured graph reads as inputs: a new temperature costs no new capture.

A trace turns every Python number forward reads into a constant, which ``topofx.capture.guards`` then watches:
a change re-traces, and where the graph changes, captures and simplifies the whole model anew.  For a
float that only feeds tensor arithmetic -- SNAS's Gumbel temperature (``logits / self.temp``), an
auxiliary skip's decaying coefficient (``x * scheduler.decay_rate``) -- that is a capture per change
for what is, to the graph, a number fed in.  So such a float becomes an input instead: the trace reads
it as a 0-dim float64 tensor the graph module holds (``x / t`` follows the type promotion of ``x / v``:
a 0-dim tensor does not widen a dimensioned one), and before every call the guards' compiled check
compares the live Python value with the one the tensor holds and replaces the tensor when it moved
(a new object: a graph that saved the old one for its backward keeps it).

What decides is the trace itself (``topofx.capture``): each candidate float is installed where
forward reads it as a stand-in -- a traced value of its tensor -- and every operation on it is run on
meta tensors twice, once with the stand-in and once with the float, as eager runs it.  An operation
where the two disagree in type, dtype or shape (``self.temp > 0.5``, ``int_tensor * t``), a Python
need for the number (``if``, ``float()``, ``math.*``, ``range``) or a call of a module marks the float
:attr:`FloatInput.decides`; such a float stays a guarded constant, as before, and the model is traced
again without its stand-in.  Last, the captured graph is run at other values of its float inputs
against the eager model (``capture.verify_float_inputs``): a graph that does not follow them keeps
them constant.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .reads import MISSING, Read, plain_object, resolve


class FloatInput:
    """One Python float that forward reads (``steps`` from ``root``, as :class:`topofx.capture.reads.Read` spells
    access paths) and that the graph reads as the 0-dim float64 tensor ``graph_module.<target>``."""

    def __init__(self, read: Read):
        self.read = read
        self.target = ""  # the graph module's attribute holding the tensor (set when traced)
        self.decides = False  # used otherwise than as a tensor operand: stays a constant
        self.last: Any = read.value()  # the float object the tensor holds the value of

    @property
    def key(self) -> tuple:
        """Where the float lives: the root object's id and the access path."""
        return (id(self.read.root), self.read.steps)

    @property
    def where(self) -> str:
        return self.read.where

    def current(self) -> Any:
        """The value forward would read now (``MISSING`` when the path is gone)."""
        own = self.own_attribute()
        if own is not None:
            return vars(own[0]).get(own[1], MISSING)
        return resolve(self.read.root, self.read.steps)

    def own_attribute(self) -> tuple[Any, str] | None:
        """``(owner, name)`` where the float is an object's own attribute (a module's ``self.temp``): read
        from its ``__dict__``, no user code (the guards' compiled check reads it so inline); else ``None``."""
        steps = self.read.steps
        return (self.read.root, steps[0][1]) if len(steps) == 1 and steps[0][0] == "attr" else None

    def tensor(self) -> torch.Tensor:
        """The graph's view of the float: a 0-dim float64 CPU tensor (a CPU scalar combines with tensors
        on any device, and ``.to()`` of the graph module leaves it alone)."""
        return torch.tensor(self.last, dtype=torch.float64, device="cpu")

    def refresh(self, holder: nn.Module) -> bool:
        """Give ``holder.<target>`` the live value; ``False`` when it is no float any more (an int, None:
        the graph must be captured anew)."""
        value = self.current()
        if type(value) is not float:
            return False
        if value is not self.last:
            same = value == self.last or (math.isnan(value) and math.isnan(self.last))
            self.last = value
            if not same:
                holder.__dict__[self.target] = self.tensor()
        return True

    def install(self, value: Any) -> None:
        """Put ``value`` where forward reads the float (the stand-in while tracing, the float after)."""
        *above, (kind, key) = self.read.steps
        container = resolve(self.read.root, tuple(above))
        if kind == "attr":  # through __dict__: no __setattr__ of the user's runs
            vars(container)[key] = value
        else:
            container[key] = value


def _installable(read: Read, library: Callable[[str], bool]) -> bool:
    """Whether the float at ``read`` sits where a stand-in can take its place for a trace: an
    instance attribute of a module or of an object not of torch's or topofx's classes (``library``
    tells their files), or an item of a dict or list (not a class attribute, a tuple's item, a property)."""
    steps = read.steps
    if not steps or any(kind == "type" for kind, _ in steps):
        return False
    *above, (kind, key) = steps
    container = resolve(read.root, tuple(above))
    if container is MISSING:
        return False
    if kind == "item":
        return type(container) in (dict, list)
    if not hasattr(container, "__dict__") or key not in vars(container) or isinstance(container, type):
        return False
    return isinstance(container, nn.Module) or plain_object(container, library)


def candidates(modules: list[nn.Module], reads: list[Read], internal: frozenset[str], library: Callable[[str], bool],
               constant: set[tuple]) -> list[FloatInput]:
    """The floats a trace may read as inputs: every ``float`` attribute of the modules whose forward was
    traced (``internal``: nn.Module's own fields), and every float forward read from elsewhere
    (``reads``) that a stand-in can replace -- less those known to be used as numbers (``constant``)."""
    found: dict[tuple, FloatInput] = {}

    def add(read: Read) -> None:
        candidate = FloatInput(read)
        if candidate.key not in constant:
            found.setdefault(candidate.key, candidate)

    for module in dict.fromkeys(modules):
        for name, value in vars(module).items():
            if type(value) is float and name not in internal:
                add(Read(module, (("attr", name),), f"{type(module).__name__}.{name}"))
    for read in reads:
        if type(read.value()) is float and _installable(read, library):
            add(read)
    return list(found.values())


def perturbed(value: float) -> float:
    """Another value to run the graph at (same sign, not 1 or 0 where the float was)."""
    return value * 1.5 + 0.25 if value >= 0 else value * 1.5 - 0.25
