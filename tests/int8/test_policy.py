"""``fuse(model, target="int8")``: exact in float, and what it keeps apart, rule by rule.

Every model gets trained-like BatchNorm statistics (``reparam_fx.testing.statistics``):
a fresh BatchNorm would make every identity tap 1 and hide both the int8 problem and
scaling bugs. Exactness is float64 against the unfused model, to 1e-9. Each rule has a
positive case (what was kept apart, the ops in the graph) and a negative one (what
stayed merged, and the report's reason).
"""

from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
import torch.nn as nn
from hypothesis import given, note, settings
from hypothesis import strategies as st

import reparam_fx
from reparam_fx import FusionError
from reparam_fx.int8.policy import Int8Policy, apply_int8_policy
from reparam_fx.testing import block_specs
from reparam_fx.testing.statistics import batchnorm_roles, trained_like

D = torch.float64
RTOL = 1e-9
EVERYWHERE = Int8Policy(budget=1.0)  # no latency budget: every gainful extraction
# one form wherever it is possible, gain or not (what the rewrites do, not whether they pay)
SCALAR = Int8Policy(budget=1.0, modes=("scalar",), min_gain_db=-math.inf)
CHANNEL = Int8Policy(budget=1.0, modes=("channel",), min_gain_db=-math.inf)


class RepBlock(nn.Module):
    """A RepVGG block: 3x3 conv+BN, 1x1 conv+BN and an identity BN, summed."""

    def __init__(self, channels: int, act=nn.ReLU):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(channels))
        self.point = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                   nn.BatchNorm2d(channels))
        self.identity = nn.BatchNorm2d(channels)
        self.act = act()

    def forward(self, x):
        return self.act(self.dense(x) + self.point(x) + self.identity(x))


class Stack(nn.Module):
    def __init__(self, channels=16, blocks=3, act=nn.ReLU, head=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*[RepBlock(channels, act) for _ in range(blocks)])
        self.head = nn.Linear(channels, 5) if head else None

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3))) if self.head is not None else x


def _model(module: nn.Module, size=12) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    return trained_like(module.eval(), x, seed=1).double(), x.double()


def _ops(gm) -> dict:
    """Convs, adds and multiplies in a graph (module, function and aten forms)."""
    found = {"conv": 0, "add": 0, "mul": 0}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d):
            found["conv"] += 1
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if "conv" in name:
                found["conv"] += 1
            elif node.target in (operator.add, torch.ops.aten.add.Tensor):
                found["add"] += 1
            elif node.target in (operator.mul, torch.ops.aten.mul.Tensor):
                found["mul"] += 1
    return found


def _error(model, fused, x) -> float:
    with torch.no_grad():
        expected, got = model(x), fused(x)
    return float((got - expected).abs().max() / expected.abs().max())


def _capture(model, x, capture):
    return model if capture == "fx" else torch.export.export(model, (x,))


# ---- exactness and the ops written ---------------------------------------------------

@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("policy,mode,muls", [(SCALAR, "scalar", 0), (CHANNEL, "channel", 3)])
def test_each_mode_is_exact_and_writes_its_ops(capture, policy, mode, muls):
    model, x = _model(Stack(blocks=3))
    floated = reparam_fx.fuse(_capture(model, x, capture))
    fused = reparam_fx.fuse(_capture(model, x, capture), target=policy)
    assert _error(model, fused, x) < RTOL
    report = fused.fusion_report.int8
    assert report.mode_counts() == {"merged": 0, mode: 3, "scalar" if mode == "channel"
                                    else "channel": 0}
    before, after = _ops(floated), _ops(fused)
    assert after["conv"] == before["conv"] == 4  # the stem and one conv per block
    assert after["add"] == before["add"] + 3  # one add per block kept apart
    assert after["mul"] == before["mul"] + muls  # "scalar" moved its scales: no multiply
    assert sum(1 for b in fused.buffers()) >= muls


def test_scalar_scales_land_in_the_layers_around():
    """The three scales travel through ReLU between the blocks, and the chain's total
    lands in a layer at one end: the stem (its output stored as ``y * total``) or the
    linear head after the mean (its input stored as ``z / total``); both have their
    weights multiplied by the product of the scales."""
    model, x = _model(Stack(blocks=3))
    floated = reparam_fx.fuse(model)
    fused = reparam_fx.fuse(model, target=SCALAR)
    deltas = [d.delta for d in fused.fusion_report.int8.decisions]
    assert all(d > 0 for d in deltas) and len(deltas) == 3
    total = deltas[0] * deltas[1] * deltas[2]
    stem = [m for name, m in fused.named_modules() if name.startswith("stem")
            and isinstance(m, nn.Conv2d)][0]
    float_stem = [m for name, m in floated.named_modules() if name.startswith("stem")
                  and isinstance(m, nn.Conv2d)][0]
    head_ratio = fused.head.weight / floated.head.weight
    stem_ratio = stem.weight / float_stem.weight
    in_head = torch.allclose(head_ratio, torch.full_like(head_ratio, total), rtol=1e-9)
    in_stem = torch.allclose(stem_ratio, torch.full_like(stem_ratio, total), rtol=1e-9)
    assert in_head != in_stem, (head_ratio.flatten()[:3], stem_ratio.flatten()[:3], total)
    assert total != pytest.approx(1.0)


def test_the_model_and_the_float_fusion_are_not_modified():
    model, x = _model(Stack())
    before = copy.deepcopy(model.state_dict())
    floated = reparam_fx.fuse(model)
    float_state = copy.deepcopy(floated.state_dict())
    apply_int8_policy(floated, policy=EVERYWHERE)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(float_state[k], v) for k, v in floated.state_dict().items())
    assert not hasattr(floated.fusion_report, "int8")


def test_default_float_target_is_unchanged():
    model, x = _model(Stack())
    default, explicit = reparam_fx.fuse(model), reparam_fx.fuse(model, target="float")
    assert str(default.graph) == str(explicit.graph)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(),
                                                  explicit.state_dict().values()))


# ---- where the scale cannot move (negative cases) -------------------------------------

@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU6, nn.GELU, nn.Hardswish])
def test_no_scale_through_a_non_homogeneous_activation(act):
    """ReLU6, SiLU, GELU, hardswish: ``f(s z) != s f(z)``, so a scalar cannot pass. The
    first block's scale still moves backwards, into the stem before it (a ReLU, then a
    conv); the second block sits between two such activations: refused. The per-channel form needs no move."""
    model, x = _model(Stack(blocks=2, act=act, head=False))
    fused = reparam_fx.fuse(model, target=SCALAR)
    assert _error(model, fused, x) < RTOL
    first, second = fused.fusion_report.int8.decisions
    assert first.mode == "scalar"
    assert second.mode == "merged"
    assert "its scale cannot move: its input and its output both keep scale 1" in second.reason
    assert f"it is blocks_0_act ({act.__name__})'s output" in second.reason
    assert f"it reaches blocks_1_act ({act.__name__}), which needs unscaled values" in second.reason
    assert _ops(fused)["add"] == 1
    channel = reparam_fx.fuse(model, target=CHANNEL)
    assert [d.mode for d in channel.fusion_report.int8.decisions] == ["channel", "channel"]
    assert _error(model, channel, x) < RTOL


class ResidualAround(nn.Module):
    """``relu(block(x)) + x``: the outer residual ties the block's output to its input."""

    def __init__(self, channels=8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = RepBlock(channels)
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(self.block(x) + x)


def test_no_scale_around_a_residual():
    model, x = _model(ResidualAround())
    fused = reparam_fx.fuse(model, target=SCALAR)
    assert _error(model, fused, x) < RTOL
    (decision,) = fused.fusion_report.int8.decisions
    assert decision.mode == "merged" and "residual" in decision.reason


class Plain(nn.Module):
    """Convs that hold no identity worth extracting, and some that hold none at all."""

    def __init__(self):
        super().__init__()
        self.square = nn.Conv2d(8, 8, 3, padding=1)  # square, but no large centre taps
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.wider = nn.Conv2d(8, 16, 3, padding=1)
        self.valid = nn.Conv2d(16, 16, 3)  # unpadded

    def forward(self, x):
        return self.valid(torch.relu(self.wider(self.strided(torch.relu(self.square(x))))))


def test_no_gain_no_extraction_and_no_identity_not_listed():
    model = Plain().eval().double()
    x = torch.randn(1, 8, 12, 12, dtype=D)
    fused = reparam_fx.fuse(model, target=EVERYWHERE)
    (decision,) = fused.fusion_report.int8.decisions
    assert decision.conv == "square" and decision.mode == "merged"
    assert "gains" in decision.reason and "< 1 dB" in decision.reason
    assert _error(model, fused, x) < RTOL and _ops(fused)["add"] == 0


def test_budget_falls_back_to_the_cheaper_form_then_to_merging():
    """16 channels, 3x3: an add costs 40/144 = 28% of the conv (the default add_cost)."""
    model, x = _model(Stack(blocks=2))
    forced = dict(min_gain_db=-math.inf)
    decisions = reparam_fx.fuse(model, target=Int8Policy(budget=0.3, **forced)) \
        .fusion_report.int8.decisions
    assert [d.mode for d in decisions] == ["scalar", "scalar"]
    only_channel = reparam_fx.fuse(model, target=Int8Policy(budget=0.3, modes=("channel",), **forced))
    for decision in only_channel.fusion_report.int8.decisions:
        assert decision.mode == "merged"
        assert "channel: its ops would cost 55.6% of the conv (budget 30%" in decision.reason
    merged = reparam_fx.fuse(model, target=Int8Policy(**forced)).fusion_report.int8.decisions
    assert [d.mode for d in merged] == ["merged", "merged"]
    assert all("would cost 27.8% of the conv (budget 10%" in d.reason for d in merged)


class HeavyHead(nn.Module):
    """Two cheap RepVGG blocks before a conv 16x their cost: the blocks' added ops are
    28% / 56% of their own convs' but a few percent of the program."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(RepBlock(16), RepBlock(16))
        self.head = nn.Conv2d(16, 256, 3, padding=1)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))))


@pytest.mark.parametrize("capture", ["example_inputs", "export"])
def test_with_shapes_the_budget_is_the_programs(capture):
    model, x = _model(HeavyHead())
    forced = Int8Policy(min_gain_db=-math.inf, modes=("channel",))  # the default 10% budget
    local = reparam_fx.fuse(model, target=forced).fusion_report.int8
    assert not local.sized and [d.mode for d in local.decisions] == ["merged", "merged"]
    fused = (reparam_fx.fuse(model, x, target=forced) if capture == "example_inputs" else
             reparam_fx.fuse(torch.export.export(model, (x,)), target=forced))
    report = fused.fusion_report.int8
    assert report.sized and "of the program" in report.table()
    assert [d.mode for d in report.decisions] == ["channel", "channel"]
    assert _error(model, fused, x) < RTOL


# ---- calibration -----------------------------------------------------------------------

def test_calibration_measures_and_stays_exact():
    model, x = _model(Stack(blocks=3))
    calibration = [torch.randn(2, 3, 12, 12, dtype=D, generator=torch.Generator().manual_seed(i))
                   for i in range(3)]
    fused = reparam_fx.fuse(model, target=EVERYWHERE, calibration=calibration)
    report = fused.fusion_report.int8
    assert report.calibrated
    assert all(set(d.measured_db) == {"scalar", "channel"} for d in report.decisions)
    assert _error(model, fused, x) < RTOL
    assert "measured" in report.table()


def test_bad_targets_and_calibration_are_clear_errors():
    model, _ = _model(Stack())
    with pytest.raises(FusionError, match="target must be one of 'float', 'int8'"):
        reparam_fx.fuse(model, target="int4")
    with pytest.raises(FusionError, match="calibration= is for target='int8' only"):
        reparam_fx.fuse(model, calibration=[torch.randn(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="calibration"):
        reparam_fx.fuse(model, target="int8", calibration=[])


# ---- int8 accuracy: the policy beats full fusion where full fusion loses ----------------

def test_policy_beats_full_fusion_in_int8():
    from reparam_fx.int8.quantize import int8_sqnr
    torch.manual_seed(0)
    model = trained_like(Stack(channels=32, blocks=4, head=False).eval(),
                         torch.randn(1, 3, 16, 16), seed=3)
    generator = torch.Generator().manual_seed(5)
    calibration = [torch.randn(1, 3, 16, 16, generator=generator) for _ in range(4)]
    test = [torch.randn(1, 3, 16, 16, generator=generator) for _ in range(2)]
    full = int8_sqnr(reparam_fx.fuse(model), calibration, test, reference=model)
    kept = int8_sqnr(reparam_fx.fuse(model, target=CHANNEL), calibration, test, reference=model)
    assert kept > full + 3.0, (kept, full)


def test_batchnorm_roles():
    model = Stack(blocks=1).eval()
    roles = batchnorm_roles(model, torch.randn(1, 3, 8, 8))
    assert roles == {"blocks.0.dense.1": "conv", "blocks.0.point.1": "conv",
                     "blocks.0.identity": "identity"}


# ---- every rewrite is exact: generated blocks, chained, in every form ------------------

@settings(deadline=None)
@given(first=block_specs(dims=(1, 2), max_channels=6), second=block_specs(dims=(1, 2), max_channels=6),
       seed=st.integers(0, 2**16 - 1), form=st.sampled_from([SCALAR, CHANNEL, EVERYWHERE]))
def test_generated_blocks_stay_exact(first, second, seed, form):
    """Two generated multi-branch blocks (RepVGG, MobileOne, ACNet, RepMixer, CPE-like,
    nonlinear or not), the second fed by the first where their shapes allow: whatever the
    policy keeps apart and wherever the scales move, the function is the same."""
    note(first.describe())
    block = first.build(seed=seed).double()
    x = first.example_input(seed=seed).double()
    with torch.no_grad():
        y = block(x)
    model = block
    if second.dims == first.dims and second.in_channels == y.shape[1]:
        note(second.describe())
        model = nn.Sequential(block, nn.ReLU(), second.build(seed=seed + 1).double()).eval()
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError:  # (the second block does not take the first's output size)
            model = block
    fused = reparam_fx.fuse(model, target=form)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)) < RTOL
    report = fused.fusion_report.int8
    floated = reparam_fx.fuse(model)
    assert _ops(fused)["add"] == _ops(floated)["add"] + len(report.kept_apart)
    channel = sum(d.mode == "channel" for d in report.decisions)
    assert _ops(fused)["mul"] == _ops(floated)["mul"] + channel


# ---- divisions, gates and tied weights (negative cases of the scale rules) --------------

class After(nn.Module):
    """A block whose output goes through ``op`` to a conv: ``op`` decides whether the
    block's scale can travel into that conv."""

    def __init__(self, op):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = RepBlock(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.op = op

    def forward(self, x):
        return self.head(self.op(self.block(torch.relu(self.stem(x)))))


@pytest.mark.parametrize("op,moves", [
    (lambda y: y / 2.0, True),                      # a constant divisor: linear
    (lambda y: y * torch.sigmoid(torch.ones(1, 1, 1, 1, dtype=y.dtype)), True),  # a gate
    # squeeze-excitation: the gate reads y itself, and sigmoid(s z) != sigmoid(z)
    (lambda y: y * torch.sigmoid(y.mean((2, 3), keepdim=True)), False),
    (lambda y: y / (1 + torch.sigmoid(y)), False),  # a divisor that reads y: not a gate
    (lambda y: 2.0 / (y + 1), False),               # c / x scales as 1/s
    (lambda y: torch.sigmoid(y) / (y + 1), False),  # a gate over a scaled divisor
    (lambda y: torch.div(y, 3.0, rounding_mode="floor"), False),
    (lambda y: torch.relu(y - 1.0), False),         # a constant added (no conv to take it)
])
def test_scales_through_products_and_divisions(op, moves):
    """The stem can always absorb the block's scale backwards, so the block is refused
    only when both sides are pinned: here the stem's side is made unscaled by a SiLU."""
    model, x = _model(After(op))
    model.stem = nn.Sequential(model.stem, nn.SiLU()).double()  # pins the block's input
    fused = reparam_fx.fuse(model, target=SCALAR)
    assert _error(model, fused, x) < RTOL
    (decision,) = fused.fusion_report.int8.decisions
    assert (decision.mode == "scalar") == moves, decision.reason


class Tied(nn.Module):
    """Two RepVGG blocks; the head conv's weight is shared with another conv (weight
    tying): scaling one would scale the other."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = RepBlock(8)
        self.head = nn.Conv2d(8, 8, 1)
        self.twin = nn.Conv2d(8, 8, 1)
        self.twin.weight = self.head.weight

    def forward(self, x):
        y = self.block(torch.nn.functional.silu(self.stem(x)))
        return self.head(y) + self.twin(torch.nn.functional.silu(x.mean(1, keepdim=True)
                                                                 .expand(-1, 8, -1, -1)))


def test_tied_weights_are_not_rescaled():
    model, x = _model(Tied())
    fused = reparam_fx.fuse(model, target=SCALAR)
    assert _error(model, fused, x) < RTOL
    (decision,) = fused.fusion_report.int8.decisions
    assert decision.mode == "merged" and "both keep scale 1" in decision.reason
    assert fused.head.weight is fused.twin.weight


@pytest.mark.parametrize("function,rule", [
    (lambda x: x / 2.0, "tie"), (lambda x: x * 3.0, "tie"), (lambda x: 3.0 * x, "tie"),
    (lambda x: 2.0 / x, None),  # scales as 1/s
    (lambda x: torch.div(x, 2.0, rounding_mode="floor"), None),
    (lambda x: x / torch.sigmoid(x), "divisor gate"), (lambda x: x * torch.sigmoid(x), "gate"),
    (lambda x: x + 1.0, None), (lambda x: x - x.mean(), "tie"),
])
def test_scale_rules_of_arithmetic(function, rule):
    from reparam_fx.int8.graph import _scale_rule

    class Op(nn.Module):
        def forward(self, x):
            return function(x)
    gm = torch.fx.symbolic_trace(Op())
    last = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    assert _scale_rule(gm, last) == rule
