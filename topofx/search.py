"""Searching: ``topofx search``'s engine (:mod:`topofx.searching`, re-exported here: :class:`SearchConfig`,
:func:`run_search`, :func:`load_search`, :func:`unrolled_arch_gradients`) and a small first-order DARTS
loop shared by the examples and the tests.

``darts_search(model, train, val, steps=30)`` alternates, as DARTS (Liu et al., 2019) does with its
first-order approximation:

1. an **architecture step** on a validation batch: Adam on the architecture parameters only
   (``lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3``);
2. a **weight step** on a training batch: SGD with momentum on every other parameter
   (``lr=0.025`` cosine-annealed, ``momentum=0.9, weight_decay=3e-4``, gradient norm clipped at 5).

``model`` may be the original supernet or what :func:`topofx.simplify` returned: both expose the same
parameters (the simplified module shares the original's), so the alphas it learns are the original
model's and ``model.genotype()`` reads them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .searching import (ALGORITHMS, SearchConfig, Searcher, SearchResult, build_supernet, load_search,
                        run_search, unrolled_arch_gradients)
from .searching.algorithms import FIRST_ORDER, Hyper
from .searching.step import SearchStep, arch_parameters, logits_of

__all__ = ["darts_search", "SearchHistory", "arch_parameters", "logits_of", "digits", "SearchConfig", "SearchResult",
           "Searcher", "run_search", "load_search", "build_supernet", "unrolled_arch_gradients", "ALGORITHMS"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class SearchHistory:
    """Per step: training loss/accuracy (weight step) and validation loss/accuracy (arch step)."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    train_acc: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    val_acc: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.train_loss)

    def summary(self, last: int = 5) -> str:
        def mean(xs: Sequence[float]) -> float:
            xs = list(xs)[-last:]
            return sum(xs) / len(xs) if xs else float("nan")

        return (
            f"{self.steps} steps in {self.seconds:.1f}s; last {min(last, self.steps)} steps: "
            f"train loss {mean(self.train_loss):.3f} acc {mean(self.train_acc):.2f}, "
            f"val loss {mean(self.val_loss):.3f} acc {mean(self.val_acc):.2f}"
        )


def digits(image_size: int = 16, seed: int = 0) -> tuple[Batch, Batch]:
    """scikit-learn's 8x8 digits (shipped with the package: no download) as ``(N, 3, S, S)`` float
    tensors, normalized, split in halves ``(train, val)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    half = len(y) // 2
    tr, va = order[:half], order[half:]
    return (x[tr], y[tr]), (x[va], y[va])


def _batches(data: Any, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Endless batches from ``(X, Y)`` tensors (reshuffled every epoch) or any iterable of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        n = x.shape[0]
        if n == 0:
            raise ValueError("empty dataset")
        while True:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n - min(batch_size, n) + 1, min(batch_size, n)):
                idx = order[i:i + batch_size]
                yield x[idx], y[idx]
    else:
        while True:
            got_any = False
            for batch in data:
                got_any = True
                yield batch[0], batch[1]
            if not got_any:
                raise ValueError("empty data loader")


def darts_search(
    model: nn.Module,
    train: Any,
    val: Any,
    *,
    steps: int = 30,
    batch_size: int = 64,
    w_lr: float = 0.025,
    w_lr_min: float = 0.001,
    w_momentum: float = 0.9,
    w_weight_decay: float = 3e-4,
    a_lr: float = 3e-4,
    a_betas: tuple[float, float] = (0.5, 0.999),
    a_weight_decay: float = 1e-3,
    grad_clip: float = 5.0,
    arch_params: Iterable[torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    progress: bool = True,
    seed: int = 0,
    desc: str = "DARTS search",
) -> SearchHistory:
    """First-order DARTS: alternate an Adam step on the alphas (validation batch) and an SGD step on
    the weights (training batch), ``steps`` times.

    Args:
        model: supernet (original or simplified), in train mode during the search.
        train, val: ``(X, Y)`` tensors (batches of ``batch_size`` are drawn, reshuffled every epoch) or
            any re-iterable of ``(x, y)`` batches such as a ``DataLoader``.
        arch_params: the architecture parameters (default: :func:`arch_parameters`).
        progress: show a tqdm bar with the running losses.

    Returns:
        a :class:`SearchHistory`; the model's weights and alphas are updated in place.
    """
    import time

    if steps < 1:
        raise ValueError("steps must be >= 1")
    alphas = list(arch_params) if arch_params is not None else arch_parameters(model)
    alpha_ids = {id(a) for a in alphas}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in alpha_ids]
    hyper = Hyper(w_lr=w_lr, w_lr_min=w_lr_min, w_momentum=w_momentum, w_weight_decay=w_weight_decay,
                  grad_clip=grad_clip, a_lr=a_lr, a_betas=a_betas, a_weight_decay=a_weight_decay)
    step = SearchStep(model, alphas, weights, hyper, FIRST_ORDER, loss_fn=loss_fn)
    gen = torch.Generator().manual_seed(seed)
    train_it, val_it = _batches(train, batch_size, gen), _batches(val, batch_size, gen)
    history = SearchHistory()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=True)
    model.train()
    start = time.perf_counter()
    try:
        for i in range(steps):
            v_loss, v_acc = step.arch_step(next(val_it))  # at the current weights (first order)
            history.val_loss.append(v_loss)
            history.val_acc.append(v_acc)
            step.set_lr(w_lr_min + 0.5 * (w_lr - w_lr_min) * (1 + math.cos(math.pi * i / steps)))
            t_loss, t_acc = step.weight_step(next(train_it))
            history.train_loss.append(t_loss)
            history.train_acc.append(t_acc)
            if bar is not None:
                bar.set_postfix(train=f"{t_loss:.3f}", val=f"{v_loss:.3f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    history.seconds = time.perf_counter() - start
    return history
