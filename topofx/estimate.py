"""``topofx.estimate(model, example_inputs)``: memory of a training step, original against simplified,
without running it.

Both forwards run once under PyTorch's ``FakeTensorMode`` (tensors with shapes, dtypes and devices
but no storage: nothing is allocated, no kernel runs), at the example's batch size and at twice it.
Every tensor autograd saves for backward is counted once per storage by the counter ``topofx bench``
measures real steps with (``bench.counting_saved_bytes``), so the two agree to a fraction of a percent.  Two batch
sizes give the per-sample slope and the fixed part of the activations; the model's state
(parameters, their gradients, optimizer slots, buffers) is added for the predicted peak, and
:meth:`MemoryEstimate.max_batch` inverts it for a memory budget.

Predicted peak = state + activations(batch): it leaves out the allocator's rounding and caching,
the transient workspace of single kernels (cuDNN), and the inputs themselves -- a lower bound on
``torch.cuda.max_memory_allocated`` of a training step.  Sampled supernets that run sparsely
(``topofx.sparse``: the cost depends on each call's sample) and models whose forward needs tensor
values (``.item()``) cannot be estimated this way; ``topofx bench`` measures them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .bench import counting_saved_bytes
from .ir import preserved_state

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Saved-activation bytes of one training step, ``fixed + per_sample * batch``, per variant."""

    model: str
    batch_size: int  # the example's
    per_sample: dict[str, float]  # "original", "simplified": activation bytes per sample
    fixed: dict[str, float]  # activation bytes that do not grow with the batch
    state_bytes: int  # parameters + gradients + optimizer slots + buffers

    def activations(self, which: str, batch_size: int | None = None) -> float:
        batch = self.batch_size if batch_size is None else batch_size
        return self.fixed[which] + self.per_sample[which] * batch

    def peak(self, which: str, batch_size: int | None = None) -> float:
        """Predicted peak bytes of a training step (a lower bound: see the module docstring)."""
        return self.state_bytes + self.activations(which, batch_size)

    def max_batch(self, budget_bytes: float, which: str = "simplified") -> int:
        """The largest batch whose predicted peak fits ``budget_bytes`` (0 when none does)."""
        room = budget_bytes - self.state_bytes - self.fixed[which]
        return max(0, int(room // self.per_sample[which])) if self.per_sample[which] > 0 else 0

    def __str__(self) -> str:
        lines = [f"topofx estimate: {self.model}, batch {self.batch_size} (no memory allocated; FakeTensorMode)",
                 f"  {'variant':<12}{'act./sample (MB)':>18}{'act. (MB)':>12}{'peak (MB)':>12}{'max batch 16 GiB':>18}"]
        for which in ("original", "simplified"):
            lines.append(f"  {which:<12}{self.per_sample[which] / 2**20:>18.2f}{self.activations(which) / 2**20:>12.1f}"
                         f"{self.peak(which) / 2**20:>12.1f}{self.max_batch(16 * GIB, which):>18}")
        ratio = self.activations("simplified") / self.activations("original")
        lines.append(f"  simplified/original activation memory: {ratio:.2f}")
        return "\n".join(lines)


def estimate(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *, mode: str = "topo",
             optimizer_slots: int = 1, simplified: nn.Module | None = None) -> MemoryEstimate:
    """Estimate the training-step memory of ``model`` and of its simplified module.

    Args:
        model: the supernet, or a :class:`~topofx.SimplifiedModule` (its original is the baseline).
        example_inputs: a tensor or tuple; its first dimension is the batch.
        mode: the simplify mode when ``model`` is not simplified yet.
        optimizer_slots: optimizer tensors per parameter (SGD with momentum 1, Adam 2).
        simplified: an already simplified module of ``model`` (else ``simplify`` runs).
    """
    from .simplifier import SimplifiedModule, simplify

    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if isinstance(model, SimplifiedModule):
        model, simplified = model.original, model
    simplified = simplified if simplified is not None else simplify(model, inputs, mode=mode)
    if simplified.__dict__.get("sparse") is not None:
        raise ValueError(f"estimate: {type(model).__name__} runs sparsely (topofx.sparse): its memory depends on "
                         "each call's sample; measure it with topofx bench")
    batch = inputs[0].shape[0]
    measured = {which: [_fake_saved_bytes(net, model, inputs, scale) for scale in (1, 2)]
                for which, net in (("original", model), ("simplified", simplified))}
    per_sample = {w: (two - one) / batch for w, (one, two) in measured.items()}
    fixed = {w: max(0.0, one - per_sample[w] * batch) for w, (one, _) in measured.items()}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return MemoryEstimate(type(model).__name__, batch, per_sample, fixed, params * (2 + optimizer_slots) + buffers)


def _fake_saved_bytes(net: nn.Module, model: nn.Module, inputs: tuple, scale: int) -> int:
    """Bytes of distinct storages autograd saves in one train-mode forward of ``net`` on fake inputs
    whose batch is ``scale`` times the example's (the model's state is left as it was)."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    state = [t for t in model.__dict__.values() if isinstance(t, torch.Tensor)]  # plain-tensor alphas
    with preserved_state(model, tensors=state), fake_mode, torch.enable_grad():
        fakes = tuple(torch.empty((x.shape[0] * scale, *x.shape[1:]), dtype=x.dtype, device=x.device)
                      if isinstance(x, torch.Tensor) else x for x in inputs)
        was = net.training
        net.train()
        try:
            with counting_saved_bytes() as counted:
                net(*fakes)
        except Exception as exc:  # noqa: BLE001 - a forward that needs tensor values
            raise ValueError(f"estimate: {type(model).__name__}'s forward cannot run without tensor values "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                             "measure it with topofx bench") from exc
        finally:
            net.train(was)
    return counted.total
