"""tools/bench.py: its quick mode runs end to end and writes its three files with numbers
that say fusion happened; bad command lines exit 2 with one line and write nothing.
(The timings themselves are not asserted: performance lives in the benchmark.)

Lowering a training form to ExecuTorch takes 15-50 s, so one run (RepVGG-A0, the
smallest with a hand-written baseline) covers ExecuTorch and ``--save-models``; the
two-model run skips it. The int8 section runs once, alone and tiny (``--quick
--int8-only``: a 2-block RepVGG stack, three forms; about 10 s), in process."""

import json
import math
import re
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
                              "--save-models", "--no-int8"]) == 0
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


def test_quick_int8_section(tmp_path, capfd):
    """``--quick --int8-only``: the int8 section alone writes its three files; every form
    has its columns (SQNR finite, latency, ratio to ``fuse``, delegation) in both int8
    runtimes, the policy forms their mode counts, and the ``int8`` form computes what
    ``fuse`` does in float (exactness itself is tested in float64 elsewhere). No timing
    is asserted."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench as bench_module
    assert bench_module.main(["--quick", "--int8-only", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["bench-int8.json", "bench-int8.md", "bench-int8.png"]
    assert (tmp_path / "bench-int8.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capfd.readouterr()
    assert captured.err == ""  # nothing from torchao, ExecuTorch or ONNX Runtime

    data = json.loads((tmp_path / "bench-int8.json").read_text())
    settings = data["settings"]
    assert settings["quick"] and settings["executorch_threads"] == 1
    assert settings["forms"] == ["hand", "fuse", "int8"] and settings["size"] == 32
    (row,) = data["models"]
    assert row["model"] == "repvgg_stack2_c64" and row["forms"] == settings["forms"]
    assert row["input_shape"] == [1, 64, 32, 32]
    assert row["statistics"]["identity_batchnorms"] == 2  # one per block
    forms = set(row["forms"])
    for runtime in ("xnnpack", "ort"):
        numbers = row[runtime]
        assert not numbers["errors"]
        assert set(numbers["sqnr_db"]) == forms
        assert all(math.isfinite(v) and v > 0 for v in numbers["sqnr_db"].values())
        assert set(numbers["ms"]) == forms and all(v > 0 for v in numbers["ms"].values())
        assert set(numbers["over_fuse"]) == forms and numbers["over_fuse"]["fuse"] == 1.0
    assert row["xnnpack"]["fully_delegated"] == {"hand": True, "fuse": True, "int8": True}
    assert row["xnnpack"]["portable_ops"] == {"hand": {}, "fuse": {}, "int8": {}}
    # the policy ran, and what it kept apart is still the same function in float
    modes = row["modes"]["int8"]
    assert set(modes) == {"merged", "scalar", "channel"} and sum(modes.values()) == 2
    assert set(row["modes"]) == {"int8"}
    assert row["float_rel_error_vs_fuse"]["int8"] <= 1e-4
    assert all(error <= 1e-4 for error in row["float_rel_error_vs_train"].values())

    table = (tmp_path / "bench-int8.md").read_text()
    assert "Random calibration stands in for real data" in table
    assert ("| model | form | XNNPACK SQNR dB | XNNPACK ms | / fuse | fully delegated "
            "| ORT SQNR dB | ORT ms | / fuse | modes m/s/c | fp32 err vs train |") in table
    for form in row["forms"]:
        assert f"| repvgg_stack2_c64 | {form} | " in table
    assert "| repvgg_stack2_c64 | fuse | " in table and " | 1.000 | yes | " in table
    assert f"| {modes['merged']}/{modes['scalar']}/{modes['channel']} |" in table
    assert table.strip() in captured.out


@pytest.mark.parametrize("args, message", [
    (["--int8-only", "--no-executorch"], "--int8-only needs ExecuTorch"),
    (["--int8-models", "resnet50"], "unknown int8 model(s) resnet50"),
    (["--int8-size", "100"], "--int8-size must be a positive multiple of 32"),
    (["--int8-repeats", "0"], "--int8-repeats must be at least 1"),
])
def test_bad_int8_arguments_are_refused(args, message):
    """In process (the command line's exit 2 and one line are checked above)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench as bench_module
    with pytest.raises(bench_module.BenchError, match=re.escape(message)):
        bench_module.parse_args(args)


def test_int8_section_defaults():
    """On by default in the full run, with its models and forms; skipped without
    ExecuTorch or when --models picks the other sections' models (unless --int8); alone
    with --int8-only."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench as bench_module
    full = bench_module.parse_args([])
    assert full.int8 and not full.int8_only and full.int8_size == 96
    assert full.int8_repeats >= 20
    assert full.int8_models == [
        "repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "mobilevit_xxs",
        "repvgg_stack8_c32", "repvgg_stack8_c64", "timm.byobnet_repvgg_a0",
        "timm.byobnet_mobileone_s0", "yolov6.efficientrep_repvgg",
        "ultralytics.repconv_identity_bn"]
    settings = bench_module.int8_section_settings(full)
    assert settings["forms"] == ["train", "hand", "fuse", "int8", "scalar", "channel"]
    assert settings["calibration"] == 8 and settings["evaluation"] == 4
    assert not bench_module.parse_args(["--no-executorch"]).int8
    assert not bench_module.parse_args(["--no-int8"]).int8
    assert bench_module.parse_args(["--int8-only"]).int8
    assert bench_module.parse_args(["--quick"]).int8_models == ["repvgg_stack2_c64"]
    # --models chooses the other sections' models (make demo): int8 only when asked for
    assert not bench_module.parse_args(["--models", "repvgg_a0"]).int8
    assert bench_module.parse_args(["--models", "repvgg_a0", "--int8"]).int8
