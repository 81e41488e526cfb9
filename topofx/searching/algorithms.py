"""What each search algorithm does, in one table: supernet per space, kind of architecture step,
optimizers and schedules as its paper publishes them (sources in ``docs/search.md``).

The search loop (:mod:`.engine`) reads an :class:`Algorithm` and never branches on its name.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from torch import nn

__all__ = ["Hyper", "Algorithm", "ALGORITHMS", "SPACES", "gdas_tau", "snas_temperature", "algorithm"]

SPACES = ("nb201", "darts")

FIRST_ORDER = "first-order"  # gradient of the validation loss at the current weights (DARTS eq. 6 with xi = 0)
UNROLLED = "unrolled"  # DARTS-V2: one-step unrolled weights, finite-difference Hessian-vector product
SINGLE_LEVEL = "single-level"  # SNAS: weights and alphas descend the same training loss, one backward


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Optimizers of a search: SGD on the weights (cosine-annealed per epoch), Adam on the alphas."""

    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    w_nesterov: bool = False
    grad_clip: float = 5.0  # max gradient norm of the weights
    a_lr: float = 3e-4
    a_betas: tuple[float, float] = (0.5, 0.999)
    a_weight_decay: float = 1e-3
    a_grad_clip: float | None = None  # max gradient norm of the alphas (SNAS: 10)
    paper_epochs: int = 50
    paper_batch_size: int = 64


# A per-epoch hook: (model, epoch, epochs) -> the values it set, logged per epoch ({} when none).
EpochHook = Callable[[nn.Module, int, int], Mapping[str, float]]


def gdas_tau(epoch: int, epochs: int, tau_max: float = 10.0, tau_min: float = 0.1) -> float:
    """GDAS's temperature: linear from ``tau_max`` at the first epoch to ``tau_min`` at the last
    (xautodl's ``tau_max - (tau_max - tau_min) * epoch / (total_epoch - 1)``)."""
    if epochs <= 1:
        return tau_max
    return tau_min + (tau_max - tau_min) * (1 - epoch / (epochs - 1))  # the same line, exact at both ends


def snas_temperature(epoch: int, epochs: int, temp: float = 1.0, temp_min: float = 0.03) -> float:
    """SNAS's temperature (authors' ``Temp_Scheduler``, stepped before each epoch): linear from
    ``temp`` towards ``temp_min``, reaching it at the last epoch."""
    return max(temp_min, (1 - (epoch + 1) / epochs) * (temp - temp_min) + temp_min)


def _set_tau(model: nn.Module, epoch: int, epochs: int) -> Mapping[str, float]:
    tau = gdas_tau(epoch, epochs)
    model.set_tau(tau)
    return {"tau": tau}


def _set_temperature(model: nn.Module, epoch: int, epochs: int) -> Mapping[str, float]:
    temp = snas_temperature(epoch, epochs)
    model.set_temperature(temp)
    return {"temperature": temp}


def _no_hook(model: nn.Module, epoch: int, epochs: int) -> Mapping[str, float]:
    return {}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    title: str
    supernets: Mapping[str, str]  # space -> topofx.zoo name
    arch_step: str  # FIRST_ORDER, UNROLLED or SINGLE_LEVEL
    arch_first: bool  # the architecture step comes before the weight step of an iteration
    hyper: Hyper
    epoch_hook: EpochHook = _no_hook
    arch_warmup: float = 0.0  # fraction of the epochs with frozen alphas (PC-DARTS: 15 of 50)

    def warmup_epochs(self, epochs: int) -> int:
        return int(self.arch_warmup * epochs)


_DARTS = Hyper()
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in [
    Algorithm("darts-v1", "DARTS, first order (Liu, Simonyan & Yang, ICLR 2019)",
              {"nb201": "nb201-darts", "darts": "darts-space"}, FIRST_ORDER, True, _DARTS),
    Algorithm("darts-v2", "DARTS, second order (Liu, Simonyan & Yang, ICLR 2019)",
              {"nb201": "nb201-darts", "darts": "darts-space"}, UNROLLED, True, _DARTS),
    Algorithm("gdas", "GDAS (Dong & Yang, CVPR 2019)",
              {"nb201": "nb201-gdas", "darts": "darts-space-gdas"}, FIRST_ORDER, False,
              Hyper(paper_epochs=240, paper_batch_size=128), _set_tau),
    Algorithm("snas", "SNAS (Xie, Zheng, Liu & Lin, ICLR 2019)",
              {"nb201": "snas-nb201", "darts": "snas"}, SINGLE_LEVEL, False,
              Hyper(a_grad_clip=10.0, paper_epochs=150), _set_temperature),
    Algorithm("pcdarts", "PC-DARTS (Xu et al., ICLR 2020)",
              {"nb201": "pcdarts-nb201", "darts": "pcdarts"}, FIRST_ORDER, True,
              Hyper(w_lr=0.1, w_lr_min=0.0, a_lr=6e-4, paper_batch_size=256), arch_warmup=15 / 50),
]}


def algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown search algorithm {name!r}: use one of {', '.join(ALGORITHMS)}") from None
