"""The int8 section of ``tools/bench.py``: int8 SQNR against int8 latency, per fusion form.

For each model (default: the smallest variant of each zoo family; a stack of 8 RepVGG
blocks at 32 and at 64 channels; four third-party code shapes from ``tests/third_party``:
timm's byobnet RepVGG and MobileOne, YOLOv6's RepVGGBlock backbone, ultralytics'
RepConv), built with fixed seeds and given trained-like BatchNorm statistics
(``reparam_fx.testing.statistics.trained_like``; random models have no realistic ones):

- forms: ``train`` (the model as is), ``hand`` (the hand-written or library
  re-parameterization where one exists: ``tests/reference`` for the zoo and the stack,
  the corpus entry's own deploy conversion), ``fuse`` (``reparam_fx.fuse(model)``),
  ``int8`` (``reparam_fx.fuse(model, target="int8")``, the default data-free policy),
  ``scalar`` / ``channel`` (``Int8Policy(budget=1.0, modes=("scalar",))`` /
  ``(("channel",))``: one extraction mode, no budget limit);
- each form quantized with PT2E and ExecuTorch's XNNPACK quantizer (per-channel weights),
  calibrated on 8 random inputs, lowered to an ExecuTorch XNNPACK program
  (``reparam_fx.export.check_executorch_int8``) and to an ONNX Runtime QDQ model
  (``to_onnx_int8``); the SQNR (dB) of each, run on 4 held-out random inputs, against the
  float ``train`` model; random calibration stands in for real data, so the SQNRs are
  indications, not accuracies;
- latency, batch 1, one thread: the ExecuTorch programs (each loaded once, its buffer
  kept referenced) of one model interleaved round-robin, then its ONNX Runtime sessions
  the same way (``tools/timing.py``); ratios to ``fuse`` are medians of per-repeat ratios;
- whether the XNNPACK delegate took every op (else the ops left to the portable
  kernels), the int8 policy's mode counts (convs kept ``merged`` / ``scalar`` /
  ``channel``), and each form's float (fp32) output against ``train`` and ``fuse``.

``--quick`` runs a tiny version (a 2-block RepVGG stack at 64 channels, 32x32, forms
``hand`` / ``fuse`` / ``int8``, ``train`` as the float reference only, 2 calibration and 1
evaluation inputs, 2 repeats): it checks the pipeline, it measures nothing.
"""

from __future__ import annotations

import copy
import io
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import reparam_fx
from reparam_fx.export import ExportError
from reparam_fx.int8.policy import Int8Policy
from reparam_fx.testing.statistics import batchnorm_roles, trained_like
from timing import interleaved, median_ms, median_ratio

ZOO_MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "mobilevit_xxs")
STACK_MODELS = ("repvgg_stack8_c32", "repvgg_stack8_c64")
CORPUS_MODELS = ("timm.byobnet_repvgg_a0", "timm.byobnet_mobileone_s0",
                 "yolov6.efficientrep_repvgg", "ultralytics.repconv_identity_bn")
DEFAULT_MODELS = (*ZOO_MODELS, *STACK_MODELS, *CORPUS_MODELS)
QUICK_MODELS = ("repvgg_stack2_c64",)  # wide enough that the default policy extracts

FORMS = ("train", "hand", "fuse", "int8", "scalar", "channel")
# no train: quantizing a model with BatchNorms takes ~25 s whatever its size (the XNNPACK
# quantizer's conv+BN patterns are captured with torch.export on every call)
QUICK_FORMS = ("hand", "fuse", "int8")
POLICIES = {
    "int8": "int8",
    "scalar": Int8Policy(budget=1.0, modes=("scalar",)),
    "channel": Int8Policy(budget=1.0, modes=("channel",)),
}
FORM_LABELS = {
    "train": "training form",
    "hand": "hand-written / library reparameterization",
    "fuse": "reparam_fx.fuse(model)",
    "int8": 'fuse(model, target="int8")',
    "scalar": 'Int8Policy(budget=1.0, modes=("scalar",))',
    "channel": 'Int8Policy(budget=1.0, modes=("channel",))',
}

MODES = ("merged", "scalar", "channel")  # reparam_fx.int8.policy.MODES
SEED_WEIGHTS, SEED_STATISTICS, SEED_CALIBRATION, SEED_EVALUATION = 0, 0, 1, 2
STATISTICS_BATCH = 8  # trained_like's train-mode passes: BatchNorm1d heads refuse batch 1
_STACK = re.compile(r"repvgg_stack(\d+)_c(\d+)$")


def valid_model(name: str) -> bool:
    import zoo
    return name in zoo.names() or bool(_STACK.match(name)) or name in _corpus()


def _corpus() -> dict:
    from third_party import CORPUS
    return CORPUS


# ---- models and forms -----------------------------------------------------------------


class RepVGGStack(nn.Module):
    """``blocks`` RepVGG blocks at ``channels`` channels, stride 1 (3x3 conv+BN, 1x1 conv+BN,
    identity BN, summed, ReLU: ``tests/reference/blocks.py: RepVGGBlock``, which carries
    its own ``reparameterize()``). It takes a ``channels``-channel input, as the probe in
    docs/int8-plan.md did."""

    def __init__(self, channels: int, blocks: int):
        super().__init__()
        from reference.blocks import RepVGGBlock
        self.channels = channels
        self.blocks = nn.Sequential(*(RepVGGBlock(channels, channels) for _ in range(blocks)))

    def forward(self, x):
        return self.blocks(x)


def _copy_by_position(source: nn.Module, target: nn.Module) -> bool:
    """Copy ``source``'s state into ``target`` entry by entry in order (the reference
    implementations name some attributes differently, in the same order); False when the
    shapes do not line up."""
    a, b = source.state_dict(), target.state_dict()
    if list(a) != list(b) and set(a) == set(b):  # the same names in another order
        a = {key: a[key] for key in b}
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a.values(), b.values())):
        return False
    target.load_state_dict(dict(zip(b, a.values())))
    return True


def _relative_error(expected, got) -> float:
    expected = [t.double() for t in _leaves(expected)]
    got = [torch.as_tensor(t).double() for t in _leaves(got)]
    return max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-30))
               for e, g in zip(expected, got))


def _leaves(value) -> list:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(value)
            if isinstance(leaf, torch.Tensor) or hasattr(leaf, "__array__")]


def _batch(shape) -> torch.Tensor:
    """The example batch whose shape ``trained_like`` measures the statistics at."""
    return torch.zeros((STATISTICS_BATCH, *shape[1:]))


def build_model(name: str, size: int) -> tuple[nn.Module, nn.Module | None, str, tuple]:
    """``(train, hand or None, why there is no hand, input shape)``: ``train`` in eval mode
    with trained-like statistics; ``hand`` with the same weights (:func:`prepared_forms`
    checks that it computes the same function: tests/reference's FastViT applies a GELU
    after each ReparamLargeKernelConv, which the zoo's, as the official code runs it, does
    not)."""
    import zoo
    torch.manual_seed(SEED_WEIGHTS)
    stack = _STACK.match(name)
    if stack:
        blocks, channels = int(stack.group(1)), int(stack.group(2))
        shape = (1, channels, size, size)
        train = trained_like(RepVGGStack(channels, blocks).eval(), _batch(shape),
                             seed=SEED_STATISTICS)
        from reference.models import reparameterize_model
        return train, reparameterize_model(train).eval(), "", shape
    shape = (1, 3, size, size)
    if name in zoo.names():
        train = trained_like(zoo.create(name).eval(), _batch(shape), seed=SEED_STATISTICS)
        from reference.models import FULL_SIZE_BUILDERS, reparameterize_model
        if name not in FULL_SIZE_BUILDERS:
            return train, None, "no hand-written reparameterization (none official)", shape
        reference = FULL_SIZE_BUILDERS[name]().eval()
        if not _copy_by_position(train, reference):
            return train, None, "reference implementation's weights do not line up", shape
        return train, reparameterize_model(reference).eval(), "", shape
    idiom = _corpus()[name]
    train = trained_like(idiom.build().eval(), _batch(shape), seed=SEED_STATISTICS)
    if idiom.reparameterize is None:
        return train, None, "the library has no deploy conversion", shape
    return train, idiom.reparameterize(copy.deepcopy(train)).eval(), "", shape


HAND_TOLERANCE = 1e-3  # fp32 relative error of hand against train, above which it is dropped


def prepared_forms(name: str, size: int, forms) -> tuple[nn.Module, dict, tuple, dict]:
    """``(train, {form: module}, input shape, notes)`` for the forms asked for. A ``hand``
    form that does not compute what ``train`` does is dropped, and the notes say so."""
    train, hand, why, shape = build_model(name, size)
    result, notes = {"train": train}, {}
    if "hand" in forms and hand is not None:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED_EVALUATION))
        with torch.no_grad():
            error = _relative_error(train(x), hand(x))
        if error > HAND_TOLERANCE:
            hand, why = None, (f"the hand-written form computes another function: fp32 "
                               f"relative error {error:.1e} against the training form")
    if "hand" in forms:
        if hand is None:
            notes["hand"] = why
        else:
            result["hand"] = hand
    if "fuse" in forms:
        result["fuse"] = reparam_fx.fuse(train)
    for form, target in POLICIES.items():
        if form in forms:
            result[form] = reparam_fx.fuse(train, target=target)
    return train, {form: result[form] for form in forms if form in result}, shape, notes


# ---- measuring --------------------------------------------------------------------------


def _inputs(shape, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _ort_session(data: bytes):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see bench.py
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def measure_model(name: str, settings: dict, runtime, progress) -> dict:
    """Every int8 number of one model (see the module docstring). ``runtime``: ExecuTorch's
    Runtime, its threadpool already set (before any program was loaded)."""
    from reparam_fx.export import check_executorch_int8, to_onnx_int8
    from reparam_fx.int8 import sqnr_db

    progress.set_postfix_str(f"int8 {name}: build, fuse")
    start = time.perf_counter()
    train, forms, shape, notes = prepared_forms(name, settings["size"], settings["forms"])
    calibration = _inputs(shape, settings["calibration"], SEED_CALIBRATION)
    evaluation = _inputs(shape, settings["evaluation"], SEED_EVALUATION)
    with torch.no_grad():
        reference = [train(x) for x in evaluation]
        floats = {form: [module(x) for x in evaluation] for form, module in forms.items()}
    identity = {"identity_batchnorms": sum(
        role == "identity" for role in batchnorm_roles(train, _batch(shape)).values())}
    row = {
        "model": name, "input_shape": list(shape), "forms": list(forms), "notes": notes,
        "statistics": identity,
        "build_seconds": time.perf_counter() - start,
        "float_rel_error_vs_train": {f: max(_relative_error(r, o) for r, o in zip(reference, out))
                                     for f, out in floats.items()},
        "float_rel_error_vs_fuse": {} if "fuse" not in floats else {
            f: max(_relative_error(r, o) for r, o in zip(floats["fuse"], out))
            for f, out in floats.items()},
        "modes": {f: m.fusion_report.int8.mode_counts() for f, m in forms.items()
                  if f in POLICIES and getattr(m.fusion_report, "int8", None) is not None},
        "xnnpack": {"sqnr_db": {}, "fully_delegated": {}, "portable_ops": {}, "pte_bytes": {},
                    "lower_seconds": {}, "errors": {}},
        "ort": {"sqnr_db": {}, "onnx_bytes": {}, "quantize_seconds": {}, "errors": {}},
    }
    progress.update()

    programs, sessions = {}, {}
    for form, module in forms.items():
        progress.set_postfix_str(f"int8 {name}: XNNPACK {form}")
        start = time.perf_counter()
        try:
            check = check_executorch_int8(module, (calibration[0],), calibration=calibration)
        except ExportError as error:
            row["xnnpack"]["errors"][form] = str(error)
            progress.write(f"bench.py: warning: int8 {name} ({form}): {error}", file=sys.stderr)
        else:
            xnn = row["xnnpack"]
            xnn["lower_seconds"][form] = time.perf_counter() - start
            xnn["fully_delegated"][form] = check.fully_delegated
            xnn["portable_ops"][form] = dict(sorted(check.portable.items()))
            xnn["pte_bytes"][form] = check.pte_bytes
            # the buffer stays referenced as long as its program and method are used:
            # a freed buffer made execute fail ("Invalid number of inputs")
            buffer = check.program
            loaded = runtime.load_program(buffer)
            method = loaded.load_method("forward")
            programs[form] = (buffer, loaded, method)
            got = [list(method.execute([x])) for x in evaluation]
            xnn["sqnr_db"][form] = sqnr_db(reference, got)
        progress.update()

        progress.set_postfix_str(f"int8 {name}: ONNX Runtime QDQ {form}")
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as folder:
                path = to_onnx_int8(module, (calibration[0],), Path(folder) / "int8.onnx",
                                    calibration=calibration)
                data = path.read_bytes()
        except ExportError as error:
            row["ort"]["errors"][form] = str(error)
            progress.write(f"bench.py: warning: int8 {name} ({form}, ONNX): {error}",
                           file=sys.stderr)
        else:
            row["ort"]["quantize_seconds"][form] = time.perf_counter() - start
            row["ort"]["onnx_bytes"][form] = len(data)
            session = _ort_session(data)
            feed = session.get_inputs()[0].name
            sessions[form] = session
            got = [session.run(None, {feed: x.numpy()}) for x in evaluation]
            row["ort"]["sqnr_db"][form] = sqnr_db(reference, got)
        progress.update()

    x = evaluation[0]
    array = x.numpy()
    for key, runners in (
            ("xnnpack", {form: (lambda m=method: m.execute([x]))
                         for form, (_, _, method) in programs.items()}),
            ("ort", {form: (lambda s=session, n=session.get_inputs()[0].name:
                            s.run(None, {n: array})) for form, session in sessions.items()})):
        progress.set_postfix_str(f"int8 {name}: {key} latency")
        if runners:
            samples = interleaved(runners, settings["repeats"], settings["calls"],
                                  tick=progress.update)
            row[key]["ms"] = {form: median_ms(s) for form, s in samples.items()}
            row[key]["over_fuse"] = {} if "fuse" not in samples else {
                form: median_ratio(s, samples["fuse"]) for form, s in samples.items()}
        else:
            progress.update(settings["repeats"])
    del programs, sessions  # (methods before their programs and buffers: one tuple each)
    return row


def steps_per_model(settings: dict) -> int:
    return 1 + 2 * len(settings["forms"]) + 2 * settings["repeats"]


def run(settings: dict, runtime, progress) -> dict:
    """``settings``: models, forms, size, calibration, evaluation, repeats, calls."""
    torch.set_num_threads(1)
    rows = [measure_model(name, settings, runtime, progress) for name in settings["models"]]
    return {"settings": dict(settings), "models": rows}


# ---- output -----------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "—") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _portable(ops: dict | None) -> str:
    if ops is None:
        return "—"
    return ", ".join(f"{op} x{n}" for op, n in ops.items())


def markdown(section: dict, machine: str, date: str, threads) -> str:
    s = section["settings"]
    lines = [
        "## int8: SQNR and latency per fusion form",
        "",
        f"{date}, {machine}. Batch 1, input {s['size']}x{s['size']}. Every model has "
        "trained-like BatchNorm statistics (`reparam_fx.testing.statistics.trained_like`, "
        f"seed {SEED_STATISTICS}; weights seed {SEED_WEIGHTS}). Each form is quantized with "
        "PT2E and ExecuTorch's XNNPACK quantizer (int8, per-channel weights) and lowered to "
        "an ExecuTorch XNNPACK program and an ONNX Runtime QDQ model, calibrated on "
        f"{s['calibration']} random N(0, 1) inputs (seed {SEED_CALIBRATION}). **Random "
        "calibration stands in for real data**: the activation ranges come from noise, so "
        "the SQNRs are indications, not accuracies. SQNR (dB) of each int8 program on "
        f"{s['evaluation']} held-out random inputs (seed {SEED_EVALUATION}) against the float "
        "training form. Latency: ExecuTorch XNNPACK with "
        f"{threads if threads is not None else 'its default number of'} thread(s), ONNX "
        "Runtime with 1 intra-op thread; the forms of one model interleaved round-robin, "
        f"medians of {s['repeats']} repeats of {s['calls']} call(s); `/ fuse` is the median "
        "of per-repeat ratios to the `fuse` form in the same run.",
        "",
        "Forms: " + "; ".join(f"**{f}** = {FORM_LABELS[f]}" for f in s["forms"]) + ". "
        "Modes: convs holding a merged identity that the policy left merged / kept apart "
        "as a bare `add` with a moved scalar / as `add(conv, x * d)`.",
        "",
        "| model | form | XNNPACK SQNR dB | XNNPACK ms | / fuse | fully delegated "
        "| ORT SQNR dB | ORT ms | / fuse | modes m/s/c | fp32 err vs train |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for row in section["models"]:
        xnn, ort = row["xnnpack"], row["ort"]
        for form in row["forms"]:
            modes = row["modes"].get(form)
            if form in xnn["errors"]:
                delegated = "lowering failed"
            elif form in xnn["fully_delegated"]:
                delegated = "yes" if xnn["fully_delegated"][form] else \
                    f"no: {_portable(xnn['portable_ops'][form])}"
            else:
                delegated = "—"
            cells = [
                row["model"], form,
                _fmt(xnn["sqnr_db"].get(form), ".1f"),
                _fmt(xnn.get("ms", {}).get(form), ".2f"),
                _fmt(xnn.get("over_fuse", {}).get(form), ".3f"),
                delegated,
                _fmt(ort["sqnr_db"].get(form), ".1f",
                     "failed" if form in ort["errors"] else "—"),
                _fmt(ort.get("ms", {}).get(form), ".2f"),
                _fmt(ort.get("over_fuse", {}).get(form), ".3f"),
                "—" if modes is None else "/".join(str(modes[m]) for m in MODES),
                f"{row['float_rel_error_vs_train'][form]:.1e}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    skipped = [(row["model"], form, why) for row in section["models"]
               for form, why in row["notes"].items()]
    errors = [(row["model"], runtime, form, message) for row in section["models"]
              for runtime in ("xnnpack", "ort") for form, message in row[runtime]["errors"].items()]
    if skipped or errors:
        lines += [""]
        lines += [f"- {model}: no `{form}` form ({why})." for model, form, why in skipped]
        lines += [f"- {model} `{form}`: {'XNNPACK' if runtime == 'xnnpack' else 'ONNX'} "
                  f"lowering failed: {message}" for model, runtime, form, message in errors]
    lines.append("")
    return "\n".join(lines)


MARKERS = {"train": "o", "hand": "D", "fuse": "s", "int8": "*", "scalar": "^", "channel": "v"}


def chart(section: dict, machine: str, date: str) -> bytes:
    """SQNR (y) against int8 latency relative to ``fuse`` (x, log scale): XNNPACK (left,
    the trade-off this section is about) and ONNX Runtime (right); a marker per form, a
    colour per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    rows = section["models"]
    colours = plt.get_cmap("tab20")(range(len(rows)))
    figure, axes = plt.subplots(1, 2, figsize=(14, 6.2), sharey=True)
    for axis, key, title in ((axes[0], "xnnpack", "ExecuTorch XNNPACK int8"),
                             (axes[1], "ort", "ONNX Runtime int8 (QDQ)")):
        for colour, row in zip(colours, rows):
            data = row[key]
            points = [(data["over_fuse"][f], data["sqnr_db"][f], f) for f in row["forms"]
                      if f in data.get("over_fuse", {}) and f in data["sqnr_db"]
                      and math.isfinite(data["sqnr_db"][f])]
            if not points:
                continue
            for x, y, form in points:
                axis.scatter([x], [y], marker=MARKERS[form], color=colour,
                             s=110 if form == "int8" else 45, edgecolors="black",
                             linewidths=0.4, zorder=3)
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log")  # the training forms are several times slower
        axis.xaxis.set_major_locator(FixedLocator([0.8, 1.0, 1.25, 1.5, 2, 3, 5, 10, 20, 50]))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("int8 latency / latency of the fuse form (same run)")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("int8 SQNR vs float training form (dB)")
    model_handles = [Line2D([], [], color=c, marker="o", linestyle="", label=row["model"])
                     for c, row in zip(colours, rows)]
    form_handles = [Line2D([], [], color="grey", marker=MARKERS[f], linestyle="",
                           markeredgecolor="black", label=f)
                    for f in section["settings"]["forms"]]
    axes[1].legend(handles=model_handles + form_handles, fontsize=7, loc="center left",
                   bbox_to_anchor=(1.01, 0.5))
    s = section["settings"]
    figure.suptitle(f"int8 SQNR against latency per fusion form: {machine}, {date}, batch 1, "
                    f"{s['size']}x{s['size']}, 1 thread; random calibration stands in for "
                    "real data", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
