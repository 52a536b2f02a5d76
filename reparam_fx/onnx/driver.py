"""``fuse_onnx_model``: opset check, weightless copy, passes to a fixpoint, result, report.

Memory: the walk runs on a *weightless* copy of the model (its large initializers stubs
of their name, type and shape; also what shape inference reads) and reads a weight only
when a region using it is written (:class:`reparam_fx.core.affine.Weight`); tensors left
as they were are the input's own TensorProtos, copied once into the result. The command
line goes further (:mod:`reparam_fx.onnx.io`): it never holds the input's weights at all.
The fused graph keeps the input's declarations of its inputs and outputs (a symbolic dim
stays, under its name). The input model is never modified.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from reparam_fx.onnx.io import STUB_BYTES, WeightStore, is_stored
from reparam_fx.core.pipeline import gc_paused, leftover_batchnorms, run_passes
from reparam_fx.core.report import FusionReport
from reparam_fx.onnx.rewrite import fusion_pass
from reparam_fx.onnx.simplify import drop_no_ops, fold_constants, merge_slices
from reparam_fx.onnx.view import CATEGORIES, STUB_LOCATION
# ---- public entry points ---------------------------------------------------------------

def model_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def _op_histogram(ops) -> Counter:
    return Counter(c for c in map(CATEGORIES.get, ops) if c)


def _initializer_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                  onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16))


def fuse_onnx_model(model: onnx.ModelProto, *, folder: str | None = None,
                    store: WeightStore | None = None) -> tuple[onnx.ModelProto, FusionReport]:
    """Collapse every exactly-foldable linear region of an ONNX model into one op.

    Returns a new model and its :class:`~reparam_fx.FusionReport`; ``model`` is not
    modified. Raises :class:`OnnxFusionError` for opsets below 13.

    The weights are read only where a region is written; tensors left as they were are
    the input's own TensorProtos, copied once into the result. ``folder``: where the
    external data of ``model``'s tensors (if any is not loaded) lie. ``store``
    (:class:`reparam_fx.onnx.io.WeightStore`, the command line's way): fused weights go
    there and the result holds stubs of them, written by
    :func:`reparam_fx.onnx.io.save_streaming`.
    """
    with gc_paused():
        if store is not None:
            return _fuse_onnx_model(model, store)
        store = WeightStore(folder or "")  # fused weights held here until exported ...
        fused, report = _fuse_onnx_model(model, store)
        store.inline_fused(fused)  # ... then moved into the result one at a time
        return fused, report


def _copy_without(message, skipped: str):
    """A copy of a protobuf message without one of its fields (not even read)."""
    copy_ = type(message)()
    for field, value in message.ListFields():
        if field.name == skipped:
            continue
        if field.is_repeated:
            getattr(copy_, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(copy_, field.name).CopyFrom(value)
        else:
            setattr(copy_, field.name, value)
    return copy_


def _weightless(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """``model`` without its large initializers' data (each one a stub of its name, type
    and dims), for shape inference and the graph walk; and those initializers by name."""
    graph = _copy_without(model.graph, "initializer")
    large = {}
    for tensor in model.graph.initializer:
        if is_stored(tensor) or len(tensor.raw_data) >= STUB_BYTES:
            large[tensor.name] = tensor
            stub = graph.initializer.add(name=tensor.name, dims=tensor.dims,
                                         data_type=tensor.data_type)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value=STUB_LOCATION)
        else:
            graph.initializer.append(tensor)
    skeleton = _copy_without(model, "graph")
    skeleton.graph.CopyFrom(graph)
    return skeleton, large


def _imported_with_shapes(skeleton: onnx.ModelProto) -> gs.Graph:
    """The weightless ``skeleton`` as a graph with inferred shapes and its constants
    folded (:func:`fold_constants`). Folding can prove sizes shape inference could not
    (TorchScript's ``chunk`` slices up to ``Shape(x)[1] // n * (i + 1)``): while it folds
    something, shapes are inferred again (a few rounds at most)."""
    model = _with_inferred_shapes(skeleton)
    for _ in range(_FOLD_ROUNDS):
        graph = gs.import_onnx(model)
        if not fold_constants(graph, reads_unknown_sizes=True):
            return graph
        model = gs.export_onnx(graph, do_type_check=False)
        model.ir_version = skeleton.ir_version
        model = _with_inferred_shapes(model)
    return gs.import_onnx(model)


def _with_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with ONNX shape inference's shapes (ranks for BatchNorm and constants,
    sizes for moves); with data propagation first, so sizes computed by ``Shape`` /
    ``Gather`` / ``Concat`` reach the Reshapes that read them. Shapes are a hint: a model
    they cannot be inferred for is fused with what it declares."""
    for options in ({"data_prop": True}, {}):
        try:
            return onnx.shape_inference.infer_shapes(model, **options)
        except Exception:  # noqa: BLE001, S112 - try the next way, or go without
            continue
    return model


def _keep_signature(fused: onnx.GraphProto, original: onnx.GraphProto) -> None:
    """Give the fused graph's inputs and outputs the original's declarations (types,
    shapes, dim_param names). The walk runs on shapes inference refined (with the input
    ``[1, 3, 224, 224]`` an output the exporter declared ``[Gemm_dim_0, 1000]`` is inferred
    ``[1, 1000]``); those are facts for the walk, but the fused model must keep the
    signature it was given: a symbolic dim stays symbolic, under its name."""
    for fused_values, original_values in ((fused.input, original.input),
                                          (fused.output, original.output)):
        declared = {value.name: value for value in original_values}
        for value in fused_values:
            if value.name in declared:
                value.CopyFrom(declared[value.name])


def _fuse_onnx_model(model: onnx.ModelProto,
                     store: WeightStore) -> tuple[onnx.ModelProto, FusionReport]:
    opset = model_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise OnnxFusionError(f"opset {opset} is not supported: reparam_fx needs opset "
                              f">= {MIN_OPSET} (re-export with opset_version={MIN_OPSET} or later)")
    skeleton, large = _weightless(model)
    graph = _imported_with_shapes(skeleton)
    for tensor in graph.tensors().values():  # the stubs' values: the originals, read lazily
        original = large.get(tensor.name)
        if original is not None and isinstance(tensor, gs.Constant):
            tensor._values = store.values(original) if is_stored(original) \
                else LazyValues(original)
            tensor.data_location = None  # (exported as the original, or inline if loaded)
    graph.reparam_fx_store = store
    graph.toposort()
    report = FusionReport(frontend="onnx")
    report.ops_before = _op_histogram(node.op_type for node in model.graph.node)
    report.nodes_before = len(model.graph.node)  # (the input's: constants are folded now)
    report.params_before = _initializer_params(model)
    fold_constants(graph)
    drop_no_ops(graph)
    run_passes(lambda: fusion_pass(graph, report),  # (then shapes of folded values are
               lambda: fold_constants(graph) and drop_no_ops(graph))  # constants)
    merge_slices(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    fused = gs.export_onnx(graph)
    fused.ir_version = model.ir_version
    del fused.graph.value_info[:]  # stale intermediate shapes; inputs/outputs are kept
    _keep_signature(fused.graph, model.graph)
    report.ops_after = _op_histogram(node.op for node in graph.nodes)
    report.nodes_after = len(graph.nodes)
    report.params_after = _initializer_params(fused)
    leftover_batchnorms(report, ((n.name, n.op) for n in graph.nodes
                                 if n.op == "BatchNormalization"))
    return fused, report


MIN_OPSET = 13



class OnnxFusionError(ValueError):
    """The ONNX model cannot be fused as given; the message says what to do."""


_FOLD_ROUNDS = 3  # constants folded, then shapes inferred again, at most this many times
