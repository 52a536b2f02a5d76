"""The two commands and their shared plumbing.

* :mod:`.errors` - exit statuses, :class:`CliError`, the argument parser that reports
  ``prog: error: ...`` on one line, and :func:`run_command` (no traceback for bad input).
* :mod:`.files` - path checks and staged, fsynced, atomic writes (files and folders).
* :mod:`.onnx` - ``reparam-fx-onnx`` (``tools/fuse_onnx.py``): fuse an ONNX file.
* :mod:`.program` - ``reparam-fx`` (``python -m reparam_fx.cli``): fuse a saved
  ``torch.export`` program, or lower it to ONNX, Core ML or ExecuTorch.

Neither command imports the other; both import :mod:`.errors` and :mod:`.files`.
"""
