"""Regression tests for bugs found while building the engine, one test each."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam_fx
from reparam_fx.testing import randomize_batchnorm_

RTOL64 = 1e-12


class ConvBN(nn.Module):
    def __init__(self, channels=6):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_float64_model_statistics_are_not_aliased():
    # The algebra works in place on its float64 copies; for a float64 model ``.to()`` is a
    # no-op, so without an explicit copy BN running_mean was scaled in place.
    model = randomize_batchnorm_(ConvBN().eval().double(), seed=3)
    before = copy.deepcopy(model.state_dict())
    fused = reparam_fx.fuse(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL64) <= RTOL64
    assert reparam_fx.op_counts(fused)["batch_norm"] == 0


class SqueezeExcite(nn.Module):
    """Pools with a kernel size computed from ``x.size()`` at run time."""

    def __init__(self, channels=6):
        super().__init__()
        self.conv = ConvBN(channels)
        self.reduce = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        y = self.conv(x)
        pooled = F.avg_pool2d(y, kernel_size=[y.size(2), y.size(3)])
        return y * torch.sigmoid(self.reduce(pooled))


def test_run_time_kernel_size_is_left_alone_with_a_reason():
    model = randomize_batchnorm_(SqueezeExcite().eval().double(), seed=4)
    fused = reparam_fx.fuse(model)
    reasons = [s.reason for s in fused.fusion_report.skipped if s.op == "avg_pool2d"]
    assert reasons and "run time" in reasons[0]
    assert reparam_fx.op_counts(fused)["avg_pool"] == 1
    assert fused.fusion_report.pattern_counts()["conv+bn"] == 1
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL64) <= RTOL64


class InPlaceSum(nn.Module):
    """``out += ...`` on a fresh tensor: export's training IR keeps ``aten.add_``."""

    def __init__(self, channels=6):
        super().__init__()
        self.a = ConvBN(channels)
        self.b = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                               nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.a(x)
        out += self.b(x)
        return out


def test_exported_inplace_add_merges():
    model = randomize_batchnorm_(InPlaceSum().eval().double(), seed=5)
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    assert any("add_" in str(n.target) for n in program.graph.nodes)
    fused = reparam_fx.fuse(program)
    counts = reparam_fx.op_counts(fused)
    assert counts["conv"] == 1 and counts["add"] == 0 and counts["batch_norm"] == 0
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL64) <= RTOL64


def test_every_remaining_batchnorm_is_reported():
    class LoneBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(torch.relu(x)))

    fused = reparam_fx.fuse(randomize_batchnorm_(LoneBN().eval(), seed=6))
    assert reparam_fx.op_counts(fused)["batch_norm"] == 1
    assert [s.node for s in fused.fusion_report.skipped] == ["bn"]


def test_mac_gate_refuses_before_computing_weights(monkeypatch):
    # A refused composition used to build the whole float64 product first (4.5 s for a
    # 608 -> 2432 FastViT ConvFFN). The gate needs only shapes.
    from reparam_fx import affine

    def no_weight_math(*args, **kwargs):
        raise AssertionError("weights computed for a refused rewrite")

    monkeypatch.setattr(affine, "regroup", no_weight_math)
    monkeypatch.setattr(affine, "_grouped_product", no_weight_math)
    depthwise = affine.conv(torch.randn(8, 1, 7, 7), None, 1, 3, 1, 8)
    expand = affine.conv(torch.randn(32, 8, 1, 1), torch.randn(32), 1, 0, 1, 1)
    pointwise = affine.conv(torch.randn(8, 8, 1, 1), None, 1, 0, 1, 1)
    depthwise3 = affine.conv(torch.randn(8, 1, 3, 3), None, 1, 1, 1, 8)
    with pytest.raises(affine.NotExact, match="MACs"):
        affine.compose(depthwise, expand)  # 7x7 dense 8->32 would cost more than dw + 1x1
    with pytest.raises(affine.NotExact, match="MACs"):
        affine.merge([depthwise3, pointwise], [1, 1])  # dense 3x3 > dw 3x3 + 1x1
