"""A small first-order DARTS search loop, shared by the examples and the tests.

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
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["darts_search", "SearchHistory", "arch_parameters", "logits_of", "digits"]

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
    w_opt = torch.optim.SGD(weights, lr=w_lr, momentum=w_momentum, weight_decay=w_weight_decay)
    a_opt = torch.optim.Adam(alphas, lr=a_lr, betas=a_betas, weight_decay=a_weight_decay)
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
        for step in range(steps):
            # architecture step (first order: gradient of the validation loss at the current weights)
            xv, yv = next(val_it)
            a_opt.zero_grad(set_to_none=True)
            out = logits_of(model(xv))
            v_loss = loss_fn(out, yv)
            v_loss.backward()
            a_opt.step()
            for p in weights:  # the architecture step must not leave gradients on the weights
                p.grad = None
            history.val_loss.append(v_loss.item())
            history.val_acc.append(float((out.argmax(1) == yv).float().mean()))

            # weight step
            lr = w_lr_min + 0.5 * (w_lr - w_lr_min) * (1 + math.cos(math.pi * step / steps))
            for group in w_opt.param_groups:
                group["lr"] = lr
            xt, yt = next(train_it)
            w_opt.zero_grad(set_to_none=True)
            out = logits_of(model(xt))
            t_loss = loss_fn(out, yt)
            t_loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(weights, grad_clip)
            w_opt.step()
            for a in alphas:
                a.grad = None
            history.train_loss.append(t_loss.item())
            history.train_acc.append(float((out.argmax(1) == yt).float().mean()))
            if bar is not None:
                bar.set_postfix(train=f"{history.train_loss[-1]:.3f}", val=f"{history.val_loss[-1]:.3f}",
                                refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    history.seconds = time.perf_counter() - start
    return history
