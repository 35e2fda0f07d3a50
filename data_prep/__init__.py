"""Offline data preparation: `python -m data_prep {convert,inspect,synth} ...` (also the `mugs-prep` command)."""


class PrepError(Exception):
    """A user-facing error of a data_prep command: its message is one line, printed without a traceback."""


def error_line(e: Exception) -> str:
    """One line for an expected error: its message; for an OSError (permissions, disk full, ...) what and where."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)
