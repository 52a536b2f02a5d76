"""ONNX-specific rule tests of :func:`reparam_fx.fuse_onnx_model`: what only an ONNX graph
can spell, on graphs built with ``onnx.helper``.

Every rule's positive and negative case, through ``fuse(module)``, ``fuse(export)`` and the
ONNX frontend (on the module's torch export) alike, is in the rule table (``tests/rules``).
Here: the Conv + BatchNormalization sweep in float64 and float32 (with the folded Conv's
attributes and weight dtype), Conv attributes torch never exports (asymmetric ``pads``,
``auto_pad``), constant shapes and operand orders of per-channel constants, AveragePool's
attribute defaults, MatMul on rank 3, Gemm's ``transA`` / ``alpha`` / ``beta``, weights in
``Constant`` nodes, Identity and Dropout, values read by graph outputs, opsets, a
hypothesis property over the blocks of :mod:`reparam_fx.testing` exported from torch,
BatchNormalization's mode by the opset's rules, symbolic dimensions (read only where
proven), and the exact cleanups around the passes (constants folded, no-ops dropped,
slices made one Split).

Graphs are in float64 (compared with the ONNX reference evaluator at ``rtol=1e-10``) and
in float32 (ONNX Runtime through ``verify_onnx`` at ``rtol=1e-5``), opset 17 unless a test
is about opsets. Positive: the fold happened (node counts by op type,
``report.pattern_counts()``), outputs equal. Negative: the fold was refused (the relevant
nodes are still there), outputs equal, the report says why. Every check also asserts that
the input model is unchanged and that graph inputs / outputs keep their names, shapes and
element types (``onnx_checks.fuse_checked``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from onnx_checks import (GraphBuilder, RTOL64, assert_ops, assert_reason, assert_same_outputs,
                         attribute, conv_batchnorm_pairs, export_torch, fuse_checked,
                         fuse_exactly, fuse_refused, initializer, nodes_of, op_counts)
from reparam_fx.onnx import OnnxFusionError, fuse_onnx_model, verify_onnx
from reparam_fx.testing import block_specs

DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
FOLDED = {"Conv": 1, "BatchNormalization": 0, "Add": 0, "Sub": 0, "Mul": 0}

# How a block's output is used: as a graph output directly, or through a Relu.
TAILS = pytest.mark.parametrize("tail", [
    pytest.param(None, id="output"),
    pytest.param("Relu", id="relu"),
])


def only(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    (node,) = nodes_of(model, op)
    return node


def finish(g: GraphBuilder, y: str, tail: str | None, extra_outputs=()) -> onnx.ModelProto:
    """The model with ``y`` (or ``tail(y)``) as its output, after ``extra_outputs``."""
    return g.build([*extra_outputs, g.node(tail, [y]) if tail else y])


def producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if name in n.output]
    return node


# ---- 1. Conv + BatchNormalization --------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("stride, dilation, group, bias", [
    (1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, False), (2, 2, 4, True),
])
def test_conv_bn_folds(dtype, spatial, stride, dilation, group, bias):
    g = GraphBuilder(dtype)
    size = 9 if spatial < 3 else 7
    x = g.input([2, 4, *(size,) * spatial])
    y = g.conv_bn(x, 4, 8, 3, stride=stride, dilation=dilation, group=group, bias=bias,
                  spatial=spatial)
    fused, _ = fuse_exactly(g.build(y), ops={"Conv": 1, "BatchNormalization": 0},
                            patterns={"conv+bn": 1})
    conv = only(fused, "Conv")
    assert attribute(conv, "group") == group
    assert attribute(conv, "strides") == [stride] * spatial
    assert attribute(conv, "dilations") == [dilation] * spatial
    assert attribute(conv, "pads") == [dilation] * (2 * spatial)
    assert len(conv.input) == 3, "the folded conv needs a bias"
    assert initializer(fused, conv.input[1]).dtype == dtype


def test_batchnorm_in_training_mode_not_folded():
    """training_mode=1 (opset 14+) uses batch statistics: never folded. ONNX Runtime cannot
    run this graph (it wants the running-statistics outputs), so only the graph is checked."""
    g = GraphBuilder(np.float32)
    x = g.input([2, 4, 6, 6])
    conv = g.conv(x, 4, 4, 3)
    scale, bias, mean, var = (g.constant(g.uniform(4, 0.5, 1.5), p) for p in "sbmv")
    g.nodes.append(onnx.helper.make_node("BatchNormalization", [conv, scale, bias, mean, var],
                                         ["y", "running_mean", "running_var"],
                                         name="bn_train", training_mode=1))
    model = g.build(["y", "running_mean", "running_var"])
    fused, report = fuse_checked(model)
    assert op_counts(fused) == op_counts(model)
    assert_reason(report, "training mode")


def repvgg_block(g: GraphBuilder, x: str, cin: int, cout: int, stride: int = 1) -> str:
    """3x3 Conv+BN + 1x1 Conv+BN (+ BN-only identity when shapes allow), summed (the
    RepVGG rule itself is the rule table's; here a block for sections 8 and 10)."""
    branches = [g.conv_bn(x, cin, cout, 3, stride=stride), g.conv_bn(x, cin, cout, 1, stride=stride)]
    if cin == cout and stride == 1:
        branches.append(g.batchnorm(x, cin))
    return g.sum(branches)


# ---- 2. asymmetric Conv pads: a CPE on an even kernel, the dilation lattice --------------

@DTYPES
@TAILS
def test_cpe_with_asymmetric_conv_pads_merges(dtype, tail):
    """An even 4x4 kernel with pads (1, 1, 2, 2) keeps the size: a 5x5 symmetric window
    whose first row and column are zero taps holds it, the identity on its centre tap; the
    merged conv is written trimmed, as a 4x4 with the same pads."""
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 8, 8])
    y = g.binary("Add", x, g.conv(x, 4, 4, 4, group=4, bias=True, pads=[1, 1, 2, 2]))
    fused, _ = fuse_exactly(finish(g, y, tail), ops={"Conv": 1, "Add": 0}, patterns={"cpe": 1})
    conv = only(fused, "Conv")
    assert attribute(conv, "kernel_shape") == [4, 4] and attribute(conv, "pads") == [1, 1, 2, 2]


@DTYPES
def test_asymmetric_pads_off_the_dilation_lattice_refused(dtype):
    """Pads (0, 1) on a dilation-2 kernel: one more padded position after than before is
    no whole number of dilated taps, so no symmetric window holds it."""
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 7, 7])
    y = g.batchnorm(g.conv(x, 4, 4, 2, dilation=2, pads=[0, 0, 1, 1]), 4)
    fuse_refused(g.build(y), unchanged=("Conv", "BatchNormalization"), reason="dilated taps")


# ---- 3. per-channel constants after a Conv: constant shapes and operand order ------------

CONSTANT_SHAPES = {"(C,1,1)": (4, 1, 1), "(1,C,1,1)": (1, 4, 1, 1), "scalar": ()}


@DTYPES
@pytest.mark.parametrize("shape", sorted(CONSTANT_SHAPES))
@pytest.mark.parametrize("op, constant_first", [
    ("Mul", False), ("Mul", True), ("Div", False), ("Add", False), ("Add", True),
    ("Sub", False), ("Sub", True),
])
def test_per_channel_constant_after_conv_folds(dtype, shape, op, constant_first):
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    y = g.conv_bn(x, 4, 4, 3, bias=True)
    constant = g.constant(g.uniform(CONSTANT_SHAPES[shape], 0.5, 1.5), "c")
    y = g.binary(op, *((constant, y) if constant_first else (y, constant)))
    fused, report = fuse_exactly(g.build(y), ops={"Conv": 1, "BatchNormalization": 0, op: 0})
    assert len(fused.graph.node) == 1 and len(report.fused) == 1


def test_division_by_a_constant_with_zeros_refused():
    g = GraphBuilder(np.float64)
    x = g.input([2, 4, 6, 6])
    y = g.binary("Div", g.conv_bn(x, 4, 4, 3),
                 g.constant(np.array([1.0, 0.0, 2.0, -0.5]).reshape(4, 1, 1), "c"))
    model = g.build(y)
    fused, report = fuse_checked(model)
    assert_reason(report, "zero")
    assert op_counts(fused)["Div"] == 1 and op_counts(fused)["BatchNormalization"] == 0
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 6, 6))}
    from onnx.reference import ReferenceEvaluator
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = ReferenceEvaluator(model).run(None, feeds)[0]
        actual = ReferenceEvaluator(fused).run(None, feeds)[0]
    np.testing.assert_allclose(actual, expected, rtol=RTOL64, atol=0.0)  # +-inf in channel 1


# ---- 4. AveragePool's attribute defaults -------------------------------------------------

@DTYPES
def test_avg_pool_with_the_default_count_include_pad_refused(dtype):
    """No ``count_include_pad`` attribute: its default is 0, which divides the border by
    fewer taps (torch exports it explicitly; the rule table has both of its values)."""
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 8, 8])
    y = g.batchnorm(g.node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 4)
    fuse_refused(g.build(y), unchanged=("AveragePool", "BatchNormalization"),
                 reason="count_include_pad", ops={"Conv": 0})


# ---- 5. a Pad read elsewhere -------------------------------------------------------------

@DTYPES
def test_asymmetric_zero_pad_read_elsewhere_stays(dtype):
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    inputs = [x, g.constant(np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=np.int64), "pads"),
              g.constant(np.array(0.0), "pad_value")]
    padded = g.node("Pad", inputs)
    y = g.batchnorm(g.conv(padded, 4, 4, 3, pads=0, bias=True), 4)
    fused, _ = fuse_exactly(g.build([y, padded]), ops={"Pad": 1, "Conv": 1,
                                                       "BatchNormalization": 0})
    assert attribute(only(fused, "Conv"), "pads") == [0, 0, 0, 0]


# ---- 6. Conv padding attributes ----------------------------------------------------------

@DTYPES
def test_conv_with_asymmetric_pads_folds_its_batchnorm(dtype):
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    y = g.batchnorm(g.conv(x, 4, 4, 3, pads=[0, 0, 1, 1]), 4)
    fused, _ = fuse_exactly(g.build(y), ops={"Conv": 1, "BatchNormalization": 0},
                            patterns={"conv+bn": 1})
    conv = only(fused, "Conv")
    assert attribute(conv, "kernel_shape") == [3, 3] and attribute(conv, "pads") == [0, 0, 1, 1]


@DTYPES
@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_same_with_stride_1_folds(dtype, mode):
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 7, 7])
    y = g.batchnorm(g.conv(x, 4, 4, 3, auto_pad=mode), 4)
    fused, _ = fuse_exactly(g.build(y), ops={"Conv": 1, "BatchNormalization": 0},
                            patterns={"conv+bn": 1})
    conv = only(fused, "Conv")
    assert attribute(conv, "pads") == [1, 1, 1, 1]
    assert attribute(conv, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")


@DTYPES
def test_auto_pad_same_with_stride_2_and_an_odd_kernel_left_alone(dtype):
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 8, 8])
    y = g.batchnorm(g.conv(x, 4, 4, 3, stride=2, auto_pad="SAME_UPPER"), 4)
    _, report = fuse_refused(g.build(y), unchanged=("Conv", "BatchNormalization"),
                             reason="auto_pad")
    assert not report.fused


# ---- 7. MatMul on rank 3: a per-channel constant after it, on its axis or not ------------

@DTYPES
def test_matmul_add_mul_on_rank_3_folds(dtype):
    g = GraphBuilder(dtype)
    x = g.input([2, 5, 6])
    y = g.binary("MatMul", x, g.constant(g.uniform((6, 4)), "W"))
    y = g.binary("Add", y, g.constant(g.uniform(4), "B"))
    y = g.binary("Mul", y, g.constant(g.uniform(4, 0.5, 1.5), "s"))
    fused, report = fuse_exactly(g.build(y), ops={"MatMul": 1, "Add": 1, "Mul": 0})
    assert len(fused.graph.node) == 2 and len(report.fused) == 1


@DTYPES
def test_matmul_scale_on_another_axis_refused(dtype):
    """A (5, 1) constant scales the rows (axis -2), the MatMul mixes the last axis."""
    g = GraphBuilder(dtype)
    x = g.input([2, 5, 6])
    y = g.binary("MatMul", x, g.constant(g.uniform((6, 4)), "W"))
    y = g.binary("Mul", y, g.constant(g.uniform((5, 1), 0.5, 1.5), "s"))
    fuse_refused(g.build(y), unchanged=("MatMul", "Mul"), reason="axes")


# ---- 8. constants as Constant nodes; Identity and Dropout --------------------------------

@DTYPES
def test_weights_in_constant_nodes(dtype):
    """Stem Conv+BN, a RepVGG block, a tail Conv+BN, and a Pad: every weight, statistic
    and pad amount a ``Constant`` node."""
    g = GraphBuilder(dtype, constant_nodes=True)
    x = g.input([2, 4, 8, 8])
    y = repvgg_block(g, g.conv_bn(x, 4, 4, 3), 4, 4)
    y = g.node("Pad", [y, g.constant(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads")])
    y = g.conv_bn(y, 4, 4, 3, pads=0)
    model = g.build(y)
    assert not model.graph.initializer and op_counts(model)["Constant"] > 20
    fuse_exactly(model, ops={**FOLDED, "Conv": 3, "Pad": 0, "Constant": 0},
                 patterns={"conv+bn": 1, "repvgg": 1, "zero-pad": 1})


@DTYPES
def test_conv_bn_with_constant_nodes_refused_when_not_constant(dtype):
    """The BN's mean is computed from the input (not a constant): nothing folds."""
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    conv = g.conv(x, 4, 4, 3)
    mean = g.node("ReduceMean", [x], axes=[0, 2, 3], keepdims=0)
    params = [g.constant(g.uniform(4, 0.5, 1.5), p) for p in ("s", "b", "v")]
    y = g.node("BatchNormalization", [conv, params[0], params[1], mean, params[2]])
    _, report = fuse_refused(g.build(y), unchanged=("Conv", "BatchNormalization"),
                             reason="no conv or linear next to it")
    assert not report.fused


@DTYPES
def test_identity_and_inference_dropout_are_transparent(dtype):
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    y = g.node("Identity", [g.conv(x, 4, 4, 3)])
    y = g.node("Dropout", [g.batchnorm(y, 4), g.constant(np.array(0.3), "ratio"),
                           g.constant(np.array(False), "training")])
    y = g.node("Dropout", [g.node("Identity", [y])])
    fused, _ = fuse_exactly(g.build(y), ops={"Conv": 1, "BatchNormalization": 0, "Identity": 0,
                                             "Dropout": 0},
                            patterns={"conv+bn": 1})
    assert len(fused.graph.node) == 1


@DTYPES
def test_training_dropout_is_not_transparent(dtype):
    """Dropout with training_mode=True (ratio 0, so outputs stay comparable) is left alone."""
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    y = g.node("Dropout", [g.conv(x, 4, 4, 3), g.constant(np.array(0.0), "ratio"),
                           g.constant(np.array(True), "training")])
    y = g.batchnorm(y, 4)
    fuse_refused(g.build(y), unchanged=("Conv", "Dropout", "BatchNormalization"),
                 reason="training mode")


# ---- 9. values used outside a region -----------------------------------------------------

@DTYPES
def test_value_read_by_a_graph_output_is_materialised_once(dtype):
    """``a = BN(conv3x3(x))`` is a graph output and feeds ``b = BN(conv1x1(a))``: two convs,
    not three (``b`` is not recomputed from ``x``)."""
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    a = g.conv_bn(x, 4, 4, 3)
    b = g.conv_bn(a, 4, 4, 1)
    fused, _ = fuse_exactly(g.build([a, b]), ops={"Conv": 2, "BatchNormalization": 0},
                            patterns={"conv+bn": 2})
    producers = {node.output[0]: node for node in fused.graph.node}
    assert producers[b].input[0] == a


@DTYPES
def test_conv_output_read_by_a_graph_output_is_not_duplicated(dtype):
    """The conv output is a graph output, so its BN cannot fold without a second conv."""
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    c = g.conv(x, 4, 4, 3)
    y = g.batchnorm(c, 4)
    fuse_refused(g.build([c, y]), unchanged=("Conv", "BatchNormalization"), reason=None)


@DTYPES
@TAILS
def test_branch_read_by_a_graph_output_is_not_duplicated(dtype, tail):
    """RepVGG block whose 3x3 branch is also a graph output: that branch is computed once
    (one 3x3 Conv in the fused graph); the 1x1 and BN branches merge into one conv."""
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    dense = g.conv_bn(x, 4, 4, 3)
    y = g.sum([dense, g.conv_bn(x, 4, 4, 1), g.batchnorm(x, 4)])
    y = g.node(tail, [y]) if tail else y
    fused, _ = fuse_exactly(g.build([dense, y]), ops={"Conv": 2, "BatchNormalization": 0, "Add": 1})
    kernels = sorted(attribute(n, "kernel_shape") for n in nodes_of(fused, "Conv"))
    assert kernels == [[1, 1], [3, 3]]
    assert producer(fused, dense).op_type == "Conv"


# ---- 10. opsets --------------------------------------------------------------------------

def test_opset_12_is_refused():
    g = GraphBuilder(np.float32)
    model = g.build(repvgg_block(g, g.input([1, 4, 6, 6]), 4, 4), opset=12)
    before = model.SerializeToString()
    with pytest.raises(OnnxFusionError, match="opset 12"):
        fuse_onnx_model(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("opset", [13, 21])
def test_opsets_13_and_up_fuse(opset):
    g = GraphBuilder(np.float32)
    y = g.node("Relu", [repvgg_block(g, g.input([1, 4, 6, 6]), 4, 4)])
    model = g.build(y, opset=opset)
    fuse_exactly(model, ops=FOLDED, patterns={"repvgg": 1})


# ---- 11. property: the blocks of reparam_fx.testing, exported from torch ------------------
#
# ``block_specs`` draws RepVGG / MobileOne / ACNet / RepMixer / CPE-like sums (kernels,
# strides, dilations, groups, padding modes, nonlinear branches, post BN, layer scale,
# residual; 1d and 2d); each is built in torch, exported (TorchScript, opset 17, no constant
# folding: every BatchNorm reaches the frontend) and fused. Outputs: ONNX Runtime, float32.
# Counts: the spec's oracle (``BlockSpec.expected_ops``, written independently of the engine)
# says how many Conv nodes the fused graph has, and at most how many BatchNormalization,
# Add, Sub and Mul nodes: the ONNX frontend may fold more than the oracle's rule, never less
# (it merges the residual of ``x + s * (dw(x) + pw(x))`` into the depthwise conv, a CPE,
# where the oracle, like fuse(module), keeps the residual add). A branch whose padding_mode
# is not 'zeros' is exported as a Pad node before a zero-padded Conv: the oracle models
# torch's conv, which such a padding keeps out of every merge, while in ONNX the Conv after
# the Pad is a plain linear term of the padded tensor and may merge with another one reading
# the same padded tensor; for those blocks the Conv count too may be lower, never higher.
# Half the profile's examples: each is a torch build and an ONNX export (~30 ms), and the
# torch properties (tests/test_properties.py) run the same specs against the same oracle.

ORACLE_OPS = {"conv": "Conv", "batch_norm": "BatchNormalization", "add": "Add", "sub": "Sub",
              "mul": "Mul"}


@settings(max_examples=max(10, settings().max_examples // 2))
@given(spec=block_specs(dims=(1, 2), max_channels=6), seed=st.integers(0, 2**16 - 1))
def test_random_multi_branch_blocks_fuse_exactly(spec, seed):
    note(spec.describe())
    model = export_torch(spec.build(seed=seed), spec.example_input(seed=seed))
    fused, report = fuse_checked(model)
    note(report.table())
    assert_same_outputs(model, fused)  # float32: ONNX Runtime, RTOL32
    assert conv_batchnorm_pairs(fused) == [], \
        "a BatchNormalization directly after a single-use Conv was not folded"
    counts = op_counts(fused)
    got = {op: counts[op_type] for op, op_type in ORACLE_OPS.items()}
    expected = spec.expected_ops()
    context = f"fused {got}, the oracle says {expected}\n{report.table()}"
    assert all(got[op] <= expected[op] for op in expected), context
    if all(branch.padding_mode == "zeros" for branch in spec.branches if branch.is_conv):
        assert got["conv"] == spec.expected_convs(), context
    event("merges" if spec.merges else f"does not merge: {spec.merge_reason}")
    if got != expected:
        event("the ONNX frontend folds more than the oracle")


# ---- 12. guards found unpinned in review: each must refuse (or stay exact) ---------------

@DTYPES
@pytest.mark.parametrize("mode, pads", [("SAME_UPPER", [0, 0, 1, 1]), ("SAME_LOWER", [1, 1, 0, 0])])
def test_auto_pad_same_with_an_even_kernel_folds(dtype, mode, pads):
    """At stride 1 SAME pads d(k-1) in all whatever the size: the odd one after (UPPER) or
    before (LOWER)."""
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    y = g.batchnorm(g.conv(x, 4, 4, 2, auto_pad=mode), 4)
    fused, _ = fuse_exactly(g.build(y), ops={"Conv": 1, "BatchNormalization": 0})
    assert attribute(only(fused, "Conv"), "pads") == pads


@DTYPES
def test_auto_pad_same_with_stride_2_and_an_even_kernel_left_alone(dtype):
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    y = g.batchnorm(g.conv(x, 4, 4, 2, stride=2, auto_pad="SAME_UPPER"), 4)
    fuse_refused(g.build(y), unchanged=("Conv", "BatchNormalization"), reason="input size")


@DTYPES
def test_gemm_with_trans_a_left_alone(dtype):
    g = GraphBuilder(dtype)
    x = g.input([5, 3])  # transposed: 3 rows of 5 features
    y = g.batchnorm(g.gemm(x, 5, 4, transA=1), 4)
    fuse_refused(g.build(y), unchanged=("Gemm", "BatchNormalization"), reason=None)


@DTYPES
def test_gemm_alpha_and_beta_are_folded_exactly(dtype):
    g = GraphBuilder(dtype)
    x = g.input([3, 5])
    y = g.batchnorm(g.gemm(x, 5, 4, alpha=2.0, beta=0.5), 4)
    fuse_exactly(g.build(y), ops={"Gemm": 1, "BatchNormalization": 0})


@DTYPES
def test_scalar_after_an_activation_stays_for_the_runtimes_fusion(dtype):
    g = GraphBuilder(dtype)
    x = g.input([2, 4, 6, 6])
    scaled = g.binary("Mul", g.node("Relu", [x]), g.constant(np.array(0.5), "half"))
    y = g.conv(scaled, 4, 6, 3, bias=True)
    fuse_refused(g.build(y), unchanged=("Mul", "Conv"), reason=None)


@DTYPES
def test_dilated_average_pool_left_alone(dtype):
    g = GraphBuilder(dtype)
    x = g.input([1, 4, 8, 8])
    pooled = g.node("AveragePool", [x], kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2],
                    count_include_pad=1)
    y = g.binary("Mul", pooled, g.constant(g.uniform((4, 1, 1), 0.5, 1.5), "scale"))
    fuse_refused(g.build(y, opset=19), unchanged=("AveragePool", "Mul"), reason="dilated")


# ---- 13. BatchNormalization's mode, by the graph's opset ---------------------------------
#
# BatchNormalization-9 (opsets 9 to 13) has no mode attribute: its optional outputs (mean,
# var, saved_mean, saved_var) make it a training node. From opset 14 ``training_mode`` says
# so, and the running-statistics outputs exist only in training mode. The torch exports of a
# training-mode model (``TrainingMode.TRAINING``) are in ``test_onnx_exports.py``.

def bn_with_outputs(opset: int, outputs: list[str], with_opset_of=(), dtype=np.float32,
                    **attrs) -> onnx.ModelProto:
    """conv -> BatchNormalization with ``outputs`` (names; "" for an omitted one), the BN's
    first output the graph output; ``with_opset_of``: other domains imported first."""
    g = GraphBuilder(dtype)
    conv = g.conv(g.input([2, 4, 6, 6]), 4, 4, 3)
    scale, bias, mean, var = (g.constant(g.uniform(4, 0.5, 1.5), p) for p in "sbmv")
    g.nodes.append(onnx.helper.make_node("BatchNormalization", [conv, scale, bias, mean, var],
                                         ["y", *outputs], name="bn", **attrs))
    model = g.build(["y"], opset=opset)
    for domain, version in with_opset_of:
        entry = onnx.helper.make_opsetid(domain, version)
        model.opset_import.insert(0, entry)
    return model


@pytest.mark.parametrize("others", [(), (("com.example", 20),), (("ai.onnx.ml", 3),)],
                         ids=["default-only", "custom-domain-first", "ml-domain-first"])
def test_opset_13_batchnorm_with_optional_outputs_is_training(others):
    """Opset 13, five outputs, no attribute: what ``torch.onnx.export(opset_version=13,
    training=TrainingMode.TRAINING)`` writes. ONNX Runtime runs it with batch statistics;
    folding the running ones would be wrong (43% off). Other domains' opset versions
    (listed first) do not decide it."""
    model = bn_with_outputs(13, ["mean", "var", "saved_mean", "saved_var"], others)
    fused, report = fuse_refused(model, unchanged=("Conv", "BatchNormalization"),
                                 reason="training mode")
    assert "opset 13" in " ".join(r.reason for r in report.skipped)
    assert not report.fused


def test_opset_13_batchnorm_with_omitted_optional_outputs_folds():
    """Optional outputs given as "" are omitted: test mode (BatchNormalization-9's case 2).
    Compared with the same graph written with one output: ONNX Runtime 1.32 crashes
    (segmentation fault) running the graph with the empty names, and the ONNX reference
    evaluator runs every BatchNormalization-9 that has a ``momentum`` in training mode."""
    fused, report = fuse_checked(bn_with_outputs(13, ["", "", "", ""]))
    assert_ops(fused, report, {"Conv": 1, "BatchNormalization": 0})
    assert report.pattern_counts() == Counter({"conv+bn": 1})
    verify_onnx(bn_with_outputs(13, []), fused, rtol=1e-5)


@pytest.mark.parametrize("opset", [13, 14, 15, 21])
def test_single_output_batchnorm_folds_in_every_opset(opset):
    fuse_exactly(bn_with_outputs(opset, [], (("com.example", 1),)),
                 ops={"Conv": 1, "BatchNormalization": 0}, patterns={"conv+bn": 1})


@pytest.mark.parametrize("opset", [14, 15])
def test_opset_14_running_statistics_outputs_refused(opset):
    """training_mode=1 with its running-statistics outputs (which nothing reads)."""
    model = bn_with_outputs(opset, ["running_mean", "running_var"], training_mode=1)
    fuse_refused(model, unchanged=("Conv", "BatchNormalization"), reason="training_mode=1")


# ---- 14. symbolic dimensions: read exactly where proven, else refused with a reason ------

def fuse_symbolic(model: onnx.ModelProto, shape) -> tuple:
    """``fuse_checked`` (names, types and dim_param names of inputs and outputs kept), then
    ONNX Runtime on ``shape`` (the symbolic dims given), rtol 1e-5."""
    fused, report = fuse_checked(model)
    verify_onnx(model, fused, input_shapes={"x": shape}, rtol=1e-5)
    return fused, report


def test_average_pool_over_a_symbolic_channel_count_is_refused_not_a_crash():
    """The pool's depthwise kernel needs the channel count, and ``C`` proves none."""
    g = GraphBuilder(np.float32)
    x = g.input(["N", "C", "H", "W"])
    y = g.node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    fused, report = fuse_symbolic(g.build(y), (2, 3, 7, 5))
    assert op_counts(fused) == op_counts(g.build(y))
    assert_reason(report, "symbolic dimension")


def test_average_pool_channels_proven_through_a_pad_and_by_the_conv_after_it():
    """``Pad -> AveragePool`` whose output shape inference leaves unknown (the pads come
    through ``ConstantOfShape``, as TorchScript writes ``F.pad``): the channel count is read
    through the Pad (zero on the channel axis) back to the input; conv + BN after the pool
    fold, the pool and the pad fold into one depthwise conv (no more MACs)."""
    g = GraphBuilder(np.float32)
    x = g.input(["N", 4, "H", "W"])
    zeros = g.node("ConstantOfShape", [g.constant(np.array([3], np.int64), "n")],
                   value=onnx.helper.make_tensor("v", onnx.TensorProto.INT64, [1], [0]))
    pads = g.node("Concat", [g.constant(np.array([0, 0, 0, 2], np.int64), "p"), zeros,
                             g.constant(np.array([2], np.int64), "p")], axis=0)
    padded = g.node("Pad", [x, pads])
    pooled = g.node("AveragePool", [padded], kernel_shape=[2, 2], count_include_pad=1)
    y = g.batchnorm(pooled, 4)
    model = g.build(y)
    fused, report = fuse_symbolic(model, (3, 4, 7, 6))
    assert op_counts(fused) == Counter({"Conv": 1}), report.table()
    conv = only(fused, "Conv")
    assert attribute(conv, "group") == 4 and attribute(conv, "pads") == [0, 2, 0, 2]


def test_output_dims_the_exporter_left_symbolic_stay_symbolic():
    """The input is static, the exporter could not infer the batch of the output
    (``[Gemm_dim_0, 5]``, timm's EfficientViT-M0): shape inference proves ``[1, 5]`` for the
    walk, but the fused graph keeps the declared dim and its name (``fuse_checked``). (The
    Gemm goes into the conv before the pool: BN, pool and flatten commute with it.)"""
    g = GraphBuilder(np.float32)
    x = g.input([1, 4, 6, 6])
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [g.conv_bn(x, 4, 8, 3)])])
    y = g.gemm(g.batchnorm(pooled, 8), 8, 5)
    model = g.build(y)
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "Gemm_dim_0"
    fused, report = fuse_exactly(model, ops={"BatchNormalization": 0, "Conv": 1, "Gemm": 0})
    dims = fused.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["Gemm_dim_0", 5]


# ---- 15. graph cleanups: constants, no-ops, slices (exact, fewer nodes) ------------------

def test_shape_arithmetic_on_static_shapes_becomes_constants():
    """``x.view(B, -1, H * W)`` as TorchScript writes it (Shape, Gather, Mul, Unsqueeze,
    Concat): with a static input every piece is a constant; Constant nodes become
    initializers; the Reshape stays and the BN after it folds into the conv before it."""
    g = GraphBuilder(np.float32, constant_nodes=True)
    x = g.input([2, 4, 3, 5])
    y = g.conv(x, 4, 6, 1)
    shape = g.node("Shape", [y])
    dims = [g.node("Gather", [shape, g.constant(np.array(i, np.int64), "i")], axis=0)
            for i in range(4)]
    spatial = g.binary("Mul", dims[2], dims[3])
    target = g.node("Concat", [g.node("Unsqueeze", [d, g.constant(np.array([0]), "a")])
                               for d in (dims[0], g.constant(np.array(-1), "m"), spatial)], axis=0)
    z = g.node("Reshape", [g.batchnorm(y, 6), target])
    fused, _ = fuse_exactly(g.build(z), ops={"Conv": 1, "BatchNormalization": 0, "Reshape": 1})
    assert len(fused.graph.node) == 2, op_counts(fused)


def test_symbolic_dims_are_never_folded_static_ones_are():
    """With a symbolic batch, ``Shape(x)[0]`` stays computed; ``Shape(x)[1]`` is 6."""
    g = GraphBuilder(np.float32)
    x = g.input(["N", 4, 3, 5])
    y = g.conv(x, 4, 6, 1)
    shape = g.node("Shape", [y])
    batch, channels = (g.node("Gather", [shape, g.constant(np.array([i], np.int64), "i")], axis=0)
                       for i in (0, 1))
    target = g.node("Concat", [batch, channels, g.constant(np.array([-1], np.int64), "m")], axis=0)
    z = g.node("Reshape", [y, target])
    fused, _ = fuse_symbolic(g.build(z), (3, 4, 3, 5))
    assert op_counts(fused) == Counter({"Conv": 1, "Shape": 1, "Gather": 1, "Concat": 1,
                                        "Reshape": 1}), op_counts(fused)


@pytest.mark.parametrize("op, inputs, attrs", [
    ("Pad", [np.zeros(8, np.int64)], {}),
    ("Transpose", [], {"perm": [0, 1, 2, 3]}),
    ("Cast", [], {"to": onnx.TensorProto.FLOAT}),
    ("Slice", [np.array([0]), np.array([2**63 - 1]), np.array([1])], {}),
    ("Slice", [np.array([-9]), np.array([9]), np.array([-1])], {}),
    ("Reshape", [np.array([0, -1, 6, 5])], {}),
    ("Identity", [], {}),
], ids=["zero-pad", "identity-perm", "cast-to-same", "slice-to-end", "slice-clamped",
        "reshape-to-same", "identity"])
@pytest.mark.parametrize("batch", [2, "N"], ids=["static", "symbolic"])
def test_no_op_is_removed(op, inputs, attrs, batch):
    """An op that returns its input unchanged goes, between two convs and as the last node
    (where the graph output's name moves to the node before it)."""
    g = GraphBuilder(np.float32)
    x = g.input([batch, 4, 6, 5])
    first = g.node(op, [g.conv(x, 4, 6, 3, bias=True), *(g.constant(v) for v in inputs)],
                   **attrs)
    second = g.node(op, [g.conv(g.node("Relu", [first]), 6, 6, 3, bias=True),
                         *(g.constant(v) for v in inputs)], **attrs)
    fused, _ = fuse_symbolic(g.build(second), (3 if batch == "N" else batch, 4, 6, 5))
    assert op_counts(fused) == Counter({"Conv": 2, "Relu": 1}), op_counts(fused)


@pytest.mark.parametrize("op, inputs, attrs", [
    ("Pad", [np.array([0, 0, 1, 0, 0, 0, 1, 0], np.int64)], {}),
    ("Transpose", [], {"perm": [0, 1, 3, 2]}),
    ("Cast", [], {"to": onnx.TensorProto.DOUBLE}),
    ("Slice", [np.array([1]), np.array([2**63 - 1]), np.array([1])], {}),
    ("Slice", [np.array([0]), np.array([5]), np.array([2])], {}),
    ("Reshape", [np.array([0, 6, 36])], {}),
], ids=["pad", "perm", "cast-to-other", "slice-from-1", "slice-short", "reshape"])
def test_op_that_changes_its_input_stays(op, inputs, attrs):
    g = GraphBuilder(np.float32)
    x = g.input(["N", 4, 6, 6])
    y = g.node(op, [g.conv(x, 4, 6, 3, bias=True), *(g.constant(v) for v in inputs)], **attrs)
    if op == "Cast":  # (and back: the graph's output is float32)
        y = g.node("Cast", [y], to=onnx.TensorProto.FLOAT)
    fused, _ = fuse_symbolic(g.build(y), (3, 4, 6, 6))
    assert op_counts(fused)[op] == (2 if op == "Cast" else 1)


def slices(g: GraphBuilder, x: str, bounds, axis: int = -1) -> list[str]:
    return [g.node("Slice", [x, g.constant(np.array([a])), g.constant(np.array([b])),
                             g.constant(np.array([axis]))]) for a, b in bounds]


@pytest.mark.parametrize("bounds", [
    [(0, 2), (2, 4), (4, 6)],  # TorchScript's chunk(3, -1)
    [(0, -1), (-1, 2**63 - 1)],  # out[..., :-1], out[..., -1:]
    [(4, 9), (0, 4)],  # in any order, the last one clamped
], ids=["chunk", "all-but-last", "unordered"])
def test_slices_cutting_an_axis_into_pieces_become_one_split(bounds):
    g = GraphBuilder(np.float32)
    x = g.conv(g.input(["N", 4, 5, 6]), 4, 4, 3, bias=True)
    pieces = slices(g, x, bounds)
    fused, _ = fuse_symbolic(g.build([g.node("Relu", [p]) for p in pieces]), (2, 4, 5, 6))
    assert op_counts(fused) == Counter({"Conv": 1, "Split": 1, "Relu": len(bounds)})


@pytest.mark.parametrize("bounds, axis, shape", [
    ([(0, 2), (3, 6)], -1, ["N", 4, 5, 6]),  # a gap
    ([(0, 4), (2, 6)], -1, ["N", 4, 5, 6]),  # overlapping
    ([(0, 2), (2, 4)], -1, ["N", 4, 5, 6]),  # not to the end
    ([(0, 1), (1, 2**63 - 1)], 0, ["N", 4, 5, 6]),  # a symbolic axis
], ids=["gap", "overlap", "short", "symbolic"])
def test_slices_that_do_not_partition_an_axis_stay(bounds, axis, shape):
    g = GraphBuilder(np.float32)
    x = g.conv(g.input(shape), 4, 4, 3, bias=True)
    pieces = slices(g, x, bounds, axis)
    fused, _ = fuse_symbolic(g.build([g.node("Relu", [p]) for p in pieces]), (2, 4, 5, 6))
    assert op_counts(fused)["Slice"] == len(bounds) and op_counts(fused)["Split"] == 0


def test_identity_of_a_large_weight_is_dropped_without_a_copy():
    """TorchScript routes shared weights through ``Identity``: the reader gets the weight
    itself (a large initializer is never read or copied to fold a node that moves it)."""
    g = GraphBuilder(np.float32)
    x = g.input([1, 16, 6, 6])
    weight = g.constant(g.uniform((16, 16, 3, 3)), "W")
    y = g.node("Relu", [g.node("Conv", [x, g.node("Identity", [weight])], kernel_shape=[3, 3],
                                pads=[1, 1, 1, 1])])
    model = g.build(y)
    fused, _ = fuse_exactly(model, ops={"Conv": 1, "Relu": 1, "Identity": 0})
    assert [t.name for t in fused.graph.initializer] == [weight]
    assert only(fused, "Conv").input[1] == weight
