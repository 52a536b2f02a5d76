"""Time Core ML predictions of an ``.mlpackage`` (macOS only).

    python tools/coreml_latency.py model.mlpackage [--runs 100] [--warmup 10]
                                   [--compute-units all|cpu_only|cpu_and_gpu|cpu_and_ne]

Loads the package, feeds seeded random inputs of the model's declared shapes, runs
``--warmup`` predictions, then times ``--runs`` predictions and prints the median (and
10th/90th percentiles) in milliseconds. Core ML prediction needs macOS: elsewhere the
command exits 2 and says how to run it on a Mac (or with Xcode's performance report).
Exit codes: 0 ok, 2 bad input or not macOS.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

PROG = "coreml_latency"
NOT_MACOS = (
    "Core ML prediction needs macOS (this is {system}). On a Mac: "
    "pip install coremltools numpy && python tools/coreml_latency.py {package} "
    "--compute-units all; or open the package in Xcode and run its Performance report "
    "on a connected iPhone.")
UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU",
         "cpu_and_ne": "CPU_AND_NE"}


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("package", help="the .mlpackage to time")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compute-units", choices=sorted(UNITS), default="all")
    args = parser.parse_args(argv)
    package = Path(args.package)
    if not package.exists():
        return fail(f"{package}: no such package; pass the path to a .mlpackage")
    if not (package.is_dir() and (package / "Manifest.json").exists()):
        return fail(f"{package}: not an .mlpackage (a folder with a Manifest.json)")
    if args.runs < 1 or args.warmup < 0:
        return fail("--runs must be at least 1 and --warmup at least 0")
    if platform.system() != "Darwin":
        return fail(NOT_MACOS.format(system=platform.system() or "unknown", package=package))
    import numpy as np
    import coremltools as ct
    model = ct.models.MLModel(str(package),
                              compute_units=getattr(ct.ComputeUnit, UNITS[args.compute_units]))
    rng = np.random.default_rng(0)
    feeds = {}
    for description in model.get_spec().description.input:
        shape = tuple(description.type.multiArrayType.shape)
        feeds[description.name] = rng.standard_normal(shape).astype(np.float32)
    for _ in range(args.warmup):
        model.predict(feeds)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        model.predict(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    deciles = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    print(f"{package.name}: median {statistics.median(times):.3f} ms (p10 {deciles[0]:.3f}, "
          f"p90 {deciles[-1]:.3f}) over {args.runs} runs, compute units {args.compute_units}, "
          f"{platform.machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
