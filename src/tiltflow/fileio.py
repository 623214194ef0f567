"""Durable, atomic file writes shared by every module that writes files.

:func:`atomic_write_bytes` writes to a hidden temporary file in the target's directory
(``.NAME.<8 random hex>.tmp``), flushes and fsyncs it, renames it over the target with
``os.replace`` (atomic on POSIX) and fsyncs the directory so the rename itself persists. A
failure at any point removes the temporary file and leaves the old target untouched.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "write_synced"]


def write_synced(path, data: bytes) -> None:
    """Write ``data`` to ``path`` (created or truncated), flush and fsync it; not atomic."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    """Fsync a directory so renames inside it persist; a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Replace ``path`` by a file holding ``data`` atomically and durably (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except OSError as e:  # name the file the caller asked for, not the vanished temporary
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))
