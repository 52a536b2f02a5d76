"""int8 deployment: a fusion policy for int8 back ends, calibration, lowering, SQNR.

    fused = reparam_fx.fuse(model.eval(), target="int8")   # still exact in float
    print(fused.fusion_report.int8)                       # what the policy did, per conv

    from reparam_fx.int8 import calibration_inputs, quantize_pt2e, int8_sqnr
    q = quantize_pt2e(fused, batches)                     # simulated int8 (PT2E, XNNPACK)
    int8_sqnr(fused, batches, held_out, reference=model)  # dB against the float model
    reparam_fx.export.to_executorch_int8(fused, (x,), "m.pte", calibration=batches)

The calibration data (an iterable of the model's inputs) sets the activation ranges: it
must be real data for the int8 accuracy to be real; ``random_calibration`` is for smoke
runs. Modules: ``calibration`` (checks), ``quantize`` (PT2E, SQNR), ``lowering`` (the
int8 ``.pte`` / QDQ ``.onnx`` / W8A8 ``.mlpackage``, re-exported by
:mod:`reparam_fx.export`), ``policy`` (the fusion policy).
"""

from importlib import import_module

# loaded on first use: fuse(target="int8") imports the policy without torchao or ExecuTorch
_EXPORTS = {
    "CalibrationError": "reparam_fx.int8.calibration",
    "calibration_inputs": "reparam_fx.int8.calibration",
    "random_calibration": "reparam_fx.int8.calibration",
    "quantize_pt2e": "reparam_fx.int8.quantize",
    "sqnr_db": "reparam_fx.int8.quantize",
    "int8_sqnr": "reparam_fx.int8.quantize",
    "Int8Policy": "reparam_fx.int8.policy",
    "apply_int8_policy": "reparam_fx.int8.policy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reparam_fx.int8' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
