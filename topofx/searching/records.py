"""What a search records per epoch: genotype as JSON, architecture distributions and their entropy,
the alpha-evolution picture."""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["jsonable", "genotype_record", "alpha_probs", "alpha_entropy", "op_names", "plot_alphas"]


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON values: namedtuples as dicts, tuples as lists, numbers as floats/ints,
    xautodl's ``Structure`` as its arch string."""
    if hasattr(obj, "tostr") and callable(obj.tostr):
        return obj.tostr()
    if hasattr(obj, "_asdict"):
        return {k: jsonable(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    return str(obj)


def genotype_record(model: nn.Module, space: str) -> dict[str, Any]:
    """``{"genotype": ...}`` from ``model.genotype()``, plus ``"arch"`` (the NAS-Bench-201 arch string)
    on the NAS-Bench-201 space."""
    genotype = model.genotype()
    out: dict[str, Any] = {"genotype": jsonable(genotype)}
    if space == "nb201":
        from .. import nb201

        out["arch"] = nb201.arch_str(genotype)
    return out


def alpha_probs(alphas: Sequence[torch.Tensor]) -> list[list]:
    """Softmax over the last dimension of every architecture tensor (rows: edges; 1-d tensors such as
    PC-DARTS's edge betas are kept as their softmax over the whole tensor)."""
    with torch.no_grad():
        return [F.softmax(a.detach().float(), dim=-1).tolist() for a in alphas]


def alpha_entropy(alphas: Sequence[torch.Tensor]) -> float:
    """Mean entropy (nats) of the operation distributions ``softmax(alpha[e])`` over every row of every
    two-dimensional architecture tensor (log(#ops) for uniform alphas, 0 for one-hot ones)."""
    rows = [a.detach().float().reshape(-1, a.shape[-1]) for a in alphas if a.dim() >= 2]
    if not rows:
        return float("nan")
    logp = F.log_softmax(torch.cat(rows), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def op_names(model: nn.Module, count: int) -> list[str]:
    """The candidate names of a supernet (xautodl's ``op_names``, DARTS's ``_primitives``)."""
    for attr in ("op_names", "_primitives", "primitives"):
        names = getattr(model, attr, None)
        if isinstance(names, (list, tuple)) and len(names) == count and all(isinstance(n, str) for n in names):
            return list(names)
    try:
        from ..zoo.operations import PRIMITIVES
        if len(PRIMITIVES) == count:
            return list(PRIMITIVES)
    except ImportError:  # pragma: no cover
        pass
    return [f"op{k}" for k in range(count)]


def plot_alphas(history: Sequence[Sequence[Sequence]], path: str | Path, *, names: Sequence[str] | None = None,
                title: str = "") -> Path:
    """Alpha evolution: per architecture tensor and edge (row), the probability of every candidate
    against the epoch, as a grid of small panels saved to a PNG.

    ``history[epoch][tensor]`` is what :func:`alpha_probs` returned that epoch.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    panels = []  # (tensor index, row index or None)
    first = history[0]
    for t, probs in enumerate(first):
        if probs and isinstance(probs[0], list):
            panels.extend((t, r) for r in range(len(probs)))
        else:
            panels.append((t, None))
    cols = min(7, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows + 0.6), squeeze=False)
    epochs = list(range(1, len(history) + 1))
    lines, labels = [], []
    for ax, (t, r) in zip(axes.flat, panels):
        series = [h[t][r] if r is not None else h[t] for h in history]
        count = len(series[0])
        for k in range(count):
            (line,) = ax.plot(epochs, [s[k] for s in series], marker="." if len(epochs) < 20 else None)
            if t == panels[0][0] and r == panels[0][1]:
                lines.append(line)
                labels.append(names[k] if names is not None and r is not None and k < len(names) else f"{k}")
        ax.set_title(f"alpha {t}" + (f" edge {r}" if r is not None else " (edge weights)"), fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # y: each panel its own range, changes stay visible
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.legend(lines, labels, loc="upper center", ncol=min(8, len(labels)), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=8, y=0.01, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.93))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
