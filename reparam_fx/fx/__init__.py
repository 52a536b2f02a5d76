"""The torch.fx frontend: ``fuse(model)`` for torch models, in the order it works.

* :mod:`.capture` - from what the caller holds to a graph: symbolic tracing that records
  what each module really computes, untraceable blocks kept as leaves, ``torch.export``.
* :mod:`.values` - reading a node without running it: shapes from metadata, shape
  arithmetic, metadata reads, pure ops.
* :mod:`.ranks` - tensor ranks the graph proves (a union-find over rank-keeping ops).
* :mod:`.facts` - what the graph proves about its values: value users vs metadata reads,
  constants computed from parameters, ranks, in-place mutations, padding with a written
  border.
* :mod:`.ops` - what one node computes, as an :mod:`reparam_fx.core.affine` term.
* :mod:`.rewrite` - regions (:mod:`reparam_fx.core.regions`) found and written back as one op each.
* :mod:`.leaves` - fusing inside the modules the graph keeps whole.
* :mod:`.counts` - op histograms, parameters and MACs.
* :mod:`.driver` - ``fuse`` itself: capture, passes to a fixpoint, result, report.
"""

from reparam_fx.fx.capture import FusionError
from reparam_fx.fx.driver import fuse

__all__ = ["fuse", "FusionError"]
