"""Errors a user can act on, and the exit codes the CLI gives them (docs/errors.md).

Each message is one paragraph: what went wrong, where (file, line, key, layer or module) and how
to fix it. The CLI prints it without a traceback and exits with the class's `exit_code`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

EXIT_BUG = 1  # an unexpected exception: a quantlab bug (traceback + a request to report it)
EXIT_INPUT = 2  # bad input: recipe, paths, model, data, settings
EXIT_ENVIRONMENT = 3  # the machine: permissions, disk full, I/O errors, out of memory
EXIT_BUSY = 4  # the output folder is locked by another live run
EXIT_INTERRUPTED = 130  # SIGINT or SIGTERM; the resume state (if any) is kept


class QuantlabError(Exception):
    """Base class of every error quantlab raises on purpose."""

    exit_code = EXIT_INPUT


class InputError(QuantlabError):
    """Bad user input: a recipe, a path, a model, data or a setting that cannot work.

    The message must say what is wrong, where (file, line, key or layer) and how to fix it.
    """


class EnvironmentFailure(QuantlabError):
    """The machine refused: a permission, a full disk, an I/O error, memory; the input was fine."""

    exit_code = EXIT_ENVIRONMENT


class OutputLockedError(QuantlabError):
    """Another live quantlab process holds the output folder's lock."""

    exit_code = EXIT_BUSY


_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose a folder on another disk",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EBUSY: (
        "the path is busy (a mount point cannot be renamed or removed): write into a subfolder"
    ),
    errno.EIO: "an I/O error: the disk or network file system failed; check it and retry",
    errno.ENOENT: "a file or folder is missing: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder where a file was expected: check the path",
}


def environment_failure(exc: OSError, doing: str) -> EnvironmentFailure:
    """An EnvironmentFailure for an OSError met while `doing` (e.g. 'writing the checkpoint')."""
    where = exc.filename or "?"
    if exc.filename2:
        where = f"{where} -> {exc.filename2}"
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = _HINTS.get(exc.errno or -1, "check the path, the disk and the permissions, then retry")
    return EnvironmentFailure(f"{doing} failed at {where}: {reason}. Fix: {hint}.")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def corrupt_file(path: Path | str, exc: BaseException, fix: str) -> InputError:
    """An InputError for a safetensors/JSON file that cannot be parsed (truncated or corrupt)."""
    first = first_line(exc)
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    return InputError(
        f"{path} ({size} bytes) cannot be read: {first}. The file is truncated or corrupt "
        f"(an interrupted copy or download is the usual cause). {fix}"
    )
