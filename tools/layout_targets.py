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

With ``--scaling``: the wall time of ``fuse`` (on a traced graph) and ``fuse_onnx_model``
on stacks of 100 and 1000 LeViT MLP blocks, medians of 3.

    python tools/layout_targets.py [--model levit_128s|nextvit_small] [--scaling]
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
from onnx_checks import export  # noqa: E402
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


def _token_stack(blocks: int) -> torch.nn.Module:
    """``blocks`` LeViT MLPs (LinearNorm, Hardswish, LinearNorm) on image tokens."""
    from third_party.levit_nextvit import LevitMlp

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(*(LevitMlp(16, 32, act_layer=torch.nn.Hardswish)
                                                for _ in range(blocks)))

        def forward(self, x):
            return self.blocks(x.flatten(2).transpose(1, 2))
    return Stack().eval()


def scaling(sizes=(100, 1000), repeats: int = 3) -> list[dict]:
    """``fuse`` and ``fuse_onnx_model`` wall time on stacks of LeViT MLPs (every BatchNorm
    behind a flatten and a ``reshape_as``): 10x the blocks should cost about 10x the time."""
    rows = []
    x = torch.randn(1, 16, 4, 4)
    for blocks in sizes:
        model = randomize_batchnorm_(_token_stack(blocks), seed=1)
        traced = torch.fx.symbolic_trace(model)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fused = reparam_fx.fuse(traced)
            seconds.append(time.perf_counter() - start)
        exported = export(model, x, False)
        onnx_seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fused_onnx, _ = reparam_fx.fuse_onnx_model(exported)
            onnx_seconds.append(time.perf_counter() - start)
        rows.append({"blocks": blocks, "fx nodes": len(traced.graph.nodes),
                     "fuse s": sorted(seconds)[repeats // 2],
                     "bn left": reparam_fx.op_counts(fused).get("batch_norm", 0),
                     "onnx nodes": len(exported.graph.node),
                     "onnx nodes after": len(fused_onnx.graph.node),
                     "fuse_onnx s": sorted(onnx_seconds)[repeats // 2]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append")
    parser.add_argument("--scaling", action="store_true",
                        help="only the time of fuse / fuse_onnx_model on 100 and 1000 blocks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{machine_description()}\n")
    if args.scaling:
        rows = scaling()
        print("| " + " | ".join(rows[0]) + " |\n|" + "---:|" * len(rows[0]))
        for r in rows:
            print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else f"{v:,}"
                                    for v in r.values()) + " |")
        print(f"\n10x the blocks: fuse {rows[1]['fuse s'] / rows[0]['fuse s']:.1f}x the time, "
              f"fuse_onnx_model {rows[1]['fuse_onnx s'] / rows[0]['fuse_onnx s']:.1f}x")
        return 0
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
