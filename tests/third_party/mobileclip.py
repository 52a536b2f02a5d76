"""Apple MobileCLIP (apple/ml-mobileclip): the MobileOne block and ``reparameterize_model``
walk, the MCi image encoder's RepMixer / RepCPE / ConvFFN / attention blocks and
large-kernel patch embedding, its ``GlobalPool2D`` projection head, and the text
encoder's 1-D RepMixer block.

Re-written from mobileclip/modules/common/mobileone.py, mobileclip/models/mci.py,
mobileclip/modules/image/replknet.py, mobileclip/modules/image/image_projection.py and
mobileclip/modules/text/repmixer.py; timm helpers (SqueezeExcite, make_divisible) are
re-written too (no timm import).
"""

from __future__ import annotations

import copy
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Idiom

# --------------------------------------------------------------------------------------
# timm helpers used by the Apple code
# --------------------------------------------------------------------------------------


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """huggingface/pytorch-image-models timm/layers/helpers.py: make_divisible."""
    min_value = min_value or divisor
    rounded = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * v else rounded


class SqueezeExcite(nn.Module):
    """huggingface/pytorch-image-models timm/layers/squeeze_excite.py: SEModule (alias
    SqueezeExcite): ``x * sigmoid(fc2(act(fc1(x.mean((2, 3), keepdim=True)))))``."""

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_divisor=8):
        super().__init__()
        rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        squeezed = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * self.gate(squeezed)


# --------------------------------------------------------------------------------------
# mobileclip/modules/common/mobileone.py
# --------------------------------------------------------------------------------------


class SEBlock(nn.Module):
    """apple/ml-mobileclip mobileclip/modules/common/mobileone.py: SEBlock. Reads
    ``b, c, h, w = inputs.size()`` and pools with ``F.avg_pool2d(inputs, kernel_size=[h, w])``
    (a shape-valued kernel), then ``x.view(-1, c, 1, 1)`` and ``inputs * x``."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = int(in_channels * rd_ratio)
        self.reduce = nn.Conv2d(in_channels, hidden, kernel_size=1, stride=1, bias=True)
        self.expand = nn.Conv2d(hidden, in_channels, kernel_size=1, stride=1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, c, h, w = inputs.size()
        x = F.avg_pool2d(inputs, kernel_size=[h, w])
        x = torch.sigmoid(self.expand(F.relu(self.reduce(x))))
        return inputs * x.view(-1, c, 1, 1)


class MobileOneBlock(nn.Module):
    """apple/ml-mobileclip mobileclip/modules/common/mobileone.py: MobileOneBlock.

    ``identity_out = 0`` / ``scale_out = 0`` seeds replaced by the BN skip and the 1x1
    conv-BN when present, ``out = scale_out + identity_out`` (so ``0 + 0``, ``0 + bn(x)`` or
    ``conv(x) + bn(x)``), then ``out += rbr_conv[ix](x)`` in place; SE (or Identity) then
    activation. The default ``activation=nn.GELU()`` is one module instance shared by every
    block built with the default; tuple kernels silently lose the scale branch (it is tested
    on ``kernel_size[0]``). ``reparameterize()`` builds ``reparam_conv`` and leaves
    ``id_tensor`` behind (RepMixer reads it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0,
                 dilation: int = 1, groups: int = 1, inference_mode: bool = False, use_se: bool = False,
                 use_act: bool = True, use_scale_branch: bool = True, num_conv_branches: int = 1,
                 activation: nn.Module = nn.GELU()) -> None:
        super().__init__()
        self.inference_mode = inference_mode
        self.groups, self.stride, self.padding, self.dilation = groups, stride, padding, dilation
        self.kernel_size, self.in_channels, self.out_channels = kernel_size, in_channels, out_channels
        self.num_conv_branches = num_conv_branches
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = activation if use_act else nn.Identity()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                          groups, bias=True)
        else:
            self.rbr_skip = (nn.BatchNorm2d(num_features=in_channels)
                             if out_channels == in_channels and stride == 1 else None)
            if num_conv_branches > 0:
                self.rbr_conv = nn.ModuleList(self._conv_bn(kernel_size=kernel_size, padding=padding)
                                              for _ in range(num_conv_branches))
            else:
                self.rbr_conv = None
            self.rbr_scale = None
            first = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
            if first > 1 and use_scale_branch:
                self.rbr_scale = self._conv_bn(kernel_size=1, padding=0)

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

    def reparameterize(self):
        if self.inference_mode:
            return
        kernel, bias = self._get_kernel_bias()
        self.reparam_conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                      self.padding, self.dilation, self.groups, bias=True)
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        for param in self.parameters():
            param.detach_()
        self.__delattr__("rbr_conv")
        self.__delattr__("rbr_scale")
        if hasattr(self, "rbr_skip"):
            self.__delattr__("rbr_skip")
        self.inference_mode = True

    def _get_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        k_scale, b_scale = 0, 0
        if self.rbr_scale is not None:
            k_scale, b_scale = self._fuse_bn_tensor(self.rbr_scale)
            pad = self.kernel_size // 2
            k_scale = F.pad(k_scale, [pad, pad, pad, pad])
        k_id, b_id = 0, 0
        if self.rbr_skip is not None:
            k_id, b_id = self._fuse_bn_tensor(self.rbr_skip)
        k_conv, b_conv = 0, 0
        if self.rbr_conv is not None:
            for ix in range(self.num_conv_branches):
                k, b = self._fuse_bn_tensor(self.rbr_conv[ix])
                k_conv += k
                b_conv += b
        return k_conv + k_scale + k_id, b_conv + b_scale + b_id

    def _fuse_bn_tensor(self, branch: Union[nn.Sequential, nn.BatchNorm2d]):
        if isinstance(branch, nn.Sequential):
            kernel, bn = branch.conv.weight, branch.bn
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                per_group = self.in_channels // self.groups
                ks = (self.kernel_size, self.kernel_size) if isinstance(self.kernel_size, int) else self.kernel_size
                value = torch.zeros((self.in_channels, per_group, ks[0], ks[1]), dtype=branch.weight.dtype,
                                    device=branch.weight.device)
                for i in range(self.in_channels):
                    value[i, i % per_group, ks[0] // 2, ks[1] // 2] = 1
                self.id_tensor = value
            kernel, bn = self.id_tensor, branch
        std = (bn.running_var + bn.eps).sqrt()
        return kernel * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std

    def _conv_bn(self, kernel_size, padding) -> nn.Sequential:
        seq = nn.Sequential()
        seq.add_module("conv", nn.Conv2d(self.in_channels, self.out_channels, kernel_size, stride=self.stride,
                                         padding=padding, groups=self.groups, bias=False))
        seq.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return seq


def reparameterize_model(model: nn.Module) -> nn.Module:
    """apple/ml-mobileclip mobileclip/modules/common/mobileone.py: reparameterize_model
    (deep copy, then ``reparameterize()`` on every module that has one, pre-order: a RepMixer
    reparameterizes its own MobileOne children before the walk reaches them)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    return model


# --------------------------------------------------------------------------------------
# mobileclip/modules/image/replknet.py
# --------------------------------------------------------------------------------------


class ReparamLargeKernelConv(nn.Module):
    """apple/ml-mobileclip mobileclip/modules/image/replknet.py: ReparamLargeKernelConv
    (large-kernel conv-BN + small-kernel conv-BN added in place, grouped with a channel
    multiplier when used as a patch embedding, then SqueezeExcite and a shared default GELU)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, groups, small_kernel,
                 inference_mode=False, use_se=False, activation: nn.Module = nn.GELU()) -> None:
        super().__init__()
        self.stride, self.groups = stride, groups
        self.in_channels, self.out_channels = in_channels, out_channels
        self.activation = activation
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        self.padding = kernel_size // 2
        self.se = SqueezeExcite(out_channels, rd_ratio=0.25) if use_se else nn.Identity()
        if inference_mode:
            self.lkb_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, self.padding, 1, groups,
                                         bias=True)
        else:
            self.lkb_origin = self._conv_bn(kernel_size, self.padding)
            if small_kernel is not None:
                assert small_kernel <= kernel_size
                self.small_conv = self._conv_bn(small_kernel, small_kernel // 2)

    def forward(self, x):
        if hasattr(self, "lkb_reparam"):
            out = self.lkb_reparam(x)
        else:
            out = self.lkb_origin(x)
            if hasattr(self, "small_conv"):
                out += self.small_conv(x)
        return self.activation(self.se(out))

    def get_kernel_bias(self):
        kernel, bias = self._fuse_bn(self.lkb_origin.conv, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            small_k, small_b = self._fuse_bn(self.small_conv.conv, self.small_conv.bn)
            bias += small_b
            kernel += F.pad(small_k, [(self.kernel_size - self.small_kernel) // 2] * 4)
        return kernel, bias

    def reparameterize(self) -> None:
        kernel, bias = self.get_kernel_bias()
        self.lkb_reparam = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                     self.padding, self.lkb_origin.conv.dilation, self.groups, bias=True)
        self.lkb_reparam.weight.data = kernel
        self.lkb_reparam.bias.data = bias
        self.__delattr__("lkb_origin")
        if hasattr(self, "small_conv"):
            self.__delattr__("small_conv")

    @staticmethod
    def _fuse_bn(conv, bn):
        std = (bn.running_var + bn.eps).sqrt()
        return conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std

    def _conv_bn(self, kernel_size, padding=0):
        seq = nn.Sequential()
        seq.add_module("conv", nn.Conv2d(self.in_channels, self.out_channels, kernel_size, stride=self.stride,
                                         padding=padding, groups=self.groups, bias=False))
        seq.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return seq


# --------------------------------------------------------------------------------------
# mobileclip/models/mci.py
# --------------------------------------------------------------------------------------


def convolutional_stem(in_channels, out_channels, inference_mode=False) -> nn.Sequential:
    """apple/ml-mobileclip mobileclip/models/mci.py: convolutional_stem (3 MobileOne blocks:
    3x3/s2 dense, 3x3/s2 depthwise, 1x1)."""
    return nn.Sequential(
        MobileOneBlock(in_channels, out_channels, 3, stride=2, padding=1, inference_mode=inference_mode),
        MobileOneBlock(out_channels, out_channels, 3, stride=2, padding=1, groups=out_channels,
                       inference_mode=inference_mode),
        MobileOneBlock(out_channels, out_channels, 1, stride=1, padding=0, inference_mode=inference_mode),
    )


class MHSA(nn.Module):
    """apple/ml-mobileclip mobileclip/models/mci.py: MHSA. ``B, C, H, W = x.shape`` and
    ``if len(shape) == 4`` around the token flatten / un-flatten: ``symbolic_trace`` stops on
    ``len`` of a proxy."""

    def __init__(self, dim, head_dim=32, qkv_bias=False):
        super().__init__()
        assert dim % head_dim == 0
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        shape = x.shape
        B, C, H, W = shape
        N = H * W
        if len(shape) == 4:
            x = torch.flatten(x, start_dim=2).transpose(-2, -1)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        if len(shape) == 4:
            x = x.transpose(-2, -1).reshape(B, C, H, W)
        return x


class PatchEmbed(nn.Module):
    """apple/ml-mobileclip mobileclip/models/mci.py: PatchEmbed (ReparamLargeKernelConv with
    ``groups=in_channels`` and stride 2, then a 1x1 MobileOne block)."""

    def __init__(self, patch_size, stride, in_channels, embed_dim, inference_mode=False, use_se=False):
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_channels, embed_dim, patch_size, stride, groups=in_channels, small_kernel=3,
                                   inference_mode=inference_mode, use_se=use_se),
            MobileOneBlock(embed_dim, embed_dim, 1, stride=1, padding=0, inference_mode=inference_mode),
        )

    def forward(self, x):
        return self.proj(x)


class RepMixer(nn.Module):
    """apple/ml-mobileclip mobileclip/models/mci.py: RepMixer.

    ``x + layer_scale * (mixer(x) - norm(x))`` with ``layer_scale`` a raw ``(dim, 1, 1)``
    Parameter, ``mixer`` a depthwise MobileOne block (BN skip + conv + 1x1 scale, no act) and
    ``norm`` a BN-only MobileOne block; branch chosen by ``hasattr(self, 'reparam_conv')``.
    ``reparameterize`` uses ``mixer.id_tensor + layer_scale.unsqueeze(-1) * (Wm - Wn)``.
    """

    def __init__(self, dim, kernel_size=3, use_layer_scale=True, layer_scale_init_value=1e-5,
                 inference_mode=False):
        super().__init__()
        self.dim, self.kernel_size, self.inference_mode = dim, kernel_size, inference_mode
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)
        else:
            self.norm = MobileOneBlock(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, use_act=False,
                                       use_scale_branch=False, num_conv_branches=0)
            self.mixer = MobileOneBlock(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, use_act=False)
            self.use_layer_scale = use_layer_scale
            if use_layer_scale:
                self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)),
                                                requires_grad=True)

    def forward(self, x):
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv(x)
        if self.use_layer_scale:
            return x + self.layer_scale * (self.mixer(x) - self.norm(x))
        return x + self.mixer(x) - self.norm(x)

    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        self.mixer.reparameterize()
        self.norm.reparameterize()
        w_mix, w_norm = self.mixer.reparam_conv.weight, self.norm.reparam_conv.weight
        b_mix, b_norm = self.mixer.reparam_conv.bias, self.norm.reparam_conv.bias
        if self.use_layer_scale:
            w = self.mixer.id_tensor + self.layer_scale.unsqueeze(-1) * (w_mix - w_norm)
            b = torch.squeeze(self.layer_scale) * (b_mix - b_norm)
        else:
            w = self.mixer.id_tensor + w_mix - w_norm
            b = b_mix - b_norm
        self.reparam_conv = nn.Conv2d(self.dim, self.dim, self.kernel_size, 1, self.kernel_size // 2,
                                      groups=self.dim, bias=True)
        self.reparam_conv.weight.data = w
        self.reparam_conv.bias.data = b
        for param in self.parameters():
            param.detach_()
        self.__delattr__("mixer")
        self.__delattr__("norm")
        if self.use_layer_scale:
            self.__delattr__("layer_scale")


class ConvFFN(nn.Module):
    """apple/ml-mobileclip mobileclip/models/mci.py: ConvFFN (depthwise 7x7 conv-BN ->
    1x1 -> GELU -> 1x1, dropout modules in between)."""

    def __init__(self, in_channels, hidden_channels=None, out_channels=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        hidden_channels = hidden_channels or in_channels
        self.conv = nn.Sequential()
        self.conv.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size=7, padding=3,
                                               groups=in_channels, bias=False))
        self.conv.add_module("bn", nn.BatchNorm2d(num_features=out_channels))
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_channels, out_channels, kernel_size=1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop(self.act(self.fc1(self.conv(x))))
        return self.drop(self.fc2(x))


class RepCPE(nn.Module):
    """apple/ml-mobileclip mobileclip/models/mci.py: RepCPE (``pe(x) + x`` with ``pe`` a
    depthwise 7x7 conv with bias; ``reparameterize`` adds a one-hot identity kernel)."""

    def __init__(self, in_channels, embed_dim=768, spatial_shape=(7, 7), inference_mode=False):
        super().__init__()
        if isinstance(spatial_shape, int):
            spatial_shape = tuple([spatial_shape] * 2)
        assert isinstance(spatial_shape, tuple) and len(spatial_shape) == 2
        self.spatial_shape, self.embed_dim, self.in_channels = spatial_shape, embed_dim, in_channels
        self.groups = embed_dim
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_channels, embed_dim, spatial_shape, 1, int(spatial_shape[0] // 2),
                                          groups=embed_dim, bias=True)
        else:
            self.pe = nn.Conv2d(in_channels, embed_dim, spatial_shape, 1, int(spatial_shape[0] // 2), bias=True,
                                groups=embed_dim)

    def forward(self, x):
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv(x)
        return self.pe(x) + x

    def reparameterize(self) -> None:
        per_group = self.in_channels // self.groups
        identity = torch.zeros((self.in_channels, per_group, *self.spatial_shape), dtype=self.pe.weight.dtype,
                               device=self.pe.weight.device)
        for i in range(self.in_channels):
            identity[i, i % per_group, self.spatial_shape[0] // 2, self.spatial_shape[1] // 2] = 1
        self.reparam_conv = nn.Conv2d(self.in_channels, self.embed_dim, self.spatial_shape, 1,
                                      int(self.spatial_shape[0] // 2), groups=self.embed_dim, bias=True)
        self.reparam_conv.weight.data = identity + self.pe.weight
        self.reparam_conv.bias.data = self.pe.bias
        for param in self.parameters():
            param.detach_()
        self.__delattr__("pe")


class RepMixerBlock(nn.Module):
    """apple/ml-mobileclip mobileclip/models/mci.py: RepMixerBlock (RepMixer, then
    ``x + drop_path(layer_scale * convffn(x))`` with a raw ``(dim, 1, 1)`` layer scale)."""

    def __init__(self, dim, kernel_size=3, mlp_ratio=4.0, act_layer=nn.GELU, use_layer_scale=True,
                 layer_scale_init_value=1e-5, inference_mode=False):
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, use_layer_scale, layer_scale_init_value, inference_mode)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path = nn.Identity()
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x):
        x = self.token_mixer(x)
        if self.use_layer_scale:
            return x + self.drop_path(self.layer_scale * self.convffn(x))
        return x + self.drop_path(self.convffn(x))


class AttentionBlock(nn.Module):
    """apple/ml-mobileclip mobileclip/models/mci.py: AttentionBlock (BN -> MHSA with a
    ``(dim, 1, 1)`` layer scale, then the ConvFFN with another)."""

    def __init__(self, dim, mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d, use_layer_scale=True,
                 layer_scale_init_value=1e-5):
        super().__init__()
        self.norm = norm_layer(dim)
        self.token_mixer = MHSA(dim=dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path = nn.Identity()
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)
            self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x):
        if self.use_layer_scale:
            x = x + self.drop_path(self.layer_scale_1 * self.token_mixer(self.norm(x)))
            return x + self.drop_path(self.layer_scale_2 * self.convffn(x))
        x = x + self.drop_path(self.token_mixer(self.norm(x)))
        return x + self.drop_path(self.convffn(x))


class GlobalPool(nn.Module):
    """apple/ml-mobileclip mobileclip/modules/image/image_projection.py: GlobalPool
    (``if x.dim() == 4`` picks the reduced dims)."""

    def __init__(self, pool_type="mean", keep_dim=False):
        super().__init__()
        self.pool_type, self.keep_dim = pool_type, keep_dim

    def forward(self, x):
        if x.dim() == 4:
            dims = [-2, -1]
        elif x.dim() == 5:
            dims = [-3, -2, -1]
        else:
            raise NotImplementedError("only 4-D and 5-D inputs are pooled")
        return torch.mean(x, dim=dims, keepdim=self.keep_dim)


class GlobalPool2D(nn.Module):
    """apple/ml-mobileclip mobileclip/modules/image/image_projection.py: GlobalPool2D
    (``assert x.dim() == 4``, mean pool, ``x @ self.proj`` with a raw ``(in, out)`` Parameter)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.pool = GlobalPool(pool_type="mean", keep_dim=False)
        self.proj = nn.Parameter(in_dim ** -0.5 * torch.randn(size=(in_dim, out_dim)))
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x, *args, **kwargs):
        assert x.dim() == 4, f"expected a 4-D input, got {x.shape}"
        return self.pool(x) @ self.proj


class FastViT(nn.Module):
    """apple/ml-mobileclip mobileclip/models/mci.py: FastViT as built by ``mci0`` (stem,
    RepMixer stage, PatchEmbed, RepCPE + attention stage, ``conv_exp`` MobileOne block with
    SE) with the head swapped for ``GlobalPool2D`` as mobileclip/image_encoder.py: MCi does
    when a ``projection_dim`` is given; here 2 stages at 16/64 channels."""

    def __init__(self, layers=(1, 1), token_mixers=("repmixer", "attention"), embed_dims=(16, 64),
                 mlp_ratios=(2, 2), downsamples=(True, True), se_downsamples=(False, True),
                 pos_embs=(None, RepCPE), repmixer_kernel_size=3, down_patch_size=7, down_stride=2, cls_ratio=2.0,
                 projection_dim=16, inference_mode=False):
        super().__init__()
        self.patch_embed = convolutional_stem(3, embed_dims[0], inference_mode)
        network = []
        for i in range(len(layers)):
            if pos_embs[i] is not None:
                network.append(pos_embs[i](embed_dims[i], embed_dims[i], spatial_shape=(7, 7),
                                           inference_mode=inference_mode))
            blocks = []
            for _ in range(layers[i]):
                if token_mixers[i] == "repmixer":
                    blocks.append(RepMixerBlock(embed_dims[i], repmixer_kernel_size, mlp_ratios[i],
                                                inference_mode=inference_mode))
                else:
                    blocks.append(AttentionBlock(embed_dims[i], mlp_ratios[i]))
            network.append(nn.Sequential(*blocks))
            if i >= len(layers) - 1:
                break
            if downsamples[i] or embed_dims[i] != embed_dims[i + 1]:
                network.append(PatchEmbed(down_patch_size, down_stride, embed_dims[i], embed_dims[i + 1],
                                          inference_mode=inference_mode, use_se=se_downsamples[i + 1]))
        self.network = nn.ModuleList(network)
        self.conv_exp = MobileOneBlock(embed_dims[-1], int(embed_dims[-1] * cls_ratio), 3, stride=1, padding=1,
                                       groups=embed_dims[-1], inference_mode=inference_mode, use_se=True)
        self.head = GlobalPool2D(int(embed_dims[-1] * cls_ratio), projection_dim)

    def forward_embeddings(self, x):
        return self.patch_embed(x)

    def forward_tokens(self, x):
        for block in self.network:
            x = block(x)
        return x

    def forward(self, x):
        x = self.forward_tokens(self.forward_embeddings(x))
        return self.head(self.conv_exp(x))


class MobileOneStemNet(nn.Module):
    """A small classifier on apple/ml-mobileclip mobileone.py blocks: ``convolutional_stem``,
    a dense MobileOne block with three conv branches, a grouped channel-expanding block with
    SEBlock, and a user's pool + Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = convolutional_stem(3, 16)
        self.body = MobileOneBlock(16, 16, 3, padding=1, num_conv_branches=3)
        self.expand = MobileOneBlock(16, 32, 3, padding=1, groups=16, use_se=True, num_conv_branches=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.expand(self.body(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class RepMixerNet(nn.Module):
    """apple/ml-mobileclip mci.py RepMixer stage on a MobileOne stem: ``convolutional_stem``
    then three RepMixerBlocks (the first without layer scales)."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem = convolutional_stem(3, dim)
        self.blocks = nn.Sequential(RepMixerBlock(dim, 3, 2.0, use_layer_scale=False),
                                    RepMixerBlock(dim, 3, 2.0), RepMixerBlock(dim, 5, 2.0))

    def forward(self, x):
        return self.blocks(self.stem(x))


# --------------------------------------------------------------------------------------
# mobileclip/modules/text/repmixer.py
# --------------------------------------------------------------------------------------


class TextConvFFN(nn.Module):
    """apple/ml-mobileclip mobileclip/modules/text/repmixer.py: ConvFFN (depthwise
    ``(1, context_size)`` conv-BN, then 1x1 convs)."""

    def __init__(self, in_channels, context_size, hidden_channels=None, out_channels=None, act_layer=nn.GELU):
        super().__init__()
        out_channels = out_channels or in_channels
        hidden_channels = hidden_channels or in_channels
        self.conv = nn.Sequential()
        self.conv.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size=(1, int(context_size)),
                                               padding=(0, int(context_size // 2)), groups=in_channels, bias=False))
        self.conv.add_module("bn", nn.BatchNorm2d(num_features=out_channels))
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_channels, out_channels, kernel_size=1)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        x = self.drop(self.act(self.fc1(self.conv(x))))
        return self.drop(self.fc2(x))


class TextRepMixer(RepMixer):
    """apple/ml-mobileclip mobileclip/modules/text/repmixer.py: RepMixer with ``(1, k)``
    kernels (its MobileOne mixer therefore has no 1x1 scale branch)."""

    def __init__(self, dim, kernel_size=3, use_layer_scale=True, layer_scale_init_value=1e-5,
                 inference_mode=False):
        nn.Module.__init__(self)
        self.dim, self.kernel_size, self.inference_mode = dim, kernel_size, inference_mode
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, (1, kernel_size), 1, (0, kernel_size // 2), groups=dim,
                                          bias=True)
        else:
            self.norm = MobileOneBlock(dim, dim, (1, kernel_size), padding=(0, kernel_size // 2), groups=dim,
                                       use_act=False, use_scale_branch=False, num_conv_branches=0)
            self.mixer = MobileOneBlock(dim, dim, (1, kernel_size), padding=(0, kernel_size // 2), groups=dim,
                                        use_act=False)
            self.use_layer_scale = use_layer_scale
            if use_layer_scale:
                self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)),
                                                requires_grad=True)

    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        self.mixer.reparameterize()
        self.norm.reparameterize()
        w_mix, w_norm = self.mixer.reparam_conv.weight, self.norm.reparam_conv.weight
        b_mix, b_norm = self.mixer.reparam_conv.bias, self.norm.reparam_conv.bias
        if self.use_layer_scale:
            w = self.mixer.id_tensor + self.layer_scale.unsqueeze(-1) * (w_mix - w_norm)
            b = torch.squeeze(self.layer_scale) * (b_mix - b_norm)
        else:
            w = self.mixer.id_tensor + w_mix - w_norm
            b = b_mix - b_norm
        self.reparam_conv = nn.Conv2d(self.dim, self.dim, (1, self.kernel_size), 1, (0, self.kernel_size // 2),
                                      groups=self.dim, bias=True)
        self.reparam_conv.weight.data = w
        self.reparam_conv.bias.data = b
        for param in self.parameters():
            param.detach_()
        self.__delattr__("mixer")
        self.__delattr__("norm")
        if self.use_layer_scale:
            self.__delattr__("layer_scale")


class TextRepMixerBlock(nn.Module):
    """apple/ml-mobileclip mobileclip/modules/text/repmixer.py: RepMixerBlock. Takes
    ``(B, context, dim)`` tokens, ``if x.dim() == 3`` permutes to ``(B, dim, context)`` and
    unsqueezes to ``(B, dim, 1, context)`` (else raises), runs the 2-D RepMixer + ConvFFN with a
    ``(dim, 1, 1)`` layer scale, then squeezes / permutes back."""

    def __init__(self, dim, kernel_size=11, mlp_ratio=4.0, use_layer_scale=True, layer_scale_init_value=1e-5,
                 inference_mode=False):
        super().__init__()
        self.token_mixer = TextRepMixer(dim, kernel_size, use_layer_scale, layer_scale_init_value, inference_mode)
        self.convffn = TextConvFFN(dim, kernel_size, int(dim * mlp_ratio))
        self.drop_path = nn.Identity()
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x, *args, **kwargs):
        if x.dim() == 3:
            x = torch.unsqueeze(x.permute(0, 2, 1), dim=2)
        else:
            raise ValueError(f"expected a 3-D token tensor, got {x.dim()}-D")
        x = self.token_mixer(x)
        if self.use_layer_scale:
            x = x + self.drop_path(self.layer_scale * self.convffn(x))
        else:
            x = x + self.drop_path(self.convffn(x))
        return x.squeeze(dim=2).permute(0, 2, 1)


class TextRepMixerEncoder(nn.Module):
    """The RepMixer ends of apple/ml-mobileclip mobileclip/text_encoder.py: TextTransformer
    (a RepMixerBlock first and last; the attention layers between left out), final LayerNorm."""

    def __init__(self, dim=32, kernel_size=5):
        super().__init__()
        self.transformer = nn.ModuleList([TextRepMixerBlock(dim, kernel_size, 2.0),
                                          TextRepMixerBlock(dim, kernel_size, 2.0)])
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x):
        for layer in self.transformer:
            x = layer(x)
        return self.final_layer_norm(x)


# --------------------------------------------------------------------------------------
# entries
# --------------------------------------------------------------------------------------

IDIOMS = [
    Idiom(
        name="mobileclip.mobileone_stem",
        library="mobileclip",
        source="apple/ml-mobileclip mobileclip/modules/common/mobileone.py: MobileOneBlock, SEBlock, "
               "reparameterize_model; mobileclip/models/mci.py: convolutional_stem",
        build=MobileOneStemNet,
        reparameterize=reparameterize_model,
        must_remain={"mul": 1},
        notes="identity_out = 0 / scale_out = 0 seeds, `out = scale_out + identity_out` (0 + 0 when "
              "neither exists) then `out += conv(x)`; one shared default GELU instance in every block; "
              "SEBlock unpacks x.size() and pools with kernel_size=[h, w]: its multiply must stay.",
    ),
    Idiom(
        name="mobileclip.repmixer",
        library="mobileclip",
        source="apple/ml-mobileclip mobileclip/models/mci.py: RepMixer, RepMixerBlock, ConvFFN",
        build=RepMixerNet,
        reparameterize=reparameterize_model,
        notes="x + layer_scale * (mixer(x) - norm(x)) with a raw (C, 1, 1) Parameter and a BN-only "
              "'norm' MobileOne block subtracted; then x + layer_scale * convffn(x) whose depthwise "
              "7x7 conv-BN the library's walk never fuses.",
    ),
    Idiom(
        name="mobileclip.mci_image_encoder",
        library="mobileclip",
        source="apple/ml-mobileclip mobileclip/models/mci.py: FastViT, RepMixerBlock, AttentionBlock, MHSA, "
               "PatchEmbed, RepCPE, ConvFFN; mobileclip/modules/image/replknet.py: ReparamLargeKernelConv; "
               "mobileclip/modules/image/image_projection.py: GlobalPool2D",
        build=FastViT,
        input_shape=(2, 3, 64, 64),
        reparameterize=reparameterize_model,
        traceable=False,
        must_remain={"mul": 2},
        notes="MHSA branches on len(x.shape) and GlobalPool2D asserts x.dim() == 4 (no whole-model "
              "symbolic_trace); grouped 7x7+3x3 patch embedding with SqueezeExcite, RepCPE pe(x) + x, "
              "BN before the attention tokens; the SqueezeExcite and SEBlock multiplies must stay.",
    ),
    Idiom(
        name="mobileclip.text_repmixer",
        library="mobileclip",
        source="apple/ml-mobileclip mobileclip/modules/text/repmixer.py: RepMixerBlock, RepMixer, ConvFFN",
        build=TextRepMixerEncoder,
        input_shape=(2, 16, 32),
        reparameterize=reparameterize_model,
        traceable=False,
        notes="(B, context, dim) tokens permuted/unsqueezed to (B, dim, 1, context) behind an "
              "`if x.dim() == 3` (untraceable); (1, k) depthwise kernels, so the MobileOne mixer has "
              "no scale branch; layer scales are (dim, 1, 1) on a 4-D view of a 3-D input.",
    ),
]
