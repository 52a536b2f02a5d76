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

from reparam_fx.core.quantization import (ScaleSolver, best_identity_scale, extract_identity,
                                          identity_taps, modelled_gain_db)
from reparam_fx.int8.graph import LinearSite, graph_uses, linear_site, scale_constraints
from reparam_fx.int8.simulation import measured_gain_db, record_conv_inputs

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
    sized: bool = False  # the convs' sizes were known: the budget was the program's

    @property
    def kept_apart(self) -> list[Int8Decision]:
        return [d for d in self.decisions if d.kept_apart]

    def mode_counts(self) -> dict:
        return {mode: sum(d.mode == mode for d in self.decisions) for mode in MODES}

    def table(self) -> str:
        counts = ", ".join(f"{n} {mode}" for mode, n in self.mode_counts().items())
        scope = "of the program" if self.sized else "of each conv (no shapes: pass " \
            "example_inputs or calibration for the program's)"
        lines = [f"int8 policy ({'calibrated' if self.calibrated else 'data-free'}; budget "
                 f"{self.policy.budget:.0%} {scope}, min gain {self.policy.min_gain_db:g} dB): "
                 f"{len(self.decisions)} conv(s) holding an identity: {counts}"]
        for d in self.decisions:
            gains = ", ".join(f"{mode} {value:+.1f}" for mode, value in d.gain_db.items())
            measured = ", ".join(f"{mode} {value:+.1f}" for mode, value in d.measured_db.items())
            lines.append(f"  {d.conv}: {d.mode} - {d.reason} (modelled gain dB: {gains}"
                         f"{'; measured: ' + measured if measured else ''}; "
                         f"added ops {d.cost:.1%} of the conv)")
        return "\n".join(lines)

    __str__ = table


def apply_int8_policy(fused: nn.Module, *, calibration=None, policy: Int8Policy | None = None,
                      example_inputs=None) -> nn.Module:
    """A copy of ``fused`` (what :func:`reparam_fx.fuse` returned) with the int8 policy
    applied to every graph in it; ``result.fusion_report.int8`` is its
    :class:`Int8Report`. ``calibration``: an iterable of inputs of ``fused`` (measured
    choices). Without it, ``example_inputs`` (or the shapes an exported graph records)
    give the convs' sizes, and the budget is the whole program's rather than each conv's."""
    policy = policy or Int8Policy()
    result = copy.deepcopy(fused)
    report = Int8Report(policy)
    inputs, keep = None, 0
    if calibration is not None:
        from reparam_fx.int8.calibration import calibration_inputs
        inputs, keep = calibration_inputs(calibration), 2
        report.calibrated = True
    elif example_inputs is not None:
        inputs = [tuple(example_inputs) if isinstance(example_inputs, (tuple, list))
                  else (example_inputs,)]
    elif isinstance(result, torch.fx.GraphModule):
        inputs = _inputs_from_shapes(result)
    graphs = [m for m in result.modules() if isinstance(m, torch.fx.GraphModule)]
    recorded = {}
    if isinstance(result, torch.fx.GraphModule) and inputs is not None:
        try:
            recorded = record_conv_inputs(result, inputs, keep=keep)
        except Exception:  # noqa: BLE001 - shapes only help: without them each conv's budget
            if calibration is not None:
                raise
    report.sized = bool(recorded)
    for gm in graphs:
        report.decisions += _apply_to_graph(gm, policy, recorded if gm is result else {})
    fusion_report = getattr(fused, "fusion_report", None)
    if fusion_report is not None:
        result.fusion_report = copy.copy(fusion_report)
        result.fusion_report.int8 = report
    else:
        result.fusion_report = None
    return result


def _inputs_from_shapes(gm: torch.fx.GraphModule) -> list | None:
    """Zero inputs of the shapes an exported graph's placeholders record, if all are
    concrete (a ``torch.export`` graph); else None."""
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not all(isinstance(d, int) for d in value.shape):
            return None
        inputs.append(torch.zeros(tuple(value.shape), dtype=value.dtype))
    return [tuple(inputs)] if inputs else None


# ---- choosing ------------------------------------------------------------------------

@dataclass
class _Option:
    mode: str
    gain: float  # dB: measured when calibrated, else modelled
    cost: float  # fraction of the conv's own cost
    delta: object = 0.0  # a float ("scalar") or the identity taps ("channel")


def _options(site: LinearSite, policy: Int8Policy, recorded) -> tuple[list, dict, dict, float]:
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
    if recorded is not None and recorded.inputs:
        for option in candidates.values():
            option.gain = measured[option.mode] = measured_gain_db(site, option.delta, recorded)
    options = [o for mode, o in candidates.items() if mode in policy.modes]
    return sorted(options, key=lambda o: -o.gain), estimated, measured, per_add


def _apply_to_graph(gm: torch.fx.GraphModule, policy: Int8Policy, recorded: dict) -> list:
    uses = graph_uses(gm)
    linears = {}
    for node in gm.graph.nodes:
        site = linear_site(gm, node, uses)
        if site is not None:
            linears[node] = site
    solver = scale_constraints(gm, linears)
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
            reason = (f"keeping the identity apart gains {best:.1f} dB of {kind} int8 error "
                      f"at best (< {policy.min_gain_db:g} dB)")
            decisions.append(replace(base, reason=reason))
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
