"""What a fusion did: the regions it collapsed (by pattern name) and what it left alone, and why.

Pattern names are *outcomes* of the affine algebra, not separate matchers: once a region
has been folded into one conv, :func:`classify_region` looks at the ops it absorbed and
names it after the block it resembles:

=====================  =====================================================
pattern                region absorbed
=====================  =====================================================
``conv+bn``            one conv followed by BatchNorm (and nothing else)
``repvgg``             sum of a kxk conv branch, a 1x1 conv branch and/or an identity
``mobileone``          sum with two or more conv branches of the same kernel shape
``large+small kernel`` sum of conv branches with different kernel sizes > 1
``repmixer``           ``x + scale * (f(x) - g(x))``: a difference plus an identity
``cpe``                identity plus one conv, no BatchNorm (``x + dwconv(x)``)
``bn+linear``          BatchNorm1d folded into a Linear (before or after it)
``linear heads``       sum/average of several Linear heads on one input
``layer scale``        per-channel constant scale folded into a conv/linear
``avgpool``            average pooling folded as a depthwise conv
``zero-pad``           explicit zero padding folded into a conv
``conv composition``   two convs (kxk then 1x1, or 1x1 then kxk) composed
``affine``             any other exactly-foldable region
=====================  =====================================================

Op categories (:data:`OP_CATEGORIES`) count module, functional and aten forms alike, so
before/after histograms compare across frontends.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

OP_CATEGORIES = ("conv", "batch_norm", "linear", "add", "sub", "mul", "div", "avg_pool", "pad")


@dataclass(frozen=True)
class FusedRegion:
    """One region of the graph replaced by a single conv or linear."""

    pattern: str
    output: str  # name of the original node whose value the new module computes
    module: str  # qualified name of the new module (or of its weight, in aten graphs)
    nodes: tuple[str, ...]  # the original nodes absorbed
    ops: tuple[tuple[str, int], ...]  # op-category histogram of the absorbed nodes
    params_before: int
    params_after: int


@dataclass(frozen=True)
class Skipped:
    """A node that looked foldable but was left as it was."""

    node: str
    op: str
    reason: str


@dataclass
class FusionReport:
    """Everything :func:`reparam_fx.fuse` did. Reachable as ``fused.fusion_report``."""

    fused: list[FusedRegion] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ops_before: Counter = field(default_factory=Counter)
    ops_after: Counter = field(default_factory=Counter)
    params_before: int = 0
    params_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    frontend: str = ""

    def pattern_counts(self) -> Counter:
        return Counter(region.pattern for region in self.fused)

    def skip_reasons(self) -> Counter:
        """Skip reasons without their per-node details (numbers in parentheses)."""
        return Counter(re.sub(r"\s*\([^)]*\)", "", item.reason) for item in self.skipped)

    def table(self) -> str:
        """A plain-text summary: totals, one row per pattern, one row per skip reason."""
        lines = [
            f"reparam_fx fusion report ({self.frontend} graph)",
            f"  nodes   {self.nodes_before:>10} -> {self.nodes_after}",
            f"  params  {self.params_before:>10,} -> {self.params_after:,}",
        ]
        for category in OP_CATEGORIES:
            before, after = self.ops_before.get(category, 0), self.ops_after.get(category, 0)
            if before or after:
                lines.append(f"  {category:<10}{before:>8} -> {after}")
        if self.fused:
            lines.append(f"  fused {len(self.fused)} region(s):")
            lines.append(f"    {'pattern':<22}{'count':>6}{'ops absorbed':>14}")
            absorbed = Counter()
            for region in self.fused:
                absorbed[region.pattern] += len(region.nodes)
            for pattern, count in sorted(self.pattern_counts().items()):
                lines.append(f"    {pattern:<22}{count:>6}{absorbed[pattern]:>14}")
        else:
            lines.append("  nothing fused")
        if self.skipped:
            lines.append(f"  left alone {len(self.skipped)} node(s):")
            for reason, count in sorted(self.skip_reasons().items(), key=lambda kv: -kv[1]):
                lines.append(f"    {count:>4} x {reason}")
        return "\n".join(lines)

    __str__ = table


def classify_region(kinds: Counter, conv_kernels: list[tuple[int, ...]], n_branches: int,
                    has_identity: bool, has_sub: bool) -> str:
    """Name a folded region from the op kinds it absorbed (see the module docstring).

    ``kinds`` counts the absorbed ops by role: conv, bn, linear, scale, avgpool, pad;
    ``conv_kernels`` lists the kernel sizes of the absorbed convs; ``n_branches`` is the
    number of terms that were summed (1 for a chain).
    """
    n_conv, n_linear = kinds["conv"], kinds["linear"]
    if n_linear and not n_conv:
        if n_linear > 1 and n_branches > 1:
            return "linear heads"
        if kinds["bn"]:
            return "bn+linear"
        if kinds["scale"]:
            return "layer scale"
        return "affine"
    if n_branches > 1:
        if has_sub and has_identity:
            return "repmixer"
        spatial = [tuple(k) for k in conv_kernels if any(size > 1 for size in k)]
        if len(set(spatial)) > 1:
            return "large+small kernel"
        if len(conv_kernels) > len({tuple(k) for k in conv_kernels}):
            return "mobileone"  # over-parameterised: several branches of one kernel shape
        if has_identity and n_conv == 1 and not kinds["bn"]:
            return "cpe"
        return "repvgg"
    if n_conv >= 2:
        return "conv composition"
    if kinds["pad"]:
        return "zero-pad"
    if kinds["avgpool"]:
        return "avgpool"
    if kinds["bn"]:
        return "conv+bn"
    if kinds["scale"]:
        return "layer scale"
    return "affine"


# ---- op histograms -------------------------------------------------------------------

_MODULE_CATEGORIES = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.modules.batchnorm._BatchNorm,), "batch_norm"),
    ((nn.Linear,), "linear"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), "avg_pool"),
    ((nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
      nn.ConstantPad3d), "pad"),
)

_FUNCTION_CATEGORIES = {
    F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
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
    "batch_norm": "batch_norm", "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit": "batch_norm", "native_batch_norm": "batch_norm",
    "linear": "linear", "addmm": "linear",
    "add": "add", "sub": "sub", "mul": "mul", "div": "div",
    "avg_pool1d": "avg_pool", "avg_pool2d": "avg_pool", "avg_pool3d": "avg_pool",
    "constant_pad_nd": "pad", "pad": "pad",
}


_SHAPE_METHODS = {"size", "dim", "numel"}
_SHAPE_ATTRIBUTES = {"shape", "ndim"}


def shape_values(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that hold Python scalars derived from tensor shapes, not tensors:
    ``x.shape``, ``x.size()``, ``aten.sym_size``, indexing and arithmetic on those
    (``(h + p - 1) // p`` in a traced model). They are not tensor ops."""
    scalars: set[torch.fx.Node] = set()
    for node in graph.nodes:
        value = node.meta.get("val")
        if value is not None and not isinstance(value, torch.Tensor) and \
                isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
            scalars.add(node)
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            scalars.add(node)
        elif node.op == "call_function" and node.target is getattr and \
                len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES:
            scalars.add(node)
        elif (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
              and node.target._schema.name.split("::")[-1].startswith("sym_")):
            scalars.add(node)
        elif node.op in ("call_function", "call_method") and node.all_input_nodes and \
                all(arg in scalars for arg in node.all_input_nodes):
            scalars.add(node)  # indexing / arithmetic on shape values
    return scalars


def node_category(node: torch.fx.Node, modules: dict[str, nn.Module],
                  scalars: set = frozenset()) -> str | None:
    """The op category of one fx node (module, functional or aten form), or None.
    ``scalars`` (see :func:`shape_values`) are shape arithmetic, never counted."""
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
        if isinstance(node.target, torch._ops.OpOverload):
            return _ATEN_CATEGORIES.get(node.target._schema.name.split("::")[-1])
        try:
            return _FUNCTION_CATEGORIES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def op_counts(model) -> Counter:
    """Histogram of conv / batch_norm / linear / add / sub / mul / div / avg_pool / pad ops.

    Accepts a ``torch.fx.GraphModule`` (module-level, functional or aten), an
    ``ExportedProgram`` or a plain ``nn.Module`` (traced with ``symbolic_trace``).
    Tensor-by-tensor arithmetic on constants (e.g. ``weight.view(...)``) counts too, so
    compare histograms of graphs built the same way.
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.fx.GraphModule):
        model = torch.fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    scalars = shape_values(model.graph)
    counts = Counter()
    for node in model.graph.nodes:
        category = node_category(node, modules, scalars)
        if category is not None:
            counts[category] += 1
    return counts


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def counts_as_parameter(name: str, tensor: torch.Tensor) -> bool:
    """Parameters, and floating-point buffers that are not BatchNorm statistics (as papers
    count parameters; constants a fusion writes as buffers do count)."""
    if name.rsplit(".", 1)[-1] in _STATISTICS:
        return False
    return isinstance(tensor, nn.Parameter) or tensor.is_floating_point()


def parameter_count(model: nn.Module) -> int:
    """Parameters plus floating-point buffers that are not BatchNorm statistics."""
    tensors = dict((id(t), (name, t)) for name, t in model.named_parameters())
    tensors.update((id(t), (name, t)) for name, t in model.named_buffers())
    return sum(t.numel() for name, t in tensors.values() if counts_as_parameter(name, t))


def mac_count(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs``: convolutions,
    linear layers and matrix products (half of ``torch.utils.flop_counter``'s FLOPs).
    Element-wise ops, BatchNorm, pooling and softmax are not counted, as papers count MACs.
    """
    from torch.utils.flop_counter import FlopCounterMode
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2
