"""Fold the re-parameterizable blocks of an ONNX model into single convs, exactly.

    python tools/fuse_onnx.py IN.onnx -o OUT.onnx [--verify] [--rtol 1e-5]
                              [--input-shape NAME:1,3,224,224 ...] [--report] [--in-place]

A thin wrapper over :func:`reparam_fx.cli.onnx.main` (installed as ``reparam-fx-onnx``);
see that module for the checks, the exit status and how the output is written.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reparam_fx.cli.onnx import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
