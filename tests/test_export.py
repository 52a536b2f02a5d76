"""Lowering: fused models to ONNX (checked in ONNX Runtime) and to Core ML ML Programs
(op histogram: no batch_norm, the expected conv count). Core ML prediction needs macOS,
so only conversion is tested here."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import reparam_fx
import zoo
from reparam_fx.export import ExportError, mil_op_histogram, to_coreml, to_onnx
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_

# family -> (smallest variant, convs after fusing: see each family's zoo test)
SMALLEST = {"repvgg_a0": 22, "mobileone_s0": 43, "fastvit_t8": 52, "repvit_m0_9": 103,
            "mobilevit_xxs": 35}


def fused_model(name):
    model = zoo.create(name).eval()
    randomize_batchnorm_(model, seed=41)
    randomize_parameters_(model, seed=42)
    return model, reparam_fx.fuse(model)


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_fused_model_to_onnx_runs_in_onnxruntime(name, tmp_path):
    model, fused = fused_model(name)
    x = torch.randn(1, 3, 64, 64)
    path = to_onnx(fused, (x,), tmp_path / f"{name}.onnx")
    exported = onnx.load(path)
    ops = [node.op_type for node in exported.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == SMALLEST[name]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {exported.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(out - expected).max() / np.abs(expected).max() <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.onnx"]  # no temp files left


def test_aten_graph_from_the_export_path_lowers_too(tmp_path):
    model = zoo.create("repvgg_a0").eval()
    randomize_batchnorm_(model, seed=43)
    x = torch.randn(1, 3, 64, 64)
    fused = reparam_fx.fuse(torch.export.export(model, (x,)))
    exported = onnx.load(to_onnx(fused, (x,), tmp_path / "aten.onnx"))
    assert [n.op_type for n in exported.graph.node].count("Conv") == 22


def test_onnx_export_failure_names_the_model(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x)  # no ONNX symbolic
    with pytest.raises(ExportError, match="ONNX export of Bad failed"):
        to_onnx(Bad(), (torch.randn(2, 2),), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


coremltools = pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def hand_coreml_ops():
    """Non-const MIL ops of the hand-written deploy forms (tests/reference, full size)."""
    from reference.models import FULL_SIZE_BUILDERS, reparameterize_model
    x = torch.randn(1, 3, 64, 64)
    return {name: sum(mil_op_histogram(to_coreml(reparameterize_model(build().eval()),
                                                 (x,))).values())
            for name, build in FULL_SIZE_BUILDERS.items()}


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_fused_model_to_coreml(name, tmp_path, hand_coreml_ops):
    _, fused = fused_model(name)
    mlmodel = to_coreml(fused, (torch.randn(1, 3, 64, 64),), tmp_path / f"{name}.mlpackage")
    histogram = mil_op_histogram(mlmodel)
    assert "batch_norm" not in histogram and histogram["conv"] == SMALLEST[name]
    assert json.loads(mlmodel.user_defined_metadata["mil_ops"]) == dict(histogram)
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.mlpackage"]  # nothing staged left
    assert (tmp_path / f"{name}.mlpackage" / "Manifest.json").is_file()
    if name in hand_coreml_ops:  # the target: no more ops than by hand
        assert sum(histogram.values()) <= hand_coreml_ops[name]
    if name == "mobileone_s0":  # the figure: <= 89 non-const MIL ops
        assert sum(histogram.values()) <= 89
    if name == "mobilevit_xxs":  # coremltools cannot convert the trace's shape arithmetic
        assert mlmodel.user_defined_metadata["frontend"] == "export"


def test_aten_graph_from_the_export_path_converts_to_coreml():
    model = zoo.create("repvgg_a0").eval()
    randomize_batchnorm_(model, seed=44)
    x = torch.randn(1, 3, 64, 64)
    fused = reparam_fx.fuse(torch.export.export(model, (x,)))
    histogram = mil_op_histogram(to_coreml(fused, (x,)))
    assert "batch_norm" not in histogram and histogram["conv"] == SMALLEST["repvgg_a0"]
    assert "add" not in histogram


def test_coreml_failure_leaves_no_package_and_keeps_an_old_one(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x)
    target = tmp_path / "model.mlpackage"
    with pytest.raises(ExportError, match=r"Core ML conversion of Bad failed \(torchscript: .*export: "):
        to_coreml(Bad().eval(), (torch.randn(2, 2),), target)
    assert list(tmp_path.iterdir()) == []
    good = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    to_coreml(good, (torch.randn(1, 3, 8, 8),), target, frontend="export")
    manifest = (target / "Manifest.json").read_bytes()
    with pytest.raises(ExportError):
        to_coreml(Bad().eval(), (torch.randn(2, 2),), target)
    assert (target / "Manifest.json").read_bytes() == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["model.mlpackage"]


def test_coreml_names_the_op_coremltools_could_not_convert():
    model = zoo.create("mobilevit_xxs").eval()
    with pytest.raises(ExportError, match=r"failed \(torchscript: .*, converting '\w+' op "
                                          r"\(located at: '[^']*'\)\)"):
        to_coreml(model, (torch.randn(1, 3, 64, 64),), frontend="torchscript")


def test_coreml_refuses_a_model_in_training_mode_without_changing_it():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    with pytest.raises(ExportError, match=r"Sequential is in training mode \(Sequential and 1 "
                                          r"more\); call \.eval\(\)"):
        to_coreml(model, (torch.randn(1, 3, 4, 4),))
    assert model.training and model[1].training
    model.eval()[1].train()  # one BatchNorm still in training mode
    with pytest.raises(ExportError, match=r"training mode \(1\)"):
        to_coreml(model, (torch.randn(1, 3, 4, 4),))


def test_coreml_rejects_unknown_options():
    model = torch.nn.Conv2d(3, 4, 1).eval()
    with pytest.raises(ValueError, match="frontend must be"):
        to_coreml(model, (torch.randn(1, 3, 4, 4),), frontend="onnx")
    with pytest.raises(ValueError, match="precision must be"):
        to_coreml(model, (torch.randn(1, 3, 4, 4),), precision="int8")


def _latency_tool(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "tools/coreml_latency.py", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_coreml_latency_explains_it_needs_macos(tmp_path):
    import platform
    _, fused = fused_model("repvgg_a0")
    package = tmp_path / "repvgg_a0.mlpackage"
    to_coreml(fused, (torch.randn(1, 3, 64, 64),), package)
    result = _latency_tool(package, "--runs", "3")
    if platform.system() == "Darwin":
        assert result.returncode == 0 and "median" in result.stdout
        return
    assert result.returncode == 2
    assert result.stderr.startswith("coreml_latency: error: Core ML prediction needs macOS")
    assert "Xcode" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("make_bad", ["missing", "not_a_package"])
def test_coreml_latency_rejects_bad_input(tmp_path, make_bad):
    target = tmp_path / "model.mlpackage"
    if make_bad == "not_a_package":
        target.write_text("not a package")
    result = _latency_tool(target)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("coreml_latency: error:") and "Traceback" not in result.stderr


def test_onnx_export_failure_with_an_empty_message(tmp_path):
    class Silent(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError()
    with pytest.raises(ExportError, match="ONNX export of Silent failed: RuntimeError"):
        to_onnx(Silent(), (torch.randn(2),), tmp_path / "silent.onnx")
    assert list(tmp_path.iterdir()) == []
