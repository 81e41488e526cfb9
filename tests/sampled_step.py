"""One training step of a sampled supernet, for comparing a simplified module with its original."""
from __future__ import annotations

import torch

from topofx.ir import preserved_state


def one_step(model, net, inputs, seed):
    """``net`` (the model itself or its simplified module) on ``inputs`` from RNG ``seed``, one backward of
    ``logsumexp`` of the logits (the last output): ``(outputs, gradients by parameter name, buffers
    after)``; the model's state, parameters' gradients included, is restored afterwards."""
    with preserved_state(model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = net(*inputs) if isinstance(inputs, tuple) else net(inputs)
        logits = out[-1] if isinstance(out, (tuple, list)) else out
        logits.logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        model.zero_grad(set_to_none=True)
    return out, grads, buffers
