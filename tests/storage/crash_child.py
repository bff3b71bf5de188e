"""Child process of the SIGKILL crash test: appends through DiskStorage until killed.

    python -m tests.storage.crash_child DIRECTORY TERM SEED

On start it recovers DIRECTORY and prints `ready <first_index> <last_index>`. Then it loops:
append a batch of 1..20 entries at the next index with term TERM (data derived from index
and term, so the parent can check every byte), save them with a hard state whose commit is
the new last index, and only then print `ack <index>` (that index and all before it are
durable). Every few hundred entries it snapshots and compacts, as the server does. It never
exits on its own; the parent kills it with SIGKILL.
"""

from __future__ import annotations

import random
import sys

from kvstore.raft.types import ConfState, Entry, HardState
from kvstore.storage.disk import DiskStorage

VOTERS = ConfState(voters=(1, 2, 3))


def entry_data(index: int, term: int) -> bytes:
    return f"{index}:{term}:".encode() * (1 + index % 7)


def main() -> None:
    directory, term, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    storage = DiskStorage(
        directory,
        initial_conf_state=VOTERS,
        segment_size_bytes=16 * 1024,
        compact_after_entries=300,
        trailing_entries=50,
    )
    out = sys.stdout
    out.write(f"ready {storage.first_index()} {storage.last_index()}\n")
    out.flush()
    while True:
        first = storage.last_index() + 1
        batch = [
            Entry(term=term, index=index, data=entry_data(index, term))
            for index in range(first, first + rng.randint(1, 20))
        ]
        last = batch[-1].index
        storage.save(HardState(term=term, vote=1, commit=last), batch, None)
        out.write(f"ack {last}\n")
        out.flush()
        if rng.random() < 0.05 and last - storage.snapshot().metadata.index > 100:
            storage.create_snapshot(last, VOTERS, f"state@{last}".encode())


if __name__ == "__main__":
    main()
