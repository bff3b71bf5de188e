"""The filesystem calls storage makes, behind one small injectable object.

`DiskStorage`, the write-ahead log and the snapshot writer never call `os` directly: they go
through a `FileSystem`, so tests can fail any single call (EIO on fsync, ENOSPC half-way
through a write, a "crash" after the N-th operation) without a real broken disk. The default
implementation is a thin wrapper over `os`; it adds no buffering and no retries.

Rule: a subclass that simulates a fault raises `OSError` with the errno the kernel would use,
so the callers' error mapping (`shortage_error`: ENOSPC -> DiskFullError, EMFILE, ENFILE
and ENOMEM -> ResourceExhaustedError; anything else, and every failed fsync, ->
FatalDiskError) is exercised exactly as in production.
"""

from __future__ import annotations

import errno
import os
from typing import BinaryIO

from kvstore.errors import DiskFullError, ResourceExhaustedError

# A process or system short of file descriptors or memory: the call did nothing, and the
# same call may succeed later (too many connections, say). Never a sign of a damaged disk.
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def shortage_error(exc: OSError, what: str) -> ResourceExhaustedError | None:
    """The retryable error for an `OSError` from a create, open or write that stored
    nothing: DiskFullError for ENOSPC, ResourceExhaustedError for EMFILE, ENFILE and ENOMEM;
    None for anything else (the caller treats that as fatal). Not for fsync: after a failed
    fsync the kernel may have dropped dirty pages, whatever the errno."""
    if exc.errno == errno.ENOSPC:
        return DiskFullError(f"disk full: {what}")
    if exc.errno in SHORTAGE_ERRNOS:
        return ResourceExhaustedError(f"{what}: {exc} (retried later)")
    return None


class FileSystem:
    """Plain `os` calls; subclass and override a method to inject faults."""

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, source: str, target: str) -> None:
        os.rename(source, target)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def open_for_reading(self, path: str) -> BinaryIO:
        return open(path, "rb")

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as file:
            return file.read()

    def make_directories(self, path: str) -> None:
        """Create `path` and any missing parents, durably: each new level is fsynced,
        then its parent (which holds its entry), top-down, so a power loss never takes back
        a directory that files were then written into. Existing levels are left alone."""
        missing: list[str] = []
        level = os.path.abspath(path)
        while not self.exists(level):
            missing.append(level)
            parent = os.path.dirname(level)
            if parent == level:
                break
            level = parent
        for level in reversed(missing):
            self.mkdir(level)
            self.fsync_directory(level)
            self.fsync_directory(os.path.dirname(level))

    def fsync_directory(self, path: str) -> None:
        """Make a rename, create or unlink inside `path` durable."""
        fd = self.open(path, os.O_RDONLY)
        try:
            self.fsync(fd)
        finally:
            self.close(fd)
