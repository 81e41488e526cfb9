"""Rewrite passes, one small module each (importable as ``topofx.passes``).

``EXACT_PASSES`` keep outputs, gradients and BN statistics equal to the original's;
``TOPO_PASSES`` add the TopoNAS floating/merge rewrite (vertex-exact).
"""
from .zero_elimination import zero_elimination
from .prefix_sharing import prefix_sharing
from .horizontal_fusion import horizontal_fusion
from .weight_folding import weight_folding
from .floating_merge import floating_merge
from .recompute import recompute
from .pool_as_conv import pool_as_conv

EXACT_PASSES = (zero_elimination, prefix_sharing, pool_as_conv, weight_folding, horizontal_fusion, recompute)
# TopoNAS: float and merge before folding/fusion take the Conv->BN candidates apart.
TOPO_PASSES = (zero_elimination, prefix_sharing, pool_as_conv, floating_merge, weight_folding, horizontal_fusion, recompute)

__all__ = ["EXACT_PASSES", "TOPO_PASSES", "floating_merge", "recompute", "pool_as_conv", "zero_elimination", "prefix_sharing", "horizontal_fusion", "weight_folding"]
