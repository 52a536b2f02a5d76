"""ONNX frontend: channel affines fold across layout moves (issue 10, the ONNX half).

The ONNX reading of :mod:`reparam_fx.onnx.moves`: ``Transpose``, ``Reshape``, ``Flatten``,
``Squeeze`` / ``Unsqueeze`` and ``ReduceMean`` / ``GlobalAveragePool`` are moves; a
BatchNormalization or a constant scale folds into the MatMul / Gemm next to it across
them when the graph proves the channel axis stays whole, and the moves are written again
around the one op (or dropped when they cancel).

Each chain below is a small torch model, in float64 with randomised BatchNorm statistics,
affine parameters and layer scales, exported with BOTH exporters (TorchScript, opset 17,
and ``dynamo=True``), then fused. Positive tests: outputs equal (ONNX reference evaluator,
and ONNX Runtime where it has float64 kernels, ``rtol=1e-10``), every BatchNormalization
(or scale) gone, no more MatMul/Gemm than before, fewer nodes. Negative tests: a move
mixes the channel axis into another axis (or puts it where the next op does not act),
nothing folds there, the report says why. Every fusion also checks that the input model is
unchanged and the graph's inputs/outputs keep names, types and shapes
(``onnx_checks.fuse_checked``).

    LeViT LinearNorm   MatMul + Add -> Flatten/Reshape -> BatchNormalization -> Reshape back
    tokens             BatchNormalization -> Reshape(B, C, -1) -> Transpose -> MatMul (q, k, v)
    channels-last      Transpose(0,2,3,1) -> MatMul -> Mul(gamma) -> Transpose(0,3,1,2)
    heads              BatchNormalization -> GlobalAveragePool/ReduceMean/Flatten -> Gemm

Last: a graph with a symbolic batch size, and a hypothesis property checking each move's
axis map against ONNX's own semantics (a matrix on a mapped axis commutes with the move).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from onnx_checks import (GraphBuilder, RTOL64, assert_reason, assert_same_outputs, fuse_checked,
                         op_counts)
from reparam_fx.onnx import constant_value
from reparam_fx.onnx.moves import graph_sizes, interpret_move
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_
from onnx_checks import export

EXPORTERS = pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
MIXES = "merges or splits the channel axis"  # the report's reason when a move mixes it
LINEARS = ("MatMul", "Gemm")
B, N, H, W, C, D = 2, 6, 2, 3, 4, 6  # batch, tokens (= H * W), image sides, channels in/out


def prepared(model: nn.Module) -> nn.Module:
    """float64, eval mode, random BatchNorm statistics and affine parameters, random
    layer scales (``gamma``)."""
    model = model.double().eval()
    randomize_batchnorm_(model, seed=3)
    with torch.no_grad():
        randomize_parameters_(model, seed=4)
    return model


def exported_model(model: nn.Module, x: torch.Tensor, dynamo: bool) -> onnx.ModelProto:
    model = prepared(model)
    with torch.no_grad():
        return export(model, x.double(), dynamo)


def fuse_without_dangling_nodes(model: onnx.ModelProto):
    """``fuse_checked(model)``, and every node of the result is read (by a node or as a
    graph output): moves written again replace the old ones, nothing is left behind."""
    fused, report = fuse_checked(model)
    read = {name for node in fused.graph.node for name in node.input}
    read.update(value.name for value in fused.graph.output)
    dangling = [node.name or node.op_type for node in fused.graph.node
                if not read.intersection(node.output)]
    assert not dangling, f"nodes nothing reads: {dangling}"
    return fused, report


def fuse_folded(model: onnx.ModelProto, *, folded=("BatchNormalization",),
                allow_same_count: bool = False):
    """Positive check: outputs equal in float64, no ``folded`` node left, no more linear
    nodes than before, fewer nodes in all (or, ``allow_same_count``, no more)."""
    fused, report = fuse_without_dangling_nodes(model)
    assert_same_outputs(model, fused, RTOL64)
    before, after = op_counts(model), op_counts(fused)
    graph = "\n".join(f"  {n.op_type}({', '.join(n.input)})" for n in fused.graph.node)
    context = f"{report.table()}\n{graph}"
    assert before.keys() >= set(folded), f"the export has no {folded}: {before}"
    assert not any(after[op] for op in folded), context
    assert sum(after[op] for op in LINEARS) <= sum(before[op] for op in LINEARS), context
    assert len(fused.graph.node) <= len(model.graph.node) - (not allow_same_count), context
    return fused, report, before, after


def fuse_unfolded(model: onnx.ModelProto, *, kept: tuple[str, ...], reason: str):
    """Negative check: outputs equal, the ``kept`` nodes all still there, ``reason`` given."""
    fused, report = fuse_without_dangling_nodes(model)
    assert_same_outputs(model, fused, RTOL64)
    before, after = op_counts(model), op_counts(fused)
    assert all(after[op] == before[op] > 0 for op in kept), (before, after, report.table())
    assert_reason(report, reason)
    return fused, report


def moves(counts: Counter) -> int:
    return sum(counts[op] for op in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"))


# ---- 1. LeViT LinearNorm: the BatchNorm1d between reshapes folds into the linear ------------

class LinearNorm(nn.Module):
    """timm ``levit.LinearNorm``: ``bn(linear(x).flatten(0, 1)).reshape_as(x)``."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear = nn.Linear(cin, cout)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class FlatLinearNorm(nn.Module):
    """The same on flattened tokens: a ``Gemm``, then the BatchNorm, then the reshape."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear = nn.Linear(cin, cout)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        batch, tokens, _ = x.shape
        return self.bn(self.linear(x.flatten(0, 1))).reshape(batch, tokens, -1)


class LeViTChains(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = LinearNorm(C, D)
        self.flat = FlatLinearNorm(C, D)

    def forward(self, x):
        return self.norm(x), self.flat(x)


@EXPORTERS
def test_levit_linear_norm_folds(dynamo):
    _, _, before, after = fuse_folded(exported_model(LeViTChains(), torch.randn(B, N, C),
                                                     dynamo))
    # LinearNorm: its reshapes cancel (MatMul + Add alone); the Gemm keeps its reshape
    assert moves(after) == 2, (before, after)
    assert after["Shape"] == 0 and after["BatchNormalization"] == 0


class HeadsNorm(nn.Module):
    """LeViT attention's ``qkv(x).view(B, N, heads, -1)``: a bias-free LinearNorm whose
    output is split into heads (the dynamo export merges ``reshape_as`` and ``view`` into
    one Reshape, so the region ends at the BatchNorm: ``MatMul -> Reshape -> BN``)."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = LinearNorm(C, D)
        self.qkv.linear.bias = None

    def forward(self, x):
        batch, tokens, _ = x.shape
        return self.qkv(x).view(batch, tokens, self.heads, -1)


@EXPORTERS
def test_levit_norm_before_a_split_into_heads_folds(dynamo):
    """The BatchNorm's shift becomes the MatMul's bias (one Add), and the flatten before
    the BatchNorm is not written again: the split into heads reshapes to constant sizes
    right after it, so the graph loses a node either way."""
    _, report, before, after = fuse_folded(
        exported_model(HeadsNorm(), torch.randn(B, N, C), dynamo))
    assert after["MatMul"] == before["MatMul"] == 1 and after["Add"] == 1
    assert after["Reshape"] <= 1 and sum(after.values()) < sum(before.values())
    assert len(report.fused) == 1


class SplitNorm(nn.Module):
    """A BatchNorm on half channels: the reshape splits the channel axis, nothing folds."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(C, D)
        self.bn = nn.BatchNorm1d(D // 2)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.reshape(-1, D // 2)).reshape_as(x)


@EXPORTERS
def test_levit_norm_on_split_channels_is_not_folded(dynamo):
    model = exported_model(SplitNorm(), torch.randn(B, N, C), dynamo)
    fuse_unfolded(model, kept=("BatchNormalization", "MatMul", "Add"), reason=MIXES)


# ---- 2. tokens: a BatchNorm2d before reshape + transpose folds into q, k and v -------------

class TokenChains(nn.Module):
    """Next-ViT style: one pre-norm read by three projections; and one read by one."""

    def __init__(self, qkv_bias=True):
        super().__init__()
        self.norm = nn.BatchNorm2d(C)
        self.q, self.k = nn.Linear(C, D, bias=qkv_bias), nn.Linear(C, D, bias=qkv_bias)
        self.v = nn.Linear(C, C, bias=qkv_bias)
        self.norm2 = nn.BatchNorm2d(C)
        self.proj = nn.Linear(C, D)

    def forward(self, x):
        batch, channels, _, _ = x.shape
        t = self.norm(x).reshape(batch, channels, -1).transpose(1, 2)
        u = self.proj(self.norm2(x).flatten(2).transpose(1, 2))
        return self.q(t), self.k(t), self.v(t), u


@EXPORTERS
def test_token_batchnorm_folds_into_every_projection(dynamo):
    _, report, before, after = fuse_folded(exported_model(TokenChains(), torch.randn(B, C, H, W),
                                                          dynamo))
    assert after["Transpose"] == before["Transpose"], "q, k and v share one moved input"
    assert after["MatMul"] == before["MatMul"] == 4
    assert len(report.fused) == 4


@EXPORTERS
def test_bias_free_projections_keep_their_shared_batchnorm(dynamo):
    """Folded into q, k and v without bias, the BatchNorm's shift would become three bias
    Adds where there was one BatchNormalization: the ONNX frontend writes only rewrites
    that remove nodes, so that BatchNorm stays (the other one folds)."""
    model = exported_model(TokenChains(qkv_bias=False), torch.randn(B, C, H, W), dynamo)
    fused, report = fuse_without_dangling_nodes(model)
    assert_same_outputs(model, fused, RTOL64)
    before, after = op_counts(model), op_counts(fused)
    assert after["BatchNormalization"] == 1 and after["MatMul"] == before["MatMul"], report.table()
    assert len(report.fused) == 1


class MixedTokens(nn.Module):
    """The reshape merges channels with rows: the Linear acts on the columns."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(C)
        self.proj = nn.Linear(W, D)

    def forward(self, x):
        batch, channels, rows, columns = x.shape
        return self.proj(self.norm(x).reshape(batch, channels * rows, columns))


@EXPORTERS
def test_reshape_mixing_channels_and_rows_is_not_folded(dynamo):
    model = exported_model(MixedTokens(), torch.randn(B, C, H, W), dynamo)
    fuse_unfolded(model, kept=("BatchNormalization", "MatMul"), reason=MIXES)


# ---- 3. channels-last: a layer scale folds into the linear (or the conv) before it ----------

class ChannelsLastChains(nn.Module):
    """ConvNeXt block tails: ``pwconv(x.permute(0, 2, 3, 1)) * gamma`` permuted back; and a
    depthwise conv whose output is permuted, scaled and permuted back (the moves cancel)."""

    def __init__(self):
        super().__init__()
        self.pwconv = nn.Linear(C, D)
        self.gamma = nn.Parameter(torch.ones(D))
        self.dwconv = nn.Conv2d(C, C, 3, padding=1, groups=C)
        self.gamma2 = nn.Parameter(torch.ones(C))

    def forward(self, x):
        y = (self.pwconv(x.permute(0, 2, 3, 1)) * self.gamma).permute(0, 3, 1, 2)
        z = (self.dwconv(x).permute(0, 2, 3, 1) * self.gamma2).permute(0, 3, 1, 2)
        return y, z


@EXPORTERS
def test_channels_last_layer_scale_folds(dynamo):
    _, _, before, after = fuse_folded(
        exported_model(ChannelsLastChains(), torch.randn(B, C, H, W), dynamo), folded=("Mul",))
    assert after["Transpose"] == before["Transpose"] - 2, "the conv's transposes cancel"
    assert after["Conv"] == before["Conv"] == 1


class ScaleOnRows(nn.Module):
    """The permute puts the channels on axis -2; the scale acts on the last axis."""

    def __init__(self):
        super().__init__()
        self.dwconv = nn.Conv2d(C, C, 3, padding=1, groups=C)
        self.gamma = nn.Parameter(torch.ones(W))

    def forward(self, x):
        return (self.dwconv(x).permute(0, 2, 1, 3) * self.gamma).permute(0, 2, 1, 3)


@EXPORTERS
def test_scale_on_another_axis_after_a_permute_is_not_folded(dynamo):
    model = exported_model(ScaleOnRows(), torch.randn(B, C, H, W), dynamo)
    fuse_unfolded(model, kept=("Mul", "Conv", "Transpose"), reason="different tensor axes")


# ---- 4. heads: a BatchNorm2d before pooling / flattening folds into the classifier -----------

class HeadChains(nn.Module):
    """Pooled (GlobalAveragePool or ReduceMean, then Flatten / Squeeze / nothing) and
    flattened (``flatten(1)`` of the whole feature map) BatchNorm2d -> Linear heads."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm2d(C) for _ in range(4))
        self.fcs = nn.ModuleList([nn.Linear(C, D), nn.Linear(C, D), nn.Linear(C, D),
                                  nn.Linear(C * H * W, D)])

    def forward(self, x):
        a, b, c, d = (norm(x) for norm in self.norms)
        return (self.fcs[0](F.adaptive_avg_pool2d(a, 1).flatten(1)),
                self.fcs[1](b.mean((2, 3))),
                self.fcs[2](F.adaptive_avg_pool2d(c, 1).squeeze(-1).squeeze(-1)).unsqueeze(1),
                self.fcs[3](d.flatten(1)))


@EXPORTERS
def test_batchnorm_before_pooling_or_flatten_folds_into_the_head(dynamo):
    _, _, before, after = fuse_folded(exported_model(HeadChains(), torch.randn(B, C, H, W), dynamo))
    pools = ("GlobalAveragePool", "ReduceMean")
    assert sum(after[op] for op in pools) == sum(before[op] for op in pools) == 3
    assert moves(after) == moves(before)
    assert sum(after[op] for op in LINEARS) == 4


class ChannelMeanHead(nn.Module):
    """The mean runs over the channels: there is no channel axis left to fold into."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(C)
        self.fc = nn.Linear(H * W, D)

    def forward(self, x):
        return self.fc(self.norm(x).mean(1, keepdim=True).flatten(1))


@EXPORTERS
def test_mean_over_the_channels_is_not_folded(dynamo):
    model = exported_model(ChannelMeanHead(), torch.randn(B, C, H, W), dynamo)
    fuse_unfolded(model, kept=("BatchNormalization",), reason=MIXES)


# ---- a symbolic batch size: sizes are proven as products of named dimensions ---------------------

def test_symbolic_batch_reshapes_cancel():
    """``(batch, 5, 4) -MatMul-> Reshape(-1, 6) -> BN -> Reshape(-1, 5, 6)``: the first
    ``-1`` is ``5 * batch``, the second ``batch``: the reshapes cancel, MatMul + Add
    remain."""
    g = GraphBuilder(np.float64)
    x = g.input(["batch", 5, 4])
    y = g.binary("MatMul", x, g.constant(g.uniform((4, 6)), "W"))
    y = g.binary("Add", y, g.constant(g.uniform(6), "B"))
    y = g.node("Reshape", [y, g.constant(np.array([-1, 6], dtype=np.int64), "shape")])
    y = g.batchnorm(y, 6)
    y = g.node("Reshape", [y, g.constant(np.array([-1, 5, 6], dtype=np.int64), "shape")])
    model = g.build(y)
    fused, _ = fuse_without_dangling_nodes(model)
    assert op_counts(fused) == Counter({"MatMul": 1, "Add": 1})
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 5, 4))}
    (expected,), (actual,) = (ReferenceEvaluator(m).run(None, feeds) for m in (model, fused))
    assert np.abs(actual - expected).max() <= RTOL64 * np.abs(expected).max()


@pytest.mark.parametrize("split", [[10, 3, 2], [0, 3, 2]])
def test_flatten_before_a_reshape_to_constant_sizes_is_not_written_again(split):
    """``MatMul -> Reshape(-1, 6) -> BN -> Reshape(split)``: the BN becomes the MatMul's
    bias; the flatten need not be written again before a reshape to constant sizes
    (``[10, 3, 2]``), but is before one whose 0 copies a size of its input."""
    g = GraphBuilder(np.float64)
    x = g.input([2, 5, 4])
    y = g.binary("MatMul", x, g.constant(g.uniform((4, 6)), "W"))
    y = g.node("Reshape", [y, g.constant(np.array([-1, 6], dtype=np.int64), "flat")])
    y = g.batchnorm(y, 6)
    y = g.node("Reshape", [y, g.constant(np.array(split, dtype=np.int64), "split")])
    model = g.build(y)
    fused, _ = fuse_without_dangling_nodes(model)
    reshapes = 1 if split[0] else 2
    assert op_counts(fused) == Counter({"MatMul": 1, "Add": 1, "Reshape": reshapes})
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 4))}
    (expected,), (actual,) = (ReferenceEvaluator(m).run(None, feeds) for m in (model, fused))
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= RTOL64 * np.abs(expected).max()


def test_unknown_sizes_prove_nothing():
    """A dimension with neither a value nor a name may be anything: ``(n, 4, 3)`` reshaped
    to ``(2, -1, 3)`` keeps the channels whole only if ``n == 2``; not proven, nothing
    folds, the report says why."""
    g = GraphBuilder(np.float64)
    x = g.input([None, 4, 3])
    y = g.node("Reshape", [g.batchnorm(x, 4), g.constant(np.array([2, -1, 3], np.int64), "s")])
    y = g.binary("MatMul", g.node("Transpose", [y], perm=[0, 2, 1]),
                 g.constant(g.uniform((4, 6)), "W"))
    fused, report = fuse_without_dangling_nodes(g.build(y))
    assert op_counts(fused)["BatchNormalization"] == 1
    assert_reason(report, MIXES)


# ---- property: each move's axis map agrees with ONNX's semantics ------------------------------

@st.composite
def moves_on_shapes(draw):
    """A random input shape (static, small) and a move node on it."""
    rank = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    op = draw(st.sampled_from(["Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                               "ReduceMean", "GlobalAveragePool"]))
    inputs, attrs = [], {}
    if op == "Transpose":
        attrs["perm"] = draw(st.permutations(range(rank)))
    elif op == "Reshape":  # a regrouping of the sizes (factors moved between axes), 0 and -1
        sizes = [f for s in shape for f in ((2, s // 2) if s == 4 else (s,))]
        cuts = sorted(draw(st.sets(st.integers(1, max(len(sizes) - 1, 1)), max_size=3)))
        groups = [sizes[a:b] for a, b in zip([0, *cuts], [*cuts, len(sizes)]) if sizes[a:b]]
        target = [int(np.prod(group)) for group in groups]
        if draw(st.booleans()):
            target[draw(st.integers(0, len(target) - 1))] = -1
        target = [0 if j < rank and t == shape[j] and draw(st.booleans()) else t
                  for j, t in enumerate(target)]
        inputs.append(np.array(target, dtype=np.int64))
    elif op == "Flatten":
        attrs["axis"] = draw(st.integers(-rank, rank))
    elif op == "Squeeze":
        ones = [a for a, s in enumerate(shape) if s == 1]
        if ones and draw(st.booleans()):
            inputs.append(np.array(draw(st.lists(st.sampled_from(ones), min_size=1, unique=True)),
                                   dtype=np.int64))
    elif op == "Unsqueeze":
        inputs.append(np.array([draw(st.integers(-rank - 1, rank))], dtype=np.int64))
    elif op == "ReduceMean":
        attrs["axes"] = draw(st.lists(st.integers(0, rank - 1), min_size=1, unique=True))
        attrs["keepdims"] = draw(st.sampled_from([0, 1]))
    elif rank < 3:
        shape += [2] * (3 - rank)  # GlobalAveragePool wants (N, C, *spatial)
    return shape, op, inputs, attrs


def _run_move(shape, op, inputs, attrs, x):
    names = [f"c{i}" for i in range(len(inputs))]
    node = helper.make_node(op, ["x", *names], ["y"], **attrs)
    graph = helper.make_graph([node], "move", [helper.make_tensor_value_info(
        "x", TensorProto.DOUBLE, shape)], [helper.make_tensor_value_info("y", TensorProto.DOUBLE,
                                                                        None)],
        [onnx.numpy_helper.from_array(v, n) for v, n in zip(inputs, names)])
    opset = 17 if op == "ReduceMean" else 18
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def _along(values: np.ndarray, axis: int, matrix: np.ndarray) -> np.ndarray:
    """``matrix`` applied to every vector along ``axis`` (a pointwise op on that axis)."""
    return np.moveaxis(np.tensordot(matrix, np.moveaxis(values, axis, 0), axes=1), 0, axis)


@given(moves_on_shapes(), st.integers(0, 2 ** 16))
def test_move_axis_maps_commute_with_pointwise_ops(case, seed):
    """For every input axis the move maps to an output axis: ``move(M on axis) == M on
    the mapped axis (move)`` for a random matrix ``M``; the maps are inverse."""
    shape, op, inputs, attrs = case
    x_var = gs.Variable("x", dtype=np.float64, shape=shape)
    node = gs.Node(op, attrs=attrs, inputs=[x_var, *(gs.Constant(f"c{i}", v)
                                                      for i, v in enumerate(inputs))],
                   outputs=[gs.Variable("y", dtype=np.float64)])
    move = interpret_move(node, lambda var: graph_sizes(var.shape), constant_value)
    assert move is not None, "a static shape always gives a map"
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    y = _run_move(shape, op, inputs, attrs, x)
    assert len(move.out_sizes) == y.ndim
    for axis in range(-len(shape), 0):
        mapped = move.forward(axis)
        if mapped is None:
            continue
        assert move.backward(mapped) == axis
        matrix = rng.standard_normal((shape[axis], shape[axis]))
        moved_after = _run_move(shape, op, inputs, attrs, _along(x, axis, matrix))
        np.testing.assert_allclose(moved_after, _along(y, mapped, matrix), rtol=1e-12, atol=1e-12)
