"""Run the graph's image tensors in channels-last memory layout on the CPU (exact).

Matches: a graph with 4-D floating-point CPU inputs that also runs on channels-last inputs --
checked by running it once on the example inputs in that layout, without gradients and with every
parameter, buffer and the RNG restored afterwards (a ``view`` that needs NCHW strides, for instance,
fails there and the graph is left untouched; meta tensors cannot prove it: their convolutions
do not propagate the CPU kernels' layout).
Applied once: a graph whose inputs already pass through ``to_channels_last`` is not matched again.
Produces: :func:`~topofx.modules.to_channels_last` on each 4-D input and
:func:`~topofx.modules.to_contiguous` on each 4-D output.  Both act on CPU tensors only (on other
devices they return their argument), so the layout changes where oneDNN's convolutions gain from it
(at 16 channels a 3x3 convolution's forward and backward run ~3x faster, a depthwise one ~5x) and
nowhere else.  Exact against the original fed channels-last input: the same operations on the same
values.  Against the original as run in NCHW, PyTorch's channels-last kernels round differently
(batch-norm statistics most, ~1e-4 relative on nearly constant channels), which is why ``simplify``
applies this pass only with ``layout="channels_last"``.
Serves the CPU only (its conversions act on CPU tensors): on CUDA channels-last pays with cuDNN's
tensor-core kernels (half precision under autocast), a choice the user makes by feeding channels-last
inputs and ``model.to(memory_format=torch.channels_last)`` -- the graph keeps the layout it is fed.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from topofx.ir import VALUE, preserved_state
from topofx.modules import is_cpu_image, to_channels_last, to_contiguous
from topofx.rewrite import PassContext, Rewrite


def _runs_channels_last(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Run the graph once on the example inputs in channels-last layout; False on any failure."""
    if not any(is_cpu_image(x) and x.device.type == "cpu" for x in example_inputs):
        return False  # nothing to prove it on (inputs on another device: the layout would not apply)
    try:
        with torch.no_grad(), preserved_state(gm):
            gm(*map(to_channels_last, example_inputs))
    except Exception:  # noqa: BLE001 -- any failure means "not proven": leave the graph alone
        return False
    return True


def channels_last(ctx: PassContext) -> list[Rewrite]:
    graph = ctx.gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if any(u.target is to_channels_last for p in placeholders for u in p.users):
        return []  # already applied
    images = [p for p in placeholders if is_cpu_image(p.meta.get(VALUE)) and p.users]
    if not images or not _runs_channels_last(ctx.gm, ctx.example_inputs):
        return []
    for image in images:
        with graph.inserting_after(image):
            converted = graph.call_function(to_channels_last, (image,))
        image.replace_all_uses_with(converted, delete_user_cb=lambda user: user is not converted)
        converted.meta[VALUE] = image.meta[VALUE]
    output = next(n for n in reversed(graph.nodes) if n.op == "output")

    def restore(arg: fx.Node) -> fx.Node:
        if not is_cpu_image(arg.meta.get(VALUE)):
            return arg
        with graph.inserting_before(output):
            return graph.call_function(to_contiguous, (arg,))

    output.args = fx.node.map_arg(output.args, restore)
    return [Rewrite("channels_last", "layout", [n.name for n in images], images[0].name, True,
                    f"{len(images)} image input(s) run in channels-last layout on the CPU")]


channels_last.name = "channels_last"
channels_last.exact = True
channels_last.devices = ("cpu",)
