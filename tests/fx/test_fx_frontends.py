"""The same folds through every way a graph can spell them: functional calls on
parameters, operator / method / in-place forms, aten graphs from ``torch.export``, user
modules traced through (BatchNorm subclasses, DropPath), plus the report and ``verify``.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import reparam_fx
from fx_checks import (RTOL, assert_ops, assert_reason, assert_state_unchanged, fuse_exactly,
                       randomized, snapshot)
from reparam_fx.fx.counts import OP_CATEGORIES
from rules.rule_table import (CPE, ConvBN, DistilledHead, FlattenBNLinear, RepMixer, RepVGGBlock,
                              image)


def _parameter(*shape, seed=0, positive=False):
    generator = torch.Generator().manual_seed(seed)
    if positive:
        return nn.Parameter(torch.rand(*shape, generator=generator) * 1.5 + 0.5)
    return nn.Parameter(torch.randn(*shape, generator=generator))


# ---- 16. functional, operator, method and in-place forms ------------------------------

class FunctionalRepVGG(nn.Module):
    """RepVGG written with F.conv2d / F.batch_norm on the block's own tensors, summed with
    the form named by ``add``."""

    def __init__(self, add: str):
        super().__init__()
        self.add = add
        self.w3, self.b3 = _parameter(4, 4, 3, 3, seed=1), _parameter(4, seed=2)
        self.w1 = _parameter(4, 4, 1, 1, seed=3)
        for name, seed in (("bn", 4), ("bn_id", 8)):
            self.register_buffer(f"{name}_mean", torch.randn(4, generator=torch.Generator().manual_seed(seed)))
            self.register_buffer(f"{name}_var", torch.rand(4, generator=torch.Generator().manual_seed(seed + 1)) + 0.5)
            setattr(self, f"{name}_weight", _parameter(4, seed=seed + 2))
            setattr(self, f"{name}_bias", _parameter(4, seed=seed + 3))

    def forward(self, x):
        a = F.conv2d(x, self.w3, self.b3, padding=1)
        a = F.batch_norm(a, self.bn_mean, self.bn_var, self.bn_weight, self.bn_bias, False, 0.1, 1e-5)
        b = F.conv2d(x, self.w1)
        if self.add == "torch.add":
            return torch.add(a, b, alpha=2)
        if self.add == "iadd":
            a += b
            return a
        if self.add == "add_":
            return a.add_(b)
        if self.add == "sub":
            return torch.sub(a, b)
        if self.add == "identity_bn":  # + BN(x), functional, on the block input
            identity = F.batch_norm(x, self.bn_id_mean, self.bn_id_var, self.bn_id_weight,
                                    self.bn_id_bias, False, 0.1, 1e-5)
            return operator.add(operator.add(a, b), identity)
        raise ValueError(self.add)


@pytest.mark.parametrize("add, gone", [
    ("torch.add", "add"), ("iadd", "add"), ("add_", "add"), ("sub", "sub"), ("identity_bn", "add"),
])
def test_functional_forms_fold(add, gone):
    model = FunctionalRepVGG(add)
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes}
    assert F.conv2d in targets and F.batch_norm in targets
    # F.batch_norm normalises axis 1: only the example inputs prove it is the channel axis
    fused = fuse_exactly(model, image(), ops={"conv": 1, "batch_norm": 0, gone: 0},
                         pass_inputs=True, already_randomized=True)
    assert len(fused.fusion_report.fused) == 1
    assert not [n for n in fused.graph.nodes if n.op == "get_attr"]


def test_functional_bn_on_an_input_of_unknown_rank_needs_example_inputs():
    model = FunctionalRepVGG("identity_bn").eval().double()
    # no shapes: F.conv2d also takes (C, H, W), where F.batch_norm's axis 1 is H
    fused = reparam_fx.fuse(model)
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)
    assert_reason(fused, "example_inputs")
    assert_ops(fused, {"conv": 2, "batch_norm": 2, "add": 2})


# ---- 17. aten graphs from torch.export ------------------------------------------------

def _category_counts(model) -> dict[str, int]:
    counts = reparam_fx.op_counts(model)
    return {category: counts.get(category, 0) for category in OP_CATEGORIES}


@pytest.mark.parametrize("build, x", [
    (lambda: RepVGGBlock(), image()),
    (lambda: RepMixer(), image()),
    (lambda: CPE(), image()),
    (lambda: FlattenBNLinear(), image(4, 2)),
    (lambda: DistilledHead(), image(8, 1)),
], ids=["repvgg", "repmixer", "cpe", "bn+linear", "linear-heads"])
def test_exported_program_fuses_like_the_fx_graph(build, x):
    model = randomized(build()).double()
    x = x.double()
    fx_fused = fuse_exactly(model, x, already_randomized=True)
    program = torch.export.export(model, (x,))
    for captured in (program, program.module()):
        fused = reparam_fx.fuse(captured)
        assert fused.fusion_report.frontend == "aten"
        assert _category_counts(fused) == _category_counts(fx_fused), fused.fusion_report.table()
        assert fused.fusion_report.pattern_counts() == fx_fused.fusion_report.pattern_counts()
        reparam_fx.verify(model, fused, (x,), rtol=RTOL)


# ---- 18. user code traced through -----------------------------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BatchNorm2d subclass: F.batch_norm, then an activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.0, self.eps)
        return F.relu(x)


class ConvBNAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(6)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_batchnorm_subclass_is_traced_through_and_folded():
    fused = fuse_exactly(ConvBNAct(), image(), ops={"conv": 1, "batch_norm": 0},
                         patterns={"conv+bn": 1})
    assert any(n.target in (F.relu, torch.relu) for n in fused.graph.nodes)


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """timm's drop_path: identity unless training with drop_prob > 0."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class ResidualWithDrops(nn.Module):
    """``x + drop_path(dropout(bn(conv(x))))``: both drops are identities in eval."""

    def __init__(self):
        super().__init__()
        self.branch = ConvBN(4, 4, 3)
        self.dropout = nn.Dropout(0.3)
        self.drop_path = DropPath(0.2)

    def forward(self, x):
        return x + self.drop_path(self.dropout(self.branch(x)))


def test_dropout_and_drop_path_are_transparent_in_eval():
    fuse_exactly(ResidualWithDrops(), image(), ops={"conv": 1, "batch_norm": 0, "add": 0},
                 patterns={"repvgg": 1})


def test_dropout_in_training_mode_inside_a_graph_module_blocks_the_merge():
    model = randomized(ResidualWithDrops()).double()
    traced = torch.fx.symbolic_trace(model)  # eval: drop_path traced away
    traced = copy.deepcopy(traced)
    traced.dropout.train()
    fused = reparam_fx.fuse(traced)
    assert_ops(fused, {"add": 1, "batch_norm": 0})
    assert_reason(fused, "training mode")


# ---- 22. the report -------------------------------------------------------------------

class ReportedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(4, 4, 3)
        self.block = RepVGGBlock()
        self.pre = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block(x))
        return self.head(self.pre(x))  # BN before a zero-padded conv: left alone


def test_report_names_patterns_and_reasons():
    fused = fuse_exactly(ReportedModel(), image(), ops={"conv": 3, "batch_norm": 1})
    report = fused.fusion_report
    assert report.pattern_counts() == {"conv+bn": 1, "repvgg": 1}
    table = report.table()
    for text in ("conv+bn", "repvgg", "left alone", "zero-padded conv"):
        assert text in table, table
    assert str(report) == table
    stem = next(region for region in report.fused if region.pattern == "conv+bn")
    assert stem.params_before > stem.params_after  # BN's gamma/beta are gone
    assert report.params_before > report.params_after
    assert report.ops_before["batch_norm"] == 5 and report.ops_after["batch_norm"] == 1


def test_report_of_a_single_conv_bn():
    fused = fuse_exactly(ConvBN(4, 8, 3), image(), patterns={"conv+bn": 1})
    region = fused.fusion_report.fused[0]
    assert region.params_before == 4 * 8 * 9 + 2 * 8 and region.params_after == 4 * 8 * 9 + 8
    assert dict(region.ops) == {"conv": 1, "batch_norm": 1}


# ---- 23. verify -----------------------------------------------------------------------

def test_verify_returns_a_small_error_for_an_exact_fusion():
    model = randomized(RepVGGBlock()).double()
    fused = reparam_fx.fuse(model)
    error = reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)
    assert isinstance(error, float) and 0.0 <= error < RTOL


def test_verify_raises_on_a_perturbed_copy():
    model = randomized(RepVGGBlock()).double()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.rbr_1x1.bn.running_mean[0] += 1e-3
    before = snapshot(model)
    with pytest.raises(reparam_fx.VerificationError, match="relative error"):
        reparam_fx.verify(model, perturbed, (image().double(),), rtol=RTOL)
    assert_state_unchanged(before, model)
    fused = reparam_fx.fuse(perturbed)
    with pytest.raises(reparam_fx.VerificationError):
        reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL)


def test_verify_raises_on_a_shape_mismatch():
    with pytest.raises(reparam_fx.VerificationError, match="shape"):
        reparam_fx.verify(nn.Conv2d(4, 4, 3).eval(), nn.Conv2d(4, 4, 3, padding=1).eval(),
                          (image(),))
