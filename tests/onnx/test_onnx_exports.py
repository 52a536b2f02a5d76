"""ONNX frontend on torch exports, both exporters: symbolic dimensions, BatchNormalization
exported in training mode, and whole EfficientViT models (timm code shapes).

* Symbolic dims (``dynamic_axes`` / ``dynamic_shapes``): every place the frontend turns a
  shape into numbers reads a dimension only where the graph proves it (a number, or a size
  proven through the ops before it); otherwise the node is left alone with a reason. Each
  fused model is run by ONNX Runtime at sizes other than the export's, and keeps the
  export's input and output declarations (names, types, dim_param names).
* Training mode (``torch.onnx.TrainingMode.TRAINING``): at opset 13 the exporter writes a
  BatchNormalization with its optional outputs and no mode attribute (BatchNormalization-9:
  those outputs mean training), from opset 14 ``training_mode=1``. Never folded.
* EfficientViT-M0 (MSRA) and -B0 (MIT), the corpus's small timm models: static exports fold
  their shape arithmetic to constants and keep the output's declared dims; exports with a
  symbolic batch keep it, by name.

BatchNorm statistics, affine parameters and layer scales are randomised everywhere.
Comparisons: ONNX Runtime, float32, rtol 1e-5.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onnx_checks import assert_reason, fuse_checked, op_counts
from reparam_fx.onnx import verify_onnx
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_
from third_party import CORPUS, example_input, randomized_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import onnx_node_counts  # noqa: E402

RTOL = 1e-5
EXPORTERS = pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])


def export(model: nn.Module, x: torch.Tensor, dynamo: bool, dynamic: dict[int, str] | None = None,
           **options) -> onnx.ModelProto:
    """``model`` exported with input ``x`` named "x" and output "y"; ``dynamic``: the input's
    symbolic axes and their names (TorchScript: ``dynamic_axes``, opset 17 unless given;
    dynamo: ``dynamic_shapes``)."""
    dynamic = dynamic or {}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = {"x": {axis: torch.export.Dim(name, min=2, max=64)
                            for axis, name in dynamic.items()}} if dynamic else None
            return torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes,
                                     input_names=["x"], output_names=["y"]).model_proto
        buffer = io.BytesIO()
        options.setdefault("opset_version", 17)
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": dynamic} if dynamic else None,
                          **options)
    return onnx.load_from_string(buffer.getvalue())


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = model.eval()
    randomize_batchnorm_(model, seed=seed + 1)
    with torch.no_grad():
        randomize_parameters_(model, seed=seed + 2)
    return model


def signature(model: onnx.ModelProto) -> list:
    """Graph outputs as (name, dims), a dim a number or its dim_param name."""
    return [(value.name, [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim])
            for value in model.graph.output]


# ---- symbolic dimensions ------------------------------------------------------------------

def conv_bn(cin: int, cout: int, kernel: int = 3, padding: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, bias=False),
                         nn.BatchNorm2d(cout))


class Chain(nn.Module):
    """``f(self, x)`` with the given modules as attributes."""

    def __init__(self, f, **modules):
        super().__init__()
        self.f = f
        for name, module in modules.items():
            setattr(self, name, module)

    def forward(self, x):
        return self.f(self, x)


# name: (model, nodes after fusing, a node type that must stay and why, or None)
POOLS = {
    # the issue: TorchScript's F.pad leaves the pool's input shape unknown to shape inference
    "pad-avgpool": (lambda: Chain(lambda m, x: m.pool(F.pad(x, (2, 2))), pool=nn.AvgPool2d(2, 1)),
                    Counter({"Conv": 1}), None),
    "pad-avgpool-conv": (lambda: Chain(lambda m, x: m.conv(m.pool(F.pad(x, (1, 1, 1, 1)))),
                                       pool=nn.AvgPool2d(3, 1), conv=conv_bn(4, 4)),
                         Counter({"Conv": 2}), None),
    "conv-avgpool-bn": (lambda: Chain(lambda m, x: m.bn(m.pool(m.conv(x))), conv=conv_bn(4, 4),
                                      pool=nn.AvgPool2d(3, 1, 1), bn=nn.BatchNorm2d(4)),
                        Counter({"Conv": 2}), None),
    "conv-avgpool-s2-bn": (lambda: Chain(lambda m, x: m.bn(m.pool(m.conv(x))), conv=conv_bn(4, 4),
                                         pool=nn.AvgPool2d(3, 2, 1), bn=nn.BatchNorm2d(4)),
                           Counter({"Conv": 2}), None),
    "avgpool-exclude-pad": (lambda: Chain(lambda m, x: m.bn(m.pool(m.conv(x))), conv=conv_bn(4, 4),
                                          pool=nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                          bn=nn.BatchNorm2d(4)),
                            Counter({"Conv": 1, "AveragePool": 1, "BatchNormalization": 1}),
                            ("AveragePool", "count_include_pad=0")),
    "avgpool-ceil": (lambda: Chain(lambda m, x: m.bn(m.pool(m.conv(x))), conv=conv_bn(4, 4),
                                   pool=nn.AvgPool2d(3, 2, ceil_mode=True), bn=nn.BatchNorm2d(4)),
                     Counter({"Conv": 1, "AveragePool": 1, "BatchNormalization": 1}),
                     ("AveragePool", "ceil_mode")),
    "maxpool": (lambda: Chain(lambda m, x: m.bn(m.pool(m.conv(x))), conv=conv_bn(4, 4),
                              pool=nn.MaxPool2d(3, 1, 1), bn=nn.BatchNorm2d(4)),
                Counter({"Conv": 1, "MaxPool": 1, "BatchNormalization": 1}),
                ("BatchNormalization", "no conv or linear next to it")),
    "reflect-pad-conv": (lambda: Chain(lambda m, x: m.conv(F.pad(x, (1, 1, 1, 1), mode="reflect")),
                                       conv=conv_bn(4, 4, padding=0)),
                         Counter({"Pad": 1, "Conv": 1}), None),
    "zero-pad-conv": (lambda: Chain(lambda m, x: m.conv(F.pad(x, (1, 1, 1, 1))),
                                    conv=conv_bn(4, 4, padding=0)),
                      Counter({"Conv": 1}), None),
}
AXES = {"hw": {2: "height", 3: "width"}, "all": {0: "batch", 2: "height", 3: "width"}}


@EXPORTERS
@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("case", POOLS)
def test_pools_and_pads_with_symbolic_sizes(case, axes, dynamo):
    """Pools and pads on inputs of symbolic height and width (and batch): folded where
    exact (their channel count proven), refused with the reason where not, never a crash;
    run at 11x10 (exported at 8x8)."""
    build, expected, kept = POOLS[case]
    model = export(prepared(build()), torch.randn(2, 4, 8, 8), dynamo, AXES[axes])
    fused, report = fuse_checked(model)
    assert op_counts(fused) == expected, report.table()
    assert signature(fused) == signature(model)
    shape = (3 if 0 in AXES[axes] else 2, 4, 11, 10)
    assert verify_onnx(model, fused, input_shapes={"x": shape}, rtol=RTOL) <= RTOL
    if kept is not None:
        assert_reason(report, kept[1])


class Tokens(nn.Module):
    """``B, C, H, W = x.shape``: BN, then tokens, a linear and a BN1d on them, back."""

    def __init__(self):
        super().__init__()
        self.conv = conv_bn(4, 4)
        self.linear = nn.Linear(4, 6)
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.conv(x)
        batch, channels, height, width = x.shape
        tokens = self.linear(x.reshape(batch, channels, -1).transpose(1, 2))
        tokens = self.norm(tokens.flatten(0, 1)).reshape(batch, height * width, 6)
        return tokens.transpose(1, 2).reshape(batch, 6, height, width)


@EXPORTERS
@pytest.mark.parametrize("axes", AXES)
def test_shape_arithmetic_with_symbolic_sizes(axes, dynamo):
    """``x.shape`` read in forward, with symbolic sizes: the BatchNorms fold (the BN1d into
    the linear across the reshapes), the shape arithmetic on symbolic dims stays computed,
    the output keeps its dim_param names; run at other sizes."""
    model = export(prepared(Tokens()), torch.randn(2, 4, 3, 5), dynamo, AXES[axes])
    fused, report = fuse_checked(model)
    after = op_counts(fused)
    assert after["BatchNormalization"] == 0 and after["Conv"] == 1, report.table()
    assert after["MatMul"] + after["Gemm"] == 1, report.table()
    assert len(fused.graph.node) < len(model.graph.node)
    assert signature(fused) == signature(model)
    shape = (3 if 0 in AXES[axes] else 2, 4, 5, 4)
    assert verify_onnx(model, fused, input_shapes={"x": shape}, rtol=RTOL) <= RTOL


# ---- BatchNormalization exported in training mode -------------------------------------------

def training_export(opset: int, mode) -> onnx.ModelProto:
    """``Conv2d(2, 2, 3, padding=1) -> BatchNorm2d(2)`` (random statistics) exported by
    TorchScript at ``opset`` in ``mode``, without constant folding (which would fold the BN
    of an eval-mode export itself)."""
    model = prepared(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)))
    return export(model, torch.randn(2, 2, 5, 5), False, opset_version=opset, training=mode,
                  do_constant_folding=False)


@pytest.mark.parametrize("opset", [13, 14, 15, 17])
def test_batchnorm_exported_in_training_mode_is_not_folded(opset):
    """Opset 13: five outputs, no attribute (BatchNormalization-9: training); 14+:
    ``training_mode=1``. ONNX Runtime normalises by the batch's statistics there: folding
    the running ones was 43% off."""
    model = training_export(opset, torch.onnx.TrainingMode.TRAINING)
    (batchnorm,) = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(batchnorm.output) == (5 if opset < 14 else 3)
    assert not any(a.name == "training_mode" for a in batchnorm.attribute) or opset >= 14
    fused, report = fuse_checked(model)
    assert op_counts(fused) == op_counts(model), report.table()
    assert_reason(report, "training mode")
    assert not report.fused
    assert verify_onnx(model, fused, rtol=RTOL) <= RTOL


@pytest.mark.parametrize("opset", [13, 14, 17])
def test_batchnorm_exported_in_eval_mode_folds(opset):
    model = training_export(opset, torch.onnx.TrainingMode.EVAL)
    assert op_counts(model)["BatchNormalization"] == 1
    fused, report = fuse_checked(model)
    assert op_counts(fused) == Counter({"Conv": 1}), report.table()
    assert verify_onnx(model, fused, rtol=RTOL) <= RTOL


# ---- EfficientViT (timm code shapes, tests/third_party/timm_vit.py) --------------------------

EFFICIENTVITS = pytest.mark.parametrize("name", ["timm.efficientvit_msra_m0_tiny",
                                                 "timm.efficientvit_mit_b0_tiny"])
SHAPE_OPS = ("Shape", "Gather", "Constant", "ConstantOfShape", "Cast", "Unsqueeze")


def corpus_model(name: str, batch: int = 1):
    """The corpus entry in float32 (randomised), its own deploy conversion (None if the
    library has none), an input of ``batch`` samples."""
    idiom = CORPUS[name]
    model = randomized_model(idiom, dtype=torch.float32)
    own = None if idiom.reparameterize is None else idiom.reparameterize(copy.deepcopy(model))
    return model, own, example_input(idiom, dtype=torch.float32)[:batch]


@EFFICIENTVITS
@EXPORTERS
def test_efficientvit_static_export(name, dynamo):
    """A static export: every BatchNorm folds, the shape arithmetic becomes constants (no
    Shape, Gather, Constant ... left), and the fused graph has fewer nodes than the export of
    the model's own deploy form (timm's ``reparameterize_model``; EfficientViT-B0 has none)."""
    model, own, x = corpus_model(name)
    exported = export(model, x, dynamo)
    fused, report = fuse_checked(exported)
    after = op_counts(fused)
    assert after["BatchNormalization"] == 0, report.table()
    assert not any(after[op] for op in SHAPE_OPS), after
    reference = exported if own is None else export(own.eval(), x, dynamo)
    assert len(fused.graph.node) < len(reference.graph.node), (after, op_counts(reference))
    assert signature(fused) == signature(exported)
    assert verify_onnx(exported, fused, rtol=RTOL) <= RTOL


@EFFICIENTVITS
@EXPORTERS
def test_efficientvit_with_a_symbolic_batch_keeps_it(name, dynamo):
    """``dynamic_axes`` on the batch: the fused graph's output keeps its symbolic batch
    dim, by name; run at batch 3."""
    model, _, x = corpus_model(name, batch=2)
    exported = export(model, x, dynamo, {0: "batch"})
    (output,) = signature(exported)
    assert isinstance(output[1][0], str) and output[1][1] == 10
    fused, report = fuse_checked(exported)
    assert signature(fused) == signature(exported)
    assert op_counts(fused)["BatchNormalization"] == 0, report.table()
    assert len(fused.graph.node) < len(exported.graph.node)
    assert verify_onnx(exported, fused, input_shapes={"x": (3, *x.shape[1:])}, rtol=RTOL) <= RTOL


@EFFICIENTVITS
@EXPORTERS
def test_efficientvit_fewer_nodes_than_onnxslim(name, dynamo):
    """The issue's target, where onnxslim is installed (it is no dependency): fewer nodes
    than onnxslim makes of the export and of the export of the model's own deploy form."""
    onnxslim = pytest.importorskip("onnxslim")
    model, own, x = corpus_model(name)
    exported = export(model, x, dynamo)
    fused, _ = fuse_checked(exported)
    targets = [exported] + ([] if own is None else [export(own.eval(), x, dynamo)])
    for target in targets:
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(copy.deepcopy(target))
        assert len(fused.graph.node) < len(slim.graph.node), (op_counts(fused), op_counts(slim))


def test_node_counts_tool_refuses_an_unknown_model(capsys):
    """``tools/onnx_node_counts.py`` (the table of the EfficientViT numbers): bad names exit 2."""
    assert onnx_node_counts.main(["timm.no_such_model"]) == 2
    assert "no corpus model timm.no_such_model" in capsys.readouterr().err
