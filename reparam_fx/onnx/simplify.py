"""Three exact cleanups around the fusion passes: no values change, fewer nodes.

* :func:`fold_constants`: ``Constant`` nodes and shape arithmetic on proven sizes become
  initializers (shapes are then inferred again where that proves more);
* :func:`drop_no_ops`: zero ``Pad``, whole ``Slice``, identity ``Transpose``, ``Cast`` to
  the same type, a reshape to the sizes it had, ``Identity``;
* :func:`merge_slices`: slices that cut an axis into pieces become one ``Split``.
"""

from __future__ import annotations


import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from reparam_fx.onnx.io import STUB_BYTES
from reparam_fx.onnx.moves import as_dims, interpret_move
from reparam_fx.onnx.ops import inference_dropout
from reparam_fx.onnx.rewrite import NodeNames
from reparam_fx.onnx.view import (FOLDED_OPS, FOLD_LIMIT, OnnxView, constant_value, is_size,
                                  is_static)
def fold_constants(graph: gs.Graph, reads_unknown_sizes: bool = False) -> int:
    """Nodes that compute constants become initializers: ``Constant`` nodes, and shape
    arithmetic on static shapes (``Shape`` of a tensor whose sizes the graph proves, then
    ``Gather`` / ``Concat`` / ``Mul`` ... as :func:`constant_value` evaluates them; a
    symbolic dim is never read). Values above ``FOLD_LIMIT`` elements are left as they
    are, as are graph outputs. Returns how many nodes were folded; with
    ``reads_unknown_sizes``, only how many of them a node reads whose output sizes the
    graph does not know (shape inference may know them now)."""
    outputs = {id(tensor) for tensor in graph.outputs}
    folded = informative = 0
    for node in graph.nodes:  # (in topological order: a folded value is then one Constant)
        if node.op not in FOLDED_OPS and node.op not in ("Constant", "Shape") \
                or len(node.outputs) != 1 or id(node.outputs[0]) in outputs \
                or (node.op != "Shape" and not all(map(_small_constant, node.inputs))):
            continue
        tensor = node.outputs[0]
        value = constant_value(tensor)
        if value is None or value.size > FOLD_LIMIT or not _fits(tensor, value):
            continue
        informative += reads_unknown_sizes and any(
            not is_static(out) for reader in tensor.outputs for out in reader.outputs)
        node.outputs.clear()
        tensor.to_constant(np.array(value))  # (a copy: never a view of another constant)
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return informative if reads_unknown_sizes else folded


def _small_constant(tensor) -> bool:
    """Whether ``tensor`` is an omitted input, a constant whose values are in memory and
    small (a large initializer is read only where a region needs it, and never copied), or
    a ``Shape``'s output (its static dims can be read)."""
    if isinstance(tensor, gs.Constant):
        lazy = tensor._values
        return not (isinstance(lazy, LazyValues) and lazy.nbytes >= STUB_BYTES)
    return not tensor.name or (len(tensor.inputs) == 1 and tensor.inputs[0].op == "Shape")


def _numpy_dtype(dtype) -> np.dtype | None:
    """A graph tensor's dtype as numpy's, None if it has none numpy knows."""
    try:
        return None if dtype is None else np.dtype(dtype)
    except TypeError:
        return None


def _fits(tensor: gs.Variable, value: np.ndarray) -> bool:
    """Whether ``value`` has the dtype and the (known) sizes the graph gives ``tensor``."""
    dtype, shape = getattr(tensor, "dtype", None), getattr(tensor, "shape", None)
    if dtype is not None and _numpy_dtype(dtype) != value.dtype:
        return False
    return shape is None or (len(shape) == value.ndim and all(
        not is_size(d) or d == n for d, n in zip(shape, value.shape)))


_INT64_MAX_ISH = 2**62  # a Slice end at least this large reaches the end of any axis


def _no_op(node: gs.Node, view: OnnxView) -> bool:
    """Whether ``node`` returns its first input unchanged, for every input the graph
    admits: ``Identity``, inference ``Dropout``, a ``Pad`` of zeros, a ``Slice`` over whole
    axes, a ``Transpose`` by the identity permutation, a reshape-like move to the sizes it
    was given (``view(B, -1, H, W)`` of a ``(B, C, H, W)`` tensor, proven by
    :mod:`reparam_fx.onnx.moves`' size algebra)."""
    if len(node.outputs) != 1 or not node.inputs:
        return False
    op, x = node.op, node.inputs[0]
    if op == "Identity":  # (also of a constant: TorchScript's shared weights)
        return True
    if not isinstance(x, gs.Variable):
        return False
    if op == "Dropout" and inference_dropout(node, view):
        return True
    if op in ("Cast", "CastLike"):  # to the dtype it has (``q.float()`` of a float32 tensor)
        if op == "Cast":
            to = node.attrs.get("to")
            to = None if to is None else onnx.helper.tensor_dtype_to_np_dtype(int(to))
        else:
            to = getattr(node.inputs[1], "dtype", None) if len(node.inputs) > 1 else None
        return to is not None and _numpy_dtype(to) is not None \
            and _numpy_dtype(to) == _numpy_dtype(x.dtype)
    if op == "Pad":
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("pads")
        return pads is not None and not np.any(np.asarray(pads) != 0)
    if op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    if op == "Slice":
        return _whole_slice(node, view)
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        move = interpret_move(node, view.sizes, constant_value)
        return move is not None and move.in_sizes == move.out_sizes
    return False


def _whole_slice(node: gs.Node, view: OnnxView) -> bool:
    """A ``Slice`` (opset >= 10: starts, ends, axes, steps inputs) that keeps every element."""
    args = [constant_value(t) if t.name else None for t in node.inputs[1:5]]
    if len(args) < 2 or args[0] is None or args[1] is None \
            or any(a is None and t.name for a, t in zip(args[2:], node.inputs[3:5])):
        return False
    sizes = view.sizes(node.inputs[0])
    if sizes is None:
        return False
    rank = len(sizes)
    starts, ends = args[0].reshape(-1), args[1].reshape(-1)
    axes = args[2].reshape(-1) if len(args) > 2 and args[2] is not None else range(len(starts))
    steps = args[3].reshape(-1) if len(args) > 3 and args[3] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if not -rank <= int(axis) < rank or int(step) != 1:
            return False
        size = as_dims([sizes[int(axis)]])[0]
        known = is_size(size)
        if not (int(start) == 0 or (known and int(start) <= -size)):
            return False
        if not (int(end) >= _INT64_MAX_ISH or (known and int(end) >= size)):
            return False
    return True


def drop_no_ops(graph: gs.Graph) -> int:
    """Remove the nodes that return their input unchanged (:func:`_no_op`): their readers
    read the input instead. One whose output is a graph output hands that name to the node
    before it if nothing else reads its input. Returns how many were removed."""
    view = OnnxView(graph)
    outputs = {id(tensor) for tensor in graph.outputs}
    inputs = {id(tensor) for tensor in graph.inputs}
    dropped = 0
    for node in list(graph.nodes):
        if not node.outputs or not _no_op(node, view):
            continue
        x, y = node.inputs[0], node.outputs[0]
        if any(o.outputs or id(o) in outputs for o in node.outputs[1:]):
            continue  # (a Dropout's mask is read)
        if id(y) in outputs:
            producer = x.inputs[0] if isinstance(x, gs.Variable) and len(x.inputs) == 1 \
                else None
            if producer is None or id(x) in outputs or id(x) in inputs or len(x.outputs) != 1:
                continue
            y.dtype, y.shape = y.dtype or x.dtype, y.shape if y.shape is not None else x.shape
            node.outputs.clear()
            producer.outputs[producer.outputs.index(x)] = y
        else:
            for reader in list(y.outputs):
                for i, tensor in enumerate(reader.inputs):
                    if tensor is y:
                        reader.inputs[i] = x
            node.outputs.clear()
        node.inputs.clear()
        dropped += 1
    if dropped:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return dropped


def _slice_range(node: gs.Node, view: OnnxView):
    """``(input, axis, start, end)`` of a Slice along one axis of static size with step 1
    (start and end clamped into ``[0, size]``), else None."""
    args = [constant_value(t) if t.name else None for t in node.inputs[1:5]]
    if len(args) < 2 or any(a is None or a.size != 1 for a in args[:2]) \
            or any(a is None and t.name for a, t in zip(args[2:], node.inputs[3:5])) \
            or any(a is not None and a.size != 1 for a in args[2:]) \
            or not isinstance(node.inputs[0], gs.Variable):
        return None
    sizes = view.sizes(node.inputs[0])
    axis = int(args[2].reshape(-1)[0]) if len(args) > 2 and args[2] is not None else 0
    step = int(args[3].reshape(-1)[0]) if len(args) > 3 and args[3] is not None else 1
    if sizes is None or not -len(sizes) <= axis < len(sizes) or step != 1:
        return None
    axis %= len(sizes)
    size = as_dims([sizes[axis]])[0]
    if not is_size(size):
        return None
    start, end = (int(a.reshape(-1)[0]) for a in args[:2])
    start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
    return node.inputs[0], axis, start, end


def merge_slices(graph: gs.Graph) -> int:
    """Slices that together cut one axis of a tensor into consecutive pieces (TorchScript's
    ``chunk``, ``out[..., :-1]`` with ``out[..., -1:]``) become one ``Split`` whose outputs
    are the slices' tensors. Returns how many nodes this removed."""
    view = OnnxView(graph)
    groups: dict = {}
    for node in graph.nodes:
        if node.op == "Slice" and len(node.outputs) == 1:
            found = _slice_range(node, view)
            if found is not None:
                x, axis, start, end = found
                groups.setdefault((id(x), axis), (x, []))[1].append((start, end, node))
    names, removed = NodeNames(graph), 0
    for (_, axis), (x, pieces) in groups.items():
        pieces.sort(key=lambda piece: piece[:2])
        size = as_dims([view.sizes(x)[axis]])[0]
        bounds = [0] + [end for _, end, _ in pieces]
        if len(pieces) < 2 or [start for start, _, _ in pieces] != bounds[:-1] \
                or bounds[-1] != size or any(end <= start for start, end, _ in pieces):
            continue
        outputs = [node.outputs[0] for _, _, node in pieces]
        for _, _, node in pieces:
            node.outputs.clear()
            node.inputs.clear()
        split = gs.Constant(names(f"{outputs[0].name}_split_sizes"),
                            np.asarray([end - start for start, end, _ in pieces], np.int64))
        graph.nodes.append(gs.Node("Split", names(f"{pieces[0][2].name or outputs[0].name}_split"),
                                   attrs={"axis": axis}, inputs=[x, split], outputs=outputs))
        removed += len(pieces) - 1
    if removed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return removed

