"""Time and peak memory of fusing the largest models: what ``make bench-scale`` runs.

Each job runs in a fresh subprocess (``--job``), so one job's memory never counts in
another's, and reports its wall time and peak resident memory:

torch
    ``reparam_fx.fuse(model)`` on the largest zoo model of each family, and for RepVGG-B3
    the hand-written per-module ``reparameterize()`` of the same network (deep copy
    included: the caller's model is kept, as ``fuse`` keeps it). Peak memory is counted
    above the loaded model (``/proc/self/clear_refs`` resets the high-water mark once
    the model is built), as a multiple of the model's state size.
ONNX
    ``tools/fuse_onnx.py`` on RepVGG-B3's ONNX export (about 490 MB), and on a RepVGG-style
    chain over 2 GB with external data (written here tensor by tensor), next to
    ``onnx.load`` + ``onnx.save`` of the same file (with its external data). Peak
    memory is the whole process's (``wait4``'s ``ru_maxrss``), as a multiple of the
    model's size on disk; times are whole-process wall times.

    python tools/bench_scale.py [--out out/bench_scale] [--repeats 3] [--quick]

``--quick`` runs the same jobs on small models (a pipeline check, not a measurement).
Files: ``bench_scale.md`` and ``bench_scale.json`` in ``--out``; the ONNX models are
written there too (and reused on the next run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

TORCH_MODELS = ("repvgg_b3", "mobileone_s4", "fastvit_ma36", "repvit_m2_3", "mobilevit_s")
QUICK_TORCH_MODELS = ("repvgg_a0", "mobileone_s0")


# ---- a large ONNX model, written tensor by tensor -------------------------------------

def write_repvgg_chain(path: str, *, blocks: int, channels: int, size: int = 4,
                       external_data: bool = True, seed: int = 0) -> int:
    """An ONNX model of ``blocks`` RepVGG blocks over ``channels`` channels: a 3x3 conv
    and a 1x1 conv (with biases), each followed by a BatchNormalization, an identity
    BatchNormalization, summed, then Relu; random weights and BatchNorm statistics. With
    ``external_data`` every tensor is appended to ``path + ".data"`` as soon as it is
    drawn, so a model of any size is written in the memory of one tensor. Returns the
    bytes of tensor data."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    data_name = os.path.basename(path) + ".data"
    data = open(os.path.join(os.path.dirname(path) or ".", data_name), "wb") \
        if external_data else None
    initializers, nodes, total = [], [], 0

    def tensor(name: str, values) -> str:
        nonlocal total
        values = np.ascontiguousarray(values, dtype=np.float32)
        total += values.nbytes
        if data is None:
            initializers.append(onnx.numpy_helper.from_array(values, name))
            return name
        proto = TensorProto(name=name, dims=values.shape, data_type=TensorProto.FLOAT,
                            data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data_name), ("offset", str(data.tell())),
                           ("length", str(values.nbytes))):
            proto.external_data.add(key=key, value=value)
        data.write(values.data)
        initializers.append(proto)
        return name

    def batchnorm(x: str, out: str, prefix: str) -> None:
        c = channels
        inputs = [tensor(f"{prefix}.{n}", v) for n, v in (
            ("gamma", rng.uniform(0.5, 1.5, c)), ("beta", rng.uniform(-0.5, 0.5, c)),
            ("mean", rng.uniform(-0.5, 0.5, c)), ("var", rng.uniform(0.5, 1.5, c)))]
        nodes.append(helper.make_node("BatchNormalization", [x, *inputs], [out],
                                      name=f"{prefix}.bn", epsilon=1e-5))

    try:
        x = "input"
        scale3 = (channels * 9) ** -0.5
        for i in range(blocks):
            p = f"block{i}"
            for kernel, scale in ((3, scale3), (1, channels ** -0.5)):
                w = tensor(f"{p}.conv{kernel}.weight", rng.standard_normal(
                    (channels, channels, kernel, kernel), dtype=np.float32) * scale)
                b = tensor(f"{p}.conv{kernel}.bias", rng.uniform(-0.1, 0.1, channels))
                nodes.append(helper.make_node("Conv", [x, w, b], [f"{p}.c{kernel}"],
                                              name=f"{p}.conv{kernel}",
                                              pads=[kernel // 2] * 4,
                                              kernel_shape=[kernel, kernel]))
                batchnorm(f"{p}.c{kernel}", f"{p}.n{kernel}", f"{p}.bn{kernel}")
            batchnorm(x, f"{p}.id", f"{p}.bn_id")
            nodes.append(helper.make_node("Add", [f"{p}.n3", f"{p}.n1"], [f"{p}.s1"]))
            nodes.append(helper.make_node("Add", [f"{p}.s1", f"{p}.id"], [f"{p}.s2"]))
            out = "output" if i == blocks - 1 else f"{p}.out"
            nodes.append(helper.make_node("Relu", [f"{p}.s2"], [out]))
            x = out
    finally:
        if data is not None:
            data.close()
    shape = [1, channels, size, size]
    graph = helper.make_graph(
        nodes, "repvgg_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="reparam_fx bench_scale")
    model.ir_version = 8
    with open(path, "wb") as file:
        file.write(model.SerializeToString())
    return total


def export_zoo_onnx(name: str, path: str) -> None:
    """``torch.onnx.export`` (dynamo=False, opset 17) of a zoo model in training form."""
    import contextlib
    import io
    import warnings

    import torch
    import zoo
    from reparam_fx.testing import randomize_batchnorm_

    model = zoo.create(name).eval()
    randomize_batchnorm_(model, seed=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), path, dynamo=False,
                          opset_version=17)


# ---- the jobs (each run in its own process) -------------------------------------------

def _status(field: str) -> float:
    """A /proc/self/status memory field, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _torch_job(kind: str, name: str) -> dict:
    """fuse or the hand-written reparameterization of one model, in this process."""
    import gc

    import torch
    import reparam_fx
    import zoo
    from reparam_fx.testing import randomize_batchnorm_

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if kind == "hand":
        from reference.models import FULL_SIZE_BUILDERS, LARGE_BUILDERS, reparameterize_model
        model = {**FULL_SIZE_BUILDERS, **LARGE_BUILDERS}[name]().eval()
    else:
        model = zoo.create(name).eval()
    randomize_batchnorm_(model, seed=1)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the high-water mark starts again at the current RSS
    loaded = _status("VmRSS")
    start = time.perf_counter()
    result = reparameterize_model(model) if kind == "hand" else reparam_fx.fuse(model)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    del result
    return {"seconds": seconds, "state_mb": state, "peak_above_model_mb": peak - loaded}


def _load_save_job(path: str, out: str) -> dict:
    import onnx
    start = time.perf_counter()
    model = onnx.load(path)  # external data too
    if os.path.exists(path + ".data"):  # (this benchmark's models keep theirs there)
        onnx.save_model(model, out, save_as_external_data=True, location=os.path.basename(out)
                        + ".data")
    else:
        onnx.save(model, out)
    return {"seconds_inside": time.perf_counter() - start}


def _cli_job(*argv: str) -> dict:
    from reparam_fx.cli import onnx as onnx_cli
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            status = onnx_cli.main(list(argv))
        finally:
            sys.stdout = stdout
    if status:
        raise SystemExit(f"fuse_onnx.py exited with {status}")
    return {}


def run_job(argv: list[str]) -> None:
    kind, *args = argv
    if kind in ("fuse", "hand"):
        result = _torch_job(kind, args[0])
    elif kind == "load_save":
        result = _load_save_job(*args)
    elif kind == "cli":
        result = _cli_job(*args)
    else:
        raise SystemExit(f"unknown job {kind}")
    result["peak_rss_mb"] = _status("VmHWM")  # the whole process's, from its start
    print(json.dumps(result))


def _child(argv: list[str]) -> tuple[dict, float, float]:
    """Run a job in a child process: (its JSON line, wall seconds, its peak RSS in MB).
    (Not ``wait4``'s ``ru_maxrss``: Linux carries a forked child's high-water mark, the
    parent's size, across ``exec``.)"""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    out, err = process.communicate()
    seconds = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed: {err.decode().strip()[-800:]}")
    result = json.loads(out.decode().splitlines()[-1])
    return result, seconds, result["peak_rss_mb"]


def _job(*args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--job", *map(str, args)]


# ---- the benchmark --------------------------------------------------------------------

def torch_rows(models, repeats: int) -> list[dict]:
    from reference.models import FULL_SIZE_BUILDERS, LARGE_BUILDERS
    rows = []
    for name in models:
        hand = name in FULL_SIZE_BUILDERS or name in LARGE_BUILDERS
        for kind in (("fuse", "hand") if hand else ("fuse",)):
            runs = [_child(_job(kind, name))[0] for _ in range(repeats)]
            rows.append({"model": name, "job": kind, "state_mb": runs[0]["state_mb"],
                         "seconds": statistics.median(r["seconds"] for r in runs),
                         "peak_above_model_mb": statistics.median(
                             r["peak_above_model_mb"] for r in runs)})
    return rows


def onnx_rows(models: list[tuple[str, str]], out: Path, repeats: int) -> list[dict]:
    rows = []
    for label, path in models:
        size = os.path.getsize(path) + (os.path.getsize(path + ".data")
                                        if os.path.exists(path + ".data") else 0)
        fused = out / (Path(path).stem + ".fused.onnx")
        jobs = {
            "onnx.load + onnx.save": _job("load_save", path, out / (Path(path).stem + ".copy.onnx")),
            "tools/fuse_onnx.py": _job("cli", path, "-o", fused),
        }
        for job, argv in jobs.items():
            runs = [_child(argv) for _ in range(repeats)]
            rows.append({"model": label, "job": job, "size_mb": size / 2**20,
                         "seconds": statistics.median(r[1] for r in runs),
                         "peak_rss_mb": statistics.median(r[2] for r in runs)})
        for leftover in out.glob(Path(path).stem + ".copy.onnx*"):
            leftover.unlink()
    return rows


def table(torch_results: list[dict], onnx_results: list[dict], machine: str) -> str:
    lines = [f"# reparam_fx at scale: {time.strftime('%Y-%m-%d')}, {machine}", "",
             "## torch: `reparam_fx.fuse(model)` and hand-written reparameterization", "",
             "Peak memory above the loaded model (each job in a fresh process; medians).", "",
             "| model | job | state (MiB) | time (s) | peak above model (MiB) | x state |",
             "|---|---|---:|---:|---:|---:|"]
    for row in torch_results:
        lines.append(f"| {row['model']} | {row['job']} | {row['state_mb']:.0f} | "
                     f"{row['seconds']:.2f} | {row['peak_above_model_mb']:.0f} | "
                     f"{row['peak_above_model_mb'] / row['state_mb']:.2f} |")
    lines += ["", "## ONNX: the command line and `onnx.load` + `onnx.save`", "",
              "Whole-process wall time and peak resident memory (medians).", "",
              "| model | job | on disk (MiB) | time (s) | peak RSS (MiB) | x size |",
              "|---|---|---:|---:|---:|---:|"]
    for row in onnx_results:
        lines.append(f"| {row['model']} | {row['job']} | {row['size_mb']:.0f} | "
                     f"{row['seconds']:.2f} | {row['peak_rss_mb']:.0f} | "
                     f"{row['peak_rss_mb'] / row['size_mb']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--job"]:  # one job, in this (fresh) process
        run_job(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "out" / "bench_scale"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="small models: checks the pipeline, not a measurement")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from timing import machine_description

    models = QUICK_TORCH_MODELS if args.quick else TORCH_MODELS
    torch_results = torch_rows(models, args.repeats)
    zoo_name = "repvgg_a0" if args.quick else "repvgg_b3"
    exported = out / f"{zoo_name}.onnx"
    if not exported.exists():
        export_zoo_onnx(zoo_name, str(exported))
    blocks, channels = (2, 64) if args.quick else (13, 2048)
    chain = out / f"repvgg_chain_{blocks}x{channels}.onnx"
    if not chain.exists():
        write_repvgg_chain(str(chain), blocks=blocks, channels=channels)
    onnx_results = onnx_rows([(f"{zoo_name} (export)", str(exported)),
                              (f"RepVGG chain {blocks}x{channels}, external data", str(chain))],
                             out, args.repeats)
    text = table(torch_results, onnx_results, machine_description())
    (out / "bench_scale.md").write_text(text)
    (out / "bench_scale.json").write_text(json.dumps(
        {"torch": torch_results, "onnx": onnx_results, "quick": args.quick}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
