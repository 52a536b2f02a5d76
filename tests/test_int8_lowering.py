"""int8: calibration inputs, PT2E quantization, SQNR, and the three int8 lowerings.

Small models (8 channels, 32x32, batch 2, 4 calibration inputs) keep this file fast: the
models without BatchNorm skip the XNNPACK quantizer's conv+BN pattern captures. Every SQNR
is computed in float64 (``sqnr_db``). Core ML prediction needs macOS, so the W8A8 package
is checked for its int8 ops, not run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import reparam_fx
from reparam_fx.export import ExportError, mil_op_histogram
from reparam_fx.int8 import (CalibrationError, calibration_inputs, int8_sqnr, quantize_pt2e,
                             random_calibration, sqnr_db)
from reparam_fx.testing import randomize_batchnorm_

pytest.importorskip("executorch")
SHAPE = (2, 3, 32, 32)


def batches(count: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(SHAPE, generator=generator) for _ in range(count)]


class ConvBNReLU(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm_(ConvBNReLU().eval(), seed=0)


@pytest.fixture(scope="module")
def fused(model) -> nn.Module:
    """The same function without BatchNorm (the quantizer's fast path)."""
    return reparam_fx.fuse(model)


CALIBRATION = batches(4, seed=1)
X = batches(1, seed=2)[0]


def simulated_sqnr(fused_model, reference) -> float:
    with torch.no_grad():
        return sqnr_db(reference(X), quantize_pt2e(fused_model, CALIBRATION)(X))


@pytest.fixture(scope="module")
def pt2e_sqnr(fused, model) -> float:
    return simulated_sqnr(fused, model)


# ---- calibration inputs ------------------------------------------------------------------

x = torch.zeros(2, 3, 4, 4)
BAD_CALIBRATION = {
    "None": (None, r"no calibration data: pass an iterable"),
    "empty": ([], r"calibration is empty"),
    "empty generator": ((t for t in []), r"calibration is empty"),
    "not iterable": (5, r"calibration is a int, not an iterable of inputs"),
    "a string": ("data.pt", r"calibration is a str, not an iterable"),
    "a single tensor": (x, r"single tensor of shape \(2, 3, 4, 4\).*wrap it in a list.*"
                           r"iterate over batches"),
    "item not a tensor": ([x, "x"], r"calibration item 1 is a str, not a tensor or a tuple"),
    "a number in a tuple": ([(x, 3)], r"calibration item 0: input 1 is a int, not a tensor"),
    "an empty tuple": ([()], r"calibration item 0 is an empty tuple"),
    "a dict item": ([{"image": x}], r"item 0 is a dict.*batch\['image'\]"),
    "number of tensors": ([x, (x, x)], r"item 1 holds 2 tensors, item 0 holds 1"),
    "shapes": ([x, x, torch.zeros(1, 3, 4, 4)],
               r"item 2: input 0 has shape \(1, 3, 4, 4\), item 0 has \(2, 3, 4, 4\)"),
    "dtypes": ([x, x.double()], r"item 1: input 0 is torch.float64, item 0 is torch.float32"),
    "integers": ([x.long()], r"item 0: input 0 is torch.int64, not floating point"),
    "labels": ([(x, torch.zeros(2, dtype=torch.long))],
               r"input 1 is torch.int64.*\(input, label\) pairs"),
}


@pytest.mark.parametrize("name", list(BAD_CALIBRATION))
def test_bad_calibration_says_what_is_wrong(name):
    value, message = BAD_CALIBRATION[name]
    with pytest.raises(CalibrationError, match=message):
        calibration_inputs(value)
    assert issubclass(CalibrationError, ValueError)


def test_calibration_inputs_accepts_lists_generators_and_loaders():
    class Loader:  # DataLoader-like: iterable, not a list
        def __iter__(self):
            return iter([torch.ones(2, 3), torch.zeros(2, 3)])

    assert [len(item) for item in calibration_inputs(Loader())] == [1, 1]
    items = calibration_inputs((x + i, x - i) for i in range(3))
    assert len(items) == 3 and all(isinstance(item, tuple) and len(item) == 2 for item in items)
    weight = torch.ones(2, 3, 4, 4, requires_grad=True)
    (item,) = calibration_inputs([[weight * 2]])
    assert not item[0].requires_grad
    with pytest.raises(CalibrationError, match="inputs item 0"):
        calibration_inputs([1], what="inputs")


def test_random_calibration_is_shaped_like_the_example_and_seeded():
    items = random_calibration((x, x.double()), 3, seed=5)
    assert len(items) == 3
    assert all([(t.shape, t.dtype) for t in item] == [(x.shape, torch.float32),
                                                      (x.shape, torch.float64)]
               for item in items)
    again = random_calibration((x, x.double()), 3, seed=5)
    assert all(torch.equal(a, b) for item, other in zip(items, again) for a, b in zip(item, other))
    assert not torch.equal(items[0][0], items[1][0])
    assert len(random_calibration(x, 1)) == 1
    assert "real data is\n    needed" in random_calibration.__doc__.lower()
    for count in (0, -1, 1.5, True):
        with pytest.raises(CalibrationError, match="count must be a positive integer"):
            random_calibration(x, count)
    with pytest.raises(CalibrationError, match="not floating point"):
        random_calibration(x.long(), 1)


# ---- SQNR ------------------------------------------------------------------------------------

def test_sqnr_db_in_float64_over_every_output():
    reference = torch.ones(100, dtype=torch.float64)
    assert sqnr_db(reference, reference.clone()) == math.inf
    assert sqnr_db(reference, 1.1 * reference) == pytest.approx(20.0, abs=1e-9)  # 100 / 1
    # two outputs: signal 100 + 400, noise 1 + 4 -> 20 dB; numpy arrays as ORT returns them
    pair = (reference, 2 * reference)
    assert sqnr_db(pair, [1.1 * reference.numpy(), 2.2 * reference.numpy()]) == \
        pytest.approx(20.0, abs=1e-9)
    # in float32, 1e4 + 1e-3 rounds to 1e4 only after the subtraction would lose it
    big = torch.full((10,), 1e4, dtype=torch.float64)
    assert sqnr_db(big, big + 1e-3) == pytest.approx(10 * math.log10(1e8 / 1e-6), abs=1e-6)
    with pytest.raises(ValueError, match="output 0: the reference has shape"):
        sqnr_db(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="2 output tensors, the output 1"):
        sqnr_db(pair, reference)


# ---- PT2E --------------------------------------------------------------------------------

def test_quantize_pt2e_conv_bn_relu_is_close_and_leaves_the_model_alone(model):
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    quantized = quantize_pt2e(model, CALIBRATION)
    assert isinstance(quantized, torch.fx.GraphModule)
    targets = {str(node.target) for node in quantized.graph.nodes if node.op == "call_function"}
    assert any("quantize_per_tensor" in target for target in targets)
    assert any("dequantize_per_channel" in target for target in targets)  # per-channel weights
    with torch.no_grad():
        assert sqnr_db(model(X), quantized(X)) > 30
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not model.training and not any(m.training for m in model.modules())


def test_quantize_pt2e_calibrated_on_a_smaller_range_clips(fused, model, pt2e_sqnr):
    """Ranges from inputs 100x smaller than the test input: the input and the activations
    clip (what is left is the BatchNorm shifts, which the clipped ranges still hold)."""
    small = batches(4, seed=1, scale=0.01)
    with torch.no_grad():
        clipped = sqnr_db(model(X), quantize_pt2e(fused, small)(X))
    assert clipped < 22 and pt2e_sqnr - clipped > 20, (clipped, pt2e_sqnr)


def test_quantize_pt2e_refuses_training_mode_and_bad_calibration(fused):
    training = ConvBNReLU()
    with pytest.raises(ExportError, match=r"ConvBNReLU is in training mode"):
        quantize_pt2e(training, CALIBRATION)
    assert training.training
    with pytest.raises(CalibrationError, match="single tensor"):
        quantize_pt2e(fused, X)


def test_int8_sqnr_against_a_reference_and_input_shapes(fused, model, pt2e_sqnr):
    assert int8_sqnr(fused, CALIBRATION, [X], reference=model) == pytest.approx(pt2e_sqnr,
                                                                                abs=1e-9)
    with pytest.raises(CalibrationError, match=r"inputs item 0 has shape \(1, 3, 32, 32\); "
                                               r"the int8 program is exported at the "
                                               r"calibration's \(2, 3, 32, 32\)"):
        int8_sqnr(fused, CALIBRATION, [X[:1]])
    with pytest.raises(ValueError, match="backend must be one of pt2e, xnnpack, onnxruntime"):
        int8_sqnr(fused, CALIBRATION, [X], backend="tflite")


# ---- ExecuTorch XNNPACK ------------------------------------------------------------------

def test_executorch_int8_is_fully_delegated_and_matches_the_simulation(fused, model, pt2e_sqnr,
                                                                       tmp_path):
    from reparam_fx.export import check_executorch_int8, run_pte, to_executorch_int8
    check = check_executorch_int8(fused, (X,), calibration=CALIBRATION)
    assert check.fully_delegated, check
    assert check.delegated["convolution"] == 2
    assert any("quantize_per_tensor" in name for name in check.delegated)
    assert abs(check.sqnr_db - simulated_sqnr(fused, fused)) < 1.0
    path = to_executorch_int8(fused, (X,), tmp_path / "model.pte", calibration=CALIBRATION)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pte"]
    with torch.no_grad():
        sqnr = sqnr_db(model(X), run_pte(path, (X,)))
    assert abs(sqnr - pt2e_sqnr) < 1.0, (sqnr, pt2e_sqnr)


# ---- ONNX Runtime QDQ ----------------------------------------------------------------------

def test_onnx_int8_is_a_qdq_model_that_onnxruntime_runs(fused, model, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from reparam_fx.export import to_onnx_int8
    path = to_onnx_int8(fused, (X,), tmp_path / "model.onnx", calibration=CALIBRATION)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    assert ops.count("Conv") == 2
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        sqnr = sqnr_db(model(X), got)
    assert sqnr > 25
    assert int8_sqnr(fused, CALIBRATION, [X], reference=model, backend="onnxruntime") == \
        pytest.approx(sqnr, abs=1e-9)


# ---- Core ML W8A8 ---------------------------------------------------------------------------

def test_coreml_int8_package_holds_int8_ops(fused, tmp_path):
    coremltools = pytest.importorskip("coremltools")
    from reparam_fx.export import to_coreml_int8
    mlmodel = to_coreml_int8(fused, (X,), tmp_path / "model.mlpackage", calibration=CALIBRATION)
    histogram = mil_op_histogram(mlmodel)
    assert histogram["quantize"] >= 1 and histogram["dequantize"] >= 1, histogram
    assert histogram["constexpr_affine_dequantize"] == 2 and histogram["conv"] == 2  # int8 weights
    assert [p.name for p in tmp_path.iterdir()] == ["model.mlpackage"]
    spec = coremltools.utils.load_spec(str(tmp_path / "model.mlpackage"))
    assert spec.specificationVersion >= 8  # iOS 17
    written = [op.type for function in spec.mlProgram.functions.values()
               for block in function.block_specializations.values() for op in block.operations]
    assert "quantize" in written and "dequantize" in written
    with pytest.raises(ValueError, match="iOS17 / macOS14 or later"):
        to_coreml_int8(fused, (X,), calibration=CALIBRATION,
                       minimum_deployment_target=coremltools.target.iOS16)


# ---- failures write nothing ---------------------------------------------------------------

LOWERINGS = ["to_executorch_int8", "to_onnx_int8", "to_coreml_int8"]
BAD_LOWERING_INPUTS = {
    "no calibration": (None, r"needs calibration data: no calibration data"),
    "a single tensor": (X, r"needs calibration data: calibration is a single tensor"),
    "other shapes": ([X[:1]], r"the calibration inputs are \(1, 3, 32, 32\) float32, the "
                              r"example inputs \(2, 3, 32, 32\) float32; they must match"),
}


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("bad", list(BAD_LOWERING_INPUTS))
def test_lowering_refuses_bad_calibration_and_writes_nothing(fused, lowering, bad, tmp_path):
    from reparam_fx import export
    calibration, message = BAD_LOWERING_INPUTS[bad]
    target = tmp_path / ("model.mlpackage" if "coreml" in lowering else "model.out")
    with pytest.raises(ExportError, match=message):
        getattr(export, lowering)(fused, (X,), target, calibration=calibration)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_lowering_refuses_training_mode(lowering, tmp_path):
    from reparam_fx import export
    model = ConvBNReLU()
    with pytest.raises(ExportError, match=r"ConvBNReLU is in training mode .*call \.eval\(\)"):
        getattr(export, lowering)(model, (X,), tmp_path / "model.out", calibration=CALIBRATION)
    assert model.training and list(tmp_path.iterdir()) == []


class Eigen(nn.Module):
    """No ONNX symbolic, no quantizable op, no ExecuTorch kernel: fails in every lowering."""

    def forward(self, x):
        return torch.linalg.eigvals(x).real


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_a_failed_lowering_keeps_the_old_file(lowering, tmp_path):
    from reparam_fx import export
    target = tmp_path / ("model.mlpackage" if "coreml" in lowering else "model.out")
    if "coreml" in lowering:
        target.mkdir()
        (target / "Manifest.json").write_text("old")
    else:
        target.write_text("old")
    square = [torch.randn(2, 4, 4) for _ in range(2)]
    with pytest.raises(ExportError, match="Eigen"):
        getattr(export, lowering)(Eigen().eval(), (square[0],), target, calibration=square)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert (target / "Manifest.json" if target.is_dir() else target).read_text() == "old"
