"""ONNX node counts of corpus models: the export, onnxslim, the own deploy form, fuse_onnx_model.

For each corpus entry (``tests/third_party``; float32, randomised BatchNorm statistics, batch
1 at the entry's input size) and each exporter (``dynamo=False`` at opset 17,
``dynamo=True``), prints the node counts of

* ``source``: the export of the training form,
* ``slim(source)``: onnxslim of it (if onnxslim is installed: it is no dependency),
* ``own`` / ``slim(own)``: the export of the entry's own deploy conversion (timm's
  ``reparameterize_model`` ...), and onnxslim of it; ``-`` where the library has none,
* ``fuse(source)``: ``reparam_fx.fuse_onnx_model`` of the source,

and the ONNX Runtime relative error of the fused model (float32).

    python tools/onnx_node_counts.py [NAME ...]   # default: EfficientViT-M0 and -B0
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import reparam_fx  # noqa: E402
from onnx_checks import export  # noqa: E402
from third_party import CORPUS, example_input, randomized_model  # noqa: E402

DEFAULT = ("timm.efficientvit_msra_m0_tiny", "timm.efficientvit_mit_b0_tiny")
COLUMNS = ("source", "slim(source)", "own", "slim(own)", "fuse(source)", "error")


def _slim(model):
    try:
        import onnxslim
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        return onnxslim.slim(copy.deepcopy(model))


def _nodes(model) -> str:
    return "-" if model is None else str(len(model.graph.node))


def rows(name: str) -> list[dict]:
    idiom = CORPUS[name]
    model = randomized_model(idiom, dtype=torch.float32)
    x = example_input(idiom, dtype=torch.float32)[:1]
    own = None if idiom.reparameterize is None else idiom.reparameterize(copy.deepcopy(model))
    found = []
    for dynamo in (False, True):
        source = export(model, x, dynamo)
        deployed = None if own is None else export(own.eval(), x, dynamo)
        fused, _ = reparam_fx.fuse_onnx_model(source)
        found.append({
            "model": name, "exporter": "dynamo" if dynamo else "torchscript",
            "source": _nodes(source), "slim(source)": _nodes(_slim(source)),
            "own": _nodes(deployed),
            "slim(own)": "-" if deployed is None else _nodes(_slim(deployed)),
            "fuse(source)": _nodes(fused),
            "error": f"{reparam_fx.verify_onnx(source, fused, rtol=1.0):.1e}"})
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(DEFAULT), metavar="NAME",
                        help="corpus entries (default: %(default)s)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in CORPUS]
    if unknown:
        print(f"onnx_node_counts: no corpus model {', '.join(unknown)}", file=sys.stderr)
        return 2
    print("| model | exporter | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---:|" * len(COLUMNS))
    for name in args.names:
        for row in rows(name):
            print(f"| {row['model']} | {row['exporter']} | "
                  + " | ".join(row[column] for column in COLUMNS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
