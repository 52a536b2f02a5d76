"""Post-training int8 quantization (PT2E) and how far the int8 model is from float.

    q = quantize_pt2e(fused, calibration)            # simulated int8, runs in torch
    sqnr_db(fused(x), q(x))                          # dB; higher is closer
    int8_sqnr(fused, calibration, inputs)            # the same, in one call
    int8_sqnr(fused, calibration, inputs, reference=model, backend="xnnpack")

:func:`quantize_pt2e` is the PT2E flow with ExecuTorch's XNNPACK quantizer, the one that
:func:`reparam_fx.export.to_executorch_int8` lowers: ``torch.export`` at the first
calibration input (its shapes, batch size included, are fixed), ``prepare_pt2e``,
every calibration input run once through the observers, ``convert_pt2e``. Weights are
int8, symmetric, per output channel (``per_channel=True``) or per tensor; activations
int8, per tensor, affine (a zero point), their ranges from a histogram observer over the
calibration inputs, so the calibration must be real data for real accuracy
(:mod:`reparam_fx.int8.calibration`).

:func:`sqnr_db` is the signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum
(ref - out)^2)`` over every output tensor, in float64. :func:`int8_sqnr` measures it for
the int8 model as torch simulates it (``backend="pt2e"``), as ExecuTorch's runtime runs
the XNNPACK ``.pte`` (``"xnnpack"``) or as ONNX Runtime runs the QDQ model
(``"onnxruntime"``).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from reparam_fx.int8.calibration import CalibrationError, calibration_inputs

__all__ = ["quantize_pt2e", "sqnr_db", "int8_sqnr", "SQNR_BACKENDS"]

SQNR_BACKENDS = ("pt2e", "xnnpack", "onnxruntime")


def _xnnpack_quantizer(per_channel: bool, symmetric_activations: bool = False,
                       batch_norms: bool = True):
    """ExecuTorch's XNNPACK quantizer with ``get_symmetric_quantization_config``.

    ``batch_norms=False`` (a graph with no BatchNorm): without its conv+BN patterns, which
    then match nothing and cost seconds (it captures each pattern with torch.export on
    every call); the annotation is the same."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    config = get_symmetric_quantization_config(is_per_channel=per_channel)
    if symmetric_activations:  # zero point 0 (Core ML's own activation quantizer does so)
        activation = dataclasses.replace(config.input_activation,
                                         qscheme=torch.per_tensor_symmetric)
        config = dataclasses.replace(config, input_activation=activation,
                                     output_activation=activation)
    quantizer = XNNPACKQuantizer()
    if not batch_norms:
        quantizer.SUPPORTED_PATTERNS = [pattern for pattern in quantizer.SUPPORTED_PATTERNS
                                        if "_bn" not in pattern.name]
    return quantizer.set_global(config)


def _has_batch_norm(graph_module: torch.fx.GraphModule) -> bool:
    return any(node.op == "call_function" and "batch_norm" in str(node.target)
               for node in graph_module.graph.nodes)


def quantize_pt2e(model: nn.Module, calibration, *,
                  per_channel: bool = True) -> torch.fx.GraphModule:
    """``model`` quantized to int8 with PT2E and ExecuTorch's XNNPACK quantizer, calibrated
    on ``calibration`` (an iterable of inputs, :func:`calibration_inputs`); returns the
    converted module: quantize / dequantize ops around float ops, which runs in torch
    (simulated int8) and lowers to int8 kernels.

    ``model`` (in eval mode: one in training mode is refused) is never modified. The
    module is exported at the first calibration input's shapes and runs only at those.
    Raises :class:`~reparam_fx.int8.calibration.CalibrationError` for bad calibration data
    and :class:`~reparam_fx.export.ExportError` if the model does not export or quantize."""
    items = calibration_inputs(calibration)
    return _quantize(model, items, per_channel)


def _quantize(model: nn.Module, items: list, per_channel: bool,
              symmetric_activations: bool = False) -> torch.fx.GraphModule:
    from reparam_fx.export import ExportError, _quiet, _refuse_training
    from reparam_fx.core.text import first_line
    _refuse_training(model)
    try:
        with _quiet():
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            _xnnpack_quantizer(per_channel)
    except ImportError as error:
        raise ExportError(f"int8 quantization needs executorch and torchao ({error.name or error} "
                          "is missing): pip install 'reparam-fx[executorch]'") from error
    try:
        with _quiet(), torch.no_grad():
            # a deep copy: the exported module shares the caller's parameter tensors
            captured = copy.deepcopy(torch.export.export(model, items[0]).module())
            quantizer = _xnnpack_quantizer(per_channel, symmetric_activations,
                                           batch_norms=_has_batch_norm(captured))
            prepared = prepare_pt2e(captured, quantizer)
            for item in items:
                prepared(*item)
            converted = convert_pt2e(prepared)
    except Exception as error:  # noqa: BLE001 - re-raised with what failed
        raise ExportError(f"int8 quantization (PT2E) of {type(model).__name__} failed: "
                          f"{first_line(error, 300, kind=False)}") from error
    for module in converted.modules():  # its graph is the eval one; the lowerings check the flag
        module.training = False
    return converted


def _leaves(value) -> list[torch.Tensor]:
    return [torch.as_tensor(leaf).detach().to("cpu", torch.float64)
            for leaf in pytree.tree_leaves(value)
            if isinstance(leaf, torch.Tensor) or hasattr(leaf, "__array__")]


def sqnr_db(reference, output) -> float:
    """``10 log10(sum ref^2 / sum (ref - out)^2)`` over all the output tensors (pytree
    leaves: a tensor, a tuple of tensors, a list of numpy arrays ...), in float64; ``+inf``
    when they are identical. Raises ``ValueError`` if the two hold different numbers or
    shapes of tensors."""
    expected, got = _leaves(reference), _leaves(output)
    if len(expected) != len(got):
        raise ValueError(f"the reference has {len(expected)} output tensors, the output "
                         f"{len(got)}")
    signal = noise = 0.0
    for index, (a, b) in enumerate(zip(expected, got)):
        if a.shape != b.shape:
            raise ValueError(f"output {index}: the reference has shape {tuple(a.shape)}, the "
                             f"output {tuple(b.shape)}")
        signal += float((a * a).sum())
        noise += float(((a - b) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def int8_sqnr(model: nn.Module, calibration, inputs, *, reference: nn.Module | None = None,
              backend: str = "pt2e") -> float:
    """The SQNR (dB, :func:`sqnr_db` over every output of every input) of ``model``
    quantized to int8 with ``calibration``, run on ``inputs`` (an iterable of inputs, like
    the calibration), against ``reference`` in float (default: ``model`` itself).

    ``backend``: ``"pt2e"`` the converted module in torch (simulated int8);
    ``"xnnpack"`` the ExecuTorch XNNPACK ``.pte`` (:func:`~reparam_fx.export.to_executorch_int8`)
    in ExecuTorch's runtime; ``"onnxruntime"`` the QDQ model
    (:func:`~reparam_fx.export.to_onnx_int8`) in ONNX Runtime on the CPU. Every program is
    exported at the calibration's shapes, so ``inputs`` must have them too (batch size
    included). Neither ``model`` nor ``reference`` (both in eval mode) is modified."""
    if backend not in SQNR_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(SQNR_BACKENDS)}, not {backend!r}")
    from reparam_fx.export import _refuse_training
    items = calibration_inputs(calibration)
    evaluation = calibration_inputs(inputs, what="inputs")
    for index, item in enumerate(evaluation):
        shapes = [tuple(t.shape) for t in item]
        expected = [tuple(t.shape) for t in items[0]]
        if shapes != expected:
            raise CalibrationError(
                f"inputs item {index} has shape{'s' * (len(shapes) > 1)} "
                f"{', '.join(map(str, shapes))}; the int8 program is exported at the "
                f"calibration's {', '.join(map(str, expected))} (batch size included)")
    reference = model if reference is None else reference
    _refuse_training(reference)
    with torch.no_grad():
        expected = [reference(*item) for item in evaluation]
    from reparam_fx.int8 import lowering
    if backend == "pt2e":
        converted = _quantize(model, items, per_channel=True)
        with torch.no_grad():
            got = [converted(*item) for item in evaluation]
    elif backend == "xnnpack":
        got = lowering.run_xnnpack_int8(model, items, evaluation)
    else:
        got = lowering.run_onnx_int8(model, items, evaluation)
    return sqnr_db(expected, got)
