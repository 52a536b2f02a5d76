"""One positive and one negative test per folding rule of the torch.fx frontend.

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
import torch.nn.functional as F

import reparam_fx
from fx_checks import (RTOL, assert_reason, assert_state_unchanged, fuse_exactly, fuse_refused,
                       fused_modules, randomized, snapshot)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def image(channels=4, size=8, dims=2, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *(size,) * dims, generator=generator)


class ConvBN(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, dims=2, padding_mode="zeros"):
        super().__init__()
        if padding is None:
            padding = dilation * (kernel - 1) // 2
        self.conv = CONV[dims](cin, cout, kernel, stride, padding, dilation, groups, bias=bias,
                               padding_mode=padding_mode)
        self.bn = BATCHNORM[dims](cout)

    def forward(self, x):
        return self.bn(self.conv(x))


# ---- 1. conv + BatchNorm --------------------------------------------------------------

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


# ---- 2. RepVGG ------------------------------------------------------------------------

class RepVGGBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN (+ BN identity when shapes allow), summed."""

    def __init__(self, cin=4, cout=4, stride=1):
        super().__init__()
        self.rbr_dense = ConvBN(cin, cout, 3, stride)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride)
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return out


@pytest.mark.parametrize("stride, cout", [(1, 4), (2, 8)])
def test_repvgg_merges(stride, cout):
    fuse_exactly(RepVGGBlock(4, cout, stride), image(4, 8),
                 ops={"conv": 1, "batch_norm": 0, "add": 0}, patterns={"repvgg": 1})


class MisalignedBranches(nn.Module):
    """3x3 padding 0 and 1x1 padding 0, both stride 3: same output size on 9x9 inputs, but
    centre offsets -1 and 0, so the outputs are shifted against each other."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(4, 4, 3, stride=3, padding=0)
        self.b = ConvBN(4, 4, 1, stride=3, padding=0)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_repvgg_refuses_different_centre_offsets():
    fused = fuse_refused(MisalignedBranches(), image(4, 9), unchanged=("conv", "add"),
                         reason="centre offset", ops={"batch_norm": 0})
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 2}


# ---- 3. MobileOne ---------------------------------------------------------------------

class MobileOneBlock(nn.Module):
    def __init__(self, channels=4, k=4):
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(channels)
        self.rbr_scale = ConvBN(channels, channels, 1)
        self.rbr_conv = nn.ModuleList(ConvBN(channels, channels, 3) for _ in range(k))

    def forward(self, x):
        out = self.rbr_skip(x)
        out += self.rbr_scale(x)
        for branch in self.rbr_conv:
            out += branch(x)
        return out


def test_mobileone_merges():
    fuse_exactly(MobileOneBlock(), image(4, 8),
                 ops={"conv": 1, "batch_norm": 0, "add": 0}, patterns={"mobileone": 1})



# ---- 4. large + small kernel ----------------------------------------------------------

class LargeSmallKernel(nn.Module):
    """Depthwise 7x7 + depthwise 3x3, both stride 2 (RepLKNet / FastViT stem)."""

    def __init__(self, channels=4, stride=2):
        super().__init__()
        self.large = ConvBN(channels, channels, 7, stride, groups=channels)
        self.small = ConvBN(channels, channels, 3, stride, groups=channels)

    def forward(self, x):
        return self.large(x) + self.small(x)


def test_large_and_small_kernel_merge():
    fused = fuse_exactly(LargeSmallKernel(), image(4, 10),
                         ops={"conv": 1, "batch_norm": 0, "add": 0},
                         patterns={"large+small kernel": 1})
    (conv,) = fused_modules(fused)
    assert conv.kernel_size == (7, 7) and conv.groups == 4 and conv.stride == (2, 2)


# ---- 5. mixed groups ------------------------------------------------------------------

class TwoBranches(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.first(x) + self.second(x)


def test_mixed_groups_merge_into_the_finest_common_grouping():
    model = TwoBranches(ConvBN(8, 8, 3, groups=2), ConvBN(8, 8, 1, groups=4))
    fused = fuse_exactly(model, image(8, 6), ops={"conv": 1, "batch_norm": 0, "add": 0},
                         patterns={"repvgg": 1})
    (conv,) = fused_modules(fused)
    assert conv.groups == 2 and conv.kernel_size == (3, 3)


def test_depthwise_plus_dense_refused_on_macs():
    model = TwoBranches(ConvBN(8, 8, 3, groups=8), ConvBN(8, 8, 1))
    fused = fuse_refused(model, image(8, 6), unchanged=("conv", "add"), reason="MACs",
                         ops={"batch_norm": 0})
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 2}


# ---- 6. RepMixer ----------------------------------------------------------------------

class RepMixer(nn.Module):
    """FastViT: ``x + layer_scale * (mixer(x) - norm(x))``."""

    def __init__(self, channels=4):
        super().__init__()
        self.mixer_dw3 = ConvBN(channels, channels, 3, groups=channels)
        self.mixer_dw1 = ConvBN(channels, channels, 1, groups=channels)
        self.mixer_skip = nn.BatchNorm2d(channels)
        self.norm = nn.BatchNorm2d(channels)
        self.layer_scale = nn.Parameter(1e-5 * torch.ones(channels, 1, 1))

    def mixer(self, x):
        return self.mixer_dw3(x) + self.mixer_dw1(x) + self.mixer_skip(x)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


def test_repmixer_merges():
    fused = fuse_exactly(RepMixer(), image(4, 8),
                         ops={"conv": 1, "batch_norm": 0, "add": 0, "sub": 0, "mul": 0},
                         patterns={"repmixer": 1})
    (conv,) = fused_modules(fused)
    assert conv.groups == 4 and conv.kernel_size == (3, 3)


def test_repmixer_with_spatial_layer_scale_is_not_a_single_conv():
    model = RepMixer()
    model.layer_scale = nn.Parameter(torch.randn(1, 1, 8, 8))  # varies over H and W
    # mixer(x) - norm(x) still merges into one conv; the scale and the outer add stay
    fuse_refused(model, image(4, 8), unchanged=("mul",), reason="per-channel",
                 ops={"conv": 1, "batch_norm": 0, "sub": 0, "add": 1})


# ---- 7. CPE ---------------------------------------------------------------------------

class CPE(nn.Module):
    """Conditional positional encoding: ``x + dwconv7x7(x)`` with a bias."""

    def __init__(self, channels=4):
        super().__init__()
        self.pe = nn.Conv2d(channels, channels, 7, padding=3, groups=channels, bias=True)

    def forward(self, x):
        return x + self.pe(x)


def test_cpe_merges():
    fuse_exactly(CPE(), image(4, 8), ops={"conv": 1, "add": 0}, patterns={"cpe": 1})


def test_cpe_with_reflect_padding_does_not_merge():
    model = CPE()
    model.pe.padding_mode = "reflect"
    fuse_refused(model, image(4, 8), unchanged=("conv", "add"), reason="padding_mode")


# ---- 8. per-channel constants after a conv --------------------------------------------

class ConvThen(nn.Module):
    """A conv (with BN) followed by one elementwise op with a constant."""

    def __init__(self, op: str, constant_shape=(4, 1, 1), bn=True, constant=None):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        generator = torch.Generator().manual_seed(3)
        if constant is None:
            constant = torch.rand(constant_shape, generator=generator) + 0.5
        if op == "layer_scale":
            self.layer_scale = nn.Parameter(constant)
        else:
            self.register_buffer("constant", constant)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.op == "layer_scale":
            return y * self.layer_scale
        if self.op == "mul_float":
            return y * 0.75
        if self.op == "rmul_float":
            return -1.5 * y
        if self.op == "div":
            return y / self.constant
        if self.op == "div_float":
            return y / 4.0
        if self.op == "add":
            return y + self.constant
        if self.op == "radd":
            return self.constant + y
        if self.op == "sub":
            return y - self.constant
        if self.op == "rsub":
            return self.constant - y
        if self.op == "neg":
            return -y
        raise ValueError(self.op)


@pytest.mark.parametrize("op, gone", [
    ("layer_scale", "mul"), ("mul_float", "mul"), ("rmul_float", "mul"), ("div", "div"),
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


def test_spatially_varying_constant_refused():
    fuse_refused(ConvThen("layer_scale", constant_shape=(1, 1, 6, 6)), image(4, 6),
                 unchanged=("mul",), ops={"conv": 1, "batch_norm": 0}, reason="per-channel")


def test_constant_on_the_wrong_axis_refused():
    # (C, 1) broadcasts along H of an NCHW tensor (H == C here), not along channels
    fuse_refused(ConvThen("layer_scale", constant_shape=(4, 1)), image(4, 4),
                 unchanged=("mul",), ops={"conv": 1, "batch_norm": 0}, reason="axes")


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


# ---- 9. BatchNorm (or a scale) before a conv ------------------------------------------

class BeforeConv(nn.Module):
    def __init__(self, kernel, pre="bn"):
        super().__init__()
        self.pre = pre
        self.bn = nn.BatchNorm2d(4)
        self.layer_scale = nn.Parameter(torch.ones(4, 1, 1))
        self.conv = nn.Conv2d(4, 6, kernel, padding=kernel // 2)

    def forward(self, x):
        x = self.bn(x) if self.pre == "bn" else x * self.layer_scale
        return self.conv(x)


def test_bn_before_unpadded_conv_folds():
    fuse_exactly(BeforeConv(1), image(4, 6), ops={"conv": 1, "batch_norm": 0},
                 patterns={"conv+bn": 1})


def test_bn_before_zero_padded_conv_refused():
    fuse_refused(BeforeConv(3), image(4, 6), unchanged=("conv", "batch_norm"),
                 reason="zero-padded conv")


def test_scale_only_before_zero_padded_conv_folds():
    fuse_exactly(BeforeConv(3, pre="scale"), image(4, 6), ops={"conv": 1, "mul": 0},
                 patterns={"layer scale": 1})


# ---- 10. BatchNorm1d and Linear -------------------------------------------------------

class FlattenBNLinear(nn.Module):
    def __init__(self, features=16, out=5, bn_first=True):
        super().__init__()
        self.bn_first = bn_first
        self.bn = nn.BatchNorm1d(features if bn_first else out)
        self.linear = nn.Linear(features, out)

    def forward(self, x):
        x = torch.flatten(x, 1)
        if self.bn_first:
            return self.linear(self.bn(x))
        return self.bn(self.linear(x))


@pytest.mark.parametrize("bn_first", [True, False])
def test_bn1d_and_linear_fold(bn_first):
    fuse_exactly(FlattenBNLinear(bn_first=bn_first), image(4, 2),
                 ops={"linear": 1, "batch_norm": 0}, patterns={"bn+linear": 1})


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


class BNOverChannelsLinearOverLength(nn.Module):
    """(N, C, L) -> BatchNorm1d(C) acts on axis 1, Linear(L, k) on axis -1."""

    def __init__(self, channels=4, length=7, out=3):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.linear = nn.Linear(length, out)

    def forward(self, x):
        return self.linear(self.bn(x))


def test_bn1d_and_linear_on_different_axes_refused():
    x = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    fuse_refused(BNOverChannelsLinearOverLength(), x, unchanged=("linear", "batch_norm"),
                 reason="axes", pass_inputs=True)


# ---- 11. averaged linear heads --------------------------------------------------------

class DistilledHead(nn.Module):
    """RepViT / LeViT classifier: BN1d + Linear twice, averaged."""

    def __init__(self, features=8, classes=5):
        super().__init__()
        self.head = nn.Sequential(nn.BatchNorm1d(features), nn.Linear(features, classes))
        self.head_dist = nn.Sequential(nn.BatchNorm1d(features), nn.Linear(features, classes))

    def forward(self, x):
        x = torch.flatten(x, 1)
        return (self.head(x) + self.head_dist(x)) / 2


def test_averaged_linear_heads_merge():
    fuse_exactly(DistilledHead(), image(8, 1),
                 ops={"linear": 1, "batch_norm": 0, "add": 0, "div": 0},
                 patterns={"linear heads": 1})


def test_linear_heads_of_different_inputs_do_not_merge():
    class TwoInputs(DistilledHead):
        def forward(self, x):
            x = torch.flatten(x, 1)
            return (self.head(x) + self.head_dist(torch.relu(x))) / 2

    fused = fuse_refused(TwoInputs(), image(8, 1), unchanged=("linear", "add"), reason=None,
                         ops={"batch_norm": 0})
    assert fused.fusion_report.pattern_counts() == {"bn+linear": 2}


# ---- 12. average pooling --------------------------------------------------------------

class PoolBN(nn.Module):
    def __init__(self, pool: nn.Module, channels=4):
        super().__init__()
        self.pool = pool
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.pool(x))


def test_avg_pool_with_bn_becomes_a_depthwise_conv():
    # check_macs=False: count_macs does not count pooling, so the conv looks new
    fused = fuse_exactly(PoolBN(nn.AvgPool2d(3, 1, 1)), image(4, 7), pass_inputs=True,
                         check_macs=False,
                         ops={"conv": 1, "avg_pool": 0, "batch_norm": 0},
                         patterns={"avgpool": 1})
    (conv,) = fused_modules(fused)
    assert conv.groups == 4 and conv.kernel_size == (3, 3) and conv.padding == (1, 1)


def test_avg_pool_after_conv_needs_no_example_inputs():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.AvgPool2d(2, 2), nn.BatchNorm2d(4))
    fuse_exactly(model, image(4, 8), ops={"conv": 1, "avg_pool": 0, "batch_norm": 0},
                 check_macs=False)


@pytest.mark.parametrize("pool, phrase", [
    (nn.AvgPool2d(3, 1, 1, count_include_pad=False), "count_include_pad"),
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True), "ceil_mode"),
])
def test_avg_pool_refused(pool, phrase):
    fuse_refused(PoolBN(pool), image(4, 8), unchanged=("avg_pool", "batch_norm"),
                 ops={"conv": 0}, reason=phrase, pass_inputs=True)


# ---- 13. explicit zero padding --------------------------------------------------------

class PadConv(nn.Module):
    def __init__(self, pad: str):
        super().__init__()
        self.pad = pad
        self.zero_pad = nn.ZeroPad2d(1)
        self.conv = nn.Conv2d(4, 6, 3, padding=0)

    def forward(self, x):
        if self.pad == "module":
            x = self.zero_pad(x)
        elif self.pad == "functional":
            x = F.pad(x, (1, 1, 1, 1))
        elif self.pad == "asymmetric":
            x = F.pad(x, (0, 1, 0, 1))
        elif self.pad == "reflect":
            x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return self.conv(x)


@pytest.mark.parametrize("pad", ["module", "functional"])
def test_zero_pad_folds_into_conv(pad):
    fused = fuse_exactly(PadConv(pad), image(4, 6), ops={"conv": 1, "pad": 0},
                         patterns={"zero-pad": 1})
    (conv,) = fused_modules(fused)
    assert conv.padding == (1, 1) and conv.padding_mode == "zeros"


def test_asymmetric_zero_pad_alone_is_not_rewritten():
    """A pad with unequal sides and the conv after it, nothing else: the conv would be
    written again with the same pad before it (no conv module pads unequally unless it is
    PyTorch's "same"), so the graph stays as it was."""
    fused = fuse_refused(PadConv("asymmetric"), image(4, 6), unchanged=("conv", "pad"),
                         reason=None)
    assert not fused.fusion_report.fused


def test_reflect_pad_not_folded():
    fused = fuse_refused(PadConv("reflect"), image(4, 6), unchanged=("conv", "pad"),
                         reason=None)
    assert not fused.fusion_report.fused


# ---- 14. conv compositions ------------------------------------------------------------

class TwoConvs(nn.Module):
    def __init__(self, first: nn.Conv2d, second: nn.Conv2d):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(self.first(x))


def test_kxk_then_reducing_1x1_composes():
    fused = fuse_exactly(TwoConvs(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)),
                         image(8, 6), ops={"conv": 1}, patterns={"conv composition": 1})
    (conv,) = fused_modules(fused)
    assert conv.out_channels == 2 and conv.kernel_size == (3, 3)


def test_1x1_without_bias_then_padded_kxk_composes():
    fuse_exactly(TwoConvs(nn.Conv2d(4, 8, 1, bias=False), nn.Conv2d(8, 4, 3, padding=1)),
                 image(4, 6), ops={"conv": 1}, patterns={"conv composition": 1})


def test_1x1_with_bias_before_padded_kxk_refused():
    fuse_refused(TwoConvs(nn.Conv2d(4, 8, 1, bias=True), nn.Conv2d(8, 4, 3, padding=1)),
                 image(4, 6), unchanged=("conv",), reason="bias")


def test_kxk_then_expanding_1x1_refused_on_macs():
    fuse_refused(TwoConvs(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 16, 1)),
                 image(4, 6), unchanged=("conv",), reason="MACs")
