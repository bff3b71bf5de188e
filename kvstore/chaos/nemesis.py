"""The nemesis: injects one fault at a time into a running local cluster, and heals it.

Faults are named so a drill can be told which to use (`--faults kill,pause,partition`); a name
that stands for a family (`partition`, `kill`, `disk`) picks one member at random per fault.
Every injection is checked to have taken effect (a killed process is gone, a paused one is
stopped, a cut link stalled or swallowed bytes), because a drill whose faults silently did nothing must
fail, not pass.

Partitions stall the cut links (`ProxyMesh.cut_faults`): connections hang without an error,
as they do when a network drops packets, so the nodes must notice dead connections themselves.

Disk faults are applied while the victim is down, to the last WAL segment in its data
directory: a torn tail and an unsynced tail (garbage after the last record) must be cut off on
restart; a flipped bit in the middle must make the node refuse to start, with a message naming
the file and offset, while the other two keep serving. After the check the damaged files are
put back from a copy taken before the damage, so the run can go on.

A wipe (`wipe-random`) kills a node, deletes its whole data directory and starts it again
at the heal, as a lost disk would: the node must join under a new id and the cluster heal
back to three voters by itself. A wipe is injected only into a whole cluster (three voters,
no learner): a second disk lost while the first is being replaced leaves no quorum to add
the replacement, which is not something any automation can survive (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.chaos.impostor import Impostor
from kvstore.chaos.proxy import LinkFaults, ProxyMesh
from kvstore.server.localcluster import LocalCluster
from kvstore.storage.wal import (
    HEADER_SIZE,
    SEGMENT_SUFFIX,
    RecordType,
    frame,
    parse_segment_name,
)

logger = logging.getLogger("kvstore.chaos")

FAMILIES: dict[str, tuple[str, ...]] = {
    "kill": ("kill-random", "kill-leader", "kill-all"),
    "pause": ("pause-leader",),
    "partition": (
        "isolate-leader",
        "isolate-follower",
        "partition-halves",
        "partition-one-way",
        "partition-bridge",
    ),
    "slow": ("slow-links",),
    "lossy": ("lossy-links",),
    "disk": ("disk-torn-tail", "disk-unsynced-tail", "disk-bitflip"),
    # Forged peers attacking the followers' peer ports (kvstore/chaos/impostor.py).
    "impostor": ("impostor-leader",),
    # A lost disk: the node's data directory deleted, the node started again with the same
    # command line; it must heal into its slot under a new id (docs/operations.md).
    "wipe": ("wipe-random",),
}
ALL_FAULTS: tuple[str, ...] = tuple(name for names in FAMILIES.values() for name in names)


def expand_faults(names: str | list[str]) -> tuple[str, ...]:
    """'kill,partition' -> the concrete fault names; unknown names raise ValueError."""
    items = names.split(",") if isinstance(names, str) else names
    faults: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if name in FAMILIES:
            faults.extend(FAMILIES[name])
        elif name in ALL_FAULTS:
            faults.append(name)
        else:
            known = ", ".join([*FAMILIES, *ALL_FAULTS])
            raise ValueError(f"unknown fault {name!r}; known: {known}")
    if not faults:
        raise ValueError("no faults named")
    return tuple(dict.fromkeys(faults))


@dataclass(slots=True)
class FaultEvent:
    """One fault on the drill's timeline (times in seconds since the drill started)."""

    name: str
    targets: tuple[int, ...]
    injected_at_s: float
    healed_at_s: float | None = None
    recovered_at_s: float | None = None
    took_effect: bool = False
    note: str = ""
    # For disk faults: whether the node behaved as it must (cut the tail, or refused to start).
    disk_outcome_ok: bool | None = None
    backups: dict[int, Path] = field(default_factory=dict)

    @property
    def recovery_s(self) -> float | None:
        if self.healed_at_s is None or self.recovered_at_s is None:
            return None
        return self.recovered_at_s - self.healed_at_s

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "targets": list(self.targets),
            "injected_at_s": self.injected_at_s,
            "healed_at_s": self.healed_at_s,
            "recovered_at_s": self.recovered_at_s,
            "recovery_s": self.recovery_s,
            "took_effect": self.took_effect,
            "disk_outcome_ok": self.disk_outcome_ok,
            "note": self.note,
        }


class Nemesis:
    def __init__(
        self,
        cluster: LocalCluster,
        mesh: ProxyMesh,
        rng: random.Random,
        started_at: float,
        clock: Callable[[], float] = time.monotonic,
        observe_down: Callable[[int], None] | None = None,
    ) -> None:
        self.cluster = cluster
        # Called with each stopped node's id just before it is started again (the drill reads
        # the node's persisted hard state there).
        self._observe_down = observe_down
        self.mesh = mesh
        self._rng = rng
        self._clock = clock
        self._started_at = started_at
        self.timeline: list[FaultEvent] = []
        self._paused: set[int] = set()
        self._down: set[int] = set()
        self._impostor_attacks: Impostor | None = None

    def now_s(self) -> float:
        return self._clock() - self._started_at

    @property
    def node_ids(self) -> list[int]:
        return sorted(self.mesh.dial_addresses())

    async def leader(self, timeout_s: float = 10.0) -> int:
        return await asyncio.to_thread(self.cluster.wait_for_leader, timeout_s)

    # --- inject ----------------------------------------------------------------------------

    async def inject(self, name: str) -> FaultEvent:
        nodes = self.node_ids
        if name == "kill-random":
            return await self._kill(name, (self._rng.choice(nodes),))
        if name == "kill-leader":
            return await self._kill(name, (await self.leader(),))
        if name == "kill-all":
            return await self._kill(name, tuple(nodes))
        if name == "pause-leader":
            leader = await self.leader()
            self.cluster.pause(leader)
            self._paused.add(leader)
            event = self._event(name, (leader,))
            # SIGSTOP is delivered asynchronously: poll the process state, with a deadline.
            deadline = self._clock() + 2.0
            while not _process_stopped(self.cluster.pid(leader)) and self._clock() < deadline:
                await asyncio.sleep(0.01)
            event.took_effect = _process_stopped(self.cluster.pid(leader))
            return event
        if name.startswith("disk-"):
            return await self._disk(name)
        if name == "impostor-leader":
            return await self._impostor(name, nodes)
        if name == "wipe-random":
            return await self._wipe(name, nodes)
        return await self._network(name, nodes)

    async def _impostor(self, name: str, nodes: list[int]) -> FaultEvent:
        self._impostor_attacks = Impostor(self.cluster, self._rng)
        self._impostor_attacks.start()
        event = self._event(name, tuple(nodes))
        # It counts once a node has refused a forged connection.
        deadline = self._clock() + 5.0
        while self._clock() < deadline and self._impostor_attacks.refused == 0:
            await asyncio.sleep(0.05)
        event.took_effect = self._impostor_attacks.refused > 0
        return event

    async def _wipe(self, name: str, nodes: list[int]) -> FaultEvent:
        whole = await asyncio.to_thread(_wait_whole, self.cluster, 30.0)
        victim = self._rng.choice(nodes)
        await asyncio.to_thread(self.cluster.kill, victim)
        data_dir = self.cluster.data_dir(victim)
        await asyncio.to_thread(shutil.rmtree, data_dir, True)
        self._down.add(victim)
        event = self._event(name, (victim,))
        event.took_effect = whole and self.cluster.pid(victim) is None and not data_dir.exists()
        event.note = f"{data_dir} deleted" if whole else "the cluster was not whole within 30 s"
        return event

    async def _kill(self, name: str, targets: tuple[int, ...]) -> FaultEvent:
        for node in targets:
            await asyncio.to_thread(self.cluster.kill, node)
            self._down.add(node)
        event = self._event(name, targets)
        event.took_effect = all(self.cluster.pid(node) is None for node in targets)
        return event

    async def _network(self, name: str, nodes: list[int]) -> FaultEvent:
        before = self.mesh.bytes_swallowed()
        if name in ("slow-links", "lossy-links"):
            faults = (
                LinkFaults(delay_ms=30.0, jitter_ms=30.0)
                if name == "slow-links"
                else LinkFaults(loss=0.02, delay_ms=2.0, jitter_ms=5.0)
            )
            broken_before = sum(p.connections_broken for p in self.mesh.links.values())
            self.mesh.degrade(faults)
            event = self._event(name, tuple(nodes))
            if name == "slow-links":
                event.took_effect = True  # every chunk now waits; nothing to observe sooner
                return event
            # Loss surfaces as broken connections: it counts once one broke.
            deadline = self._clock() + 3.0
            while self._clock() < deadline:
                if sum(p.connections_broken for p in self.mesh.links.values()) > broken_before:
                    event.took_effect = True
                    break
                await asyncio.sleep(0.05)
            return event
        if name == "isolate-leader":
            targets: tuple[int, ...] = (await self.leader(),)
            self.mesh.isolate(targets[0])
        elif name == "isolate-follower":
            leader = await self.leader()
            targets = (self._rng.choice([n for n in nodes if n != leader]),)
            self.mesh.isolate(targets[0])
        elif name == "partition-halves":
            shuffled = nodes[:]
            self._rng.shuffle(shuffled)
            half = len(shuffled) // 2
            targets = tuple(shuffled[:half])
            self.mesh.partition(set(shuffled[:half]), set(shuffled[half:]))
        elif name == "partition-one-way":
            # The leader can still send but hears nothing back: check-quorum must depose it.
            leader = await self.leader()
            targets = (leader,)
            self.mesh.partition({n for n in nodes if n != leader}, {leader}, one_way=True)
        else:  # partition-bridge: two sides that only the bridge node can reach
            # The bridge is a follower, so the leader is cut from the other follower (with the
            # leader as the bridge nothing would cross the cut: followers never talk).
            leader = await self.leader()
            followers = [n for n in nodes if n != leader]
            self._rng.shuffle(followers)
            bridge, cut_off = followers[0], followers[1:]
            targets = (bridge,)
            self.mesh.bridge({leader}, set(cut_off))
        event = self._event(name, targets)
        # A cut only counts once it has swallowed traffic (heartbeats flow every few ms).
        deadline = self._clock() + 3.0
        while self._clock() < deadline and self.mesh.bytes_swallowed() <= before:
            await asyncio.sleep(0.05)
        event.took_effect = self.mesh.bytes_swallowed() > before
        return event

    async def _disk(self, name: str) -> FaultEvent:
        victim = self._rng.choice(self.node_ids)
        await asyncio.to_thread(self.cluster.kill, victim)
        self._down.add(victim)
        event = self._event(name, (victim,))
        segment = last_segment(self.cluster.data_dir(victim))
        if segment is None:
            event.note = "no WAL segment found"
            return event
        backup = segment.with_name(segment.name + ".chaos-backup")
        shutil.copy2(segment, backup)
        event.backups[victim] = backup
        size = segment.stat().st_size
        if name == "disk-torn-tail":
            # A write of one more record that the crash interrupted: a complete header whose
            # payload runs past the end of the file. Never synced, so never acknowledged.
            payload = self._rng.randbytes(self._rng.randrange(64, 512))
            record = frame(RecordType.ENTRIES, payload)
            torn = record[: self._rng.randrange(HEADER_SIZE, len(record) - 1)]
            with open(segment, "ab") as file:
                file.write(torn)
            event.note = f"{segment}: torn record of {len(torn)}/{len(record)} bytes at {size}"
        elif name == "disk-unsynced-tail":
            # The file grew but its unsynced data never reached the disk: a zero-filled tail.
            zeros = self._rng.randrange(1, 4096)
            with open(segment, "ab") as file:
                file.write(bytes(zeros))
            event.note = f"{segment}: {zeros} zero bytes past the last record at {size}"
        else:
            # A flipped bit in the middle of the synced log: corruption, never a torn tail.
            offset = self._rng.randrange(size // 4, max(size // 4 + 1, size // 2))
            with open(segment, "r+b") as file:
                file.seek(offset)
                byte = file.read(1)
                file.seek(offset)
                file.write(bytes([byte[0] ^ (1 << self._rng.randrange(8))]))
            event.note = f"{segment}: bit flipped at offset {offset} of {size}"
        event.took_effect = True
        return event

    # --- heal ------------------------------------------------------------------------------

    async def heal(self, event: FaultEvent) -> None:
        if self._impostor_attacks is not None:
            await self._impostor_attacks.stop()
            event.note = self._impostor_attacks.summary()
            self._impostor_attacks = None
        self.mesh.heal()
        for node in sorted(self._paused):
            self.cluster.resume(node)
        self._paused.clear()
        if event.name.startswith("disk-"):
            await self._heal_disk(event)
        for node in sorted(self._down):
            if self._observe_down is not None:
                await asyncio.to_thread(self._observe_down, node)
            self.cluster.start_node(node)
        self._down.clear()
        event.healed_at_s = self.now_s()

    async def _heal_disk(self, event: FaultEvent) -> None:
        (victim,) = event.targets
        self._down.discard(victim)
        self.cluster.start_node(victim)
        exited = await asyncio.to_thread(_wait_exit_or_ready, self.cluster, victim, 10.0)
        log_text = _tail(self.cluster.log_path(victim))
        if event.name == "disk-bitflip":
            # The node must refuse to start and say which file and offset are damaged.
            event.disk_outcome_ok = exited and "offset" in log_text and "corrupt" in log_text
        else:
            event.disk_outcome_ok = not exited
        if exited or event.name == "disk-bitflip":
            if not exited:
                self.cluster.kill(victim)
            backup = event.backups[victim]
            shutil.move(backup, backup.with_name(backup.name.removesuffix(".chaos-backup")))
            self._down.add(victim)
        else:
            event.backups[victim].unlink(missing_ok=True)

    def _event(self, name: str, targets: tuple[int, ...]) -> FaultEvent:
        event = FaultEvent(name=name, targets=targets, injected_at_s=self.now_s())
        self.timeline.append(event)
        logger.info("event=fault name=%s targets=%s", name, targets)
        return event


def _process_stopped(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def last_segment(data_dir: Path) -> Path | None:
    """The WAL segment with the highest sequence number under `data_dir`, if any."""
    segments = [
        (seq, path)
        for path in data_dir.rglob(f"*{SEGMENT_SUFFIX}")
        if path.is_file() and (seq := parse_segment_name(path.name)) is not None
    ]
    return max(segments, default=(0, None))[1]


def _wait_exit_or_ready(cluster: LocalCluster, node: int, timeout_s: float) -> bool:
    """True if the node's process exited; False once it answers its status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cluster.pid(node) is None:
            return True
        if cluster.status(node, timeout_s=0.5) is not None:
            return False
        time.sleep(0.05)
    return cluster.pid(node) is None


def _tail(path: Path, size: int = 8192) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, 2)
            file.seek(max(0, file.tell() - size))
            return file.read().decode(errors="replace").lower()
    except OSError:
        return ""


def _wait_whole(cluster: LocalCluster, timeout_s: float) -> bool:
    """Wait until the leader counts every node as a voter and has no learner (a replaced
    node has healed into its slot); False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leader = cluster.leader()
        status = cluster.status(leader) if leader is not None else None
        if (
            status is not None
            and len(status["voters"]) == cluster.size
            and not status["learners"]
            and len(cluster.running()) == cluster.size
        ):
            answers = [cluster.status(node) for node in cluster.ids]
            if all(a is not None and a["id"] in status["voters"] for a in answers):
                return True
        time.sleep(0.05)
    return False
