"""topofx: TopoNAS (arXiv 2408.01311) as a graph-rewriting compiler pass on torch.fx.

``topofx.simplify(model, example_inputs)`` captures an unmodified one-shot NAS supernet, rewrites the
redundant parallel paths of its mixed edges, and returns a drop-in module that trains faster with
less memory.  See ``docs/`` and ``../shared/METHOD.md`` for the method.
"""
from .capture import CaptureError
from .derive import derive
from .estimate import MemoryEstimate, estimate
from .report import Report
from .simplifier import SelfCheckError, SimplifiedModule, simplify
from .sparse import gate
from .topology import analyze

__all__ = ["simplify", "derive", "SimplifiedModule", "SelfCheckError", "Report", "CaptureError", "analyze", "gate", "estimate", "MemoryEstimate"]
__version__ = "0.1.0"
