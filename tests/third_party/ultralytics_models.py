"""Whole ultralytics detectors as the current library builds them: ``DetectionModel`` with
its ``nn.Sequential`` of layers routed by ``m.f`` / ``m.i`` / ``self.save``, and the current
``Detect`` head (DFL box decoding, anchors cached on the instance, ``(y, preds)`` in eval).

Re-written from the public files named in each docstring (ultralytics/ultralytics, the
YOLO26-era sources: ``nn/tasks.py``, ``nn/modules/head.py``, ``nn/modules/block.py``,
``nn/modules/conv.py``, ``utils/tal.py``, ``utils/torch_utils.py``), keeping what a graph
fuser meets in a YOLOv8 / YOLO11 checkpoint:

* ``BaseModel.forward(x, *args, **kwargs)`` -> ``predict`` -> ``_predict_once``: a Python loop
  that gathers inputs from earlier layers through ``m.f`` and keeps outputs only for
  ``m.i in self.save``; ``isinstance(x, dict)`` sends training batches to ``loss``;
* ``C2f`` / ``C3k2``: ``list(cv1(x).chunk(2, 1))`` then ``y.extend(...)`` (not symbolically
  traceable), ``C3k`` nested CSP blocks, ``C2PSA``/``PSABlock``/``Attention`` (a ``view`` and
  ``split`` of a conv+BN output into q/k/v, a depthwise conv+BN on ``v.reshape``), the
  current ``SPPF`` (``cv1`` without activation, ``getattr(self, "n", 3)``);
* ``Detect``: ``forward_head(x, **self.one2many)`` (branches handed out by a property), class
  attributes ``dynamic``/``export``/``shape``/``anchors``/``strides``/``legacy``/``xyxy``,
  ``if self.dynamic or self.shape != shape:`` rebuilding anchors on the instance, DFL
  (``view``/``transpose``/``softmax`` then a frozen 1x1 conv), ``dist2bbox``; ``legacy``
  (a class attribute ``parse_model`` sets before building the head) picks the YOLOv8 class
  branch (Conv, Conv, Conv2d) or the YOLO11 one (DWConv+Conv twice, Conv2d);
* ``DetectionModel.__init__``: the stride probe on ``torch.zeros(1, ch, 256, 256)`` with the
  layers in eval and the head in training mode, ``bias_init``, ``initialize_weights`` (every
  BatchNorm's eps set to 1e-3, and the SiLU that all Convs share made ``inplace=True``);
* ``BaseModel.fuse``: ``fuse_conv_and_bn`` *in place* on the existing conv, ``delattr(m,
  "bn")``, ``m.forward = m.forward_fuse`` on each instance, only when ``is_fused()`` counts
  10 or more normalisation layers; ``Detect.fuse`` (dropping ``cv2``/``cv3``) runs for
  end-to-end heads only, so these non-end2end heads keep their branches.

Deviations, all on purpose:

* ``Conv``/``DWConv``/``Bottleneck``/``C2f`` are written again here rather than imported from
  :mod:`.yolo`: ultralytics' Convs share one class-level ``nn.SiLU`` and
  ``initialize_weights`` makes it in-place, so using :mod:`.yolo`'s ``Conv`` would flip the
  activation of every other ultralytics corpus model depending on which test built first.
  This module's Convs share their own SiLU (always in-place once a model is built).
* ``C2PSA`` gives its ``PSABlock``s ``max(self.c // 64, 1)`` heads (upstream ``self.c // 64``,
  which is 0 below 128 channels; ``C3k2(attn=True)`` upstream already uses the ``max``).
* The model is built from a hand-written ``(from, module)`` list instead of a YAML file
  (``_build_layers`` sets ``i``/``f``/``type``/``np`` and the save list as ``parse_model``
  does); no loss (``init_criterion`` raises), no augmented inference, no plotting
  (``feature_visualization`` is a no-op), ``info`` only logs; profiling times without thop.
* Channels are 8..32 (the DFL box branch has ``4 * reg_max = 64``), nc=4, 3 levels on a
  64x64 input (strides 8/16/32, grids 8x8/4x4/2x2).
* The builds end with one eval dry run at the example size (``_dry_run``), the state the
  exporter and the predictor leave a model in: ``Detect``'s anchor cache must be warm, or the
  first ``torch.export`` leaves the model broken (see ``_dry_run``).
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch
import torch.nn as nn

from . import Idiom
from .yolo import (
    Concat,
    Conv2,
    ConvTranspose,
    RepConv,
    RepVGGDW,
    autopad,
    fuse_deconv_and_bn,
    ultralytics_fuse,
)

LOGGER = logging.getLogger(__name__)
_TORCH_1_11 = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (1, 11)

# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/modules/conv.py
# ----------------------------------------------------------------------------------------


class Conv(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: Conv — conv (no bias) -> BN ->
    act; ``act=True`` takes the class-level ``default_act`` (one SiLU shared by every Conv),
    a module is used as given, anything else is ``nn.Identity``. ``forward_fuse`` skips the
    BN and is what ``BaseModel.fuse`` installs on the instance."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class DWConv(Conv):
    """ultralytics/ultralytics ultralytics/nn/modules/conv.py: DWConv — a Conv whose groups are
    ``gcd(c1, c2)`` (depthwise when c1 == c2)."""

    def __init__(self, c1, c2, k=1, s=1, d=1, act=True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/modules/block.py
# ----------------------------------------------------------------------------------------


class DFL(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: DFL — the expectation of a
    softmax over ``c1`` bins, computed by a frozen bias-free 1x1 conv whose weights are
    ``0..c1-1``, on ``x.view(b, 4, c1, a).transpose(2, 1)``."""

    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        bins = torch.arange(c1, dtype=torch.float)
        self.conv.weight.data[:] = nn.Parameter(bins.view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape  # batch, 4 * bins, anchors
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Bottleneck(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: Bottleneck — two Convs, the
    residual chosen in Python (``self.add``)."""

    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: C2f — ``list(cv1(x).chunk(2,
    1))``, each bottleneck fed the last entry (``y.extend(m(y[-1]) for m in self.m)``), all
    concatenated into ``cv2``. Iterating the chunk result stops ``symbolic_trace``."""

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
        y = self.cv1(x).split((self.c, self.c), 1)
        y = [y[0], y[1]]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: C3 — two parallel 1x1 Convs,
    a Sequential of Bottlenecks on one, concatenated, a third Conv."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=((1, 1), (3, 3)), e=1.0)
                                 for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k(C3):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: C3k — C3 whose bottlenecks use
    ``k x k`` kernels in both Convs (``C3k2(c3k=True)`` nests it)."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5, k=3):
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(k, k), e=1.0) for _ in range(n)))


class SPPF(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: SPPF as of YOLO26 — ``cv1``
    without activation (BN then ``nn.Identity``), one MaxPool2d applied ``n`` times (read
    with ``getattr(self, "n", 3)`` for old pickles), concatenated, ``cv2``, optional residual
    (``getattr(self, "add", False)``)."""

    def __init__(self, c1, c2, k=5, n=3, shortcut=False):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=False)
        self.cv2 = Conv(c_ * (n + 1), c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)
        self.n = n
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(getattr(self, "n", 3)))
        y = self.cv2(torch.cat(y, 1))
        return y + x if getattr(self, "add", False) else y


class Attention(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: Attention — ``qkv`` a 1x1 Conv
    without activation whose output is ``view``-ed to (B, heads, 2 * key_dim + head_dim, N)
    and ``split`` into q, k, v; ``v`` goes back through ``reshape`` into a depthwise 3x3 Conv
    (``pe``) added to the attention output; ``proj`` a 1x1 Conv without activation."""

    def __init__(self, dim, num_heads=8, attn_ratio=0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        nh_kd = self.key_dim * num_heads
        h = dim + nh_kd * 2
        self.qkv = Conv(dim, h, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, 1, g=dim, act=False)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, self.num_heads, self.key_dim * 2 + self.head_dim, N).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = (q.transpose(-2, -1) @ k) * self.scale
        attn = attn.softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        x = self.proj(x)
        return x


class PSABlock(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: PSABlock — attention then a
    Conv/Conv(act=False) feed-forward, each added back when ``self.add`` (Python-chosen)."""

    def __init__(self, c, attn_ratio=0.5, num_heads=4, shortcut=True):
        super().__init__()
        self.attn = Attention(c, attn_ratio=attn_ratio, num_heads=num_heads)
        self.ffn = nn.Sequential(Conv(c, c * 2, 1), Conv(c * 2, c, 1, act=False))
        self.add = shortcut

    def forward(self, x):
        x = x + self.attn(x) if self.add else self.attn(x)
        x = x + self.ffn(x) if self.add else self.ffn(x)
        return x


class C2PSA(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: C2PSA — ``assert c1 == c2``,
    ``cv1(x).split((c, c), dim=1)``, PSABlocks on the second half, concatenated into ``cv2``.
    (Heads: ``max(c // 64, 1)`` here, see the module docstring.)"""

    def __init__(self, c1, c2, n=1, e=0.5):
        super().__init__()
        assert c1 == c2
        self.c = int(c1 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv(2 * self.c, c1, 1)
        self.m = nn.Sequential(*(PSABlock(self.c, attn_ratio=0.5, num_heads=max(self.c // 64, 1))
                                 for _ in range(n)))

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        b = self.m(b)
        return self.cv2(torch.cat((a, b), 1))


class C3k2(C2f):
    """ultralytics/ultralytics ultralytics/nn/modules/block.py: C3k2 (YOLO11 / YOLO26) — C2f's
    forward with ``self.m`` rebuilt: Bottleneck + PSABlock when ``attn``, a 2-deep C3k when
    ``c3k``, else a plain Bottleneck."""

    def __init__(self, c1, c2, n=1, c3k=False, e=0.5, attn=False, g=1, shortcut=True):
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = nn.ModuleList(
            nn.Sequential(
                Bottleneck(self.c, self.c, shortcut, g),
                PSABlock(self.c, attn_ratio=0.5, num_heads=max(self.c // 64, 1)),
            )
            if attn
            else C3k(self.c, self.c, 2, shortcut, g)
            if c3k
            else Bottleneck(self.c, self.c, shortcut, g)
            for _ in range(n)
        )


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/utils/tal.py
# ----------------------------------------------------------------------------------------


def make_anchors(feats, strides, grid_cell_offset=0.5):
    """ultralytics/ultralytics ultralytics/utils/tal.py: make_anchors — cell centres of every
    level (``arange + 0.5``, ``meshgrid(indexing="ij")``) and a per-anchor stride column."""
    anchor_points, stride_tensor = [], []
    assert feats is not None
    dtype, device = feats[0].dtype, feats[0].device
    for i, stride in enumerate(strides):
        h, w = feats[i].shape[2:] if isinstance(feats, list) else (int(feats[i][0]), int(feats[i][1]))
        sx = torch.arange(end=w, device=device, dtype=dtype) + grid_cell_offset
        sy = torch.arange(end=h, device=device, dtype=dtype) + grid_cell_offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij") if _TORCH_1_11 else torch.meshgrid(sy, sx)
        anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), stride, dtype=dtype, device=device))
    return torch.cat(anchor_points), torch.cat(stride_tensor)


def dist2bbox(distance, anchor_points, xywh=True, dim=-1):
    """ultralytics/ultralytics ultralytics/utils/tal.py: dist2bbox — (l, t, r, b) distances
    around the anchor to a centre/size or corner box; asserts four coordinates."""
    assert distance.shape[dim] == 4
    lt, rb = distance.split([2, 2], dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    if xywh:
        c_xy = (x1y1 + x2y2) / 2
        wh = x2y2 - x1y1
        return torch.cat((c_xy, wh), dim)
    return torch.cat((x1y1, x2y2), dim)


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/modules/head.py
# ----------------------------------------------------------------------------------------


class Detect(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/head.py: Detect (current) — per level a
    box branch (Conv, Conv, Conv2d to ``4 * reg_max``) and a class branch (``legacy``: Conv,
    Conv, Conv2d; otherwise DWConv+Conv twice, Conv2d), returned by the ``one2many``
    property and run in ``forward_head``; in training the dict of raw maps, in eval
    ``(decoded, preds)`` (``export`` False). Anchors and strides are rebuilt and stored on the
    instance when ``self.dynamic or self.shape != shape``."""

    dynamic = False
    export = False
    format = None
    max_det = 300
    agnostic_nms = False
    shape = None
    anchors = torch.empty(0)
    strides = torch.empty(0)
    legacy = False  # v3/v5/v8/v9 class branch; parse_model sets it on the class
    xyxy = False

    def __init__(self, nc=80, reg_max=16, end2end=False, ch=()):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = reg_max
        self.no = nc + self.reg_max * 4
        self.stride = torch.zeros(self.nl)
        c2, c3 = max((16, ch[0] // 4, self.reg_max * 4)), max(ch[0], min(self.nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for x in ch)
        self.cv3 = (
            nn.ModuleList(
                nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, self.nc, 1)) for x in ch)
            if self.legacy
            else nn.ModuleList(
                nn.Sequential(
                    nn.Sequential(DWConv(x, x, 3), Conv(x, c3, 1)),
                    nn.Sequential(DWConv(c3, c3, 3), Conv(c3, c3, 1)),
                    nn.Conv2d(c3, self.nc, 1),
                )
                for x in ch
            )
        )
        self.dfl = DFL(self.reg_max) if self.reg_max > 1 else nn.Identity()
        if end2end:
            self.one2one_cv2 = copy.deepcopy(self.cv2)
            self.one2one_cv3 = copy.deepcopy(self.cv3)

    @property
    def one2many(self):
        return dict(box_head=self.cv2, cls_head=self.cv3)

    @property
    def one2one(self):
        return dict(box_head=self.one2one_cv2, cls_head=self.one2one_cv3)

    @property
    def end2end(self):
        # hasattr(self, "one2one") is False unless one2one_cv2 exists (the property raises)
        return getattr(self, "_end2end", True) and hasattr(self, "one2one")

    @end2end.setter
    def end2end(self, value):
        self._end2end = value

    def forward_head(self, x, box_head=None, cls_head=None):
        if box_head is None or cls_head is None:  # fused end-to-end head
            return dict()
        bs = x[0].shape[0]
        boxes = torch.cat([box_head[i](x[i]).view(bs, 4 * self.reg_max, -1) for i in range(self.nl)], dim=-1)
        scores = torch.cat([cls_head[i](x[i]).view(bs, self.nc, -1) for i in range(self.nl)], dim=-1)
        return dict(boxes=boxes, scores=scores, feats=x)

    def forward(self, x):
        preds = self.forward_head(x, **self.one2many)
        if self.end2end:
            x_detach = [xi.detach() for xi in x]
            one2one = self.forward_head(x_detach, **self.one2one)
            preds = {"one2many": preds, "one2one": one2one}
        if self.training:
            return preds
        y = self._inference(preds["one2one"] if self.end2end else preds)
        if self.end2end:
            y = self.postprocess(y.permute(0, 2, 1))
        return y if self.export else (y, preds)

    def _inference(self, x):
        dbox = self._get_decode_boxes(x)
        return torch.cat((dbox, x["scores"].sigmoid()), 1)

    def _get_decode_boxes(self, x):
        shape = x["feats"][0].shape  # BCHW
        if self.dynamic or self.shape != shape:
            self.anchors, self.strides = (
                a.transpose(0, 1) for a in make_anchors(x["feats"], self.stride, 0.5))
            self.shape = shape
        dbox = self.decode_bboxes(self.dfl(x["boxes"]), self.anchors.unsqueeze(0)) * self.strides
        return dbox

    def bias_init(self):
        """Box biases 2.0, class biases log(5 / nc / (640 / stride) ** 2); needs ``stride``."""
        for i, (a, b) in enumerate(zip(self.one2many["box_head"], self.one2many["cls_head"])):
            a[-1].bias.data[:] = 2.0
            b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / self.stride[i]) ** 2)
        if self.end2end:
            for i, (a, b) in enumerate(zip(self.one2one["box_head"], self.one2one["cls_head"])):
                a[-1].bias.data[:] = 2.0
                b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / self.stride[i]) ** 2)

    def decode_bboxes(self, bboxes, anchors, xywh=True):
        return dist2bbox(bboxes, anchors, xywh=xywh and not self.end2end and not self.xyxy, dim=1)

    def postprocess(self, preds):
        """(batch, anchors, 4 + nc) -> top ``max_det`` (box, score, class) rows (end2end only)."""
        boxes, scores = preds.split([4, self.nc], dim=-1)
        scores, conf, idx = self.get_topk_index(scores, self.max_det)
        boxes = boxes.gather(dim=1, index=idx.repeat(1, 1, 4))
        return torch.cat([boxes, scores, conf], dim=-1)

    def get_topk_index(self, scores, max_det):
        batch_size, anchors, nc = scores.shape
        k = max_det if self.export else min(max_det, anchors)
        if self.agnostic_nms:
            scores, labels = scores.max(dim=-1, keepdim=True)
            scores, indices = scores.topk(k, dim=1)
            labels = labels.gather(1, indices)
            return scores, labels, indices
        ori_index = scores.max(dim=-1)[0].topk(k)[1].unsqueeze(-1)
        scores = scores.gather(dim=1, index=ori_index.repeat(1, 1, nc))
        scores, index = scores.flatten(1).topk(k)
        idx = ori_index[torch.arange(batch_size)[..., None], index // nc]
        return scores[..., None], (index % nc)[..., None].float(), idx

    def fuse(self):
        """Drop the one-to-many branches (``BaseModel.fuse`` calls it for end2end heads only)."""
        self.cv2 = self.cv3 = None


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/utils/torch_utils.py
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def fuse_conv_and_bn(conv, bn):
    """ultralytics/ultralytics ultralytics/utils/torch_utils.py: fuse_conv_and_bn (current) —
    rescales ``conv.weight`` in place along axis 0, registers a bias Parameter when the conv
    had none (in the weight's dtype), freezes and returns the same conv."""
    bn_scale = bn.weight.div(torch.sqrt(bn.eps + bn.running_var))
    conv.weight.data = conv.weight * bn_scale.view(-1, 1, 1, 1)
    b_conv = (torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
              if conv.bias is None else conv.bias)
    b_bn = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fused_bias = bn_scale * b_conv + b_bn
    if conv.bias is None:
        conv.register_parameter("bias", nn.Parameter(fused_bias))
    else:
        conv.bias.data = fused_bias
    return conv.requires_grad_(False)


def initialize_weights(model):
    """ultralytics/ultralytics ultralytics/utils/torch_utils.py: initialize_weights — exact-type
    checks: BatchNorm2d eps 1e-3 and momentum 0.03; Hardswish/LeakyReLU/ReLU/ReLU6/SiLU made
    in place (which reaches the SiLU all Convs share)."""
    for m in model.modules():
        t = type(m)
        if t is nn.Conv2d:
            pass
        elif t is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif t in {nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU}:
            m.inplace = True


def feature_visualization(x, module_type, stage, save_dir=None):
    """Stand-in for ultralytics.utils.plotting.feature_visualization (no plotting here)."""


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/tasks.py
# ----------------------------------------------------------------------------------------


def _build_layers(layers):
    """What ``parse_model`` does once the modules exist: attach index ``i``, ``from`` index
    ``f``, ``type`` and ``np`` to each layer, and collect the save list of every earlier layer
    read through ``f``."""
    modules, save = [], []
    for i, (f, m_) in enumerate(layers):
        t = str(type(m_))[8:-2].replace("__main__.", "")
        m_.np = sum(x.numel() for x in m_.parameters())
        m_.i, m_.f, m_.type = i, f, t
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        modules.append(m_)
    return nn.Sequential(*modules), sorted(save)


class BaseModel(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/tasks.py: BaseModel — ``forward(x, *args,
    **kwargs)`` (a dict means a training batch: ``loss``), ``predict(x, profile, visualize,
    augment, embed)``, ``_predict_once`` routing through ``m.f``/``m.i``/``self.save`` with the
    ``embed`` early exit, ``fuse``/``is_fused``, and ``_apply`` that also converts the head's
    plain-tensor ``stride``/``anchors``/``strides``."""

    def forward(self, x, *args, **kwargs):
        if isinstance(x, dict):  # training / validation batches carry labels
            return self.loss(x, *args, **kwargs)
        return self.predict(x, *args, **kwargs)

    def predict(self, x, profile=False, visualize=False, augment=False, embed=None):
        if augment:
            return self._predict_augment(x)
        return self._predict_once(x, profile, visualize, embed)

    def _predict_once(self, x, profile=False, visualize=False, embed=None):
        y, dt, embeddings = [], [], []
        embed = frozenset(embed) if embed is not None else {-1}
        max_idx = max(embed)
        for m in self.model:
            if m.f != -1:  # input from earlier layers
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if profile:
                self._profile_one_layer(m, x, dt)
            x = m(x)
            y.append(x if m.i in self.save else None)
            if visualize:
                feature_visualization(x, m.type, m.i, save_dir=visualize)
            if m.i in embed:
                embeddings.append(torch.nn.functional.adaptive_avg_pool2d(x, (1, 1)).squeeze(-1).squeeze(-1))
                if m.i == max_idx:
                    return torch.unbind(torch.cat(embeddings, 1), dim=0)
        return x

    def _predict_augment(self, x):
        LOGGER.warning(f"{self.__class__.__name__} does not support 'augment=True' prediction. "
                       "Reverting to single-scale prediction.")
        return self._predict_once(x)

    def _profile_one_layer(self, m, x, dt):
        c = m == self.model[-1] and isinstance(x, list)  # the head writes into a list: copy it
        t = time.perf_counter()
        for _ in range(10):
            m(x.copy() if c else x)
        dt.append((time.perf_counter() - t) * 100)
        LOGGER.info(f"{dt[-1]:10.2f} {m.np:10.0f}  {m.type}")

    def fuse(self, verbose=True):
        """Fold every Conv/Conv2/DWConv BN (Conv2 first merges its 1x1), ConvTranspose BN,
        RepConv and RepVGGDW branches; end-to-end heads drop their one-to-many branches."""
        if not self.is_fused():
            for m in self.model.modules():
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
                if isinstance(m, Detect) and getattr(m, "end2end", False):
                    m.fuse()
            self.info(verbose=verbose)
        return self

    def is_fused(self, thresh=10):
        """Fewer than ``thresh`` normalisation layers (any ``torch.nn`` class with "Norm" in
        its name) counts as fused."""
        bn = tuple(v for k, v in torch.nn.__dict__.items() if "Norm" in k)
        return sum(isinstance(v, bn) for v in self.modules()) < thresh

    def info(self, detailed=False, verbose=True, imgsz=640):
        n_p = sum(x.numel() for x in self.parameters())
        if verbose:
            LOGGER.info(f"{self.__class__.__name__}: {len(list(self.modules()))} layers, {n_p} parameters")
        return n_p

    def _apply(self, fn):
        self = super()._apply(fn)
        m = self.model[-1]
        if isinstance(m, Detect):
            m.stride = fn(m.stride)
            m.anchors = fn(m.anchors)
            m.strides = fn(m.strides)
        return self

    def loss(self, batch, preds=None):
        if getattr(self, "criterion", None) is None:
            self.criterion = self.init_criterion()
        if preds is None:
            preds = self.forward(batch["img"])
        return self.criterion(preds, batch)

    def init_criterion(self):
        raise NotImplementedError("compute_loss() needs to be implemented by task heads")


class DetectionModel(BaseModel):
    """ultralytics/ultralytics ultralytics/nn/tasks.py: DetectionModel — layers, save list,
    names; strides measured by one forward of ``torch.zeros(1, ch, 256, 256)`` with the layers
    in eval and the head in training mode (``_forward`` returns ``output["feats"]``), then
    ``bias_init`` and ``initialize_weights``. ``end2end`` is read from the head."""

    def __init__(self, layers, ch=3, nc=None, verbose=False):
        super().__init__()
        self.model, self.save = _build_layers(layers)
        nc = nc if nc is not None else self.model[-1].nc
        self.yaml = {"nc": nc, "channels": ch}
        self.names = {i: f"{i}" for i in range(nc)}
        self.inplace = True

        m = self.model[-1]  # Detect()
        if isinstance(m, Detect):
            s = 256  # 2x min stride
            m.inplace = self.inplace

            def _forward(x):
                output = self.forward(x)
                if self.end2end:
                    output = output["one2many"]
                return output["feats"]

            self.model.eval()  # no BatchNorm statistics updates before training
            m.training = True  # the head returns its raw maps
            m.stride = torch.tensor([s / x.shape[-2] for x in _forward(torch.zeros(1, ch, s, s))])
            self.stride = m.stride
            self.model.train()
            m.bias_init()  # once
        else:
            self.stride = torch.Tensor([32])

        initialize_weights(self)
        if verbose:
            self.info()

    @property
    def end2end(self):
        return getattr(self.model[-1], "end2end", False)

    @end2end.setter
    def end2end(self, value):
        self.set_head_attr(end2end=value)

    def set_head_attr(self, **kwargs):
        head = self.model[-1]
        for k, v in kwargs.items():
            if not hasattr(head, k):
                LOGGER.warning(f"Head has no attribute '{k}'.")
                continue
            setattr(head, k, v)


def _detect(legacy, *args, **kwargs):
    """``parse_model`` sets ``legacy`` on the head *class* just before building it (True for
    v3/v5/v8/v9 layer lists, False once a C3k2/C2fCIB/A2C2f appears)."""
    Detect.legacy = legacy
    return Detect(*args, **kwargs)


# --- models ---------------------------------------------------------------------------------


def _yolov8_layers(nc=4, reg_max=16):
    """yolov8.yaml at a tiny width (n's depth pattern 1/2/2/1 in the backbone)."""
    return [
        (-1, Conv(3, 8, 3, 2)),                                   # 0  P1/2
        (-1, Conv(8, 16, 3, 2)),                                  # 1  P2/4
        (-1, C2f(16, 16, 1, True)),                               # 2
        (-1, Conv(16, 16, 3, 2)),                                 # 3  P3/8
        (-1, C2f(16, 16, 2, True)),                               # 4
        (-1, Conv(16, 32, 3, 2)),                                 # 5  P4/16
        (-1, C2f(32, 32, 2, True)),                               # 6
        (-1, Conv(32, 32, 3, 2)),                                 # 7  P5/32
        (-1, C2f(32, 32, 1, True)),                               # 8
        (-1, SPPF(32, 32, 5)),                                    # 9
        (-1, nn.Upsample(None, 2, "nearest")),                    # 10
        ([-1, 6], Concat(1)),                                     # 11 cat P4
        (-1, C2f(64, 32, 1)),                                     # 12
        (-1, nn.Upsample(None, 2, "nearest")),                    # 13
        ([-1, 4], Concat(1)),                                     # 14 cat P3
        (-1, C2f(48, 16, 1)),                                     # 15 (P3/8-small)
        (-1, Conv(16, 16, 3, 2)),                                 # 16
        ([-1, 12], Concat(1)),                                    # 17 cat head P4
        (-1, C2f(48, 32, 1)),                                     # 18 (P4/16-medium)
        (-1, Conv(32, 32, 3, 2)),                                 # 19
        ([-1, 9], Concat(1)),                                     # 20 cat head P5
        (-1, C2f(64, 32, 1)),                                     # 21 (P5/32-large)
        ([15, 18, 21], _detect(True, nc, reg_max, False, (16, 32, 32))),  # 22
    ]


def _yolo11_layers(nc=4, reg_max=16):
    """yolo11.yaml at a tiny width: C3k2 with e=0.25 and c3k False in the shallow stages,
    c3k True in the deep ones and the P5 head, SPPF then C2PSA."""
    return [
        (-1, Conv(3, 8, 3, 2)),                                   # 0  P1/2
        (-1, Conv(8, 16, 3, 2)),                                  # 1  P2/4
        (-1, C3k2(16, 32, 1, False, 0.25)),                       # 2
        (-1, Conv(32, 32, 3, 2)),                                 # 3  P3/8
        (-1, C3k2(32, 32, 1, False, 0.25)),                       # 4
        (-1, Conv(32, 32, 3, 2)),                                 # 5  P4/16
        (-1, C3k2(32, 32, 1, True)),                              # 6
        (-1, Conv(32, 32, 3, 2)),                                 # 7  P5/32
        (-1, C3k2(32, 32, 1, True)),                              # 8
        (-1, SPPF(32, 32, 5)),                                    # 9
        (-1, C2PSA(32, 32, 1)),                                   # 10
        (-1, nn.Upsample(None, 2, "nearest")),                    # 11
        ([-1, 6], Concat(1)),                                     # 12 cat P4
        (-1, C3k2(64, 32, 1, False)),                             # 13
        (-1, nn.Upsample(None, 2, "nearest")),                    # 14
        ([-1, 4], Concat(1)),                                     # 15 cat P3
        (-1, C3k2(64, 16, 1, False)),                             # 16 (P3/8-small)
        (-1, Conv(16, 16, 3, 2)),                                 # 17
        ([-1, 13], Concat(1)),                                    # 18 cat head P4
        (-1, C3k2(48, 32, 1, False)),                             # 19 (P4/16-medium)
        (-1, Conv(32, 32, 3, 2)),                                 # 20
        ([-1, 10], Concat(1)),                                    # 21 cat head P5
        (-1, C3k2(64, 32, 1, True)),                              # 22 (P5/32-large)
        ([16, 19, 22], _detect(False, nc, reg_max, False, (16, 32, 32))),  # 23
    ]


INPUT_SHAPE = (2, 3, 64, 64)


def _dry_run(model, shape=INPUT_SHAPE):
    """One eval forward at the example size, as the exporter's dry runs (and the predictor's
    warm-up) do before anything else sees the model: ``Detect`` then holds ``shape``,
    ``anchors`` and ``strides`` for that size. Without it, the first ``torch.export`` runs the
    rebuild branch, and torch.export puts the tensor attributes ``anchors``/``strides`` back
    afterwards but not the plain ``shape``: the model is left with empty anchors and a
    matching ``shape``, and fails on its next call."""
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape))
    return model.train()


def build_yolov8_detection_model():
    return _dry_run(DetectionModel(_yolov8_layers(), ch=3, nc=4))


def build_yolo11_detection_model():
    return _dry_run(DetectionModel(_yolo11_layers(), ch=3, nc=4))


_TASKS = "ultralytics/ultralytics ultralytics/nn/tasks.py: BaseModel, DetectionModel, parse_model"
_HEAD = "ultralytics/ultralytics ultralytics/nn/modules/head.py: Detect"
_BLOCK = "ultralytics/ultralytics ultralytics/nn/modules/block.py"
_CONV = "ultralytics/ultralytics ultralytics/nn/modules/conv.py: Conv, DWConv, Concat"
_UTILS = ("ultralytics/ultralytics ultralytics/utils/tal.py: make_anchors, dist2bbox; "
          "ultralytics/ultralytics ultralytics/utils/torch_utils.py: fuse_conv_and_bn, "
          "initialize_weights")

IDIOMS: list[Idiom] = [
    Idiom(
        name="ultralytics.yolov8_detection_model",
        library="ultralytics",
        source=f"{_TASKS}; {_HEAD}; {_BLOCK}: C2f, Bottleneck, SPPF, DFL; {_CONV}; {_UTILS}",
        build=build_yolov8_detection_model,
        input_shape=INPUT_SHAPE,
        reparameterize=ultralytics_fuse,
        traceable=False,
        whole_program=True,
        exportable=True,
        notes="Whole current YOLOv8 DetectionModel: forward -> predict -> _predict_once routing "
              "by m.f/self.save, C2f list(chunk) (not symbolically traceable), SPPF cv1 "
              "without act, legacy Detect (Conv, Conv, Conv2d class branch) with DFL and "
              "anchors cached on the instance; eval returns (y, preds dict with feats). Shared "
              "in-place SiLU (initialize_weights); BaseModel.fuse folds BN in place and "
              "patches forward = forward_fuse.",
    ),
    Idiom(
        name="ultralytics.yolo11_detection_model",
        library="ultralytics",
        source=f"{_TASKS}; {_HEAD}; {_BLOCK}: C3k2, C3k, C3, C2f, Bottleneck, SPPF, C2PSA, "
               f"PSABlock, Attention, DFL; {_CONV}; {_UTILS}",
        build=build_yolo11_detection_model,
        input_shape=INPUT_SHAPE,
        reparameterize=ultralytics_fuse,
        traceable=False,
        whole_program=True,
        exportable=True,
        notes="Whole current YOLO11 DetectionModel: C3k2 (c3k False / True, nested C3k), C2PSA "
              "attention (qkv conv+BN viewed and split, depthwise pe conv+BN on v.reshape), "
              "non-legacy Detect class branch (DWConv+Conv twice) with DFL; same routing, "
              "anchor cache, in-place SiLU and BaseModel.fuse as the YOLOv8 entry.",
    ),
]
