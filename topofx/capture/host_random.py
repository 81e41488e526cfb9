"""Draws from Python's ``random`` module and NumPy's global generator in the code a trace runs.

Those generators are not torch's: a graph cannot record such a draw, so the trace would keep the value
drawn while tracing for every later call -- xautodl's uniform sampling (``random.choice(candidates)`` per
edge) would run one frozen architecture.  The capture's self-check compares the graph with a few eager
calls, which draw anew and agree by chance (one candidate in two: a silent wrong answer), or, when
they do not, a fresh capture for the diagnosis draws again and fails anew.  So, while tracing, each of
their module-level functions first reports the call (:func:`draws_reported`); the tracer then runs the
method or submodule around the draw per call (``capture.md``), or names the line.  A function bound under
another name before tracing (``from random import choice``) or a generator object of the user's
(``self.rng = random.Random(0)``) calls no patched function: for those the tracer compares the states of the host generators
(``topofx.ir.host_rng_state``) around each forward it traces through, and the innermost
forward whose call changed one runs per call (or, the root's, is refused).
"""
from __future__ import annotations

import contextlib
import functools
import random
import sys
import threading
from typing import Any, Callable, Iterator

from .frames import _reads_nothing

_PYTHON = ("random", "uniform", "triangular", "randint", "randrange", "choice", "choices", "sample", "shuffle",
           "getrandbits", "randbytes", "gauss", "normalvariate", "lognormvariate", "expovariate", "vonmisesvariate",
           "gammavariate", "betavariate", "paretovariate", "weibullvariate", "binomialvariate")
_NUMPY = ("rand", "randn", "randint", "random", "random_sample", "ranf", "sample", "choice", "shuffle", "permutation",
          "uniform", "normal", "standard_normal", "binomial", "multinomial", "beta", "gamma", "exponential",
          "gumbel", "poisson", "dirichlet", "bytes")


@contextlib.contextmanager
def draws_reported(report: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, ``random.<f>(...)`` and ``numpy.random.<f>(...)`` called from the user's code on
    this thread call ``report("random.<f>")`` before drawing (the standard library's, NumPy's, torch's and
    topofx's own calls, and other threads' -- a data loader's --, draw as they are)."""
    thread = threading.get_ident()
    numpy = sys.modules.get("numpy")  # only a model that imported NumPy can draw from it
    generators = [(random, "random", _PYTHON)] + ([(numpy.random, "numpy.random", _NUMPY)] if numpy else [])
    patched = [(module, name, module.__dict__[name], f"{prefix}.{name}") for module, prefix, names in generators
               for name in names if callable(module.__dict__.get(name))]
    for module, name, function, qualified in patched:
        setattr(module, name, _reporting(function, qualified, report, thread))
    try:
        yield
    finally:
        for module, name, function, _ in patched:
            setattr(module, name, function)


def _reporting(function: Callable[..., Any], name: str, report: Callable[[str], None], thread: int) -> Callable[..., Any]:
    """``function`` that first reports a call from user code on ``thread`` (its direct caller's file decides)."""
    @functools.wraps(function)
    def draw(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == thread and not _reads_nothing(sys._getframe(1).f_code.co_filename):
            report(name)
        return function(*args, **kwargs)
    return draw
