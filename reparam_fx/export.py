"""Lowering fused models to deployment formats: ONNX (servers, ONNX Runtime) and Core ML
ML Programs (iPhone), for latency runs.

    reparam_fx.export.to_onnx(fused, (x,), "model.onnx")
    mlmodel = reparam_fx.export.to_coreml(fused, (x,), "model.mlpackage")
    mlmodel.user_defined_metadata["mil_ops"]          # the MIL op histogram, as JSON

Both accept what :func:`reparam_fx.fuse` returns (module-level fx graphs and aten graphs
from the ``torch.export`` path alike) and any plain ``nn.Module``. Core ML *conversion*
runs anywhere coremltools installs (Linux included); *prediction* needs macOS
(``tools/coreml_latency.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn


class ExportError(RuntimeError):
    """The model could not be lowered; the message names the op or the missing package."""


def _inputs(example_inputs) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def to_onnx(model: nn.Module, example_inputs, path, *, opset_version: int = 17,
            dynamo: bool = False) -> Path:
    """Export ``model`` to ``path`` (written atomically) and return the path.

    ``dynamo=False`` (default) uses the TorchScript-based exporter, which lowers both
    module-level and aten-level fx graphs; ``dynamo=True`` uses ``torch.export``.
    """
    path = Path(path)
    inputs = _inputs(example_inputs)
    fd, staged = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
                program.save(staged)
            else:
                torch.onnx.export(model, inputs, staged, dynamo=False,
                                  opset_version=opset_version)
        os.replace(staged, path)
    except Exception as error:  # noqa: BLE001 - re-raised with the op that failed
        raise ExportError(f"ONNX export of {type(model).__name__} failed: "
                          f"{str(error).splitlines()[0][:300]}") from error
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    return path


def mil_op_histogram(mlmodel) -> Counter:
    """Non-``const`` MIL ops of an ML Program, by type."""
    program = mlmodel._mil_program
    if program is None:
        raise ExportError("the Core ML model carries no MIL program (convert with "
                          "convert_to='mlprogram')")
    return Counter(op.op_type for function in program.functions.values()
                   for op in function.operations if op.op_type != "const")


def to_coreml(model: nn.Module, example_inputs, path=None, *, minimum_deployment_target=None,
              compute_units=None, precision: str = "fp16"):
    """Convert ``model`` to a Core ML ML Program (``.mlpackage`` when ``path`` is given).

    Defaults: iOS 16, all compute units, fp16 compute precision. The MIL op histogram is
    stored in ``user_defined_metadata["mil_ops"]`` (JSON) and returned by
    :func:`mil_op_histogram`. Raises :class:`ExportError` naming the op coremltools
    could not convert, or saying to install the ``coreml`` extra.
    """
    try:
        import coremltools as ct
    except ImportError as error:
        raise ExportError("Core ML conversion needs coremltools: "
                          "pip install 'reparam-fx[coreml]'") from error
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', not {precision!r}")
    inputs = _inputs(example_inputs)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model.eval(), inputs)
            mlmodel = ct.convert(
                traced, inputs=[ct.TensorType(name=f"input_{i}", shape=tuple(t.shape))
                                for i, t in enumerate(inputs)],
                convert_to="mlprogram",
                minimum_deployment_target=minimum_deployment_target or ct.target.iOS16,
                compute_units=compute_units or ct.ComputeUnit.ALL,
                compute_precision=(ct.precision.FLOAT16 if precision == "fp16"
                                   else ct.precision.FLOAT32))
    except Exception as error:  # noqa: BLE001 - coremltools names the unsupported op
        raise ExportError(f"Core ML conversion of {type(model).__name__} failed: "
                          f"{str(error).splitlines()[0][:300]}") from error
    histogram = mil_op_histogram(mlmodel)
    mlmodel.user_defined_metadata["mil_ops"] = json.dumps(dict(sorted(histogram.items())))
    if path is not None:
        mlmodel.save(str(path))
    return mlmodel
