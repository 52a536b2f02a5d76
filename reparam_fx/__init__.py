"""reparam_fx: structural re-parameterization as exact graph rewrites.

    fused = reparam_fx.fuse(model.eval())            # any traceable model
    print(fused.fusion_report)                       # what was fused, what was left and why
    reparam_fx.verify(model, fused, (x,))            # float64 relative error, raises above rtol

``fuse`` folds every region of the graph that is an affine, translation-equivariant map
of one tensor (convs, eval BatchNorm, identities, per-channel constants, average pools,
zero pads, linears, and sums/differences of those) into a single conv or linear, when
that is exact for every input size and adds no MACs. The algebra is in
:mod:`reparam_fx.affine`; the torch.fx frontend in :mod:`reparam_fx.fx`.
"""

from reparam_fx.fx import FusionError, fuse
from reparam_fx.report import FusedRegion, FusionReport, Skipped, op_counts, parameter_count
from reparam_fx.verify import VerificationError, relative_error, verify

__all__ = [
    "fuse", "FusionError", "verify", "VerificationError", "relative_error",
    "FusionReport", "FusedRegion", "Skipped", "op_counts", "parameter_count",
]
__version__ = "0.1.0"

_ONNX_API = ("fuse_onnx_model", "verify_onnx")


def __getattr__(name):
    """The ONNX frontend loads on first use (it needs the ``onnx`` extra)."""
    if name in _ONNX_API:
        from reparam_fx import onnx_
        return getattr(onnx_, name)
    raise AttributeError(f"module 'reparam_fx' has no attribute {name!r}")
