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
    from reparam_fx.core import affine

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


# ---- found in the end-of-issue review: each of these fused wrongly or crashed before ----


def _exact_on(model, fused, x, rtol=RTOL64):
    with torch.no_grad():
        expected, actual = model(x), fused(x)
    assert actual.dtype == expected.dtype
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= rtol, error


def test_inplace_torch_function_is_not_folded_across():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0, self.bn, self.conv = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv0(x)
            out = self.bn(y)       # reads y before it is mutated
            torch.relu_(y)         # the same function object as F.relu_
            return self.conv(out + y)
    model = randomize_batchnorm_(M().double().eval(), seed=5)
    fused = reparam_fx.fuse(model)
    _exact_on(model, fused, torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert not [r for r in fused.fusion_report.fused if "bn" in " ".join(r.nodes)]


def test_export_pad_with_a_nonzero_value_is_not_a_zero_pad():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(F.pad(x, (1, 1, 1, 1), value=1.0))
    model, x = M().double().eval(), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    fused = reparam_fx.fuse(torch.export.export(model, (x,)))
    assert fused.fusion_report.fused == []
    _exact_on(model, fused, x)


def test_aten_arguments_are_bound_by_schema():
    aten = torch.ops.aten
    root = nn.Module()
    root.w = nn.Parameter(torch.randn(4, 4, 1, 1, dtype=torch.float64))
    graph = torch.fx.Graph()
    x_node, w = graph.placeholder("x"), graph.get_attr("w")
    conv = (w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    first = graph.call_function(aten.convolution.default, (x_node, *conv))
    shifted = graph.call_function(aten.add.Scalar, (first, 3.0, 2))  # alpha positional: + 6
    graph.output(graph.call_function(aten.convolution.default, (shifted, *conv)))
    module = torch.fx.GraphModule(root, graph)
    fused = reparam_fx.fuse(module)
    assert reparam_fx.op_counts(fused)["conv"] == 1
    _exact_on(module, fused, torch.randn(1, 4, 5, 5, dtype=torch.float64))

    root = nn.Module()
    root.w, root.b = (nn.Parameter(torch.randn(*shape, dtype=torch.float64)) for shape in ((4, 4), (4,)))
    root.s = nn.Parameter(torch.rand(4, dtype=torch.float64) + 0.5)
    graph = torch.fx.Graph()
    x_node, w, b, s = (graph.placeholder("x"), graph.get_attr("w"), graph.get_attr("b"),
                       graph.get_attr("s"))
    linear = graph.call_function(aten.linear.default, (x_node, w), {"bias": b})
    graph.output(graph.call_function(aten.mul.Tensor, (linear, s)))
    module = torch.fx.GraphModule(root, graph)
    fused = reparam_fx.fuse(module)
    assert reparam_fx.op_counts(fused)["mul"] == 0
    _exact_on(module, fused, torch.randn(3, 4, dtype=torch.float64))


def test_module_with_forward_hooks_is_left_alone():
    model = randomize_batchnorm_(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                               nn.BatchNorm2d(4)).double().eval(), seed=6)
    model[0].register_forward_hook(lambda module, inputs, output: output * 2)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.op_counts(fused)["batch_norm"] == 1
    assert "the module has forward hooks" in fused.fusion_report.skip_reasons()
    _exact_on(model, fused, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_legacy_weight_norm_is_a_clear_error():
    model = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)).eval()
    with pytest.raises(reparam_fx.FusionError, match=r"cannot copy 0 \(Conv2d\)"):
        reparam_fx.fuse(model)


def test_region_reading_a_constant_is_emitted():
    class LearnedQueries(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Parameter(torch.randn(5, 8, dtype=torch.float64))
            self.proj = nn.Linear(8, 8).double()
            self.gamma = nn.Parameter(torch.rand(8, dtype=torch.float64) + 0.5)

        def forward(self, x):
            return x @ (self.proj(self.query) * self.gamma).t()
    model = LearnedQueries().eval()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.op_counts(fused)["mul"] == 0
    _exact_on(model, fused, torch.randn(2, 8, dtype=torch.float64))


def test_result_shares_no_hooks_or_buffers_with_the_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fused = reparam_fx.fuse(model)
    (relu,) = [m for m in fused.modules() if isinstance(m, nn.ReLU)]
    relu.register_forward_hook(lambda module, inputs, output: output * 0)
    relu.register_buffer("extra", torch.ones(1))
    assert not model[2]._forward_hooks and not model[2]._buffers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_parameter_free_region_takes_the_input_dtype(dtype):
    class PoolMixer(nn.Module):  # PoolFormer's token mixer: no parameters at all
        def __init__(self):
            super().__init__()
            self.pool = nn.AvgPool2d(3, 1, 1)

        def forward(self, x):
            return self.pool(x) - x
    model, x = PoolMixer().eval(), torch.randn(1, 4, 8, 8, dtype=dtype)
    fused = reparam_fx.fuse(model, (x,))
    assert reparam_fx.op_counts(fused)["sub"] == 0
    assert {p.dtype for p in fused.parameters()} == {dtype}
    _exact_on(model, fused, x, rtol=RTOL64 if dtype == torch.float64 else 1e-2)


@pytest.mark.parametrize("input_shape, constant_shape", [
    ((1, 1, 8, 8), (3, 1, 1)),   # grayscale expanded to 3 channels by the constant
    ((3, 4), (4, 1, 1)),         # rank raised from 2 to 3 by the constant
])
def test_constant_that_broadcasts_the_tensor_is_not_folded(input_shape, constant_shape):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.rand(*constant_shape, dtype=torch.float64) + 0.5)
            self.conv = nn.Conv2d(constant_shape[0], 8, 1).double()

        def forward(self, x):
            return self.conv(x * self.w)
    model, x = M().eval(), torch.randn(*input_shape, dtype=torch.float64)
    fused = reparam_fx.fuse(model, (x,))
    assert reparam_fx.op_counts(fused)["mul"] == 1
    _exact_on(model, fused, x)


def test_example_inputs_are_not_mutated():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            x.sub_(0.5)  # in-place input normalisation
            return self.conv(x)
    x = torch.ones(1, 3, 8, 8)
    reparam_fx.fuse(M().eval(), (x,))
    assert bool((x == 1).all())


# ---- guards the review found unpinned: each must refuse and stay exact -------------------


class _StdConv(nn.Conv2d):
    """Weight-standardised conv: its own forward, so its attributes are not what it computes."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def _bn(channels, seed=7):
    return randomize_batchnorm_(nn.BatchNorm2d(channels).double().eval(), seed=seed)


def test_conv_subclass_with_its_own_forward_is_not_folded():
    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, _StdConv) or super().is_leaf_module(module, name)
    model = nn.Sequential(_StdConv(3, 4, 3, padding=1), _bn(4)).double().eval()
    traced = torch.fx.GraphModule(model, Leaves().trace(model))
    fused = reparam_fx.fuse(traced)
    assert reparam_fx.op_counts(fused)["batch_norm"] == 1
    _exact_on(model, fused, torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_transposed_convolution_folds_its_batchnorm_in_core_aten():
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), _bn(4)).double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    fused = reparam_fx.fuse(torch.export.export(model, (x,)).run_decompositions())
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 1}
    assert reparam_fx.op_counts(fused)["batch_norm"] == 0
    _exact_on(model, fused, x)


@pytest.mark.parametrize("case", ["divisor_override", "floor_division", "negative_pad"])
def test_functional_guards(case):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1).double()
            self.weight2 = nn.Parameter(torch.randn(4, 4, 2, 2, dtype=torch.float64))
            self.bn = _bn(4)

        def forward(self, x):
            y = self.conv(x)
            if case == "divisor_override":
                y = F.avg_pool2d(y, 2, divisor_override=3)
            elif case == "floor_division":
                y = torch.div(y, 2, rounding_mode="floor")
            else:
                y = F.pad(y, (-1, -1, -1, -1))
            return self.bn(y)
    model, x = M().eval(), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.op_counts(fused)["batch_norm"] == 1
    _exact_on(model, fused, x)


@pytest.mark.parametrize("exported", [False, True], ids=["functional", "aten"])
def test_dropout_in_training_mode_is_kept(exported):
    class M(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, training=True) * 2.0
    model, x = M(), torch.randn(2, 8)
    fused = reparam_fx.fuse(torch.export.export(model, (x,)) if exported else model.eval())
    assert "dropout in training mode" in " ".join(fused.fusion_report.skip_reasons())
    assert any("dropout" in str(node.target) for node in fused.graph.nodes)


def test_a_constant_of_another_dtype_is_not_folded():
    class Promotes(nn.Module):  # fp32 conv times an fp64 (C, 1, 1) buffer: fp64 out
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.register_buffer("scale", torch.rand(4, 1, 1, dtype=torch.float64) + 0.5)

        def forward(self, x):
            return self.conv(x) * self.scale
    model, x = Promotes().eval(), torch.randn(2, 4, 8, 8)
    fused = reparam_fx.fuse(model)
    assert fused(x).dtype == torch.float64
    assert reparam_fx.op_counts(fused)["mul"] == 1


def test_fusing_an_exported_program_prints_no_deprecation_warning():
    """Copying an export graph copied its pytree specs, and torch 2.13 warns on every
    LeafSpec made ("isinstance(treespec, LeafSpec) is deprecated"): the specs are now
    shared (they are immutable)."""
    import warnings
    model = randomize_batchnorm_(ConvBN().eval(), seed=4)
    x = torch.randn(1, 6, 9, 9)
    program = torch.export.export(model, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        fused = reparam_fx.fuse(program)
    assert reparam_fx.op_counts(fused)["batch_norm"] == 0
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), rtol=1e-5, atol=1e-6)


class StridedConvMeanLinear(nn.Module):
    """A strided 1x1 conv, the spatial mean, a Linear (fuzzer seed 30683): conv and Linear
    compose into one 1x1 conv, which can only be written before the mean (the stride must
    come before it), where it runs on every position the mean reads."""

    def __init__(self, out_features):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, stride=2, bias=False)
        self.fc = nn.Linear(4, out_features, bias=False)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("capture", ["export", "core", "onnx"])
@pytest.mark.parametrize("out_features", [8, 2], ids=["widening", "narrowing"])
def test_a_linear_after_a_mean_is_not_written_before_it_at_more_macs(capture, out_features):
    # widening: 4 -> 8 costs 32 per position before the mean, where the conv cost 16 and
    # the Linear ran once per image: 288 + 64 MACs would become 576; left as it is.
    # narrowing: 4 -> 2 costs 8 per position, less than the conv alone: folded.
    from onnx_checks import assert_same_outputs, export_torch, fuse_checked, op_counts
    torch.manual_seed(0)
    model = StridedConvMeanLinear(out_features).eval().double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    folds = out_features == 2
    if capture == "onnx":
        exported = export_torch(model.float(), x.float())
        fused, report = fuse_checked(exported)
        counts = op_counts(fused)
        assert counts["Conv"] == 1 and counts["MatMul"] + counts["Gemm"] == (0 if folds else 1)
        assert bool(report.fused) == folds
        assert_same_outputs(exported, fused)
        return
    program = torch.export.export(model, (x,))
    if capture == "core":
        program = program.run_decompositions()
    fused = reparam_fx.fuse(program)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL64) <= RTOL64
    before, after = reparam_fx.mac_count(model, (x,)), reparam_fx.mac_count(fused, (x,))
    assert (after < before) if folds else (after == before), (before, after)
    assert bool(fused.fusion_report.fused) == folds
    assert reparam_fx.op_counts(fused)["conv"] == 1  # (core ATen's Linear is an mm)
    if not folds:
        assert "increase MACs" in " ".join(fused.fusion_report.skip_reasons())
