"""The third-party corpus in one table: what `make corpus-table` prints.

For every model of ``tests/third_party`` (timm, ultralytics, YOLOv6, RT-DETR, OpenMMLab,
MobileCLIP, ACNet / DiverseBranchBlock code shapes), the linear ops (conv, BatchNorm,
linear, add, sub, mul, div) of: the training form; the library's own re-parameterization;
``torch.fx.experimental.optimization.fuse``; a plain conv+BN fold of the exported graph;
``reparam_fx.fuse(model)`` with no example inputs (bare blocks whose input rank nothing
proves, marked ``*``: with them); and ``reparam_fx.fuse`` of the
``torch.export`` program. All are counted on the ``torch.export`` graph of each model, as
``tests/test_third_party_corpus.py`` counts them. Also the fp32 relative error of
``fuse(model)`` and the blocks it kept whole.

    python tools/corpus_table.py [--out docs/results/third-party.md] [--only PREFIX]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

import reparam_fx  # noqa: E402
from test_third_party_corpus import (baselines, exported_counts, linear_ops,  # noqa: E402
                                     plain_conv_bn_fold)
from third_party import CORPUS, example_input, randomized_model  # noqa: E402
from timing import machine_description  # noqa: E402

COLUMNS = ("train", "own", "fx fuse", "conv+bn fold", "fuse(model)", "fuse(export)")


def measure(name: str) -> dict:
    idiom = CORPUS[name]
    model = randomized_model(idiom, dtype=torch.float32)
    x = example_input(idiom, dtype=torch.float32)
    row = {"name": name, "traceable": idiom.traceable, "with inputs": not idiom.proves_rank}
    fused = reparam_fx.fuse(model, None if idiom.proves_rank else (x,))
    row["error"] = reparam_fx.verify(model, fused, (x,), rtol=1.0, precision="model")
    row["leaves"] = sum(1 for leaf in fused.fusion_report.leaves if "does not trace" in leaf.reason)
    if not idiom.exportable:
        row["fuse(model)"] = linear_ops(reparam_fx.op_counts(fused))
        row["train"] = linear_ops(reparam_fx.op_counts(model))
        return row
    row["train"] = linear_ops(exported_counts(model, x))
    found = baselines(idiom, model, x)
    row["own"] = linear_ops(found["own"]) if "own" in found else None
    row["fx fuse"] = linear_ops(found["fx fuse"]) if "fx fuse" in found else None
    row["conv+bn fold"] = linear_ops(plain_conv_bn_fold(model, x))
    row["fuse(model)"] = linear_ops(exported_counts(fused, x))
    program = torch.export.export(copy.deepcopy(model), (x,))
    row["fuse(export)"] = linear_ops(reparam_fx.op_counts(reparam_fx.fuse(program)))
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | traces | " + " | ".join(COLUMNS) + " | fp32 error | kept whole |",
             "|---|---|" + "---:|" * len(COLUMNS) + "---:|---:|"]
    for row in rows:
        cells = ["-" if row.get(c) is None else str(row[c]) for c in COLUMNS]
        name = row["name"] + (" *" if row.get("with inputs") else "")
        lines.append(f"| {name} | {'yes' if row['traceable'] else 'no'} | "
                     + " | ".join(cells) + f" | {row['error']:.1e} | {row['leaves']} |")
    return "\n".join(lines)


def _best(row: dict) -> int | None:
    values = [row.get(c) for c in ("own", "fx fuse", "conv+bn fold") if row.get(c) is not None]
    return min(values) if values else None


def summary(rows: list[dict]) -> str:
    """How often fuse() reaches the best baseline, and the totals per library."""
    traced = [r for r in rows if r["traceable"] and _best(r) is not None]
    exported = [r for r in rows if r.get("fuse(export)") is not None and _best(r) is not None]
    lines = [f"{len(rows)} models. `fuse(model)` with no example inputs has at most the best "
             f"baseline's linear ops on {sum(r['fuse(model)'] <= _best(r) for r in traced)} of "
             f"the {len(traced)} models symbolic tracing sees whole; `fuse` of the `torch.export` "
             f"program on {sum(r['fuse(export)'] <= _best(r) for r in exported)} of "
             f"{len(exported)}. Largest fp32 relative error: "
             f"{max(r['error'] for r in rows):.1e}. `*`: a bare block on tokens whose rank "
             "nothing in its code proves: `fuse(model, example_inputs)`.", "",
             "| library | models | train | best baseline | fuse(model) | fuse(export) "
             "| own (models with one) | fuse(model) on those |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    libraries = sorted({r["name"].split(".")[0] for r in exported})
    for library in libraries + ["all"]:
        group = [r for r in exported if library == "all" or r["name"].split(".")[0] == library]
        own = [r for r in group if r.get("own") is not None]
        total = lambda key, rs: sum(r[key] for r in rs)
        lines.append(f"| {library} | {len(group)} | {total('train', group)} | "
                     f"{sum(_best(r) for r in group)} | {total('fuse(model)', group)} | "
                     f"{total('fuse(export)', group)} | {total('own', own)} | "
                     f"{total('fuse(model)', own)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--only", default="", help="only models whose name starts with this")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in sorted(CORPUS) if n.startswith(args.only)]
    if not names:
        print(f"corpus_table: no corpus model starts with {args.only!r}", file=sys.stderr)
        return 2
    rows = [measure(name) for name in names]
    text = (f"Third-party corpus, linear ops (conv, BN, linear, add, sub, mul, div) counted on "
            f"each model's torch.export graph; {machine_description()}.\n\n"
            f"{summary(rows)}\n\n{markdown(rows)}\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.out.with_suffix(args.out.suffix + ".partial")
        temporary.write_text(text)
        temporary.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
