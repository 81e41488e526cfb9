"""Test-suite configuration.

* One intra-op thread: the CI machine has two shared cores; one thread per process is both faster
  there (no oversubscription) and reproducible (the reduction order of a convolution or a batch
  norm does not depend on how work is split between threads).
* Hypothesis profile ``ci`` (loaded by default; ``--hypothesis-profile=...`` overrides it): no
  per-example deadline (the first example of a run pays for imports and warm-up), no ``too_slow``
  health check (drawing a supernet is cheap, building and capturing it is not), and derandomized,
  so a CI run draws the same examples every time and a failure reproduces.
* ``slow`` marker: tests that simplify zoo models at their full default size (tens of seconds
  each).  They run by default (CI included); ``-m "not slow"`` leaves them out locally.
"""
from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")


@pytest.fixture
def any_size(monkeypatch):
    """The CPU lowerings at every input size (``topofx.cost`` leaves small tensors to the stock kernels)."""
    from topofx import cost

    monkeypatch.setattr(cost, "SMALL_IMAGE", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size zoo model (tens of seconds); deselect with -m 'not slow'")
