"""Seeded differential fuzzing of ``reparam_fx.fuse`` and ``fuse_onnx_model`` (the engine:
``tests/fuzzing.py``, whose docstring explains the method).

    python tools/fuzz.py --seeds 0:500 [--captures fx,fx-inputs,export,core,onnx]
                         [--time-budget SECONDS] [--jobs 1] [--no-shrink] [--in-process]
                         [--reproducers DIR] [--show-program SEED] [--whole-programs]

Prints one line per failure with its minimal reproducer (the reproducer in full the first
time a class of failure — capture, kind and the shrunk program's ops — is seen), then a
summary: programs run, captures run and skipped, failures by kind, time. Exits 1 if
anything failed. Seeds run in ``--jobs`` worker processes (one by default), so that a
crash in native code is reported as a ``crash-process`` failure of its seed instead of
ending the run. ``--reproducers DIR`` also writes every reproducer to
``DIR/seed<N>_<capture>.py``; ``--show-program SEED`` prints the program of one seed.
``--whole-programs`` runs only the seeds whose program is written as a whole program (a
``Frame``: routing loop, ``forward(x, augment=False)`` ...; or with a detection head). The
summary counts the programs per whole-program style.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import fuzzing  # noqa: E402


def parse_captures(text: str) -> tuple[str, ...]:
    captures = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in captures if c not in fuzzing.CAPTURES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown capture(s) {unknown}; choose from {', '.join(fuzzing.CAPTURES)}")
    return captures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0:100", type=fuzzing.parse_seeds,
                        help="START:STOP (STOP excluded) or one seed; default 0:100")
    parser.add_argument("--captures", default=",".join(fuzzing.CAPTURES), type=parse_captures,
                        help="comma-separated subset of " + ",".join(fuzzing.CAPTURES))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="stop starting new programs after this many seconds")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--no-shrink", action="store_true", help="report failures unshrunk")
    parser.add_argument("--in-process", action="store_true",
                        help="run in this process (a crash in native code then ends the run)")
    parser.add_argument("--reproducers", type=Path, default=None,
                        help="write every reproducer to this folder")
    parser.add_argument("--show-program", type=int, default=None, metavar="SEED",
                        help="print the program of SEED and exit")
    parser.add_argument("--whole-programs", action="store_true",
                        help="only the seeds whose program is a whole program (a frame or a head)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    if args.show_program is not None:
        print(fuzzing.generate_program(args.show_program).source())
        return 0

    if args.reproducers:
        args.reproducers.mkdir(parents=True, exist_ok=True)
    first_of_class: dict[tuple, tuple[int, str]] = {}

    def on_failure(failure: fuzzing.Failure) -> None:
        print(failure.line(), flush=True)
        signature = failure.signature()
        if signature in first_of_class:
            seed, capture = first_of_class[signature]
            print(f"    (same class as seed {seed} {capture}; reproducer not repeated)", flush=True)
        else:
            first_of_class[signature] = (failure.seed, failure.capture)
            print(failure.reproducer, flush=True)
        if args.reproducers:
            path = args.reproducers / f"seed{failure.seed}_{failure.capture}.py"
            path.write_text(failure.reproducer)

    def on_progress(result: fuzzing.FuzzResult) -> None:
        if result.programs % 100 == 0:
            print(f"... {result.programs} programs, {len(result.failures)} failures", file=sys.stderr, flush=True)

    seeds = args.seeds
    if args.whole_programs:
        seeds = (seed for seed in seeds if fuzzing.generate_program(seed).features())
    result = fuzzing.fuzz(seeds, args.captures, time_budget=args.time_budget, jobs=args.jobs,
                          isolate=not args.in_process, shrink_failures=not args.no_shrink,
                          on_failure=on_failure, on_progress=on_progress)
    print()
    print(result.summary())
    if result.failures:
        print(f"distinct failure classes: {len(first_of_class)}")
        for (front, kind, detail), (seed, capture) in first_of_class.items():
            print(f"  {front} {kind}: {detail}  (first: seed {seed} {capture})")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
