"""``topofx.data``: the built-in datasets and CIFAR-10 read from a local folder of python batches (a
synthetic one, in the format of ``cifar-10-python.tar.gz``), through a search."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from topofx import data
from topofx.cli import main


def write_cifar(folder, per_batch=8, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10_python_batches(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        second = pickle.load(f, encoding="bytes")
    dataset = data.load(f"cifar10:{tmp_path}")  # the parent folder of cifar-10-batches-py works too
    assert dataset.train[0].shape == (40, 3, 32, 32) and dataset.test[0].shape == (8, 3, 32, 32)
    assert dataset.train[1][8:16].tolist() == second[b"labels"]
    raw = torch.tensor(second[b"data"][0], dtype=torch.float32).reshape(3, 32, 32) / 255
    x = dataset.train[0][8]  # normalized per channel with the training set's statistics
    assert torch.corrcoef(torch.stack([x.flatten(), raw.flatten()]))[0, 1] > 0.99
    torch.testing.assert_close(dataset.train[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_missing_cifar_files_are_named(tmp_path):
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="lacks test_batch"):
        data.load(f"cifar10:{tmp_path / 'c'}")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")


@pytest.mark.parametrize("name,n", [("digits", 1797), ("mnist5k", 5000)])
def test_builtin_datasets(name, n):
    a, b = data.load(name, image_size=8), data.load(name, image_size=8)
    assert len(a.train[1]) + len(a.test[1]) == n and a.image_shape == (3, 8, 8) and a.num_classes == 10
    assert torch.equal(a.test[0], b.test[0])  # the split is fixed by the seed
    (wx, wy), (ax, ay) = data.search_split(a)
    assert len(wy) + len(ay) == len(a.train[1]) and abs(len(wy) - len(ay)) <= 1


def test_search_on_a_cifar_folder(tmp_path, capsys):
    folder = write_cifar(tmp_path / "cifar", per_batch=16)
    assert main(["search", "--algo", "darts-v1", "--space", "nb201", "--data", f"cifar10:{folder}", "--epochs", "1",
                 "--batch-size", "8", "--channels", "4", "--max-steps", "1", "--no-progress", "--threads", "1",
                 "--out", str(tmp_path / "run")]) == 0
    assert "search done" in capsys.readouterr().out
