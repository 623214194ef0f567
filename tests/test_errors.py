"""errors.as_user_error: the one translation of system failures into one-line user errors."""

from __future__ import annotations

import errno

import torch

from tiltflow.errors import UserError, as_user_error


def test_path_and_memory_failures_become_one_line_user_errors():
    e = as_user_error(OSError(errno.EROFS, "Read-only file system", "/mnt/x.npy"))
    assert isinstance(e, UserError)
    assert str(e) == "'/mnt/x.npy': Read-only file system; the file system is read-only; " \
                     "choose a location on a writable disk"
    assert "No space left" in str(as_user_error(OSError(errno.ENOSPC, "No space left on device",
                                                        "f")))
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                       "can't allocate memory: you tried to allocate 8 bytes.\nmore")
    assert str(as_user_error(oom)).startswith("out of memory (can't allocate memory: you tried "
                                              "to allocate 8 bytes.)")
    assert "out of memory" in str(as_user_error(torch.OutOfMemoryError("CUDA out of memory")))
    assert "out of memory" in str(as_user_error(MemoryError()))
    assert str(as_user_error(ValueError("bad\nsecond line"))) == "bad"


def test_bugs_keep_their_traceback():
    assert as_user_error(KeyError("shape")) is None
    assert as_user_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert as_user_error(ZeroDivisionError()) is None
