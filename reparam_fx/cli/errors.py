"""What both commands share: the fuse arguments, and how they fail (one line on stderr,
an exit status, never a traceback).

    0  done; the output was written.
    1  fusion, lowering or verification failed; nothing was written.
    2  bad usage or bad input; nothing was written.

Commands raise :class:`CliError` for what the user can fix; :func:`run_command` turns it
(and anything unexpected, a bug) into ``prog: error: ...`` and the status.
``REPARAM_FX_DEBUG=1`` lets an unexpected exception show its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from reparam_fx.core.text import one_line

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_STATUSES = ("exit status: 0 ok, 1 fusion or verification failed, 2 bad usage or input. "
                 "Nothing is written unless the status is 0.")  # (for --help)


class CliError(Exception):
    """A failure reported as one line on stderr, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_BAD_INPUT, usage: bool = False):
        super().__init__(message)
        self.status = status
        self.usage = usage


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`CliError` (with the usage line); its
    help ends with the exit statuses."""

    def __init__(self, *args, epilog: str = EXIT_STATUSES, **kwargs):
        super().__init__(*args, epilog=epilog, **kwargs)

    def error(self, message):  # raise instead of printing and exiting, so main() returns
        raise CliError(message, EXIT_BAD_INPUT, usage=True)


def add_fuse_arguments(parser: argparse.ArgumentParser, suffix: str, model: str,
                       verify: str, rtol: float) -> None:
    """``IN -o OUT --in-place --verify --rtol --report``, for a ``model`` file of ``suffix``
    (``.onnx``); ``verify`` says how ``--verify`` runs the two models."""
    parser.add_argument("input", metavar=f"IN{suffix}", help=f"the {model} to fuse")
    parser.add_argument("-o", "--output", metavar=f"OUT{suffix}",
                        help=f"where to write the fused {model}")
    parser.add_argument("--in-place", dest="in_place", action="store_true",
                        help=f"replace IN{suffix} with the fused {model}")
    parser.add_argument("--verify", action="store_true",
                        help=f"{verify} and fail (exit 1) if max|a-b|/max|a| exceeds --rtol")
    parser.add_argument("--rtol", type=float, default=rtol, metavar="RTOL",
                        help=f"tolerance for --verify (default: {rtol:g})")
    parser.add_argument("--report", action="store_true",
                        help="print the full fusion report, with the reasons nodes were left alone")


def unexpected(what: str, error: Exception) -> CliError:
    """A step that failed in a way no check foresaw, as a failure (exit 1) that says what."""
    if os.environ.get("REPARAM_FX_DEBUG"):
        raise error
    return CliError(f"{what} failed: {type(error).__name__}: {one_line(error)[:300]}; "
                    f"nothing written", EXIT_FAILED)


def run_command(prog: str, parser: argparse.ArgumentParser, run_parsed, argv=None) -> int:
    """Parse ``argv`` and call ``run_parsed(args)``; every failure becomes one line on
    stderr (``PROG: error: ...``) and an exit status, never a traceback (unless
    ``REPARAM_FX_DEBUG`` is set, for bugs)."""
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help / --version
            return int(exit_.code or 0)
        return run_parsed(args)
    except CliError as error:
        if error.usage:
            parser.print_usage(sys.stderr)
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug: one line unless debugging
        if os.environ.get("REPARAM_FX_DEBUG"):
            raise
        print(f"{prog}: error: unexpected {type(error).__name__}: {one_line(error)} (a bug; "
              f"rerun with REPARAM_FX_DEBUG=1 for the traceback and please report it)",
              file=sys.stderr)
        return EXIT_FAILED
