"""Rewrite passes, one small module each (importable as ``topofx.passes``).

``EXACT_PASSES`` keep outputs, gradients and BN statistics equal to the original's.
"""
from .zero_elimination import zero_elimination
from .prefix_sharing import prefix_sharing
from .horizontal_fusion import horizontal_fusion

EXACT_PASSES = (zero_elimination, prefix_sharing, horizontal_fusion)

__all__ = ["EXACT_PASSES", "zero_elimination", "prefix_sharing", "horizontal_fusion"]
