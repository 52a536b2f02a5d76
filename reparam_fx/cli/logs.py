"""Third-party noise off while a command (or :mod:`reparam_fx.export`) works.

torch, coremltools, ExecuTorch and torchao print version warnings, deprecation notes and
progress bars that the user cannot act on; torch gives many of its loggers a stderr
handler of their own. :func:`quiet` swaps the handlers of the named loggers for one that
records (so an error message can quote what the library logged), ignores warnings and
captures Python-level output. Errors still raise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from reparam_fx.core.text import one_line


class Records(logging.Handler):
    """Keeps the messages of the records it gets (at ``level`` and above), one line each."""

    def __init__(self, level: int = logging.WARNING):
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        self.messages.append(one_line(message))


@contextlib.contextmanager
def quiet(prefixes=("torch",), level: int = logging.WARNING, stderr: bool = False):
    """Loggers named ``prefix`` or ``prefix.*`` record into the yielded :class:`Records`
    (``level`` and above) instead of printing; warnings are ignored; Python's stdout (and
    ``stderr`` if asked) captured. Everything is restored on exit."""
    log = Records(level)
    prefixes = tuple(prefixes)
    names = [name for name in list(logging.Logger.manager.loggerDict)
             if name in prefixes or name.startswith(tuple(p + "." for p in prefixes))]
    loggers = [logging.getLogger(name) for name in set(names) | set(prefixes)]
    saved = [(logger, logger.handlers[:], logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [log], False
        if logger.level < level:
            logger.setLevel(level)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield log
    finally:
        for logger, handlers, propagate, old_level in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(old_level)


def quiet_onnxruntime() -> None:
    """Keep ONNX Runtime's warnings (e.g. initializers listed as graph inputs) off stderr."""
    try:
        import onnxruntime
        onnxruntime.set_default_logger_severity(3)
    except Exception:  # noqa: BLE001 - verify_onnx reports a missing onnxruntime itself
        pass
