"""tools/demo.py (make demo): the fusion summary, and the hand-off to tools/bench.py that
writes the fused models and the benchmark to out/ (the benchmark itself: test_bench.py)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench  # noqa: E402
import demo  # noqa: E402


def test_summary_then_bench_with_models_saved(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "main", lambda argv: calls.append(argv) or 0)
    assert demo.main(["--model", "repvgg_a0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "repvgg_a0" in out and "conv  44 -> 22" in out and "bn  61 -> 0" in out
    assert "to ONNX, Core ML and ExecuTorch (XNNPACK, Core ML)" in out
    # --save-models: NAME.onnx, .mlpackage, .xnnpack.pte and .coreml.pte (the files
    # themselves: test_bench.py, test_a_failed_core_ml_conversion_is_reported_...)
    assert calls == [["--models", "repvgg_a0", "--out", str(tmp_path), "--save-models"]]


def test_no_bench_and_reference_print_the_summary_only(monkeypatch, capsys):
    monkeypatch.setattr(bench, "main", lambda argv: pytest.fail("bench should not run"))
    assert demo.main(["--model", "mobileone_s0", "--no-bench"]) == 0
    assert demo.main(["--reference", "--model", "repvgg_tiny"]) == 0
    out = capsys.readouterr().out
    assert "mobileone_s0" in out and "repvgg_tiny" in out


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--model", "resnet50"])
    assert exit_info.value.code == 2
    assert "unknown model(s) resnet50" in capsys.readouterr().err


def test_the_default_demo_fuses_a_whole_detector(tmp_path, monkeypatch, capsys):
    """The default run shows the zoo and a whole YOLOv7 (``fuse(model)``, no example
    inputs, its IDetect head kept whole); the benchmark hand-off measures the zoo (the
    detector's row is ``make bench``'s)."""
    calls = []
    monkeypatch.setattr(bench, "main", lambda argv: calls.append(argv) or 0)
    assert demo.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("yolov7_tiny"))
    assert "conv  62 -> 59" in line and "bn  61 -> 0" in line, line
    assert calls and "yolov7_tiny" not in calls[0] and "repvgg_a0" in calls[0]
