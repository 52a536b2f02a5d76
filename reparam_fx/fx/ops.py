"""What one torch.fx node computes, as an :mod:`reparam_fx.core.affine` term of its input(s).

:func:`interpret` maps a node to

- ``Unary(input, term, ...)``: ``node == term(input)`` (conv, transposed conv, BatchNorm,
  linear, average pooling, zero padding, identity/dropout, a per-channel constant ``*``,
  ``/``, ``+``, ``-``), or
- ``Sum([(a, 1), (b, -1), ...])``: ``node == a - b + ...`` of tensors, or
- ``Refused(reason)``: it looks foldable but is not (BatchNorm in training mode, a
  ``count_include_pad=False`` pool, an asymmetric pad, a conv whose ``forward`` was
  replaced ...), or
- ``None``: anything else (activations, reshapes, ...).

Module forms (``nn.Conv2d``...), functional forms (``F.conv2d`` on constant weights,
``F.batch_norm``, ``torch.add``, ``operator.iadd``, tensor methods like ``add_``) and aten
forms (``aten.conv2d``, ``aten.convolution``, ``aten.batch_norm`` (export's training IR),
``_native_batch_norm_legit_no_training`` (core ATen), ``aten.add_.Tensor``, ``aten.addmm``
...) map to the same terms. A module is read by its class only when it runs its class's
standard ``forward``: not a subclass that overrides it, not an instance whose ``forward``
was replaced, not one with hooks. BatchNorm is read as a family: every ``_BatchNorm`` that
runs torch's own forward (``SyncBatchNorm`` too: in eval mode it is ``F.batch_norm`` on its
running statistics, like ``BatchNorm2d``; see :func:`.capture.standard_batchnorm`). Weights may be computed in ``forward`` from parameters
alone (:meth:`GraphFacts.constant`).

Length: about 670 lines, one table: every form of every op the torch frontend reads
(module, function, method, aten overload), a few lines each, the forms of one op side by
side so that they stay alike.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from reparam_fx.core import affine
from reparam_fx.core.affine import NotExact
from reparam_fx.fx.capture import (has_global_hooks, has_hooks, replaced_forward,
                                   standard_batchnorm)
from reparam_fx.fx.facts import GraphFacts
from reparam_fx.fx.moves import interpret_move
from reparam_fx.fx.values import hashable_in, schema_name, tensor_shape
from reparam_fx.core.regions import Refused, Sum, Unary

aten = torch.ops.aten


def _bind_schema(node: torch.fx.Node) -> dict:
    """An aten op's arguments by its schema's names (positional or keyword), with the
    schema's defaults filled in."""
    bound = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args):
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


def _bind(node: torch.fx.Node, names: tuple[str, ...], defaults: dict) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


# ---- ops: what one node does, as a term ----------------------------------------------

_VALUE_PRESERVING_METHODS = {"contiguous", "clone"}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_FUNCTIONAL_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_ATEN_CONVS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_TRANSPOSED_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                    "dilation")
_TRANSPOSED_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0,
                        "groups": 1, "dilation": 1}
_FUNCTIONAL_TRANSPOSED = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_ATEN_TRANSPOSED = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
              "divisor_override")
_POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                  "divisor_override": None}
_FUNCTIONAL_POOLS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_MODULE_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADD_FUNCTIONS = {operator.add: 1, operator.iadd: 1, torch.add: 1,
                  operator.sub: -1, operator.isub: -1, torch.sub: -1}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}


class _Dynamic(Exception):
    """An op argument is computed at run time (e.g. from ``x.size()``): not foldable."""


def _tuple(value, n: int) -> tuple[int, ...]:
    """``value`` as ``n`` static ints; raises :class:`_Dynamic` for graph values."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise _Dynamic
    return items * n if len(items) == 1 else items


def _same_padding(padding, kernel, dilation) -> tuple[int, ...] | None:
    """Explicit symmetric padding for 'valid' / 'same' (None when 'same' is asymmetric)."""
    if padding == "valid":
        return (0,) * len(kernel)
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 for t in total):
        return None
    return tuple(t // 2 for t in total)


def _own_forward(module: nn.Module, base: type) -> bool:
    """True if ``module`` runs ``base``'s forward: not a subclass that overrides it, not an
    instance whose ``forward`` was replaced (such modules are opaque)."""
    return isinstance(module, base) and type(module).forward is base.forward \
        and not replaced_forward(module)


def _constant_weights(facts, weight_arg, bias_arg):
    """``(weight, bias)`` as constants; ``(None, None)`` when either is computed at run time."""
    weight = facts.constant(weight_arg)
    bias = facts.constant(bias_arg) if bias_arg is not None else None
    if weight is None or (bias_arg is not None and bias is None):
        return None, None
    return weight, bias


def _computed(facts, op, bound: dict):
    """Mark ``op`` as reading weights computed in ``forward`` (precomputing them is a gain)."""
    if isinstance(op, Unary) and (facts.is_computed_constant(bound.get("weight"))
                                  or facts.is_computed_constant(bound.get("bias"))):
        op.computed = True
    return op


def _matmul_as_linear(node, facts, name):
    """Core ATen's linear: ``addmm(b, x, W.t())`` / ``mm(x, W.t())`` on a 2-D ``x``."""
    a = _bind_schema(node)
    if name == "addmm" and (a.get("beta", 1) != 1 or a.get("alpha", 1) != 1):
        return None
    x, transposed = a["mat1" if name == "addmm" else "self"], a["mat2"]
    weight_t = facts.constant(transposed)
    bias = facts.constant(a["self"]) if name == "addmm" else None
    if weight_t is None or weight_t.dim() != 2 or (name == "addmm" and bias is None):
        return None
    if facts.rank(x) != 2 or (bias is not None and bias.dim() > 1):
        return None
    if bias is not None and bias.numel() not in (1, weight_t.shape[1]):
        return None
    bias = None if bias is None else bias.expand(weight_t.shape[1])
    return Unary(x, affine.linear(weight_t.t(), bias), "linear", -1, dtype=weight_t.dtype)


def _batched_matmul_as_linear(node, facts):
    """Core ATen's linear on a 3-D ``x``: ``bmm(x, W.t().expand(B, ...))``: the same
    weight in every batch."""
    x, expanded = node.args[0], node.args[1]
    weights = facts.constant(expanded)
    if weights is None or weights.dim() != 3 or facts.rank(x) != 3 \
            or not bool((weights == weights[:1]).all()):
        return None
    weight_t = weights[0]
    return Unary(x, affine.linear(weight_t.t(), None), "linear", -1, dtype=weight_t.dtype)


def _conv_op(facts, input_node, weight, bias, stride, padding, dilation, groups, spatial,
             padding_mode="zeros"):
    if weight is None:
        return None
    if weight.dim() != spatial + 2:
        return Refused("conv weight of unexpected rank")
    kernel = tuple(weight.shape[2:])
    dilation = _tuple(dilation, spatial)
    groups = _tuple(groups, 1)[0]
    pads = None  # (before, after) per dim where they differ
    if isinstance(padding, str):
        padding = _same_padding(padding, kernel, dilation)
        if padding is None:  # an even kernel: PyTorch pads d(k-1) // 2 before, the rest after
            pads = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                         for k, d in zip(kernel, dilation))
    if pads is None:
        pads = tuple((p, p) for p in _tuple(padding, spatial))
    extra_nodes = ()
    pad = _asymmetric_pad_before(facts, input_node, spatial)
    if pad is not None and padding_mode == "zeros":  # F.pad(x, (0, 1, 0, 1)) then conv
        input_node, extra_nodes = pad[0], (input_node,)
        pads = tuple((a + c, b + d) for (a, b), (c, d) in zip(pads, pad[1]))
    if any(before != after for before, after in pads):
        if padding_mode != "zeros":
            return Refused(f"an asymmetric padding with padding_mode={padding_mode!r}")
        try:
            term = affine.asymmetric_conv(weight, bias, _tuple(stride, spatial), pads,
                                          dilation, groups)
        except NotExact as reason:
            return Refused(str(reason))
    else:
        term = affine.conv(weight, bias, _tuple(stride, spatial),
                           tuple(before for before, _ in pads), dilation, groups, padding_mode)
    return Unary(input_node, term, "conv", -(spatial + 1), dtype=weight.dtype,
                 extra_nodes=extra_nodes)


def _may_pad(node: torch.fx.Node, facts) -> bool:
    """A cheap first look before reading ``node`` as a pad: ``F.pad``, ``aten.pad`` /
    ``constant_pad_nd``, a padding method or a constant-padding module."""
    if node.op == "call_module":
        return isinstance(facts.modules.get(node.target), nn.modules.padding._ConstantPadNd)
    name = node.target if node.op == "call_method" else \
        schema_name(node.target) or getattr(node.target, "__name__", "")
    return name in ("pad", "constant_pad_nd")


def _asymmetric_pad_before(facts, node, spatial: int):
    """``(input, ((before, after), ...))`` if ``node`` is an asymmetric zero pad of the
    last ``spatial`` dims (``F.pad(x, (0, 1, 0, 1))``, TF-"same" padding with static sizes,
    core ATen's form of an even-kernel ``padding='same'``) whose only reader is the conv
    after it, which then pads its input itself."""
    if not isinstance(node, torch.fx.Node) or node.op == "placeholder" \
            or len(facts.value_users.get(node, ())) != 1 or node in facts.mutated \
            or node in facts.metadata_users or not _may_pad(node, facts):
        return None
    op = interpret(node, facts)
    if not isinstance(op, Refused) or op.asymmetric_pad is None:
        return None
    source, pairs = op.asymmetric_pad
    if len(pairs) > spatial:
        return None
    return source, ((0, 0),) * (spatial - len(pairs)) + tuple(pairs)


def _conv_transpose_op(input_node, weight, bias, stride, padding, output_padding, dilation,
                       groups, spatial, padding_mode="zeros"):
    if weight is None or weight.dim() != spatial + 2:
        return None
    if padding_mode != "zeros":
        return Refused(f"transposed conv with padding_mode={padding_mode!r}")
    term = affine.conv_transpose(weight, bias, _tuple(stride, spatial), _tuple(padding, spatial),
                                 _tuple(output_padding, spatial), _tuple(dilation, spatial),
                                 _tuple(groups, 1)[0])
    return Unary(input_node, term, "conv", -(spatial + 1), dtype=weight.dtype)


def _batchnorm_op(facts, input_node, mean, var, weight, bias, eps, training, extra_nodes=()):
    """BatchNorm normalises axis 1: the channel axis of a term only for a proven rank."""
    if training:
        return Refused("BatchNorm in training mode uses batch statistics")
    if mean is None or var is None:
        return Refused("BatchNorm without running statistics (track_running_stats=False) "
                        "normalises with batch statistics")
    rank = facts.rank(input_node)
    axis = 1 - rank if rank else "bn"  # "bn": axis 1 of a rank not proven
    return Unary(input_node, affine.batchnorm(mean, var, weight, bias, eps), "bn", axis,
                 dtype=mean.dtype,
                  extra_nodes=extra_nodes)


def _batchnorm_module_op(facts, input_node, module):
    """A BatchNorm module of any class (``BatchNorm1d/2d/3d``, lazy, ``SyncBatchNorm``, a
    subclass): read as one when it runs torch's own forward, which in eval mode is
    ``F.batch_norm`` on its running statistics for every one of them."""
    if not standard_batchnorm(module):
        where = "its instance replaces" if replaced_forward(module) else "its class overrides"
        return Refused(f"{type(module).__name__}: {where} BatchNorm's forward, so what it "
                       "computes is not read from its class")
    if any(isinstance(t, torch.nn.parameter.UninitializedTensorMixin)
           for t in (module.weight, module.running_mean)):
        return Refused(f"{type(module).__name__} is not initialised: run the model once")
    return _batchnorm_op(facts, input_node, module.running_mean, module.running_var,
                         module.weight, module.bias, module.eps, module.training)


def _pool_op(input_node, kernel, stride, padding, ceil_mode, count_include_pad, divisor,
             spatial):
    kernel = _tuple(kernel, spatial)
    stride = kernel if stride in (None, [], ()) else _tuple(stride, spatial)
    padding = _tuple(padding, spatial)
    if ceil_mode:
        return Refused("average pooling with ceil_mode=True is not a conv")
    if divisor is not None:
        return Refused("average pooling with divisor_override is not folded")
    if any(padding) and not count_include_pad:
        return Refused("average pooling with count_include_pad=False divides the border "
                        "by fewer taps: not a conv")
    return Unary(input_node, lambda channels: affine.avg_pool(channels, kernel, stride, padding),
                  "avgpool", -(spatial + 1))


def _pad_op(input_node, pad, mode, value):
    if mode != "constant" or (value not in (None, 0, 0.0)):
        return None
    pad = list(_tuple(pad, 1))
    if len(pad) % 2:
        return None
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)][::-1]  # outermost first
    if any(a < 0 or b < 0 for a, b in pairs):
        return Refused("negative zero padding has no conv equivalent")
    if any(a != b for a, b in pairs):
        return Refused("an asymmetric zero padding is a conv's padding only right before it",
                       asymmetric_pad=(input_node, tuple(pairs)))
    return Unary(input_node, affine.zero_pad(tuple(a for a, _ in pairs)), "pad",
                  -(len(pairs) + 1))


def _border_fill_op(node, fill):  # noqa: ARG001 - the node is the fill's output
    """Zero padding, then its whole border set to one value per channel: padding with
    that value (DiverseBranchBlock's BNAndPadLayer writes BN(0) there)."""
    return Unary(fill.source, affine.zero_pad(fill.padding, fill.value), "pad",
                 -(len(fill.padding) + 1), extra_nodes=fill.writers)


def _crop_op(facts, node, index):
    """``x[..., c:-c]`` / ``x[:, :, c:-c, :]``: cropping is zero padding by ``-c`` on those
    dims (exact before a conv that does not pad them, and after any conv)."""
    x = node.args[0]
    items = index if isinstance(index, tuple) else (index,)
    if any(facts.is_inplace(u) and u.args and u.args[0] is node for u in node.users):
        return None  # a view written through: not a value of its own
    if not isinstance(x, torch.fx.Node) or x in facts.scalars or \
            not all(isinstance(i, slice) or i is Ellipsis for i in items) or \
            sum(i is Ellipsis for i in items) > 1:
        return None
    if Ellipsis in items:
        head, tail = items[:items.index(Ellipsis)], items[items.index(Ellipsis) + 1:]
    else:
        head, tail = (), items
    if any(i != slice(None) for i in head):
        return None
    crops = []
    for item in tail:
        if item == slice(None):
            crops.append(0)
        elif isinstance(item.start, int) and item.start > 0 and item.stop == -item.start \
                and item.step in (None, 1):
            crops.append(-item.start)
        else:
            return None
    if Ellipsis not in items:  # x[:, :, 1:-1]: counted from the front, so the rank must be known
        rank = facts.rank(x)
        if rank is None or len(crops) > rank:
            return None
        crops = crops + [0] * (rank - len(crops))  # the dims not indexed are whole
    while crops and crops[0] == 0:
        crops.pop(0)
    if not crops:
        return Unary(x, affine.identity(), "identity", None)
    return Unary(x, affine.zero_pad(tuple(crops)), "crop", None)


def _aten_slice_op(facts, node):
    """``aten.slice.Tensor(x, dim, c, -c)``: a crop of one dim (see :func:`_crop_op`)."""
    a = _bind_schema(node)
    x, dim, start, end, step = a["self"], a["dim"], a.get("start"), a.get("end"), a.get("step", 1)
    shape = tensor_shape(x)
    start = 0 if start is None else start
    if shape is None or not all(isinstance(v, int) for v in (dim, step, start)) or step != 1:
        return None
    size = shape[dim]  # a SymInt in a dynamic-shape export: only a negative end is a crop
    whole = end is None or (isinstance(end, int) and end >= 2 ** 62)
    if start == 0 and whole:
        return Unary(x, affine.identity(), "identity", None)
    if not isinstance(end, int) or start <= 0:
        return None
    if end < 0:
        if end != -start:
            return None
    elif not (isinstance(size, int) and end == size - start):
        return None
    crops = [0] * len(shape)
    crops[dim] = -start
    while crops[0] == 0:
        crops.pop(0)
    return Unary(x, affine.zero_pad(tuple(crops)), "crop", None)


def _scale_op(facts, tensor_node, constant, *, invert=False, shift=False, coeff=1.0):
    """``x * c``, ``x / c``, ``x + c``, ``x - c`` with a constant ``c`` broadcast per channel."""
    value = constant.detach().to(torch.float64)
    if invert:
        if not bool((value != 0).all()):
            return Refused("division by a constant containing zeros")
        value = 1.0 / value
    shape = value.shape
    wide = [i for i, size in enumerate(shape) if size != 1]
    if len(wide) > 1:
        return Refused("constant varies along more than one axis: not per-channel")
    axis = (wide[0] - len(shape)) if wide else None
    vector = value.reshape(-1) if wide else value.reshape(())
    term = (affine.channel_affine(1.0, coeff * vector) if shift
            else affine.channel_affine(vector))
    return Unary(tensor_node, term, "scale", axis, const_rank=value.dim(),
                 dtype=constant.dtype if constant.dim() else None)  # (0-d: no promotion)


def _arith_op(facts, node, a, b, kind, coeff=1.0):
    """Binary arithmetic: two tensors -> Sum; tensor and constant -> Unary."""
    const_a, const_b = facts.constant(a), facts.constant(b)
    a_is_tensor = isinstance(a, torch.fx.Node) and const_a is None
    b_is_tensor = isinstance(b, torch.fx.Node) and const_b is None
    if kind == "add":
        if a_is_tensor and b_is_tensor:
            return Sum([(a, 1.0), (b, coeff)])
        if a_is_tensor and const_b is not None:
            return _scale_op(facts, a, const_b, shift=True, coeff=coeff)
        if b_is_tensor and const_a is not None:  # c + k*x (or c - x)
            op = _scale_op(facts, b, const_a, shift=True)
            if isinstance(op, Unary) and coeff != 1.0:
                op.term = affine.compose(affine.channel_affine(coeff), op.term)
            return op
        return None
    if kind == "mul":
        if a_is_tensor and const_b is not None:
            return _scale_op(facts, a, const_b)
        if b_is_tensor and const_a is not None:
            return _scale_op(facts, b, const_a)
        return None
    if kind == "div" and a_is_tensor and const_b is not None:
        return _scale_op(facts, a, const_b, invert=True)
    return None


def interpret(node: torch.fx.Node, facts: GraphFacts):
    """What ``node`` computes, as an affine op of its tensor input(s), or None/Refused."""
    if node in facts.scalars or node in facts.fill_writers or facts.constant(node) is not None:
        return None  # shape arithmetic, a border write, a value computed from parameters
    if node.kwargs.get("out") is not None:
        return None  # writes its result into another tensor
    move = interpret_move(node, facts)
    if move is not None:
        return move
    try:
        if node.op == "call_module":
            return _interpret_module(node, facts)
        if node.op == "call_method":
            return _interpret_method(node, facts)
        if node.op == "call_function":
            if isinstance(node.target, torch._ops.OpOverload) or node.target is operator.getitem:
                return _interpret_aten(node, facts)
            return _interpret_function(node, facts)
    except _Dynamic:
        return Refused("an argument (kernel size, stride, padding ...) is computed at run "
                        "time")
    return None


def _interpret_module(node, facts):
    module = facts.modules.get(node.target)
    x = node.args[0] if node.args else None
    if not isinstance(x, torch.fx.Node) or len(node.args) != 1 or node.kwargs:
        return None
    if module is None:
        return None
    # Forward (pre-)hooks, its own or global, can change what the module computes (e.g.
    # legacy weight_norm recomputes ``.weight`` in a pre-hook): its attributes don't say.
    if has_hooks(module) or has_global_hooks():
        return Refused("the module has forward hooks")
    if replaced_forward(module) and type(module).__module__.startswith("torch.nn"):
        return Refused(f"{type(module).__name__}.forward was replaced on the instance: "
                       "not read as a plain one")
    for base, spatial in ((nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3)):
        if _own_forward(module, base):
            return _conv_transpose_op(x, module.weight, module.bias, module.stride,
                                      module.padding, module.output_padding, module.dilation,
                                      module.groups, spatial, module.padding_mode)
    for base, spatial in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)):
        if _own_forward(module, base):
            return _conv_op(facts, x, module.weight, module.bias, module.stride, module.padding,
                            module.dilation, module.groups, spatial, module.padding_mode)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _batchnorm_module_op(facts, x, module)
    if _own_forward(module, nn.Linear):
        return Unary(x, affine.linear(module.weight, module.bias), "linear", -1,
                     dtype=module.weight.dtype)
    if type(module) is nn.Identity:
        return Unary(x, affine.identity(), "identity", None)
    if isinstance(module, nn.modules.dropout._DropoutNd) and type(module).forward in (
            nn.Dropout.forward, nn.Dropout1d.forward, nn.Dropout2d.forward, nn.Dropout3d.forward):
        if module.training and module.p > 0:
            return Refused("Dropout in training mode")
        return Unary(x, affine.identity(), "identity", None)
    for base, spatial in _MODULE_POOLS.items():
        if _own_forward(module, base):
            return _pool_op(x, module.kernel_size, module.stride, module.padding,
                            module.ceil_mode, module.count_include_pad,
                            getattr(module, "divisor_override", None), spatial)
    if isinstance(module, nn.modules.padding._ConstantPadNd) and type(module).forward is \
            nn.modules.padding._ConstantPadNd.forward:
        return _pad_op(x, module.padding, "constant", module.value)
    return None


def _interpret_method(node, facts):
    name = node.target
    self_arg = node.args[0] if node.args else None
    if name in _VALUE_PRESERVING_METHODS and len(node.args) == 1 and not node.kwargs:
        return Unary(self_arg, affine.identity(), "identity", None)
    if name == "neg" and len(node.args) == 1:
        return Unary(self_arg, affine.channel_affine(-1.0), "scale", None)
    base = name.rstrip("_")
    if base in ("add", "sub", "mul", "div") and len(node.args) == 2:
        if base == "div" and node.kwargs.get("rounding_mode") is not None:
            return None
        alpha = node.kwargs.get("alpha", 1)
        if set(node.kwargs) - {"alpha"}:
            return None
        if base in ("add", "sub"):
            return _arith_op(facts, node, self_arg, node.args[1], "add",
                             coeff=alpha * (1 if base == "add" else -1))
        return _arith_op(facts, node, self_arg, node.args[1], base)
    return None


def _interpret_function(node, facts):
    target = node.target
    if hashable_in(target, _FUNCTIONAL_CONVS):
        a = _bind(node, _CONV_ARGS, _CONV_DEFAULTS)
        weight, bias = _constant_weights(facts, a["weight"], a["bias"])
        if weight is None:
            return None
        return _computed(facts, _conv_op(facts, a["input"], weight, bias, a["stride"],
                                         a["padding"], a["dilation"], a["groups"],
                                         _FUNCTIONAL_CONVS[target]), a)
    if hashable_in(target, _FUNCTIONAL_TRANSPOSED):
        a = _bind(node, _TRANSPOSED_ARGS, _TRANSPOSED_DEFAULTS)
        weight, bias = _constant_weights(facts, a["weight"], a["bias"])
        if weight is None:
            return None
        return _computed(facts, _conv_transpose_op(
            a["input"], weight, bias, a["stride"], a["padding"], a["output_padding"],
            a["dilation"], a["groups"], _FUNCTIONAL_TRANSPOSED[target]), a)
    if target is F.batch_norm:
        a = _bind(node, ("input", "running_mean", "running_var", "weight", "bias", "training",
                         "momentum", "eps"),
                  {"running_mean": None, "running_var": None, "weight": None, "bias": None,
                   "training": False, "momentum": 0.1, "eps": 1e-5})
        tensors = {k: facts.constant(a[k]) if a[k] is not None else None
                   for k in ("running_mean", "running_var", "weight", "bias")}
        if any(a[k] is not None and tensors[k] is None for k in tensors):
            return None
        return _batchnorm_op(facts, a["input"], tensors["running_mean"], tensors["running_var"],
                             tensors["weight"], tensors["bias"], a["eps"], a["training"])
    if target is F.linear:
        a = _bind(node, ("input", "weight", "bias"), {"bias": None})
        weight, bias = _constant_weights(facts, a["weight"], a["bias"])
        if weight is None:
            return None
        return _computed(facts, Unary(a["input"], affine.linear(weight, bias), "linear", -1,
                                      dtype=weight.dtype), a)
    if hashable_in(target, _FUNCTIONAL_POOLS):
        a = _bind(node, _POOL_ARGS, _POOL_DEFAULTS)
        return _pool_op(a["input"], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                        a["count_include_pad"], a["divisor_override"], _FUNCTIONAL_POOLS[target])
    if target is F.pad:
        if node in facts.border_fills:
            return _border_fill_op(node, facts.border_fills[node])
        a = _bind(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
        return _pad_op(a["input"], a["pad"], a["mode"], a["value"])
    if target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
        a = _bind(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True})
        if a["training"] and a["p"] > 0:
            return Refused("dropout in training mode")
        return Unary(a["input"], affine.identity(), "identity", None)
    if target in (operator.neg, torch.neg):
        return Unary(node.args[0], affine.channel_affine(-1.0), "scale", None)
    if hashable_in(target, _ADD_FUNCTIONS):
        if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
            return None
        coeff = _ADD_FUNCTIONS[target] * node.kwargs.get("alpha", 1)
        return _arith_op(facts, node, node.args[0], node.args[1], "add", coeff)
    if hashable_in(target, _MUL_FUNCTIONS) and len(node.args) == 2 and not node.kwargs:
        return _arith_op(facts, node, node.args[0], node.args[1], "mul")
    if hashable_in(target, _DIV_FUNCTIONS) and len(node.args) == 2 and not node.kwargs:
        return _arith_op(facts, node, node.args[0], node.args[1], "div")
    return None


def _interpret_aten(node, facts):
    if node in facts.border_fills:  # core ATen: the last slice_scatter of the border writes
        return _border_fill_op(node, facts.border_fills[node])
    if node.target is operator.getitem and facts.frontend != "aten":
        return _crop_op(facts, node, node.args[1])
    if node.target is operator.getitem:
        producer, index = node.args
        if (isinstance(producer, torch.fx.Node) and index == 0
                and producer.target is aten._native_batch_norm_legit_no_training.default
                and len(producer.users) == 1):
            x, weight, bias, mean, var, _momentum, eps = producer.args
            tensors = [facts.constant(t) if t is not None else None for t in (mean, var, weight, bias)]
            if tensors[0] is None or tensors[1] is None:
                return None
            return _batchnorm_op(facts, x, *tensors, eps, False, extra_nodes=(producer,))
        return None
    name = node.target._schema.name.split("::")[-1]
    if name in ("add_", "sub_", "mul_", "div_"):  # in-place forms (export's training IR)
        name = name[:-1]
    overload = node.target._overloadname
    args = node.args
    if name in _ATEN_CONVS or name == "convolution" or name in _ATEN_TRANSPOSED:
        if name == "convolution":
            a = _bind(node, ("input", "weight", "bias", "stride", "padding", "dilation",
                             "transposed", "output_padding", "groups"), {})
        elif name in _ATEN_TRANSPOSED:
            a = _bind(node, _TRANSPOSED_ARGS, _TRANSPOSED_DEFAULTS)
            a["transposed"] = True
        else:
            a = _bind(node, _CONV_ARGS, _CONV_DEFAULTS)
        weight, bias = _constant_weights(facts, a["weight"], a["bias"])
        if weight is None:
            return None
        if a.get("transposed"):
            return _computed(facts, _conv_transpose_op(
                a["input"], weight, bias, a["stride"], a["padding"], a["output_padding"],
                a["dilation"], a["groups"], weight.dim() - 2), a)
        return _computed(facts, _conv_op(facts, a["input"], weight, bias, a["stride"],
                                         a["padding"], a["dilation"], a["groups"],
                                         weight.dim() - 2), a)
    if name == "batch_norm":
        a = _bind(node, ("input", "weight", "bias", "running_mean", "running_var", "training",
                         "momentum", "eps", "cudnn_enabled"), {})
        tensors = [facts.constant(a[k]) if a[k] is not None else None
                   for k in ("running_mean", "running_var", "weight", "bias")]
        if (a["running_mean"] is not None and tensors[0] is None) or (
                a["running_var"] is not None and tensors[1] is None):
            return None
        return _batchnorm_op(facts, a["input"], *tensors, a["eps"], a["training"])
    if name == "linear":
        a = _bind_schema(node)
        weight, bias = _constant_weights(facts, a["weight"], a.get("bias"))
        if weight is None:
            return None
        return _computed(facts, Unary(a["input"], affine.linear(weight, bias), "linear", -1,
                                      dtype=weight.dtype), a)
    if name in ("addmm", "mm") and overload == "default":
        return _matmul_as_linear(node, facts, name)
    if name == "bmm" and overload == "default":
        return _batched_matmul_as_linear(node, facts)
    if name == "expand" and overload == "default" and tensor_shape(node) is not None \
            and tensor_shape(node) == tensor_shape(args[0]):
        return Unary(args[0], affine.identity(), "identity", None)  # expands nothing
    if name == "slice" and overload == "Tensor":
        return _aten_slice_op(facts, node)
    if name in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
        a = _bind(node, _POOL_ARGS, _POOL_DEFAULTS)
        return _pool_op(a["input"], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                        a["count_include_pad"], a["divisor_override"], int(name[-2]))
    if name in ("constant_pad_nd", "pad"):
        if node in facts.border_fills:
            return _border_fill_op(node, facts.border_fills[node])
        a = _bind_schema(node)
        return _pad_op(a["self"], a["pad"], a.get("mode", "constant"), a.get("value"))
    if name in ("dropout", "dropout_"):  # (eval mode: writes nothing, in place or not)
        a = _bind_schema(node)
        if a["train"] and a["p"] > 0:
            return Refused("dropout in training mode")
        return Unary(a.get("input", a.get("self")), affine.identity(), "identity", None)
    if name in ("clone", "alias") and len(args) == 1:
        return Unary(args[0], affine.identity(), "identity", None)
    if name == "neg":
        return Unary(args[0], affine.channel_affine(-1.0), "scale", None)
    if name in ("add", "sub") and overload in ("Tensor", "Scalar"):
        a = _bind_schema(node)
        coeff = a.get("alpha", 1) * (1 if name == "add" else -1)
        return _arith_op(facts, node, a["self"], a["other"], "add", coeff)
    if name in ("mul", "div") and overload in ("Tensor", "Scalar") and not node.kwargs:
        return _arith_op(facts, node, args[0], args[1], name)
    return None
