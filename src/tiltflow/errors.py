"""Errors meant for users, and the one translation of system failures into them.

The CLI prints a :class:`UserError`'s message on one line and exits with code 2.
:func:`as_user_error` is the single place that decides which other exceptions are the user's
problem too: an ``OSError`` on a path (permissions, a read-only or full disk, a file where a
folder is wanted) and an allocation failure (out of memory) say what happened and to which path
or request, instead of a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys

__all__ = ["UserError", "as_user_error", "one_line", "os_fix"]


class UserError(ValueError):
    """A problem with the user's input (path, config, data, argument) and how to fix it."""


#: what to do about an OSError, by errno
_OS_FIXES = {
    errno.EACCES: "choose a location you may write to, or fix its permissions",
    errno.EPERM: "choose a location you may write to, or fix its permissions",
    errno.EROFS: "the file system is read-only; choose a location on a writable disk",
    errno.ENOSPC: "the disk is full; free space or choose another disk",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder; give a file name",
    errno.EEXIST: "something is already there; remove it or choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "use a shorter path",
}

#: substrings of allocation failures: torch's CPU allocator, CUDA, std::bad_alloc
_OOM_MARKERS = ("not enough memory", "can't allocate memory", "cannot allocate memory",
                "out of memory", "bad_alloc")


def one_line(message: str) -> str:
    """The first non-empty line of ``message`` (a UserError is shown on one line)."""
    for line in str(message).strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def os_fix(code: int | None) -> str:
    """What to do about an OSError with errno ``code``."""
    return _OS_FIXES.get(code, "check the path and the disk")


def _os_message(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else None
    what = exc.strerror or one_line(str(exc)) or type(exc).__name__
    fix = os_fix(exc.errno)
    if where is None:
        return f"{what}; {fix}"
    also = f" -> {exc.filename2!r}" if exc.filename2 is not None else ""
    return f"{str(where)!r}{also}: {what}; {fix}"


def as_user_error(exc: BaseException) -> UserError | None:
    """``exc`` as a one-line :class:`UserError` when it is the user's to fix, else ``None``.

    Covers UserError itself, the ValueError / TypeError that argument checks raise, OSError on
    a path (named in the message) and allocation failures (MemoryError, torch's
    OutOfMemoryError, the CPU allocator's RuntimeError)."""
    if isinstance(exc, UserError):
        return exc
    if _is_allocation_failure(exc):
        detail = one_line(str(exc))
        detail = detail.split("DefaultCPUAllocator: ")[-1] if detail else type(exc).__name__
        return UserError(f"out of memory ({detail}); ask for less: a smaller --num, --nfe, "
                         "train.batch_size or model")
    if isinstance(exc, OSError):
        return UserError(_os_message(exc))
    if isinstance(exc, (ValueError, TypeError)):
        return UserError(one_line(str(exc)) or type(exc).__name__)
    return None
