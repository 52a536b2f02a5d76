"""Acceptance on other people's code: every model of the third-party corpus
(``tests/third_party``: timm, ultralytics, YOLOv6, RT-DETR, OpenMMLab, MobileCLIP,
ACNet/DBB code shapes) fused by ``reparam_fx.fuse(model)`` with no ``example_inputs``,
and through ``torch.export``, is

* exact: float64 relative error <= 1e-10, and fp32 <= 1e-5 on the fp32 model;
* at most as many linear ops (conv, BatchNorm, linear, add, sub, mul, div) as the least
  of the library's own re-parameterization, ``torch.fx.experimental.optimization.fuse``
  and a plain conv+BN fold of the exported graph, all counted in the same way (on the
  ``torch.export`` graph of each model) - without example inputs wherever symbolic tracing
  sees the whole model; a block whose code does not trace (shape control flow) is fused
  inside on its own there, and fully through ``torch.export``, where this is checked too;
* the same op counts through both captures (symbolic tracing and ``torch.export``);
* refused where the entry says a fold would be wrong (``must_remain``, ``reason``);
* and the input model is left untouched.

BatchNorm statistics and constant-initialised parameters are randomised everywhere.
"""

from __future__ import annotations

import copy
import functools
import os
from collections import Counter

import pytest
import torch
import torch.fx.experimental.optimization as fx_optimization

import reparam_fx
from third_party import CORPUS, example_input, randomized_model

RTOL_F64 = 1e-10
RTOL_FP32 = 1e-5
LINEAR_OPS = ("conv", "batch_norm", "linear", "add", "sub", "mul", "div")


def linear_ops(counts: Counter) -> int:
    return sum(counts.get(op, 0) for op in LINEAR_OPS)


def exported_counts(model, x) -> Counter:
    """Op histogram of ``model``'s ``torch.export`` graph: every model counted one way."""
    return reparam_fx.op_counts(torch.export.export(model, (x,)))


def plain_conv_bn_fold(model, x) -> Counter:
    """What folding each BatchNorm into the conv right before it (and used by nothing
    else) leaves of the exported graph: the fold every generic tool does."""
    program = torch.export.export(model, (x,))
    counts = reparam_fx.op_counts(program)
    for node in program.graph.nodes:
        name = getattr(node.target, "__name__", "")
        source = node.args[0] if node.args else None
        # aten.batch_norm(input, weight, bias, running_mean, running_var, training, ...)
        if name.startswith("batch_norm") and isinstance(source, torch.fx.Node) and \
                getattr(source.target, "__name__", "").startswith(("conv", "convolution")) \
                and len(source.users) == 1 and node.args[3] is not None and not node.args[5]:
            counts["batch_norm"] -= 1
    return counts


def baselines(idiom, model, x) -> dict[str, Counter]:
    found = {"conv+bn fold": plain_conv_bn_fold(model, x)}
    if idiom.reparameterize is not None:
        found["own"] = exported_counts(idiom.reparameterize(copy.deepcopy(model)).eval(), x)
    if idiom.traceable:
        found["fx fuse"] = exported_counts(fx_optimization.fuse(model), x)
    return found


@functools.lru_cache(maxsize=None)
def best_baseline(name: str) -> dict[str, int]:
    """Linear ops of each baseline for one corpus entry (computed once per test run: the
    model is built and randomised the same way every time)."""
    idiom = CORPUS[name]
    model, x = randomized_model(idiom), example_input(idiom)
    return {label: linear_ops(c) for label, c in baselines(idiom, model, x).items()}


def _check_refusals(idiom, fused, x):
    # counted on the exported graph where there is one: ops inside untraceable blocks too
    counts = exported_counts(fused, x) if idiom.exportable else reparam_fx.op_counts(fused)
    for op, at_least in idiom.must_remain.items():
        assert counts.get(op, 0) >= at_least, (op, dict(counts), fused.fusion_report.table())
    if idiom.reason is not None:
        reasons = " ".join([s.reason for s in fused.fusion_report.skipped]
                           + [leaf.reason for leaf in fused.fusion_report.leaves])
        assert idiom.reason in reasons, fused.fusion_report.table()


EXPORTABLE = sorted(name for name, idiom in CORPUS.items() if idiom.exportable)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_fuse_without_example_inputs(name):
    idiom = CORPUS[name]
    model = randomized_model(idiom)
    x = example_input(idiom)
    before = copy.deepcopy(model.state_dict())
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL_F64) <= RTOL_F64
    if not idiom.proves_rank:  # refused without inputs; the targets hold with them
        reasons = " ".join(s.reason for s in fused.fusion_report.skipped)
        assert "pass example_inputs" in reasons, fused.fusion_report.table()
        fused = reparam_fx.fuse(model, (x,))
        assert reparam_fx.verify(model, fused, (x,), rtol=RTOL_F64) <= RTOL_F64
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"fuse changed the input's {key}"
    report = fused.fusion_report
    assert report.params_after == reparam_fx.parameter_count(fused)
    assert report.params_after <= report.params_before <= reparam_fx.parameter_count(model)
    if idiom.traceable:
        assert report.fused or idiom.must_remain, report.table()
    _check_refusals(idiom, fused, x)
    if idiom.exportable:
        got = linear_ops(exported_counts(fused, x))
        if idiom.traceable:
            table = best_baseline(name)
        else:  # untraceable blocks fused inside only: never more ops than the model
            table = {"model": linear_ops(exported_counts(model, x))}
        assert got <= min(table.values()), (got, table, fused.fusion_report.table())


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_fp32_model_fuses_within_fp32_round_off(name):
    idiom = CORPUS[name]
    model = randomized_model(idiom, dtype=torch.float32)
    fused = reparam_fx.fuse(model)
    x = example_input(idiom, dtype=torch.float32)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL_FP32, precision="model") <= RTOL_FP32


@pytest.mark.parametrize("name", EXPORTABLE)
def test_exported_program_fuses_like_the_traced_model(name):
    idiom = CORPUS[name]
    model = randomized_model(idiom)
    x = example_input(idiom)
    fused = reparam_fx.fuse(torch.export.export(model, (x,)))
    assert fused.fusion_report.frontend == "aten"
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL_F64) <= RTOL_F64
    _check_refusals(idiom, fused, x)
    got = linear_ops(reparam_fx.op_counts(fused))
    table = best_baseline(name)
    assert got <= min(table.values()), (got, table, fused.fusion_report.table())
    if idiom.traceable:  # both captures see the whole model and its shapes: the same folds
        traced = exported_counts(reparam_fx.fuse(model, (x,)), x)
        exported = reparam_fx.op_counts(fused)
        assert {op: traced.get(op, 0) for op in LINEAR_OPS} == \
            {op: exported.get(op, 0) for op in LINEAR_OPS}, fused.fusion_report.table()


# core ATen's forms, one model per library and form (BN tuples, addmm heads, slice_scatter
# border writes, decomposed activations, transposed convs, frozen BN, computed weights);
# every exportable model with ``make test-thorough`` (each takes two decompositions)
CORE_ATEN = EXPORTABLE if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else [
    "acnet.acb_crop", "dbb.grouped_k5_block", "dbb.resnet", "mmcv.conv_module_efficient_conv_bn_eval",
    "mmpretrain.mobileone", "mobileclip.repmixer", "rtdetr.hgnetv2_frozen_bn",
    "timm.byobnet_repvgg_a0", "timm.efficientnet", "timm.fastvit_sa_tiny", "timm.ghostnetv3",
    "timm.repvit_tiny", "timm.resnetv2_std_conv", "ultralytics.conv_transpose_bn",
    "ultralytics.yolov8_c2f", "yolov6.qarepvgg_v2_avgpool"]


@pytest.mark.parametrize("name", CORE_ATEN)
def test_core_aten_program_fuses_like_the_training_ir(name):
    """After ``run_decompositions()``: BatchNorm as ``_native_batch_norm_legit_no_training``
    + ``getitem``, linears as ``addmm``, border writes as ``slice_scatter`` chains, activations
    decomposed. Never fewer folds than the training IR (counted after the same decomposition);
    sometimes more (a decomposed ``hardswish``'s ``/ 6`` folds into the next conv)."""
    idiom = CORPUS[name]
    model = randomized_model(idiom)
    x = example_input(idiom)
    program = torch.export.export(model, (x,))
    fused = reparam_fx.fuse(program.run_decompositions())
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL_F64) <= RTOL_F64
    training_ir = reparam_fx.op_counts(
        torch.export.export(reparam_fx.fuse(program), (x,)).run_decompositions())
    got = reparam_fx.op_counts(fused)
    # (per op, except that a 3-D linear core ATen spells expand + bmm [+ add], which the
    # histogram does not count as a linear, may come back as one aten.linear)
    assert linear_ops(got) <= linear_ops(training_ir), (dict(got), dict(training_ir))
    for op in LINEAR_OPS:
        if op not in ("linear", "add"):
            assert got.get(op, 0) <= training_ir.get(op, 0), (op, dict(got), dict(training_ir))
