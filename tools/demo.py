"""``make demo``: fuse example models and show what happened.

For each model: parameters and conv / BatchNorm / add counts before and after
``reparam_fx.fuse``, the patterns fused, and the relative error of the fused model
(fp32, and float64 for a float64 copy). The models are the third-party-style
implementations in ``tests/reference`` (RepVGG, MobileOne, FastViT, RepViT, a LeViT-style
head, a MobileViT-style block), with randomised BatchNorm statistics and layer scales.

    python tools/demo.py [--model NAME] [--report]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import reparam_fx  # noqa: E402
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_  # noqa: E402
from reference.models import ALL_BUILDERS  # noqa: E402


def demo_one(name: str, show_report: bool) -> None:
    model = ALL_BUILDERS[name]().eval()
    randomize_batchnorm_(model, seed=1)
    randomize_parameters_(model, seed=2)
    x = torch.randn(2, 3, 64, 64)
    fused = reparam_fx.fuse(model)
    report = fused.fusion_report
    error32 = reparam_fx.verify(model, fused, (x,), precision="model", rtol=1e-4)
    model64 = copy.deepcopy(model).double()
    error64 = reparam_fx.verify(model64, reparam_fx.fuse(model64), (x.double(),), rtol=1e-10)
    before, after = report.ops_before, report.ops_after
    patterns = ", ".join(f"{p} x{n}" for p, n in sorted(report.pattern_counts().items()))
    print(f"{name:16s} params {report.params_before:>8,} -> {report.params_after:<8,} "
          f"conv {before['conv']:>3} -> {after['conv']:<3} bn {before['batch_norm']:>3} -> "
          f"{after['batch_norm']:<2} add {before['add'] + before['sub']:>3} -> "
          f"{after['add'] + after['sub']:<3} err fp32 {error32:.1e} f64 {error64:.1e}")
    print(f"{'':16s} fused: {patterns}")
    if show_report:
        print(report.table())
        print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(ALL_BUILDERS), action="append",
                        help="one model (repeatable); default: all")
    parser.add_argument("--report", action="store_true", help="print each full report")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print("reparam_fx demo: training-form models -> reparam_fx.fuse(model) -> one conv per "
          "linear region\n")
    for name in args.model or list(ALL_BUILDERS):
        demo_one(name, args.report)
    print("\nFull report of one model: python tools/demo.py --model fastvit_tiny --report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
