"""int8 lowering: a float model (fused or not) and calibration data to int8 programs.

Re-exported by :mod:`reparam_fx.export`, where the float lowerings live:

    to_executorch_int8(fused, (x,), "model.int8.pte", calibration=batches)  # XNNPACK
    check = check_executorch_int8(fused, (x,), calibration=batches)
    check.fully_delegated, check.sqnr_db                # the .pte run in ExecuTorch
    to_onnx_int8(fused, (x,), "model.int8.onnx", calibration=batches)       # QDQ
    to_coreml_int8(fused, (x,), "model.int8.mlpackage", calibration=batches)  # W8A8

``calibration`` is an iterable of the model's inputs (:mod:`reparam_fx.int8.calibration`)
whose shapes are the example inputs' (the programs are exported at them, batch size
included). The quantizers take their activation ranges from it: it must be real data,
preprocessed as in deployment, for the int8 accuracy to mean anything.

Every file is written atomically (staged next to itself, then renamed): a failure leaves
nothing behind, or the file that was there before. A model in training mode is refused,
and missing or malformed calibration data raises :class:`~reparam_fx.export.ExportError`
saying what is wrong, before any work.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from reparam_fx.cli.files import staged
from reparam_fx.cli.logs import quiet, quiet_onnxruntime
from reparam_fx.core.text import first_line
from reparam_fx.export import (ExecuTorchCheck, ExportError, _inputs, _quiet, lower_to_edge,
                               _refuse_training, _save_package, _write_atomically, mil_op_histogram,
                               run_pte, to_coreml, to_onnx)
from reparam_fx.int8.calibration import CalibrationError, calibration_inputs
from reparam_fx.int8.quantize import _quantize, sqnr_db

__all__ = ["to_executorch_int8", "check_executorch_int8", "to_onnx_int8", "to_coreml_int8",
           "ONNX_QUANTIZATION"]


def _checked(model: nn.Module, example_inputs, calibration, what: str):
    """``(inputs, calibration items)``, or an ExportError naming what is wrong: a model in
    training mode, missing or malformed calibration, calibration of other shapes."""
    _refuse_training(model)
    inputs = _inputs(example_inputs)
    try:
        items = calibration_inputs(calibration)
    except CalibrationError as error:
        raise ExportError(f"{what} of {type(model).__name__} needs calibration data: "
                          f"{error}") from None
    expected = [(tuple(t.shape), t.dtype) for t in inputs]
    got = [(tuple(t.shape), t.dtype) for t in items[0]]
    if got != expected:
        def show(signature):
            return ", ".join(f"{shape} {str(dtype).replace('torch.', '')}"
                             for shape, dtype in signature)
        raise ExportError(f"{what} of {type(model).__name__}: the calibration inputs are "
                          f"{show(got)}, the example inputs {show(expected)}; they must "
                          f"match (the program is exported at the example inputs' shapes, "
                          f"batch size included)")
    return inputs, items


# ---- ExecuTorch (XNNPACK) ---------------------------------------------------------------

def _lower_xnnpack(model: nn.Module, inputs: tuple, items: list) -> tuple[bytes, ExecuTorchCheck]:
    converted = _quantize(model, items, per_channel=True)

    def partitioner():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        return XnnpackPartitioner()
    return lower_to_edge(converted, inputs, "xnnpack", partitioner, "ExecuTorch int8 lowering",
                         type(model).__name__)


def to_executorch_int8(model: nn.Module, example_inputs, path, *, calibration) -> Path:
    """Quantize ``model`` to int8 (:func:`reparam_fx.int8.quantize_pt2e`: the XNNPACK
    quantizer, weights per channel, calibrated on ``calibration``) and lower it to an
    ExecuTorch program for the XNNPACK delegate at ``path`` (``.pte``, written
    atomically); returns the path. The program runs at the example inputs' shapes.
    :func:`check_executorch_int8` says whether every op was delegated and runs it."""
    path = Path(path)
    inputs, items = _checked(model, example_inputs, calibration, "ExecuTorch int8 lowering")
    buffer, _ = _lower_xnnpack(model, inputs, items)
    _write_atomically(path, buffer)
    return path


def check_executorch_int8(model: nn.Module, example_inputs, *, calibration) -> ExecuTorchCheck:
    """Lower ``model`` as :func:`to_executorch_int8` does and check the program: what the
    XNNPACK delegate took (``fully_delegated``: nothing left on the portable kernels, the
    quantize / dequantize ops included), and the program run in ExecuTorch's runtime on
    ``example_inputs`` against ``model`` in float: ``sqnr_db`` and ``relative_error``."""
    inputs, items = _checked(model, example_inputs, calibration, "ExecuTorch int8 lowering")
    buffer, check = _lower_xnnpack(model, inputs, items)
    with torch.no_grad():
        expected = model(*inputs)
    got = run_pte(buffer, inputs)
    check.sqnr_db = sqnr_db(expected, got)
    expected = [t.double() for t in torch.utils._pytree.tree_leaves(expected)
                if isinstance(t, torch.Tensor)]
    check.relative_error = max(
        float((g.double() - e).abs().max() / e.abs().max().clamp_min(1e-30))
        for g, e in zip(got, expected))
    return check


def run_xnnpack_int8(model: nn.Module, items: list, evaluation: list) -> list:
    """The int8 XNNPACK program of ``model`` (calibrated on ``items``) run in ExecuTorch's
    runtime on each input of ``evaluation``: a list of output lists."""
    buffer, _ = _lower_xnnpack(model, items[0], items)
    return [run_pte(buffer, item) for item in evaluation]


# ---- ONNX Runtime (QDQ) -----------------------------------------------------------------

#: The settings of :func:`to_onnx_int8`, as ``quantize_static`` keywords (the reader aside).
ONNX_QUANTIZATION = dict(
    quant_format="QDQ", per_channel=True, reduce_range=False,
    activation_type="QInt8", weight_type="QInt8", calibrate_method="MinMax",
    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def _onnx_quantize(model: nn.Module, inputs: tuple, items: list, target: str,
                   dynamo: bool) -> None:
    """The float ONNX model (in a temporary folder), pre-processed, quantized to ``target``."""
    try:
        with quiet(("onnxruntime", "root"), level=logging.ERROR):
            import onnx
            from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                                  QuantFormat, QuantType, quantize_static)
            from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as error:
        raise ExportError(f"ONNX int8 quantization needs onnx and onnxruntime "
                          f"({error.name or error} is missing): pip install "
                          f"'reparam-fx[onnx]'") from error
    quiet_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="reparam_fx.int8.") as folder:
        source = Path(folder) / "float.onnx"
        to_onnx(model, inputs, source, dynamo=dynamo)
        graph = onnx.load(str(source), load_external_data=False).graph
        initializers = {tensor.name for tensor in graph.initializer}
        names = [value.name for value in graph.input if value.name not in initializers]
        if len(names) != len(inputs):
            raise ExportError(f"ONNX int8 quantization of {type(model).__name__}: the ONNX "
                              f"model takes {len(names)} inputs, the example inputs are "
                              f"{len(inputs)}")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter([{name: tensor.numpy() for name, tensor in zip(names, item)}
                                   for item in items])

            def get_next(self):
                return next(self.feeds, None)

        try:
            with quiet(("onnxruntime", "root", "onnx"), level=logging.ERROR):
                # shape inference and ORT's graph optimizations (Conv+BN, ...) first; the
                # float model quantizes without them where they fail
                prepared = Path(folder) / "prepared.onnx"
                try:
                    quant_pre_process(str(source), str(prepared))
                except Exception:  # noqa: BLE001 - an optional step
                    prepared = source
                settings = dict(ONNX_QUANTIZATION)
                quantize_static(
                    str(prepared), target, Reader(),
                    quant_format=QuantFormat[settings.pop("quant_format")],
                    activation_type=QuantType[settings.pop("activation_type")],
                    weight_type=QuantType[settings.pop("weight_type")],
                    calibrate_method=CalibrationMethod[settings.pop("calibrate_method")],
                    extra_options=dict(settings.pop("extra_options")), **settings)
        except ExportError:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised with what failed
            raise ExportError(f"ONNX int8 quantization of {type(model).__name__} failed: "
                              f"{first_line(error, 300, kind=False)}") from error


def to_onnx_int8(model: nn.Module, example_inputs, path, *, calibration,
                 dynamo: bool = False) -> Path:
    """Export ``model`` to ONNX (:func:`~reparam_fx.export.to_onnx`, ``dynamo`` as there:
    ``True`` for aten graphs) and quantize it statically with ONNX Runtime into a QDQ model
    at ``path`` (written atomically); returns the path.

    Settings (:data:`ONNX_QUANTIZATION`): ``quant_pre_process`` first (shape inference
    and ORT's own graph optimizations, skipped if it fails), then ``quantize_static`` with
    ``quant_format=QDQ``; weights ``QInt8``, symmetric, per output channel
    (``per_channel=True``, ``reduce_range=False``); activations ``QInt8``, per tensor,
    asymmetric (``ActivationSymmetric=False``: a zero point, so a ReLU's output keeps all
    256 levels), ranges by ``MinMax`` over the calibration inputs (fed through a
    ``CalibrationDataReader``). That is the XNNPACK quantizer's scheme (S8S8, per-channel
    weights), ONNX Runtime's recommended default for the CPU; on a small conv net it
    measured within 0.1 dB of the PT2E simulation, and symmetric activations about 1 dB
    lower."""
    path = Path(path)
    inputs, items = _checked(model, example_inputs, calibration, "ONNX int8 quantization")
    try:
        with staged(path) as target:
            _onnx_quantize(model, inputs, items, target, dynamo)
    except OSError as error:
        raise ExportError(f"could not write {path}: {error}") from error
    return path


def run_onnx_int8(model: nn.Module, items: list, evaluation: list) -> list:
    """The QDQ model of :func:`to_onnx_int8` run in ONNX Runtime (CPU) on each input."""
    import onnxruntime
    with tempfile.TemporaryDirectory(prefix="reparam_fx.int8.") as folder:
        path = to_onnx_int8(model, items[0], Path(folder) / "int8.onnx", calibration=items)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [value.name for value in session.get_inputs()]
        return [session.run(None, {name: t.numpy() for name, t in zip(names, item)})
                for item in evaluation]


# ---- Core ML (W8A8) ---------------------------------------------------------------------

def to_coreml_int8(model: nn.Module, example_inputs, path=None, *, calibration,
                   minimum_deployment_target=None, compute_units=None):
    """Convert ``model`` to a Core ML ML Program with int8 weights and int8 activations
    (W8A8), calibrated on ``calibration``; saved as an ``.mlpackage`` at ``path``
    (atomically) when given; returns the ``MLModel``.

    Route: the PT2E flow of :func:`reparam_fx.int8.quantize_pt2e` with symmetric int8
    activations (zero point 0, as coremltools' own activation quantizer makes them) and
    symmetric per-channel int8 weights, then ``torch.export`` and ``coremltools.convert``,
    which turns the quantize / dequantize pairs into MIL ``quantize`` / ``dequantize`` ops
    and the weights into ``constexpr_affine_dequantize`` (int8 storage). Needs
    ``minimum_deployment_target`` iOS 17 / macOS 14 or later (the default: iOS 17), the
    first with activation quantization. The MIL op histogram is stored in
    ``user_defined_metadata["mil_ops"]`` as by :func:`~reparam_fx.export.to_coreml`.

    Conversion runs on Linux; *prediction* (and so measuring its accuracy or latency)
    needs macOS. coremltools' calibrating routes do not serve here:
    ``optimize.coreml.experimental.linear_quantize_activations`` runs the model through
    Core ML to observe activations (macOS only), and ``optimize.torch``'s PT2E
    ``CoreMLQuantizer`` imports ``torch.ao.quantization.quantizer``, which torch 2.13 no
    longer has."""
    try:
        with _quiet():
            import coremltools as ct
    except ImportError as error:
        raise ExportError("Core ML conversion needs coremltools: "
                          "pip install 'reparam-fx[coreml]'") from error
    target = minimum_deployment_target or ct.target.iOS17
    if target < ct.target.iOS17:
        raise ValueError(f"int8 activations need minimum_deployment_target iOS17 / macOS14 or "
                         f"later, not {target}")
    inputs, items = _checked(model, example_inputs, calibration, "Core ML int8 conversion")
    converted = _quantize(model, items, per_channel=True, symmetric_activations=True)
    try:
        mlmodel = to_coreml(converted, inputs, minimum_deployment_target=target,
                            compute_units=compute_units, frontend="export")
    except ExportError as error:  # "... failed (export: what)": say what, for this model
        detail = str(error).split(" failed (", 1)[-1].removesuffix(")").removeprefix("export: ")
        raise ExportError(f"Core ML int8 conversion of {type(model).__name__} failed: "
                          f"{detail}") from error
    histogram = mil_op_histogram(mlmodel)
    if not histogram.get("quantize"):
        raise ExportError(f"Core ML int8 conversion of {type(model).__name__}: no activation "
                          f"was quantized (no MIL quantize op; the quantizer found no conv, "
                          f"linear or other op it annotates)")
    mlmodel.user_defined_metadata["quantization"] = (
        "W8A8: int8 weights (symmetric, per channel), int8 activations (symmetric, per tensor)")
    if path is not None:
        _save_package(mlmodel, Path(path))
    return mlmodel
