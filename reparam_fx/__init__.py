"""reparam_fx: structural re-parameterization as exact graph rewrites.

    fused = reparam_fx.fuse(model.eval())            # any traceable model
    print(fused.fusion_report)                       # what was fused, what was left and why
    reparam_fx.verify(model, fused, (x,))            # float64 relative error, raises above rtol

``fuse`` folds every region of the graph that is an affine, translation-equivariant map
of one tensor (convs, eval BatchNorm, identities, per-channel constants, average pools,
zero pads, linears, and sums/differences of those) into a single conv or linear, when
that is exact for every input size and adds no MACs. The algebra is in
:mod:`reparam_fx.core.affine`; the torch.fx frontend in :mod:`reparam_fx.fx`.
"""

from importlib import import_module

# Public names and the modules that define them; loaded on first use, so that e.g. the
# ONNX command line reports a bad file without importing torch first.
_EXPORTS = {
    "fuse": "reparam_fx.fx", "FusionError": "reparam_fx.fx",
    "Leaf": "reparam_fx.core.report",
    "verify": "reparam_fx.core.verification", "VerificationError": "reparam_fx.core.verification",
    "relative_error": "reparam_fx.core.verification",
    "FusionReport": "reparam_fx.core.report", "FusedRegion": "reparam_fx.core.report",
    "Skipped": "reparam_fx.core.report", "op_counts": "reparam_fx.fx.counts",
    "parameter_count": "reparam_fx.fx.counts", "mac_count": "reparam_fx.fx.counts",
    "fuse_onnx_model": "reparam_fx.onnx", "verify_onnx": "reparam_fx.onnx",
    "Int8Policy": "reparam_fx.int8.policy",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reparam_fx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
