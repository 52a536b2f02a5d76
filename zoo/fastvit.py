"""FastViT, in training form.

Vasu, Gabriel, Zhu, Tuzel, Ranjan: "FastViT: A Fast Hybrid Vision Transformer using
Structural Reparameterization", ICCV 2023, https://arxiv.org/abs/2303.14189 (official
code: github.com/apple/ml-fastvit, ``models/fastvit.py``, ``models/modules/mobileone.py``,
``models/modules/replknet.py``).

Block math (``BN`` is an eval-mode BatchNorm, ``dw`` a depthwise conv, ``C`` channels):

* MobileOneBlock (Vasu et al., "MobileOne", CVPR 2023), kernel ``k``, stride ``s``:

      y = act( SE( sum_i BN_i(conv_kxk_i(x)) + BN_s(conv_1x1(x)) + BN_id(x) ) )

  the 1x1 "scale" branch exists when ``k > 1``, the identity branch ``BN_id`` when
  ``C_in == C_out`` and ``s == 1``; ``SE`` (squeeze-excite) only in the head's
  ``conv_exp``; ``act`` is GELU unless switched off. FastViT uses one kxk branch.
* RepMixer (token mixer of the RepMixerBlock), depthwise, kernel 3:

      y = x + layer_scale * ( mixer(x) - norm(x) )
      mixer(x) = BN(dw3x3(x)) + BN(dw1x1(x)) + BN(x)        (MobileOneBlock, no act)
      norm(x)  = BN(x)                                      (MobileOneBlock, BN only)

* ConvFFN:  ``fc2( GELU( fc1( BN(dw7x7(x)) ) ) )`` with 1x1 ``fc1``/``fc2`` (bias).
* RepMixerBlock:  ``x = RepMixer(x);  x = x + layer_scale * ConvFFN(x)``.
* AttentionBlock: ``x = x + layer_scale_1 * MHSA(BN(x));  x = x + layer_scale_2 * ConvFFN(x)``
  (multi-head self-attention over the ``H*W`` tokens, head dim 32, qkv without bias).
* RepCPE (conditional positional encoding) before the attention stage:
  ``y = x + dw7x7(x)`` (conv with bias).
* PatchEmbed (downsampling between stages), ``C_in -> C_out``, stride 2:
  ``ReparamLargeKernelConv``  ``BN(conv7x7(x)) + BN(conv3x3(x))`` (groups ``C_in``), then a
  1x1 MobileOneBlock ``GELU(BN(conv1x1(y)) + BN(y))``.

  The official ``ReparamLargeKernelConv.forward`` calls ``self.activation(out)`` but
  discards the result and returns ``out``, so the network the paper trained has NO
  activation after the large-kernel conv; this file computes that network (timm's port
  keeps the same behaviour with ``lkc_use_act=False``).

Network: a convolutional stem of three MobileOneBlocks (3x3 stride 2 -> ``C0``; depthwise
3x3 stride 2; 1x1), four stages of RepMixerBlocks (the SA/MA variants: AttentionBlocks in
the last stage, preceded by a RepCPE) with a PatchEmbed between consecutive stages, then
``conv_exp`` (MobileOneBlock 3x3, groups ``C3``, ``C3 -> 2 C3``, with SE), global average
pooling and a linear head.

Every linear region above (each MobileOneBlock's branch sum, a whole RepMixer, the
large+small kernel pair, CPE, conv+BN in ConvFFN, the layer scale on fc2) is one conv in
inference form. That form is produced by ``reparam_fx.fuse`` from this graph; this file
holds no code for it. Attribute names follow the official code, so its training-form
checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import zoo
from zoo.mobileone import ConvBN, MobileOneBlock

# ---- variant table (official models/fastvit.py) ---------------------------------------
#
# name            blocks/stage    widths C0..C3        MLP ratio  last-stage mixer  layer-scale init
VARIANTS = {
    "fastvit_t8":   dict(layers=(2, 2, 4, 2),   embed_dims=(48, 96, 192, 384),  mlp_ratio=3.0,
                         attention=False, layer_scale_init_value=1e-5),
    "fastvit_t12":  dict(layers=(2, 2, 6, 2),   embed_dims=(64, 128, 256, 512), mlp_ratio=3.0,
                         attention=False, layer_scale_init_value=1e-5),
    "fastvit_s12":  dict(layers=(2, 2, 6, 2),   embed_dims=(64, 128, 256, 512), mlp_ratio=4.0,
                         attention=False, layer_scale_init_value=1e-5),
    "fastvit_sa12": dict(layers=(2, 2, 6, 2),   embed_dims=(64, 128, 256, 512), mlp_ratio=4.0,
                         attention=True, layer_scale_init_value=1e-5),
    "fastvit_sa24": dict(layers=(4, 4, 12, 4),  embed_dims=(64, 128, 256, 512), mlp_ratio=4.0,
                         attention=True, layer_scale_init_value=1e-5),
    "fastvit_sa36": dict(layers=(6, 6, 18, 6),  embed_dims=(64, 128, 256, 512), mlp_ratio=4.0,
                         attention=True, layer_scale_init_value=1e-6),
    "fastvit_ma36": dict(layers=(6, 6, 18, 6),  embed_dims=(76, 152, 304, 608), mlp_ratio=4.0,
                         attention=True, layer_scale_init_value=1e-6),
}
# ``attention=True`` ("SA"/"MA"): stage 4 is RepCPE + AttentionBlocks; all other stages
# (and every stage of T/S variants) are RepMixerBlocks. Common to all variants: RepMixer
# kernel 3, PatchEmbed kernel 7 (small kernel 3) stride 2, CPE kernel 7x7, ConvFFN
# kernel 7, head expansion 2.0, SE reduction 1/16, attention head dim 32.

# Official parameter counts in millions, training form -> single-conv inference form.
OFFICIAL_PARAMS_M = {
    "fastvit_t8": (4.03, 4.00),
    "fastvit_t12": (7.55, 7.51),
    "fastvit_s12": (9.47, 9.43),
    "fastvit_sa12": (11.58, 11.55),
    "fastvit_sa24": (21.55, 21.50),
    "fastvit_sa36": (31.53, 31.46),
    "fastvit_ma36": (44.07, 43.99),
}

REPMIXER_KERNEL = 3
DOWN_PATCH_SIZE = 7
DOWN_SMALL_KERNEL = 3
DOWN_STRIDE = 2
CPE_KERNEL = 7
FFN_KERNEL = 7
CLS_RATIO = 2.0
HEAD_DIM = 32


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet-style ``BN(conv_kxk(x)) + BN(conv_small(x))``, same stride and groups.

    No activation: the official forward computes ``activation(out)`` and drops it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 groups: int, small_kernel: int):
        super().__init__()
        if small_kernel > kernel_size:
            raise ValueError("the small kernel cannot be larger than the large kernel")
        self.lkb_origin = ConvBN(in_channels, out_channels, kernel_size, stride,
                                 kernel_size // 2, groups)
        self.small_conv = ConvBN(in_channels, out_channels, small_kernel, stride,
                                 small_kernel // 2, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lkb_origin(x) + self.small_conv(x)


class PatchEmbed(nn.Module):
    """Downsampling: large+small kernel conv (groups ``C_in``, stride 2), 1x1 MobileOneBlock."""

    def __init__(self, patch_size: int, stride: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_channels, embed_dim, patch_size, stride,
                                   groups=in_channels, small_kernel=DOWN_SMALL_KERNEL),
            MobileOneBlock(embed_dim, embed_dim, kernel_size=1, activation=nn.GELU),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RepMixer(nn.Module):
    """``x + layer_scale * (mixer(x) - norm(x))``, both depthwise MobileOneBlocks without act."""

    def __init__(self, dim: int, kernel_size: int = REPMIXER_KERNEL,
                 layer_scale_init_value: float = 1e-5):
        super().__init__()
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, activation=None,
                                   use_scale_branch=False, num_conv_branches=0)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, activation=None)
        self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ConvFFN(nn.Module):
    """``fc2(GELU(fc1(BN(dw7x7(x)))))``."""

    def __init__(self, in_channels: int, hidden_channels: int, drop: float = 0.0):
        super().__init__()
        self.conv = ConvBN(in_channels, in_channels, FFN_KERNEL, 1, FFN_KERNEL // 2,
                           groups=in_channels)
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, in_channels, kernel_size=1)
        self.drop = nn.Dropout(drop)
        for conv in (self.conv.conv, self.fc1, self.fc2):
            nn.init.trunc_normal_(conv.weight, std=0.02)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.conv(x)))
        return self.drop(self.fc2(self.drop(x)))


class MHSA(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions of a ``(B, C, H, W)`` map."""

    def __init__(self, dim: int, head_dim: int = HEAD_DIM, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"dim {dim} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(-2, -1)                      # (B, N, C)
        qkv = self.qkv(tokens).reshape(x.shape[0], -1, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)                             # (3, B, heads, N, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).flatten(2)  # (B, N, C)
        out = self.proj_drop(self.proj(out))
        return out.transpose(-2, -1).reshape(x.shape)


class RepCPE(nn.Module):
    """Conditional positional encoding ``x + dw7x7(x)`` (conv with bias)."""

    def __init__(self, dim: int, kernel_size: int = CPE_KERNEL):
        super().__init__()
        self.pe = nn.Conv2d(dim, dim, kernel_size, stride=1, padding=kernel_size // 2,
                            groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pe(x) + x


class DropPath(nn.Module):
    """Stochastic depth per sample in training; the identity in eval mode."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # module mode, not a tensor value
            return x
        keep = 1.0 - self.drop_prob
        mask = torch.rand_like(x[:, :1, :1, :1]).add(keep).floor()
        return x * mask / keep


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class RepMixerBlock(nn.Module):
    """``x = RepMixer(x);  x = x + layer_scale * ConvFFN(x)``."""

    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int = REPMIXER_KERNEL,
                 drop: float = 0.0, drop_path: float = 0.0, layer_scale_init_value: float = 1e-5):
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init_value)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), drop)
        self.drop_path = _drop_path(drop_path)
        self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale * self.convffn(x))


class AttentionBlock(nn.Module):
    """``x = x + layer_scale_1 * MHSA(BN(x));  x = x + layer_scale_2 * ConvFFN(x)``."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-5):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = MHSA(dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), drop)
        self.drop_path = _drop_path(drop_path)
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1 * self.token_mixer(self.norm(x)))
        return x + self.drop_path(self.layer_scale_2 * self.convffn(x))


def convolutional_stem(in_channels: int, out_channels: int) -> nn.Sequential:
    """MobileOneBlocks: 3x3 stride 2; depthwise 3x3 stride 2; 1x1."""
    return nn.Sequential(
        MobileOneBlock(in_channels, out_channels, 3, stride=2, activation=nn.GELU),
        MobileOneBlock(out_channels, out_channels, 3, stride=2, groups=out_channels,
                       activation=nn.GELU),
        MobileOneBlock(out_channels, out_channels, 1, activation=nn.GELU),
    )


class FastViT(nn.Module):
    """Stem, four stages with PatchEmbed between them, ``conv_exp`` (SE), pool, linear head."""

    def __init__(self, layers, embed_dims, mlp_ratio: float, attention: bool,
                 layer_scale_init_value: float = 1e-5, num_classes: int = 1000,
                 in_channels: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        assert len(layers) == len(embed_dims) == 4
        self.num_classes = num_classes
        self.patch_embed = convolutional_stem(in_channels, embed_dims[0])
        total_blocks = sum(layers)
        network = []
        for stage, (depth, dim) in enumerate(zip(layers, embed_dims)):
            use_attention = attention and stage == len(layers) - 1
            if use_attention:
                network.append(RepCPE(dim))
            blocks = []
            for index in range(depth):
                position = sum(layers[:stage]) + index
                drop_path = drop_path_rate * position / max(total_blocks - 1, 1)
                common = dict(drop=drop_rate, drop_path=drop_path,
                              layer_scale_init_value=layer_scale_init_value)
                blocks.append(AttentionBlock(dim, mlp_ratio, **common) if use_attention
                              else RepMixerBlock(dim, mlp_ratio, **common))
            network.append(nn.Sequential(*blocks))
            if stage < len(layers) - 1:
                network.append(PatchEmbed(DOWN_PATCH_SIZE, DOWN_STRIDE, dim, embed_dims[stage + 1]))
        self.network = nn.ModuleList(network)
        final = int(embed_dims[-1] * CLS_RATIO)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.conv_exp = MobileOneBlock(embed_dims[-1], final, 3, groups=embed_dims[-1],
                                       use_se=True, activation=nn.GELU)
        self.head = nn.Linear(final, num_classes) if num_classes > 0 else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.network:
            x = block(x)
        x = self.gap(self.conv_exp(x))
        return self.head(torch.flatten(x, 1))


zoo.register_variants(VARIANTS, FastViT)
