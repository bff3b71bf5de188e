"""One chaos drill, end to end: a real three-node cluster, a workload, faults, and the verdict.

`run_drill(DrillConfig(...))` does, in order:

1. starts a `ProxyMesh` (a fault-injecting TCP proxy on every directed peer link) and a
   `LocalCluster` whose nodes dial each other only through it, in a run folder;
2. waits for a leader, starts the workload (kvstore.chaos.workload) and lets it warm up;
3. cycles faults from the nemesis (kvstore.chaos.nemesis): inject, hold for a few seconds,
   heal, then probe with writes until one is acknowledged (the time to recover), rest;
4. stops the workload, heals everything, waits until every node has applied what the leader
   committed, and reads the final values (recorded in the history as ordinary reads);
5. stops the nodes (by PID) and reads each node's own state offline from its data directory:
   committed entries (log matching), the state digest at a common index, the request ids
   that the state machine really applied (not answered from the session table), and the
   persisted (term, commit) observed at every restart;
6. runs the checkers of kvstore.verify, plus the drill's own: the faults took effect, damaged
   disks were handled as they must be, enough operations completed, duplicate requests in
   the counter's retry storm got the first answer.

The run folder (history.jsonl, timeline.json, report.json, plot.png, every node's log and
data directory) is kept when anything fails, or when asked, and its path is printed.

While it runs, an optional `DrillObserver` (the CLI prints it) hears every phase, every fault
injected, healed and recovered from, and every `interval_s` a `DrillProgress` snapshot: the
time, the operations so far by outcome, the faults in force. It only reads what the drill
records, from a task of its own: the fault schedule does not know it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import secrets
import shutil
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvstore.chaos.coordination import WatchRecorder
from kvstore.chaos.nemesis import FaultEvent, Nemesis, expand_faults
from kvstore.chaos.proxy import ProxyMesh
from kvstore.chaos.workload import WORKLOADS, Workload, WorkloadConfig
from kvstore.client import Client, ClientConfig
from kvstore.errors import CorruptionError, KVStoreError, NotFoundError, StorageError
from kvstore.kv.commands import Command, decode_commands
from kvstore.kv.state_machine import StateMachine
from kvstore.raft.types import EntryType
from kvstore.server.identity import read_identity
from kvstore.server.localcluster import LocalCluster, free_port
from kvstore.storage.disk import DiskStorage
from kvstore.verify import (
    Operation,
    check_cluster_invariants,
    check_counter,
    check_exactly_once,
    check_linearizability,
    check_lost_writes,
    deadline_after,
    write_history,
)

logger = logging.getLogger("kvstore.chaos")

# Node settings for drills: frequent snapshots and small segments, so compaction, snapshot
# installation and segment rotation happen within a short run.
DRILL_NODE_ARGS: tuple[str, ...] = ()
# The history a watch drill's nodes keep (revisions): enough for the whole run, which the
# checker compares every watcher with at the end.
WATCH_DRILL_HISTORY_REVISIONS = 1_000_000


# What each count of the report means, as the workloads record operations
# (kvstore/chaos/workload.py) and the checkers read them (kvstore/verify).
OUTCOMES: tuple[tuple[str, str], ...] = (
    ("ok", "a definite answer (a cas that lost its comparison included); the checkers "
           "require its effect, or what it read, to fit every other operation"),
    ("failed", "a definite failure that did not take effect: a read that got an error or no "
               "answer in time (a read changes nothing), or an append whose compare-and-set "
               "lost to another writer; the checkers drop it"),
    ("unknown", "no definite answer (timeout, connection lost, an error after the request "
                "was sent, even after the client's retries): it may or may not have taken "
                "effect, at any time after it was sent; the checkers allow both, and the "
                "client goes on as a new process"),
    ("dropped", "(linearizability line) operations that constrain nothing and are left out "
                "of the search: failed ones, unknown reads, and unknown writes whose value "
                "nobody read and that no later operation could have seen (they may as well "
                "have taken effect at the very end)"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DrillProgress:
    """Where a running drill stands: seconds since it started, operations so far by
    outcome (for `counter`: increments acknowledged and unknown), the faults in force."""

    elapsed_s: float
    duration_s: float
    ok: int
    failed: int
    unknown: int
    faults: tuple[str, ...]


class DrillObserver(Protocol):
    """Hears a running drill; `progress` is called every `interval_s` seconds."""

    interval_s: float

    def progress(self, snapshot: DrillProgress) -> None: ...

    def event(self, elapsed_s: float, message: str) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DrillConfig:
    duration_s: float = 60.0
    faults: str = "kill,pause,partition"
    workload: str = "register"
    seed: int = 1
    # Where the run folder goes; a fresh temporary folder when None.
    base_dir: Path | None = None
    processes: int = 6
    warmup_s: float = 3.0
    # Each fault is held for uniform(*fault_s) seconds; after recovery the cluster rests for
    # uniform(*calm_s) seconds before the next one.
    fault_s: tuple[float, float] = (2.0, 4.0)
    calm_s: tuple[float, float] = (1.5, 3.0)
    # Time kept free at the end for healing, convergence and final reads.
    tail_s: float = 4.0
    recovery_timeout_s: float = 30.0
    checker_budget_s: float = 60.0
    # A run that acknowledged fewer operations than this per second of duration failed.
    min_ok_per_s: float = 3.0
    keep: bool = False
    plot: bool = True
    # UNSAFE, for the test that shows the checkers can fail: every node answers
    # linearizable reads from its local state without ReadIndex.
    unsafe_local_reads: bool = False
    node_args: tuple[str, ...] = DRILL_NODE_ARGS
    # TLS on both ports and client authentication (--auth, a root token): the drill's
    # clients speak https with the cluster's CA and carry the token.
    secure: bool = False

    def __post_init__(self) -> None:
        if self.duration_s <= self.warmup_s + self.tail_s:
            raise ValueError(
                f"duration_s ({self.duration_s}) must exceed warmup_s + tail_s "
                f"({self.warmup_s + self.tail_s})"
            )
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}")
        expand_faults(self.faults)  # raises ValueError naming an unknown fault


@dataclass(slots=True)
class CheckOutcome:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "seconds": self.seconds}


@dataclass(slots=True)
class DrillReport:
    config: DrillConfig
    run_dir: Path
    counts: dict[str, int] = field(default_factory=dict)
    timeline: list[FaultEvent] = field(default_factory=list)
    checks: list[CheckOutcome] = field(default_factory=list)
    kept: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def check(self, name: str) -> CheckOutcome | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        config = self.config
        return {
            "ok": self.ok,
            "seed": config.seed,
            "workload": config.workload,
            "faults": config.faults,
            "duration_s": config.duration_s,
            "unsafe_local_reads": config.unsafe_local_reads,
            "secure": config.secure,
            "wall_s": self.wall_s,
            "counts": self.counts,
            "timeline": [event.to_json() for event in self.timeline],
            "checks": [check.to_json() for check in self.checks],
            "run_dir": str(self.run_dir),
            "kept": self.kept,
        }

    def render(self) -> str:
        config = self.config
        counts = self.counts
        lines = [
            f"kvstore chaos: workload {config.workload}, faults {config.faults}, "
            f"seed {config.seed}, {config.duration_s:g} s"
            + (" (UNSAFE local reads)" if config.unsafe_local_reads else ""),
            f"operations: {counts.get('operations', 0)} (ok {counts.get('ok', 0)}, "
            f"failed {counts.get('failed', 0)}, unknown outcome {counts.get('unknown', 0)})",
            f"faults injected: {len(self.timeline)}",
        ]
        for event in self.timeline:
            effect = "took effect" if event.took_effect else "DID NOT take effect"
            healed = (
                "never healed" if event.healed_at_s is None else f"healed {event.healed_at_s:.1f}s"
            )
            recovery = (
                "not recovered"
                if event.recovery_s is None
                else f"recovered {event.recovery_s * 1000:.0f} ms after heal"
            )
            disk = ""
            if event.disk_outcome_ok is not None:
                disk = "; disk handled right" if event.disk_outcome_ok else "; DISK MISHANDLED"
            lines.append(
                f"  {event.injected_at_s:6.1f}s {event.name:<20} nodes {list(event.targets)} "
                f"{effect}; {healed}; {recovery}{disk}"
            )
        recoveries = [e.recovery_s for e in self.timeline if e.recovery_s is not None]
        if recoveries:
            lines.append(
                f"time to recover after heal: median {statistics.median(recoveries) * 1000:.0f} ms, "
                f"max {max(recoveries) * 1000:.0f} ms"
            )
        lines.append("checkers:")
        for check in self.checks:
            verdict = "ok" if check.ok else "FAILED"
            timing = f" [{check.seconds:.2f} s]" if check.seconds else ""
            lines.append(f"  {check.name:<16} {verdict}{timing}: {check.detail}")
        lines.append("what the counts mean:")
        for name, meaning in OUTCOMES:
            lines.append(
                textwrap.fill(
                    f"{name}: {meaning}", width=100, initial_indent="  ", subsequent_indent="    "
                )
            )
        lines.append(f"verdict: {'PASS' if self.ok else 'FAIL'} ({self.wall_s:.0f} s wall)")
        if self.kept:
            lines.append(f"artifacts: {self.run_dir}")
        return "\n".join(lines)


# --- offline reading of a stopped node's data directory ------------------------------------


@dataclass(slots=True)
class NodeState:
    """What one stopped node's data directory says."""

    term: int
    commit: int
    snapshot_index: int
    committed: list[tuple[int, int, str]]
    applied_requests: list[object]
    digest_at: dict[int, str]
    # The member id its identity file names (None without one): see `member_key`.
    member_id: int | None = None


def read_node_state(data_dir: Path, digest_index: int | None = None) -> NodeState:
    """Open a stopped node's storage, replay its committed log through a state machine and
    report the committed entries, the request ids that really applied, and the digest at
    `digest_index` (when the log reaches it) and at the commit index."""
    storage = DiskStorage(data_dir)
    try:
        hard_state = storage.hard_state
        snapshot = storage.snapshot()
        machine = StateMachine()
        start = snapshot.metadata.index
        if not snapshot.is_empty():
            machine.restore(snapshot.data, start)
        commit = min(hard_state.commit, storage.last_index())
        entries = storage.entries(start + 1, commit + 1, 1 << 62) if commit > start else []
        committed: list[tuple[int, int, str]] = []
        applied: list[object] = []
        digests: dict[int, str] = {}
        if digest_index is not None and digest_index == start:
            digests[start] = machine.digest()
        for entry in entries:
            committed.append((entry.index, entry.term, hashlib.sha256(entry.data).hexdigest()))
            commands: tuple[Command, ...] = ()
            if entry.type == EntryType.NORMAL and entry.data:
                commands = decode_commands(entry.data)
            # A request the session table answers is a retry and applies nothing (so is the
            # second copy of a request id in one batch entry); one that is new to it and
            # succeeds took effect. Twice for one request id is the bug.
            fresh: list[str | None] = []
            for command in commands:
                request = command.request
                new = request is not None and machine.duplicate_result(request) is None
                fresh.append(str(request) if new and str(request) not in fresh else None)
            for request_text, (_, result) in zip(fresh, machine.apply_entry(entry), strict=True):
                if request_text is not None and result.ok:
                    applied.append(request_text)
            if entry.index == digest_index:
                digests[entry.index] = machine.digest()
        digests[machine.applied_index] = machine.digest()
        return NodeState(
            term=hard_state.term,
            commit=hard_state.commit,
            snapshot_index=start,
            committed=committed,
            applied_requests=applied,
            digest_at=digests,
            member_id=member_key(data_dir, 0) or None,
        )
    finally:
        storage.close()


def read_hard_state(data_dir: Path) -> tuple[int, int] | None:
    """(term, commit) persisted in a stopped node's directory; None if it cannot be opened
    or is gone (a wiped node's: opening storage there would create an empty log in it)."""
    if not data_dir.is_dir():
        return None
    try:
        storage = DiskStorage(data_dir)
    except (CorruptionError, StorageError, OSError) as exc:
        logger.info("event=hard_state_unreadable dir=%s error=%s", data_dir, exc)
        return None
    try:
        return storage.hard_state.term, storage.hard_state.commit
    finally:
        storage.close()


def member_key(data_dir: Path, slot: int) -> int:
    """Whose observations a node's (term, commit) belong to: the member id its data directory
    holds (a wiped slot comes back as a new member, whose term and commit start afresh), or
    the slot when it holds none."""
    try:
        identity = read_identity(data_dir)
    except CorruptionError:
        return slot
    return identity.member_id if identity is not None else slot


# --- the drill -------------------------------------------------------------------------------


# How often the progress task looks at the timeline for faults injected, healed or recovered.
_WATCH_TICK_S = 0.25


@dataclass(slots=True)
class _Watched:
    """What the progress task has already told the observer, and the outcomes counted."""

    events: dict[int, set[str]] = field(default_factory=dict)
    last_progress_s: float = 0.0
    counted: int = 0
    ok: int = 0
    failed: int = 0
    unknown: int = 0


class Drill:
    def __init__(
        self,
        config: DrillConfig,
        clock: Callable[[], float] = time.monotonic,
        observer: DrillObserver | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.observer = observer
        self.rng = random.Random(config.seed)
        if config.base_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix=f"kvstore-chaos-{config.seed}-"))
        else:
            self.run_dir = Path(config.base_dir)
            if self.run_dir.exists() and any(self.run_dir.iterdir()):
                # Data left by an earlier run would be read back as if written by this one.
                raise ValueError(f"the run folder {self.run_dir} is not empty")
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = clock()
        # Set when the workload starts (now_s time); the fault window is measured from it.
        self.workload_started_s = 0.0
        self._watched = _Watched()
        # (term, commit) seen of each member, by member id (`member_key`), in order.
        self.hard_states: dict[int, list[tuple[int, int]]] = {}
        self.report = DrillReport(config=config, run_dir=self.run_dir)
        # The root token of a secure drill ("" otherwise): every client of the drill uses it.
        self.token = secrets.token_urlsafe(24) if config.secure else ""

    def now_s(self) -> float:
        return self._clock() - self.started_at

    def fault_window_end_s(self) -> float:
        """When the last fault may start, in `now_s` time: the duration counts from the
        workload's start, so a slow start (three processes on a loaded machine can take
        seconds) does not eat the warm-up and leave a short drill without a single fault."""
        return self.workload_started_s + self.config.duration_s - self.config.tail_s

    def observe_down(self, node: int) -> None:
        """Record the persisted (term, commit) of a stopped node, before it restarts."""
        data_dir = self.cluster.data_dir(node)
        observed = read_hard_state(data_dir)
        if observed is not None:
            self.hard_states.setdefault(member_key(data_dir, node), []).append(observed)

    def _client_config(self, timeout_s: float) -> ClientConfig:
        return ClientConfig(timeout_s=timeout_s, ca_file=self.cluster.ca_file, token=self.token)

    def node_args(self) -> list[str]:
        """Arguments every node of the drill gets besides its address and data."""
        extra = list(self.config.node_args)
        if self.config.workload == "watch":
            # The checker reads the whole history since the watchers started at the end: a
            # 120 s drill writes more revisions than the default bound keeps.
            extra += ["--history-revisions-max", str(WATCH_DRILL_HISTORY_REVISIONS)]
        return extra

    async def stop_workload(
        self, workload: Workload, workload_task: asyncio.Task[None], timeout_s: float = 15.0
    ) -> None:
        """Ask the workload to stop; cancel it if it has not within `timeout_s`; raise what
        it raised."""
        workload.stop()
        # Shielded: on a timeout wait_for would cancel the task itself, and a cancelled task
        # has no exception() to ask for (it raises CancelledError).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(workload_task), timeout=timeout_s)
        if not workload_task.done():
            logger.warning("event=workload_not_stopped seconds=%g: cancelled", timeout_s)
            workload_task.cancel()
            await asyncio.gather(workload_task, return_exceptions=True)
        elif workload_task.exception() is not None:
            raise workload_task.exception()  # type: ignore[misc]

    async def run(self) -> DrillReport:
        config = self.config
        peer_ports = {node: free_port() for node in (1, 2, 3)}
        self.mesh = ProxyMesh({n: ("127.0.0.1", p) for n, p in peer_ports.items()}, self.rng)
        await self.mesh.start()
        extra = self.node_args()
        if config.unsafe_local_reads:
            extra += ["--unsafe-local-reads", "true"]
        if config.secure:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            root_file = self.run_dir / "root.token"
            root_file.write_text(self.token + "\n")
            extra += ["--auth", "true", "--auth-root-token-file", str(root_file)]
        self.cluster = LocalCluster(
            self.run_dir,
            3,
            tls=config.secure,
            extra_args=extra,
            peer_ports=[peer_ports[n] for n in (1, 2, 3)],
            peer_addresses=self.mesh.dial_addresses(),
        )
        try:
            self._say(f"starting three nodes under {self.run_dir}")
            await asyncio.to_thread(self.cluster.start)
            leader = await asyncio.to_thread(self.cluster.wait_for_leader, 20.0)
            self._say(
                f"leader is node {leader}; {config.workload} workload with {config.processes} "
                f"processes, faults from {config.faults} after {config.warmup_s:g} s"
            )
            workload = Workload(
                self.cluster.client_urls,
                WorkloadConfig(
                    kind=config.workload,
                    processes=config.processes,
                    ca_file=self.cluster.ca_file,
                    token=self.token,
                ),
                random.Random(self.rng.getrandbits(64)),
            )
            self.workload = workload
            recorder = None
            if config.workload == "watch":
                recorder = WatchRecorder(
                    self.cluster.client_urls,
                    random.Random(self.rng.getrandbits(64)),
                    self._client_config(10.0),
                )
                await recorder.start()
            self.workload_started_s = self.now_s()
            workload_task = asyncio.create_task(workload.run(), name="workload")
            nemesis = Nemesis(
                self.cluster,
                self.mesh,
                random.Random(self.rng.getrandbits(64)),
                self.started_at,
                clock=self._clock,
                observe_down=self.observe_down,
            )
            watcher = asyncio.create_task(self._watch(nemesis, workload), name="drill-progress")
            try:
                await self._fault_cycles(nemesis, workload_task)
            finally:
                watcher.cancel()
            self._observe(nemesis, workload, final=True)
            self._say("stopping the workload, healing everything")
            await self.stop_workload(workload, workload_task)
            self.report.timeline = nemesis.timeline
            self._say("waiting for every node to apply what the leader committed")
            converged = await self._converge()
            self._say(f"reading the final value of {len(workload.keys_used)} key(s)")
            final = await self._final_reads(workload)
            coordination = await self._coordination_check(workload, recorder)
            await asyncio.to_thread(self.cluster.stop)
            self._say(
                f"checking {len(workload.history.operations)} operation(s) and the nodes' "
                "data directories"
            )
            self._check(workload, final, converged)
            if coordination is not None:
                self.report.checks.append(coordination)
        finally:
            await asyncio.to_thread(self.cluster.stop)
            await self.mesh.close()
        return self.report

    async def _coordination_check(
        self, workload: Workload, recorder: WatchRecorder | None
    ) -> CheckOutcome | None:
        """The watch workload's and the lock workload's own checks (chaos/coordination.py)."""
        started = time.monotonic()
        if recorder is not None:
            self._say("letting the watchers catch up and reading the history")
            ok, detail = await recorder.finish()
            return CheckOutcome("watch", ok, detail, time.monotonic() - started)
        if workload.lock is not None:
            ok, detail = workload.lock.check()
            return CheckOutcome("lock", ok, detail, time.monotonic() - started)
        return None

    # --- progress: read-only, beside the fault schedule -------------------------------------

    def _say(self, message: str) -> None:
        if self.observer is not None:
            self.observer.event(self.now_s(), message)

    async def _watch(self, nemesis: Nemesis, workload: Workload) -> None:
        """Tell the observer about faults as they happen and where the run stands."""
        if self.observer is None:
            return
        while True:
            await asyncio.sleep(_WATCH_TICK_S)
            self._observe(nemesis, workload)

    def _observe(self, nemesis: Nemesis, workload: Workload, final: bool = False) -> None:
        observer = self.observer
        if observer is None:
            return
        watched = self._watched
        for index, event in enumerate(nemesis.timeline):
            said = watched.events.setdefault(index, set())
            nodes = f"node{'s' if len(event.targets) > 1 else ''} " + ", ".join(
                map(str, event.targets)
            )
            if "injected" not in said:
                said.add("injected")
                observer.event(event.injected_at_s, f"injected {event.name} on {nodes}")
            if event.healed_at_s is not None and "healed" not in said:
                said.add("healed")
                effect = "it took effect" if event.took_effect else "it DID NOT take effect"
                observer.event(event.healed_at_s, f"healed {event.name} on {nodes}; {effect}")
            recovered_at_s, recovery_s = event.recovered_at_s, event.recovery_s
            if recovered_at_s is not None and recovery_s is not None and "recovered" not in said:
                said.add("recovered")
                observer.event(
                    recovered_at_s,
                    f"recovered: a write acknowledged {recovery_s * 1000:.0f} ms after the heal",
                )
        now = self.now_s()
        if not final and now - watched.last_progress_s < observer.interval_s:
            return
        watched.last_progress_s = now
        operations = workload.history.operations
        for operation in operations[watched.counted :]:
            if operation["return"] is None:
                watched.unknown += 1
            elif operation["ok"]:
                watched.ok += 1
            else:
                watched.failed += 1
        watched.counted = len(operations)
        ok, failed, unknown = watched.ok, watched.failed, watched.unknown
        if self.config.workload == "counter":
            ok, unknown = workload.tally.acknowledged, workload.tally.unknown
        in_force = tuple(
            f"{e.name} {','.join(map(str, e.targets))}"
            for e in nemesis.timeline
            if e.healed_at_s is None
        )
        observer.progress(DrillProgress(now, self.config.duration_s, ok, failed, unknown, in_force))

    async def _fault_cycles(self, nemesis: Nemesis, workload_task: asyncio.Task[None]) -> None:
        config = self.config
        faults = expand_faults(config.faults)
        await asyncio.sleep(config.warmup_s)
        end_s = self.fault_window_end_s()
        async with Client(self.cluster.client_urls, config=self._client_config(2.0)) as probe:
            while self.now_s() < end_s and not workload_task.done():
                name = self.rng.choice(faults)
                event = await nemesis.inject(name)
                hold = self.rng.uniform(*config.fault_s)
                await asyncio.sleep(max(0.0, min(hold, end_s - self.now_s())))
                await nemesis.heal(event)
                deadline = self._clock() + config.recovery_timeout_s
                sequence = 0
                while self._clock() < deadline:
                    sequence += 1
                    try:
                        await probe.put("chaos-probe", f"{name}-{sequence}")
                    except KVStoreError:
                        continue
                    event.recovered_at_s = self.now_s()
                    break
                if event.recovered_at_s is None:
                    logger.warning("event=not_recovered fault=%s", name)
                    return
                await asyncio.sleep(self.rng.uniform(*config.calm_s))

    async def _converge(self) -> bool:
        """Every node up and applied up to the leader's commit index."""
        cluster = self.cluster

        def converged() -> bool:
            statuses = [cluster.status(node, timeout_s=1.0) for node in cluster.ids]
            if any(status is None for status in statuses):
                return False
            leaders = [s for s in statuses if s is not None and s.get("role") == "leader"]
            if len(leaders) != 1:
                return False
            commit = int(leaders[0]["commit_index"])
            return all(s is not None and int(s["applied_index"]) >= commit for s in statuses)

        try:
            await asyncio.to_thread(cluster.wait_until, converged, 30.0, "convergence")
        except TimeoutError:
            return False
        return True

    async def _final_reads(self, workload: Workload) -> dict[str, str | None]:
        """The final value of every key the workload touched, read linearizably; register
        reads also go into the history as ordinary reads."""
        final: dict[str, str | None] = {}
        history = workload.history
        config = self._client_config(10.0)
        async with Client(self.cluster.client_urls, config=config) as client:
            for key in sorted(workload.keys_used):
                process = history.new_process()
                invoke = time.monotonic_ns()
                try:
                    value: str | None = (await client.get(key)).value.decode()
                except NotFoundError:
                    value = None
                except KVStoreError as exc:
                    logger.warning("event=final_read_failed key=%s error=%s", key, exc)
                    continue
                final[key] = value
                if self.config.workload in ("register", "watch", "lock"):
                    history.record(
                        {
                            "process": process,
                            "op": "get",
                            "key": key,
                            "value": None,
                            "expected": None,
                            "invoke": invoke,
                            "return": time.monotonic_ns(),
                            "ok": True,
                            "output": value,
                        }
                    )
        return final

    # --- verdict ---------------------------------------------------------------------------

    def _check(self, workload: Workload, final: dict[str, str | None], converged: bool) -> None:
        """The verdict: one CheckOutcome per checker, in the order the report lists them."""
        report = self.report
        history = [Operation.from_json(op) for op in workload.history.operations]
        report.counts = workload.history.counts()
        report.checks.append(self._check_linearizability(history))
        report.checks.append(self._check_lost_writes(history, final))
        node_states, unreadable = self._node_states()
        report.checks.append(self._check_exactly_once(workload, final, node_states))
        report.checks.append(self._check_invariants(node_states, unreadable, converged))
        report.checks.append(self._check_activity(workload))
        self._node_state_cache = node_states

    def _check_linearizability(self, history: list[Operation]) -> CheckOutcome:
        started = time.monotonic()
        linear = check_linearizability(
            history, deadline=deadline_after(time.monotonic, self.config.checker_budget_s)
        )
        return CheckOutcome(
            "linearizability", linear.ok, _first_line(linear.describe()),
            time.monotonic() - started,
        )  # fmt: skip

    def _check_lost_writes(
        self, history: list[Operation], final: dict[str, str | None]
    ) -> CheckOutcome:
        """Every acknowledged write is visible; for `append`, also in the final reads of the
        lists (a lost append shows only there)."""
        started = time.monotonic()
        if self.config.workload == "append":
            lost = check_lost_writes(
                history, final_reads={k: v for k, v in final.items() if k.startswith("list-")}
            )
        else:
            lost = check_lost_writes(history)
        return CheckOutcome(
            "lost writes", lost.ok, _first_line(lost.describe()), time.monotonic() - started
        )

    def _check_exactly_once(
        self, workload: Workload, final: dict[str, str | None], node_states: dict[int, NodeState]
    ) -> CheckOutcome:
        """No request applied twice on any node; for `counter`, the final value against the
        acknowledged and unknown increments, and the retry storm's duplicates answered alike."""
        started = time.monotonic()
        tally = workload.tally
        counter = None
        if self.config.workload == "counter":
            text = final.get("counter")
            counter = check_counter(
                int(text) if text else 0, acknowledged=tally.acknowledged, unknown=tally.unknown
            )
        once = check_exactly_once(
            {node: state.applied_requests for node, state in node_states.items()}, counter=counter
        )
        detail = _first_line(once.describe())
        if counter is not None:
            detail += "; " + counter.describe()
        if self.config.workload == "counter":
            detail += (
                f"; retry storm: {tally.storm_duplicates_sent} duplicates answered, "
                f"{len(tally.storm_mismatches)} answered differently"
            )
            if tally.storm_mismatches:
                detail += f" (first: {tally.storm_mismatches[0]})"
        ok = once.ok and not tally.storm_mismatches
        return CheckOutcome("exactly once", ok, detail, time.monotonic() - started)

    def _check_invariants(
        self, node_states: dict[int, NodeState], unreadable: dict[int, str], converged: bool
    ) -> CheckOutcome:
        """The cluster invariants over every node's log, digests and hard states so far; the
        nodes must also have converged and every data directory be readable."""
        for node, state in node_states.items():
            key = state.member_id or node
            self.hard_states.setdefault(key, []).append((state.term, state.commit))
        common = min((s.commit for s in node_states.values()), default=0)
        digests = {
            node: [(index, digest) for index, digest in state.digest_at.items()]
            for node, state in node_states.items()
        }
        invariants = check_cluster_invariants(
            committed={node: state.committed for node, state in node_states.items()},
            applied=digests,
            hard_states=self.hard_states,
        )
        problems = [] if converged else ["the nodes did not converge within 30 s after healing"]
        problems += [f"node {n} unreadable: {why}" for n, why in unreadable.items()]
        return CheckOutcome(
            "invariants",
            invariants.ok and not problems,
            "; ".join([_first_line(invariants.describe()), *problems])
            + f"; common commit index {common}",
        )

    def _check_activity(self, workload: Workload) -> CheckOutcome:
        """The drill tested something: enough operations acknowledged, and every fault took
        effect, was handled (disk faults) and was followed by an acknowledged write."""
        config = self.config
        ok_operations = self.report.counts.get("ok", 0)
        if config.workload == "counter":
            ok_operations = workload.tally.acknowledged
        # A lock holder's turn (grant, queue, write, revoke) is several round trips.
        per_s = 1.0 if config.workload == "lock" else config.min_ok_per_s
        needed = int(per_s * config.duration_s)
        events = self.report.timeline
        ineffective = [e.name for e in events if not e.took_effect]
        mishandled = [e.name for e in events if e.disk_outcome_ok is False]
        unrecovered = [e.name for e in events if e.recovered_at_s is None]
        activity: list[str] = []
        if ok_operations < needed:
            activity.append(f"only {ok_operations} operations acknowledged (< {needed})")
        if not events:
            activity.append("no fault was injected")
        if ineffective:
            activity.append(f"faults that did not take effect: {', '.join(ineffective)}")
        if mishandled:
            activity.append(f"disk faults mishandled by the node: {', '.join(mishandled)}")
        if unrecovered:
            activity.append(f"no write acknowledged after healing: {', '.join(unrecovered)}")
        return CheckOutcome(
            "activity",
            not activity,
            "; ".join(activity)
            or f"{ok_operations} operations acknowledged, {len(events)} faults took effect",
        )

    def _node_states(self) -> tuple[dict[int, NodeState], dict[int, str]]:
        first_pass: dict[int, NodeState] = {}
        unreadable: dict[int, str] = {}
        for node in self.cluster.ids:
            try:
                first_pass[node] = read_node_state(self.cluster.data_dir(node))
            except (KVStoreError, OSError, ValueError) as exc:
                unreadable[node] = str(exc)
        if not first_pass:
            return first_pass, unreadable
        # Digests are compared at equal applied indexes: replay once more to a common index.
        common = min(state.commit for state in first_pass.values())
        states: dict[int, NodeState] = {}
        for node in first_pass:
            states[node] = read_node_state(self.cluster.data_dir(node), digest_index=common)
        return states, unreadable

    # --- artifacts -------------------------------------------------------------------------

    def save_artifacts(self, workload_history: list[dict[str, Any]]) -> None:
        run_dir = self.run_dir
        write_history(
            run_dir / "history.jsonl", [Operation.from_json(op) for op in workload_history]
        )
        (run_dir / "timeline.json").write_text(
            json.dumps([event.to_json() for event in self.report.timeline], indent=2)
        )
        (run_dir / "report.json").write_text(json.dumps(self.report.to_json(), indent=2))


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


async def run_drill(config: DrillConfig, observer: DrillObserver | None = None) -> DrillReport:
    """Run one drill; keep its folder when it failed or `config.keep`, else remove it.
    `observer`, when given, hears the drill's progress while it runs."""
    started = time.monotonic()
    drill = Drill(config, observer=observer)
    try:
        report = await drill.run()
    except BaseException:
        logger.error("event=drill_aborted run_dir=%s", drill.run_dir)
        raise
    report.wall_s = time.monotonic() - started
    if report.ok and not config.keep:
        shutil.rmtree(drill.run_dir, ignore_errors=True)
        return report
    report.kept = True
    operations = drill.workload.history.operations
    drill.save_artifacts(operations)
    if config.plot:
        from kvstore.chaos.plot import plot_run

        plot_run(drill.run_dir / "plot.png", operations, report, drill.started_at)
    return report
