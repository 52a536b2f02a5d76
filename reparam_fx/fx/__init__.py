"""The torch.fx frontend: ``fuse(model)`` for torch models, in the order it works.

* :mod:`.capture` - from what the caller holds to a graph: symbolic tracing that records
  what each module really computes, untraceable blocks kept as leaves, ``torch.export``.
* :mod:`.values` - reading a node without running it: shapes from metadata, shape
  arithmetic, metadata reads, pure ops.
* :mod:`.ranks` - tensor ranks the graph proves (a union-find over rank-keeping ops).
* :mod:`.facts` - what the graph proves about its values: value users vs metadata reads,
  constants computed from parameters, ranks, in-place mutations, padding with a written
  border.
* :mod:`.view` - the graph as :mod:`reparam_fx.core.regions` walks it (:class:`FxView`).
* :mod:`.ops` - what one node computes, as a :mod:`reparam_fx.core.affine` term.
* :mod:`.moves` - reshapes, permutes and averages as channel-axis maps
  (:mod:`reparam_fx.core.layout`).
* :mod:`.rewrite` - one pass: regions found (:mod:`reparam_fx.core.pipeline`) and written
  back as one op each.
* :mod:`.leaves` - fusing inside the modules the graph keeps whole; :mod:`.uses` reads
  their code to tell which children may be replaced, :mod:`.live` which of it can run.
* :mod:`.counts` - op histograms, parameters and MACs.
* :mod:`.driver` - ``fuse`` itself: capture, passes to a fixpoint, result, report.

The ONNX frontend (:mod:`reparam_fx.onnx`) has the same roles under the same names
(view, ops, moves, rewrite, driver).
"""

from reparam_fx.fx.capture import FusionError
from reparam_fx.fx.driver import fuse

__all__ = ["fuse", "FusionError"]
