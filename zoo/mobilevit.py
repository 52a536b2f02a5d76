"""MobileViT (v1), in training form.

Mehta, Rastegari: "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision
Transformer", ICLR 2022, https://arxiv.org/abs/2110.02178 (official code:
github.com/apple/ml-cvnets, ``cvnets/models/classification/mobilevit.py``,
``cvnets/models/classification/config/mobilevit.py``, ``cvnets/modules/mobilevit_block.py``,
``cvnets/modules/mobilenetv2.py``, ``cvnets/modules/transformer.py``).

Block math. ``ConvLayer(k)`` is ``act(BN(conv_kxk(x)))`` with a bias-free conv, "same"
padding and SiLU (``swish``) as ``act``; some instances drop the BN and/or the act.

* MV2 block (MobileNetV2 inverted residual), expansion ``t``, hidden width
  ``h = make_divisible(t C_in, 8)``::

      y = BN(conv1x1_{h->C_out}( SiLU(BN(dwconv3x3_s(SiLU(BN(conv1x1_{C_in->h}(x)))))) ))
      y = x + y      only if stride == 1 and C_in == C_out

* MobileViT block on ``x`` (``C`` channels, ``H x W``), transformer width ``d``, patch
  ``p_h x p_w = 2 x 2`` (``P = 4`` pixels per patch, ``N = HW / P`` patches)::

      local     = conv1x1_{C->d}( SiLU(BN(conv3x3_{C->C}(x))) )        # no BN, no act, no bias
      patches   = unfold(local)                                       # [B P, N, d]
      for each of L transformer layers (pre-norm):
          patches = patches + MHA(LN(patches))                          # 4 heads
          patches = patches + W2 SiLU(W1 LN(patches) + b1) + b2
      patches   = LN(patches)
      global_   = fold(patches)                                       # [B, d, H, W]
      proj      = SiLU(BN(conv1x1_{d->C}(global_)))                    # conv_proj
      y         = SiLU(BN(conv3x3_{2C->C}(concat(x, proj))))           # fusion

  ``unfold`` reshapes ``[B, d, n_h p_h, n_w p_w]`` to ``[B, d, n_h, p_h, n_w, p_w]``,
  permutes to ``[B, p_h, p_w, n_h, n_w, d]`` and flattens to ``[B P, N, d]`` (the same
  element order as the official reshape/transpose sequence); ``fold`` is its inverse.
  The sizes come from ``x.shape`` (fx proxies), with no Python branching on them. As in
  the official code, a map that ``2 x 2`` patches do not tile (the last block runs at
  stride 32, so a 224 input gives 7x7) is resized bilinearly up to the next multiple of
  the patch size before unfolding and back after folding. The resize always runs; when
  the map already tiles it is a same-size resize, an exact copy, so any input side that
  is a multiple of 32 works and gives the official result.

Network. Stem ``ConvLayer(3)`` 3 -> 16, stride 2; ``layer_1`` one MV2 block (stride 1);
``layer_2`` three MV2 blocks (first with stride 2); ``layer_3``..``layer_5`` each one MV2
block with stride 2 followed by one MobileViT block; ``conv_1x1_exp`` ``ConvLayer(1)`` to
``min(4 C, 960)`` channels; global average pool, dropout (training only) and a linear
classifier. Attribute names follow the official code (``conv_1``, ``layer_1``,
``block.conv`` / ``block.norm``, ``local_rep``, ``global_rep``, ``conv_proj``, ``fusion``,
``pre_norm_mha``, ``qkv_proj``, ...), so the ``state_dict`` keys follow the official layout.

Every conv+BN pair folds with ``reparam_fx.fuse``; the transformer (LayerNorm, attention,
FFN) is not affine per pixel and is left as it is.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import zoo

# ---- variant table (official config/mobilevit.py; modes xx_small / x_small / small) ---
#
# Each stage: out = output channels; MV2 stages: t = expansion, n = blocks, s = stride of
# the first block; MobileViT stages (always entered through one stride-2 MV2 block):
# d = transformer width, ffn = FFN hidden width, L = transformer layers. Patches 2x2,
# 4 heads, last_layer_exp_factor 4. Dropout (training only; official yaml): classifier
# 0.1, transformer 0.05 for xxs and 0.1 otherwise, attention and FFN 0.
#
# name           stem  layer_1    layer_2     layer_3         layer_4          layer_5
#                      out t n s  out t n s   out d   ffn L   out d   ffn L    out d   ffn L
# mobilevit_xxs  16    16  2 1 1  24  2 3 2   48  64  128 2   64  80  160 4    80  96  192 3
# mobilevit_xs   16    32  4 1 1  48  4 3 2   64  96  192 2   80  120 240 4    96  144 288 3
# mobilevit_s    16    32  4 1 1  64  4 3 2   96  144 288 2   128 192 384 4    160 240 480 3
VARIANTS = {
    "mobilevit_xxs": dict(
        expand_ratio=2,
        mv2_layers=((16, 1, 1), (24, 3, 2)),                      # (out, blocks, stride)
        vit_layers=((48, 64, 128, 2), (64, 80, 160, 4), (80, 96, 192, 3)),  # (out, d, ffn, L)
        transformer_dropout=0.05,
    ),
    "mobilevit_xs": dict(
        expand_ratio=4,
        mv2_layers=((32, 1, 1), (48, 3, 2)),
        vit_layers=((64, 96, 192, 2), (80, 120, 240, 4), (96, 144, 288, 3)),
    ),
    "mobilevit_s": dict(
        expand_ratio=4,
        mv2_layers=((32, 1, 1), (64, 3, 2)),
        vit_layers=((96, 144, 288, 2), (128, 192, 384, 4), (160, 240, 480, 3)),
    ),
}

# Official parameter counts in millions (training form). Folding a conv+BN drops the BN's
# gamma and beta and gives the bias-free conv a bias: one parameter less per BN channel.
OFFICIAL_PARAMS_M = {
    "mobilevit_xxs": 1.27,
    "mobilevit_xs": 2.32,
    "mobilevit_s": 5.58,
}

STEM_CHANNELS = 16
PATCH_SIZE = (2, 2)
NUM_HEADS = 4
LAST_LAYER_EXP_FACTOR = 4


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvLayer(nn.Module):
    """``act(norm(conv(x)))``: a bias-free kxk conv with "same" padding, optional BN and SiLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, use_norm: bool = True, use_act: bool = True):
        super().__init__()
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size,
                                                stride=stride, padding=(kernel_size - 1) // 2,
                                                groups=groups, bias=False))
        if use_norm:
            self.block.add_module("norm", nn.BatchNorm2d(out_channels))
        if use_act:
            self.block.add_module("act", nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class InvertedResidual(nn.Module):
    """MV2 block: 1x1 expand (BN, SiLU), 3x3 depthwise (BN, SiLU), 1x1 reduce (BN) [+ x]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = make_divisible(int(round(in_channels * expand_ratio)), 8)
        self.block = nn.Sequential()
        if expand_ratio != 1:
            self.block.add_module("exp_1x1", ConvLayer(in_channels, hidden, 1))
        self.block.add_module("conv_3x3", ConvLayer(hidden, hidden, 3, stride=stride,
                                                    groups=hidden))
        self.block.add_module("red_1x1", ConvLayer(hidden, out_channels, 1, use_act=False))
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:  # structural, fixed at construction
            return x + self.block(x)
        return self.block(x)


class MultiHeadAttention(nn.Module):
    """Self-attention on ``[B, S, C]``, h heads of width c: ``softmax(q k^T / sqrt(c)) v``."""

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout: float = 0.0):
        super().__init__()
        assert embed_dim % num_heads == 0, "embed_dim must be divisible by num_heads"
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[0], x.shape[1]
        # [B, S, 3C] -> [B, S, 3, h, c] -> [3, B, h, S, c]
        qkv = self.qkv_proj(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(query * self.scaling, key.transpose(-1, -2))
        attn = self.attn_dropout(self.softmax(attn))
        out = torch.matmul(attn, value)  # [B, h, S, c]
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.out_proj(out)


class TransformerEncoder(nn.Module):
    """Pre-norm transformer layer: ``x + MHA(LN(x))``, then ``x + FFN(LN(x))`` with SiLU."""

    def __init__(self, embed_dim: int, ffn_dim: int, num_heads: int, dropout: float = 0.0,
                 attn_dropout: float = 0.0, ffn_dropout: float = 0.0):
        super().__init__()
        self.pre_norm_mha = nn.Sequential(
            nn.LayerNorm(embed_dim),
            MultiHeadAttention(embed_dim, num_heads, attn_dropout=attn_dropout),
            nn.Dropout(dropout),
        )
        self.pre_norm_ffn = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, ffn_dim),
            nn.SiLU(),
            nn.Dropout(ffn_dropout),
            nn.Linear(ffn_dim, embed_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pre_norm_mha(x)
        return x + self.pre_norm_ffn(x)


@torch.fx.wrap
def resize_bilinear(x: torch.Tensor, height, width) -> torch.Tensor:
    """``F.interpolate(x, (height, width), bilinear)``, a leaf of traced graphs (it branches
    on tensor dims inside, which symbolic tracing cannot follow)."""
    return F.interpolate(x, size=(int(height), int(width)), mode="bilinear",
                         align_corners=False)


class MobileViTBlock(nn.Module):
    """Local conv representation, transformer over unfolded 2x2 patches, fold, project, fuse."""

    def __init__(self, in_channels: int, transformer_dim: int, ffn_dim: int,
                 n_transformer_blocks: int, num_heads: int = NUM_HEADS,
                 patch_size: tuple[int, int] = PATCH_SIZE,
                 dropout: float = 0.1, attn_dropout: float = 0.0, ffn_dropout: float = 0.0,
                 conv_ksize: int = 3):
        super().__init__()
        self.local_rep = nn.Sequential()
        self.local_rep.add_module("conv_3x3", ConvLayer(in_channels, in_channels, conv_ksize))
        self.local_rep.add_module("conv_1x1", ConvLayer(in_channels, transformer_dim, 1,
                                                        use_norm=False, use_act=False))
        layers = [TransformerEncoder(transformer_dim, ffn_dim, num_heads, dropout=dropout,
                                     attn_dropout=attn_dropout, ffn_dropout=ffn_dropout)
                  for _ in range(n_transformer_blocks)]
        self.global_rep = nn.Sequential(*layers, nn.LayerNorm(transformer_dim))
        self.conv_proj = ConvLayer(transformer_dim, in_channels, 1)
        self.fusion = ConvLayer(2 * in_channels, in_channels, conv_ksize)
        self.patch_h, self.patch_w = patch_size

    def unfolding(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B p_h p_w, n_h n_w, C]``, a sequence per pixel slot, after
        resizing ``H x W`` up to ``n_h p_h x n_w p_w`` (a copy when it already tiles)."""
        batch, channels = feature_map.shape[0], feature_map.shape[1]
        n_h = (feature_map.shape[2] + self.patch_h - 1) // self.patch_h
        n_w = (feature_map.shape[3] + self.patch_w - 1) // self.patch_w
        feature_map = resize_bilinear(feature_map, n_h * self.patch_h, n_w * self.patch_w)
        patches = feature_map.reshape(batch, channels, n_h, self.patch_h, n_w, self.patch_w)
        patches = patches.permute(0, 3, 5, 2, 4, 1)  # [B, p_h, p_w, n_h, n_w, C]
        return patches.reshape(batch * self.patch_h * self.patch_w, n_h * n_w, channels)

    def folding(self, patches: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`unfolding`; ``like`` is the map before unfolding (B, H, W)."""
        batch, height, width = like.shape[0], like.shape[2], like.shape[3]
        n_h = (height + self.patch_h - 1) // self.patch_h
        n_w = (width + self.patch_w - 1) // self.patch_w
        feature_map = patches.reshape(batch, self.patch_h, self.patch_w, n_h, n_w, -1)
        feature_map = feature_map.permute(0, 5, 3, 1, 4, 2)  # [B, C, n_h, p_h, n_w, p_w]
        feature_map = feature_map.reshape(batch, -1, n_h * self.patch_h, n_w * self.patch_w)
        return resize_bilinear(feature_map, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local_rep(x)
        patches = self.global_rep(self.unfolding(local))
        projected = self.conv_proj(self.folding(patches, like=local))
        return self.fusion(torch.cat((x, projected), dim=1))


class GlobalPool(nn.Module):
    """Mean over the spatial dimensions: ``[B, C, H, W] -> [B, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class MobileViT(nn.Module):
    """Stem, two MV2 stages, three (MV2 stride 2 + MobileViT block) stages, 1x1 expand, head."""

    def __init__(self, expand_ratio: int, mv2_layers, vit_layers, num_classes: int = 1000,
                 in_channels: int = 3, classifier_dropout: float = 0.1,
                 transformer_dropout: float = 0.1, attn_dropout: float = 0.0,
                 ffn_dropout: float = 0.0, num_heads: int = NUM_HEADS):
        super().__init__()
        assert len(mv2_layers) == 2 and len(vit_layers) == 3
        self.conv_1 = ConvLayer(in_channels, STEM_CHANNELS, 3, stride=2)
        channels = STEM_CHANNELS
        for index, (out_channels, num_blocks, stride) in enumerate(mv2_layers, start=1):
            blocks = []
            for block_stride in [stride] + [1] * (num_blocks - 1):
                blocks.append(InvertedResidual(channels, out_channels, block_stride, expand_ratio))
                channels = out_channels
            setattr(self, f"layer_{index}", nn.Sequential(*blocks))
        for index, (out_channels, dim, ffn_dim, depth) in enumerate(vit_layers, start=3):
            downsample = InvertedResidual(channels, out_channels, 2, expand_ratio)
            channels = out_channels
            vit = MobileViTBlock(channels, dim, ffn_dim, depth, num_heads=num_heads,
                                 dropout=transformer_dropout, attn_dropout=attn_dropout,
                                 ffn_dropout=ffn_dropout)
            setattr(self, f"layer_{index}", nn.Sequential(downsample, vit))
        exp_channels = min(LAST_LAYER_EXP_FACTOR * channels, 960)
        self.conv_1x1_exp = ConvLayer(channels, exp_channels, 1)
        self.classifier = nn.Sequential()
        self.classifier.add_module("global_pool", GlobalPool())
        self.classifier.add_module("dropout", nn.Dropout(classifier_dropout))
        self.classifier.add_module("fc", nn.Linear(exp_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_1(x)
        x = self.layer_1(x)
        x = self.layer_2(x)
        x = self.layer_3(x)
        x = self.layer_4(x)
        x = self.layer_5(x)
        x = self.conv_1x1_exp(x)
        return self.classifier(x)


zoo.register_variants(VARIANTS, MobileViT)
