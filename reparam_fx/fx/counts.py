"""Counting: op histograms, parameters and MACs of torch models, before and after fusion.

Op categories (:data:`OP_CATEGORIES`) count module, functional and aten forms alike, so
histograms compare across captures. A module kept as a leaf (an untraceable block, a
module with hooks, a fused block inside one) is counted by what it contains: traced when
it traces, else as the sum of its children (ops written in an untraceable ``forward``
itself are not seen).
"""

from __future__ import annotations

import math
import operator
from collections import Counter

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from reparam_fx.fx.capture import is_op_module, trace
from reparam_fx.fx.values import schema_name, shape_values

OP_CATEGORIES = ("conv", "batch_norm", "linear", "add", "sub", "mul", "div", "avg_pool", "pad")

_MODULE_CATEGORIES = (
    ((nn.modules.conv._ConvNd,), "conv"),
    ((nn.modules.batchnorm._BatchNorm,), "batch_norm"),
    ((nn.Linear,), "linear"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), "avg_pool"),
    ((nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
      nn.ConstantPad3d), "pad"),
)

_FUNCTION_CATEGORIES = {
    F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.conv_transpose1d: "conv",
    F.conv_transpose2d: "conv", F.conv_transpose3d: "conv",
    F.batch_norm: "batch_norm", F.linear: "linear",
    F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
    F.pad: "pad",
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
}

_METHOD_CATEGORIES = {
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
    "mul": "mul", "mul_": "mul", "div": "div", "div_": "div",
}

_ATEN_CATEGORIES = {
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv",
    "conv_transpose1d": "conv", "conv_transpose2d": "conv", "conv_transpose3d": "conv",
    "batch_norm": "batch_norm", "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit": "batch_norm", "native_batch_norm": "batch_norm",
    "linear": "linear", "addmm": "linear",
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
    "div": "div", "div_": "div",
    "avg_pool1d": "avg_pool", "avg_pool2d": "avg_pool", "avg_pool3d": "avg_pool",
    "constant_pad_nd": "pad", "pad": "pad",
}


def node_category(node: torch.fx.Node, modules, scalars: set = frozenset()) -> str | None:
    """The op category of one fx node (module, functional or aten form), or None.
    ``scalars`` (see :func:`reparam_fx.fx.facts.shape_values`) are shape arithmetic,
    never counted."""
    if node in scalars:
        return None
    if node.op == "call_module":
        module = modules.get(node.target)
        for types, category in _MODULE_CATEGORIES:
            if isinstance(module, types):
                return category
        return None
    if node.op == "call_method":
        return _METHOD_CATEGORIES.get(node.target)
    if node.op == "call_function":
        name = schema_name(node.target)
        if name is not None:
            return _ATEN_CATEGORIES.get(name)
        try:
            return _FUNCTION_CATEGORIES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def graph_op_counts(graph: torch.fx.Graph, modules) -> Counter:
    """Op histogram of one graph whose ``call_module`` targets ``modules.get`` resolves;
    leaf modules that are not single ops are counted by what they contain."""
    scalars = shape_values(graph)
    counts = Counter()
    for node in graph.nodes:
        category = node_category(node, modules, scalars)
        if category is not None:
            counts[category] += 1
        elif node.op == "call_module":
            module = modules.get(node.target)
            if module is not None and not is_op_module(module):
                counts.update(op_counts(module))
    return counts


def op_counts(model) -> Counter:
    """Histogram of conv / batch_norm / linear / add / sub / mul / div / avg_pool / pad ops.

    Accepts a ``torch.fx.GraphModule`` (module-level, functional or aten), an
    ``ExportedProgram`` or a plain ``nn.Module`` (traced, untraceable blocks kept as leaves).
    Tensor-by-tensor arithmetic on constants (e.g. ``weight.view(...)``) counts too, so
    compare histograms of graphs built the same way.
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.fx.GraphModule):
        try:
            model, _ = trace(model)
        except Exception:  # noqa: BLE001 - its own forward does not trace: its children
            counts = Counter()
            for child in model.children():
                counts.update(op_counts(child) if not is_op_module(child)
                              else graph_op_counts(_single_call_graph(), {"m": child}))
            return counts
    return graph_op_counts(model.graph, dict(model.named_modules()))


def _single_call_graph() -> torch.fx.Graph:
    graph = torch.fx.Graph()
    graph.output(graph.call_module("m", (graph.placeholder("x"),)))
    return graph


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def counts_as_parameter(name: str, tensor: torch.Tensor) -> bool:
    """Parameters, and floating-point buffers that are not BatchNorm statistics (as papers
    count parameters; constants a fusion writes as buffers do count)."""
    if name.endswith(_STATISTICS):  # also flattened names such as ``bn_running_mean``
        return False
    return isinstance(tensor, nn.Parameter) or tensor.is_floating_point()


def module_tensors(module: nn.Module):
    """``(name, tensor)`` for a module's parameters and buffers; leaves read their own
    dicts (``named_parameters`` walks ``named_modules``, slow over 10k modules)."""
    if module._modules:
        yield from module.named_parameters()
        yield from module.named_buffers()
        return
    for table in (module._parameters, module._buffers):
        for name, tensor in table.items():
            if tensor is not None:
                yield name, tensor


def parameter_count(model: nn.Module) -> int:
    """Parameters plus floating-point buffers that are not BatchNorm statistics."""
    tensors = dict((id(t), (name, t)) for name, t in model.named_parameters())
    tensors.update((id(t), (name, t)) for name, t in model.named_buffers())
    return sum(t.numel() for name, t in tensors.values() if counts_as_parameter(name, t))


def mac_count(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs``: convolutions,
    linear layers and matrix products (half of ``torch.utils.flop_counter``'s FLOPs), and
    average pooling, which adds ``prod(kernel)`` values for each output element - what the
    depthwise conv that ``fuse`` may write in its place costs, so the count compares the
    two honestly. Other element-wise ops, BatchNorm and softmax are not counted, as papers
    count MACs."""
    from torch.utils.flop_counter import FlopCounterMode
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    pools = {torch.ops.aten.avg_pool1d: _pool_flops, torch.ops.aten.avg_pool2d: _pool_flops,
             torch.ops.aten.avg_pool3d: _pool_flops}
    counter = FlopCounterMode(display=False, custom_mapping=pools)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2


def _pool_flops(x_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    """Twice (the counter's FLOPs are two per MAC) the additions of an average pool."""
    spatial = len(x_shape) - 2 if len(x_shape) > 2 else len(x_shape) - 1
    kernel = list(kernel_size) * (spatial if len(kernel_size) == 1 else 1)
    return 2 * math.prod(out_shape) * math.prod(kernel)
