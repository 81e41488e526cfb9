"""One iteration of a one-shot search: the architecture step and the weight step, as an
:class:`~.algorithms.Algorithm` declares them.

Every gradient of a search is computed by :meth:`SearchStep.gradients` (which hands them to
:meth:`SearchStep.reduce_gradients`: the place where data-parallel training all-reduces), so the loop,
DARTS-V2's hypergradient and the single-level step share one path.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import World
from .algorithms import FIRST_ORDER, SINGLE_LEVEL, UNROLLED, Hyper
from .hypergradient import unrolled_arch_gradients

__all__ = ["SearchStep", "arch_parameters", "logits_of", "Batch"]

Batch = tuple[torch.Tensor, torch.Tensor]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, or the last tensor of a tuple/list/dict
    (xautodl returns ``(features, logits)``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in reversed(output):
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return item
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def arch_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The architecture parameters: ``model.arch_parameters`` (a tensor, or a method as in the DARTS
    code), else ``model.get_alphas()`` (xautodl), de-duplicated, requiring grad."""
    found: list[Any] = []
    attr = getattr(model, "arch_parameters", None)
    if isinstance(attr, torch.Tensor):
        found.append(attr)
    elif callable(attr):
        found.extend(attr())
    if not found:
        get_alphas = getattr(model, "get_alphas", None)
        if callable(get_alphas):
            found.extend(get_alphas())
    out, seen = [], set()
    for t in found:
        if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    if not out:
        raise ValueError(
            f"{type(model).__name__} has no architecture parameters: define arch_parameters() or get_alphas(), "
            "or pass arch_params="
        )
    return out


class SearchStep:
    """The optimizers of a search and its three kinds of update.

    ``net`` is what runs (the supernet or its simplified module); ``alphas`` and ``weights`` are the
    original's tensors, which both share.  ``world`` (:class:`topofx.distributed.World`) is for
    data-parallel searches: :meth:`reduce_gradients` averages over its ranks.
    """

    def __init__(self, net: nn.Module, alphas: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                 hyper: Hyper, kind: str = FIRST_ORDER, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 world: World = World()):
        if kind not in (FIRST_ORDER, UNROLLED, SINGLE_LEVEL):
            raise ValueError(f"unknown architecture step {kind!r}")
        self.net, self.alphas, self.weights = net, list(alphas), list(weights)
        self.hyper, self.kind, self.loss_fn = hyper, kind, loss_fn
        self.world = world
        self.w_opt = torch.optim.SGD(self.weights, lr=hyper.w_lr, momentum=hyper.w_momentum,
                                     weight_decay=hyper.w_weight_decay, nesterov=hyper.w_nesterov)
        self.a_opt = torch.optim.Adam(self.alphas, lr=hyper.a_lr, betas=hyper.a_betas,
                                      weight_decay=hyper.a_weight_decay)

    # -- gradients: the one place ------------------------------------------------------------
    def gradients(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list:
        """d loss / d params (None for a parameter the loss does not reach), reduced over the ranks."""
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        return self.reduce_gradients(params, list(grads))

    def reduce_gradients(self, params: Sequence[torch.Tensor], grads: list) -> list:
        """Average ``grads`` over the data-parallel ranks (a no-op for one process)."""
        return self.world.average(grads, params)

    # -- updates -------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return float(self.w_opt.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        for group in self.w_opt.param_groups:
            group["lr"] = lr

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(self.net(batch[0]))
        return self.loss_fn(logits, batch[1]), logits

    @staticmethod
    def _metrics(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        return float(loss.detach()), float((logits.detach().argmax(1) == y).float().mean())

    @staticmethod
    def _apply(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence, clip: float | None) -> None:
        for p, g in zip(params, grads):
            p.grad = g
        if clip:
            nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
        opt.step()
        for p in params:
            p.grad = None

    def weight_step(self, batch: Batch) -> tuple[float, float]:
        """SGD on the weights with the gradient of the loss on ``batch``; returns (loss, accuracy)."""
        loss, logits = self._forward(batch)
        self._apply(self.w_opt, self.weights, self.gradients(loss, self.weights), self.hyper.grad_clip)
        return self._metrics(loss, logits, batch[1])

    def arch_step(self, batch: Batch, train_batch: Batch | None = None) -> tuple[float, float]:
        """Adam on the alphas with the gradient of the loss on ``batch`` (the validation split): at
        the current weights (first order), or DARTS-V2's unrolled hypergradient, which also needs
        ``train_batch``.  Returns (loss, accuracy) on ``batch`` (at the unrolled weights for V2)."""
        if self.kind == UNROLLED:
            if train_batch is None:
                raise ValueError("the unrolled architecture step needs a training batch")
            seen: list = []

            def loss_of(model: nn.Module, b: Batch) -> torch.Tensor:
                logits = logits_of(model(b[0]))
                loss = self.loss_fn(logits, b[1])
                if b is batch:
                    seen.append(self._metrics(loss, logits, b[1]))
                return loss

            momentum = self.hyper.w_momentum
            buffers = {id(p): self.w_opt.state[p]["momentum_buffer"] * momentum
                       for p in self.weights if self.w_opt.state.get(p, {}).get("momentum_buffer") is not None}
            grads = unrolled_arch_gradients(
                self.net, train_batch, batch, eta=self.lr, weight_decay=self.hyper.w_weight_decay,
                momentum_buffers=buffers, loss_of=loss_of, grad_fn=self.gradients, arch_of=self._arch_of)
            self._apply(self.a_opt, self.alphas, grads, self.hyper.a_grad_clip)
            return seen[0]
        loss, logits = self._forward(batch)
        self._apply(self.a_opt, self.alphas, self.gradients(loss, self.alphas), self.hyper.a_grad_clip)
        return self._metrics(loss, logits, batch[1])

    def joint_step(self, batch: Batch, update_alphas: bool = True) -> tuple[float, float]:
        """Single level (SNAS): one loss on ``batch``, one gradient for weights and alphas, both steps."""
        loss, logits = self._forward(batch)
        params = self.weights + (self.alphas if update_alphas else [])
        grads = self.gradients(loss, params)
        self._apply(self.w_opt, self.weights, grads[:len(self.weights)], self.hyper.grad_clip)
        if update_alphas:
            self._apply(self.a_opt, self.alphas, grads[len(self.weights):], self.hyper.a_grad_clip)
        return self._metrics(loss, logits, batch[1])

    def _arch_of(self, model: nn.Module) -> list[torch.Tensor]:
        return self.alphas if model is self.net else arch_parameters(model)
