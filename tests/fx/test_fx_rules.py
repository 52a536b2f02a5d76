"""torch.fx-specific rule tests: what only ``fuse(module)`` / ``fuse(GraphModule)`` has.

Every rule's positive and negative case, through ``fuse(module)``, ``fuse(export)`` and the
ONNX frontend alike, is in the rule table (``tests/rules``). Here: the conv+BN sweep over
1d/2d/3d, strides, dilations, groups and bias (with the fused conv's attributes), rank
proofs (``torch._assert``, ``example_inputs``), BatchNorms in training mode or without
running statistics, the Python operator forms of per-channel constants (``-y``,
``c - y``, ``y / 4.0``, ...), division by a constant with zeros (infinite outputs), and
``F.pad`` as well as ``nn.ZeroPad2d`` before a conv (one op for the other captures).

Positive: the fold happened (``op_counts`` / ``pattern_counts``) and the fused float64
model equals the original within ``RTOL``. Negative: the fold was refused (the relevant op
counts are unchanged), outputs still equal, and the report says why. The checks, and the
randomisation of BatchNorm statistics / affine parameters / layer scales they always do,
are in ``fx_checks.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn as nn

import reparam_fx
from fx_checks import (RTOL, assert_reason, assert_state_unchanged, fuse_exactly, fuse_refused,
                       fused_modules, randomized, snapshot)
from rules.rule_table import CONV, ConvBN, ConvThen, PadConv, image


# ---- 1. conv + BatchNorm -----------------------------------------------------------------

@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride, dilation, groups, bias", [
    (1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, False), (2, 2, 4, True),
])
def test_conv_bn_folds(dims, stride, dilation, groups, bias):
    model = ConvBN(4, 8, 3, stride=stride, dilation=dilation, groups=groups, bias=bias, dims=dims)
    # BatchNorm2d/3d prove a 4-/5-D input; BatchNorm1d takes (N, C) and (N, C, L), and a
    # Conv1d's output may be (C, L): only the example inputs prove the rank
    fused = fuse_exactly(model, image(4, 9 if dims < 3 else 7, dims), pass_inputs=dims == 1,
                         ops={"conv": 1, "batch_norm": 0}, patterns={"conv+bn": 1})
    (conv,) = fused_modules(fused, CONV[dims])
    assert conv.groups == groups and conv.stride == (stride,) * dims
    assert conv.dilation == (dilation,) * dims and conv.bias is not None


class AssertedConvBN1d(ConvBN):
    """A BatchNorm1d after a Conv1d, with the rank asserted as timm asserts it."""

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 3, "expected (N, C, L)")
        return self.bn(y)


def test_conv1d_bn1d_needs_a_rank_proof():
    # unbatched, a Conv1d gives (C, L) and BatchNorm1d would normalise L: not the conv's axis
    fused = fuse_refused(ConvBN(4, 8, 3, dims=1), image(4, 9, 1), unchanged=("batch_norm",),
                         reason="rank")
    assert "example_inputs" in " ".join(fused.fusion_report.skip_reasons())
    fuse_exactly(AssertedConvBN1d(4, 8, 3, dims=1), image(4, 9, 1),
                 ops={"conv": 1, "batch_norm": 0}, patterns={"conv+bn": 1})


def test_conv_bn_refused_when_bn_is_training_inside_graph_module():
    model = randomized(ConvBN(4, 8, 3)).double()
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    traced.bn.train()
    before = snapshot(traced)
    fused = reparam_fx.fuse(traced)
    assert_state_unchanged(before, traced)
    assert reparam_fx.op_counts(fused)["batch_norm"] == 1
    assert_reason(fused, "training mode")
    x = image(4, 8).double()
    reparam_fx.verify(traced, fused, (x,), rtol=RTOL)
    assert_state_unchanged(before, traced)


def test_conv_bn_refused_without_running_statistics():
    model = ConvBN(4, 8, 3)
    model.bn = nn.BatchNorm2d(8, track_running_stats=False)
    randomized(model)
    with torch.no_grad():  # randomize_batchnorm_ skips BNs without running statistics
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.normal_()
    fuse_refused(model, image(), unchanged=("conv", "batch_norm"), reason="running statistics",
                 already_randomized=True)


def test_fuse_of_a_training_model_raises():
    model = ConvBN(4, 8, 3).train()
    with pytest.raises(reparam_fx.FusionError, match=r"eval\(\)"):
        reparam_fx.fuse(model)


# ---- 2. per-channel constants after a conv: Python's operator forms ----------------------

# (``y * layer_scale`` is the rule table's case)
@pytest.mark.parametrize("op, gone", [
    ("mul_float", "mul"), ("rmul_float", "mul"), ("div", "div"),
    ("div_float", "div"), ("add", "add"), ("radd", "add"), ("sub", "sub"), ("rsub", "sub"),
    ("neg", None),
])
def test_per_channel_constant_after_conv_folds(op, gone):
    ops = {"conv": 1, "batch_norm": 0}
    if gone:
        ops[gone] = 0
    fused = fuse_exactly(ConvThen(op), image(4, 6), ops=ops)
    assert len(fused.fusion_report.fused) == 1
    assert [n.op for n in fused.graph.nodes] == ["placeholder", "call_module", "output"]


def test_division_by_a_constant_with_zeros_refused():
    model = randomized(ConvThen("div", constant=torch.tensor([1.0, 0.0, 2.0, -0.5]).view(4, 1, 1)))
    model64 = copy.deepcopy(model).double()
    fused = reparam_fx.fuse(model64)
    assert_reason(fused, "zero")
    assert reparam_fx.op_counts(fused)["div"] == 1
    x = image(4, 6).double()
    with torch.no_grad():
        # channel 1 is +-inf in both; compare everything, infinities included
        torch.testing.assert_close(fused(x), model64(x), rtol=RTOL, atol=0.0, equal_nan=True)


# ---- 3. Linear then BatchNorm1d on a 2-D input: example inputs prove the rank ------------

class PlainLinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.linear(x))


def test_linear_then_bn1d_on_a_2d_input_with_example_inputs():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    fuse_exactly(PlainLinearBN(), x, ops={"linear": 1, "batch_norm": 0},
                 patterns={"bn+linear": 1}, pass_inputs=True)


# ---- 4. zero padding written with F.pad (the rule table's case is nn.ZeroPad2d) ----------

def test_functional_zero_pad_folds_into_conv():
    fused = fuse_exactly(PadConv("functional"), image(4, 6), ops={"conv": 1, "pad": 0},
                         patterns={"zero-pad": 1})
    (conv,) = fused_modules(fused)
    assert conv.padding == (1, 1) and conv.padding_mode == "zeros"
