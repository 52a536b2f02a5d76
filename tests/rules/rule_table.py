"""The rule table: every folding rule once, as the torch code that spells it.

Each :class:`Case` is one torch module (the code shape of the rule), the shape of an
example input, and what fusing must give: for a positive case the op counts after fusion
(and the fused conv's geometry), for a negative one the op categories that stay as they
were and a phrase of the report's reason. ``tests/rules/test_rules.py`` runs every case
through the three frontends: ``fuse(module)``, ``fuse(torch.export.export(module, args))``
and ``fuse_onnx_model`` on the module's ONNX export.

Where a frontend legitimately differs, the case says so per frontend, with the reason
(:class:`Differs`): nothing is skipped silently.

The module classes here are also the building blocks of other torch tests
(``from rules.rule_table import ConvBN, RepVGGBlock, ...``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def image(channels=4, size=8, dims=2, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *(size,) * dims, generator=generator)


# ---- the code shapes ---------------------------------------------------------------------

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


class ConvReluBN(ConvBN):
    """A nonlinearity between the conv and its BatchNorm: nothing to fold."""

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


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


class BranchDifference(nn.Module):
    """``BN(conv3x3(x)) - conv1x1(x)``: a difference of two conv branches, no identity."""

    def __init__(self, channels=4):
        super().__init__()
        self.dense = ConvBN(channels, channels, 3)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x):
        return self.dense(x) - self.pointwise(x)


class MisalignedBranches(nn.Module):
    """3x3 padding 0 and 1x1 padding 0, both stride 3: same output size on 9x9 inputs, but
    centre offsets -1 and 0, so the outputs are shifted against each other."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(4, 4, 3, stride=3, padding=0)
        self.b = ConvBN(4, 4, 1, stride=3, padding=0)

    def forward(self, x):
        return self.a(x) + self.b(x)


class MobileOneBlock(nn.Module):
    def __init__(self, channels=4, k=4, groups=1):
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(channels)
        self.rbr_scale = ConvBN(channels, channels, 1, groups=groups)
        self.rbr_conv = nn.ModuleList(ConvBN(channels, channels, 3, groups=groups)
                                      for _ in range(k))

    def forward(self, x):
        out = self.rbr_skip(x)
        out += self.rbr_scale(x)
        for branch in self.rbr_conv:
            out += branch(x)
        return out


class TwoBranches(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.first(x) + self.second(x)


class LargeSmallKernel(TwoBranches):
    """Depthwise 7x7 + depthwise 3x3, both stride 2 (RepLKNet / FastViT stem)."""

    def __init__(self, channels=4, stride=2):
        super().__init__(ConvBN(channels, channels, 7, stride, groups=channels),
                         ConvBN(channels, channels, 3, stride, groups=channels))


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


def spatial_repmixer(channels=4, size=8) -> RepMixer:
    """A RepMixer whose layer scale varies over H and W: not a per-channel constant."""
    model = RepMixer(channels)
    model.layer_scale = nn.Parameter(torch.ones(1, 1, size, size))
    return model


class CPE(nn.Module):
    """Conditional positional encoding: ``x + dwconv7x7(x)`` with a bias."""

    def __init__(self, channels=4, padding_mode="zeros"):
        super().__init__()
        self.pe = nn.Conv2d(channels, channels, 7, padding=3, groups=channels, bias=True,
                            padding_mode=padding_mode)

    def forward(self, x):
        return x + self.pe(x)


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


class FlattenBNLinear(nn.Module):
    def __init__(self, features=16, out=5, bn_first=True, bn_after=False):
        super().__init__()
        self.bn_first = bn_first
        self.bn = nn.BatchNorm1d(features if bn_first else out)
        self.linear = nn.Linear(features, out)
        self.bn_after = nn.BatchNorm1d(out) if bn_after else None

    def forward(self, x):
        x = torch.flatten(x, 1)
        if self.bn_first:
            x = self.linear(self.bn(x))
            return x if self.bn_after is None else self.bn_after(x)
        return self.bn(self.linear(x))


class BNOverChannelsLinearOverLength(nn.Module):
    """(N, C, L) -> BatchNorm1d(C) acts on axis 1, Linear(L, k) on axis -1."""

    def __init__(self, channels=4, length=7, out=3):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.linear = nn.Linear(length, out)

    def forward(self, x):
        return self.linear(self.bn(x))


class DistilledHead(nn.Module):
    """RepViT / LeViT classifier: BN1d + Linear twice, averaged."""

    def __init__(self, features=8, classes=5, bn=True, halve="div"):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(features)) if bn else nn.Identity
        self.head = nn.Sequential(norm(), nn.Linear(features, classes))
        self.head_dist = nn.Sequential(norm(), nn.Linear(features, classes))
        self.halve = halve

    def forward(self, x):
        x = torch.flatten(x, 1)
        total = self.head(x) + self.head_dist(x)
        return total / 2 if self.halve == "div" else total * 0.5


class HeadsOfTwoInputs(DistilledHead):
    def forward(self, x):
        x = torch.flatten(x, 1)
        return (self.head(x) + self.head_dist(torch.relu(x))) / 2


class PoolBN(nn.Module):
    def __init__(self, pool: nn.Module, channels=4):
        super().__init__()
        self.pool = pool
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.pool(x))


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
        elif self.pad == "nonzero":
            x = F.pad(x, (1, 1, 1, 1), value=1.0)
        return self.conv(x)


class TwoConvs(nn.Module):
    def __init__(self, first: nn.Conv2d, second: nn.Conv2d):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(self.first(x))



# ---- outcomes ----------------------------------------------------------------------------

FRONTENDS = ("fx", "export", "onnx")
"""``fx``: ``fuse(module)``; ``export``: ``fuse(torch.export.export(module, args))``;
``onnx``: ``fuse_onnx_model`` on ``torch.onnx.export(module, dynamo=False, opset 17,
do_constant_folding=False)``."""


@dataclass(frozen=True)
class Folds:
    """Positive: after fusion the op histogram is exactly ``ops`` (torch op categories,
    ``reparam_fx.op_counts``; a category not named must be absent), the report's
    ``pattern_counts()`` is ``patterns``, and the one conv left has the geometry in
    ``conv`` (any of ``kernel``, ``stride``, ``pads`` (begins then ends, as ONNX writes
    them), ``dilation``, ``groups``, ``out_channels``)."""

    ops: dict[str, int]
    patterns: dict[str, int] | None = None
    conv: dict | None = None


@dataclass(frozen=True)
class Refused:
    """Negative: the op categories in ``unchanged`` keep their counts, ``ops`` give the
    counts of the ones that do change (a branch still folds its own BN, ...), the report's
    ``pattern_counts()`` is ``patterns`` (None: nothing was fused at all), and some skip
    reason of the report contains ``reason``. Where the report has no reason (the region
    never looked foldable: nothing was tried), ``reason`` is None and ``no_reason`` says
    why."""

    unchanged: tuple[str, ...]
    reason: str | None
    no_reason: str = ""
    ops: dict[str, int] = field(default_factory=dict)
    patterns: dict[str, int] | None = None


@dataclass(frozen=True)
class Differs:
    """One frontend's own outcome for a case, and why it differs from the others."""

    why: str
    outcome: Folds | Refused


@dataclass(frozen=True)
class Case:
    """One entry of the table: ``build()`` makes the module (random weights and BatchNorm
    statistics are set by the runner), ``input_shape`` the example input's shape."""

    rule: str
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    outcome: Folds | Refused
    fx_example_inputs: str = ""  # why fuse(module) needs example_inputs here (else none)
    differs: dict[str, Differs] = field(default_factory=dict)

    def outcome_for(self, frontend: str) -> Folds | Refused:
        assert frontend in FRONTENDS, frontend
        return self.differs[frontend].outcome if frontend in self.differs else self.outcome

    @property
    def positive(self) -> bool:
        return isinstance(self.outcome, Folds)


def _conv(kernel, stride=1, pads=None, groups=1, **more) -> dict:
    """The expected geometry of a 2-D conv; ``pads``: an int (all four sides) or the
    four-tuple (top, left, bottom, right)."""
    pads = (0 if kernel == 1 else kernel // 2) if pads is None else pads
    pads = (pads,) * 4 if isinstance(pads, int) else tuple(pads)
    return {"kernel": (kernel, kernel), "stride": (stride, stride), "pads": pads,
            "groups": groups, **more}


def _seq(*modules) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*(m() for m in modules))


NO_CANDIDATE = "nothing here looked foldable to the engine, so the report names no reason"

# ---- the table ---------------------------------------------------------------------------

CASES: tuple[Case, ...] = (
    # -- conv + BatchNorm
    Case("conv+bn", "conv+bn", lambda: ConvBN(4, 8, 3, stride=2, groups=2, bias=True), (2, 4, 9, 9),
         Folds({"conv": 1}, {"conv+bn": 1}, _conv(3, stride=2, groups=2, out_channels=8))),
    Case("conv+bn", "relu between conv and bn", lambda: ConvReluBN(4, 4, 3), (2, 4, 6, 6),
         Refused(("conv", "batch_norm"), "no conv or linear next to it")),

    # -- RepVGG: kxk + 1x1 + BN identity, one input
    Case("repvgg", "repvgg, relu after", _seq(RepVGGBlock, nn.ReLU), (2, 4, 8, 8),
         Folds({"conv": 1}, {"repvgg": 1}, _conv(3))),
    Case("repvgg", "difference of branches", BranchDifference, (2, 4, 7, 7),
         Folds({"conv": 1}, {"repvgg": 1}, _conv(3))),  # repvgg, not repmixer
    Case("repvgg", "different centre offsets", MisalignedBranches, (2, 4, 9, 9),
         Refused(("conv", "add"), "centre offset", ops={"batch_norm": 0},
                 patterns={"conv+bn": 2})),

    # -- MobileOne: branches of one kernel shape; groups
    Case("mobileone", "mobileone", MobileOneBlock, (2, 4, 8, 8),
         Folds({"conv": 1}, {"mobileone": 1}, _conv(3))),
    Case("mobileone", "groups 2 + groups 4 merge at groups 2",
         lambda: TwoBranches(ConvBN(8, 8, 3, groups=2), ConvBN(8, 8, 1, groups=4)), (2, 8, 6, 6),
         Folds({"conv": 1}, {"repvgg": 1}, _conv(3, groups=2))),
    Case("mobileone", "depthwise + dense would add MACs",
         lambda: TwoBranches(ConvBN(8, 8, 3, groups=8), ConvBN(8, 8, 1)), (2, 8, 6, 6),
         Refused(("conv", "add"), "MACs", ops={"batch_norm": 0}, patterns={"conv+bn": 2})),

    # -- large + small kernel
    Case("large+small kernel", "dw 7x7 + dw 3x3 stride 2", LargeSmallKernel, (2, 4, 10, 10),
         Folds({"conv": 1}, {"large+small kernel": 1}, _conv(7, stride=2, groups=4))),
    Case("large+small kernel", "taps off the dilation lattice",
         lambda: TwoBranches(ConvBN(4, 4, 3, dilation=2), ConvBN(4, 4, 2, dilation=2, padding=1)),
         (2, 4, 8, 8),
         Refused(("conv", "add"), "dilation lattice", ops={"batch_norm": 0},
                 patterns={"conv+bn": 2})),

    # -- RepMixer: x + gamma * (mixer(x) - BN(x))
    Case("repmixer", "repmixer", RepMixer, (2, 4, 8, 8),
         Folds({"conv": 1}, {"repmixer": 1}, _conv(3, groups=4))),
    Case("repmixer", "spatial layer scale", spatial_repmixer, (2, 4, 8, 8),
         # mixer(x) - norm(x) still merges into one conv; the scale and the outer add stay
         Refused(("mul",), "per-channel", ops={"conv": 1, "batch_norm": 0, "sub": 0, "add": 1},
                 patterns={"repmixer": 1})),

    # -- CPE: x + dwconv(x)
    Case("cpe", "cpe", CPE, (2, 4, 8, 8),
         Folds({"conv": 1}, {"cpe": 1}, _conv(7, groups=4))),
    Case("cpe", "reflect padding", lambda: CPE(padding_mode="reflect"), (2, 4, 8, 8),
         Refused(("conv", "add", "pad"), "padding_mode"),
         differs={frontend: Differs(
             "the capture writes the reflect padding as a pad op of its own before the conv, "
             "which no rule reads; " + NO_CANDIDATE,
             Refused(("conv", "add", "pad"), None, no_reason=NO_CANDIDATE))
             for frontend in ("export", "onnx")}),

    # -- per-channel constants after a conv
    Case("per-channel constant", "layer scale after conv+bn", lambda: ConvThen("layer_scale"),
         (2, 4, 6, 6), Folds({"conv": 1}, {"conv+bn": 1}, _conv(3))),
    Case("per-channel constant", "spatially varying constant",
         lambda: ConvThen("layer_scale", constant_shape=(1, 1, 6, 6)), (2, 4, 6, 6),
         Refused(("mul",), "per-channel", ops={"conv": 1, "batch_norm": 0},
                 patterns={"conv+bn": 1})),
    Case("per-channel constant", "constant on the wrong axis",
         # (C, 1) broadcasts along H of an NCHW tensor (H == C here), not along channels
         lambda: ConvThen("layer_scale", constant_shape=(4, 1)), (2, 4, 4, 4),
         Refused(("mul",), "axes", ops={"conv": 1, "batch_norm": 0}, patterns={"conv+bn": 1})),

    # -- BatchNorm (or a scale) before a conv
    Case("bn before conv", "bn before 1x1 conv", lambda: BeforeConv(1), (2, 4, 6, 6),
         Folds({"conv": 1}, {"conv+bn": 1}, _conv(1, out_channels=6))),
    Case("bn before conv", "scale before zero-padded conv", lambda: BeforeConv(3, pre="scale"),
         (2, 4, 6, 6), Folds({"conv": 1}, {"layer scale": 1}, _conv(3))),
    Case("bn before conv", "bn before zero-padded conv", lambda: BeforeConv(3), (2, 4, 6, 6),
         Refused(("conv", "batch_norm"), "zero-padded conv")),

    # -- average pooling as a depthwise conv
    Case("avg pool", "avg pool 3x3 + bn", lambda: PoolBN(nn.AvgPool2d(3, 1, 1)), (2, 4, 7, 7),
         Folds({"conv": 1}, {"avgpool": 1}, _conv(3, groups=4)),
         fx_example_inputs="the depthwise conv needs the channel count, which only shapes prove"),
    Case("avg pool", "avg pool 2x2 stride 2 + bn", lambda: PoolBN(nn.AvgPool2d(2, 2)), (2, 4, 8, 8),
         Folds({"conv": 1}, {"avgpool": 1}, _conv(2, stride=2, pads=0, groups=4)),
         fx_example_inputs="the depthwise conv needs the channel count, which only shapes prove"),
    Case("avg pool", "conv, avg pool, bn",
         _seq(lambda: nn.Conv2d(4, 4, 1, bias=False), lambda: nn.AvgPool2d(2, 2),
              lambda: nn.BatchNorm2d(4)), (2, 4, 8, 8),
         Folds({"conv": 1}, {"avgpool": 1}, _conv(2, stride=2, pads=0))),
    Case("avg pool", "count_include_pad=False",
         lambda: PoolBN(nn.AvgPool2d(3, 1, 1, count_include_pad=False)), (2, 4, 8, 8),
         Refused(("avg_pool", "batch_norm"), "count_include_pad", ops={"conv": 0})),
    Case("avg pool", "ceil_mode", lambda: PoolBN(nn.AvgPool2d(3, 2, 1, ceil_mode=True)),
         (2, 4, 8, 8),
         Refused(("avg_pool", "batch_norm"), "ceil_mode", ops={"conv": 0})),

    # -- explicit zero padding before a conv
    Case("zero pad", "nn.ZeroPad2d", lambda: PadConv("module"), (2, 4, 6, 6),
         Folds({"conv": 1}, {"zero-pad": 1}, _conv(3, out_channels=6))),
    Case("zero pad", "asymmetric zero pad", lambda: PadConv("asymmetric"), (2, 4, 6, 6),
         # the conv would be written again with the same pad before it (a torch conv pads
         # both sides alike unless it is padding="same"), so the graph stays as it was
         Refused(("conv", "pad"), None, no_reason="a torch conv cannot hold unequal pads: "
                 "there is no rewrite to offer"),
         differs={"onnx": Differs(
             "an ONNX Conv holds unequal pads (its pads attribute has begins and ends)",
             Folds({"conv": 1}, {"affine": 1}, _conv(3, pads=(0, 0, 1, 1), out_channels=6)))}),
    Case("zero pad", "reflect pad", lambda: PadConv("reflect"), (2, 4, 6, 6),
         Refused(("conv", "pad"), None, no_reason=NO_CANDIDATE)),
    Case("zero pad", "pad with a nonzero value", lambda: PadConv("nonzero"), (2, 4, 6, 6),
         Refused(("conv", "pad"), None, no_reason=NO_CANDIDATE)),

    # -- BatchNorm1d and Linear
    Case("bn+linear", "bn1d before and after linear", lambda: FlattenBNLinear(bn_after=True),
         (2, 4, 2, 2), Folds({"linear": 1}, {"bn+linear": 1})),
    Case("bn+linear", "bn1d and linear on different axes", BNOverChannelsLinearOverLength,
         (2, 4, 7), Refused(("linear", "batch_norm"), "axes"),
         fx_example_inputs="BatchNorm1d takes (N, C) and (N, C, L): without shapes the fold "
                           "is refused for the unproven rank before the axes are compared"),

    # -- averaged linear heads
    Case("linear heads", "bn1d + linear twice, averaged", DistilledHead, (2, 8, 1, 1),
         Folds({"linear": 1}, {"linear heads": 1})),
    Case("linear heads", "two linears times 0.5", lambda: DistilledHead(bn=False, halve="mul"),
         (2, 8, 1, 1), Folds({"linear": 1}, {"linear heads": 1})),
    Case("linear heads", "heads of different inputs", HeadsOfTwoInputs, (2, 8, 1, 1),
         Refused(("linear", "add"), None, no_reason="the heads read different tensors: no sum "
                 "of one input to merge", ops={"batch_norm": 0, "div": 0},
                 patterns={"bn+linear": 2})),

    # -- conv compositions
    Case("conv composition", "kxk then reducing 1x1",
         lambda: TwoConvs(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)), (2, 8, 6, 6),
         Folds({"conv": 1}, {"conv composition": 1}, _conv(3, out_channels=2))),
    Case("conv composition", "1x1 without bias then padded kxk",
         lambda: TwoConvs(nn.Conv2d(4, 8, 1, bias=False), nn.Conv2d(8, 4, 3, padding=1)),
         (2, 4, 6, 6), Folds({"conv": 1}, {"conv composition": 1}, _conv(3, out_channels=4))),
    Case("conv composition", "1x1 with bias before padded kxk",
         lambda: TwoConvs(nn.Conv2d(4, 8, 1, bias=True), nn.Conv2d(8, 4, 3, padding=1)),
         (2, 4, 6, 6), Refused(("conv",), "bias")),
    Case("conv composition", "kxk then expanding 1x1",
         lambda: TwoConvs(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 16, 1)), (2, 4, 6, 6),
         Refused(("conv",), "MACs")),
)
