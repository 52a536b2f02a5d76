"""Capture and graph facts (reparam_fx.fx.capture / facts): a module means its forward,
metadata reads are not uses, ranks are proven never assumed, parameter-only subgraphs are
constants, untraceable blocks cost only themselves, and the report tells the truth.

Every positive test checks the fold happened (op counts) and float64 equality with
randomised BatchNorm statistics; every rule has a negative test."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import reparam_fx
from fx_checks import (RTOL, assert_ops, assert_reason, fuse_exactly, fuse_refused, randomized,
                       snapshot, assert_state_unchanged)
from rules.rule_table import ConvBN, image


# ---- a module means its forward -------------------------------------------------------

def conv_bn_in_one_call(bn, conv, x):
    """mmcv-style "efficient conv-BN eval": conv+BN computed by the conv alone, with the
    weight and bias folded on the fly from the conv's and the BN's tensors."""
    scale = torch.rsqrt(bn.running_var + bn.eps) * bn.weight
    weight = conv.weight * scale.reshape([-1] + [1] * (len(conv.weight.shape) - 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_var)
    bias = bn.bias + scale * (bias - bn.running_mean)
    return conv._conv_forward(x, weight, bias)


class PatchedConvBN(nn.Module):
    """``conv.forward = partial(fn, bn, conv)`` assigned once; the BN module is no longer
    called, and a 1x1 conv follows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.proj = nn.Conv2d(6, 6, 1)
        self.conv.forward = functools.partial(conv_bn_in_one_call, self.bn, self.conv)

    def forward(self, x):
        return self.proj(self.conv(x))


def test_replaced_instance_forward_is_traced_through():
    model = randomized(PatchedConvBN()).double()
    fused = fuse_exactly(model, image(), ops={"conv": 1, "batch_norm": 0, "mul": 0},
                         already_randomized=True)
    assert fused.fusion_report.pattern_counts() == {"conv composition": 1}


def test_replaced_forward_in_a_default_fx_trace_is_not_read_as_a_conv():
    model = randomized(PatchedConvBN()).double()
    traced = torch.fx.symbolic_trace(model)  # the default tracer records call_module conv
    fused = reparam_fx.fuse(traced)
    assert_ops(fused, {"conv": 2})
    assert_reason(fused, "forward was replaced on the instance")
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)


class ConvWithFusedForward(nn.Module):
    """ultralytics/YOLOv6 style: after ``fuse``, ``m.forward = m.forward_fuse``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


def test_bound_method_forward_is_what_runs():
    block = randomized(ConvWithFusedForward()).double()
    block.forward = block.forward_fuse  # the BN is skipped from now on
    model = nn.Sequential(block, ConvBN(4, 4, 3)).double().eval()
    randomized(model[1])
    fused = fuse_exactly(model, image(), ops={"conv": 2, "batch_norm": 0},
                         already_randomized=True)
    assert isinstance(model[0].bn, nn.BatchNorm2d)  # still there, never called


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = ConvBN(4, 4, 3)

    def forward(self, x):
        return self.inner(x) + x


def test_module_with_a_hook_is_kept_whole_and_fused_inside():
    model = randomized(nn.Sequential(Block(), ConvBN(4, 4, 1))).double()
    calls = []
    model[0].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    fused = reparam_fx.fuse(model)
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)
    assert calls, "the hook ran on the fused model"
    assert any("hooks" in leaf.reason for leaf in fused.fusion_report.leaves)
    assert_ops(fused, {"batch_norm": 0, "conv": 2, "add": 1})  # the add is inside the leaf


def test_pre_hook_on_a_conv_blocks_its_fold():
    model = randomized(ConvBN(4, 4, 3)).double()
    model.conv.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    fused = fuse_refused(model, image(), unchanged=("batch_norm",), reason="hooks",
                         already_randomized=True)
    assert_ops(fused, {"conv": 1})


def test_compiled_submodule_is_fused_as_its_original():
    inner = randomized(ConvBN(4, 4, 3)).double()
    model = nn.Sequential(torch.compile(inner), nn.ReLU()).eval()
    fused = reparam_fx.fuse(model)  # never called: nothing is compiled
    assert_ops(fused, {"conv": 1, "batch_norm": 0})
    x = image().double()
    torch.testing.assert_close(fused(x), torch.relu(inner(x)), rtol=0, atol=1e-12)


def test_scripted_submodule_is_kept_whole():
    model = nn.Sequential(torch.jit.script(randomized(ConvBN(4, 4, 3)).double()),
                          randomized(ConvBN(4, 4, 1)).double()).eval()
    fused = reparam_fx.fuse(model)
    assert any("TorchScript" in leaf.reason for leaf in fused.fusion_report.leaves)
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 1}
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)


# ---- one bad block loses one block ----------------------------------------------------

class Untraceable(nn.Module):
    """Shape control flow, as in MobileViT / TinyViT blocks."""

    def __init__(self):
        super().__init__()
        self.even = ConvBN(4, 4, 3)
        self.odd = ConvBN(4, 4, 1)

    def forward(self, x):
        if x.shape[-1] % 2 == 0:
            return self.even(x)
        return self.odd(x)


class WithNeighbours(nn.Module):
    def __init__(self):
        super().__init__()
        self.before = ConvBN(4, 4, 3)
        self.block = Untraceable()
        self.after = ConvBN(4, 4, 3)

    def forward(self, x):
        return self.after(self.block(self.before(x)))


def test_untraceable_block_is_a_leaf_and_its_neighbours_fuse():
    model = randomized(WithNeighbours()).double()
    fused = reparam_fx.fuse(model)
    assert isinstance(fused, torch.fx.GraphModule)
    (leaf,) = fused.fusion_report.leaves
    assert leaf.module == "block" and "does not trace" in leaf.reason
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 4}  # 2 around, 2 inside
    assert_ops(fused, {"batch_norm": 0, "conv": 4})
    for size in (8, 9):  # both branches of the untraceable block
        reparam_fx.verify(model, fused, (image(size=size).double(),), rtol=RTOL)
    assert isinstance(model.block.even.bn, nn.BatchNorm2d)


class ReadsChildAttributes(nn.Module):
    """An untraceable parent that reads a child's weight: that child must stay itself."""

    def __init__(self):
        super().__init__()
        self.conv_bn = ConvBN(4, 4, 3)
        self.other = ConvBN(4, 4, 3)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * self.conv_bn.conv.weight.mean()
        return self.other(self.conv_bn(x))


def test_child_read_as_an_object_is_left_as_it_is():
    model = randomized(ReadsChildAttributes()).double()
    fused = reparam_fx.fuse(model)
    assert isinstance(fused.conv_bn, ConvBN) and isinstance(fused.other, torch.fx.GraphModule)
    assert any("reads self.conv_bn.conv, which is no plain attribute" in leaf.reason
               for leaf in fused.fusion_report.leaves)
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)


class CachesInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConvBN(4, 4, 3)
        self.cache = {}

    def forward(self, x):
        if str(x.device) not in self.cache:
            self.cache[str(x.device)] = torch.ones(1)
        return self.block(x)


def test_tracing_leaves_no_proxy_in_the_callers_model():
    model = randomized(CachesInForward()).double()
    reparam_fx.fuse(model)
    assert model.cache == {}


# ---- metadata reads are not uses ------------------------------------------------------

class ShapeReads(nn.Module):
    """timm-style: ``B, C, H, W = x.shape`` on a BN output, an ndim assert on the conv
    output, ``reshape_as``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "4-D")
        y = self.bn(y)
        B, C, H, W = y.shape
        return y.flatten(2).transpose(1, 2).reshape(B, H * W, C).reshape_as(y.permute(0, 2, 3, 1))


def test_metadata_reads_do_not_stop_a_fold():
    fused = fuse_exactly(ShapeReads(), image(), ops={"conv": 1, "batch_norm": 0},
                         patterns={"conv+bn": 1})
    assert not fused.fusion_report.skipped


class ShapeBeforeAConvThatChangesIt(nn.Module):
    """The size read on ``y`` must still be ``y``'s: the 1x1 conv after it changes the
    channel count, so it may not compose into ``y``'s conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        channels = y.shape[1]
        return self.pointwise(y).repeat(1, channels, 1, 1)


def test_a_size_read_keeps_the_op_that_changes_the_size():
    fused = fuse_refused(ShapeBeforeAConvThatChangesIt(), image(), unchanged=("conv",),
                         reason="sizes")
    assert fused.fusion_report.fused == []


# ---- ranks are proven ----------------------------------------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass calling F.batch_norm (no assert: the class is the proof)."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                   self.bias, False, 0.0, self.eps))


class ScaleAfterConv(nn.Module):
    """``x * w.view(1, C, 1, 1)`` on a conv output, then a BatchNorm2d subclass: folds only
    if the conv output is 4-D. The BatchNorm's class proves its own input 4-D, which is the
    product, not the conv output: ``(C, H, W) * (1, C, 1, 1)`` is 4-D too."""

    def __init__(self, proof: str):
        super().__init__()
        self.proof = proof
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.weight = nn.Parameter(torch.rand(4) + 0.5)
        self.bn = BatchNormAct2d(4)
        self.bn_in = BatchNormAct2d(4) if proof == "bn before" else nn.Identity()

    def forward(self, x):
        y = self.conv(self.bn_in(x))
        if self.proof == "assert":
            torch._assert(y.dim() == 4, "batched input expected")
        return self.bn(y * self.weight.view(1, 4, 1, 1))


def test_rank_four_scale_needs_a_proof():
    # unbatched, the conv gives (C, H, W) and the product (1, C, H, W): not one conv
    fuse_refused(ScaleAfterConv("none"), image(), unchanged=("mul", "batch_norm"),
                 reason="higher rank")
    # y.dim() == 4; a BatchNorm2d before the conv (its ReLU keeps it there)
    for proof, batchnorms_left in (("assert", 0), ("bn before", 1)):
        fuse_exactly(ScaleAfterConv(proof), image(),
                     ops={"conv": 1, "mul": 0, "batch_norm": batchnorms_left})
    fuse_exactly(ScaleAfterConv("none"), image(), ops={"conv": 1, "mul": 0, "batch_norm": 0},
                 pass_inputs=True)


# ---- constants computed in forward ----------------------------------------------------

class StandardizedConv(nn.Conv2d):
    """Weight standardisation through F.batch_norm(training=True) on the weight."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class IdentityPlusConv1x1(nn.Conv2d):
    """DiverseBranchBlock style: ``weight + identity`` computed in forward."""

    def __init__(self, channels):
        super().__init__(channels, channels, 1, bias=False)
        self.id_tensor = torch.eye(channels).reshape(channels, channels, 1, 1)

    def forward(self, x):
        return F.conv2d(x, self.weight + self.id_tensor.to(self.weight.device))


@pytest.mark.parametrize("conv", [lambda: StandardizedConv(4, 4, 3, padding=1),
                                  lambda: IdentityPlusConv1x1(4)], ids=["std", "identity"])
def test_weights_computed_from_parameters_are_constants(conv):
    model = nn.Sequential(conv(), nn.BatchNorm2d(4))
    fused = fuse_exactly(model, image(), ops={"conv": 1, "batch_norm": 0, "add": 0})
    assert not [n for n in fused.graph.nodes if n.target is F.batch_norm]


def test_a_lone_conv_with_computed_weights_gets_them_precomputed():
    fused = fuse_exactly(nn.Sequential(StandardizedConv(4, 4, 3, padding=1)), image(),
                         ops={"conv": 1, "batch_norm": 0}, patterns={"computed weights": 1})
    assert [type(m) for m in fused.modules()][1:] == [nn.Conv2d]


class RunningStatsUpdatedOnWeights(nn.Conv2d):
    """F.batch_norm(training=True) WITH running statistics updates them: not a constant."""

    def __init__(self):
        super().__init__(4, 4, 1)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, 4, -1), self.mean, self.var,
                              training=True).reshape_as(self.weight)
        return F.conv2d(x, weight)


def test_a_stateful_op_on_weights_is_not_a_constant():
    model = nn.Sequential(RunningStatsUpdatedOnWeights(), nn.BatchNorm2d(4)).double().eval()
    randomized(model)
    before = snapshot(model)
    fused = reparam_fx.fuse(model)
    assert_state_unchanged(before, model)  # the op was not evaluated
    assert_ops(fused, {"batch_norm": 2})


# ---- the report tells the truth -------------------------------------------------------

class NothingToFold(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = BatchNormAct2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.bn(x))


def test_parameter_totals_when_nothing_fuses():
    model = randomized(NothingToFold()).double()
    fused = reparam_fx.fuse(model)
    report = fused.fusion_report
    assert report.fused == [] and report.params_before == report.params_after == 8
    assert reparam_fx.parameter_count(fused) == reparam_fx.parameter_count(model) == 8
    assert report.nodes_before == report.nodes_after


def test_training_mode_is_a_clear_error():
    with pytest.raises(reparam_fx.FusionError, match="eval"):
        reparam_fx.fuse(ConvBN(4, 4, 3).train())
    with pytest.raises(reparam_fx.FusionError, match="capture"):
        reparam_fx.fuse(ConvBN(4, 4, 3).eval(), capture="jit")
    with pytest.raises(reparam_fx.FusionError, match="example_inputs"):
        reparam_fx.fuse(ConvBN(4, 4, 3).eval(), capture="export")


class CustomLeafTracer(torch.fx.Tracer):
    """A user's tracer that keeps its own blocks as leaves (as timm's FX helpers do)."""

    def is_leaf_module(self, module, name):
        return isinstance(module, ConvBN) or super().is_leaf_module(module, name)


def test_leaves_of_a_given_graph_module_are_fused_inside():
    model = randomized(nn.Sequential(ConvBN(4, 4, 3), nn.ReLU(), ConvBN(4, 4, 1))).double()
    traced = torch.fx.GraphModule(model, CustomLeafTracer().trace(model))
    fused = reparam_fx.fuse(traced)
    assert_ops(fused, {"conv": 2, "batch_norm": 0})
    assert {leaf.module for leaf in fused.fusion_report.leaves} == {"0", "2"}
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)
    assert isinstance(traced.get_submodule("0").bn, nn.BatchNorm2d)  # the input untouched


def test_sym_size_reads_in_a_dynamic_export_do_not_stop_a_fold():
    model = randomized(ShapeReads()).double()
    x = image().double()
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert any("sym_size" in str(n.target) for n in program.graph.nodes)
    fused = reparam_fx.fuse(program)
    assert_ops(fused, {"conv": 1, "batch_norm": 0})
    for size in (2, 5):
        reparam_fx.verify(model, fused, (image(batch=size).double(),), rtol=RTOL)


def test_a_hooked_model_keeps_its_hooks_and_fuses_inside():
    model = randomized(WithNeighbours()).double()
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(type(module).__name__))
    fused = reparam_fx.fuse(model)
    assert type(fused) is WithNeighbours and fused is not model
    fused(image().double())
    assert seen == ["WithNeighbours"]  # the copy's hook ran, on the copy
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 4}
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)


# ---- found in review: writes, randomness and calls the engine must respect ------------

class MaskBuiltInForward(nn.Module):
    """PixelCNN-style mask made in forward with item assignment: the weight read by the conv
    is the one after the write."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if self.form == "setitem":
            mask = torch.ones_like(self.w)
            mask[:, :, 2:, :] = 0
            weight = self.w * mask
        else:
            weight = self.w.clone()
            weight.mul_(2.0)
        return self.bn(F.conv2d(x, weight, padding=1))


@pytest.mark.parametrize("form", ["setitem", "method"])
def test_a_weight_written_in_place_in_forward_is_not_taken_before_the_write(form):
    model = randomized(MaskBuiltInForward(form)).double()
    fused = reparam_fx.fuse(model, (image().double(),))
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)


class InPlaceOnWeights(nn.Module):
    def forward(self, x):
        return F.conv2d(x, F.relu(self.w, inplace=True), padding=1)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))


def test_an_in_place_op_on_parameters_is_never_evaluated():
    model = InPlaceOnWeights().double().eval()
    before = snapshot(model)
    reparam_fx.fuse(model)
    assert_state_unchanged(before, model)


class GumbelGate(nn.Module):
    """A random gate over two branches: it must stay random, not be folded once."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.alpha = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        gate = F.gumbel_softmax(self.alpha, hard=True)
        return self.a(x) * gate[0] + self.b(x) * gate[1]


def test_random_ops_are_not_constants():
    model = GumbelGate().double().eval()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.op_counts(fused)["conv"] == 2


class WritesWhenItCannotTrace(nn.Module):
    """Fails to trace (Python control flow on a parameter), then would clamp its own
    parameter during the retry with real parameters: the retry must stop, not write."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))
        self.conv = ConvBN(4, 4, 3)

    def forward(self, x):
        if self.scale > 1:
            self.scale.data = self.scale.data.clamp(max=1.0)
        return self.conv(x) * self.scale


class NoisyWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x):
        if self.w.sum() > -1e9:  # does not trace: retried with real parameters
            return F.conv2d(x, self.w + 0.1 * torch.randn_like(self.w), padding=1)
        return x


def test_the_retry_with_real_parameters_neither_writes_nor_freezes_noise():
    model = nn.Sequential(WritesWhenItCannotTrace(), NoisyWeights()).double().eval()
    reparam_fx.fuse(model)
    assert model[0].scale.item() == 3.0
    fused = reparam_fx.fuse(model)
    x = image().double()
    assert not torch.equal(fused(x), fused(x))  # still noisy


class OptionalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConvBN(4, 4, 3)

    def forward(self, x, scale=None):
        y = self.block(x)
        return y if scale is None else y * scale


class ReadsThroughAProperty(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = OptionalScale()
        self.other = ConvBN(4, 4, 1)

    @property
    def gain(self):
        return self.other.bn.weight.mean()

    def forward(self, x):
        if x.shape[-1] > 2:  # untraceable: children fused on their own
            x = x * self.gain.detach()
        head = self._head
        return head(self.inner(x))

    def _head(self, y):
        return y + self.other.bn.running_mean.view(1, -1, 1, 1)


def test_children_read_through_properties_or_called_without_optional_args():
    model = randomized(ReadsThroughAProperty()).double()
    fused = reparam_fx.fuse(model)
    assert isinstance(fused.other, ConvBN)  # read as an object (property, bound method)
    assert isinstance(fused.inner, torch.fx.GraphModule)  # traced with scale=None
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)


# ---- a leaf's children read for plain attributes ---------------------------------------
# (an untraceable block -- shape control flow, as EfficientViT's window attention -- that
# reads an int, a tuple, a flag or a string of a child still gets that child fused)

class AttentionUnit(nn.Module):
    """A child with hyperparameters (as an attention block holds its window and heads)."""

    fused_attn = False  # a class-level flag

    def __init__(self, channels=4, resolution=7):
        super().__init__()
        self.proj = ConvBN(channels, channels, 3)
        self.resolution = resolution
        self.num_heads = 2
        self.window = (4, (2, 2))
        self.mode = "window"
        self.scale = None
        self.calls = 0  # state: written in forward

    @property
    def out_channels(self):
        return self.proj.conv.out_channels

    def describe(self):
        return self.mode

    def forward(self, x):
        return torch.relu(self.proj(x))


class CountingUnit(AttentionUnit):
    def forward(self, x):
        self.calls = self.calls + 1
        return super().forward(x)


def _name():
    return "resolution"


class WindowBlock(nn.Module):
    def __init__(self, read: str):
        super().__init__()
        self.attn = AttentionUnit()
        self.read = read

    def forward(self, x):
        B, C, H, W = x.shape
        if self.read == "int":
            ws = self.attn.resolution
        elif self.read == "nested tuple":
            ws = self.attn.window[1][0] + 5
        elif self.read == "str":
            ws = 7 if self.attn.mode == "window" else 0
        elif self.read == "None":
            ws = 7 if self.attn.scale is None else 0
        elif self.read == "flag":
            ws = 0 if self.attn.training else 7
        elif self.read == "class flag":
            ws = 0 if self.attn.fused_attn else 7
        elif self.read == "literal getattr":
            ws = getattr(self.attn, "resolution")
        else:  # "forward": called through its forward, and its head count read
            ws = self.attn.num_heads + 5
            if H <= ws:
                return self.attn.forward(x)
            return self.attn.forward(x) * 2
        if H <= ws and W <= ws:  # shape control flow: the block is a leaf
            return self.attn(x)
        return self.attn(x[:, :, :ws, :ws]) * 2


@pytest.mark.parametrize("read", ["int", "nested tuple", "str", "None", "flag", "class flag",
                                  "literal getattr", "forward"])
def test_a_child_read_for_plain_attributes_is_fused(read):
    import copy
    model = randomized(nn.Sequential(ConvBN(4, 4, 1), WindowBlock(read))).double()
    fused = reparam_fx.fuse(model)
    assert any(leaf.module == "1" and "does not trace" in leaf.reason
               for leaf in fused.fusion_report.leaves)
    block = fused.get_submodule("1")
    assert isinstance(block.attn, torch.fx.GraphModule), fused.fusion_report.leaves
    assert_ops(fused, {"batch_norm": 0, "conv": 2})
    for size in (6, 9):  # both branches, and a deep copy (GraphModule copies rebuild)
        x = image(size=size).double()
        assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
        assert reparam_fx.verify(model, copy.deepcopy(fused), (x,), rtol=RTOL) <= RTOL
    original = model[1].attn
    assert block.attn.resolution == original.resolution and block.attn.window == original.window
    assert isinstance(original.proj.bn, nn.BatchNorm2d)  # the input is untouched


class ReadsTheChildAsAnObject(nn.Module):
    """Each form uses ``self.attn`` as an object: it must stay the object it is."""

    def __init__(self, form: str, unit=AttentionUnit):
        super().__init__()
        self.attn = unit()
        self.form = form

    def forward(self, x):
        B, C, H, W = x.shape
        if self.form == "submodule":
            scale = self.attn.proj.bn.weight.mean().detach()
        elif self.form == "parameter path":
            scale = self.attn.proj.conv.weight.abs().mean().detach()
        elif self.form == "dynamic getattr":
            scale = float(getattr(self.attn, _name()))
        elif self.form == "passed on":
            scale = float(len(repr(self.attn)) > 0)
        elif self.form == "method":
            scale = float(self.attn.describe() == "window")
        elif self.form == "property":
            scale = float(self.attn.out_channels)
        elif self.form == "state":  # written by the child's own forward
            scale = float(self.attn.calls >= 0)
        elif self.form == "written":
            self.attn.resolution = 7
            scale = 1.0
        else:  # "isinstance"
            scale = float(isinstance(self.attn, AttentionUnit))
        if H > 4:  # shape control flow: the block is a leaf
            return self.attn(x) * scale
        return self.attn(x)


@pytest.mark.parametrize("form, unit", [
    ("submodule", AttentionUnit), ("parameter path", AttentionUnit),
    ("dynamic getattr", AttentionUnit), ("passed on", AttentionUnit), ("method", AttentionUnit),
    ("property", AttentionUnit), ("state", CountingUnit), ("written", AttentionUnit),
    ("isinstance", AttentionUnit)])
def test_a_child_read_as_an_object_stays_itself(form, unit):
    model = randomized(ReadsTheChildAsAnObject(form, unit)).double()
    fused = reparam_fx.fuse(model)
    assert isinstance(fused.attn, unit), form
    assert_ops(fused, {"batch_norm": 1})
    assert any(leaf.module == "attn" and "left as it is" in leaf.reason
               and "as an object" in leaf.reason for leaf in fused.fusion_report.leaves), \
        fused.fusion_report.leaves
    for size in (4, 8):
        x = image(size=size).double()
        assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL


class GraphNamedAttribute(nn.Module):
    """A child whose plain attribute has a name its fused GraphModule already uses for
    something else (``graph``): the fused form would answer differently, so it stays."""

    def __init__(self):
        super().__init__()
        self.unit = AttentionUnit()
        self.unit.graph = 3  # (an unusual, but plain, hyperparameter name)

    def forward(self, x):
        if x.shape[-1] > self.unit.graph:
            return self.unit(x)
        return -self.unit(x)


def test_a_plain_read_the_fused_child_would_answer_differently_keeps_it():
    model = randomized(GraphNamedAttribute()).double()
    fused = reparam_fx.fuse(model)
    assert isinstance(fused.unit, AttentionUnit)
    assert any("would not give" in leaf.reason for leaf in fused.fusion_report.leaves)
    assert not fused.fusion_report.fused  # nothing reported fused that was not put in place
    assert reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL) <= RTOL


@given(value=st.recursive(st.one_of(st.integers(-3, 9), st.booleans(), st.none(),
                                    st.text(max_size=3), st.floats(allow_nan=False)),
                          lambda inner: st.tuples(inner, inner), max_leaves=4),
       subscript=st.booleans(), size=st.integers(3, 9))
def test_plain_attribute_reads_property(value, subscript, size):
    """Any plain value, read directly or indexed, leaves the child fusable; the fused child
    answers the read with the same value."""

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.unit = AttentionUnit()
            self.unit.setting = value

        def forward(self, x):
            read = self.unit.setting[0] if subscript else self.unit.setting
            if x.shape[-1] > 5 and read == value:
                return self.unit(x)
            return -self.unit(x)

    subscript = subscript and isinstance(value, tuple)
    model = randomized(Holder()).double()
    fused = reparam_fx.fuse(model)
    assert isinstance(fused.unit, torch.fx.GraphModule)
    assert fused.unit.setting == value and type(fused.unit.setting) is type(value)
    assert_ops(fused, {"batch_norm": 0, "conv": 1})
    assert reparam_fx.verify(model, fused, (image(size=size).double(),), rtol=RTOL) <= RTOL
