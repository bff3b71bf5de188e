"""Real-process crash test: a child appending through DiskStorage is killed with SIGKILL at
random moments, many times; every entry it acknowledged as durable must survive intact.

The child (tests/storage/crash_child.py) prints `ack <index>` only after save() returned.
After each kill the parent checks a copy of the directory (so the next child still meets
whatever torn tail the kill left and recovers it itself): every acknowledged index is present
with the exact bytes and term it was written with, the hard state never went back, and the
snapshot (if any) is the one the child wrote.
"""

from __future__ import annotations

import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstore.storage.disk import DiskStorage
from tests.storage.crash_child import entry_data

REPOSITORY = Path(__file__).resolve().parents[2]
CYCLES = 30


class Child:
    def __init__(self, directory: Path, term: int, seed: int) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.storage.crash_child",
                str(directory),
                str(term),
                str(seed),
            ],
            cwd=REPOSITORY,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.process.stdout, selectors.EVENT_READ)
        self.buffer = b""
        self.lines: list[str] = []

    def read_lines(self, count: int, deadline: float) -> None:
        """Read until `count` lines came, the child exits, or the deadline passes."""
        while len(self.lines) < count and time.monotonic() < deadline:
            if not self.selector.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            if not self._read_available():
                return  # end of file: the child is gone

    def _read_available(self) -> bool:
        assert self.process.stdout is not None
        chunk = self.process.stdout.read(65536)
        if not chunk:
            return False
        self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\n")
        self.lines.extend(line.decode() for line in complete)
        return True

    def kill(self) -> None:
        """SIGKILL, wait, then collect what it printed before dying (all of it counts)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        while self._read_available():
            pass
        self.selector.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def verify_copy(directory: Path, scratch: Path, acked: dict[int, int], last_term: int) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(directory, scratch)
    storage = DiskStorage(scratch)
    try:
        hard_state = storage.initial_state()[0]
        top = max(acked, default=0)
        assert storage.last_index() >= top
        assert hard_state.term >= last_term and hard_state.commit >= top
        first = storage.first_index()
        for entry in storage.entries(first, storage.last_index() + 1, 1 << 40):
            assert entry.data == entry_data(entry.index, entry.term), entry
            if entry.index in acked:
                assert entry.term == acked[entry.index], entry
        snapshot = storage.snapshot()
        if snapshot.metadata.index:
            assert snapshot.data == f"state@{snapshot.metadata.index}".encode()
            assert first <= snapshot.metadata.index + 1
            assert snapshot.metadata.term == acked.get(
                snapshot.metadata.index, snapshot.metadata.term
            )
    finally:
        storage.close()


@pytest.mark.slow
def test_sigkill_never_loses_acknowledged_entries(tmp_path: Path) -> None:
    rng = random.Random(20261126)
    directory, scratch = tmp_path / "data", tmp_path / "scratch"
    acked: dict[int, int] = {}  # index -> term of every acknowledged entry
    last_term = 0
    cycles_with_acks = 0
    torn_tails_cut = 0  # seen by the next child; not asserted (timing decides)
    for term in range(1, CYCLES + 1):
        child = Child(directory, term, rng.randrange(1 << 30))
        try:
            deadline = time.monotonic() + 20
            if term % 5 == 0:
                time.sleep(rng.uniform(0.0, 0.3))  # a kill at any moment, even in recovery
            else:
                child.read_lines(1 + rng.randint(0, 150), deadline)
            child.kill()
        finally:
            child.stop()
        if child.lines:
            kind, _first, last = child.lines[0].split()
            assert kind == "ready"
            assert int(last) >= max(acked, default=0), "an acknowledged entry vanished"
            previous = int(last)
            for line in child.lines[1:]:
                index = int(line.split()[1])
                for acked_index in range(previous + 1, index + 1):
                    acked[acked_index] = term
                previous = index
                last_term = term
            cycles_with_acks += 1
        stderr = child.process.stderr.read().decode() if child.process.stderr else ""
        assert "Traceback" not in stderr, stderr
        torn_tails_cut += stderr.count("cutting torn tail")
        verify_copy(directory, scratch, acked, last_term)
    print(f"acknowledged={len(acked)} torn_tails_cut={torn_tails_cut}")
    assert len(acked) > 100
    assert cycles_with_acks >= CYCLES // 2
