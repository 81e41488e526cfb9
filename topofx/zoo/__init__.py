"""Registry of built-in one-shot NAS supernets used by tests, examples and benchmarks.

Why: every rewrite in topofx has to be checked against real, *unmodified* supernets written in the
styles found in the wild. This registry gives each of them a short name and builds it, with a
deterministic initialisation and example inputs, in one call::

    model, inputs = topofx.zoo.build("darts-orig")
    out = model(*inputs)

Names:

* ``nb201-darts`` / ``nb201-gdas``: xautodl's NAS-Bench-201 ``TinyNetworkDarts`` / ``TinyNetworkGDAS``
  (forward returns ``(features, logits)``; GDAS picks ops with ``.item()`` and is not traceable);
* ``darts-space`` / ``darts-space-gdas``: xautodl's ``NASNetworkDARTS`` / ``NASNetworkGDAS`` on the
  DARTS search space (NASNet macro skeleton, forward returns ``(features, logits)``);
* ``darts-orig``: original-DARTS style network, arch weights as plain tensors (:mod:`.darts_style`);
* ``pcdarts``: partial channels + edge normalization (:mod:`.pcdarts_style`);
* ``snas``: Gumbel-softmax relaxed samples drawn in forward (:mod:`.snas_style`);
* ``gdas-style``: hard straight-through samples, selected op only (:mod:`.gdas_style`).

The xautodl models need the optional ``xautodl`` package; it is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

__all__ = ["names", "build", "describe", "ZooEntry"]


@dataclass(frozen=True)
class ZooEntry:
    """How to build one supernet: a factory taking the (validated) keyword arguments."""

    name: str
    description: str
    factory: Callable[..., nn.Module]
    defaults: Dict[str, Any] = field(default_factory=dict)
    # keyword arguments a caller may override; None means "any of the defaults"
    overridable: Tuple[str, ...] | None = None

    def allowed(self) -> Tuple[str, ...]:
        return tuple(self.defaults) if self.overridable is None else self.overridable


# ---------------------------------------------------------------------------------------------
# factories
# ---------------------------------------------------------------------------------------------
def _nb201(cls_name: str, **kw: Any) -> nn.Module:
    from xautodl.models import cell_searchs
    from xautodl.models.cell_operations import NAS_BENCH_201

    cls = getattr(cell_searchs, cls_name)
    return cls(C=kw["C"], N=kw["N"], max_nodes=kw["max_nodes"], num_classes=kw["num_classes"],
               search_space=NAS_BENCH_201, affine=kw["affine"],
               track_running_stats=kw["track_running_stats"])


def _nasnet(cls_name: str, **kw: Any) -> nn.Module:
    from xautodl.models import cell_searchs
    from xautodl.models.cell_operations import DARTS_SPACE

    cls = getattr(cell_searchs, cls_name)
    return cls(C=kw["C"], N=kw["N"], steps=kw["steps"], multiplier=kw["multiplier"],
               stem_multiplier=kw["stem_multiplier"], num_classes=kw["num_classes"],
               search_space=DARTS_SPACE, affine=kw["affine"],
               track_running_stats=kw["track_running_stats"])


def _darts_orig(**kw: Any) -> nn.Module:
    from .darts_style import Network

    return Network(**kw)


def _pcdarts(**kw: Any) -> nn.Module:
    from .pcdarts_style import Network

    return Network(**kw)


def _snas(**kw: Any) -> nn.Module:
    from .snas_style import Network

    return Network(**kw)


def _gdas_style(**kw: Any) -> nn.Module:
    from .gdas_style import TinyGDAS

    return TinyGDAS(**kw)


_NB201_DEFAULTS = dict(C=16, N=5, max_nodes=4, num_classes=10, affine=False,
                       track_running_stats=True)
_NASNET_DEFAULTS = dict(C=8, N=2, steps=4, multiplier=4, stem_multiplier=3, num_classes=10,
                        affine=False, track_running_stats=True)

_REGISTRY: Dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("nb201-darts",
                 "xautodl TinyNetworkDarts on NAS-Bench-201 (C=16, N=5); returns (features, logits)",
                 lambda **kw: _nb201("TinyNetworkDarts", **kw), _NB201_DEFAULTS, ("C", "N")),
        ZooEntry("nb201-gdas",
                 "xautodl TinyNetworkGDAS on NAS-Bench-201 (C=16, N=5); hard Gumbel, .item(), "
                 "not traceable; returns (features, logits)",
                 lambda **kw: _nb201("TinyNetworkGDAS", **kw), _NB201_DEFAULTS, ("C", "N")),
        ZooEntry("darts-space",
                 "xautodl NASNetworkDARTS on the DARTS space (C=8, N=2, 4 steps); "
                 "returns (features, logits)",
                 lambda **kw: _nasnet("NASNetworkDARTS", **kw), _NASNET_DEFAULTS, ("C", "N")),
        ZooEntry("darts-space-gdas",
                 "xautodl NASNetworkGDAS on the DARTS space (C=8, N=2, 4 steps); hard Gumbel, "
                 "not traceable; returns (features, logits)",
                 lambda **kw: _nasnet("NASNetworkGDAS", **kw), _NASNET_DEFAULTS, ("C", "N")),
        ZooEntry("darts-orig",
                 "original-DARTS style network, plain-tensor alphas (C=8, 5 cells, 4 steps); "
                 "returns logits",
                 _darts_orig, dict(C=8, num_classes=10, layers=5, steps=4, multiplier=4,
                                   stem_multiplier=3)),
        ZooEntry("pcdarts",
                 "PC-DARTS style network, partial channels k=4 + edge-normalization betas "
                 "(C=8, 5 cells); returns logits",
                 _pcdarts, dict(C=8, num_classes=10, layers=5, steps=4, multiplier=4,
                                stem_multiplier=3, k=4)),
        ZooEntry("snas",
                 "SNAS style network, Gumbel-softmax weights sampled in forward "
                 "(C=8, 5 cells, 3 steps); returns logits",
                 _snas, dict(C=8, num_classes=10, layers=5, steps=3, multiplier=3,
                             stem_multiplier=3, temp=1.0)),
        ZooEntry("gdas-style",
                 "GDAS style NB201-like network, hard one-hot sample, selected op only via "
                 ".item() (C=8, N=2); returns logits",
                 _gdas_style, dict(C=8, N=2, max_nodes=4, num_classes=10, affine=False,
                                   track_running_stats=True)),
    ]
}


def names() -> List[str]:
    """Names of all built-in supernets, in registry order."""
    return list(_REGISTRY)


def _entry(name: str) -> ZooEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown supernet {name!r}; available: {', '.join(names())}") from None


def describe(name: str) -> str:
    """One-line description of a built-in supernet."""
    return _entry(name).description


def build(name: str, *, batch_size: int = 2, image_size: int = 32, seed: int = 0,
          **overrides: Any) -> Tuple[nn.Module, Tuple[torch.Tensor, ...]]:
    """Build supernet ``name`` in train mode, with example inputs.

    Parameters and architecture weights are initialised under ``torch.manual_seed(seed)`` (the
    global RNG state is restored afterwards); inputs are standard-normal of shape
    ``(batch_size, 3, image_size, image_size)`` drawn from a generator seeded with ``seed``.
    ``overrides`` replace constructor arguments (for the xautodl models only ``C`` and ``N``).
    """
    entry = _entry(name)
    allowed = entry.allowed()
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise TypeError(f"{name}: cannot override {bad}; allowed: {list(allowed)}")
    kwargs = {**entry.defaults, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory(**kwargs)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    return model, (x,)


_NB201_ALL_CONV3 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"


def build_child(name: str, *, batch_size: int = 2, image_size: int = 32, seed: int = 0,
                **overrides: Any) -> Tuple[nn.Module, Tuple[torch.Tensor, ...]] | None:
    """The benchmark's floor: one child network of supernet ``name`` with every edge a 3x3 conv
    (what a simplified supernet approaches), or ``None`` where the zoo has no child for it.

    NAS-Bench-201 names: xautodl's ``TinyNetwork`` with every edge ``nor_conv_3x3``, same C and N.
    """
    if not name.startswith("nb201"):
        return None
    from xautodl.models.cell_infers.tiny_network import TinyNetwork
    from xautodl.models.cell_searchs.genotypes import Structure

    kwargs = {**_entry(name).defaults, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyNetwork(kwargs["C"], kwargs["N"], Structure.str2structure(_NB201_ALL_CONV3), kwargs.get("num_classes", 10))
    model.train()
    gen = torch.Generator().manual_seed(seed)
    return model, (torch.randn(batch_size, 3, image_size, image_size, generator=gen),)
