"""Python floats the graph depends on only through tensor arithmetic are graph inputs
(``topofx.capture.float_inputs``): a new temperature or coefficient costs no new capture, and the simplified
module computes what the original computes at the new value.  A float Python decides on stays a
guarded constant: its change captures anew."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import topofx


class Scheduler:
    def __init__(self, decay_rate: float):
        self.decay_rate = decay_rate


SCHEDULER = Scheduler(0.5)  # a training loop's module-level scheduler object


class MixedEdge(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.ops = nn.ModuleList([
            nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)),
            nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C)),
            nn.Identity(),
        ])

    def forward(self, x, w):
        return sum(wi * op(x) for wi, op in zip(w, self.ops))


class Supernet(nn.Module):
    """Two mixed edges weighted by a Gumbel-softmax sample at temperature ``self.temp`` (SNAS)."""

    def __init__(self, C: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.edges = nn.ModuleList([MixedEdge(C), MixedEdge(C)])
        self.log_alpha = nn.Parameter(torch.randn(2, 3) * 0.1)
        self.temp = 1.0
        self.head = nn.Linear(C, 5)

    def weights(self):
        u = torch.rand_like(self.log_alpha)
        gumbel = -torch.log(-torch.log(u + 1e-20) + 1e-20)
        return F.softmax((self.log_alpha + gumbel) / self.temp, dim=-1)

    def cells(self, x, w):
        x = self.stem(x)
        for e, edge in enumerate(self.edges):
            x = edge(x, w[e])
        return x

    def forward(self, x):
        return self.head(self.cells(x, self.weights()).mean((2, 3)))


class AuxiliarySkip(Supernet):
    """The mixed edges plus a skip branch scaled by a decaying coefficient the training loop keeps on a
    module-level scheduler object (DARTS-, auxiliary skip connection)."""

    def forward(self, x):
        y = self.cells(x, F.softmax(self.log_alpha, dim=-1))
        return self.head((y + self.stem(x) * SCHEDULER.decay_rate).mean((2, 3)))


class Sharpened(Supernet):
    """Besides the temperature, a float that also steers Python (``if``): that one stays a constant of
    the graph, guarded (its change captures anew); the temperature stays an input."""

    def __init__(self):
        super().__init__()
        self.sharpen = 1.0

    def forward(self, x):
        y = self.cells(x, self.weights())
        if self.sharpen > 0.6:
            y = F.relu(y) * self.sharpen
        return self.head(y.mean((2, 3)))


def _step(model, x, seed=1):
    torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


def _assert_follows(simplified, eager, x, set_value, values, recaptures, warns=None):
    """For each value: the simplified module keeps its graph (or captures anew, ``recaptures``) without
    a warning (or with one matching ``warns``), and its output and every gradient (weights and alphas)
    equal the eager copy's."""
    for value in values:
        set_value(simplified.original, value)
        set_value(eager, value)
        graph = simplified.graph_module
        with warnings.catch_warnings() if warns is None else pytest.warns(UserWarning, match=warns):
            if warns is None:
                warnings.simplefilter("error")
            got, got_grads = _step(simplified, x)
        assert (simplified.graph_module is not graph) == recaptures, value
        want, want_grads = _step(eager, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for have, expected in zip(got_grads, want_grads):
            torch.testing.assert_close(have, expected, rtol=1e-4, atol=1e-6)


def _set_temp(model, value):
    model.temp = value


def _simplified(model_class, dtype=torch.float32):
    """(simplified, an eager copy of the model, an input): exact mode, strict."""
    torch.manual_seed(0)
    model = model_class().to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    eager = copy.deepcopy(model)
    return topofx.simplify(model, x, mode="exact", strict=True), eager, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temperature_is_an_input(dtype):
    simplified, eager, x = _simplified(Supernet, dtype)
    assert simplified.graph_module is not None
    _assert_follows(simplified, eager, x, _set_temp, (0.5, 0.2, 3.0), recaptures=False)


def test_scheduler_coefficient_is_an_input():
    simplified, eager, x = _simplified(AuxiliarySkip)

    def set_rate(_, value):
        SCHEDULER.decay_rate = value

    try:
        _assert_follows(simplified, eager, x, set_rate, (0.25, 0.0, 0.8), recaptures=False)
    finally:
        SCHEDULER.decay_rate = 0.5


def test_float_python_decides_on_recaptures():
    simplified, eager, x = _simplified(Sharpened)

    def set_sharpen(model, value):
        model.sharpen = value

    _assert_follows(simplified, eager, x, _set_temp, (0.5,), recaptures=False)
    _assert_follows(simplified, eager, x, set_sharpen, (2.0,), recaptures=True)
    # changed again right after that capture: still captured anew, with one warning that it costs a capture
    again = r"Sharpened\.forward decides in Python on values that changed again after 1 call\(s\) \(Sharpened\.sharpen\)"
    _assert_follows(simplified, eager, x, set_sharpen, (0.3,), recaptures=True, warns=again)
    _assert_follows(simplified, eager, x, _set_temp, (0.7,), recaptures=False)


def test_a_copy_reads_its_own_temperature():
    """``copy.deepcopy`` of the simplified module (DARTS-V2's unrolled model): the copy's graph reads the
    copy's temperature, the original's graph the original's."""
    torch.manual_seed(0)
    model = Supernet()
    x = torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    twin = copy.deepcopy(simplified)
    _assert_follows(twin, copy.deepcopy(twin.original), x, _set_temp, (0.3,), recaptures=False)
    _assert_follows(simplified, copy.deepcopy(model), x, _set_temp, (1.0,), recaptures=False)
    assert twin.original.temp == 0.3 and model.temp == 1.0
