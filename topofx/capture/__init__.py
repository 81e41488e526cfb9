"""Capture an unmodified supernet as a torch.fx graph at module granularity.

Why not ``torch.fx.symbolic_trace`` or ``torch.export``?  On DARTS-family supernets both fail
silently or loudly (see ``docs/capture.md``): ``symbolic_trace`` cannot iterate
``zip(self._ops, weights)`` and bakes ``softmax(alphas)`` in as a constant when the alphas are plain
tensors; ``torch.export`` turns plain-tensor alphas into constants whose ``.grad`` stays ``None``.

:class:`ValueTracer` is a ``torch.fx.Tracer`` that also *runs* every node on meta tensors while it
records it, so each proxy knows its value's shape and whether that value depends only on shapes
("static"), on the inputs, or on a random draw made in forward; small values computed from the
model's attributes alone (architecture weights, masks, samples) also get real values.  Where Python
needs a Python value (``if``, ``int()``, ``range``, ``.tolist()``, numpy) it is given one:

* from shapes: a *shape decision*, re-checked for every new input shape (``topofx.capture.guards``);
* from architecture values: a *value decision*, re-evaluated before every call (:class:`ValueGuard`);
  a change captures the model anew;
* from a draw that decides the same on fresh draws: *speculated*, checked per call by a graph node
  that runs before any state change (:func:`hoist_speculation`);
* from a draw that decides differently: the innermost module forward or method around it runs per
  call, as one node, with the original's Python (:class:`MethodCall`, ``PER_CALL``);
* from the inputs' values: :class:`CaptureError` naming the user's line.

Python floats that forward uses only in tensor arithmetic (a Gumbel temperature, a decaying
coefficient) are graph inputs: 0-dim tensors the graph module holds, refreshed before each call
(:mod:`topofx.capture.float_inputs`, :func:`_trace_with_float_inputs`); other Python numbers are constants,
guarded.  Non-tensor forward arguments are specialized (one graph per choice); legacy constructors and random
factories become graph nodes; distributions become :class:`DistributionCall` nodes; plain tensor
attributes are registered as non-persistent buffers for the duration of the trace, so they become
live ``get_attr`` nodes.  Leaf modules (``torch.nn`` modules) become ``call_module`` nodes that
reference the original module objects, so parameters and buffers are shared by identity and
optimizers built before capture keep working.

Every capture verifies itself (:func:`verify_capture`) before it is trusted.

The package, in the order a capture runs:

* :mod:`.driver` -- :func:`capture` and :func:`trace`: the outline above, one trace per float-input
  round, then verification;
* :mod:`.tracer` -- :class:`ValueTracer`, what the user's Python is given at each operation;
  :mod:`.values` -- the stand-ins it hands out and the nodes for calls kept whole (methods,
  distributions, custom autograd Functions); :mod:`.frames` -- the user's line behind a failure;
* :mod:`.decisions` -- decisions on architecture values and the units that decide per call;
  :mod:`.speculation` -- decisions on draws, checked per call;
* :mod:`.held` -- tensors in containers and plain objects, made live attributes for the trace;
  :mod:`.reads` and :mod:`.float_inputs` -- Python values read from outside the traced modules;
  :mod:`.tensor_inputs` -- tensors an optimizer samples before the call, read afresh by the graph;
* :mod:`.binding` -- a forward's call signature, one graph per non-tensor argument;
* :mod:`.verify` -- a capture is compared with the eager model before it is trusted;
* :mod:`.guards` -- what the graph assumed, checked before every call of the simplified module.

What a captured graph's nodes carry (``node.meta``), effects and aliasing, meta execution and the
comparison helpers are the graph vocabulary every phase shares: :mod:`topofx.ir`.
"""
from .binding import bind_call, call_key, forward_signature, has_var_args
from .decisions import PER_CALL, ValueGuard, unit_key, unit_name
from .driver import Capture, capture, fingerprint, trace
from .frames import CaptureError, UserFrame, user_frame
from .held import held_at
from .speculation import RESAMPLES, SpeculationFailed, hoist_speculation, speculation_check
from .values import AppliedFunction, AttributeStore, DistributionCall, MethodCall
from .verify import verify_capture, verify_float_inputs

__all__ = [
    "AppliedFunction", "AttributeStore", "Capture", "CaptureError", "DistributionCall", "MethodCall", "PER_CALL", "RESAMPLES",
    "SpeculationFailed", "UserFrame", "ValueGuard", "bind_call", "call_key", "capture", "fingerprint",
    "forward_signature", "has_var_args", "held_at", "hoist_speculation", "speculation_check", "trace", "unit_key",
    "unit_name", "user_frame", "verify_capture", "verify_float_inputs",
]
