"""YOLO families: ultralytics (YOLOv8 / YOLOv10 / RT-DETR-in-ultralytics) and meituan/YOLOv6.

Every class here is re-written from the public file named in its docstring, keeping the code
shape a graph fuser meets in those models: the shared class-level activation module
(``default_act = nn.SiLU()`` / YOLOv6's module-level ``activation_table``), literal-``0``
identity seeds (``id_out = 0``), BatchNorm after a sum (``Conv2``, ``QARepVGGBlock``),
average-pool branches, ``ScaleLayer`` channel scales, ``list(t.chunk(2, 1))`` (``C2f``,
not traceable), asymmetric ``F.pad`` before an unpadded conv (``HGStem``), and the deploy
conversions that patch ``m.forward = m.forward_fuse`` on instances after deleting ``bn``
(ultralytics ``BaseModel.fuse``, YOLOv6 ``fuse_model``).

Deviations from the public code, all on purpose: new convs are created in the dtype of the
weights they replace (the public helpers create float32 convs and ``copy_`` into them, which
would round a float64 model); ``fuse_deconv_and_bn`` scales the output-channel axis of the
ConvTranspose weight (releases before ultralytics PR #25364 scaled axis 0, which is wrong
unless the deconv is fully depthwise); detection heads stop at the raw per-level maps.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Idiom

# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/modules/conv.py
# ----------------------------------------------------------------------------------------


def autopad(k, p=None, d=1):
    """'same' padding for odd kernels (ultralytics ``autopad``)."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (v - 1) + 1 for v in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [v // 2 for v in k]
    return p


class Conv(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: Conv — conv -> BN -> act, with a
    ``forward_fuse`` (act(conv(x))) that ``BaseModel.fuse`` installs on the instance after
    deleting ``bn``. ``default_act`` is ONE ``nn.SiLU`` object shared by every Conv of every
    model (a class attribute registered as a child)."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if act is True:
            self.act = self.default_act
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class Conv2(Conv):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: Conv2 — a kxk conv and a bare
    1x1 conv summed *before* one BatchNorm: ``act(bn(conv(x) + cv2(x)))``. ``fuse_convs``
    writes the 1x1 kernel into the centre tap and keeps the BN (its ``forward_fuse`` still
    calls ``self.bn``)."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True):
        super().__init__(c1, c2, k, s, p, g=g, d=d, act=act)
        self.cv2 = nn.Conv2d(c1, c2, 1, s, autopad(1, p, d), groups=g, dilation=d, bias=False)

    def forward(self, x):
        return self.act(self.bn(self.conv(x) + self.cv2(x)))

    def forward_fuse(self, x):
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse_convs(self):
        extra = torch.zeros_like(self.conv.weight.data)
        centre = [n // 2 for n in extra.shape[2:]]
        extra[:, :, centre[0]:centre[0] + 1, centre[1]:centre[1] + 1] = self.cv2.weight.data.clone()
        self.conv.weight.data += extra
        self.__delattr__("cv2")
        self.forward = self.forward_fuse


class DWConv(Conv):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: DWConv — Conv with
    ``groups=gcd(c1, c2)``."""

    def __init__(self, c1, c2, k=1, s=1, d=1, act=True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class LightConv(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: LightConv — 1x1 Conv without act,
    then a depthwise Conv (PP-HGNetV2 light block)."""

    def __init__(self, c1, c2, k=1, act=nn.ReLU()):  # noqa: B008 (one ReLU shared, as upstream)
        super().__init__()
        self.conv1 = Conv(c1, c2, 1, act=False)
        self.conv2 = DWConv(c2, c2, k, act=act)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class DWConvTranspose2d(nn.ConvTranspose2d):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: DWConvTranspose2d — an
    ``nn.ConvTranspose2d`` subclass with ``groups=gcd(c1, c2)`` (bias on)."""

    def __init__(self, c1, c2, k=1, s=1, p1=0, p2=0):
        super().__init__(c1, c2, k, s, p1, p2, groups=math.gcd(c1, c2))


class ConvTranspose(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: ConvTranspose — ConvTranspose2d
    -> BatchNorm2d -> act with a ``forward_fuse`` that skips the BN."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=2, s=2, p=0, bn=True, act=True):
        super().__init__()
        self.conv_transpose = nn.ConvTranspose2d(c1, c2, k, s, p, bias=not bn)
        self.bn = nn.BatchNorm2d(c2) if bn else nn.Identity()
        if act is True:
            self.act = self.default_act
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv_transpose(x)))

    def forward_fuse(self, x):
        return self.act(self.conv_transpose(x))


class GroupedConvTranspose(ConvTranspose):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: ConvTranspose, DWConvTranspose2d —
    the ConvTranspose block built around a grouped ``DWConvTranspose2d`` (groups = gcd(c1, c2),
    here 8 with 2 inputs and 3 outputs per group), so the BN scale must go on axis 1 of a
    ``[C_in, C_out/groups, kH, kW]`` weight with a group-aware map from axis 0."""

    def __init__(self, c1, c2, k=3, s=2, p1=1, p2=1, act=True):
        super().__init__(c1, c2, k, s, act=act)
        self.conv_transpose = DWConvTranspose2d(c1, c2, k, s, p1, p2)


class RepConv(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: RepConv — 3x3 Conv + 1x1 Conv +
    optional identity BatchNorm, summed with a literal seed ``id_out = 0`` when there is no
    identity branch; ``fuse_convs`` builds ``self.conv`` from ``get_equivalent_kernel_bias``
    and deletes ``conv1``/``conv2``/``bn``; ``BaseModel.fuse`` then patches
    ``forward = forward_fuse``."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False, deploy=False):
        super().__init__()
        assert k == 3 and p == 1
        self.g = g
        self.c1 = c1
        self.c2 = c2
        if act is True:
            self.act = self.default_act
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()
        self.bn = nn.BatchNorm2d(num_features=c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward_fuse(self, x):
        return self.act(self.conv(x))

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)

    def get_equivalent_kernel_bias(self):
        k3, b3 = self._fuse_bn_tensor(self.conv1)
        k1, b1 = self._fuse_bn_tensor(self.conv2)
        kid, bid = self._fuse_bn_tensor(self.bn)
        return k3 + self._pad_1x1_to_3x3_tensor(k1) + kid, b3 + b1 + bid

    @staticmethod
    def _pad_1x1_to_3x3_tensor(kernel1x1):
        return 0 if kernel1x1 is None else F.pad(kernel1x1, [1, 1, 1, 1])

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, Conv):
            kernel = branch.conv.weight
            norm = branch.bn
        else:  # the identity BatchNorm2d
            if not hasattr(self, "id_tensor"):
                per_group = self.c1 // self.g
                ident = torch.zeros((self.c1, per_group, 3, 3), dtype=branch.weight.dtype,
                                    device=branch.weight.device)
                for c in range(self.c1):
                    ident[c, c % per_group, 1, 1] = 1
                self.id_tensor = ident
            kernel = self.id_tensor
            norm = branch
        std = (norm.running_var + norm.eps).sqrt()
        fused_kernel = kernel * (norm.weight / std).reshape(-1, 1, 1, 1)
        return fused_kernel, norm.bias - norm.running_mean * norm.weight / std

    @torch.no_grad()
    def fuse_convs(self):
        if hasattr(self, "conv"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        src = self.conv1.conv
        self.conv = nn.Conv2d(src.in_channels, src.out_channels, src.kernel_size, src.stride,
                              src.padding, src.dilation, src.groups, bias=True,
                              dtype=kernel.dtype, device=kernel.device).requires_grad_(False)
        self.conv.weight.data = kernel
        self.conv.bias.data = bias
        for p in self.parameters():
            p.requires_grad_(False)
        self.__delattr__("conv1")
        self.__delattr__("conv2")
        if hasattr(self, "bn"):
            self.__delattr__("bn")
        if hasattr(self, "id_tensor"):
            self.__delattr__("id_tensor")


class Concat(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: Concat — ``torch.cat`` of the
    list that ``_predict_once`` gathers from earlier layers."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/modules/block.py
# ----------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: Bottleneck — two Convs and a
    Python-chosen residual (``x + cv2(cv1(x)) if self.add else ...``)."""

    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, k[0], 1)
        self.cv2 = Conv(hidden, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: C2f — ``list(cv1(x).chunk(2, 1))``
    then ``y.extend(m(y[-1]) for m in self.m)``: iterating a chunk Proxy makes
    ``torch.fx.symbolic_trace`` fail (TraceError: Proxy object cannot be iterated)."""

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=((3, 3), (3, 3)), e=1.0)
                               for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    def forward_split(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: SPPF — one MaxPool2d applied three
    times in a list comprehension, concatenated."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class RepVGGDW(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: RepVGGDW (YOLOv10) — a 7x7 and a
    3x3 depthwise Conv summed, SiLU; ``fuse`` folds both BNs, pads the 3x3 to 7x7, replaces
    ``self.conv`` (a Conv) by a bare ``nn.Conv2d`` and deletes ``conv1``."""

    def __init__(self, ed):
        super().__init__()
        self.conv = Conv(ed, ed, 7, 1, 3, g=ed, act=False)
        self.conv1 = Conv(ed, ed, 3, 1, 1, g=ed, act=False)
        self.dim = ed
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x) + self.conv1(x))

    def forward_fuse(self, x):
        return self.act(self.conv(x))

    @torch.no_grad()
    def fuse(self):
        big = fuse_conv_and_bn(self.conv.conv, self.conv.bn)
        small = fuse_conv_and_bn(self.conv1.conv, self.conv1.bn)
        big.weight.data.copy_(big.weight + F.pad(small.weight, [2, 2, 2, 2]))
        big.bias.data.copy_(big.bias + small.bias)
        self.conv = big
        del self.conv1


class CIB(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: CIB (YOLOv10) — dw/pw Conv stack
    with a RepVGGDW in the middle when ``lk``; Python-chosen residual."""

    def __init__(self, c1, c2, shortcut=True, e=0.5, lk=False):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = nn.Sequential(
            Conv(c1, c1, 3, g=c1),
            Conv(c1, 2 * hidden, 1),
            RepVGGDW(2 * hidden) if lk else Conv(2 * hidden, 2 * hidden, 3, g=2 * hidden),
            Conv(2 * hidden, c2, 1),
            Conv(c2, c2, 3, g=c2),
        )
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv1(x) if self.add else self.cv1(x)


class C2fCIB(C2f):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: C2fCIB — C2f (same untraceable
    ``list(chunk)`` forward) whose bottlenecks are CIBs."""

    def __init__(self, c1, c2, n=1, shortcut=False, lk=False, g=1, e=0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = nn.ModuleList(CIB(self.c, self.c, shortcut, e=1.0, lk=lk) for _ in range(n))


class SCDown(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: SCDown (YOLOv10) — 1x1 Conv then
    a strided depthwise Conv without activation."""

    def __init__(self, c1, c2, k, s):
        super().__init__()
        self.cv1 = Conv(c1, c2, 1, 1)
        self.cv2 = Conv(c2, c2, k=k, s=s, g=c2, act=False)

    def forward(self, x):
        return self.cv2(self.cv1(x))


class HGStem(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: HGStem (RT-DETR) — ``F.pad(x,
    [0, 1, 0, 1])`` (right/bottom only) before unpadded 2x2 Convs and a ceil-mode MaxPool: a
    fuser must not fold the asymmetric pad into a symmetric conv padding."""

    def __init__(self, c1, cm, c2):
        super().__init__()
        self.stem1 = Conv(c1, cm, 3, 2, act=nn.ReLU())
        self.stem2a = Conv(cm, cm // 2, 2, 1, 0, act=nn.ReLU())
        self.stem2b = Conv(cm // 2, cm, 2, 1, 0, act=nn.ReLU())
        self.stem3 = Conv(cm * 2, cm, 3, 2, act=nn.ReLU())
        self.stem4 = Conv(cm, c2, 1, 1, act=nn.ReLU())
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, padding=0, ceil_mode=True)

    def forward(self, x):
        x = self.stem1(x)
        x = F.pad(x, [0, 1, 0, 1])
        x2 = self.stem2a(x)
        x2 = F.pad(x2, [0, 1, 0, 1])
        x2 = self.stem2b(x2)
        x1 = self.pool(x)
        x = torch.cat([x1, x2], dim=1)
        x = self.stem3(x)
        return self.stem4(x)


class HGBlock(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: HGBlock (RT-DETR) — chained
    (Light)Convs whose outputs are all concatenated, squeeze/excitation 1x1 Convs, optional
    residual."""

    def __init__(self, c1, cm, c2, k=3, n=6, lightconv=False, shortcut=False,
                 act=nn.ReLU()):  # noqa: B008 (one ReLU shared by every HGBlock, as upstream)
        super().__init__()
        unit = LightConv if lightconv else Conv
        self.m = nn.ModuleList(unit(c1 if i == 0 else cm, cm, k=k, act=act) for i in range(n))
        self.sc = Conv(c1 + n * cm, c2 // 2, 1, 1, act=act)
        self.ec = Conv(c2 // 2, c2, 1, 1, act=act)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = [x]
        y.extend(m(y[-1]) for m in self.m)
        y = self.ec(self.sc(torch.cat(y, 1)))
        return y + x if self.add else y


class RepC3(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: RepC3 (RT-DETR neck) — RepConvs
    built with ``bn=False`` (so every sum is seeded with the literal ``0``), plus a parallel
    1x1 Conv added after the stack."""

    def __init__(self, c1, c2, n=3, e=1.0):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.m = nn.Sequential(*[RepConv(hidden, hidden) for _ in range(n)])
        self.cv3 = Conv(hidden, c2, 1, 1) if hidden != c2 else nn.Identity()

    def forward(self, x):
        return self.cv3(self.m(self.cv1(x)) + self.cv2(x))


class Proto(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: Proto (segmentation masks) — Conv,
    a bare biased ``nn.ConvTranspose2d(c_, c_, 2, 2, 0)`` upsampler, two Convs."""

    def __init__(self, c1, c_=256, c2=32):
        super().__init__()
        self.cv1 = Conv(c1, c_, k=3)
        self.upsample = nn.ConvTranspose2d(c_, c_, 2, 2, 0, bias=True)
        self.cv2 = Conv(c_, c_, k=3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x):
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


class Detect(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/head.py: Detect — per level a box branch
    and a class branch (Conv, Conv, bare biased nn.Conv2d), concatenated, then
    ``xi.view(shape[0], self.no, -1)`` over levels. (DFL decoding and anchors are left out.)"""

    def __init__(self, nc=4, ch=(), reg_max=4):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = reg_max
        self.no = nc + reg_max * 4
        c2, c3 = max(16, ch[0] // 4, reg_max * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)

    def forward(self, x):
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        shape = x[0].shape
        return torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/utils/torch_utils.py and ultralytics/nn/tasks.py
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def fuse_conv_and_bn(conv, bn):
    """ultralytics ``fuse_conv_and_bn``: a new biased conv (in the source dtype here)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size,
                      stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      groups=conv.groups, bias=True).requires_grad_(False).to(conv.weight)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    base = torch.zeros_like(bn.running_mean) if conv.bias is None else conv.bias
    fused.bias.copy_((base - bn.running_mean) * scale + bn.bias)
    return fused


@torch.no_grad()
def fuse_deconv_and_bn(deconv, bn):
    """ultralytics ``fuse_deconv_and_bn`` as fixed by PR #25364: the BN scale goes on the
    output-channel axis (1) of the ``[C_in, C_out/groups, kH, kW]`` weight."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    groups = deconv.groups
    c_in, out_per_group = deconv.weight.shape[:2]
    per_tap = (scale.reshape(groups, 1, out_per_group)
               .expand(groups, c_in // groups, out_per_group)
               .reshape(c_in, out_per_group, 1, 1))
    fused = nn.ConvTranspose2d(deconv.in_channels, deconv.out_channels,
                               kernel_size=deconv.kernel_size, stride=deconv.stride,
                               padding=deconv.padding, output_padding=deconv.output_padding,
                               dilation=deconv.dilation, groups=deconv.groups,
                               bias=True).requires_grad_(False).to(deconv.weight)
    fused.weight.copy_(deconv.weight * per_tap)
    base = torch.zeros_like(bn.running_mean) if deconv.bias is None else deconv.bias
    fused.bias.copy_((base - bn.running_mean) * scale + bn.bias)
    return fused


def fuse_ultralytics_module(m):
    """One step of ``BaseModel.fuse`` for module ``m`` (the isinstance ladder of tasks.py)."""
    if isinstance(m, (Conv, Conv2, DWConv)) and hasattr(m, "bn"):
        if isinstance(m, Conv2):
            m.fuse_convs()
        m.conv = fuse_conv_and_bn(m.conv, m.bn)
        delattr(m, "bn")
        m.forward = m.forward_fuse
    if isinstance(m, ConvTranspose) and hasattr(m, "bn"):
        m.conv_transpose = fuse_deconv_and_bn(m.conv_transpose, m.bn)
        delattr(m, "bn")
        m.forward = m.forward_fuse
    if isinstance(m, RepConv):
        m.fuse_convs()
        m.forward = m.forward_fuse
    if isinstance(m, RepVGGDW):
        m.fuse()
        m.forward = m.forward_fuse


class BaseModel(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/tasks.py: BaseModel / DetectionModel — layers in
    ``self.model`` carry ``.f`` (from) and ``.i`` (index); ``_predict_once`` routes earlier
    outputs through a Python list. ``fuse`` runs only when ``is_fused()`` finds 10 or more
    normalisation layers, then walks ``self.model.modules()`` fusing conv+BN, deleting ``bn``
    and assigning ``m.forward = m.forward_fuse`` on each instance."""

    def __init__(self, layers):
        super().__init__()
        modules, save = [], set()
        for i, (f, m) in enumerate(layers):
            m.f, m.i = f, i
            save.update(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            modules.append(m)
        self.model = nn.Sequential(*modules)
        self.save = sorted(save)

    def forward(self, x):
        return self._predict_once(x)

    def _predict_once(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def is_fused(self, thresh=10):
        norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
        return sum(isinstance(v, norms) for v in self.modules()) < thresh

    def fuse(self):
        if not self.is_fused():
            for m in self.model.modules():
                fuse_ultralytics_module(m)
        return self


def ultralytics_fuse(model):
    """The deploy conversion ultralytics runs (``AutoBackend`` -> ``model.fuse()``)."""
    return model.fuse()


def conv2_fuse_convs(model):
    """Conv2's own conversion: ``fuse_convs`` on every Conv2 (BN kept). ``BaseModel.fuse``
    cannot be used: it deletes ``bn`` and then installs Conv2's ``forward_fuse``, which still
    calls ``self.bn`` (ultralytics issue #18691)."""
    for m in list(model.modules()):
        if isinstance(m, Conv2):
            m.fuse_convs()
    return model


# --- ultralytics models -------------------------------------------------------------------


def _yolov8_layers():
    return [
        (-1, Conv(3, 8, 3, 2)),                       # 0  P1/2
        (-1, Conv(8, 16, 3, 2)),                      # 1  P2/4
        (-1, C2f(16, 16, 1, True)),                   # 2
        (-1, Conv(16, 32, 3, 2)),                     # 3  P3/8
        (-1, C2f(32, 32, 1, True)),                   # 4
        (-1, SPPF(32, 32, 5)),                        # 5
        (-1, nn.Upsample(None, 2, "nearest")),        # 6
        ([-1, 2], Concat(1)),                         # 7
        (-1, C2f(48, 16, 1)),                         # 8
        (-1, Conv(16, 16, 3, 2)),                     # 9
        ([-1, 5], Concat(1)),                         # 10
        (-1, C2f(48, 32, 1)),                         # 11
        ([8, 11], Detect(4, (16, 32))),               # 12
    ]


def build_yolov8():
    return BaseModel(_yolov8_layers())


def build_yolov10():
    return BaseModel([
        (-1, Conv(3, 8, 3, 2)),                       # 0
        (-1, Conv(8, 16, 3, 2)),                      # 1
        (-1, C2f(16, 16, 1, True)),                   # 2
        (-1, SCDown(16, 32, 3, 2)),                   # 3
        (-1, C2fCIB(32, 32, 1, True, lk=True)),       # 4
        (-1, SPPF(32, 32, 5)),                        # 5
        (-1, nn.Upsample(None, 2, "nearest")),        # 6
        ([-1, 2], Concat(1)),                         # 7
        (-1, C2f(48, 16, 1)),                         # 8
        (-1, SCDown(16, 16, 3, 2)),                   # 9
        ([-1, 5], Concat(1)),                         # 10
        (-1, C2fCIB(48, 32, 1, True, lk=True)),       # 11
        ([8, 11], Detect(4, (16, 32))),               # 12
    ])


def build_repvggdw_cib():
    return BaseModel([
        (-1, Conv(3, 16, 3, 2)),
        (-1, CIB(16, 16, True, e=1.0, lk=True)),
        (-1, CIB(16, 16, False, e=0.5, lk=True)),
        (-1, Conv(16, 8, 1)),
    ])


def _rtdetr_layers():
    return [
        (-1, HGStem(3, 8, 16)),                                 # 0  /4
        (-1, HGBlock(16, 8, 32, 3, 2)),                         # 1
        (-1, DWConv(32, 32, 3, 2, act=False)),                  # 2  /8
        (-1, HGBlock(32, 16, 32, 5, 2, True, False)),           # 3
        (-1, HGBlock(32, 16, 32, 5, 2, True, True)),            # 4
        (-1, Conv(32, 16, 1, 1, None, 1, 1, False)),            # 5  input proj
        (-1, nn.Upsample(None, 2, "nearest")),                  # 6
        (1, Conv(32, 16, 1, 1, None, 1, 1, False)),             # 7  input proj of P/4
        ([-2, -1], Concat(1)),                                  # 8
        (-1, RepC3(32, 16, 2)),                                 # 9
        (-1, Conv(16, 16, 3, 2)),                               # 10
        ([-1, 5], Concat(1)),                                   # 11
        (-1, RepC3(32, 16, 2)),                                 # 12
    ]


def build_rtdetr_ultralytics():
    return BaseModel(_rtdetr_layers())


def build_rtdetr_partially_fused():
    """The RT-DETR-like model after a user (or an interrupted ``fuse``) already fused the stem,
    the first HGBlock, the stride-2 DWConv and the first RepC3 the ultralytics way."""
    model = BaseModel(_rtdetr_layers())
    for index in (0, 1, 2, 9):
        for m in model.model[index].modules():
            fuse_ultralytics_module(m)
    return model


def build_repconv_identity():
    return BaseModel([
        (-1, Conv(3, 16, 3, 2)),
        (-1, RepConv(16, 16, bn=True)),
        (-1, RepConv(16, 16, g=2, bn=True)),
        (-1, RepConv(16, 32, s=2, bn=True)),     # stride 2: no identity branch, id_out = 0
        (-1, RepConv(32, 32, g=4, bn=True)),
        (-1, Conv(32, 32, 3)),
        (-1, Conv(32, 16, 1)),
    ])


def build_conv2():
    return BaseModel([
        (-1, Conv(3, 8, 3, 2)),
        (-1, Conv2(8, 16, 3, 1)),
        (-1, Conv2(16, 16, 3, 2)),
        (-1, Conv2(16, 16, 3, 1, g=2)),
        (-1, Conv(16, 8, 1)),
    ])


def build_conv_transpose():
    return BaseModel([
        (-1, Conv(3, 8, 3, 2)),
        (-1, Conv(8, 16, 3, 2)),
        (-1, Conv(16, 16, 3)),
        (-1, ConvTranspose(16, 16, 2, 2)),
        (-1, Conv(16, 16, 3)),
        (-1, ConvTranspose(16, 8, 2, 2)),
        (-1, Conv(8, 8, 3)),
        (-1, Conv(8, 8, 3)),
        (-1, Conv(8, 8, 1)),
        (-1, Proto(8, 8, 4)),
    ])


def build_grouped_conv_transpose():
    return BaseModel([
        (-1, Conv(3, 8, 3, 2)),
        (-1, Conv(8, 16, 3, 2)),
        (-1, Conv(16, 16, 3)),
        (-1, GroupedConvTranspose(16, 24)),          # groups 8: 2 in, 3 out per group
        (-1, Conv(24, 16, 3)),
        (-1, GroupedConvTranspose(16, 16, 2, 2, 0, 0, act=False)),   # fully depthwise
        (-1, Conv(16, 8, 3)),
        (-1, Conv(8, 8, 3)),
        (-1, Conv(8, 8, 1)),
        (-1, Conv(8, 8, 1)),
        (-1, Conv(8, 4, 1)),
    ])


# ----------------------------------------------------------------------------------------
# meituan/YOLOv6 yolov6/layers/common.py, yolov6/models/efficientrep.py,
# yolov6/utils/torch_utils.py
# ----------------------------------------------------------------------------------------

activation_table = {"relu": nn.ReLU(), "silu": nn.SiLU(), "hardswish": nn.Hardswish()}


class ConvModule(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: ConvModule — conv -> BN (-> act from the shared
    module-level ``activation_table``); ``activation_type`` None skips the act in Python;
    ``fuse_model`` patches ``forward = forward_fuse`` after deleting ``bn``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, activation_type,
                 padding=None, groups=1, bias=False):
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                              padding=padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)
        if activation_type is not None:
            self.act = activation_table.get(activation_type)
        self.activation_type = activation_type

    def forward(self, x):
        if self.activation_type is None:
            return self.bn(self.conv(x))
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        if self.activation_type is None:
            return self.conv(x)
        return self.act(self.conv(x))


class ConvBNReLU(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: ConvBNReLU — a ConvModule wrapped once more."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, groups=1,
                 bias=False):
        super().__init__()
        self.block = ConvModule(in_channels, out_channels, kernel_size, stride, "relu", padding, groups, bias)

    def forward(self, x):
        return self.block(x)


class SPPFModule(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: SPPFModule (SimSPPF) — max-pools computed inside
    ``with warnings.catch_warnings()`` in ``forward``."""

    def __init__(self, in_channels, out_channels, kernel_size=5, block=ConvBNReLU):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = block(in_channels, hidden, 1, 1)
        self.cv2 = block(hidden * 4, out_channels, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x):
        x = self.cv1(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y1 = self.m(x)
            y2 = self.m(y1)
            return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class SimSPPF(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: SimSPPF — SPPFModule with ReLU ConvModules."""

    def __init__(self, in_channels, out_channels, kernel_size=5, block=ConvBNReLU):
        super().__init__()
        self.sppf = SPPFModule(in_channels, out_channels, kernel_size, block)

    def forward(self, x):
        return self.sppf(x)


class RepVGGBlock(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: RepVGGBlock — dense 3x3 ConvModule + 1x1
    ConvModule + identity BatchNorm (``rbr_identity``, None when shapes differ, then
    ``id_out = 0``); ``forward`` branches on ``hasattr(self, 'rbr_reparam')``.
    ``_fuse_bn_tensor`` reads ``conv.weight, conv.bias`` of the ConvModules, i.e. it relies on
    ``fuse_model`` having folded their BNs first; ``switch_to_deploy`` builds ``rbr_reparam``."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups=1, padding_mode="zeros", deploy=False, use_se=False):
        super().__init__()
        self.deploy = deploy
        self.groups = groups
        self.in_channels = in_channels
        self.out_channels = out_channels
        assert kernel_size == 3
        assert padding == 1
        padding_11 = padding - kernel_size // 2
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                         dilation, groups, bias=True, padding_mode=padding_mode)
        else:
            self.rbr_identity = (nn.BatchNorm2d(num_features=in_channels)
                                 if out_channels == in_channels and stride == 1 else None)
            self.rbr_dense = ConvModule(in_channels, out_channels, kernel_size, stride, None,
                                        padding=padding, groups=groups)
            self.rbr_1x1 = ConvModule(in_channels, out_channels, 1, stride, None,
                                      padding=padding_11, groups=groups)

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))

    def get_equivalent_kernel_bias(self):
        k3, b3 = self._fuse_bn_tensor(self.rbr_dense)
        k1, b1 = self._fuse_bn_tensor(self.rbr_1x1)
        kid, bid = self._fuse_bn_tensor(self.rbr_identity)
        return k3 + self._pad_1x1_to_3x3_tensor(k1) + kid, b3 + b1 + bid

    def _avg_to_3x3_tensor(self, avgp):
        channels, groups, size = self.in_channels, self.groups, avgp.kernel_size
        per_group = channels // groups
        weight = self.rbr_1x1.weight
        kernel = torch.zeros((channels, per_group, size, size), dtype=weight.dtype, device=weight.device)
        kernel[torch.arange(channels), torch.arange(per_group).repeat(groups), :, :] = 1.0 / size ** 2
        return kernel

    def _identity_kernel(self, like):
        per_group = self.in_channels // self.groups
        ident = torch.zeros((self.in_channels, per_group, 3, 3), dtype=like.dtype, device=like.device)
        for c in range(self.in_channels):
            ident[c, c % per_group, 1, 1] = 1
        return ident

    @staticmethod
    def _pad_1x1_to_3x3_tensor(kernel1x1):
        return 0 if kernel1x1 is None else F.pad(kernel1x1, [1, 1, 1, 1])

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, ConvModule):
            return branch.conv.weight, branch.conv.bias
        if not hasattr(self, "id_tensor"):
            self.id_tensor = self._identity_kernel(branch.weight)
        std = (branch.running_var + branch.eps).sqrt()
        t = (branch.weight / std).reshape(-1, 1, 1, 1)
        return self.id_tensor * t, branch.bias - branch.running_mean * branch.weight / std

    def _make_reparam(self, kernel, bias):
        src = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(src.in_channels, src.out_channels, src.kernel_size, src.stride,
                                     src.padding, src.dilation, src.groups, bias=True,
                                     dtype=kernel.dtype, device=kernel.device)
        self.rbr_reparam.weight.data = kernel
        self.rbr_reparam.bias.data = bias
        for p in self.parameters():
            p.requires_grad_(False)
        self.__delattr__("rbr_dense")
        self.__delattr__("rbr_1x1")
        if hasattr(self, "rbr_identity"):
            self.__delattr__("rbr_identity")
        if hasattr(self, "rbr_avg"):
            self.__delattr__("rbr_avg")
        if hasattr(self, "id_tensor"):
            self.__delattr__("id_tensor")
        self.deploy = True

    @torch.no_grad()
    def switch_to_deploy(self):
        if hasattr(self, "rbr_reparam"):
            return
        self._make_reparam(*self.get_equivalent_kernel_bias())


class QARepVGGBlock(RepVGGBlock):
    """meituan/YOLOv6 yolov6/layers/common.py: QARepVGGBlock — dense ConvModule + bare 1x1 conv
    + ``nn.Identity`` summed *before* a BatchNorm (``self.bn``), which ``switch_to_deploy``
    keeps ("post bn for QAT"): the deployed block is still conv -> BN -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups=1, padding_mode="zeros", deploy=False, use_se=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         padding_mode, deploy, use_se)
        if not deploy:
            self.bn = nn.BatchNorm2d(out_channels)
            self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                     groups=groups, bias=False)
            self.rbr_identity = nn.Identity() if out_channels == in_channels and stride == 1 else None
        self._id_tensor = None

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(inputs))))
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)))

    def get_equivalent_kernel_bias(self):
        k3, b3 = self._fuse_bn_tensor(self.rbr_dense)
        kernel = k3 + self._pad_1x1_to_3x3_tensor(self.rbr_1x1.weight)
        if self.rbr_identity is not None:
            kernel = kernel + self._identity_kernel(kernel)
        return kernel, b3


class QARepVGGBlockV2(RepVGGBlock):
    """meituan/YOLOv6 yolov6/layers/common.py: QARepVGGBlockV2 — QARepVGGBlock plus an
    average-pool branch ``nn.AvgPool2d(3, stride, padding)`` (default
    ``count_include_pad=True``, hence exactly a depthwise 1/9 kernel), sum seeded with two
    literal zeros when the branches are absent; post-BN kept after deploy."""

    avg_kwargs: ClassVar[dict] = {}

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups=1, padding_mode="zeros", deploy=False, use_se=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         padding_mode, deploy, use_se)
        if not deploy:
            same = out_channels == in_channels and stride == 1
            self.bn = nn.BatchNorm2d(out_channels)
            self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                     groups=groups, bias=False)
            self.rbr_identity = nn.Identity() if same else None
            self.rbr_avg = (nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding,
                                         **self.avg_kwargs) if same else None)
        self._id_tensor = None

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(inputs))))
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        if self.rbr_avg is None:
            avg_out = 0
        else:
            avg_out = self.rbr_avg(inputs)
        return self.nonlinearity(self.bn(self.se(
            self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out + avg_out)))

    def get_equivalent_kernel_bias(self):
        k3, b3 = self._fuse_bn_tensor(self.rbr_dense)
        kernel = k3 + self._pad_1x1_to_3x3_tensor(self.rbr_1x1.weight)
        if self.rbr_avg is not None:
            kernel = kernel + self._avg_to_3x3_tensor(self.rbr_avg)
        if self.rbr_identity is not None:
            kernel = kernel + self._identity_kernel(kernel)
        return kernel, b3


class QARepVGGBlockV2ExcludePad(QARepVGGBlockV2):
    """NOT in YOLOv6 — the negative twin of meituan/YOLOv6 yolov6/layers/common.py:
    QARepVGGBlockV2 whose pool branch is ``AvgPool2d(3, 1, 1, count_include_pad=False)``:
    border windows divide by 4 or 6 instead of 9, so the branch is not a convolution and the
    library's ``_avg_to_3x3_tensor`` would be wrong at the border."""

    avg_kwargs: ClassVar[dict] = {"count_include_pad": False}


class ScaleLayer(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: ScaleLayer — per-channel
    ``x * weight.view(1, C, 1, 1) (+ bias.view(1, C, 1, 1))`` with raw Parameters initialised
    to a constant."""

    def __init__(self, num_features, use_bias=True, scale_init=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_features,), float(scale_init)))
        self.num_features = num_features
        self.bias = nn.Parameter(torch.zeros(num_features)) if use_bias else None

    def forward(self, inputs):
        if self.bias is None:
            return inputs * self.weight.view(1, self.num_features, 1, 1)
        return (inputs * self.weight.view(1, self.num_features, 1, 1)
                + self.bias.view(1, self.num_features, 1, 1))


class LinearAddBlock(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: LinearAddBlock (RepOpt "hyper_search") — 3x3 and
    1x1 bare convs each times a ScaleLayer, ``out += scale_identity(inputs)`` in place when the
    identity exists (checked with ``hasattr``), then BN, ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups=1, padding_mode="zeros", use_se=False, is_csla=False, conv_scale_init=1.0):
        super().__init__()
        self.in_channels = in_channels
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.scale_conv = ScaleLayer(out_channels, use_bias=False, scale_init=conv_scale_init)
        self.conv_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)
        self.scale_1x1 = ScaleLayer(out_channels, use_bias=False, scale_init=conv_scale_init)
        if in_channels == out_channels and stride == 1:
            self.scale_identity = ScaleLayer(out_channels, use_bias=False, scale_init=1.0)
        self.bn = nn.BatchNorm2d(out_channels)
        if is_csla:
            self.scale_1x1.requires_grad_(False)
            self.scale_conv.requires_grad_(False)
        self.se = nn.Identity()

    def forward(self, inputs):
        out = self.scale_conv(self.conv(inputs)) + self.scale_1x1(self.conv_1x1(inputs))
        if hasattr(self, "scale_identity"):
            out += self.scale_identity(inputs)
        return self.relu(self.se(self.bn(out)))


class RepBlock(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: RepBlock — first block then an optional
    Sequential (``None`` when n == 1, checked in ``forward``); with ``block=BottleRep`` the
    blocks are BottleReps and n is halved."""

    def __init__(self, in_channels, out_channels, n=1, block=RepVGGBlock, basic_block=RepVGGBlock):
        super().__init__()
        self.conv1 = block(in_channels, out_channels)
        self.block = (nn.Sequential(*(block(out_channels, out_channels) for _ in range(n - 1)))
                      if n > 1 else None)
        if block == BottleRep:
            self.conv1 = BottleRep(in_channels, out_channels, basic_block=basic_block, weight=True)
            n = n // 2
            self.block = (nn.Sequential(*(BottleRep(out_channels, out_channels, basic_block=basic_block,
                                                    weight=True) for _ in range(n - 1)))
                          if n > 1 else None)

    def forward(self, x):
        x = self.conv1(x)
        if self.block is not None:
            x = self.block(x)
        return x


class BottleRep(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: BottleRep — two rep blocks and a residual scaled
    by a scalar Parameter ``alpha`` of shape [1] (``outputs + self.alpha * x``)."""

    def __init__(self, in_channels, out_channels, basic_block=RepVGGBlock, weight=False):
        super().__init__()
        self.conv1 = basic_block(in_channels, out_channels)
        self.conv2 = basic_block(out_channels, out_channels)
        self.shortcut = in_channels == out_channels
        self.alpha = nn.Parameter(torch.ones(1)) if weight else 1.0

    def forward(self, x):
        outputs = self.conv1(x)
        outputs = self.conv2(outputs)
        return outputs + self.alpha * x if self.shortcut else outputs


class BepC3(nn.Module):
    """meituan/YOLOv6 yolov6/layers/common.py: BepC3 (CSPStackRep) — two 1x1 ConvBNReLU, a
    RepBlock of BottleReps on one, concat, 1x1 ConvBNReLU."""

    def __init__(self, in_channels, out_channels, n=1, e=0.5, block=RepVGGBlock):
        super().__init__()
        hidden = int(out_channels * e)
        self.cv1 = ConvBNReLU(in_channels, hidden, 1, 1)
        self.cv2 = ConvBNReLU(in_channels, hidden, 1, 1)
        self.cv3 = ConvBNReLU(2 * hidden, out_channels, 1, 1)
        self.m = RepBlock(hidden, hidden, n=n, block=BottleRep, basic_block=block)

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class EfficientRep(nn.Module):
    """meituan/YOLOv6 yolov6/models/efficientrep.py: EfficientRep — ``block`` stem and four
    ERBlock stages (strided block + RepBlock), SimSPPF at the end; returns a tuple of P3-P5.
    ``stage_block`` switches to the CSPBepBackbone layout (BepC3 stages)."""

    def __init__(self, in_channels=3, channels_list=(8, 16, 24, 32, 32), num_repeats=(1, 2, 2, 2, 1),
                 block=RepVGGBlock, stage_block=None, csp_e=0.5):
        super().__init__()

        def stage(c_in, c_out, n):
            if stage_block is None:
                body = RepBlock(c_out, c_out, n=n, block=block)
            else:
                body = stage_block(c_out, c_out, n=n, e=csp_e, block=block)
            return [block(in_channels=c_in, out_channels=c_out, kernel_size=3, stride=2), body]

        c = channels_list
        self.stem = block(in_channels=in_channels, out_channels=c[0], kernel_size=3, stride=2)
        self.ERBlock_2 = nn.Sequential(*stage(c[0], c[1], num_repeats[1]))
        self.ERBlock_3 = nn.Sequential(*stage(c[1], c[2], num_repeats[2]))
        self.ERBlock_4 = nn.Sequential(*stage(c[2], c[3], num_repeats[3]))
        self.ERBlock_5 = nn.Sequential(*stage(c[3], c[4], num_repeats[4]),
                                       SimSPPF(c[4], c[4], kernel_size=5))

    def forward(self, x):
        outputs = []
        x = self.stem(x)
        x = self.ERBlock_2(x)
        x = self.ERBlock_3(x)
        outputs.append(x)
        x = self.ERBlock_4(x)
        outputs.append(x)
        x = self.ERBlock_5(x)
        outputs.append(x)
        return tuple(outputs)


class YOLOv6Tiny(nn.Module):
    """meituan/YOLOv6 yolov6/models/yolo.py: Model — backbone then per-level 1x1 ConvBNReLU and a
    biased prediction conv (a stand-in for RepPAN + Detect), flattened and concatenated."""

    def __init__(self, backbone, channels=(24, 32, 32), no=9):
        super().__init__()
        self.backbone = backbone
        self.stems = nn.ModuleList(ConvBNReLU(c, 16, 1, 1) for c in channels)
        self.preds = nn.ModuleList(nn.Conv2d(16, no, 1) for _ in channels)

    def forward(self, x):
        feats = self.backbone(x)
        outs = [p(s(f)).flatten(2) for f, s, p in zip(feats, self.stems, self.preds)]
        return torch.cat(outs, 2)


@torch.no_grad()
def yolov6_fuse_conv_and_bn(conv, bn):
    """meituan/YOLOv6 ``fuse_conv_and_bn`` (a new biased conv; built in the source dtype here)."""
    scale = bn.weight / torch.sqrt(bn.eps + bn.running_var)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size,
                      stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      groups=conv.groups, bias=True).requires_grad_(False).to(conv.weight)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    base = torch.zeros_like(bn.running_mean) if conv.bias is None else conv.bias
    shift = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    fused.bias.copy_(base * scale + shift)
    return fused


def fuse_model(model):
    """meituan/YOLOv6 yolov6/utils/torch_utils.py: fuse_model — exact-type ConvModules only;
    deletes ``bn`` and patches ``m.forward = m.forward_fuse``. ``load_checkpoint`` runs it
    by default, so this is the state users' YOLOv6 models are in."""
    for m in model.modules():
        if type(m) is ConvModule and hasattr(m, "bn"):
            m.conv = yolov6_fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


def yolov6_deploy(model):
    """YOLOv6 export/inference: ``load_checkpoint`` (fuse_model) then ``switch_to_deploy`` on
    every RepVGGBlock instance (QARep blocks are subclasses) — deploy/ONNX/export_onnx.py."""
    model = fuse_model(model)
    for layer in model.modules():
        if isinstance(layer, RepVGGBlock):
            layer.switch_to_deploy()
    return model


def build_efficientrep():
    return YOLOv6Tiny(EfficientRep())


def build_efficientrep_loaded():
    return fuse_model(YOLOv6Tiny(EfficientRep()))


def build_efficientrep_qarep():
    return YOLOv6Tiny(EfficientRep(block=QARepVGGBlock))


def build_efficientrep_qarep_v2():
    return YOLOv6Tiny(EfficientRep(block=QARepVGGBlockV2))


def build_qarep_v2_exclude_pad():
    return nn.Sequential(
        ConvBNReLU(3, 16, 3, 2),
        QARepVGGBlockV2ExcludePad(16, 16),
        QARepVGGBlockV2ExcludePad(16, 16),
        ConvBNReLU(16, 8, 1, 1),
    )


def build_cspbep():
    return YOLOv6Tiny(EfficientRep(num_repeats=(1, 2, 2, 4, 2), stage_block=BepC3))


def build_linear_add():
    return nn.Sequential(
        LinearAddBlock(3, 16, stride=2),
        LinearAddBlock(16, 16),
        LinearAddBlock(16, 16, is_csla=True),
        LinearAddBlock(16, 32, stride=2),
        LinearAddBlock(32, 32),
    )


_YOLOV6_SRC = "meituan/YOLOv6 yolov6/layers/common.py"
_ULTRA_CONV = "ultralytics/ultralytics ultralytics/nn/modules/conv.py"
_ULTRA_BLOCK = "ultralytics/ultralytics ultralytics/nn/modules/block.py"
_ULTRA_TASKS = "ultralytics/ultralytics ultralytics/nn/tasks.py: BaseModel.fuse"

IDIOMS: list[Idiom] = [
    Idiom(
        name="ultralytics.yolov8_c2f",
        library="ultralytics",
        source=f"{_ULTRA_CONV}: Conv, Concat; {_ULTRA_BLOCK}: C2f, Bottleneck, SPPF; "
               f"ultralytics/ultralytics ultralytics/nn/modules/head.py: Detect; {_ULTRA_TASKS}",
        build=build_yolov8,
        reparameterize=ultralytics_fuse,
        traceable=False,
        exportable=True,
        notes="YOLOv8-n shape: every Conv shares one SiLU module; C2f's list(chunk) stops "
              "symbolic_trace, so the fuser needs leaves or export; the deploy walk patches "
              "instance forwards.",
    ),
    Idiom(
        name="ultralytics.yolov10_repvggdw",
        library="ultralytics",
        source=f"{_ULTRA_CONV}: Conv; {_ULTRA_BLOCK}: C2fCIB, CIB, RepVGGDW, SCDown, C2f, SPPF; "
               f"{_ULTRA_TASKS}",
        build=build_yolov10,
        reparameterize=ultralytics_fuse,
        traceable=False,
        exportable=True,
        notes="YOLOv10 shape: RepVGGDW sums a 7x7 and a 3x3 depthwise conv+BN (3x3 padded to 7x7) "
              "inside C2fCIB, whose inherited list(chunk) forward blocks symbolic_trace.",
    ),
    Idiom(
        name="ultralytics.repvggdw_cib",
        library="ultralytics",
        source=f"{_ULTRA_BLOCK}: CIB, RepVGGDW; {_ULTRA_TASKS}",
        build=build_repvggdw_cib,
        reparameterize=ultralytics_fuse,
        notes="Traceable CIB stack: RepVGGDW (7x7 dw + 3x3 dw, each conv+BN, then SiLU) between "
              "dw/pw Convs; RepVGGDW.fuse swaps a Conv child for a bare nn.Conv2d.",
    ),
    Idiom(
        name="ultralytics.rtdetr_hgnet_repc3",
        library="ultralytics",
        source=f"{_ULTRA_CONV}: Conv, DWConv, LightConv, RepConv, Concat; "
               f"{_ULTRA_BLOCK}: HGStem, HGBlock, RepC3; {_ULTRA_TASKS}",
        build=build_rtdetr_ultralytics,
        reparameterize=ultralytics_fuse,
        notes="RT-DETR-l shape in ultralytics: HGStem pads right/bottom with F.pad before unpadded "
              "2x2 convs; RepC3's RepConvs (bn=False) add a literal 0 to conv1+conv2.",
    ),
    Idiom(
        name="ultralytics.partially_fused",
        library="ultralytics",
        source=f"{_ULTRA_TASKS}; {_ULTRA_CONV}: Conv.forward_fuse, RepConv.forward_fuse; "
               f"{_ULTRA_BLOCK}: HGStem, HGBlock, RepC3",
        build=build_rtdetr_partially_fused,
        reparameterize=ultralytics_fuse,
        notes="Some modules already fused the ultralytics way (bn deleted, biased conv, instance "
              "forward = forward_fuse), the rest not: the fuser must follow patched forwards "
              "and leave pre-fused convs alone.",
    ),
    Idiom(
        name="ultralytics.repconv_identity_bn",
        library="ultralytics",
        source=f"{_ULTRA_CONV}: RepConv, Conv; {_ULTRA_TASKS}",
        build=build_repconv_identity,
        reparameterize=ultralytics_fuse,
        notes="RepConv(bn=True): 3x3 conv+BN + 1x1 conv+BN + identity BatchNorm, grouped (g=2, 4) "
              "and strided (no identity: literal 0 seed) variants.",
    ),
    Idiom(
        name="ultralytics.conv2_bn_after_sum",
        library="ultralytics",
        source=f"{_ULTRA_CONV}: Conv2, Conv",
        build=build_conv2,
        reparameterize=conv2_fuse_convs,
        notes="Conv2: bn(conv3x3(x) + conv1x1(x)), BN after the sum; own conversion is "
              "fuse_convs (BN kept) because BaseModel.fuse crashes on Conv2 (issue #18691).",
    ),
    Idiom(
        name="ultralytics.conv_transpose_bn",
        library="ultralytics",
        source=f"{_ULTRA_CONV}: ConvTranspose, Conv; {_ULTRA_BLOCK}: Proto; "
               "ultralytics/ultralytics ultralytics/utils/torch_utils.py: fuse_deconv_and_bn; "
               f"{_ULTRA_TASKS}",
        build=build_conv_transpose,
        reparameterize=ultralytics_fuse,
        notes="ConvTranspose2d(k2, s2) -> BN -> SiLU: BN scale belongs on weight axis 1 "
              "([C_in, C_out, kH, kW]); Proto's bare biased deconv feeds a conv+BN (no fold).",
    ),
    Idiom(
        name="ultralytics.grouped_conv_transpose_bn",
        library="ultralytics",
        source=f"{_ULTRA_CONV}: DWConvTranspose2d, ConvTranspose; "
               "ultralytics/ultralytics ultralytics/utils/torch_utils.py: fuse_deconv_and_bn",
        build=build_grouped_conv_transpose,
        reparameterize=ultralytics_fuse,
        notes="Grouped (8 groups, 2 in / 3 out each; then fully depthwise) biased "
              "ConvTranspose2d with output_padding, then BN: scale maps group-wise onto weight "
              "axis 1 (torch's fuse_conv_bn_weights(transpose=True) gets groups>1 wrong).",
    ),
    Idiom(
        name="yolov6.efficientrep_repvgg",
        library="yolov6",
        source=f"{_YOLOV6_SRC}: RepVGGBlock, ConvModule, RepBlock, SimSPPF; "
               "meituan/YOLOv6 yolov6/models/efficientrep.py: EfficientRep; "
               "meituan/YOLOv6 yolov6/utils/torch_utils.py: fuse_model",
        build=build_efficientrep,
        input_shape=(2, 3, 64, 64),
        reparameterize=yolov6_deploy,
        notes="RepVGGBlock: dense+1x1 ConvModules + identity BN, literal 0 seed on strided blocks; "
              "hasattr('rbr_reparam') branch in forward; shared ReLU from activation_table.",
    ),
    Idiom(
        name="yolov6.efficientrep_loaded_checkpoint",
        library="yolov6",
        source=f"{_YOLOV6_SRC}: RepVGGBlock, ConvModule.forward_fuse; "
               "meituan/YOLOv6 yolov6/utils/checkpoint.py: load_checkpoint; "
               "meituan/YOLOv6 yolov6/utils/torch_utils.py: fuse_model",
        build=build_efficientrep_loaded,
        input_shape=(2, 3, 64, 64),
        reparameterize=yolov6_deploy,
        notes="State after load_checkpoint(fuse=True): every ConvModule already fused (biased conv, "
              "bn deleted, instance forward patched) while RepVGGBlocks keep three branches "
              "and their identity BN.",
    ),
    Idiom(
        name="yolov6.qarepvgg",
        library="yolov6",
        source=f"{_YOLOV6_SRC}: QARepVGGBlock, ConvModule; "
               "meituan/YOLOv6 yolov6/models/efficientrep.py: EfficientRep",
        build=build_efficientrep_qarep,
        input_shape=(2, 3, 64, 64),
        reparameterize=yolov6_deploy,
        notes="BN after the sum of a conv+BN branch, a bare 1x1 conv and nn.Identity; "
              "switch_to_deploy keeps that post-BN, so a further conv+BN fold is possible.",
    ),
    Idiom(
        name="yolov6.qarepvgg_v2_avgpool",
        library="yolov6",
        source=f"{_YOLOV6_SRC}: QARepVGGBlockV2, ConvModule; "
               "meituan/YOLOv6 yolov6/models/efficientrep.py: EfficientRep",
        build=build_efficientrep_qarep_v2,
        input_shape=(2, 3, 64, 64),
        reparameterize=yolov6_deploy,
        notes="QARepVGGBlockV2 adds AvgPool2d(3, 1, 1) (count_include_pad=True: a depthwise 1/9 "
              "kernel) to dense + 1x1 + identity before the BN; two literal-0 seeds when strided.",
    ),
    Idiom(
        name="yolov6.qarepvgg_v2_avgpool_exclude_pad",
        library="yolov6",
        source=f"{_YOLOV6_SRC}: QARepVGGBlockV2 (modified: count_include_pad=False)",
        build=build_qarep_v2_exclude_pad,
        reparameterize=None,
        must_remain={"avg_pool": 2},
        notes="Negative: the pool branch excludes padding from the divisor, so it is not a conv at "
              "the border; YOLOv6's _avg_to_3x3_tensor would be inexact, hence no own "
              "conversion. The pool must survive.",
    ),
    Idiom(
        name="yolov6.cspbep_bottlerep",
        library="yolov6",
        source=f"{_YOLOV6_SRC}: BepC3, BottleRep, RepBlock, RepVGGBlock, ConvBNReLU; "
               "meituan/YOLOv6 yolov6/models/efficientrep.py: CSPBepBackbone",
        build=build_cspbep,
        input_shape=(2, 3, 64, 64),
        reparameterize=yolov6_deploy,
        notes="CSPBep (YOLOv6-m/l): BottleRep residual scaled by a [1]-shaped Parameter alpha "
              "(outputs + alpha * x) around two RepVGGBlocks, inside BepC3's concat.",
    ),
    Idiom(
        name="yolov6.linear_add_block",
        library="yolov6",
        source=f"{_YOLOV6_SRC}: LinearAddBlock, ScaleLayer",
        build=build_linear_add,
        reparameterize=None,
        notes="ScaleLayer x * w.view(1, C, 1, 1) on a 3x3 conv, a 1x1 conv and the identity, "
              "'out +=' in place, then BN; YOLOv6 has no deploy conversion for it (RepOpt "
              "trains a separate RealVGGBlock net).",
    ),
]
