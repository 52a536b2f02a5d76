"""timm (huggingface/pytorch-image-models), CNN side, re-written in our own words.

The shared layers first (``timm/layers``: padding helpers, ``create_conv2d``, ``Conv2dSame``,
``BatchNormAct2d``, ``FrozenBatchNormAct2d``, ``ConvNormAct``, ``BlurPool2d``, ``StdConv2d``,
``ScaledStdConv2d``, ``LayerScale2d``, ``DropPath``, SE modules), then the model files that
build on them (byobnet RepVGG / MobileOne, the EfficientNet / MobileNet blocks, GhostNetV3,
RepGhost, RegNet, CSPNet, ResNetV2, NF-RegNet) and their own deploy conversions
(``reparameterize()`` / ``switch_to_deploy()`` per block, ``timm/utils/model.py:
reparameterize_model`` and ``timm/models/repghost.py: repghost_model_convert`` as the walks).
Read from the public repository at commit aa4b5850c1543fa488abf260f18390eda46cf85d.
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import _assert

from . import Idiom

_TIMM = "huggingface/pytorch-image-models"


# --------------------------------------------------------------------------------------
# timm/layers helpers
# --------------------------------------------------------------------------------------

def make_divisible(value, divisor=8, min_value=None, round_limit=0.9):
    """Round a channel count to a multiple of ``divisor`` (timm/layers/helpers.py)."""
    floor = min_value or divisor
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def get_padding(kernel_size: int, stride: int = 1, dilation: int = 1, **_) -> int:
    """Symmetric PyTorch-style padding (timm/layers/padding.py: get_padding)."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def get_same_padding(size, kernel_size: int, stride: int, dilation: int):
    """Total TF 'SAME' padding along one axis for an input of ``size``
    (timm/layers/padding.py: get_same_padding). The builtin ``max`` on a traced size is
    what stops ``symbolic_trace``."""
    if isinstance(size, torch.Tensor):
        return torch.clamp(((size / stride).ceil() - 1) * stride + (kernel_size - 1) * dilation + 1 - size,
                           min=0)
    return max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)


def is_static_pad(kernel_size: int, stride: int = 1, dilation: int = 1, **_) -> bool:
    """'SAME' padding is symmetric and input-independent (timm/layers/padding.py)."""
    return stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0


def pad_same(x, kernel_size, stride, dilation=(1, 1), value: float = 0.0):
    """Pad ``x`` for a TF 'SAME' conv; the extra pixel goes right/bottom
    (timm/layers/padding.py: pad_same)."""
    in_h, in_w = x.size()[-2:]
    total_h = get_same_padding(in_h, kernel_size[0], stride[0], dilation[0])
    total_w = get_same_padding(in_w, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2), value=value)


def get_padding_value(padding, kernel_size, **kwargs):
    """Resolve '' / 'same' / 'valid' / int padding; 'same' that depends on the input size
    becomes ``0`` plus a dynamic flag (timm/layers/padding.py: get_padding_value)."""
    dynamic = False
    if isinstance(padding, str):
        padding = padding.lower()
        if padding == "same":
            if is_static_pad(kernel_size, **kwargs):
                padding = get_padding(kernel_size, **kwargs)
            else:
                padding = 0
                dynamic = True
        elif padding == "valid":
            padding = 0
        else:
            padding = get_padding(kernel_size, **kwargs)
    return padding, dynamic


def conv2d_same(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """Functional TF 'SAME' conv: pad from the input size, then an unpadded conv
    (timm/layers/conv2d_same.py: conv2d_same)."""
    x = pad_same(x, weight.shape[-2:], stride, dilation)
    return F.conv2d(x, weight, bias, stride, (0, 0), dilation, groups)


class Conv2dSame(nn.Conv2d):
    """huggingface/pytorch-image-models timm/layers/conv2d_same.py: Conv2dSame.

    Idiom: an ``nn.Conv2d`` subclass that stores ``padding=0`` and pads asymmetrically in
    ``forward`` from ``x.size()[-2:]``; untraceable by ``symbolic_trace`` (``max`` on a size),
    capturable by ``torch.export`` (sizes are static there).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        return conv2d_same(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def create_conv2d_pad(in_chs, out_chs, kernel_size, **kwargs):
    """``nn.Conv2d`` or ``Conv2dSame`` depending on the padding spec
    (timm/layers/conv2d_same.py: create_conv2d_pad)."""
    padding = kwargs.pop("padding", "")
    kwargs.setdefault("bias", False)
    padding, dynamic = get_padding_value(padding, kernel_size, **kwargs)
    if dynamic:
        return Conv2dSame(in_chs, out_chs, kernel_size, **kwargs)
    return nn.Conv2d(in_chs, out_chs, kernel_size, padding=padding, **kwargs)


def create_conv2d(in_channels, out_channels, kernel_size, **kwargs):
    """Conv factory used by EfficientNet/MobileNet/RegNet (timm/layers/create_conv2d.py);
    only the int-kernel path (no MixedConv2d / CondConv2d)."""
    depthwise = kwargs.pop("depthwise", False)
    groups = in_channels if depthwise else kwargs.pop("groups", 1)
    return create_conv2d_pad(in_channels, out_channels, kernel_size, groups=groups, **kwargs)


def _create_act(act_layer, act_kwargs=None, inplace=False, apply_act=True) -> nn.Module:
    """Activation or Identity (timm/layers/norm_act.py: _create_act)."""
    act_kwargs = dict(act_kwargs or {})
    act_kwargs.setdefault("inplace", inplace)
    if not apply_act or act_layer is None:
        return nn.Identity()
    return act_layer(**act_kwargs)


class BatchNormAct2d(nn.BatchNorm2d):
    """huggingface/pytorch-image-models timm/layers/norm_act.py: BatchNormAct2d.

    Idiom: a ``BatchNorm2d`` subclass whose ``forward`` re-implements BN by hand:
    ``_assert(x.ndim == 4, f'...{x.ndim}...')`` (the BN input gets a second user), Python
    branches on ``training`` / ``momentum`` / ``track_running_stats``, ``F.batch_norm`` on
    attribute statistics, then ``self.drop`` and ``self.act`` modules (Identity when unused).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, act_kwargs=act_kwargs, inplace=inplace, apply_act=apply_act)

    def forward(self, x):
        _assert(x.ndim == 4, f"BatchNormAct2d wants a 4D NCHW input, got {x.ndim}D")
        if self.momentum is None:
            average_factor = 0.0
        else:
            average_factor = self.momentum

        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    average_factor = self.momentum

        if self.training:
            use_batch_stats = True
        else:
            use_batch_stats = (self.running_mean is None) and (self.running_var is None)

        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            use_batch_stats,
            average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


def get_norm_act_layer(norm_layer, act_layer):
    """Map a norm layer (``nn.BatchNorm2d``, ``BatchNormAct2d`` or a partial of either) to a
    ``BatchNormAct2d`` factory with ``act_layer`` (timm/layers/create_norm_act.py, BN only)."""
    keywords = {}
    if isinstance(norm_layer, partial):
        keywords = dict(norm_layer.keywords)
        norm_layer = norm_layer.func
    assert norm_layer in (nn.BatchNorm2d, BatchNormAct2d), norm_layer
    keywords.setdefault("act_layer", act_layer)
    return partial(BatchNormAct2d, **keywords)


class FrozenBatchNorm2d(nn.Module):
    """pytorch/vision torchvision/ops/misc.py: FrozenBatchNorm2d (what timm's
    ``freeze_batch_norm_2d`` puts in place of a plain BatchNorm2d).

    Idiom: statistics and affine as buffers, ``x * scale + bias`` computed in ``forward``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class FrozenBatchNormAct2d(nn.Module):
    """huggingface/pytorch-image-models timm/layers/norm_act.py: FrozenBatchNormAct2d.

    Idiom: not a ``_BatchNorm`` at all; weight/bias/statistics are buffers, ``forward``
    reshapes them to ``(1, C, 1, 1)``, builds ``scale = w * (rv + eps).rsqrt()`` and
    ``bias = b - rm * scale`` and returns ``act(drop(x * scale + bias))``.
    """

    def __init__(self, num_features, eps=1e-5, apply_act=True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace=True, drop_layer=None):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, act_kwargs=act_kwargs, inplace=inplace, apply_act=apply_act)

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        x = x * scale + bias
        x = self.act(self.drop(x))
        return x


def freeze_batch_norm_2d(module):
    """Swap every BatchNormAct2d / BatchNorm2d for its frozen twin, recursively
    (timm/layers/norm_act.py: freeze_batch_norm_2d)."""
    result = module
    if isinstance(module, BatchNormAct2d):
        result = FrozenBatchNormAct2d(module.num_features)
        if module.affine:
            result.weight.data = module.weight.data.clone().detach()
            result.bias.data = module.bias.data.clone().detach()
        result.running_mean.data = module.running_mean.data
        result.running_var.data = module.running_var.data
        result.eps = module.eps
        result.drop = module.drop
        result.act = module.act
    elif isinstance(module, nn.BatchNorm2d):
        result = FrozenBatchNorm2d(module.num_features)
        if module.affine:
            result.weight.data = module.weight.data.clone().detach()
            result.bias.data = module.bias.data.clone().detach()
        result.running_mean.data = module.running_mean.data
        result.running_var.data = module.running_var.data
        result.eps = module.eps
    else:
        for name, child in module.named_children():
            replacement = freeze_batch_norm_2d(child)
            if replacement is not child:
                result.add_module(name, replacement)
    return result


class BlurPool2d(nn.Module):
    """huggingface/pytorch-image-models timm/layers/blur_pool.py: BlurPool2d.

    Idiom: ``F.pad`` (reflect by default, 'constant' for the ``blurpc`` variant) then a
    depthwise ``F.conv2d`` with a fixed binomial filter held in a non-persistent buffer.
    """

    def __init__(self, channels=None, filt_size=3, stride=2, pad_mode="reflect"):
        super().__init__()
        assert filt_size > 1
        self.channels = channels
        self.filt_size = filt_size
        self.stride = stride
        self.pad_mode = pad_mode
        self.padding = [get_padding(filt_size, stride, dilation=1)] * 4
        taps = torch.tensor([math.comb(filt_size - 1, k) for k in range(filt_size)], dtype=torch.float32)
        taps = taps / 2 ** (filt_size - 1)
        kernel = (taps[:, None] * taps[None, :])[None, None, :, :]
        if channels is not None:
            kernel = kernel.repeat(channels, 1, 1, 1)
        self.register_buffer("filt", kernel, persistent=False)

    def forward(self, x):
        x = F.pad(x, self.padding, mode=self.pad_mode)
        if self.channels is None:
            channels = x.shape[1]
            weight = self.filt.expand(channels, 1, self.filt_size, self.filt_size)
        else:
            channels = self.channels
            weight = self.filt
        return F.conv2d(x, weight, stride=self.stride, groups=channels)


def create_aa(aa_layer, channels=None, stride=2, enable=True, noop=nn.Identity):
    """Anti-aliasing layer or a no-op (timm/layers/blur_pool.py: create_aa)."""
    if not aa_layer or not enable:
        return noop() if noop is not None else None
    return aa_layer(channels=channels, stride=stride)


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Per-sample stochastic depth (timm/layers/drop.py: drop_path)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """huggingface/pytorch-image-models timm/layers/drop.py: DropPath.

    Idiom: a Python early return in eval (nothing in the traced graph).
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class DropBlock2d(nn.Module):
    """huggingface/pytorch-image-models timm/layers/drop.py: DropBlock2d (simplified training
    path). Idiom: sits as ``BatchNormAct2d.drop`` between the BN and its activation and
    returns its input in eval."""

    def __init__(self, drop_prob: float = 0.1, block_size: int = 3):
        super().__init__()
        self.drop_prob = drop_prob
        self.block_size = block_size

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        seed_rate = self.drop_prob / self.block_size ** 2
        seeds = (torch.rand_like(x[:, :1]) < seed_rate).to(x.dtype)
        dropped = F.max_pool2d(seeds, self.block_size, stride=1, padding=self.block_size // 2)
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))


class LayerScale2d(nn.Module):
    """huggingface/pytorch-image-models timm/layers/layer_scale.py: LayerScale2d.

    Idiom: a raw ``(C,)`` Parameter viewed to ``(1, C, 1, 1)`` in ``forward``; with
    ``inplace`` it is ``x.mul_(gamma)`` on the producer's output.
    """

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False):
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.empty(dim))
        nn.init.constant_(self.gamma, init_values)

    def forward(self, x):
        gamma = self.gamma.view(1, -1, 1, 1)
        return x.mul_(gamma) if self.inplace else x * gamma


class SEModule(nn.Module):
    """huggingface/pytorch-image-models timm/layers/squeeze_excite.py: SEModule.

    Idiom: ``x.mean((2, 3), keepdim=True)`` -> 1x1 convs -> gate, then ``x * gate``: a
    data-dependent per-channel multiply that must never be taken for a constant scale.
    """

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=8, act_layer=nn.ReLU,
                 gate_layer=nn.Sigmoid):
        super().__init__()
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = gate_layer()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


class SqueezeExcite(nn.Module):
    """huggingface/pytorch-image-models timm/models/_efficientnet_blocks.py: SqueezeExcite.

    Idiom: the EfficientNet/MobileNet SE (``conv_reduce`` / ``conv_expand``), gate multiply.
    """

    def __init__(self, in_chs, rd_ratio=0.25, rd_channels=None, act_layer=nn.ReLU, gate_layer=nn.Sigmoid,
                 rd_round_fn=None):
        super().__init__()
        if rd_channels is None:
            rd_round_fn = rd_round_fn or round
            rd_channels = rd_round_fn(in_chs * rd_ratio)
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class ConvNormAct(nn.Module):
    """huggingface/pytorch-image-models timm/layers/conv_bn_act.py: ConvNormAct.

    Idiom: ``create_conv2d`` -> ``self.bn`` (a ``BatchNormAct2d``, or an empty
    ``nn.Sequential`` without norm) -> optional anti-alias layer looked up with
    ``getattr(self, 'aa', None)``; with ``aa_layer`` the conv runs at stride 1 and the blur
    pool does the striding.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding="", dilation=1, groups=1,
                 bias=False, apply_norm=True, apply_act=True, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU,
                 aa_layer=None, drop_layer=None, conv_kwargs=None, norm_kwargs=None, act_kwargs=None):
        super().__init__()
        conv_kwargs = dict(conv_kwargs or {})
        norm_kwargs = dict(norm_kwargs or {})
        use_aa = aa_layer is not None and stride > 1
        self.conv = create_conv2d(in_channels, out_channels, kernel_size, stride=1 if use_aa else stride,
                                  padding=padding, dilation=dilation, groups=groups, bias=bias, **conv_kwargs)
        if apply_norm:
            norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
            if drop_layer:
                norm_kwargs["drop_layer"] = drop_layer
            self.bn = norm_act_layer(out_channels, apply_act=apply_act, act_kwargs=act_kwargs, **norm_kwargs)
        else:
            self.bn = nn.Sequential()
            if drop_layer:
                self.bn.add_module("drop", drop_layer())
        self.aa = create_aa(aa_layer, out_channels, stride=stride, enable=use_aa, noop=None)

    @property
    def in_channels(self):
        return self.conv.in_channels

    @property
    def out_channels(self):
        return self.conv.out_channels

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        aa = getattr(self, "aa", None)
        if aa is not None:
            x = self.aa(x)
        return x


class StdConv2d(nn.Conv2d):
    """huggingface/pytorch-image-models timm/layers/std_conv.py: StdConv2d.

    Idiom: an ``nn.Conv2d`` subclass whose weight is standardised on every call with
    ``F.batch_norm(weight.reshape(1, out, -1), None, None, training=True, momentum=0.)`` — a
    batch norm on *weights* — then ``F.conv2d``. Folding a following BN into ``self.weight``
    is wrong (the standardisation undoes it); only the standardised weight may be baked.
    """

    def __init__(self, in_channel, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, eps=1e-6):
        if padding is None:
            padding = get_padding(kernel_size, stride, dilation)
        super().__init__(in_channel, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """huggingface/pytorch-image-models timm/layers/std_conv.py: ScaledStdConv2d.

    Idiom: weight standardisation through ``F.batch_norm(..., weight=(gain * scale).view(-1),
    training=True)`` with a learnable ``(out, 1, 1, 1)`` gain and a Python-float fan-in scale.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=True, gamma=1.0, eps=1e-6, gain_init=1.0):
        if padding is None:
            padding = get_padding(kernel_size, stride, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ClassifierHead(nn.Module):
    """huggingface/pytorch-image-models timm/layers/classifier.py: ClassifierHead
    (avg pool + flatten, dropout, Linear)."""

    def __init__(self, in_features, num_classes, drop_rate=0.0):
        super().__init__()
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
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


def reparameterize_model(model: nn.Module, inplace=False) -> nn.Module:
    """huggingface/pytorch-image-models timm/utils/model.py: reparameterize_model — walk the
    children, call ``fuse()`` (replacing the child), else ``reparameterize()``, else
    ``switch_to_deploy()``, and recurse. The root itself is never converted."""
    if not inplace:
        model = deepcopy(model)

    def _walk(module):
        for name, child in module.named_children():
            if hasattr(child, "fuse"):
                setattr(module, name, child.fuse())
            elif hasattr(child, "reparameterize"):
                child.reparameterize()
            elif hasattr(child, "switch_to_deploy"):
                child.switch_to_deploy()
            _walk(child)

    _walk(model)
    return model


def _block_method(method: str):
    """Deploy conversion of a block-level entry: the block's own method on the root."""

    def convert(model):
        getattr(model, method)()
        return model

    return convert


def _randomize_bn_(module: nn.Module) -> nn.Module:
    """Random statistics/affines for BatchNorms before they are frozen into buffers (the
    harness only randomises ``_BatchNorm`` modules and constant parameters)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                sign = torch.randint(0, 2, m.weight.shape).to(m.weight.dtype) * 2 - 1
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5) * sign)
                m.bias.normal_()
    return module


# --------------------------------------------------------------------------------------
# timm/models/byobnet.py: RepVggBlock, MobileOneBlock, ByobNet
# --------------------------------------------------------------------------------------

def num_groups(group_size, channels):
    """Group count from a group size; ``1`` means depthwise (timm byobnet.py)."""
    if not group_size:
        return 1
    assert channels % group_size == 0
    return channels // group_size


@dataclass
class LayerFn:
    """huggingface/pytorch-image-models timm/models/byobnet.py: LayerFn (the layer factories a
    ByobNet hands its blocks; ``norm_act`` makes the BN identity branches)."""

    conv_norm_act: Callable = ConvNormAct
    norm_act: Callable = BatchNormAct2d
    act: Callable = nn.ReLU
    attn: Optional[Callable] = None


class RepVggBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/byobnet.py: RepVggBlock.

    Idiom: ``ConvNormAct`` kxk and 1x1 branches (no act) plus a ``BatchNormAct2d`` identity
    branch; ``x = conv_1x1(x) + conv_kxk(x)``, ``drop_path``, then the in-place
    ``x += identity``, ``attn`` and ``act``. ``reparameterize()`` builds ``reparam_conv``,
    detaches and deletes the branches.
    """

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, dilation=(1, 1), bottle_ratio=1.0,
                 group_size=None, downsample="", layers: LayerFn = None, drop_block=None,
                 drop_path_rate=0.0, inference_mode=False):
        super().__init__()
        self.groups = groups = num_groups(group_size, in_chs)
        layers = layers or LayerFn()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, dilation=dilation,
                                          groups=groups, bias=True)
        else:
            self.reparam_conv = None
            use_ident = in_chs == out_chs and stride == 1 and dilation[0] == dilation[1]
            self.identity = layers.norm_act(out_chs, apply_act=False) if use_ident else None
            self.conv_kxk = layers.conv_norm_act(in_chs, out_chs, kernel_size, stride=stride,
                                                 dilation=dilation[0], groups=groups, drop_layer=drop_block,
                                                 apply_act=False)
            self.conv_1x1 = layers.conv_norm_act(in_chs, out_chs, 1, stride=stride, groups=groups,
                                                 apply_act=False)
            self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 and use_ident else nn.Identity()
        self.attn = nn.Identity() if layers.attn is None else layers.attn(out_chs)
        self.act = layers.act(inplace=True)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        x = self.attn(x)
        return self.act(x)

    def reparameterize(self):
        if self.reparam_conv is not None:
            return
        kernel, bias = self._get_kernel_bias()
        ref = self.conv_kxk.conv
        self.reparam_conv = nn.Conv2d(ref.in_channels, ref.out_channels, ref.kernel_size, stride=ref.stride,
                                      padding=ref.padding, dilation=ref.dilation, groups=ref.groups, bias=True)
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        for name, param in self.named_parameters():
            if "reparam_conv" in name:
                continue
            param.detach_()
        self.__delattr__("conv_kxk")
        self.__delattr__("conv_1x1")
        self.__delattr__("identity")
        self.__delattr__("drop_path")

    def _get_kernel_bias(self):
        kernel_1x1 = 0
        bias_1x1 = 0
        if self.conv_1x1 is not None:
            kernel_1x1, bias_1x1 = self._fuse_bn_tensor(self.conv_1x1)
            pad = self.conv_kxk.conv.kernel_size[0] // 2
            kernel_1x1 = F.pad(kernel_1x1, [pad, pad, pad, pad])
        kernel_identity = 0
        bias_identity = 0
        if self.identity is not None:
            kernel_identity, bias_identity = self._fuse_bn_tensor(self.identity)
        kernel_conv, bias_conv = self._fuse_bn_tensor(self.conv_kxk)
        return kernel_conv + kernel_1x1 + kernel_identity, bias_conv + bias_1x1 + bias_identity

    def _fuse_bn_tensor(self, branch):
        if isinstance(branch, ConvNormAct):
            kernel = branch.conv.weight
            bn = branch.bn
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                in_chs = self.conv_kxk.conv.in_channels
                input_dim = in_chs // self.groups
                kernel_size = self.conv_kxk.conv.kernel_size
                eye = torch.zeros_like(self.conv_kxk.conv.weight)
                for i in range(in_chs):
                    eye[i, i % input_dim, kernel_size[0] // 2, kernel_size[1] // 2] = 1
                self.id_tensor = eye
            kernel = self.id_tensor
            bn = branch
        std = (bn.running_var + bn.eps).sqrt()
        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        return kernel * t, bn.bias - bn.running_mean * bn.weight / std


class MobileOneBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/byobnet.py: MobileOneBlock.

    Idiom: ``identity_out = 0`` / ``scale_out = 0`` literal seeds, ``out = scale_out`` then
    ``out += ck(x)`` over an ``nn.ModuleList`` of kxk ``ConvNormAct`` branches (in place on the
    scale branch's BN output, or on the int ``0`` for 1x1 blocks), ``drop_path``,
    ``out += identity_out``. ``reparameterize()`` sums the branch kernels with ``+=`` seeds.
    """

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, dilation=(1, 1), bottle_ratio=1.0,
                 group_size=None, downsample="", inference_mode=False, num_conv_branches=1,
                 layers: LayerFn = None, drop_block=None, drop_path_rate=0.0):
        super().__init__()
        self.num_conv_branches = num_conv_branches
        self.groups = groups = num_groups(group_size, in_chs)
        layers = layers or LayerFn()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, dilation=dilation,
                                          groups=groups, bias=True)
        else:
            self.reparam_conv = None
            use_ident = in_chs == out_chs and stride == 1 and dilation[0] == dilation[1]
            self.identity = layers.norm_act(out_chs, apply_act=False) if use_ident else None
            self.conv_kxk = nn.ModuleList([
                layers.conv_norm_act(in_chs, out_chs, kernel_size=kernel_size, stride=stride, groups=groups,
                                     apply_act=False)
                for _ in range(self.num_conv_branches)
            ])
            self.conv_scale = None
            if kernel_size > 1:
                self.conv_scale = layers.conv_norm_act(in_chs, out_chs, kernel_size=1, stride=stride,
                                                       groups=groups, apply_act=False)
            self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 and use_ident else nn.Identity()
        self.attn = nn.Identity() if layers.attn is None else layers.attn(out_chs)
        self.act = layers.act(inplace=True)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out
        for branch in self.conv_kxk:
            out += branch(x)
        out = self.drop_path(out)
        out += identity_out
        return self.act(self.attn(out))

    def reparameterize(self):
        if self.reparam_conv is not None:
            return
        kernel, bias = self._get_kernel_bias()
        ref = self.conv_kxk[0].conv
        self.reparam_conv = nn.Conv2d(ref.in_channels, ref.out_channels, ref.kernel_size, stride=ref.stride,
                                      padding=ref.padding, dilation=ref.dilation, groups=ref.groups, bias=True)
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        for name, param in self.named_parameters():
            if "reparam_conv" in name:
                continue
            param.detach_()
        self.__delattr__("conv_kxk")
        self.__delattr__("conv_scale")
        self.__delattr__("identity")
        self.__delattr__("drop_path")

    def _get_kernel_bias(self):
        kernel_scale = 0
        bias_scale = 0
        if self.conv_scale is not None:
            kernel_scale, bias_scale = self._fuse_bn_tensor(self.conv_scale)
            pad = self.conv_kxk[0].conv.kernel_size[0] // 2
            kernel_scale = F.pad(kernel_scale, [pad, pad, pad, pad])
        kernel_identity = 0
        bias_identity = 0
        if self.identity is not None:
            kernel_identity, bias_identity = self._fuse_bn_tensor(self.identity)
        kernel_conv = 0
        bias_conv = 0
        for ix in range(self.num_conv_branches):
            k, b = self._fuse_bn_tensor(self.conv_kxk[ix])
            kernel_conv += k
            bias_conv += b
        return kernel_conv + kernel_scale + kernel_identity, bias_conv + bias_scale + bias_identity

    def _fuse_bn_tensor(self, branch):
        if isinstance(branch, ConvNormAct):
            kernel = branch.conv.weight
            bn = branch.bn
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                in_chs = self.conv_kxk[0].conv.in_channels
                input_dim = in_chs // self.groups
                kernel_size = self.conv_kxk[0].conv.kernel_size
                eye = torch.zeros_like(self.conv_kxk[0].conv.weight)
                for i in range(in_chs):
                    eye[i, i % input_dim, kernel_size[0] // 2, kernel_size[1] // 2] = 1
                self.id_tensor = eye
            kernel = self.id_tensor
            bn = branch
        std = (bn.running_var + bn.eps).sqrt()
        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        return kernel * t, bn.bias - bn.running_mean * bn.weight / std


@dataclass
class ByoBlockCfg:
    """huggingface/pytorch-image-models timm/models/byobnet.py: ByoBlockCfg (one stage entry of a
    ByobNet config; ``gs`` may be a callable of (channels, block index))."""

    type: str
    d: int
    c: int
    s: int = 2
    gs: object = None
    block_kwargs: dict = field(default_factory=dict)


_BYOB_BLOCKS = {"rep": RepVggBlock, "one": MobileOneBlock}


class ByobNet(nn.Module):
    """huggingface/pytorch-image-models timm/models/byobnet.py: ByobNet (rep / one stems and
    blocks only).

    Idiom: a RepVgg/MobileOne stem block, ``nn.Sequential`` stages of blocks, ``final_conv``
    (Identity when ``num_features == 0``), ``ClassifierHead``; ``forward_features`` branches on
    ``grad_checkpointing and not torch.jit.is_scripting()``.
    """

    def __init__(self, stages_cfg, stem_type="rep", stem_chs=16, num_classes=10, in_chans=3, num_features=0,
                 drop_path_rate=0.0, drop_block_rate=0.0, attn_layer=None, act_layer=nn.ReLU):
        super().__init__()
        self.grad_checkpointing = False
        layers = LayerFn(
            conv_norm_act=partial(ConvNormAct, act_layer=act_layer),
            norm_act=partial(BatchNormAct2d, act_layer=act_layer),
            act=act_layer,
            attn=attn_layer,
        )
        stem_layers = LayerFn(conv_norm_act=layers.conv_norm_act, norm_act=layers.norm_act, act=act_layer)
        if stem_type == "rep":
            self.stem = RepVggBlock(in_chans, stem_chs, stride=2, layers=stem_layers)
        else:
            self.stem = MobileOneBlock(in_chans, stem_chs, kernel_size=3, stride=2, layers=stem_layers)

        stages = []
        prev_chs = stem_chs
        num_stages = len(stages_cfg)
        for stage_idx, stage_cfgs in enumerate(stages_cfg):
            expanded = [bc for cfg in stage_cfgs for bc in [cfg] * cfg.d]
            stride = expanded[0].s
            dpr = drop_path_rate * stage_idx / max(num_stages - 1, 1)
            drop_block = (partial(DropBlock2d, drop_prob=drop_block_rate)
                          if drop_block_rate and stage_idx == num_stages - 1 else None)
            blocks = []
            for block_idx, bc in enumerate(expanded):
                group_size = bc.gs(bc.c, block_idx) if callable(bc.gs) else bc.gs
                blocks.append(_BYOB_BLOCKS[bc.type](
                    in_chs=prev_chs, out_chs=bc.c, stride=stride if block_idx == 0 else 1,
                    dilation=(1, 1), group_size=group_size, layers=layers, drop_block=drop_block,
                    drop_path_rate=dpr, **bc.block_kwargs,
                ))
                prev_chs = bc.c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        if num_features:
            self.num_features = num_features
            self.final_conv = layers.conv_norm_act(prev_chs, num_features, 1)
        else:
            self.num_features = prev_chs
            self.final_conv = nn.Identity()
        self.head = ClassifierHead(self.num_features, num_classes)

    def forward_features(self, x):
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        else:
            x = self.stages(x)
        x = self.final_conv(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _repvgg_cfg(depths=(2, 2, 1), channels=(16, 24, 32), groups=0):
    """RepVGG stage config, shrunk (timm byobnet.py: _rep_vgg_bcfg); ``groups`` makes every
    second block of a stage grouped, as in the ``g4`` variants."""
    group_size = 0
    if groups > 0:
        group_size = lambda chs, idx: chs // groups if (idx + 1) % 2 == 0 else 0  # noqa: E731
    return tuple([ByoBlockCfg(type="rep", d=d, c=c, gs=group_size)] for d, c in zip(depths, channels))


def _mobileone_cfg(depths=(1, 2, 1), channels=(16, 24, 32), num_conv_branches=4):
    """MobileOne stage config, shrunk (timm byobnet.py: _mobileone_bcfg): each repeat is a
    depthwise kxk block followed by a pointwise (kernel 1) block."""
    prev_c = channels[0]
    stages = []
    for depth, chs in zip(depths, channels):
        stage = []
        for _ in range(depth):
            bk = dict(num_conv_branches=num_conv_branches)
            stage.append(ByoBlockCfg(type="one", d=1, c=prev_c, gs=1, block_kwargs=bk))
            stage.append(ByoBlockCfg(type="one", d=1, c=chs, gs=0, block_kwargs=dict(kernel_size=1, **bk)))
            prev_c = chs
        stages.append(stage)
    return tuple(stages)


def build_repvgg_a0():
    return ByobNet(_repvgg_cfg(), stem_type="rep", stem_chs=16, drop_path_rate=0.1, drop_block_rate=0.05)


def build_repvgg_b1g4():
    return ByobNet(_repvgg_cfg(depths=(2, 3, 1), groups=4), stem_type="rep", stem_chs=16, num_features=48)


def build_repvgg_se_block():
    layers = LayerFn(attn=partial(SEModule, rd_ratio=1.0 / 16))
    return RepVggBlock(16, 16, layers=layers, drop_path_rate=0.1)


def build_mobileone_s0():
    return ByobNet(_mobileone_cfg(), stem_type="one", stem_chs=16)


def build_mobileone_pw_block():
    return MobileOneBlock(16, 16, kernel_size=1, group_size=0, num_conv_branches=4)


def build_mobileone_dw_block():
    return MobileOneBlock(16, 16, kernel_size=3, group_size=1, num_conv_branches=4)


# --------------------------------------------------------------------------------------
# timm/models/_efficientnet_blocks.py, efficientnet.py, mobilenetv3.py
# --------------------------------------------------------------------------------------

class ConvBnAct(nn.Module):
    """huggingface/pytorch-image-models timm/models/_efficientnet_blocks.py: ConvBnAct.

    Idiom: ``conv`` -> ``bn1`` (BatchNormAct2d) -> ``aa``, optional ``drop_path(x) + shortcut``;
    the branch type of GhostNetV3 / RepGhost (their ``_fuse_bn_tensor`` reads ``branch.bn1``).
    """

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, dilation=1, group_size=0, pad_type="",
                 skip=False, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, aa_layer=None, drop_path_rate=0.0):
        super().__init__()
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        groups = num_groups(group_size, in_chs)
        self.has_skip = skip and stride == 1 and in_chs == out_chs
        use_aa = aa_layer is not None and stride > 1
        self.conv = create_conv2d(in_chs, out_chs, kernel_size, stride=1 if use_aa else stride,
                                  dilation=dilation, groups=groups, padding=pad_type)
        self.bn1 = norm_act_layer(out_chs, inplace=True)
        self.aa = create_aa(aa_layer, channels=out_chs, stride=stride, enable=use_aa)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv(x)
        x = self.bn1(x)
        x = self.aa(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class DepthwiseSeparableConv(nn.Module):
    """huggingface/pytorch-image-models timm/models/_efficientnet_blocks.py: DepthwiseSeparableConv.

    Idiom: dw conv -> bn1 (act) -> aa -> SE -> pw conv -> bn2 (no act unless ``pw_act``),
    ``drop_path(x) + shortcut``.
    """

    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, dilation=1, group_size=1, pad_type="",
                 noskip=False, pw_kernel_size=1, pw_act=False, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d,
                 aa_layer=None, se_layer=None, drop_path_rate=0.0):
        super().__init__()
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        self.has_skip = (stride == 1 and in_chs == out_chs) and not noskip
        self.has_pw_act = pw_act
        use_aa = aa_layer is not None and stride > 1
        groups = num_groups(group_size, in_chs)
        self.conv_dw = create_conv2d(in_chs, in_chs, dw_kernel_size, stride=1 if use_aa else stride,
                                     dilation=dilation, padding=pad_type, groups=groups)
        self.bn1 = norm_act_layer(in_chs, inplace=True)
        self.aa = create_aa(aa_layer, channels=out_chs, stride=stride, enable=use_aa)
        self.se = se_layer(in_chs, act_layer=act_layer) if se_layer else nn.Identity()
        self.conv_pw = create_conv2d(in_chs, out_chs, pw_kernel_size, padding=pad_type)
        self.bn2 = norm_act_layer(out_chs, inplace=True, apply_act=self.has_pw_act)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class InvertedResidual(nn.Module):
    """huggingface/pytorch-image-models timm/models/_efficientnet_blocks.py: InvertedResidual.

    Idiom: pw expand (conv_pw/bn1) -> dw (conv_dw/bn2) -> aa -> SqueezeExcite -> pw linear
    (conv_pwl/bn3, no act) -> ``drop_path(x) + shortcut``; BNs are ``BatchNormAct2d``.
    """

    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, dilation=1, group_size=1, pad_type="",
                 noskip=False, exp_ratio=1.0, exp_kernel_size=1, pw_kernel_size=1, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, aa_layer=None, se_layer=None, drop_path_rate=0.0):
        super().__init__()
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        self.has_skip = (in_chs == out_chs and stride == 1) and not noskip
        use_aa = aa_layer is not None and stride > 1
        mid_chs = make_divisible(in_chs * exp_ratio)
        groups = num_groups(group_size, mid_chs)
        self.conv_pw = create_conv2d(in_chs, mid_chs, exp_kernel_size, padding=pad_type)
        self.bn1 = norm_act_layer(mid_chs, inplace=True)
        self.conv_dw = create_conv2d(mid_chs, mid_chs, dw_kernel_size, stride=1 if use_aa else stride,
                                     dilation=dilation, groups=groups, padding=pad_type)
        self.bn2 = norm_act_layer(mid_chs, inplace=True)
        self.aa = create_aa(aa_layer, channels=mid_chs, stride=stride, enable=use_aa)
        self.se = se_layer(mid_chs, act_layer=act_layer) if se_layer else nn.Identity()
        self.conv_pwl = create_conv2d(mid_chs, out_chs, pw_kernel_size, padding=pad_type)
        self.bn3 = norm_act_layer(out_chs, apply_act=False)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class UniversalInvertedResidual(nn.Module):
    """huggingface/pytorch-image-models timm/models/_efficientnet_blocks.py:
    UniversalInvertedResidual (MobileNetV4 UIB).

    Idiom: optional ``dw_start`` ConvNormAct without act (and with the anti-alias layer),
    ``pw_exp``, optional ``dw_mid``, SE, ``pw_proj`` (no act), optional ``dw_end``, then
    ``LayerScale2d`` and ``drop_path(x) + shortcut``. ``layer_scale_inplace`` selects
    ``LayerScale2d(inplace=True)`` (a ``LayerScale2d`` option; timm's block leaves it False).
    """

    def __init__(self, in_chs, out_chs, dw_kernel_size_start=0, dw_kernel_size_mid=3, dw_kernel_size_end=0,
                 stride=1, dilation=1, group_size=1, pad_type="", noskip=False, exp_ratio=1.0,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, aa_layer=None, se_layer=None,
                 drop_path_rate=0.0, layer_scale_init_value=1e-5, layer_scale_inplace=False):
        super().__init__()
        self.has_skip = (in_chs == out_chs and stride == 1) and not noskip
        if dw_kernel_size_start:
            start_stride = stride if not dw_kernel_size_mid else 1
            self.dw_start = ConvNormAct(in_chs, in_chs, dw_kernel_size_start, stride=start_stride,
                                        dilation=dilation, groups=num_groups(group_size, in_chs),
                                        padding=pad_type, apply_act=False, act_layer=act_layer,
                                        norm_layer=norm_layer, aa_layer=aa_layer)
        else:
            self.dw_start = nn.Identity()
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.pw_exp = ConvNormAct(in_chs, mid_chs, 1, padding=pad_type, act_layer=act_layer,
                                  norm_layer=norm_layer)
        if dw_kernel_size_mid:
            self.dw_mid = ConvNormAct(mid_chs, mid_chs, dw_kernel_size_mid, stride=stride, dilation=dilation,
                                      groups=num_groups(group_size, mid_chs), padding=pad_type,
                                      act_layer=act_layer, norm_layer=norm_layer, aa_layer=aa_layer)
        else:
            self.dw_mid = nn.Identity()
        self.se = se_layer(mid_chs, act_layer=act_layer) if se_layer else nn.Identity()
        self.pw_proj = ConvNormAct(mid_chs, out_chs, 1, padding=pad_type, apply_act=False, act_layer=act_layer,
                                   norm_layer=norm_layer)
        if dw_kernel_size_end:
            end_stride = stride if not dw_kernel_size_start and not dw_kernel_size_mid else 1
            self.dw_end = ConvNormAct(out_chs, out_chs, dw_kernel_size_end, stride=end_stride,
                                      dilation=dilation, groups=num_groups(group_size, out_chs),
                                      padding=pad_type, apply_act=False, act_layer=act_layer,
                                      norm_layer=norm_layer)
        else:
            self.dw_end = nn.Identity()
        if layer_scale_init_value is not None:
            self.layer_scale = LayerScale2d(out_chs, layer_scale_init_value, inplace=layer_scale_inplace)
        else:
            self.layer_scale = nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.dw_start(x)
        x = self.pw_exp(x)
        x = self.dw_mid(x)
        x = self.se(x)
        x = self.pw_proj(x)
        x = self.dw_end(x)
        x = self.layer_scale(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class EfficientNet(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientnet.py: EfficientNet.

    Idiom: ``conv_stem`` (``create_conv2d`` with the model's ``pad_type``) -> ``bn1``
    (BatchNormAct2d) -> stages of DS/IR blocks -> ``conv_head`` -> ``bn2`` -> pool ->
    ``F.dropout`` under a Python ``drop_rate > 0`` branch -> classifier. With
    ``pad_type='same'`` (the ``tf_`` variants, BN eps 1e-3) every strided conv is a
    ``Conv2dSame``.
    """

    def __init__(self, block_fns, stem_size=16, num_features=64, num_classes=10, in_chans=3, pad_type="",
                 act_layer=nn.SiLU, norm_layer=nn.BatchNorm2d, drop_rate=0.2):
        super().__init__()
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        self.drop_rate = drop_rate
        self.conv_stem = create_conv2d(in_chans, stem_size, 3, stride=2, padding=pad_type)
        self.bn1 = norm_act_layer(stem_size, inplace=True)
        common = dict(pad_type=pad_type, act_layer=act_layer, norm_layer=norm_layer)
        stages = []
        chs = stem_size
        for stage_fns in block_fns:
            blocks = []
            for fn in stage_fns:
                block = fn(chs, **common)
                chs = block.bn3.num_features if hasattr(block, "bn3") else block.bn2.num_features
                blocks.append(block)
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = create_conv2d(chs, num_features, 1, padding=pad_type)
        self.bn2 = norm_act_layer(num_features, inplace=True)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward_features(self, x):
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.blocks(x)
        x = self.conv_head(x)
        x = self.bn2(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _se(exp_ratio):
    """EfficientNet SE sized from the block input (``se_from_exp=False``)."""
    return partial(SqueezeExcite, rd_ratio=0.25 / exp_ratio)


def _efficientnet_blocks(drop_path_rate=0.1):
    """A shrunk EfficientNet-B0 block list: ds, ir x2 (k3), ir x2 (k5, SE)."""
    rates = [drop_path_rate * i / 4 for i in range(5)]
    return [
        [partial(lambda c, **kw: DepthwiseSeparableConv(c, 16, 3, se_layer=_se(1.0), drop_path_rate=rates[0],
                                                        **kw))],
        [partial(lambda c, **kw: InvertedResidual(c, 24, 3, stride=2, exp_ratio=3.0, drop_path_rate=rates[1],
                                                  **kw)),
         partial(lambda c, **kw: InvertedResidual(c, 24, 3, exp_ratio=3.0, drop_path_rate=rates[2], **kw))],
        [partial(lambda c, **kw: InvertedResidual(c, 32, 5, stride=2, exp_ratio=3.0, se_layer=_se(3.0),
                                                  drop_path_rate=rates[3], **kw)),
         partial(lambda c, **kw: InvertedResidual(c, 32, 5, exp_ratio=3.0, se_layer=_se(3.0),
                                                  drop_path_rate=rates[4], **kw))],
    ]


def build_efficientnet():
    return EfficientNet(_efficientnet_blocks())


def build_tf_efficientnet():
    return EfficientNet(_efficientnet_blocks(), pad_type="same", norm_layer=partial(BatchNormAct2d, eps=1e-3))


class MobileNetV3(nn.Module):
    """huggingface/pytorch-image-models timm/models/mobilenetv3.py: MobileNetV3 (the
    MobileNetV4 configuration: UIR blocks, ``head_norm=True``).

    Idiom: ``conv_stem`` -> ``bn1`` -> blocks -> pool -> ``conv_head`` on the pooled 1x1 map ->
    ``norm_head`` (BatchNormAct2d) -> ``act2`` (Identity) -> ``flatten`` -> classifier.
    """

    def __init__(self, block_fns, stem_size=16, num_features=64, num_classes=10, in_chans=3,
                 act_layer=nn.ReLU, drop_rate=0.0):
        super().__init__()
        norm_act_layer = get_norm_act_layer(nn.BatchNorm2d, act_layer)
        self.drop_rate = drop_rate
        self.conv_stem = create_conv2d(in_chans, stem_size, 3, stride=2)
        self.bn1 = norm_act_layer(stem_size, inplace=True)
        chs = stem_size
        stages = []
        for stage_fns in block_fns:
            blocks = []
            for fn in stage_fns:
                block = fn(chs)
                chs = block.pw_proj.out_channels
                blocks.append(block)
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = create_conv2d(chs, num_features, 1, bias=False)
        self.norm_head = norm_act_layer(num_features)
        self.act2 = nn.Identity()
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(num_features, num_classes)

    def forward_features(self, x):
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.blocks(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        x = self.conv_head(x)
        x = self.norm_head(x)
        x = self.act2(x)
        x = self.flatten(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def build_mobilenetv4_uir():
    uir = UniversalInvertedResidual
    return MobileNetV3([
        [lambda c: uir(c, 24, dw_kernel_size_start=3, dw_kernel_size_mid=3, stride=2, exp_ratio=2.0)],
        [lambda c: uir(c, 24, dw_kernel_size_start=3, dw_kernel_size_mid=0, exp_ratio=2.0,
                       layer_scale_inplace=True, drop_path_rate=0.05),
         lambda c: uir(c, 24, dw_kernel_size_start=0, dw_kernel_size_mid=0, exp_ratio=2.0,
                       drop_path_rate=0.05),
         lambda c: uir(c, 32, dw_kernel_size_start=3, dw_kernel_size_mid=5, stride=2, exp_ratio=4.0,
                       layer_scale_inplace=True)],
    ])


class _AntiAliasedPair(nn.Sequential):
    """huggingface/pytorch-image-models timm/layers/conv_bn_act.py: ConvNormAct with
    ``aa_layer`` and ``apply_act=False`` (the MobileNetV4 UIR ``dw_start`` shape).

    Idiom (negative): conv (stride 1) -> BN -> BlurPool2d (zero-padded ``blurpc`` and
    reflect-padded ``blur``) doing the stride; no activation between the two convs, yet the
    pair cannot become one conv (the blur pads the BN output, not the conv input).
    """

    def __init__(self):
        super().__init__(
            ConvNormAct(16, 16, 3, stride=2, groups=16, apply_act=False,
                        aa_layer=partial(BlurPool2d, pad_mode="constant")),
            ConvNormAct(16, 24, 3, stride=2, apply_act=False, aa_layer=BlurPool2d),
        )


# --------------------------------------------------------------------------------------
# timm/models/ghostnet.py (GhostNetV3) and timm/models/repghost.py
# --------------------------------------------------------------------------------------

_GHOST_SE = partial(SqueezeExcite, gate_layer=nn.Hardsigmoid, rd_round_fn=partial(make_divisible, divisor=4))


def _fuse_conv_bn_act_branch(owner, branch):
    """Kernel/bias of a ``ConvBnAct`` branch or a bare BN identity branch
    (the ``_fuse_bn_tensor`` of timm ghostnet.py GhostModuleV3 / GhostBottleneckV3)."""
    if isinstance(branch, ConvBnAct):
        kernel = branch.conv.weight
        bn = branch.bn1
    else:
        assert isinstance(branch, nn.BatchNorm2d)
        if not hasattr(owner, "id_tensor"):
            input_dim = owner.in_channels // owner.groups
            eye = torch.zeros((owner.in_channels, input_dim, owner.kernel_size, owner.kernel_size),
                              dtype=branch.weight.dtype, device=branch.weight.device)
            for i in range(owner.in_channels):
                eye[i, i % input_dim, owner.kernel_size // 2, owner.kernel_size // 2] = 1
            owner.id_tensor = eye
        kernel = owner.id_tensor
        bn = branch
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


def _conv_like(ref: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(ref.in_channels, ref.out_channels, ref.kernel_size, stride=ref.stride, padding=ref.padding,
                     dilation=ref.dilation, groups=ref.groups, bias=True)


class GhostModuleV3(nn.Module):
    """huggingface/pytorch-image-models timm/models/ghostnet.py: GhostModuleV3.

    Idiom: primary part ``x1 = 0; x1 += conv(x)`` over three ``ConvBnAct`` kxk branches then an
    in-place ReLU; cheap part ``x2 = cheap_rpr_scale(x1) + cheap_rpr_skip(x1)`` (1x1 ConvBnAct
    + bare BN skip) then ``x2 += conv(x1)`` over three depthwise branches; ``torch.cat``. In
    ``'shortcut'`` mode a DFC gate: ``F.avg_pool2d`` -> conv/BN chain (1x5, 5x1 depthwise) ->
    sigmoid -> ``F.interpolate(size=(out.shape[-2], out.shape[-1]))`` -> multiply.
    ``switch_to_deploy()`` folds each part into one conv wrapped in ``nn.Sequential`` with its
    activation, and sets ``infer_mode``.
    """

    def __init__(self, in_chs, out_chs, kernel_size=1, ratio=2, dw_size=3, stride=1, act_layer=nn.ReLU,
                 mode="original"):
        super().__init__()
        self.gate_fn = nn.Sigmoid()
        self.out_chs = out_chs
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        self.mode = mode
        self.num_conv_branches = 3
        self.infer_mode = False
        if not self.infer_mode:
            self.primary_conv = nn.Identity()
            self.cheap_operation = nn.Identity()
        self.primary_rpr_skip = None
        self.primary_rpr_scale = None
        self.primary_rpr_conv = nn.ModuleList([
            ConvBnAct(in_chs, init_chs, kernel_size, stride, pad_type=kernel_size // 2, act_layer=None)
            for _ in range(self.num_conv_branches)
        ])
        self.primary_activation = act_layer(inplace=True)
        self.cheap_rpr_skip = nn.BatchNorm2d(init_chs)
        self.cheap_rpr_conv = nn.ModuleList([
            ConvBnAct(init_chs, new_chs, dw_size, 1, pad_type=dw_size // 2, group_size=1, act_layer=None)
            for _ in range(self.num_conv_branches)
        ])
        self.cheap_rpr_scale = ConvBnAct(init_chs, new_chs, 1, 1, pad_type=0, group_size=1, act_layer=None)
        self.cheap_activation = act_layer(inplace=True)
        self.short_conv = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.Conv2d(out_chs, out_chs, kernel_size=(1, 5), stride=1, padding=(0, 2), groups=out_chs, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.Conv2d(out_chs, out_chs, kernel_size=(5, 1), stride=1, padding=(2, 0), groups=out_chs, bias=False),
            nn.BatchNorm2d(out_chs),
        ) if self.mode in ["shortcut"] else nn.Identity()
        self.in_channels = init_chs
        self.groups = init_chs
        self.kernel_size = dw_size

    def forward(self, x):
        if self.infer_mode:
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
        else:
            x1 = 0
            for branch in self.primary_rpr_conv:
                x1 += branch(x)
            x1 = self.primary_activation(x1)
            x2 = self.cheap_rpr_scale(x1) + self.cheap_rpr_skip(x1)
            for branch in self.cheap_rpr_conv:
                x2 += branch(x1)
            x2 = self.cheap_activation(x2)
        out = torch.cat([x1, x2], dim=1)
        if self.mode not in ["shortcut"]:
            return out
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        return out[:, :self.out_chs, :, :] * F.interpolate(
            self.gate_fn(res), size=(out.shape[-2], out.shape[-1]), mode="nearest")

    def _get_kernel_bias_primary(self):
        kernel_scale, bias_scale = 0, 0
        if self.primary_rpr_scale is not None:
            kernel_scale, bias_scale = _fuse_conv_bn_act_branch(self, self.primary_rpr_scale)
            pad = self.kernel_size // 2
            kernel_scale = F.pad(kernel_scale, [pad, pad, pad, pad])
        kernel_identity, bias_identity = 0, 0
        if self.primary_rpr_skip is not None:
            kernel_identity, bias_identity = _fuse_conv_bn_act_branch(self, self.primary_rpr_skip)
        kernel_conv, bias_conv = 0, 0
        for ix in range(self.num_conv_branches):
            k, b = _fuse_conv_bn_act_branch(self, self.primary_rpr_conv[ix])
            kernel_conv += k
            bias_conv += b
        return kernel_conv + kernel_scale + kernel_identity, bias_conv + bias_scale + bias_identity

    def _get_kernel_bias_cheap(self):
        kernel_scale, bias_scale = 0, 0
        if self.cheap_rpr_scale is not None:
            kernel_scale, bias_scale = _fuse_conv_bn_act_branch(self, self.cheap_rpr_scale)
            pad = self.kernel_size // 2
            kernel_scale = F.pad(kernel_scale, [pad, pad, pad, pad])
        kernel_identity, bias_identity = 0, 0
        if self.cheap_rpr_skip is not None:
            kernel_identity, bias_identity = _fuse_conv_bn_act_branch(self, self.cheap_rpr_skip)
        kernel_conv, bias_conv = 0, 0
        for ix in range(self.num_conv_branches):
            k, b = _fuse_conv_bn_act_branch(self, self.cheap_rpr_conv[ix])
            kernel_conv += k
            bias_conv += b
        return kernel_conv + kernel_scale + kernel_identity, bias_conv + bias_scale + bias_identity

    def switch_to_deploy(self):
        if self.infer_mode:
            return
        kernel, bias = self._get_kernel_bias_primary()
        self.primary_conv = _conv_like(self.primary_rpr_conv[0].conv)
        self.primary_conv.weight.data = kernel
        self.primary_conv.bias.data = bias
        self.primary_conv = nn.Sequential(
            self.primary_conv,
            self.primary_activation if self.primary_activation is not None else nn.Sequential(),
        )
        kernel, bias = self._get_kernel_bias_cheap()
        self.cheap_operation = _conv_like(self.cheap_rpr_conv[0].conv)
        self.cheap_operation.weight.data = kernel
        self.cheap_operation.bias.data = bias
        self.cheap_operation = nn.Sequential(
            self.cheap_operation,
            self.cheap_activation if self.cheap_activation is not None else nn.Sequential(),
        )
        for param in self.parameters():
            param.detach_()
        for name in ("primary_rpr_conv", "primary_rpr_scale", "primary_rpr_skip",
                     "cheap_rpr_conv", "cheap_rpr_scale", "cheap_rpr_skip"):
            if hasattr(self, name):
                self.__delattr__(name)
        self.infer_mode = True

    def reparameterize(self):
        self.switch_to_deploy()


class GhostBottleneckV3(nn.Module):
    """huggingface/pytorch-image-models timm/models/ghostnet.py: GhostBottleneckV3.

    Idiom: ghost1 -> (stride > 1) ``x1 = dw_rpr_scale(x)`` then ``x1 += conv(x)`` over three
    strided depthwise ``ConvBnAct`` branches -> SE -> ghost2 -> in-place
    ``x += self.shortcut(shortcut)`` (a conv/BN chain when the shape changes).
    ``switch_to_deploy()`` only acts when ``stride > 1``.
    """

    def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, act_layer=nn.ReLU, se_ratio=0.0,
                 mode="original"):
        super().__init__()
        has_se = se_ratio is not None and se_ratio > 0.0
        self.stride = stride
        self.num_conv_branches = 3
        self.infer_mode = False
        if not self.infer_mode:
            self.conv_dw = nn.Identity()
            self.bn_dw = nn.Identity()
        self.ghost1 = GhostModuleV3(in_chs, mid_chs, act_layer=act_layer, mode=mode)
        if self.stride > 1:
            self.dw_rpr_conv = nn.ModuleList([
                ConvBnAct(mid_chs, mid_chs, dw_kernel_size, stride, pad_type=(dw_kernel_size - 1) // 2,
                          group_size=1, act_layer=None)
                for _ in range(self.num_conv_branches)
            ])
            self.dw_rpr_scale = ConvBnAct(mid_chs, mid_chs, 1, 2, pad_type=0, group_size=1, act_layer=None)
            self.kernel_size = dw_kernel_size
            self.in_channels = mid_chs
        else:
            self.dw_rpr_conv = nn.ModuleList()
            self.dw_rpr_scale = nn.Identity()
        self.dw_rpr_skip = None
        self.se = _GHOST_SE(mid_chs, rd_ratio=se_ratio) if has_se else nn.Identity()
        self.ghost2 = GhostModuleV3(mid_chs, out_chs, act_layer=nn.Identity, mode="original")
        if in_chs == out_chs and self.stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, padding=(dw_kernel_size - 1) // 2,
                          groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x):
        shortcut = x
        x = self.ghost1(x)
        if self.stride > 1:
            if self.infer_mode:
                x = self.conv_dw(x)
                x = self.bn_dw(x)
            else:
                x1 = self.dw_rpr_scale(x)
                for branch in self.dw_rpr_conv:
                    x1 += branch(x)
                x = x1
        x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x

    def switch_to_deploy(self):
        if self.infer_mode or self.stride == 1:
            return
        kernel_scale, bias_scale = 0, 0
        if self.dw_rpr_scale is not None:
            kernel_scale, bias_scale = _fuse_conv_bn_act_branch(self, self.dw_rpr_scale)
            pad = self.kernel_size // 2
            kernel_scale = F.pad(kernel_scale, [pad, pad, pad, pad])
        kernel_identity, bias_identity = 0, 0
        if self.dw_rpr_skip is not None:
            kernel_identity, bias_identity = _fuse_conv_bn_act_branch(self, self.dw_rpr_skip)
        kernel_conv, bias_conv = 0, 0
        for ix in range(self.num_conv_branches):
            k, b = _fuse_conv_bn_act_branch(self, self.dw_rpr_conv[ix])
            kernel_conv += k
            bias_conv += b
        self.conv_dw = _conv_like(self.dw_rpr_conv[0].conv)
        self.conv_dw.weight.data = kernel_conv + kernel_scale + kernel_identity
        self.conv_dw.bias.data = bias_conv + bias_scale + bias_identity
        self.bn_dw = nn.Identity()
        for param in self.parameters():
            param.detach_()
        for name in ("dw_rpr_conv", "dw_rpr_scale", "dw_rpr_skip"):
            if hasattr(self, name):
                self.__delattr__(name)
        self.infer_mode = True

    def reparameterize(self):
        self.switch_to_deploy()


class GhostNet(nn.Module):
    """huggingface/pytorch-image-models timm/models/ghostnet.py: GhostNet (version 'v3').

    Idiom: plain ``conv_stem``/``bn1``/``act1``, GhostBottleneckV3 stages (``mode='shortcut'``
    from the third layer on), a final ``ConvBnAct``, pool -> ``conv_head`` (bias) -> ReLU ->
    flatten -> ``F.dropout`` -> classifier. Deploy: ``reparameterize_model`` (timm's own
    ``convert_to_deploy`` discards that walk's copy; see the report).
    """

    def __init__(self, cfgs, num_classes=10, width=0.5, in_chans=3, drop_rate=0.2, head_chs=64):
        super().__init__()
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        prev_chs = stem_chs
        stages = nn.ModuleList([])
        layer_idx = 0
        exp_size = 16
        for cfg in cfgs:
            layers = []
            for k, exp_size, c, se_ratio, s in cfg:
                out_chs = make_divisible(c * width, 4)
                mid_chs = make_divisible(exp_size * width, 4)
                kwargs = {"mode": "shortcut"} if layer_idx > 1 else {}
                layers.append(GhostBottleneckV3(prev_chs, mid_chs, out_chs, k, s, se_ratio=se_ratio, **kwargs))
                prev_chs = out_chs
                layer_idx += 1
            stages.append(nn.Sequential(*layers))
        out_chs = make_divisible(exp_size * width, 4)
        stages.append(nn.Sequential(ConvBnAct(prev_chs, out_chs, 1)))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(out_chs, head_chs, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(head_chs, num_classes)

    def forward_features(self, x):
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.act1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = torch.utils.checkpoint.checkpoint_sequential(self.blocks, len(self.blocks), x,
                                                             use_reentrant=False)
        else:
            x = self.blocks(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        x = self.conv_head(x)
        x = self.act2(x)
        x = self.flatten(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


_GHOST_CFGS = [
    # k, exp, c, se, s
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
]


def build_ghostnetv3():
    return GhostNet(_GHOST_CFGS)


def build_ghostnetv3_module():
    return GhostModuleV3(16, 16, mode="original")


class RepGhostModule(nn.Module):
    """huggingface/pytorch-image-models timm/models/repghost.py: RepGhostModule.

    Idiom: ``x1 = primary_conv(x)`` (conv/BN/ReLU Sequential), ``x2 = cheap_operation(x1)``
    (depthwise conv/BN), then ``for conv, bn in zip(fusion_conv, fusion_bn): x2 = x2 +
    bn(conv(x1))`` where ``conv`` is ``nn.Identity`` — a BN on the dw conv's *input* summed
    with its output — then ``relu``. ``switch_to_deploy()`` replaces ``cheap_operation`` by one
    conv and ``fusion_conv``/``fusion_bn`` by plain empty lists.
    """

    def __init__(self, in_chs, out_chs, kernel_size=1, dw_size=3, stride=1, relu=True, reparam=True):
        super().__init__()
        self.out_chs = out_chs
        init_chs = out_chs
        new_chs = out_chs
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, init_chs, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_chs),
            nn.ReLU(inplace=True) if relu else nn.Identity(),
        )
        fusion_conv, fusion_bn = [], []
        if reparam:
            fusion_conv.append(nn.Identity())
            fusion_bn.append(nn.BatchNorm2d(init_chs))
        self.fusion_conv = nn.Sequential(*fusion_conv)
        self.fusion_bn = nn.Sequential(*fusion_bn)
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, new_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=False),
            nn.BatchNorm2d(new_chs),
        )
        self.relu = nn.ReLU(inplace=False) if relu else nn.Identity()

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            x2 = x2 + bn(conv(x1))
        return self.relu(x2)

    def get_equivalent_kernel_bias(self):
        kernel3x3, bias3x3 = self._fuse_bn_tensor(self.cheap_operation[0], self.cheap_operation[1])
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            kernel, bias = self._fuse_bn_tensor(conv, bn, kernel3x3.shape[0], kernel3x3.device)
            kernel3x3 += self._pad_1x1_to_3x3_tensor(kernel)
            bias3x3 += bias
        return kernel3x3, bias3x3

    @staticmethod
    def _pad_1x1_to_3x3_tensor(kernel1x1):
        if kernel1x1 is None:
            return 0
        return F.pad(kernel1x1, [1, 1, 1, 1])

    @staticmethod
    def _fuse_bn_tensor(conv, bn, in_channels=None, device=None):
        in_channels = in_channels if in_channels else bn.running_mean.shape[0]
        device = device if device else bn.weight.device
        if isinstance(conv, nn.Conv2d):
            kernel = conv.weight
            assert conv.bias is None
        else:
            assert isinstance(conv, nn.Identity)
            kernel = torch.ones(in_channels, 1, 1, 1, device=device)
        if isinstance(bn, nn.BatchNorm2d):
            std = (bn.running_var + bn.eps).sqrt()
            t = (bn.weight / std).reshape(-1, 1, 1, 1)
            return kernel * t, bn.bias - bn.running_mean * bn.weight / std
        assert isinstance(bn, nn.Identity)
        return kernel, torch.zeros(in_channels).to(kernel.device)

    def switch_to_deploy(self):
        if len(self.fusion_conv) == 0 and len(self.fusion_bn) == 0:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        ref = self.cheap_operation[0]
        self.cheap_operation = nn.Conv2d(ref.in_channels, ref.out_channels, ref.kernel_size, padding=ref.padding,
                                         dilation=ref.dilation, groups=ref.groups, bias=True,
                                         device=kernel.device, dtype=kernel.dtype)
        self.cheap_operation.weight.data = kernel
        self.cheap_operation.bias.data = bias
        self.__delattr__("fusion_conv")
        self.__delattr__("fusion_bn")
        self.fusion_conv = []
        self.fusion_bn = []

    def reparameterize(self):
        self.switch_to_deploy()


class RepGhostBottleneck(nn.Module):
    """huggingface/pytorch-image-models timm/models/repghost.py: RepGhostBottleneck.

    Idiom: ghost1 -> optional strided dw conv/BN -> optional SE (``if self.se is not None``)
    -> ghost2 (no ReLU) -> ``x += self.shortcut(shortcut)`` (an empty ``nn.Sequential`` as
    identity, else a dw/pw conv-BN chain).
    """

    def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, se_ratio=0.0, reparam=True):
        super().__init__()
        has_se = se_ratio is not None and se_ratio > 0.0
        self.stride = stride
        self.ghost1 = RepGhostModule(in_chs, mid_chs, relu=True, reparam=reparam)
        if self.stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride,
                                     padding=(dw_kernel_size - 1) // 2, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = _GHOST_SE(mid_chs, rd_ratio=se_ratio) if has_se else None
        self.ghost2 = RepGhostModule(mid_chs, out_chs, relu=False, reparam=reparam)
        if in_chs == out_chs and self.stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, padding=(dw_kernel_size - 1) // 2,
                          groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x):
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.conv_dw(x)
            x = self.bn_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x


class RepGhostNet(nn.Module):
    """huggingface/pytorch-image-models timm/models/repghost.py: RepGhostNet.

    Idiom: GhostNet layout with RepGhostBottleneck stages; deploy through
    ``repghost_model_convert`` (``switch_to_deploy`` on every module of ``model.modules()``).
    """

    def __init__(self, cfgs, num_classes=10, width=0.5, in_chans=3, drop_rate=0.2, reparam=True, head_chs=64):
        super().__init__()
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        prev_chs = stem_chs
        stages = nn.ModuleList([])
        exp_size = 16
        for cfg in cfgs:
            layers = []
            for k, exp_size, c, se_ratio, s in cfg:
                out_chs = make_divisible(c * width, 4)
                mid_chs = make_divisible(exp_size * width, 4)
                layers.append(RepGhostBottleneck(prev_chs, mid_chs, out_chs, k, s, se_ratio=se_ratio,
                                                 reparam=reparam))
                prev_chs = out_chs
            stages.append(nn.Sequential(*layers))
        out_chs = make_divisible(exp_size * width * 2, 4)
        stages.append(nn.Sequential(ConvBnAct(prev_chs, out_chs, 1)))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(out_chs, head_chs, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(head_chs, num_classes)

    def forward_features(self, x):
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.act1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = torch.utils.checkpoint.checkpoint_sequential(self.blocks, len(self.blocks), x,
                                                             use_reentrant=False)
        else:
            x = self.blocks(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        x = self.conv_head(x)
        x = self.act2(x)
        x = self.flatten(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def repghost_model_convert(model: nn.Module, save_path=None, do_copy=True):
    """huggingface/pytorch-image-models timm/models/repghost.py: repghost_model_convert."""
    if do_copy:
        model = deepcopy(model)
    for module in model.modules():
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()
    if save_path is not None:
        torch.save(model.state_dict(), save_path)
    return model


_REPGHOST_CFGS = [
    [[3, 8, 16, 0, 1]],
    [[3, 24, 24, 0, 2]],
    [[3, 36, 24, 0, 1]],
    [[5, 36, 40, 0.25, 2]],
]


def build_repghostnet():
    return RepGhostNet(_REPGHOST_CFGS)


def build_repghost_module():
    return RepGhostModule(16, 16, relu=True)


# --------------------------------------------------------------------------------------
# timm/models/regnet.py, cspnet.py, resnetv2.py, nfnet.py: plain ConvNormAct stacks
# --------------------------------------------------------------------------------------

def _downsample_conv(in_chs, out_chs, kernel_size=1, stride=1, dilation=1, norm_layer=None, preact=False):
    """timm regnet.py: downsample_conv."""
    norm_layer = norm_layer or nn.BatchNorm2d
    kernel_size = 1 if stride == 1 and dilation == 1 else kernel_size
    dilation = dilation if kernel_size > 1 else 1
    if preact:
        return create_conv2d(in_chs, out_chs, kernel_size, stride=stride, dilation=dilation)
    return ConvNormAct(in_chs, out_chs, kernel_size, stride=stride, dilation=dilation, norm_layer=norm_layer,
                       apply_act=False)


def _downsample_avg(in_chs, out_chs, kernel_size=1, stride=1, dilation=1, norm_layer=None, preact=False):
    """timm regnet.py: downsample_avg (``AvgPool2d(2, ceil_mode=True, count_include_pad=False)``)."""
    norm_layer = norm_layer or nn.BatchNorm2d
    pool = nn.Identity()
    if stride > 1 or dilation > 1:
        pool = nn.AvgPool2d(2, stride if dilation == 1 else 1, ceil_mode=True, count_include_pad=False)
    if preact:
        conv = create_conv2d(in_chs, out_chs, 1, stride=1)
    else:
        conv = ConvNormAct(in_chs, out_chs, 1, stride=1, norm_layer=norm_layer, apply_act=False)
    return nn.Sequential(*[pool, conv])


def _create_shortcut(downsample_type, in_chs, out_chs, kernel_size, stride, dilation=(1, 1), norm_layer=None,
                     preact=False):
    """timm regnet.py: create_shortcut (None = no shortcut, Identity = identity shortcut)."""
    if in_chs != out_chs or stride != 1 or dilation[0] != dilation[1]:
        kwargs = dict(stride=stride, dilation=dilation[0], norm_layer=norm_layer, preact=preact)
        if not downsample_type:
            return None
        if downsample_type == "avg":
            return _downsample_avg(in_chs, out_chs, **kwargs)
        return _downsample_conv(in_chs, out_chs, kernel_size=kernel_size, **kwargs)
    return nn.Identity()


class RegNetBottleneck(nn.Module):
    """huggingface/pytorch-image-models timm/models/regnet.py: Bottleneck.

    Idiom: ConvNormAct 1x1 -> grouped 3x3 -> SEModule -> 1x1 (no act), ``if self.downsample
    is not None: x = self.drop_path(x) + self.downsample(shortcut)``, then ``act3``.
    """

    def __init__(self, in_chs, out_chs, stride=1, dilation=(1, 1), bottle_ratio=1.0, group_size=8,
                 se_ratio=0.25, downsample="conv1x1", linear_out=False, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, drop_block=None, drop_path_rate=0.0):
        super().__init__()
        bottleneck_chs = int(round(out_chs * bottle_ratio))
        groups = bottleneck_chs // group_size
        cargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        self.conv1 = ConvNormAct(in_chs, bottleneck_chs, kernel_size=1, **cargs)
        self.conv2 = ConvNormAct(bottleneck_chs, bottleneck_chs, kernel_size=3, stride=stride,
                                 dilation=dilation[0], groups=groups, drop_layer=drop_block, **cargs)
        if se_ratio:
            self.se = SEModule(bottleneck_chs, rd_channels=int(round(in_chs * se_ratio)), act_layer=act_layer)
        else:
            self.se = nn.Identity()
        self.conv3 = ConvNormAct(bottleneck_chs, out_chs, kernel_size=1, apply_act=False, **cargs)
        self.act3 = nn.Identity() if linear_out else act_layer()
        self.downsample = _create_shortcut(downsample, in_chs, out_chs, kernel_size=1, stride=stride,
                                           dilation=dilation, norm_layer=norm_layer)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.conv3(x)
        if self.downsample is not None:
            x = self.drop_path(x) + self.downsample(shortcut)
        x = self.act3(x)
        return x


class RegNetPreBottleneck(nn.Module):
    """huggingface/pytorch-image-models timm/models/regnet.py: PreBottleneck.

    Idiom (negative): pre-activation — ``norm1`` (BatchNormAct2d with ReLU) runs on the
    residual stream *before* conv1 and is also the shortcut; ``norm3`` follows the SE gate.
    Those BNs have no conv to fold into.
    """

    def __init__(self, in_chs, out_chs, stride=1, dilation=(1, 1), bottle_ratio=1.0, group_size=8,
                 se_ratio=0.25, downsample="conv1x1", linear_out=False, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, drop_block=None, drop_path_rate=0.0):
        super().__init__()
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        bottleneck_chs = int(round(out_chs * bottle_ratio))
        groups = bottleneck_chs // group_size
        self.norm1 = norm_act_layer(in_chs)
        self.conv1 = create_conv2d(in_chs, bottleneck_chs, kernel_size=1)
        self.norm2 = norm_act_layer(bottleneck_chs)
        self.conv2 = create_conv2d(bottleneck_chs, bottleneck_chs, kernel_size=3, stride=stride,
                                   dilation=dilation[0], groups=groups)
        if se_ratio:
            self.se = SEModule(bottleneck_chs, rd_channels=int(round(in_chs * se_ratio)), act_layer=act_layer)
        else:
            self.se = nn.Identity()
        self.norm3 = norm_act_layer(bottleneck_chs)
        self.conv3 = create_conv2d(bottleneck_chs, out_chs, kernel_size=1)
        self.downsample = _create_shortcut(downsample, in_chs, out_chs, kernel_size=1, stride=stride,
                                           dilation=dilation, preact=True)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):
        x = self.norm1(x)
        shortcut = x
        x = self.conv1(x)
        x = self.norm2(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.norm3(x)
        x = self.conv3(x)
        if self.downsample is not None:
            x = self.drop_path(x) + self.downsample(shortcut)
        return x


class RegStage(nn.Module):
    """huggingface/pytorch-image-models timm/models/regnet.py: RegStage (blocks named
    ``b1``, ``b2`` ..., ``forward`` loops over ``self.children()``)."""

    def __init__(self, depth, in_chs, out_chs, stride, dilation=1, drop_path_rates=None,
                 block_fn=RegNetBottleneck, **block_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        first_dilation = 1 if dilation in (1, 2) else 2
        for i in range(depth):
            self.add_module(f"b{i + 1}", block_fn(
                in_chs if i == 0 else out_chs, out_chs, stride=stride if i == 0 else 1,
                dilation=(first_dilation, dilation),
                drop_path_rate=drop_path_rates[i] if drop_path_rates is not None else 0.0,
                **block_kwargs,
            ))
            first_dilation = dilation

    def forward(self, x):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.children():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            for block in self.children():
                x = block(x)
        return x


class RegNet(nn.Module):
    """huggingface/pytorch-image-models timm/models/regnet.py: RegNet.

    Idiom: ConvNormAct stem (a bare conv when ``preact``), ``s1``.. ``RegStage`` children added
    with ``add_module``, ``final_conv`` (an activation for pre-act nets), ClassifierHead.
    """

    def __init__(self, widths=(24, 32), depths=(1, 2), stem_width=16, group_size=8, se_ratio=0.25,
                 downsample="conv1x1", preact=False, num_classes=10, in_chans=3, drop_path_rate=0.05,
                 act_layer=nn.ReLU):
        super().__init__()
        na_args = dict(act_layer=act_layer, norm_layer=nn.BatchNorm2d)
        if preact:
            self.stem = create_conv2d(in_chans, stem_width, 3, stride=2)
        else:
            self.stem = ConvNormAct(in_chans, stem_width, 3, stride=2, **na_args)
        prev = stem_width
        block_fn = RegNetPreBottleneck if preact else RegNetBottleneck
        for i, (width, depth) in enumerate(zip(widths, depths)):
            rates = [drop_path_rate * (i + j / depth) / len(widths) for j in range(depth)]
            self.add_module(f"s{i + 1}", RegStage(depth, prev, width, stride=2, drop_path_rates=rates,
                                                  block_fn=block_fn, group_size=group_size, se_ratio=se_ratio,
                                                  downsample=downsample, **na_args))
            prev = width
        self.final_conv = act_layer() if preact else nn.Identity()
        self.num_features = prev
        self.head = ClassifierHead(prev, num_classes)
        self.num_stages = len(widths)

    def forward_features(self, x):
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"s{i + 1}")(x)
        x = self.final_conv(x)
        return x

    def forward(self, x):
        return self.head(self.forward_features(x))


def build_regnety():
    return RegNet()


def build_regnet_preact():
    return RegNet(depths=(2, 2), preact=True)


def build_regnet_avg_down():
    return RegNet(downsample="avg")


def build_frozen_regnet():
    return freeze_batch_norm_2d(_randomize_bn_(RegNet(downsample="conv1x1")))


def build_bn_no_running_stats():
    """A ConvNormAct stack where one norm keeps no running statistics."""
    return nn.Sequential(
        ConvNormAct(3, 16, 3, stride=2),
        ConvNormAct(16, 16, 3, norm_kwargs=dict(track_running_stats=False)),
        ConvNormAct(16, 24, 3, stride=2, act_layer=nn.SiLU),
    )


class CspBottleneckBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/cspnet.py: BottleneckBlock.

    Idiom: ConvNormAct 1x1 -> 3x3 -> attn -> 1x1 (no act) -> attn3, ``drop_path(x) +
    shortcut``, ``act3``.
    """

    def __init__(self, in_chs, out_chs, dilation=1, bottle_ratio=0.25, groups=1, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, attn_layer=None, drop_block=None, drop_path=0.0):
        super().__init__()
        mid_chs = int(round(out_chs * bottle_ratio))
        ckwargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        self.conv1 = ConvNormAct(in_chs, mid_chs, kernel_size=1, **ckwargs)
        self.conv2 = ConvNormAct(mid_chs, mid_chs, kernel_size=3, dilation=dilation, groups=groups,
                                 drop_layer=drop_block, **ckwargs)
        self.attn2 = attn_layer(mid_chs, act_layer=act_layer) if attn_layer is not None else nn.Identity()
        self.conv3 = ConvNormAct(mid_chs, out_chs, kernel_size=1, apply_act=False, **ckwargs)
        self.attn3 = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.act3 = act_layer(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.attn2(x)
        x = self.conv3(x)
        x = self.attn3(x)
        x = self.drop_path(x) + shortcut
        x = self.act3(x)
        return x


class DarkBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/cspnet.py: DarkBlock (1x1 -> attn -> 3x3,
    ``drop_path(x) + shortcut``)."""

    def __init__(self, in_chs, out_chs, dilation=1, bottle_ratio=0.5, groups=1, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, attn_layer=None, drop_block=None, drop_path=0.0):
        super().__init__()
        mid_chs = int(round(out_chs * bottle_ratio))
        ckwargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        self.conv1 = ConvNormAct(in_chs, mid_chs, kernel_size=1, **ckwargs)
        self.attn = attn_layer(mid_chs, act_layer=act_layer) if attn_layer is not None else nn.Identity()
        self.conv2 = ConvNormAct(mid_chs, out_chs, kernel_size=3, dilation=dilation, groups=groups,
                                 drop_layer=drop_block, **ckwargs)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.attn(x)
        x = self.conv2(x)
        x = self.drop_path(x) + shortcut
        return x


class CrossStage(nn.Module):
    """huggingface/pytorch-image-models timm/models/cspnet.py: CrossStage.

    Idiom: ``conv_down`` (ConvNormAct, optionally anti-aliased) -> ``conv_exp`` -> ``xs, xb =
    x.split(expand_chs // 2, dim=1)`` (a BN output consumed through a split) -> blocks on
    ``xb`` -> ``conv_transition_b(xb).contiguous()`` -> ``conv_transition(torch.cat([xs, xb]))``.
    """

    def __init__(self, in_chs, out_chs, stride, depth, block_ratio=1.0, bottle_ratio=1.0, expand_ratio=1.0,
                 cross_linear=False, block_fn=DarkBlock, aa_layer=None, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, block_dpr=None, **block_kwargs):
        super().__init__()
        self.expand_chs = exp_chs = int(round(out_chs * expand_ratio))
        block_out_chs = int(round(out_chs * block_ratio))
        conv_kwargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        if stride != 1:
            self.conv_down = ConvNormAct(in_chs, in_chs, kernel_size=3, stride=stride, aa_layer=aa_layer,
                                         **conv_kwargs)
        else:
            self.conv_down = nn.Identity()
        self.conv_exp = ConvNormAct(in_chs, exp_chs, kernel_size=1, apply_act=not cross_linear, **conv_kwargs)
        prev = exp_chs // 2
        self.blocks = nn.Sequential()
        for i in range(depth):
            self.blocks.add_module(str(i), block_fn(prev, block_out_chs, bottle_ratio=bottle_ratio,
                                                    drop_path=block_dpr[i] if block_dpr else 0.0,
                                                    **conv_kwargs, **block_kwargs))
            prev = block_out_chs
        self.conv_transition_b = ConvNormAct(prev, exp_chs // 2, kernel_size=1, **conv_kwargs)
        self.conv_transition = ConvNormAct(exp_chs, out_chs, kernel_size=1, **conv_kwargs)

    def forward(self, x):
        x = self.conv_down(x)
        x = self.conv_exp(x)
        xs, xb = x.split(self.expand_chs // 2, dim=1)
        xb = self.blocks(xb)
        xb = self.conv_transition_b(xb).contiguous()
        out = self.conv_transition(torch.cat([xs, xb], dim=1))
        return out


class CrossStage3(nn.Module):
    """huggingface/pytorch-image-models timm/models/cspnet.py: CrossStage3 (one transition
    conv; ``x1, x2 = x.split(...)`` then ``conv_transition(torch.cat([x1, x2]))``)."""

    def __init__(self, in_chs, out_chs, stride, depth, block_ratio=1.0, bottle_ratio=1.0, expand_ratio=1.0,
                 cross_linear=False, block_fn=CspBottleneckBlock, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d,
                 block_dpr=None, **block_kwargs):
        super().__init__()
        self.expand_chs = exp_chs = int(round(out_chs * expand_ratio))
        block_out_chs = int(round(out_chs * block_ratio))
        conv_kwargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        self.conv_down = ConvNormAct(in_chs, in_chs, kernel_size=3, stride=stride, **conv_kwargs)
        self.conv_exp = ConvNormAct(in_chs, exp_chs, kernel_size=1, apply_act=not cross_linear, **conv_kwargs)
        prev = exp_chs // 2
        self.blocks = nn.Sequential()
        for i in range(depth):
            self.blocks.add_module(str(i), block_fn(prev, block_out_chs, bottle_ratio=bottle_ratio,
                                                    drop_path=block_dpr[i] if block_dpr else 0.0,
                                                    **conv_kwargs, **block_kwargs))
            prev = block_out_chs
        self.conv_transition = ConvNormAct(exp_chs, out_chs, kernel_size=1, **conv_kwargs)

    def forward(self, x):
        x = self.conv_down(x)
        x = self.conv_exp(x)
        x1, x2 = x.split(self.expand_chs // 2, dim=1)
        x1 = self.blocks(x1)
        out = self.conv_transition(torch.cat([x1, x2], dim=1))
        return out


class CspNet(nn.Module):
    """huggingface/pytorch-image-models timm/models/cspnet.py: CspNet (ConvNormAct stem,
    a CrossStage with DarkBlocks and an anti-aliased ``conv_down``, a CrossStage3 with
    BottleneckBlocks and ``cross_linear``, ClassifierHead)."""

    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(in_chans, 16, 3, stride=2, act_layer=nn.LeakyReLU))
        self.stages = nn.Sequential(
            CrossStage(16, 24, stride=2, depth=1, expand_ratio=2.0, block_ratio=1.0, bottle_ratio=0.5,
                       aa_layer=BlurPool2d, act_layer=nn.LeakyReLU, block_dpr=[0.05]),
            CrossStage3(24, 32, stride=2, depth=2, expand_ratio=1.0, block_ratio=0.5, bottle_ratio=1.0,
                        cross_linear=True, act_layer=nn.SiLU, block_dpr=[0.05, 0.1]),
        )
        self.head = ClassifierHead(32, num_classes)

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def forward(self, x):
        return self.head(self.forward_features(x))


class ResNetV2Bottleneck(nn.Module):
    """huggingface/pytorch-image-models timm/models/resnetv2.py: Bottleneck (non pre-act) with
    ``conv_layer=StdConv2d`` and ``norm_layer=BatchNormAct2d``.

    Idiom: each StdConv2d (an ``nn.Conv2d`` subclass computing a weight-BN per call) followed
    by a BatchNormAct2d; ``act3(x + shortcut)``; the projection is ``DownsampleConv``
    (``norm(conv(x))``).
    """

    def __init__(self, in_chs, out_chs, bottle_ratio=0.5, stride=1, drop_path_rate=0.0,
                 conv_layer=StdConv2d, norm_layer=BatchNormAct2d, act_layer=nn.ReLU):
        super().__init__()
        mid_chs = make_divisible(out_chs * bottle_ratio)
        if in_chs != out_chs or stride != 1:
            self.downsample = ResNetV2DownsampleConv(in_chs, out_chs, stride, conv_layer, norm_layer)
        else:
            self.downsample = None
        self.conv1 = conv_layer(in_chs, mid_chs, 1)
        self.norm1 = norm_layer(mid_chs)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride)
        self.norm2 = norm_layer(mid_chs)
        self.conv3 = conv_layer(mid_chs, out_chs, 1)
        self.norm3 = norm_layer(out_chs, apply_act=False)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.act3 = act_layer(inplace=True)

    def forward(self, x):
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x)
        x = self.conv1(x)
        x = self.norm1(x)
        x = self.conv2(x)
        x = self.norm2(x)
        x = self.conv3(x)
        x = self.norm3(x)
        x = self.drop_path(x)
        x = self.act3(x + shortcut)
        return x


class ResNetV2DownsampleConv(nn.Module):
    """huggingface/pytorch-image-models timm/models/resnetv2.py: DownsampleConv
    (``preact=False``: conv then norm without act)."""

    def __init__(self, in_chs, out_chs, stride, conv_layer, norm_layer):
        super().__init__()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=stride)
        self.norm = norm_layer(out_chs, apply_act=False)

    def forward(self, x):
        return self.norm(self.conv(x))


def build_resnetv2_std_conv():
    return nn.Sequential(
        StdConv2d(3, 16, 3, stride=2),
        BatchNormAct2d(16),
        ResNetV2Bottleneck(16, 32, stride=2),
        ResNetV2Bottleneck(32, 32, drop_path_rate=0.05),
        ClassifierHead(32, 10),
    )


class GammaAct(nn.Module):
    """huggingface/pytorch-image-models timm/models/nfnet.py: GammaAct
    (``act(x, inplace).mul_(gamma)`` with a Python-float gamma)."""

    def __init__(self, gamma=1.7139588594436646, inplace=False):
        super().__init__()
        self.gamma = gamma
        self.inplace = inplace

    def forward(self, x):
        return F.relu(x, inplace=self.inplace).mul_(self.gamma)


class NfDownsampleAvg(nn.Module):
    """huggingface/pytorch-image-models timm/models/nfnet.py: DownsampleAvg
    (``AvgPool2d(2, ceil_mode=True, count_include_pad=False)`` then a ScaledStdConv2d 1x1)."""

    def __init__(self, in_chs, out_chs, stride=1, conv_layer=ScaledStdConv2d):
        super().__init__()
        if stride > 1:
            self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
        else:
            self.pool = nn.Identity()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=1)

    def forward(self, x):
        return self.conv(self.pool(x))


class NormFreeBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/nfnet.py: NormFreeBlock (RegNet style).

    Idiom: ``out = act1(x) * beta`` (Python float), ScaledStdConv2d convs with GammaActs, SE
    scaled by ``attn_gain``, ``out.mul_(skipinit_gain)``, ``out * alpha + shortcut``.
    """

    def __init__(self, in_chs, out_chs, stride=1, alpha=0.2, beta=1.0, bottle_ratio=0.25, group_size=8,
                 attn_gain=2.0, skipinit=True, drop_path_rate=0.0):
        super().__init__()
        mid_chs = make_divisible(in_chs * bottle_ratio, 8)
        groups = mid_chs // group_size
        self.alpha = alpha
        self.beta = beta
        self.attn_gain = attn_gain
        if in_chs != out_chs or stride != 1:
            self.downsample = NfDownsampleAvg(in_chs, out_chs, stride=stride)
        else:
            self.downsample = None
        self.act1 = GammaAct()
        self.conv1 = ScaledStdConv2d(in_chs, mid_chs, 1)
        self.act2 = GammaAct(inplace=True)
        self.conv2 = ScaledStdConv2d(mid_chs, mid_chs, 3, stride=stride, groups=groups)
        self.attn = SEModule(mid_chs, rd_ratio=0.5)
        self.act3 = GammaAct()
        self.conv3 = ScaledStdConv2d(mid_chs, out_chs, 1, gain_init=1.0 if skipinit else 0.0)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.skipinit_gain = nn.Parameter(torch.tensor(0.0)) if skipinit else None

    def forward(self, x):
        out = self.act1(x) * self.beta
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        out = self.attn_gain * self.attn(out)
        out = self.conv3(self.act3(out))
        out = self.drop_path(out)
        if self.skipinit_gain is not None:
            out.mul_(self.skipinit_gain)
        out = out * self.alpha + shortcut
        return out


def build_nf_regnet():
    return nn.Sequential(
        ScaledStdConv2d(3, 16, 3, stride=2),
        NormFreeBlock(16, 32, stride=2, beta=1.0),
        NormFreeBlock(32, 32, beta=1.0 / (1.0 + 0.2 ** 2) ** 0.5, drop_path_rate=0.05),
        ScaledStdConv2d(32, 48, 1),
        GammaAct(),
        ClassifierHead(48, 10),
    )


# --------------------------------------------------------------------------------------
# Conv2dSame blocks and small BatchNormAct2d entries
# --------------------------------------------------------------------------------------

def build_conv2d_same_block():
    """Stride-2 TF 'SAME' convs whose padding is asymmetric for a 32x32 input."""
    return nn.Sequential(
        ConvNormAct(3, 16, 3, stride=2, padding="same"),                 # 32 -> 16, pads (0, 1)
        ConvNormAct(16, 16, 5, stride=2, padding="same", groups=16),     # 16 -> 8, pads (1, 2)
        ConvNormAct(16, 24, 3, stride=1, padding="same", apply_act=False),  # static: plain Conv2d
    )


def build_conv2d_same_symmetric():
    """The same stride-2 'SAME' convs on a 33x33 input, where the padding is (1, 1)."""
    return nn.Sequential(
        ConvNormAct(3, 16, 3, stride=2, padding="same"),                 # 33 -> 17, pads (1, 1)
        ConvNormAct(16, 16, 5, stride=2, padding="same", groups=16),     # 17 -> 9, pads (2, 2)
    )


def build_conv_norm_act_stack():
    """ConvNormAct variants: ReLU / SiLU / no act / DropBlock2d as ``bn.drop`` / a conv bias /
    ``apply_norm=False`` (the empty ``nn.Sequential`` as ``bn``)."""
    return nn.Sequential(
        ConvNormAct(3, 16, 3, stride=2),
        ConvNormAct(16, 16, 3, groups=16, act_layer=nn.SiLU, drop_layer=partial(DropBlock2d, drop_prob=0.1)),
        ConvNormAct(16, 24, 1, apply_act=False, bias=True),
        ConvNormAct(24, 24, 3, stride=2, padding="valid", act_layer=nn.Hardswish),
        ConvNormAct(24, 32, 1, apply_norm=False),
        ClassifierHead(32, 10),
    )


# --------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------

def _src(path, *classes):
    return f"{_TIMM} {path}: {', '.join(classes)}"


IDIOMS: list[Idiom] = [
    # ---- shared layers ----------------------------------------------------------------
    Idiom(
        name="timm.conv_norm_act",
        library="timm",
        source=_src("timm/layers/conv_bn_act.py", "ConvNormAct") + "; timm/layers/norm_act.py: BatchNormAct2d",
        build=build_conv_norm_act_stack,
        notes="conv -> BatchNormAct2d whose forward is _assert(x.ndim == 4) + F.batch_norm on attribute stats "
              "+ drop (DropBlock2d, eval no-op) + act: the conv output has a second user (ndim) and the BN "
              "is a functional call inside a BatchNorm2d subclass.",
    ),
    Idiom(
        name="timm.batchnorm_act_no_running_stats",
        library="timm",
        source=_src("timm/layers/norm_act.py", "BatchNormAct2d"),
        build=build_bn_no_running_stats,
        must_remain={"batch_norm": 1},
        notes="BatchNormAct2d(track_running_stats=False): running_mean/var are None so eval still "
              "normalises with batch statistics (bn_training=True); that BN must not be folded.",
    ),
    Idiom(
        name="timm.frozen_batchnorm_act",
        library="timm",
        source=_src("timm/layers/norm_act.py", "FrozenBatchNormAct2d", "freeze_batch_norm_2d")
        + "; timm/models/regnet.py: RegNet",
        build=build_frozen_regnet,
        notes="freeze_batch_norm_2d turns every BatchNormAct2d into buffers + x * scale + bias computed in "
              "forward (rsqrt, reshape to (1,C,1,1)); the affine is constant arithmetic on buffers, not a BN op.",
    ),
    Idiom(
        name="timm.conv_norm_act_aa_linear",
        library="timm",
        source=_src("timm/layers/conv_bn_act.py", "ConvNormAct") + "; timm/layers/blur_pool.py: BlurPool2d",
        build=_AntiAliasedPair,
        input_shape=(2, 16, 16, 16),
        must_remain={"conv": 4},
        notes="ConvNormAct(aa_layer, apply_act=False): conv (stride 1) -> BN -> BlurPool2d (F.pad constant / "
              "reflect, then a fixed depthwise F.conv2d stride 2); linear, but the blur pads the BN output so "
              "conv and blur must stay two convs (the BNs fold into the first conv).",
    ),
    Idiom(
        name="timm.conv2d_same_asymmetric",
        library="timm",
        source=_src("timm/layers/conv2d_same.py", "Conv2dSame", "create_conv2d_pad")
        + "; timm/layers/padding.py: pad_same, get_padding_value",
        build=build_conv2d_same_block,
        traceable=False,
        must_remain={"pad": 2},
        notes="padding='same' at stride 2 gives Conv2dSame (padding=0 stored, F.pad from x.size() in forward, "
              "builtin max on the size breaks symbolic_trace); at 32x32 the pads are (0,1) and (1,2): "
              "asymmetric, so they must stay pads (the BNs still fold into the convs).",
    ),
    Idiom(
        name="timm.conv2d_same_symmetric",
        library="timm",
        source=_src("timm/layers/conv2d_same.py", "Conv2dSame") + "; timm/layers/padding.py: pad_same",
        build=build_conv2d_same_symmetric,
        input_shape=(2, 3, 33, 33),
        traceable=False,
        notes="the same Conv2dSame blocks on a 33x33 input: the computed pads are (1,1) and (2,2), symmetric, "
              "so an exporter-level fuser may move them into the conv's padding.",
    ),
    # ---- byobnet -----------------------------------------------------------------------
    Idiom(
        name="timm.byobnet_repvgg_a0",
        library="timm",
        source=_src("timm/models/byobnet.py", "ByobNet", "RepVggBlock") + "; timm/utils/model.py: "
        "reparameterize_model",
        build=build_repvgg_a0,
        reparameterize=reparameterize_model,
        notes="RepVggBlock: conv_1x1(x) + conv_kxk(x), drop_path, then in-place x += identity where the "
              "identity is a BatchNormAct2d(apply_act=False); DropBlock2d as bn.drop in the last stage; "
              "rep stem at stride 2 (no identity).",
    ),
    Idiom(
        name="timm.byobnet_repvgg_b1g4",
        library="timm",
        source=_src("timm/models/byobnet.py", "ByobNet", "RepVggBlock", "_rep_vgg_bcfg")
        + "; timm/utils/model.py: reparameterize_model",
        build=build_repvgg_b1g4,
        reparameterize=reparameterize_model,
        notes="every second block grouped (groups=4): the BN identity branch becomes a grouped identity "
              "kernel (i % input_dim); final_conv ConvNormAct 1x1 with ReLU.",
    ),
    Idiom(
        name="timm.byobnet_repvgg_se_block",
        library="timm",
        source=_src("timm/models/byobnet.py", "RepVggBlock") + "; timm/layers/squeeze_excite.py: SEModule",
        build=build_repvgg_se_block,
        input_shape=(2, 16, 16, 16),
        reparameterize=_block_method("reparameterize"),
        notes="repvgg_d2se-style block: SE attn after the three-branch sum (the gate reads the sum), "
              "DropPath on the conv sum before x += identity.",
    ),
    Idiom(
        name="timm.byobnet_mobileone_s0",
        library="timm",
        source=_src("timm/models/byobnet.py", "ByobNet", "MobileOneBlock", "_mobileone_bcfg")
        + "; timm/utils/model.py: reparameterize_model",
        build=build_mobileone_s0,
        reparameterize=reparameterize_model,
        notes="MobileOneBlock: identity_out = 0 / scale_out = 0 seeds, out = scale_out then out += ck(x) over "
              "four kxk branches (in place on the 1x1 branch's BN output, or on int 0 in pointwise blocks), "
              "out += identity_out; depthwise + pointwise pairs.",
    ),
    Idiom(
        name="timm.byobnet_mobileone_pw_block",
        library="timm",
        source=_src("timm/models/byobnet.py", "MobileOneBlock"),
        build=build_mobileone_pw_block,
        input_shape=(2, 16, 16, 16),
        reparameterize=_block_method("reparameterize"),
        notes="kernel_size=1 block: no scale branch, so the sum starts from the literal 0 (0 + conv(x)) and "
              "the identity BN is added last; four 1x1 branches + BN identity -> one 1x1 conv.",
    ),
    Idiom(
        name="timm.byobnet_mobileone_dw_block",
        library="timm",
        source=_src("timm/models/byobnet.py", "MobileOneBlock"),
        build=build_mobileone_dw_block,
        input_shape=(2, 16, 16, 16),
        reparameterize=_block_method("reparameterize"),
        notes="depthwise 3x3 block: 4 dw kxk branches + dw 1x1 scale branch + BN identity (groups=C identity "
              "kernel), accumulated with += onto the scale branch output.",
    ),
    # ---- efficientnet / mobilenet ------------------------------------------------------
    Idiom(
        name="timm.efficientnet",
        library="timm",
        source=_src("timm/models/_efficientnet_blocks.py", "DepthwiseSeparableConv", "InvertedResidual",
                    "SqueezeExcite") + "; timm/models/efficientnet.py: EfficientNet",
        build=build_efficientnet,
        notes="EfficientNet-B0-like: BatchNormAct2d after every conv (SiLU or no act), SE gate multiply "
              "between dw and pwl, drop_path(x) + shortcut; no own reparameterization (plain conv+BN fold).",
    ),
    Idiom(
        name="timm.tf_efficientnet_same_pad",
        library="timm",
        source=_src("timm/models/_efficientnet_blocks.py", "InvertedResidual")
        + "; timm/models/efficientnet.py: EfficientNet; timm/layers/conv2d_same.py: Conv2dSame",
        build=build_tf_efficientnet,
        traceable=False,
        must_remain={"pad": 3},
        notes="tf_ variant (pad_type='same', BN eps 1e-3): stem and the two stride-2 dw convs are Conv2dSame "
              "with asymmetric pads at 32x32 ((0,1), (0,1), (1,2)); untraceable, exportable; pads stay.",
    ),
    Idiom(
        name="timm.mobilenetv4_uir_layer_scale",
        library="timm",
        source=_src("timm/models/_efficientnet_blocks.py", "UniversalInvertedResidual")
        + "; timm/layers/layer_scale.py: LayerScale2d; timm/models/mobilenetv3.py: MobileNetV3",
        build=build_mobilenetv4_uir,
        notes="UIR blocks (ExtraDW, ConvNeXt-like, FFN): pw_proj BN (no act) -> LayerScale2d gamma.view(1,-1,1,1), "
              "two of them in place (x.mul_(gamma)) -> + shortcut; head conv+BN on the pooled 1x1 map.",
    ),
    # ---- ghostnet / repghost -----------------------------------------------------------
    Idiom(
        name="timm.ghostnetv3",
        library="timm",
        source=_src("timm/models/ghostnet.py", "GhostNet", "GhostBottleneckV3", "GhostModuleV3")
        + "; timm/utils/model.py: reparameterize_model",
        build=build_ghostnetv3,
        reparameterize=reparameterize_model,
        notes="GhostModuleV3: x1 = 0; x1 += conv(x) (3 branches), x2 = scale(x1) + bn_skip(x1); x2 += dw(x1) "
              "(3 branches), cat; 'shortcut' mode multiplies by an interpolated sigmoid of an avg-pooled "
              "conv/BN chain (DFC); strided dw part x1 = scale(x); x1 += conv(x).",
    ),
    Idiom(
        name="timm.ghostnetv3_module",
        library="timm",
        source=_src("timm/models/ghostnet.py", "GhostModuleV3"),
        build=build_ghostnetv3_module,
        input_shape=(2, 16, 16, 16),
        reparameterize=_block_method("reparameterize"),
        notes="two re-parameterizable sums in series separated by an in-place ReLU; the cheap sum's BN "
              "skip branch is a bare BatchNorm2d on the primary output, which is also concatenated.",
    ),
    Idiom(
        name="timm.repghostnet",
        library="timm",
        source=_src("timm/models/repghost.py", "RepGhostNet", "RepGhostBottleneck", "RepGhostModule",
                    "repghost_model_convert"),
        build=build_repghostnet,
        reparameterize=repghost_model_convert,
        notes="RepGhostModule: x2 = cheap(x1); x2 = x2 + bn(Identity(x1)) — a BN on the dw conv's input "
              "added to its output (fusion BN), ReLU after the sum; x += shortcut in place.",
    ),
    Idiom(
        name="timm.repghost_module",
        library="timm",
        source=_src("timm/models/repghost.py", "RepGhostModule"),
        build=build_repghost_module,
        input_shape=(2, 16, 16, 16),
        reparameterize=_block_method("switch_to_deploy"),
        notes="primary conv/BN/ReLU output feeds both the dw conv/BN and the fusion BN; the sum folds into "
              "one dw conv (identity kernel ones(C,1,1,1) padded to 3x3).",
    ),
    # ---- regnet / csp / resnetv2 / nfnet ----------------------------------------------
    Idiom(
        name="timm.regnety",
        library="timm",
        source=_src("timm/models/regnet.py", "RegNet", "RegStage", "Bottleneck", "downsample_conv"),
        build=build_regnety,
        notes="ConvNormAct stack: grouped 3x3, SEModule gate, conv3 BN without act, drop_path(x) + "
              "downsample(shortcut) with a ConvNormAct 1x1 projection; RegStage loops over self.children().",
    ),
    Idiom(
        name="timm.regnet_avg_down",
        library="timm",
        source=_src("timm/models/regnet.py", "RegNet", "Bottleneck", "downsample_avg"),
        build=build_regnet_avg_down,
        input_shape=(2, 3, 30, 30),
        must_remain={"avg_pool": 1},
        notes="downsample='avg': AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) before the 1x1 "
              "ConvNormAct; on the odd 15x15 map the last window is partial (divisor 2, not 4), so the pool "
              "must not be merged into the 1x1 conv as a 2x2 stride-2 kernel.",
    ),
    Idiom(
        name="timm.regnet_preact",
        library="timm",
        source=_src("timm/models/regnet.py", "RegNet", "PreBottleneck") + "; timm/layers/norm_act.py: "
        "BatchNormAct2d",
        build=build_regnet_preact,
        must_remain={"batch_norm": 5},
        notes="pre-activation: BN+ReLU before each conv. norm3 follows the SE gate (4 blocks) and s2.b1.norm1 "
              "reads a sum with an identity term: those 5 BNs cannot fold; the others fold backwards into the "
              "stem conv, conv1, or both convs of a projection sum.",
    ),
    Idiom(
        name="timm.cspnet",
        library="timm",
        source=_src("timm/models/cspnet.py", "CspNet", "CrossStage", "CrossStage3", "DarkBlock",
                    "BottleneckBlock"),
        build=lambda: CspNet(),
        notes="conv_exp BN output split in two (x.split(expand_chs // 2, dim=1)) and re-joined with cat; "
              "cross_linear conv_exp without act; anti-aliased conv_down (BlurPool2d after BN+LeakyReLU).",
    ),
    Idiom(
        name="timm.resnetv2_std_conv",
        library="timm",
        source=_src("timm/layers/std_conv.py", "StdConv2d") + "; timm/models/resnetv2.py: Bottleneck, "
        "DownsampleConv",
        build=build_resnetv2_std_conv,
        notes="StdConv2d is an nn.Conv2d subclass whose forward standardises the weight with "
              "F.batch_norm(weight, training=True) each call: a following BN must not be folded into "
              "self.weight (only into the standardised, baked weight).",
    ),
    Idiom(
        name="timm.nf_regnet_scaled_std_conv",
        library="timm",
        source=_src("timm/layers/std_conv.py", "ScaledStdConv2d") + "; timm/models/nfnet.py: NormFreeBlock, "
        "DownsampleAvg, GammaAct",
        build=build_nf_regnet,
        notes="no activation BN at all: ScaledStdConv2d weight-BN with gain*scale affine, in-place "
              "relu(x).mul_(gamma), Python-float scalings (beta, attn_gain, alpha), out.mul_(skipinit_gain).",
    ),
]
