"""A capture verifies itself before it is trusted: one training step of the captured graph against the
eager model (outputs, gradients of weights and architecture tensors, buffer updates; on float64 copies
where float32 noise is amplified), and floats made graph inputs checked at perturbed values."""
from __future__ import annotations

import contextlib
import functools
import io
import math
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..ir import (
    FLOAT_INPUTS,
    VALUE_GUARD,
    float64_copies,
    float_leaves,
    graph_attr_tensors,
    max_rel_error,
    preserved_state,
    run_seeded,
)
from . import float_inputs as _floats
from . import tensor_inputs as _tensors
from .frames import CaptureError
from .held import tensors_held


def verify_capture(
    model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[Any], rtol: float = 1e-5,
    live_attrs: Sequence[str] = (),
) -> None:
    """Check a captured graph before trusting it; raise :class:`CaptureError` on any failure.  Its tensor
    inputs (``topofx.capture.tensor_inputs``) are leaf aliases of themselves meanwhile."""
    with _tensors.as_leaves(gm):
        _verify(model, gm, example_inputs, rtol, live_attrs)


def _verify(model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[Any], rtol: float,
            live_attrs: Sequence[str]) -> None:
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in live_attrs:
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
                frame = node.meta.get("topofx_user_frame")
                raise CaptureError(
                    f"a tensor with autograd history that no module holds (a global, a closure, or computed in "
                    f"forward from one) was frozen into the graph ({node.target}"
                    f"{', used at ' + str(frame) if frame else ''}). Store it on a module (then the graph reads the "
                    "one stored for each call), or compute it inside forward() from the model's parameters, buffers "
                    "or the tensors its modules hold"
                )
    attrs = [t for t in graph_attr_tensors(gm) if not any(t is getattr(gm, n, None) for n in live_attrs)]
    kept = [*attrs, *tensors_held(model)]  # what every step below restores (values, gradients)
    err = _output_error(model, gm, example_inputs, kept)
    if not err <= rtol:
        err = _in_float64(_output_error, model, gm, example_inputs, kept, err)
    if not err <= rtol:
        raise CaptureError(f"captured graph disagrees with eager forward (max relative error {err:.2e})")
    if attrs:
        with preserved_state(model, tensors=kept), torch.no_grad(), _perturbed(attrs):
            eager2 = run_seeded(model, example_inputs)
            with preserved_state(model):
                graphed2 = run_seeded(gm, example_inputs)
            guard = gm.meta.get(VALUE_GUARD)
            decided_alike = guard is None or not guard.changed(model)  # else the graph is captured anew
        if decided_alike and not max_rel_error(graphed2, eager2) <= rtol:
            raise CaptureError("captured graph does not follow the architecture weights (they were frozen as constants)")
    resample = getattr(model, "resample", None)  # an adapter's sampling step, run before every call
    if not live_attrs:  # backward too: a capture that changes it (a custom Function traced through) is caught
        differs = _step_mismatch(model, gm, example_inputs, kept, rtol)
        if differs is not None:
            differs = _in_float64(functools.partial(_step_mismatch, rtol=rtol), model, gm, example_inputs, kept, differs)
        if differs is not None:
            raise CaptureError(f"captured graph's training step disagrees with eager forward+backward: the {differs} "
                               "differs (an operation whose backward is not its forward's autograd?)")
    with preserved_state(model, tensors=kept):
        for _ in range(1 if not live_attrs else 2):  # forward+backward works twice (once above)
            if live_attrs and callable(resample):
                resample(gm)
            _backward(run_seeded(gm, example_inputs))


@contextlib.contextmanager
def _perturbed(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Each tensor holds other values (random, fixed seed) while the block runs: new storage through
    ``.data``, put back after, so no version counter moves (a tensor sampled from an alpha before the
    call, ``topofx.capture.tensor_inputs``, can still backpropagate into it)."""
    gen = torch.Generator().manual_seed(1234)
    originals = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data + torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) * 0.5
        yield
    finally:
        for t, data in zip(tensors, originals):
            t.data = data


class FloatsNotFollowed(CaptureError):
    """The captured graph does not follow its float inputs: they are to stay constants."""

    def __init__(self, floats: list, err: float):
        super().__init__(f"the captured graph does not follow {', '.join(f.where for f in floats)} "
                         f"(max relative error {err:.2e} at other values)")
        self.floats = floats


def verify_float_inputs(model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[Any], rtol: float = 1e-5) -> None:
    """Run the graph against the eager model with every float input set to another value
    (:func:`topofx.capture.float_inputs.perturbed`); raise :class:`FloatsNotFollowed` unless they agree (a
    stand-in took forward down another Python path than the float would, unseen by the trace)."""
    floats = gm.meta.get(FLOAT_INPUTS)
    if not floats:
        return
    kept = [*graph_attr_tensors(gm), *tensors_held(model)]
    captured = [f.last for f in floats]
    try:
        for float_input in floats:
            float_input.install(_floats.perturbed(float_input.last))
            float_input.refresh(gm)
        with preserved_state(model, tensors=kept):
            eager = run_seeded(model, example_inputs)
        with preserved_state(model, tensors=kept):
            err = max_rel_error(run_seeded(gm, example_inputs), eager)
    except Exception:  # noqa: BLE001 - the model rejects other values: it depends on them otherwise
        err = math.inf
    finally:
        for float_input, value in zip(floats, captured):
            float_input.install(value)
            float_input.refresh(gm)
    if not err <= rtol:
        raise FloatsNotFollowed(floats, err)


def _backward(out: Any) -> None:
    leaves = float_leaves(out)
    loss = sum(leaf.float().sum() for leaf in leaves if leaf.requires_grad)
    if isinstance(loss, torch.Tensor):
        loss.backward()


def _step(module: nn.Module, inputs: Sequence[Any], state: list[torch.Tensor]) -> list[tuple[str, Any]]:
    """One seeded forward+backward from cleared grads: every tensor's gradient, and every buffer after it."""
    for t in state:
        t.grad = None
    _backward(run_seeded(module, inputs))
    return [("gradient", t.grad) if t.requires_grad else ("value after the step", t.detach().clone()) for t in state]


def _step_mismatch(model: nn.Module, gm: fx.GraphModule, inputs: Sequence[Any], kept: list[torch.Tensor],
                   rtol: float) -> str | None:
    """What differs between one seeded training step of ``model`` and of ``gm`` (a gradient or a buffer
    after the step, named by kind and shape), or None."""
    state = [*dict.fromkeys([*model.parameters(), *graph_attr_tensors(gm), *model.buffers()])]
    with preserved_state(model, tensors=kept):
        expected = _step(model, inputs, state)
    with preserved_state(model, tensors=kept):
        got = _step(gm, inputs, state)
    grads = [w for name, w in expected if name == "gradient" and w is not None and w.numel()]
    scale = max((g.abs().max().item() for g in grads), default=0.0)  # an analytically zero gradient (a conv
    for (name, want), (_, have) in zip(expected, got):  # before a BN under `.sum()`) holds only float noise
        if not _close(have, want, rtol, scale if name == "gradient" else 0.0):
            return f"{name} of a {tuple(want.shape) if want is not None else tuple(have.shape)} tensor"
    return None


def _output_error(model: nn.Module, gm: fx.GraphModule, inputs: Sequence[Any], kept: list[torch.Tensor]) -> float:
    """The largest relative difference of ``gm``'s seeded output from ``model``'s."""
    with preserved_state(model, tensors=kept):
        eager = run_seeded(model, inputs)
    with preserved_state(model, tensors=kept):
        return max_rel_error(run_seeded(gm, inputs), eager)


def _in_float64(judge: Callable[..., Any], model: nn.Module, gm: fx.GraphModule, inputs: Sequence[Any],
                kept: list[torch.Tensor], verdict: Any) -> Any:
    """``judge(model, gm, inputs, kept)`` again on float64 copies of both, for a float32 model: a network that
    normalizes nearly equal samples amplifies a reordered sum's float32 rounding past any tolerance, float64
    does not, and a wrong capture differs there as much.  ``verdict`` (float32's) where there is no such copy."""
    if not any(t.dtype == torch.float32 for t in (*model.parameters(), *model.buffers())):
        return verdict
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # (FX prints a failing generated forward's traceback)
            (model64, gm64), inputs64, kept64, _ = float64_copies((model, gm), inputs, kept)
            return judge(model64, gm64, inputs64, kept64)
    except Exception:  # noqa: BLE001 - a model that cannot run in float64: the float32 verdict stands
        return verdict


def _close(have: torch.Tensor | None, want: torch.Tensor | None, rtol: float, floor: float = 0.0) -> bool:
    """Equal up to float noise, at the scale of the larger tensor (at least ``floor``: the model's largest
    gradient, for gradients); a missing gradient equals zeros."""
    if have is None or want is None:
        present = want if have is None else have
        return present is None or not present.numel() or not present.abs().max().item() > 10 * rtol * floor
    if have.shape != want.shape:
        return False
    if not want.is_floating_point():
        return torch.equal(have, want)
    scale = max(want.abs().max().item(), have.abs().max().item(), floor, 1e-6) if want.numel() else 1.0
    return not ((have - want).abs().max().item() > 10 * rtol * scale) if want.numel() else True
