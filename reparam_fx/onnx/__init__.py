"""The ONNX frontend: the same exact affine algebra over an onnx-graphsurgeon graph.

    fused_model, report = fuse_onnx_model(onnx.load("model.onnx"))

The modules have the torch frontend's roles and names, in the order the data flows:

* :mod:`.io` - ONNX files read weightless (initializers as stubs pointing into the file)
  and written tensor by tensor; the weights are read only where a region uses them.
* :mod:`.view` - the graph as :mod:`reparam_fx.core.regions` walks it (:class:`OnnxView`):
  values, users, shapes and sizes the graph proves, constants.
* :mod:`.ops` - what one node computes, as a :mod:`reparam_fx.core.affine` term.
* :mod:`.moves` - reshapes, transposes and averages as channel-axis maps.
* :mod:`.rewrite` - one pass: regions found and written back as one node each.
* :mod:`.simplify` - the exact cleanups around the passes (constant folding, no-op
  removal, slices merged into a ``Split``).
* :mod:`.driver` - ``fuse_onnx_model`` itself: opset check, weightless copy, passes to a
  fixpoint (:func:`reparam_fx.core.pipeline.run_passes`), result, report.
* :mod:`.verify` - the fused model against the original in ONNX Runtime.

Symbolic dimensions (a ``dim_param`` name, or unknown) are never read as numbers: a size
is a number only where the graph proves it; otherwise the node is left alone with a
reason. The input model is never modified.
"""

from reparam_fx.onnx.driver import OnnxFusionError, fuse_onnx_model, model_opset
from reparam_fx.onnx.verify import random_inputs, verify_onnx
from reparam_fx.onnx.view import constant_value

__all__ = ["OnnxFusionError", "constant_value", "fuse_onnx_model", "model_opset",
           "random_inputs", "verify_onnx"]
