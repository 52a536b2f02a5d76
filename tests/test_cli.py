"""``reparam-fx`` (``python -m reparam_fx.cli``) through a subprocess, as a user runs it.

A small conv+BN+ReLU+conv+BN model (randomised BatchNorm statistics) is saved with
``torch.export.save``; every run of the command line is prepared first and then all of
them run concurrently (each process pays torch's import time).

Good input: ``fuse`` writes a program that loads, has no batch_norm left and computes the
same function (dynamic batch dimensions stay dynamic); ``--verify`` / ``--report`` print
the error and the table; ``export`` writes ONNX / ExecuTorch / Core ML files that load
and run. Bad input: exit status 2, exactly one stderr line ``reparam-fx: error: ...``, no
traceback, and the folder holds the same files with the same bytes afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import reparam_fx
from reparam_fx.testing import randomize_batchnorm_

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "reparam-fx: error:"
X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reparam_fx.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (recursively) with its bytes (None for folders/links)."""
    return {str(path.relative_to(folder)):
            path.read_bytes() if path.is_file() and not path.is_symlink() else None
            for path in sorted(folder.rglob("*"))}


class ConvBNStack(nn.Module):
    """conv+BN, ReLU, conv+BN: two conv+bn folds."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Spectrum(nn.Module):
    """``|rfft(x)|``: ExecuTorch refuses its complex intermediate (an ExportError)."""

    def forward(self, x):
        return torch.fft.rfft(x).abs()


def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm_(ConvBNStack().eval(), seed=0)


def save_program(path: Path, dynamic: bool = False) -> None:
    shapes = ({0: Dim("batch", max=64)},) if dynamic else None
    x = X.expand(2, -1, -1, -1).contiguous() if dynamic else X
    torch.export.save(torch.export.export(model(), (x,), dynamic_shapes=shapes), str(path))


# ---- every run, prepared up front ------------------------------------------------------

GOOD, BAD = {}, {}


def case(table: dict, name: str, message: str = ""):
    def register(prepare):
        table[name] = (prepare, message)
        return prepare
    return register


@case(GOOD, "fuse --verify")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["fuse", d / "model.pt2", "-o", d / "fused.pt2", "--verify"]


@case(GOOD, "fuse --report a dynamic batch, from a file not named .pt2")
def _(d: Path):
    save_program(d / "model.bin", dynamic=True)
    return ["fuse", d / "model.bin", "-o", d / "fused.pt2", "--report"]


@case(GOOD, "fuse --in-place")
def _(d: Path):
    save_program(d / "model.pt2")
    os.chmod(d / "model.pt2", 0o640)
    return ["fuse", d / "model.pt2", "--in-place"]


@case(GOOD, "export --to onnx")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["export", d / "model.pt2", "--to", "onnx", "-o", d / "model.onnx"]


@case(GOOD, "export --to xnnpack")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["export", d / "model.pt2", "--to", "xnnpack", "-o", d / "model.pte"]


@case(GOOD, "export --to coreml-pte")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["export", d / "model.pt2", "--to", "coreml-pte", "-o", d / "model.pte"]


@case(GOOD, "export --to coreml")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["export", d / "model.pt2", "--to", "coreml", "-o", d / "model.mlpackage"]


@case(GOOD, "--verify above --rtol 0 exits 1")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["fuse", d / "model.pt2", "-o", d / "fused.pt2", "--verify", "--rtol", "0"]


@case(BAD, "missing file", "no such file")
def _(d: Path):
    return ["fuse", d / "missing.pt2", "-o", d / "out.pt2"]


@case(BAD, "directory", "is a directory")
def _(d: Path):
    (d / "model.pt2").mkdir()
    return ["fuse", d / "model.pt2", "-o", d / "out.pt2"]


@case(BAD, "empty file", "empty")
def _(d: Path):
    (d / "model.pt2").write_bytes(b"")
    return ["fuse", d / "model.pt2", "-o", d / "out.pt2"]


@case(BAD, "random bytes", "not a zip archive")
def _(d: Path):
    (d / "model.pt2").write_bytes(bytes(range(256)) * 8)
    return ["fuse", d / "model.pt2", "-o", d / "out.pt2"]


@case(BAD, "truncated program", "not a readable torch.export program")
def _(d: Path):
    save_program(d / "full.pt2")
    data = (d / "full.pt2").read_bytes()
    (d / "model.pt2").write_bytes(data[: len(data) // 2])
    (d / "full.pt2").unlink()
    return ["fuse", d / "model.pt2", "-o", d / "out.pt2"]


@case(BAD, "an .onnx file", "reparam-fx-onnx")
def _(d: Path):
    with torch.no_grad():
        torch.onnx.export(model(), (X,), str(d / "model.onnx"), dynamo=False, opset_version=17)
    return ["fuse", d / "model.onnx", "-o", d / "out.pt2"]


@case(BAD, "a torch.save checkpoint", "torch.save checkpoint")
def _(d: Path):
    torch.save(model().state_dict(), d / "model.pt2")
    return ["export", d / "model.pt2", "--to", "onnx", "-o", d / "out.onnx"]


@case(BAD, "output is the input", "refusing to overwrite the input; pass --in-place")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["fuse", d / "model.pt2", "-o", d / "." / "model.pt2"]


@case(BAD, "export output is the input", "refusing to overwrite the input; choose another -o")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["export", d / "model.pt2", "--to", "onnx", "-o", d / "model.pt2"]


@case(BAD, "output folder missing", "does not exist")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["fuse", d / "model.pt2", "-o", d / "no" / "such" / "out.pt2"]


@case(BAD, "output folder unwritable", "not writable")
def _(d: Path):
    save_program(d / "model.pt2")
    (d / "readonly").mkdir()
    os.chmod(d / "readonly", 0o555)
    return ["fuse", d / "model.pt2", "-o", d / "readonly" / "out.pt2"]


@case(BAD, "output folder on a read-only file system", "not writable")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["export", d / "model.pt2", "--to", "xnnpack", "-o", "/proc/out.pte"]


@case(BAD, "output is a directory", "is a directory")
def _(d: Path):
    save_program(d / "model.pt2")
    (d / "out.pt2").mkdir()
    return ["fuse", d / "model.pt2", "-o", d / "out.pt2"]


@case(BAD, "--to coreml without .mlpackage", ".mlpackage")
def _(d: Path):
    save_program(d / "model.pt2")
    return ["export", d / "model.pt2", "--to", "coreml", "-o", d / "model.mlmodel"]


@case(BAD, "ExportError", "ExecuTorch lowering (xnnpack)")
def _(d: Path):
    program = torch.export.export(Spectrum().eval(), (torch.randn(2, 8),))
    torch.export.save(program, str(d / "model.pt2"))
    return ["export", d / "model.pt2", "--to", "xnnpack", "-o", d / "model.pte"]


SKIPPED = {"output folder unwritable"} if os.geteuid() == 0 else set()  # root writes anyway
if not os.path.isdir("/proc"):
    SKIPPED.add("output folder on a read-only file system")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Prepare every case, run them all concurrently; name -> (result, folder, before)."""
    cases = {}
    for index, (name, (prepare, _)) in enumerate([*GOOD.items(), *BAD.items()]):
        if name in SKIPPED:
            continue
        folder = tmp_path_factory.mktemp(f"cli{index}")
        args = prepare(folder)
        cases[name] = (folder, args, snapshot(folder))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, (_, args, _) in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    for folder, _, _ in cases.values():  # let pytest clean up the read-only folder
        if (folder / "readonly").exists():
            os.chmod(folder / "readonly", 0o755)
    return {name: (results[name], folder, before) for name, (folder, _, before) in cases.items()}


def ok(runs, name: str):
    result, folder, before = runs[name]
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result, folder, before


def assert_same_outputs(expected: torch.Tensor, got: torch.Tensor, tol: float = 1e-5) -> None:
    expected, got = expected.detach().double(), torch.as_tensor(got).detach().double()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() / expected.abs().max() < tol


# ---- good input -------------------------------------------------------------------------

def test_fuse_writes_a_program_with_the_batchnorms_folded_and_verifies_it(runs):
    result, folder, before = ok(runs, "fuse --verify")
    original, fused = (torch.export.load(str(folder / name)) for name in ("model.pt2", "fused.pt2"))
    assert reparam_fx.op_counts(original)["batch_norm"] == 2
    assert reparam_fx.op_counts(fused)["batch_norm"] == 0
    assert reparam_fx.op_counts(fused)["conv"] == 2
    assert_same_outputs(model()(X), fused.module()(X))
    assert "nodes" in result.stdout and "conv+bn" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("verify:"))
    assert "max relative error" in line and line.endswith("(rtol 0.0001) ok")
    assert float(line.split("max relative error ")[1].split()[0]) < 1e-6
    assert f"wrote {folder / 'fused.pt2'}" in result.stdout
    assert (folder / "model.pt2").read_bytes() == before["model.pt2"]
    assert sorted(p.name for p in folder.iterdir()) == ["fused.pt2", "model.pt2"]


def test_report_prints_the_table_and_a_dynamic_batch_stays_dynamic(runs):
    result, folder, _ = ok(runs, "fuse --report a dynamic batch, from a file not named .pt2")
    assert "reparam_fx fusion report" in result.stdout
    assert "batch_norm       2 -> 0" in result.stdout, result.stdout
    fused = torch.export.load(str(folder / "fused.pt2"))
    assert reparam_fx.op_counts(fused)["batch_norm"] == 0
    x = torch.randn(3, 3, 16, 16)  # the program was saved at batch 2
    assert_same_outputs(model()(x), fused.module()(x))


def test_verify_above_tolerance_exits_1_and_writes_nothing(runs):
    result, folder, before = runs["--verify above --rtol 0 exits 1"]
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "verification failed" in lines[0]
    assert snapshot(folder) == before


def test_in_place_replaces_the_input_and_keeps_its_mode(runs):
    _, folder, _ = ok(runs, "fuse --in-place")
    assert [p.name for p in folder.iterdir()] == ["model.pt2"]
    assert (folder / "model.pt2").stat().st_mode & 0o777 == 0o640
    fused = torch.export.load(str(folder / "model.pt2"))
    assert reparam_fx.op_counts(fused)["batch_norm"] == 0
    assert_same_outputs(model()(X), fused.module()(X))


def test_export_onnx_runs_in_onnxruntime(runs):
    onnxruntime = pytest.importorskip("onnxruntime")
    _, folder, _ = ok(runs, "export --to onnx")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    assert_same_outputs(model()(X), got)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.pt2"]


def test_export_xnnpack_runs_in_executorch(runs):
    pytest.importorskip("executorch")
    from reparam_fx.export import run_pte
    _, folder, _ = ok(runs, "export --to xnnpack")
    assert_same_outputs(model()(X), run_pte(folder / "model.pte", (X,))[0])
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt2", "model.pte"]


def test_export_coreml_pte_and_mlpackage_are_written(runs):
    pytest.importorskip("coremltools")
    _, folder, _ = ok(runs, "export --to coreml-pte")
    assert (folder / "model.pte").stat().st_size > 0
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt2", "model.pte"]
    _, folder, _ = ok(runs, "export --to coreml")
    assert (folder / "model.mlpackage" / "Manifest.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["model.mlpackage", "model.pt2"]


def test_help_for_the_command_and_each_subcommand():
    for args in ([], ["fuse"], ["export"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0 and result.stderr == ""
        assert result.stdout.startswith(f"usage: reparam-fx {' '.join(args)}".rstrip())
    assert "--in-place" in run_cli("fuse", "--help").stdout


# ---- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(runs, name):
    if name in SKIPPED:
        pytest.skip("running as root, who can write to a read-only folder" if os.geteuid() == 0
                    else "no /proc")
    _, message = BAD[name]
    result, folder, before = runs[name]
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(PREFIX), result.stderr
    assert message in lines[0], lines[0]
    assert result.stdout == ""
    assert snapshot(folder) == before  # no output, no temporary file, input bytes untouched


def test_no_subcommand_is_a_usage_error():
    result = run_cli()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("usage: reparam-fx") and lines[-1].startswith(PREFIX)
    assert "Traceback" not in result.stderr
