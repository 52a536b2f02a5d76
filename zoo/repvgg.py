"""RepVGG, in training form.

Ding, Zhang, Ma, Han, Ding, Sun: "RepVGG: Making VGG-style ConvNets Great Again",
CVPR 2021, https://arxiv.org/abs/2101.03697 (official code: github.com/DingXiaoH/RepVGG,
``repvgg.py``).

Block math. A RepVGG block maps ``x`` (``C_in`` channels) to ``C_out`` channels as

    y = ReLU( BN_3(conv3x3(x)) + BN_1(conv1x1(x)) + BN_id(x) )

where ``conv3x3`` has padding 1, ``conv1x1`` has padding 0, both share the block's stride
and ``groups`` and have no bias, and the identity branch ``BN_id(x)`` exists only when
``C_in == C_out`` and the stride is 1. Every branch is affine in ``x`` and the three have
the same centre, so the sum before the ReLU equals one 3x3 conv with bias; that single
conv is the inference form, and it is produced by ``reparam_fx.fuse`` from this graph,
not by code in this file.

Network. ``stage0`` is one block 3 -> ``min(64, 64 a)`` with stride 2; stages 1-4 have
``64 a, 128 a, 256 a, 512 b`` channels (``a``/``b`` the width multipliers), the first
block of each with stride 2; then global average pooling and a linear classifier. The
g2/g4 variants use grouped convs (2 or 4 groups) in the layers numbered 2, 4, ..., 26
(stage0 is layer 0), i.e. the 3rd, 5th, 7th ... layers of the paper. Attribute names
follow the official code, so its training-form checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import zoo

# ---- variant table (paper Sec. 3.4, Tables 2-3; official repvgg.py) --------------------
#
# blocks in stages 1-4, width multipliers (a, a, a, b) of stages 1-4, groups in layers 2..26
VARIANTS = {
    "repvgg_a0":   dict(num_blocks=(2, 4, 14, 1), width_multiplier=(0.75, 0.75, 0.75, 2.5), groups=1),
    "repvgg_a1":   dict(num_blocks=(2, 4, 14, 1), width_multiplier=(1.0, 1.0, 1.0, 2.5), groups=1),
    "repvgg_a2":   dict(num_blocks=(2, 4, 14, 1), width_multiplier=(1.5, 1.5, 1.5, 2.75), groups=1),
    "repvgg_b0":   dict(num_blocks=(4, 6, 16, 1), width_multiplier=(1.0, 1.0, 1.0, 2.5), groups=1),
    "repvgg_b1":   dict(num_blocks=(4, 6, 16, 1), width_multiplier=(2.0, 2.0, 2.0, 4.0), groups=1),
    "repvgg_b1g2": dict(num_blocks=(4, 6, 16, 1), width_multiplier=(2.0, 2.0, 2.0, 4.0), groups=2),
    "repvgg_b1g4": dict(num_blocks=(4, 6, 16, 1), width_multiplier=(2.0, 2.0, 2.0, 4.0), groups=4),
    "repvgg_b2":   dict(num_blocks=(4, 6, 16, 1), width_multiplier=(2.5, 2.5, 2.5, 5.0), groups=1),
    "repvgg_b2g4": dict(num_blocks=(4, 6, 16, 1), width_multiplier=(2.5, 2.5, 2.5, 5.0), groups=4),
    "repvgg_b3":   dict(num_blocks=(4, 6, 16, 1), width_multiplier=(3.0, 3.0, 3.0, 5.0), groups=1),
    "repvgg_b3g4": dict(num_blocks=(4, 6, 16, 1), width_multiplier=(3.0, 3.0, 3.0, 5.0), groups=4),
}

# Official parameter counts in millions, training form -> single-conv inference form.
OFFICIAL_PARAMS_M = {
    "repvgg_a0": (9.11, 8.31),
    "repvgg_a1": (14.09, 12.79),
    "repvgg_a2": (28.21, 25.50),
    "repvgg_b0": (15.82, 14.34),
    "repvgg_b1": (57.42, 51.83),
    "repvgg_b1g2": (45.78, 41.36),
    "repvgg_b1g4": (39.97, 36.12),
    "repvgg_b2": (89.02, 80.32),
    "repvgg_b2g4": (61.76, 55.78),
    "repvgg_b3": (123.09, 110.96),
    "repvgg_b3g4": (83.83, 75.63),
}

# Layers (stage0 = layer 0) that use grouped convs in the g2/g4 variants.
GROUPWISE_LAYERS = tuple(range(2, 27, 2))


class ConvBN(nn.Sequential):
    """A bias-free conv followed by BatchNorm: one branch of a RepVGG block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)


class RepVGGBlock(nn.Module):
    """``ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)])``; identity only if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.rbr_dense = ConvBN(in_channels, out_channels, 3, stride, padding=1, groups=groups)
        self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride, padding=0, groups=groups)
        has_identity = in_channels == out_channels and stride == 1
        self.rbr_identity = nn.BatchNorm2d(in_channels) if has_identity else None
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:  # structural, fixed at construction
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)


class RepVGG(nn.Module):
    """stage0 block, four stages of RepVGG blocks, global average pool, linear head."""

    def __init__(self, num_blocks, width_multiplier, groups: int = 1, num_classes: int = 1000,
                 in_channels: int = 3):
        super().__init__()
        assert len(num_blocks) == 4 and len(width_multiplier) == 4
        self.groups_of_layer = {layer: groups for layer in GROUPWISE_LAYERS} if groups > 1 else {}
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(in_channels, self.in_planes, stride=2)
        self.layer_index = 1
        self.stage1 = self._make_stage(int(64 * width_multiplier[0]), num_blocks[0])
        self.stage2 = self._make_stage(int(128 * width_multiplier[1]), num_blocks[1])
        self.stage3 = self._make_stage(int(256 * width_multiplier[2]), num_blocks[2])
        self.stage4 = self._make_stage(int(512 * width_multiplier[3]), num_blocks[3])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(int(512 * width_multiplier[3]), num_classes)

    def _make_stage(self, planes: int, num_blocks: int) -> nn.Sequential:
        blocks = []
        for stride in [2] + [1] * (num_blocks - 1):
            groups = self.groups_of_layer.get(self.layer_index, 1)
            blocks.append(RepVGGBlock(self.in_planes, planes, stride=stride, groups=groups))
            self.in_planes = planes
            self.layer_index += 1
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = torch.flatten(self.gap(x), 1)
        return self.linear(x)


zoo.register_variants(VARIANTS, RepVGG)
