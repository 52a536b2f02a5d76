"""MobileOne, in training form.

Vasu, Gabriel, Zhu, Tuzel, Ranjan: "MobileOne: An Improved One millisecond Mobile
Backbone", CVPR 2023, https://arxiv.org/abs/2206.04040 (official code:
github.com/apple/ml-mobileone, ``mobileone.py``).

Block math. A MobileOne block with kernel ``k``, stride ``s``, ``groups`` and
over-parameterization factor ``n`` (``num_conv_branches``) maps ``x`` to

    y = ReLU( SE( sum_{i=1..n} BN_i(conv_kxk_i(x))      # n conv branches, padding k//2
                  + BN_scale(conv_1x1(x))               # scale branch, only when k > 1
                  + BN_skip(x) ) )                      # skip branch, only when
                                                        #   C_in == C_out and s == 1

All convs have no bias and share the block's stride and groups, so every branch is
affine in ``x`` with the same centre and the sum before SE/ReLU equals one ``k x k`` conv
with bias. That single conv is the inference form; it is produced by ``reparam_fx.fuse``
from this graph, not by code in this file. ``SE`` (squeeze-and-excitation, reduction
1/16) is the identity except where the variant table enables it.

Network. ``stage0`` is one block ``3 -> min(64, 64 a_1)``, 3x3, stride 2, with one conv
branch. Stages 1-4 have ``64 a_1, 128 a_2, 256 a_3, 512 a_4`` output channels and
``2, 8, 10, 1`` MobileOne units; each unit is a depthwise 3x3 block (stride 2 for the
first unit of a stage) followed by a pointwise 1x1 block. In the SE variant (s4) the last
``10 // 2`` units of stage 3 and the unit of stage 4 use SE in both their blocks. Then
global average pooling and a linear classifier. Attribute names follow the official
code, so its training-form checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo

# ---- variant table (official mobileone.py, ``PARAMS``) --------------------------------
#
# name            width multipliers a_1..a_4   conv branches n (stages 1-4)   SE
VARIANTS = {
    "mobileone_s0": dict(width_multipliers=(0.75, 1.0, 1.0, 2.0), num_conv_branches=4, use_se=False),
    "mobileone_s1": dict(width_multipliers=(1.5, 1.5, 2.0, 2.5), num_conv_branches=1, use_se=False),
    "mobileone_s2": dict(width_multipliers=(1.5, 2.0, 2.5, 4.0), num_conv_branches=1, use_se=False),
    "mobileone_s3": dict(width_multipliers=(2.0, 2.5, 3.0, 4.0), num_conv_branches=1, use_se=False),
    "mobileone_s4": dict(width_multipliers=(3.0, 3.5, 3.5, 4.0), num_conv_branches=1, use_se=True),
}

# MobileOne units (depthwise + pointwise block pairs) in stages 1-4, all variants.
UNITS_PER_STAGE = (2, 8, 10, 1)

# Official parameter counts in millions, training form -> single-conv inference form.
OFFICIAL_PARAMS_M = {
    "mobileone_s0": (5.29, 2.08),
    "mobileone_s1": (4.83, 4.77),
    "mobileone_s2": (7.88, 7.81),
    "mobileone_s3": (10.17, 10.08),
    "mobileone_s4": (14.95, 14.84),
}


class SqueezeExcite(nn.Module):
    """``x * sigmoid(expand(ReLU(reduce(mean_hw(x)))))`` (Hu et al. 2018), 1x1 convs."""

    def __init__(self, channels: int, rd_ratio: float = 0.0625):
        super().__init__()
        hidden = int(channels * rd_ratio)
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.adaptive_avg_pool2d(x, 1)
        weights = torch.sigmoid(self.expand(F.relu(self.reduce(weights))))
        return x * weights


class ConvBN(nn.Sequential):
    """A bias-free conv followed by BatchNorm: one branch of a MobileOne block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)


class MobileOneBlock(nn.Module):
    """``act(SE(sum_i BN(conv_k(x)) [+ BN(conv_1x1(x))] [+ BN(x)]))``; see the module docstring.

    ``num_conv_branches`` kxk branches (0 is allowed: FastViT's BN-only RepMixer norm);
    the 1x1 scale branch when ``kernel_size > 1`` and ``use_scale_branch``; the identity
    BN when the block keeps its shape. ``activation`` is a module class (ReLU for
    MobileOne, GELU for FastViT) or None. FastViT builds its blocks from this class too.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, use_se: bool = False, num_conv_branches: int = 1,
                 use_scale_branch: bool = True, activation: type[nn.Module] | None = nn.ReLU):
        super().__init__()
        padding = kernel_size // 2
        has_skip = in_channels == out_channels and stride == 1
        self.rbr_skip = nn.BatchNorm2d(in_channels) if has_skip else None
        self.rbr_conv = nn.ModuleList(
            ConvBN(in_channels, out_channels, kernel_size, stride, padding, groups)
            for _ in range(num_conv_branches))
        self.rbr_scale = (ConvBN(in_channels, out_channels, 1, stride, 0, groups)
                          if kernel_size > 1 and use_scale_branch else None)
        if not self.rbr_conv and self.rbr_scale is None and self.rbr_skip is None:
            raise ValueError("a MobileOneBlock needs at least one branch")
        self.se = SqueezeExcite(out_channels) if use_se else nn.Identity()
        self.activation = activation() if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [*self.rbr_conv, self.rbr_scale, self.rbr_skip]  # structural, fixed
        branches = [branch for branch in branches if branch is not None]
        out = branches[0](x)
        for branch in branches[1:]:
            out = out + branch(x)
        return self.activation(self.se(out))


class MobileOne(nn.Module):
    """stage0 block, four stages of depthwise/pointwise block pairs, global pool, linear."""

    def __init__(self, width_multipliers, num_conv_branches: int = 1, use_se: bool = False,
                 num_blocks_per_stage=UNITS_PER_STAGE, num_classes: int = 1000,
                 in_channels: int = 3):
        super().__init__()
        assert len(width_multipliers) == 4 and len(num_blocks_per_stage) == 4
        self.num_conv_branches = num_conv_branches
        self.in_planes = min(64, int(64 * width_multipliers[0]))
        self.stage0 = MobileOneBlock(in_channels, self.in_planes, kernel_size=3, stride=2)
        se_units = (0, 0, num_blocks_per_stage[2] // 2 if use_se else 0,
                    num_blocks_per_stage[3] if use_se else 0)
        self.stage1 = self._make_stage(int(64 * width_multipliers[0]), num_blocks_per_stage[0], se_units[0])
        self.stage2 = self._make_stage(int(128 * width_multipliers[1]), num_blocks_per_stage[1], se_units[1])
        self.stage3 = self._make_stage(int(256 * width_multipliers[2]), num_blocks_per_stage[2], se_units[2])
        self.stage4 = self._make_stage(int(512 * width_multipliers[3]), num_blocks_per_stage[3], se_units[3])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(int(512 * width_multipliers[3]), num_classes)

    def _make_stage(self, planes: int, num_units: int, num_se_units: int) -> nn.Sequential:
        """``num_units`` (depthwise 3x3, pointwise 1x1) pairs; SE in the last ``num_se_units``."""
        if num_se_units > num_units:
            raise ValueError("number of SE units cannot exceed the number of units")
        blocks = []
        for index, stride in enumerate([2] + [1] * (num_units - 1)):
            use_se = index >= num_units - num_se_units
            blocks.append(MobileOneBlock(self.in_planes, self.in_planes, kernel_size=3, stride=stride,
                                         groups=self.in_planes, use_se=use_se,
                                         num_conv_branches=self.num_conv_branches))
            blocks.append(MobileOneBlock(self.in_planes, planes, kernel_size=1, stride=1,
                                         groups=1, use_se=use_se,
                                         num_conv_branches=self.num_conv_branches))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = torch.flatten(self.gap(x), 1)
        return self.linear(x)


zoo.register_variants(VARIANTS, MobileOne)
