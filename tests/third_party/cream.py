"""Microsoft's official EfficientViT (microsoft/Cream EfficientViT/classification/model/
efficientvit.py; timm's ``efficientvit_msra.py`` had the same blocks until 2024): the window
attention block checks its input size with a plain ``assert H == H_ and W == W_``, which
symbolic tracing cannot take, so the block is kept whole as a leaf. Its ``attn`` child
(the cascaded group attention, nine conv-BN pairs per block) is only called, so it is
fused on its own; its attention biases are a plain tensor attribute ``ab`` that its
``train()`` override sets in eval mode.

Re-written from microsoft/Cream EfficientViT/classification/model/efficientvit.py and
EfficientViT/classification/utils.py (``replace_batchnorm``), shrunk to 64x64 inputs.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from . import Idiom
from .timm_vit import SqueezeExcite, _make_divisible

_SRC = "microsoft/Cream EfficientViT/classification/model/efficientvit.py"


class Conv2d_BN(nn.Sequential):  # noqa: N801 - the repo's name
    """``nn.Sequential`` of ``c`` (conv, no bias) and ``bn``; ``fuse()`` returns a conv
    (the repo builds it in the default dtype; here in the weight's)."""

    def __init__(self, a, b, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1,
                 resolution=-10000):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self):
        c, bn = self._modules.values()
        w = bn.weight / (bn.running_var + bn.eps) ** 0.5
        w = c.weight * w[:, None, None, None]
        b = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5
        m = nn.Conv2d(w.size(1) * self.c.groups, w.size(0), w.shape[2:], stride=self.c.stride,
                      padding=self.c.padding, dilation=self.c.dilation, groups=self.c.groups,
                      dtype=w.dtype)
        m.weight.data.copy_(w)
        m.bias.data.copy_(b)
        return m


class BN_Linear(nn.Sequential):  # noqa: N801
    """``bn`` (BatchNorm1d) then ``l`` (Linear); ``fuse()`` returns one Linear."""

    def __init__(self, a, b, bias=True, std=0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.constant_(self.l.bias, 0)

    @torch.no_grad()
    def fuse(self):
        bn, linear = self._modules.values()
        w = bn.weight / (bn.running_var + bn.eps) ** 0.5
        b = bn.bias - self.bn.running_mean * self.bn.weight / (bn.running_var + bn.eps) ** 0.5
        w = linear.weight * w[None, :]
        if linear.bias is None:
            b = b @ self.l.weight.T
        else:
            b = (linear.weight @ b[:, None]).view(-1) + self.l.bias
        m = nn.Linear(w.size(1), w.size(0), dtype=w.dtype)
        m.weight.data.copy_(w)
        m.bias.data.copy_(b)
        return m


def replace_batchnorm(net):
    """EfficientViT/classification/utils.py: every child with ``fuse`` replaced by its
    fused module, a bare BatchNorm2d by Identity, the rest visited."""
    for child_name, child in net.named_children():
        if hasattr(child, "fuse"):
            setattr(net, child_name, child.fuse())
        elif isinstance(child, nn.BatchNorm2d):
            setattr(net, child_name, nn.Identity())
        else:
            replace_batchnorm(child)
    return net


class PatchMerging(nn.Module):
    def __init__(self, dim, out_dim, input_resolution):
        super().__init__()
        hid_dim = int(dim * 4)
        self.conv1 = Conv2d_BN(dim, hid_dim, 1, 1, 0, resolution=input_resolution)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hid_dim, hid_dim, 3, 2, 1, groups=hid_dim, resolution=input_resolution)
        self.se = SqueezeExcite(hid_dim, _make_divisible(hid_dim * 0.25))
        self.conv3 = Conv2d_BN(hid_dim, out_dim, 1, 1, 0, resolution=input_resolution // 2)

    def forward(self, x):
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class Residual(nn.Module):
    def __init__(self, m, drop=0.):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x):
        if self.training and self.drop > 0:
            return x + self.m(x) * torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(
                self.drop).div(1 - self.drop).detach()
        return x + self.m(x)


class FFN(nn.Module):
    def __init__(self, ed, h, resolution):
        super().__init__()
        self.pw1 = Conv2d_BN(ed, h, resolution=resolution)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(h, ed, bn_weight_init=0, resolution=resolution)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


class CascadedGroupAttention(nn.Module):
    """Per head: ``feat (+ previous head's output) -> qkv Conv2d_BN -> split``, q through a
    depthwise Conv2d_BN; biases ``ab`` indexed once by ``train(False)`` (a plain attribute,
    not a buffer); ``proj`` = ReLU + Conv2d_BN on the concatenated heads."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=14,
                 kernels=(5, 5, 5, 5)):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.attn_ratio = attn_ratio
        qkvs, dws = [], []
        for i in range(num_heads):
            qkvs.append(Conv2d_BN(dim // num_heads, self.key_dim * 2 + self.d, resolution=resolution))
            dws.append(Conv2d_BN(self.key_dim, self.key_dim, kernels[i], 1, kernels[i] // 2,
                                 groups=self.key_dim, resolution=resolution))
        self.qkvs = nn.ModuleList(qkvs)
        self.dws = nn.ModuleList(dws)
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(self.d * num_heads, dim, bn_weight_init=0,
                                                       resolution=resolution))
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets, idxs = {}, []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                if offset not in offsets:
                    offsets[offset] = len(offsets)
                idxs.append(offsets[offset])
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

    def forward(self, x):  # x (B, C, H, W)
        B, C, H, W = x.shape
        trainingab = self.attention_biases[:, self.attention_bias_idxs]
        feats_in = x.chunk(len(self.qkvs), dim=1)
        feats_out = []
        feat = feats_in[0]
        for i, qkv in enumerate(self.qkvs):
            if i > 0:
                feat = feat + feats_in[i]
            feat = qkv(feat)
            q, k, v = feat.view(B, -1, H, W).split([self.key_dim, self.key_dim, self.d], dim=1)
            q = self.dws[i](q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = (q.transpose(-2, -1) @ k) * self.scale + \
                (trainingab[i] if self.training else self.ab[i])
            attn = attn.softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(B, self.d, H, W)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, 1))


class LocalWindowAttention(nn.Module):
    """``H = W = self.resolution`` checked with a plain ``assert`` against ``x.shape`` (not
    traceable: the block is a leaf); one window if the map fits, else BHWC, pad right and
    bottom, window partition, attention, reverse, crop."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=14,
                 window_resolution=7, kernels=(5, 5, 5, 5)):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        assert window_resolution > 0, "window_size must be greater than 0"
        self.window_resolution = window_resolution
        window_resolution = min(window_resolution, resolution)
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio=attn_ratio,
                                           resolution=window_resolution, kernels=kernels)

    def forward(self, x):
        H = W = self.resolution
        B, C, H_, W_ = x.shape
        assert H == H_ and W == W_, "input feature has wrong size, expect {}, got {}".format(
            (H, W), (H_, W_))
        if H <= self.window_resolution and W <= self.window_resolution:
            return self.attn(x)
        x = x.permute(0, 2, 3, 1)
        pad_b = (self.window_resolution - H % self.window_resolution) % self.window_resolution
        pad_r = (self.window_resolution - W % self.window_resolution) % self.window_resolution
        padding = pad_b > 0 or pad_r > 0
        if padding:
            x = nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // self.window_resolution, pW // self.window_resolution
        ws = self.window_resolution
        x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws, ws, C)
        x = self.attn(x.permute(0, 3, 1, 2))
        x = x.permute(0, 2, 3, 1).view(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
        if padding:
            x = x[:, :H, :W].contiguous()
        return x.permute(0, 3, 1, 2)


class EfficientViTBlock(nn.Module):
    def __init__(self, type, ed, kd, nh=8, ar=4, resolution=14, window_resolution=7,  # noqa: A002
                 kernels=(5, 5, 5, 5)):
        super().__init__()
        self.dw0 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0., resolution=resolution))
        self.ffn0 = Residual(FFN(ed, int(ed * 2), resolution))
        if type == "s":
            self.mixer = Residual(LocalWindowAttention(
                ed, kd, nh, attn_ratio=ar, resolution=resolution,
                window_resolution=window_resolution, kernels=kernels))
        self.dw1 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0., resolution=resolution))
        self.ffn1 = Residual(FFN(ed, int(ed * 2), resolution))

    def forward(self, x):
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class EfficientViT(nn.Module):
    """Patch embedding (four 3x3 s2 Conv2d_BN), three block lists (``blocks1..3``: blocks,
    then the subsample of the next: residual dw + FFN, PatchMerging, residual dw + FFN),
    ``adaptive_avg_pool2d(x, 1).flatten(1)`` and a BN_Linear head."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 stages=("s", "s", "s"), embed_dim=(64, 128, 192), key_dim=(16, 16, 16),
                 depth=(1, 2, 3), num_heads=(4, 4, 4), window_size=(7, 7, 7),
                 kernels=(5, 5, 5, 5), down_ops=(("subsample", 2), ("subsample", 2), ("",)),
                 distillation=False):
        super().__init__()
        resolution = img_size
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim[0] // 8, 3, 2, 1, resolution=resolution), nn.ReLU(),
            Conv2d_BN(embed_dim[0] // 8, embed_dim[0] // 4, 3, 2, 1, resolution=resolution // 2), nn.ReLU(),
            Conv2d_BN(embed_dim[0] // 4, embed_dim[0] // 2, 3, 2, 1, resolution=resolution // 4), nn.ReLU(),
            Conv2d_BN(embed_dim[0] // 2, embed_dim[0], 3, 2, 1, resolution=resolution // 8))
        resolution = img_size // patch_size
        attn_ratio = [embed_dim[i] / (key_dim[i] * num_heads[i]) for i in range(len(embed_dim))]
        self.blocks1, self.blocks2, self.blocks3 = [], [], []
        for i, (stg, ed, kd, dpth, nh, ar, wd, do) in enumerate(
                zip(stages, embed_dim, key_dim, depth, num_heads, attn_ratio, window_size, down_ops)):
            for _ in range(dpth):
                getattr(self, "blocks" + str(i + 1)).append(
                    EfficientViTBlock(stg, ed, kd, nh, ar, resolution, wd, kernels))
            if do[0] == "subsample":
                blk = getattr(self, "blocks" + str(i + 2))
                resolution_ = (resolution - 1) // do[1] + 1
                blk.append(nn.Sequential(
                    Residual(Conv2d_BN(embed_dim[i], embed_dim[i], 3, 1, 1, groups=embed_dim[i],
                                       resolution=resolution)),
                    Residual(FFN(embed_dim[i], int(embed_dim[i] * 2), resolution))))
                blk.append(PatchMerging(*embed_dim[i:i + 2], resolution))
                resolution = resolution_
                blk.append(nn.Sequential(
                    Residual(Conv2d_BN(embed_dim[i + 1], embed_dim[i + 1], 3, 1, 1,
                                       groups=embed_dim[i + 1], resolution=resolution)),
                    Residual(FFN(embed_dim[i + 1], int(embed_dim[i + 1] * 2), resolution))))
        self.blocks1 = nn.Sequential(*self.blocks1)
        self.blocks2 = nn.Sequential(*self.blocks2)
        self.blocks3 = nn.Sequential(*self.blocks3)
        self.head = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.distillation = distillation
        if distillation:
            self.head_dist = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        x = self.patch_embed(x)
        x = self.blocks1(x)
        x = self.blocks2(x)
        x = self.blocks3(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.distillation:
            x = self.head(x), self.head_dist(x)
            if not self.training:
                x = (x[0] + x[1]) / 2
        else:
            x = self.head(x)
        return x


def build_efficientvit_m0_tiny():
    # EfficientViT-M0's layout at 64x64: a 4x4 map with windows of 2 (partitioned), then 2x2
    # and 1x1 maps in one window each
    model = EfficientViT(img_size=64, num_classes=10, embed_dim=(16, 24, 32), key_dim=(4, 4, 4),
                         depth=(1, 1, 1), num_heads=(2, 2, 2), window_size=(2, 2, 2),
                         kernels=(5, 3, 5, 3))
    # attention biases as a checkpoint holds them: the harness randomises constant
    # parameters only after eval(), when train(False) has already indexed them into `ab`
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CascadedGroupAttention):
                module.attention_biases.normal_()
    return model


def deploy(model):
    return replace_batchnorm(model)


IDIOMS: list[Idiom] = [
    Idiom(
        name="cream.efficientvit_m0_tiny",
        library="Cream",
        source=f"{_SRC}: EfficientViT, EfficientViTBlock, LocalWindowAttention, "
               "CascadedGroupAttention, Conv2d_BN, BN_Linear, PatchMerging, Residual, FFN; "
               "EfficientViT/classification/utils.py: replace_batchnorm",
        build=build_efficientvit_m0_tiny,
        input_shape=(2, 3, 64, 64),
        reparameterize=deploy,
        traceable=False,
        notes="LocalWindowAttention's plain `assert H == H_ and W == W_` stops symbolic tracing: "
              "each of the three window blocks is a leaf, and its attention child (qkv and dw "
              "Conv2d_BN per head, proj) is fused on its own; the attention biases are the "
              "plain attribute `ab` its train() override computes; torch.export sees it all.",
    ),
]
