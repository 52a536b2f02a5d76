"""DingXiaoH's ACNet (asymmetric convolution block) and DiverseBranchBlock, and OREPA
(JUGGHM/OREPA_CVPR2022, online re-parameterization: weights generated from parameters in
``forward``), with their ``switch_to_deploy`` walks.

Re-written from DingXiaoH/ACNet acnet/acb.py, acnet/acnet_builder.py, builder.py;
DingXiaoH/DiverseBranchBlock diversebranchblock.py, dbb_transforms.py, convnet_utils.py,
resnet.py, mobilenet.py, convert.py; JUGGHM/OREPA_CVPR2022 blocks.py, basic.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.init as init

from . import Idiom


def switch_to_deploy_walk(model: nn.Module) -> nn.Module:
    """The conversion loop of DingXiaoH/ACNet README.md and DingXiaoH/DiverseBranchBlock
    convert.py (also JUGGHM/OREPA_CVPR2022 convert.py): ``switch_to_deploy()`` on every
    module that has it, in ``model.modules()`` (pre-)order."""
    for m in model.modules():
        if hasattr(m, "switch_to_deploy"):
            m.switch_to_deploy()
    return model


# --------------------------------------------------------------------------------------
# ACNet
# --------------------------------------------------------------------------------------


class ACBlock(nn.Module):
    """DingXiaoH/ACNet acnet/acb.py: ACBlock.

    ``square_bn(kxk) + ver_bn(kx1) + hor_bn(1xk)`` on the same input; the asymmetric convs
    get paddings ``[p - k//2, p]`` / ``[p, p - k//2]`` so their windows line up with the
    square's centre row / column; when ``p < k//2`` they get the input cropped instead
    (``input[:, :, :, c:-c]`` / ``input[:, :, c:-c, :]``). ``switch_to_deploy`` adds the
    fused 1xk / kx1 kernels into the fused square kernel in place (slice ``+=``).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros", deploy=False, use_affine=True, reduce_gamma=False, gamma_init=None):
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.fused_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride, padding,
                                        dilation, groups, bias=True, padding_mode=padding_mode)
            return
        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride, padding,
                                     dilation, groups, bias=False, padding_mode=padding_mode)
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        if padding - kernel_size // 2 >= 0:
            self.crop = 0
            hor_padding = [padding - kernel_size // 2, padding]
            ver_padding = [padding, padding - kernel_size // 2]
        else:
            self.crop = kernel_size // 2 - padding
            hor_padding = [0, padding]
            ver_padding = [padding, 0]
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride, ver_padding, dilation,
                                  groups, bias=False, padding_mode=padding_mode)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride, hor_padding, dilation,
                                  groups, bias=False, padding_mode=padding_mode)
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        if reduce_gamma:
            self.init_gamma(1.0 / 3)
        if gamma_init is not None:
            assert not reduce_gamma
            self.init_gamma(gamma_init)

    def _fuse_bn_tensor(self, conv, bn):
        std = (bn.running_var + bn.eps).sqrt()
        return conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std

    def _add_to_square_kernel(self, square_kernel, asym_kernel):
        ah, aw = asym_kernel.size(2), asym_kernel.size(3)
        sh, sw = square_kernel.size(2), square_kernel.size(3)
        top, left = sh // 2 - ah // 2, sw // 2 - aw // 2
        square_kernel[:, :, top:top + ah, left:left + aw] += asym_kernel

    def get_equivalent_kernel_bias(self):
        hor_k, hor_b = self._fuse_bn_tensor(self.hor_conv, self.hor_bn)
        ver_k, ver_b = self._fuse_bn_tensor(self.ver_conv, self.ver_bn)
        square_k, square_b = self._fuse_bn_tensor(self.square_conv, self.square_bn)
        self._add_to_square_kernel(square_k, hor_k)
        self._add_to_square_kernel(square_k, ver_k)
        return square_k, hor_b + ver_b + square_b

    def switch_to_deploy(self):
        kernel, bias = self.get_equivalent_kernel_bias()
        self.deploy = True
        sq = self.square_conv
        self.fused_conv = nn.Conv2d(sq.in_channels, sq.out_channels, sq.kernel_size, sq.stride, sq.padding,
                                    sq.dilation, sq.groups, bias=True, padding_mode=sq.padding_mode)
        for name in ("square_conv", "square_bn", "hor_conv", "hor_bn", "ver_conv", "ver_bn"):
            self.__delattr__(name)
        self.fused_conv.weight.data = kernel
        self.fused_conv.bias.data = bias

    def init_gamma(self, value):
        for bn in (self.square_bn, self.ver_bn, self.hor_bn):
            init.constant_(bn.weight, value)

    def forward(self, input):
        if self.deploy:
            return self.fused_conv(input)
        square = self.square_bn(self.square_conv(input))
        if self.crop > 0:
            ver_input = input[:, :, :, self.crop:-self.crop]
            hor_input = input[:, :, self.crop:-self.crop, :]
        else:
            ver_input = input
            hor_input = input
        vertical = self.ver_bn(self.ver_conv(ver_input))
        horizontal = self.hor_bn(self.hor_conv(hor_input))
        return square + vertical + horizontal


class FlattenLayer(nn.Module):
    """DingXiaoH/ACNet custom_layers/flatten_layer.py: FlattenLayer (``view(size(0), -1)``)."""

    def forward(self, inputs):
        return inputs.view(inputs.size(0), -1)


class ACNetBuilder:
    """DingXiaoH/ACNet acnet/acnet_builder.py: ACNetBuilder over builder.py: ConvBuilder.
    3x3/5x5 convs become ACBlocks (``Conv2dBNReLU`` -> Sequential(acb, relu),
    ``BNReLUConv2d`` -> Sequential(bn, relu, acb)); 1x1 and >=7 kernels stay conv-BN
    Sequentials, which ``switch_to_deploy`` never touches. (The upstream builder also passes a
    ``use_last_bn`` keyword that ACBlock no longer accepts; it is dropped here.)"""

    def __init__(self, deploy=False, gamma_init=None, use_affine=True):
        self.deploy, self.gamma_init, self.use_affine = deploy, gamma_init, use_affine

    @staticmethod
    def _plain(kernel_size):
        return kernel_size == 1 or kernel_size == (1, 1) or kernel_size >= 7

    def _acb(self, cin, cout, k, stride, padding, groups):
        return ACBlock(cin, cout, k, stride, padding, groups=groups, deploy=self.deploy,
                       use_affine=self.use_affine, gamma_init=self.gamma_init)

    def Conv2dBN(self, cin, cout, k, stride=1, padding=0, groups=1):
        if self._plain(k):
            seq = nn.Sequential()
            seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
            seq.add_module("bn", nn.BatchNorm2d(cout))
            return seq
        return self._acb(cin, cout, k, stride, padding, groups)

    def Conv2dBNReLU(self, cin, cout, k, stride=1, padding=0, groups=1):
        if self._plain(k):
            seq = self.Conv2dBN(cin, cout, k, stride, padding, groups)
            seq.add_module("relu", nn.ReLU())
            return seq
        seq = nn.Sequential()
        seq.add_module("acb", self._acb(cin, cout, k, stride, padding, groups))
        seq.add_module("relu", nn.ReLU())
        return seq

    def BNReLUConv2d(self, cin, cout, k, stride=1, padding=0, groups=1):
        seq = nn.Sequential()
        seq.add_module("bn", nn.BatchNorm2d(cin))
        seq.add_module("relu", nn.ReLU())
        seq.add_module("acb", self._acb(cin, cout, k, stride, padding, groups))
        return seq

    def GAP(self, kernel_size):
        gap = nn.Sequential()
        gap.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=kernel_size))
        gap.add_module("flatten", FlattenLayer())
        return gap


class ACNetCifarQuick(nn.Module):
    """A small ACNet classifier built the DingXiaoH/ACNet way (builder calls): 3x3 ACB stem,
    1x1 conv-BN-ReLU, a grouped stride-2 3x3 ACB, a 5x5 ACB, ``GAP`` (AvgPool2d(k, stride=k)
    + FlattenLayer) and a Linear."""

    def __init__(self, builder: ACNetBuilder | None = None):
        super().__init__()
        b = builder or ACNetBuilder()
        self.stem = b.Conv2dBNReLU(3, 16, 3, stride=1, padding=1)
        self.pw = b.Conv2dBNReLU(16, 32, 1)
        self.down = b.Conv2dBNReLU(32, 32, 3, stride=2, padding=1, groups=4)
        self.wide = b.Conv2dBN(32, 32, 5, stride=2, padding=2)
        self.gap = b.GAP(8)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.wide(self.down(self.pw(self.stem(x))))
        return self.fc(self.gap(torch.relu(x)))


class ACBCropNet(nn.Module):
    """DingXiaoH/ACNet acnet/acb.py: ACBlock with ``padding < kernel_size // 2`` (the
    configurations of its ``__main__`` check: k=3/p=0, k=5/p=1): the asymmetric branches read
    cropped slices of the input."""

    def __init__(self):
        super().__init__()
        self.a = ACBlock(3, 16, 3, stride=1, padding=0)
        self.b = ACBlock(16, 16, 5, stride=1, padding=1)
        self.c = ACBlock(16, 16, 3, stride=2, padding=1, groups=2)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class ACNetPreAct(nn.Module):
    """DingXiaoH/ACNet acnet/acnet_builder.py: BNReLUConv2d — BN -> ReLU -> ACBlock
    (pre-activation). The leading BNs sit before a ReLU and must not fold."""

    def __init__(self):
        super().__init__()
        b = ACNetBuilder()
        self.stem = b.Conv2dBN(3, 16, 3, padding=1)
        self.block1 = b.BNReLUConv2d(16, 16, 3, padding=1)
        self.block2 = b.BNReLUConv2d(16, 32, 3, stride=2, padding=1)
        self.gap = b.GAP(16)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block1(x)
        return self.fc(self.gap(self.block2(x)))


# --------------------------------------------------------------------------------------
# DiverseBranchBlock
# --------------------------------------------------------------------------------------


def transI_fusebn(kernel, bn):
    """DingXiaoH/DiverseBranchBlock dbb_transforms.py: transI_fusebn."""
    gamma = bn.weight
    std = (bn.running_var + bn.eps).sqrt()
    return kernel * (gamma / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * gamma / std


def transII_addbranch(kernels, biases):
    return sum(kernels), sum(biases)


def transIII_1x1_kxk(k1, b1, k2, b2, groups):
    """dbb_transforms.py: transIII_1x1_kxk (1x1 then kxk as one kxk: a conv of the second
    kernel by the transposed first; per group when grouped)."""
    if groups == 1:
        k = F.conv2d(k2, k1.permute(1, 0, 2, 3))
        b_hat = (k2 * b1.reshape(1, -1, 1, 1)).sum((1, 2, 3))
    else:
        k1_t = k1.permute(1, 0, 2, 3)
        w1, w2 = k1.size(0) // groups, k2.size(0) // groups
        k_parts, b_parts = [], []
        for g in range(groups):
            k1_slice = k1_t[:, g * w1:(g + 1) * w1]
            k2_slice = k2[g * w2:(g + 1) * w2]
            k_parts.append(F.conv2d(k2_slice, k1_slice))
            b_parts.append((k2_slice * b1[g * w1:(g + 1) * w1].reshape(1, -1, 1, 1)).sum((1, 2, 3)))
        k, b_hat = transIV_depthconcat(k_parts, b_parts)
    return k, b_hat + b2


def transIV_depthconcat(kernels, biases):
    return torch.cat(kernels, dim=0), torch.cat(biases)


def transV_avg(channels, kernel_size, groups, dtype=None):
    """dbb_transforms.py: transV_avg (the average pool as a grouped kxk kernel). Upstream
    allocates it with the default dtype (float32), so a float64 deploy carries 1/k^2 rounded
    to float32 (~3e-9 relative error); ``dtype`` lets the walk build it in the model's dtype."""
    per_group = channels // groups
    k = torch.zeros((channels, per_group, kernel_size, kernel_size), dtype=dtype)
    k[torch.arange(channels), torch.arange(per_group).repeat(groups), :, :] = 1.0 / kernel_size ** 2
    return k


def transVI_multiscale(kernel, target_kernel_size):
    h_pad = (target_kernel_size - kernel.size(2)) // 2
    w_pad = (target_kernel_size - kernel.size(3)) // 2
    return F.pad(kernel, [h_pad, h_pad, w_pad, w_pad])


def dbb_conv_bn(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    """diversebranchblock.py: conv_bn (Sequential conv + affine BN)."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                     bias=False))
    seq.add_module("bn", nn.BatchNorm2d(out_channels, affine=True))
    return seq


class IdentityBasedConv1x1(nn.Conv2d):
    """DingXiaoH/DiverseBranchBlock diversebranchblock.py: IdentityBasedConv1x1 — an
    ``nn.Conv2d`` subclass whose forward convolves with ``weight + id_tensor`` (weight
    zero-initialised; ``id_tensor`` a plain tensor attribute, not a buffer, so ``.double()``
    leaves it float32). Read as a plain Conv2d it is off by the identity."""

    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        assert channels % groups == 0
        per_group = channels // groups
        identity = torch.zeros((channels, per_group, 1, 1), dtype=self.weight.dtype)
        for i in range(channels):
            identity[i, i % per_group, 0, 0] = 1
        self.id_tensor = identity
        nn.init.zeros_(self.weight)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)

    def get_actual_kernel(self):
        return self.weight + self.id_tensor.to(self.weight.device)


class BNAndPadLayer(nn.Module):
    """DingXiaoH/DiverseBranchBlock diversebranchblock.py: BNAndPadLayer — BN, then
    ``F.pad`` by ``pad_pixels`` and the four borders overwritten by item assignment with the
    BN's own output for a zero input (``bias - mean * weight / std``, detached): the result
    equals zero-padding *before* the BN. ``symbolic_trace`` cannot record the item
    assignment."""

    def __init__(self, pad_pixels, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            std = torch.sqrt(self.bn.running_var + self.bn.eps)
            if self.bn.affine:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / std
            else:
                pad_values = -self.bn.running_mean / std
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            p = self.pad_pixels
            output[:, :, 0:p, :] = pad_values
            output[:, :, -p:, :] = pad_values
            output[:, :, :, 0:p] = pad_values
            output[:, :, :, -p:] = pad_values
        return output

    @property
    def weight(self):
        return self.bn.weight

    @property
    def bias(self):
        return self.bn.bias

    @property
    def running_mean(self):
        return self.bn.running_mean

    @property
    def running_var(self):
        return self.bn.running_var

    @property
    def eps(self):
        return self.bn.eps


class DiverseBranchBlock(nn.Module):
    """DingXiaoH/DiverseBranchBlock diversebranchblock.py: DiverseBranchBlock.

    ``out = dbb_origin(x)`` (kxk conv-BN), then in place ``+= dbb_1x1(x)`` (when
    ``groups < out_channels``), ``+= dbb_avg(x)`` (1x1 conv -> BNAndPad -> AvgPool(k, s, 0)
    -> BN, or for depthwise AvgPool(k, s, p) -> BN), ``+= dbb_1x1_kxk(x)``
    (IdentityBasedConv1x1 or a 1x1 conv to 2x channels -> BNAndPad -> kxk conv pad 0 -> BN),
    then ``nonlinear``; branch presence by ``hasattr``. ``switch_to_deploy`` merges via
    transI..transVI.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 internal_channels_1x1_3x3=None, deploy=False, nonlinear=None, single_init=False,
                 avg_count_include_pad=True):
        super().__init__()
        self.deploy = deploy
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size, self.out_channels, self.groups = kernel_size, out_channels, groups
        assert padding == kernel_size // 2
        if deploy:
            self.dbb_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                         bias=True)
            return
        self.dbb_origin = dbb_conv_bn(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=0))
            self.dbb_1x1 = dbb_conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding,
                                                        count_include_pad=avg_count_include_pad))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal_channels_1x1_3x3 == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups=groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal_channels_1x1_3x3, 1, 1, 0,
                                                           groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=internal_channels_1x1_3x3,
                                                         affine=True))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal_channels_1x1_3x3, out_channels, kernel_size, stride,
                                                       0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))
        if single_init:
            self.single_init()

    def get_equivalent_kernel_bias(self):
        k_origin, b_origin = transI_fusebn(self.dbb_origin.conv.weight, self.dbb_origin.bn)
        if hasattr(self, "dbb_1x1"):
            k_1x1, b_1x1 = transI_fusebn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            k_1x1 = transVI_multiscale(k_1x1, self.kernel_size)
        else:
            k_1x1, b_1x1 = 0, 0
        if hasattr(self.dbb_1x1_kxk, "idconv1"):
            first = self.dbb_1x1_kxk.idconv1.get_actual_kernel()
        else:
            first = self.dbb_1x1_kxk.conv1.weight
        k_first, b_first = transI_fusebn(first, self.dbb_1x1_kxk.bn1)
        k_second, b_second = transI_fusebn(self.dbb_1x1_kxk.conv2.weight, self.dbb_1x1_kxk.bn2)
        k_1x1_kxk, b_1x1_kxk = transIII_1x1_kxk(k_first, b_first, k_second, b_second, groups=self.groups)
        avgbn = self.dbb_avg.avgbn
        k_avg = transV_avg(self.out_channels, self.kernel_size, self.groups, dtype=avgbn.weight.dtype)
        k_avg_second, b_avg_second = transI_fusebn(k_avg.to(avgbn.weight.device), avgbn)
        if hasattr(self.dbb_avg, "conv"):
            k_avg_first, b_avg_first = transI_fusebn(self.dbb_avg.conv.weight, self.dbb_avg.bn)
            k_avg_all, b_avg_all = transIII_1x1_kxk(k_avg_first, b_avg_first, k_avg_second, b_avg_second,
                                                    groups=self.groups)
        else:
            k_avg_all, b_avg_all = k_avg_second, b_avg_second
        return transII_addbranch((k_origin, k_1x1, k_1x1_kxk, k_avg_all), (b_origin, b_1x1, b_1x1_kxk, b_avg_all))

    def switch_to_deploy(self):
        if hasattr(self, "dbb_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        c = self.dbb_origin.conv
        self.dbb_reparam = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                                     c.groups, bias=True)
        self.dbb_reparam.weight.data = kernel
        self.dbb_reparam.bias.data = bias
        for param in self.parameters():
            param.detach_()
        self.__delattr__("dbb_origin")
        self.__delattr__("dbb_avg")
        if hasattr(self, "dbb_1x1"):
            self.__delattr__("dbb_1x1")
        self.__delattr__("dbb_1x1_kxk")

    def forward(self, inputs):
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)

    def init_gamma(self, value):
        for path in ("dbb_origin.bn", "dbb_1x1.bn", "dbb_avg.avgbn", "dbb_1x1_kxk.bn2"):
            try:
                torch.nn.init.constant_(self.get_submodule(path).weight, value)
            except AttributeError:
                pass

    def single_init(self):
        self.init_gamma(0.0)
        torch.nn.init.constant_(self.dbb_origin.bn.weight, 1.0)


class ConvBN(nn.Module):
    """DingXiaoH/DiverseBranchBlock convnet_utils.py: ConvBN (``hasattr(self, 'bn')`` picks
    the path; its own ``switch_to_deploy``)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deploy=False,
                 nonlinear=None):
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias=deploy)
        if not deploy:
            self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        if hasattr(self, "bn"):
            return self.nonlinear(self.bn(self.conv(x)))
        return self.nonlinear(self.conv(x))

    def switch_to_deploy(self):
        kernel, bias = transI_fusebn(self.conv.weight, self.bn)
        c = self.conv
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                         bias=True)
        conv.weight.data = kernel
        conv.bias.data = bias
        for param in self.parameters():
            param.detach_()
        self.__delattr__("conv")
        self.__delattr__("bn")
        self.conv = conv


def _dbb_block_type(kernel_size, impl):
    if impl == "base" or kernel_size == 1 or kernel_size >= 7:
        return ConvBN
    return DiverseBranchBlock


def conv_bn(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, impl="DBB"):
    """convnet_utils.py: conv_bn (DBB for 3x3/5x5, ConvBN for 1x1 and >=7)."""
    return _dbb_block_type(kernel_size, impl)(in_channels=in_channels, out_channels=out_channels,
                                              kernel_size=kernel_size, stride=stride, padding=padding,
                                              dilation=dilation, groups=groups)


def conv_bn_relu(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, impl="DBB"):
    return _dbb_block_type(kernel_size, impl)(in_channels=in_channels, out_channels=out_channels,
                                              kernel_size=kernel_size, stride=stride, padding=padding,
                                              dilation=dilation, groups=groups, nonlinear=nn.ReLU())


class BasicBlock(nn.Module):
    """DingXiaoH/DiverseBranchBlock resnet.py: BasicBlock (conv_bn_relu, conv_bn, shortcut
    conv_bn 1x1 or Identity, ``out + shortcut``, F.relu)."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        if stride != 1 or in_planes != planes:
            self.shortcut = conv_bn(in_planes, planes, kernel_size=1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = conv_bn_relu(in_planes, planes, kernel_size=3, stride=stride, padding=1)
        self.conv2 = conv_bn(planes, planes, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return F.relu(out + self.shortcut(x))


class DBBResNet(nn.Module):
    """DingXiaoH/DiverseBranchBlock resnet.py: ResNet with CONV_BN_IMPL='DBB' (7x7 ConvBN
    stem + maxpool, BasicBlock stages, GAP, Linear), two stages of one block at 16/32."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.stage0 = nn.Sequential()
        self.stage0.add_module("conv1", conv_bn_relu(3, width, kernel_size=7, stride=2, padding=3))
        self.stage0.add_module("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.stage1 = nn.Sequential(BasicBlock(width, width, 1))
        self.stage2 = nn.Sequential(BasicBlock(width, 2 * width, 2))
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = self.stage2(self.stage1(self.stage0(x)))
        out = self.gap(out)
        return self.linear(out.view(out.size(0), -1))


class MobileV1Block(nn.Module):
    """DingXiaoH/DiverseBranchBlock mobilenet.py: MobileV1Block (depthwise conv_bn_relu 3x3 —
    a depthwise DBB with a padded AvgPool branch and a 1x1->kxk branch through 2x channels —
    then pointwise conv_bn_relu 1x1)."""

    def __init__(self, in_planes, out_planes, stride=1, **dbb_kwargs):
        super().__init__()
        if dbb_kwargs:
            self.depthwise = DiverseBranchBlock(in_planes, in_planes, 3, stride, 1, groups=in_planes,
                                                nonlinear=nn.ReLU(), **dbb_kwargs)
        else:
            self.depthwise = conv_bn_relu(in_planes, in_planes, 3, stride=stride, padding=1, groups=in_planes)
        self.pointwise = conv_bn_relu(in_planes, out_planes, 1, stride=1, padding=0)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class DBBMobileV1(nn.Module):
    """DingXiaoH/DiverseBranchBlock mobilenet.py: MobileV1 (conv_bn_relu stem, MobileV1Blocks,
    GAP, ``view(size(0), -1)``, Linear) at 16-32 channels and three blocks."""

    def __init__(self, num_classes=10, **dbb_kwargs):
        super().__init__()
        self.conv1 = conv_bn_relu(3, 16, 3, stride=2, padding=1)
        self.stem = nn.Sequential(MobileV1Block(16, 16, 1, **dbb_kwargs), MobileV1Block(16, 32, 2, **dbb_kwargs),
                                  MobileV1Block(32, 32, 1, **dbb_kwargs))
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = self.gap(self.stem(self.conv1(x)))
        return self.linear(out.view(out.size(0), -1))


class DBBGroupedBlock(nn.Module):
    """DingXiaoH/DiverseBranchBlock dbb_verify.py configuration: one DiverseBranchBlock
    16->32, k=5, stride 2, groups=2 (grouped IdentityBasedConv1x1, grouped transIII merges)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.dbb = DiverseBranchBlock(16, 32, kernel_size=5, stride=2, padding=2, groups=2)

    def forward(self, x):
        return self.dbb(self.stem(x))


# --------------------------------------------------------------------------------------
# OREPA
# --------------------------------------------------------------------------------------


class OREPA_1x1(nn.Module):
    """JUGGHM/OREPA_CVPR2022 blocks.py: OREPA_1x1 — no conv modules: ``weight_gen()`` builds
    the kernel from raw Parameters with einsums (origin * vector[0] + (l2i_conv1 x l2i_conv2)
    * vector[1]), then ``F.conv2d`` and a BN."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding=0, dilation=1, groups=1,
                 deploy=False, nonlinear=None):
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        assert groups == 1 and kernel_size == 1 and padding == kernel_size // 2
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        if deploy:
            self.or1x1_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                           bias=True)
            return
        self.weight_or1x1_origin = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        init.kaiming_uniform_(self.weight_or1x1_origin, a=math.sqrt(1.0))
        if out_channels > in_channels:
            self.weight_or1x1_l2i_conv1 = nn.Parameter(torch.eye(in_channels).unsqueeze(2).unsqueeze(3))
            self.weight_or1x1_l2i_conv2 = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
            init.kaiming_uniform_(self.weight_or1x1_l2i_conv2, a=math.sqrt(1.0))
        else:
            self.weight_or1x1_l2i_conv1 = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
            init.kaiming_uniform_(self.weight_or1x1_l2i_conv1, a=math.sqrt(1.0))
            self.weight_or1x1_l2i_conv2 = nn.Parameter(torch.eye(out_channels).unsqueeze(2).unsqueeze(3))
        self.vector = nn.Parameter(torch.empty(2, out_channels))
        self.bn = nn.BatchNorm2d(out_channels)
        init.constant_(self.vector[0, :], 1.0)
        init.constant_(self.vector[1, :], 0.5)

    def weight_gen(self):
        origin = torch.einsum("oihw,o->oihw", self.weight_or1x1_origin, self.vector[0, :])
        l2i = torch.einsum("tihw,othw->oihw", self.weight_or1x1_l2i_conv1, self.weight_or1x1_l2i_conv2)
        l2i = torch.einsum("oihw,o->oihw", l2i, self.vector[1, :])
        return origin + l2i

    def forward(self, inputs):
        if hasattr(self, "or1x1_reparam"):
            return self.nonlinear(self.or1x1_reparam(inputs))
        out = F.conv2d(inputs, self.weight_gen(), bias=None, stride=self.stride, padding=self.padding,
                       dilation=self.dilation, groups=self.groups)
        return self.nonlinear(self.bn(out))

    def switch_to_deploy(self):
        if hasattr(self, "or1x1_reparam"):
            return
        kernel, bias = transI_fusebn(self.weight_gen(), self.bn)
        self.or1x1_reparam = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                       self.padding, self.dilation, self.groups, bias=True)
        self.or1x1_reparam.weight.data = kernel
        self.or1x1_reparam.bias.data = bias
        for param in self.parameters():
            param.detach_()
        for name in ("weight_or1x1_origin", "weight_or1x1_l2i_conv1", "weight_or1x1_l2i_conv2", "vector", "bn"):
            self.__delattr__(name)


class OREPA(nn.Module):
    """JUGGHM/OREPA_CVPR2022 blocks.py: OREPA — six kernels generated each call from raw
    Parameters and buffers (origin, 1x1 -> avg, 1x1 -> frequency prior, identity-based 1x1 ->
    kxk, 1x1 padded, depthwise-separable), each scaled per output channel by a row of
    ``vector`` through einsums, summed, then one ``F.conv2d`` and a BN (``weight_only``
    returns the kernel instead). ``fre_init`` only fills the 3x3 corner of the prior (upstream
    leaves the rest of its ``torch.Tensor`` uninitialised; zeros here). ``dwsc2full`` and the
    grouped path call ``int()`` on parameter sizes, which ``symbolic_trace`` cannot do."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 internal_channels_1x1_3x3=None, deploy=False, nonlinear=None, weight_only=False,
                 init_hyper_para=1.0, init_hyper_gamma=1.0):
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.weight_only = weight_only
        self.kernel_size, self.in_channels, self.out_channels, self.groups = kernel_size, in_channels, out_channels, groups
        assert padding == kernel_size // 2
        self.stride, self.padding, self.dilation = stride, padding, dilation
        if deploy:
            self.orepa_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                           bias=True)
            return
        per_group = int(in_channels / groups)
        self.weight_orepa_origin = nn.Parameter(torch.empty(out_channels, per_group, kernel_size, kernel_size))
        init.kaiming_uniform_(self.weight_orepa_origin, a=0.0)
        self.weight_orepa_avg_conv = nn.Parameter(torch.empty(out_channels, per_group, 1, 1))
        self.weight_orepa_pfir_conv = nn.Parameter(torch.empty(out_channels, per_group, 1, 1))
        init.kaiming_uniform_(self.weight_orepa_avg_conv, a=0.0)
        init.kaiming_uniform_(self.weight_orepa_pfir_conv, a=0.0)
        self.register_buffer("weight_orepa_avg_avg", torch.ones(kernel_size, kernel_size).mul(1.0 / kernel_size ** 2))
        self.weight_orepa_1x1 = nn.Parameter(torch.empty(out_channels, per_group, 1, 1))
        init.kaiming_uniform_(self.weight_orepa_1x1, a=0.0)
        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = in_channels if groups <= 4 else 2 * in_channels
        self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(torch.zeros(internal_channels_1x1_3x3, per_group, 1, 1))
        identity = torch.zeros(internal_channels_1x1_3x3, per_group, 1, 1)
        for i in range(internal_channels_1x1_3x3):
            identity[i, i % per_group, 0, 0] = 1
        self.register_buffer("id_tensor", identity)
        self.weight_orepa_1x1_kxk_conv2 = nn.Parameter(
            torch.empty(out_channels, int(internal_channels_1x1_3x3 / groups), kernel_size, kernel_size))
        init.kaiming_uniform_(self.weight_orepa_1x1_kxk_conv2, a=0.0)
        expand_ratio = 8
        self.weight_orepa_gconv_dw = nn.Parameter(torch.empty(in_channels * expand_ratio, 1, kernel_size, kernel_size))
        self.weight_orepa_gconv_pw = nn.Parameter(
            torch.empty(out_channels, int(in_channels * expand_ratio / groups), 1, 1))
        init.kaiming_uniform_(self.weight_orepa_gconv_dw, a=0.0)
        init.kaiming_uniform_(self.weight_orepa_gconv_pw, a=0.0)
        self.vector = nn.Parameter(torch.empty(6, out_channels))
        if weight_only is False:
            self.bn = nn.BatchNorm2d(out_channels)
        self.fre_init()
        gamma = math.sqrt(init_hyper_gamma)
        for row, value in enumerate((0.25, 0.25, 0.0, 0.5, 1.0, 0.5)):
            init.constant_(self.vector[row, :], value * gamma)

    def fre_init(self):
        prior = torch.zeros(self.out_channels, self.kernel_size, self.kernel_size)
        half = self.out_channels / 2
        for i in range(self.out_channels):
            for h in range(3):
                for w in range(3):
                    if i < half:
                        prior[i, h, w] = math.cos(math.pi * (h + 0.5) * (i + 1) / 3)
                    else:
                        prior[i, h, w] = math.cos(math.pi * (w + 0.5) * (i + 1 - half) / 3)
        self.register_buffer("weight_orepa_prior", prior)

    def weight_gen(self):
        v = self.vector
        origin = torch.einsum("oihw,o->oihw", self.weight_orepa_origin, v[0, :])
        avg = torch.einsum("oihw,o->oihw", torch.einsum("oi,hw->oihw", self.weight_orepa_avg_conv.squeeze(3).squeeze(2),
                                                        self.weight_orepa_avg_avg), v[1, :])
        pfir = torch.einsum("oihw,o->oihw", torch.einsum("oi,ohw->oihw",
                                                         self.weight_orepa_pfir_conv.squeeze(3).squeeze(2),
                                                         self.weight_orepa_prior), v[2, :])
        conv1 = (self.weight_orepa_1x1_kxk_idconv1 + self.id_tensor).squeeze(3).squeeze(2)
        conv2 = self.weight_orepa_1x1_kxk_conv2
        if self.groups > 1:
            g = self.groups
            t, ig = conv1.size()
            o, tg, h, w = conv2.size()
            conv1 = conv1.view(g, int(t / g), ig)
            conv2 = conv2.view(g, int(o / g), tg, h, w)
            one_kxk = torch.einsum("gti,gothw->goihw", conv1, conv2).reshape(o, ig, h, w)
        else:
            one_kxk = torch.einsum("ti,othw->oihw", conv1, conv2)
        one_kxk = torch.einsum("oihw,o->oihw", one_kxk, v[3, :])
        one_by_one = 0
        if hasattr(self, "weight_orepa_1x1"):
            one_by_one = torch.einsum("oihw,o->oihw", transVI_multiscale(self.weight_orepa_1x1, self.kernel_size),
                                      v[4, :])
        gconv = torch.einsum("oihw,o->oihw", self.dwsc2full(self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw,
                                                            self.in_channels, self.groups), v[5, :])
        return origin + avg + one_by_one + one_kxk + pfir + gconv

    def dwsc2full(self, weight_dw, weight_pw, groups, groups_conv=1):
        t, ig, h, w = weight_dw.size()
        o = weight_pw.size(0)
        tg = int(t / groups)
        i = int(ig * groups)
        ogc = int(o / groups_conv)
        groups_gc = int(groups / groups_conv)
        weight_dw = weight_dw.view(groups_conv, groups_gc, tg, ig, h, w)
        weight_pw = weight_pw.squeeze().view(ogc, groups_conv, groups_gc, tg)
        full = torch.einsum("cgtihw,ocgt->cogihw", weight_dw, weight_pw)
        return full.reshape(o, int(i / groups_conv), h, w)

    def forward(self, inputs=None):
        if hasattr(self, "orepa_reparam"):
            return self.nonlinear(self.orepa_reparam(inputs))
        weight = self.weight_gen()
        if self.weight_only is True:
            return weight
        out = F.conv2d(inputs, weight, bias=None, stride=self.stride, padding=self.padding, dilation=self.dilation,
                       groups=self.groups)
        return self.nonlinear(self.bn(out))

    def switch_to_deploy(self):
        if hasattr(self, "or1x1_reparam"):  # upstream tests this name, not orepa_reparam
            return
        kernel, bias = transI_fusebn(self.weight_gen(), self.bn)
        self.orepa_reparam = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                       self.padding, self.dilation, self.groups, bias=True)
        self.orepa_reparam.weight.data = kernel
        self.orepa_reparam.bias.data = bias
        for param in self.parameters():
            param.detach_()
        for name in ("weight_orepa_origin", "weight_orepa_1x1", "weight_orepa_1x1_kxk_conv2", "id_tensor",
                     "weight_orepa_1x1_kxk_idconv1", "weight_orepa_avg_avg", "weight_orepa_avg_conv",
                     "weight_orepa_pfir_conv", "weight_orepa_prior", "weight_orepa_gconv_dw",
                     "weight_orepa_gconv_pw", "bn", "vector"):
            self.__delattr__(name)


class OREPA_LargeConv(nn.Module):
    """JUGGHM/OREPA_CVPR2022 blocks.py: OREPA_LargeConv — a 7x7 kernel composed from three
    ``weight_only`` 3x3 OREPAs (``F.conv2d`` of kernel by kernel, padding 2), then one
    ``F.conv2d`` and a BN. The inner OREPAs have no BN: the deploy walk only works because
    ``modules()`` reaches this parent (which deletes them) before its children."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1, groups=1, deploy=False,
                 nonlinear=None):
        super().__init__()
        assert kernel_size % 2 == 1 and kernel_size > 3
        self.stride, self.padding, self.groups, self.dilation = stride, padding, groups, dilation
        self.layers = int((kernel_size - 1) / 2)
        self.kernel_size, self.in_channels, self.out_channels = kernel_size, in_channels, out_channels
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        internal = out_channels
        if deploy:
            self.or_large_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                              groups, bias=True)
            return
        for i in range(self.layers):
            if i == 0:
                block = OREPA(in_channels, internal, 3, 1, 1, groups=groups, weight_only=True)
            elif i == self.layers - 1:
                block = OREPA(internal, out_channels, 3, self.stride, 1, weight_only=True)
            else:
                block = OREPA(internal, internal, 3, 1, 1, weight_only=True)
            self.__setattr__("weight" + str(i), block)
        self.bn = nn.BatchNorm2d(out_channels)

    def weight_gen(self):
        weight = getattr(self, "weight0").weight_gen().transpose(0, 1)
        for i in range(self.layers - 1):
            weight = F.conv2d(weight, getattr(self, "weight" + str(i + 1)).weight_gen(), groups=self.groups, padding=2)
        return weight.transpose(0, 1)

    def forward(self, inputs):
        if hasattr(self, "or_large_reparam"):
            return self.nonlinear(self.or_large_reparam(inputs))
        out = F.conv2d(inputs, self.weight_gen(), stride=self.stride, padding=self.padding, dilation=self.dilation,
                       groups=self.groups)
        return self.nonlinear(self.bn(out))

    def switch_to_deploy(self):
        if hasattr(self, "or_large_reparam"):
            return
        kernel, bias = transI_fusebn(self.weight_gen(), self.bn)
        self.or_large_reparam = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                          self.padding, self.dilation, self.groups, bias=True)
        self.or_large_reparam.weight.data = kernel
        self.or_large_reparam.bias.data = bias
        for param in self.parameters():
            param.detach_()
        for i in range(self.layers):
            self.__delattr__("weight" + str(i))
        self.__delattr__("bn")


class OREPANet(nn.Module):
    """JUGGHM/OREPA_CVPR2022 convnet_utils.py with CONV_BN_IMPL='OREPA' (kernel 1 ->
    OREPA_1x1, >=7 -> OREPA_LargeConv, else OREPA): a 7x7 stem, 3x3 OREPAs (one grouped,
    stride 2), 1x1 OREPAs widening and narrowing, GAP, Linear."""

    def __init__(self):
        super().__init__()
        relu = nn.ReLU
        self.stem = OREPA_LargeConv(3, 16, 7, stride=2, padding=3, nonlinear=relu())
        self.conv1 = OREPA(16, 16, 3, padding=1, nonlinear=relu())
        self.expand = OREPA_1x1(16, 32, nonlinear=relu())
        self.down = OREPA(32, 32, 3, stride=2, padding=1, groups=2, nonlinear=relu())
        self.squeeze = OREPA_1x1(32, 16)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(16, 10)
        with torch.no_grad():  # trained branch scales: no branch left at zero
            for m in self.modules():
                if isinstance(m, (OREPA, OREPA_1x1)):
                    m.vector.uniform_(0.25, 1.0)

    def forward(self, x):
        x = self.squeeze(self.down(self.expand(self.conv1(self.stem(x)))))
        return self.linear(torch.flatten(self.gap(x), 1))


# --------------------------------------------------------------------------------------
# entries
# --------------------------------------------------------------------------------------

_ACNET_SRC = "DingXiaoH/ACNet acnet/acb.py: ACBlock"
_DBB_SRC = "DingXiaoH/DiverseBranchBlock diversebranchblock.py: DiverseBranchBlock, IdentityBasedConv1x1, " \
           "BNAndPadLayer; dbb_transforms.py"

IDIOMS = [
    Idiom(
        name="acnet.acb_net",
        library="ACNet",
        source=_ACNET_SRC + "; acnet/acnet_builder.py: ACNetBuilder; builder.py: ConvBuilder",
        build=ACNetCifarQuick,
        reparameterize=switch_to_deploy_walk,
        notes="kxk + kx1 + 1xk conv-BN branches with asymmetric paddings [p - k//2, p] summed; "
              "grouped stride-2 and 5x5 blocks; builder 1x1 conv-BN Sequentials are not touched by "
              "the walk; AvgPool2d(k, stride=k) GAP + view flatten.",
    ),
    Idiom(
        name="acnet.acb_crop",
        library="ACNet",
        source=_ACNET_SRC,
        build=ACBCropNet,
        reparameterize=switch_to_deploy_walk,
        notes="padding < k//2: the kx1 / 1xk branches read input[:, :, :, c:-c] / input[:, :, c:-c, :] "
              "with padding 0 on the cropped axis — branches over different (sliced) inputs that "
              "still merge into the kxk conv.",
    ),
    Idiom(
        name="acnet.bn_relu_acb",
        library="ACNet",
        source=_ACNET_SRC + "; acnet/acnet_builder.py: ACNetBuilder.BNReLUConv2d",
        build=ACNetPreAct,
        reparameterize=switch_to_deploy_walk,
        must_remain={"batch_norm": 2},
        notes="pre-activation BN -> ReLU -> ACBlock: the two leading BNs are separated from every "
              "conv by a ReLU and must stay; the ACBs themselves fold.",
    ),
    Idiom(
        name="acnet.acb_no_affine",
        library="ACNet",
        source=_ACNET_SRC + " (use_affine=False)",
        build=lambda: ACNetCifarQuick(ACNetBuilder(use_affine=False)),
        reparameterize=None,
        notes="branch BNs without affine (weight/bias None): exact to fold, but ACBlock's "
              "_fuse_bn_tensor reads bn.weight and fails, so there is no library baseline.",
    ),
    Idiom(
        name="dbb.resnet",
        library="DiverseBranchBlock",
        source=_DBB_SRC + "; convnet_utils.py: ConvBN, conv_bn, conv_bn_relu; resnet.py: ResNet, BasicBlock; "
               "convert.py",
        build=DBBResNet,
        reparameterize=switch_to_deploy_walk,
        traceable=False,
        notes="per DBB: kxk conv-BN, 1x1 conv-BN, 1x1 -> BNAndPad -> AvgPool(k, s, 0) -> BN, "
              "IdentityBasedConv1x1 (weight + id_tensor in forward) -> BNAndPad -> kxk pad 0 -> BN, "
              "summed with `out +=`; BNAndPad's border item assignment stops symbolic_trace. "
              "Baseline builds transV_avg in the model dtype (upstream's float32 kernel: ~3e-9 off "
              "in float64).",
    ),
    Idiom(
        name="dbb.mobilenet",
        library="DiverseBranchBlock",
        source=_DBB_SRC + "; mobilenet.py: MobileV1, MobileV1Block",
        build=DBBMobileV1,
        reparameterize=switch_to_deploy_walk,
        traceable=False,
        notes="depthwise DBBs: AvgPool2d(3, s, 1) on the input (count_include_pad=True) -> BN, and a "
              "grouped 1x1 to 2x channels -> BNAndPad -> grouped 3x3 -> BN (per-group transIII); "
              "pointwise ConvBN with its own switch_to_deploy.",
    ),
    Idiom(
        name="dbb.grouped_k5_block",
        library="DiverseBranchBlock",
        source=_DBB_SRC + "; dbb_verify.py",
        build=DBBGroupedBlock,
        reparameterize=switch_to_deploy_walk,
        traceable=False,
        notes="one 16->32 k5 s2 groups=2 DBB (dbb_verify's case): grouped IdentityBasedConv1x1 and "
              "grouped 1x1 -> BNAndPad(2) -> AvgPool(5, 2) chains; a bare Conv2d stem in front.",
    ),
    Idiom(
        name="dbb.avg_pool_exclude_pad",
        library="DiverseBranchBlock",
        source=_DBB_SRC + " (depthwise DBB with AvgPool2d(count_include_pad=False))",
        build=lambda: DBBMobileV1(avg_count_include_pad=False),
        reparameterize=None,
        traceable=False,
        must_remain={"avg_pool": 3},
        notes="negative: the depthwise DBB's padded average-pool branch built with "
              "count_include_pad=False divides border windows by fewer taps — not a conv; the "
              "three avg pools must stay (transV_avg would be wrong at the borders, no baseline).",
    ),
    Idiom(
        name="dbb.orepa",
        library="OREPA",
        source="JUGGHM/OREPA_CVPR2022 blocks.py: OREPA, OREPA_1x1, OREPA_LargeConv; convnet_utils.py; convert.py",
        build=OREPANet,
        reparameterize=switch_to_deploy_walk,
        traceable=False,
        notes="no conv modules at all: kernels generated in forward from Parameters/buffers by "
              "einsums (and a 7x7 kernel by convolving three generated 3x3 kernels), then "
              "F.conv2d + BN; the kernel subgraph is parameter-only and must be constant-folded. "
              "int(t / groups) on parameter .size() values stops symbolic_trace; export is fine.",
    ),
]
