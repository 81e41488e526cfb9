"""Draws from Python's ``random`` and NumPy's global generator in forward (``topofx.capture.host_random``).

A uniform-sampling supernet (RANDOM-NAS, SETN's weight step: ``random.choice`` over an edge's candidates per
call) drew its architecture while tracing and the graph kept it: the simplified module ran one frozen
architecture forever, silently whenever the capture's self-check happened to draw the same candidates
(held-out session 8, xautodl ``forward_urs``), else it fell back or ``simplify`` raised.  Now the method or
submodule that draws runs per call (a draw in the root's own forward is refused naming the line:
tests/test_errors.py).
"""
from __future__ import annotations

import random
from random import choice as pick_one  # bound before capture: the patched module function is not what runs
from random import random as coin

import numpy as np
from numpy.random import rand as numpy_coin
import pytest
import torch
from torch import nn

import topofx
from topofx.testing import assert_train_step_equivalent

C = 4


def _edge(*ops: nn.Module) -> nn.ModuleList:
    return nn.ModuleList(ops)


class UniformCell(nn.Module):
    """Two-node cell; each edge runs one candidate picked by Python's ``random``, in a method (xautodl's
    ``forward_urs``)."""

    def __init__(self):
        super().__init__()
        self.edges = nn.ModuleDict({
            "1<-0": _edge(nn.Conv2d(C, C, 1), nn.AvgPool2d(3, 1, 1)),
            "2<-1": _edge(nn.Conv2d(C, C, 3, padding=1), nn.Identity()),
        })

    def sample_path(self, x):
        nodes = [x]
        for key in ("1<-0", "2<-1"):
            nodes.append(random.choice(self.edges[key])(nodes[-1]))
        return nodes[-1]

    def forward(self, x):
        return self.sample_path(x) + x


class NumpyDropPath(nn.Module):
    """A drop-path decision on NumPy's generator, in forward."""

    def forward(self, x):
        return x * 0.5 if np.random.rand() < 0.5 else x


class UniformNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.cell = UniformCell()
        self.drop = NumpyDropPath()
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        return self.head(self.drop(self.cell(self.stem(x))).mean((2, 3)))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["exact", "topo"])
@pytest.mark.parametrize("seed", range(6))
def test_a_candidate_python_random_picks_is_picked_anew_on_every_call(mode, seed):
    """Whatever Python's generator drew at capture, every call of the simplified module runs the candidates
    the original picks from the same state (on main: a frozen path, a fallback or a raise, by seed)."""
    torch.manual_seed(0)
    random.seed(seed), np.random.seed(seed)
    model, x = UniformNet(), _x()
    simplified = topofx.simplify(model, (x,), mode=mode, strict=True)
    assert simplified.report.fallback is None
    assert len(simplified.report.decided_per_call) == 2, simplified.report.decided_per_call  # the method, the module
    for k in range(12):
        random.seed(100 + k), np.random.seed(100 + k)
        want = model(x)
        random.seed(100 + k), np.random.seed(100 + k)
        got = simplified(x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"call {k}: the simplified module ran another path"
    if mode == "exact":
        assert_train_step_equivalent(model, simplified, (x,))



class BoundNameCell(nn.Module):
    """The same uniform sampling written with functions imported by name (``from random import choice``,
    ``from numpy.random import rand``) and with a generator object of the model's own (``self.rng``): the
    names are bound before capture, so only the generators' states show that forward drew."""

    def __init__(self):
        super().__init__()
        self.edge = _edge(nn.Conv2d(C, C, 1), nn.AvgPool2d(3, 1, 1), nn.Conv2d(C, C, 3, padding=1))
        self.rng = random.Random(0)

    def forward(self, x):
        x = pick_one(self.edge)(x)
        x = x * 0.5 if coin() < 0.5 else x
        x = x + 1.0 if numpy_coin() < 0.5 else x
        return x - 1.0 if self.rng.random() < 0.5 else x


class BoundNameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.cell = BoundNameCell()
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        return self.head(self.cell(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["exact", "topo"])
@pytest.mark.parametrize("seed", range(4))
def test_draws_through_names_bound_before_capture_are_drawn_anew(mode, seed):
    """On main the draws were frozen into the graph: the simplified module ran one path on every call
    (silently, whenever the self-check's draws agreed with the capture's)."""
    torch.manual_seed(0)
    random.seed(seed), np.random.seed(seed)
    model, x = BoundNameNet(), _x()
    own, python = model.cell.rng.getstate(), random.getstate()
    simplified = topofx.simplify(model, (x,), mode=mode, strict=True)
    assert simplified.report.fallback is None
    assert model.cell.rng.getstate() == own and random.getstate() == python, "simplify drew from the caller's streams"
    assert tuple(simplified.report.decided_per_call) == ("cell",), simplified.report.decided_per_call
    for k in range(16):
        random.seed(100 + k), np.random.seed(100 + k), model.cell.rng.seed(k)
        want = model(x)
        random.seed(100 + k), np.random.seed(100 + k), model.cell.rng.seed(k)
        got = simplified(x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"call {k}: the simplified module ran another path"
