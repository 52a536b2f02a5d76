"""Lowering fused models to deployment formats: ONNX (servers, ONNX Runtime), Core ML
ML Programs (iPhone) and ExecuTorch programs (the runtime apps embed), for latency runs.

    reparam_fx.export.to_onnx(fused, (x,), "model.onnx")
    mlmodel = reparam_fx.export.to_coreml(fused, (x,), "model.mlpackage")
    mlmodel.user_defined_metadata["mil_ops"]          # the MIL op histogram, as JSON
    reparam_fx.export.to_executorch(fused, (x,), "model.xnnpack.pte")             # CPU
    reparam_fx.export.to_executorch(fused, (x,), "model.coreml.pte", backend="coreml")
    check = reparam_fx.export.check_executorch(fused, (x,))  # runs the XNNPACK program
    check.relative_error, check.fully_delegated, check.portable  # ops left undelegated

    # int8 (reparam_fx.int8.lowering, re-exported here): calibration = real model inputs
    reparam_fx.export.to_executorch_int8(fused, (x,), "model.int8.pte", calibration=batches)
    reparam_fx.export.check_executorch_int8(fused, (x,), calibration=batches).sqnr_db
    reparam_fx.export.to_onnx_int8(fused, (x,), "model.int8.onnx", calibration=batches)
    reparam_fx.export.to_coreml_int8(fused, (x,), "model.int8.mlpackage", calibration=batches)

Both accept what :func:`reparam_fx.fuse` returns (module-level fx graphs and aten graphs
from the ``torch.export`` path alike) and any plain ``nn.Module``. Core ML *conversion*
runs anywhere coremltools installs (Linux included); *prediction* needs macOS
(``tools/coreml_latency.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import operator
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from reparam_fx.cli.files import staged, write_bytes
from reparam_fx.cli.logs import quiet
from reparam_fx.core.text import first_line


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
    try:
        with staged(path) as target, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
                program.save(target)
            else:
                torch.onnx.export(model, inputs, target, dynamo=False,
                                  opset_version=opset_version)
    except Exception as error:  # noqa: BLE001 - re-raised with the op that failed
        raise ExportError(f"ONNX export of {type(model).__name__} failed: "
                          f"{first_line(error, 300, kind=False)}") from error
    return path


def mil_op_histogram(mlmodel) -> Counter:
    """Non-``const`` MIL ops of an ML Program, by type."""
    program = mlmodel._mil_program
    if program is None:
        raise ExportError("the Core ML model carries no MIL program (convert with "
                          "convert_to='mlprogram')")
    return Counter(op.op_type for function in program.functions.values()
                   for op in function.operations if op.op_type != "const")


# the loggers of coremltools, ExecuTorch and what they import: importing either prints
# version warnings, "Failed to load" lines and deprecation notes (torchao's pytree
# registrations), none of which the caller can act on
_NOISY_LOGGERS = ("coremltools", "executorch", "torchao", "torch._export", "torch.export",
                  "torch.utils._pytree")


def _quiet():
    """Third-party noise off while coremltools or ExecuTorch is imported or called; their
    ERROR records are kept in the yielded log (coremltools names the op it could not
    convert only there; a failed first attempt in ``frontend="auto"`` is expected, not an
    error to show)."""
    return quiet(_NOISY_LOGGERS, level=logging.ERROR, stderr=True)


_CONVERTING = re.compile(r"converting '[^']+' op \(located at: '[^']*'\)")


def _coreml_program(model: nn.Module, inputs: tuple, frontend: str):
    """What ``ct.convert`` takes: a TorchScript trace or a decomposed ExportedProgram."""
    if frontend == "torchscript":
        return torch.jit.trace(model, inputs)
    return torch.export.export(model, inputs).run_decompositions({})


# modules that compute something else in training mode (a conv left in training mode, e.g.
# by a hand-written deploy conversion, converts the same)
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def to_coreml(model: nn.Module, example_inputs, path=None, *, minimum_deployment_target=None,
              compute_units=None, precision: str = "fp16", frontend: str = "auto"):
    """Convert ``model`` to a Core ML ML Program (``.mlpackage`` when ``path`` is given).

    Defaults: iOS 16, all compute units, fp16 compute precision. ``frontend="auto"``
    converts a ``torch.jit.trace`` of the model and, where
    coremltools cannot convert that trace (shape arithmetic it does not support, e.g. in
    MobileViT's unfolding), the ``torch.export`` program; ``"torchscript"`` or
    ``"export"`` forces one. The MIL op histogram is stored in
    ``user_defined_metadata["mil_ops"]`` (JSON; the frontend used in ``["frontend"]``)
    and returned by :func:`mil_op_histogram`. ``model`` is never modified: one in training
    mode (or with a BatchNorm or Dropout in training mode) is refused. Raises
    :class:`ExportError` naming what coremltools could not convert, or saying to install
    the ``coreml`` extra.
    """
    try:
        with _quiet():
            import coremltools as ct
    except ImportError as error:
        raise ExportError("Core ML conversion needs coremltools: "
                          "pip install 'reparam-fx[coreml]'") from error
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', not {precision!r}")
    if frontend not in ("auto", "torchscript", "export"):
        raise ValueError(f"frontend must be 'auto', 'torchscript' or 'export', not {frontend!r}")
    _refuse_training(model)
    inputs = _inputs(example_inputs)
    failures = []
    for attempt in (("torchscript", "export") if frontend == "auto" else (frontend,)):
        try:
            with _quiet() as log:
                mlmodel = ct.convert(
                    _coreml_program(model, inputs, attempt),
                    inputs=[ct.TensorType(name=f"input_{i}", shape=tuple(t.shape))
                            for i, t in enumerate(inputs)],
                    convert_to="mlprogram",
                    minimum_deployment_target=minimum_deployment_target or ct.target.iOS16,
                    compute_units=compute_units or ct.ComputeUnit.ALL,
                    compute_precision=(ct.precision.FLOAT16 if precision == "fp16"
                                       else ct.precision.FLOAT32))
            break
        except Exception as error:  # noqa: BLE001 - coremltools names the unsupported op
            where = [m.group(0) for m in map(_CONVERTING.search, log.messages) if m]
            failures.append((attempt, first_line(error, 300, kind=False) + (f", {where[0]}" if where else "")))
    else:
        detail = "; ".join(f"{attempt}: {message}" for attempt, message in failures)
        raise ExportError(f"Core ML conversion of {type(model).__name__} failed ({detail})")
    histogram = mil_op_histogram(mlmodel)
    mlmodel.user_defined_metadata["mil_ops"] = json.dumps(dict(sorted(histogram.items())))
    mlmodel.user_defined_metadata["frontend"] = attempt
    if path is not None:
        _save_package(mlmodel, Path(path))
    return mlmodel


def _save_package(mlmodel, path: Path) -> None:
    """Save an ``.mlpackage`` (a folder) atomically: staged next to ``path``, then renamed;
    an existing package at ``path`` is replaced only once the new one is complete."""
    try:
        with staged(path) as target:
            mlmodel.save(target)
    except Exception as error:  # noqa: BLE001
        raise ExportError(f"could not write {path}: {error}") from error


# ---- ExecuTorch ---------------------------------------------------------------------------

BACKENDS = ("xnnpack", "coreml")


@dataclass
class ExecuTorchCheck:
    """A lowered program and what its runtime made of it.

    ``delegated``: ops the backend took (by edge op name); ``portable``: ops left on
    ExecuTorch's portable CPU kernels; ``relative_error``: ``max|pte - torch| / max|torch|``
    of the program run in ExecuTorch's runtime (XNNPACK only: the Core ML delegate runs on
    Apple platforms, so None there); ``sqnr_db``: for an int8 program
    (:func:`check_executorch_int8`), its SQNR in dB against the float model."""

    backend: str
    delegated: Counter = field(default_factory=Counter)
    portable: Counter = field(default_factory=Counter)
    pte_bytes: int = 0
    relative_error: float | None = None
    sqnr_db: float | None = None
    program: bytes = field(default=b"", repr=False)  # the .pte itself (run_pte runs it)

    @property
    def fully_delegated(self) -> bool:
        return bool(self.delegated) and not self.portable


@contextlib.contextmanager
def _native_stderr_kept():
    """Native code's writes to file descriptor 2 (ExecuTorch's runtime logs CPU probing
    there on every program load) go to a temporary file; if the block raises, its last
    lines are added to the error, so a real failure still says what the runtime said."""
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except Exception as error:
            os.dup2(saved, 2)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").strip().splitlines()[-3:]
            if lines:
                raise type(error)(f"{error} ({' / '.join(lines)})") from error
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _partitioner(backend: str, minimum_deployment_target, compute_units, precision):
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import \
            XnnpackPartitioner
        return XnnpackPartitioner()
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=minimum_deployment_target or ct.target.iOS16,
        compute_unit=compute_units or ct.ComputeUnit.ALL,
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
    return CoreMLPartitioner(compile_specs=specs)


def _edge_op_name(target) -> str:
    name = getattr(target, "__name__", str(target))  # e.g. "aten.conv2d.default"
    return name.split(".")[1] if name.startswith("aten.") else name


def _lower(model: nn.Module, inputs: tuple, backend: str, minimum_deployment_target,
           compute_units, precision) -> tuple[bytes, ExecuTorchCheck]:
    """``(the .pte bytes, the delegation counts)`` of ``model`` lowered for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', not {precision!r}")
    _refuse_training(model)
    return lower_to_edge(model, inputs, backend, lambda: _partitioner(
        backend, minimum_deployment_target, compute_units, precision), "ExecuTorch lowering")


def lower_to_edge(model: nn.Module, inputs: tuple, backend: str, partitioner, what: str,
                  name: str | None = None) -> tuple[bytes, ExecuTorchCheck]:
    """Export ``model`` at ``inputs``, lower it with ``partitioner()`` and return the
    ``.pte`` bytes and the delegation counts; errors (a missing ExecuTorch, a failed
    lowering) as :class:`ExportError` starting with ``what`` and the model's ``name``."""
    try:
        with _quiet():
            from executorch.exir import to_edge_transform_and_lower
            made = partitioner()
    except ImportError as error:
        raise ExportError(f"ExecuTorch lowering needs executorch ({error.name or error} is "
                          "missing): pip install 'reparam-fx[executorch]'") from error
    try:
        with _quiet():
            program = torch.export.export(model, inputs)
            edge = to_edge_transform_and_lower(program, partitioner=[made])
            check = _delegation(edge.exported_program().graph_module, backend)
            buffer = edge.to_executorch().buffer
    except Exception as error:  # noqa: BLE001 - re-raised with what failed
        raise ExportError(f"{what} ({backend}) of {name or type(model).__name__} failed: "
                          f"{first_line(error, 300, kind=False)}") from error
    check.pte_bytes, check.program = len(buffer), buffer
    return buffer, check


def _delegation(graph_module, backend: str) -> ExecuTorchCheck:
    """What the partitioner gave the backend (the ops inside each delegate call) and what
    it left to the portable kernels."""
    check = ExecuTorchCheck(backend)
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if getattr(node.target, "__name__", "") == "executorch_call_delegate":
            lowered = getattr(graph_module, node.args[0].target)
            check.delegated.update(
                _edge_op_name(inner.target) for inner in lowered.original_module.graph.nodes
                if inner.op == "call_function" and inner.target is not operator.getitem)
        else:
            check.portable[_edge_op_name(node.target)] += 1
    return check


def _refuse_training(model: nn.Module) -> None:
    training = [name or type(model).__name__ for name, module in model.named_modules()
                if module.training and (module is model or isinstance(module, _MODE_DEPENDENT))]
    if training:
        raise ExportError(f"{type(model).__name__} is in training mode ({training[0]}"
                          f"{f' and {len(training) - 1} more' if len(training) > 1 else ''}); "
                          "call .eval() first (BatchNorm and Dropout would not convert to "
                          "inference)")


def to_executorch(model: nn.Module, example_inputs, path, *, backend: str = "xnnpack",
                  minimum_deployment_target=None, compute_units=None,
                  precision: str = "fp16") -> Path:
    """Lower ``model`` to an ExecuTorch program at ``path`` (``.pte``, written atomically)
    and return the path.

    ``backend="xnnpack"``: the XNNPACK delegate (CPU, iOS and Android alike);
    ``"coreml"``: the Core ML delegate (the Neural Engine), whose compile specs are
    ``minimum_deployment_target`` (default iOS 16), ``compute_units`` (default all) and
    ``precision`` (``"fp16"`` default, or ``"fp32"``). Accepts what :func:`reparam_fx.fuse`
    returns and plain modules; raises :class:`ExportError` naming what failed, or the
    missing package (the ``executorch`` extra)."""
    path = Path(path)
    buffer, _ = _lower(model, _inputs(example_inputs), backend, minimum_deployment_target,
                       compute_units, precision)
    _write_atomically(path, buffer)
    return path


def check_executorch(model: nn.Module, example_inputs, *, backend: str = "xnnpack",
                     minimum_deployment_target=None, compute_units=None,
                     precision: str = "fp16") -> ExecuTorchCheck:
    """Lower ``model`` as :func:`to_executorch` does and check the program: how much each
    delegate took and, for XNNPACK, the relative error of the program run in ExecuTorch's
    runtime against ``model`` in torch on ``example_inputs``."""
    inputs = _inputs(example_inputs)
    buffer, check = _lower(model, inputs, backend, minimum_deployment_target, compute_units,
                           precision)
    if backend == "xnnpack":
        with torch.no_grad():
            expected = model(*inputs)
        got = run_pte(buffer, inputs)
        # (nested outputs, a detector's ``(boxes, [maps])``, come back flat, in pytree order)
        expected = [t for t in torch.utils._pytree.tree_leaves(expected)
                    if isinstance(t, torch.Tensor)]
        check.relative_error = max(
            float((g.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30))
            for g, e in zip(got, expected))
    return check


def set_executorch_threads(threads: int) -> int | None:
    """Give ExecuTorch's runtime (and so the XNNPACK delegate) a threadpool of ``threads``
    threads, through its experimental ``_unsafe_reset_threadpool``; programs loaded before
    keep the old pool, so call this first. Returns the count the pool reports, or None
    where this ExecuTorch has no such function."""
    with _quiet():
        try:
            from executorch.extension.pybindings.portable_lib import (
                _threadpool_get_thread_count, _unsafe_reset_threadpool)
        except ImportError:
            return None
        _unsafe_reset_threadpool(threads)
        return _threadpool_get_thread_count()


def executorch_runtime():
    """ExecuTorch's Python runtime (``executorch.runtime.Runtime.get()``), imported with
    its dependencies' noise off."""
    with _quiet():
        from executorch.runtime import Runtime
        return Runtime.get()


def run_pte(program: bytes | str | os.PathLike, inputs: tuple) -> list:
    """Run an ExecuTorch program (its bytes or its ``.pte`` path) in ExecuTorch's Python
    runtime; returns its outputs."""
    runtime = executorch_runtime()
    with _quiet(), _native_stderr_kept():
        if not isinstance(program, (bytes, bytearray)):
            program = Path(program).read_bytes()
        method = runtime.load_program(program).load_method("forward")
        return list(method.execute(list(inputs)))


def _write_atomically(path: Path, data: bytes) -> None:
    """Staged next to ``path``, then renamed over it: a reader never sees half a file."""
    try:
        write_bytes(path, data)
    except OSError as error:
        raise ExportError(f"could not write {path}: {error}") from error


# ---- int8 (reparam_fx.int8.lowering) -------------------------------------------------------

_INT8 = ("to_executorch_int8", "check_executorch_int8", "to_onnx_int8", "to_coreml_int8")


def __getattr__(name):
    """The int8 lowerings, from :mod:`reparam_fx.int8.lowering` (imported on first use: it
    imports this module)."""
    if name in _INT8:
        from reparam_fx.int8 import lowering
        value = getattr(lowering, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reparam_fx.export' has no attribute {name!r}")
