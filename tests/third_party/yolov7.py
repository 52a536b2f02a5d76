"""YOLOv7 (WongKinYiu/yolov7): a whole detector, routing loop, implicit head and deploy walk.

Re-written from ``models/yolo.py`` (``Model``, ``IDetect``, ``Detect``, ``parse_model``),
``models/common.py`` (``Conv``, ``Concat``, ``MP``, ``SPPCSPC``, ``ImplicitA``,
``ImplicitM``, ``RepConv``), ``utils/torch_utils.py`` (``fuse_conv_and_bn``,
``initialize_weights``, ``scale_img``, ``model_info``) and ``utils/autoanchor.py``
(``check_anchor_order``), keeping the code shape a graph fuser meets in the whole program:
``Model.forward(x, augment=False, profile=False)`` branching on ``augment``;
``forward_once`` routing earlier outputs through a Python list by ``m.f`` / ``m.i``, with the
``traced`` and ``profile`` branches; ``IDetect`` adding ``ImplicitA`` (a (1, C, 1, 1)
Parameter) before each 1x1 head conv and multiplying by ``ImplicitM`` after it, writing back
into its input list (``x[i] = ...``), caching its grids in a plain Python list (checked with
``if self.grid[i].shape[2:4] != x[i].shape[2:4]`` — Python control flow on a shape, so
``torch.fx.symbolic_trace`` cannot trace the head in eval mode) and decoding boxes in place
(``y[..., 0:2] = ...``); ``RepConv`` with an identity BatchNorm, a literal ``0`` seed when
strided or widened and an ``if hasattr(self, "rbr_reparam")`` forward; and ``Model.fuse``,
which folds every ``Conv``'s BN into a new conv, deletes ``bn`` and patches
``m.forward = m.fuseforward`` on the instance, calls ``RepConv.fuse_repvgg_block`` and
``IDetect.fuse`` (ImplicitA folded into the conv bias through the weight, ImplicitM into the
weight and bias), then patches ``IDetect``'s forward too.

The network is yolov7-tiny's layout (``cfg/training/yolov7-tiny.yaml``: LeakyReLU(0.1)
Convs, ELAN concat blocks, ``MP`` transitions, upsample + routed concat neck) at 1/8 to 1/16
width and with the P5 ELAN left out, with yolov7's ``SPPCSPC`` and MP-Conv downsample
(``cfg/training/yolov7.yaml``, SiLU) and, as in yolov7.yaml's head, ``RepConv`` in front of
``IDetect`` on each of the three levels.

Deviations from the public code, all on purpose: layers are a hand-written ``(from, module)``
list instead of a yaml (``parse_layers`` attaches ``i``, ``f``, ``type``, ``np`` and builds the
save list like ``parse_model``); new convs are created in the dtype of the weights they
replace (the public helpers create float32 convs, which would round a float64 model);
``yolov7_fuse`` runs under ``torch.no_grad()`` (YOLOv7 fuses loaded checkpoints whose
parameters no longer require grad; ``IDetect.fuse`` updates them in place); prints are log
messages; ``_make_grid`` passes ``indexing="ij"`` (the default it relied on, without the
warning); the stride probe runs on a 64x64 zero image (upstream 256: the
same strides, a sixteenth of the work); ``IAuxDetect``/``IBin``/``IKeypoint``/``RepConv_OREPA`` are left out.
"""

from __future__ import annotations

import logging
import math
import time
from copy import deepcopy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Idiom

try:
    import thop  # FLOPs in profile mode, as upstream; absent here
except ImportError:
    thop = None

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# WongKinYiu/yolov7 utils/torch_utils.py, utils/autoanchor.py
# ----------------------------------------------------------------------------------------


def time_synchronized():
    """utils/torch_utils.py: time_synchronized."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


@torch.no_grad()
def fuse_conv_and_bn(conv, bn):
    """utils/torch_utils.py: fuse_conv_and_bn — a new biased conv whose weight is
    ``diag(gamma / std) @ W`` and bias ``diag(gamma / std) @ b + (beta - gamma * mean / std)``
    (built in the weight's dtype here)."""
    fusedconv = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size,
                          stride=conv.stride, padding=conv.padding, groups=conv.groups,
                          bias=True).requires_grad_(False).to(conv.weight)

    w_conv = conv.weight.clone().view(conv.out_channels, -1)
    w_bn = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    fusedconv.weight.copy_(torch.mm(w_bn, w_conv).view(fusedconv.weight.shape))

    if conv.bias is None:
        b_conv = torch.zeros(conv.weight.size(0), device=conv.weight.device, dtype=conv.weight.dtype)
    else:
        b_conv = conv.bias
    b_bn = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fusedconv.bias.copy_(torch.mm(w_bn, b_conv.reshape(-1, 1)).reshape(-1) + b_bn)
    return fusedconv


def initialize_weights(model):
    """utils/torch_utils.py: initialize_weights — every exact ``BatchNorm2d`` gets eps 1e-3 and
    momentum 0.03, every LeakyReLU/ReLU/Hardswish becomes in-place."""
    for m in model.modules():
        t = type(m)
        if t is nn.Conv2d:
            pass
        elif t is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif t in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6):
            m.inplace = True


def model_info(model, verbose=False, img_size=640):
    """utils/torch_utils.py: model_info (parameter counts; FLOPs only with thop)."""
    n_p = sum(p.numel() for p in model.parameters())
    n_g = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        for i, (name, p) in enumerate(model.named_parameters()):
            logger.info("%5g %40s %9s %12g %20s", i, name, p.requires_grad, p.numel(), list(p.shape))
    logger.info("Model Summary: %d layers, %d parameters, %d gradients",
                len(list(model.modules())), n_p, n_g)


def scale_img(img, ratio=1.0, same_shape=False, gs=32):
    """utils/torch_utils.py: scale_img — bilinear resize by ``ratio``, then pad (value 0.447)
    up to a multiple of ``gs`` unless ``same_shape``."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    s = (int(h * ratio), int(w * ratio))
    img = F.interpolate(img, size=s, mode="bilinear", align_corners=False)
    if not same_shape:
        h, w = [math.ceil(v * ratio / gs) * gs for v in (h, w)]
    return F.pad(img, [0, w - s[1], 0, h - s[0]], value=0.447)


def check_anchor_order(m):
    """utils/autoanchor.py: check_anchor_order — flip the anchors when their areas run against
    the strides."""
    a = m.anchor_grid.prod(-1).view(-1)
    da = a[-1] - a[0]
    ds = m.stride[-1] - m.stride[0]
    if da.sign() != ds.sign():
        logger.info("Reversing anchor order")
        m.anchors[:] = m.anchors.flip(0)
        m.anchor_grid[:] = m.anchor_grid.flip(0)


# ----------------------------------------------------------------------------------------
# WongKinYiu/yolov7 models/common.py
# ----------------------------------------------------------------------------------------


def autopad(k, p=None):
    """models/common.py: autopad — 'same' padding for odd kernels."""
    if p is None:
        p = k // 2 if isinstance(k, int) else [v // 2 for v in k]
    return p


class MP(nn.Module):
    """models/common.py: MP — a stride-k MaxPool2d wrapped in a module."""

    def __init__(self, k=2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x):
        return self.m(x)


class Concat(nn.Module):
    """models/common.py: Concat — ``torch.cat`` of the list ``forward_once`` gathers."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Conv(nn.Module):
    """models/common.py: Conv — conv (no bias) -> BatchNorm2d -> act, a new ``nn.SiLU`` per
    instance when ``act is True`` (the tiny cfg passes a fresh ``nn.LeakyReLU(0.1)`` per row).
    ``fuseforward`` skips the BN; ``Model.fuse`` installs it on the instance."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def fuseforward(self, x):
        return self.act(self.conv(x))


class SPPCSPC(nn.Module):
    """models/common.py: SPPCSPC — CSP split around an SPP: 1x1/3x3/1x1 Convs, three stride-1
    max pools (5, 9, 13) concatenated with their input, two more Convs, concat with the 1x1
    shortcut branch, a final 1x1 Conv."""

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5, k=(5, 9, 13)):
        super().__init__()
        c_ = int(2 * c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(c_, c_, 3, 1)
        self.cv4 = Conv(c_, c_, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=v, stride=1, padding=v // 2) for v in k])
        self.cv5 = Conv(4 * c_, c_, 1, 1)
        self.cv6 = Conv(c_, c_, 3, 1)
        self.cv7 = Conv(2 * c_, c2, 1, 1)

    def forward(self, x):
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [m(x1) for m in self.m], 1)))
        y2 = self.cv2(x)
        return self.cv7(torch.cat((y1, y2), dim=1))


class ImplicitA(nn.Module):
    """models/common.py: ImplicitA — an additive (1, C, 1, 1) Parameter, N(0, 0.02) at init:
    ``self.implicit + x``."""

    def __init__(self, channel, mean=0.0, std=0.02):
        super().__init__()
        self.channel = channel
        self.mean = mean
        self.std = std
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=self.mean, std=self.std)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(nn.Module):
    """models/common.py: ImplicitM — a multiplicative (1, C, 1, 1) Parameter, N(1, 0.02) at
    init: ``self.implicit * x``."""

    def __init__(self, channel, mean=1.0, std=0.02):
        super().__init__()
        self.channel = channel
        self.mean = mean
        self.std = std
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=self.mean, std=self.std)

    def forward(self, x):
        return self.implicit * x


class RepConv(nn.Module):
    """models/common.py: RepConv — RepVGG block: ``rbr_dense`` = Sequential(3x3 Conv2d, BN),
    ``rbr_1x1`` = Sequential(1x1 Conv2d, BN), ``rbr_identity`` = a BatchNorm2d only when
    ``c2 == c1 and s == 1`` (else None and the sum is seeded with a literal ``0``); ``forward``
    takes the ``rbr_reparam`` path when that attribute exists. Two deploy conversions as
    upstream: ``get_equivalent_kernel_bias`` / ``repvgg_convert`` (kernels out), and
    ``fuse_repvgg_block`` (what ``Model.fuse`` calls) which folds each branch with
    ``fuse_conv_bn``, builds the identity as a 1x1 conv with ``fill_diagonal_`` (so ``g == 1``
    only), sums into ``rbr_dense`` and renames it ``rbr_reparam``."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False):
        super().__init__()
        self.deploy = deploy
        self.groups = g
        self.in_channels = c1
        self.out_channels = c2

        assert k == 3
        assert autopad(k, p) == 1

        padding_11 = autopad(k, p) - k // 2

        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(num_features=c1) if c2 == c1 and s == 1 else None
            self.rbr_dense = nn.Sequential(
                nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False),
                nn.BatchNorm2d(num_features=c2),
            )
            self.rbr_1x1 = nn.Sequential(
                nn.Conv2d(c1, c2, 1, s, padding_11, groups=g, bias=False),
                nn.BatchNorm2d(num_features=c2),
            )

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))

        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)

        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    def get_equivalent_kernel_bias(self):
        kernel3x3, bias3x3 = self._fuse_bn_tensor(self.rbr_dense)
        kernel1x1, bias1x1 = self._fuse_bn_tensor(self.rbr_1x1)
        kernelid, biasid = self._fuse_bn_tensor(self.rbr_identity)
        return (kernel3x3 + self._pad_1x1_to_3x3_tensor(kernel1x1) + kernelid,
                bias3x3 + bias1x1 + biasid)

    def _pad_1x1_to_3x3_tensor(self, kernel1x1):
        if kernel1x1 is None:
            return 0
        return nn.functional.pad(kernel1x1, [1, 1, 1, 1])

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, nn.Sequential):
            kernel = branch[0].weight
            running_mean = branch[1].running_mean
            running_var = branch[1].running_var
            gamma = branch[1].weight
            beta = branch[1].bias
            eps = branch[1].eps
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                input_dim = self.in_channels // self.groups
                kernel_value = torch.zeros((self.in_channels, input_dim, 3, 3),
                                           dtype=branch.weight.dtype, device=branch.weight.device)
                for i in range(self.in_channels):
                    kernel_value[i, i % input_dim, 1, 1] = 1
                self.id_tensor = kernel_value
            kernel = self.id_tensor
            running_mean = branch.running_mean
            running_var = branch.running_var
            gamma = branch.weight
            beta = branch.bias
            eps = branch.eps
        std = (running_var + eps).sqrt()
        t = (gamma / std).reshape(-1, 1, 1, 1)
        return kernel * t, beta - running_mean * gamma / std

    def repvgg_convert(self):
        kernel, bias = self.get_equivalent_kernel_bias()
        return kernel.detach().cpu().numpy(), bias.detach().cpu().numpy()

    def fuse_conv_bn(self, conv, bn):
        std = (bn.running_var + bn.eps).sqrt()
        bias = bn.bias - bn.running_mean * bn.weight / std

        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        weights = conv.weight * t

        bn = nn.Identity()
        conv = nn.Conv2d(in_channels=conv.in_channels, out_channels=conv.out_channels,
                         kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, groups=conv.groups, bias=True,
                         padding_mode=conv.padding_mode, dtype=weights.dtype,
                         device=weights.device)
        conv.weight = torch.nn.Parameter(weights)
        conv.bias = torch.nn.Parameter(bias)
        return conv

    def fuse_repvgg_block(self):
        if self.deploy:
            return
        logger.info("RepConv.fuse_repvgg_block")

        self.rbr_dense = self.fuse_conv_bn(self.rbr_dense[0], self.rbr_dense[1])

        self.rbr_1x1 = self.fuse_conv_bn(self.rbr_1x1[0], self.rbr_1x1[1])
        rbr_1x1_bias = self.rbr_1x1.bias
        weight_1x1_expanded = torch.nn.functional.pad(self.rbr_1x1.weight, [1, 1, 1, 1])

        if isinstance(self.rbr_identity, (nn.BatchNorm2d, nn.modules.batchnorm.SyncBatchNorm)):
            identity_conv_1x1 = nn.Conv2d(in_channels=self.in_channels, out_channels=self.out_channels,
                                          kernel_size=1, stride=1, padding=0, groups=self.groups,
                                          bias=False, dtype=self.rbr_1x1.weight.dtype)
            identity_conv_1x1.weight.data = identity_conv_1x1.weight.data.to(self.rbr_1x1.weight.data.device)
            identity_conv_1x1.weight.data = identity_conv_1x1.weight.data.squeeze().squeeze()
            identity_conv_1x1.weight.data.fill_(0.0)
            identity_conv_1x1.weight.data.fill_diagonal_(1.0)
            identity_conv_1x1.weight.data = identity_conv_1x1.weight.data.unsqueeze(2).unsqueeze(3)

            identity_conv_1x1 = self.fuse_conv_bn(identity_conv_1x1, self.rbr_identity)
            bias_identity_expanded = identity_conv_1x1.bias
            weight_identity_expanded = torch.nn.functional.pad(identity_conv_1x1.weight, [1, 1, 1, 1])
        else:
            bias_identity_expanded = torch.nn.Parameter(torch.zeros_like(rbr_1x1_bias))
            weight_identity_expanded = torch.nn.Parameter(torch.zeros_like(weight_1x1_expanded))

        self.rbr_dense.weight = torch.nn.Parameter(
            self.rbr_dense.weight + weight_1x1_expanded + weight_identity_expanded)
        self.rbr_dense.bias = torch.nn.Parameter(self.rbr_dense.bias + rbr_1x1_bias + bias_identity_expanded)

        self.rbr_reparam = self.rbr_dense
        self.deploy = True

        if self.rbr_identity is not None:
            del self.rbr_identity
            self.rbr_identity = None

        if self.rbr_1x1 is not None:
            del self.rbr_1x1
            self.rbr_1x1 = None

        if self.rbr_dense is not None:
            del self.rbr_dense
            self.rbr_dense = None


# ----------------------------------------------------------------------------------------
# WongKinYiu/yolov7 models/yolo.py
# ----------------------------------------------------------------------------------------


class Detect(nn.Module):
    """models/yolo.py: Detect — the plain head of the deploy cfgs (1x1 conv per level, same
    decode as IDetect). Defined for the ``isinstance`` ladders of ``Model``; not built here."""

    stride = None
    export = False
    end2end = False
    include_nms = False
    concat = False

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, x):
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()

            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)
                y = x[i].sigmoid()
                y[..., 0:2] = (y[..., 0:2] * 2. - 0.5 + self.grid[i]) * self.stride[i]
                y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                z.append(y.view(bs, -1, self.no))

        return x if self.training else (torch.cat(z, 1), x)

    @staticmethod
    def _make_grid(nx=20, ny=20):
        yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
        return torch.stack((xv, yv), 2).view((1, 1, ny, nx, 2)).float()


class IDetect(nn.Module):
    """models/yolo.py: IDetect — per level ``x[i] = self.m[i](self.ia[i](x[i]))`` then
    ``x[i] = self.im[i](x[i])`` (ImplicitA before the biased 1x1 conv, ImplicitM after),
    reshaped to (bs, na, ny, nx, no); in eval the grid cached in a plain list is rebuilt when
    its shape differs and the sigmoid is decoded with in-place slice writes. Returns the raw
    list in training (and when ``export``), ``(torch.cat(z, 1), x)`` otherwise. ``fuse`` folds
    both implicits into ``m``; ``Model.fuse`` then installs ``fuseforward`` on the instance."""

    stride = None  # computed in Model.__init__
    export = False
    end2end = False
    include_nms = False
    concat = False

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

        self.ia = nn.ModuleList(ImplicitA(c) for c in ch)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)

    def forward(self, x):
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](self.ia[i](x[i]))
            x[i] = self.im[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()

            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)

                y = x[i].sigmoid()
                y[..., 0:2] = (y[..., 0:2] * 2. - 0.5 + self.grid[i]) * self.stride[i]
                y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                z.append(y.view(bs, -1, self.no))

        return x if self.training else (torch.cat(z, 1), x)

    def fuseforward(self, x):
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()

            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)

                y = x[i].sigmoid()
                if not torch.onnx.is_in_onnx_export():
                    y[..., 0:2] = (y[..., 0:2] * 2. - 0.5 + self.grid[i]) * self.stride[i]
                    y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                else:
                    xy, wh, conf = y.split((2, 2, self.nc + 1), 4)
                    xy = xy * (2. * self.stride[i]) + (self.stride[i] * (self.grid[i] - 0.5))
                    wh = wh ** 2 * (4 * self.anchor_grid[i].data)
                    y = torch.cat((xy, wh, conf), 4)
                z.append(y.view(bs, -1, self.no))

        if self.training:
            out = x
        elif self.end2end:
            out = torch.cat(z, 1)
        elif self.include_nms:
            out = (self.convert(z),)
        elif self.concat:
            out = torch.cat(z, 1)
        else:
            out = (torch.cat(z, 1), x)
        return out

    def fuse(self):
        logger.info("IDetect.fuse")
        # ImplicitA into the conv: W (x + a) + b = W x + (b + W a)
        for i in range(len(self.m)):
            c1, c2, _, _ = self.m[i].weight.shape
            c1_, c2_, _, _ = self.ia[i].implicit.shape
            self.m[i].bias += torch.matmul(self.m[i].weight.reshape(c1, c2),
                                           self.ia[i].implicit.reshape(c2_, c1_)).squeeze(1)

        # ImplicitM into the conv: m * (W x + b) = (m W) x + m b
        for i in range(len(self.m)):
            c1, c2, _, _ = self.im[i].implicit.shape
            self.m[i].bias *= self.im[i].implicit.reshape(c2)
            self.m[i].weight *= self.im[i].implicit.transpose(0, 1)

    @staticmethod
    def _make_grid(nx=20, ny=20):
        yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
        return torch.stack((xv, yv), 2).view((1, 1, ny, nx, 2)).float()

    def convert(self, z):
        z = torch.cat(z, 1)
        box = z[:, :, :4]
        conf = z[:, :, 4:5]
        score = z[:, :, 5:]
        score *= conf
        convert_matrix = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]],
                                      dtype=z.dtype, device=z.device)
        box @= convert_matrix
        return box, score


def parse_layers(layers):
    """The tail of models/yolo.py ``parse_model`` for a hand-written ``[(from, module), ...]``:
    attach ``i``, ``f``, ``type``, ``np`` to each layer and collect the save list."""
    modules, save = [], []
    for i, (f, m_) in enumerate(layers):
        t = f"{type(m_).__module__}.{type(m_).__name__}".replace("__main__.", "")
        np_ = sum(x.numel() for x in m_.parameters())
        m_.i, m_.f, m_.type, m_.np = i, f, t, np_
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        modules.append(m_)
    return nn.Sequential(*modules), sorted(save)


class Model(nn.Module):
    """models/yolo.py: Model — ``self.model`` an ``nn.Sequential`` whose layers carry ``f``/``i``;
    ``__init__`` measures the head strides with a training-mode forward on zeros (IDetect then
    returns its raw list), divides the anchors by them and initialises the head biases;
    ``forward`` branches on ``augment`` (three scales/flips through ``forward_once``, never
    taken by default); ``forward_once`` routes inputs through the list ``y``, stops before the
    head when ``traced``, and profiles each layer when asked."""

    def __init__(self, layers, ch=3, nc=4):
        super().__init__()
        self.traced = False
        self.yaml = {"nc": nc, "ch": ch}
        self.model, self.save = parse_layers(layers)
        self.names = [str(i) for i in range(self.yaml["nc"])]

        m = self.model[-1]
        if isinstance(m, Detect):
            s = 64  # upstream 256 ('2x min stride'); 64 keeps the build fast
            m.stride = torch.tensor([s / x.shape[-2] for x in self.forward(torch.zeros(1, ch, s, s))])
            check_anchor_order(m)
            m.anchors /= m.stride.view(-1, 1, 1)
            self.stride = m.stride
            self._initialize_biases()
        if isinstance(m, IDetect):
            s = 64  # upstream 256 ('2x min stride'); 64 keeps the build fast
            m.stride = torch.tensor([s / x.shape[-2] for x in self.forward(torch.zeros(1, ch, s, s))])
            check_anchor_order(m)
            m.anchors /= m.stride.view(-1, 1, 1)
            self.stride = m.stride
            self._initialize_biases()

        initialize_weights(self)
        self.info()

    def forward(self, x, augment=False, profile=False):
        if augment:
            img_size = x.shape[-2:]
            s = [1, 0.83, 0.67]
            f = [None, 3, None]
            y = []
            for si, fi in zip(s, f):
                xi = scale_img(x.flip(fi) if fi else x, si, gs=int(self.stride.max()))
                yi = self.forward_once(xi)[0]
                yi[..., :4] /= si
                if fi == 2:
                    yi[..., 1] = img_size[0] - yi[..., 1]
                elif fi == 3:
                    yi[..., 0] = img_size[1] - yi[..., 0]
                y.append(yi)
            return torch.cat(y, 1), None
        else:
            return self.forward_once(x, profile)

    def forward_once(self, x, profile=False):
        y, dt = [], []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]

            if not hasattr(self, "traced"):
                self.traced = False

            if self.traced:
                if isinstance(m, Detect) or isinstance(m, IDetect):
                    break

            if profile:
                c = isinstance(m, (Detect, IDetect))
                o = thop.profile(m, inputs=(x.copy() if c else x,), verbose=False)[0] / 1E9 * 2 if thop else 0
                for _ in range(10):
                    m(x.copy() if c else x)
                t = time_synchronized()
                for _ in range(10):
                    m(x.copy() if c else x)
                dt.append((time_synchronized() - t) * 100)
                logger.info("%10.1f%10.0f%10.1fms %-40s", o, m.np, dt[-1], m.type)

            x = m(x)

            y.append(x if m.i in self.save else None)

        if profile:
            logger.info("%.1fms total", sum(dt))
        return x

    def _initialize_biases(self, cf=None):
        # objectness prior of 8 objects per 640 image, class prior 0.6 / nc (Focal Loss, 3.3)
        m = self.model[-1]
        for mi, s in zip(m.m, m.stride):
            b = mi.bias.view(m.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5:] += math.log(0.6 / (m.nc - 0.99)) if cf is None else torch.log(cf / cf.sum())
            mi.bias = torch.nn.Parameter(b.view(-1), requires_grad=True)

    def fuse(self):
        logger.info("Fusing layers... ")
        for m in self.model.modules():
            if isinstance(m, RepConv):
                m.fuse_repvgg_block()
            elif type(m) is Conv and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.fuseforward
            elif isinstance(m, IDetect):
                m.fuse()
                m.forward = m.fuseforward
        self.info()
        return self

    def info(self, verbose=False, img_size=640):
        model_info(self, verbose, img_size)


def yolov7_fuse(model):
    """YOLOv7's deploy conversion: ``attempt_load`` -> ``ckpt['model'].float().fuse().eval()``
    (models/experimental.py), i.e. ``Model.fuse``; under no_grad because loaded checkpoints
    carry no gradients and ``IDetect.fuse`` updates parameters in place."""
    with torch.no_grad():
        return model.fuse()


# --- the network --------------------------------------------------------------------------

ANCHORS = [
    [10, 13, 16, 30, 33, 23],      # P3/8
    [30, 61, 62, 45, 59, 119],     # P4/16
    [116, 90, 156, 198, 373, 326], # P5/32
]


def _yolov7_tiny_layers(nc=4, anchors=ANCHORS, w=1):
    """``w`` multiplies every width (1: the corpus size, 8 to 32 channels; 4: 32 to 128, the
    benchmark's detector row)."""
    return [
        # backbone (yolov7-tiny: LeakyReLU(0.1) Convs, ELAN concat blocks, MP)
        (-1, Conv(3, 8 * w, 3, 2, None, 1, nn.LeakyReLU(0.1))),            # 0  P1/2
        (-1, Conv(8 * w, 16 * w, 3, 2, None, 1, nn.LeakyReLU(0.1))),           # 1  P2/4
        (-1, Conv(16 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 2
        (-2, Conv(16 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 3
        (-1, Conv(8 * w, 8 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),            # 4
        (-1, Conv(8 * w, 8 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),            # 5
        ([-1, -2, -3, -4], Concat(1)),                                 # 6
        (-1, Conv(32 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 7
        (-1, MP()),                                                    # 8  P3/8
        (-1, Conv(16 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 9
        (-2, Conv(16 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 10
        (-1, Conv(16 * w, 16 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),          # 11
        (-1, Conv(16 * w, 16 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),          # 12
        ([-1, -2, -3, -4], Concat(1)),                                 # 13
        (-1, Conv(64 * w, 32 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 14 P3
        (-1, MP()),                                                    # 15 P4/16
        (-1, Conv(32 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 16
        (-2, Conv(32 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 17
        (-1, Conv(16 * w, 16 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),          # 18
        (-1, Conv(16 * w, 16 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),          # 19
        ([-1, -2, -3, -4], Concat(1)),                                 # 20
        (-1, Conv(64 * w, 32 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 21 P4
        (-1, MP()),                                                    # 22 P5/32
        (-1, Conv(32 * w, 32 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 23
        # head (yolov7: SPPCSPC, SiLU)
        (-1, SPPCSPC(32 * w, 16 * w)),                                         # 24
        (-1, Conv(16 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 25
        (-1, nn.Upsample(None, 2, "nearest")),                         # 26
        (21, Conv(32 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 27 route backbone P4
        ([-1, -2], Concat(1)),                                         # 28
        (-1, Conv(16 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 29
        (-2, Conv(16 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 30
        (-1, Conv(8 * w, 8 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),            # 31
        (-1, Conv(8 * w, 8 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),            # 32
        ([-1, -2, -3, -4], Concat(1)),                                 # 33
        (-1, Conv(32 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 34
        (-1, Conv(16 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 35
        (-1, nn.Upsample(None, 2, "nearest")),                         # 36
        (14, Conv(32 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 37 route backbone P3
        ([-1, -2], Concat(1)),                                         # 38
        (-1, Conv(16 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 39
        (-2, Conv(16 * w, 8 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),           # 40
        (-1, Conv(8 * w, 8 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),            # 41
        (-1, Conv(8 * w, 8 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),            # 42
        ([-1, -2, -3, -4], Concat(1)),                                 # 43
        (-1, Conv(32 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 44 P3 out
        # yolov7's MP-Conv downsample: MP + 1x1 and 1x1 + strided 3x3, three-way concat
        (-1, MP()),                                                    # 45
        (-1, Conv(16 * w, 8 * w, 1, 1)),                                       # 46
        (-3, Conv(16 * w, 8 * w, 1, 1)),                                       # 47
        (-1, Conv(8 * w, 8 * w, 3, 2)),                                        # 48
        ([-1, -3, 34], Concat(1)),                                     # 49
        (-1, Conv(32 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 50
        (-2, Conv(32 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 51
        (-1, Conv(16 * w, 8 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),           # 52
        (-1, Conv(8 * w, 8 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),            # 53
        ([-1, -2, -3, -4], Concat(1)),                                 # 54
        (-1, Conv(48 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 55 P4 out
        # yolov7-tiny's strided-Conv downsample
        (-1, Conv(16 * w, 16 * w, 3, 2, None, 1, nn.LeakyReLU(0.1))),          # 56
        ([-1, 24], Concat(1)),                                         # 57
        (-1, Conv(32 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 58
        (-2, Conv(32 * w, 16 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 59
        (-1, Conv(16 * w, 16 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),          # 60
        (-1, Conv(16 * w, 16 * w, 3, 1, None, 1, nn.LeakyReLU(0.1))),          # 61
        ([-1, -2, -3, -4], Concat(1)),                                 # 62
        (-1, Conv(64 * w, 32 * w, 1, 1, None, 1, nn.LeakyReLU(0.1))),          # 63 P5 out
        # yolov7.yaml: RepConv in front of the head on each level
        (44, RepConv(16 * w, 16 * w, 3, 1)),                                   # 64 identity BN branch
        (55, RepConv(16 * w, 32 * w, 3, 1)),                                   # 65 c2 != c1: id_out = 0
        (63, RepConv(32 * w, 32 * w, 3, 1)),                                   # 66 identity BN branch
        ([64, 65, 66], IDetect(nc, anchors, [16 * w, 32 * w, 32 * w])),           # 67 Detect(P3, P4, P5)
    ]


def build_yolov7_tiny_idetect(width: int = 1):
    return Model(_yolov7_tiny_layers(w=width), ch=3, nc=4)


_SRC = "WongKinYiu/yolov7"

IDIOMS: list[Idiom] = [
    Idiom(
        name="yolov7.model_idetect_repconv",
        library="yolov7",
        source=f"{_SRC} models/yolo.py: Model, IDetect, Detect, parse_model; "
               f"{_SRC} models/common.py: Conv, Concat, MP, SPPCSPC, ImplicitA, ImplicitM, RepConv; "
               f"{_SRC} utils/torch_utils.py: fuse_conv_and_bn, initialize_weights, scale_img; "
               f"{_SRC} cfg/training/yolov7-tiny.yaml, cfg/training/yolov7.yaml",
        build=build_yolov7_tiny_idetect,
        input_shape=(2, 3, 64, 64),
        reparameterize=yolov7_fuse,
        traceable=False,
        whole_program=True,
        exportable=True,
        notes="Whole YOLOv7 detector: forward(x, augment=False, profile=False) -> forward_once "
              "routing by m.f/m.i; ELAN concats, SPPCSPC, in-place LeakyReLU(0.1) and SiLU, "
              "BN eps 1e-3; RepConv (identity BN / literal 0) before IDetect, whose ImplicitA "
              "add and ImplicitM multiply sit around a biased 1x1 conv; grids cached in a "
              "plain list behind a Python shape check (no symbolic_trace of the head in "
              "eval), in-place box decode, output (cat(z), [raw maps]). Model.fuse patches "
              "instance forwards (Conv.fuseforward, IDetect.fuseforward).",
    ),
]
