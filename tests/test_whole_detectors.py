"""Whole detectors from the corpus (``whole_program=True``: YOLOv7 ``Model`` with ``IDetect``
and RepConv, ultralytics ``DetectionModel`` with C2f / C3k2 and the current ``Detect``, and
RT-DETR with RepC3, RepConv and a ``topk`` query-selecting decoder), each built with the
library's own ``forward`` signature and routing loop:

* ``fuse(model)`` with no example inputs is exact (float64) and has at most the linear ops
  of the library's own deploy conversion (counted on the ``torch.export`` graph);
* its report names each block kept whole, with the reason;
* the fused fp32 model exports with ``torch.export`` and to ONNX (run by ONNX Runtime), and
  both agree with the fp32 model (RT-DETR's ``topk`` compares scores; these seeds have no
  near-ties, so fp32 is meaningful here).
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime
import pytest
import torch

import reparam_fx
from reparam_fx.export import to_onnx
from reparam_fx.core.verification import relative_error

from third_party import CORPUS, example_input, randomized_model
from test_third_party_corpus import exported_counts, linear_ops

DETECTORS = sorted(name for name, idiom in CORPUS.items() if idiom.whole_program)
RTOL_F64 = 1e-10
RTOL_FP32 = 1e-5


def test_the_corpus_has_the_three_detector_families():
    libraries = {name.split(".")[0] for name in DETECTORS}
    assert {"yolov7", "ultralytics"} <= libraries
    assert any("rtdetr" in name for name in DETECTORS)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_fuses_without_inputs_to_its_own_deploy_form(name):
    idiom = CORPUS[name]
    model, x = randomized_model(idiom), example_input(idiom)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL_F64) <= RTOL_F64
    report = fused.fusion_report
    own = exported_counts(idiom.reparameterize(copy.deepcopy(model)).eval(), x)
    got = exported_counts(fused, x)
    assert linear_ops(got) <= linear_ops(own), (dict(got), dict(own), report.table())
    assert got.get("batch_norm", 0) <= own.get("batch_norm", 0)
    assert report.leaves and all(leaf.reason for leaf in report.leaves)  # kept whole: why
    assert "example_inputs" in report.table()  # what passing them would add


def _flat(output) -> list[torch.Tensor]:
    """Output tensors in the order the exporters write them (dicts in insertion order)."""
    leaves = torch.utils._pytree.tree_leaves(output)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", DETECTORS)
def test_fused_detector_exports_to_torch_export_and_onnx(name, tmp_path):
    idiom = CORPUS[name]
    model = randomized_model(idiom, dtype=torch.float32)
    x = example_input(idiom, dtype=torch.float32)
    fused = reparam_fx.fuse(model)
    with torch.no_grad():
        expected = _flat(model(x))
        program = torch.export.export(fused, (x,))
        assert relative_error(expected, _flat(program.module()(x))) <= RTOL_FP32
    path = to_onnx(fused, (x,), tmp_path / "fused.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    got = [torch.from_numpy(np.asarray(o)) for o in outputs]
    assert relative_error(expected, got) <= RTOL_FP32


@pytest.mark.parametrize("name", DETECTORS)
def test_exported_detector_fuses_on_the_onnx_graph(name, tmp_path):
    """The ONNX frontend on each detector's ONNX export (the exporter's own conv+BN folding
    on): RepConv branches, ImplicitA/M and the rest folded, exact in ONNX Runtime."""
    import onnx
    from reparam_fx.onnx import fuse_onnx_model, verify_onnx
    idiom = CORPUS[name]
    model = randomized_model(idiom, dtype=torch.float32)
    x = example_input(idiom, dtype=torch.float32)
    exported = onnx.load(str(to_onnx(model, (x,), tmp_path / "model.onnx")))
    fused, report = fuse_onnx_model(exported)
    assert verify_onnx(exported, fused, rtol=RTOL_FP32) <= RTOL_FP32
    linear = ("Conv", "BatchNormalization", "Add", "Mul", "Sub", "Gemm", "MatMul")
    count = lambda m: sum(node.op_type in linear for node in m.graph.node)  # noqa: E731
    assert count(fused) < count(exported), report.table()
