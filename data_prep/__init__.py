"""Offline data preparation: `python -m data_prep {convert,inspect,synth} ...` (also the `mugs-prep` command)."""

import argparse
import typing

from mugs_fast.config import OneLineParser

__all__ = ["OneLineParser", "PrepError", "error_line", "int_in"]


class PrepError(Exception):
    """A user-facing error of a data_prep command: its message is one line, printed without a traceback."""


def error_line(e: Exception) -> str:
    """One line for an expected error: its message; for an OSError (permissions, disk full, ...) what and where."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


def int_in(low: int, high: int | None = None) -> typing.Callable[[str], int]:
    """An argparse `type`: an integer in low..high (no upper bound when high is None), else a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse
