"""The int8 fusion policy: ``fuse(model, target="int8")``.

Float fusion merges every identity branch into its conv. In int8 that puts one large
tap in each output channel's weight row (:mod:`reparam_fx.core.quantization` says why
it costs accuracy and holds the math). This pass runs on the float-fused graph and, per
conv, either keeps the merge or *extracts the identity*::

    relu(conv(x; W, b))   ->   relu(conv(x; (W - delta I) / delta, b / delta) + x)   [* delta]

with one positive scalar ``delta`` per conv, a plain int8 ``add`` (which XNNPACK runs
with the ReLU fused), and the trailing ``* delta`` moved into the next conv or linear
(exact: :class:`~reparam_fx.core.quantization.ScaleSolver`). The result is exact in
float: the same function, other weights. Where the scalar cannot move (or leaves too
much of the identity in the rows), the whole identity can be kept apart as
``add(conv(x; W - D), x * d)``: one multiply more, no move needed ("channel").

Which convs, which form
    A conv qualifies when it can hold the identity (square, stride 1, "same" zero
    padding) and its weights are its own. Each form's gain is the drop of the conv's
    output int8 error against the merged conv: modelled without data
    (:func:`~reparam_fx.core.quantization.modelled_noise`) or, with ``calibration``,
    measured (a local simulation on the conv's recorded inputs: per-tensor activations
    with the calibration ranges, per-channel symmetric weights, the add and the multiply
    quantized as XNNPACK does). A form must gain :attr:`Int8Policy.min_gain_db`.
    Each added op (the add; the multiply) has the conv's output size;
    :attr:`Int8Policy.add_cost` prices one element in MACs (measured on XNNPACK:
    ``docs/int8.md``). Without shapes, a form qualifies only if its ops cost at most
    ``budget`` of the conv itself, so the program is at most ``1 + budget`` times
    slower; with calibration inputs, the budget is the whole program's, spent on the
    largest gains per cost first. The best form that qualifies wins.

Refusals the report names: no identity to extract (not square, strided, unpadded,
grouped across channels), shared weights, a gain below the bound, the budget, and a
scale that cannot move (the conv's output and input both meet a value that must keep
its scale: a graph input or output, a non-homogeneous activation such as ReLU6, SiLU,
GELU or hardswish, a constant added, an op the pass does not know).
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from reparam_fx.core.quantization import (ScaleSolver, best_identity_scale, extract_identity,
                                          holds_identity, identity_taps, modelled_gain_db)

aten = torch.ops.aten


@dataclass(frozen=True)
class Int8Policy:
    """The knobs of ``target="int8"`` (``fuse(model, target=Int8Policy(...))``)."""

    budget: float = 0.10  # extra latency allowed, as a fraction (of a conv, or the program)
    min_gain_db: float = 1.0  # an extraction must gain at least this much (modelled/measured)
    add_cost: float = 40.0  # MACs one element of an int8 add or multiply costs (XNNPACK)
    modes: tuple = ("scalar", "channel")  # the extractions allowed


MODES = ("merged", "scalar", "channel")


@dataclass(frozen=True)
class Int8Decision:
    """What the policy did with one conv: ``mode`` is ``"merged"`` (as float fusion left
    it), ``"scalar"`` (identity taps less one scalar kept apart as a bare ``add``) or
    ``"channel"`` (all identity taps kept apart as ``add(conv, x * d)``)."""

    conv: str  # the conv's node name in the fused graph
    mode: str
    reason: str
    delta: float = 0.0  # the scalar of "scalar"
    gain_db: dict = field(default_factory=dict)  # mode -> modelled gain (data-free)
    measured_db: dict = field(default_factory=dict)  # mode -> local int8 error gain
    cost: float = 0.0  # the chosen mode's added ops, as a fraction of the conv's cost

    @property
    def kept_apart(self) -> bool:
        return self.mode != "merged"


@dataclass
class Int8Report:
    policy: Int8Policy
    decisions: list[Int8Decision] = field(default_factory=list)
    calibrated: bool = False

    @property
    def kept_apart(self) -> list[Int8Decision]:
        return [d for d in self.decisions if d.kept_apart]

    def mode_counts(self) -> dict:
        return {mode: sum(d.mode == mode for d in self.decisions) for mode in MODES}

    def table(self) -> str:
        counts = ", ".join(f"{n} {mode}" for mode, n in self.mode_counts().items())
        lines = [f"int8 policy ({'calibrated' if self.calibrated else 'data-free'}; budget "
                 f"{self.policy.budget:.0%}, min gain {self.policy.min_gain_db:g} dB): "
                 f"{len(self.decisions)} conv(s) holding an identity: {counts}"]
        for d in self.decisions:
            gains = ", ".join(f"{mode} {value:+.1f}" for mode, value in d.gain_db.items())
            measured = ", ".join(f"{mode} {value:+.1f}" for mode, value in d.measured_db.items())
            lines.append(f"  {d.conv}: {d.mode} - {d.reason} (modelled gain dB: {gains}"
                         f"{'; measured: ' + measured if measured else ''}; "
                         f"added ops {d.cost:.1%} of the conv)")
        return "\n".join(lines)

    __str__ = table


def apply_int8_policy(fused: nn.Module, *, calibration=None,
                      policy: Int8Policy | None = None) -> nn.Module:
    """A copy of ``fused`` (what :func:`reparam_fx.fuse` returned) with the int8 policy
    applied to every graph in it; ``result.fusion_report.int8`` is its
    :class:`Int8Report`. ``calibration``: an iterable of inputs of ``fused``."""
    policy = policy or Int8Policy()
    result = copy.deepcopy(fused)
    report = Int8Report(policy)
    inputs = None
    if calibration is not None:
        from reparam_fx.int8.calibration import calibration_inputs
        inputs = calibration_inputs(calibration)
        report.calibrated = True
    graphs = [m for m in result.modules() if isinstance(m, torch.fx.GraphModule)]
    if isinstance(result, torch.fx.GraphModule) and inputs is not None:
        recorded = _record_conv_inputs(result, inputs)
    else:
        recorded = {}
    for gm in graphs:
        report.decisions += _apply_to_graph(gm, policy, recorded if gm is result else {})
    fusion_report = getattr(fused, "fusion_report", None)
    if fusion_report is not None:
        result.fusion_report = copy.copy(fusion_report)
        result.fusion_report.int8 = report
    else:
        result.fusion_report = None
    return result


# ---- the graph: convs, linears, and how scales pass through other ops ----------------

@dataclass
class _Linear:
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


def _own_get_attr(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr" and len(node.users) == 1


def _linear_site(gm: torch.fx.GraphModule, node: torch.fx.Node, calls: dict) -> _Linear | None:
    """The node as a rewritable conv/linear, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if calls.get(node.target, 0) != 1 or not node.args or node.kwargs or len(node.args) != 1:
            return None
        if _standard(module, _CONV_MODULES) and module.padding_mode == "zeros":
            def get(m=module):
                return m.weight, m.bias

            def put(weight, bias, m=module):
                with torch.no_grad():
                    m.weight.data = weight.to(m.weight.dtype)
                    if m.bias is not None:
                        m.bias.data = bias.to(m.bias.dtype)
            why = holds_identity(tuple(module.weight.shape), module.groups, module.stride,
                                 module.padding, module.dilation)
            return _Linear(node, node.args[0], get, put, module.groups, why)
        if _standard(module, (nn.Linear,)):
            def get(m=module):
                return m.weight, m.bias

            def put(weight, bias, m=module):
                with torch.no_grad():
                    m.weight.data = weight.to(m.weight.dtype)
                    if m.bias is not None:
                        m.bias.data = bias.to(m.bias.dtype)
            return _Linear(node, node.args[0], get, put)
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
        if not _own_get_attr(weight) or not (bias is None or _own_get_attr(bias)):
            return None
        get, put = _param_access(gm, weight, bias)
        return _Linear(node, x, get, put)
    else:
        return None
    if not _own_get_attr(weight) or not (bias is None or _own_get_attr(bias)) or \
            not isinstance(x, torch.fx.Node) or not isinstance(groups, int):
        return None
    get, put = _param_access(gm, weight, bias)
    why = holds_identity(tuple(get()[0].shape), groups, stride, padding, dilation, transposed)
    return _Linear(node, x, get, put, groups, why)


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
            return _product_rule(args)
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
        return _product_rule(args)
    name = _aten_name(node.target)
    if name in _HOMOGENEOUS_ATEN:
        return "tie"
    if name in ("add", "add_", "sub", "sub_"):
        alpha = node.kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        return "tie" if len(args) >= 2 and not _constant(args[0]) and not _constant(args[1]) \
            and alpha == 1 else None
    if name in ("mul", "mul_", "div", "div_"):
        return _product_rule(args)
    return None


def _product_rule(args) -> str | None:
    if len(args) != 2:
        return None
    if _constant(args[1]) or (_constant(args[0])):
        return "tie"  # a constant factor: linear in the tensor
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


def _describe(gm, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.name} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        name = _aten_name(node.target) or getattr(node.target, "__name__", str(node.target))
        return f"{node.name} ({name})"
    return f"{node.name} ({node.target})"


def _constraints(gm: torch.fx.GraphModule, linears: dict) -> ScaleSolver:
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
            elif rule == "gate" and len(tensors) == 2 and (
                    _unscaled_gate(gm, tensors[1]) or _unscaled_gate(gm, tensors[0])):
                gate, value = (tensors[1], tensors[0]) if _unscaled_gate(gm, tensors[1]) \
                    else tensors
                solver.tie(node, value)
                solver.fix(gate, f"{gate.name} is a gate")
            else:
                why = f"it reaches {_describe(gm, node)}, which needs unscaled values"
                for value in tensors:
                    solver.fix(value, why)
                solver.fix(node, f"it is {_describe(gm, node)}'s output")
    return solver


# ---- choosing ------------------------------------------------------------------------

@dataclass
class _Option:
    mode: str
    gain: float  # dB: measured when calibrated, else modelled
    cost: float  # fraction of the conv's own cost
    delta: object = 0.0  # a float ("scalar") or the identity taps ("channel")


def _options(site: _Linear, policy: Int8Policy, recorded) -> tuple[list, dict, dict, float]:
    """The extractions worth considering for one conv, best gain first."""
    weight, _ = site.get()
    taps = identity_taps(weight, site.groups)
    delta, _ = best_identity_scale(taps)
    scalar_gain = modelled_gain_db(weight, site.groups, delta) if delta > 0 else 0.0
    channel_gain = modelled_gain_db(weight, site.groups, taps.diagonal)
    per_add = policy.add_cost / (weight.shape[1] * math.prod(weight.shape[2:]))
    estimated = {"scalar": scalar_gain, "channel": channel_gain}
    candidates = {"scalar": _Option("scalar", scalar_gain, per_add, delta),
                  "channel": _Option("channel", channel_gain, 2 * per_add, taps.diagonal)}
    if delta <= 0:
        del candidates["scalar"]
    measured = {}
    if recorded is not None:
        for option in candidates.values():
            option.gain = measured[option.mode] = _measured_gain_db(site, option.delta, recorded)
    options = [o for mode, o in candidates.items() if mode in policy.modes]
    return sorted(options, key=lambda o: -o.gain), estimated, measured, per_add


def _apply_to_graph(gm: torch.fx.GraphModule, policy: Int8Policy, recorded: dict) -> list:
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    linears = {}
    for node in gm.graph.nodes:
        site = _linear_site(gm, node, calls)
        if site is not None:
            linears[node] = site
    solver = _constraints(gm, linears)
    total = _program_cost(linears, recorded)
    plans = []
    for node, site in linears.items():
        if site.why_no_identity is None:  # (a conv with no identity in it is not reported)
            plans.append((node, site, *_options(site, policy, recorded.get(node))))
    # the budget goes to the best gain per cost first
    plans.sort(key=lambda plan: -max([o.gain / o.cost for o in plan[2]], default=0.0))
    spent, decisions, chosen = 0.0, [], {}
    for node, site, options, estimated, measured, per_add in plans:
        base = Int8Decision(node.name, "merged", "", 0.0, estimated, measured, 0.0)
        useful = [o for o in options if o.gain >= policy.min_gain_db]
        if not useful:
            best = max((o.gain for o in options), default=0.0)
            kind = "measured" if measured else "modelled"
            decisions.append(replace(base, reason=f"keeping the identity apart gains {best:.1f} "
                                                  f"dB of {kind} int8 error at best (< {policy.min_gain_db:g} dB)"))
            continue
        refusals = []
        for option in useful:
            if total is None:  # no shapes: each conv's added ops within the budget of its own
                fits = option.cost <= policy.budget + 1e-12
            else:
                extra = option.cost * recorded[node].macs
                fits = spent + extra <= policy.budget * total + 1e-9
            if not fits:
                refusals.append(f"{option.mode}: its ops would cost {option.cost:.1%} of the conv "
                                f"(budget {policy.budget:.0%}"
                                f"{'' if total is None else ' of the program, partly spent'})")
                continue
            if option.mode == "scalar":
                reason = solver.relate(node, site.input, math.log(option.delta))
                if reason is not None:
                    refusals.append(f"scalar: its scale cannot move: {reason}")
                    continue
            if total is not None:
                spent += option.cost * recorded[node].macs
            how = (f"identity less {option.delta:.3g} kept apart as an add; the scale moved into "
                   "the next layer" if option.mode == "scalar" else
                   "identity kept apart as add(conv, x * d)")
            note = f" ({'; '.join(refusals)})" if refusals else ""
            decision = replace(base, mode=option.mode, reason=how + note, cost=option.cost,
                               delta=float(option.delta) if option.mode == "scalar" else 0.0)
            decisions.append(decision)
            chosen[node] = (decision, option)
            break
        else:
            decisions.append(replace(base, reason="; ".join(refusals)))
    _rewrite(gm, linears, solver, chosen)
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(decisions, key=lambda d: order.get(d.conv, 0))


def _program_cost(linears: dict, recorded: dict) -> float | None:
    """MACs of every conv and linear, when calibration recorded their shapes."""
    if not recorded or any(node not in recorded for node in linears):
        return None
    return float(sum(recorded[node].macs for node in linears))


# ---- rewriting -----------------------------------------------------------------------

def _rewrite(gm: torch.fx.GraphModule, linears: dict, solver: ScaleSolver, chosen: dict) -> None:
    """Weights rescaled for the solved scales; each chosen extraction written as an add
    (and, for "channel", a multiply by a new constant)."""
    graph = gm.graph
    aten_graph = any(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes
                     if n.op == "call_function")
    add_op, mul_op = (aten.add.Tensor, aten.mul.Tensor) if aten_graph else (operator.add,
                                                                              operator.mul)
    for node, site in linears.items():
        decision, option = chosen.get(node, (None, None))
        s_in = math.exp(solver.log_scale(site.input))
        s_out = math.exp(solver.log_scale(node))
        if decision is None and math.isclose(s_in, 1.0) and math.isclose(s_out, 1.0):
            continue
        weight, bias = site.get()
        w = weight.detach().double()
        if decision is not None:
            w = extract_identity(w, site.groups, option.delta)
        site.set(w * (s_in / s_out), None if bias is None else bias.detach().double() / s_out)
        if decision is None:
            continue
        identity = site.input
        with graph.inserting_after(node):
            if option.mode == "channel":
                shape = (-1,) + (1,) * (weight.dim() - 2)
                name = _free_attribute(gm, f"{node.name}_identity_scale")
                gm.register_buffer(name, (option.delta * (s_in / s_out)).to(weight.dtype)
                                   .reshape(shape))
                constant = graph.get_attr(name)
                with graph.inserting_after(constant):
                    identity = graph.call_function(mul_op, (site.input, constant))
                with graph.inserting_after(identity):
                    add = graph.call_function(add_op, (node, identity))
            else:
                add = graph.call_function(add_op, (node, identity))
        node.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
        add.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
    graph.lint()
    gm.recompile()


def _free_attribute(gm: nn.Module, name: str) -> str:
    candidate, n = name, 1
    while hasattr(gm, candidate):
        candidate, n = f"{name}_{n}", n + 1
    return candidate


# ---- calibration: shapes and a local int8 simulation ---------------------------------

@dataclass
class _Recorded:
    inputs: list  # a few inputs of the conv (float)
    low: float  # the input's range over the calibration
    high: float
    out_low: float  # the output's range
    out_high: float
    numel_out: int  # per sample
    macs: int  # per sample


def _record_conv_inputs(gm: torch.fx.GraphModule, inputs: list, keep: int = 2) -> dict:
    """Run the float graph on the calibration inputs; per conv/linear node, its input's
    and output's ranges, a few inputs, and its size per sample."""
    targets = {n for n in gm.graph.nodes if n.op in ("call_module", "call_function")}
    seen: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in targets and isinstance(result, torch.Tensor) and n.all_input_nodes:
                x = self.env.get(n.all_input_nodes[0]) if n.op == "call_module" else \
                    self.env.get(n.args[0]) if isinstance(n.args[0], torch.fx.Node) else None
                if isinstance(x, torch.Tensor) and x.is_floating_point():
                    item = seen.get(n)
                    if item is None:
                        item = seen[n] = _Recorded([], math.inf, -math.inf, math.inf, -math.inf,
                                                   result[0].numel(), 0)
                    if len(item.inputs) < keep:
                        item.inputs.append(x.detach())
                    item.low, item.high = min(item.low, float(x.min())), max(item.high, float(x.max()))
                    item.out_low = min(item.out_low, float(result.min()))
                    item.out_high = max(item.out_high, float(result.max()))
            return result

    with torch.no_grad():
        for args in inputs:
            Recorder(gm).run(*args)
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    result = {}
    for node, item in seen.items():
        site = _linear_site(gm, node, calls)
        if site is None:
            continue
        weight, _ = site.get()
        item.macs = item.numel_out * math.prod(weight.shape[1:])
        result[node] = item
    return result


def _fake_quant(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Per-tensor affine int8 (as XNNPACK's activations), range including 0."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-12) / 255
    zero = round(-128 - low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 (as XNNPACK's weights)."""
    scale = w.flatten(1).abs().amax(1).clamp_min(1e-12) / 127
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / scale.view(shape)), -127, 127) * scale.view(shape)


def _measured_gain_db(site: _Linear, delta, item: _Recorded) -> float:
    """10 log10 of the conv's local int8 error merged over apart, on recorded inputs."""
    weight, bias = site.get()
    node = site.node
    w = weight.detach().double()
    b = None if bias is None else bias.detach().double()
    w_apart = extract_identity(w, site.groups, delta)
    conv = _conv_call(site, node)
    merged_err = apart_err = 0.0
    for x in item.inputs:
        x = x.double()
        exact = conv(x, w, b)
        xq = _fake_quant(x, item.low, item.high)
        merged = _fake_quant(conv(xq, _fake_quant_weight(w), b), item.out_low, item.out_high)
        partial = conv(xq, _fake_quant_weight(w_apart), b)
        partial_range = (float(partial.min()), float(partial.max()))
        identity = delta * xq if not isinstance(delta, torch.Tensor) else \
            _fake_quant(delta.view((-1,) + (1,) * (x.dim() - 2)) * xq, *_range(delta, xq))
        apart = _fake_quant(_fake_quant(partial, *partial_range) + identity,
                            item.out_low, item.out_high)
        merged_err += float((merged - exact).pow(2).sum())
        apart_err += float((apart - exact).pow(2).sum())
    return 10 * math.log10(max(merged_err, 1e-300) / max(apart_err, 1e-300))


def _range(delta: torch.Tensor, xq: torch.Tensor) -> tuple[float, float]:
    scaled = delta.view((-1,) + (1,) * (xq.dim() - 2)) * xq
    return float(scaled.min()), float(scaled.max())


def _conv_call(site: _Linear, node: torch.fx.Node):
    """``(x, w, b) -> conv`` with the node's geometry."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return lambda x, w, b: _functional_conv(x, w, b, module.stride, module.padding,
                                                module.dilation, module.groups)
    if node.target is aten.convolution.default:
        _, _, _, stride, padding, dilation, _, _, groups = node.args
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        stride, padding, dilation = bound.get("stride", 1), bound.get("padding", 0), \
            bound.get("dilation", 1)
        groups = bound.get("groups", 1)
    return lambda x, w, b: _functional_conv(x, w, b, stride, padding, dilation, groups)


def _functional_conv(x, w, b, stride, padding, dilation, groups):
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return conv(x, w, b, stride, padding, dilation, groups)
