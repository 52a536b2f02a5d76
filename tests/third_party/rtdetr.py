"""RT-DETR (lyuwenyu/RT-DETR, PyTorch ports rtdetr_pytorch / rtdetrv2_pytorch).

Re-written from the public files named in each docstring, keeping what a graph fuser meets:
HGNetV2's ``LearnableAffineBlock`` (a scalar ``scale * x + bias`` with [1]-shaped Parameters,
after the ReLU), ``ConvBNAct`` whose ``conv`` is a ``Sequential(ZeroPad2d([0, 1, 0, 1]),
Conv2d)`` for 'same' padding, ``HG_Block``'s concatenation aggregation, the
``FrozenBatchNorm2d`` that ``freeze_norm=True`` (the HGNetv2-L/X/H and R50vd configs) swaps
in for every BatchNorm (``x * scale + bias`` from buffers reshaped first), in-place SiLU/ReLU
from ``get_activation``, the hybrid encoder's ``RepVggBlock`` (``if hasattr(self, 'conv')``
in ``forward``, ``convert_to_deploy`` that keeps the training branches) and RT-DETRv2's
CSPResNet ``RepVggBlock`` with a scalar ``alpha`` tested as ``if self.alpha:``.

Models return their feature list; the wrappers here flatten and concatenate it (the
transformer decoder is left out).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.init as init

from . import Idiom


def get_activation(act, inplace: bool = True):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/common.py: get_activation — a new
    module per call (in place where the module supports it); a module passes through."""
    if act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    table = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU,
             "gelu": nn.GELU, "hardsigmoid": nn.Hardsigmoid}
    m = table[act.lower()]()
    if hasattr(m, "inplace"):
        m.inplace = inplace
    return m


class FrozenBatchNorm2d(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/common.py: FrozenBatchNorm2d — BN
    statistics and affine as *buffers*; ``forward`` reshapes them to (1, C, 1, 1) first and
    returns ``x * scale + bias`` (a mul and an add, no batch_norm op)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        n = num_features
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.eps = eps
        self.num_features = n

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def freeze_batch_norm2d(module: nn.Module) -> nn.Module:
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/common.py: freeze_batch_norm2d (and the
    backbones' ``_freeze_norm``) — every BatchNorm2d replaced by a fresh FrozenBatchNorm2d
    (checkpoint loading fills it later)."""
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d(module.num_features)
    for name, child in module.named_children():
        new = freeze_batch_norm2d(child)
        if new is not child:
            setattr(module, name, new)
    return module


@torch.no_grad()
def _load_frozen_statistics(module: nn.Module) -> nn.Module:
    """Stand-in for loading a checkpoint into FrozenBatchNorm2d buffers (the harness only
    randomises real BatchNorms and parameters)."""
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.weight.copy_((torch.rand(n) + 0.5) * (torch.randint(0, 2, (n,)) * 2 - 1))
            m.bias.copy_(torch.randn(n))
            m.running_mean.copy_(torch.randn(n))
            m.running_var.copy_(torch.rand(n) * 1.5 + 0.5)
    return module


# ----------------------------------------------------------------------------------------
# lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py
# ----------------------------------------------------------------------------------------


class LearnableAffineBlock(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py: LearnableAffineBlock —
    ``self.scale * x + self.bias`` with Parameters of shape [1] (a scalar affine, broadcast
    over all channels) applied after the ReLU."""

    def __init__(self, scale_value=1.0, bias_value=0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale_value]))
        self.bias = nn.Parameter(torch.tensor([bias_value]))

    def forward(self, x):
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py: ConvBNAct — conv -> BN ->
    (ReLU -> LearnableAffineBlock when ``use_lab``), act and lab chosen by Python flags;
    ``padding='same'`` makes ``self.conv`` a ``Sequential(ZeroPad2d([0, 1, 0, 1]), Conv2d)``."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, groups=1,
                 use_act=True, use_lab=False):
        super().__init__()
        self.use_act = use_act
        self.use_lab = use_lab
        if padding == "same":
            self.conv = nn.Sequential(
                nn.ZeroPad2d([0, 1, 0, 1]),
                nn.Conv2d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=False),
            )
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                  padding=(kernel_size - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        if self.use_act:
            self.act = nn.ReLU()
            if self.use_lab:
                self.lab = LearnableAffineBlock()

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        if self.use_act:
            x = self.act(x)
            if self.use_lab:
                x = self.lab(x)
        return x


class LightConvBNAct(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py: LightConvBNAct — 1x1
    ConvBNAct without act (so without lab), then a depthwise ConvBNAct with act (+lab)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, groups=1, use_lab=False):
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, kernel_size=1, use_act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(out_channels, out_channels, kernel_size=kernel_size,
                               groups=out_channels, use_act=True, use_lab=use_lab)

    def forward(self, x):
        x = self.conv1(x)
        x = self.conv2(x)
        return x


class StemBlock(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py: StemBlock — two 'same'
    2x2 ConvBNActs (ZeroPad2d right/bottom inside), a ZeroPad2d + ceil-mode MaxPool branch,
    concat, two more ConvBNActs."""

    def __init__(self, in_channels, mid_channels, out_channels, use_lab=False):
        super().__init__()
        self.stem1 = ConvBNAct(in_channels, mid_channels, kernel_size=3, stride=2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid_channels, mid_channels // 2, kernel_size=2, stride=1,
                                padding="same", use_lab=use_lab)
        self.stem2b = ConvBNAct(mid_channels // 2, mid_channels, kernel_size=2, stride=1,
                                padding="same", use_lab=use_lab)
        self.stem3 = ConvBNAct(mid_channels * 2, mid_channels, kernel_size=3, stride=2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid_channels, out_channels, kernel_size=1, stride=1, use_lab=use_lab)
        self.pool = nn.Sequential(nn.ZeroPad2d([0, 1, 0, 1]), nn.MaxPool2d(2, 1, ceil_mode=True))

    def forward(self, x):
        x = self.stem1(x)
        x2 = self.stem2a(x)
        x2 = self.stem2b(x2)
        x1 = self.pool(x)
        x = torch.concat([x1, x2], dim=1)
        x = self.stem3(x)
        x = self.stem4(x)
        return x


class HG_Block(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py: HG_Block — chained
    (Light)ConvBNActs, every intermediate appended to a list and concatenated, squeeze and
    excitation 1x1 ConvBNActs, then ``x + identity`` when ``self.identity``."""

    _blocks: ClassVar[dict] = {"LightConvBNAct": LightConvBNAct, "ConvBNAct": ConvBNAct}

    def __init__(self, in_channels, mid_channels, out_channels, kernel_size=3, layer_num=6,
                 identity=False, light_block=True, use_lab=False):
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList()
        unit = self._blocks["LightConvBNAct" if light_block else "ConvBNAct"]
        for i in range(layer_num):
            self.layers.append(unit(in_channels=in_channels if i == 0 else mid_channels,
                                    out_channels=mid_channels, stride=1, kernel_size=kernel_size,
                                    use_lab=use_lab))
        total = in_channels + layer_num * mid_channels
        self.aggregation_squeeze_conv = ConvBNAct(total, out_channels // 2, kernel_size=1, stride=1,
                                                  use_lab=use_lab)
        self.aggregation_excitation_conv = ConvBNAct(out_channels // 2, out_channels, kernel_size=1,
                                                     stride=1, use_lab=use_lab)

    def forward(self, x):
        identity = x
        output = [x]
        for layer in self.layers:
            x = layer(x)
            output.append(x)
        x = torch.concat(output, dim=1)
        x = self.aggregation_squeeze_conv(x)
        x = self.aggregation_excitation_conv(x)
        if self.identity:
            x = x + identity
        return x


class HG_Stage(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py: HG_Stage — optional
    depthwise stride-2 ConvBNAct without act (``self.downsample`` is the module or ``False``),
    then HG_Blocks (residual from the second on)."""

    def __init__(self, in_channels, mid_channels, out_channels, block_num, layer_num=6,
                 downsample=True, light_block=True, kernel_size=3, use_lab=False):
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.downsample = ConvBNAct(in_channels, in_channels, kernel_size=3, stride=2,
                                        groups=in_channels, use_act=False, use_lab=use_lab)
        self.blocks = nn.Sequential(*[
            HG_Block(in_channels if i == 0 else out_channels, mid_channels, out_channels,
                     kernel_size=kernel_size, layer_num=layer_num, identity=i != 0,
                     light_block=light_block, use_lab=use_lab)
            for i in range(block_num)])

    def forward(self, x):
        if self.downsample:
            x = self.downsample(x)
        return self.blocks(x)


class HGNetv2(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py: HGNetv2 — StemBlock and four
    HG_Stages from an arch table (a tiny one here), kaiming init, ``freeze_norm`` swapping
    every BatchNorm2d for FrozenBatchNorm2d; returns the stages in ``return_idx``."""

    arch_configs: ClassVar[dict] = {
        "T": {
            "stem_channels": [3, 8, 16],
            "stage_config": {
                # in, mid, out, blocks, downsample, light_block, kernel, layers
                "stage1": [16, 8, 32, 1, False, False, 3, 2],
                "stage2": [32, 16, 32, 1, True, False, 3, 2],
                "stage3": [32, 16, 48, 2, True, True, 5, 2],
                "stage4": [48, 16, 48, 1, True, True, 5, 2],
            },
        },
    }

    def __init__(self, name="T", use_lab=False, return_idx=(1, 2, 3), freeze_norm=False):
        super().__init__()
        self.use_lab = use_lab
        self.return_idx = list(return_idx)
        stem_channels = self.arch_configs[name]["stem_channels"]
        stage_config = self.arch_configs[name]["stage_config"]
        self.stem = StemBlock(stem_channels[0], stem_channels[1], stem_channels[2], use_lab=use_lab)
        self.stages = nn.ModuleList()
        for key in stage_config:
            c_in, c_mid, c_out, blocks, down, light, k, layers = stage_config[key]
            self.stages.append(HG_Stage(c_in, c_mid, c_out, blocks, layers, down, light, k, use_lab))
        self._init_weights()
        if freeze_norm:
            self._freeze_norm(self)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                init.constant_(m.weight, 1)
                init.constant_(m.bias, 0)

    def _freeze_norm(self, m: nn.Module):
        return freeze_batch_norm2d(m)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs


# ----------------------------------------------------------------------------------------
# lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/hybrid_encoder.py (and rtdetrv2's copy)
# ----------------------------------------------------------------------------------------


class ConvNormLayer(nn.Module):
    """lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/hybrid_encoder.py: ConvNormLayer — conv ->
    ``self.norm`` (BatchNorm2d) -> act (in-place SiLU from get_activation, or Identity)."""

    def __init__(self, ch_in, ch_out, kernel_size, stride, padding=None, bias=False, act=None):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride,
                              padding=(kernel_size - 1) // 2 if padding is None else padding, bias=bias)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = nn.Identity() if act is None else get_activation(act)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class RepVggBlock(nn.Module):
    """lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/hybrid_encoder.py: RepVggBlock — 3x3 and 1x1
    ConvNormLayers summed (no identity); ``forward`` picks ``self.conv`` when
    ``hasattr(self, 'conv')``; ``convert_to_deploy`` creates/overwrites ``self.conv`` and keeps
    ``conv1``/``conv2`` registered (their deletion is commented out upstream)."""

    def __init__(self, ch_in, ch_out, act="relu"):
        super().__init__()
        self.ch_in = ch_in
        self.ch_out = ch_out
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = nn.Identity() if act is None else get_activation(act)

    def forward(self, x):
        if hasattr(self, "conv"):
            y = self.conv(x)
        else:
            y = self.conv1(x) + self.conv2(x)
        return self.act(y)

    @torch.no_grad()
    def convert_to_deploy(self):
        kernel, bias = self.get_equivalent_kernel_bias()
        if not hasattr(self, "conv"):
            self.conv = nn.Conv2d(self.ch_in, self.ch_out, 3, 1, padding=1,
                                  dtype=kernel.dtype, device=kernel.device)
        self.conv.weight.data = kernel
        self.conv.bias.data = bias

    def get_equivalent_kernel_bias(self):
        k3, b3 = self._fuse_bn_tensor(self.conv1)
        k1, b1 = self._fuse_bn_tensor(self.conv2)
        return k3 + self._pad_1x1_to_3x3_tensor(k1), b3 + b1

    def _pad_1x1_to_3x3_tensor(self, kernel1x1):
        return 0 if kernel1x1 is None else F.pad(kernel1x1, [1, 1, 1, 1])

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        norm = branch.norm
        std = (norm.running_var + norm.eps).sqrt()
        t = (norm.weight / std).reshape(-1, 1, 1, 1)
        return branch.conv.weight * t, norm.bias - norm.running_mean * norm.weight / std


class CSPRepLayer(nn.Module):
    """lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/hybrid_encoder.py: CSPRepLayer — two 1x1
    ConvNormLayers, RepVggBlocks on one, ``conv3(x_1 + x_2)`` with conv3 an Identity when the
    hidden width equals the output width (``bias=None`` reaches ``nn.Conv2d``)."""

    def __init__(self, in_channels, out_channels, num_blocks=3, expansion=1.0, bias=None, act="silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        if hidden != out_channels:
            self.conv3 = ConvNormLayer(hidden, out_channels, 1, 1, bias=bias, act=act)
        else:
            self.conv3 = nn.Identity()

    def forward(self, x):
        x_1 = self.conv1(x)
        x_1 = self.bottlenecks(x_1)
        x_2 = self.conv2(x)
        return self.conv3(x_1 + x_2)


class TransformerEncoderLayer(nn.Module):
    """lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/hybrid_encoder.py: TransformerEncoderLayer
    (AIFI) — post-norm MultiheadAttention + FFN on the flattened top level."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.normalize_before = normalize_before
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    @staticmethod
    def with_pos_embed(tensor, pos_embed):
        return tensor if pos_embed is None else tensor + pos_embed

    def forward(self, src, src_mask=None, pos_embed=None):
        residual = src
        if self.normalize_before:
            src = self.norm1(src)
        q = k = self.with_pos_embed(src, pos_embed)
        src, _ = self.self_attn(q, k, value=src, attn_mask=src_mask, need_weights=False)
        src = residual + self.dropout1(src)
        if not self.normalize_before:
            src = self.norm1(src)
        residual = src
        if self.normalize_before:
            src = self.norm2(src)
        src = self.linear2(self.dropout(self.activation(self.linear1(src))))
        src = residual + self.dropout2(src)
        if not self.normalize_before:
            src = self.norm2(src)
        return src


class TransformerEncoder(nn.Module):
    """lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/hybrid_encoder.py: TransformerEncoder."""

    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, src_mask=None, pos_embed=None):
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=src_mask, pos_embed=pos_embed)
        if self.norm is not None:
            output = self.norm(output)
        return output


class HybridEncoder(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/zoo/rtdetr/hybrid_encoder.py: HybridEncoder —
    ``input_proj`` Sequential(OrderedDict(conv, norm)) per level, AIFI on the top level (sin-cos
    position embedding built from ``int(w)`` of the runtime shape: not symbolically
    traceable), top-down FPN (lateral ConvNormLayer, nearest ×2, concat, CSPRepLayer) and
    bottom-up PAN (strided ConvNormLayer, concat, CSPRepLayer)."""

    def __init__(self, in_channels=(16, 24, 32), feat_strides=(8, 16, 32), hidden_dim=16, nhead=2,
                 dim_feedforward=32, dropout=0.0, enc_act="gelu", use_encoder_idx=(2,),
                 num_encoder_layers=1, pe_temperature=10000, expansion=1.0, depth_mult=0.67,
                 act="silu", eval_spatial_size=None):
        super().__init__()
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = eval_spatial_size
        self.input_proj = nn.ModuleList()
        for c in self.in_channels:
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, hidden_dim, kernel_size=1, bias=False)),
                ("norm", nn.BatchNorm2d(hidden_dim)),
            ])))
        layer = TransformerEncoderLayer(hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward,
                                        dropout=dropout, activation=enc_act)
        self.encoder = nn.ModuleList([TransformerEncoder(copy.deepcopy(layer), num_encoder_layers)
                                      for _ in range(len(self.use_encoder_idx))])
        self.lateral_convs = nn.ModuleList()
        self.fpn_blocks = nn.ModuleList()
        for _ in range(len(self.in_channels) - 1, 0, -1):
            self.lateral_convs.append(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act))
            self.fpn_blocks.append(CSPRepLayer(hidden_dim * 2, hidden_dim, round(3 * depth_mult),
                                               act=act, expansion=expansion))
        self.downsample_convs = nn.ModuleList()
        self.pan_blocks = nn.ModuleList()
        for _ in range(len(self.in_channels) - 1):
            self.downsample_convs.append(ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act))
            self.pan_blocks.append(CSPRepLayer(hidden_dim * 2, hidden_dim, round(3 * depth_mult),
                                               act=act, expansion=expansion))

    @staticmethod
    def build_2d_sincos_position_embedding(w, h, embed_dim=256, temperature=10000.0):
        grid_w = torch.arange(int(w), dtype=torch.float32)
        grid_h = torch.arange(int(h), dtype=torch.float32)
        grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
        assert embed_dim % 4 == 0
        pos_dim = embed_dim // 4
        omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
        out_w = grid_w.flatten()[..., None] @ omega[None]
        out_h = grid_h.flatten()[..., None] @ omega[None]
        return torch.concat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None, :, :]

    def forward(self, feats):
        assert len(feats) == len(self.in_channels)
        proj_feats = [self.input_proj[i](feat) for i, feat in enumerate(feats)]
        if self.num_encoder_layers > 0:
            for i, enc_ind in enumerate(self.use_encoder_idx):
                h, w = proj_feats[enc_ind].shape[2:]
                src_flatten = proj_feats[enc_ind].flatten(2).permute(0, 2, 1)
                pos_embed = self.build_2d_sincos_position_embedding(
                    w, h, self.hidden_dim, self.pe_temperature).to(src_flatten.device)
                memory = self.encoder[i](src_flatten, pos_embed=pos_embed)
                proj_feats[enc_ind] = memory.permute(0, 2, 1).reshape(-1, self.hidden_dim, h, w).contiguous()

        inner_outs = [proj_feats[-1]]
        for idx in range(len(self.in_channels) - 1, 0, -1):
            feat_high = inner_outs[0]
            feat_low = proj_feats[idx - 1]
            feat_high = self.lateral_convs[len(self.in_channels) - 1 - idx](feat_high)
            inner_outs[0] = feat_high
            upsample_feat = F.interpolate(feat_high, scale_factor=2.0, mode="nearest")
            inner_out = self.fpn_blocks[len(self.in_channels) - 1 - idx](
                torch.concat([upsample_feat, feat_low], dim=1))
            inner_outs.insert(0, inner_out)

        outs = [inner_outs[0]]
        for idx in range(len(self.in_channels) - 1):
            feat_low = outs[-1]
            feat_high = inner_outs[idx + 1]
            downsample_feat = self.downsample_convs[idx](feat_low)
            out = self.pan_blocks[idx](torch.concat([downsample_feat, feat_high], dim=1))
            outs.append(out)
        return outs


# ----------------------------------------------------------------------------------------
# lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/presnet.py
# ----------------------------------------------------------------------------------------


class PResNetConvNormLayer(ConvNormLayer):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/presnet.py: ConvNormLayer — same shape as
    the encoder's (act via get_activation: None -> Identity, 'relu' -> in-place ReLU)."""

    def __init__(self, ch_in, ch_out, kernel_size, stride, padding=None, bias=False, act=None):
        super().__init__(ch_in, ch_out, kernel_size, stride, padding, bias, None)
        self.act = get_activation(act)


class BasicBlock(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/presnet.py: BasicBlock — two
    ConvNormLayers, shortcut chosen in Python; variant 'd' strided shortcut is
    ``AvgPool2d(2, 2, 0, ceil_mode=True)`` then a 1x1 ConvNormLayer."""

    expansion = 1

    def __init__(self, ch_in, ch_out, stride, shortcut, act="relu", variant="b"):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            if variant == "d" and stride == 2:
                self.short = nn.Sequential(OrderedDict([
                    ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
                    ("conv", PResNetConvNormLayer(ch_in, ch_out, 1, 1)),
                ]))
            else:
                self.short = PResNetConvNormLayer(ch_in, ch_out, 1, stride)
        self.branch2a = PResNetConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = PResNetConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = nn.Identity() if act is None else get_activation(act)

    def forward(self, x):
        out = self.branch2a(x)
        out = self.branch2b(out)
        short = x if self.shortcut else self.short(x)
        out = out + short
        return self.act(out)


class BottleNeck(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/presnet.py: BottleNeck — 1x1, 3x3
    (strided, variant 'b'/'d'), 1x1 ConvNormLayers, expansion 4, same shortcut logic."""

    expansion = 4

    def __init__(self, ch_in, ch_out, stride, shortcut, act="relu", variant="b"):
        super().__init__()
        stride1, stride2 = (stride, 1) if variant == "a" else (1, stride)
        width = ch_out
        self.branch2a = PResNetConvNormLayer(ch_in, width, 1, stride1, act=act)
        self.branch2b = PResNetConvNormLayer(width, width, 3, stride2, act=act)
        self.branch2c = PResNetConvNormLayer(width, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            if variant == "d" and stride == 2:
                self.short = nn.Sequential(OrderedDict([
                    ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
                    ("conv", PResNetConvNormLayer(ch_in, ch_out * self.expansion, 1, 1)),
                ]))
            else:
                self.short = PResNetConvNormLayer(ch_in, ch_out * self.expansion, 1, stride)
        self.act = nn.Identity() if act is None else get_activation(act)

    def forward(self, x):
        out = self.branch2a(x)
        out = self.branch2b(out)
        out = self.branch2c(out)
        short = x if self.shortcut else self.short(x)
        out = out + short
        return self.act(out)


class Blocks(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/presnet.py: Blocks."""

    def __init__(self, block, ch_in, ch_out, count, stage_num, act="relu", variant="b"):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            self.blocks.append(block(ch_in, ch_out, stride=2 if i == 0 and stage_num != 2 else 1,
                                     shortcut=i != 0, variant=variant, act=act))
            if i == 0:
                ch_in = ch_out * block.expansion

    def forward(self, x):
        out = x
        for block in self.blocks:
            out = block(out)
        return out


class PResNet(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/presnet.py: PResNet — variant 'd' deep
    stem (three 3x3 ConvNormLayers), ``F.max_pool2d`` in ``forward``, four stages; R50vd and
    HGNetv2 configs set ``freeze_norm: True`` (every BN becomes FrozenBatchNorm2d). Widths
    divided by 8 here."""

    def __init__(self, depth=18, variant="d", num_stages=4, return_idx=(1, 2, 3), act="relu",
                 freeze_norm=False, width=8):
        super().__init__()
        block_nums = {18: [1, 1, 1, 1], 50: [1, 1, 1, 1]}[depth]
        ch_in = width
        conv_def = [[3, ch_in // 2, 3, 2, "conv1_1"], [ch_in // 2, ch_in // 2, 3, 1, "conv1_2"],
                    [ch_in // 2, ch_in, 3, 1, "conv1_3"]]
        self.conv1 = nn.Sequential(OrderedDict([
            (name, PResNetConvNormLayer(cin, cout, k, s, act=act)) for cin, cout, k, s, name in conv_def]))
        ch_out_list = [width, 2 * width, 3 * width, 4 * width] if depth < 50 else [
            width // 2, width, width * 3 // 2, 2 * width]
        block = BottleNeck if depth >= 50 else BasicBlock
        out_channels = [block.expansion * v for v in ch_out_list]
        self.res_layers = nn.ModuleList()
        for i in range(num_stages):
            self.res_layers.append(Blocks(block, ch_in, ch_out_list[i], block_nums[i], i + 2,
                                          act=act, variant=variant))
            ch_in = out_channels[i]
        self.return_idx = list(return_idx)
        self.out_channels = [out_channels[i] for i in self.return_idx]
        if freeze_norm:
            freeze_batch_norm2d(self)

    def forward(self, x):
        conv1 = self.conv1(x)
        x = F.max_pool2d(conv1, kernel_size=3, stride=2, padding=1)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs


# ----------------------------------------------------------------------------------------
# lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/csp_resnet.py
# ----------------------------------------------------------------------------------------


class ConvBNLayer(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/csp_resnet.py: ConvBNLayer — conv ->
    ``self.bn`` -> act (padding defaults to 0; the act may be a module shared net-wide)."""

    def __init__(self, ch_in, ch_out, filter_size=3, stride=1, groups=1, padding=0, act=None):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, filter_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return self.act(x)


class CSPRepVggBlock(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/csp_resnet.py: RepVggBlock — 3x3 and
    1x1 ConvBNLayers, the 1x1 branch scaled by a [1]-shaped Parameter ``alpha`` tested in
    Python (``if self.alpha:``: a tensor truth value, so symbolic_trace fails). Upstream
    ``convert_to_deploy`` reads ``branch.norm`` but ConvBNLayer names it ``bn``: the library's
    own conversion raises AttributeError, so none is given here."""

    def __init__(self, ch_in, ch_out, act="relu", alpha: bool = False):
        super().__init__()
        self.ch_in = ch_in
        self.ch_out = ch_out
        self.conv1 = ConvBNLayer(ch_in, ch_out, 3, stride=1, padding=1, act=None)
        self.conv2 = ConvBNLayer(ch_in, ch_out, 1, stride=1, padding=0, act=None)
        self.act = get_activation(act)
        self.alpha = nn.Parameter(torch.ones(1)) if alpha else None

    def forward(self, x):
        if hasattr(self, "conv"):
            y = self.conv(x)
        else:
            if self.alpha:
                y = self.conv1(x) + self.alpha * self.conv2(x)
            else:
                y = self.conv1(x) + self.conv2(x)
        return self.act(y)


class CSPBasicBlock(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/csp_resnet.py: BasicBlock — ConvBNLayer
    then RepVggBlock(alpha), Python-chosen residual."""

    def __init__(self, ch_in, ch_out, act="relu", shortcut=True, use_alpha=False):
        super().__init__()
        assert ch_in == ch_out
        self.conv1 = ConvBNLayer(ch_in, ch_out, 3, stride=1, padding=1, act=act)
        self.conv2 = CSPRepVggBlock(ch_out, ch_out, act=act, alpha=use_alpha)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.conv1(x)
        y = self.conv2(y)
        return x + y if self.shortcut else y


class EffectiveSELayer(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/csp_resnet.py: EffectiveSELayer —
    ``x * hardsigmoid(fc(x.mean((2, 3), keepdim=True)))``."""

    def __init__(self, channels, act="hardsigmoid"):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, padding=0)
        self.act = get_activation(act)

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc(x_se)
        x_se = self.act(x_se)
        return x * x_se


class CSPResStage(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/csp_resnet.py: CSPResStage — strided
    ConvBNLayer, two 1x1 ConvBNLayers, BasicBlocks on one, concat, ESE attention, 1x1."""

    def __init__(self, block_fn, ch_in, ch_out, n, stride, act="relu", attn="eca", use_alpha=False):
        super().__init__()
        ch_mid = (ch_in + ch_out) // 2
        self.conv_down = ConvBNLayer(ch_in, ch_mid, 3, stride=2, padding=1, act=act) if stride == 2 else None
        self.conv1 = ConvBNLayer(ch_mid, ch_mid // 2, 1, act=act)
        self.conv2 = ConvBNLayer(ch_mid, ch_mid // 2, 1, act=act)
        self.blocks = nn.Sequential(*[block_fn(ch_mid // 2, ch_mid // 2, act=act, shortcut=True,
                                               use_alpha=use_alpha) for _ in range(n)])
        self.attn = EffectiveSELayer(ch_mid, act="hardsigmoid") if attn else None
        self.conv3 = ConvBNLayer(ch_mid, ch_out, 1, act=act)

    def forward(self, x):
        if self.conv_down is not None:
            x = self.conv_down(x)
        y1 = self.conv1(x)
        y2 = self.blocks(self.conv2(x))
        y = torch.concat([y1, y2], dim=1)
        if self.attn is not None:
            y = self.attn(y)
        return self.conv3(y)


class CSPResNet(nn.Module):
    """lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/csp_resnet.py: CSPResNet — one SiLU
    instance (``act = get_activation(act)``) shared by every layer, large stem, CSPResStages."""

    def __init__(self, channels=(8, 16, 24, 32), layers=(1, 1, 1), act="silu", return_idx=(1, 2),
                 use_alpha=True):
        super().__init__()
        act = get_activation(act)
        c = list(channels)
        self.stem = nn.Sequential(OrderedDict([
            ("conv1", ConvBNLayer(3, c[0] // 2, 3, stride=2, padding=1, act=act)),
            ("conv2", ConvBNLayer(c[0] // 2, c[0] // 2, 3, stride=1, padding=1, act=act)),
            ("conv3", ConvBNLayer(c[0] // 2, c[0], 3, stride=1, padding=1, act=act)),
        ]))
        self.stages = nn.Sequential(OrderedDict([
            (str(i), CSPResStage(CSPBasicBlock, c[i], c[i + 1], layers[i], 2, act=act, use_alpha=use_alpha))
            for i in range(len(c) - 1)]))
        self.return_idx = list(return_idx)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs


# ----------------------------------------------------------------------------------------
# lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/rtdetr.py
# ----------------------------------------------------------------------------------------


class RTDETR(nn.Module):
    """lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/rtdetr.py: RTDETR — backbone -> encoder
    (the decoder is replaced by flattening and concatenating the features); ``deploy()``
    calls ``convert_to_deploy()`` on every module that has one."""

    def __init__(self, backbone, encoder=None):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder

    def forward(self, x):
        x = self.backbone(x)
        if self.encoder is not None:
            x = self.encoder(x)
        return torch.cat([f.flatten(1) for f in x], 1)

    def deploy(self):
        self.eval()
        for m in self.modules():
            if hasattr(m, "convert_to_deploy"):
                m.convert_to_deploy()
        return self


def rtdetr_deploy(model):
    """The RT-DETR deploy walk (``RTDETR.deploy``) on any model."""
    model.eval()
    for m in model.modules():
        if hasattr(m, "convert_to_deploy"):
            m.convert_to_deploy()
    return model


def build_hgnetv2_lab():
    return RTDETR(HGNetv2("T", use_lab=True))


def build_hgnetv2_frozen():
    return RTDETR(_load_frozen_statistics(HGNetv2("T", use_lab=False, freeze_norm=True)))


def build_csprep_layer():
    return nn.Sequential(
        ConvNormLayer(3, 16, 3, 2, act="silu"),
        CSPRepLayer(16, 16, num_blocks=3, act="silu"),
        CSPRepLayer(16, 24, num_blocks=2, expansion=0.5, act="silu"),
    )


def build_r18vd_hybrid_encoder():
    return RTDETR(PResNet(18, variant="d"), HybridEncoder(in_channels=(16, 24, 32)))


def build_r50vd_frozen():
    return RTDETR(_load_frozen_statistics(PResNet(50, variant="d", freeze_norm=True)))


def build_cspresnet_alpha():
    return RTDETR(CSPResNet())


_HGNET = "lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py"
_HYBRID = "lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/hybrid_encoder.py"
_COMMON = "lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/common.py"

IDIOMS: list[Idiom] = [
    Idiom(
        name="rtdetr.hgnetv2_lab",
        library="rtdetr",
        source=f"{_HGNET}: HGNetv2, StemBlock, HG_Stage, HG_Block, LightConvBNAct, ConvBNAct, "
               "LearnableAffineBlock",
        build=build_hgnetv2_lab,
        input_shape=(2, 3, 64, 64),
        reparameterize=None,
        notes="use_lab=True (PP-HGNetV2-B*/D-FINE style): scalar scale*x+bias after every ReLU; "
              "'same' ZeroPad2d inside a Sequential conv; no deploy conversion in RT-DETR.",
    ),
    Idiom(
        name="rtdetr.hgnetv2_frozen_bn",
        library="rtdetr",
        source=f"{_HGNET}: HGNetv2 (freeze_norm=True), HG_Block, ConvBNAct; "
               f"{_COMMON}: FrozenBatchNorm2d",
        build=build_hgnetv2_frozen,
        input_shape=(2, 3, 64, 64),
        reparameterize=None,
        notes="freeze_norm=True as in rtdetrv2_hgnetv2_{l,x,h}: every BN is a FrozenBatchNorm2d "
              "computing x*scale+bias from buffers (reshape, rsqrt, mul, sub, add), no batch_norm op.",
    ),
    Idiom(
        name="rtdetr.csprep_layer",
        library="rtdetr",
        source=f"{_HYBRID}: CSPRepLayer, RepVggBlock, ConvNormLayer; "
               "lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/rtdetr.py: RTDETR.deploy",
        build=build_csprep_layer,
        reparameterize=rtdetr_deploy,
        notes="RepVggBlock: conv3x3+BN + conv1x1+BN, in-place SiLU, hasattr('conv') branch; "
              "convert_to_deploy keeps conv1/conv2 registered (dead weights after deploy).",
    ),
    Idiom(
        name="rtdetr.r18vd_hybrid_encoder",
        library="rtdetr",
        source="lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/presnet.py: PResNet, BasicBlock; "
               "lyuwenyu/RT-DETR rtdetrv2_pytorch/src/zoo/rtdetr/hybrid_encoder.py: HybridEncoder, "
               "CSPRepLayer, RepVggBlock, TransformerEncoderLayer; "
               "lyuwenyu/RT-DETR rtdetr_pytorch/src/zoo/rtdetr/rtdetr.py: RTDETR.deploy",
        build=build_r18vd_hybrid_encoder,
        input_shape=(2, 3, 64, 64),
        reparameterize=rtdetr_deploy,
        traceable=False,
        exportable=True,
        notes="Whole RT-DETR-R18vd minus decoder: AIFI's int(w) position embedding stops "
              "symbolic_trace; input_proj is a bare Sequential(conv, norm); vd shortcut "
              "AvgPool2d(2, 2, ceil_mode) then 1x1 conv+BN.",
    ),
    Idiom(
        name="rtdetr.r50vd_frozen_bn",
        library="rtdetr",
        source="lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/presnet.py: PResNet "
               f"(freeze_norm=True), BottleNeck; {_COMMON}: FrozenBatchNorm2d",
        build=build_r50vd_frozen,
        reparameterize=None,
        notes="R50vd config (freeze_norm: True): conv -> FrozenBatchNorm2d (buffer mul/add) -> "
              "in-place ReLU everywhere, bottleneck residuals; no deploy conversion in RT-DETR.",
    ),
    Idiom(
        name="rtdetr.cspresnet_repvgg_alpha",
        library="rtdetr",
        source="lyuwenyu/RT-DETR rtdetrv2_pytorch/src/nn/backbone/csp_resnet.py: CSPResNet, "
               "CSPResStage, BasicBlock, RepVggBlock, ConvBNLayer, EffectiveSELayer",
        build=build_cspresnet_alpha,
        reparameterize=None,
        traceable=False,
        exportable=False,
        notes="conv1(x) + alpha * conv2(x) with a [1]-shaped alpha tested by 'if self.alpha:' "
              "(fails symbolic_trace and torch.export: data-dependent bool); one shared in-place "
              "SiLU; upstream convert_to_deploy is broken (reads branch.norm, layer has .bn).",
    ),
]
