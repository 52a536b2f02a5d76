"""``make demo``: fuse example models, show what happened, lower and benchmark them.

By default the smallest variant of each zoo family (RepVGG-A0, MobileOne-S0, FastViT-T8,
RepViT-M0.9, MobileViT-XXS) and one whole detector (``yolov7_tiny``: YOLOv7's ``Model``
with its routing loop, RepConv and an ``IDetect`` head that does not trace, written in the
code shape of the official repository, ``tests/third_party/yolov7.py``), randomly
initialised with randomised BatchNorm statistics and layer scales; ``--reference`` uses the third-party-style implementations in
``tests/reference`` instead (summary only). Per model: parameters and conv / BatchNorm /
add counts before and after ``reparam_fx.fuse``, the patterns fused, and the relative
error of the fused model (fp32, and float64 for a float64 copy).

Then, for the zoo models (the detector too when named with ``--model``),
``tools/bench.py --save-models`` writes to ``--out`` (default
``out/``): each fused model as ``NAME.onnx``, ``NAME.mlpackage`` (Core ML ML Program),
``NAME.xnnpack.pte`` and ``NAME.coreml.pte`` (ExecuTorch programs for the XNNPACK and
Core ML delegates, ``reparam_fx.export.to_executorch``), and the benchmark table, JSON and
chart (``bench.md``, ``bench.json``, ``bench.png``).

    python tools/demo.py [--model NAME ...] [--reference] [--report] [--out out]
                         [--quick] [--no-bench]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

import reparam_fx  # noqa: E402
import zoo  # noqa: E402
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_  # noqa: E402

SMALLEST = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "mobilevit_xxs")
DETECTOR = "yolov7_tiny"


def _detector():
    from third_party.yolov7 import build_yolov7_tiny_idetect
    return randomize_parameters_(build_yolov7_tiny_idetect(width=4), names=("implicit",), seed=3)


def _builders(reference: bool) -> dict:
    if reference:
        from reference.models import ALL_BUILDERS
        return dict(ALL_BUILDERS)
    builders = {name: (lambda name=name: zoo.create(name)) for name in zoo.names()}
    return {**builders, DETECTOR: _detector}


def demo_one(name: str, build, show_report: bool) -> None:
    model = build().eval()
    randomize_batchnorm_(model, seed=1)
    randomize_parameters_(model, seed=2)
    x = torch.randn(2, 3, 64, 64)
    start = time.perf_counter()
    fused = reparam_fx.fuse(model)
    seconds = time.perf_counter() - start
    report = fused.fusion_report
    error32 = reparam_fx.verify(model, fused, (x,), precision="model", rtol=1e-4)
    model64 = copy.deepcopy(model).double()
    error64 = reparam_fx.verify(model64, reparam_fx.fuse(model64), (x.double(),), rtol=1e-8)
    before, after = report.ops_before, report.ops_after
    patterns = ", ".join(f"{p} x{n}" for p, n in sorted(report.pattern_counts().items()))
    print(f"{name:16s} params {report.params_before / 1e6:6.2f}M -> {report.params_after / 1e6:5.2f}M  "
          f"conv {before['conv']:>3} -> {after['conv']:<3} bn {before['batch_norm']:>3} -> "
          f"{after['batch_norm']:<2} add {before['add'] + before['sub']:>3} -> "
          f"{after['add'] + after['sub']:<3} err fp32 {error32:.1e} f64 {error64:.1e}  "
          f"fuse {seconds:.2f}s")
    print(f"{'':16s} fused: {patterns}")
    if show_report:
        print(report.table())
        print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a model name (repeatable)")
    parser.add_argument("--reference", action="store_true",
                        help="the third-party-style reference models instead of the zoo")
    parser.add_argument("--report", action="store_true", help="print each full report")
    parser.add_argument("--out", default=str(ROOT / "out"),
                        help="folder for the .onnx / .mlpackage / .pte files and the "
                             "benchmark (default out/)")
    parser.add_argument("--quick", action="store_true",
                        help="benchmark at 64x64 with 3 repeats (checks the pipeline)")
    parser.add_argument("--no-bench", action="store_true",
                        help="only the fusion summary: no files, no benchmark")
    args = parser.parse_args(argv)
    builders = _builders(args.reference)
    chosen = args.model or (list(builders) if args.reference else
                            [name for name in (*SMALLEST, DETECTOR) if name in builders])
    unknown = [name for name in chosen if name not in builders]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(builders)}")
    torch.manual_seed(0)
    print("reparam_fx demo: training-form models -> reparam_fx.fuse(model) -> one conv per "
          "linear region\n")
    for name in chosen:
        demo_one(name, builders[name], args.report)
    print("\nFull report of one model: python tools/demo.py --model fastvit_t8 --report --no-bench")
    if args.reference or args.no_bench:
        return 0
    print(f"\nLowering the fused models to ONNX, Core ML and ExecuTorch (XNNPACK, Core ML) "
          f"and benchmarking them (tools/bench.py) into {args.out}/ ...\n", flush=True)
    import bench
    # the detector's row takes as long as the five zoo rows together (lowering three forms
    # of a whole detector): make bench has it; --model yolov7_tiny asks for it here
    measured = chosen if args.model else [name for name in chosen if name != DETECTOR]
    return bench.main(["--models", *measured, "--out", args.out, "--save-models",
                       *(["--quick"] if args.quick else [])])


if __name__ == "__main__":
    sys.exit(main())
