"""Writing files so that a reader never sees half of one: write a temporary beside the target, then rename it.

A temporary is `.<name>.tmp-<pid>` in the target's folder (`.<stem>.tmp-<pid><suffix>` for tools that pick their
reader by the suffix): hidden, on the same file system (the rename is atomic), and named after the process that
writes it, so that a later run can tell the leftovers of a killed writer (kill -9, a crash, a power cut) from a
write in progress and remove only those (`remove_stale_temporaries`). Used by the checkpoints, the export, the
metrics log and the .beton conversion (data_prep imports it: this module depends on nothing of the project).
"""

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

_PID = re.compile(r"\d+")


def temporary_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Path:
    """This process's temporary for `path` (see the module docstring)."""
    path = Path(path)
    if keep_suffix:
        return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], *, keep_suffix: bool = False) -> Iterator[list[Path]]:
    """Yields a temporary per path to write; when the block ends normally, renames them over `paths` in the given
    order (a reader that waits for the last file finds the others complete). On an error in the block or in a
    rename, removes the temporaries that are left: a failed write never replaces a file, and leaves nothing."""
    temporaries = [temporary_path(path, keep_suffix=keep_suffix) for path in paths]
    try:
        yield temporaries
        for temporary, path in zip(temporaries, paths, strict=True):
            os.replace(temporary, path)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Iterator[Path]:
    """`atomic_paths` for one file: yields the temporary to write, renamed over `path` when the block succeeds."""
    with atomic_paths([path], keep_suffix=keep_suffix) as (temporary,):
        yield temporary


def remove_stale_temporaries(directory: str | os.PathLike, *patterns: str) -> list[Path]:
    """Removes the temporaries in `directory` of files whose names match one of the glob `patterns` and whose
    writer process is gone. Returns the removed paths."""
    removed = []
    for pattern in patterns:
        for path in Path(directory).glob(f".{pattern}.tmp-*"):
            pid = path.name.rsplit(".tmp-", 1)[1]
            if _PID.fullmatch(pid) and not _alive(int(pid)):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (our own pid counts as gone: a restarted job in a fresh container
    may get the pid of the one that was killed, and this process has no write in progress yet)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flushes a folder's entries (a rename into it) to disk, where the file system allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
