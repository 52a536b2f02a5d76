"""Benchmark of the fusion engine against hand-written code: what ``make bench-fuse`` runs.

Three measurements, printed as markdown and written to ``out/bench_fuse.json``:

1. Eager CPU latency of each reference model (third-party-style implementations in
   ``tests/reference``) in training form, after its own hand-written ``reparameterize()``
   and after ``reparam_fx.fuse``: medians of interleaved repeats (each repeat times the
   three forms back to back, in rotating order, ``--calls`` calls each). The fused/hand
   ratio is the median of the per-repeat ratios, which cancels the machine's drift
   between repeats. Also op counts and the fp32 relative error of the fused model.
2. ONNX: each reference model exported (torch.onnx, dynamo=False, opset 17) in training
   form and fused with ``reparam_fx.fuse_onnx_model``, against the export of its
   hand-reparameterized form: node counts and ONNX Runtime CPU latency (one thread,
   interleaved repeats, median of per-repeat ratios).
3. ``reparam_fx.fuse`` wall time on an already traced graph of N RepVGG blocks, for
   N = 400 and 4000, median of repeats, and the 10x scaling ratio; and
   ``reparam_fx.fuse_onnx_model`` on the ONNX export of N = 110 and 1100 such blocks
   (about 2,200 and 22,000 nodes).

    python tools/bench_fuse.py [--repeats 30] [--size 224] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

import reparam_fx  # noqa: E402
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_  # noqa: E402
from reference.models import ALL_BUILDERS, reparameterize_model  # noqa: E402
from timing import interleaved, machine_description, median_ms, median_ratio  # noqa: E402


def latency_table(repeats: int, size: int, calls: int) -> list[dict]:
    rows = []
    x = torch.randn(1, 3, size, size)
    for name, build in ALL_BUILDERS.items():
        model = build().eval()
        randomize_batchnorm_(model, seed=1)
        randomize_parameters_(model, seed=2)
        hand = reparameterize_model(model).eval()
        start = time.perf_counter()
        fused = reparam_fx.fuse(model)
        fuse_seconds = time.perf_counter() - start
        forms = {"train": model, "hand": hand, "fused": fused}
        with torch.inference_mode():
            samples = interleaved({k: (lambda m=m: m(x)) for k, m in forms.items()},
                                  repeats, calls)
        median = {key: median_ms(values) for key, values in samples.items()}
        paired = median_ratio(samples["fused"], samples["hand"])
        ops_hand, ops_fused = reparam_fx.op_counts(hand), reparam_fx.op_counts(fused)
        rows.append({
            "model": name,
            "train_ms": median["train"], "hand_ms": median["hand"], "fused_ms": median["fused"],
            "fused_over_hand": paired,
            "speedup_vs_train": median["train"] / median["fused"],
            "ops_hand": dict(ops_hand), "ops_fused": dict(ops_fused),
            "ops_not_above_hand": all(ops_fused[k] <= ops_hand[k] for k in ops_fused),
            "params_hand": reparam_fx.parameter_count(hand),
            "params_fused": reparam_fx.parameter_count(fused),
            "fp32_rel_error": reparam_fx.verify(model, fused, (x,), precision="model", rtol=1e-4),
            "fuse_seconds": fuse_seconds,
        })
    return rows


def _export(model, x, **options):
    """``torch.onnx.export`` (dynamo=False, opset 17) to a ModelProto, quietly."""
    import contextlib
    import io
    import warnings

    import onnx
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, **options)
    return onnx.load_from_string(buffer.getvalue())


def onnx_table(repeats: int, size: int, calls: int) -> list[dict]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    x = torch.randn(1, 3, size, size)
    rows = []
    for name, build in ALL_BUILDERS.items():
        model = build().eval()
        randomize_batchnorm_(model, seed=1)
        randomize_parameters_(model, seed=2)
        train = _export(model, x)
        hand = _export(reparameterize_model(model), x)
        start = time.perf_counter()
        fused, _ = reparam_fx.fuse_onnx_model(train)
        fuse_seconds = time.perf_counter() - start
        error = reparam_fx.verify_onnx(train, fused, rtol=1e-4)
        sessions = {key: ort.InferenceSession(m.SerializeToString(), options,
                                              providers=["CPUExecutionProvider"])
                    for key, m in (("train", train), ("hand", hand), ("fused", fused))}
        feed = {train.graph.input[0].name: x.numpy()}
        samples = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()},
                              repeats, calls)
        median = {key: median_ms(v) for key, v in samples.items()}
        rows.append({
            "model": name, "nodes_train": len(train.graph.node), "nodes_hand": len(hand.graph.node),
            "nodes_fused": len(fused.graph.node),
            "train_ms": median["train"], "hand_ms": median["hand"], "fused_ms": median["fused"],
            "fused_over_hand": median_ratio(samples["fused"], samples["hand"]),
            "speedup_vs_train": median["train"] / median["fused"],
            "rel_error": error, "fuse_seconds": fuse_seconds})
    return rows


class _RepVGGBlock(nn.Module):
    """The official block's graph shape: dense 3x3+BN, 1x1+BN, identity BN, ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.rbr_dense = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                       nn.BatchNorm2d(channels))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                     nn.BatchNorm2d(channels))
        self.rbr_identity = nn.BatchNorm2d(channels)
        self.se = nn.Identity()
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        id_out = self.rbr_identity(x)
        return self.nonlinearity(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + id_out))


def fuse_scaling(repeats: int, blocks=(400, 4000)) -> list[dict]:
    rows = []
    for count in blocks:
        model = nn.Sequential(*[_RepVGGBlock(4) for _ in range(count)]).eval()
        traced = torch.fx.symbolic_trace(model)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fused = reparam_fx.fuse(traced)
            times.append(time.perf_counter() - start)
        rows.append({"blocks": count, "nodes": len(traced.graph.nodes),
                     "seconds": statistics.median(times),
                     "convs_after": reparam_fx.op_counts(fused)["conv"]})
    return rows


def onnx_scaling(repeats: int, blocks=(110, 1100)) -> list[dict]:
    rows = []
    for count in blocks:
        model = nn.Sequential(*[_RepVGGBlock(4) for _ in range(count)]).eval()
        # keep every BatchNormalization (no export-time folding): the training-form graph
        exported = _export(model, torch.randn(1, 4, 8, 8), do_constant_folding=False,
                           training=torch.onnx.TrainingMode.PRESERVE)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fused, _ = reparam_fx.fuse_onnx_model(exported)
            times.append(time.perf_counter() - start)
        rows.append({"blocks": count, "nodes": len(exported.graph.node),
                     "nodes_after": len(fused.graph.node), "seconds": statistics.median(times)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--calls", type=int, default=3, help="calls per timed sample")
    parser.add_argument("--size", type=int, default=224, help="input side (default 224)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="few repeats, small input")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_fuse.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.size, args.calls = 5, 64, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    machine = f"{machine_description()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    print(f"# reparam_fx benchmark ({time.strftime('%Y-%m-%d')}; {machine})\n")
    rows = latency_table(args.repeats, args.size, args.calls)
    print(f"Eager CPU latency, batch 1, {args.size}x{args.size}, median of {args.repeats} "
          f"interleaved repeats of {args.calls} call(s) (ms); fused/hand is the median of "
          "per-repeat ratios:\n")
    print("| model | train | hand reparam | reparam_fx | fused/hand | speed-up vs train "
          "| ops <= hand | params hand -> fused | fp32 rel. error |")
    print("|---|---:|---:|---:|---:|---:|:---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['train_ms']:.2f} | {r['hand_ms']:.2f} | {r['fused_ms']:.2f} "
              f"| {r['fused_over_hand']:.3f} | {r['speedup_vs_train']:.2f}x "
              f"| {'yes' if r['ops_not_above_hand'] else 'NO'} "
              f"| {r['params_hand']:,} -> {r['params_fused']:,} | {r['fp32_rel_error']:.1e} |")
    onnx_rows = onnx_table(args.repeats, args.size, args.calls)
    print("\nONNX Runtime CPU latency (1 thread), same input, ms; nodes train -> hand -> "
          "fused:\n")
    print("| model | nodes train | nodes hand | nodes fused | train | hand reparam | "
          "reparam_fx (ONNX) | fused/hand | speed-up vs train | rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in onnx_rows:
        print(f"| {r['model']} | {r['nodes_train']} | {r['nodes_hand']} | {r['nodes_fused']} "
              f"| {r['train_ms']:.2f} | {r['hand_ms']:.2f} | {r['fused_ms']:.2f} "
              f"| {r['fused_over_hand']:.3f} | {r['speedup_vs_train']:.2f}x | {r['rel_error']:.1e} |")
    scaling = fuse_scaling(3 if args.quick else 7, (40, 400) if args.quick else (400, 4000))
    print("\n`reparam_fx.fuse` on an already traced graph of RepVGG blocks (median):\n")
    print("| blocks | graph nodes | fuse() seconds | convs after |")
    print("|---:|---:|---:|---:|")
    for r in scaling:
        print(f"| {r['blocks']} | {r['nodes']:,} | {r['seconds']:.3f} | {r['convs_after']} |")
    ratio = scaling[1]["seconds"] / scaling[0]["seconds"]
    print(f"\n10x the graph -> {ratio:.1f}x the time")
    onnx_scale = onnx_scaling(1 if args.quick else 3, (11, 110) if args.quick else (110, 1100))
    print("\n`reparam_fx.fuse_onnx_model` on exported RepVGG blocks (median):\n")
    print("| blocks | ONNX nodes | nodes after | seconds |")
    print("|---:|---:|---:|---:|")
    for r in onnx_scale:
        print(f"| {r['blocks']} | {r['nodes']:,} | {r['nodes_after']:,} | {r['seconds']:.2f} |")
    onnx_ratio = onnx_scale[1]["seconds"] / onnx_scale[0]["seconds"]
    print(f"\n10x the ONNX graph -> {onnx_ratio:.1f}x the time")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"),
                                    "latency": rows, "onnx": onnx_rows,
                                    "fuse_scaling": scaling, "onnx_scaling": onnx_scale,
                                    "scaling_ratio": ratio}, indent=2))
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
