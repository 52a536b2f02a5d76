"""The int8 policy's view of a torch.fx graph: which convs and linears it may rewrite,
and how a positive scalar scale passes through every other op.

:func:`linear_site` reads a conv or linear in any of its forms (``nn.Conv2d`` modules,
``F.conv2d`` / ``aten.convolution`` on ``get_attr`` weights, ``nn.Linear``,
``aten.linear``) whose weights are its own, with a getter and a setter for them.
:func:`scale_constraints` fills a :class:`~reparam_fx.core.quantization.ScaleSolver`:
positively homogeneous ops (ReLU, leaky ReLU, pooling, zero padding, reshapes, sums of two
values, products with a constant, a value gated by a sigmoid) tie their values' scales;
every other op, graph inputs and outputs keep scale 1 and say why. Shape reads are not
value uses. The convs and linears themselves constrain nothing: their weights absorb
whatever scales their input and output carry.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from reparam_fx.core.quantization import ScaleSolver, holds_identity

aten = torch.ops.aten

@dataclass
class LinearSite:
    """A conv or linear whose weights this pass may rewrite."""

    node: torch.fx.Node
    input: torch.fx.Node
    get: callable  # () -> (weight, bias or None)
    set: callable  # (weight, bias or None) -> None
    groups: int = 1
    why_no_identity: str | None = "a linear layer"


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUNCTIONAL_CONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_ATEN_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}


def _standard(module: nn.Module, base) -> bool:
    return type(module) in base and "forward" not in module.__dict__ and \
        not (module._forward_hooks or module._forward_pre_hooks)


def _param_access(gm: torch.fx.GraphModule, weight_node, bias_node):
    """get/set for weights held in get_attr nodes (each read by one node only)."""
    def get():
        return (gm.get_parameter(weight_node.target) if _is_param(gm, weight_node.target)
                else _attr(gm, weight_node.target)), \
            (None if bias_node is None else _attr(gm, bias_node.target))

    def put(weight, bias):
        _set_attr(gm, weight_node.target, weight)
        if bias_node is not None:
            _set_attr(gm, bias_node.target, bias)
    return get, put


def _module_access(module: nn.Module):
    """get/set for a conv or linear module's own weight and bias."""
    def get():
        return module.weight, module.bias

    def put(weight, bias):
        with torch.no_grad():
            module.weight.data = weight.to(module.weight.dtype)
            if module.bias is not None:
                module.bias.data = bias.to(module.bias.dtype)
    return get, put


def _attr(gm, target):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _is_param(gm, target) -> bool:
    return isinstance(_attr(gm, target), nn.Parameter)


def _set_attr(gm, target, value: torch.Tensor):
    owner, _, name = target.rpartition(".")
    holder = gm.get_submodule(owner) if owner else gm
    old = getattr(holder, name)
    with torch.no_grad():
        if isinstance(old, nn.Parameter):
            old.data = value.to(old.dtype)
        else:
            setattr(holder, name, value.to(old.dtype))


def _own_get_attr(node, gm=None, uses: GraphUses | None = None) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr" and \
        len(node.users) == 1 and (uses is None or uses.private(gm, node.target))


@dataclass
class GraphUses:
    """What may not be rewritten in place: modules called more than once, attributes
    read by more than one node, and tensors held under more than one name (tied
    weights: scaling one would scale the other)."""

    module_calls: dict
    attribute_reads: dict
    shared: set

    def private(self, gm: torch.fx.GraphModule, *names: str) -> bool:
        """Are the tensors at these qualified names read only where the caller reads them?"""
        for name in names:
            owner, _, attribute = name.rpartition(".")
            if self.attribute_reads.get(name, 0) > 1 or \
                    id(getattr(gm.get_submodule(owner) if owner else gm, attribute)) in self.shared:
                return False
        return True


def graph_uses(gm: torch.fx.GraphModule) -> GraphUses:
    calls: dict = {}
    reads: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            reads[node.target] = reads.get(node.target, 0) + 1
    seen: dict = {}
    for _, tensor in [*gm.named_parameters(remove_duplicate=False),
                      *gm.named_buffers(remove_duplicate=False)]:
        seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    return GraphUses(calls, reads, {key for key, count in seen.items() if count > 1})


def linear_site(gm: torch.fx.GraphModule, node: torch.fx.Node, uses: GraphUses
                ) -> LinearSite | None:
    """The node as a rewritable conv/linear (its weights its own), or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if uses.module_calls.get(node.target, 0) != 1 or len(node.args) != 1 or node.kwargs:
            return None
        names = [f"{node.target}.{name}" for name in ("weight", "bias")
                 if getattr(module, name, None) is not None]
        if any(uses.attribute_reads.get(name) for name in names) or \
                not uses.private(gm, *names):
            return None
        if _standard(module, _CONV_MODULES) and module.padding_mode == "zeros":
            why = holds_identity(tuple(module.weight.shape), module.groups, module.stride,
                                 module.padding, module.dilation)
            return LinearSite(node, node.args[0], *_module_access(module), module.groups, why)
        if _standard(module, (nn.Linear,)):
            return LinearSite(node, node.args[0], *_module_access(module))
        return None
    if node.op != "call_function":
        return None
    args = list(node.args)
    if node.target is aten.convolution.default and not node.kwargs:
        x, weight, bias, stride, padding, dilation, transposed, _, groups = args
    elif node.target in _ATEN_CONVS or node.target in _FUNCTIONAL_CONVS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, args)) | dict(node.kwargs)
        if set(bound) - set(names):
            return None
        x, weight = bound.get("input"), bound.get("weight")
        bias = bound.get("bias")
        spatial = 1 if node.target in (aten.conv1d.default, F.conv1d, torch.conv1d) else \
            3 if node.target in (aten.conv3d.default, F.conv3d, torch.conv3d) else 2
        stride, padding, dilation = (_spatial(bound.get(k, d), spatial) for k, d in
                                     (("stride", 1), ("padding", 0), ("dilation", 1)))
        groups, transposed = bound.get("groups", 1), False
    elif node.target in (aten.linear.default, F.linear, torch.nn.functional.linear):
        names = ("input", "weight", "bias")
        bound = dict(zip(names, args)) | dict(node.kwargs)
        x, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
        if not _own_get_attr(weight, gm, uses) or \
                not (bias is None or _own_get_attr(bias, gm, uses)):
            return None
        get, put = _param_access(gm, weight, bias)
        return LinearSite(node, x, get, put)
    else:
        return None
    if not _own_get_attr(weight, gm, uses) or \
            not (bias is None or _own_get_attr(bias, gm, uses)) or \
            not isinstance(x, torch.fx.Node) or not isinstance(groups, int):
        return None
    get, put = _param_access(gm, weight, bias)
    why = holds_identity(tuple(get()[0].shape), groups, stride, padding, dilation, transposed)
    return LinearSite(node, x, get, put, groups, why)


def _spatial(value, n: int):
    if isinstance(value, str):
        return value
    return list(value) * (n if len(value) == 1 else 1) if isinstance(value, (list, tuple)) \
        else [value] * n


# ops through which a positive scalar passes unchanged (all tensor inputs and the output
# share one scale)
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                        nn.Dropout3d, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                        nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                        nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad2d, nn.Upsample)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu, torch.relu, F.leaky_relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.dropout,
    F.interpolate, torch.flatten, torch.cat, torch.concat, torch.mean, torch.reshape,
    torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
    operator.getitem, torch.max_pool2d, torch.avg_pool1d}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "view", "reshape", "permute", "transpose", "flatten",
                        "contiguous", "clone", "mean", "squeeze", "unsqueeze", "chunk", "split",
                        "view_as", "reshape_as", "expand", "expand_as"}
_HOMOGENEOUS_ATEN = {
    "relu", "relu_", "leaky_relu", "leaky_relu_", "max_pool1d", "max_pool2d",
    "max_pool2d_with_indices", "max_pool3d", "max_pool3d_with_indices", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "_adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d", "mean", "view",
    "reshape", "_unsafe_view", "permute", "transpose", "t", "flatten", "clone", "contiguous",
    "alias", "squeeze", "unsqueeze", "expand", "cat", "concat", "split", "split_with_sizes",
    "chunk", "unbind", "slice", "select", "dropout", "upsample_nearest2d",
    "upsample_bilinear2d", "_to_copy", "detach"}
_ADDS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_SCALES = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
_DIVISIONS = {operator.truediv, operator.itruediv, torch.div}
_SHAPE_READS = {"size", "dim", "numel", "ndimension"}


def _aten_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return None


def _tensors(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def _is_shape_read(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return True
    if node.op == "call_method" and node.target in _SHAPE_READS:
        return True
    name = _aten_name(node.target) if node.op == "call_function" else None
    return name is not None and name.startswith("sym_")


def _constant(arg) -> bool:
    return not isinstance(arg, torch.fx.Node) or arg.op == "get_attr"


def _scale_rule(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """``"tie"`` when every tensor input and the output share a scale; ``None`` when the
    node needs its values unscaled; ``"gate"`` for ``a * b`` with ``b`` unscaled."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if _standard(module, _HOMOGENEOUS_MODULES):
            if isinstance(module, nn.Upsample) and module.mode not in ("nearest", "bilinear",
                                                                      "linear", "trilinear"):
                return None
            return "tie"
        return None
    args = node.args
    if node.op == "call_method":
        if node.target in _HOMOGENEOUS_METHODS:
            return "tie"
        if node.target in ("add", "add_", "sub", "sub_"):
            return "tie" if len(args) == 2 and not _constant(args[1]) and not node.kwargs else None
        if node.target in ("mul", "mul_", "div", "div_"):
            return _product_rule(args, node.target.startswith("div"), node.kwargs)
        return None
    if node.op != "call_function":
        return None
    if node.target in _HOMOGENEOUS_FUNCTIONS:
        if node.target is F.interpolate and node.kwargs.get("mode", "nearest") not in (
                "nearest", "bilinear", "linear", "trilinear"):
            return None
        return "tie"
    if node.target is F.pad or _aten_name(node.target) == "constant_pad_nd":
        value = node.kwargs.get("value", args[3] if node.target is F.pad and len(args) > 3 else
                                args[2] if len(args) > 2 else 0)
        mode = node.kwargs.get("mode", args[2] if node.target is F.pad and len(args) > 2 else
                               "constant")
        return "tie" if mode == "constant" and not value else None
    if node.target in _ADDS:
        return "tie" if len(args) == 2 and not _constant(args[0]) and not _constant(args[1]) \
            and "alpha" not in node.kwargs else None
    if node.target in _SCALES:
        return _product_rule(args, node.target in _DIVISIONS, node.kwargs)
    name = _aten_name(node.target)
    if name in _HOMOGENEOUS_ATEN:
        return "tie"
    if name in ("add", "add_", "sub", "sub_"):
        alpha = node.kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        return "tie" if len(args) >= 2 and not _constant(args[0]) and not _constant(args[1]) \
            and alpha == 1 else None
    if name in ("mul", "mul_", "div", "div_"):
        return _product_rule(args, name.startswith("div"), node.kwargs)
    return None


def _product_rule(args, divides: bool, kwargs) -> str | None:
    """``a * b`` / ``a / b``: a constant factor or divisor ties (linear in the tensor);
    ``c / x`` scales as ``1 / s``, a rounding division not at all: unscaled. Two tensors:
    ``"gate"`` (``a * gate``, ``gate * a``) or ``"divisor gate"`` (``a / gate`` only)."""
    if len(args) != 2 or kwargs.get("rounding_mode") is not None:
        return None
    if divides:
        if _constant(args[0]):
            return None
        return "tie" if _constant(args[1]) else "divisor gate"
    if _constant(args[1]) or _constant(args[0]):
        return "tie"
    return "gate"


_UNSCALED_PRODUCERS = {"sigmoid", "hardsigmoid", "softmax", "_softmax", "tanh"}


def _unscaled_gate(gm, node: torch.fx.Node) -> bool:
    """Is ``node`` an activation whose output is a gate in [0, 1] (always unscaled)?"""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Sigmoid, nn.Hardsigmoid,
                                                          nn.Softmax, nn.Tanh))
    if node.op == "call_method":
        return node.target in ("sigmoid", "sigmoid_", "softmax", "tanh")
    if node.op == "call_function":
        return node.target in (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax,
                               torch.tanh) or _aten_name(node.target) in _UNSCALED_PRODUCERS
    return False


def describe_node(gm, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.name} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        name = _aten_name(node.target) or getattr(node.target, "__name__", str(node.target))
        return f"{node.name} ({name})"
    return f"{node.name} ({node.target})"


def scale_constraints(gm: torch.fx.GraphModule, linears: dict) -> ScaleSolver:
    """Ties and fixed scales of every value of the graph (extractions come later)."""
    solver = ScaleSolver()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            solver.fix(node, f"{node.name} is a graph input")
        elif node.op == "output":
            for value in node.all_input_nodes:
                solver.fix(value, f"{value.name} is a graph output")
        elif node.op == "get_attr" or _is_shape_read(node):
            continue
        elif node in linears:
            continue  # its input and output scales are free: its weights absorb them
        else:
            rule = _scale_rule(gm, node)
            tensors = _tensors(node)
            if rule == "tie":
                for value in tensors:
                    solver.tie(node, value)
            elif rule in ("gate", "divisor gate") and len(tensors) == 2 and (
                    _unscaled_gate(gm, node.args[1]) or
                    (rule == "gate" and _unscaled_gate(gm, node.args[0]))):
                gate, value = (node.args[1], node.args[0]) if _unscaled_gate(gm, node.args[1]) \
                    else (node.args[0], node.args[1])
                solver.tie(node, value)
                solver.fix(gate, f"{gate.name} is a gate")
            else:
                why = f"it reaches {describe_node(gm, node)}, which needs unscaled values"
                for value in tensors:
                    solver.fix(value, why)
                solver.fix(node, f"it is {describe_node(gm, node)}'s output")
    return solver
