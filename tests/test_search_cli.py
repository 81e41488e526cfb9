"""``topofx search``: every algorithm on digits in both spaces through the command line (tiny sizes,
a couple of iterations), the files a run writes, GDAS's and SNAS's schedules, and resume equals an
uninterrupted run under ``--deterministic``."""
from __future__ import annotations

import json

import pytest
import torch

from topofx.cli import main
from topofx.searching import ALGORITHMS, SearchConfig, build_supernet, gdas_tau, load_search, snas_temperature
from topofx.searching.engine import TIMING_FIELDS, read_checkpoint

TINY = ["--data", "digits", "--batch-size", "16", "--image-size", "8", "--channels", "8", "--cells", "1",
        "--nodes", "2", "--max-steps", "2", "--no-progress", "--threads", "1"]
FIELDS = {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "genotype", "alpha_entropy", "alphas",
          "step_time", "epoch_time", "activation_bytes", "activation_bytes_original", "arch_updates", "steps"}


def search(out, *args) -> int:
    return main(["search", *TINY, "--out", str(out), *args])


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def initial_alphas(config: SearchConfig) -> list[torch.Tensor]:
    from topofx.search import arch_parameters

    model, _ = build_supernet(config)
    return [a.detach().clone() for a in arch_parameters(model)]


CASES = [(algo, space) for algo in ALGORITHMS for space in ("nb201", "darts")]


@pytest.mark.parametrize("algo,space", CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_search_runs(tmp_path, capsys, algo, space):
    epochs = 2 if algo == "gdas" else 1
    out = tmp_path / "run"
    assert search(out, "--algo", algo, "--space", space, "--epochs", str(epochs), "--simplify", "topo") == 0
    stdout = capsys.readouterr().out
    assert "search done" in stdout and "genotype:" in stdout
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "genotype.json", "alphas.png"):
        assert (out / name).is_file(), name
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))
    assert FIELDS <= set(log[-1]), FIELDS - set(log[-1])
    assert log[-1]["arch_updates"] > 0 and log[-1]["steps"] == 2
    if ALGORITHMS[algo].arch_step != "single-level":
        assert {"valid_loss", "valid_acc"} <= set(log[-1])
    genotype = json.loads((out / "genotype.json").read_text())
    assert genotype["algo"] == algo and genotype["genotype"]
    if space == "nb201":
        assert genotype["arch"].count("+") == 2 and genotype["arch"] == log[-1]["arch"]
    model, config, inputs = load_search(out)
    assert config.algo == algo and config.simplify == "topo" and inputs[0].shape == (16, 3, 8, 8)
    from topofx.search import arch_parameters

    trained = arch_parameters(model)
    assert any(not torch.equal(a, b) for a, b in zip(trained, initial_alphas(config))), "alphas did not move"
    if algo == "gdas":
        assert [r["tau"] for r in log] == [10.0, 0.1]


def test_search_without_simplify(tmp_path):
    out = tmp_path / "plain"
    assert search(out, "--algo", "darts-v1", "--space", "nb201", "--epochs", "1", "--simplify", "none") == 0
    log = read_log(out)
    assert log[0]["activation_bytes"] == log[0]["activation_bytes_original"] > 0
    assert json.loads((out / "config.json").read_text())["simplify"] == "none"


def _without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_FIELDS}


@pytest.mark.parametrize("algo", ["gdas", "darts-v2"])
def test_resume_equals_uninterrupted(tmp_path, capsys, algo):
    args = ["--algo", algo, "--space", "nb201", "--epochs", "2", "--simplify", "topo", "--deterministic"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert search(whole, *args) == 0
    assert search(parts, *args, "--stop-after", "1") == 0
    assert "stopped after epoch 1" in capsys.readouterr().out
    assert len(read_log(parts)) == 1 and not (parts / "genotype.json").exists()
    assert main(["search", "--out", str(parts), "--resume", "--no-progress", "--threads", "1"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert list(map(_without_timings, read_log(parts))) == list(map(_without_timings, read_log(whole)))
    a, b = read_checkpoint(whole / "checkpoint.pt"), read_checkpoint(parts / "checkpoint.pt")
    assert a["net"].keys() == b["net"].keys()
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert all(torch.equal(x, y) for x, y in zip(a["alphas"], b["alphas"], strict=True))
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert (parts / "genotype.json").read_text() == (whole / "genotype.json").read_text()


def test_schedules():
    assert gdas_tau(0, 250) == 10.0 and gdas_tau(249, 250) == 0.1
    assert all(gdas_tau(e, 250) > gdas_tau(e + 1, 250) for e in range(249))
    assert gdas_tau(0, 1) == 10.0
    assert snas_temperature(149, 150) == pytest.approx(0.03) and snas_temperature(0, 150) < 1.0
    assert ALGORITHMS["pcdarts"].warmup_epochs(50) == 15 and ALGORITHMS["darts-v1"].warmup_epochs(50) == 0


def test_search_help_and_errors(tmp_path, capsys):
    assert main(["search", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert main(["search", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert main(["search", "--algo", "enas"]) == 2
    assert main(["search", "--space", "darts", "--nb201", "t.json", "--out", str(tmp_path / "x")]) == 2
    assert "--nb201 needs --space nb201" in capsys.readouterr().err


def test_nb201_table_lookup_per_epoch(tmp_path, capsys):
    from topofx import nb201

    accuracy = {d: {m: [None] * nb201.NUM_ARCHS for m in nb201.METRICS} for d in nb201.DATASETS}
    accuracy["cifar10"]["test"] = [i / 1000 for i in range(nb201.NUM_ARCHS)]
    nb201.Table(accuracy, "made up").save(tmp_path / "table.json")
    out = tmp_path / "run"
    assert search(out, "--algo", "darts-v1", "--space", "nb201", "--epochs", "1", "--simplify", "none",
                  "--nb201", str(tmp_path / "table.json")) == 0
    record = read_log(out)[0]
    assert record["nb201"]["index"] == nb201.index(record["arch"])
    assert record["nb201"]["accuracy"]["cifar10"]["test"] == nb201.index(record["arch"]) / 1000
    assert "NB201 cifar10 test" in capsys.readouterr().out
