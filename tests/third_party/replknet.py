"""DingXiaoH's official RepLKNet (DingXiaoH/RepLKNet-pytorch replknet.py), as its ImageNet
models are built: ``use_sync_bn=True`` by default, so every BatchNorm of the network is an
``nn.SyncBatchNorm`` (a module-level switch read by ``get_bn``), which is also what any
model trained with DDP and ``nn.SyncBatchNorm.convert_sync_batchnorm`` carries into its
checkpoint. In eval mode a SyncBatchNorm computes what ``BatchNorm2d`` computes.

Re-written from DingXiaoH/RepLKNet-pytorch replknet.py (``get_conv2d``'s optional
``LARGE_KERNEL_CONV_IMPL`` kernel and ``RepLKBlock``'s ``print`` left out); the OpenMMLab
port of the same network, with ``BatchNorm2d``, is ``mmpretrain.replknet``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint

from . import Idiom

_SRC = "DingXiaoH/RepLKNet-pytorch replknet.py"

# --------------------------------------------------------------------------------------
# the norm switch: get_bn returns SyncBatchNorm once RepLKNet(use_sync_bn=True) flips it
# --------------------------------------------------------------------------------------

use_sync_bn = False


def enable_sync_bn():
    global use_sync_bn
    use_sync_bn = True


def get_bn(channels):
    return nn.SyncBatchNorm(channels) if use_sync_bn else nn.BatchNorm2d(channels)


class DropPath(nn.Module):
    """What replknet.py imports from timm (``timm.models.layers.DropPath``): per-sample
    stochastic depth in training, the identity in eval."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


def get_conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias):
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias)


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, dilation=1):
    """``nn.Sequential`` of ``conv`` (no bias) and ``bn`` (from ``get_bn``)."""
    if padding is None:
        padding = kernel_size // 2
    seq = nn.Sequential()
    seq.add_module("conv", get_conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                      dilation, groups, bias=False))
    seq.add_module("bn", get_bn(out_channels))
    return seq


def conv_bn_relu(in_channels, out_channels, kernel_size, stride, padding, groups, dilation=1):
    seq = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, dilation)
    seq.add_module("nonlinear", nn.ReLU())
    return seq


def fuse_bn(conv, bn):
    """The repo's own conv+BN fold: ``(W * gamma / std, beta - mean * gamma / std)``."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = (bn.weight / std).reshape(-1, 1, 1, 1)
    return conv.weight * scale, bn.bias - bn.running_mean * bn.weight / std


class ReparamLargeKernelConv(nn.Module):
    """DingXiaoH/RepLKNet-pytorch replknet.py: ReparamLargeKernelConv.

    Idiom: depthwise large-kernel ``conv_bn`` (``lkb_origin``) plus a small-kernel
    ``conv_bn`` added in place (``out += self.small_conv(inputs)``), branches found with
    ``hasattr``; both BNs are SyncBatchNorms. ``merge_kernel`` folds each BN with
    ``fuse_bn``, pads the small kernel to the centre and deletes both branches."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, groups, small_kernel,
                 small_kernel_merged=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        padding = kernel_size // 2
        if small_kernel_merged:
            self.lkb_reparam = get_conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                          1, groups, bias=True)
        else:
            self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding,
                                      groups)
            if small_kernel is not None:
                assert small_kernel <= kernel_size
                self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride,
                                          small_kernel // 2, groups)

    def forward(self, inputs):
        if hasattr(self, "lkb_reparam"):
            out = self.lkb_reparam(inputs)
        else:
            out = self.lkb_origin(inputs)
            if hasattr(self, "small_conv"):
                out += self.small_conv(inputs)
        return out

    def get_equivalent_kernel_bias(self):
        kernel, bias = fuse_bn(self.lkb_origin.conv, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            small_kernel, small_bias = fuse_bn(self.small_conv.conv, self.small_conv.bn)
            bias += small_bias
            kernel += nn.functional.pad(small_kernel, [(self.kernel_size - self.small_kernel) // 2] * 4)
        return kernel, bias

    def merge_kernel(self):
        kernel, bias = self.get_equivalent_kernel_bias()
        origin = self.lkb_origin.conv
        self.lkb_reparam = get_conv2d(origin.in_channels, origin.out_channels, origin.kernel_size,
                                      origin.stride, origin.padding, origin.dilation, origin.groups,
                                      bias=True)
        self.lkb_reparam.weight.data = kernel
        self.lkb_reparam.bias.data = bias
        self.__delattr__("lkb_origin")
        if hasattr(self, "small_conv"):
            self.__delattr__("small_conv")


class ConvFFN(nn.Module):
    """DingXiaoH/RepLKNet-pytorch replknet.py: ConvFFN — a SyncBN before a 1x1 ``conv_bn``,
    GELU, a second 1x1 ``conv_bn``, residual through ``drop_path`` (Identity at rate 0)."""

    def __init__(self, in_channels, internal_channels, out_channels, drop_path):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.preffn_bn = get_bn(in_channels)
        self.pw1 = conv_bn(in_channels, internal_channels, 1, 1, 0, groups=1)
        self.pw2 = conv_bn(internal_channels, out_channels, 1, 1, 0, groups=1)
        self.nonlinear = nn.GELU()

    def forward(self, x):
        out = self.preffn_bn(x)
        out = self.pw1(out)
        out = self.nonlinear(out)
        out = self.pw2(out)
        return x + self.drop_path(out)


class RepLKBlock(nn.Module):
    """DingXiaoH/RepLKNet-pytorch replknet.py: RepLKBlock — SyncBN, 1x1 ``conv_bn_relu``,
    the large-kernel conv, ReLU, 1x1 ``conv_bn``, residual."""

    def __init__(self, in_channels, dw_channels, block_lk_size, small_kernel, drop_path,
                 small_kernel_merged=False):
        super().__init__()
        self.pw1 = conv_bn_relu(in_channels, dw_channels, 1, 1, 0, groups=1)
        self.pw2 = conv_bn(dw_channels, in_channels, 1, 1, 0, groups=1)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, dw_channels, block_lk_size, 1,
                                                   dw_channels, small_kernel, small_kernel_merged)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = get_bn(in_channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        out = self.prelkb_bn(x)
        out = self.pw1(out)
        out = self.large_kernel(out)
        out = self.lk_nonlinear(out)
        out = self.pw2(out)
        return x + self.drop_path(out)


class RepLKNetStage(nn.Module):
    """DingXiaoH/RepLKNet-pytorch replknet.py: RepLKNetStage — (RepLKBlock, ConvFFN) pairs in
    a ModuleList, each run through ``torch.utils.checkpoint`` when ``use_checkpoint``."""

    def __init__(self, channels, num_blocks, stage_lk_size, drop_path, small_kernel, dw_ratio=1,
                 ffn_ratio=4, use_checkpoint=False, small_kernel_merged=False,
                 norm_intermediate_features=False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        blocks = []
        for i in range(num_blocks):
            rate = drop_path[i] if isinstance(drop_path, list) else drop_path
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel,
                                     rate, small_kernel_merged))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), channels, rate))
        self.blocks = nn.ModuleList(blocks)
        self.norm = get_bn(channels) if norm_intermediate_features else nn.Identity()

    def forward(self, x):
        for blk in self.blocks:
            if self.use_checkpoint:
                x = checkpoint.checkpoint(blk, x, use_reentrant=True)
            else:
                x = blk(x)
        return x


class RepLKNet(nn.Module):
    """DingXiaoH/RepLKNet-pytorch replknet.py: RepLKNet — stem of four ``conv_bn_relu``
    (3x3 s2, depthwise 3x3, 1x1, depthwise 3x3 s2) in a ModuleList, stages with 1x1 +
    depthwise 3x3 s2 transitions, then SyncBN -> ``AdaptiveAvgPool2d(1)`` ->
    ``torch.flatten(x, 1)`` -> Linear. ``use_sync_bn=True`` is the default.
    ``structural_reparam`` calls ``merge_kernel`` wherever it exists; the other BNs are left
    to "a framework that can fuse BN automatically" (``deep_fuse_BN`` is a TODO)."""

    def __init__(self, large_kernel_sizes, layers, channels, drop_path_rate, small_kernel,
                 dw_ratio=1, ffn_ratio=4, in_channels=3, num_classes=1000, out_indices=None,
                 use_checkpoint=False, small_kernel_merged=False, use_sync_bn=True,
                 norm_intermediate_features=False):
        super().__init__()
        if num_classes is None and out_indices is None:
            raise ValueError("must specify one of num_classes and out_indices")
        self.out_indices = out_indices
        if use_sync_bn:
            enable_sync_bn()
        base_width = channels[0]
        self.use_checkpoint = use_checkpoint
        self.norm_intermediate_features = norm_intermediate_features
        self.num_stages = len(layers)
        self.stem = nn.ModuleList([
            conv_bn_relu(in_channels, base_width, 3, 2, 1, groups=1),
            conv_bn_relu(base_width, base_width, 3, 1, 1, groups=base_width),
            conv_bn_relu(base_width, base_width, 1, 1, 0, groups=1),
            conv_bn_relu(base_width, base_width, 3, 2, 1, groups=base_width)])
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(layers))]
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i in range(self.num_stages):
            self.stages.append(RepLKNetStage(
                channels[i], layers[i], large_kernel_sizes[i],
                rates[sum(layers[:i]):sum(layers[:i + 1])], small_kernel, dw_ratio, ffn_ratio,
                use_checkpoint, small_kernel_merged, norm_intermediate_features))
            if i < len(layers) - 1:
                self.transitions.append(nn.Sequential(
                    conv_bn_relu(channels[i], channels[i + 1], 1, 1, 0, groups=1),
                    conv_bn_relu(channels[i + 1], channels[i + 1], 3, stride=2, padding=1,
                                 groups=channels[i + 1])))
        if num_classes is not None:
            self.norm = get_bn(channels[-1])
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(channels[-1], num_classes)

    def forward_features(self, x):
        x = self.stem[0](x)
        for stem_layer in self.stem[1:]:
            if self.use_checkpoint:
                x = checkpoint.checkpoint(stem_layer, x, use_reentrant=True)
            else:
                x = stem_layer(x)
        if self.out_indices is None:
            for i in range(self.num_stages):
                x = self.stages[i](x)
                if i < self.num_stages - 1:
                    x = self.transitions[i](x)
            return x
        outs = []
        for i in range(self.num_stages):
            x = self.stages[i](x)
            if i in self.out_indices:
                outs.append(self.stages[i].norm(x))
            if i < self.num_stages - 1:
                x = self.transitions[i](x)
        return outs

    def forward(self, x):
        x = self.forward_features(x)
        if self.out_indices:
            return x
        x = self.norm(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.head(x)

    def structural_reparam(self):
        for m in self.modules():
            if hasattr(m, "merge_kernel"):
                m.merge_kernel()


def build_replknet_sync_bn():
    # RepLKNet-31B's layout shrunk: two stages, kernels 7 and 5 with 3x3 small kernels
    return RepLKNet(large_kernel_sizes=[7, 5], layers=[1, 1], channels=[16, 32],
                    drop_path_rate=0.0, small_kernel=3, num_classes=10, use_sync_bn=True)


def structural_reparam_and_fuse_bn(model: RepLKNet) -> RepLKNet:
    """The official deploy path: ``structural_reparam()``, then the BN fusion its comments
    leave to the framework, done with the repo's own ``fuse_bn`` on every remaining
    ``conv_bn`` pair (the pre-BNs and the final norm stay: they precede their conv)."""
    model.structural_reparam()
    for seq in list(model.modules()):
        if isinstance(seq, nn.Sequential) and isinstance(getattr(seq, "conv", None), nn.Conv2d) \
                and isinstance(getattr(seq, "bn", None), nn.modules.batchnorm._BatchNorm):
            kernel, bias = fuse_bn(seq.conv, seq.bn)
            conv = seq.conv
            fused = get_conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                               conv.padding, conv.dilation, conv.groups, bias=True)
            fused.weight.data, fused.bias.data = kernel.detach(), bias.detach()
            seq.conv, seq.bn = fused, nn.Identity()
    return model


IDIOMS: list[Idiom] = [
    Idiom(
        name="replknet.official_sync_bn",
        library="RepLKNet",
        source=f"{_SRC}: RepLKNet, RepLKNetStage, RepLKBlock, ConvFFN, ReparamLargeKernelConv, "
               "conv_bn, get_bn (use_sync_bn=True), fuse_bn, structural_reparam",
        build=build_replknet_sync_bn,
        reparameterize=structural_reparam_and_fuse_bn,
        notes="every BN a SyncBatchNorm (the official default); large (7x7 / 5x5) + small (3x3) "
              "depthwise conv-SyncBN pairs summed in place must merge into one conv; SyncBN "
              "proves no rank (it takes any rank from 2): the classifier head proves it. "
              "Baseline: structural_reparam + the repo's fuse_bn on every conv_bn "
              "(torch.fx's fuse only knows BatchNorm2d).",
    ),
]
