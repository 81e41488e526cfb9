"""One canonical signature of a module's output-relevant configuration.

Every pass that shares, fuses or merges modules compares modules with :func:`module_config`, so a
setting that changes a module's output (``padding_mode``, ``groups``, a BN's ``momentum=None``, ...)
can never be overlooked by one pass and honoured by another.

Only what the signature can vouch for qualifies: a *stock* ``torch.nn`` class (exact type, so a user
subclass with its own ``forward`` never does), no hooks of its own, and no instance attribute beyond
the class's declared configuration (``__constants__``, which TorchScript relies on to hold exactly the
values ``forward`` reads) -- an instance ``forward`` override, a parametrization, a ``weight_norm``
pre-hook or an attribute set by user code makes the module unknown, and unknown modules are never
shared, fused or merged.
"""
from __future__ import annotations

from typing import Hashable, Iterable

import torch
from torch import nn

# instance attributes every nn.Module has, and ones stock classes set besides __constants__
_MODULE_INTERNALS = {"training"}
_DERIVED = {nn.modules.conv._ConvNd: {"transposed"}}
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _plain(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _declared(cls: type) -> set[str]:
    names = set(getattr(cls, "__constants__", ())) | _MODULE_INTERNALS
    for base, extra in _DERIVED.items():
        if issubclass(cls, base):
            names |= extra
    return names


def is_stock(module: nn.Module) -> bool:
    """A ``torch.nn`` class (not a subclass defined elsewhere) without hooks of its own."""
    cls = type(module)
    return (
        cls.__module__.startswith("torch.nn.modules.")
        and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        and not getattr(module, "_backward_pre_hooks", None)
    )


def module_config(module: nn.Module, ignore: Iterable[str] = ()) -> Hashable | None:
    """``(type, settings, tensors)`` of a stock module, or ``None`` when it cannot be vouched for.

    ``settings`` are all public instance attributes but ``ignore`` (which a pass handles itself,
    e.g. ``out_channels`` for a concatenation); ``tensors`` are the presence, dtype, device and
    ``requires_grad`` of every parameter and buffer slot (``bias=None`` included).
    """
    if not is_stock(module):
        return None
    declared = _declared(type(module))
    settings = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_"):
            continue
        if key not in declared or not _plain(value):
            return None  # an attribute the signature cannot vouch for (instance forward, user data, ...)
        if key not in ignore:
            settings.append((key, value))
    tensors = tuple(
        (kind, name, None if t is None else (t.dtype, t.device, t.requires_grad))
        for kind, table in (("p", module._parameters), ("b", module._buffers))
        for name, t in sorted(table.items())
    )
    return (type(module), tuple(settings), tensors)
