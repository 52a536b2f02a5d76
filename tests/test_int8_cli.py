"""``reparam-fx`` with int8: ``fuse --target int8 [--calibration CAL]`` and ``export --to
xnnpack-int8|onnx-int8|coreml-int8 --calibration CAL``, through a subprocess.

A conv-ReLU-conv program (batch 2, 32x32, no BatchNorm: the quantizer's fast path) is
saved with ``torch.export.save``; every run is prepared first. The runs in ``SUBPROCESS``
run as a user runs them, concurrently in their own processes (each pays the imports); the
others, to keep this file fast, call ``reparam_fx.cli.program.main`` in this process
meanwhile, with stdout and stderr captured. Good input: the int8 files load and run
(ExecuTorch, ONNX Runtime; the Core ML package is checked for its int8 ops: prediction
needs macOS). Bad input: exit status 2, one
``reparam-fx: error: ...`` line (after the usage line for a usage error), no traceback,
and the folder byte for byte as before.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from reparam_fx.int8 import sqnr_db

pytest.importorskip("executorch")
ROOT = Path(__file__).resolve().parents[1]
PREFIX = "reparam-fx: error:"
SHAPE = (2, 3, 32, 32)
X = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reparam_fx.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def run_inline(*args) -> subprocess.CompletedProcess:
    """``main(args)`` in this process: its status and what it printed."""
    from reparam_fx.cli.program import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(arg) for arg in args])
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(folder)):
            path.read_bytes() if path.is_file() and not path.is_symlink() else None
            for path in sorted(folder.rglob("*"))}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1)).eval()


def save_program(folder: Path) -> Path:
    path = folder / "model.pt2"
    torch.export.save(torch.export.export(model(), (X,)), str(path))
    return path


def samples(count: int, *shape: int) -> torch.Tensor:
    return torch.randn(count, *(shape or SHAPE[1:]), generator=torch.Generator().manual_seed(4))


GOOD, BAD = {}, {}
SUBPROCESS = {"onnx-int8 from random:2", "fuse --target int8 with a list of tuples",
              "an int8 target without --calibration", "corrupt calibration file"}


def case(table: dict, name: str, message: str = ""):
    def register(prepare):
        table[name] = (prepare, message)
        return prepare
    return register


# ---- good input ---------------------------------------------------------------------------

@case(GOOD, "xnnpack-int8 from a tensor of samples")
def _(d: Path):
    torch.save(samples(8), d / "calibration.pt")  # 8 samples: 4 inputs of batch 2
    return ["export", save_program(d), "--to", "xnnpack-int8", "--calibration",
            d / "calibration.pt", "-o", d / "model.pte"]


@case(GOOD, "onnx-int8 from random:2")
def _(d: Path):
    return ["export", save_program(d), "--to", "onnx-int8", "--calibration", "random:2",
            "-o", d / "model.onnx"]


@case(GOOD, "coreml-int8 from a list of inputs")
def _(d: Path):
    torch.save([samples(2), samples(2) * 0.5], d / "calibration.pt")
    return ["export", save_program(d), "--to", "coreml-int8", "--calibration",
            d / "calibration.pt", "-o", d / "model.mlpackage"]


@case(GOOD, "fuse --target int8 with a list of tuples")
def _(d: Path):
    torch.save([(samples(2),), (samples(2),)], d / "calibration.pt")
    return ["fuse", save_program(d), "-o", d / "fused.pt2", "--target", "int8",
            "--calibration", d / "calibration.pt"]


# ---- bad input ----------------------------------------------------------------------------

@case(BAD, "an int8 target without --calibration", "--to onnx-int8 needs --calibration CAL")
def _(d: Path):
    return ["export", save_program(d), "--to", "onnx-int8", "-o", d / "out.onnx"]


@case(BAD, "--calibration for a float target", "--calibration is only for the int8 targets")
def _(d: Path):
    return ["export", save_program(d), "--to", "xnnpack", "--calibration", "random:2",
            "-o", d / "out.pte"]


@case(BAD, "--calibration for fuse without --target int8", "only for --target int8")
def _(d: Path):
    return ["fuse", save_program(d), "-o", d / "fused.pt2", "--calibration", "random:2"]


@case(BAD, "unknown target", "argument --to: invalid choice: 'tflite-int8'")
def _(d: Path):
    return ["export", save_program(d), "--to", "tflite-int8", "--calibration", "random:2",
            "-o", d / "out.tflite"]


@case(BAD, "random:0", "random:N takes a positive whole number of inputs")
def _(d: Path):
    return ["export", save_program(d), "--to", "onnx-int8", "--calibration", "random:0",
            "-o", d / "out.onnx"]


@case(BAD, "random:x", "--calibration random:x: random:N takes a positive whole number")
def _(d: Path):
    return ["fuse", save_program(d), "-o", d / "fused.pt2", "--target", "int8",
            "--calibration", "random:x"]


@case(BAD, "missing calibration file", "no such file; check the path to the calibration file")
def _(d: Path):
    return ["export", save_program(d), "--to", "xnnpack-int8", "--calibration",
            d / "missing.pt", "-o", d / "out.pte"]


@case(BAD, "corrupt calibration file", "calibration.pt is not a readable calibration file: "
                                       "the torch.save archive is truncated or corrupt")
def _(d: Path):
    torch.save(samples(8), d / "full.pt")
    data = (d / "full.pt").read_bytes()
    (d / "calibration.pt").write_bytes(data[: len(data) // 2])
    (d / "full.pt").unlink()
    return ["export", save_program(d), "--to", "xnnpack-int8", "--calibration",
            d / "calibration.pt", "-o", d / "out.pte"]


@case(BAD, "samples of another shape", "holds a tensor of shape (8, 3, 16, 16); the program "
                                       "takes (2, 3, 32, 32)")
def _(d: Path):
    torch.save(samples(8, 3, 16, 16), d / "calibration.pt")
    return ["export", save_program(d), "--to", "onnx-int8", "--calibration",
            d / "calibration.pt", "-o", d / "out.onnx"]


@case(BAD, "a list of another batch size", "the calibration inputs are (1, 3, 32, 32) float32, "
                                           "the program takes (2, 3, 32, 32) float32")
def _(d: Path):
    torch.save([samples(1)], d / "calibration.pt")
    return ["export", save_program(d), "--to", "coreml-int8", "--calibration",
            d / "calibration.pt", "-o", d / "out.mlpackage"]


@case(BAD, "a remainder", "holds 7 samples, not a multiple of the program's batch size 2")
def _(d: Path):
    torch.save(samples(7), d / "calibration.pt")
    return ["export", save_program(d), "--to", "xnnpack-int8", "--calibration",
            d / "calibration.pt", "-o", d / "out.pte"]


@case(BAD, "the output is the calibration file", "is the calibration file; refusing to "
                                                 "overwrite it")
def _(d: Path):
    torch.save(samples(8), d / "calibration.pt")
    return ["export", save_program(d), "--to", "onnx-int8", "--calibration",
            d / "calibration.pt", "-o", d / "calibration.pt"]


@case(BAD, "coreml-int8 without .mlpackage", "--to coreml-int8 writes an .mlpackage folder")
def _(d: Path):
    return ["export", save_program(d), "--to", "coreml-int8", "--calibration", "random:1",
            "-o", d / "model.mlmodel"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Prepare every case, run them all concurrently; name -> (result, folder, before)."""
    cases = {}
    for index, (name, (prepare, _)) in enumerate([*GOOD.items(), *BAD.items()]):
        folder = tmp_path_factory.mktemp(f"int8cli{index}")
        args = prepare(folder)
        cases[name] = (folder, args, snapshot(folder))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, (_, args, _) in cases.items()
                   if name in SUBPROCESS}
        results = {name: run_inline(*args) for name, (_, args, _) in cases.items()
                   if name not in SUBPROCESS}
        results.update({name: future.result() for name, future in futures.items()})
    return {name: (results[name], folder, before) for name, (folder, _, before) in cases.items()}


def ok(runs, name: str, stderr: str = ""):
    result, folder, before = runs[name]
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == stderr
    return result, folder, before


# ---- good input ---------------------------------------------------------------------------

def test_xnnpack_int8_runs_in_executorch_close_to_float(runs):
    from reparam_fx.export import run_pte
    result, folder, before = ok(runs, "xnnpack-int8 from a tensor of samples")
    assert result.stdout.strip() == (f"wrote {folder / 'model.pte'} (an int8 ExecuTorch "
                                     f"program for the XNNPACK delegate)")
    with torch.no_grad():
        assert sqnr_db(model()(X), run_pte(folder / "model.pte", (X,))) > 25
    assert sorted(p.name for p in folder.iterdir()) == ["calibration.pt", "model.pt2",
                                                        "model.pte"]
    assert snapshot(folder)["model.pt2"] == before["model.pt2"]


def test_onnx_int8_from_random_calibration_warns_and_runs(runs):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    warning = ("reparam-fx: warning: --calibration random:2: the int8 activation ranges come "
               "from random noise, not data; give real inputs for a real int8 accuracy\n")
    _, folder, _ = ok(runs, "onnx-int8 from random:2", stderr=warning)
    path = folder / "model.onnx"
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: X.numpy()}
    with torch.no_grad():  # random calibration here is the test input's distribution
        assert sqnr_db(model()(X), session.run(None, feed)) > 25
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.pt2"]


def test_coreml_int8_package_has_int8_ops(runs):
    coremltools = pytest.importorskip("coremltools")
    _, folder, _ = ok(runs, "coreml-int8 from a list of inputs")
    spec = coremltools.utils.load_spec(str(folder / "model.mlpackage"))
    ops = [op.type for function in spec.mlProgram.functions.values()
           for block in function.block_specializations.values() for op in block.operations]
    assert "quantize" in ops and "dequantize" in ops and ops.count("conv") == 2
    assert sorted(p.name for p in folder.iterdir()) == ["calibration.pt", "model.mlpackage",
                                                        "model.pt2"]


def test_fuse_for_int8_writes_a_program_exact_in_float(runs):
    result, folder, _ = ok(runs, "fuse --target int8 with a list of tuples")
    assert f"wrote {folder / 'fused.pt2'}" in result.stdout
    fused = torch.export.load(str(folder / "fused.pt2")).module()
    with torch.no_grad():
        expected, got = model()(X).double(), fused(X).double()
    assert (got - expected).abs().max() / expected.abs().max() < 1e-5


def test_help_names_the_int8_targets_and_calibration():
    result = run_cli("export", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "xnnpack-int8" in text and "onnx-int8" in text and "coreml-int8" in text
    assert "--calibration CAL" in text and "random:N" in text


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(runs, name):
    _, message = BAD[name]
    result, folder, before = runs[name]
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(PREFIX), result.stderr
    assert message in lines[-1], lines[-1]
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("usage: reparam-fx")), \
        result.stderr
    assert snapshot(folder) == before  # no output, no temporary file, inputs untouched
