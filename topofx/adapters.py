"""Adapters: capture supernets whose forward samples the architecture in a way no tracer can follow.

GDAS draws a hard one-hot ``hardwts`` (straight-through Gumbel) and an ``index`` per edge, loops
until the sample is finite, and branches on ``index[e].item()`` to run only the selected op.  An
:class:`Adapter` splits such a forward into

* ``sample(model) -> dict[str, Tensor]`` -- the sampling, run eagerly as an opaque step before each
  call (it draws from the RNG exactly as the original forward does), and
* ``relaxed(model, *inputs, **samples)`` -- a traceable forward that writes each edge over all its
  candidates, each candidate as :func:`topofx.sparse.gate` ``(w, op(x), dead=...)``: what the original
  does with that candidate when it is not selected (GDAS on NAS-Bench-201 adds the bare weight;
  GDAS on the DARTS space adds nothing).

The graph then holds every candidate, and :class:`topofx.sparse.SparseForward` runs, per call, only
the selected ones: the forward value, every gradient (alpha's included) and the BN statistics are
GDAS's own, while prefix sharing and horizontal fusion still share the ReLUs and fuse the selected
convolutions of the edges leaving a node.  A relaxed forward written as a plain weighted sum
(``w * op(x)``) runs densely, with the weighted sum's gradient.  Adapters are looked up by model
class (the nearest registered base class wins); :func:`register_adapter` adds one for a user's model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .sparse import gate


@dataclasses.dataclass(frozen=True)
class Adapter:
    sample: Callable[[nn.Module], dict[str, torch.Tensor]]
    relaxed: Callable[..., Any]
    description: str = ""


_REGISTRY: dict[type, Adapter] = {}
_BUILTINS_LOADED = False


def register_adapter(cls: type, sample: Callable[[nn.Module], dict[str, torch.Tensor]], relaxed: Callable[..., Any],
                     description: str = "") -> None:
    """Register how to capture models of class ``cls`` (and its subclasses): ``sample(model)`` draws what
    the original's forward draws, as a dict of tensors; ``relaxed(model, *inputs, **samples)`` computes
    the forward from them, each candidate written as :func:`topofx.gate` ``(w, op(x), dead=...)`` so
    that only the selected ones run (a plain ``w * op(x)`` runs densely, in topo mode only)."""
    _REGISTRY[cls] = Adapter(sample, relaxed, description)


def adapter_for(model: nn.Module) -> Adapter | None:
    """The adapter registered for ``model``'s class or its nearest registered base class."""
    _load_builtins()
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def hard_gumbel_sample(alpha: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GDAS's straight-through hard Gumbel-softmax per row: ``(hardwts, index)``, redrawn until finite.

    Draws ``exponential_`` noise of ``alpha``'s shape, as GDAS does, so the same RNG state gives the
    same sample.  ``hardwts`` is one-hot in value and carries the gradient of the soft sample.
    """
    while True:
        gumbels = -torch.empty_like(alpha).exponential_().log()
        probs = F.softmax((alpha.log_softmax(dim=1) + gumbels) / tau, dim=1)
        index = probs.max(-1, keepdim=True)[1]
        hardwts = torch.zeros_like(probs).scatter_(-1, index, 1.0) - probs.detach() + probs
        if not (torch.isinf(gumbels).any() or torch.isinf(probs).any() or torch.isnan(probs).any()):
            return hardwts, index


def _nb201_gdas_sample(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"hardwts": hard_gumbel_sample(model.arch_parameters, model.tau)[0]}


def _nb201_gdas_relaxed(model: nn.Module, inputs: torch.Tensor, hardwts: torch.Tensor):
    """xautodl's ``TinyNetworkGDAS.forward`` after the sampling; each cell as ``forward_gdas`` computes
    it: ``w[k] * op_k(x)`` for the selected candidate, the bare ``w[k]`` for the others."""
    from xautodl.models.cell_searchs.search_cells import NAS201SearchCell

    feature = model.stem(inputs)
    for cell in model.cells:
        if isinstance(cell, NAS201SearchCell):
            nodes = [feature]
            for i in range(1, cell.max_nodes):
                edges = [(f"{i}<-{j}", nodes[j]) for j in range(i)]
                nodes.append(sum(sum(gate(hardwts[cell.edge2index[name]][k], op(x), dead="weight")
                                     for k, op in enumerate(cell.edges[name])) for name, x in edges))
            feature = nodes[-1]
        else:
            feature = cell(feature)
    out = model.global_pooling(model.lastact(feature))
    out = out.view(out.size(0), -1)
    return out, model.classifier(out)


def _nasnet_gdas_sample(model: nn.Module) -> dict[str, torch.Tensor]:
    normal = hard_gumbel_sample(model.arch_normal_parameters, model.tau)[0]
    reduce = hard_gumbel_sample(model.arch_reduce_parameters, model.tau)[0]
    return {"normal_hardwts": normal, "reduce_hardwts": reduce}


def _nasnet_gdas_relaxed(model: nn.Module, inputs: torch.Tensor, normal_hardwts: torch.Tensor,
                         reduce_hardwts: torch.Tensor):
    """xautodl's ``NASNetworkGDAS.forward`` after the sampling; each cell as ``forward_gdas`` computes it:
    ``op_k(h) * w[k]`` for the selected candidate only."""
    s0 = s1 = model.stem(inputs)
    for cell in model.cells:
        hardwts = reduce_hardwts if cell.reduction else normal_hardwts
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        for i in range(cell._steps):
            names = [(f"{i}<-{j}", h) for j, h in enumerate(states)]
            states.append(sum(sum(gate(hardwts[cell.edge2index[name]][k], op(h), dead="nothing")
                                  for k, op in enumerate(cell.edges[name]._ops)) for name, h in names))
        s0, s1 = s1, torch.cat(states[-cell._multiplier:], dim=1)
    out = model.global_pooling(model.lastact(s1))
    out = out.view(out.size(0), -1)
    return out, model.classifier(out)


def _load_builtins() -> None:
    """Adapters for xautodl's GDAS supernets, registered when xautodl is installed."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    try:
        from xautodl.models.cell_searchs import NASNetworkGDAS, TinyNetworkGDAS
    except ImportError:
        return
    register_adapter(TinyNetworkGDAS, _nb201_gdas_sample, _nb201_gdas_relaxed, "xautodl NAS-Bench-201 GDAS")
    register_adapter(NASNetworkGDAS, _nasnet_gdas_sample, _nasnet_gdas_relaxed, "xautodl DARTS-space GDAS")


class RelaxedForward(nn.Module):
    """``model`` with its sampling lifted out: the sampled tensors are attributes that the traced
    graph reads, set by :meth:`resample` before each call."""

    def __init__(self, model: nn.Module, adapter: Adapter):
        super().__init__()
        self.model = model
        self.__dict__["adapter"] = adapter
        with torch.random.fork_rng(devices=[]):  # the first sample only names the tensors
            first = adapter.sample(model)
        self.__dict__["sample_names"] = tuple(first)
        for name, value in first.items():
            setattr(self, name, value.detach().requires_grad_(value.requires_grad))  # a leaf: live, copyable

    def resample(self, target: nn.Module) -> None:
        """Draw a new sample from the original's parameters and store it on ``target``."""
        for name, value in self.adapter.sample(self.model).items():
            setattr(target, name, value)

    def release(self, target: nn.Module) -> None:
        """Detach the samples stored on ``target`` after a call (autograd keeps what backward needs), so
        the module holds no autograd history between calls and ``copy.deepcopy`` works."""
        for name in self.sample_names:
            value = getattr(target, name)
            setattr(target, name, value.detach().requires_grad_(value.requires_grad))

    def forward(self, inputs: Any) -> Any:  # one input, as the NAS supernets take (FX needs a fixed signature)
        return self.adapter.relaxed(self.model, inputs, **{n: getattr(self, n) for n in self.sample_names})
