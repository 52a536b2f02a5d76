"""OpenMMLab: mmpretrain RepVGG / MobileOne / RepLKNet backbones behind a classifier's neck
and head, mmcv ``ConvModule`` with its efficient conv-BN eval forward (current and first
versions), mmcv's ``fuse_conv_bn`` walk, and mmengine's graph-level efficient conv-BN patch.

Re-written from open-mmlab/mmpretrain, open-mmlab/mmcv and open-mmlab/mmengine; the
config builders (``build_norm_layer`` ...) are reduced to the few types used here.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.modules.batchnorm import _BatchNorm

from . import Idiom

# --------------------------------------------------------------------------------------
# mmcv builders (the registry reduced to a lookup table)
# --------------------------------------------------------------------------------------

_NORMS = {"BN": ("bn", nn.BatchNorm2d)}
_ACTS = {"ReLU": nn.ReLU, "Sigmoid": nn.Sigmoid, "GELU": nn.GELU}


def build_norm_layer(cfg: dict, num_features: int, postfix="") -> tuple[str, nn.Module]:
    """mmcv ``build_norm_layer``: (abbreviation + postfix, layer)."""
    options = dict(cfg)
    abbr, layer_type = _NORMS[options.pop("type")]
    options.pop("requires_grad", None)
    return abbr + str(postfix), layer_type(num_features, **options)


def build_activation_layer(cfg: dict) -> nn.Module:
    options = dict(cfg)
    return _ACTS[options.pop("type")](**options)


def make_divisible(value, divisor, min_value=None, min_ratio=0.9):
    """mmpretrain ``make_divisible``: round to a multiple of ``divisor``."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < min_ratio * value else rounded


# --------------------------------------------------------------------------------------
# mmcv ConvModule with efficient_conv_bn_eval
# --------------------------------------------------------------------------------------


def efficient_conv_bn_eval_forward(bn: _BatchNorm, conv: nn.modules.conv._ConvNd, x):
    """open-mmlab/mmcv mmcv/cnn/bricks/conv_module.py: efficient_conv_bn_eval_forward.

    Conv followed by an eval-mode BN computed as one conv whose weight and bias are scaled
    on the fly from the BN statistics (missing conv bias / BN affine filled with 0 / 1).
    """
    kernel = conv.weight
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_var)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    inv_std = torch.rsqrt(bn.running_var + bn.eps).reshape([-1] + [1] * (len(conv.weight.shape) - 1))
    scale = gamma.view_as(inv_std) * inv_std
    kernel = kernel * scale
    fused_bias = beta + scale.flatten() * (conv_bias - bn.running_mean)
    return conv._conv_forward(x, kernel, fused_bias)


class ConvModule(nn.Module):
    """open-mmlab/mmcv mmcv/cnn/bricks/conv_module.py: ConvModule (conv / norm / act in a
    configurable ``order``; norm registered under ``norm_name`` and read back through a
    property). With ``efficient_conv_bn_eval`` and an eval-mode BN right after the conv,
    ``forward`` assigns ``self.conv.forward = partial(efficient_conv_bn_eval_forward, norm,
    conv)``, calls the conv, deletes the instance attribute again and skips the norm step.
    ``symbolic_trace`` records only ``call_module conv`` for that (conv is a leaf, its patched
    forward never runs): the traced graph silently loses the BN.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias="auto", norm_cfg=None, act_cfg=dict(type="ReLU"), inplace=True,
                 order=("conv", "norm", "act"), efficient_conv_bn_eval=False):
        super().__init__()
        assert isinstance(order, tuple) and set(order) == {"conv", "norm", "act"}
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.order = order
        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        if bias == "auto":
            bias = not self.with_norm
        self.with_bias = bias
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias)
        self.in_channels, self.out_channels = in_channels, out_channels
        if self.with_norm:
            after_conv = order.index("norm") > order.index("conv")
            self.norm_name, norm = build_norm_layer(norm_cfg, out_channels if after_conv else in_channels)
            self.add_module(self.norm_name, norm)
        else:
            self.norm_name = None
        self.turn_on_efficient_conv_bn_eval(efficient_conv_bn_eval)
        if self.with_activation:
            act = dict(act_cfg)
            if act["type"] not in ("Tanh", "PReLU", "Sigmoid", "HSigmoid", "Swish", "GELU"):
                act.setdefault("inplace", inplace)
            self.activate = build_activation_layer(act)

    @property
    def norm(self):
        return getattr(self, self.norm_name) if self.norm_name else None

    def turn_on_efficient_conv_bn_eval(self, efficient_conv_bn_eval=True):
        if (efficient_conv_bn_eval and self.norm and isinstance(self.norm, _BatchNorm)
                and self.norm.track_running_stats):
            self.efficient_conv_bn_eval_forward = efficient_conv_bn_eval_forward
        else:
            self.efficient_conv_bn_eval_forward = None

    def forward(self, x, activate=True, norm=True):
        step = 0
        while step < len(self.order):
            layer = self.order[step]
            if layer == "conv":
                if (step + 1 < len(self.order) and self.order[step + 1] == "norm" and norm
                        and self.with_norm and not self.norm.training
                        and self.efficient_conv_bn_eval_forward is not None):
                    self.conv.forward = partial(self.efficient_conv_bn_eval_forward, self.norm, self.conv)
                    step += 1
                    x = self.conv(x)
                    del self.conv.forward
                else:
                    x = self.conv(x)
            elif layer == "norm" and norm and self.with_norm:
                x = self.norm(x)
            elif layer == "act" and activate and self.with_activation:
                x = self.activate(x)
            step += 1
        return x


def _fuse_conv_bn_pair(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """open-mmlab/mmcv mmcv/cnn/utils/fuse_conv_bn.py: _fuse_conv_bn (conv weights rescaled
    in place; needs ``bn.weight``)."""
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight = nn.Parameter(conv.weight * factor.reshape([conv.out_channels, 1, 1, 1]))
    conv.bias = nn.Parameter((bias - bn.running_mean) * factor + bn.bias)
    return conv


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """open-mmlab/mmcv mmcv/cnn/utils/fuse_conv_bn.py: fuse_conv_bn. Walks children in
    *registration* order: a BN is folded into the last ``nn.Conv2d`` registered before it
    and replaced by ``nn.Identity`` (data flow is never looked at)."""
    last_conv, last_name = None, None
    for name, child in module.named_children():
        if isinstance(child, (_BatchNorm, nn.SyncBatchNorm)):
            if last_conv is None:
                continue
            module._modules[last_name] = _fuse_conv_bn_pair(last_conv, child)
            module._modules[name] = nn.Identity()
            last_conv = None
        elif isinstance(child, nn.Conv2d):
            last_conv, last_name = child, name
        else:
            fuse_conv_bn(child)
    return module


# --------------------------------------------------------------------------------------
# mmcv ConvModule as first released (fast_conv_bn_eval): the patch stays in place
# --------------------------------------------------------------------------------------


class ConvModuleFastEval(ConvModule):
    """open-mmlab/mmcv mmcv/cnn/bricks/conv_module.py@36003b76: ConvModule with
    ``fast_conv_bn_eval`` as first released. ``__init__`` builds ``partial(fast_forward,
    norm, conv)`` once and keeps the conv's own bound ``forward``; ``forward`` assigns one or
    the other to ``self.conv.forward`` and never deletes it, so after the first eval call the
    conv module *permanently* computes conv+BN and the BN module is never called again. Read
    as a plain ``nn.Conv2d`` (its weight, its ``F.conv2d``) the conv is off by its BN.
    """

    def __init__(self, *args, fast_conv_bn_eval=False, **kwargs):
        super().__init__(*args, **kwargs)
        if fast_conv_bn_eval and self.norm and isinstance(self.norm, _BatchNorm) \
                and self.norm.track_running_stats:
            self.fast_conv_bn_eval_forward = partial(efficient_conv_bn_eval_forward, self.norm, self.conv)
        else:
            self.fast_conv_bn_eval_forward = None
        self.original_conv_forward = self.conv.forward

    def forward(self, x, activate=True, norm=True):
        step = 0
        while step < len(self.order):
            layer = self.order[step]
            if layer == "conv":
                if (step + 1 < len(self.order) and self.order[step + 1] == "norm" and norm
                        and self.with_norm and not self.norm.training
                        and self.fast_conv_bn_eval_forward is not None):
                    self.conv.forward = self.fast_conv_bn_eval_forward
                    step += 1
                else:
                    self.conv.forward = self.original_conv_forward
                x = self.conv(x)
            elif layer == "norm" and norm and self.with_norm:
                x = self.norm(x)
            elif layer == "act" and activate and self.with_activation:
                x = self.activate(x)
            step += 1
        return x


# --------------------------------------------------------------------------------------
# mmengine efficient_conv_bn_eval: a traced copy's forward replaces the module's
# --------------------------------------------------------------------------------------


def efficient_conv_bn_eval_control(bn, conv, x):
    """open-mmlab/mmengine mmengine/model/efficient_conv_bn_eval.py:
    efficient_conv_bn_eval_control (fused path when the BN is in eval mode)."""
    if not bn.training:
        return efficient_conv_bn_eval_forward(bn, conv, x)
    return bn(conv._conv_forward(x, conv.weight, conv.bias))


def efficient_conv_bn_eval_graph_transform(fx_model: torch.fx.GraphModule) -> None:
    """open-mmlab/mmengine mmengine/model/efficient_conv_bn_eval.py:
    efficient_conv_bn_eval_graph_transform: every ``call_module`` BN whose input is a
    single-user ``call_module`` conv becomes one ``call_function`` on two ``get_attr`` nodes."""
    modules = dict(fx_model.named_modules())
    pairs = []
    for node in fx_model.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], nn.modules.conv._ConvNd)):
            continue
        if len(source.users) > 1:
            continue
        pairs.append((source, node))
    graph = fx_model.graph
    for conv_node, bn_node in pairs:
        with graph.inserting_before(conv_node):
            get_conv = graph.create_node("get_attr", conv_node.target, name="get_conv")
            get_bn = graph.create_node("get_attr", bn_node.target, name="get_bn")
            fused = graph.create_node("call_function", efficient_conv_bn_eval_control,
                                      (get_bn, get_conv, conv_node.args[0]), name="efficient_conv_bn_eval")
        bn_node.replace_all_uses_with(fused)
        graph.erase_node(bn_node)
        graph.erase_node(conv_node)
    graph.lint()
    fx_model.recompile()


def turn_on_efficient_conv_bn_eval(model: nn.Module, modules) -> None:
    """open-mmlab/mmengine mmengine/model/efficient_conv_bn_eval.py:
    turn_on_efficient_conv_bn_eval (``module.forward = fx_model.forward``)."""
    for name in [modules] if isinstance(modules, str) else modules:
        module = model.get_submodule(name)
        fx_model = torch.fx.symbolic_trace(module)
        efficient_conv_bn_eval_graph_transform(fx_model)
        module.forward = fx_model.forward


# --------------------------------------------------------------------------------------
# mmpretrain: SELayer, ImageClassifier parts
# --------------------------------------------------------------------------------------


class SELayer(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/utils/se_layer.py: SELayer (global pool ->
    two bias ConvModules (ReLU, Sigmoid) -> ``x * out``): a data-dependent multiply."""

    def __init__(self, channels, squeeze_channels=None, ratio=16, divisor=8,
                 act_cfg=(dict(type="ReLU"), dict(type="Sigmoid"))):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        if squeeze_channels is None:
            squeeze_channels = make_divisible(channels // ratio, divisor)
        self.conv1 = ConvModule(channels, squeeze_channels, 1, act_cfg=act_cfg[0])
        self.conv2 = ConvModule(squeeze_channels, channels, 1, act_cfg=act_cfg[1])

    def forward(self, x):
        weight = self.conv2(self.conv1(self.global_avgpool(x)))
        return x * weight


class GlobalAveragePooling(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/necks/gap.py: GlobalAveragePooling (tuple of
    stage outputs in, tuple out, ``view(x.size(0), -1)``)."""

    def __init__(self):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, inputs):
        if isinstance(inputs, tuple):
            pooled = tuple(self.gap(x) for x in inputs)
            return tuple(p.view(x.size(0), -1) for p, x in zip(pooled, inputs))
        return self.gap(inputs).view(inputs.size(0), -1)


class LinearClsHead(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/heads/linear_head.py: LinearClsHead
    (``pre_logits`` keeps the last stage's feature)."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def pre_logits(self, feats):
        return feats[-1]

    def forward(self, feats):
        return self.fc(self.pre_logits(feats))


class ImageClassifier(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/classifiers/image.py: ImageClassifier
    (backbone -> neck -> head; ``forward`` reduced to its ``mode='tensor'`` path, whose string
    dispatch would otherwise stop ``symbolic_trace`` on the placeholder)."""

    def __init__(self, backbone, neck, head):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head

    @property
    def with_neck(self):
        return hasattr(self, "neck") and self.neck is not None

    def extract_feat(self, inputs):
        x = self.backbone(inputs)
        if self.with_neck:
            x = self.neck(x)
        return x

    def forward(self, inputs):
        return self.head(self.extract_feat(inputs))


def convert_classifier_to_deploy(model: ImageClassifier) -> ImageClassifier:
    """open-mmlab/mmpretrain tools/model_converters/reparameterize_model.py:
    convert_classifier_to_deploy (``model.backbone.switch_to_deploy()``)."""
    assert hasattr(model.backbone, "switch_to_deploy")
    model.backbone.switch_to_deploy()
    return model


def _conv_bn_sequential(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                        norm_cfg, norm_key="norm"):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, bias=False))
    seq.add_module(norm_key, build_norm_layer(norm_cfg, out_channels)[1])
    return seq


def _fold_bn_into(kernel, norm):
    std = (norm.running_var + norm.eps).sqrt()
    return (norm.weight / std).reshape(-1, 1, 1, 1) * kernel, norm.bias - norm.running_mean * norm.weight / std


# --------------------------------------------------------------------------------------
# mmpretrain RepVGG
# --------------------------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/repvgg.py: RepVGGBlock.

    ``branch_3x3(x) + branch_1x1(x) + branch_norm_out`` where ``branch_norm_out`` is a BN of
    the input or the literal ``0`` (no identity when shapes change or ``padding !=
    dilation``), optional SELayer on the sum, activation; ``with_cp`` read in forward.
    ``switch_to_deploy`` folds the branches (the identity as a 3x3 one-hot conv) into
    ``branch_reparam`` — and the deploy forward returns before the SE step, as upstream.
    """

    def __init__(self, in_channels, out_channels, stride=1, padding=1, dilation=1, groups=1,
                 se_cfg=None, with_cp=False, norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU"),
                 deploy=False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.se_cfg, self.with_cp, self.norm_cfg, self.deploy = se_cfg, with_cp, norm_cfg, deploy
        if deploy:
            self.branch_reparam = nn.Conv2d(in_channels, out_channels, 3, stride, padding, dilation, groups,
                                            bias=True)
        else:
            if out_channels == in_channels and stride == 1 and padding == dilation:
                self.branch_norm = build_norm_layer(norm_cfg, in_channels)[1]
            else:
                self.branch_norm = None
            self.branch_3x3 = self.create_conv_bn(kernel_size=3, dilation=dilation, padding=padding)
            self.branch_1x1 = self.create_conv_bn(kernel_size=1)
        self.se_layer = SELayer(out_channels, **se_cfg) if se_cfg is not None else None
        self.act = build_activation_layer(act_cfg)

    def create_conv_bn(self, kernel_size, dilation=1, padding=0):
        return _conv_bn_sequential(self.in_channels, self.out_channels, kernel_size, self.stride, padding,
                                   dilation, self.groups, self.norm_cfg)

    def forward(self, x):
        def inner(inputs):
            if self.deploy:
                return self.branch_reparam(inputs)
            identity = 0 if self.branch_norm is None else self.branch_norm(inputs)
            out = self.branch_3x3(inputs) + self.branch_1x1(inputs) + identity
            if self.se_cfg is not None:
                out = self.se_layer(out)
            return out

        if self.with_cp and x.requires_grad:
            out = torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False)
        else:
            out = inner(x)
        return self.act(out)

    def switch_to_deploy(self):
        if self.deploy:
            return
        assert self.norm_cfg["type"] == "BN"
        weight, bias = self.reparameterize()
        self.branch_reparam = nn.Conv2d(self.in_channels, self.out_channels, 3, self.stride, self.padding,
                                        self.dilation, self.groups, bias=True)
        self.branch_reparam.weight.data = weight
        self.branch_reparam.bias.data = bias
        for param in self.parameters():
            param.detach_()
        delattr(self, "branch_3x3")
        delattr(self, "branch_1x1")
        delattr(self, "branch_norm")
        self.deploy = True

    def reparameterize(self):
        w3, b3 = self._fuse_conv_bn(self.branch_3x3)
        w1, b1 = self._fuse_conv_bn(self.branch_1x1)
        w1 = F.pad(w1, [1, 1, 1, 1], value=0)
        w_id, b_id = 0, 0
        if self.branch_norm:
            w_id, b_id = self._fuse_conv_bn(self._norm_to_conv3x3(self.branch_norm))
        return w3 + w1 + w_id, b3 + b1 + b_id

    def _fuse_conv_bn(self, branch):
        if branch is None:
            return 0, 0
        return _fold_bn_into(branch.conv.weight, branch.norm)

    def _norm_to_conv3x3(self, norm):
        per_group = self.in_channels // self.groups
        kernel = torch.zeros((self.in_channels, per_group, 3, 3), dtype=norm.weight.dtype)
        for i in range(self.in_channels):
            kernel[i, i % per_group, 1, 1] = 1
        tmp = self.create_conv_bn(kernel_size=3)
        tmp.conv.weight.data = kernel.to(norm.weight.device)
        tmp.norm = norm
        return tmp


class MTSPPF(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/repvgg.py: MTSPPF (ConvModule,
    three chained max pools, concat, ConvModule); ``switch_to_deploy`` leaves it alone."""

    def __init__(self, in_channels, out_channels, norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU"),
                 kernel_size=5):
        super().__init__()
        hidden = in_channels // 2
        self.conv1 = ConvModule(in_channels, hidden, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.conv2 = ConvModule(hidden * 4, out_channels, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.maxpool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x):
        x = self.conv1(x)
        y1 = self.maxpool(x)
        y2 = self.maxpool(y1)
        return self.conv2(torch.cat([x, y1, y2, self.maxpool(y2)], 1))


class RepVGG(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/repvgg.py: RepVGG (stem block,
    stages of RepVGGBlocks with a ``group_layer_map``, per-stage dilation, optional MTSPPF,
    tuple of ``out_indices`` outputs; ``switch_to_deploy`` walks ``self.modules()``)."""

    def __init__(self, arch, in_channels=3, base_channels=8, out_indices=(2,), strides=(2, 2, 1),
                 dilations=(1, 1, 2), norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU"), add_ppf=False,
                 deploy=False):
        super().__init__()
        self.arch, self.out_indices, self.deploy = arch, out_indices, deploy
        channels = min(arch.get("stem_channels", 64), int(base_channels * arch["width_factor"][0]))
        self.stem = RepVGGBlock(in_channels, channels, stride=2, se_cfg=arch["se_cfg"], norm_cfg=norm_cfg,
                                act_cfg=act_cfg, deploy=deploy)
        block_index = 1
        self.stages = []
        for i, num_blocks in enumerate(arch["num_blocks"]):
            out_channels = int(base_channels * 2 ** i * arch["width_factor"][i])
            blocks = []
            for j in range(num_blocks):
                groups = (arch["group_layer_map"] or {}).get(block_index, 1)
                blocks.append(RepVGGBlock(channels, out_channels, stride=strides[i] if j == 0 else 1,
                                          padding=dilations[i], dilation=dilations[i], groups=groups,
                                          se_cfg=arch["se_cfg"], norm_cfg=norm_cfg, act_cfg=act_cfg,
                                          deploy=deploy))
                channels = out_channels
                block_index += 1
            name = f"stage_{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stages.append(name)
        self.ppf = MTSPPF(channels, channels, norm_cfg=norm_cfg, act_cfg=act_cfg) if add_ppf else nn.Identity()

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for i, name in enumerate(self.stages):
            x = getattr(self, name)(x)
            if i + 1 == len(self.stages):
                x = self.ppf(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def switch_to_deploy(self):
        for m in self.modules():
            if isinstance(m, RepVGGBlock):
                m.switch_to_deploy()
        self.deploy = True


def build_repvgg_classifier(se=False):
    arch = dict(num_blocks=[1, 2, 2], width_factor=[1, 1, 1], group_layer_map={2: 2, 3: 2, 4: 2},
                se_cfg=dict(ratio=4, divisor=1) if se else None, stem_channels=8)
    backbone = RepVGG(arch, base_channels=8, add_ppf=se)
    return ImageClassifier(backbone, GlobalAveragePooling(), LinearClsHead(10, 32))


# --------------------------------------------------------------------------------------
# mmpretrain MobileOne
# --------------------------------------------------------------------------------------


class MobileOneBlock(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/mobileone.py: MobileOneBlock.

    ``inner_out = 0``; BN identity assigned to it when present; then ``inner_out +=
    branch_scale(x)`` and ``inner_out += branch_conv(x)`` for each of ``num_convs`` conv-BN
    branches (in-place adds onto a BN output, or ``0 + t`` when no identity and no scale);
    SE (or Identity) then activation. ``switch_to_deploy`` -> ``branch_reparam``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, num_convs, stride=1, padding=1, dilation=1,
                 groups=1, se_cfg=None, norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU"), deploy=False):
        super().__init__()
        self.se = SELayer(out_channels, **se_cfg) if se_cfg is not None else nn.Identity()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.num_conv_branches, self.stride, self.padding = num_convs, stride, padding
        self.dilation, self.groups, self.norm_cfg, self.deploy = dilation, groups, norm_cfg, deploy
        if deploy:
            self.branch_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                            groups, bias=True)
        else:
            self.branch_norm = (build_norm_layer(norm_cfg, in_channels)[1]
                                if out_channels == in_channels and stride == 1 else None)
            self.branch_scale = self.create_conv_bn(kernel_size=1) if kernel_size > 1 else None
            self.branch_conv_list = nn.ModuleList(
                self.create_conv_bn(kernel_size=kernel_size, padding=padding, dilation=dilation)
                for _ in range(num_convs))
        self.act = build_activation_layer(act_cfg)

    def create_conv_bn(self, kernel_size, dilation=1, padding=0):
        return _conv_bn_sequential(self.in_channels, self.out_channels, kernel_size, self.stride, padding,
                                   dilation, self.groups, self.norm_cfg)

    def forward(self, x):
        def inner(inputs):
            if self.deploy:
                return self.branch_reparam(inputs)
            inner_out = 0
            if self.branch_norm is not None:
                inner_out = self.branch_norm(inputs)
            if self.branch_scale is not None:
                inner_out += self.branch_scale(inputs)
            for branch in self.branch_conv_list:
                inner_out += branch(inputs)
            return inner_out

        return self.act(self.se(inner(x)))

    def switch_to_deploy(self):
        if self.deploy:
            return
        weight, bias = self.reparameterize()
        self.branch_reparam = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                        self.padding, self.dilation, self.groups, bias=True)
        self.branch_reparam.weight.data = weight
        self.branch_reparam.bias.data = bias
        for param in self.parameters():
            param.detach_()
        delattr(self, "branch_conv_list")
        if hasattr(self, "branch_scale"):
            delattr(self, "branch_scale")
        delattr(self, "branch_norm")
        self.deploy = True

    def reparameterize(self):
        w_conv, b_conv = 0, 0
        for branch in self.branch_conv_list:
            w, b = self._fuse_conv_bn(branch)
            w_conv += w
            b_conv += b
        w_scale, b_scale = 0, 0
        if self.branch_scale is not None:
            w_scale, b_scale = self._fuse_conv_bn(self.branch_scale)
            pad = self.kernel_size // 2
            w_scale = F.pad(w_scale, [pad, pad, pad, pad])
        w_id, b_id = 0, 0
        if self.branch_norm:
            w_id, b_id = self._fuse_conv_bn(self._norm_to_conv(self.branch_norm))
        return w_conv + w_scale + w_id, b_conv + b_scale + b_id

    def _fuse_conv_bn(self, branch):
        if branch is None:
            return 0, 0
        return _fold_bn_into(branch.conv.weight, branch.norm)

    def _norm_to_conv(self, norm):
        per_group = self.in_channels // self.groups
        k = self.kernel_size
        kernel = torch.zeros((self.in_channels, per_group, k, k), dtype=norm.weight.dtype)
        for i in range(self.in_channels):
            kernel[i, i % per_group, k // 2, k // 2] = 1
        tmp = self.create_conv_bn(kernel_size=k)
        tmp.conv.weight.data = kernel.to(norm.weight.device)
        tmp.norm = norm
        return tmp


class MobileOne(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/mobileone.py: MobileOne (stage0 block,
    then per stage depthwise k3 + pointwise k1 block pairs, SE on the last ``num_se_blocks``;
    ``switch_to_deploy`` walks ``self.modules()``)."""

    def __init__(self, arch, in_channels=3, out_indices=(1,), se_cfg=dict(ratio=4), deploy=False):
        super().__init__()
        self.deploy = deploy
        base_channels = [16, 32]
        channels = min(16, int(base_channels[0] * arch["width_factor"][0]))
        self.stage0 = MobileOneBlock(in_channels, channels, stride=2, kernel_size=3, num_convs=1, deploy=deploy)
        self.in_planes = channels
        self.stages = []
        for i, num_blocks in enumerate(arch["num_blocks"]):
            planes = int(base_channels[i] * arch["width_factor"][i])
            blocks = []
            for j in range(num_blocks):
                use_se = j >= num_blocks - arch["num_se_blocks"][i]
                branches = arch["num_conv_branches"][i]
                blocks.append(MobileOneBlock(self.in_planes, self.in_planes, kernel_size=3, num_convs=branches,
                                             stride=2 if j == 0 else 1, padding=1, groups=self.in_planes,
                                             se_cfg=se_cfg if use_se else None, deploy=deploy))
                blocks.append(MobileOneBlock(self.in_planes, planes, kernel_size=1, num_convs=branches, stride=1,
                                             padding=0, se_cfg=se_cfg if use_se else None, deploy=deploy))
                self.in_planes = planes
            name = f"stage{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stages.append(name)
        self.out_indices = list(out_indices)

    def forward(self, x):
        x = self.stage0(x)
        outs = []
        for i, name in enumerate(self.stages):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def switch_to_deploy(self):
        for m in self.modules():
            if isinstance(m, MobileOneBlock):
                m.switch_to_deploy()
        self.deploy = True


def build_mobileone_classifier():
    arch = dict(num_blocks=[1, 2], width_factor=[1.0, 1.0], num_conv_branches=[2, 3], num_se_blocks=[0, 1])
    return ImageClassifier(MobileOne(arch), GlobalAveragePooling(), LinearClsHead(10, 32))


# --------------------------------------------------------------------------------------
# mmpretrain RepLKNet
# --------------------------------------------------------------------------------------


def lk_conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, dilation=1):
    if padding is None:
        padding = kernel_size // 2
    return _conv_bn_sequential(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                               dict(type="BN"), norm_key="bn")


def lk_conv_bn_relu(in_channels, out_channels, kernel_size, stride, padding, groups, dilation=1):
    seq = lk_conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, dilation)
    seq.add_module("nonlinear", nn.ReLU())
    return seq


def lk_fuse_bn(conv, bn):
    std = (bn.running_var + bn.eps).sqrt()
    return conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std


class ReparamLargeKernelConv(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/replknet.py: ReparamLargeKernelConv.

    Depthwise large-kernel conv-BN (``lkb_origin``) plus a small-kernel conv-BN added in place
    (``out += self.small_conv(x)``), branch presence tested with ``hasattr``; ``merge_kernel``
    pads the small kernel to the centre and builds ``lkb_reparam``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, groups, small_kernel,
                 small_kernel_merged=False):
        super().__init__()
        self.kernel_size, self.small_kernel, self.small_kernel_merged = kernel_size, small_kernel, small_kernel_merged
        padding = kernel_size // 2
        if small_kernel_merged:
            self.lkb_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, 1, groups,
                                         bias=True)
        else:
            self.lkb_origin = lk_conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
            if small_kernel is not None:
                assert small_kernel <= kernel_size
                self.small_conv = lk_conv_bn(in_channels, out_channels, small_kernel, stride, small_kernel // 2,
                                             groups)

    def forward(self, inputs):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(inputs)
        out = self.lkb_origin(inputs)
        if hasattr(self, "small_conv"):
            out += self.small_conv(inputs)
        return out

    def get_equivalent_kernel_bias(self):
        kernel, bias = lk_fuse_bn(self.lkb_origin.conv, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            small_k, small_b = lk_fuse_bn(self.small_conv.conv, self.small_conv.bn)
            bias += small_b
            kernel += F.pad(small_k, [(self.kernel_size - self.small_kernel) // 2] * 4)
        return kernel, bias

    def merge_kernel(self):
        if self.small_kernel_merged:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        origin = self.lkb_origin.conv
        self.lkb_reparam = nn.Conv2d(origin.in_channels, origin.out_channels, origin.kernel_size, origin.stride,
                                     origin.padding, origin.dilation, origin.groups, bias=True)
        self.lkb_reparam.weight.data = kernel
        self.lkb_reparam.bias.data = bias
        self.__delattr__("lkb_origin")
        if hasattr(self, "small_conv"):
            self.__delattr__("small_conv")
        self.small_kernel_merged = True


class RepLKConvFFN(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/replknet.py: ConvFFN (pre-BN ->
    1x1 conv-BN -> GELU -> 1x1 conv-BN, residual): the leading BN feeds a 1x1 conv."""

    def __init__(self, in_channels, internal_channels, out_channels):
        super().__init__()
        self.drop_path = nn.Identity()
        self.preffn_bn = build_norm_layer(dict(type="BN"), in_channels)[1]
        self.pw1 = lk_conv_bn(in_channels, internal_channels, 1, 1, 0, 1)
        self.pw2 = lk_conv_bn(internal_channels, out_channels, 1, 1, 0, 1)
        self.nonlinear = build_activation_layer(dict(type="GELU"))

    def forward(self, x):
        out = self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))
        return x + self.drop_path(out)


class RepLKBlock(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/replknet.py: RepLKBlock (pre-BN ->
    1x1 conv-BN-ReLU -> ReparamLargeKernelConv -> ReLU -> 1x1 conv-BN, residual)."""

    def __init__(self, in_channels, dw_channels, block_lk_size, small_kernel):
        super().__init__()
        self.pw1 = lk_conv_bn_relu(in_channels, dw_channels, 1, 1, 0, groups=1)
        self.pw2 = lk_conv_bn(dw_channels, in_channels, 1, 1, 0, groups=1)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, dw_channels, block_lk_size, 1, dw_channels,
                                                   small_kernel)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = build_norm_layer(dict(type="BN"), in_channels)[1]
        self.drop_path = nn.Identity()

    def forward(self, x):
        out = self.prelkb_bn(x)
        out = self.pw1(out)
        out = self.large_kernel(out)
        out = self.lk_nonlinear(out)
        out = self.pw2(out)
        return x + self.drop_path(out)


class RepLKNetStage(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/replknet.py: RepLKNetStage (RepLK
    block + ConvFFN pairs; ``norm`` BN when the stage is an output, else Identity)."""

    def __init__(self, channels, num_blocks, stage_lk_size, small_kernel, dw_ratio=1, ffn_ratio=2,
                 norm_intermediate_features=False):
        super().__init__()
        blocks = []
        for _ in range(num_blocks):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel))
            blocks.append(RepLKConvFFN(channels, int(channels * ffn_ratio), channels))
        self.blocks = nn.ModuleList(blocks)
        self.norm = build_norm_layer(dict(type="BN"), channels)[1] if norm_intermediate_features else nn.Identity()

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class RepLKNet(nn.Module):
    """open-mmlab/mmpretrain mmpretrain/models/backbones/replknet.py: RepLKNet (4-layer
    conv-BN-ReLU stem, stages, 1x1 + depthwise-3x3 transitions, output BN on out stages;
    ``switch_to_deploy`` calls ``merge_kernel`` wherever it exists — every other BN stays)."""

    def __init__(self, channels=(16, 32), layers=(1, 1), large_kernel_sizes=(7, 5), small_kernel=3,
                 out_indices=(1,)):
        super().__init__()
        self.out_indices = out_indices
        self.num_stages = len(layers)
        width = channels[0]
        self.stem = nn.ModuleList([
            lk_conv_bn_relu(3, width, 3, 2, 1, groups=1),
            lk_conv_bn_relu(width, width, 3, 1, 1, groups=width),
            lk_conv_bn_relu(width, width, 1, 1, 0, groups=1),
            lk_conv_bn_relu(width, width, 3, 2, 1, groups=width),
        ])
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i in range(self.num_stages):
            self.stages.append(RepLKNetStage(channels[i], layers[i], large_kernel_sizes[i], small_kernel,
                                             norm_intermediate_features=i in out_indices))
            if i < self.num_stages - 1:
                self.transitions.append(nn.Sequential(
                    lk_conv_bn_relu(channels[i], channels[i + 1], 1, 1, 0, groups=1),
                    lk_conv_bn_relu(channels[i + 1], channels[i + 1], 3, stride=2, padding=1,
                                    groups=channels[i + 1])))

    def forward(self, x):
        x = self.stem[0](x)
        for layer in self.stem[1:]:
            x = layer(x)
        outs = []
        for i in range(self.num_stages):
            x = self.stages[i](x)
            if i in self.out_indices:
                outs.append(self.stages[i].norm(x))
            if i < self.num_stages - 1:
                x = self.transitions[i](x)
        return tuple(outs)

    def switch_to_deploy(self):
        for m in self.modules():
            if hasattr(m, "merge_kernel"):
                m.merge_kernel()


def build_replknet_classifier():
    return ImageClassifier(RepLKNet(), GlobalAveragePooling(), LinearClsHead(10, 32))


# --------------------------------------------------------------------------------------
# mmcv ConvModule models
# --------------------------------------------------------------------------------------

_BN = dict(type="BN")


class ConvModuleNet(nn.Module):
    """A small mmdet/mmseg-style stack of open-mmlab/mmcv ConvModules (stem, a residual pair
    whose second module has no activation, a depthwise module, an ``('act', 'conv', 'norm')``
    module, a conv with an explicit bias before its BN, a norm-free module), GAP + Linear."""

    def __init__(self, module=ConvModule, **mode):
        super().__init__()
        self.stem = module(3, 16, 3, stride=2, padding=1, norm_cfg=_BN, **mode)
        self.res1 = module(16, 16, 3, padding=1, norm_cfg=_BN, **mode)
        self.res2 = module(16, 16, 3, padding=1, norm_cfg=_BN, act_cfg=None, **mode)
        self.dw = module(16, 16, 3, stride=2, padding=1, groups=16, norm_cfg=_BN, **mode)
        self.pre_act = module(16, 32, 1, norm_cfg=_BN, order=("act", "conv", "norm"), **mode)
        self.biased = module(32, 32, 3, padding=1, bias=True, norm_cfg=_BN, **mode)
        self.plain = module(32, 32, 1, norm_cfg=None)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res2(self.res1(x)))
        x = self.plain(self.biased(self.pre_act(self.dw(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def deploy_efficient_conv_modules(model):
    """mmcv's deploy path for ConvModules built with ``efficient_conv_bn_eval``: turn the mode
    off, then ``fuse_conv_bn``. Without the first step the fused model only works while the
    fresh ``nn.Identity`` that replaced the norm is in training mode; after the usual
    ``.eval()`` the efficient forward is handed that Identity as ``bn`` and raises."""
    for m in model.modules():
        if isinstance(m, ConvModule):
            m.turn_on_efficient_conv_bn_eval(False)
    return fuse_conv_bn(model)


def deploy_fast_conv_modules(model):
    """mmcv@36003b76 ConvModules: clear ``fast_conv_bn_eval_forward`` (the attribute its
    ``forward`` tests) and restore the conv's own forward, then ``fuse_conv_bn``. Without the
    first step the partial (bound to the *old* BN) stays on the fused conv: correct only while
    the replacing ``nn.Identity`` is in training mode, the BN applied twice after ``.eval()``."""
    for m in model.modules():
        if isinstance(m, ConvModuleFastEval):
            m.fast_conv_bn_eval_forward = None
            m.conv.forward = m.original_conv_forward
    return fuse_conv_bn(model)


def build_fast_eval_net():
    model = ConvModuleNet(module=ConvModuleFastEval)
    for name in ("stem", "res1", "dw", "biased"):  # on some convs only
        block = getattr(model, name)
        block.fast_conv_bn_eval_forward = partial(efficient_conv_bn_eval_forward, block.norm, block.conv)
    return model


class NormFirstNet(nn.Module):
    """open-mmlab/mmcv ConvModules with the norm *before* the conv (``order=('norm', 'conv',
    'act')`` as in mmcv's docs, and ``('norm', 'act', 'conv')``), so each BN normalises the
    conv's input: before a zero-padded 3x3 it cannot fold (border), before a 1x1 it can."""

    def __init__(self):
        super().__init__()
        self.stem = ConvModule(3, 16, 3, stride=2, padding=1, norm_cfg=_BN)
        self.norm_conv_act = ConvModule(16, 16, 3, padding=1, norm_cfg=_BN, order=("norm", "conv", "act"))
        self.norm_act_conv = ConvModule(16, 16, 3, padding=1, norm_cfg=_BN, order=("norm", "act", "conv"))
        self.norm_pointwise = ConvModule(16, 16, 1, norm_cfg=_BN, order=("norm", "conv", "act"))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.norm_pointwise(self.norm_act_conv(self.norm_conv_act(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class PlainConvBN(nn.Module):
    """A user's conv -> BN -> ReLU block (plain torch modules) for the mmengine patch."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MMEngineNet(nn.Module):
    """A plain torch model after open-mmlab/mmengine
    mmengine/model/efficient_conv_bn_eval.py: turn_on_efficient_conv_bn_eval(model,
    'backbone') — ``backbone.forward`` is now the bound ``forward`` of a traced copy in which
    every single-user conv->BN pair is one ``efficient_conv_bn_eval_control(bn, conv, x)``
    call on ``get_attr`` nodes. The BN modules are still registered and never called as
    modules; the conv whose output has two users keeps its BN."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            PlainConvBN(3, 16, 3, 2), PlainConvBN(16, 16, 3, groups=16), PlainConvBN(16, 32, 1),
            _TwoUserConvBN(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))


class _TwoUserConvBN(nn.Module):
    """conv output read by the BN and by the residual: mmengine's transform skips it."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y) + y)


def build_mmengine_net():
    model = MMEngineNet()
    turn_on_efficient_conv_bn_eval(model, "backbone")
    return model


# --------------------------------------------------------------------------------------
# entries
# --------------------------------------------------------------------------------------

IDIOMS = [
    Idiom(
        name="mmpretrain.repvgg",
        library="mmpretrain",
        source="open-mmlab/mmpretrain mmpretrain/models/backbones/repvgg.py: RepVGG, RepVGGBlock; "
               "mmpretrain/models/necks/gap.py: GlobalAveragePooling; mmpretrain/models/heads/linear_head.py: "
               "LinearClsHead",
        build=lambda: build_repvgg_classifier(se=False),
        reparameterize=convert_classifier_to_deploy,
        notes="3x3 + 1x1 conv-BN branches + BN identity or a literal 0; grouped blocks and a dilated "
              "stage (padding == dilation == 2 keeps the identity); backbone returns a tuple the GAP "
              "neck maps over before the head picks feats[-1].",
    ),
    Idiom(
        name="mmpretrain.repvgg_se_ppf",
        library="mmpretrain",
        source="open-mmlab/mmpretrain mmpretrain/models/backbones/repvgg.py: RepVGGBlock, MTSPPF; "
               "mmpretrain/models/utils/se_layer.py: SELayer",
        build=lambda: build_repvgg_classifier(se=True),
        reparameterize=None,
        must_remain={"mul": 6},
        notes="D2se-style: SELayer (x * sigmoid(conv(conv(gap(x))))) sits between the branch sum and "
              "the ReLU; the 6 SE multiplies are data-dependent and must stay. No baseline: the "
              "library's deploy forward returns branch_reparam(x) before the SE step, so "
              "switch_to_deploy silently drops every SE layer.",
    ),
    Idiom(
        name="mmpretrain.mobileone",
        library="mmpretrain",
        source="open-mmlab/mmpretrain mmpretrain/models/backbones/mobileone.py: MobileOne, MobileOneBlock",
        build=build_mobileone_classifier,
        reparameterize=convert_classifier_to_deploy,
        must_remain={"mul": 2},
        notes="inner_out = 0, then BN identity assigned, then `inner_out += branch(x)` for the 1x1 scale "
              "and 2-3 conv branches (traced as `0 + t` or chained adds on a BN output); depthwise k3 / "
              "pointwise k1 pairs; SE on the last pair (2 multiplies must stay).",
    ),
    Idiom(
        name="mmpretrain.replknet",
        library="mmpretrain",
        source="open-mmlab/mmpretrain mmpretrain/models/backbones/replknet.py: RepLKNet, RepLKBlock, "
               "ReparamLargeKernelConv, ConvFFN",
        build=build_replknet_classifier,
        reparameterize=convert_classifier_to_deploy,
        notes="depthwise 7x7/5x5 conv-BN + 3x3 conv-BN added in place; pre-BNs feeding 1x1 convs "
              "(prelkb_bn, preffn_bn) and an output BN before GAP + Linear; the library's merge_kernel "
              "only merges the large/small pair and leaves every other BN.",
    ),
    Idiom(
        name="mmcv.conv_module_efficient_conv_bn_eval",
        library="mmcv",
        source="open-mmlab/mmcv mmcv/cnn/bricks/conv_module.py: ConvModule, efficient_conv_bn_eval_forward; "
               "mmcv/cnn/utils/fuse_conv_bn.py: fuse_conv_bn",
        build=lambda: ConvModuleNet(efficient_conv_bn_eval=True),
        reparameterize=deploy_efficient_conv_modules,
        notes="in eval, ConvModule.forward sets conv.forward = partial(efficient_fn, norm, conv), calls "
              "it, `del conv.forward`, skips the norm: symbolic_trace keeps only `call_module conv` (the "
              "BN vanishes from the graph, the traced module is wrong); export sees the on-the-fly "
              "weight/bias arithmetic and one conv2d. Baseline turns the mode off before "
              "fuse_conv_bn (else the model raises after .eval()).",
    ),
    Idiom(
        name="mmcv.conv_module_fast_conv_bn_eval_persistent",
        library="mmcv",
        source="open-mmlab/mmcv mmcv/cnn/bricks/conv_module.py@36003b761762: ConvModule "
               "(fast_conv_bn_eval), fast_conv_bn_eval_forward",
        build=build_fast_eval_net,
        reparameterize=deploy_fast_conv_modules,
        notes="on 4 of 6 ConvModules conv.forward is left = partial(fn, bn, conv) after the first eval "
              "call and the registered BN is never called; the graph shows a plain conv that actually "
              "computes conv+BN: rebuilding it from conv.weight (or refolding the idle BN) is off.",
    ),
    Idiom(
        name="mmcv.conv_module_norm_first",
        library="mmcv",
        source="open-mmlab/mmcv mmcv/cnn/bricks/conv_module.py: ConvModule (order=('norm', 'conv', 'act'), "
               "('norm', 'act', 'conv')); mmcv/cnn/utils/fuse_conv_bn.py: fuse_conv_bn",
        build=NormFirstNet,
        reparameterize=None,
        must_remain={"batch_norm": 2},
        notes="BN on the conv's *input*: before a zero-padded 3x3 (directly, or through ReLU) it must "
              "not fold; before a 1x1 it may. No baseline: mmcv's fuse_conv_bn walks registration "
              "order (conv is registered first) and folds each such BN into the conv's output side "
              "— silently wrong.",
    ),
    Idiom(
        name="mmengine.efficient_conv_bn_eval",
        library="mmengine",
        source="open-mmlab/mmengine mmengine/model/efficient_conv_bn_eval.py: turn_on_efficient_conv_bn_eval, "
               "efficient_conv_bn_eval_graph_transform, efficient_conv_bn_eval_control",
        build=build_mmengine_net,
        reparameterize=None,
        traceable=False,
        notes="backbone.forward = fx_model.forward (instance attribute, bound to a GraphModule sharing "
              "the modules): conv-BN pairs become efficient_conv_bn_eval_control(bn, conv, x) calls, so "
              "export sees functional weight arithmetic + conv2d and the BN modules are idle; "
              "symbolic_trace fails on the patched forward's len(conv.weight.shape). No baseline: mmengine has no deploy step and fuse_conv_bn would apply each BN twice.",
    ),
]
