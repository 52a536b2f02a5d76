"""Small whole models built from :mod:`blocks`, one builder per family, plus the baseline deploy path.

Every builder takes ``num_classes=10`` and runs on 64x64 and 32x32 inputs.

| builder            | blocks                                                                 |
|--------------------|------------------------------------------------------------------------|
| repvgg_tiny        | RepVGGBlock x7 (5 stride-2, grouped blocks g=2/4 incl. identity)        |
| mobileone_tiny     | MobileOneBlock dw/pw pairs; k=4 branches stage, SE-off and SE-on stages |
| fastvit_tiny       | MobileOne stem, RepMixerBlock stages, ReparamLargeKernelConv PatchEmbed,|
|                    | RepCPE, ConvFFN, SE MobileOne conv_exp head                             |
| repvit_tiny        | Conv2d_BN stem, RepViTBlocks (RepVGGDW, SE, stride-2), Classfier+dist   |
| levit_head_tiny    | Conv2d_BN/Hardswish trunk, global pool, flatten, BN_Linear              |
| mixed_tiny         | ConvBnAct (BatchNormAct2d), FunctionalRepBlock (F.conv2d, +=, torch.add)|
|                    | ResidualFFN (pre-BN, layer scale, DropPath)                             |
| mobilevit_tiny     | ConvLayer stem, InvertedResidual, MobileViTBlockLite                   |

``FULL_SIZE_BUILDERS`` builds the same reference implementations at the published configs of
the zoo's smallest variants (RepVGG-A0, MobileOne-S0, FastViT-T8, RepViT-M0.9; 1000
classes): the hand-written baseline ``tools/bench.py`` compares ``reparam_fx.fuse`` with on
full-size networks. Their training-form parameter counts equal the zoo's exactly (checked in
``tests/test_reference_models.py``).

``reparameterize_model`` is the baseline deploy form: deep copy, then every module's own
``reparameterize()`` (the way apple/ml-mobileone and apple/ml-fastvit ship it).
"""

from __future__ import annotations

import copy
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (
    BN_Linear,
    Classfier,
    Conv2d_BN,
    ConvBnAct,
    ConvLayer,
    FunctionalRepBlock,
    InvertedResidual,
    MobileOneBlock,
    MobileViTBlockLite,
    RepCPE,
    RepMixerBlock,
    ReparamLargeKernelConv,
    RepVGGBlock,
    RepViTBlock,
    ResidualFFN,
    make_divisible,
)

__all__ = [
    "ALL_BUILDERS",
    "reparameterize_model",
    "repvgg_tiny",
    "mobileone_tiny",
    "fastvit_tiny",
    "repvit_tiny",
    "levit_head_tiny",
    "mixed_tiny",
    "mobilevit_tiny",
    "FULL_SIZE_BUILDERS",
    "LARGE_BUILDERS",
]


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Deep-copy ``model`` and call every module's ``reparameterize()`` (parents before children)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    return model


# ---------------------------------------------------------------------------------------
# RepVGG
# ---------------------------------------------------------------------------------------


class RepVGG(nn.Module):
    def __init__(self, num_blocks, widths, num_classes: int = 10, override_groups_map=None,
                 stem: int | None = None) -> None:
        super().__init__()
        self.override_groups_map = override_groups_map or {}
        self.in_planes = widths[0] if stem is None else stem
        self.stage0 = RepVGGBlock(3, self.in_planes, stride=2)
        self.cur_layer_idx = 1
        self.stage1 = self._make_stage(widths[0], num_blocks[0], stride=2)
        self.stage2 = self._make_stage(widths[1], num_blocks[1], stride=2)
        self.stage3 = self._make_stage(widths[2], num_blocks[2], stride=2)
        self.stage4 = self._make_stage(widths[3], num_blocks[3], stride=2)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            groups = self.override_groups_map.get(self.cur_layer_idx, 1)
            blocks.append(RepVGGBlock(self.in_planes, planes, stride=s, groups=groups))
            self.in_planes = planes
            self.cur_layer_idx += 1
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage0(x)
        out = self.stage1(out)
        out = self.stage2(out)
        out = self.stage3(out)
        out = self.stage4(out)
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def repvgg_tiny(num_classes: int = 10) -> nn.Module:
    """RepVGG-A style, widths 16/32/48/64, blocks 1/2/2/1; layers 2, 3 grouped g=2, layer 5 g=4."""
    return RepVGG(num_blocks=[1, 2, 2, 1], widths=[16, 32, 48, 64], num_classes=num_classes,
                  override_groups_map={2: 2, 3: 2, 5: 4})


# ---------------------------------------------------------------------------------------
# MobileOne
# ---------------------------------------------------------------------------------------


class MobileOne(nn.Module):
    def __init__(self, stage_cfg, stem_width: int, num_classes: int = 10) -> None:
        """``stage_cfg``: list of ``(planes, num_blocks, num_se_blocks, num_conv_branches)``."""
        super().__init__()
        self.in_planes = stem_width
        self.stage0 = MobileOneBlock(3, stem_width, 3, stride=2, activation=nn.ReLU())
        stages = [self._make_stage(*cfg) for cfg in stage_cfg]
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(self.in_planes, num_classes)

    def _make_stage(self, planes: int, num_blocks: int, num_se_blocks: int, num_conv_branches: int) -> nn.Sequential:
        blocks = []
        for ix, stride in enumerate([2] + [1] * (num_blocks - 1)):
            use_se = ix >= num_blocks - num_se_blocks
            blocks.append(MobileOneBlock(self.in_planes, self.in_planes, 3, stride=stride, groups=self.in_planes,
                                         num_conv_branches=num_conv_branches, use_se=use_se,
                                         activation=nn.ReLU()))
            blocks.append(MobileOneBlock(self.in_planes, planes, 1, stride=1, groups=1,
                                         num_conv_branches=num_conv_branches, use_se=use_se,
                                         activation=nn.ReLU()))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stages(x)
        x = self.gap(x)
        x = x.view(x.size(0), -1)
        return self.linear(x)


def mobileone_tiny(num_classes: int = 10) -> nn.Module:
    """Stem 16; stages (32, k=4 branches, SE off), (48, 2 blocks, k=1, SE off), (64, 2 blocks, k=2, SE on last)."""
    return MobileOne([(32, 1, 0, 4), (48, 2, 0, 1), (64, 2, 1, 2)], stem_width=16, num_classes=num_classes)


# ---------------------------------------------------------------------------------------
# FastViT
# ---------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """FastViT downsampling: grouped ``ReparamLargeKernelConv`` 7x7/s2 then a 1x1 MobileOneBlock."""

    def __init__(self, patch_size: int, stride: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_channels, embed_dim, kernel_size=patch_size, stride=stride,
                                   groups=in_channels, small_kernel=3),
            MobileOneBlock(embed_dim, embed_dim, 1, stride=1, groups=1, num_conv_branches=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FastViT(nn.Module):
    def __init__(self, layers, embed_dims, mlp_ratios, pos_embs, num_classes: int = 10,
                 drop_path_rate: float = 0.1, cls_ratio: float = 2.0) -> None:
        super().__init__()
        d0 = embed_dims[0]
        self.patch_embed = nn.Sequential(
            MobileOneBlock(3, d0, 3, stride=2, groups=1),
            MobileOneBlock(d0, d0, 3, stride=2, groups=d0),
            MobileOneBlock(d0, d0, 1, stride=1, groups=1),
        )
        total = sum(layers)
        network = []
        for i, n in enumerate(layers):
            if pos_embs[i]:
                network.append(RepCPE(embed_dims[i], spatial=7))
            blocks = []
            for j in range(n):
                dpr = drop_path_rate * (j + sum(layers[:i])) / max(total - 1, 1)
                blocks.append(RepMixerBlock(embed_dims[i], mlp_ratio=mlp_ratios[i], drop_path=dpr))
            network.append(nn.Sequential(*blocks))
            if i < len(layers) - 1:
                network.append(PatchEmbed(7, 2, embed_dims[i], embed_dims[i + 1]))
        self.network = nn.ModuleList(network)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.conv_exp = MobileOneBlock(embed_dims[-1], int(embed_dims[-1] * cls_ratio), 3, stride=1,
                                       groups=embed_dims[-1], use_se=True, num_conv_branches=1)
        self.head = nn.Linear(int(embed_dims[-1] * cls_ratio), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.network:
            x = block(x)
        x = self.conv_exp(x)
        x = self.gap(x)
        x = x.view(x.size(0), -1)
        return self.head(x)


def fastvit_tiny(num_classes: int = 10) -> nn.Module:
    """FastViT-T8 shape, shrunk: dims 16/32/64/128, layers 1/1/2/1, RepCPE before the last stage."""
    return FastViT(layers=[1, 1, 2, 1], embed_dims=[16, 32, 64, 128], mlp_ratios=[3, 3, 3, 3],
                   pos_embs=[False, False, False, True], num_classes=num_classes)


# ---------------------------------------------------------------------------------------
# RepViT
# ---------------------------------------------------------------------------------------


class RepViT(nn.Module):
    def __init__(self, cfgs, num_classes: int = 10, distillation: bool = True) -> None:
        super().__init__()
        input_channel = cfgs[0][2]
        patch_embed = nn.Sequential(Conv2d_BN(3, input_channel // 2, 3, 2, 1), nn.GELU(),
                                    Conv2d_BN(input_channel // 2, input_channel, 3, 2, 1))
        layers = [patch_embed]
        for k, t, c, use_se, s in cfgs:
            output_channel = make_divisible(c, 8)
            exp_size = make_divisible(input_channel * t, 8)
            layers.append(RepViTBlock(input_channel, exp_size, output_channel, k, s, bool(use_se)))
            input_channel = output_channel
        self.features = nn.ModuleList(layers)
        self.classifier = Classfier(output_channel, num_classes, distillation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.features:
            x = f(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def repvit_tiny(num_classes: int = 10) -> nn.Module:
    """RepViT-M0.9 shape, shrunk to 16/32/64 channels, 7 blocks, distillation head."""
    cfgs = [
        # k, t, c, SE, s
        [3, 2, 16, 1, 1],
        [3, 2, 16, 0, 1],
        [3, 2, 32, 0, 2],
        [3, 2, 32, 1, 1],
        [3, 2, 32, 0, 1],
        [3, 2, 64, 0, 2],
        [3, 2, 64, 1, 1],
    ]
    return RepViT(cfgs, num_classes=num_classes, distillation=True)


# ---------------------------------------------------------------------------------------
# LeViT head
# ---------------------------------------------------------------------------------------


class LeViTHead(nn.Module):
    def __init__(self, widths, num_classes: int = 10) -> None:
        super().__init__()
        layers, in_ch = [], 3
        for i, w in enumerate(widths):
            layers.append(Conv2d_BN(in_ch, w, 3, 2, 1))
            if i < len(widths) - 1:
                layers.append(nn.Hardswish())
            in_ch = w
        self.patch_embed = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = BN_Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.head(x)


def levit_head_tiny(num_classes: int = 10) -> nn.Module:
    """LeViT b16-style Conv2d_BN/Hardswish patch embedding (16/32/64/96), global pool, BN_Linear."""
    return LeViTHead([16, 32, 64, 96], num_classes=num_classes)


# ---------------------------------------------------------------------------------------
# mixed: the way people write blocks outside the official repos
# ---------------------------------------------------------------------------------------


class MixedNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBnAct(3, 16, 3, stride=2)
        self.block1 = FunctionalRepBlock(16)
        self.down = ConvBnAct(16, 32, 3, stride=2, groups=2)
        self.block2 = FunctionalRepBlock(32, groups=2, act_layer=nn.GELU)
        self.ffn = ResidualFFN(32, mlp_ratio=2.0, drop_path=0.1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.down(x)
        x = self.block2(x)
        x = self.ffn(x)
        x = x.mean((2, 3))
        return self.fc(x)


def mixed_tiny(num_classes: int = 10) -> nn.Module:
    """BatchNormAct2d, in-place ``out +=``, DropPath, ``F.conv2d`` on ``self.weight``, ``torch.add``."""
    return MixedNet(num_classes=num_classes)


# ---------------------------------------------------------------------------------------
# MobileViT (lite)
# ---------------------------------------------------------------------------------------


class MobileViTLite(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_1 = ConvLayer(3, 16, 3, stride=2)
        self.layer_1 = InvertedResidual(16, 16, stride=1)
        self.layer_2 = InvertedResidual(16, 24, stride=2)
        self.layer_3 = nn.Sequential(
            InvertedResidual(24, 32, stride=2),
            MobileViTBlockLite(32, transformer_dim=32, ffn_dim=64, n_layers=1, patch_size=2),
        )
        self.conv_1x1_exp = ConvLayer(32, 64, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_1(x)
        x = self.layer_1(x)
        x = self.layer_2(x)
        x = self.layer_3(x)
        x = self.conv_1x1_exp(x)
        x = self.pool(x).flatten(1)
        return self.classifier(x)


def mobilevit_tiny(num_classes: int = 10) -> nn.Module:
    """ConvLayer stem, MV2 blocks, one MobileViT block (patch 2, 1 transformer layer)."""
    return MobileViTLite(num_classes=num_classes)


ALL_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "repvgg_tiny": repvgg_tiny,
    "mobileone_tiny": mobileone_tiny,
    "fastvit_tiny": fastvit_tiny,
    "repvit_tiny": repvit_tiny,
    "levit_head_tiny": levit_head_tiny,
    "mixed_tiny": mixed_tiny,
    "mobilevit_tiny": mobilevit_tiny,
}


# ---------------------------------------------------------------------------------------
# full size: published configs, written out the way the official repos write them
# ---------------------------------------------------------------------------------------


def repvgg_a0(num_classes: int = 1000) -> nn.Module:
    """RepVGG-A0: blocks 2/4/14/1, widths 64a/128a/256a/512b with a = 0.75, b = 2.5."""
    return RepVGG(num_blocks=[2, 4, 14, 1], widths=[48, 96, 192, 1280], num_classes=num_classes)


def mobileone_s0(num_classes: int = 1000) -> nn.Module:
    """MobileOne-S0: widths 48/128/256/1024, units 2/8/10/1, k = 4 conv branches, no SE."""
    return MobileOne([(48, 2, 0, 4), (128, 8, 0, 4), (256, 10, 0, 4), (1024, 1, 0, 4)],
                     stem_width=48, num_classes=num_classes)


def fastvit_t8(num_classes: int = 1000) -> nn.Module:
    """FastViT-T8: RepMixer stages of 2/2/4/2 blocks, dims 48/96/192/384, MLP ratio 3."""
    return FastViT(layers=[2, 2, 4, 2], embed_dims=[48, 96, 192, 384], mlp_ratios=[3, 3, 3, 3],
                   pos_embs=[False, False, False, False], num_classes=num_classes)


def repvit_m0_9(num_classes: int = 1000) -> nn.Module:
    """RepViT-M0.9: the official cfgs rows (kernel, expansion, channels, SE, stride)."""
    stage3 = [[3, 2, 192, 1 - i % 2, 1] for i in range(14)] + [[3, 2, 192, 0, 1]]
    cfgs = [[3, 2, 48, 1, 1], [3, 2, 48, 0, 1], [3, 2, 48, 0, 1],
            [3, 2, 96, 0, 2], [3, 2, 96, 1, 1], [3, 2, 96, 0, 1], [3, 2, 96, 0, 1],
            [3, 2, 192, 0, 2], *stage3,
            [3, 2, 384, 0, 2], [3, 2, 384, 1, 1], [3, 2, 384, 0, 1]]
    return RepViT(cfgs, num_classes=num_classes, distillation=True)


def repvgg_b3(num_classes: int = 1000) -> nn.Module:
    """RepVGG-B3 (published config): the zoo's largest model, 123 M parameters."""
    return RepVGG(num_blocks=[4, 6, 16, 1], widths=[192, 384, 768, 2560], num_classes=num_classes,
                  stem=64)


FULL_SIZE_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "repvgg_a0": repvgg_a0,
    "mobileone_s0": mobileone_s0,
    "fastvit_t8": fastvit_t8,
    "repvit_m0_9": repvit_m0_9,
}

# the largest zoo model with its hand-written baseline: what tools/bench_fuse.py --scale
# measures fuse()'s time and memory against (too large for the latency benchmark)
LARGE_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"repvgg_b3": repvgg_b3}
