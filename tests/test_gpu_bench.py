"""``scripts/gpu_bench.py --device cpu --small`` runs, so the one GPU call is known to work before a GPU is lent."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = _load().main(["--device", "cpu", "--small", "--steps", "1", "--warmup", "1", "--compile-backend", "eager",
                         "--configs", "nb201-darts b64,nb201-gdas b64", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads(out.read_text())
    darts = {r["variant"]: r for r in results["nb201-darts b64"]["rows"]}
    assert list(darts) == ["original", "original compiled", "exact", "topo", "topo compiled"]
    assert all(math.isfinite(r["step_ms"]) and r["step_ms"] > 0 for r in darts.values())
    assert darts["exact"]["act_ratio"] < 1.0  # (at toy sizes the stem's fixed share hides topo's gain)
    assert darts["topo compiled"]["rel_err"] < 1e-4 and darts["original compiled"]["rel_err"] < 1e-4
    assert darts["topo compiled"]["equal"] and darts["original compiled"]["equal"]
    sizes = results["nb201-darts b64"]["max_batch"]
    assert sizes["simplified"]["batch"] > sizes["original"]["batch"] > 0
    gdas = {r["variant"]: r for r in results["nb201-gdas b64"]["rows"]}
    assert list(gdas) == ["original", "exact", "topo"]
    assert "| topo compiled |" in printed and "largest batch within 16.0 GiB" in printed


class _ConvBN(nn.Module):
    def __init__(self, split_bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.split_bias = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), split_bias

    def forward(self, x):
        if self.split_bias:  # the same function, another float rounding (as a compiler's fused kernel)
            y = F.conv2d(x, self.conv.weight, None, padding=1) + self.conv.bias.view(1, -1, 1, 1)
        else:
            y = self.conv(x)
        return self.bn(y).sum((2, 3))


def test_compiled_error_ignores_the_noise_of_zero_gradients():
    """A conv bias before a train-mode BN has a zero gradient: two roundings of it differ by ~100%,
    which says nothing about the step (the column printed 3.3 for inductor on NB201)."""
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    rel, equal = _load().compiled_error(_ConvBN(split_bias=True), _ConvBN(), (x,))
    assert equal and rel < 1e-4
