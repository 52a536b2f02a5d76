"""What one ONNX node computes, as a :mod:`reparam_fx.core.affine` term of its input(s).

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
    Transpose, Reshape, Flatten,     moves (:mod:`reparam_fx.onnx.moves`): a pointwise op
    Squeeze, Unsqueeze, ReduceMean,  commutes with them while they keep the channel axis
    GlobalAveragePool                whole, so the ops around them fold together

:func:`interpret` returns a ``Unary`` / ``Sum`` / ``Layout`` / ``Refused`` of
:mod:`reparam_fx.core.regions`, or None for a node it does not read.
"""

from __future__ import annotations


import numpy as np
import onnx_graphsurgeon as gs
import torch

from reparam_fx.core import affine
from reparam_fx.core.affine import NotExact
from reparam_fx.onnx.moves import MOVE_OPS, interpret_move
from reparam_fx.core.regions import Refused, Sum, Unary
from reparam_fx.onnx.view import OnnxView, constant_value, is_size, is_tensor, stored_weight
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


def interpret(node: gs.Node, view: OnnxView):
    op, inputs = node.op, node.inputs
    if len(node.outputs) != 1 and op not in ("Dropout", "BatchNormalization"):
        return None
    if op in MOVE_OPS:
        return interpret_move(node, view.sizes, constant_value) if is_tensor(inputs[0]) \
            else None
    if op == "Conv":
        stored = stored_weight(inputs[1]) if len(inputs) > 1 else None
        bias = constant_value(inputs[2]) if len(inputs) > 2 else None
        if stored is None or (len(inputs) > 2 and bias is None) or not is_tensor(inputs[0]):
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
        if any(v is None for v in values) or not is_tensor(inputs[0]):
            return None
        scale, bias, mean, var = (torch.from_numpy(v.copy()) for v in values)
        rank = view.rank(inputs[0])
        axis = 1 - rank if rank else "bn"
        return Unary(inputs[0], affine.batchnorm(mean, var, scale, bias,
                                                 float(node.attrs.get("epsilon", 1e-5))),
                     "bn", axis)
    if op in ("Identity",) or (op == "Dropout" and inference_dropout(node, view)):
        return Unary(inputs[0], affine.identity(), "identity", None) if is_tensor(inputs[0]) else None
    if op == "Dropout":
        return Refused("Dropout in training mode")
    if op in ("Add", "Sub", "Mul", "Div"):
        return _arithmetic(node, view)
    if op == "Neg" and is_tensor(inputs[0]):
        return Unary(inputs[0], affine.channel_affine(-1.0), "scale", None)
    if op == "AveragePool":
        return _average_pool(node, view)
    if op == "Pad":
        return _pad(node)
    if op == "Gemm":
        return _gemm(node)
    if op == "MatMul":
        stored = stored_weight(inputs[1])
        if stored is None or stored[0].dim() != 2 or not is_tensor(inputs[0]):
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


def inference_dropout(node, view) -> bool:
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
    if node.op in ("Add", "Sub") and is_tensor(a) and is_tensor(b):
        return Sum([(a, 1.0), (b, 1.0 if node.op == "Add" else -1.0)])
    if is_tensor(a) and const_b is not None:
        tensor, constant = a, const_b
    elif is_tensor(b) and const_a is not None and node.op in ("Add", "Mul"):
        tensor, constant = b, const_a
    elif is_tensor(b) and const_a is not None and node.op == "Sub":  # c - x
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
    if not is_tensor(x):
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
        if not is_size(channels):
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
    stored = stored_weight(b)
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if stored is None or stored[0].dim() != 2 or not is_tensor(a) or node.attrs.get("transA", 0):
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

