"""The fused ONNX model against the original, run by ONNX Runtime on the same inputs.

The error is :func:`reparam_fx.core.verification.relative_error`, as for torch models:
``max|a - b| / max|a|`` over every output, in float64.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from reparam_fx.core.verification import relative_error, within_tolerance

_NUMPY_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
                onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
                onnx.TensorProto.INT32: np.int32}


def random_inputs(model: onnx.ModelProto, input_shapes: dict | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) inputs for every graph input (shapes from the model or
    ``input_shapes``). Raises ValueError naming a symbolic dimension."""
    input_shapes = input_shapes or {}
    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if value.name in input_shapes:
            shape = tuple(input_shapes[value.name])
        else:
            shape = []
            for dim in tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value > 0:
                    shape.append(dim.dim_value)
                else:
                    label = dim.dim_param or "?"
                    raise ValueError(f"input {value.name!r} has symbolic dimension {label!r}: "
                                     f"give its shape in input_shapes={{{value.name!r}: (...)}}")
        dtype = _NUMPY_TYPES.get(tensor_type.elem_type, np.float32)
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def verify_onnx(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str,
                input_shapes: dict | None = None, rtol: float = 1e-5, seed: int = 0) -> float:
    """Run both models in ONNX Runtime on the same random inputs; return
    ``max|a - b| / max|a|`` over all outputs (in float64), raise
    :class:`~reparam_fx.VerificationError` above ``rtol``. A model may be given as its
    file's path: ONNX Runtime then reads it (and its external data) itself."""
    import onnxruntime as ort
    from reparam_fx.onnx.io import load_weightless
    is_path = lambda model: isinstance(model, (str, os.PathLike))
    feeds = random_inputs(load_weightless(str(reference)) if is_path(reference) else reference,
                          input_shapes, seed)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only

    def run(model):
        session = ort.InferenceSession(str(model) if is_path(model) else model.SerializeToString(),
                                       options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    return within_tolerance(relative_error(run(reference), run(candidate)), rtol,
                            "run by ONNX Runtime")
