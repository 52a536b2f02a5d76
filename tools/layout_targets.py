"""Folds across reshapes on full-size models: what ``make layout-targets`` prints.

LeViT keeps a BatchNorm after every ``Linear`` behind ``flatten(0, 1)`` / ``reshape_as``,
and its own deploy code folds each into its linear; NextViT-style attention normalises
before ``reshape(B, C, -1).transpose(-1, -2)`` and three projections. For LeViT-128S
(timm's configuration, 224x224, distillation head; the corpus's timm code shape in
``tests/third_party/levit_nextvit.py``) this prints:

* torch: linear ops (conv, BN, linear, add, sub, mul, div, counted on each form's
  ``torch.export`` graph) of the training form, the model's own deploy conversion,
  ``reparam_fx.fuse(model)`` (no example inputs) and ``reparam_fx.fuse`` of the exported
  program; the fp32 and float64 relative errors; ``fuse`` wall time;
* ONNX, for both exporters (``dynamo=False``, opset 17; ``dynamo=True``): nodes and
  ``BatchNormalization`` nodes of the training form's export, of the own conversion's
  export and of ``reparam_fx.fuse_onnx_model`` of the training export; ONNX Runtime error.

    python tools/layout_targets.py [--model levit_128s|nextvit_small]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

import reparam_fx  # noqa: E402
from reparam_fx.testing import randomize_batchnorm_  # noqa: E402
from test_onnx_zoo import export  # noqa: E402
from test_third_party_corpus import exported_counts, linear_ops  # noqa: E402
from third_party.levit_nextvit import (build_levit_128s, build_nextvit_small,  # noqa: E402
                                       levit_replace_batchnorm, timm_reparameterize_model)
from timing import machine_description  # noqa: E402

MODELS = {
    "levit_128s": (build_levit_128s, levit_replace_batchnorm, (1, 3, 224, 224)),
    "nextvit_small": (build_nextvit_small, timm_reparameterize_model, (1, 3, 224, 224)),
}


def torch_row(model, own, x) -> dict:
    start = time.perf_counter()
    fused = reparam_fx.fuse(model)
    seconds = time.perf_counter() - start
    program = reparam_fx.fuse(torch.export.export(model, (x,)))
    wide = copy.deepcopy(model).double()
    return {
        "train": linear_ops(exported_counts(model, x)),
        "own": linear_ops(exported_counts(own, x)),
        "fuse(model)": linear_ops(exported_counts(fused, x)),
        "fuse(export)": linear_ops(reparam_fx.op_counts(program)),
        "bn left": exported_counts(fused, x).get("batch_norm", 0),
        "fp32 error": reparam_fx.verify(model, fused, (x,), rtol=1.0, precision="model"),
        "float64 error": reparam_fx.verify(wide, reparam_fx.fuse(wide), (x.double(),), rtol=1.0),
        "fuse seconds": seconds,
    }


def onnx_rows(model, own, x) -> list[dict]:
    rows = []
    for dynamo in (False, True):
        train, hand = export(model, x, dynamo), export(own, x, dynamo)
        fused, _ = reparam_fx.fuse_onnx_model(train)
        bn = lambda m: sum(n.op_type == "BatchNormalization" for n in m.graph.node)
        rows.append({"exporter": "dynamo" if dynamo else "torchscript",
                     "train": len(train.graph.node), "own": len(hand.graph.node),
                     "fused": len(fused.graph.node), "bn train": bn(train), "bn fused": bn(fused),
                     "error": reparam_fx.verify_onnx(train, fused, rtol=1.0)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{machine_description()}\n")
    for name in args.model or sorted(MODELS):
        build, deploy, shape = MODELS[name]
        torch.manual_seed(0)
        model = randomize_batchnorm_(build().eval(), seed=1)
        own = deploy(copy.deepcopy(model)).eval()
        x = torch.randn(*shape)
        row = torch_row(model, own, x)
        print(f"## {name}\n\ntorch, linear ops on the export graph:\n")
        print("| " + " | ".join(row) + " |\n|" + "---:|" * len(row))
        print("| " + " | ".join(f"{v:.1e}" if "error" in k else f"{v:.2f}" if "seconds" in k
                                else str(v) for k, v in row.items()) + " |\n")
        rows = onnx_rows(model, own, x)
        print("ONNX nodes:\n")
        print("| " + " | ".join(rows[0]) + " |\n|---|" + "---:|" * (len(rows[0]) - 1))
        for r in rows:
            print("| " + " | ".join(f"{v:.1e}" if k == "error" else str(v)
                                    for k, v in r.items()) + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
