"""What fusion buys on the zoo: latency, size and op counts before and after ``reparam_fx.fuse``.

For each zoo model (default: the smallest variant of each family, and one whole detector;
``--all``: all 31 zoo variants; ``--models``: a choice), randomly initialised with
randomised BatchNorm statistics:

- forms: ``train`` (the zoo's training form, in eval mode), ``fused``
  (``reparam_fx.fuse(train)``) and, where a hand-written implementation of the same network
  exists (``tests/reference``, full size: RepVGG-A0, MobileOne-S0, FastViT-T8,
  RepViT-M0.9), ``hand`` (its own ``reparameterize()``, the way the official repos deploy);
  the detector row, ``yolov7_tiny`` (the corpus's YOLOv7 ``Model`` with ``IDetect`` and
  RepConv, at 32 to 128 channels, ``tests/third_party/yolov7.py``), has ``hand`` = YOLOv7's
  own ``Model.fuse()`` and ``fused`` = ``reparam_fx.fuse(train)`` with no example inputs;
- latency, batch 1: torch eager and ONNX Runtime CPU (idle threads not spinning), each
  with 1 thread and with every core, and ExecuTorch's XNNPACK delegate with 1 thread
  (``executorch.runtime``; each ``.pte`` loaded once, ``method.execute`` timed); medians
  of interleaved repeats (``tools/timing.py``); speed-ups are medians of per-repeat
  ratios against ``train``;
- parameters, MACs (conv / linear / matmul), ONNX node counts (``torch.onnx.export``,
  dynamo=False, opset 17, the exporter's own Conv+BN folding included), Core ML MIL op
  counts (ML Program, iOS 16, fp16; ``reparam_fx.export.to_coreml``), and the relative
  error of ``fused`` against ``train`` (float64 and fp32);
- ExecuTorch XNNPACK programs (``reparam_fx.export``): ``.pte`` bytes, whether the
  delegate took every op (else the ops left to the portable kernels), and the relative
  error of each program run in ExecuTorch against its module in torch.

The int8 section (``tools/bench_int8.py``; on by default unless ``--models`` chooses the
models of the others (``--int8`` then adds it), ``--no-int8`` skips it, ``--int8-only`` runs
it alone, as ``make bench-int8`` does): for the smallest zoo variants,
two RepVGG block stacks and four third-party code shapes, all with trained-like BatchNorm
statistics, the forms ``train`` / ``hand`` / ``fuse`` / ``fuse(target="int8")`` and two
int8 policies with one extraction mode each, quantized to int8 (PT2E, XNNPACK quantizer,
random calibration standing in for real data): the SQNR and the 1-thread latency of the
ExecuTorch XNNPACK program and of the ONNX Runtime QDQ model, delegation, the policy's
mode counts; the plot of SQNR against XNNPACK latency relative to ``fuse``.

Writes ``bench.md`` (tables), ``bench.json`` (every number) and ``bench.png`` (chart) to
``--out`` (default ``out/bench``), and for the int8 section ``bench-int8.md``,
``bench-int8.json`` and ``bench-int8.png``; ``--save-models`` also writes each fused model as
``NAME.onnx``, ``NAME.mlpackage``, ``NAME.xnnpack.pte`` and ``NAME.coreml.pte`` there.
Core ML prediction needs macOS (``tools/coreml_latency.py``); published iPhone latencies
are quoted next to the results.

    python tools/bench.py [--models NAME ...] [--all] [--quick] [--size 224]
                          [--repeats 20] [--calls 2] [--out out/bench] [--save-models]
                          [--no-coreml] [--no-executorch]
                          [--no-int8 | --int8-only] [--int8-models NAME ...]
                          [--int8-forms FORM ...] [--int8-size 96] [--int8-repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

import reparam_fx  # noqa: E402
from reparam_fx.cli.files import write_bytes  # noqa: E402
import zoo  # noqa: E402
from reparam_fx.export import (ExportError, mil_op_histogram, to_coreml,  # noqa: E402
                               to_executorch, to_onnx)
# private: one lowering gives both the bytes and the delegation counts (see xnnpack_program);
# the library's quiet context for executorch's runtime logs (see executorch_runtime)
from reparam_fx.export import (check_executorch, executorch_runtime as  # noqa: E402
                               load_executorch_runtime, set_executorch_threads)
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_  # noqa: E402
from reference.models import FULL_SIZE_BUILDERS, reparameterize_model  # noqa: E402
from timing import interleaved, machine_description, median_ms, median_ratio  # noqa: E402
import bench_int8  # noqa: E402

SMALLEST = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "mobilevit_xxs")
DETECTORS = ("yolov7_tiny",)
FORMS = ("train", "hand", "fused")

# Published latencies of the deployed (reparameterized) models, ms, from the official
# repositories' README tables: apple/ml-mobileone and apple/ml-fastvit ("iPhone 12 Pro"),
# THU-MIG/RepViT ("iPhone 12, iOS 16, Core ML"). RepVGG's and MobileViT's official
# repositories publish no iPhone latency.
PUBLISHED_IPHONE_MS = {
    "mobileone_s0": 0.79, "mobileone_s1": 0.89, "mobileone_s2": 1.18, "mobileone_s3": 1.53,
    "mobileone_s4": 1.86,
    "fastvit_t8": 0.8, "fastvit_t12": 1.2, "fastvit_s12": 1.4, "fastvit_sa12": 1.6,
    "fastvit_sa24": 2.6, "fastvit_sa36": 3.5, "fastvit_ma36": 4.6,
    "repvit_m0_9": 0.9, "repvit_m1_0": 1.0, "repvit_m1_1": 1.1, "repvit_m1_5": 1.5,
    "repvit_m2_3": 2.3,
}
PUBLISHED_DEVICE = {"mobileone": "iPhone 12 Pro", "fastvit": "iPhone 12 Pro",
                    "repvit": "iPhone 12"}


class BenchError(Exception):
    """A bad command line or a missing optional package: one line, exit 2."""


def _detector_forms(name: str) -> dict:
    """A whole detector: ``train``, ``hand`` (the library's own deploy conversion) and
    ``fused`` (``reparam_fx.fuse(train)``: no example inputs)."""
    from third_party.yolov7 import build_yolov7_tiny_idetect, yolov7_fuse
    train = build_yolov7_tiny_idetect(width=4).eval()
    randomize_batchnorm_(train, seed=1)
    randomize_parameters_(train, names=("implicit",), seed=2)
    return {"train": train, "hand": yolov7_fuse(copy.deepcopy(train)).eval(),
            "fused": reparam_fx.fuse(train)}


def prepared_forms(name: str) -> dict:
    """``train`` / ``hand`` (when a hand-written baseline exists) / ``fused`` modules."""
    if name in DETECTORS:
        return _detector_forms(name)
    train = zoo.create(name).eval()
    randomize_batchnorm_(train, seed=1)
    randomize_parameters_(train, seed=2)
    forms = {"train": train}
    if name in FULL_SIZE_BUILDERS:
        reference = FULL_SIZE_BUILDERS[name]().eval()
        randomize_batchnorm_(reference, seed=1)
        randomize_parameters_(reference, seed=2)
        forms["hand"] = reparameterize_model(reference).eval()
    forms["fused"] = reparam_fx.fuse(train)
    return forms


def float64_error(train, x) -> float:
    """Relative error of ``fuse`` on a float64 copy (fusing the float32 model rounds the
    merged weights to float32, so its float64 comparison would measure that rounding)."""
    train64 = copy.deepcopy(train).double()
    return reparam_fx.verify(train64, reparam_fx.fuse(train64), (x.double(),), rtol=1e-8)


def _summary(samples: dict) -> dict:
    """Median ms per form, speed-ups over ``train`` and, with a hand-written baseline,
    ``fused_over_hand`` (each a median of per-repeat ratios)."""
    summary = {"ms": {form: median_ms(s) for form, s in samples.items()},
               "speedup": {form: median_ratio(samples["train"], s)
                           for form, s in samples.items() if form != "train"}}
    if "hand" in samples:
        summary["fused_over_hand"] = median_ratio(samples["fused"], samples["hand"])
    return summary


def eager_latency(forms: dict, x, threads: int, repeats: int, calls: int, tick) -> dict:
    torch.set_num_threads(threads)
    runners = {form: (lambda m=module: m(x)) for form, module in forms.items()}
    with torch.inference_mode():
        samples = interleaved(runners, repeats, calls, tick=tick)
    return _summary(samples)


def onnx_latency(onnx_bytes: dict, x, threads: int, repeats: int, calls: int, tick) -> dict:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle worker threads must not spin: with several sessions timed in turn, one
    # session's spinning pool takes cores from the next (on 2 cores that made 2-thread
    # runs slower than 1-thread runs and skewed ratios by up to 40%).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {form: ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                for form, data in onnx_bytes.items()}
    feed = x.numpy()
    runners = {form: (lambda s=session: s.run(None, {s.get_inputs()[0].name: feed}))
               for form, session in sessions.items()}
    samples = interleaved(runners, repeats, calls, tick=tick)
    return _summary(samples)


_EXECUTORCH_RUNTIME = []  # [(Runtime, thread count)] once set up


def executorch_runtime(threads: int = 1):
    """``(ExecuTorch's Runtime, the thread count of its threadpool)``; the XNNPACK delegate
    runs on that pool. The first call sets the pool to ``threads`` threads
    (``reparam_fx.export.set_executorch_threads``: a program loaded before would keep the
    old pool, so this runs before bench.py loads any program). The count is None where
    this executorch cannot set it (then its default pool is used)."""
    if not _EXECUTORCH_RUNTIME:
        count = set_executorch_threads(threads)
        _EXECUTORCH_RUNTIME.append((load_executorch_runtime(), count))
    return _EXECUTORCH_RUNTIME[0]


def xnnpack_program(module, x) -> tuple:
    """``(.pte bytes, ExecuTorchCheck)`` of ``module`` lowered for XNNPACK once (the check
    keeps the program it ran)."""
    check = check_executorch(module, (x,))
    return check.program, check


def executorch_numbers(name: str, forms: dict, x, args, progress) -> tuple[dict, dict]:
    """Lower every form for XNNPACK and load each program once: ``({form: (program, method)},
    the row's "executorch" entry)``: ``.pte`` bytes, full delegation, ops left to the
    portable kernels, relative error of the program against its module in torch, and any
    lowering errors (then the form has no method)."""
    programs, info = {}, {"pte_bytes": {}, "fully_delegated": {}, "portable_ops": {},
                          "rel_error": {}}
    runtime, info["threads"] = executorch_runtime(1)  # (before any program is loaded)
    for form, module in forms.items():
        progress.set_postfix_str(f"{name}: ExecuTorch {form}")
        try:
            programs[form], check = xnnpack_program(module, x)
        except ExportError as error:  # recorded; the other numbers are still worth having
            info.setdefault("errors", {})[form] = str(error)
            progress.write(f"bench.py: warning: {name} ({form}): {error}", file=sys.stderr)
            continue
        info["pte_bytes"][form] = check.pte_bytes
        info["fully_delegated"][form] = check.fully_delegated
        info["portable_ops"][form] = dict(sorted(check.portable.items()))
    methods = {}
    for form, program in programs.items():
        loaded = runtime.load_program(program)
        # the method must not outlive its program: freeing the program under a loaded
        # method made the next execute fail ("Expected 0 [inputs], but got 1"), then crash
        methods[form] = (loaded, loaded.load_method("forward"))
        with torch.no_grad():
            info["rel_error"][form] = reparam_fx.relative_error(
                forms[form](x), methods[form][1].execute([x]))
    return methods, info


def executorch_latency(methods: dict, x, repeats: int, calls: int, tick) -> dict:
    """``methods``: ``{form: (program, method)}`` as loaded by :func:`executorch_numbers`."""
    runners = {form: (lambda m=method: m.execute([x])) for form, (_, method) in methods.items()}
    return _summary(interleaved(runners, repeats, calls, tick=tick))


def save_executorch_programs(name: str, fused, x, args, progress) -> None:
    """``NAME.xnnpack.pte`` and ``NAME.coreml.pte`` of the fused model in ``--out``."""
    for backend in ("xnnpack", "coreml"):
        progress.set_postfix_str(f"{name}: {backend}.pte")
        try:
            to_executorch(fused, (x,), args.out / f"{name}.{backend}.pte", backend=backend)
        except ExportError as error:
            progress.write(f"bench.py: warning: {name}.{backend}.pte not written: {error}",
                           file=sys.stderr)


def measure(name: str, args, progress) -> dict:
    """Every number for one zoo model (see the module docstring)."""
    progress.set_postfix_str(f"{name}: fuse")
    start = time.perf_counter()
    forms = prepared_forms(name)
    fuse_seconds = time.perf_counter() - start
    train, fused = forms["train"], forms["fused"]
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    row = {
        "model": name, "family": name.split("_")[0], "forms": list(forms),
        "fuse_seconds": fuse_seconds,
        "patterns": fused.fusion_report.pattern_counts(),
        "rel_error_float64": float64_error(train, x),
        "rel_error_fp32": reparam_fx.verify(train, fused, (x,), precision="model", rtol=1e-4),
        "params": {f: reparam_fx.parameter_count(m) for f, m in forms.items()},
        "macs": {f: reparam_fx.mac_count(m, (x,)) for f, m in forms.items()},
        "published_iphone_ms": PUBLISHED_IPHONE_MS.get(name),
    }
    progress.update()

    progress.set_postfix_str(f"{name}: ONNX export")
    onnx_bytes = {}
    with tempfile.TemporaryDirectory() as folder:
        for form, module in forms.items():
            path = to_onnx(module, (x,), Path(folder) / f"{form}.onnx")
            onnx_bytes[form] = path.read_bytes()
    if args.save_models:
        write_bytes(args.out / f"{name}.onnx", onnx_bytes["fused"])
    import onnx
    row["onnx_nodes"] = {form: len(onnx.load_from_string(data).graph.node)
                         for form, data in onnx_bytes.items()}
    progress.update()

    if not args.no_coreml:
        row["coreml_mil_ops"], row["coreml_frontend"] = {}, {}
        for form, module in forms.items():
            progress.set_postfix_str(f"{name}: Core ML {form}")
            package = args.out / f"{name}.mlpackage" if args.save_models and form == "fused" \
                else None
            try:
                mlmodel = to_coreml(module, (x,), package)
            except ExportError as error:  # recorded; the other numbers are still worth having
                row.setdefault("coreml_errors", {})[form] = str(error)
                progress.write(f"bench.py: warning: {name} ({form}): {error}", file=sys.stderr)
                continue
            row["coreml_mil_ops"][form] = sum(mil_op_histogram(mlmodel).values())
            row["coreml_frontend"][form] = mlmodel.user_defined_metadata["frontend"]
    progress.update()

    methods = {}
    if not args.no_executorch:
        methods, row["executorch"] = executorch_numbers(name, forms, x, args, progress)
        if args.save_models:
            save_executorch_programs(name, fused, x, args, progress)
        progress.update()

    row["latency"] = {}
    for runtime, measure_latency, models in (("eager", eager_latency, forms),
                                             ("ort", onnx_latency, onnx_bytes)):
        for threads in args.threads:
            progress.set_postfix_str(f"{name}: {runtime}, {threads} thread(s)")
            row["latency"][f"{runtime}_{threads}t"] = measure_latency(
                models, x, threads, args.repeats, args.calls, progress.update)
    if not args.no_executorch:
        if "errors" in row["executorch"]:  # speed-ups need every form
            progress.update(args.repeats)
        else:
            threads = row["executorch"]["threads"]
            progress.set_postfix_str(f"{name}: ExecuTorch XNNPACK, {threads} thread(s)")
            row["latency"][f"executorch_{threads or '?'}t"] = executorch_latency(
                methods, x, args.repeats, args.calls, progress.update)
    return row


# ---- output -------------------------------------------------------------------------------


def _chain(values: dict, fmt=str) -> str:
    """``train -> hand -> fused`` with a dash where a form is missing."""
    return " → ".join(fmt(values[f]) if f in values else "—" for f in FORMS)


RUNTIME_NAMES = {"eager": "torch eager", "ort": "ONNX Runtime",
                 "executorch": "ExecuTorch XNNPACK"}


def _runtime_label(key: str) -> str:
    runtime, threads = key.rsplit("_", 1)
    return f"{RUNTIME_NAMES[runtime]}, {threads[:-1]} thr."


def _executorch_caption(result: dict) -> str:
    threads = result["settings"].get("executorch_threads")
    if result["versions"].get("executorch") is None:
        return "ExecuTorch not run (--no-executorch)."
    if threads is None:
        return ("ExecuTorch XNNPACK: this executorch offers no way to set the thread count "
                "from Python, so its runtime's default threadpool was used (thread count "
                "unknown).")
    return (f"ExecuTorch {result['versions']['executorch']} XNNPACK: {threads} thread(s), set "
            "with executorch's experimental `_unsafe_reset_threadpool` before any program "
            "was loaded; each `.pte` loaded once, `method.execute` timed.")


def _executorch_table(rows: list) -> list[str]:
    lines = [
        "## ExecuTorch, XNNPACK delegate (train → hand → fused)",
        "",
        "| model | .pte bytes | fully delegated | ops left to portable kernels (fused) "
        "| rel. error of the fused program vs torch |",
        "|---|---|---|---|---:|",
    ]
    for row in rows:
        et = row["executorch"]
        failed = (f" (lowering failed: {', '.join(et['errors'])}; see bench.json)"
                  if "errors" in et else "")
        portable = et["portable_ops"].get("fused")
        portable = ("—" if portable is None else
                    ", ".join(f"{op} x{n}" for op, n in portable.items()) or "none")
        error = et["rel_error"].get("fused")
        lines.append(
            f"| {row['model']} | {_chain(et['pte_bytes'], lambda v: f'{v:,}')}{failed} "
            f"| {_chain(et['fully_delegated'], lambda v: 'yes' if v else 'no')} | {portable} "
            f"| {'—' if error is None else f'{error:.1e}'} |")
    return lines


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# reparam_fx benchmark: {result['date']}, {result['machine']}",
        "",
        f"torch {result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']}, "
        f"coremltools {result['versions']['coremltools']}, "
        f"executorch {result['versions'].get('executorch')}; batch 1, {s['size']}x{s['size']}, "
        f"median of {s['repeats']} interleaved repeats of {s['calls']} call(s). "
        "Forms: **train** = the zoo's training form (eval mode), **hand** = the same network's "
        "hand-written `reparameterize()` (tests/reference; for the `yolov7_tiny` detector, "
        "YOLOv7's own `Model.fuse()`), **fused** = `reparam_fx.fuse(train)`. "
        "Speed-up = median per-repeat ratio train / form; fused / hand likewise (below 1: "
        "reparam_fx's form is faster). " + _executorch_caption(result),
        "",
        "## Latency (ms)",
        "",
        "| model | runtime | train | hand | fused | hand speed-up | fused speed-up | fused / hand |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["models"]:
        for key, lat in row["latency"].items():
            ms, up = lat["ms"], lat["speedup"]
            cells = [row["model"], _runtime_label(key), f"{ms['train']:.2f}",
                     f"{ms['hand']:.2f}" if "hand" in ms else "—", f"{ms['fused']:.2f}",
                     f"{up['hand']:.2f}x" if "hand" in up else "—", f"**{up['fused']:.2f}x**",
                     f"{lat['fused_over_hand']:.3f}" if "hand" in up else "—"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Size and ops (train → hand → fused)",
        "",
        "| model | params (M) | MACs (G) | ONNX nodes | Core ML MIL ops | rel. error float64 / fp32 "
        "| published iPhone latency (ms) |",
        "|---|---|---|---|---|---|---:|",
    ]
    for row in result["models"]:
        published = row["published_iphone_ms"]
        device = PUBLISHED_DEVICE.get(row["family"], "")
        mil = ("not run" if "coreml_mil_ops" not in row else
               f"conversion failed ({', '.join(row['coreml_errors'])}; see bench.json)"
               if "coreml_errors" in row else _chain(row["coreml_mil_ops"]))
        lines.append(
            f"| {row['model']} | {_chain(row['params'], lambda v: f'{v / 1e6:.2f}')} "
            f"| {_chain(row['macs'], lambda v: f'{v / 1e9:.3f}')} | {_chain(row['onnx_nodes'])} "
            f"| {mil} | {row['rel_error_float64']:.1e} / {row['rel_error_fp32']:.1e} "
            f"| {f'{published} ({device})' if published else '— (none published)'} |")
    if any("executorch" in row for row in result["models"]):
        lines += [""] + _executorch_table([row for row in result["models"]
                                           if "executorch" in row])
    lines += [
        "",
        "Published latencies are the official repositories' figures for the deployed models "
        "(apple/ml-mobileone, apple/ml-fastvit, THU-MIG/RepViT READMEs); RepVGG and MobileViT "
        "publish none. They were measured on iPhones with Core ML; the figures above are CPU "
        "figures from this machine and are not comparable with them. iPhone numbers for these "
        "packages need a Mac: `python tools/coreml_latency.py NAME.mlpackage` there.",
        "",
    ]
    return "\n".join(lines)


def chart(result: dict) -> bytes:
    """Two panels: fused (bars) and hand-written (black ticks) speed-up per runtime; Core ML
    MIL ops per form."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["models"]
    names = [row["model"] for row in rows]
    keys = list(dict.fromkeys(key for row in rows for key in row["latency"]))
    width = 0.8 / len(keys)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8),
                                         gridspec_kw={"width_ratios": [3, 2]})
    for k, key in enumerate(keys):
        offsets = [i - 0.4 + width * (k + 0.5) for i in range(len(rows))]
        speedups = [(o, row["latency"][key]["speedup"]) for o, row in zip(offsets, rows)
                    if key in row["latency"]]  # a failed lowering leaves a gap
        left.bar([o for o, _ in speedups], [up["fused"] for _, up in speedups], width * 0.92,
                 label=_runtime_label(key))
        hand = [(o, up["hand"]) for o, up in speedups if "hand" in up]
        if hand:
            left.scatter([o for o, _ in hand], [v for _, v in hand], marker="_", s=180,
                         color="black", zorder=3,
                         label="hand-written reparameterize()" if k == 0 else None)
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_xticks(range(len(rows)), names, rotation=20)
    left.set_ylabel("speed-up over training form (x)")
    left.set_title("CPU latency speed-up from reparam_fx.fuse")
    left.legend(fontsize=8)
    if all("coreml_mil_ops" in row and "coreml_errors" not in row for row in rows):
        for f, form in enumerate(FORMS):
            values = [(i - 0.3 + 0.3 * f, row["coreml_mil_ops"][form])
                      for i, row in enumerate(rows) if form in row["coreml_mil_ops"]]
            right.bar([o for o, _ in values], [v for _, v in values], 0.28, label=form)
        right.set_xticks(range(len(rows)), names, rotation=20)
        right.set_ylabel("non-const MIL ops")
        right.set_title("Core ML ML Program size")
        right.legend(fontsize=8)
    else:
        right.set_axis_off()
    figure.suptitle(f"{result['machine']}, {result['date']}, batch 1, "
                    f"{result['settings']['size']}x{result['settings']['size']}", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


# ---- command line -------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--models", nargs="+", metavar="NAME", help="zoo models to measure")
    choice.add_argument("--all", action="store_true", help="every zoo variant (slow)")
    parser.add_argument("--quick", action="store_true",
                        help="64x64, 3 repeats of 1 call: checks the pipeline, not a measurement")
    parser.add_argument("--size", type=int, default=224, help="input side (default 224)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved repeats (default 20)")
    parser.add_argument("--calls", type=int, default=2, help="calls per timed sample (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench",
                        help="output folder (default out/bench)")
    parser.add_argument("--save-models", action="store_true",
                        help="also write each fused model as NAME.onnx, NAME.mlpackage, "
                             "NAME.xnnpack.pte and NAME.coreml.pte")
    parser.add_argument("--no-coreml", action="store_true", help="skip Core ML conversion")
    parser.add_argument("--no-executorch", action="store_true",
                        help="skip ExecuTorch (lowering, latency and the .pte files; and so "
                             "the int8 section)")
    int8 = parser.add_mutually_exclusive_group()
    int8.add_argument("--int8", dest="int8", action="store_true", default=None,
                      help="run the int8 section after the others (the default, except "
                           "with --models: a choice of models for the other sections)")
    int8.add_argument("--no-int8", dest="int8", action="store_false",
                      help="skip the int8 section")
    int8.add_argument("--int8-only", action="store_true",
                      help="run the int8 section alone (make bench-int8)")
    parser.add_argument("--int8-models", nargs="+", metavar="NAME",
                        help="models of the int8 section: zoo names, corpus names "
                             "(tests/third_party) or repvgg_stackN_cC (default: "
                             f"{', '.join(bench_int8.DEFAULT_MODELS)})")
    parser.add_argument("--int8-forms", nargs="+", metavar="FORM",
                        choices=bench_int8.FORMS,
                        help=f"forms of the int8 section (default: {' '.join(bench_int8.FORMS)}; "
                             "--quick: " + " ".join(bench_int8.QUICK_FORMS) + ")")
    parser.add_argument("--int8-size", type=int, default=96,
                        help="input side of the int8 section (default 96)")
    parser.add_argument("--int8-repeats", type=int, default=20,
                        help="interleaved repeats of the int8 section (default 20)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.calls = 64, 3, 1
        args.int8_size, args.int8_repeats = 32, 2
    if args.size <= 0 or args.size % 32:
        raise BenchError(f"--size must be a positive multiple of 32 (the zoo's stride), "
                         f"not {args.size}")
    if args.repeats < 1 or args.calls < 1:
        raise BenchError("--repeats and --calls must be at least 1")
    if args.int8_size <= 0 or args.int8_size % 32:
        raise BenchError(f"--int8-size must be a positive multiple of 32, not {args.int8_size}")
    if args.int8_repeats < 1:
        raise BenchError("--int8-repeats must be at least 1")
    if args.int8_only and args.no_executorch:
        raise BenchError("--int8-only needs ExecuTorch; drop --no-executorch")
    if args.int8 is None:  # on in the full run; --models (make demo) chooses the others only
        args.int8 = args.models is None
    args.int8 = (args.int8 or args.int8_only) and not args.no_executorch
    args.int8_models = args.int8_models or list(
        bench_int8.QUICK_MODELS if args.quick else bench_int8.DEFAULT_MODELS)
    unknown = [name for name in args.int8_models if not bench_int8.valid_model(name)]
    if unknown:
        raise BenchError(f"unknown int8 model(s) {', '.join(unknown)}; valid: zoo names, "
                         "tests/third_party corpus names, repvgg_stackN_cC")
    args.models = zoo.names() if args.all else (args.models or [*SMALLEST, *DETECTORS])
    valid = [*zoo.names(), *DETECTORS]
    unknown = [name for name in args.models if name not in valid]
    if unknown:
        raise BenchError(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    cores = os.cpu_count() or 1
    args.threads = [1] if cores == 1 else [1, cores]
    return args


def _prepare_output(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise BenchError(f"--out {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BenchError(f"cannot create --out {folder}: {error.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise BenchError(f"--out {folder} is not writable")


def run(args) -> dict:
    try:
        import matplotlib  # noqa: F401
        import onnxruntime
        from tqdm import tqdm
    except ImportError as error:
        raise BenchError(f"{error.name} is missing: pip install 'reparam-fx[bench,onnx,coreml]' "
                         "(make bench installs them)") from None
    # not imported here: importing coremltools prints version warnings and "Failed to
    # load" lines (to_coreml imports it quietly)
    if not args.no_coreml and not args.int8_only \
            and importlib.util.find_spec("coremltools") is None:
        raise BenchError("coremltools is missing: pip install 'reparam-fx[bench,onnx,coreml]' "
                         "(make bench installs them)")
    if not args.no_executorch and importlib.util.find_spec("executorch") is None:
        raise BenchError("executorch is missing: pip install 'reparam-fx[executorch]' "
                         "(make bench installs it), or pass --no-executorch")
    _prepare_output(args.out)
    torch.manual_seed(0)
    all_threads = torch.get_num_threads()
    steps_per_model = 3 + len(args.threads) * 2 * args.repeats \
        + (0 if args.no_executorch else 1 + args.repeats)
    models = [] if args.int8_only else args.models
    int8_settings = int8_section_settings(args)
    total = steps_per_model * len(models) + (
        bench_int8.steps_per_model(int8_settings) * len(args.int8_models) if args.int8 else 0)
    rows, int8 = [], None
    with tqdm(total=total, unit="step", file=sys.stderr, desc="bench", dynamic_ncols=True,
              disable=None) as progress:
        for name in models:
            rows.append(measure(name, args, progress))
        if args.int8:
            runtime, _ = executorch_runtime(1)  # (before any program is loaded)
            int8 = bench_int8.run(int8_settings, runtime, progress)
    torch.set_num_threads(all_threads)
    executorch = None if args.no_executorch else importlib.metadata.version("executorch")
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": machine_description(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "coremltools": None if args.no_coreml
                     else importlib.metadata.version("coremltools"),
                     "executorch": executorch, "python": sys.version.split()[0]},
        "settings": {"size": args.size, "repeats": args.repeats, "calls": args.calls,
                     "threads": args.threads, "quick": args.quick,
                     "executorch_threads": None if args.no_executorch
                     else executorch_runtime()[1], "int8_only": args.int8_only},
        "models": rows,
        "int8": int8,
    }


def int8_section_settings(args) -> dict:
    return {"models": list(args.int8_models),
            "forms": [form for form in bench_int8.FORMS if form in (
                args.int8_forms or (bench_int8.QUICK_FORMS if args.quick else bench_int8.FORMS))],
            "size": args.int8_size, "calibration": 2 if args.quick else 8,
            "evaluation": 1 if args.quick else 4, "repeats": args.int8_repeats,
            "calls": args.calls, "quick": args.quick}


def outputs(result: dict) -> dict:
    """``{file name: bytes}``: ``bench.*`` for the float section, ``bench-int8.*`` for the
    int8 one, each when it ran (all built before anything is written)."""
    files = {}
    if not result["settings"]["int8_only"]:
        text = markdown(result)
        if result["int8"] is not None:
            text += "\nThe int8 section is in bench-int8.md (and .json, .png).\n"
        files["bench.json"] = json.dumps({k: v for k, v in result.items() if k != "int8"},
                                         indent=2).encode()
        files["bench.md"] = text.encode()
        files["bench.png"] = chart(result)
    if result["int8"] is not None:
        threads = result["settings"]["executorch_threads"]
        text = bench_int8.markdown(result["int8"], result["machine"], result["date"], threads)
        header = {k: v for k, v in result.items() if k not in ("settings", "models", "int8")}
        settings = {**result["int8"]["settings"], "executorch_threads": threads,
                    "onnxruntime_threads": 1}
        files["bench-int8.json"] = json.dumps(
            {**header, "settings": settings, "models": result["int8"]["models"]},
            indent=2).encode()
        files["bench-int8.md"] = text.encode()
        files["bench-int8.png"] = bench_int8.chart(result["int8"], result["machine"],
                                                   result["date"])
    return files


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        result = run(args)
        files = outputs(result)  # all built before anything is written
        for name, data in files.items():
            write_bytes(args.out / name, data)
    except (BenchError, ExportError) as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.py: interrupted; nothing written", file=sys.stderr)
        return 130
    for name in ("bench.md", "bench-int8.md"):
        if name in files:
            print(files[name].decode())
    print(f"wrote {', '.join(str(args.out / name) for name in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
