"""What one torch.fx node computes, as an :mod:`reparam_fx.affine` term of its input(s).

:func:`interpret` maps a node to

- ``Unary(input, term, ...)``: ``node == term(input)`` (conv, BatchNorm, linear, average
  pooling, zero padding, identity/dropout, a per-channel constant ``*``, ``/``, ``+``,
  ``-``), or
- ``Sum([(a, 1), (b, -1), ...])``: ``node == a - b + ...`` of tensors, or
- ``Refused(reason)``: it looks foldable but is not (BatchNorm in training mode, a
  ``count_include_pad=False`` pool, an asymmetric pad, ...), or
- ``None``: anything else (activations, reshapes, ...).

Module forms (``nn.Conv2d``...), functional forms (``F.conv2d`` on ``get_attr`` weights,
``F.batch_norm``, ``torch.add``, ``operator.iadd``, tensor methods like ``add_``) and aten
forms (``aten.conv2d``, ``aten.convolution``, ``aten.batch_norm``,
``_native_batch_norm_legit_no_training``, ``aten.add_.Tensor``...) map to the same terms.
Subclasses that override ``forward`` are not trusted to be what their base class is.

:class:`GraphFacts` holds what the graph proves about nodes: constant values (``get_attr``
tensors and pure ops on them), tensor ranks, and values mutated in place.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from reparam_fx import affine
from reparam_fx.regions import Refused, Sum, Unary
from reparam_fx.report import shape_values

if TYPE_CHECKING:
    from reparam_fx.fx import Workspace

aten = torch.ops.aten


# ---- what the graph says about its nodes ---------------------------------------------

def tensor_shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_VALUE_PRESERVING_METHODS = {"contiguous", "clone"}
_PURE_CONSTANT_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "to", "float", "double",
                          "half", "contiguous", "clone", "detach", "neg", "t", "permute",
                          "transpose", "expand", "flatten", "sqrt", "rsqrt", "exp", "abs",
                          "mul", "add", "sub", "div", "__getitem__"}
_PURE_CONSTANT_FUNCTIONS = {operator.neg, operator.mul, operator.add, operator.sub,
                            operator.truediv, operator.getitem, torch.reshape, torch.unsqueeze,
                            torch.squeeze, torch.flatten, torch.sqrt, torch.rsqrt, torch.exp,
                            torch.abs, torch.mul, torch.add, torch.sub, torch.div, torch.neg}


class GraphFacts:
    """Per-pass facts: modules, constant values, ranks and in-place mutations."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.frontend = ws.frontend
        self.modules = ModuleLookup(ws)
        # attribute paths in use: new modules must not be nested under them
        self.attribute_targets = {n.target for n in ws.graph.nodes
                                  if n.op in ("call_module", "get_attr")} | set(ws.added)
        self._constants: dict[torch.fx.Node, torch.Tensor | None] = {}
        self._ranks: dict[torch.fx.Node, int | None] = {}
        self.mutated = self._find_mutated()
        self.scalars = shape_values(ws.graph)  # shape arithmetic: Python ints, not tensors
        self._ops: dict = {}

    # the view reparam_fx.regions walks ---------------------------------------------------
    def values(self):
        return self.ws.graph.nodes

    def users(self, node):
        return node.users

    def inplace_target(self, node):
        return node.args[0] if self.is_inplace(node) else None

    def interpret(self, node):
        if node not in self._ops:
            self._ops[node] = interpret(node, self)
        return self._ops[node]

    def shape(self, node):
        return tensor_shape(node)

    @staticmethod
    def is_value(value) -> bool:
        return isinstance(value, torch.fx.Node)

    def describe(self, node) -> tuple[str, str]:
        if node.op == "call_module":
            return node.name, type(self.modules.get(node.target)).__name__
        if node.op == "call_function":
            return node.name, getattr(node.target, "__name__", str(node.target))
        return node.name, str(node.target)

    # in-place ops --------------------------------------------------------------------
    def is_inplace(self, node: torch.fx.Node) -> bool:
        if node.op == "call_method":
            return node.target.endswith("_") and not node.target.startswith("__")
        if node.op == "call_function":
            if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
                return True
            if isinstance(node.target, torch._ops.OpOverload):
                return node.target._schema.is_mutable
            name = getattr(node.target, "__name__", "")  # torch.relu_, F.elu_, ...
            return name.endswith("_") and not name.startswith("__")
        if node.op == "call_module":
            return getattr(self.modules.get(node.target), "inplace", False) is True
        return False

    def _find_mutated(self) -> set[torch.fx.Node]:
        """Nodes whose value an in-place op changes while another user still reads it."""
        mutated = set()
        for node in self.ws.graph.nodes:
            if self.is_inplace(node) and node.args and isinstance(node.args[0], torch.fx.Node):
                target = node.args[0]
                if len(target.users) > 1:
                    mutated.add(target)
        return mutated

    # constants -----------------------------------------------------------------------
    def constant(self, value) -> torch.Tensor | None:
        """The tensor value of a graph-constant argument (number, get_attr, or pure op on
        constants), else None."""
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return torch.tensor(float(value), dtype=torch.float64)
        if isinstance(value, torch.Tensor):
            return value
        if not isinstance(value, torch.fx.Node):
            return None
        if value not in self._constants:
            self._constants[value] = self._evaluate_constant(value)
        return self._constants[value]

    def _evaluate_constant(self, node: torch.fx.Node) -> torch.Tensor | None:
        if node.op == "get_attr":
            attr = self.ws.resolve(node.target)
            return attr.detach() if isinstance(attr, torch.Tensor) else None
        pure = ((node.op == "call_method" and node.target in _PURE_CONSTANT_METHODS)
                or (node.op == "call_function" and (
                    _hashable_in(node.target, _PURE_CONSTANT_FUNCTIONS)
                    or _is_pure_aten(node.target))))
        if not pure:
            return None
        resolved = []
        for arg in node.args:
            if isinstance(arg, torch.fx.Node):
                tensor = self.constant(arg)
                if tensor is None:
                    return None
                resolved.append(tensor)
            else:
                resolved.append(arg)
        if any(isinstance(v, torch.fx.Node) for v in node.kwargs.values()):
            return None
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    result = getattr(resolved[0], node.target)(*resolved[1:], **node.kwargs)
                else:
                    result = node.target(*resolved, **node.kwargs)
        except Exception:  # noqa: BLE001
            return None
        return result if isinstance(result, torch.Tensor) else None

    # ranks ---------------------------------------------------------------------------
    def rank(self, node) -> int | None:
        """The tensor rank of ``node`` when the graph proves it, else None."""
        if not isinstance(node, torch.fx.Node):
            return None
        if node not in self._ranks:
            self._ranks[node] = None  # guards against cycles through odd graphs
            self._ranks[node] = self._infer_rank(node)
        return self._ranks[node]

    def _infer_rank(self, node: torch.fx.Node) -> int | None:
        shape = tensor_shape(node)
        if shape is not None:
            return len(shape)
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            module = self.modules.get(node.target)
            if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
                return 4 if isinstance(module, nn.BatchNorm2d) else 5
            if type(module) is nn.Flatten and module.end_dim == -1 and module.start_dim >= 0:
                return module.start_dim + 1
            if isinstance(module, (nn.Linear, nn.BatchNorm1d, nn.Identity, nn.Dropout,
                                   nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid)):
                return self.rank(first)
            return None
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if end == -1 and isinstance(start, int) and start >= 0:
                return start + 1
        if name in ("view", "reshape") and node.op == "call_method":
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            return len(sizes)
        if name in ("linear", "batch_norm", "dropout", "relu", "gelu"):
            return self.rank(first)
        return None


class ModuleLookup:
    """``modules.get(target)`` over a workspace, as the report's op counter expects."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    def get(self, target, default=None):
        found = self.ws.module(target)
        return default if found is None else found

    def __getitem__(self, target):
        return self.ws.module(target)


def _hashable_in(target, table) -> bool:
    try:
        return target in table
    except TypeError:
        return False


_PURE_ATEN = {"view", "reshape", "unsqueeze", "squeeze", "permute", "t", "expand", "clone",
              "alias", "_to_copy", "mul", "add", "sub", "div", "neg", "sqrt", "rsqrt"}


def _is_pure_aten(target) -> bool:
    return (isinstance(target, torch._ops.OpOverload)
            and target._schema.name.split("::")[-1] in _PURE_ATEN
            and not target._schema.is_mutable)


# ---- ops: what one node does, as a term ----------------------------------------------

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


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_FUNCTIONAL_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_ATEN_CONVS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
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
    """True if ``module`` runs ``base``'s forward (subclasses that override it are opaque)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _conv_op(facts, input_node, weight, bias, stride, padding, dilation, groups, spatial,
             padding_mode="zeros"):
    if weight is None:
        return None
    if weight.dim() != spatial + 2:
        return Refused("conv weight of unexpected rank")
    kernel = tuple(weight.shape[2:])
    dilation = _tuple(dilation, spatial)
    groups = _tuple(groups, 1)[0]
    if isinstance(padding, str):
        padding = _same_padding(padding, kernel, dilation)
        if padding is None:
            return Refused("padding='same' with an even kernel is asymmetric")
    term = affine.conv(weight, bias, _tuple(stride, spatial), _tuple(padding, spatial),
                       dilation, groups, padding_mode)
    return Unary(input_node, term, "conv", -(spatial + 1))


def _batchnorm_op(facts, input_node, mean, var, weight, bias, eps, training, rank_hint,
                  extra_nodes=()):
    if training:
        return Refused("BatchNorm in training mode uses batch statistics")
    if mean is None or var is None:
        return Refused("BatchNorm without running statistics (track_running_stats=False) "
                        "normalises with batch statistics")
    rank = facts.rank(input_node) or rank_hint
    axis = 1 - rank if rank else "bn"  # "bn": axis 1 of a rank not yet known
    return Unary(input_node, affine.batchnorm(mean, var, weight, bias, eps), "bn", axis,
                  extra_nodes=extra_nodes)


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
    if any(a != b or a < 0 for a, b in pairs):
        return Refused("asymmetric or negative zero padding has no conv equivalent")
    return Unary(input_node, affine.zero_pad(tuple(a for a, _ in pairs)), "pad",
                  -(len(pairs) + 1))


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
    return Unary(tensor_node, term, "scale", axis, const_rank=value.dim())


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
    if node in facts.scalars:
        return None
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


def _has_hooks(module: nn.Module) -> bool:
    """Forward (pre-)hooks, its own or global, can change what the module computes (e.g.
    legacy weight_norm recomputes ``.weight`` in a pre-hook): its attributes don't say."""
    from torch.nn.modules import module as module_globals
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module_globals._global_forward_hooks
                or module_globals._global_forward_pre_hooks)


def _interpret_module(node, facts):
    module = facts.modules.get(node.target)
    x = node.args[0] if node.args else None
    if not isinstance(x, torch.fx.Node) or len(node.args) != 1 or node.kwargs:
        return None
    if module is not None and _has_hooks(module):
        return Refused("the module has forward hooks")
    for base, spatial in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)):
        if _own_forward(module, base):
            return _conv_op(facts, x, module.weight, module.bias, module.stride, module.padding,
                            module.dilation, module.groups, spatial, module.padding_mode)
    for base, rank in ((nn.BatchNorm1d, None), (nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5)):
        if _own_forward(module, base):
            return _batchnorm_op(facts, x, module.running_mean, module.running_var,
                                 module.weight, module.bias, module.eps,
                                 module.training, rank)
    if _own_forward(module, nn.Linear):
        return Unary(x, affine.linear(module.weight, module.bias), "linear", -1)
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
    if _hashable_in(target, _FUNCTIONAL_CONVS):
        spatial = _FUNCTIONAL_CONVS[target]
        a = _bind(node, _CONV_ARGS, _CONV_DEFAULTS)
        weight, bias = facts.constant(a["weight"]), None
        if a["bias"] is not None:
            bias = facts.constant(a["bias"])
            if bias is None:
                return None
        return _conv_op(facts, a["input"], weight, bias, a["stride"], a["padding"],
                        a["dilation"], a["groups"], spatial)
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
                             tensors["weight"], tensors["bias"], a["eps"], a["training"], None)
    if target is F.linear:
        a = _bind(node, ("input", "weight", "bias"), {"bias": None})
        weight = facts.constant(a["weight"])
        bias = facts.constant(a["bias"]) if a["bias"] is not None else None
        if weight is None or (a["bias"] is not None and bias is None):
            return None
        return Unary(a["input"], affine.linear(weight, bias), "linear", -1)
    if _hashable_in(target, _FUNCTIONAL_POOLS):
        a = _bind(node, _POOL_ARGS, _POOL_DEFAULTS)
        return _pool_op(a["input"], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                        a["count_include_pad"], a["divisor_override"], _FUNCTIONAL_POOLS[target])
    if target is F.pad:
        a = _bind(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
        return _pad_op(a["input"], a["pad"], a["mode"], a["value"])
    if target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
        a = _bind(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True})
        if a["training"] and a["p"] > 0:
            return Refused("dropout in training mode")
        return Unary(a["input"], affine.identity(), "identity", None)
    if target in (operator.neg, torch.neg):
        return Unary(node.args[0], affine.channel_affine(-1.0), "scale", None)
    if _hashable_in(target, _ADD_FUNCTIONS):
        if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
            return None
        coeff = _ADD_FUNCTIONS[target] * node.kwargs.get("alpha", 1)
        return _arith_op(facts, node, node.args[0], node.args[1], "add", coeff)
    if _hashable_in(target, _MUL_FUNCTIONS) and len(node.args) == 2 and not node.kwargs:
        return _arith_op(facts, node, node.args[0], node.args[1], "mul")
    if _hashable_in(target, _DIV_FUNCTIONS) and len(node.args) == 2 and not node.kwargs:
        return _arith_op(facts, node, node.args[0], node.args[1], "div")
    return None


def _interpret_aten(node, facts):
    if node.target is operator.getitem:
        producer, index = node.args
        if (isinstance(producer, torch.fx.Node) and index == 0
                and producer.target is aten._native_batch_norm_legit_no_training.default
                and len(producer.users) == 1):
            x, weight, bias, mean, var, _momentum, eps = producer.args
            tensors = [facts.constant(t) if t is not None else None for t in (mean, var, weight, bias)]
            if tensors[0] is None or tensors[1] is None:
                return None
            return _batchnorm_op(facts, x, *tensors, eps, False, None, extra_nodes=(producer,))
        return None
    name = node.target._schema.name.split("::")[-1]
    if name in ("add_", "sub_", "mul_", "div_"):  # in-place forms (export's training IR)
        name = name[:-1]
    overload = node.target._overloadname
    args = node.args
    if name in _ATEN_CONVS or name == "convolution":
        if name == "convolution":
            a = _bind(node, ("input", "weight", "bias", "stride", "padding", "dilation",
                             "transposed", "output_padding", "groups"), {})
            if a["transposed"]:
                return None
        else:
            a = _bind(node, _CONV_ARGS, _CONV_DEFAULTS)
        weight = facts.constant(a["weight"])
        bias = facts.constant(a["bias"]) if a["bias"] is not None else None
        if weight is None or (a["bias"] is not None and bias is None):
            return None
        return _conv_op(facts, a["input"], weight, bias, a["stride"], a["padding"],
                        a["dilation"], a["groups"], weight.dim() - 2)
    if name == "batch_norm":
        a = _bind(node, ("input", "weight", "bias", "running_mean", "running_var", "training",
                         "momentum", "eps", "cudnn_enabled"), {})
        tensors = [facts.constant(a[k]) if a[k] is not None else None
                   for k in ("running_mean", "running_var", "weight", "bias")]
        if (a["running_mean"] is not None and tensors[0] is None) or (
                a["running_var"] is not None and tensors[1] is None):
            return None
        return _batchnorm_op(facts, a["input"], *tensors, a["eps"], a["training"], None)
    if name == "linear":
        a = _bind_schema(node)
        weight = facts.constant(a["weight"])
        bias = facts.constant(a["bias"]) if a.get("bias") is not None else None
        if weight is None or (a.get("bias") is not None and bias is None):
            return None
        return Unary(a["input"], affine.linear(weight, bias), "linear", -1)
    if name in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
        a = _bind(node, _POOL_ARGS, _POOL_DEFAULTS)
        return _pool_op(a["input"], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                        a["count_include_pad"], a["divisor_override"], int(name[-2]))
    if name in ("constant_pad_nd", "pad"):
        a = _bind_schema(node)
        return _pad_op(a["self"], a["pad"], a.get("mode", "constant"), a.get("value"))
    if name == "dropout":
        a = _bind_schema(node)
        if a["train"] and a["p"] > 0:
            return Refused("dropout in training mode")
        return Unary(a["input"], affine.identity(), "identity", None)
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
