"""Rewrite passes, one small module each (importable as ``topofx.passes``).

``canonical_joins`` runs once before the others, on the graph as captured (``simplify``'s
``canonicalize``): it rewrites joins written other than as ``+`` chains into them (exact).
Both pipelines start with ``functional_modules`` (exact): functional ``conv2d`` / ``batch_norm``
calls on the model's own whole tensors become the stock modules the other passes match.
``EXACT_PASSES`` keep outputs, gradients and BN statistics equal to the original's;
``TOPO_PASSES`` add the TopoNAS floating/merge rewrite and ``distribute``, which feeds it candidates
that end in a skip sum (both vertex-exact).
After the rewrites reach their fixpoint, ``simplify`` lowers the result: ``TOPO_LOWERING`` in topo
mode (they take apart the sums the rewrites match on), then ``channels_last`` where its ``layout``
argument asks for it (a memory-layout choice, not a topology rewrite).
A pass that serves some devices only says which in ``pass.devices`` (and why, in its docstring):
``simplify`` runs it only when the model runs on one of them (``for_device``); the rewrites serve all.
"""
from .batched_merge import batched_merge
from .canonical_joins import canonical_joins
from .channels_last import channels_last
from .depthwise_layout import depthwise_layout
from .depthwise_recompute import depthwise_recompute
from .distribute import distribute
from .floating_merge import floating_merge
from .functional_modules import functional_modules
from .horizontal_fusion import horizontal_fusion
from .pool_as_conv import pool_as_conv
from .prefix_sharing import prefix_sharing
from .recompute import recompute
from .weight_folding import weight_folding
from .weighted_sum import weighted_sum
from .zero_elimination import zero_elimination

EXACT_PASSES = (functional_modules, zero_elimination, prefix_sharing, pool_as_conv, weight_folding, horizontal_fusion, recompute)
# TopoNAS: float and merge before folding/fusion take the Conv->BN candidates apart; distribute
# first, so that candidates ending in a skip sum (``w * (x + c)``) meet the join as ``w * c``.
TOPO_PASSES = (functional_modules, zero_elimination, prefix_sharing, pool_as_conv, distribute, floating_merge, weight_folding, horizontal_fusion)
TOPO_LOWERING = (weighted_sum, recompute, depthwise_layout, depthwise_recompute, batched_merge)



def for_device(passes: tuple, device_type: str) -> tuple:
    """The passes that serve a device type (``"cpu"``, ``"cuda"``, ...): those without ``devices`` serve all."""
    return tuple(p for p in passes if device_type in getattr(p, "devices", (device_type,)))


__all__ = ["for_device", "batched_merge", "canonical_joins", "functional_modules", "EXACT_PASSES", "TOPO_PASSES", "TOPO_LOWERING", "channels_last", "weighted_sum", "depthwise_layout", "depthwise_recompute", "distribute", "floating_merge", "recompute", "pool_as_conv", "zero_elimination", "prefix_sharing", "horizontal_fusion", "weight_folding"]
