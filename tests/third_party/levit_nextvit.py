"""Token-layout models: BatchNorm next to ``nn.Linear`` layers with reshapes in between, in the
code shapes of LeViT (huggingface/pytorch-image-models ``timm/models/levit.py`` and the
official facebookresearch/LeViT ``levit.py``), Next-ViT (timm ``timm/models/nextvit.py`` and
the official bytedance/Next-ViT ``classification/nextvit.py``) and channels-last ConvNeXt
blocks (timm ``timm/models/convnext.py``, facebookresearch/ConvNeXt ``models/convnext.py``),
plus the BatchNorm-then-flatten classifier heads of deepinsight/insightface ``iresnet.py`` and
Next-ViT.

Read from the public files named in each class docstring and re-written here in our own words,
using torch only. The deploy conversions are the libraries' own:

- LeViT: the per-module ``fuse()`` of ``Conv2d_BN`` / ``Linear_BN`` / ``BN_Linear`` (timm:
  ``ConvNorm`` / ``LinearNorm`` / ``NormLinear``) and the model-wide ``replace_batchnorm`` walk
  of facebookresearch/LeViT ``utils.py`` (:func:`levit_replace_batchnorm`).
- Next-ViT: ``merge_pre_bn`` (pre-norm BatchNorm folded into the q/k/v ``Linear`` and the MLP's
  first 1x1 conv, the ``AvgPool1d`` -> ``BatchNorm1d`` folded into k/v), called by each block's
  ``reparameterize()`` through timm ``timm/utils/model.py`` ``reparameterize_model`` (timm
  shape) or by ``NextViT.merge_bn()`` -> ``NCB/NTB.merge_bn()`` (official shape).
- ConvNeXt and the insightface head: none (``reparameterize=None``).

Intended deviations: where the libraries build the fused layer with ``nn.Conv2d(...)`` /
``nn.Linear(...)`` and then ``weight.data.copy_(...)``, the module is created in the default
dtype, so a float64 model would come back with float32 layers; the copies here pass the source
dtype and device instead so that the baseline stays exact in float64. ``merge_pre_bn`` creates a
missing bias from ``module.out_chs`` (timm) / ``module.out_channels`` (official), an attribute
``nn.Linear`` does not have; the copy here uses ``weight.shape[0]`` (the branch is never taken:
every merged layer has a bias). einops ``rearrange`` in the official Next-ViT ``NTB`` is
written out as the ``permute`` + ``reshape`` it performs.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from functools import partial
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from . import Idiom

_TIMM = "huggingface/pytorch-image-models"
_LEVIT = "facebookresearch/LeViT"
_NEXTVIT = "bytedance/Next-ViT"
_CONVNEXT = "facebookresearch/ConvNeXt"
_INSIGHTFACE = "deepinsight/insightface"


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _ntuple(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


# ============================================================================================
# LeViT, timm code shape (timm/models/levit.py); fuse() written the official way
# ============================================================================================


def _bn_scale_shift(bn):
    """The eval-mode affine of a BatchNorm: ``y = x * scale + shift`` (official LeViT form:
    ``weight / (var + eps) ** 0.5`` and ``bias - mean * weight / (var + eps) ** 0.5``)."""
    denom = (bn.running_var + bn.eps) ** 0.5
    scale = bn.weight / denom
    shift = bn.bias - bn.running_mean * bn.weight / denom
    return scale, shift


class ConvNorm(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: ConvNorm (fuse as
    facebookresearch/LeViT levit.py: Conv2d_BN.fuse, groups fix included).

    Idiom: conv (``linear``, no bias) -> BatchNorm2d (``bn``) whose weight is initialised to
    ``bn_weight_init``; ``fuse()`` *returns* a new biased ``nn.Conv2d`` that the walk swaps in."""

    def __init__(self, in_chs, out_chs, kernel_size=1, stride=1, padding=0, dilation=1,
                 groups=1, bn_weight_init=1):
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups,
                                bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    @torch.no_grad()
    def fuse(self):
        conv = self.linear
        scale, shift = _bn_scale_shift(self.bn)
        weight = conv.weight * scale[:, None, None, None]
        fused = nn.Conv2d(weight.size(1) * conv.groups, weight.size(0), weight.shape[2:],
                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          groups=conv.groups, dtype=weight.dtype, device=weight.device)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(shift)
        return fused

    def forward(self, x):
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: LinearNorm (fuse as
    facebookresearch/LeViT levit.py: Linear_BN.fuse).

    Idiom: a bias-free ``Linear`` on (B, N, C) tokens, then ``BatchNorm1d`` over
    ``x.flatten(0, 1)`` (B*N rows of C features) and ``reshape_as(x)`` back: the BN's channel
    axis is the Linear's output axis, but only after a flatten that changes the rank."""

    def __init__(self, in_features, out_features, bn_weight_init=1):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    @torch.no_grad()
    def fuse(self):
        scale, shift = _bn_scale_shift(self.bn)
        weight = self.linear.weight * scale[:, None]
        fused = nn.Linear(weight.size(1), weight.size(0), dtype=weight.dtype,
                          device=weight.device)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(shift)
        return fused

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: NormLinear (fuse as
    facebookresearch/LeViT levit.py: BN_Linear.fuse).

    Idiom: ``BatchNorm1d`` -> ``Dropout`` -> ``Linear`` on pooled (B, C) features: the BN folds
    *forward* into the Linear's input columns (``W * scale[None, :]``, ``W @ shift + b``)."""

    def __init__(self, in_features, out_features, bias=True, std=0.02, drop=0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        nn.init.trunc_normal_(self.linear.weight, std=std)
        if self.linear.bias is not None:
            nn.init.constant_(self.linear.bias, 0)

    @torch.no_grad()
    def fuse(self):
        linear = self.linear
        scale, shift = _bn_scale_shift(self.bn)
        weight = linear.weight * scale[None, :]
        if linear.bias is None:
            bias = shift @ linear.weight.T
        else:
            bias = (linear.weight @ shift[:, None]).view(-1) + linear.bias
        fused = nn.Linear(weight.size(1), weight.size(0), dtype=weight.dtype,
                          device=weight.device)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(bias)
        return fused

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


class Stem16(nn.Sequential):
    """huggingface/pytorch-image-models timm/models/levit.py: Stem16.

    Idiom: an ``nn.Sequential`` subclass of four stride-2 3x3 ``ConvNorm`` with activations
    between them, registered with ``add_module``; carries a ``stride`` attribute."""

    def __init__(self, in_chs, out_chs, act_layer):
        super().__init__()
        self.stride = 16
        self.add_module("conv1", ConvNorm(in_chs, out_chs // 8, 3, stride=2, padding=1))
        self.add_module("act1", act_layer())
        self.add_module("conv2", ConvNorm(out_chs // 8, out_chs // 4, 3, stride=2, padding=1))
        self.add_module("act2", act_layer())
        self.add_module("conv3", ConvNorm(out_chs // 4, out_chs // 2, 3, stride=2, padding=1))
        self.add_module("act3", act_layer())
        self.add_module("conv4", ConvNorm(out_chs // 2, out_chs, 3, stride=2, padding=1))


class LevitSubsample(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: Downsample (official
    facebookresearch/LeViT levit.py: Subsample).

    Idiom: tokens viewed back as a (B, H, W, C) grid, strided slicing ``[:, ::s, ::s]`` and
    ``reshape(B, -1, C)``: a spatial subsample written on the token layout, between a token
    tensor and a ``LinearNorm``."""

    def __init__(self, stride, resolution, use_pool=False):
        super().__init__()
        self.stride = stride
        self.resolution = _pair(resolution)
        self.pool = (nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
                     if use_pool else None)

    def forward(self, x):
        B, N, C = x.shape
        x = x.view(B, self.resolution[0], self.resolution[1], C)
        if self.pool is not None:
            x = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            x = x[:, ::self.stride, ::self.stride]
        return x.reshape(B, -1, C)


class _AttentionBiasCache(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: the ``attention_bias_cache``
    machinery shared (as copies) by Attention and AttentionDownsample.

    Idiom: a learnable ``attention_biases`` table gathered by a non-persistent long buffer;
    in eval mode the gathered table is cached in a plain ``dict`` keyed by ``str(device)``
    (``get_attention_biases(x.device)``), and a ``train()`` override (which returns None)
    clears it. Under ``torch.fx`` the cache key is the string of a Proxy and the cached value
    is a Proxy of that trace, left behind in the module."""

    attention_bias_cache: Dict[str, torch.Tensor]

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]


class LevitAttention(_AttentionBiasCache):
    """huggingface/pytorch-image-models timm/models/levit.py: Attention (``use_conv=False``).

    Idiom: ``qkv`` is a ``LinearNorm`` whose output is ``view``-ed into heads and ``split``
    into q/k/v (the BN's channels are head-interleaved q|k|v blocks); attention with a
    gathered relative-position bias; ``proj`` = act -> ``LinearNorm`` with ``bn_weight_init=0``."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4.0, resolution=14,
                 act_layer=nn.SiLU):
        super().__init__()
        resolution = _pair(resolution)
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = int(attn_ratio * key_dim) * num_heads

        self.qkv = LinearNorm(dim, self.val_attn_dim + self.key_attn_dim * 2)
        self.proj = nn.Sequential(OrderedDict([
            ("act", act_layer()),
            ("ln", LinearNorm(self.val_attn_dim, dim, bn_weight_init=0)),
        ]))

        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution[0] * resolution[1]))
        grid = torch.stack(torch.meshgrid(torch.arange(resolution[0]), torch.arange(resolution[1]),
                                          indexing="ij")).flatten(1)
        offsets = (grid[..., :, None] - grid[..., None, :]).abs()
        offsets = offsets[0] * resolution[1] + offsets[1]
        self.register_buffer("attention_bias_idxs", offsets, persistent=False)
        self.attention_bias_cache = {}

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 3, 1)
        v = v.permute(0, 2, 1, 3)

        attn = q @ k * self.scale + self.get_attention_biases(x.device)
        attn = attn.softmax(dim=-1)

        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        x = self.proj(x)
        return x


class LevitAttentionDownsample(_AttentionBiasCache):
    """huggingface/pytorch-image-models timm/models/levit.py: AttentionDownsample
    (``use_conv=False``).

    Idiom: ``kv`` LinearNorm on all tokens, ``q`` = Sequential(subsample on the token grid,
    LinearNorm) on a quarter of them, a (N_q, N_k) gathered bias, ``proj`` = act ->
    LinearNorm to the next stage's width."""

    def __init__(self, in_dim, out_dim, key_dim, num_heads=8, attn_ratio=2.0, stride=2,
                 resolution=14, use_pool=False, act_layer=nn.SiLU):
        super().__init__()
        resolution = _pair(resolution)
        self.stride = stride
        self.resolution = resolution
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * self.num_heads
        self.scale = key_dim ** -0.5

        self.kv = LinearNorm(in_dim, self.val_attn_dim + self.key_attn_dim)
        self.q = nn.Sequential(OrderedDict([
            ("down", LevitSubsample(stride=stride, resolution=resolution, use_pool=use_pool)),
            ("ln", LinearNorm(in_dim, self.key_attn_dim)),
        ]))
        self.proj = nn.Sequential(OrderedDict([
            ("act", act_layer()),
            ("ln", LinearNorm(self.val_attn_dim, out_dim)),
        ]))

        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution[0] * resolution[1]))
        k_grid = torch.stack(torch.meshgrid(torch.arange(resolution[0]),
                                            torch.arange(resolution[1]), indexing="ij")).flatten(1)
        q_grid = torch.stack(torch.meshgrid(
            torch.arange(0, resolution[0], step=stride),
            torch.arange(0, resolution[1], step=stride), indexing="ij")).flatten(1)
        offsets = (q_grid[..., :, None] - k_grid[..., None, :]).abs()
        offsets = offsets[0] * resolution[1] + offsets[1]
        self.register_buffer("attention_bias_idxs", offsets, persistent=False)
        self.attention_bias_cache = {}

    def forward(self, x):
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k = k.permute(0, 2, 3, 1)
        v = v.permute(0, 2, 1, 3)
        q = self.q(x).view(B, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)

        attn = q @ k * self.scale + self.get_attention_biases(x.device)
        attn = attn.softmax(dim=-1)

        x = (attn @ v).transpose(1, 2).reshape(B, -1, self.val_attn_dim)
        x = self.proj(x)
        return x


class LevitMlp(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: LevitMlp (``use_conv=False``).

    Idiom: LinearNorm -> act -> Dropout -> LinearNorm (``bn_weight_init=0``): two
    Linear/flatten/BN1d/reshape_as pairs with a nonlinearity between them."""

    def __init__(self, in_features, hidden_features=None, out_features=None,
                 act_layer=nn.SiLU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.ln1 = LinearNorm(in_features, hidden_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.ln2 = LinearNorm(hidden_features, out_features, bn_weight_init=0)

    def forward(self, x):
        x = self.ln1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.ln2(x)
        return x


class LevitDownsample(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: LevitDownsample.

    Idiom: AttentionDownsample (no residual: the width and token count change) then a
    residual ``x + drop_path(mlp(x))`` with an Identity drop path."""

    def __init__(self, in_dim, out_dim, key_dim, num_heads=8, attn_ratio=4.0, mlp_ratio=2.0,
                 act_layer=nn.SiLU, attn_act_layer=None, resolution=14, use_pool=False,
                 drop_path=0.0):
        super().__init__()
        attn_act_layer = attn_act_layer or act_layer
        self.attn_downsample = LevitAttentionDownsample(
            in_dim=in_dim, out_dim=out_dim, key_dim=key_dim, num_heads=num_heads,
            attn_ratio=attn_ratio, act_layer=attn_act_layer, resolution=resolution,
            use_pool=use_pool)
        self.mlp = LevitMlp(out_dim, int(out_dim * mlp_ratio), act_layer=act_layer)
        self.drop_path = nn.Identity()

    def forward(self, x):
        x = self.attn_downsample(x)
        x = x + self.drop_path(self.mlp(x))
        return x


class LevitBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: LevitBlock.

    Idiom: ``x + drop_path1(attn(x))`` then ``x + drop_path2(mlp(x))`` on (B, N, C) tokens."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4.0, mlp_ratio=2.0, resolution=14,
                 act_layer=nn.SiLU, attn_act_layer=None, drop_path=0.0):
        super().__init__()
        attn_act_layer = attn_act_layer or act_layer
        self.attn = LevitAttention(dim=dim, key_dim=key_dim, num_heads=num_heads,
                                   attn_ratio=attn_ratio, resolution=resolution,
                                   act_layer=attn_act_layer)
        self.drop_path1 = nn.Identity()
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.attn(x))
        x = x + self.drop_path2(self.mlp(x))
        return x


class LevitStage(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: LevitStage.

    Idiom: optional LevitDownsample (``num_heads = in_dim // key_dim``, attn_ratio 4, mlp_ratio
    2, resolution ``(r - 1) // 2 + 1`` after it) or Identity, then LevitBlocks."""

    def __init__(self, in_dim, out_dim, key_dim, depth=4, num_heads=8, attn_ratio=4.0,
                 mlp_ratio=4.0, act_layer=nn.SiLU, attn_act_layer=None, resolution=14,
                 downsample="", drop_path=0.0):
        super().__init__()
        resolution = _pair(resolution)
        if downsample:
            self.downsample = LevitDownsample(
                in_dim, out_dim, key_dim=key_dim, num_heads=in_dim // key_dim, attn_ratio=4.0,
                mlp_ratio=2.0, act_layer=act_layer, attn_act_layer=attn_act_layer,
                resolution=resolution, drop_path=drop_path)
            resolution = [(r - 1) // 2 + 1 for r in resolution]
        else:
            assert in_dim == out_dim
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            LevitBlock(out_dim, key_dim, num_heads=num_heads, attn_ratio=attn_ratio,
                       mlp_ratio=mlp_ratio, act_layer=act_layer, attn_act_layer=attn_act_layer,
                       resolution=resolution, drop_path=drop_path)
            for _ in range(depth)
        ])

    def forward(self, x):
        x = self.downsample(x)
        x = self.blocks(x)
        return x


class Levit(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: Levit (``use_conv=False``).

    Idiom: a conv stem of ConvNorms, ``x.flatten(2).transpose(1, 2)`` into tokens, stages of
    LinearNorm blocks, ``x.mean(dim=1)`` token pooling, a NormLinear head."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=(192,), key_dim=64,
                 depth=(12,), num_heads=(3,), attn_ratio=2.0, mlp_ratio=2.0,
                 down_op="subsample", act_layer=nn.Hardswish, attn_act_layer=None,
                 global_pool="avg", drop_rate=0.0, drop_path_rate=0.0):
        super().__init__()
        attn_act_layer = attn_act_layer or act_layer
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = embed_dim[-1]
        self.embed_dim = embed_dim
        self.drop_rate = drop_rate

        num_stages = len(embed_dim)
        assert len(depth) == num_stages
        num_heads = _ntuple(num_heads, num_stages)
        attn_ratio = _ntuple(attn_ratio, num_stages)
        mlp_ratio = _ntuple(mlp_ratio, num_stages)

        self.stem = Stem16(in_chans, embed_dim[0], act_layer=act_layer)
        stride = self.stem.stride
        resolution = tuple(i // p for i, p in zip(_pair(img_size), _pair(stride)))

        in_dim = embed_dim[0]
        stages = []
        for i in range(num_stages):
            stage_stride = 2 if i > 0 else 1
            stages.append(LevitStage(
                in_dim, embed_dim[i], key_dim, depth=depth[i], num_heads=num_heads[i],
                attn_ratio=attn_ratio[i], mlp_ratio=mlp_ratio[i], act_layer=act_layer,
                attn_act_layer=attn_act_layer, resolution=resolution,
                downsample=down_op if stage_stride == 2 else "", drop_path=drop_path_rate))
            resolution = tuple((r - 1) // stage_stride + 1 for r in resolution)
            in_dim = embed_dim[i]
        self.stages = nn.Sequential(*stages)
        self.head = (NormLinear(embed_dim[-1], num_classes, drop=drop_rate)
                     if num_classes > 0 else nn.Identity())

    def forward_features(self, x):
        x = self.stem(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.stages(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


class LevitDistilled(Levit):
    """huggingface/pytorch-image-models timm/models/levit.py: LevitDistilled.

    Idiom: a second NormLinear ``head_dist`` on the same pooled features; in eval the two
    logits are averaged ``(x + x_dist) / 2`` (two BN1d->Linear folds meeting in an add and a
    division by a constant)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_dist = (NormLinear(self.num_features, self.num_classes)
                          if self.num_classes > 0 else nn.Identity())
        self.distilled_training = False

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        if pre_logits:
            return x
        x, x_dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2


def levit_replace_batchnorm(net: nn.Module) -> nn.Module:
    """facebookresearch/LeViT utils.py: replace_batchnorm — the official deploy conversion.

    Every child with ``fuse`` is replaced by what it returns (the walk does not descend into
    the result), a bare ``nn.Conv2d`` gets a *zero* bias (overwriting any bias it had: LeViT
    has none outside ConvNorm), a bare ``BatchNorm2d`` is replaced by Identity (inexact in
    general; LeViT has none), anything else is walked."""
    for child_name, child in net.named_children():
        if hasattr(child, "fuse"):
            setattr(net, child_name, child.fuse())
        elif isinstance(child, nn.Conv2d):
            child.bias = nn.Parameter(torch.zeros(child.weight.size(0), dtype=child.weight.dtype,
                                                  device=child.weight.device))
        elif isinstance(child, nn.BatchNorm2d):
            setattr(net, child_name, nn.Identity())
        else:
            levit_replace_batchnorm(child)
    return net


def _levit_fuse(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        return levit_replace_batchnorm(model)


def build_levit_128s(num_classes: int = 1000, distilled: bool = True) -> nn.Module:
    """The full LeViT-128S (timm ``levit_128s``: embed_dim (128, 256, 384), key_dim 16,
    num_heads (4, 6, 8), depth (2, 3, 4), 224x224 input, Hardswish, distillation head) in this
    module's timm code shape. Not a corpus entry (too big for the tests): a model for
    measurements; deploy it with :func:`levit_replace_batchnorm`."""
    cls = LevitDistilled if distilled else Levit
    return cls(img_size=224, num_classes=num_classes, embed_dim=(128, 256, 384), key_dim=16,
               num_heads=(4, 6, 8), depth=(2, 3, 4), attn_ratio=2.0, mlp_ratio=2.0,
               act_layer=nn.Hardswish)


def _levit_tiny():
    return LevitDistilled(img_size=64, num_classes=10, embed_dim=(32, 48), key_dim=8,
                          num_heads=(2, 3), depth=(2, 1), attn_ratio=2.0, mlp_ratio=2.0,
                          act_layer=nn.Hardswish)


def _levit_linear_norm():
    return nn.Sequential(LinearNorm(16, 32), LinearNorm(32, 24, bn_weight_init=0),
                         nn.Hardswish(), LinearNorm(24, 16))


def _levit_attention_block():
    return nn.Sequential(
        LevitBlock(32, key_dim=8, num_heads=2, attn_ratio=2.0, mlp_ratio=2.0, resolution=4,
                   act_layer=nn.Hardswish),
        LevitBlock(32, key_dim=8, num_heads=4, attn_ratio=1.0, mlp_ratio=2.0, resolution=4,
                   act_layer=nn.Hardswish),
    )


def _levit_attention_downsample():
    return nn.Sequential(
        LevitDownsample(32, 48, key_dim=8, num_heads=4, attn_ratio=4.0, mlp_ratio=2.0,
                        act_layer=nn.Hardswish, resolution=4),
    )


class _LevitMlpResidual(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: LevitBlock's second half,
    ``x + drop_path2(mlp(x))`` around a LevitMlp (Identity drop path)."""

    def __init__(self, dim, mlp_ratio=2.0):
        super().__init__()
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), act_layer=nn.Hardswish)
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        return x + self.drop_path2(self.mlp(x))


def _levit_mlp():
    return nn.Sequential(_LevitMlpResidual(32), _LevitMlpResidual(32, mlp_ratio=1.5))


class _LevitDistilledHead(nn.Module):
    """huggingface/pytorch-image-models timm/models/levit.py: LevitDistilled.forward_head on
    (B, N, C) tokens: ``x.mean(dim=1)``, NormLinear ``head`` and ``head_dist``, averaged in
    eval."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.global_pool = "avg"
        self.head = NormLinear(dim, num_classes)
        self.head_dist = NormLinear(dim, num_classes)
        self.distilled_training = False

    def forward(self, x):
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x, x_dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2


def _levit_heads():
    return _LevitDistilledHead(48, 10)


# ============================================================================================
# LeViT, official code shape (facebookresearch/LeViT levit.py)
# ============================================================================================


class Conv2d_BN(nn.Sequential):  # noqa: N801 - the official class name
    """facebookresearch/LeViT levit.py: Conv2d_BN.

    Idiom: an ``nn.Sequential`` subclass of children ``c`` (conv) and ``bn`` with no forward
    of its own; ``fuse()`` unpacks ``self._modules.values()`` and returns a biased conv."""

    def __init__(self, a, b, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1,
                 resolution=-10000):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)

    @torch.no_grad()
    def fuse(self):
        conv, bn = self._modules.values()
        scale, shift = _bn_scale_shift(bn)
        weight = conv.weight * scale[:, None, None, None]
        fused = nn.Conv2d(weight.size(1) * conv.groups, weight.size(0), weight.shape[2:],
                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          groups=conv.groups, dtype=weight.dtype, device=weight.device)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(shift)
        return fused


class Linear_BN(nn.Sequential):  # noqa: N801
    """facebookresearch/LeViT levit.py: Linear_BN.

    Idiom: an ``nn.Sequential`` subclass (``c`` Linear, ``bn`` BatchNorm1d) whose forward is
    overridden: ``l, bn = self._modules.values()``, ``bn(x.flatten(0, 1)).reshape_as(x)``."""

    def __init__(self, a, b, bn_weight_init=1, resolution=-100000):
        super().__init__()
        self.add_module("c", nn.Linear(a, b, bias=False))
        bn = nn.BatchNorm1d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)

    @torch.no_grad()
    def fuse(self):
        linear, bn = self._modules.values()
        scale, shift = _bn_scale_shift(bn)
        weight = linear.weight * scale[:, None]
        fused = nn.Linear(weight.size(1), weight.size(0), dtype=weight.dtype,
                          device=weight.device)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(shift)
        return fused

    def forward(self, x):
        linear, bn = self._modules.values()
        x = linear(x)
        return bn(x.flatten(0, 1)).reshape_as(x)


class BN_Linear(nn.Sequential):  # noqa: N801
    """facebookresearch/LeViT levit.py: BN_Linear.

    Idiom: an ``nn.Sequential`` (``bn`` BatchNorm1d, ``l`` Linear) on pooled features; the BN
    folds forward into the Linear."""

    def __init__(self, a, b, bias=True, std=0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        linear = nn.Linear(a, b, bias=bias)
        nn.init.trunc_normal_(linear.weight, std=std)
        if bias:
            nn.init.constant_(linear.bias, 0)
        self.add_module("l", linear)

    @torch.no_grad()
    def fuse(self):
        bn, linear = self._modules.values()
        scale, shift = _bn_scale_shift(bn)
        weight = linear.weight * scale[None, :]
        if linear.bias is None:
            bias = shift @ linear.weight.T
        else:
            bias = (linear.weight @ shift[:, None]).view(-1) + linear.bias
        fused = nn.Linear(weight.size(1), weight.size(0), dtype=weight.dtype,
                          device=weight.device)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(bias)
        return fused


def b16(n, activation, resolution=224):
    """facebookresearch/LeViT levit.py: b16 — the patch-16 conv stem as a plain Sequential."""
    return nn.Sequential(
        Conv2d_BN(3, n // 8, 3, 2, 1, resolution=resolution),
        activation(),
        Conv2d_BN(n // 8, n // 4, 3, 2, 1, resolution=resolution // 2),
        activation(),
        Conv2d_BN(n // 4, n // 2, 3, 2, 1, resolution=resolution // 4),
        activation(),
        Conv2d_BN(n // 2, n, 3, 2, 1, resolution=resolution // 8),
    )


class Residual(nn.Module):
    """facebookresearch/LeViT levit.py: Residual.

    Idiom: ``x + m(x)``, with a Python branch on ``self.training and self.drop > 0`` (the
    stochastic-depth path multiplies by a random mask; never taken in eval)."""

    def __init__(self, m, drop):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x):
        if self.training and self.drop > 0:
            mask = torch.rand(x.size(0), 1, 1, device=x.device).ge_(self.drop)
            return x + self.m(x) * mask.div(1 - self.drop).detach()
        return x + self.m(x)


def _offset_table(points_q, points_k, stride=1):
    offsets, idxs = {}, []
    for p1 in points_q:
        for p2 in points_k:
            key = (abs(p1[0] * stride - p2[0]), abs(p1[1] * stride - p2[1]))
            if key not in offsets:
                offsets[key] = len(offsets)
            idxs.append(offsets[key])
    return offsets, idxs


class OfficialAttention(nn.Module):
    """facebookresearch/LeViT levit.py: Attention.

    Idiom: the gathered bias ``attention_biases[:, attention_bias_idxs]`` is precomputed into a
    plain tensor attribute ``self.ab`` by a ``train()`` override whenever the module is put in
    eval mode, and read instead of the parameter in eval: ``ab`` is not a parameter or buffer
    (``.to()`` / ``.double()`` and later edits of ``attention_biases`` do not reach it); a
    tracer sees a tensor constant."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, activation=None, resolution=14):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.nh_kd = nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = int(attn_ratio * key_dim) * num_heads
        self.attn_ratio = attn_ratio
        self.qkv = Linear_BN(dim, self.dh + nh_kd * 2, resolution=resolution)
        self.proj = nn.Sequential(activation(), Linear_BN(self.dh, dim, bn_weight_init=0,
                                                          resolution=resolution))
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets, idxs = _offset_table(points, points)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs",
                             torch.LongTensor(idxs).view(len(points), len(points)))

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        if mode and hasattr(self, "ab"):
            del self.ab
        else:
            self.ab = self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d],
                                                           dim=3)
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 1, 3)
        v = v.permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale
                + (self.attention_biases[:, self.attention_bias_idxs]
                   if self.training else self.ab))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.dh)
        x = self.proj(x)
        return x


class Subsample(nn.Module):
    """facebookresearch/LeViT levit.py: Subsample — ``x.view(B, r, r, C)[:, ::s, ::s]`` on
    tokens, ``reshape(B, -1, C)`` back."""

    def __init__(self, stride, resolution):
        super().__init__()
        self.stride = stride
        self.resolution = resolution

    def forward(self, x):
        B, N, C = x.shape
        x = x.view(B, self.resolution, self.resolution, C)[
            :, ::self.stride, ::self.stride].reshape(B, -1, C)
        return x


class AttentionSubsample(nn.Module):
    """facebookresearch/LeViT levit.py: AttentionSubsample — the official attention
    downsample (kv Linear_BN, q = Sequential(Subsample, Linear_BN), ``self.ab`` cache)."""

    def __init__(self, in_dim, out_dim, key_dim, num_heads=8, attn_ratio=2, activation=None,
                 stride=2, resolution=14, resolution_=7):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.nh_kd = nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = int(attn_ratio * key_dim) * self.num_heads
        self.attn_ratio = attn_ratio
        self.resolution_ = resolution_
        self.resolution_2 = resolution_ ** 2
        self.kv = Linear_BN(in_dim, self.dh + nh_kd, resolution=resolution)
        self.q = nn.Sequential(Subsample(stride, resolution),
                               Linear_BN(in_dim, nh_kd, resolution=resolution_))
        self.proj = nn.Sequential(activation(), Linear_BN(self.dh, out_dim,
                                                          resolution=resolution_))
        self.stride = stride
        self.resolution = resolution
        points = list(itertools.product(range(resolution), range(resolution)))
        points_ = list(itertools.product(range(resolution_), range(resolution_)))
        offsets, idxs = _offset_table(points_, points, stride=stride)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs",
                             torch.LongTensor(idxs).view(len(points_), len(points)))

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        if mode and hasattr(self, "ab"):
            del self.ab
        else:
            self.ab = self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x):
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.d], dim=3)
        k = k.permute(0, 2, 1, 3)
        v = v.permute(0, 2, 1, 3)
        q = self.q(x).view(B, self.resolution_2, self.num_heads,
                           self.key_dim).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + (
            self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, -1, self.dh)
        x = self.proj(x)
        return x


class LeViT(nn.Module):
    """facebookresearch/LeViT levit.py: LeViT (built as ``model_factory`` does).

    Idiom: a flat ``blocks`` Sequential of Residual(Attention), Residual(Sequential(Linear_BN,
    act, Linear_BN)) and AttentionSubsample; ``x.mean(1)``; ``BN_Linear`` head and head_dist
    returned as a tuple in training, ``(x[0] + x[1]) / 2`` in eval."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 embed_dim=(192,), key_dim=(64,), depth=(12,), num_heads=(3,), attn_ratio=(2,),
                 mlp_ratio=(2,), hybrid_backbone=None, down_ops=(),
                 attention_activation=nn.Hardswish, mlp_activation=nn.Hardswish,
                 distillation=True, drop_path=0):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = embed_dim[-1]
        self.embed_dim = embed_dim
        self.distillation = distillation
        self.patch_embed = hybrid_backbone

        blocks = []
        down_ops = list(down_ops) + [[""]]
        resolution = img_size // patch_size
        for i, (ed, kd, dpth, nh, ar, mr, do) in enumerate(
                zip(embed_dim, key_dim, depth, num_heads, attn_ratio, mlp_ratio, down_ops)):
            for _ in range(dpth):
                blocks.append(Residual(OfficialAttention(
                    ed, kd, nh, attn_ratio=ar, activation=attention_activation,
                    resolution=resolution), drop_path))
                if mr > 0:
                    h = int(ed * mr)
                    blocks.append(Residual(nn.Sequential(
                        Linear_BN(ed, h, resolution=resolution),
                        mlp_activation(),
                        Linear_BN(h, ed, bn_weight_init=0, resolution=resolution),
                    ), drop_path))
            if do[0] == "Subsample":
                resolution_ = (resolution - 1) // do[5] + 1
                blocks.append(AttentionSubsample(
                    *embed_dim[i:i + 2], key_dim=do[1], num_heads=do[2], attn_ratio=do[3],
                    activation=attention_activation, stride=do[5], resolution=resolution,
                    resolution_=resolution_))
                resolution = resolution_
                if do[4] > 0:
                    h = int(embed_dim[i + 1] * do[4])
                    blocks.append(Residual(nn.Sequential(
                        Linear_BN(embed_dim[i + 1], h, resolution=resolution),
                        mlp_activation(),
                        Linear_BN(h, embed_dim[i + 1], bn_weight_init=0, resolution=resolution),
                    ), drop_path))
        self.blocks = nn.Sequential(*blocks)
        self.head = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        if distillation:
            self.head_dist = (BN_Linear(embed_dim[-1], num_classes)
                              if num_classes > 0 else nn.Identity())

    def forward(self, x):
        x = self.patch_embed(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.blocks(x)
        x = x.mean(1)
        if self.distillation:
            x = self.head(x), self.head_dist(x)
            if not self.training:
                x = (x[0] + x[1]) / 2
        else:
            x = self.head(x)
        return x


def _levit_official_tiny():
    embed_dim, key_dim = [32, 48], 8
    act = nn.Hardswish
    return LeViT(
        img_size=64, patch_size=16, embed_dim=embed_dim, num_heads=[2, 3], key_dim=[key_dim] * 2,
        depth=[1, 1], attn_ratio=[2, 2], mlp_ratio=[2, 2],
        down_ops=[["Subsample", key_dim, embed_dim[0] // key_dim, 4, 2, 2]],
        attention_activation=act, mlp_activation=act,
        hybrid_backbone=b16(embed_dim[0], activation=act, resolution=64),
        num_classes=10, drop_path=0, distillation=True)


# --------------------------------------------------------------------------------------------
# Negative cases: a BatchNorm1d whose features are not the Linear's output channels
# --------------------------------------------------------------------------------------------


class _TokenBnOverTokens(nn.Module):
    """Counter-variant of huggingface/pytorch-image-models timm/models/levit.py: LinearNorm.

    Linear on (B, N, C) -> ``transpose(1, 2).reshape(B * C, N)`` -> ``BatchNorm1d(N)`` ->
    back to (B, N, C) -> Linear: the BN normalises per *token*, an axis neither Linear mixes,
    so it folds into neither (it must remain)."""

    def __init__(self, tokens=16, dim=12, hidden=20):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.bn = nn.BatchNorm1d(tokens)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = self.fc1(x)
        B, N, C = x.shape
        x = self.bn(x.transpose(1, 2).reshape(B * C, N))
        x = x.reshape(B, C, N).transpose(1, 2)
        return self.fc2(x)


class _TokenBnMixedReshape(nn.Module):
    """Counter-variant of huggingface/pytorch-image-models timm/models/levit.py: LinearNorm.

    Linear on (B, N, C) -> a raw ``reshape(B * C, N)`` (no transpose: each BN feature mixes
    tokens and channels) -> ``BatchNorm1d(N)`` -> ``reshape_as(x)`` -> Linear: the reshape
    looks like LinearNorm's flatten but the BN's features are not the Linear's channels (it
    must remain)."""

    def __init__(self, tokens=16, dim=12, hidden=20):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.bn = nn.BatchNorm1d(tokens)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = self.fc1(x)
        B, N, C = x.shape
        y = self.bn(x.reshape(B * C, N))
        return self.fc2(y.reshape_as(x))


# ============================================================================================
# Next-ViT, timm code shape (timm/models/nextvit.py)
# ============================================================================================


@torch.no_grad()
def merge_pre_bn(module, pre_bn_1, pre_bn_2=None):
    """huggingface/pytorch-image-models timm/models/nextvit.py: merge_pre_bn (same as
    bytedance/Next-ViT classification/utils.py: merge_pre_bn).

    Folds the eval affine of ``pre_bn_1`` (and of ``pre_bn_2`` applied after it, the
    ``AvgPool1d`` between them commuting with a per-channel affine) into the *input* side of a
    ``Linear`` or 1x1 ``Conv2d``, in place through ``.data``: ``b += W @ shift`` with the
    original W, then ``W *= scale`` per input column."""
    weight = module.weight.data
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device,
                                               dtype=weight.dtype))
    bias = module.bias.data
    if pre_bn_2 is None:
        assert pre_bn_1.track_running_stats is True
        assert pre_bn_1.affine is True
        inv_std = pre_bn_1.running_var.add(pre_bn_1.eps).pow(-0.5)
        extra_weight = inv_std * pre_bn_1.weight
        extra_bias = pre_bn_1.bias - pre_bn_1.weight * pre_bn_1.running_mean * inv_std
    else:
        assert pre_bn_1.track_running_stats is True and pre_bn_1.affine is True
        assert pre_bn_2.track_running_stats is True and pre_bn_2.affine is True
        inv_std_1 = pre_bn_1.running_var.add(pre_bn_1.eps).pow(-0.5)
        inv_std_2 = pre_bn_2.running_var.add(pre_bn_2.eps).pow(-0.5)
        extra_weight = inv_std_1 * pre_bn_1.weight * inv_std_2 * pre_bn_2.weight
        extra_bias = (inv_std_2 * pre_bn_2.weight
                      * (pre_bn_1.bias - pre_bn_1.weight * pre_bn_1.running_mean * inv_std_1
                         - pre_bn_2.running_mean)
                      + pre_bn_2.bias)

    if isinstance(module, nn.Linear):
        extra_bias = weight @ extra_bias
        weight.mul_(extra_weight.view(1, weight.size(1)).expand_as(weight))
    elif isinstance(module, nn.Conv2d):
        assert weight.shape[2] == 1 and weight.shape[3] == 1
        weight = weight.reshape(weight.shape[0], weight.shape[1])
        extra_bias = weight @ extra_bias
        weight.mul_(extra_weight.view(1, weight.size(1)).expand_as(weight))
        weight = weight.reshape(weight.shape[0], weight.shape[1], 1, 1)
    bias.add_(extra_bias)

    module.weight.data = weight
    module.bias.data = bias


def timm_reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """huggingface/pytorch-image-models timm/utils/model.py: reparameterize_model — replace
    children that have ``fuse``, else call ``reparameterize()`` / ``switch_to_deploy()`` in
    place, and recurse."""
    if not inplace:
        model = copy.deepcopy(model)

    def visit(parent):
        for child_name, child in parent.named_children():
            if hasattr(child, "fuse"):
                setattr(parent, child_name, child.fuse())
            elif hasattr(child, "reparameterize"):
                child.reparameterize()
            elif hasattr(child, "switch_to_deploy"):
                child.switch_to_deploy()
            visit(child)

    visit(model)
    return model


def _make_divisible(v, divisor, min_value=None):
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class NvConvNormAct(nn.Module):
    """huggingface/pytorch-image-models timm/models/nextvit.py: ConvNormAct — 3x3 conv (padding
    1, no bias) -> BatchNorm2d -> ReLU, the stem unit."""

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, groups=1,
                 norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=kernel_size, stride=stride, padding=1,
                              groups=groups, bias=False)
        self.norm = norm_layer(out_chs)
        self.act = act_layer()

    def forward(self, x):
        x = self.conv(x)
        x = self.norm(x)
        x = self.act(x)
        return x


class NvPatchEmbed(nn.Module):
    """huggingface/pytorch-image-models timm/models/nextvit.py: PatchEmbed.

    Idiom: stride 2 = ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` -> 1x1 conv ->
    BN; a width change = 1x1 conv -> BN; else three Identities."""

    def __init__(self, in_chs, out_chs, stride=1, norm_layer=nn.BatchNorm2d):
        super().__init__()
        if stride == 2:
            self.pool = nn.AvgPool2d((2, 2), stride=2, ceil_mode=True, count_include_pad=False)
            self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=1, bias=False)
            self.norm = norm_layer(out_chs)
        elif in_chs != out_chs:
            self.pool = nn.Identity()
            self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=1, bias=False)
            self.norm = norm_layer(out_chs)
        else:
            self.pool = nn.Identity()
            self.conv = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.conv(self.pool(x)))


class NvConvAttention(nn.Module):
    """huggingface/pytorch-image-models timm/models/nextvit.py: ConvAttention (MHCA) — grouped
    3x3 conv -> BN -> ReLU -> bias-free 1x1 projection."""

    def __init__(self, out_chs, head_dim, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1,
                                       groups=out_chs // head_dim, bias=False)
        self.norm = norm_layer(out_chs)
        self.act = act_layer()
        self.projection = nn.Conv2d(out_chs, out_chs, kernel_size=1, bias=False)

    def forward(self, x):
        out = self.group_conv3x3(x)
        out = self.norm(out)
        out = self.act(out)
        out = self.projection(out)
        return out


class NvConvMlp(nn.Module):
    """huggingface/pytorch-image-models timm/layers/mlp.py: ConvMlp — 1x1 ``fc1`` -> Identity
    norm -> act -> Dropout -> 1x1 ``fc2`` (both with bias)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.ReLU,
                 bias=True, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1, bias=bias)
        self.norm = nn.Identity()
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_features, out_features, kernel_size=1, bias=bias)

    def forward(self, x):
        x = self.fc1(x)
        x = self.norm(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        return x


class NextConvBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/nextvit.py: NextConvBlock (NCB).

    Idiom: PatchEmbed, ``x + mhca(x)``, then a pre-norm BN2d whose output feeds only the MLP's
    first 1x1 conv while the un-normalised x is the residual; ``reparameterize()`` folds the BN
    into ``mlp.fc1`` (input side) and replaces it by Identity."""

    def __init__(self, in_chs, out_chs, stride=1, drop_path=0.0, drop=0.0, head_dim=32,
                 mlp_ratio=3.0, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
        super().__init__()
        self.in_chs = in_chs
        self.out_chs = out_chs
        assert out_chs % head_dim == 0
        self.patch_embed = NvPatchEmbed(in_chs, out_chs, stride, norm_layer=norm_layer)
        self.mhca = NvConvAttention(out_chs, head_dim, norm_layer=norm_layer, act_layer=act_layer)
        self.attn_drop_path = nn.Identity()
        self.norm = norm_layer(out_chs)
        self.mlp = NvConvMlp(out_chs, hidden_features=int(out_chs * mlp_ratio), drop=drop,
                             bias=True, act_layer=act_layer)
        self.mlp_drop_path = nn.Identity()
        self.is_fused = False

    @torch.no_grad()
    def reparameterize(self):
        if not self.is_fused:
            merge_pre_bn(self.mlp.fc1, self.norm)
            self.norm = nn.Identity()
            self.is_fused = True

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + self.attn_drop_path(self.mhca(x))
        out = self.norm(x)
        x = x + self.mlp_drop_path(self.mlp(out))
        return x


class EfficientAttention(nn.Module):
    """huggingface/pytorch-image-models timm/models/nextvit.py: EfficientAttention (E-MHSA).

    Idiom: separate q/k/v ``Linear``s on (B, N, C) tokens; with ``sr_ratio > 1`` k and v read
    ``norm(AvgPool1d(x.transpose(1, 2))).transpose(1, 2)`` (a BatchNorm1d over channels of
    token-pooled features); ``F.scaled_dot_product_attention`` when ``fused_attn``."""

    def __init__(self, dim, out_dim=None, head_dim=32, qkv_bias=True, attn_drop=0.0,
                 proj_drop=0.0, sr_ratio=1, norm_layer=nn.BatchNorm1d, fused_attn=True):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim if out_dim is not None else dim
        self.num_heads = self.dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = fused_attn

        self.q = nn.Linear(dim, self.dim, bias=qkv_bias)
        self.k = nn.Linear(dim, self.dim, bias=qkv_bias)
        self.v = nn.Linear(dim, self.dim, bias=qkv_bias)
        self.proj = nn.Linear(self.dim, self.out_dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

        self.sr_ratio = sr_ratio
        self.N_ratio = sr_ratio ** 2
        if sr_ratio > 1:
            self.sr = nn.AvgPool1d(kernel_size=self.N_ratio, stride=self.N_ratio)
            self.norm = norm_layer(dim)
        else:
            self.sr = None
            self.norm = None

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

        if self.sr is not None:
            x = self.sr(x.transpose(1, 2))
            x = self.norm(x).transpose(1, 2)

        k = self.k(x).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-1, -2)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class NextTransformerBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/nextvit.py: NextTransformerBlock (NTB).

    Idiom: ``B, C, H, W = x.shape``; pre-norm BN2d -> ``reshape(B, C, -1).transpose(-1, -2)``
    into tokens -> E-MHSA q/k/v Linears; back with ``transpose(-1, -2).reshape(B, C, H, W)``
    and added to the un-normalised x; a concat with a conv branch; pre-norm BN2d -> ConvMlp.
    ``reparameterize()`` = merge_pre_bn into q, k, v (and through the AvgPool1d -> BN1d into
    k, v) and into ``mlp.fc1``."""

    def __init__(self, in_chs, out_chs, drop_path=0.0, stride=1, sr_ratio=1, mlp_ratio=2,
                 head_dim=32, mix_block_ratio=0.75, attn_drop=0.0, drop=0.0,
                 norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, fused_attn=True):
        super().__init__()
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.mix_block_ratio = mix_block_ratio
        self.mhsa_out_chs = _make_divisible(int(out_chs * mix_block_ratio), 32)
        self.mhca_out_chs = out_chs - self.mhsa_out_chs

        self.patch_embed = NvPatchEmbed(in_chs, self.mhsa_out_chs, stride)
        self.norm1 = norm_layer(self.mhsa_out_chs)
        self.e_mhsa = EfficientAttention(self.mhsa_out_chs, head_dim=head_dim, sr_ratio=sr_ratio,
                                         attn_drop=attn_drop, proj_drop=drop,
                                         fused_attn=fused_attn)
        self.mhsa_drop_path = nn.Identity()
        self.projection = NvPatchEmbed(self.mhsa_out_chs, self.mhca_out_chs, stride=1,
                                       norm_layer=norm_layer)
        self.mhca = NvConvAttention(self.mhca_out_chs, head_dim=head_dim, norm_layer=norm_layer,
                                    act_layer=act_layer)
        self.mhca_drop_path = nn.Identity()
        self.norm2 = norm_layer(out_chs)
        self.mlp = NvConvMlp(out_chs, hidden_features=int(out_chs * mlp_ratio),
                             act_layer=act_layer, drop=drop)
        self.mlp_drop_path = nn.Identity()
        self.is_fused = False

    @torch.no_grad()
    def reparameterize(self):
        if not self.is_fused:
            merge_pre_bn(self.e_mhsa.q, self.norm1)
            if self.e_mhsa.norm is not None:
                merge_pre_bn(self.e_mhsa.k, self.norm1, self.e_mhsa.norm)
                merge_pre_bn(self.e_mhsa.v, self.norm1, self.e_mhsa.norm)
                self.e_mhsa.norm = nn.Identity()
            else:
                merge_pre_bn(self.e_mhsa.k, self.norm1)
                merge_pre_bn(self.e_mhsa.v, self.norm1)
            self.norm1 = nn.Identity()
            merge_pre_bn(self.mlp.fc1, self.norm2)
            self.norm2 = nn.Identity()
            self.is_fused = True

    def forward(self, x):
        x = self.patch_embed(x)
        B, C, H, W = x.shape

        out = self.norm1(x)
        out = out.reshape(B, C, -1).transpose(-1, -2)
        out = self.mhsa_drop_path(self.e_mhsa(out))
        x = x + out.transpose(-1, -2).reshape(B, C, H, W)

        out = self.projection(x)
        out = out + self.mhca_drop_path(self.mhca(out))
        x = torch.cat([x, out], dim=1)

        out = self.norm2(x)
        x = x + self.mlp_drop_path(self.mlp(out))
        return x


class NextStage(nn.Module):
    """huggingface/pytorch-image-models timm/models/nextvit.py: NextStage — NCB/NTB blocks in a
    Sequential, the first one strided."""

    def __init__(self, in_chs, block_chs, block_types, stride=2, sr_ratio=1, mix_block_ratio=1.0,
                 head_dim=32, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
        super().__init__()
        blocks = []
        for block_idx, block_type in enumerate(block_types):
            stride = stride if block_idx == 0 else 1
            out_chs = block_chs[block_idx]
            if block_type is NextConvBlock:
                blocks.append(NextConvBlock(in_chs, out_chs, stride=stride, head_dim=head_dim,
                                            norm_layer=norm_layer, act_layer=act_layer))
            elif block_type is NextTransformerBlock:
                blocks.append(NextTransformerBlock(
                    in_chs, out_chs, stride=stride, sr_ratio=sr_ratio, head_dim=head_dim,
                    mix_block_ratio=mix_block_ratio, norm_layer=norm_layer,
                    act_layer=act_layer))
            in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class NvClassifierHead(nn.Module):
    """huggingface/pytorch-image-models timm/layers/classifier.py: ClassifierHead with
    ``pool_type='avg'`` (SelectAdaptivePool2d = AdaptiveAvgPool2d(1) + Flatten(1)), Dropout, fc
    Linear, Identity flatten."""

    def __init__(self, in_features, num_classes, drop_rate=0.0):
        super().__init__()
        self.global_pool = nn.Sequential(OrderedDict([
            ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1))]))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)
        self.flatten = nn.Identity()

    def forward(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        x = self.drop(x)
        if pre_logits:
            return self.flatten(x)
        x = self.fc(x)
        return self.flatten(x)


class NextViT(nn.Module):
    """huggingface/pytorch-image-models timm/models/nextvit.py: NextViT, with the stage widths
    as an argument (timm hard-codes 96..1024) and the "Next Hybrid Strategy" block layout
    (stage 0 all NCB, later stages NCB... then one NTB).

    Idiom: stem of ConvNormAct, stages, a final BatchNorm2d -> ClassifierHead (avg pool ->
    flatten -> Linear): a BN that reaches the Linear through a global average pool."""

    def __init__(self, in_chans=3, num_classes=1000, stem_chs=(64, 32, 64),
                 stage_chs=((96,), (192, 256)), strides=(1, 2), sr_ratios=(8, 4), head_dim=32,
                 mix_block_ratio=0.75, norm_layer=nn.BatchNorm2d, act_layer=None):
        super().__init__()
        act_layer = act_layer or partial(nn.ReLU, inplace=True)
        self.num_classes = num_classes
        self.stage_out_chs = [list(c) for c in stage_chs]
        self.stage_block_types = [
            [NextConvBlock] * len(c) if i == 0
            else [NextConvBlock] * (len(c) - 1) + [NextTransformerBlock]
            for i, c in enumerate(self.stage_out_chs)
        ]
        self.stem = nn.Sequential(
            NvConvNormAct(in_chans, stem_chs[0], kernel_size=3, stride=2, norm_layer=norm_layer,
                          act_layer=act_layer),
            NvConvNormAct(stem_chs[0], stem_chs[1], kernel_size=3, stride=1,
                          norm_layer=norm_layer, act_layer=act_layer),
            NvConvNormAct(stem_chs[1], stem_chs[2], kernel_size=3, stride=1,
                          norm_layer=norm_layer, act_layer=act_layer),
            NvConvNormAct(stem_chs[2], stem_chs[2], kernel_size=3, stride=2,
                          norm_layer=norm_layer, act_layer=act_layer),
        )
        in_chs = out_chs = stem_chs[-1]
        stages = []
        for stage_idx in range(len(self.stage_out_chs)):
            stages.append(NextStage(
                in_chs=in_chs, block_chs=self.stage_out_chs[stage_idx],
                block_types=self.stage_block_types[stage_idx], stride=strides[stage_idx],
                sr_ratio=sr_ratios[stage_idx], mix_block_ratio=mix_block_ratio,
                head_dim=head_dim, norm_layer=norm_layer, act_layer=act_layer))
            in_chs = out_chs = self.stage_out_chs[stage_idx][-1]
        self.num_features = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(out_chs)
        self.head = NvClassifierHead(out_chs, num_classes)

    def forward_features(self, x):
        x = self.stem(x)
        x = self.stages(x)
        x = self.norm(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def build_nextvit_small(num_classes: int = 1000) -> nn.Module:
    """A NextViT-S-sized model for measurements (timm ``nextvit_small``: stem 64/32/64, stage
    widths 96 / 192..256 / 384..512 / 768..1024, depths 3, 4, 10, 3, sr ratios 8, 4, 2, 1,
    224x224) in this module's code shape, which ends each stage with its one transformer
    block (timm's third stage has two). Not a corpus entry: deploy it with
    :func:`timm_reparameterize_model`."""
    return NextViT(in_chans=3, num_classes=num_classes, stem_chs=(64, 32, 64),
                   stage_chs=((96,) * 3, (192,) * 3 + (256,), (384,) * 9 + (512,),
                              (768,) * 2 + (1024,)),
                   strides=(1, 2, 2, 2), sr_ratios=(8, 4, 2, 1), head_dim=32)


def _nextvit_tiny():
    return NextViT(in_chans=3, num_classes=10, stem_chs=(8, 8, 16),
                   stage_chs=((16,), (24, 40), (40, 40)), strides=(1, 2, 2), sr_ratios=(2, 2, 1),
                   head_dim=8)


# ============================================================================================
# Next-ViT, official code shape (bytedance/Next-ViT classification/nextvit.py)
# ============================================================================================


class BdPatchEmbed(nn.Module):
    """bytedance/Next-ViT classification/nextvit.py: PatchEmbed (``avgpool``/``conv``/``norm``
    attribute names; same branches as timm's)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        if stride == 2:
            self.avgpool = nn.AvgPool2d((2, 2), stride=2, ceil_mode=True, count_include_pad=False)
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
            self.norm = nn.BatchNorm2d(out_channels, eps=1e-5)
        elif in_channels != out_channels:
            self.avgpool = nn.Identity()
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
            self.norm = nn.BatchNorm2d(out_channels, eps=1e-5)
        else:
            self.avgpool = nn.Identity()
            self.conv = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.conv(self.avgpool(x)))


class MHCA(nn.Module):
    """bytedance/Next-ViT classification/nextvit.py: MHCA — grouped 3x3 -> BN -> ReLU -> 1x1."""

    def __init__(self, out_channels, head_dim):
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1,
                                       padding=1, groups=out_channels // head_dim, bias=False)
        self.norm = nn.BatchNorm2d(out_channels, eps=1e-5)
        self.act = nn.ReLU(inplace=True)
        self.projection = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x):
        out = self.group_conv3x3(x)
        out = self.norm(out)
        out = self.act(out)
        out = self.projection(out)
        return out


class BdMlp(nn.Module):
    """bytedance/Next-ViT classification/nextvit.py: Mlp — 1x1 ``conv1`` (hidden width
    ``_make_divisible(in * mlp_ratio, 32)``) -> ReLU -> 1x1 ``conv2``; ``merge_bn(pre_norm)``
    folds a pre-norm into ``conv1``."""

    def __init__(self, in_features, out_features=None, mlp_ratio=None, drop=0.0, bias=True):
        super().__init__()
        out_features = out_features or in_features
        hidden_dim = _make_divisible(in_features * mlp_ratio, 32)
        self.conv1 = nn.Conv2d(in_features, hidden_dim, kernel_size=1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden_dim, out_features, kernel_size=1, bias=bias)
        self.drop = nn.Dropout(drop)

    def merge_bn(self, pre_norm):
        merge_pre_bn(self.conv1, pre_norm)

    def forward(self, x):
        x = self.conv1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.conv2(x)
        x = self.drop(x)
        return x


class NCB(nn.Module):
    """bytedance/Next-ViT classification/nextvit.py: NCB.

    Idiom: the pre-norm is *skipped by a Python branch* after merging —
    ``if not torch.onnx.is_in_onnx_export() and not self.is_bn_merged: out = self.norm(x)`` —
    the BN module stays in the model, unused."""

    def __init__(self, in_channels, out_channels, stride=1, path_dropout=0, drop=0, head_dim=32,
                 mlp_ratio=3):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        assert out_channels % head_dim == 0
        self.patch_embed = BdPatchEmbed(in_channels, out_channels, stride)
        self.mhca = MHCA(out_channels, head_dim)
        self.attention_path_dropout = nn.Identity()
        self.norm = nn.BatchNorm2d(out_channels, eps=1e-5)
        self.mlp = BdMlp(out_channels, mlp_ratio=mlp_ratio, drop=drop, bias=True)
        self.mlp_path_dropout = nn.Identity()
        self.is_bn_merged = False

    def merge_bn(self):
        if not self.is_bn_merged:
            self.mlp.merge_bn(self.norm)
            self.is_bn_merged = True

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + self.attention_path_dropout(self.mhca(x))
        if not torch.onnx.is_in_onnx_export() and not self.is_bn_merged:
            out = self.norm(x)
        else:
            out = x
        x = x + self.mlp_path_dropout(self.mlp(out))
        return x


class E_MHSA(nn.Module):  # noqa: N801 - the official class name
    """bytedance/Next-ViT classification/nextvit.py: E_MHSA.

    Idiom: q/k/v Linears on (B, N, C) tokens, heads via ``reshape(B, N, h, int(C // h))`` and
    ``permute``; with ``sr_ratio > 1`` an ``AvgPool1d`` over tokens then a BatchNorm1d that is
    skipped by ``if not torch.onnx.is_in_onnx_export() and not self.is_bn_merged`` once
    ``merge_bn(pre_bn)`` has folded both BNs into k and v."""

    def __init__(self, dim, out_dim=None, head_dim=32, qkv_bias=True, qk_scale=None, attn_drop=0,
                 proj_drop=0.0, sr_ratio=1):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim if out_dim is not None else dim
        self.num_heads = self.dim // head_dim
        self.scale = qk_scale or head_dim ** -0.5
        self.q = nn.Linear(dim, self.dim, bias=qkv_bias)
        self.k = nn.Linear(dim, self.dim, bias=qkv_bias)
        self.v = nn.Linear(dim, self.dim, bias=qkv_bias)
        self.proj = nn.Linear(self.dim, self.out_dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        self.N_ratio = sr_ratio ** 2
        if sr_ratio > 1:
            self.sr = nn.AvgPool1d(kernel_size=self.N_ratio, stride=self.N_ratio)
            self.norm = nn.BatchNorm1d(dim, eps=1e-5)
        self.is_bn_merged = False

    def merge_bn(self, pre_bn):
        merge_pre_bn(self.q, pre_bn)
        if self.sr_ratio > 1:
            merge_pre_bn(self.k, pre_bn, self.norm)
            merge_pre_bn(self.v, pre_bn, self.norm)
        else:
            merge_pre_bn(self.k, pre_bn)
            merge_pre_bn(self.v, pre_bn)
        self.is_bn_merged = True

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x)
        q = q.reshape(B, N, self.num_heads, int(C // self.num_heads)).permute(0, 2, 1, 3)

        if self.sr_ratio > 1:
            x_ = x.transpose(1, 2)
            x_ = self.sr(x_)
            if not torch.onnx.is_in_onnx_export() and not self.is_bn_merged:
                x_ = self.norm(x_)
            x_ = x_.transpose(1, 2)
            k = self.k(x_)
            k = k.reshape(B, -1, self.num_heads, int(C // self.num_heads)).permute(0, 2, 3, 1)
            v = self.v(x_)
            v = v.reshape(B, -1, self.num_heads, int(C // self.num_heads)).permute(0, 2, 1, 3)
        else:
            k = self.k(x)
            k = k.reshape(B, -1, self.num_heads, int(C // self.num_heads)).permute(0, 2, 3, 1)
            v = self.v(x)
            v = v.reshape(B, -1, self.num_heads, int(C // self.num_heads)).permute(0, 2, 1, 3)
        attn = (q @ k) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)

        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class NTB(nn.Module):
    """bytedance/Next-ViT classification/nextvit.py: NTB.

    Idiom: ``B, C, H, W = x.shape``; pre-norm ``norm1`` skipped by the onnx/merged branch;
    ``rearrange(out, "b c h w -> b (h w) c")`` (written out as ``permute(0, 2, 3, 1).reshape``)
    into E_MHSA, ``rearrange(..., "b (h w) c -> b c h w", h=H)`` back; conv branch concat;
    ``norm2`` (also skipped once merged) -> Mlp."""

    def __init__(self, in_channels, out_channels, path_dropout=0, stride=1, sr_ratio=1,
                 mlp_ratio=2, head_dim=32, mix_block_ratio=0.75, attn_drop=0, drop=0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.mix_block_ratio = mix_block_ratio
        self.mhsa_out_channels = _make_divisible(int(out_channels * mix_block_ratio), 32)
        self.mhca_out_channels = out_channels - self.mhsa_out_channels

        self.patch_embed = BdPatchEmbed(in_channels, self.mhsa_out_channels, stride)
        self.norm1 = nn.BatchNorm2d(self.mhsa_out_channels, eps=1e-5)
        self.e_mhsa = E_MHSA(self.mhsa_out_channels, head_dim=head_dim, sr_ratio=sr_ratio,
                             attn_drop=attn_drop, proj_drop=drop)
        self.mhsa_path_dropout = nn.Identity()
        self.projection = BdPatchEmbed(self.mhsa_out_channels, self.mhca_out_channels, stride=1)
        self.mhca = MHCA(self.mhca_out_channels, head_dim=head_dim)
        self.mhca_path_dropout = nn.Identity()
        self.norm2 = nn.BatchNorm2d(out_channels, eps=1e-5)
        self.mlp = BdMlp(out_channels, mlp_ratio=mlp_ratio, drop=drop)
        self.mlp_path_dropout = nn.Identity()
        self.is_bn_merged = False

    def merge_bn(self):
        if not self.is_bn_merged:
            self.e_mhsa.merge_bn(self.norm1)
            self.mlp.merge_bn(self.norm2)
            self.is_bn_merged = True

    def forward(self, x):
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        if not torch.onnx.is_in_onnx_export() and not self.is_bn_merged:
            out = self.norm1(x)
        else:
            out = x
        out = out.permute(0, 2, 3, 1).reshape(B, H * W, C)
        out = self.mhsa_path_dropout(self.e_mhsa(out))
        x = x + out.reshape(B, H, W, C).permute(0, 3, 1, 2)

        out = self.projection(x)
        out = out + self.mhca_path_dropout(self.mhca(out))
        x = torch.cat([x, out], dim=1)

        if not torch.onnx.is_in_onnx_export() and not self.is_bn_merged:
            out = self.norm2(x)
        else:
            out = x
        x = x + self.mlp_path_dropout(self.mlp(out))
        return x


class NextViTBlocks(nn.Module):
    """bytedance/Next-ViT classification/nextvit.py: NextViT's ``features`` loop and its
    ``merge_bn()`` walk (``self.eval()``, then ``merge_bn()`` on every NCB / NTB found by
    ``named_modules()``), on blocks only (no stem / head)."""

    def __init__(self, *blocks):
        super().__init__()
        self.features = nn.Sequential(*blocks)

    def merge_bn(self):
        self.eval()
        for _, module in self.named_modules():
            if isinstance(module, (NCB, NTB)):
                module.merge_bn()

    def forward(self, x):
        for _, layer in enumerate(self.features):
            x = layer(x)
        return x


def _nextvit_merge_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.merge_bn()
    return model


def _nextvit_e_mhsa_sr1():
    return NextViTBlocks(
        NCB(24, 24, stride=1, head_dim=8, mlp_ratio=3),
        NTB(24, 40, stride=1, sr_ratio=1, head_dim=8, mix_block_ratio=0.75),
    )


def _nextvit_e_mhsa_sr2():
    return NextViTBlocks(
        NTB(24, 40, stride=1, sr_ratio=2, head_dim=8, mix_block_ratio=0.75),
        NTB(40, 40, stride=1, sr_ratio=2, head_dim=8, mix_block_ratio=0.75),
    )


def _nextvit_timm_blocks_sr2():
    return nn.Sequential(
        NextTransformerBlock(24, 40, sr_ratio=2, head_dim=8, fused_attn=False),
        NextConvBlock(40, 40, head_dim=8),
        NextTransformerBlock(40, 40, sr_ratio=1, head_dim=8, fused_attn=True),
    )


# ============================================================================================
# Channels-last ConvNeXt blocks and BatchNorm -> flatten -> Linear heads
# ============================================================================================


class ClLayerNorm(nn.LayerNorm):
    """huggingface/pytorch-image-models timm/layers/norm.py: LayerNorm — ``F.layer_norm`` over
    the last (channel) axis of a channels-last tensor (eps 1e-6, ``_fast_norm`` off)."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)
        self._fast_norm = False

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ClLayerNorm2d(nn.LayerNorm):
    """huggingface/pytorch-image-models timm/layers/norm.py: LayerNorm2d — permute to
    channels-last, ``F.layer_norm``, permute back."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)
        self._fast_norm = False

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class ClMlp(nn.Module):
    """huggingface/pytorch-image-models timm/layers/mlp.py: Mlp (``use_conv=False``) — Linear
    ``fc1`` -> GELU -> Dropout -> Identity norm -> Linear ``fc2`` -> Dropout, on the last axis."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
                 bias=True, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class ConvNeXtBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/convnext.py: ConvNeXtBlock
    (``conv_mlp=False``).

    Idiom: depthwise 7x7 conv (bias) -> ``permute(0, 2, 3, 1)`` -> norm (channels-last) ->
    Linear -> GELU -> Linear -> ``permute(0, 3, 1, 2)`` -> ``x.mul(gamma.reshape(1, -1, 1, 1))``
    (raw Parameter layer scale) -> ``+ shortcut``. The Linears are 1x1 convs in disguise; with
    ``norm_layer=nn.Identity`` the first Linear sits right after the depthwise conv."""

    def __init__(self, in_chs, out_chs=None, kernel_size=7, stride=1, mlp_ratio=4,
                 conv_bias=True, ls_init_value=1e-6, act_layer=nn.GELU, norm_layer=None):
        super().__init__()
        out_chs = out_chs or in_chs
        norm_layer = norm_layer or ClLayerNorm
        self.use_conv_mlp = False
        self.conv_dw = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride,
                                 padding=(kernel_size - 1) // 2, groups=in_chs, bias=conv_bias)
        self.norm = norm_layer(out_chs)
        self.mlp = ClMlp(out_chs, int(mlp_ratio * out_chs), act_layer=act_layer)
        self.gamma = (nn.Parameter(ls_init_value * torch.ones(out_chs))
                      if ls_init_value is not None else None)
        self.shortcut = nn.Identity()
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.norm(x)
            x = self.mlp(x)
        else:
            x = x.permute(0, 2, 3, 1)
            x = self.norm(x)
            x = self.mlp(x)
            x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self.drop_path(x) + self.shortcut(shortcut)
        return x


class ConvNeXtTiny(nn.Module):
    """huggingface/pytorch-image-models timm/models/convnext.py: ConvNeXt (``conv_mlp=False``,
    ``head_norm_first=False``) — patchify stem (4x4 s4 conv + LayerNorm2d), stages of
    ConvNeXtBlocks with LayerNorm2d + 2x2 s2 conv downsamples, NormMlpClassifierHead (avg pool
    -> LayerNorm2d -> flatten -> Linear). Nothing BatchNorm-like to fold: LayerNorms must stay."""

    def __init__(self, in_chans=3, num_classes=10, dims=(16, 32), depths=(2, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                                  ClLayerNorm2d(dims[0]))
        stages = []
        prev = dims[0]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            down = (nn.Sequential(ClLayerNorm2d(prev), nn.Conv2d(prev, dim, 2, stride=2))
                    if i > 0 else nn.Identity())
            stages.append(nn.Sequential(OrderedDict([
                ("downsample", down),
                ("blocks", nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])),
            ])))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(OrderedDict([
            ("global_pool", nn.AdaptiveAvgPool2d(1)),
            ("norm", ClLayerNorm2d(prev)),
            ("flatten", nn.Flatten(1)),
            ("drop", nn.Dropout(0.0)),
            ("fc", nn.Linear(prev, num_classes)),
        ]))

    def forward(self, x):
        x = self.stem(x)
        x = self.stages(x)
        return self.head(x)


class OfficialLayerNorm(nn.Module):
    """facebookresearch/ConvNeXt models/convnext.py: LayerNorm.

    Idiom: ``channels_last`` = ``F.layer_norm``; ``channels_first`` is written out by hand:
    ``u = x.mean(1)``, ``s = (x - u).pow(2).mean(1)``, ``(x - u) / torch.sqrt(s + eps)``, then
    ``weight[:, None, None] * x + bias[:, None, None]`` — a per-channel affine that looks
    foldable, after a sub and a div that are not."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        if self.data_format not in ("channels_last", "channels_first"):
            raise NotImplementedError
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


class OfficialConvNeXtBlock(nn.Module):
    """facebookresearch/ConvNeXt models/convnext.py: Block.

    Idiom: the layer scale is applied *before* the permute back, in channels-last:
    ``self.gamma * x`` (a (C,) Parameter broadcast on the last axis) right after ``pwconv2``;
    ``input + drop_path(x)``. ``norm=nn.Identity()`` gives the BatchNorm/LayerNorm-free variant
    (dwconv -> permute -> Linear directly)."""

    def __init__(self, dim, layer_scale_init_value=1e-6, norm=None):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = norm if norm is not None else OfficialLayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)
                      if layer_scale_init_value > 0 else None)
        self.drop_path = nn.Identity()

    def forward(self, x):
        input = x  # noqa: A001 - the official name
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        x = input + self.drop_path(x)
        return x


class OfficialConvNeXtTiny(nn.Module):
    """facebookresearch/ConvNeXt models/convnext.py: ConvNeXt — ``downsample_layers``
    ModuleList (stem = conv 4x4 s4 + channels_first LayerNorm; then channels_first LayerNorm +
    conv 2x2 s2), ``stages`` ModuleList, indexed ``for i in range(n)`` loop, ``x.mean([-2, -1])``
    -> ``nn.LayerNorm`` -> Linear head."""

    def __init__(self, in_chans=3, num_classes=10, depths=(1, 2), dims=(16, 32)):
        super().__init__()
        self.num_stages = len(dims)
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            OfficialLayerNorm(dims[0], eps=1e-6, data_format="channels_first")))
        for i in range(self.num_stages - 1):
            self.downsample_layers.append(nn.Sequential(
                OfficialLayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList()
        for i in range(self.num_stages):
            self.stages.append(nn.Sequential(*[OfficialConvNeXtBlock(dims[i])
                                               for _ in range(depths[i])]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward_features(self, x):
        for i in range(self.num_stages):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x.mean([-2, -1]))

    def forward(self, x):
        return self.head(self.forward_features(x))


def _convnext_identity_norm_blocks():
    return nn.Sequential(
        ConvNeXtBlock(16, norm_layer=nn.Identity),
        OfficialConvNeXtBlock(16, norm=nn.Identity()),
        ConvNeXtBlock(16, norm_layer=nn.Identity, kernel_size=3),
    )


class IResNetHead(nn.Module):
    """deepinsight/insightface recognition/arcface_torch/backbones/iresnet.py: IResNet's head
    (``bn2`` -> ``torch.flatten(x, 1)`` -> in-place Dropout -> ``fc`` -> ``features``
    BatchNorm1d with a frozen weight), here after two timm ConvNeXtBlocks on a 4x4 map.

    Idiom: no pooling, so each BN2d channel becomes a block of H*W consecutive features of the
    Linear's input (C-major flatten): foldable into the Linear's columns channel by channel;
    then a Linear -> BatchNorm1d on (B, F) that folds backwards into the Linear."""

    def __init__(self, dim=16, spatial=4, num_features=24, dropout=0.0):
        super().__init__()
        self.blocks = nn.Sequential(ConvNeXtBlock(dim, kernel_size=3),
                                    ConvNeXtBlock(dim, kernel_size=3))
        self.bn2 = nn.BatchNorm2d(dim, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(dim * spatial * spatial, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x):
        x = self.blocks(x)
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        x = self.features(x)
        return x


class NextViTPoolHead(nn.Module):
    """bytedance/Next-ViT classification/nextvit.py: NextViT's head (``norm`` BatchNorm2d ->
    ``avgpool`` AdaptiveAvgPool2d((1, 1)) -> ``torch.flatten(x, 1)`` -> ``proj_head``
    Sequential(Linear)), here after two timm ConvNeXtBlocks.

    Idiom: the BN reaches the Linear through a global average pool and a flatten: per-channel
    scale and shift commute with the mean, so it folds into the Linear's input columns."""

    def __init__(self, dim=16, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(ConvNeXtBlock(dim, kernel_size=3),
                                      ConvNeXtBlock(dim, kernel_size=3))
        self.norm = nn.BatchNorm2d(dim, eps=1e-5)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.proj_head = nn.Sequential(nn.Linear(dim, num_classes))

    def forward(self, x):
        for _, layer in enumerate(self.features):
            x = layer(x)
        x = self.norm(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.proj_head(x)
        return x


# ============================================================================================
# Entries
# ============================================================================================


def _src(repo, path, *names):
    return f"{repo} {path}: {', '.join(names)}"


IDIOMS: list[Idiom] = [
    # LeViT (timm code shape, official deploy walk)
    Idiom(
        name="levit.tiny",
        library="timm",
        source=_src(_TIMM, "timm/models/levit.py", "LevitDistilled", "Stem16", "ConvNorm",
                    "LevitStage", "LevitBlock", "LevitDownsample", "Attention",
                    "AttentionDownsample", "LevitMlp", "LinearNorm", "NormLinear", "Downsample")
        + "; " + _src(_LEVIT, "utils.py", "replace_batchnorm"),
        build=_levit_tiny,
        input_shape=(2, 3, 64, 64),
        reparameterize=_levit_fuse,
        notes="ConvNorm stem, flatten(2).transpose(1, 2) into tokens, LinearNorm everywhere "
              "(Linear -> BN1d over flatten(0, 1) -> reshape_as), qkv view/split by head, "
              "attention-bias gather cached per str(device), token-grid subsample in q, mean(1), "
              "two NormLinear heads averaged (x + x_dist) / 2",
    ),
    Idiom(
        name="levit.linear_norm",
        proves_rank=False,
        library="timm",
        source=_src(_TIMM, "timm/models/levit.py", "LinearNorm")
        + "; " + _src(_LEVIT, "levit.py", "Linear_BN.fuse"),
        build=_levit_linear_norm,
        input_shape=(2, 16, 16),
        reparameterize=_levit_fuse,
        notes="Linear (no bias) on (B, N, C), then BatchNorm1d on flatten(0, 1) and reshape_as(x): "
              "the BN is channel-wise for the Linear only through a rank-changing flatten; two "
              "LinearNorms back to back, then an activation",
    ),
    Idiom(
        name="levit.attention_block",
        proves_rank=False,
        library="timm",
        source=_src(_TIMM, "timm/models/levit.py", "LevitBlock", "Attention", "LevitMlp",
                    "LinearNorm"),
        build=_levit_attention_block,
        input_shape=(2, 16, 32),
        reparameterize=_levit_fuse,
        notes="x + attn(x): qkv LinearNorm viewed (B, N, heads, -1) and split into q|k|v per head "
              "(BN channels head-interleaved), bias table gathered by a long buffer and cached in a "
              "dict in eval, proj = Hardswish -> LinearNorm(bn_weight_init=0); then x + mlp(x)",
    ),
    Idiom(
        name="levit.attention_downsample",
        proves_rank=False,
        library="timm",
        source=_src(_TIMM, "timm/models/levit.py", "LevitDownsample", "AttentionDownsample",
                    "Downsample", "LinearNorm", "LevitMlp"),
        build=_levit_attention_downsample,
        input_shape=(2, 16, 32),
        reparameterize=_levit_fuse,
        notes="kv LinearNorm on 16 tokens, q = view(B, 4, 4, C)[:, ::2, ::2].reshape(B, -1, C) "
              "then LinearNorm on 4 tokens, (4, 16) bias gather, proj to a wider dim; then a "
              "residual LevitMlp",
    ),
    Idiom(
        name="levit.mlp",
        proves_rank=False,
        library="timm",
        source=_src(_TIMM, "timm/models/levit.py", "LevitMlp", "LevitBlock", "LinearNorm"),
        build=_levit_mlp,
        input_shape=(2, 16, 32),
        reparameterize=_levit_fuse,
        notes="x + ln2(act(ln1(x))): two LinearNorms around Hardswish, the second BN's weight "
              "zero-initialised (randomised here), inside a residual add",
    ),
    Idiom(
        name="levit.norm_linear_heads",
        proves_rank=False,
        library="timm",
        source=_src(_TIMM, "timm/models/levit.py", "LevitDistilled.forward_head", "NormLinear")
        + "; " + _src(_LEVIT, "levit.py", "BN_Linear.fuse"),
        build=_levit_heads,
        input_shape=(2, 4, 48),
        reparameterize=_levit_fuse,
        notes="mean over tokens, then two BatchNorm1d -> Dropout -> Linear heads on the same "
              "pooled tensor, averaged (x + x_dist) / 2: each BN folds forward into its Linear",
    ),
    Idiom(
        name="levit.official_tiny",
        library="LeViT",
        source=_src(_LEVIT, "levit.py", "LeViT", "model_factory", "b16", "Conv2d_BN",
                    "Linear_BN", "BN_Linear", "Residual", "Attention", "AttentionSubsample",
                    "Subsample")
        + "; " + _src(_LEVIT, "utils.py", "replace_batchnorm"),
        build=_levit_official_tiny,
        input_shape=(2, 3, 64, 64),
        reparameterize=None,
        notes="nn.Sequential subclasses (Conv2d_BN with no forward, Linear_BN with a forward "
              "unpacking self._modules.values()), Residual with a training branch; eval() "
              "caches attention_biases[:, idxs] into a plain tensor attribute self.ab, here "
              "computed before .double() and randomisation, so the model runs a stale float32 "
              "zero table (a tracer sees a constant). reparameterize=None: replace_batchnorm "
              "itself is exact, but any later .eval() of the copy recomputes self.ab from the "
              "randomised biases and changes the function (measured 6e-4 relative)",
    ),
    Idiom(
        name="levit.neg_bn_over_tokens",
        library="timm",
        source=_src(_TIMM, "timm/models/levit.py", "LinearNorm") + " (counter-variant)",
        build=_TokenBnOverTokens,
        input_shape=(2, 16, 12),
        must_remain={"batch_norm": 1},
        notes="Linear -> transpose(1, 2).reshape(B*C, N) -> BatchNorm1d(N) -> back -> Linear: the "
              "BN's features are tokens, not the Linear's channels; folds into neither Linear",
    ),
    Idiom(
        name="levit.neg_bn_mixed_reshape",
        library="timm",
        source=_src(_TIMM, "timm/models/levit.py", "LinearNorm") + " (counter-variant)",
        build=_TokenBnMixedReshape,
        input_shape=(2, 16, 12),
        must_remain={"batch_norm": 1},
        notes="Linear -> raw reshape(B*C, N) of a (B, N, C) tensor (no transpose: each BN feature "
              "mixes token and channel indices) -> BatchNorm1d(N) -> reshape_as -> Linear; looks "
              "like LinearNorm's flatten, is not channel-wise",
    ),
    # Next-ViT
    Idiom(
        name="nextvit.tiny",
        library="timm",
        source=_src(_TIMM, "timm/models/nextvit.py", "NextViT", "NextStage", "NextConvBlock",
                    "NextTransformerBlock", "EfficientAttention", "PatchEmbed", "ConvAttention",
                    "merge_pre_bn")
        + "; " + _src(_TIMM, "timm/utils/model.py", "reparameterize_model"),
        build=_nextvit_tiny,
        reparameterize=timm_reparameterize_model,
        notes="pre-norm BN2d whose output feeds only q/k/v Linears (through reshape(B, C, -1)."
              "transpose(-1, -2)) or the MLP's 1x1 conv while the residual takes the un-normalised "
              "x; AvgPool1d over tokens -> BN1d -> k/v (sr 2); SDPA; pool-stride PatchEmbed; "
              "final BN2d -> avg pool -> flatten -> Linear head",
    ),
    Idiom(
        name="nextvit.timm_blocks",
        library="timm",
        source=_src(_TIMM, "timm/models/nextvit.py", "NextTransformerBlock", "NextConvBlock",
                    "EfficientAttention", "merge_pre_bn")
        + "; " + _src(_TIMM, "timm/utils/model.py", "reparameterize_model"),
        build=_nextvit_timm_blocks_sr2,
        input_shape=(2, 24, 8, 8),
        reparameterize=timm_reparameterize_model,
        notes="NTB with sr_ratio 2 (explicit softmax attention), NCB, NTB with sr_ratio 1 (SDPA) "
              "on 64 tokens; PatchEmbed conv -> BN -> norm1 BN back to back before the tokens",
    ),
    Idiom(
        name="nextvit.e_mhsa_sr1",
        library="Next-ViT",
        source=_src(_NEXTVIT, "classification/nextvit.py", "NTB", "E_MHSA", "NCB", "Mlp",
                    "NextViT.merge_bn")
        + "; " + _src(_NEXTVIT, "classification/utils.py", "merge_pre_bn"),
        build=_nextvit_e_mhsa_sr1,
        input_shape=(2, 24, 8, 8),
        reparameterize=_nextvit_merge_bn,
        traceable=False,
        notes="official shape: norm1 BN2d -> permute(0, 2, 3, 1).reshape(B, HW, C) -> separate "
              "q/k/v Linears; merge_bn folds the BN into all three and a Python branch "
              "(torch.onnx.is_in_onnx_export() / is_bn_merged) skips the BN module afterwards",
    ),
    Idiom(
        name="nextvit.e_mhsa_sr2",
        library="Next-ViT",
        source=_src(_NEXTVIT, "classification/nextvit.py", "NTB", "E_MHSA", "Mlp",
                    "NextViT.merge_bn")
        + "; " + _src(_NEXTVIT, "classification/utils.py", "merge_pre_bn"),
        build=_nextvit_e_mhsa_sr2,
        input_shape=(2, 24, 8, 8),
        reparameterize=_nextvit_merge_bn,
        traceable=False,
        notes="official shape, sr_ratio 2: q reads BN2d(x) tokens directly, k/v read "
              "transpose -> AvgPool1d(4) -> BatchNorm1d -> transpose of the same tokens; merge_bn "
              "folds both BNs (across the pool) into k and v",
    ),
    # Channels-last blocks and BN -> flatten -> Linear heads
    Idiom(
        name="convnext.tiny_layernorm",
        library="timm",
        source=_src(_TIMM, "timm/models/convnext.py", "ConvNeXt", "ConvNeXtBlock")
        + "; " + _src(_TIMM, "timm/layers/norm.py", "LayerNorm", "LayerNorm2d")
        + "; " + _src(_TIMM, "timm/layers/mlp.py", "Mlp"),
        build=ConvNeXtTiny,
        notes="dw7x7 -> permute(0, 2, 3, 1) -> LayerNorm -> Linear -> GELU -> Linear -> "
              "permute(0, 3, 1, 2) -> mul(gamma.reshape(1, -1, 1, 1)) -> + x; LayerNorm2d "
              "downsamples and head: no BatchNorm, LayerNorms must not be folded",
    ),
    Idiom(
        name="convnext.official_tiny",
        library="ConvNeXt",
        source=_src(_CONVNEXT, "models/convnext.py", "ConvNeXt", "Block", "LayerNorm"),
        build=OfficialConvNeXtTiny,
        must_remain={"div": 2},
        notes="gamma * x applied in channels-last before the permute back; channels_first "
              "LayerNorm written as mean/sub/pow/div/sqrt then weight[:, None, None] * x + "
              "bias[:, None, None] in front of an unpadded 2x2 s2 conv (the affine folds, the "
              "normalisation does not)",
    ),
    Idiom(
        name="convnext.identity_norm_blocks",
        library="timm",
        source=_src(_TIMM, "timm/models/convnext.py", "ConvNeXtBlock")
        + "; " + _src(_CONVNEXT, "models/convnext.py", "Block"),
        build=_convnext_identity_norm_blocks,
        input_shape=(2, 16, 8, 8),
        notes="norm = nn.Identity: dw conv -> permute -> Linear (a 1x1 conv in disguise next to "
              "the dw conv) -> GELU -> Linear -> layer scale (before or after the permute back) "
              "-> residual add",
    ),
    Idiom(
        name="convnext.bn2d_flatten_linear_head",
        library="insightface",
        source=_src(_INSIGHTFACE, "recognition/arcface_torch/backbones/iresnet.py",
                    "IResNet.forward")
        + "; " + _src(_TIMM, "timm/models/convnext.py", "ConvNeXtBlock"),
        build=IResNetHead,
        input_shape=(2, 16, 4, 4),
        notes="BatchNorm2d(16) -> torch.flatten(x, 1) on a 4x4 map (no pooling: channel c is "
              "features 16c..16c+15) -> in-place Dropout -> Linear -> BatchNorm1d (frozen "
              "weight); both BNs fold into the Linear (one forward, one backward)",
    ),
    Idiom(
        name="convnext.bn2d_avgpool_linear_head",
        library="Next-ViT",
        source=_src(_NEXTVIT, "classification/nextvit.py", "NextViT.forward")
        + "; " + _src(_TIMM, "timm/models/convnext.py", "ConvNeXtBlock"),
        build=NextViTPoolHead,
        input_shape=(2, 16, 4, 4),
        notes="BatchNorm2d -> AdaptiveAvgPool2d((1, 1)) -> torch.flatten(x, 1) -> Sequential"
              "(Linear): the BN folds into the Linear's input columns through the pool",
    ),
]
