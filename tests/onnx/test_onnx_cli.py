"""``tools/fuse_onnx.py`` (``reparam-fx-onnx``) through a subprocess, as a user runs it.

Bad input: exit status 2, exactly one stderr line ``reparam-fx-onnx: error: ...``, no
traceback, and the folder holds the same files with the same bytes afterwards (no output,
no temporary file, input untouched). These cases fail before fusing, so they run without
the ONNX frontend; they run concurrently (each process pays torch's import time).

Good input: a tiny RepVGG-style model (conv+BN stem, 3x3+BN / 1x1+BN / BN-identity
branches, randomised BatchNorm statistics) exported with ``torch.onnx.export(dynamo=False,
opset_version=17)``: fuses, verifies, keeps the graph's input/output names, shapes and
dtypes, leaves the input alone unless ``--in-place``, and round-trips external data.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "reparam-fx-onnx: error:"

needs_frontend = pytest.mark.skipif(importlib.util.find_spec("reparam_fx.onnx") is None,
                                    reason="reparam_fx.onnx (the ONNX frontend) not written yet")


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/fuse_onnx.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (recursively) with its bytes (None for folders/links)."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        entries[key] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return entries


# ---- models ----------------------------------------------------------------------------

def conv_bn_residual_model(opset: int = 17, batch: int | str = 1, c: int = 4) -> onnx.ModelProto:
    """``y = x + BN(conv3x3(x))`` built with onnx.helper (randomised BN statistics)."""
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((c, c, 3, 3)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Add", ["x", "bn"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c, 8, 8])],
        [numpy_helper.from_array(array, name) for name, array in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def save_external(model: onnx.ModelProto, path: Path, location: str = "w.bin") -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def set_locations(path: Path, location: str) -> None:
    """Rewrite every external-data location of the model file at ``path``."""
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))


# ---- bad input: each case prepares a folder and returns the CLI arguments ----------------

BAD_INPUTS = {}


def bad_input(name: str, usage: bool = False, message: str = ""):
    def register(prepare):
        BAD_INPUTS[name] = (prepare, usage, message)
        return prepare
    return register


@bad_input("missing file", message="no such file")
def _(d: Path):
    return [d / "missing.onnx", "-o", d / "out.onnx"]


@bad_input("directory", message="is a directory")
def _(d: Path):
    (d / "model.onnx").mkdir()
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("empty file", message="empty")
def _(d: Path):
    (d / "model.onnx").write_bytes(b"")
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("corrupt file", message="corrupt")
def _(d: Path):
    data = bytearray(conv_bn_residual_model().SerializeToString())
    data[10:60] = bytes(range(200, 250))
    (d / "model.onnx").write_bytes(bytes(data))
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("truncated file", message="truncated")
def _(d: Path):
    data = conv_bn_residual_model().SerializeToString()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("text file", message="text file")
def _(d: Path):
    (d / "model.onnx").write_text("this is not a model\njust some text\n")
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("png file", message="PNG")
def _(d: Path):
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06"
           b"\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\nIDATx\x9cc\x00\x01\x00\x00\x05\x00"
           b"\x01\r\n-\xb4\x00\x00\x00\x00IEND\xaeB`\x82")
    (d / "model.onnx").write_bytes(png)
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("opset 11", message="opset 11")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(opset=11), str(d / "model.onnx"))
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("external data missing", message="missing")
def _(d: Path):
    save_external(conv_bn_residual_model(), d / "model.onnx")
    (d / "w.bin").unlink()
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("external data truncated", message="truncated")
def _(d: Path):
    save_external(conv_bn_residual_model(), d / "model.onnx")
    data = (d / "w.bin").read_bytes()
    (d / "w.bin").write_bytes(data[: len(data) // 2])
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("external data '..' location", message="'..'")
def _(d: Path):
    (d / "models").mkdir()
    save_external(conv_bn_residual_model(), d / "models" / "model.onnx")
    os.replace(d / "models" / "w.bin", d / "evil.bin")  # the data exists, one folder up
    set_locations(d / "models" / "model.onnx", "../evil.bin")
    return [d / "models" / "model.onnx", "-o", d / "models" / "out.onnx"]


@bad_input("external data absolute location", message="absolute")
def _(d: Path):
    (d / "models").mkdir()
    save_external(conv_bn_residual_model(), d / "models" / "model.onnx")
    os.replace(d / "models" / "w.bin", d / "evil.bin")
    set_locations(d / "models" / "model.onnx", str((d / "evil.bin").resolve()))
    return [d / "models" / "model.onnx", "-o", d / "models" / "out.onnx"]


@bad_input("external data through a symlink", message="symbolic link")
def _(d: Path):
    (d / "models").mkdir()
    save_external(conv_bn_residual_model(), d / "models" / "model.onnx")
    os.replace(d / "models" / "w.bin", d / "evil.bin")
    os.symlink(d / "evil.bin", d / "models" / "w.bin")
    return [d / "models" / "model.onnx", "-o", d / "models" / "out.onnx"]


@bad_input("output folder missing", message="does not exist")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(), str(d / "model.onnx"))
    return [d / "model.onnx", "-o", d / "no" / "such" / "out.onnx"]


@bad_input("output folder is a file", message="not a directory")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(), str(d / "model.onnx"))
    (d / "file").write_text("x")
    return [d / "model.onnx", "-o", d / "file" / "out.onnx"]


@bad_input("output folder unwritable", message="not writable")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(), str(d / "model.onnx"))
    (d / "readonly").mkdir()
    os.chmod(d / "readonly", 0o555)
    return [d / "model.onnx", "-o", d / "readonly" / "out.onnx"]


@bad_input("output is a directory", message="is a directory")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(), str(d / "model.onnx"))
    (d / "out.onnx").mkdir()
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("output is the input", message="refusing to overwrite the input; pass --in-place")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(), str(d / "model.onnx"))
    return [d / "model.onnx", "-o", d / "." / "model.onnx"]


@bad_input("output overwrites the input's external data", message="external data")
def _(d: Path):
    save_external(conv_bn_residual_model(), d / "model.onnx", location="out.onnx.data")
    return [d / "model.onnx", "-o", d / "out.onnx"]


@bad_input("neither -o nor --in-place", usage=True, message="--in-place")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(), str(d / "model.onnx"))
    return [d / "model.onnx"]


@bad_input("symbolic dimension without --input-shape",
           message="pass --input-shape NAME:d0,d1,...")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(batch="batch"), str(d / "model.onnx"))
    return [d / "model.onnx", "-o", d / "out.onnx", "--verify"]


@bad_input("--input-shape for an unknown input", message="not a graph input")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(batch="batch"), str(d / "model.onnx"))
    return [d / "model.onnx", "-o", d / "out.onnx", "--verify", "--input-shape", "nope:1,4,8,8"]


@bad_input("malformed --input-shape", usage=False, message="NAME:d0,d1")
def _(d: Path):
    onnx.save_model(conv_bn_residual_model(batch="batch"), str(d / "model.onnx"))
    return [d / "model.onnx", "-o", d / "out.onnx", "--verify", "--input-shape", "x:1,a,8"]


ROOT_CAN_DO = {"output folder unwritable"} if os.geteuid() == 0 else set()


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Prepare every bad-input case, run them all concurrently; name -> (result, before, after)."""
    cases = {}
    for index, name in enumerate(BAD_INPUTS):
        if name in ROOT_CAN_DO:
            continue
        folder = tmp_path_factory.mktemp(f"bad{index}")
        args = BAD_INPUTS[name][0](folder)
        cases[name] = (folder, args, snapshot(folder))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, (_, args, _) in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    runs = {name: (results[name], before, snapshot(folder))
            for name, (folder, _, before) in cases.items()}
    for folder, _, _ in cases.values():  # let pytest clean up the read-only folder
        if (folder / "readonly").exists():
            os.chmod(folder / "readonly", 0o755)
    return runs


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(bad_input_runs, name):
    if name in ROOT_CAN_DO:
        pytest.skip("running as root, who can write to a read-only folder")
    _, usage, message = BAD_INPUTS[name]
    result, before, after = bad_input_runs[name]
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    if usage:
        assert lines[0].startswith("usage: reparam-fx-onnx"), result.stderr
        lines = lines[-1:]
        assert result.stderr.count(PREFIX) == 1
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(PREFIX), result.stderr
    assert message in lines[0], lines[0]
    assert result.stdout == ""
    assert after == before  # no output, no temporary file, input bytes untouched


# ---- good input -----------------------------------------------------------------------

def tiny_repvgg_model():
    import torch
    import torch.nn as nn

    from reparam_fx.testing import randomize_batchnorm_

    class TinyRepVGG(nn.Module):
        """conv+BN stem, then a RepVGG block: 3x3+BN + 1x1+BN + BN identity, summed."""

        def __init__(self, c: int = 8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(c), nn.ReLU())
            self.rbr_dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False),
                                           nn.BatchNorm2d(c))
            self.rbr_1x1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
            self.rbr_identity = nn.BatchNorm2d(c)

        def forward(self, x):
            y = self.stem(x)
            return torch.relu(self.rbr_dense(y) + self.rbr_1x1(y) + self.rbr_identity(y))

    torch.manual_seed(0)
    return randomize_batchnorm_(TinyRepVGG().eval(), seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two exports of the tiny model: fixed shape, and with a symbolic batch dimension."""
    import torch

    folder = tmp_path_factory.mktemp("exported")
    model, x = tiny_repvgg_model(), torch.randn(1, 3, 16, 16)
    paths = {"static": folder / "static.onnx", "dynamic": folder / "dynamic.onnx"}
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(paths["static"]), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
        torch.onnx.export(model, (x,), str(paths["dynamic"]), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return paths


def interface(model: onnx.ModelProto):
    """Graph inputs (initializers excluded) and outputs as (name, dtype, dims)."""
    constants = {t.name for t in model.graph.initializer}

    def describe(value):
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                     for d in value.type.tensor_type.shape.dim)
        return value.name, value.type.tensor_type.elem_type, dims

    return ([describe(v) for v in model.graph.input if v.name not in constants],
            [describe(v) for v in model.graph.output])


def run_onnxruntime(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


def assert_same_function(reference: Path, candidate: Path, shape=(1, 3, 16, 16)) -> None:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    a, b = run_onnxruntime(reference, x), run_onnxruntime(candidate, x)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-5


def assert_no_temporary_files(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


@needs_frontend
def test_fuses_exported_model_and_keeps_input_and_interface(exported, tmp_path):
    source = tmp_path / "model.onnx"
    shutil.copy(exported["static"], source)
    original = source.read_bytes()
    result = run_cli(source, "-o", tmp_path / "fused.onnx")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert source.read_bytes() == original
    before, after = onnx.load(str(source)), onnx.load(str(tmp_path / "fused.onnx"))
    onnx.checker.check_model(after)
    assert interface(after) == interface(before)
    assert len(after.graph.node) < len(before.graph.node)
    assert f"nodes {len(before.graph.node)} -> {len(after.graph.node)}" in result.stdout
    assert "fused" in result.stdout and "repvgg" in result.stdout, result.stdout
    assert_same_function(source, tmp_path / "fused.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx", "model.onnx"]


@needs_frontend
def test_verify_passes_and_report_prints_the_table(exported, tmp_path):
    result = run_cli(exported["static"], "-o", tmp_path / "fused.onnx", "--verify", "--report")
    assert result.returncode == 0, result.stderr
    assert "max relative error" in result.stdout
    assert "reparam_fx fusion report" in result.stdout
    assert (tmp_path / "fused.onnx").exists()


@needs_frontend
def test_verify_above_tolerance_exits_1_and_writes_nothing(exported, tmp_path):
    # rtol=0: the fp32 fused weights are rounded, so the error is small but not zero
    result = run_cli(exported["static"], "-o", tmp_path / "fused.onnx", "--verify", "--rtol", "0")
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "verification failed" in lines[0]
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@needs_frontend
def test_symbolic_dimension_verifies_with_input_shape_and_stays_symbolic(exported, tmp_path):
    result = run_cli(exported["dynamic"], "-o", tmp_path / "fused.onnx", "--verify",
                     "--input-shape", "input:2,3,16,16")
    assert result.returncode == 0, result.stderr
    fused, original = onnx.load(str(tmp_path / "fused.onnx")), onnx.load(str(exported["dynamic"]))
    assert interface(fused) == interface(original)
    assert interface(fused)[0][0][2][0] == "batch"
    assert_same_function(exported["dynamic"], tmp_path / "fused.onnx", shape=(3, 3, 16, 16))


@needs_frontend
def test_in_place_replaces_the_input(exported, tmp_path):
    source = tmp_path / "model.onnx"
    shutil.copy(exported["static"], source)
    os.chmod(source, 0o640)
    result = run_cli(source, "--in-place")
    assert result.returncode == 0, result.stderr
    fused, original = onnx.load(str(source)), onnx.load(str(exported["static"]))
    assert len(fused.graph.node) < len(original.graph.node)
    assert interface(fused) == interface(original)
    assert (source.stat().st_mode & 0o777) == 0o640
    assert_same_function(exported["static"], source)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@needs_frontend
def test_external_data_model_fuses_and_loads_back(exported, tmp_path):
    save_external(onnx.load(str(exported["static"])), tmp_path / "model.onnx", location="w.bin")
    before = snapshot(tmp_path)
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    result = run_cli(tmp_path / "model.onnx", "-o", out, "--verify")
    assert result.returncode == 0, result.stderr
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out")} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    skeleton = onnx.load(str(out), load_external_data=False)
    locations = {entry.value for tensor in skeleton.graph.initializer
                 for entry in tensor.external_data if entry.key == "location"}
    assert locations == {"fused.onnx.data"}
    fused = onnx.load(str(out))  # loads the data back
    onnx.checker.check_model(fused)
    assert interface(fused) == interface(onnx.load(str(exported["static"])))
    assert_same_function(exported["static"], out)
    assert_no_temporary_files(tmp_path)


# ---- the atomic writer, in-process (failures are injected) ------------------------------

def test_failed_save_leaves_no_partial_or_temporary_file(monkeypatch, tmp_path):
    from reparam_fx.cli import onnx as onnx_cli
    from reparam_fx.onnx import io as onnx_io

    def save_then_fail(model, path, store, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    (tmp_path / "out.onnx").write_bytes(b"previous model")
    monkeypatch.setattr(onnx_io, "save_streaming", save_then_fail)
    with pytest.raises(onnx_cli.CliError, match="No space left on device"):
        onnx_cli.write_model_atomically(onnx, conv_bn_residual_model(), str(tmp_path / "out.onnx"),
                                        external_data=False, data_name="out.onnx.data")
    assert snapshot(tmp_path) == {"out.onnx": b"previous model"}


def test_failed_model_rename_rolls_back_the_data_file(monkeypatch, tmp_path):
    from reparam_fx.cli import onnx as onnx_cli

    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    (tmp_path / "out.onnx.data").write_bytes(b"previous data")
    replace = os.replace

    def fail_on_model(src, dst):
        if Path(dst) == out:
            raise OSError(5, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_model)
    with pytest.raises(onnx_cli.CliError, match="Input/output error"):
        onnx_cli.write_model_atomically(onnx, conv_bn_residual_model(c=8), str(out),
                                        external_data=True, data_name="out.onnx.data")
    assert snapshot(tmp_path) == {"out.onnx": b"previous model",
                                  "out.onnx.data": b"previous data"}


def test_external_data_file_gets_the_model_file_mode(tmp_path):
    from reparam_fx.cli import onnx as onnx_cli

    out = tmp_path / "out.onnx"
    model = conv_bn_residual_model(c=8)  # a 2,304-byte weight: above the 1 KiB threshold
    written = onnx_cli.write_model_atomically(onnx, model, str(out),
                                              external_data=True, data_name="out.onnx.data")
    assert written == [str(out), str(tmp_path / "out.onnx.data")]
    assert out.stat().st_mode == (tmp_path / "out.onnx.data").stat().st_mode
    assert onnx.load(str(out)).graph.initializer[0].name == "w"
