"""Fault-injecting FileSystem variants shared by the storage tests.

They subclass `kvstore.storage.fs.FileSystem`, the seam DiskStorage does all its I/O through:
- `NoSyncFileSystem`: fsyncs are no-ops (tests that model crashes explicitly run faster);
- `TornWriteFileSystem`: the next write stores only a prefix and then the "process dies";
- `FaultyFileSystem`: fails a chosen call with a chosen errno (EIO, ENOSPC), once or always;
- `CrashAfterFileSystem`: the process "dies" after N mutating operations (open-for-create,
  write, fsync, rename, unlink, truncate, directory fsync).
A simulated death raises `SimulatedCrash`, which is not an OSError, so storage code cannot
mistake it for a disk error; the test then abandons the object and reopens the directory.
"""

from __future__ import annotations

import errno
import os

from kvstore.storage.fs import FileSystem


class SimulatedCrash(Exception):
    """The process died here (test only)."""


class NoSyncFileSystem(FileSystem):
    def fsync(self, fd: int) -> None:
        pass

    def fdatasync(self, fd: int) -> None:
        pass

    def fsync_directory(self, path: str) -> None:
        pass


class TornWriteFileSystem(NoSyncFileSystem):
    """`tear_at = k`: the next write stores its first k bytes, then SimulatedCrash."""

    def __init__(self) -> None:
        self.tear_at: int | None = None

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.tear_at is None:
            return super().write(fd, data)
        keep, self.tear_at = min(self.tear_at, len(data)), None
        if keep:
            os.write(fd, data[:keep])
        raise SimulatedCrash(f"torn write after {keep} of {len(data)} bytes")


class FaultyFileSystem(FileSystem):
    """Fail `operation` ("write", "fsync", "fdatasync", "open", "rename") with `error`.
    For writes, `partial` bytes are written first (ENOSPC half-way through a buffer)."""

    def __init__(self) -> None:
        self.operation: str | None = None
        self.error = errno.EIO
        self.partial = 0
        self.calls = 0

    def fail(self, operation: str, error: int, *, partial: int = 0) -> None:
        self.operation, self.error, self.partial = operation, error, partial

    def heal(self) -> None:
        self.operation = None

    def _maybe_fail(self, operation: str) -> None:
        if self.operation == operation:
            self.calls += 1
            raise OSError(self.error, os.strerror(self.error))

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.operation == "write" and self.partial:
            written = os.write(fd, data[: self.partial])
            self.partial = 0
            return written
        self._maybe_fail("write")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._maybe_fail("fdatasync")
        super().fdatasync(fd)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if flags & os.O_CREAT:
            self._maybe_fail("open")
        return super().open(path, flags, mode)

    def rename(self, source: str, target: str) -> None:
        self._maybe_fail("rename")
        super().rename(source, target)


class CrashAfterFileSystem(NoSyncFileSystem):
    """Die (SimulatedCrash) just before mutating operation number `crash_at` (0-based);
    `operations` records the name of each mutating operation that completed."""

    def __init__(self, crash_at: int | None) -> None:
        self.crash_at = crash_at
        self.operations: list[str] = []

    def _step(self, name: str) -> None:
        if self.crash_at is not None and len(self.operations) >= self.crash_at:
            raise SimulatedCrash(f"crash before {name} (operation {len(self.operations)})")
        self.operations.append(name)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if flags & (os.O_CREAT | os.O_TRUNC):
            self._step(f"create {os.path.basename(path)}")
        return super().open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._step("write")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._step("fsync")

    def fdatasync(self, fd: int) -> None:
        self._step("fdatasync")

    def ftruncate(self, fd: int, length: int) -> None:
        self._step("ftruncate")
        super().ftruncate(fd, length)

    def rename(self, source: str, target: str) -> None:
        self._step(f"rename {os.path.basename(source)}")
        super().rename(source, target)

    def unlink(self, path: str) -> None:
        self._step(f"unlink {os.path.basename(path)}")
        super().unlink(path)

    def fsync_directory(self, path: str) -> None:
        self._step("fsync directory")
