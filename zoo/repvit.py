"""RepViT, in training form.

Wang, Chen, Lin, Han, Ding: "RepViT: Revisiting Mobile CNN From ViT Perspective",
CVPR 2024, https://arxiv.org/abs/2307.09283 (official code: github.com/THU-MIG/RepViT,
``model/repvit.py``).

Block math. ``BN`` is an eval-mode BatchNorm, ``dw`` a depthwise conv, ``pw`` a 1x1 conv;
``ConvBN`` convs have no bias.

    RepVGGDW(x)      = BN( BN_3(dw3x3(x)) + dw1x1(x) + x )     (the dw1x1 has a bias, no BN)
    SE(x)            = x * sigmoid(fc2(ReLU(fc1(mean_hw(x)))))  (fc1/fc2 1x1 convs with bias,
                                                                 fc1 width make_divisible(C/4, 8))
    channel mixer(x) = x + BN_b(pw_b(GELU(BN_a(pw_a(x)))))       (pw_a: C -> 2C, pw_b: 2C -> C)

    RepViT block, stride 1:  y = channel_mixer( [SE]( RepVGGDW(x) ) )
    RepViT block, stride 2:  y = channel_mixer( BN(pw(C -> C')( [SE]( BN(dw3x3/2(x)) ) )) )

The whole of ``RepVGGDW`` is affine in ``x`` with one centre, so it equals a single
depthwise 3x3 conv with bias; every ``ConvBN`` equals one conv with bias; and the two
``BN -> Linear`` classifier heads, averaged in eval mode, equal one linear layer. That
inference form is produced by ``reparam_fx.fuse`` from this graph, not by code here.

Network. A stem of two 3x3 stride-2 ``ConvBN`` (3 -> C1/2 -> C1) with a GELU between,
four stages of widths ``C1..C4``, stages 2-4 entered through a stride-2 RepViT block;
then global average pooling and the classifier: ``BN1d -> Linear`` plus a distillation
head of the same form. In training mode the classifier returns both heads' logits, in
eval mode their average (so the eval graph traces to one output).

Block order (the official ``cfgs`` rows). Within a stage, the stride-1 blocks switch SE
on and off, starting with on; the last stride-1 block of stages 1-3, which precedes the
stride-2 block, has no SE; the stride-2 blocks have no SE. All kernels are 3x3 and all
expansion ratios 2. The official ``HS`` column (1 from stage 3 on) selects GELU in both
of its cases, so every activation here is GELU. Attribute names follow the official code,
so its training-form checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo

# ---- variant table (official model/repvit.py cfgs) -----------------------------------
#
# name            stage widths C1-C4      stride-1 blocks per stage   params M (official)
VARIANTS = {
    "repvit_m0_9": dict(widths=(48, 96, 192, 384), depths=(3, 3, 15, 2)),
    "repvit_m1_0": dict(widths=(56, 112, 224, 448), depths=(3, 3, 15, 2)),
    "repvit_m1_1": dict(widths=(64, 128, 256, 512), depths=(3, 3, 13, 2)),
    "repvit_m1_5": dict(widths=(64, 128, 256, 512), depths=(5, 5, 25, 4)),
    "repvit_m2_3": dict(widths=(80, 160, 320, 640), depths=(7, 7, 35, 2)),
}

# Official parameter counts in millions, training form (two heads) -> one-conv-per-block
# inference form (heads merged into one linear), 1000 classes.
OFFICIAL_PARAMS_M = {
    "repvit_m0_9": (5.49, 5.07),
    "repvit_m1_0": (7.30, 6.81),
    "repvit_m1_1": (8.80, 8.24),
    "repvit_m1_5": (14.64, 14.05),
    "repvit_m2_3": (23.69, 22.93),
}

KERNEL_SIZE = 3
EXPANSION = 2
SE_RATIO = 0.25


def block_rows(widths, depths) -> list[tuple[int, int, int, bool, bool, int]]:
    """The official ``cfgs`` rows ``(kernel, expansion, channels, use_se, use_hs, stride)``."""
    rows = []
    last_stage = len(widths) - 1
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        use_hs = stage >= 2
        if stage > 0:
            rows.append((KERNEL_SIZE, EXPANSION, width, False, use_hs, 2))
        for i in range(depth):
            precedes_downsampling = stage < last_stage and i == depth - 1
            use_se = i % 2 == 0 and not precedes_downsampling
            rows.append((KERNEL_SIZE, EXPANSION, width, use_se, use_hs, 1))
    return rows


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (not below ``min_value``), and
    up by one more ``divisor`` if rounding lost more than ``1 - round_limit`` of it."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


class Conv2d_BN(nn.Sequential):
    """A bias-free conv ``c`` followed by BatchNorm ``bn`` (gamma initialised to ``bn_weight_init``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, padding: int = 0, groups: int = 1,
                 bn_weight_init: float = 1.0):
        super().__init__()
        self.c = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                           groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)


class Residual(nn.Module):
    """``x + m(x)``."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class RepVGGDW(nn.Module):
    """``BN(BN_3(dw3x3(x)) + dw1x1(x) + x)``: the stride-1 token mixer."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d_BN(channels, channels, 3, 1, 1, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, 1, 0, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn((self.conv(x) + self.conv1(x)) + x)


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(ReLU(fc1(mean_hw(x)))))`` with ``make_divisible(C * ratio, 8)`` hidden
    channels (timm's ``SEModule`` as RepViT uses it)."""

    def __init__(self, channels: int, rd_ratio: float = SE_RATIO, rd_divisor: int = 8):
        super().__init__()
        rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.fc2(self.act(self.fc1(scale)))
        return x * self.gate(scale)


def channel_mixer(channels: int, hidden: int) -> Residual:
    """``x + BN(pw(GELU(BN(pw(x)))))``; the last BN starts at gamma = 0."""
    return Residual(nn.Sequential(
        Conv2d_BN(channels, hidden, 1, 1, 0),
        nn.GELU(),
        Conv2d_BN(hidden, channels, 1, 1, 0, bn_weight_init=0.0),
    ))


class RepViTBlock(nn.Module):
    """Token mixer then channel mixer; stride 2 makes the token mixer downsample and widen."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int,
                 kernel_size: int, stride: int, use_se: bool, use_hs: bool):
        super().__init__()
        assert stride in (1, 2)
        assert hidden_channels == 2 * in_channels
        se = SqueezeExcite(in_channels) if use_se else nn.Identity()
        if stride == 2:
            self.token_mixer = nn.Sequential(
                Conv2d_BN(in_channels, in_channels, kernel_size, stride, (kernel_size - 1) // 2,
                          groups=in_channels),
                se,
                Conv2d_BN(in_channels, out_channels, 1, 1, 0),
            )
            self.channel_mixer = channel_mixer(out_channels, 2 * out_channels)
        else:
            assert in_channels == out_channels and kernel_size == 3
            self.token_mixer = nn.Sequential(RepVGGDW(in_channels), se)
            self.channel_mixer = channel_mixer(in_channels, hidden_channels)
        # the official HS flag chooses GELU in both cases; kept for the cfg rows only
        self.use_hs = use_hs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_mixer(self.token_mixer(x))


class BN_Linear(nn.Sequential):
    """``Linear(BN1d(x))``: one classifier head."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.l = nn.Linear(in_features, out_features, bias=bias)
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.constant_(self.l.bias, 0)


class Classifier(nn.Module):
    """A ``BN_Linear`` head, plus a distillation head: training mode returns both logits,
    eval mode their average."""

    def __init__(self, features: int, num_classes: int, distillation: bool = True):
        super().__init__()
        self.distillation = distillation
        self.classifier = BN_Linear(features, num_classes) if num_classes > 0 else nn.Identity()
        if distillation:
            self.classifier_dist = (BN_Linear(features, num_classes) if num_classes > 0
                                    else nn.Identity())

    def forward(self, x: torch.Tensor):
        if not self.distillation:
            return self.classifier(x)
        logits, logits_dist = self.classifier(x), self.classifier_dist(x)
        if self.training:  # a module flag, fixed when the graph is traced
            return logits, logits_dist
        return (logits + logits_dist) / 2


class RepViT(nn.Module):
    """Stem, RepViT blocks (``features``), global average pool, classifier with distillation."""

    def __init__(self, cfgs, num_classes: int = 1000, distillation: bool = True,
                 in_channels: int = 3):
        super().__init__()
        self.cfgs = [tuple(row) for row in cfgs]
        channels = self.cfgs[0][2]
        stem = nn.Sequential(
            Conv2d_BN(in_channels, channels // 2, 3, 2, 1),
            nn.GELU(),
            Conv2d_BN(channels // 2, channels, 3, 2, 1),
        )
        layers = [stem]
        for kernel_size, expansion, width, use_se, use_hs, stride in self.cfgs:
            out_channels = make_divisible(width, 8)
            hidden = make_divisible(channels * expansion, 8)
            layers.append(RepViTBlock(channels, hidden, out_channels, kernel_size, stride,
                                      bool(use_se), bool(use_hs)))
            channels = out_channels
        self.features = nn.ModuleList(layers)
        self.classifier = Classifier(channels, num_classes, distillation)

    def forward(self, x: torch.Tensor):
        for layer in self.features:
            x = layer(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def repvit_from_table(widths, depths, num_classes: int = 1000, **kwargs) -> RepViT:
    """A RepViT from a variant-table row (stage widths and depths)."""
    return RepViT(block_rows(widths, depths), num_classes=num_classes, **kwargs)


zoo.register_variants(VARIANTS, repvit_from_table)
