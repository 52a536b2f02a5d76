"""Hand-written re-parameterizable blocks, written the way the official repositories write them.

This is the *baseline* that reparam_fx is compared against: every block carries its own
``reparameterize()`` that computes the fused kernel/bias by hand, swaps the training
branches for one ``reparam_conv`` (or ``reparam_linear``), deletes the branches and sets
``inference_mode`` so ``forward`` takes the deploy path. Test-only code; the library must
never import it.

Sources the block math follows (re-written, not copied):

- RepVGGBlock ............ DingXiaoH/RepVGG ``repvgg.py``
- MobileOneBlock, SEBlock  apple/ml-mobileone, apple/ml-fastvit ``models/modules/mobileone.py``
- ReparamLargeKernelConv . apple/ml-fastvit ``models/modules/replknet.py``
- RepMixer, ConvFFN, RepCPE, RepMixerBlock  apple/ml-fastvit ``models/fastvit.py``
- Conv2d_BN, RepVGGDW, Residual, RepViTBlock, BN_Linear, Classfier  THU-MIG/RepViT
  ``model/repvit.py`` (BN_Linear is also LeViT's)
- DropPath, SqueezeExcite, BatchNormAct2d  timm
- ConvLayer, InvertedResidual, MobileViTBlockLite  apple/ml-cvnets (MobileViT v1), reduced

BatchNorm folding used throughout, with ``s = gamma / sqrt(var + eps)``::

    BN(conv(x; W, b))  = conv(x; W * s, (b - mean) * s + beta)
    BN(x)              = conv(x; I * s, beta - mean * s)        (I: grouped dirac kernel)
    conv1x1(BN(x); W)  = conv1x1(x; W * s[None, :], b + W @ (beta - mean * s))   (no padding)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "conv_bn",
    "fuse_bn_tensor",
    "identity_kernel",
    "RepVGGBlock",
    "SEBlock",
    "MobileOneBlock",
    "ReparamLargeKernelConv",
    "RepMixer",
    "ConvFFN",
    "RepCPE",
    "DropPath",
    "RepMixerBlock",
    "SqueezeExcite",
    "Conv2d_BN",
    "Residual",
    "RepVGGDW",
    "RepViTBlock",
    "BN_Linear",
    "Classfier",
    "BatchNormAct2d",
    "ConvBnAct",
    "FunctionalRepBlock",
    "ResidualFFN",
    "ConvLayer",
    "InvertedResidual",
    "MobileViTBlockLite",
]


# ---------------------------------------------------------------------------------------
# shared kernel helpers (the "_fuse_bn_tensor" every official repo re-implements)
# ---------------------------------------------------------------------------------------


def conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int, groups: int = 1) -> nn.Sequential:
    """``Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d)`` as in RepVGG/MobileOne."""
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(out_ch))
    return result


def fuse_bn_tensor(kernel: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm,
                   bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``BN(conv(x; kernel, bias))`` as one (kernel, bias): ``W*s``, ``(b - mean)*s + beta``."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    t = gamma / std
    shift = bn.running_mean if bias is None else bn.running_mean - bias
    return kernel * t.reshape(-1, *([1] * (kernel.dim() - 1))), beta - shift * t


def identity_kernel(channels: int, groups: int, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """Grouped dirac kernel: ``conv(x; I, groups) == x`` for ``channels`` in == out."""
    input_dim = channels // groups
    kernel = torch.zeros((channels, input_dim, kernel_size, kernel_size), dtype=like.dtype, device=like.device)
    for i in range(channels):
        kernel[i, i % input_dim, kernel_size // 2, kernel_size // 2] = 1
    return kernel


def _new_conv(conv_like: dict, kernel: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(bias=True, dtype=kernel.dtype, device=kernel.device, **conv_like)
    conv.weight.data.copy_(kernel)
    conv.bias.data.copy_(bias)
    return conv


# ---------------------------------------------------------------------------------------
# RepVGG (DingXiaoH/RepVGG)
# ---------------------------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """``ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))``; identity branch only if in == out, stride 1.

    Deploy: ``ReLU(rbr_reparam(x))`` with ``W = W3*s3 + pad(W1*s1) + I*sid``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.deploy = False
        self.in_channels = in_ch
        self.out_channels = out_ch
        self.stride = stride
        self.groups = groups
        self.nonlinearity = nn.ReLU()
        self.rbr_identity = nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        self.rbr_dense = conv_bn(in_ch, out_ch, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(in_ch, out_ch, 1, stride, 0, groups)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.nonlinearity(self.rbr_reparam(inputs))
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    def get_equivalent_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        kernel3x3, bias3x3 = fuse_bn_tensor(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        kernel1x1, bias1x1 = fuse_bn_tensor(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel = kernel3x3 + F.pad(kernel1x1, [1, 1, 1, 1])
        bias = bias3x3 + bias1x1
        if self.rbr_identity is not None:
            id_tensor = identity_kernel(self.in_channels, self.groups, 3, kernel3x3)
            kernel_id, bias_id = fuse_bn_tensor(id_tensor, self.rbr_identity)
            kernel = kernel + kernel_id
            bias = bias + bias_id
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deploy:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        self.rbr_reparam = _new_conv(
            dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=3,
                 stride=self.stride, padding=1, groups=self.groups), kernel, bias)
        for para in self.parameters():
            para.detach_()
        self.__delattr__("rbr_dense")
        self.__delattr__("rbr_1x1")
        self.__delattr__("rbr_identity")
        self.deploy = True

    switch_to_deploy = reparameterize


# ---------------------------------------------------------------------------------------
# MobileOne (apple/ml-mobileone, apple/ml-fastvit)
# ---------------------------------------------------------------------------------------


class SEBlock(nn.Module):
    """MobileOne's squeeze-excite: ``x * sigmoid(expand(relu(reduce(avgpool_hw(x)))))``."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, int(in_channels * rd_ratio), kernel_size=1, stride=1, bias=True)
        self.expand = nn.Conv2d(int(in_channels * rd_ratio), in_channels, kernel_size=1, stride=1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, c, h, w = inputs.size()
        x = F.avg_pool2d(inputs, kernel_size=[h, w])
        x = self.reduce(x)
        x = F.relu(x)
        x = self.expand(x)
        x = torch.sigmoid(x)
        x = x.view(-1, c, 1, 1)
        return inputs * x


class MobileOneBlock(nn.Module):
    """MobileOne block: ``act(se(BN_scale(conv1x1 x) + BN_skip(x) + sum_i BN_i(convkxk_i x)))``.

    ``num_conv_branches=0`` with ``use_scale_branch=False`` is FastViT's RepMixer ``norm``
    (a lone BN written as a conv). Deploy: ``act(se(reparam_conv(x)))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_conv_branches: int = 1,
        use_act: bool = True,
        use_scale_branch: bool = True,
        padding: Optional[int] = None,
        use_se: bool = False,
        activation: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.inference_mode = False
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.groups = groups
        self.num_conv_branches = num_conv_branches

        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        if use_act:
            self.activation = activation if activation is not None else nn.GELU()
        else:
            self.activation = nn.Identity()

        self.rbr_skip = nn.BatchNorm2d(in_channels) if out_channels == in_channels and stride == 1 else None
        if num_conv_branches > 0:
            self.rbr_conv = nn.ModuleList(
                [self._conv_bn(kernel_size, self.padding) for _ in range(num_conv_branches)])
        else:
            self.rbr_conv = None
        self.rbr_scale = None
        if kernel_size > 1 and use_scale_branch:
            self.rbr_scale = self._conv_bn(1, 0)

    def _conv_bn(self, kernel_size: int, padding: int) -> nn.Sequential:
        return conv_bn(self.in_channels, self.out_channels, kernel_size, self.stride, padding, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))

        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)

        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)

        out = scale_out + identity_out
        if self.rbr_conv is not None:
            for ix in range(self.num_conv_branches):
                out += self.rbr_conv[ix](x)

        return self.activation(self.se(out))

    def _get_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        kernel_scale, bias_scale = 0, 0
        if self.rbr_scale is not None:
            kernel_scale, bias_scale = fuse_bn_tensor(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            pad = self.kernel_size // 2
            kernel_scale = F.pad(kernel_scale, [pad, pad, pad, pad])

        kernel_identity, bias_identity = 0, 0
        if self.rbr_skip is not None:
            id_tensor = identity_kernel(self.in_channels, self.groups, self.kernel_size, self.rbr_skip.running_var)
            kernel_identity, bias_identity = fuse_bn_tensor(id_tensor, self.rbr_skip)

        kernel_conv, bias_conv = 0, 0
        if self.rbr_conv is not None:
            for ix in range(self.num_conv_branches):
                _kernel, _bias = fuse_bn_tensor(self.rbr_conv[ix].conv.weight, self.rbr_conv[ix].bn)
                kernel_conv = kernel_conv + _kernel
                bias_conv = bias_conv + _bias

        return kernel_conv + kernel_scale + kernel_identity, bias_conv + bias_scale + bias_identity

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        kernel, bias = self._get_kernel_bias()
        self.reparam_conv = _new_conv(
            dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                 stride=self.stride, padding=self.padding, groups=self.groups), kernel, bias)
        for para in self.parameters():
            para.detach_()
        self.__delattr__("rbr_conv")
        self.__delattr__("rbr_scale")
        self.__delattr__("rbr_skip")
        self.inference_mode = True


# ---------------------------------------------------------------------------------------
# FastViT (apple/ml-fastvit)
# ---------------------------------------------------------------------------------------


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet-style ``act(BN(convKxK(x)) + BN(conv_kxk(x)))``; deploy ``act(lkb_reparam(x))``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 7, stride: int = 1,
                 groups: int = 1, small_kernel: Optional[int] = 3, activation: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.inference_mode = False
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.stride = stride
        self.groups = groups
        self.padding = kernel_size // 2
        self.activation = activation if activation is not None else nn.GELU()
        self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, self.padding, groups)
        self.small_conv = None
        if small_kernel is not None:
            assert small_kernel <= kernel_size, "small kernel cannot be larger than the large kernel"
            self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride, small_kernel // 2, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            out = self.lkb_reparam(x)
        else:
            out = self.lkb_origin(x)
            if self.small_conv is not None:
                out += self.small_conv(x)
        return self.activation(out)

    def get_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        eq_k, eq_b = fuse_bn_tensor(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        if self.small_conv is not None:
            small_k, small_b = fuse_bn_tensor(self.small_conv.conv.weight, self.small_conv.bn)
            eq_b = eq_b + small_b
            eq_k = eq_k + F.pad(small_k, [(self.kernel_size - self.small_kernel) // 2] * 4)
        return eq_k, eq_b

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        eq_k, eq_b = self.get_kernel_bias()
        self.lkb_reparam = _new_conv(
            dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                 stride=self.stride, padding=self.padding, groups=self.groups), eq_k, eq_b)
        self.__delattr__("lkb_origin")
        self.__delattr__("small_conv")
        self.inference_mode = True


class RepMixer(nn.Module):
    """``x + layer_scale * (mixer(x) - norm(x))``, mixer/norm depthwise MobileOneBlocks without act.

    Deploy: one depthwise conv, ``W = I + ls * (W_mixer - W_norm)``, ``b = ls * (b_mixer - b_norm)``.
    """

    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.inference_mode = False
        self.dim = dim
        self.kernel_size = kernel_size
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False,
                                   use_scale_branch=False, num_conv_branches=0)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.reparam_conv(x)
        x = x + self.layer_scale * (self.mixer(x) - self.norm(x))
        return x

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        self.mixer.reparameterize()
        self.norm.reparameterize()
        id_tensor = identity_kernel(self.dim, self.dim, self.kernel_size, self.mixer.reparam_conv.weight)
        w = id_tensor + self.layer_scale.unsqueeze(-1) * (
            self.mixer.reparam_conv.weight - self.norm.reparam_conv.weight)
        b = self.layer_scale.reshape(-1) * (self.mixer.reparam_conv.bias - self.norm.reparam_conv.bias)
        self.reparam_conv = _new_conv(
            dict(in_channels=self.dim, out_channels=self.dim, kernel_size=self.kernel_size, stride=1,
                 padding=self.kernel_size // 2, groups=self.dim), w, b)
        for para in self.parameters():
            para.detach_()
        self.__delattr__("mixer")
        self.__delattr__("norm")
        self.__delattr__("layer_scale")
        self.inference_mode = True


class ConvFFN(nn.Module):
    """``fc2(drop(act(fc1(BN(dwconv7x7(x))))))``; ``conv`` is a ``Sequential(conv, bn)``.

    Official FastViT never folds this BN (Core ML does it); here ``reparameterize`` folds it
    into the depthwise conv so the deploy form is BN-free.
    """

    def __init__(self, in_channels: int, hidden_channels: Optional[int] = None,
                 out_channels: Optional[int] = None, act_layer=nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.inference_mode = False
        out_channels = out_channels or in_channels
        hidden_channels = hidden_channels or in_channels
        self.conv = nn.Sequential()
        self.conv.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size=7, padding=3,
                                               groups=in_channels, bias=False))
        self.conv.add_module("bn", nn.BatchNorm2d(out_channels))
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_channels, out_channels, kernel_size=1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        conv = self.conv.conv
        kernel, bias = fuse_bn_tensor(conv.weight, self.conv.bn)
        self.conv = _new_conv(
            dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                 stride=conv.stride, padding=conv.padding, groups=conv.groups), kernel, bias)
        self.inference_mode = True


class RepCPE(nn.Module):
    """Conditional positional encoding ``pe(x) + x``; deploy ``reparam_conv`` with ``W = I + W_pe``."""

    def __init__(self, dim: int, spatial: int = 7) -> None:
        super().__init__()
        self.inference_mode = False
        self.dim = dim
        self.spatial = spatial
        self.pe = nn.Conv2d(dim, dim, spatial, 1, spatial // 2, bias=True, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.reparam_conv(x)
        x = self.pe(x) + x
        return x

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        w_final = identity_kernel(self.dim, self.dim, self.spatial, self.pe.weight) + self.pe.weight
        self.reparam_conv = _new_conv(
            dict(in_channels=self.dim, out_channels=self.dim, kernel_size=self.spatial, stride=1,
                 padding=self.spatial // 2, groups=self.dim), w_final, self.pe.bias)
        for para in self.parameters():
            para.detach_()
        self.__delattr__("pe")
        self.inference_mode = True


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """timm's stochastic depth: identity unless training with ``drop_prob > 0``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """timm's DropPath module; ``symbolic_trace`` in eval traces through it to nothing."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class RepMixerBlock(nn.Module):
    """FastViT MetaFormer block: ``x = RepMixer(x); x = x + drop_path(layer_scale * ConvFFN(x))``.

    ``reparameterize`` delegates to the token mixer and the FFN; the block's own layer
    scale stays a separate multiply, as in the official deploy form.
    """

    def __init__(self, dim: int, mlp_ratio: float = 3.0, kernel_size: int = 3, drop_path: float = 0.0,
                 layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size=kernel_size, layer_scale_init=layer_scale_init)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        x = x + self.drop_path(self.layer_scale * self.convffn(x))
        return x

    def reparameterize(self) -> None:
        self.token_mixer.reparameterize()
        self.convffn.reparameterize()


# ---------------------------------------------------------------------------------------
# RepViT / LeViT (THU-MIG/RepViT, facebookresearch/LeViT)
# ---------------------------------------------------------------------------------------


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class SqueezeExcite(nn.Module):
    """timm's SqueezeExcite: ``x * sigmoid(conv_expand(relu(conv_reduce(mean_hw(x)))))``."""

    def __init__(self, channels: int, rd_ratio: float = 0.25) -> None:
        super().__init__()
        rd_channels = make_divisible(channels * rd_ratio, 8)
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class Conv2d_BN(nn.Sequential):
    """``Sequential(c=Conv2d(bias=False), bn=BatchNorm2d)``; deploy ``Sequential(reparam_conv)``."""

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, dilation: int = 1,
                 groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.inference_mode = False
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c, bn = self.c, self.bn
        kernel, bias = fuse_bn_tensor(c.weight, bn)
        return _new_conv(
            dict(in_channels=c.in_channels, out_channels=c.out_channels, kernel_size=c.kernel_size,
                 stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups), kernel, bias)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        conv = self.fuse()
        del self.c
        del self.bn
        self.add_module("reparam_conv", conv)
        self.inference_mode = True


class Residual(nn.Module):
    """``x + m(x)`` (RepViT/LeViT), with LeViT's per-sample drop in training."""

    def __init__(self, m: nn.Module, drop: float = 0.0) -> None:
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop).detach()
            return x + self.m(x) * keep
        return x + self.m(x)


class RepVGGDW(nn.Module):
    """RepViT token mixer: ``BN(BN'(dwconv3x3(x)) + dwconv1x1(x) + x)`` (1x1 has a bias, no BN).

    Deploy: one depthwise 3x3 conv; the trailing BN folds into the merged kernel.
    """

    def __init__(self, ed: int) -> None:
        super().__init__()
        self.inference_mode = False
        self.dim = ed
        self.conv = Conv2d_BN(ed, ed, 3, 1, 1, groups=ed)
        self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
        self.bn = nn.BatchNorm2d(ed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.reparam_conv(x)
        return self.bn((self.conv(x) + self.conv1(x)) + x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        conv_w, conv_b = fuse_bn_tensor(self.conv.c.weight, self.conv.bn)
        conv1_w = F.pad(self.conv1.weight, [1, 1, 1, 1])
        identity = identity_kernel(self.dim, self.dim, 3, conv_w)
        final_w = conv_w + conv1_w + identity
        final_b = conv_b + self.conv1.bias
        final_w, final_b = fuse_bn_tensor(final_w, self.bn, bias=final_b)
        self.reparam_conv = _new_conv(
            dict(in_channels=self.dim, out_channels=self.dim, kernel_size=3, stride=1, padding=1,
                 groups=self.dim), final_w, final_b)
        self.__delattr__("conv")
        self.__delattr__("conv1")
        self.__delattr__("bn")
        self.inference_mode = True


class RepViTBlock(nn.Module):
    """RepViT block: ``channel_mixer(token_mixer(x))``.

    stride 1: token mixer ``RepVGGDW (+SE)``; stride 2: ``dw Conv2d_BN (+SE), pw Conv2d_BN``.
    Channel mixer: ``Residual(Conv2d_BN 1x1 -> GELU -> Conv2d_BN 1x1)``.
    """

    def __init__(self, inp: int, hidden_dim: int, oup: int, kernel_size: int, stride: int, use_se: bool) -> None:
        super().__init__()
        assert stride in (1, 2)
        assert hidden_dim == 2 * inp
        if stride == 2:
            self.token_mixer = nn.Sequential(
                Conv2d_BN(inp, inp, kernel_size, stride, (kernel_size - 1) // 2, groups=inp),
                SqueezeExcite(inp, 0.25) if use_se else nn.Identity(),
                Conv2d_BN(inp, oup, ks=1, stride=1, pad=0),
            )
            self.channel_mixer = Residual(nn.Sequential(
                Conv2d_BN(oup, 2 * oup, 1, 1, 0),
                nn.GELU(),
                Conv2d_BN(2 * oup, oup, 1, 1, 0, bn_weight_init=0),
            ))
        else:
            assert inp == oup
            self.token_mixer = nn.Sequential(
                RepVGGDW(inp),
                SqueezeExcite(inp, 0.25) if use_se else nn.Identity(),
            )
            self.channel_mixer = Residual(nn.Sequential(
                Conv2d_BN(inp, hidden_dim, 1, 1, 0),
                nn.GELU(),
                Conv2d_BN(hidden_dim, oup, 1, 1, 0, bn_weight_init=0),
            ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_mixer(self.token_mixer(x))


class BN_Linear(nn.Sequential):
    """LeViT/RepViT ``Sequential(bn=BatchNorm1d, l=Linear)``; deploy ``Sequential(reparam_linear)``.

    ``W' = W * s[None, :]``, ``b' = W @ (beta - mean * s) + b``.
    """

    def __init__(self, a: int, b: int, bias: bool = True, std: float = 0.02) -> None:
        super().__init__()
        self.inference_mode = False
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.constant_(self.l.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, lin = self.bn, self.l
        s = bn.weight / (bn.running_var + bn.eps) ** 0.5
        t = bn.bias - bn.running_mean * s
        w = lin.weight * s[None, :]
        b = lin.weight @ t
        if lin.bias is not None:
            b = b + lin.bias
        m = nn.Linear(w.size(1), w.size(0), dtype=w.dtype, device=w.device)
        m.weight.data.copy_(w)
        m.bias.data.copy_(b)
        return m

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        linear = self.fuse()
        del self.bn
        del self.l
        self.add_module("reparam_linear", linear)
        self.inference_mode = True


class Classfier(nn.Module):
    """RepViT head (name spelled as upstream): ``(classifier(x) + classifier_dist(x)) / 2`` in eval."""

    def __init__(self, dim: int, num_classes: int, distillation: bool = True) -> None:
        super().__init__()
        self.inference_mode = False
        self.distillation = distillation
        self.classifier = BN_Linear(dim, num_classes)
        if distillation:
            self.classifier_dist = BN_Linear(dim, num_classes)

    def forward(self, x: torch.Tensor):
        if self.inference_mode:
            return self.reparam_linear(x)
        if self.distillation:
            x = self.classifier(x), self.classifier_dist(x)
            if not self.training:
                x = (x[0] + x[1]) / 2
        else:
            x = self.classifier(x)
        return x

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        classifier = self.classifier.fuse()
        if self.distillation:
            classifier_dist = self.classifier_dist.fuse()
            classifier.weight += classifier_dist.weight
            classifier.bias += classifier_dist.bias
            classifier.weight /= 2
            classifier.bias /= 2
            self.__delattr__("classifier_dist")
        self.__delattr__("classifier")
        self.reparam_linear = classifier
        self.inference_mode = True


# ---------------------------------------------------------------------------------------
# timm-style BatchNormAct2d and the "mixed" blocks built on it
# ---------------------------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward calls ``F.batch_norm`` then an act.

    Not a torch.nn module, so ``symbolic_trace`` traces through it into a functional
    ``batch_norm`` node with ``get_attr`` running stats.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True, act_layer=nn.ReLU,
                 inplace: bool = True) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = nn.Identity()
        if apply_act:
            self.act = act_layer(inplace=True) if inplace and act_layer is nn.ReLU else act_layer()
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class ConvBnAct(nn.Module):
    """``BatchNormAct2d(conv(x))``; deploy ``act(reparam_conv(x))``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 act_layer=nn.ReLU) -> None:
        super().__init__()
        self.inference_mode = False
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(out_ch, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.act(self.reparam_conv(x))
        return self.bn(self.conv(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        c = self.conv
        kernel, bias = fuse_bn_tensor(c.weight, self.bn)
        self.reparam_conv = _new_conv(
            dict(in_channels=c.in_channels, out_channels=c.out_channels, kernel_size=c.kernel_size,
                 stride=c.stride, padding=c.padding, groups=c.groups), kernel, bias)
        self.act = self.bn.act
        self.__delattr__("conv")
        self.__delattr__("bn")
        self.inference_mode = True


class FunctionalRepBlock(nn.Module):
    """RepVGG-like block written with raw parameters and functional convs::

        out  = bn_3x3(F.conv2d(x, self.weight, 3x3))
        out += bn_1x1(F.conv2d(x, self.weight_1x1))     # in-place add
        out  = torch.add(out, x)
        return post_norm(out)                           # BatchNormAct2d

    Deploy: ``act(F.conv2d(x, self.weight, self.bias))``.
    """

    def __init__(self, dim: int, groups: int = 1, act_layer=nn.ReLU) -> None:
        super().__init__()
        self.inference_mode = False
        self.dim = dim
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(dim, dim // groups, 3, 3))
        self.weight_1x1 = nn.Parameter(torch.empty(dim, dim // groups, 1, 1))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        nn.init.kaiming_uniform_(self.weight_1x1, a=5 ** 0.5)
        self.bn_3x3 = nn.BatchNorm2d(dim)
        self.bn_1x1 = nn.BatchNorm2d(dim)
        self.post_norm = BatchNormAct2d(dim, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.act(F.conv2d(x, self.weight, self.bias, 1, 1, 1, self.groups))
        out = self.bn_3x3(F.conv2d(x, self.weight, None, 1, 1, 1, self.groups))
        out += self.bn_1x1(F.conv2d(x, self.weight_1x1, None, 1, 0, 1, self.groups))
        out = torch.add(out, x)
        return self.post_norm(out)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        k3, b3 = fuse_bn_tensor(self.weight, self.bn_3x3)
        k1, b1 = fuse_bn_tensor(self.weight_1x1, self.bn_1x1)
        kernel = k3 + F.pad(k1, [1, 1, 1, 1]) + identity_kernel(self.dim, self.groups, 3, k3)
        kernel, bias = fuse_bn_tensor(kernel, self.post_norm, bias=b3 + b1)
        self.act = self.post_norm.act
        for name in ("weight", "weight_1x1", "bn_3x3", "bn_1x1", "post_norm"):
            self.__delattr__(name)
        self.weight = nn.Parameter(kernel.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.inference_mode = True


class ResidualFFN(nn.Module):
    """Pre-norm residual MLP with layer scale and DropPath::

        out  = drop_path(layer_scale * fc2(act(fc1(norm(x)))))
        out += x

    Deploy: ``norm`` folds into the unpadded 1x1 ``fc1``, ``layer_scale`` into ``fc2``.
    """

    def __init__(self, dim: int, mlp_ratio: float = 2.0, drop_path: float = 0.1,
                 layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.inference_mode = False
        hidden = int(dim * mlp_ratio)
        self.norm = nn.BatchNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            out = self.drop_path(self.fc2(self.act(self.fc1(x))))
        else:
            out = self.drop_path(self.layer_scale * self.fc2(self.act(self.fc1(self.norm(x)))))
        out += x
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        norm = self.norm
        s = norm.weight / (norm.running_var + norm.eps).sqrt()
        t = norm.bias - norm.running_mean * s
        w1 = self.fc1.weight
        self.fc1.bias.data.copy_(self.fc1.bias + w1[:, :, 0, 0] @ t)
        self.fc1.weight.data.copy_(w1 * s[None, :, None, None])
        ls = self.layer_scale.reshape(-1)
        self.fc2.weight.data.copy_(self.fc2.weight * ls[:, None, None, None])
        self.fc2.bias.data.copy_(self.fc2.bias * ls)
        self.__delattr__("norm")
        self.__delattr__("layer_scale")
        self.inference_mode = True


# ---------------------------------------------------------------------------------------
# MobileViT-lite (apple/ml-cvnets), only the conv+BN parts are re-parameterized
# ---------------------------------------------------------------------------------------


class ConvLayer(nn.Sequential):
    """cvnets ConvLayer: ``Sequential(conv, norm?, act?)``; deploy ``Sequential(conv+bias, act?)``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 use_norm: bool = True, use_act: bool = True) -> None:
        super().__init__()
        self.inference_mode = not use_norm
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2,
                                          groups=groups, bias=not use_norm))
        if use_norm:
            self.add_module("norm", nn.BatchNorm2d(out_ch))
        if use_act:
            self.add_module("act", nn.SiLU())

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        c = self.conv
        kernel, bias = fuse_bn_tensor(c.weight, self.norm)
        self.conv = _new_conv(
            dict(in_channels=c.in_channels, out_channels=c.out_channels, kernel_size=c.kernel_size,
                 stride=c.stride, padding=c.padding, groups=c.groups), kernel, bias)
        del self.norm
        self.inference_mode = True


class InvertedResidual(nn.Module):
    """MobileNetV2 block: ``exp_1x1 -> conv_3x3 (dw) -> red_1x1`` (+ x when stride 1, in == out)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int = 2) -> None:
        super().__init__()
        hidden = make_divisible(in_ch * expand_ratio, 8)
        self.block = nn.Sequential()
        self.block.add_module("exp_1x1", ConvLayer(in_ch, hidden, 1))
        self.block.add_module("conv_3x3", ConvLayer(hidden, hidden, 3, stride, groups=hidden))
        self.block.add_module("red_1x1", ConvLayer(hidden, out_ch, 1, use_act=False))
        self.use_res_connect = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.block(x)
        return self.block(x)


class _TransformerLayer(nn.Module):
    """Pre-norm transformer encoder layer (single attention + FFN), written out by hand."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.pre_norm_mha = nn.LayerNorm(dim)
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.pre_norm_ffn = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_act = nn.SiLU()
        self.ffn_out = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv_proj(self.pre_norm_mha(x)).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.ffn_out(self.ffn_act(self.ffn_in(self.pre_norm_ffn(x))))
        return x


class MobileViTBlockLite(nn.Module):
    """MobileViT v1 block: local conv rep, unfold to patches, transformer, fold, project, fuse.

    Input height/width must be multiples of ``patch_size`` (cvnets interpolates otherwise;
    that branch is Python control flow on shapes and is left out here).
    """

    def __init__(self, in_ch: int, transformer_dim: int, ffn_dim: int, n_layers: int = 1, patch_size: int = 2) -> None:
        super().__init__()
        self.patch_h = self.patch_w = patch_size
        self.local_rep = nn.Sequential()
        self.local_rep.add_module("conv_3x3", ConvLayer(in_ch, in_ch, 3))
        self.local_rep.add_module("conv_1x1", ConvLayer(in_ch, transformer_dim, 1, use_norm=False, use_act=False))
        layers = [_TransformerLayer(transformer_dim, ffn_dim) for _ in range(n_layers)]
        layers.append(nn.LayerNorm(transformer_dim))
        self.global_rep = nn.Sequential(*layers)
        self.conv_proj = ConvLayer(transformer_dim, in_ch, 1)
        self.fusion = ConvLayer(2 * in_ch, in_ch, 3)

    def unfolding(self, fm: torch.Tensor):
        b, c, h, w = fm.shape
        nh, nw = h // self.patch_h, w // self.patch_w
        patch_area = self.patch_h * self.patch_w
        x = fm.reshape(b * c * nh, self.patch_h, nw, self.patch_w).transpose(1, 2)
        x = x.reshape(b, c, nh * nw, patch_area).transpose(1, 3)
        return x.reshape(b * patch_area, nh * nw, -1), (b, c, nh, nw)

    def folding(self, patches: torch.Tensor, info) -> torch.Tensor:
        b, c, nh, nw = info
        x = patches.contiguous().view(b, self.patch_h * self.patch_w, nh * nw, -1).transpose(1, 3)
        x = x.reshape(b * c * nh, nw, self.patch_h, self.patch_w).transpose(1, 2)
        return x.reshape(b, c, nh * self.patch_h, nw * self.patch_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = x
        fm = self.local_rep(x)
        patches, info = self.unfolding(fm)
        patches = self.global_rep(patches)
        fm = self.folding(patches, info)
        fm = self.conv_proj(fm)
        return self.fusion(torch.cat((res, fm), dim=1))
