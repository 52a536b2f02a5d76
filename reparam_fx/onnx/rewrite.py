"""One fusion pass over an ONNX graph: regions found, then each written back as one node.

:mod:`reparam_fx.core.regions` finds the regions, exactly as for torch.fx graphs, and
each region is written back as one ``Conv`` (or ``Gemm`` / ``MatMul`` + ``Add`` for
linear terms) whose output keeps the original tensor's name, so graph inputs and outputs
keep their names, shapes and dtypes. A region with moves in it has them written again
around its one op (:func:`_write_region`), or not at all when they cancel
(:func:`reparam_fx.core.layout.moves_cancel`). Weights are computed in float64 and cast
to the model's weight dtype.
"""

from __future__ import annotations


import numpy as np
import onnx_graphsurgeon as gs
import torch

from reparam_fx.core import affine
from reparam_fx.core.affine import ConvTerm, NotExact
from reparam_fx.onnx.io import STUB_BYTES
from reparam_fx.onnx.moves import MOVE_OPS, moves_cancel
from reparam_fx.core.regions import Region
from reparam_fx.core.pipeline import find_rewrites, fused_region, rewritten_values, sum_steps
from reparam_fx.core.report import FusedRegion, FusionReport
from reparam_fx.onnx.view import CATEGORIES, OUTPUT, OnnxView, Tensor, constant_size, constant_value
# ---- writing regions back --------------------------------------------------------------

def _weight_dtype(region: Region) -> np.dtype:
    """The dtype of the region's weights (or, for pools and pads, of its tensors)."""
    for value in region.nodes:
        node = value.producer
        if node is not None and node.op in ("Conv", "Gemm", "MatMul"):
            weight = node.inputs[1]
            dtype = np.dtype(weight.dtype) if isinstance(weight, gs.Constant) else \
                getattr(constant_value(weight), "dtype", None)
            if dtype is not None and dtype.kind == "f":
                return dtype
    for tensor in (region.nodes[-1].var, region.source.var):
        dtype = getattr(tensor, "dtype", None)
        if dtype is not None and np.dtype(dtype).kind == "f":
            return np.dtype(dtype)
    return np.dtype(np.float32)


def _emit(graph: gs.Graph, output: gs.Variable, region: Region, source, index: int,
          term: ConvTerm | None = None, rank: int | None = None) -> gs.Node:
    """A Conv (or Gemm / MatMul+Add) computing ``term(source)`` (default: the region's
    term) into ``output``; ``rank``: the source's, if known beyond its graph shape."""
    term = region.term if term is None else term
    dtype = _weight_dtype(region)
    base = f"{output.name}_fused{index}"
    like = torch.from_numpy(np.empty(0, dtype))  # (torch casts on every core)
    values = term.weights_as(like)[0].numpy()  # computed once, here
    pads = list(term.padding) * 2 if term.spatial > 0 else []
    if isinstance(term, ConvTerm) and term.zero_taps:  # trimmed, padded asymmetrically
        values = values[(slice(None), slice(None), *(slice(a, k - b) for k, (a, b) in
                                                      zip(term.kernel, term.taps)))]
        pads = [p for p, _ in term.written_padding] + [p for _, p in term.written_padding]
    weight = _new_constant(graph, f"{base}_W", np.ascontiguousarray(values))
    bias = None if term.bias is None else gs.Constant(f"{base}_B", term.bias.numpy().astype(dtype))
    for node in list(output.inputs):
        node.outputs = [o for o in node.outputs if o is not output]
    if term.spatial > 0:
        attrs = {"kernel_shape": list(values.shape[2:]), "strides": list(term.stride),
                 "pads": pads, "dilations": list(term.dilation), "group": term.groups}
        inputs = [source, weight] + ([bias] if bias is not None else [])
        node = gs.Node("Conv", base, attrs=attrs, inputs=inputs, outputs=[output])
        graph.nodes.append(node)
        return node
    if (rank == 2 if rank is not None else _rank2(source)):  # Gemm: Y = X W^T + b, one node
        node = gs.Node("Gemm", base, attrs={"transB": 1},
                       inputs=[source, weight] + ([bias] if bias is not None else []),
                       outputs=[output])
        graph.nodes.append(node)
        return node
    matrix = _new_constant(graph, f"{base}_W", np.ascontiguousarray(values.T))
    if bias is None:
        node = gs.Node("MatMul", base, inputs=[source, matrix], outputs=[output])
        graph.nodes.append(node)
        return node
    product = gs.Variable(f"{base}_matmul", dtype=output.dtype)
    graph.nodes.append(gs.Node("MatMul", base, inputs=[source, matrix], outputs=[product]))
    node = gs.Node("Add", f"{base}_bias", inputs=[product, bias], outputs=[output])
    graph.nodes.append(node)
    return node


def _new_constant(graph: gs.Graph, name: str, values: np.ndarray) -> gs.Constant:
    """A fused weight: a stub of the graph's weight store (:mod:`reparam_fx.onnx.io`),
    its bytes copied out once, into the result or the output file; small ones inline."""
    store = getattr(graph, "reparam_fx_store", None)
    if store is None or values.nbytes < STUB_BYTES:
        return gs.Constant(name, values)
    return gs.Constant(name, store.values(store.stub(name, values)))


def _rank2(tensor) -> bool:
    shape = getattr(tensor, "shape", None)
    return shape is not None and len(shape) == 2


# ---- regions with moves: the op and the moves written again ----------------------------------
#
#   placement "before":  source -> op(term) -> move_1' -> ... -> move_k' -> output
#   placement "after":   source -> move_1' -> ... -> move_k' -> op(term') -> output
#
# ``term`` acts in the source's coordinates; ``term'`` is the same map where the moves put
# the channel axis (``affine.as_pointwise``: a linear on the last axis, or a 1x1 conv).
# Moves that together change nothing are not written (``onnx_moves.moves_cancel``).

def _moves_written(region: Region) -> list:
    """The move values a region writes again (none if it has none, or they cancel)."""
    if not region.layouts or moves_cancel(region):
        return []
    return [value for value, _ in region.layouts]


def _op_written(region: Region, view: OnnxView) -> tuple[ConvTerm, int | None]:
    """``(term, rank of its input)`` of the region's one op; raises NotExact if the term
    has no form where the moves put the channel axis (a grouped conv on the last axis)."""
    moves = _moves_written(region)
    if region.layouts and region.placement == "after":
        term = affine.as_pointwise(region.term, region.now_spatial)
        if moves:
            return term, len(region.layouts[-1][1].out_sizes)
    else:
        term = region.term
    return term, view.rank(region.source)


def _nodes_written(region: Region, view: OnnxView) -> int | None:
    """ONNX nodes a region becomes: one Conv / Gemm / MatMul, or MatMul + Add for a
    linear term with bias on a tensor of rank > 2, plus its moves written again; None if
    it cannot be written (with moves: a conv on a tensor not proven to have one batch
    axis, a grouped conv where the moves put the channel axis last)."""
    try:
        term, rank = _op_written(region, view)
    except NotExact:
        return None
    if region.layouts and term.spatial > 0 and rank != term.spatial + 2:
        return None  # (without moves the source is a Conv's input: (N, C, *spatial))
    ops = 1 if term.spatial > 0 or term.bias is None or rank == 2 else 2
    return ops + (0 if _reshaped_after(region, view) else len(_moves_written(region)))


_REORDERING_FREE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # (keep the value order)


def _reshaped_after(region: Region, view: OnnxView) -> bool:
    """Whether the moves a region would write after its op (placement "before") only
    reshape, and the one reader of its output is a Reshape to constant sizes (no 0 that
    would copy a size): ``Reshape(Reshape(y, a), b) == Reshape(y, b)``, so the moves need
    not be written (LeViT's split into heads right after its LinearNorm)."""
    moves = _moves_written(region)
    if not moves or region.placement != "before" \
            or any(move.producer.op not in _REORDERING_FREE for move in moves):
        return False
    users = view.users(region.nodes[-1])
    if len(users) != 1 or users[0] is OUTPUT or users[0].producer is None:
        return False
    reader = users[0].producer
    if reader.op != "Reshape" or reader.inputs[0] is not region.nodes[-1].var:
        return False
    sizes = constant_value(reader.inputs[1])
    return sizes is not None and (reader.attrs.get("allowzero", 0) == 1 or not (sizes == 0).any())


def _worth_writing(region: Region, view: OnnxView) -> bool:
    """Only rewrites that remove nodes (a MatMul + Add re-emitted as MatMul + Add would
    churn the graph for nothing), or as many as they write but a BatchNormalization among
    them (``MatMul -> Reshape -> BatchNormalization`` becomes ``MatMul -> Add -> Reshape``:
    a bias add, which runtimes fuse into the MatMul, instead of a BatchNorm).

    A region whose first ops other readers take too (one BatchNorm before q, k and v) is
    written only together with theirs (``regions.select_rewrites`` drops the others), and
    its moves are copied once for all of them: it is worth it if its own ops (after the
    shared ones) are no fewer than the op it becomes; the shared ops then go."""
    if not region.emittable:
        return False
    written = _nodes_written(region, view)
    if written is None:
        return False
    shared = max((i for i, value in enumerate(region.nodes[:-1])
                  if len(view.users(value)) > 1), default=None)
    if shared is None:
        removed = len(region.nodes) - region.kinds["identity"]
        return removed > written or (removed == written and region.kinds["bn"] > 0)
    moves = len(_moves_written(region))
    own = len(region.nodes) - shared - 1
    return (not moves or region.placement == "after") and own >= written - moves


class NodeNames:
    """Fresh tensor and node names for one pass (nothing in the graph uses them)."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors()) | {node.name for node in graph.nodes}

    def __call__(self, base: str) -> str:
        name, index = base, 1
        while name in self.taken:
            index += 1
            name = f"{base}_{index}"
        self.taken.add(name)
        return name


def _write_region(graph: gs.Graph, output: gs.Variable, region: Region, index: int,
                  moved_sources: dict, names: NodeNames, view: OnnxView) -> gs.Node:
    """Write ``region`` into ``output`` (see the placements above); returns its op node.
    Moves copied onto a source (placement "after") are shared by every region that moves
    that source the same way (q, k and v reading one folded BatchNorm)."""
    moves = _moves_written(region)
    term, rank = _op_written(region, view)
    if not region.layouts:
        return _emit(graph, output, region, region.source.var, index, term, rank)
    if region.placement == "after":
        value = region.source.var
        for move in moves:  # (a move's chain back to the source is the graph's: a key)
            key = (region.source, move)
            if key not in moved_sources:
                moved_sources[key] = _copy_move(graph, move, value, None, names,
                                                shape=view.shape(move))
            value = moved_sources[key]
        return _emit(graph, output, region, value, index, term, rank)
    if not moves or _reshaped_after(region, view):
        if moves:
            output.shape = view.shape(region.layouts[0][1].input)
        return _emit(graph, output, region, region.source.var, index, term, rank)
    first_input = region.layouts[0][1].input
    result = gs.Variable(names(f"{output.name}_fused{index}_out"), dtype=output.dtype,
                         shape=view.shape(first_input) if region.post_kept else None)
    node = _emit(graph, result, region, region.source.var, index, term, rank)
    value = result
    for step, move in enumerate(moves):
        last = step == len(moves) - 1
        value = _copy_move(graph, move, value, output if last else None, names,
                           shape=view.shape(move) if region.post_kept else None)
    return node


def _copy_move(graph: gs.Graph, move: Tensor, input_value: gs.Variable,
               output: gs.Variable | None, names: NodeNames, shape=None) -> gs.Variable:
    """The move's node written again on ``input_value`` (its other inputs, such as a
    Reshape's shape, as they are), into ``output`` or a new tensor; returns that tensor."""
    original = move.producer
    if output is None:
        output = gs.Variable(names(f"{move.var.name}_moved"), dtype=move.var.dtype, shape=shape)
    else:
        for node in list(output.inputs):
            node.outputs = [o for o in node.outputs if o is not output]
    graph.nodes.append(gs.Node(original.op, names(f"{original.name or move.var.name}_moved"),
                               attrs=dict(original.attrs),
                               inputs=[input_value, *original.inputs[1:]], outputs=[output]))
    return output


def _emit_sum(graph: gs.Graph, output: gs.Variable, values: list, index: int) -> None:
    """``output = sum(coeff * value)`` as Add / Sub (and Mul) nodes."""
    for node in list(output.inputs):
        node.outputs = [o for o in node.outputs if o is not output]
    base = f"{output.name}_sum{index}"
    steps = sum_steps(values)
    result = None
    for step, (value, scale, join) in enumerate(steps):
        if scale is not None:
            scaled = gs.Variable(f"{base}_scaled{step}", dtype=output.dtype)
            factor = gs.Constant(f"{base}_c{step}", np.asarray(scale, dtype=np.float32))
            graph.nodes.append(gs.Node("Mul", f"{base}_mul{step}", inputs=[value, factor],
                                       outputs=[scaled]))
            value = scaled
        if join == "first":
            result = value
            continue
        target = output if step == len(steps) - 1 else \
            gs.Variable(f"{base}_{step}", dtype=output.dtype)
        graph.nodes.append(gs.Node("Add" if join == "add" else "Sub", f"{base}_{step}",
                                   inputs=[result, value], outputs=[target]))
        result = target


def _category(value: Tensor) -> str | None:
    node = value.producer
    return CATEGORIES.get(node.op) if node is not None else None


def _region_params(region: Region) -> int:
    total = 0
    for value in region.nodes:
        node = value.producer
        if node is not None and node.op in MOVE_OPS:
            continue  # a Reshape's shape, a ReduceMean's axes: no parameters
        if node is None or node.op == "BatchNormalization":
            total += 0 if node is None else sum(constant_size(t) for t in node.inputs[1:3])
            continue
        total += sum(constant_size(tensor) for tensor in node.inputs[1:])
    return total


def _fused_region(output, region: Region, node_name: str) -> FusedRegion:
    return fused_region(region, output.name, node_name,
                        (v.producer.name or v.var.name for v in region.nodes if v.producer),
                        map(_category, region.nodes), _region_params(region))


def fusion_pass(graph: gs.Graph, report: FusionReport) -> int:
    view = OnnxView(graph)
    emit, partial_sums = find_rewrites(view, report, lambda region: _worth_writing(region, view))
    moved_sources: dict = {}
    names = NodeNames(graph)
    for index, (output, region) in enumerate(emit):
        node = _write_region(graph, output.var, region, index, moved_sources, names, view)
        report.fused.append(_fused_region(output.var, region, node.name))
    for index, partial in enumerate(partial_sums):
        values = []
        for term_index, (term, coeff) in enumerate(partial.terms):
            if isinstance(term, Region):
                root = partial.root.var
                result = gs.Variable(f"{root.name}_group{index}_{term_index}", dtype=root.dtype)
                node = _emit(graph, result, term, term.source.var,
                             1000 + index * 100 + term_index)
                report.fused.append(_fused_region(root, term, node.name))
                values.append((result, 1.0))
            else:
                values.append((term.var, coeff))
        _emit_sum(graph, partial.root.var, values, index)
    _freeze_shape_reads(view, rewritten_values(emit, partial_sums))
    if emit or partial_sums:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return len(emit) + len(partial_sums)


def _freeze_shape_reads(view: OnnxView, values) -> None:
    """``Shape`` nodes reading the static sizes of folded values become constants, so they
    keep nothing of the folded ops alive."""
    for value in values:
        for node in view.shape_reads(value):
            if not node.outputs:
                continue  # (already a constant: a value can be in two regions)
            start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
            sizes = np.asarray(value.var.shape, dtype=np.int64)[start:end]
            shape = node.outputs[0]
            node.outputs.clear()
            shape.to_constant(sizes)
