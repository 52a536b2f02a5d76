"""ONNX frontend: the same exact affine algebra over an onnx-graphsurgeon graph.

    fused_model, report = fuse_onnx_model(onnx.load("model.onnx"))

Each single-output node the frontend understands is mapped to an :mod:`reparam_fx.affine`
term of its tensor input(s) (:func:`_interpret`):

    Conv (constant W, B)             conv term; asymmetric ``pads`` (and a zero Pad right
                                     before it) as a kernel with zero taps; ``auto_pad``
                                     SAME_* with stride 1 (size-independent)
    BatchNormalization (inference)   channel affine on axis 1; the mode is read by the
                                     opset's semantics (:func:`_batchnorm_not_inference`)
    Add / Sub of two tensors         a sum;  with a constant: a per-channel shift
    Mul / Div by a constant          a per-channel scale
    Identity, Dropout (inference)    identity
    AveragePool                      depthwise conv (zero pads counted or no pads)
    Pad (constant 0, symmetric)      zero padding
    Gemm / MatMul (constant B)       linear term on the last axis
    Transpose, Reshape, Flatten,     moves (:mod:`reparam_fx.onnx_moves`): a pointwise op
    Squeeze, Unsqueeze, ReduceMean,  commutes with them while they keep the channel axis
    GlobalAveragePool                whole, so the ops around them fold together

A ``Shape`` node reading a tensor of static shape reads no values: it does not keep that
tensor out of a region, and once the tensor is folded away it becomes a constant.

Symbolic dimensions (a ``dim_param`` name, or unknown) are never read as numbers: a size
is a number only where the graph proves it (its shape, the sizes the ops before it prove,
:meth:`OnnxView.channels`); otherwise the node is left alone with a reason. Shapes come
from ONNX shape inference on the input's declared shapes; the fused graph keeps the
input's declarations of its inputs and outputs (a symbolic dim stays, under its name).

Around the passes, three exact cleanups (no values change, fewer nodes):
:func:`_fold_constants` (``Constant`` nodes and shape arithmetic on proven sizes become
initializers, then shapes are inferred again where that proves more),
:func:`_drop_no_ops` (zero ``Pad``, whole ``Slice``, identity ``Transpose``, ``Cast`` to
the same type, a reshape to the sizes it had, ``Identity``) and :func:`_merge_slices`
(slices that cut an axis into pieces become one ``Split``).

:mod:`reparam_fx.regions` then finds the regions, exactly as for torch.fx graphs, and each
region is written back as one ``Conv`` (or ``Gemm`` / ``MatMul`` + ``Add`` for linear
terms) whose output keeps the original tensor's name, so graph inputs and outputs keep
their names, shapes and dtypes. A region with moves in it has them written again around
its one op (:func:`_write_region`), or not at all when they cancel. Weights are computed
in float64 and cast to the model's weight dtype. The input model is never modified.

Memory: the walk runs on a *weightless* copy of the model (its large initializers stubs
of their name, type and shape; also what shape inference reads) and reads a weight only
when a region using it is written (:class:`reparam_fx.affine.Weight`); tensors left as
they were are the input's own TensorProtos, copied once into the result. The command
line goes further (:mod:`reparam_fx.onnx_io`): it never holds the input's weights at all.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx_graphsurgeon.ir.tensor import LazyValues

from reparam_fx import affine
from reparam_fx.affine import ConvTerm, NotExact
from reparam_fx.onnx_io import STUB_BYTES, WeightStore, is_stored
from reparam_fx.onnx_moves import (MOVE_OPS, OnnxMove, as_dims, graph_sizes, interpret_move,
                                   moves_cancel)
from reparam_fx.regions import (Layout, Refused, Region, RegionBuilder, Sum, Unary, gc_paused,
                                 select_rewrites)
from reparam_fx.report import FusedRegion, FusionReport, Skipped, classify_region
from reparam_fx.verification import VerificationError

MIN_OPSET = 13
MAX_PASSES = 4
_OUTPUT = object()  # stands for "a graph output reads this value"
_SHAPE_KEEPING = frozenset({"BatchNormalization", "Identity", "Dropout"})  # output: input's shape

_CATEGORIES = {"Conv": "conv", "BatchNormalization": "batch_norm", "Gemm": "linear",
               "MatMul": "linear", "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div",
               "AveragePool": "avg_pool", "Pad": "pad"}


class OnnxFusionError(ValueError):
    """The ONNX model cannot be fused as given; the message says what to do."""


# ---- constants ------------------------------------------------------------------------

_FOLDED_OPS = frozenset({"Identity", "Cast", "CastLike", "Expand", "Reshape", "Concat",
                         "Gather", "Slice", "Unsqueeze", "Squeeze", "ConstantOfShape",
                         "Transpose", "Add", "Sub", "Mul", "Div"})
_FOLD_LIMIT = 1 << 16  # elements: the largest constant a subgraph is folded into
_FOLD_ROUNDS = 3  # constants folded, then shapes inferred again, at most this many times


def constant_value(tensor, _depth: int = 0) -> np.ndarray | None:
    """The value of an initializer, a ``Constant`` node, or a small subgraph computed only
    from constants and static shapes (exporters build e.g. an absent conv bias as
    ``Expand(CastLike(0), Shape(W)[0:1])``); else None."""
    if isinstance(tensor, gs.Constant):  # a large initializer's values are read, not kept
        lazy = tensor._values
        if isinstance(lazy, LazyValues) and lazy.nbytes >= STUB_BYTES:
            return None if _is_stub(lazy.tensor) else np.asarray(lazy.load())
        return np.asarray(tensor.values)
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1 or _depth > 8:
        return None
    node = tensor.inputs[0]
    if node.op == "Constant":
        return _constant_attribute(node)
    if node.op == "Shape":
        return _static_dims(node, slice(None))
    if node.op not in _FOLDED_OPS or not node.inputs or not node.inputs[0].name:
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
                or np.prod(args[0]) > _FOLD_LIMIT:
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
        return np.broadcast_to(args[0], shape) if math.prod(shape) <= _FOLD_LIMIT else None
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
    if not all(_is_size(d) for d in np.atleast_1d(picked).tolist()):
        return None
    return np.asarray(picked.tolist() if isinstance(picked, np.ndarray) else picked,
                      dtype=np.int64)


_INTEGER_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})


def _integer_arithmetic(op: str, a, b) -> np.ndarray | None:
    """Shape arithmetic (``B * nH * nW``, ``pH // window``) on integer constants, as ONNX
    defines it (``Div`` truncates towards zero); None for other dtypes."""
    if a is None or b is None or a.dtype != b.dtype or a.dtype.kind not in "iu" \
            or a.size > _FOLD_LIMIT or b.size > _FOLD_LIMIT:
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


def _stored_weight(tensor) -> tuple[affine.Weight, np.dtype] | None:
    """A constant weight as a float64 :class:`~reparam_fx.affine.Weight` read only when
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


def _constant_size(tensor) -> int:
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


def _is_tensor(value) -> bool:
    return isinstance(value, gs.Variable) and constant_value(value) is None


# ---- the view reparam_fx.regions walks -------------------------------------------------

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
            if node.op == "Shape" and node.inputs and _static(node.inputs[0]) \
                    and id(node.outputs[0]) not in outputs:  # reads no values
                self._shape_reads.setdefault(self.handle(node.inputs[0]), []).append(node)
                continue
            for tensor in node.inputs:
                if isinstance(tensor, gs.Variable) and node.outputs:
                    self._users.setdefault(self.handle(tensor), []).append(
                        self.handle(node.outputs[0]))
        for tensor in graph.outputs:
            self._users.setdefault(self.handle(tensor), []).append(_OUTPUT)
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
                if shape and len(shape) >= -axis and _is_size(shape[axis]):
                    return int(shape[axis])
            var = _axis_kept(var, axis)
            if var is None:
                break
        for node in start.outputs:
            weight = node.inputs[1] if node.op == "Conv" and len(node.inputs) > 1 \
                and node.inputs[0] is start else None
            shape = getattr(weight, "shape", None) if isinstance(weight, gs.Constant) else None
            if shape and len(shape) == 1 - axis and _is_size(shape[1]):
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
        if value not in self._ops:
            op = _interpret(value.producer, self) if value.producer is not None else None
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
        """``var``'s sizes (:mod:`reparam_fx.onnx_moves`) as the ops before it prove them: a
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
            elif producer.op in _SHAPE_KEEPING and producer.inputs \
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


# ---- what one node computes ------------------------------------------------------------

def _auto_pads(node, kernel, dilations, strides, spatial):
    """Symmetric padding per dim (pools), or why there is none."""
    pairs = _pad_pairs(node, kernel, dilations, strides, spatial)
    if isinstance(pairs, str):
        return pairs
    if any(before != after for before, after in pairs):
        return "asymmetric pads have no pooling equivalent here"
    return tuple(before for before, _ in pairs)


def _pad_pairs(node, kernel, dilations, strides, spatial):
    """``(before, after)`` padding per spatial dim, or why it is not known: ``pads``, or
    ``auto_pad`` SAME_UPPER / SAME_LOWER with stride 1 (then ``d(k-1)`` in all, the odd one
    after / before, whatever the input size)."""
    mode = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode in ("NOTSET", ""):
        pads = list(node.attrs.get("pads") or [0] * (2 * spatial))
        return tuple(zip(pads[:spatial], pads[spatial:]))
    if mode == "VALID":
        return ((0, 0),) * spatial
    if any(s != 1 for s in strides):
        return f"auto_pad={mode} pads depend on the input size here"
    totals = [d * (k - 1) for k, d in zip(kernel, dilations)]
    small = [t // 2 for t in totals]
    return tuple((t - a, a) if mode == "SAME_LOWER" else (a, t - a) for t, a in zip(totals, small))


def _asymmetric_pad_before(x, view, spatial: int):
    """``(input, pairs)`` if ``x`` is made by an asymmetric zero Pad of the spatial dims
    that only this Conv reads (it then pads its input itself)."""
    pad = x.inputs[0] if x.inputs else None
    if pad is None or pad.op != "Pad" or len(view.users(view.handle(x))) != 1 \
            or id(x) in view._graph_outputs:
        return None
    op = _pad(pad)
    if not isinstance(op, Refused) or op.asymmetric_pad is None:
        return None
    source, pairs = op.asymmetric_pad
    return (source, pairs) if len(pairs) == spatial else None


_POOLS = frozenset({"AveragePool", "MaxPool", "LpPool"})  # (N, C, *spatial) -> same N, C


def _axis_kept(var, axis: int):
    """The input of ``var``'s producer if it has ``var``'s size on ``axis``: ops that keep
    their input's shape, pools (on the channel axis, ``-(spatial + 1)``), a Pad that adds
    nothing on that axis; else None."""
    node = var.inputs[0] if isinstance(var, gs.Variable) and len(var.inputs) == 1 else None
    if node is None or not node.inputs or node.outputs[0] is not var \
            or not isinstance(node.inputs[0], gs.Variable):
        return None
    if node.op in _SHAPE_KEEPING:
        return node.inputs[0]
    if node.op in _POOLS and axis == -(len(node.attrs.get("kernel_shape", ())) + 1):
        return node.inputs[0]
    if node.op == "Pad" and not (len(node.inputs) > 3 and node.inputs[3].name):
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("pads")
        pads = None if pads is None else [int(p) for p in np.asarray(pads).reshape(-1)]
        rank = len(pads) // 2 if pads else 0
        if rank and rank >= -axis and pads[rank + axis] == 0 and pads[2 * rank + axis] == 0:
            return node.inputs[0]
    return None


def _is_size(dim) -> bool:
    """Whether a graph dim is a number (not a dim_param name, not unknown)."""
    return isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim >= 0


def _static(tensor) -> bool:
    shape = getattr(tensor, "shape", None)
    return shape is not None and all(_is_size(d) for d in shape)


def _interpret(node: gs.Node, view: OnnxView):
    op, inputs = node.op, node.inputs
    if len(node.outputs) != 1 and op not in ("Dropout", "BatchNormalization"):
        return None
    if op in MOVE_OPS:
        return interpret_move(node, view.sizes, constant_value) if _is_tensor(inputs[0]) \
            else None
    if op == "Conv":
        stored = _stored_weight(inputs[1]) if len(inputs) > 1 else None
        bias = constant_value(inputs[2]) if len(inputs) > 2 else None
        if stored is None or (len(inputs) > 2 and bias is None) or not _is_tensor(inputs[0]):
            return None
        weight = stored[0]
        spatial = weight.dim() - 2
        kernel = tuple(weight.shape[2:])
        strides = tuple(node.attrs.get("strides", [1] * spatial))
        dilations = tuple(node.attrs.get("dilations", [1] * spatial))
        pairs = _pad_pairs(node, kernel, dilations, strides, spatial)
        if isinstance(pairs, str):
            return Refused(pairs)
        source, extra = inputs[0], ()
        padded = _asymmetric_pad_before(inputs[0], view, spatial)
        if padded is not None:  # Pad(x, (0, 0, 0, 1, ...)) then Conv: the conv's padding
            source, extra = padded[0], (view.handle(inputs[0]),)
            pairs = tuple((a + c, b + d) for (a, b), (c, d) in zip(pairs, padded[1]))
        bias = None if bias is None else torch.from_numpy(bias.copy())
        group = int(node.attrs.get("group", 1))
        if all(before == after for before, after in pairs):
            term = affine.conv(weight, bias, strides, tuple(a for a, _ in pairs), dilations, group)
        else:
            try:
                term = affine.asymmetric_conv(weight, bias, strides, pairs, dilations, group)
            except affine.NotExact as reason:
                return Refused(str(reason))
        return Unary(source, term, "conv", -(spatial + 1), extra_nodes=extra)
    if op == "BatchNormalization":
        training = _batchnorm_not_inference(node, view)
        if training is not None:
            return Refused(training)
        values = [constant_value(t) for t in inputs[1:5]]
        if any(v is None for v in values) or not _is_tensor(inputs[0]):
            return None
        scale, bias, mean, var = (torch.from_numpy(v.copy()) for v in values)
        rank = view.rank(inputs[0])
        axis = 1 - rank if rank else "bn"
        return Unary(inputs[0], affine.batchnorm(mean, var, scale, bias,
                                                 float(node.attrs.get("epsilon", 1e-5))),
                     "bn", axis)
    if op in ("Identity",) or (op == "Dropout" and _inference_dropout(node, view)):
        return Unary(inputs[0], affine.identity(), "identity", None) if _is_tensor(inputs[0]) else None
    if op == "Dropout":
        return Refused("Dropout in training mode")
    if op in ("Add", "Sub", "Mul", "Div"):
        return _arithmetic(node, view)
    if op == "Neg" and _is_tensor(inputs[0]):
        return Unary(inputs[0], affine.channel_affine(-1.0), "scale", None)
    if op == "AveragePool":
        return _average_pool(node, view)
    if op == "Pad":
        return _pad(node)
    if op == "Gemm":
        return _gemm(node)
    if op == "MatMul":
        stored = _stored_weight(inputs[1])
        if stored is None or stored[0].dim() != 2 or not _is_tensor(inputs[0]):
            return None
        matrix = stored[0]  # (in, out): the linear's weight is its transpose
        weight = affine.Weight(matrix.shape[::-1], lambda: matrix.value().T.contiguous())
        return Unary(inputs[0], affine.linear(weight, None), "linear", -1)
    return None


_BATCHNORM_ATTRIBUTES = frozenset({"epsilon", "momentum", "training_mode"})


def _batchnorm_not_inference(node, view) -> str | None:
    """Why a BatchNormalization is not in inference mode (normalising by its running
    statistics), by the semantics of the graph's opset (default domain); None if it is.

    * BatchNormalization-9 (opsets 9 to 13) has no mode attribute: "Output case #1: Y, mean,
      var, saved_mean, saved_var (training mode); Output case #2: Y (test mode)". Any of the
      optional outputs makes it a training node, read or not: TorchScript's
      ``TrainingMode.TRAINING`` export at opset 13 writes five outputs and no attribute.
    * BatchNormalization-14 / -15: ``training_mode`` (default 0); the running-statistics
      outputs exist only in training mode ("extra outputs are invalid" otherwise).
    * Older versions' ``spatial`` (statistics per position when 0) and ``is_test``, and any
      other attribute, are not this op's: the node is refused rather than guessed at."""
    unknown = sorted(set(node.attrs) - _BATCHNORM_ATTRIBUTES)
    if view.opset is not None and view.opset < 14 and "training_mode" in node.attrs:
        unknown.append("training_mode")  # (not an attribute of BatchNormalization-9)
    if unknown:
        return (f"BatchNormalization with attribute(s) {', '.join(unknown)} that "
                f"BatchNormalization of opset {view.opset} does not have: not read as inference")
    extra = [o.name for o in node.outputs[1:] if o.name]
    if view.opset is not None and view.opset < 14:
        if extra:
            return (f"BatchNormalization in training mode uses batch statistics (opset "
                    f"{view.opset}: it has the optional outputs only training mode computes)")
        return None
    if node.attrs.get("training_mode", 0):
        return "BatchNormalization in training mode uses batch statistics (training_mode=1)"
    if extra:
        return ("BatchNormalization with running-statistics outputs, which only training "
                "mode computes: not read as inference")
    return None


def _inference_dropout(node, view) -> bool:
    """A Dropout that is the identity: training_mode (opset 12+) a constant 0 and no mask
    that anything reads (a node or a graph output)."""
    if len(node.inputs) > 2 and node.inputs[2].name:
        training = constant_value(node.inputs[2])
        if training is None or bool(training):
            return False
    return not any(view.is_read(o) for o in node.outputs[1:])


def _arithmetic(node, view):
    a, b = node.inputs[0], node.inputs[1]
    const_a, const_b = constant_value(a), constant_value(b)
    if node.op in ("Add", "Sub") and _is_tensor(a) and _is_tensor(b):
        return Sum([(a, 1.0), (b, 1.0 if node.op == "Add" else -1.0)])
    if _is_tensor(a) and const_b is not None:
        tensor, constant = a, const_b
    elif _is_tensor(b) and const_a is not None and node.op in ("Add", "Mul"):
        tensor, constant = b, const_a
    elif _is_tensor(b) and const_a is not None and node.op == "Sub":  # c - x
        op = _channel_constant(b, const_a, shift=True)
        if isinstance(op, Unary):
            op.term = affine.compose(affine.channel_affine(-1.0), op.term)
        return op
    else:
        return None
    if np.size(constant) == 1 and not _made_by_affine_op(tensor, view):
        # e.g. the final "* 0.5" of a decomposed GELU: folding it into the next conv
        # would break the pattern ONNX Runtime fuses back into one Gelu kernel
        return Refused("a scalar constant on an activation's output is left for the "
                       "runtime's activation fusion")
    if node.op == "Add":
        return _channel_constant(tensor, constant, shift=True)
    if node.op == "Sub":
        return _channel_constant(tensor, -constant, shift=True)
    if node.op == "Mul":
        return _channel_constant(tensor, constant)
    if not np.all(constant != 0):
        return Refused("division by a constant containing zeros")
    return _channel_constant(tensor, 1.0 / constant.astype(np.float64))


def _made_by_affine_op(tensor, view) -> bool:
    """Whether ``tensor`` comes from an op this frontend folds (conv, BN, linear, ...)."""
    producer = tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None
    return producer is not None and isinstance(view.interpret(view.handle(tensor)), (Unary, Sum))


def _channel_constant(tensor, constant: np.ndarray, shift: bool = False):
    """``x * c`` or ``x + c`` with ``c`` broadcast along at most one axis (numpy rules)."""
    value = torch.from_numpy(np.asarray(constant, dtype=np.float64).copy())
    wide = [i for i, size in enumerate(value.shape) if size != 1]
    if len(wide) > 1:
        return Refused("constant varies along more than one axis: not per-channel")
    axis = (wide[0] - value.dim()) if wide else None
    vector = value.reshape(-1) if wide else value.reshape(())
    term = affine.channel_affine(1.0, vector) if shift else affine.channel_affine(vector)
    return Unary(tensor, term, "scale", axis, const_rank=value.dim())


def _average_pool(node, view):
    x = node.inputs[0]
    if not _is_tensor(x):
        return None
    kernel = tuple(node.attrs["kernel_shape"])
    spatial = len(kernel)
    strides = tuple(node.attrs.get("strides", [1] * spatial))
    if node.attrs.get("ceil_mode", 0):
        return Refused("average pooling with ceil_mode=1 is not a conv")
    if any(d != 1 for d in node.attrs.get("dilations", ())):  # opset 19+
        return Refused("dilated average pooling is not handled")
    pads = _auto_pads(node, kernel, (1,) * spatial, strides, spatial)
    if isinstance(pads, str):
        return Refused(pads)
    if any(pads) and not node.attrs.get("count_include_pad", 0):
        return Refused("average pooling with count_include_pad=0 divides the border by fewer "
                       "taps: not a conv")
    axis = -(spatial + 1)

    def term(channels):  # (regions pass the graph's dim, which may be a name)
        if not _is_size(channels):
            channels = view.channels(view.handle(x), axis)
        if channels is None:
            raise NotExact("average pooling over a channel count the graph does not prove "
                           "(a symbolic dimension): its depthwise kernel has no size")
        return affine.avg_pool(int(channels), kernel, strides, pads)
    return Unary(x, term, "avgpool", axis)


def _pad(node):
    x = node.inputs[0]
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("pads")
    value = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else 0
    if mode != "constant" or pads is None or value is None or np.any(np.asarray(value) != 0):
        return None
    if len(node.inputs) > 3 and node.inputs[3].name:
        return None  # explicit axes: not handled
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if rank < 3 or any(begin[:2]) or any(end[:2]):
        return None
    if any(p < 0 for p in begin + end):
        return Refused("negative zero padding has no conv equivalent")
    if begin != end:
        return Refused("an asymmetric zero padding is a conv's padding only right before it",
                       asymmetric_pad=(x, tuple(zip(begin[2:], end[2:]))))
    return Unary(x, affine.zero_pad(tuple(begin[2:])), "pad", -(rank - 1))


def _gemm(node):
    a, b = node.inputs[0], node.inputs[1]
    stored = _stored_weight(b)
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if stored is None or stored[0].dim() != 2 or not _is_tensor(a) or node.attrs.get("transA", 0):
        return None
    if len(node.inputs) > 2 and node.inputs[2].name and bias is None:
        return None
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    stored, transposed = stored[0], not node.attrs.get("transB", 0)

    def matrix():  # (out, in), times alpha
        value = stored.value()
        return (value.T.contiguous() if transposed else value).mul_(alpha)
    shape = stored.shape[::-1] if transposed else stored.shape
    out = shape[0]
    if bias is not None:
        if bias.size not in (1, out) or (bias.ndim == 2 and bias.shape[0] != 1):
            return None
        bias = np.broadcast_to(bias.reshape(-1), (out,)) * beta
    term = affine.linear(affine.Weight(shape, matrix),
                         None if bias is None else torch.from_numpy(bias.astype(np.float64)))
    return Unary(a, term, "linear", -1)


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
    """A fused weight: a stub of the graph's weight store (:mod:`reparam_fx.onnx_io`),
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
    if len(users) != 1 or users[0] is _OUTPUT or users[0].producer is None:
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


class _Names:
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
                  moved_sources: dict, names: _Names, view: OnnxView) -> gs.Node:
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
               output: gs.Variable | None, names: _Names, shape=None) -> gs.Variable:
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
    result = None
    for step, (value, coeff) in enumerate(values):
        last = step == len(values) - 1
        if coeff not in (1, -1) or (result is None and coeff != 1):
            scaled = gs.Variable(f"{base}_scaled{step}", dtype=output.dtype)
            factor = gs.Constant(f"{base}_c{step}", np.asarray(coeff, dtype=np.float32))
            graph.nodes.append(gs.Node("Mul", f"{base}_mul{step}", inputs=[value, factor],
                                       outputs=[scaled]))
            value, coeff = scaled, 1
        if result is None:
            result = value
            continue
        target = output if last else gs.Variable(f"{base}_{step}", dtype=output.dtype)
        graph.nodes.append(gs.Node("Add" if coeff == 1 else "Sub", f"{base}_{step}",
                                   inputs=[result, value], outputs=[target]))
        result = target


def _category(value: Tensor) -> str | None:
    node = value.producer
    return _CATEGORIES.get(node.op) if node is not None else None


def _region_params(region: Region) -> int:
    total = 0
    for value in region.nodes:
        node = value.producer
        if node is not None and node.op in MOVE_OPS:
            continue  # a Reshape's shape, a ReduceMean's axes: no parameters
        if node is None or node.op == "BatchNormalization":
            total += 0 if node is None else sum(_constant_size(t) for t in node.inputs[1:3])
            continue
        total += sum(_constant_size(tensor) for tensor in node.inputs[1:])
    return total


def _fused_region(output, region: Region, node_name: str) -> FusedRegion:
    term = region.term
    return FusedRegion(
        pattern=classify_region(region.kinds, region.kernels, region.branches,
                                region.has_identity, region.has_sub),
        output=output.name, module=node_name,
        nodes=tuple(v.producer.name or v.var.name for v in region.nodes if v.producer),
        ops=tuple(sorted(Counter(c for c in map(_category, region.nodes) if c).items())),
        params_before=_region_params(region),
        params_after=term.weight.numel() + (0 if term.bias is None else term.bias.numel()))


def _fusion_pass(graph: gs.Graph, report: FusionReport) -> int:
    view = OnnxView(graph)
    report.skipped = []
    builder = RegionBuilder(view, report)
    builder.walk()
    emit, partial_sums = select_rewrites(view, builder,
                                         lambda region: _worth_writing(region, view))
    moved_sources: dict = {}
    names = _Names(graph)
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
    folded = [value for _, region in emit for value in region.nodes]
    folded += [value for partial in partial_sums for value in partial.inner]
    folded += [value for partial in partial_sums for term, _ in partial.terms
               if isinstance(term, Region) for value in term.nodes]
    _freeze_shape_reads(view, folded)
    if emit or partial_sums:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return len(emit) + len(partial_sums)


def _fold_constants(graph: gs.Graph, reads_unknown_sizes: bool = False) -> int:
    """Nodes that compute constants become initializers: ``Constant`` nodes, and shape
    arithmetic on static shapes (``Shape`` of a tensor whose sizes the graph proves, then
    ``Gather`` / ``Concat`` / ``Mul`` ... as :func:`constant_value` evaluates them; a
    symbolic dim is never read). Values above ``_FOLD_LIMIT`` elements are left as they
    are, as are graph outputs. Returns how many nodes were folded; with
    ``reads_unknown_sizes``, only how many of them a node reads whose output sizes the
    graph does not know (shape inference may know them now)."""
    outputs = {id(tensor) for tensor in graph.outputs}
    folded = informative = 0
    for node in graph.nodes:  # (in topological order: a folded value is then one Constant)
        if node.op not in _FOLDED_OPS and node.op not in ("Constant", "Shape") \
                or len(node.outputs) != 1 or id(node.outputs[0]) in outputs \
                or (node.op != "Shape" and not all(map(_small_constant, node.inputs))):
            continue
        tensor = node.outputs[0]
        value = constant_value(tensor)
        if value is None or value.size > _FOLD_LIMIT or not _fits(tensor, value):
            continue
        informative += reads_unknown_sizes and any(
            not _static(out) for reader in tensor.outputs for out in reader.outputs)
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
        not _is_size(d) or d == n for d, n in zip(shape, value.shape)))


_INT64_MAX_ISH = 2**62  # a Slice end at least this large reaches the end of any axis


def _no_op(node: gs.Node, view: OnnxView) -> bool:
    """Whether ``node`` returns its first input unchanged, for every input the graph
    admits: ``Identity``, inference ``Dropout``, a ``Pad`` of zeros, a ``Slice`` over whole
    axes, a ``Transpose`` by the identity permutation, a reshape-like move to the sizes it
    was given (``view(B, -1, H, W)`` of a ``(B, C, H, W)`` tensor, proven by
    :mod:`reparam_fx.onnx_moves`' size algebra)."""
    if len(node.outputs) != 1 or not node.inputs:
        return False
    op, x = node.op, node.inputs[0]
    if op == "Identity":  # (also of a constant: TorchScript's shared weights)
        return True
    if not isinstance(x, gs.Variable):
        return False
    if op == "Dropout" and _inference_dropout(node, view):
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
        known = _is_size(size)
        if not (int(start) == 0 or (known and int(start) <= -size)):
            return False
        if not (int(end) >= _INT64_MAX_ISH or (known and int(end) >= size)):
            return False
    return True


def _drop_no_ops(graph: gs.Graph) -> int:
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
    if not _is_size(size):
        return None
    start, end = (int(a.reshape(-1)[0]) for a in args[:2])
    start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
    return node.inputs[0], axis, start, end


def _merge_slices(graph: gs.Graph) -> int:
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
    names, removed = _Names(graph), 0
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


# ---- public entry points ---------------------------------------------------------------

def model_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def _op_histogram(ops) -> Counter:
    return Counter(c for c in map(_CATEGORIES.get, ops) if c)


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
    (:class:`reparam_fx.onnx_io.WeightStore`, the command line's way): fused weights go
    there and the result holds stubs of them, written by
    :func:`reparam_fx.onnx_io.save_streaming`.
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
            stub.external_data.add(key="location", value=_STUB_LOCATION)
        else:
            graph.initializer.append(tensor)
    skeleton = _copy_without(model, "graph")
    skeleton.graph.CopyFrom(graph)
    return skeleton, large


_STUB_LOCATION = "(not read)"


def _is_stub(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is one of :func:`_weightless`'s stubs (its values are elsewhere)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        entry.key == "location" and entry.value == _STUB_LOCATION
        for entry in tensor.external_data)


def _imported_with_shapes(skeleton: onnx.ModelProto) -> gs.Graph:
    """The weightless ``skeleton`` as a graph with inferred shapes and its constants
    folded (:func:`_fold_constants`). Folding can prove sizes shape inference could not
    (TorchScript's ``chunk`` slices up to ``Shape(x)[1] // n * (i + 1)``): while it folds
    something, shapes are inferred again (a few rounds at most)."""
    model = _with_inferred_shapes(skeleton)
    for _ in range(_FOLD_ROUNDS):
        graph = gs.import_onnx(model)
        if not _fold_constants(graph, reads_unknown_sizes=True):
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
    _fold_constants(graph)
    _drop_no_ops(graph)
    for _ in range(MAX_PASSES):
        if not _fusion_pass(graph, report):
            break
        if _fold_constants(graph):  # (shapes of folded values are constants now)
            _drop_no_ops(graph)
    _merge_slices(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    fused = gs.export_onnx(graph)
    fused.ir_version = model.ir_version
    del fused.graph.value_info[:]  # stale intermediate shapes; inputs/outputs are kept
    _keep_signature(fused.graph, model.graph)
    report.ops_after = _op_histogram(node.op for node in graph.nodes)
    report.nodes_after = len(graph.nodes)
    report.params_after = _initializer_params(fused)
    report.skipped.extend(Skipped(n.name, n.op, "no conv or linear next to it to fold into")
                          for n in graph.nodes if n.op == "BatchNormalization"
                          and n.name not in {s.node for s in report.skipped})
    return fused, report


# ---- verification with ONNX Runtime ------------------------------------------------------

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
    from reparam_fx.onnx_io import load_weightless
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

    worst, scale = 0.0, 0.0
    for a, b in zip(run(reference), run(candidate)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise VerificationError(f"output shapes differ: {a.shape} vs {b.shape}")
        if a.size:
            worst = max(worst, float(np.abs(a - b).max()))
            scale = max(scale, float(np.abs(a).max()))
    error = worst / scale if scale > 0 else worst
    if not error <= rtol:
        raise VerificationError(f"fused model differs from the reference: relative error "
                                f"{error:.3e} > rtol {rtol:.1e} (ONNX Runtime)")
    return error
