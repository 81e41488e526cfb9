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
* ``gdas-style``: hard straight-through samples, selected op only (:mod:`.gdas_style`);
* ``pdarts``: P-DARTS stage 1, per-edge candidates from ``switches``, ``Dropout`` after skip
  connections, a legacy-constructor ``Zero`` (:mod:`.pdarts_style`);
* ``snas-full``: SNAS as its authors' code writes it: hand-written Gumbel noise, an ``nn.Softmax``
  built in ``forward``, a NumPy resource penalty; returns ``(logits, penalty)``
  (:mod:`.snas_full_style`);
* ``drnas-nb201`` / ``drnas-darts``: Dirichlet-sampled weights (``rsample``) on NAS-Bench-201 and on
  the DARTS space, ``if not w == 0`` joins (:mod:`.drnas_style`);
* ``darts-pt``: DARTS-PT's projection state (``candidate_flags``, ``proj_weights``) and its
  ``if w != 0`` join (:mod:`.dartspt_style`);
* ``darts-pt-projected``: the same, with half of each cell type's edges projected (``project_op``);
* ``hard-gumbel``: ``F.gumbel_softmax(hard=True)`` redrawn every call, ``abs(w) > 1e-10`` joins
  (:mod:`.hardgumbel_style`);
* ``snas-nb201``: SNAS's Gumbel-softmax sample on the NAS-Bench-201 cell (:mod:`.snas_nb201_style`);
* ``pcdarts-nb201``: PC-DARTS's partial channels and edge normalization on the NAS-Bench-201 cell
  (:mod:`.pcdarts_nb201_style`);
* ``path-arg``: NASP-style ``forward(x, updateType='alpha')`` choosing softmax or one-hot weights
  (:mod:`.patharg_style`).

The defaults of the models from ``pdarts`` on are their papers' search sizes (``topofx bench`` runs
the defaults); tests pass small overrides.

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


def _pdarts(**kw: Any) -> nn.Module:
    from .pdarts_style import Network

    return Network(**kw)


def _snas_full(**kw: Any) -> nn.Module:
    from .snas_full_style import Network

    return Network(**kw)


def _drnas_nb201(**kw: Any) -> nn.Module:
    from .drnas_style import TinyNetworkDrNAS

    return TinyNetworkDrNAS(**kw)


def _drnas_darts(**kw: Any) -> nn.Module:
    from .drnas_style import NetworkDrNAS

    return NetworkDrNAS(**kw)


def _darts_pt(**kw: Any) -> nn.Module:
    from .dartspt_style import DartsNetworkProj

    return DartsNetworkProj(**kw)


def _darts_pt_projected(projected: int = 7, **kw: Any) -> nn.Module:
    """DARTS-PT midway through its projection phase: the first ``projected`` edges of both cell types
    fixed to one operation each (``project_op``), the others still searched."""
    model = _darts_pt(**kw)
    for cell_type in ("normal", "reduce"):
        for eid in range(projected):
            model.project_op(eid, 1 + eid % (model.num_ops - 1), cell_type)  # never 'none'
    return model


def _hard_gumbel(**kw: Any) -> nn.Module:
    from .hardgumbel_style import Network

    return Network(**kw)


def _snas_nb201(**kw: Any) -> nn.Module:
    from .snas_nb201_style import TinyNetworkSNAS

    return TinyNetworkSNAS(**kw)


def _pcdarts_nb201(**kw: Any) -> nn.Module:
    from .pcdarts_nb201_style import TinyNetworkPCDARTS

    return TinyNetworkPCDARTS(**kw)


def _path_arg(**kw: Any) -> nn.Module:
    from .patharg_style import TinyNetworkPathArg

    return TinyNetworkPathArg(**kw)


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
                 lambda **kw: _nasnet("NASNetworkDARTS", **kw), _NASNET_DEFAULTS, ("C", "N", "steps", "multiplier")),
        ZooEntry("darts-space-gdas",
                 "xautodl NASNetworkGDAS on the DARTS space (C=8, N=2, 4 steps); hard Gumbel, "
                 "not traceable; returns (features, logits)",
                 lambda **kw: _nasnet("NASNetworkGDAS", **kw), _NASNET_DEFAULTS, ("C", "N", "steps", "multiplier")),
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
        ZooEntry("pdarts",
                 "P-DARTS stage 1: switches, Dropout(p) after skip_connect, legacy-constructor "
                 "Zero, plain-tensor alphas (C=16, 5 cells, p=0.1); returns logits",
                 _pdarts, dict(C=16, num_classes=10, layers=5, steps=4, multiplier=4,
                               stem_multiplier=3, switches_normal=None, switches_reduce=None,
                               p=0.1)),
        ZooEntry("snas-full",
                 "SNAS (authors' code): uniform_ Gumbel noise, nn.Softmax built in forward, "
                 "NumPy resource penalty (C=16, 8 cells); returns (logits, penalty)",
                 _snas_full, dict(C=16, num_classes=10, layers=8, steps=4, multiplier=4,
                                  stem_multiplier=3, temp=1.0, drop_path_prob=0.0,
                                  use_ckpt=False, resource_lambda=1e-2)),
        ZooEntry("drnas-nb201",
                 "DrNAS on NAS-Bench-201: Dirichlet(elu(alpha)+1).rsample() per edge, "
                 "'if not w == 0' join (C=16, N=5); returns logits",
                 _drnas_nb201, dict(C=16, N=5, max_nodes=4, num_classes=10, affine=False,
                                    track_running_stats=True, k=1)),
        ZooEntry("drnas-darts",
                 "DrNAS on the DARTS space: Dirichlet-sampled plain-tensor alphas, "
                 "'if not w == 0' join (C=16, 8 cells, 4 steps); returns logits",
                 _drnas_darts, dict(C=16, num_classes=10, layers=8, steps=4, multiplier=4,
                                    stem_multiplier=3, k=1)),
        ZooEntry("darts-pt",
                 "DARTS-PT: projection state (candidate_flags, proj_weights), 'if w != 0' join, "
                 "optional weights_dict argument (C=16, 8 cells); returns logits",
                 _darts_pt, dict(C=16, num_classes=10, layers=8, steps=4, multiplier=4,
                                 stem_multiplier=3)),
        ZooEntry("darts-pt-projected",
                 "DARTS-PT midway through projection: 7 of 14 edges per cell type projected onto one "
                 "operation (C=16, 8 cells); returns logits",
                 _darts_pt_projected, dict(C=16, num_classes=10, layers=8, steps=4, multiplier=4,
                                           stem_multiplier=3, projected=7)),
        ZooEntry("hard-gumbel",
                 "hard Gumbel-softmax samples every call, 'abs(w) > 1e-10' join runs the "
                 "selected op only (C=16, 8 cells, DARTS space); returns logits",
                 _hard_gumbel, dict(C=16, num_classes=10, layers=8, steps=4, multiplier=4,
                                    stem_multiplier=3, tau=10.0, loop_join=False)),
        ZooEntry("snas-nb201",
                 "SNAS on NAS-Bench-201: Gumbel-softmax edge weights sampled in forward, "
                 "'op(x) * w' join (C=8, N=1); returns logits",
                 _snas_nb201, dict(C=8, N=1, max_nodes=4, num_classes=10, affine=False,
                                   track_running_stats=True, temp=1.0)),
        ZooEntry("pcdarts-nb201",
                 "PC-DARTS on NAS-Bench-201: partial channels k=4 + edge-normalization betas "
                 "(C=8, N=1); returns logits",
                 _pcdarts_nb201, dict(C=8, N=1, max_nodes=4, num_classes=10, affine=False,
                                      track_running_stats=True, k=4)),
        ZooEntry("path-arg",
                 "NASP-style forward(x, updateType='alpha'): softmax or straight-through one-hot "
                 "weights by argument (NAS-Bench-201, C=16, N=5); returns logits",
                 _path_arg, dict(C=16, N=5, max_nodes=4, num_classes=10, affine=False,
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
    ``overrides`` replace constructor arguments (for the xautodl models only ``C`` and ``N``, and
    ``steps``/``multiplier`` on the DARTS space).
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
