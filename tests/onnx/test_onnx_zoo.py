"""Zoo models exported with both torch exporters, fused on the ONNX graph, compared in
ONNX Runtime; the fused graph has no more nodes than the export of the same model in its
inference form (fused on the torch side, where every family reaches its deployed form)."""


import onnx
import pytest
import torch

import reparam_fx
import zoo
from reparam_fx.onnx import fuse_onnx_model, verify_onnx
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_
from onnx_checks import export

SMALLEST = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "mobilevit_xxs")
RTOL_FP32 = 1e-5


@pytest.fixture(scope="module", params=SMALLEST)
def model_and_input(request):
    model = zoo.create(request.param).eval()
    randomize_batchnorm_(model, seed=31)
    randomize_parameters_(model, seed=32)
    return request.param, model, torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_exported_zoo_model_fuses_to_its_inference_form(model_and_input, dynamo):
    name, model, x = model_and_input
    exported = export(model, x, dynamo)
    before = exported.SerializeToString()
    fused, report = fuse_onnx_model(exported)
    assert exported.SerializeToString() == before, "the input model was modified"
    onnx.checker.check_model(fused)
    assert verify_onnx(exported, fused, rtol=RTOL_FP32) <= RTOL_FP32
    ops = [node.op_type for node in fused.graph.node]
    assert "BatchNormalization" not in ops, report.table()
    deployed = export(reparam_fx.fuse(model), x, dynamo)
    assert len(fused.graph.node) <= len(deployed.graph.node), report.table()
    assert [i.name for i in fused.graph.input] == [i.name for i in exported.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in exported.graph.output]
    assert fused.graph.output[0].type == exported.graph.output[0].type
    if name == "mobileone_s0" and not dynamo:
        # the figure: ~455 nodes in training form, <= 89 after fusing
        assert len(exported.graph.node) >= 450 and len(fused.graph.node) <= 89
