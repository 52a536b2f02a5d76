"""Errors as one line of text, for reports and command lines."""

from __future__ import annotations

import re


def one_line(text) -> str:
    """``text`` with its line breaks (and the spaces around them) folded into one space."""
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def first_line(error: BaseException, limit: int = 160, kind: bool = True) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters, after its type
    name (``kind``) or, without one, with a trailing full stop dropped (it ends a clause)."""
    lines = str(error).strip().splitlines()
    text = lines[0][:limit] if lines else ""
    if kind:
        return f"{type(error).__name__}: {text}".rstrip(": ")
    return (text or type(error).__name__).rstrip(".")
