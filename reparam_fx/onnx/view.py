"""The ONNX graph as the region builder reads it: values, users, proven shapes, constants.

:class:`OnnxView` implements the view protocol of :mod:`reparam_fx.core.regions` over an
onnx-graphsurgeon graph; :class:`Tensor` is its handle of one graph value.

A ``Shape`` node reading a tensor of static shape reads no values: it does not keep that
tensor out of a region, and once the tensor is folded away it becomes a constant.
Symbolic dimensions (a ``dim_param`` name, or unknown) are never read as numbers: a size
is a number only where the graph proves it (its shape, the sizes the ops before it prove,
:meth:`OnnxView.channels`). Shapes come from ONNX shape inference on the input's declared
shapes.

:func:`constant_value` reads an initializer, a ``Constant`` node or a small subgraph
computed only from constants and static shapes (an absent conv bias exported as
``ConstantOfShape`` ...). Weights of the weightless copy (:mod:`reparam_fx.onnx.io`) are
read only on use (:func:`stored_weight`, a :class:`reparam_fx.core.affine.Weight`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx_graphsurgeon.ir.tensor import LazyValues

from reparam_fx.core import affine
from reparam_fx.onnx.io import STUB_BYTES
from reparam_fx.onnx.moves import MOVE_OPS, OnnxMove, as_dims, graph_sizes
from reparam_fx.core.layout import Layout
from reparam_fx.core.regions import Sum, Unary
OUTPUT = object()  # stands for "a graph output reads this value"
CATEGORIES = {"Conv": "conv", "BatchNormalization": "batch_norm", "Gemm": "linear",
               "MatMul": "linear", "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div",
               "AveragePool": "avg_pool", "Pad": "pad"}


# ---- constants ------------------------------------------------------------------------

def constant_value(tensor, _depth: int = 0) -> np.ndarray | None:
    """The value of an initializer, a ``Constant`` node, or a small subgraph computed only
    from constants and static shapes (exporters build e.g. an absent conv bias as
    ``Expand(CastLike(0), Shape(W)[0:1])``); else None."""
    if isinstance(tensor, gs.Constant):  # a large initializer's values are read, not kept
        lazy = tensor._values
        if isinstance(lazy, LazyValues) and lazy.nbytes >= STUB_BYTES:
            return None if is_stub(lazy.tensor) else np.asarray(lazy.load())
        return np.asarray(tensor.values)
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1 or _depth > 8:
        return None
    node = tensor.inputs[0]
    if node.op == "Constant":
        return _constant_attribute(node)
    if node.op == "Shape":
        return _static_dims(node, slice(None))
    if node.op not in FOLDED_OPS or not node.inputs or not node.inputs[0].name:
        return None
    first = constant_value(node.inputs[0], _depth + 1)  # (before the others: usually None)
    if first is None:
        if node.op == "Gather" and node.inputs[0].inputs and len(node.inputs) > 1 \
                and node.inputs[0].inputs[0].op == "Shape":  # static dims of a shape
            index = constant_value(node.inputs[1], _depth + 1)
            if index is not None and index.ndim <= 1 and int(node.attrs.get("axis", 0)) == 0:
                return _static_dims(node.inputs[0].inputs[0], index.astype(np.int64))
        return None
    args = [first] + [constant_value(t, _depth + 1) if t.name else None for t in node.inputs[1:]]
    if node.op == "Identity":
        return args[0]
    if node.op in _INTEGER_ARITHMETIC:
        return _integer_arithmetic(node.op, *args[:2]) if len(args) == 2 else None
    if node.op == "ConstantOfShape":  # (TorchScript's F.pad builds its pads with it)
        fill = node.attrs.get("value")
        fill = np.zeros(1, np.float32) if fill is None else np.asarray(
            fill.values if isinstance(fill, gs.Constant) else fill).reshape(-1)
        if fill.size != 1 or args[0].ndim != 1 or np.any(args[0] < 0) \
                or np.prod(args[0]) > FOLD_LIMIT:
            return None
        return np.full(tuple(int(d) for d in args[0]), fill[0], dtype=fill.dtype)
    if node.op == "Transpose":
        perm = node.attrs.get("perm", range(args[0].ndim - 1, -1, -1))
        return np.transpose(args[0], [int(p) for p in perm])
    if node.op == "Cast":
        return args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    if node.op == "CastLike":
        like = node.inputs[1]
        dtype = getattr(like, "dtype", None) if args[1] is None else args[1].dtype
        return None if dtype is None else args[0].astype(np.dtype(dtype))
    if node.op == "Expand" and len(args) > 1 and args[1] is not None:
        shape = np.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1]))
        return np.broadcast_to(args[0], shape) if math.prod(shape) <= FOLD_LIMIT else None
    if node.op == "Reshape" and len(args) > 1 and args[1] is not None and not np.any(args[1] == 0):
        return args[0].reshape(tuple(int(d) for d in args[1]))
    if node.op == "Concat" and all(a is not None for a in args):  # shape arithmetic
        return np.concatenate([np.atleast_1d(a) for a in args], axis=int(node.attrs.get("axis", 0)))
    if node.op == "Gather" and len(args) > 1 and args[1] is not None:
        return np.take(args[0], args[1].astype(np.int64), axis=int(node.attrs.get("axis", 0)))
    if node.op == "Slice" and len(args) >= 3 and all(a is not None for a in args[1:]):
        starts, ends = args[1].reshape(-1), args[2].reshape(-1)
        axes = args[3].reshape(-1) if len(args) > 3 else range(len(starts))
        steps = args[4].reshape(-1) if len(args) > 4 else [1] * len(starts)
        index = [slice(None)] * args[0].ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[int(axis)] = slice(int(start), int(end), int(step))
        return args[0][tuple(index)]
    if node.op in ("Unsqueeze", "Squeeze"):
        axes = args[1] if len(args) > 1 else node.attrs.get("axes")
        if axes is None and node.op == "Unsqueeze":
            return None
        if node.op == "Squeeze":
            return np.squeeze(args[0], axis=None if axes is None else tuple(int(a) for a in axes))
        result = args[0]
        for axis in sorted(int(a) % (result.ndim + len(axes)) for a in axes):
            result = np.expand_dims(result, axis)
        return result
    return None


def _static_dims(shape_node, index) -> np.ndarray | None:
    """``Shape(x)[start:end][index]`` if those dims of ``x`` are numbers, else None."""
    shape = getattr(shape_node.inputs[0], "shape", None) if shape_node.inputs else None
    if shape is None:
        return None
    start, end = shape_node.attrs.get("start", 0), shape_node.attrs.get("end", None)
    dims = list(shape)[start:end]
    try:
        picked = np.asarray(dims, dtype=object)[index]
    except IndexError:
        return None
    if not all(is_size(d) for d in np.atleast_1d(picked).tolist()):
        return None
    return np.asarray(picked.tolist() if isinstance(picked, np.ndarray) else picked,
                      dtype=np.int64)


_INTEGER_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})


def _integer_arithmetic(op: str, a, b) -> np.ndarray | None:
    """Shape arithmetic (``B * nH * nW``, ``pH // window``) on integer constants, as ONNX
    defines it (``Div`` truncates towards zero); None for other dtypes."""
    if a is None or b is None or a.dtype != b.dtype or a.dtype.kind not in "iu" \
            or a.size > FOLD_LIMIT or b.size > FOLD_LIMIT:
        return None
    if op == "Add":
        return a + b
    if op == "Sub":
        return a - b
    if op == "Mul":
        return a * b
    if np.any(b == 0):
        return None
    quotient = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -quotient, quotient).astype(a.dtype)


def stored_weight(tensor) -> tuple[affine.Weight, np.dtype] | None:
    """A constant weight as a float64 :class:`~reparam_fx.core.affine.Weight` read only when
    a region using it is written (an initializer's values are not loaded for the walk),
    and its dtype; None if ``tensor`` is not constant."""
    if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues):
        lazy = tensor._values
        return (affine.Weight.loaded(lazy.shape, lambda: torch.from_numpy(
            np.asarray(lazy.load()))), np.dtype(lazy.dtype))
    value = constant_value(tensor)
    if value is None:
        return None
    return affine.Weight.of(torch.from_numpy(np.array(value))), value.dtype


def constant_size(tensor) -> int:
    """How many values a constant holds (0 if it is none), without loading them."""
    if isinstance(tensor, gs.Constant):
        return int(np.prod(tensor.shape))
    value = constant_value(tensor)
    return 0 if value is None else value.size


def _constant_attribute(node) -> np.ndarray | None:
    for key, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in node.attrs:
            value = node.attrs[key]
            value = value.values if isinstance(value, gs.Constant) else value
            return np.asarray(value, dtype=dtype)
    return None


def is_tensor(value) -> bool:
    return isinstance(value, gs.Variable) and constant_value(value) is None


# ---- the view reparam_fx.core.regions walks -------------------------------------------------

class Tensor:
    """A hashable handle on one ``gs.Variable`` (graphsurgeon tensors are not hashable)."""

    __slots__ = ("var",)

    def __init__(self, var: gs.Variable):
        self.var = var

    @property
    def producer(self) -> gs.Node | None:
        return self.var.inputs[0] if self.var.inputs else None


class OnnxView:
    """Values are the first outputs of the graph's nodes, in topological order."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.opset = getattr(graph, "opset", None)  # the default domain's (onnx_graphsurgeon)
        self.mutated: set = set()  # ONNX is functional
        self._handles: dict[int, Tensor] = {}
        self._users: dict[Tensor, list] = {}
        self._shape_reads: dict[Tensor, list] = {}
        self._sizes: dict[int, tuple | None] = {}
        outputs = {id(tensor) for tensor in graph.outputs}
        self._graph_outputs = outputs
        for node in graph.nodes:
            if node.op == "Shape" and node.inputs and is_static(node.inputs[0]) \
                    and id(node.outputs[0]) not in outputs:  # reads no values
                self._shape_reads.setdefault(self.handle(node.inputs[0]), []).append(node)
                continue
            for tensor in node.inputs:
                if isinstance(tensor, gs.Variable) and node.outputs:
                    self._users.setdefault(self.handle(tensor), []).append(
                        self.handle(node.outputs[0]))
        for tensor in graph.outputs:
            self._users.setdefault(self.handle(tensor), []).append(OUTPUT)
        self._ops: dict = {}

    def is_read(self, var) -> bool:
        """Whether a node or a graph output reads ``var``."""
        return bool(var.outputs) or id(var) in self._graph_outputs

    def handle(self, var: gs.Variable) -> Tensor:
        if id(var) not in self._handles:
            self._handles[id(var)] = Tensor(var)
        return self._handles[id(var)]

    def values(self):
        return [self.handle(node.outputs[0]) for node in self.graph.nodes if node.outputs]

    convs_are_batched = True  # ONNX Conv takes (N, C, *spatial) only

    def users(self, value: Tensor):
        return self._users.get(value, [])

    @staticmethod
    def metadata_readers(value) -> list:
        return []  # a Shape node of a static shape becomes a constant: see shape_reads

    def shape_reads(self, value: Tensor) -> list:
        """The ``Shape`` nodes that read ``value``'s (static) sizes, not counted as uses."""
        return self._shape_reads.get(value, [])

    @staticmethod
    def reads_shape(value) -> bool:
        return False

    def channels(self, value, axis: int) -> int | None:
        """The size of ``value``'s axis ``axis`` if the graph proves it: an integer dim of
        its shape or sizes, or of the tensor before ops that keep that axis (shape inference
        knows no dim after TorchScript's ``F.pad``, whose pads it cannot read), or the
        ``in_channels`` of a Conv that reads it (a model where they differ is invalid). A
        symbolic dim (a name, or unknown) proves nothing."""
        start = var = value.var if isinstance(value, Tensor) else value
        for _ in range(64):
            sizes = self.sizes(var)
            for shape in (getattr(var, "shape", None), sizes and as_dims(sizes)):
                if shape and len(shape) >= -axis and is_size(shape[axis]):
                    return int(shape[axis])
            var = _axis_kept(var, axis)
            if var is None:
                break
        for node in start.outputs:
            weight = node.inputs[1] if node.op == "Conv" and len(node.inputs) > 1 \
                and node.inputs[0] is start else None
            shape = getattr(weight, "shape", None) if isinstance(weight, gs.Constant) else None
            if shape and len(shape) == 1 - axis and is_size(shape[1]):
                return int(shape[1]) * int(node.attrs.get("group", 1))
        return None

    @staticmethod
    def inplace_target(value):
        return None

    @staticmethod
    def writes_shared(value) -> bool:
        return False  # (ONNX is functional)

    @staticmethod
    def read_before_written(value, nodes) -> bool:
        return True

    @staticmethod
    def is_value(value) -> bool:
        return isinstance(value, Tensor)

    def interpret(self, value: Tensor):
        from reparam_fx.onnx.ops import interpret  # (ops reads this view: imported on use)
        if value not in self._ops:
            op = interpret(value.producer, self) if value.producer is not None else None
            if isinstance(op, (Unary, Layout)):
                op.input = self.handle(op.input)
            elif isinstance(op, Sum):
                op.operands = [(self.handle(v), c) for v, c in op.operands]
            self._ops[value] = op
        return self._ops[value]

    def shape(self, value):
        """The graph's shape of ``value`` (ints, dim_param names, None), or, where the graph
        has none, what :meth:`sizes` proves."""
        var = value.var if isinstance(value, Tensor) else value
        shape = getattr(var, "shape", None)
        if shape is None:
            sizes = self.sizes(var) if isinstance(var, gs.Variable) else None
            return None if sizes is None else tuple(as_dims(sizes))
        return tuple(shape)

    def sizes(self, var: gs.Variable) -> tuple | None:
        """``var``'s sizes (:mod:`reparam_fx.onnx.moves`) as the ops before it prove them: a
        move's output sizes, a BatchNormalization's (or identity's) input sizes, else the
        graph's shape. One answer per tensor, so a dimension unknown to the graph keeps one
        name along a chain (a reshape back to it is then seen to be one)."""
        if id(var) in self._sizes:
            return self._sizes[id(var)]
        producer = var.inputs[0] if isinstance(var, gs.Variable) and len(var.inputs) == 1 \
            else None
        sizes = None
        if producer is not None and producer.outputs and producer.outputs[0] is var:
            if producer.op in MOVE_OPS:
                move = self.interpret(self.handle(var))
                sizes = move.out_sizes if isinstance(move, OnnxMove) else None
            elif producer.op in SHAPE_KEEPING and producer.inputs \
                    and isinstance(producer.inputs[0], gs.Variable):
                sizes = self.sizes(producer.inputs[0])
        if sizes is None:
            sizes = graph_sizes(getattr(var, "shape", None))
        self._sizes[id(var)] = sizes
        return sizes

    def rank(self, value):
        shape = self.shape(value)
        return len(shape) if shape is not None else None

    @staticmethod
    def describe(value: Tensor) -> tuple[str, str]:
        node = value.producer
        return (node.name or value.var.name, node.op) if node is not None else (value.var.name, "")


def is_size(dim) -> bool:
    """Whether a graph dim is a number (not a dim_param name, not unknown)."""
    return isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim >= 0


def is_static(tensor) -> bool:
    shape = getattr(tensor, "shape", None)
    return shape is not None and all(is_size(d) for d in shape)


def _axis_kept(var, axis: int):
    """The input of ``var``'s producer if it has ``var``'s size on ``axis``: ops that keep
    their input's shape, pools (on the channel axis, ``-(spatial + 1)``), a Pad that adds
    nothing on that axis; else None."""
    node = var.inputs[0] if isinstance(var, gs.Variable) and len(var.inputs) == 1 else None
    if node is None or not node.inputs or node.outputs[0] is not var \
            or not isinstance(node.inputs[0], gs.Variable):
        return None
    if node.op in SHAPE_KEEPING:
        return node.inputs[0]
    if node.op in POOLS and axis == -(len(node.attrs.get("kernel_shape", ())) + 1):
        return node.inputs[0]
    if node.op == "Pad" and not (len(node.inputs) > 3 and node.inputs[3].name):
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("pads")
        pads = None if pads is None else [int(p) for p in np.asarray(pads).reshape(-1)]
        rank = len(pads) // 2 if pads else 0
        if rank and rank >= -axis and pads[rank + axis] == 0 and pads[2 * rank + axis] == 0:
            return node.inputs[0]
    return None


FOLDED_OPS = frozenset({"Identity", "Cast", "CastLike", "Expand", "Reshape", "Concat",
                         "Gather", "Slice", "Unsqueeze", "Squeeze", "ConstantOfShape",
                         "Transpose", "Add", "Sub", "Mul", "Div"})


FOLD_LIMIT = 1 << 16  # elements: the largest constant a subgraph is folded into


POOLS = frozenset({"AveragePool", "MaxPool", "LpPool"})  # (N, C, *spatial) -> same N, C


SHAPE_KEEPING = frozenset({"BatchNormalization", "Identity", "Dropout"})  # output: input's shape


STUB_LOCATION = "(not read)"


def is_stub(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is one of :func:`_weightless`'s stubs (its values are elsewhere)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        entry.key == "location" and entry.value == STUB_LOCATION
        for entry in tensor.external_data)
