"""``topofx fidelity`` at toy size: the exact supernet's search finds the original's genotype (it
computes the same thing), the table has a row per mode with the retrained accuracies, and a rerun
with the same output folder resumes instead of searching again."""
from __future__ import annotations

import json

import pytest

from topofx import fidelity


def test_fidelity_table_and_resume(tmp_path, monkeypatch):
    cfg = fidelity.FidelityConfig(algos=("darts-v1",), data=("digits",), seeds=(0,), epochs=1, max_steps=2,
                                  C=4, batch_size=32, retrain_epochs=1, retrain_seeds=2, out=str(tmp_path),
                                  progress=False)
    results = fidelity.run(cfg)
    runs = results["searches"]
    assert set(runs) == {f"digits/darts-v1/0/{m}" for m in fidelity.MODES}
    assert runs["digits/darts-v1/0/exact"]["arch"] == runs["digits/darts-v1/0/none"]["arch"]
    topo, original = runs["digits/darts-v1/0/topo"], runs["digits/darts-v1/0/none"]
    assert 0 < topo["activation_bytes"] < original["activation_bytes"]
    assert len(results["retrains"]) == 2 * len({r["arch"] for r in runs.values()})
    assert all(0.0 <= acc <= 1.0 for acc in results["retrains"].values())
    table = (tmp_path / "fidelity.md").read_text()
    assert [line.split("|")[3].strip() for line in table.splitlines() if line.startswith("| digits")] == \
        ["original", "exact", "topo"]
    assert "| 6 |" in table  # exact agrees with the original on all 6 edges

    def no_search(*args):
        raise AssertionError("searched again")

    monkeypatch.setattr(fidelity, "_search", no_search)
    monkeypatch.setattr(fidelity, "retrain", no_search)
    assert fidelity.run(cfg)["searches"] == runs
    with pytest.raises(ValueError, match="other settings"):
        fidelity.run(fidelity.FidelityConfig(**{**json.loads((tmp_path / "fidelity.json").read_text())["config"],
                                                "epochs": 2}))
