"""Retrain a searched architecture from scratch and report its test accuracy.

A search ends with a genotype; what it is worth is the accuracy of that architecture trained from
scratch.  :func:`child_network` builds it as a standalone module: the space's DARTS-style supernet
(xautodl's ``TinyNetworkDarts`` for NAS-Bench-201, ``NASNetworkDARTS`` for the DARTS space), freshly
initialized, with one-hot architecture weights on the genotype's operations (``none`` on the edges
a DARTS genotype leaves out), cut down to those operations by :func:`topofx.derive`.  Any search
algorithm's genotype in that space gives the same kind of child, so architectures found by
different algorithms, or by the original and the simplified supernet, are compared on equal terms.
:func:`retrain` trains it with SGD and reports test accuracy.

Genotypes are accepted as a NAS-Bench-201 arch string (or anything :func:`topofx.nb201.arch_str`
reads), or for the DARTS space as DARTS's ``Genotype(normal=[(op, input), ...], reduce=...)`` /
xautodl's ``{"normal": [((op, input, w), (op, input, w)), ...], "reduce": ...}``: a list of
``(op, input)`` pairs, flat or grouped per node, inputs numbered 0, 1 for the cell's two inputs
and 2, 3, ... for its nodes.  DARTS's and xautodl's operation names are both understood.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import nb201, zoo
from .data import Dataset
from .derive import derive
from .search import logits_of

__all__ = ["child_network", "one_hot_supernet", "load_child", "retrain", "RetrainResult", "darts_edges"]

SPACES = {"nb201": "nb201-darts", "darts": "darts-space"}
# DARTS's operation names -> xautodl's names for the same operations on the DARTS space.
_XAUTODL_DARTS_NAMES = {"sep_conv_3x3": "dua_sepc_3x3", "sep_conv_5x5": "dua_sepc_5x5",
                        "dil_conv_3x3": "dil_sepc_3x3", "dil_conv_5x5": "dil_sepc_5x5"}


def darts_edges(cell: Sequence[Any]) -> list[tuple[str, int]]:
    """A DARTS-space cell's ``(op, input)`` pairs, flattened, in xautodl's operation names."""
    pairs: list[tuple[str, int]] = []
    for item in cell:
        if len(item) and isinstance(item[0], str):
            pairs.append((_XAUTODL_DARTS_NAMES.get(item[0], item[0]), int(item[1])))
        else:
            pairs.extend(darts_edges(item))
    return pairs


def _field(genotype: Any, name: str) -> Any:
    return genotype[name] if isinstance(genotype, Mapping) else getattr(genotype, name)


def _one_hot_alphas(model: nn.Module, space: str, genotype: Any) -> None:
    """Set ``model``'s architecture weights one-hot on the genotype's operations."""
    index = {name: k for k, name in enumerate(model.op_names)}

    def fill(alpha: torch.Tensor, chosen: Mapping[str, str]) -> None:
        with torch.no_grad():
            alpha.fill_(0.0)
            for edge, row in model.edge2index.items():
                op = chosen.get(edge, "none")
                if op not in index:
                    raise ValueError(f"genotype names operation {op!r}; this space has {', '.join(index)}")
                alpha[row, index[op]] = 1e4

    if space == "nb201":
        chosen = {f"{node}<-{j}": op for node, ins in enumerate(nb201.genotype(genotype), start=1) for op, j in ins}
        fill(model.arch_parameters, chosen)
        return
    for cell, alpha in (("normal", model.arch_normal_parameters), ("reduce", model.arch_reduce_parameters)):
        pairs = darts_edges(_field(genotype, cell))
        per_node = max(1, len(pairs) // model._steps)
        chosen = {f"{i // per_node}<-{j}": op for i, (op, j) in enumerate(pairs)}
        if len(chosen) != len(pairs):
            raise ValueError(
                f"the {cell} cell of the genotype names two operations on one edge: {pairs}; a child keeps one "
                "operation per edge (xautodl's NASNetworkDARTS.genotype() can pick two on one edge, DARTS's "
                "rule picks each node's two strongest distinct inputs)")
        fill(alpha, chosen)


def one_hot_supernet(genotype: Any, space: str = "nb201", *, C: int = 8, N: int = 1, nodes: int = 4,
                     image_size: int = 16, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The space's DARTS-style supernet (``C`` channels, ``N`` cells per stage, ``nodes`` nodes per
    DARTS-space cell, 10 classes), freshly initialized from ``seed``, with one-hot architecture weights
    on ``genotype``'s operations; and an example input batch of 2 ``image_size`` RGB images."""
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}: use one of {', '.join(SPACES)}")
    cells = dict(steps=nodes, multiplier=nodes) if space == "darts" else {}
    model, (x,) = zoo.build(SPACES[space], batch_size=2, image_size=image_size, seed=seed, C=C, N=N, **cells)
    _one_hot_alphas(model, space, genotype)
    return model.train(), x


def child_network(genotype: Any, space: str = "nb201", *, C: int = 8, N: int = 1, nodes: int = 4,
                  image_size: int = 16, seed: int = 0) -> fx.GraphModule:
    """The architecture ``genotype`` names in ``space`` (``nb201`` or ``darts``) as a freshly initialized
    standalone ``GraphModule``: :func:`one_hot_supernet` cut down to the chosen operations."""
    model, x = one_hot_supernet(genotype, space, C=C, N=N, nodes=nodes, image_size=image_size, seed=seed)
    return derive(model, (x,))


def load_child(path: str | Path) -> fx.GraphModule:
    """The child ``topofx derive --out FILE`` wrote: rebuilt from its genotype and sizes, with its
    ``state_dict`` (read with ``weights_only``: no pickled code runs)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != "topofx-child":
        raise ValueError(f"{path} was not written by `topofx derive --out`")
    child = child_network(saved["genotype"], saved["space"], C=saved["C"], N=saved["N"], nodes=saved["nodes"],
                          image_size=saved["image_size"])
    child.load_state_dict(saved["state_dict"])
    return child


@dataclasses.dataclass
class RetrainResult:
    test_acc: float
    train_loss: list[float]
    train_acc: list[float]
    seconds: float


def _accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data[1]), batch_size):
            out = logits_of(model(data[0][i:i + batch_size]))
            correct += int((out.argmax(1) == data[1][i:i + batch_size]).sum())
    return correct / len(data[1])


def retrain(model: nn.Module, data: Dataset, *, epochs: int = 10, batch_size: int = 64, lr: float = 0.025,
            momentum: float = 0.9, weight_decay: float = 3e-4, grad_clip: float = 5.0, seed: int = 0,
            progress: bool = True) -> RetrainResult:
    """Train ``model`` on ``data.train`` for ``epochs`` (SGD with momentum, ``lr`` cosine-annealed to 0
    per step, gradient norm clipped; DARTS's evaluation settings without its CIFAR-only extras:
    cutout, drop path, auxiliary head) and return the accuracy on ``data.test``."""
    from tqdm.auto import tqdm

    x, y = data.train
    steps_per_epoch = max(1, len(y) // batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    gen = torch.Generator().manual_seed(seed)
    result = RetrainResult(float("nan"), [], [], 0.0)
    start = time.perf_counter()
    bar = tqdm(total=total, desc="retrain", disable=not progress)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            out = logits_of(model(x[idx]))
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            result.train_loss.append(loss.item())
            result.train_acc.append(float((out.argmax(1) == y[idx]).float().mean()))
            bar.set_postfix(loss=f"{result.train_loss[-1]:.3f}", refresh=False)
            bar.update(1)
    bar.close()
    result.test_acc = _accuracy(model, data.test, 256)
    result.seconds = time.perf_counter() - start
    return result
