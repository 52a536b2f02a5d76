"""timm hybrid / ViT-side re-parameterizable models, in the code shapes of
huggingface/pytorch-image-models (``timm``): FastViT, RepViT, EfficientViT (MSRA and MIT),
TinyViT and MobileViT.

Read from the public files named in each class docstring and re-written here in our own words,
using torch only. The deploy conversions are the library's own: the per-block
``reparameterize()`` / ``fuse()`` methods, the model-wide walk of ``timm/utils/model.py``
``reparameterize_model`` and RepViT's own ``RepVit.fuse``. Where timm builds the fused layer
with ``nn.Conv2d(...)`` / ``nn.Linear(...)`` and then ``weight.data.copy_(...)`` (RepViT,
EfficientViT, TinyViT ``ConvNorm.fuse`` / ``NormLinear.fuse``), the module is created in the
default dtype, so a float64 model would come back with float32 layers; the copies here pass the
source dtype instead so that the baseline stays exact in float64 (the only intended deviation).
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import Idiom

_TIMM = "huggingface/pytorch-image-models"


# --------------------------------------------------------------------------------------------
# Shared timm layers (timm/layers), as FastViT and MobileViT use them
# --------------------------------------------------------------------------------------------


def _make_divisible(value, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def _symmetric_padding(kernel_size, stride=1, dilation=1):
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def _create_conv2d(in_chs, out_chs, kernel_size, stride=1, dilation=1, groups=1, bias=False):
    """timm/layers/create_conv2d.py ``create_conv2d`` with the default ``''`` padding: a plain
    ``nn.Conv2d`` with the symmetric "PyTorch same-ish" padding."""
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride,
                     padding=_symmetric_padding(kernel_size, stride, dilation),
                     dilation=dilation, groups=groups, bias=bias)


def _make_act(act_layer, inplace):
    try:
        return act_layer(inplace=inplace)
    except TypeError:
        return act_layer()


class BatchNormAct2d(nn.BatchNorm2d):
    """huggingface/pytorch-image-models timm/layers/norm_act.py: BatchNormAct2d.

    Idiom: a ``BatchNorm2d`` subclass whose forward asserts ``x.ndim == 4`` through
    ``torch._assert`` (a second user of the conv output), branches in Python on
    ``momentum``/``training``, calls ``F.batch_norm`` with the attribute statistics, then an
    Identity ``drop`` and the activation (Identity when ``apply_act=False``)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, apply_act=True,
                 act_layer=nn.ReLU, inplace=True):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = nn.Identity()
        self.act = _make_act(act_layer, inplace) if apply_act and act_layer else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        if self.training:
            use_batch_stats = True
        else:
            use_batch_stats = self.running_mean is None and self.running_var is None
        keep_stats = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if keep_stats else None,
            self.running_var if keep_stats else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class ConvNormAct(nn.Module):
    """huggingface/pytorch-image-models timm/layers/conv_bn_act.py: ConvNormAct.

    Idiom: conv -> ``BatchNormAct2d`` named ``bn`` -> optional anti-alias layer looked up with
    ``getattr(self, 'aa', None)`` (a plain ``None`` attribute here, as timm leaves it)."""

    def __init__(self, in_chs, out_chs, kernel_size=1, stride=1, dilation=1, groups=1,
                 bias=False, apply_act=True, act_layer=nn.ReLU):
        super().__init__()
        self.conv = _create_conv2d(in_chs, out_chs, kernel_size, stride=stride,
                                   dilation=dilation, groups=groups, bias=bias)
        self.bn = BatchNormAct2d(out_chs, apply_act=apply_act, act_layer=act_layer)
        self.aa = None

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        aa = getattr(self, "aa", None)
        if aa is not None:
            x = self.aa(x)
        return x


class SqueezeExcite(nn.Module):
    """huggingface/pytorch-image-models timm/layers/squeeze_excite.py: SEModule.

    Idiom: ``x * sigmoid(fc2(relu(fc1(x.mean((2, 3), keepdim=True)))))`` — a per-sample,
    data-dependent channel scale that must never be taken for a constant affine."""

    def __init__(self, channels, rd_channels, act_layer=nn.ReLU):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = _make_act(act_layer, True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        squeezed = x.mean((2, 3), keepdim=True)
        squeezed = self.fc1(squeezed)
        squeezed = self.act(self.bn(squeezed))
        squeezed = self.fc2(squeezed)
        return x * self.gate(squeezed)


class SelectAdaptivePool2d(nn.Module):
    """huggingface/pytorch-image-models timm/layers/adaptive_avgmax_pool.py:
    SelectAdaptivePool2d (``pool_type='avg'``): ``AdaptiveAvgPool2d(1)`` then optional
    ``Flatten(1)``."""

    def __init__(self, flatten=False):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1) if flatten else nn.Identity()

    def forward(self, x):
        return self.flatten(self.pool(x))


class ClassifierHead(nn.Module):
    """huggingface/pytorch-image-models timm/layers/classifier.py: ClassifierHead.

    Idiom: global average pool with flatten, Dropout, Linear; ``pre_logits`` keyword."""

    def __init__(self, in_features, num_classes, drop_rate=0.0):
        super().__init__()
        self.global_pool = SelectAdaptivePool2d(flatten=True)
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


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """huggingface/pytorch-image-models timm/utils/model.py: reparameterize_model.

    The model-wide walk: every child with ``fuse`` is *replaced* by what ``fuse()`` returns,
    otherwise ``reparameterize()`` / ``switch_to_deploy()`` is called in place; then the walk
    recurses into the (old) child. The root itself is never converted."""
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


# --------------------------------------------------------------------------------------------
# FastViT (timm/models/fastvit.py)
# --------------------------------------------------------------------------------------------


def _groups_from_size(group_size, channels):
    if not group_size:
        return 1
    assert channels % group_size == 0
    return channels // group_size


class MobileOneBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: MobileOneBlock.

    Idiom: MobileOne branches summed from literal zeros — ``identity_out = 0``,
    ``scale_out = 0``, ``out = scale_out + identity_out`` then ``out += rc(x)`` over a
    ModuleList of ``ConvNormAct`` (apply_act=False) branches; identity is a bare BatchNorm2d;
    ``reparameterize()`` builds ``reparam_conv`` (weights assigned through ``.data``), detaches
    and deletes the branches, caches the identity kernel as ``id_tensor``."""

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, dilation=1, group_size=0,
                 use_se=False, use_act=True, use_scale_branch=True, num_conv_branches=1,
                 act_layer=nn.GELU, inference_mode=False):
        super().__init__()
        self.inference_mode = inference_mode
        self.groups = _groups_from_size(group_size, in_chs)
        self.stride = stride
        self.dilation = dilation
        self.kernel_size = kernel_size
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.num_conv_branches = num_conv_branches
        self.se = (SqueezeExcite(out_chs, _make_divisible(out_chs / 16, 1, round_limit=0.0))
                   if use_se else nn.Identity())
        if inference_mode:
            self.reparam_conv = _create_conv2d(in_chs, out_chs, kernel_size, stride=stride,
                                               dilation=dilation, groups=self.groups, bias=True)
        else:
            self.reparam_conv = None
            self.identity = (nn.BatchNorm2d(in_chs)
                             if out_chs == in_chs and stride == 1 else None)
            if num_conv_branches > 0:
                self.conv_kxk = nn.ModuleList([
                    ConvNormAct(in_chs, out_chs, kernel_size, stride=stride,
                                groups=self.groups, apply_act=False)
                    for _ in range(num_conv_branches)
                ])
            else:
                self.conv_kxk = None
            self.conv_scale = None
            if kernel_size > 1 and use_scale_branch:
                self.conv_scale = ConvNormAct(in_chs, out_chs, 1, stride=stride,
                                              groups=self.groups, apply_act=False)
        self.act = act_layer() if use_act else nn.Identity()

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        if self.conv_kxk is not None:
            for branch in self.conv_kxk:
                out += branch(x)
        return self.act(self.se(out))

    def reparameterize(self):
        if self.reparam_conv is not None:
            return
        kernel, bias = self._merged_kernel_bias()
        self.reparam_conv = _create_conv2d(self.in_chs, self.out_chs, self.kernel_size,
                                           stride=self.stride, dilation=self.dilation,
                                           groups=self.groups, bias=True)
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        for name, parameter in self.named_parameters():
            if "reparam_conv" in name:
                continue
            parameter.detach_()
        self.__delattr__("conv_kxk")
        self.__delattr__("conv_scale")
        if hasattr(self, "identity"):
            self.__delattr__("identity")
        self.inference_mode = True

    def _merged_kernel_bias(self):
        kernel_scale, bias_scale = 0, 0
        if self.conv_scale is not None:
            kernel_scale, bias_scale = self._fold_branch(self.conv_scale)
            half = self.kernel_size // 2
            kernel_scale = F.pad(kernel_scale, [half, half, half, half])
        kernel_id, bias_id = 0, 0
        if self.identity is not None:
            kernel_id, bias_id = self._fold_branch(self.identity)
        kernel_conv, bias_conv = 0, 0
        if self.conv_kxk is not None:
            for index in range(self.num_conv_branches):
                branch_kernel, branch_bias = self._fold_branch(self.conv_kxk[index])
                kernel_conv += branch_kernel
                bias_conv += branch_bias
        return (kernel_conv + kernel_scale + kernel_id,
                bias_conv + bias_scale + bias_id)

    def _fold_branch(self, branch):
        if isinstance(branch, ConvNormAct):
            kernel, bn = branch.conv.weight, branch.bn
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                per_group = self.in_chs // self.groups
                centre = self.kernel_size // 2
                value = torch.zeros((self.in_chs, per_group, self.kernel_size, self.kernel_size),
                                    dtype=branch.weight.dtype, device=branch.weight.device)
                for channel in range(self.in_chs):
                    value[channel, channel % per_group, centre, centre] = 1
                self.id_tensor = value
            kernel, bn = self.id_tensor, branch
        std = (bn.running_var + bn.eps).sqrt()
        factor = (bn.weight / std).reshape(-1, 1, 1, 1)
        return kernel * factor, bn.bias - bn.running_mean * bn.weight / std


class ReparamLargeKernelConv(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: ReparamLargeKernelConv.

    Idiom: RepLKNet large kernel ``ConvNormAct`` plus a small-kernel ``ConvNormAct``
    (``out = out + self.small_conv(x)``), stride 2 and grouped, then SE and (for the MCi
    variants, ``lkc_use_act``) an activation; ``reparameterize()`` zero-pads the small kernel
    by ``(k - k_small) // 2``. As in timm, ``small_conv`` only exists when ``small_kernel`` is
    given (the forward would raise otherwise)."""

    def __init__(self, in_chs, out_chs, kernel_size, stride, group_size, small_kernel=None,
                 use_se=False, act_layer=None, inference_mode=False):
        super().__init__()
        self.stride = stride
        self.groups = _groups_from_size(group_size, in_chs)
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        if inference_mode:
            self.reparam_conv = _create_conv2d(in_chs, out_chs, kernel_size, stride=stride,
                                               groups=self.groups, bias=True)
        else:
            self.reparam_conv = None
            self.large_conv = ConvNormAct(in_chs, out_chs, kernel_size, stride=stride,
                                          groups=self.groups, apply_act=False)
            if small_kernel is not None:
                assert small_kernel <= kernel_size
                self.small_conv = ConvNormAct(in_chs, out_chs, small_kernel, stride=stride,
                                              groups=self.groups, apply_act=False)
        self.se = (SqueezeExcite(out_chs, _make_divisible(out_chs * 0.25))
                   if use_se else nn.Identity())
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        if self.reparam_conv is not None:
            out = self.reparam_conv(x)
        else:
            out = self.large_conv(x)
            if self.small_conv is not None:
                out = out + self.small_conv(x)
        out = self.se(out)
        return self.act(out)

    def _kernel_bias(self):
        kernel, bias = self._fold(self.large_conv.conv, self.large_conv.bn)
        if hasattr(self, "small_conv"):
            small_kernel, small_bias = self._fold(self.small_conv.conv, self.small_conv.bn)
            bias += small_bias
            kernel += F.pad(small_kernel, [(self.kernel_size - self.small_kernel) // 2] * 4)
        return kernel, bias

    def reparameterize(self):
        kernel, bias = self._kernel_bias()
        self.reparam_conv = _create_conv2d(self.in_chs, self.out_chs, self.kernel_size,
                                           stride=self.stride, groups=self.groups, bias=True)
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        self.__delattr__("large_conv")
        if hasattr(self, "small_conv"):
            self.__delattr__("small_conv")

    @staticmethod
    def _fold(conv, bn):
        std = (bn.running_var + bn.eps).sqrt()
        factor = (bn.weight / std).reshape(-1, 1, 1, 1)
        return conv.weight * factor, bn.bias - bn.running_mean * bn.weight / std


def fastvit_stem(in_chs, out_chs, act_layer=nn.GELU, use_scale_branch=True):
    """huggingface/pytorch-image-models timm/models/fastvit.py: convolutional_stem — three
    MobileOne blocks (3x3 s2 dense, 3x3 s2 depthwise, 1x1 with identity BN)."""
    return nn.Sequential(
        MobileOneBlock(in_chs, out_chs, 3, stride=2, act_layer=act_layer,
                       use_scale_branch=use_scale_branch),
        MobileOneBlock(out_chs, out_chs, 3, stride=2, group_size=1, act_layer=act_layer,
                       use_scale_branch=use_scale_branch),
        MobileOneBlock(out_chs, out_chs, 1, stride=1, act_layer=act_layer,
                       use_scale_branch=use_scale_branch),
    )


class FastVitAttention(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: Attention.

    Idiom: ``B, C, H, W = x.shape`` read on a BatchNorm2d output, ``flatten(2).transpose``
    to tokens, bias-free qkv Linear, ``unbind(0)``, SDPA, proj Linear, then
    ``transpose(-2, -1).reshape(B, C, H, W)`` back to NCHW: the channel axis moves last and
    back, so the preceding BN and the following layer scale see the Linear through layouts."""

    def __init__(self, dim, head_dim=32, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        assert dim % head_dim == 0
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        x = x.flatten(2).transpose(-2, -1)
        qkv = (self.qkv(x)
               .reshape(B, N, 3, self.num_heads, self.head_dim)
               .permute(2, 0, 3, 1, 4))
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        return x.transpose(-2, -1).reshape(B, C, H, W)


class FastVitPatchEmbed(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: PatchEmbed.

    Idiom: ``Sequential(ReparamLargeKernelConv(k, stride 2, grouped), MobileOneBlock(1x1))``."""

    def __init__(self, patch_size, stride, in_chs, embed_dim, act_layer=nn.GELU,
                 lkc_use_act=False, use_se=False):
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_chs, embed_dim, patch_size, stride, group_size=1,
                                   small_kernel=3, use_se=use_se,
                                   act_layer=act_layer if lkc_use_act else None),
            MobileOneBlock(embed_dim, embed_dim, 1, stride=1, act_layer=act_layer),
        )

    def forward(self, x):
        return self.proj(x)


class LayerScale2d(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: LayerScale2d.

    Idiom: a ``(dim, 1, 1)`` Parameter named ``gamma`` multiplied by broadcasting
    (``x.mul_(gamma)`` when ``inplace``)."""

    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class RepMixer(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: RepMixer.

    Idiom: ``x + layer_scale(mixer(x) - norm(x))`` — ``mixer`` a depthwise MobileOneBlock
    (kxk + 1x1 scale + identity BN, no act), ``norm`` a MobileOneBlock with only its identity
    BatchNorm (``0 + bn(x)``); the layer scale is a ``LayerScale2d`` module (``gamma`` of shape
    ``(dim, 1, 1)``; it was a raw ``nn.Parameter`` only in the first, unreleased commit).
    ``reparameterize()`` reparameterizes both MobileOne blocks, then writes
    ``id + gamma.unsqueeze(-1) * (W_mixer - W_norm)`` into one depthwise conv."""

    def __init__(self, dim, kernel_size=3, layer_scale_init_value=1e-5, inference_mode=False):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.inference_mode = inference_mode
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, stride=1,
                                          padding=kernel_size // 2, groups=dim, bias=True)
        else:
            self.reparam_conv = None
            self.norm = MobileOneBlock(dim, dim, kernel_size, group_size=1, use_act=False,
                                       use_scale_branch=False, num_conv_branches=0)
            self.mixer = MobileOneBlock(dim, dim, kernel_size, group_size=1, use_act=False)
            if layer_scale_init_value is not None:
                self.layer_scale = LayerScale2d(dim, layer_scale_init_value)
            else:
                self.layer_scale = nn.Identity()

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    def reparameterize(self):
        if self.inference_mode:
            return
        self.mixer.reparameterize()
        self.norm.reparameterize()
        mixer_conv, norm_conv = self.mixer.reparam_conv, self.norm.reparam_conv
        if isinstance(self.layer_scale, LayerScale2d):
            gamma = self.layer_scale.gamma
            weight = self.mixer.id_tensor + gamma.unsqueeze(-1) * (
                mixer_conv.weight - norm_conv.weight)
            bias = torch.squeeze(gamma) * (mixer_conv.bias - norm_conv.bias)
        else:
            weight = self.mixer.id_tensor + mixer_conv.weight - norm_conv.weight
            bias = mixer_conv.bias - norm_conv.bias
        self.reparam_conv = _create_conv2d(self.dim, self.dim, self.kernel_size, stride=1,
                                           groups=self.dim, bias=True)
        self.reparam_conv.weight.data = weight
        self.reparam_conv.bias.data = bias
        for name, parameter in self.named_parameters():
            if "reparam_conv" in name:
                continue
            parameter.detach_()
        self.__delattr__("mixer")
        self.__delattr__("norm")
        self.__delattr__("layer_scale")


class FastVitConvMlp(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: ConvMlp.

    Idiom: depthwise 7x7 ``ConvNormAct`` (no act) feeding a 1x1 conv with bias, GELU, 1x1."""

    def __init__(self, in_chs, hidden_channels=None, out_chs=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_chs = out_chs or in_chs
        hidden_channels = hidden_channels or in_chs
        self.conv = ConvNormAct(in_chs, out_chs, 7, groups=in_chs, apply_act=False)
        self.fc1 = nn.Conv2d(in_chs, hidden_channels, kernel_size=1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_channels, out_chs, kernel_size=1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.conv(x)
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)


class RepConditionalPosEnc(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: RepConditionalPosEnc.

    Idiom: conditional positional encoding ``pos_enc(x) + x`` with a depthwise 7x7 conv with
    bias and no norm; ``reparameterize()`` adds an identity kernel (built channel by channel)
    and deletes ``pos_enc``."""

    def __init__(self, dim, dim_out=None, spatial_shape=(7, 7), inference_mode=False):
        super().__init__()
        if isinstance(spatial_shape, int):
            spatial_shape = (spatial_shape, spatial_shape)
        assert isinstance(spatial_shape, tuple) and len(spatial_shape) == 2
        self.spatial_shape = spatial_shape
        self.dim = dim
        self.dim_out = dim_out or dim
        self.groups = dim
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, self.dim_out, spatial_shape, stride=1,
                                          padding=spatial_shape[0] // 2, groups=dim, bias=True)
        else:
            self.reparam_conv = None
            self.pos_enc = nn.Conv2d(dim, self.dim_out, spatial_shape, 1,
                                     int(spatial_shape[0] // 2), groups=dim, bias=True)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.pos_enc(x) + x

    def reparameterize(self):
        per_group = self.dim // self.groups
        kh, kw = self.spatial_shape
        identity = torch.zeros((self.dim, per_group, kh, kw), dtype=self.pos_enc.weight.dtype,
                               device=self.pos_enc.weight.device)
        for channel in range(self.dim):
            identity[channel, channel % per_group, kh // 2, kw // 2] = 1
        weight = identity + self.pos_enc.weight
        bias = self.pos_enc.bias
        self.reparam_conv = nn.Conv2d(self.dim, self.dim_out, self.spatial_shape, stride=1,
                                      padding=int(kh // 2), groups=self.groups, bias=True)
        self.reparam_conv.weight.data = weight
        self.reparam_conv.bias.data = bias
        for name, parameter in self.named_parameters():
            if "reparam_conv" in name:
                continue
            parameter.detach_()
        self.__delattr__("pos_enc")


class RepMixerBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: RepMixerBlock.

    Idiom: ``token_mixer`` (RepMixer) then ``x + drop_path(layer_scale(mlp(x)))`` with a
    ``LayerScale2d`` after the ConvMlp's last 1x1 conv (timm leaves this one unfolded)."""

    def __init__(self, dim, kernel_size=3, mlp_ratio=4.0, act_layer=nn.GELU,
                 layer_scale_init_value=1e-5):
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init_value)
        self.mlp = FastVitConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.layer_scale = (LayerScale2d(dim, layer_scale_init_value)
                            if layer_scale_init_value is not None else nn.Identity())
        self.drop_path = nn.Identity()

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale(self.mlp(x)))


class FastVitAttentionBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: AttentionBlock.

    Idiom: ``x + ls1(attn(bn(x)))`` — a plain BatchNorm2d that follows a residual add (no
    conv to fold into) and precedes the token attention; then ``x + ls2(mlp(x))``."""

    def __init__(self, dim, mlp_ratio=4.0, act_layer=nn.GELU, layer_scale_init_value=1e-5):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = FastVitAttention(dim)
        self.layer_scale_1 = (LayerScale2d(dim, layer_scale_init_value)
                              if layer_scale_init_value is not None else nn.Identity())
        self.drop_path1 = nn.Identity()
        self.mlp = FastVitConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.layer_scale_2 = (LayerScale2d(dim, layer_scale_init_value)
                              if layer_scale_init_value is not None else nn.Identity())
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.layer_scale_1(self.token_mixer(self.norm(x))))
        return x + self.drop_path2(self.layer_scale_2(self.mlp(x)))


class FastVitStage(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: FastVitStage.

    Idiom: optional PatchEmbed downsample, optional CPE, then RepMixer or attention blocks."""

    def __init__(self, dim, dim_out, depth, token_mixer_type, downsample=True,
                 se_downsample=False, down_patch_size=7, down_stride=2, pos_emb_layer=None,
                 kernel_size=3, mlp_ratio=4.0, act_layer=nn.GELU, layer_scale_init_value=1e-5,
                 lkc_use_act=False):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = FastVitPatchEmbed(down_patch_size, down_stride, dim, dim_out,
                                                act_layer=act_layer, lkc_use_act=lkc_use_act,
                                                use_se=se_downsample)
        else:
            assert dim == dim_out
            self.downsample = nn.Identity()
        self.pos_emb = pos_emb_layer(dim_out) if pos_emb_layer is not None else nn.Identity()
        blocks = []
        for _ in range(depth):
            if token_mixer_type == "repmixer":
                blocks.append(RepMixerBlock(dim_out, kernel_size, mlp_ratio, act_layer,
                                            layer_scale_init_value))
            elif token_mixer_type == "attention":
                blocks.append(FastVitAttentionBlock(dim_out, mlp_ratio, act_layer,
                                                    layer_scale_init_value))
            else:
                raise ValueError(token_mixer_type)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        x = self.downsample(x)
        x = self.pos_emb(x)
        return self.blocks(x)


class FastVit(nn.Module):
    """huggingface/pytorch-image-models timm/models/fastvit.py: FastVit.

    Idiom: MobileOne stem, RepMixer and attention stages (with PatchEmbed / CPE), a
    MobileOneBlock ``final_conv`` with SE (grouped 3x3, no identity) and a ClassifierHead; the
    model holds no deploy method of its own: ``reparameterize_model`` walks it."""

    def __init__(self, in_chans=3, layers=(1, 1), token_mixers=("repmixer", "attention"),
                 embed_dims=(16, 32), mlp_ratios=(3, 3), downsamples=(False, True),
                 se_downsamples=(False, False), pos_embs=(None, None), num_classes=10,
                 repmixer_kernel_size=3, down_patch_size=7, down_stride=2,
                 layer_scale_init_value=1e-5, lkc_use_act=False, cls_ratio=2.0,
                 act_layer=nn.GELU):
        super().__init__()
        self.num_classes = num_classes
        self.fork_feat = False
        self.stem = fastvit_stem(in_chans, embed_dims[0], act_layer)
        previous = embed_dims[0]
        stages = []
        for index in range(len(layers)):
            downsample = downsamples[index] or previous != embed_dims[index]
            stages.append(FastVitStage(
                previous, embed_dims[index], layers[index], token_mixers[index],
                downsample=downsample, se_downsample=se_downsamples[index],
                down_patch_size=down_patch_size, down_stride=down_stride,
                pos_emb_layer=pos_embs[index], kernel_size=repmixer_kernel_size,
                mlp_ratio=mlp_ratios[index], act_layer=act_layer,
                layer_scale_init_value=layer_scale_init_value, lkc_use_act=lkc_use_act))
            previous = embed_dims[index]
        self.stages = nn.Sequential(*stages)
        self.num_features = final_features = int(embed_dims[-1] * cls_ratio)
        self.final_conv = MobileOneBlock(embed_dims[-1], final_features, 3, stride=1,
                                         group_size=1, use_se=True, act_layer=act_layer,
                                         num_conv_branches=1)
        self.head = ClassifierHead(final_features, num_classes)

    def forward_features(self, x):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            if self.fork_feat:
                outs.append(x)
        if self.fork_feat:
            return outs
        return self.final_conv(x)

    def forward_head(self, x, pre_logits: bool = False):
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x):
        x = self.forward_features(x)
        if self.fork_feat:
            return x
        return self.forward_head(x)


def _cpe_7x7(dim):
    return RepConditionalPosEnc(dim, spatial_shape=(7, 7))


def _fastvit_tiny():
    """FastViT-SA-like: a RepMixer stage and a PatchEmbed + CPE + attention stage."""
    return FastVit(layers=(1, 1), token_mixers=("repmixer", "attention"), embed_dims=(16, 32),
                   mlp_ratios=(3, 3), downsamples=(False, True), pos_embs=(None, _cpe_7x7))


def _fastvit_mci_tiny():
    """FastViT-MCi-like: SE in the PatchEmbed large-kernel conv and ``lkc_use_act``."""
    return FastVit(layers=(1, 1, 1), token_mixers=("repmixer", "repmixer", "attention"),
                   embed_dims=(8, 16, 32), mlp_ratios=(3, 3, 3),
                   downsamples=(False, True, True), se_downsamples=(False, True, True),
                   pos_embs=(None, None, _cpe_7x7), lkc_use_act=True)


def _fastvit_mobileone_blocks():
    return nn.Sequential(
        MobileOneBlock(16, 16, 3, num_conv_branches=2),
        MobileOneBlock(16, 16, 3, group_size=1, num_conv_branches=3),
        MobileOneBlock(16, 24, 3, stride=2, use_se=True),
        MobileOneBlock(24, 24, 1),
    )


def _fastvit_repmixer_blocks():
    return nn.Sequential(RepMixerBlock(16, mlp_ratio=3.0), RepMixerBlock(16, mlp_ratio=3.0))


def _fastvit_cpe_attention():
    return nn.Sequential(RepConditionalPosEnc(32, spatial_shape=(7, 7)),
                         FastVitAttentionBlock(32, mlp_ratio=2.0))


def _fastvit_patch_embed():
    return nn.Sequential(
        FastVitPatchEmbed(7, 2, 16, 32, lkc_use_act=True, use_se=True),
        FastVitPatchEmbed(7, 2, 32, 32),
    )


# --------------------------------------------------------------------------------------------
# RepViT (timm/models/repvit.py)
# --------------------------------------------------------------------------------------------


class RepVitConvNorm(nn.Sequential):
    """huggingface/pytorch-image-models timm/models/repvit.py: ConvNorm.

    Idiom: an ``nn.Sequential`` of ``c`` (bias-free conv) and ``bn``; ``fuse()`` returns a
    new ``nn.Conv2d`` (timm creates it in the default dtype; here in the weight's dtype)."""

    def __init__(self, in_dim, out_dim, ks=1, stride=1, pad=0, dilation=1, groups=1,
                 bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_dim, out_dim, ks, stride, pad, dilation, groups,
                                       bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_dim))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self):
        conv, bn = self._modules.values()
        scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
        weight = conv.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5
        fused = nn.Conv2d(weight.size(1) * self.c.groups, weight.size(0), weight.shape[2:],
                          stride=self.c.stride, padding=self.c.padding,
                          dilation=self.c.dilation, groups=self.c.groups,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(bias)
        return fused


class RepVitNormLinear(nn.Sequential):
    """huggingface/pytorch-image-models timm/models/repvit.py: NormLinear.

    Idiom: ``BatchNorm1d`` over pooled ``(B, C)`` features then ``Linear`` (``bn``, ``l``);
    ``fuse()`` folds the BN into the Linear's input side."""

    def __init__(self, in_dim, out_dim, bias=True, std=0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(in_dim))
        self.add_module("l", nn.Linear(in_dim, out_dim, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.constant_(self.l.bias, 0)

    @torch.no_grad()
    def fuse(self):
        bn, linear = self._modules.values()
        scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
        shift = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5
        weight = linear.weight * scale[None, :]
        if linear.bias is None:
            bias = shift @ linear.weight.T
        else:
            bias = (linear.weight @ shift[:, None]).view(-1) + linear.bias
        fused = nn.Linear(weight.size(1), weight.size(0), device=linear.weight.device,
                          dtype=linear.weight.dtype)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(bias)
        return fused


class RepVggDw(nn.Module):
    """huggingface/pytorch-image-models timm/models/repvit.py: RepVggDw.

    Idiom: BatchNorm AFTER the sum, ``bn(conv(x) + conv1(x) + x)``, where ``conv`` is a
    depthwise kxk ConvNorm and ``conv1`` a *bare* depthwise 1x1 conv with bias (``legacy``:
    ``conv1`` a ConvNorm and ``bn`` an Identity). ``fuse()`` pads the 1x1 and the identity
    with a hard-coded ``[1, 1, 1, 1]`` (exact for kernel_size 3 only), then folds the outer BN
    into the merged conv, bias included."""

    def __init__(self, ed, kernel_size, legacy=False):
        super().__init__()
        self.conv = RepVitConvNorm(ed, ed, kernel_size, 1, (kernel_size - 1) // 2, groups=ed)
        if legacy:
            self.conv1 = RepVitConvNorm(ed, ed, 1, 1, 0, groups=ed)
            self.bn = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
            self.bn = nn.BatchNorm2d(ed)
        self.dim = ed
        self.legacy = legacy

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)

    @torch.no_grad()
    def fuse(self):
        conv = self.conv.fuse()
        conv1 = self.conv1.fuse() if self.legacy else self.conv1
        weight1 = F.pad(conv1.weight, [1, 1, 1, 1])
        identity = F.pad(torch.ones(weight1.shape[0], weight1.shape[1], 1, 1,
                                    device=weight1.device), [1, 1, 1, 1])
        conv.weight.data.copy_(conv.weight + weight1 + identity)
        conv.bias.data.copy_(conv.bias + conv1.bias)
        if not self.legacy:
            bn = self.bn
            scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
            weight = conv.weight * scale[:, None, None, None]
            bias = bn.bias + (conv.bias - bn.running_mean) * scale
            conv.weight.data.copy_(weight)
            conv.bias.data.copy_(bias)
        return conv


class RepVitMlp(nn.Module):
    """huggingface/pytorch-image-models timm/models/repvit.py: RepVitMlp — 1x1 ConvNorm,
    GELU, 1x1 ConvNorm whose BN weight is initialised to 0."""

    def __init__(self, in_dim, hidden_dim, act_layer):
        super().__init__()
        self.conv1 = RepVitConvNorm(in_dim, hidden_dim, 1, 1, 0)
        self.act = act_layer()
        self.conv2 = RepVitConvNorm(hidden_dim, in_dim, 1, 1, 0, bn_weight_init=0)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class RepViTBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/repvit.py: RepViTBlock.

    Idiom: RepVggDw token mixer, optional SE reading the BN-after-sum output, then
    ``identity + channel_mixer(x)`` (residual not folded by timm)."""

    def __init__(self, in_dim, mlp_ratio, kernel_size, use_se, act_layer, legacy=False):
        super().__init__()
        self.token_mixer = RepVggDw(in_dim, kernel_size, legacy)
        self.se = (SqueezeExcite(in_dim, _make_divisible(in_dim * 0.25, 8, round_limit=0.0))
                   if use_se else nn.Identity())
        self.channel_mixer = RepVitMlp(in_dim, in_dim * mlp_ratio, act_layer)

    def forward(self, x):
        x = self.token_mixer(x)
        x = self.se(x)
        identity = x
        x = self.channel_mixer(x)
        return identity + x


class RepVitStem(nn.Module):
    """huggingface/pytorch-image-models timm/models/repvit.py: RepVitStem — two 3x3 s2
    ConvNorms with an activation between."""

    def __init__(self, in_chs, out_chs, act_layer):
        super().__init__()
        self.conv1 = RepVitConvNorm(in_chs, out_chs // 2, 3, 2, 1)
        self.act1 = act_layer()
        self.conv2 = RepVitConvNorm(out_chs // 2, out_chs, 3, 2, 1)
        self.stride = 4

    def forward(self, x):
        return self.conv2(self.act1(self.conv1(x)))


class RepVitDownsample(nn.Module):
    """huggingface/pytorch-image-models timm/models/repvit.py: RepVitDownsample — pre block,
    depthwise s2 ConvNorm, 1x1 ConvNorm, ``x + ffn(x)``."""

    def __init__(self, in_dim, mlp_ratio, out_dim, kernel_size, act_layer, legacy=False):
        super().__init__()
        self.pre_block = RepViTBlock(in_dim, mlp_ratio, kernel_size, use_se=False,
                                     act_layer=act_layer, legacy=legacy)
        self.spatial_downsample = RepVitConvNorm(in_dim, in_dim, kernel_size, stride=2,
                                                 pad=(kernel_size - 1) // 2, groups=in_dim)
        self.channel_downsample = RepVitConvNorm(in_dim, out_dim, 1, 1)
        self.ffn = RepVitMlp(out_dim, out_dim * mlp_ratio, act_layer)

    def forward(self, x):
        x = self.pre_block(x)
        x = self.spatial_downsample(x)
        x = self.channel_downsample(x)
        identity = x
        x = self.ffn(x)
        return x + identity


class RepVitClassifier(nn.Module):
    """huggingface/pytorch-image-models timm/models/repvit.py: RepVitClassifier.

    Idiom: distillation head — two NormLinear heads averaged, ``(x1 + x2) / 2`` in eval;
    ``fuse()`` fuses both and averages weights and biases in place (``+=``, ``/= 2``)."""

    def __init__(self, dim, num_classes, distillation=False, drop=0.0):
        super().__init__()
        self.head_drop = nn.Dropout(drop)
        self.head = RepVitNormLinear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.distillation = distillation
        self.distilled_training = False
        self.num_classes = num_classes
        if distillation:
            self.head_dist = (RepVitNormLinear(dim, num_classes) if num_classes > 0
                              else nn.Identity())

    def forward(self, x):
        x = self.head_drop(x)
        if self.distillation:
            x1, x2 = self.head(x), self.head_dist(x)
            if self.training and self.distilled_training and not torch.jit.is_scripting():
                return x1, x2
            return (x1 + x2) / 2
        return self.head(x)

    @torch.no_grad()
    def fuse(self):
        if not self.num_classes > 0:
            return nn.Identity()
        head = self.head.fuse()
        if self.distillation:
            head_dist = self.head_dist.fuse()
            head.weight += head_dist.weight
            head.bias += head_dist.bias
            head.weight /= 2
            head.bias /= 2
        return head


class RepVitStage(nn.Module):
    """huggingface/pytorch-image-models timm/models/repvit.py: RepVitStage — optional
    downsample, then blocks alternating SE on / off."""

    def __init__(self, in_dim, out_dim, depth, mlp_ratio, act_layer, kernel_size=3,
                 downsample=True, legacy=False):
        super().__init__()
        if downsample:
            self.downsample = RepVitDownsample(in_dim, mlp_ratio, out_dim, kernel_size,
                                               act_layer=act_layer, legacy=legacy)
        else:
            assert in_dim == out_dim
            self.downsample = nn.Identity()
        blocks = []
        use_se = True
        for _ in range(depth):
            blocks.append(RepViTBlock(out_dim, mlp_ratio, kernel_size, use_se, act_layer,
                                      legacy))
            use_se = not use_se
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.downsample(x))


class RepVit(nn.Module):
    """huggingface/pytorch-image-models timm/models/repvit.py: RepVit.

    Idiom: stem, stages, ``x.mean((2, 3))`` pooling, distillation classifier; its own
    model-level ``fuse()`` replaces every child with a ``fuse`` method and recurses into the
    replacement."""

    def __init__(self, in_chans=3, embed_dim=(16, 32), depth=(2, 1), mlp_ratio=2,
                 global_pool="avg", kernel_size=3, num_classes=10, act_layer=nn.GELU,
                 distillation=True, drop_rate=0.0, legacy=False):
        super().__init__()
        self.global_pool = global_pool
        self.num_classes = num_classes
        in_dim = embed_dim[0]
        self.stem = RepVitStem(in_chans, in_dim, act_layer)
        stages = []
        for index in range(len(embed_dim)):
            stages.append(RepVitStage(in_dim, embed_dim[index], depth[index], mlp_ratio,
                                      act_layer, kernel_size, downsample=index != 0,
                                      legacy=legacy))
            in_dim = embed_dim[index]
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dim[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = RepVitClassifier(embed_dim[-1], num_classes, distillation)

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean((2, 3), keepdim=False)
        x = self.head_drop(x)
        if pre_logits:
            return x
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def fuse(self):
        def walk(net):
            for child_name, child in net.named_children():
                if hasattr(child, "fuse"):
                    replacement = child.fuse()
                    setattr(net, child_name, replacement)
                    walk(replacement)
                else:
                    walk(child)

        walk(self)


def _repvit_fuse(model):
    model.fuse()
    return model


def _repvggdw_blocks():
    return nn.Sequential(RepVggDw(16, 3), nn.GELU(), RepVggDw(16, 3))


def _repvggdw_legacy_blocks():
    return nn.Sequential(RepVggDw(16, 3, legacy=True), nn.GELU(), RepVggDw(16, 3, legacy=True))


def _repvit_se_block():
    return nn.Sequential(RepViTBlock(16, 2, 3, use_se=True, act_layer=nn.GELU))


# --------------------------------------------------------------------------------------------
# EfficientViT (MSRA) (timm/models/efficientvit_msra.py)
# --------------------------------------------------------------------------------------------


class MsraConvNorm(nn.Sequential):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py: ConvNorm.

    Idiom: ``nn.Sequential`` with ``conv`` / ``bn`` attributes (BN weight init may be 0);
    ``fuse()`` returns a new ``nn.Conv2d`` (timm: default dtype; here the weight's dtype)."""

    def __init__(self, in_chs, out_chs, ks=1, stride=1, pad=0, dilation=1, groups=1,
                 bn_weight_init=1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, ks, stride, pad, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    @torch.no_grad()
    def fuse(self):
        conv, bn = self.conv, self.bn
        scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
        weight = conv.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5
        fused = nn.Conv2d(weight.size(1) * conv.groups, weight.size(0), weight.shape[2:],
                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          groups=conv.groups, dtype=weight.dtype, device=weight.device)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(bias)
        return fused


class MsraNormLinear(nn.Sequential):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py: NormLinear.

    Idiom: ``BatchNorm1d`` -> ``Dropout`` -> ``Linear`` over pooled features; ``fuse()``."""

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
        bn, linear = self.bn, self.linear
        scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
        shift = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5
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


class MsraPatchMerging(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py: PatchMerging —
    1x1 ConvNorm, ReLU, depthwise 3x3 s2 ConvNorm, ReLU, SE, 1x1 ConvNorm."""

    def __init__(self, dim, out_dim):
        super().__init__()
        hidden = int(dim * 4)
        self.conv1 = MsraConvNorm(dim, hidden, 1, 1, 0)
        self.act = nn.ReLU()
        self.conv2 = MsraConvNorm(hidden, hidden, 3, 2, 1, groups=hidden)
        self.se = SqueezeExcite(hidden, _make_divisible(hidden * 0.25))
        self.conv3 = MsraConvNorm(hidden, out_dim, 1, 1, 0)

    def forward(self, x):
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class ResidualDrop(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py: ResidualDrop.

    Idiom: ``x + m(x)`` wrapping a ConvNorm / ConvMlp / attention; in training a per-sample
    random mask (``torch.rand(...).ge_(p).div(1 - p)``) — Python-branch on ``training``."""

    def __init__(self, m, drop=0.0):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x):
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop)
            return x + self.m(x) * keep.div(1 - self.drop).detach()
        return x + self.m(x)


class MsraConvMlp(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py: ConvMlp —
    ``pw2(relu(pw1(x)))`` with ConvNorms, the last one's BN weight initialised to 0."""

    def __init__(self, ed, h):
        super().__init__()
        self.pw1 = MsraConvNorm(ed, h)
        self.act = nn.ReLU()
        self.pw2 = MsraConvNorm(h, ed, bn_weight_init=0.0)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


class CascadedGroupAttention(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py:
    CascadedGroupAttention.

    Idiom: ``B, C, H, W = x.shape``; ``x.chunk(heads, dim=1)``; per head a 1x1 qkv ConvNorm
    whose output is ``view(B, -1, H, W).split([...])`` and whose q goes through a depthwise
    ConvNorm; the next head's input is ``feat + feats_in[i]`` (cascade); attention biases are
    a Parameter indexed by a long buffer (``attention_biases[:, attention_bias_idxs]``),
    cached per device string in eval (the cache is a plain dict attribute, filled during
    tracing too); proj is ``Sequential(ReLU, ConvNorm)`` on the concatenated heads."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=14,
                 kernels=(5, 5, 5, 5)):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.attn_ratio = attn_ratio
        self.qkvs = nn.ModuleList([
            MsraConvNorm(dim // num_heads, key_dim * 2 + self.val_dim)
            for _ in range(num_heads)
        ])
        self.dws = nn.ModuleList([
            MsraConvNorm(key_dim, key_dim, kernels[i], 1, kernels[i] // 2, groups=key_dim)
            for i in range(num_heads)
        ])
        self.proj = nn.Sequential(
            nn.ReLU(), MsraConvNorm(self.val_dim * num_heads, dim, bn_weight_init=0.0))
        self.resolution = resolution
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets, indices = {}, []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                if offset not in offsets:
                    offsets[offset] = len(offsets)
                indices.append(offsets[offset])
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer(
            "attention_bias_idxs",
            torch.tensor(indices, dtype=torch.long).view(len(points), len(points)),
            persistent=False)
        self.attention_bias_cache = {}

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}
        return self

    def get_attention_biases(self, device):
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x):
        B, _, H, W = x.shape
        feats_in = x.chunk(len(self.qkvs), dim=1)
        feats_out = []
        feat = feats_in[0]
        attn_bias = self.get_attention_biases(x.device)
        for head_idx, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if head_idx > 0:
                feat = feat + feats_in[head_idx]
            feat = qkv(feat)
            q, k, v = feat.view(B, -1, H, W).split([self.key_dim, self.key_dim, self.val_dim],
                                                   dim=1)
            q = dw(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            q = q * self.scale
            attn = q.transpose(-2, -1) @ k
            attn = attn + attn_bias[head_idx]
            attn = attn.softmax(dim=-1)
            feat = v @ attn.transpose(-2, -1)
            feat = feat.view(B, self.val_dim, H, W)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, 1))


class LocalWindowAttention(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py:
    LocalWindowAttention.

    Idiom: ``H = W = self.resolution`` (ints) checked against the input with
    ``_assert(H == H_)``; if the map fits one window, attention directly; otherwise
    ``permute`` to BHWC, ``F.pad(x, (0, 0, 0, pad_r, 0, pad_b))`` (a pad on a channels-last
    tensor), window partition by view/transpose/reshape/permute, attention, reverse, crop
    ``x[:, :H, :W]``. The branch depends on ints only, so it traces."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=14,
                 window_resolution=7, kernels=(5, 5, 5, 5)):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        assert window_resolution > 0
        self.window_resolution = window_resolution
        window_resolution = min(window_resolution, resolution)
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio=attn_ratio,
                                           resolution=window_resolution, kernels=kernels)

    def forward(self, x):
        H = W = self.resolution
        B, C, H_, W_ = x.shape
        torch._assert(H == H_, f"input feature has wrong size, expect {(H, W)}, got {(H_, W_)}")
        torch._assert(W == W_, f"input feature has wrong size, expect {(H, W)}, got {(H_, W_)}")
        if H <= self.window_resolution and W <= self.window_resolution:
            return self.attn(x)
        window = self.window_resolution
        x = x.permute(0, 2, 3, 1)
        pad_b = (window - H % window) % window
        pad_r = (window - W % window) % window
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // window, pW // window
        x = x.view(B, nH, window, nW, window, C).transpose(2, 3)
        x = x.reshape(B * nH * nW, window, window, C).permute(0, 3, 1, 2)
        x = self.attn(x)
        x = x.permute(0, 2, 3, 1).view(B, nH, nW, window, window, C)
        x = x.transpose(2, 3).reshape(B, pH, pW, C)
        x = x[:, :H, :W].contiguous()
        return x.permute(0, 3, 1, 2)


class EfficientVitBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py: EfficientVitBlock.

    Idiom: five ``ResidualDrop`` residuals in a row — depthwise 3x3 ConvNorm (BN weight 0),
    ConvMlp, local window attention, depthwise ConvNorm, ConvMlp."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=14,
                 window_resolution=7, kernels=(5, 5, 5, 5)):
        super().__init__()
        self.dw0 = ResidualDrop(MsraConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.ffn0 = ResidualDrop(MsraConvMlp(dim, int(dim * 2)))
        self.mixer = ResidualDrop(LocalWindowAttention(
            dim, key_dim, num_heads, attn_ratio=attn_ratio, resolution=resolution,
            window_resolution=window_resolution, kernels=kernels))
        self.dw1 = ResidualDrop(MsraConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.ffn1 = ResidualDrop(MsraConvMlp(dim, int(dim * 2)))

    def forward(self, x):
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class EfficientVitStage(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py: EfficientVitStage —
    optional ``subsample`` downsample (residual dw + mlp, PatchMerging, residual dw + mlp)
    held in an ``OrderedDict`` Sequential, then blocks."""

    def __init__(self, in_dim, out_dim, key_dim, downsample=("", 1), num_heads=8,
                 attn_ratio=4, resolution=14, window_resolution=7, kernels=(5, 5, 5, 5),
                 depth=1):
        super().__init__()
        if downsample[0] == "subsample":
            self.resolution = (resolution - 1) // downsample[1] + 1
            self.downsample = nn.Sequential()
            self.downsample.add_module("res1", nn.Sequential(
                ResidualDrop(MsraConvNorm(in_dim, in_dim, 3, 1, 1, groups=in_dim)),
                ResidualDrop(MsraConvMlp(in_dim, int(in_dim * 2)))))
            self.downsample.add_module("patchmerge", MsraPatchMerging(in_dim, out_dim))
            self.downsample.add_module("res2", nn.Sequential(
                ResidualDrop(MsraConvNorm(out_dim, out_dim, 3, 1, 1, groups=out_dim)),
                ResidualDrop(MsraConvMlp(out_dim, int(out_dim * 2)))))
        else:
            assert in_dim == out_dim
            self.downsample = nn.Identity()
            self.resolution = resolution
        self.blocks = nn.Sequential(*[
            EfficientVitBlock(out_dim, key_dim, num_heads, attn_ratio, self.resolution,
                              window_resolution, kernels)
            for _ in range(depth)
        ])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class MsraPatchEmbedding(nn.Sequential):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py: PatchEmbedding —
    four 3x3 s2 ConvNorms with ReLUs (stride 16)."""

    def __init__(self, in_chans, dim):
        super().__init__()
        self.add_module("conv1", MsraConvNorm(in_chans, dim // 8, 3, 2, 1))
        self.add_module("relu1", nn.ReLU())
        self.add_module("conv2", MsraConvNorm(dim // 8, dim // 4, 3, 2, 1))
        self.add_module("relu2", nn.ReLU())
        self.add_module("conv3", MsraConvNorm(dim // 4, dim // 2, 3, 2, 1))
        self.add_module("relu3", nn.ReLU())
        self.add_module("conv4", MsraConvNorm(dim // 2, dim, 3, 2, 1))
        self.patch_size = 16


class EfficientVitMsra(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_msra.py: EfficientVitMsra.

    Idiom: EfficientViT-M0 layout shrunk — patch embedding, a stage whose resolution exceeds
    the window (window partition), a ``subsample`` stage fitting one window, global pool and a
    BN1d/Linear head; no deploy method of its own: ``reparameterize_model`` calls each
    ConvNorm / NormLinear ``fuse()``."""

    def __init__(self, img_size=64, in_chans=3, num_classes=10, embed_dim=(16, 32),
                 key_dim=(4, 4), depth=(1, 1), num_heads=(2, 2), window_size=(2, 2),
                 kernels=(5, 3, 5, 3), down_ops=(("", 1), ("subsample", 2))):
        super().__init__()
        self.num_classes = num_classes
        self.patch_embed = MsraPatchEmbedding(in_chans, embed_dim[0])
        resolution = img_size // self.patch_embed.patch_size
        attn_ratio = [embed_dim[i] / (key_dim[i] * num_heads[i]) for i in range(len(embed_dim))]
        stages = []
        previous = embed_dim[0]
        for i, (ed, kd, dpth, nh, ar, wd, do) in enumerate(
                zip(embed_dim, key_dim, depth, num_heads, attn_ratio, window_size, down_ops)):
            stage = EfficientVitStage(previous, ed, kd, downsample=do, num_heads=nh,
                                      attn_ratio=ar, resolution=resolution,
                                      window_resolution=wd, kernels=kernels, depth=dpth)
            previous = ed
            resolution = stage.resolution
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        self.global_pool = SelectAdaptivePool2d(flatten=True)
        self.num_features = embed_dim[-1]
        self.head = MsraNormLinear(self.num_features, num_classes)

    def forward_features(self, x):
        return self.stages(self.patch_embed(x))

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _msra_block():
    # resolution 4 == window 4: the attention runs on the whole map (no partition)
    return nn.Sequential(EfficientVitBlock(16, key_dim=4, num_heads=2, attn_ratio=2,
                                           resolution=4, window_resolution=4, kernels=(5, 3)))


def _msra_window_pad():
    # resolution 5, window 4: permute to BHWC, pad by 3 on the right and bottom, 4 windows
    return nn.Sequential(
        MsraConvNorm(16, 16, 3, 1, 1, groups=16),
        ResidualDrop(LocalWindowAttention(16, key_dim=4, num_heads=2, attn_ratio=2,
                                          resolution=5, window_resolution=4, kernels=(3, 3))),
    )


# --------------------------------------------------------------------------------------------
# EfficientViT (MIT) (timm/models/efficientvit_mit.py)
# --------------------------------------------------------------------------------------------


def _pair(value, length):
    """timm's ``val2tuple``: a value, or a list/tuple padded by repeating its last entry."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    while len(values) < length:
        values.append(values[-1])
    return tuple(values)


class MitConvNormAct(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: ConvNormAct.

    Idiom: ``Dropout`` (p=0) before the conv, then ``norm`` and ``act``, each an
    ``nn.Identity`` when its layer is None; the conv from ``create_conv2d`` (symmetric
    padding), optionally with a bias that a BatchNorm then follows or not."""

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, dilation=1, groups=1,
                 bias=False, dropout=0.0, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
        super().__init__()
        self.dropout = nn.Dropout(dropout, inplace=False)
        self.conv = _create_conv2d(in_chs, out_chs, kernel_size, stride=stride,
                                   dilation=dilation, groups=groups, bias=bias)
        self.norm = norm_layer(num_features=out_chs) if norm_layer else nn.Identity()
        self.act = _make_act(act_layer, True) if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(self.dropout(x))))


class MitDSConv(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: DSConv —
    depthwise ConvNormAct then pointwise ConvNormAct (no activation after the second)."""

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, use_bias=False,
                 norm_layer=(nn.BatchNorm2d, nn.BatchNorm2d), act_layer=(nn.ReLU6, None)):
        super().__init__()
        use_bias, norm_layer, act_layer = (_pair(v, 2) for v in (use_bias, norm_layer,
                                                                 act_layer))
        self.depth_conv = MitConvNormAct(in_chs, in_chs, kernel_size, stride, groups=in_chs,
                                         norm_layer=norm_layer[0], act_layer=act_layer[0],
                                         bias=use_bias[0])
        self.point_conv = MitConvNormAct(in_chs, out_chs, 1, norm_layer=norm_layer[1],
                                         act_layer=act_layer[1], bias=use_bias[1])

    def forward(self, x):
        return self.point_conv(self.depth_conv(x))


class MitMBConv(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: MBConv —
    1x1 expand, depthwise kxk (the stride), 1x1 project; in the ViT stages ("fewer norm")
    the first two are biased convs without BatchNorm and only the projection keeps one."""

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, mid_chs=None, expand_ratio=6,
                 use_bias=False, norm_layer=(nn.BatchNorm2d,) * 3,
                 act_layer=(nn.ReLU6, nn.ReLU6, None)):
        super().__init__()
        use_bias, norm_layer, act_layer = (_pair(v, 3) for v in (use_bias, norm_layer,
                                                                 act_layer))
        mid_chs = mid_chs or round(in_chs * expand_ratio)
        self.inverted_conv = MitConvNormAct(in_chs, mid_chs, 1, stride=1,
                                            norm_layer=norm_layer[0], act_layer=act_layer[0],
                                            bias=use_bias[0])
        self.depth_conv = MitConvNormAct(mid_chs, mid_chs, kernel_size, stride=stride,
                                         groups=mid_chs, norm_layer=norm_layer[1],
                                         act_layer=act_layer[1], bias=use_bias[1])
        self.point_conv = MitConvNormAct(mid_chs, out_chs, 1, norm_layer=norm_layer[2],
                                         act_layer=act_layer[2], bias=use_bias[2])

    def forward(self, x):
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class LiteMLA(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: LiteMLA
    (lightweight multi-scale linear attention).

    Idiom: ``B, _, H, W = x.shape``; a bias-free, norm-free 1x1 ``qkv`` ConvNormAct; per
    scale an ``aggreg`` ``Sequential`` of a depthwise 5x5 conv and a grouped 1x1 conv (groups
    ``3 * heads``), both bare ``nn.Conv2d``s without bias; ``torch.cat`` of qkv and its
    aggregates, ``reshape(B, -1, 3 * dim, H * W).transpose(-1, -2)``, ``chunk(3, -1)``;
    ReLU kernel on q and k; ``F.pad(v, (0, 1), value=1.)`` (a pad with ones: the
    normaliser); attention in float32 under ``torch.autocast(..., enabled=False)``;
    ``out[..., :-1] / (out[..., -1:] + eps)``; back with ``transpose.reshape(B, -1, H, W)``;
    proj ConvNormAct (1x1 conv + BN). timm registers it as a no-trace module: symbolic tracing
    stops at ``v.device.type``."""

    def __init__(self, in_chs, out_chs, heads=None, heads_ratio=1.0, dim=8, use_bias=False,
                 norm_layer=(None, nn.BatchNorm2d), act_layer=(None, None),
                 kernel_func=nn.ReLU, scales=(5,), eps=1e-5):
        super().__init__()
        self.eps = eps
        heads = heads or int(in_chs // dim * heads_ratio)
        total_dim = heads * dim
        use_bias, norm_layer, act_layer = (_pair(v, 2) for v in (use_bias, norm_layer,
                                                                 act_layer))
        self.dim = dim
        self.qkv = MitConvNormAct(in_chs, 3 * total_dim, 1, bias=use_bias[0],
                                  norm_layer=norm_layer[0], act_layer=act_layer[0])
        self.aggreg = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(3 * total_dim, 3 * total_dim, scale, padding=scale // 2,
                          groups=3 * total_dim, bias=use_bias[0]),
                nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=use_bias[0]),
            )
            for scale in scales
        ])
        self.kernel_func = kernel_func(inplace=False)
        self.proj = MitConvNormAct(total_dim * (1 + len(scales)), out_chs, 1, bias=use_bias[1],
                                   norm_layer=norm_layer[1], act_layer=act_layer[1])

    def _attn(self, q, k, v):
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        kv = k.transpose(-1, -2) @ v
        out = q @ kv
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return out.to(dtype)

    def forward(self, x):
        B, _, H, W = x.shape
        qkv = self.qkv(x)
        scales = [qkv]
        for op in self.aggreg:
            scales.append(op(qkv))
        qkv = torch.cat(scales, dim=1)
        qkv = qkv.reshape(B, -1, 3 * self.dim, H * W).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        q = self.kernel_func(q)
        k = self.kernel_func(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        if not torch.jit.is_scripting():
            with torch.autocast(device_type=v.device.type, enabled=False):
                out = self._attn(q, k, v)
        else:
            out = self._attn(q, k, v)
        out = out.transpose(-1, -2).reshape(B, -1, H, W)
        return self.proj(out)


class MitResidualBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: ResidualBlock —
    ``main(pre_norm(x)) + shortcut(x)``; the shortcut an ``nn.Identity`` (or None: no
    residual, the downsampling blocks), the pre-norm an ``nn.Identity``."""

    def __init__(self, main, shortcut=None, pre_norm=None):
        super().__init__()
        self.pre_norm = pre_norm if pre_norm is not None else nn.Identity()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x):
        res = self.main(self.pre_norm(x))
        if self.shortcut is not None:
            res = res + self.shortcut(x)
        return res


class MitEfficientVitBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: EfficientVitBlock —
    a LiteMLA residual (context) then an MBConv residual (local) whose first two convs are
    biased, norm-free and Hardswish-activated."""

    def __init__(self, in_chs, heads_ratio=1.0, head_dim=32, expand_ratio=4,
                 norm_layer=nn.BatchNorm2d, act_layer=nn.Hardswish):
        super().__init__()
        self.context_module = MitResidualBlock(
            LiteMLA(in_chs, in_chs, heads_ratio=heads_ratio, dim=head_dim,
                    norm_layer=(None, norm_layer)),
            nn.Identity())
        self.local_module = MitResidualBlock(
            MitMBConv(in_chs, in_chs, expand_ratio=expand_ratio, use_bias=(True, True, False),
                      norm_layer=(None, None, norm_layer), act_layer=(act_layer, act_layer, None)),
            nn.Identity())

    def forward(self, x):
        return self.local_module(self.context_module(x))


def _mit_local_block(in_chs, out_chs, stride, expand_ratio, norm_layer, act_layer,
                     fewer_norm=False):
    """timm's ``build_local_block`` (``block_type='default'``): a DSConv when the expand
    ratio is 1, else an MBConv; "fewer norm" drops the BatchNorms of all but the last conv
    and gives those convs a bias."""
    if expand_ratio == 1:
        return MitDSConv(in_chs, out_chs, stride=stride,
                         use_bias=(True, False) if fewer_norm else False,
                         norm_layer=(None, norm_layer) if fewer_norm else norm_layer,
                         act_layer=(act_layer, None))
    return MitMBConv(in_chs, out_chs, stride=stride, expand_ratio=expand_ratio,
                     use_bias=(True, True, False) if fewer_norm else False,
                     norm_layer=(None, None, norm_layer) if fewer_norm else norm_layer,
                     act_layer=(act_layer, act_layer, None))


class MitStem(nn.Sequential):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: Stem — a 3x3 s2
    ConvNormAct, then ``depth`` DSConv residuals named ``res0``, ``res1`` ..."""

    def __init__(self, in_chs, out_chs, depth, norm_layer, act_layer):
        super().__init__()
        self.stride = 2
        self.add_module("in_conv", MitConvNormAct(in_chs, out_chs, 3, stride=2,
                                                  norm_layer=norm_layer, act_layer=act_layer))
        for index in range(depth):
            self.add_module(f"res{index}", MitResidualBlock(
                _mit_local_block(out_chs, out_chs, 1, 1, norm_layer, act_layer), nn.Identity()))


class MitEfficientVitStage(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: EfficientVitStage —
    a strided MBConv without residual (shortcut None), then MBConv residuals (stages 1-2)
    or EfficientVitBlocks (the ViT stages 3-4, whose downsampling MBConv has fewer norms)."""

    def __init__(self, in_chs, out_chs, depth, norm_layer, act_layer, expand_ratio, head_dim,
                 vit_stage=False):
        super().__init__()
        blocks = [MitResidualBlock(
            _mit_local_block(in_chs, out_chs, 2, expand_ratio, norm_layer, act_layer,
                             fewer_norm=vit_stage),
            None)]
        if vit_stage:
            blocks += [MitEfficientVitBlock(out_chs, head_dim=head_dim, expand_ratio=expand_ratio,
                                            norm_layer=norm_layer, act_layer=act_layer)
                       for _ in range(depth)]
        else:
            blocks += [MitResidualBlock(
                _mit_local_block(out_chs, out_chs, 1, expand_ratio, norm_layer, act_layer),
                nn.Identity()) for _ in range(1, depth)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class MitClassifierHead(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: ClassifierHead —
    1x1 ConvNormAct (Hardswish), global average pool with flatten, then ``Sequential(Linear
    without bias, LayerNorm, Hardswish, Dropout, Linear)``; ``pre_logits`` runs the first
    four by index."""

    def __init__(self, in_chs, widths, num_classes=1000, dropout=0.0,
                 norm_layer=nn.BatchNorm2d, act_layer=nn.Hardswish, norm_eps=1e-5):
        super().__init__()
        self.in_conv = MitConvNormAct(in_chs, widths[0], 1, norm_layer=norm_layer,
                                      act_layer=act_layer)
        self.global_pool = SelectAdaptivePool2d(flatten=True)
        self.classifier = nn.Sequential(
            nn.Linear(widths[0], widths[1], bias=False),
            nn.LayerNorm(widths[1], eps=norm_eps),
            _make_act(act_layer, True) if act_layer is not None else nn.Identity(),
            nn.Dropout(dropout, inplace=False),
            nn.Linear(widths[1], num_classes, bias=True) if num_classes > 0 else nn.Identity(),
        )

    def forward(self, x, pre_logits: bool = False):
        x = self.global_pool(self.in_conv(x))
        if pre_logits:
            for index in range(4):
                x = self.classifier[index](x)
            return x
        return self.classifier(x)


class EfficientVitMit(nn.Module):
    """huggingface/pytorch-image-models timm/models/efficientvit_mit.py: EfficientVit.

    Idiom: EfficientViT-B0's configuration (``widths=(8, 16, 32, 64, 128)``,
    ``depths=(1, 2, 2, 2, 2)``, ``head_dim=16``, Hardswish, BatchNorm2d) with the head
    shrunk (``head_widths`` (1024, 1280) -> (64, 80), 10 classes), on 64x64 inputs: stem
    with a DSConv residual, two MBConv stages, two ViT stages (LiteMLA + MBConv blocks,
    "fewer norm" downsampling). timm has no deploy conversion for it (no ``fuse`` /
    ``reparameterize``): only Conv+BN pairs fold, and BatchNorm-free biased convs stay."""

    def __init__(self, in_chans=3, widths=(8, 16, 32, 64, 128), depths=(1, 2, 2, 2, 2),
                 head_dim=16, expand_ratio=4, norm_layer=nn.BatchNorm2d, act_layer=nn.Hardswish,
                 head_widths=(64, 80), drop_rate=0.0, num_classes=10):
        super().__init__()
        self.stem = MitStem(in_chans, widths[0], depths[0], norm_layer, act_layer)
        self.stages = nn.Sequential()
        in_chs = widths[0]
        for index, (width, depth) in enumerate(zip(widths[1:], depths[1:])):
            self.stages.append(MitEfficientVitStage(
                in_chs, width, depth=depth, norm_layer=norm_layer, act_layer=act_layer,
                expand_ratio=expand_ratio, head_dim=head_dim, vit_stage=index >= 2))
            in_chs = width
        self.num_features = in_chs
        self.head = MitClassifierHead(in_chs, head_widths, num_classes=num_classes,
                                      dropout=drop_rate)

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# TinyViT (timm/models/tiny_vit.py)
# --------------------------------------------------------------------------------------------


class TinyVitConvNorm(nn.Sequential):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: ConvNorm.

    Idiom: ``nn.Sequential`` with ``conv`` / ``bn``; ``fuse()`` returns a new ``nn.Conv2d``
    (timm: default dtype; here the weight's dtype)."""

    def __init__(self, in_chs, out_chs, ks=1, stride=1, pad=0, dilation=1, groups=1,
                 bn_weight_init=1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, ks, stride, pad, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self):
        conv, bn = self.conv, self.bn
        scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
        weight = conv.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5
        fused = nn.Conv2d(weight.size(1) * conv.groups, weight.size(0), weight.shape[2:],
                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          groups=conv.groups, dtype=weight.dtype, device=weight.device)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(bias)
        return fused


class TinyVitPatchEmbed(nn.Module):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: PatchEmbed — two 3x3 s2
    ConvNorms with GELU between."""

    def __init__(self, in_chs, out_chs, act_layer):
        super().__init__()
        self.stride = 4
        self.conv1 = TinyVitConvNorm(in_chs, out_chs // 2, 3, 2, 1)
        self.act = act_layer()
        self.conv2 = TinyVitConvNorm(out_chs // 2, out_chs, 3, 2, 1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class MBConv(nn.Module):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: MBConv.

    Idiom: 1x1 / depthwise 3x3 / 1x1 ConvNorms with GELUs, last BN weight initialised to 0,
    an in-place residual ``x += shortcut`` *before* the final activation."""

    def __init__(self, in_chs, out_chs, expand_ratio, act_layer):
        super().__init__()
        mid = int(in_chs * expand_ratio)
        self.conv1 = TinyVitConvNorm(in_chs, mid, ks=1)
        self.act1 = act_layer()
        self.conv2 = TinyVitConvNorm(mid, mid, ks=3, stride=1, pad=1, groups=mid)
        self.act2 = act_layer()
        self.conv3 = TinyVitConvNorm(mid, out_chs, ks=1, bn_weight_init=0.0)
        self.act3 = act_layer()
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.act2(x)
        x = self.conv3(x)
        x = self.drop_path(x)
        x += shortcut
        return self.act3(x)


class TinyVitPatchMerging(nn.Module):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: PatchMerging — 1x1,
    depthwise 3x3 s2, 1x1 ConvNorms with activations."""

    def __init__(self, dim, out_dim, act_layer):
        super().__init__()
        self.conv1 = TinyVitConvNorm(dim, out_dim, 1, 1, 0)
        self.act1 = act_layer()
        self.conv2 = TinyVitConvNorm(out_dim, out_dim, 3, 2, 1, groups=out_dim)
        self.act2 = act_layer()
        self.conv3 = TinyVitConvNorm(out_dim, out_dim, 1, 1, 0)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(x)


class TinyVitConvLayer(nn.Module):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: ConvLayer — MBConv stack."""

    def __init__(self, dim, depth, act_layer, conv_expand_ratio=4.0):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.blocks = nn.Sequential(*[
            MBConv(dim, dim, conv_expand_ratio, act_layer) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class TinyVitNormMlp(nn.Module):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: NormMlp — LayerNorm, fc1,
    GELU, fc2 on tokens."""

    def __init__(self, in_features, hidden_features=None, act_layer=nn.GELU):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(0.0)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        x = self.act(self.fc1(self.norm(x)))
        return self.drop2(self.fc2(self.drop1(x)))


class TinyVitAttention(nn.Module):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: Attention — LayerNorm,
    qkv Linear, ``view(B, N, heads, -1).split``, biases indexed by a long buffer and cached
    per device string, SDPA with the bias as ``attn_mask``, proj."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=(14, 14)):
        super().__init__()
        assert isinstance(resolution, tuple) and len(resolution) == 2
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.out_dim = self.val_dim * num_heads
        self.resolution = resolution
        self.fused_attn = True
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (self.val_dim + 2 * key_dim))
        self.proj = nn.Linear(self.out_dim, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets, indices = {}, []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                if offset not in offsets:
                    offsets[offset] = len(offsets)
                indices.append(offsets[offset])
        self.attention_biases = nn.Parameter(
            torch.zeros(num_heads, resolution[0] * resolution[1]))
        self.register_buffer(
            "attention_bias_idxs",
            torch.tensor(indices, dtype=torch.long).view(len(points), len(points)),
            persistent=False)
        self.attention_bias_cache = {}

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}
        return self

    def get_attention_biases(self, device):
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x):
        attn_bias = self.get_attention_biases(x.device)
        B, N, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, N, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = (attn + attn_bias).softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, N, self.out_dim)
        return self.proj(x)


class TinyVitBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: TinyVitBlock.

    Idiom: BHWC input, ``B, H, W, C = x.shape`` then ``if H == self.window_size and
    W == self.window_size`` (a branch on traced shapes: ``symbolic_trace`` fails, timm
    registers the block with ``register_notrace_module``); else window padding
    ``F.pad(x, (0, 0, 0, pad_r, 0, pad_b))`` on BHWC, partition, attention, reverse, crop;
    then ``permute`` to NCHW for a depthwise ``local_conv`` ConvNorm, ``reshape(B, C, L)
    .transpose(1, 2)`` back to tokens for the MLP residual."""

    def __init__(self, dim, num_heads, window_size=7, mlp_ratio=4.0, local_conv_size=3,
                 act_layer=nn.GELU):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        assert window_size > 0
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        assert dim % num_heads == 0
        head_dim = dim // num_heads
        self.attn = TinyVitAttention(dim, head_dim, num_heads, attn_ratio=1,
                                     resolution=(window_size, window_size))
        self.drop_path1 = nn.Identity()
        self.mlp = TinyVitNormMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = nn.Identity()
        self.local_conv = TinyVitConvNorm(dim, dim, ks=local_conv_size, stride=1,
                                          pad=local_conv_size // 2, groups=dim)

    def forward(self, x):
        B, H, W, C = x.shape
        L = H * W
        shortcut = x
        if H == self.window_size and W == self.window_size:
            x = x.reshape(B, L, C)
            x = self.attn(x)
            x = x.view(B, H, W, C)
        else:
            ws = self.window_size
            pad_b = (ws - H % ws) % ws
            pad_r = (ws - W % ws) % ws
            padding = pad_b > 0 or pad_r > 0
            if padding:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            pH, pW = H + pad_b, W + pad_r
            nH, nW = pH // ws, pW // ws
            x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws * ws, C)
            x = self.attn(x)
            x = x.view(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
            if padding:
                x = x[:, :H, :W].contiguous()
        x = shortcut + self.drop_path1(x)
        x = x.permute(0, 3, 1, 2)
        x = self.local_conv(x)
        x = x.reshape(B, C, L).transpose(1, 2)
        x = x + self.drop_path2(self.mlp(x))
        return x.view(B, H, W, C)


class TinyVitStage(nn.Module):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: TinyVitStage — PatchMerging
    downsample on NCHW, ``permute(0, 2, 3, 1)`` to BHWC for the blocks and back."""

    def __init__(self, dim, out_dim, depth, num_heads, window_size, mlp_ratio=4.0,
                 downsample=None, local_conv_size=3, act_layer=nn.GELU):
        super().__init__()
        self.depth = depth
        self.out_dim = out_dim
        if downsample is not None:
            self.downsample = downsample(dim=dim, out_dim=out_dim, act_layer=act_layer)
        else:
            assert dim == out_dim
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            TinyVitBlock(out_dim, num_heads, window_size, mlp_ratio, local_conv_size,
                         act_layer)
            for _ in range(depth)])

    def forward(self, x):
        x = self.downsample(x)
        x = x.permute(0, 2, 3, 1)
        x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    """huggingface/pytorch-image-models timm/layers/norm.py: LayerNorm2d — permute to
    channels-last, ``F.layer_norm``, permute back."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class NormMlpClassifierHead(nn.Module):
    """huggingface/pytorch-image-models timm/layers/classifier.py: NormMlpClassifierHead —
    pool (keepdim), LayerNorm2d, flatten, (no pre-logits MLP), dropout, Linear."""

    def __init__(self, in_features, num_classes, norm_eps=1e-5):
        super().__init__()
        self.global_pool = SelectAdaptivePool2d(flatten=False)
        self.norm = LayerNorm2d(in_features, eps=norm_eps)
        self.flatten = nn.Flatten(1)
        self.pre_logits = nn.Identity()
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        x = self.norm(x)
        x = self.flatten(x)
        x = self.pre_logits(x)
        x = self.drop(x)
        if pre_logits:
            return x
        return self.fc(x)


class TinyVit(nn.Module):
    """huggingface/pytorch-image-models timm/models/tiny_vit.py: TinyVit.

    Idiom: ConvNorm patch embed, an MBConv stage, then TinyViT stages (here one whose map is
    larger than its window — partition — and one whose map equals its window), a
    NormMlpClassifierHead; deployed by ``reparameterize_model`` (ConvNorm ``fuse()``)."""

    def __init__(self, in_chans=3, num_classes=10, embed_dims=(8, 16, 32), depths=(1, 1, 1),
                 num_heads=(1, 2, 4), window_sizes=(4, 2, 2), mlp_ratio=2.0,
                 mbconv_expand_ratio=2.0, local_conv_size=3, act_layer=nn.GELU):
        super().__init__()
        self.num_classes = num_classes
        self.patch_embed = TinyVitPatchEmbed(in_chans, embed_dims[0], act_layer)
        self.stages = nn.Sequential()
        previous = embed_dims[0]
        for index in range(len(depths)):
            if index == 0:
                stage = TinyVitConvLayer(previous, depths[0], act_layer, mbconv_expand_ratio)
            else:
                stage = TinyVitStage(embed_dims[index - 1], embed_dims[index], depths[index],
                                     num_heads[index], window_sizes[index], mlp_ratio,
                                     downsample=TinyVitPatchMerging,
                                     local_conv_size=local_conv_size, act_layer=act_layer)
                previous = embed_dims[index]
            self.stages.append(stage)
        self.num_features = embed_dims[-1]
        self.head = NormMlpClassifierHead(self.num_features, num_classes)

    def forward_features(self, x):
        return self.stages(self.patch_embed(x))

    def forward_head(self, x):
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _tinyvit_mbconv():
    return nn.Sequential(TinyVitConvLayer(16, 2, nn.GELU, conv_expand_ratio=2.0))


def _tinyvit_window_pad():
    # 10x10 -> PatchMerging -> 5x5 with window 4: padded to 8x8, four windows
    return TinyVitStage(16, 16, 1, num_heads=2, window_size=4, mlp_ratio=2.0,
                        downsample=TinyVitPatchMerging)


# --------------------------------------------------------------------------------------------
# MobileViT (timm/models/mobilevit.py, built on timm/models/byobnet.py)
# --------------------------------------------------------------------------------------------


class _VitAttention(nn.Module):
    """huggingface/pytorch-image-models timm/layers/attention.py: Attention (as used by
    vision_transformer.py Block) — ``B, N, C = x.shape``, qkv Linear with bias, SDPA."""

    def __init__(self, dim, num_heads=4, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


class _VitMlp(nn.Module):
    """huggingface/pytorch-image-models timm/layers/mlp.py: Mlp — fc1, act, fc2."""

    def __init__(self, dim, hidden, act_layer):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class _VitBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/vision_transformer.py: Block — pre-norm
    residual attention and MLP with Identity layer scales."""

    def __init__(self, dim, num_heads, mlp_ratio, act_layer):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _VitAttention(dim, num_heads)
        self.ls1 = nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _VitMlp(dim, int(dim * mlp_ratio), act_layer)
        self.ls2 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MobileVitBlock(nn.Module):
    """huggingface/pytorch-image-models timm/models/mobilevit.py: MobileVitBlock.

    Idiom: ``ConvNormAct`` kxk then a bias-free 1x1 conv (no norm), ``B, C, H, W = x.shape``,
    ``math.ceil(H / patch_h) * patch_h`` and, when the map is not a multiple of the patch,
    bilinear ``F.interpolate`` up and back down; unfold / fold of patches by chains of
    ``reshape``/``transpose`` (``[B, C, H, W] -> [B*P, N, C]``), transformer blocks,
    ``ConvNormAct`` 1x1 projection and a ``ConvNormAct`` kxk fusion of
    ``torch.cat((shortcut, x), 1)``. timm marks it ``register_notrace_module``."""

    def __init__(self, in_chs, out_chs=None, kernel_size=3, stride=1, mlp_ratio=2.0,
                 transformer_dim=None, transformer_depth=2, patch_size=8, num_heads=4,
                 no_fusion=False, act_layer=nn.SiLU):
        super().__init__()
        out_chs = out_chs or in_chs
        transformer_dim = transformer_dim or _make_divisible(in_chs)
        self.conv_kxk = ConvNormAct(in_chs, in_chs, kernel_size, stride=stride,
                                    act_layer=act_layer)
        self.conv_1x1 = nn.Conv2d(in_chs, transformer_dim, kernel_size=1, bias=False)
        self.transformer = nn.Sequential(*[
            _VitBlock(transformer_dim, num_heads, mlp_ratio, act_layer)
            for _ in range(transformer_depth)])
        self.norm = nn.LayerNorm(transformer_dim)
        self.conv_proj = ConvNormAct(transformer_dim, out_chs, 1, act_layer=act_layer)
        if no_fusion:
            self.conv_fusion = None
        else:
            self.conv_fusion = ConvNormAct(in_chs + out_chs, out_chs, kernel_size,
                                           act_layer=act_layer)
        self.patch_size = (patch_size, patch_size)
        self.patch_area = patch_size * patch_size

    def forward(self, x):
        shortcut = x
        x = self.conv_kxk(x)
        x = self.conv_1x1(x)
        patch_h, patch_w = self.patch_size
        B, C, H, W = x.shape
        new_h, new_w = math.ceil(H / patch_h) * patch_h, math.ceil(W / patch_w) * patch_w
        num_patch_h, num_patch_w = new_h // patch_h, new_w // patch_w
        num_patches = num_patch_h * num_patch_w
        interpolate = False
        if new_h != H or new_w != W:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
            interpolate = True
        x = x.reshape(B * C * num_patch_h, patch_h, num_patch_w, patch_w).transpose(1, 2)
        x = (x.reshape(B, C, num_patches, self.patch_area).transpose(1, 3)
             .reshape(B * self.patch_area, num_patches, -1))
        x = self.transformer(x)
        x = self.norm(x)
        x = x.contiguous().view(B, self.patch_area, num_patches, -1)
        x = x.transpose(1, 3).reshape(B * C * num_patch_h, num_patch_w, patch_h, patch_w)
        x = x.transpose(1, 2).reshape(B, C, num_patch_h * patch_h, num_patch_w * patch_w)
        if interpolate:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        x = self.conv_proj(x)
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


class InvertedBottleneck(nn.Module):
    """huggingface/pytorch-image-models timm/models/byobnet.py: BottleneckBlock with
    ``bottle_in=True, linear_out=True, gs=1`` (MobileViT's inverted residual): 1x1
    ConvNormAct, depthwise kxk ConvNormAct, 1x1 ConvNormAct without act; the shortcut is an
    Identity or ``None`` (``downsample=''``), tested with ``if self.shortcut is not None``."""

    def __init__(self, in_chs, out_chs, stride=1, bottle_ratio=2.0, act_layer=nn.SiLU):
        super().__init__()
        mid = _make_divisible(in_chs * bottle_ratio)
        same = in_chs == out_chs and stride == 1
        self.shortcut = nn.Identity() if same else None
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act_layer=act_layer)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride=stride, groups=mid,
                                     act_layer=act_layer)
        self.conv2b_kxk = nn.Identity()
        self.attn = nn.Identity()
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, apply_act=False)
        self.attn_last = nn.Identity()
        self.drop_path = nn.Identity()
        self.act = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv1_1x1(x)
        x = self.conv2_kxk(x)
        x = self.conv2b_kxk(x)
        x = self.attn(x)
        x = self.conv3_1x1(x)
        x = self.attn_last(x)
        x = self.drop_path(x)
        if self.shortcut is not None:
            x = x + self.shortcut(shortcut)
        return self.act(x)


class MobileVitTiny(nn.Module):
    """huggingface/pytorch-image-models timm/models/mobilevit.py: mobilevit_xxs layout on
    ByobNet (byobnet.py: ByobNet) shrunk — 3x3 s2 ConvNormAct stem, inverted residuals,
    two (inverted residual s2 + MobileVitBlock) stages (the second on an odd map, so the
    interpolate branch runs), 1x1 ConvNormAct ``final_conv``, ClassifierHead. timm has no
    deploy conversion for it (``reparameterize_model`` finds nothing to call)."""

    def __init__(self, in_chans=3, num_classes=10, act_layer=nn.SiLU):
        super().__init__()
        self.stem = ConvNormAct(in_chans, 8, 3, stride=2, act_layer=act_layer)
        self.stages = nn.Sequential(
            nn.Sequential(InvertedBottleneck(8, 8, 1, 2.0, act_layer)),
            nn.Sequential(
                InvertedBottleneck(8, 16, 2, 2.0, act_layer),
                MobileVitBlock(16, 16, transformer_dim=16, transformer_depth=1,
                               patch_size=2, num_heads=2, act_layer=act_layer)),
            nn.Sequential(
                InvertedBottleneck(16, 24, 2, 2.0, act_layer),
                MobileVitBlock(24, 24, transformer_dim=32, transformer_depth=1,
                               patch_size=2, num_heads=2, act_layer=act_layer)),
        )
        self.final_conv = ConvNormAct(24, 32, 1, act_layer=act_layer)
        self.head = ClassifierHead(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.stages(x)
        x = self.final_conv(x)
        return self.head(x)


def _mobilevit_block_interpolate():
    # 6x6 map, patch 4: interpolated up to 8x8 and back
    return MobileVitBlock(16, 16, transformer_dim=16, transformer_depth=1, patch_size=4,
                          num_heads=2)


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


def _src(path, *names):
    return f"{_TIMM} {path}: {', '.join(names)}"


IDIOMS: list[Idiom] = [
    # FastViT
    Idiom(
        name="timm.fastvit_mobileone",
        library="timm",
        source=_src("timm/models/fastvit.py", "MobileOneBlock"),
        build=_fastvit_mobileone_blocks,
        input_shape=(2, 16, 16, 16),
        reparameterize=reparameterize_model,
        notes="literal-0 seeded sums, out += branch(x) over 2-3 ConvNormAct branches, 1x1 scale "
              "branch and bare-BN identity, dense/depthwise/strided/1x1, SE between sum and "
              "GELU; BNs are BatchNormAct2d (ndim assert, F.batch_norm)",
    ),
    Idiom(
        name="timm.fastvit_repmixer",
        library="timm",
        source=_src("timm/models/fastvit.py", "RepMixer", "RepMixerBlock", "MobileOneBlock",
                    "LayerScale2d", "ConvMlp"),
        build=_fastvit_repmixer_blocks,
        input_shape=(2, 16, 8, 8),
        reparameterize=reparameterize_model,
        notes="x + gamma * (mixer(x) - norm(x)): a subtraction of a BN-only MobileOne branch, "
              "LayerScale2d gamma (C,1,1) on the difference, identity added outside; then "
              "x + gamma2 * mlp(x) after a dw7x7 ConvNormAct -> 1x1 -> GELU -> 1x1",
    ),
    Idiom(
        name="timm.fastvit_cpe_attention",
        library="timm",
        source=_src("timm/models/fastvit.py", "RepConditionalPosEnc", "AttentionBlock",
                    "Attention", "LayerScale2d"),
        build=_fastvit_cpe_attention,
        input_shape=(2, 32, 4, 4),
        reparameterize=reparameterize_model,
        notes="CPE pos_enc(x) + x (dw 7x7 conv with bias, no BN, on a 4x4 map); a BatchNorm2d "
              "after a residual add feeding B,C,H,W = x.shape / flatten / transpose / bias-free "
              "qkv Linear; layer scales after the proj Linear seen through transpose+reshape",
    ),
    Idiom(
        name="timm.fastvit_patch_embed",
        library="timm",
        source=_src("timm/models/fastvit.py", "PatchEmbed", "ReparamLargeKernelConv",
                    "MobileOneBlock"),
        build=_fastvit_patch_embed,
        input_shape=(2, 16, 16, 16),
        reparameterize=reparameterize_model,
        notes="grouped 7x7 s2 ConvNormAct + 3x3 s2 ConvNormAct summed (small kernel padded by 2), "
              "with SE and GELU after the sum in the MCi variant (lkc_use_act), then a 1x1 "
              "MobileOne block with identity BN",
    ),
    Idiom(
        name="timm.fastvit_sa_tiny",
        library="timm",
        source=_src("timm/models/fastvit.py", "FastVit", "convolutional_stem", "FastVitStage",
                    "RepMixerBlock", "AttentionBlock", "PatchEmbed", "RepConditionalPosEnc")
        + "; timm/utils/model.py: reparameterize_model",
        build=_fastvit_tiny,
        reparameterize=reparameterize_model,
        notes="whole FastViT-SA-like model: MobileOne stem, RepMixer stage, PatchEmbed + CPE + "
              "attention stage, final MobileOne conv with SE (grouped, no identity), "
              "ClassifierHead; deployed by timm's reparameterize_model walk",
    ),
    Idiom(
        name="timm.fastvit_mci_tiny",
        library="timm",
        source=_src("timm/models/fastvit.py", "FastVit", "PatchEmbed", "ReparamLargeKernelConv")
        + "; timm/utils/model.py: reparameterize_model",
        build=_fastvit_mci_tiny,
        reparameterize=reparameterize_model,
        notes="whole MobileCLIP MCi-like FastViT: se_downsamples and lkc_use_act put SE and GELU "
              "between the large-kernel sum and the next MobileOne block; three stages",
    ),
    # RepViT
    Idiom(
        name="timm.repvit_repvggdw",
        library="timm",
        source=_src("timm/models/repvit.py", "RepVggDw", "ConvNorm"),
        build=_repvggdw_blocks,
        input_shape=(2, 16, 16, 16),
        reparameterize=reparameterize_model,
        notes="BatchNorm after the three-way sum bn(conv(x) + conv1(x) + x): conv1 a bare dw 1x1 "
              "conv with bias, conv a ConvNorm (nn.Sequential 'c','bn'); the sum's BN has no conv "
              "directly before it",
    ),
    Idiom(
        name="timm.repvit_repvggdw_legacy",
        library="timm",
        source=_src("timm/models/repvit.py", "RepVggDw", "ConvNorm"),
        build=_repvggdw_legacy_blocks,
        input_shape=(2, 16, 16, 16),
        reparameterize=reparameterize_model,
        notes="legacy RepVggDw: conv1 is a ConvNorm and the outer bn an nn.Identity, i.e. "
              "identity(conv_bn(x) + conv_bn_1x1(x) + x)",
    ),
    Idiom(
        name="timm.repvit_block_se",
        library="timm",
        source=_src("timm/models/repvit.py", "RepViTBlock", "RepVggDw", "RepVitMlp")
        + "; timm/layers/squeeze_excite.py: SEModule",
        build=_repvit_se_block,
        input_shape=(2, 16, 8, 8),
        reparameterize=reparameterize_model,
        must_remain={"mul": 1},
        notes="negative: the SE gate x * sigmoid(fc2(relu(fc1(mean(x))))) multiplies the "
              "BN-after-sum output by a per-sample (B,C,1,1) tensor that broadcasts like a "
              "channel scale but is data-dependent: it must stay a mul",
    ),
    Idiom(
        name="timm.repvit_tiny",
        library="timm",
        source=_src("timm/models/repvit.py", "RepVit", "RepVitStem", "RepVitStage",
                    "RepVitDownsample", "RepViTBlock", "RepVggDw", "RepVitClassifier",
                    "NormLinear"),
        build=RepVit,
        reparameterize=_repvit_fuse,
        notes="whole RepViT: ConvNorm stem, RepVggDw blocks (BN after sum) with alternating SE, "
              "downsample, x.mean((2,3)) then two BatchNorm1d+Linear heads averaged "
              "(x1 + x2) / 2; deployed by the model's own fuse() walk",
    ),
    # EfficientViT (MSRA)
    Idiom(
        name="timm.efficientvit_msra_block",
        library="timm",
        source=_src("timm/models/efficientvit_msra.py", "EfficientVitBlock", "ResidualDrop",
                    "ConvNorm", "ConvMlp", "LocalWindowAttention", "CascadedGroupAttention"),
        build=_msra_block,
        input_shape=(2, 16, 4, 4),
        reparameterize=reparameterize_model,
        notes="five x + m(x) residuals; cascaded group attention: chunk over heads, qkv "
              "ConvNorm -> view(B,-1,H,W).split, dw ConvNorm on q only, attention biases "
              "indexed by a long buffer and cached in a dict, proj Sequential(ReLU, ConvNorm)",
    ),
    Idiom(
        name="timm.efficientvit_msra_window_pad",
        library="timm",
        source=_src("timm/models/efficientvit_msra.py", "LocalWindowAttention",
                    "CascadedGroupAttention", "ConvNorm", "ResidualDrop"),
        build=_msra_window_pad,
        input_shape=(2, 16, 5, 5),
        reparameterize=reparameterize_model,
        must_remain={"pad": 1},
        notes="negative: F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) on a permuted BHWC tensor, then "
              "window partition (view/transpose/reshape/permute) before the qkv 1x1 ConvNorm: "
              "the pad is neither NCHW nor adjacent to a conv and must not be folded into one",
    ),
    Idiom(
        name="timm.efficientvit_msra_m0_tiny",
        library="timm",
        source=_src("timm/models/efficientvit_msra.py", "EfficientVitMsra",
                    "PatchEmbedding", "EfficientVitStage", "PatchMerging", "NormLinear")
        + "; timm/utils/model.py: reparameterize_model",
        build=EfficientVitMsra,
        input_shape=(2, 3, 64, 64),
        reparameterize=reparameterize_model,
        notes="whole EfficientViT-M0-like model at 64x64: stride-16 ConvNorm patch embed, a "
              "window-partitioned stage (4x4 map, window 2), a subsample stage with PatchMerging "
              "(SE), BN1d+Linear head; _assert(H == H_) against int resolutions",
    ),
    # EfficientViT (MIT)
    Idiom(
        name="timm.efficientvit_mit_b0_tiny",
        library="timm",
        source=_src("timm/models/efficientvit_mit.py", "EfficientVit", "Stem",
                    "EfficientVitStage", "EfficientVitBlock", "LiteMLA", "MBConv", "DSConv",
                    "ConvNormAct", "ResidualBlock", "ClassifierHead"),
        build=EfficientVitMit,
        input_shape=(2, 3, 64, 64),
        reparameterize=None,
        traceable=False,
        notes="whole EfficientViT-B0 (widths, depths, head_dim 16) with a shrunk head at "
              "64x64: DSConv/MBConv residuals with nn.Identity shortcuts, 'fewer norm' biased "
              "convs without BN, LiteMLA (B, _, H, W = x.shape, cat of qkv and its dw5x5 -> "
              "grouped-1x1 aggregate, reshape/transpose/chunk, F.pad(v, (0, 1), value=1), "
              "float attention under autocast(enabled=False)), Linear/LayerNorm head. "
              "symbolic_trace stops at v.device.type; timm has no deploy conversion",
    ),
    # TinyViT
    Idiom(
        name="timm.tinyvit_mbconv",
        library="timm",
        source=_src("timm/models/tiny_vit.py", "ConvLayer", "MBConv", "ConvNorm"),
        build=_tinyvit_mbconv,
        input_shape=(2, 16, 8, 8),
        reparameterize=reparameterize_model,
        notes="MBConv with in-place residual x += shortcut before the final GELU; ConvNorm "
              "(nn.Sequential conv/bn) whose last BN weight is initialised to 0",
    ),
    Idiom(
        name="timm.tinyvit_window_pad",
        library="timm",
        source=_src("timm/models/tiny_vit.py", "TinyVitStage", "TinyVitBlock", "Attention",
                    "PatchMerging", "ConvNorm"),
        build=_tinyvit_window_pad,
        input_shape=(2, 16, 10, 10),
        reparameterize=reparameterize_model,
        traceable=False,
        must_remain={"pad": 1},
        notes="negative: 5x5 BHWC map with window 4 -> F.pad(x, (0, 0, 0, 3, 0, 3)) on "
              "channels-last tokens, then window partition; the pad must survive. Untraceable: "
              "if H == self.window_size on traced shapes; local_conv ConvNorm sits between "
              "permute(0,3,1,2) and reshape(B,C,L).transpose(1,2)",
    ),
    Idiom(
        name="timm.tinyvit_tiny",
        library="timm",
        source=_src("timm/models/tiny_vit.py", "TinyVit", "PatchEmbed", "ConvLayer",
                    "TinyVitStage", "TinyVitBlock", "PatchMerging")
        + "; timm/layers/classifier.py: NormMlpClassifierHead",
        build=TinyVit,
        reparameterize=reparameterize_model,
        traceable=False,
        notes="whole TinyViT: ConvNorm stem, MBConv stage, a window-partitioned stage and a "
              "map == window stage (both branches of the shape check), LayerNorm2d head; "
              "symbolic_trace fails on if H == self.window_size",
    ),
    # MobileViT
    Idiom(
        name="timm.mobilevit_block_interpolate",
        library="timm",
        source=_src("timm/models/mobilevit.py", "MobileVitBlock")
        + "; timm/layers/conv_bn_act.py: ConvNormAct",
        build=_mobilevit_block_interpolate,
        input_shape=(2, 16, 6, 6),
        reparameterize=None,
        traceable=False,
        notes="math.ceil(H / patch_h) * patch_h on traced shapes (untraceable), bilinear "
              "interpolate 6->8 and back around unfold/fold reshapes; ConvNormAct(+SiLU) -> "
              "bias-free 1x1 conv, cat(shortcut, x) -> ConvNormAct fusion; timm has no deploy "
              "conversion (only the conv+BN pairs are foldable)",
    ),
    Idiom(
        name="timm.mobilevit_tiny",
        library="timm",
        source=_src("timm/models/mobilevit.py", "MobileVitBlock")
        + "; timm/models/byobnet.py: ByobNet, BottleneckBlock",
        build=MobileVitTiny,
        input_shape=(2, 3, 40, 40),
        reparameterize=None,
        traceable=False,
        notes="whole MobileViT-XXS-like model at 40x40: inverted residuals with identity/None "
              "shortcut, MobileViT blocks on a 10x10 map (no interpolate) and a 5x5 map "
              "(interpolate); ConvNormAct everywhere; timm's reparameterize_model is a no-op",
    ),
]
