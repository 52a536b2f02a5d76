"""tools/bench.py: its quick mode runs end to end and writes its three files with numbers
that say fusion happened; bad command lines exit 2 with one line and write nothing.
(The timings themselves are not asserted: performance lives in the benchmark.)

Lowering a training form to ExecuTorch takes 15-50 s, so one run (RepVGG-A0, the
smallest with a hand-written baseline) covers ExecuTorch and ``--save-models``; the
two-model run skips it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # one family with a hand-written baseline, one without (and converted to Core ML
    # through the torch.export frontend)
    result = bench("--quick", "--models", "mobileone_s0", "mobilevit_xxs", "--out", out,
                   "--no-executorch")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_quick_mode_writes_table_json_and_chart(quick_run):
    out, result = quick_run
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "bench.md").read_text()
    assert "| mobileone_s0 | torch eager, 1 thr. |" in table
    assert "| mobilevit_xxs | ONNX Runtime, 1 thr. |" in table
    assert "0.79 (iPhone 12 Pro)" in table and "need a Mac" in table
    assert "ExecuTorch not run (--no-executorch)" in table and "ExecuTorch XNNPACK" not in table
    assert table.strip() in result.stdout
    # nothing from coremltools, ExecuTorch or torchao (importing coremltools imports both:
    # version warnings, "Failed to load" lines, torch's pytree deprecation notice)
    assert result.stderr == ""


def test_quick_mode_numbers_show_the_fusion(quick_run):
    out, _ = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["size"] == 64 and data["settings"]["quick"]
    rows = {row["model"]: row for row in data["models"]}
    assert list(rows) == ["mobileone_s0", "mobilevit_xxs"]

    mobileone = rows["mobileone_s0"]
    assert mobileone["forms"] == ["train", "hand", "fused"]
    assert mobileone["rel_error_float64"] <= 1e-10 and mobileone["rel_error_fp32"] <= 1e-5
    # the Core ML figure: ~455 MIL ops in training form, <= 89 fused, <= hand
    mil = mobileone["coreml_mil_ops"]
    assert mil["train"] >= 400 and mil["fused"] <= min(89, mil["hand"])
    assert mobileone["onnx_nodes"]["fused"] <= mobileone["onnx_nodes"]["hand"] \
        < mobileone["onnx_nodes"]["train"]
    assert mobileone["params"]["fused"] == mobileone["params"]["hand"] \
        < mobileone["params"]["train"]
    assert mobileone["macs"]["fused"] == mobileone["macs"]["hand"] < mobileone["macs"]["train"]
    assert mobileone["published_iphone_ms"] == 0.79

    mobilevit = rows["mobilevit_xxs"]
    assert mobilevit["forms"] == ["train", "fused"]
    assert mobilevit["coreml_frontend"]["fused"] == "export"
    assert mobilevit["macs"]["fused"] <= mobilevit["macs"]["train"]
    assert mobilevit["published_iphone_ms"] is None

    assert data["versions"]["executorch"] is None
    for row in rows.values():
        assert set(row["latency"]) >= {"eager_1t", "ort_1t"} and "executorch" not in row
        assert not any(key.startswith("executorch") for key in row["latency"])
        for timing in row["latency"].values():
            assert set(timing["ms"]) == set(row["forms"])
            assert all(ms > 0 for ms in timing["ms"].values())
            assert set(timing["speedup"]) == set(row["forms"]) - {"train"}


@pytest.mark.parametrize("args, message", [
    (["--models", "resnet50"], "unknown model(s) resnet50"),
    (["--size", "100"], "--size must be a positive multiple of 32"),
    (["--repeats", "0"], "--repeats and --calls must be at least 1"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    result = bench(*args, "--out", tmp_path / "out", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("bench.py: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    result = bench("--quick", "--models", "repvgg_a0", "--out", target, timeout=120)
    assert result.returncode == 2 and "exists and is not a folder" in result.stderr
    assert target.read_text() == "keep me"


def test_a_failed_core_ml_conversion_is_reported_and_the_rest_kept(tmp_path, monkeypatch,
                                                                   capfd):
    """Also the ExecuTorch run: its columns, and the fused model saved in every format
    except the refused Core ML package; stderr holds the warnings and nothing else
    (capfd: ExecuTorch's C++ runtime writes to file descriptor 2 itself)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench as bench_module
    from reparam_fx.export import ExportError

    def refuse(model, *args, **kwargs):
        raise ExportError(f"Core ML conversion of {type(model).__name__} failed (test)")
    monkeypatch.setattr(bench_module, "to_coreml", refuse)
    assert bench_module.main(["--quick", "--models", "repvgg_a0", "--out", str(tmp_path),
                              "--save-models"]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    (row,) = data["models"]
    assert set(row["coreml_errors"]) == {"train", "hand", "fused"}
    assert row["onnx_nodes"]["fused"] < row["onnx_nodes"]["train"] and row["latency"]
    table = (tmp_path / "bench.md").read_text()
    assert "conversion failed (train, hand, fused; see bench.json)" in table
    assert (tmp_path / "bench.png").stat().st_size > 0
    err = capfd.readouterr().err
    assert "bench.py: warning: repvgg_a0 (fused): Core ML conversion" in err
    assert all(line.startswith("bench.py: warning: repvgg_a0 (") for line in err.splitlines()), err

    # ExecuTorch, XNNPACK: latency next to eager and ONNX Runtime, sizes, delegation, error
    assert data["settings"]["executorch_threads"] == 1 and data["versions"]["executorch"]
    timing = row["latency"]["executorch_1t"]
    assert set(timing["ms"]) == {"train", "hand", "fused"}
    assert all(ms > 0 for ms in timing["ms"].values())
    assert set(timing["speedup"]) == {"hand", "fused"} and timing["fused_over_hand"] > 0
    et = row["executorch"]
    assert et["fully_delegated"] == {"train": True, "hand": True, "fused": True}
    assert et["portable_ops"] == {"train": {}, "hand": {}, "fused": {}}
    # the fused program holds the same weights as the hand-written one; the training
    # form's extra branches make its program larger
    assert 0 < et["pte_bytes"]["fused"] <= et["pte_bytes"]["hand"] * 1.001 \
        < et["pte_bytes"]["train"]
    assert all(error <= 1e-5 for error in et["rel_error"].values())
    assert "| repvgg_a0 | ExecuTorch XNNPACK, 1 thr. |" in table
    assert "ExecuTorch 1" in table and "1 thread(s), set with executorch's" in table
    assert f"| repvgg_a0 | {et['pte_bytes']['train']:,} → " in table
    assert "| yes → yes → yes | none |" in table

    # --save-models: the fused model in every format but the refused Core ML package
    saved = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("bench."))
    assert saved == ["repvgg_a0.coreml.pte", "repvgg_a0.onnx", "repvgg_a0.xnnpack.pte"]
    assert (tmp_path / "repvgg_a0.xnnpack.pte").stat().st_size == et["pte_bytes"]["fused"]
    assert (tmp_path / "repvgg_a0.coreml.pte").stat().st_size > 1_000_000
    for backend in ("xnnpack", "coreml"):  # ExecuTorch's flatbuffer file identifier
        assert (tmp_path / f"repvgg_a0.{backend}.pte").read_bytes()[4:6] == b"ET"
