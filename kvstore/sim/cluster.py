"""A simulated cluster: N nodes of the real core, a faulty network, clients, and a clock.

`Simulation(seed)` derives everything from one `random.Random(seed)`: the run's parameters
(cluster size, tick rates, network quality, snapshot policy), each node's core RNG, the
network's decisions, the faults and the clients. Time is virtual and jumps from one event to
the next (a node's tick, a message delivery, a fault, a client action), so a run does no
waiting and replays exactly; every event goes into a sha256 trace hash.

One step: deliver due messages, tick due nodes, run due faults and client actions (the
writes proposed on one node between two of its ticks go in one batch entry, as the server's
driver proposes the writes of one turn; now and then one of them twice, as a client's retry racing
its first attempt would), then process every node's Ready (persist, send, apply, advance) and feed what happened to the
`SafetyChecker`. The run has a fault period followed, in liveness mode, by a healed period
in which a leader must appear and a newly proposed write must commit within a bound.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from kvstore.codec import decode_message, encode_message
from kvstore.errors import RaftError
from kvstore.keepalive import KeepalivePolicy
from kvstore.kv.commands import Put, RequestId, decode_commands, encode_batch, encode_command
from kvstore.raft.config import RaftConfig
from kvstore.raft.types import Entry, EntryType, Message, MessageType, ReadState, Ready, Role
from kvstore.replica import SnapshotJob
from kvstore.sim.coordination import CoordinationWorkload
from kvstore.sim.coordination import kv_config as coordination_kv_config
from kvstore.sim.faults import Nemesis
from kvstore.sim.invariants import SafetyChecker
from kvstore.sim.membership import Operator, stored_conf_state
from kvstore.sim.network import Network, NetworkConfig
from kvstore.sim.node import CrashStage, SimNode
from kvstore.sim.workload import Workload, WorkloadConfig

LIVENESS_KEY = "__liveness__"
# Every this many batches of writes, one write goes into its batch twice.
_DUPLICATE_EVERY = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """The parameters of one run; `SimConfig.draw(rng)` picks them from the seed."""

    nodes: int = 3
    fault_time: int = 10_000
    liveness: bool = True
    # After healing: a leader and a new committed write within this many time units.
    liveness_bound: int = 3000
    tick_period_min: int = 8
    tick_period_max: int = 12
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    max_size_per_message_bytes: int = 256
    max_inflight_messages: int = 4
    snapshot_interval_min: int = 15
    snapshot_interval_max: int = 60
    network: NetworkConfig = field(default_factory=NetworkConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    fault_gap_min: int = 20
    fault_gap_max: int = 250
    # Keepalives during one hung save stop after this many election timeouts (the server's
    # policy, kvstore.keepalive: 1); None sends them for as long as the save hangs, as the
    # server did before issue 12 (for the test that shows why the bound is needed).
    keepalive_limit_elections: float | None = 1.0
    # The nemesis also changes the membership: grows the cluster by a learner it then
    # promotes, removes members, and replaces nodes whose disk it wipes (kvstore.sim.membership).
    # Not together with `coordination`, whose workload assumes the initial nodes.
    membership: bool = True
    # Nodes a run may ever create (the initial ones included): bounds the growth.
    nodes_max: int = 9
    # Transactions, watchers and leases beside the register workload (kvstore/sim/
    # coordination.py); off by default so that the seeds of other tests replay unchanged.
    coordination: bool = False

    @staticmethod
    def draw(rng: random.Random, **overrides: object) -> SimConfig:
        """Parameters for one run. Small message size limits split appends into one or two
        entries, so a new leader replicates old-term entries separately from its own: the
        window in which the commit rule of Raft §5.4.2 matters (Figure 8)."""
        network = NetworkConfig(
            delay_min=1,
            delay_max=rng.choice((5, 10, 20, 30)),
            drop_probability=rng.choice((0.0, 0.01, 0.05, 0.1)),
            duplicate_probability=rng.choice((0.0, 0.02, 0.05)),
        )
        config = SimConfig(
            nodes=rng.choice((3, 3, 5)),
            tick_period_min=rng.choice((6, 8, 10)),
            tick_period_max=rng.choice((10, 12, 16)),
            max_size_per_message_bytes=rng.choice((40, 64, 256, 1 << 20)),
            max_inflight_messages=rng.choice((2, 4, 256)),
            snapshot_interval_min=rng.choice((3, 5, 15)),
            snapshot_interval_max=rng.choice((10, 30, 60)),
            network=network,
            workload=WorkloadConfig(clients=rng.randint(2, 4), keys=rng.randint(1, 4)),
            fault_gap_max=rng.choice((60, 100, 250, 500)),
        )
        return replace(config, **overrides)  # type: ignore[arg-type]


class Simulation:
    """One seeded run; see the module docstring."""

    def __init__(self, seed: int, *, record_trace: bool = False, **overrides: object) -> None:
        self.seed = seed
        # The readable trace (only when asked for: `python -m kvstore.sim --seed N --trace`).
        self.trace_lines: list[str] | None = [] if record_trace else None
        self.rng = random.Random(seed)
        self.config = SimConfig.draw(self.rng, **overrides)
        self.now = 0
        self.ticks = 0
        self.events = 0
        self.counters: Counter[str] = Counter()
        # The workload's writes of the current step, by node (`propose_write`).
        self._write_batches: dict[int, list[bytes]] = {}
        self._trace = hashlib.sha256()
        self._queue: list[tuple[int, int, str, Callable[[], None]]] = []
        self._sequence = 0
        ids = tuple(range(1, self.config.nodes + 1))
        self.network = Network(ids, self.config.network, random.Random(self.rng.getrandbits(64)))
        self.network.on_drop = self._on_drop
        # Snapshots delivered (`_snapshot_key`): a send of one of these again is a resend.
        self._snapshots_delivered: set[tuple[int, int, int, int, int]] = set()
        self.nodes = {i: self._make_node(i, ids) for i in ids}
        # Carries out the membership changes the nemesis plans (one at a time).
        self.operator = Operator(self)
        self.checker = SafetyChecker()
        self.workload = Workload(self.config.workload, ids, random.Random(self.rng.getrandbits(64)))
        self.nemesis = Nemesis(self, random.Random(self.rng.getrandbits(64)))
        # Its own generator, not drawn from self.rng: enabling it leaves the rest of a
        # seed's run as it was.
        self.coordination: CoordinationWorkload | None = None
        if self.config.coordination:
            coordination_rng = random.Random(seed * 1_000_003 + 14)
            self.coordination = CoordinationWorkload(ids, coordination_rng)
            config = coordination_kv_config(coordination_rng)
            for node in self.nodes.values():
                node.kv_config = config
        self.healed = False
        self._persisted = False
        self.liveness_ok = False
        self._marker: tuple[int, int, str] | None = None
        self._marker_count = 0
        for node in self.nodes.values():
            self.start_node(node)

    def _make_node(self, node_id: int, ids: tuple[int, ...]) -> SimNode:
        """A node of the bootstrap configuration `ids`, or (ids empty) one that joins."""
        c = self.config
        raft_config = RaftConfig(
            id=node_id,
            peers=ids,
            election_ticks=c.election_ticks,
            heartbeat_ticks=c.heartbeat_ticks,
            max_size_per_message_bytes=c.max_size_per_message_bytes,
            max_inflight_messages=c.max_inflight_messages,
        )
        node = SimNode(
            node_id, ids, raft_config, self.rng.randint(c.tick_period_min, c.tick_period_max)
        )
        node.snapshot_interval = self.rng.randint(
            c.snapshot_interval_min, max(c.snapshot_interval_min, c.snapshot_interval_max)
        )
        node.snapshot_keep = self.rng.randint(0, 3)
        return node

    # --- the trace and scheduled events --------------------------------------------------

    def trace(self, event: str) -> None:
        self.events += 1
        line = f"{self.now} {event}\n"
        self._trace.update(line.encode())
        if self.trace_lines is not None:
            self.trace_lines.append(line)

    def schedule(self, delay: int, name: str, action: Callable[[], None]) -> None:
        self._sequence += 1
        heapq.heappush(self._queue, (self.now + delay, self._sequence, name, action))

    # --- node lifecycle (used by the nemesis) ----------------------------------------------

    def add_node(self) -> SimNode:
        """A new node with a never-used id, empty storage and no configuration: it takes part
        only once the operator adds it as a learner."""
        node_id = max(self.nodes) + 1
        node = self._make_node(node_id, ())
        # The state machine's configuration must be the same on every replica.
        node.kv_config = self.nodes[min(self.nodes)].kv_config
        self.nodes[node_id] = node
        self.network.add_node(node_id)
        self.trace(f"new node n{node_id}")
        return node

    def wipe_node(self, node: SimNode) -> None:
        """The node's disk is lost: the process ends and its id never runs again."""
        if node.up:
            node.crash()
            self._after_crash(node)
        node.lost = True
        self.counters["disks_lost"] += 1
        self.trace(f"disk lost n{node.id}")

    def start_node(self, node: SimNode) -> None:
        if node.lost:
            return
        node.start(random.Random(self.rng.getrandbits(64)), self.now)
        snapshot = node.storage.snapshot().metadata.index
        self.checker.observe_restart(node.id, node.commit)
        self.checker.observe_restored(node.id, snapshot)
        self.trace(f"start n{node.id} inc{node.incarnation} commit{node.commit} snap{snapshot}")

    def crash_node(self, node: SimNode, stage: CrashStage) -> None:
        """Crash now, or at a stage of the node's next Ready in this step."""
        self.counters[f"crashes_{stage.value}"] += 1
        node.crash_stage = stage
        node.paused = False  # SIGKILL ends a stopped process too
        self.trace(f"crash n{node.id} {stage.value}")

    def pause_node(self, node: SimNode, duration: int) -> None:
        """Stop the process (SIGSTOP) for `duration`, then let it continue (SIGCONT)."""
        node.paused = True
        incarnation = node.incarnation
        self.trace(f"pause n{node.id} for {duration}")

        def resume() -> None:
            if node.paused and node.incarnation == incarnation:
                self.resume_node(node)

        self.schedule(duration, f"resume n{node.id}", resume)

    def hang_save(self, node: SimNode, duration: int) -> None:
        """The node's next save that must sync hangs for `duration` (a dying disk, an NFS
        stall); see `on_save_hung`."""
        node.hang_next_save = duration
        self.trace(f"hang next save n{node.id} for {duration}")

    def keepalive_policy(self, node: SimNode) -> KeepalivePolicy:
        """The server's keepalive policy in this node's virtual time."""
        c = self.config
        election = c.election_ticks * node.tick_period
        limit = c.keepalive_limit_elections
        return KeepalivePolicy.for_timeouts(
            c.heartbeat_ticks * node.tick_period,
            float("inf") if limit is None else limit * election,
        )

    def resume_node(self, node: SimNode) -> None:
        """SIGCONT: the client requests that queued up are handled first, before the peer
        messages that wait for the node (so a deposed leader that slept is asked to serve
        reads before it learns it was deposed)."""
        node.paused = False
        self._release_held(node)

    def _release_held(self, node: SimNode) -> None:
        node.next_tick = max(node.next_tick, self.now + 1)
        raw = node.raw
        assert raw is not None
        for kind, payload in node.held_requests:
            self.trace(f"held {kind} n{node.id}")
            try:
                raw.propose(payload)
            except RaftError:
                pass  # the client's request then times out
        node.held_requests.clear()

    def _after_crash(self, node: SimNode) -> None:
        self.trace(f"down n{node.id}")
        self.checker.observe_role(node.id, node.term, False, node.log)
        self.workload.on_crash(node.id, self.now)
        self.nemesis.on_crashed(node)

    def leader(self) -> SimNode | None:
        """The live node that believes it leads with the highest term, if any."""
        leaders = [n for n in self.nodes.values() if n.up and n.role is Role.LEADER]
        return max(leaders, key=lambda n: n.term) if leaders else None

    # --- the main loop -------------------------------------------------------------------

    def run(self) -> None:
        """Run to the end of the fault period and the liveness phase, or to the first
        violation; `kvstore.sim.runner.final_checks` then makes the result."""
        end = self.config.fault_time
        if self.config.liveness:
            end += self.config.liveness_bound
        self._run_to(end)
        self.workload.finish(self.now)

    def run_to(self, end: int) -> None:
        """Step through every event up to time `end` (or the first violation, or the
        liveness write's commit); the clock then reads `end` (tests step a run with this)."""
        self._run_to(end)
        if not self.checker.violations and not self.liveness_ok:
            self.now = max(self.now, end)

    def _run_to(self, end: int) -> None:
        while not self.checker.violations and not self.liveness_ok:
            next_time = self._next_time()
            if next_time is None or next_time > end:
                break
            self.now = next_time
            self._step()

    def run_until(self, condition: Callable[[], bool], time_limit: int) -> bool:
        """Step until `condition()` holds (True), or `time_limit` more time units pass or
        nothing is left to happen (False): pinned scenarios drive a run this way."""
        end = self.now + time_limit
        while not condition():
            next_time = self._next_time()
            if next_time is None or next_time > end:
                return False
            self.now = next_time
            self._step()
        return True

    def _next_time(self) -> int | None:
        times = [n.next_tick for n in self.nodes.values() if n.up and not n.stalled]
        delivery = self.network.next_delivery_time()
        if delivery is not None:
            times.append(delivery)
        if self._queue:
            times.append(self._queue[0][0])
        workload = self.workload.next_time()
        if workload is not None:
            times.append(workload)
        if self.coordination is not None and not self.healed:
            times.append(self.coordination.next_time())
        if not self.healed:
            times.append(self.config.fault_time)
        return max(min(times), self.now) if times else None

    def _step(self) -> None:
        if not self.healed and self.now >= self.config.fault_time:
            self._heal()
        self._deliver()
        self._tick()
        while self._queue and self._queue[0][0] <= self.now:
            _, _, name, action = heapq.heappop(self._queue)
            self.trace(name)
            action()
        for event in self.workload.act(self.now, self):
            self.trace(event)
        self.operator.act()
        coordination = self.coordination
        if coordination is not None and not self.healed:
            for event in coordination.act(self.now, self.nodes, self.propose, self.read_index):
                self.trace(event)
        if self.healed and self.config.liveness:
            self._drive_liveness()
        for node in self.nodes.values():
            self._process(node)
        if coordination is not None:
            for node in self.nodes.values():
                coordination.on_role(node, self.now)
            coordination.serve_keepalives(self.nodes, self.now)
            coordination.pull_watchers(self.nodes)
            self.checker.violations.extend(coordination.violations)
            coordination.violations.clear()
        if self._persisted:
            self._persisted = False
            self.checker.check_electability(
                {n.id: n.log for n in self.nodes.values() if not n.lost},
                {
                    n.id: stored_conf_state(n.storage, n.peers).voters
                    for n in self.nodes.values()
                    if not n.lost
                },
            )

    def _process(self, node: SimNode) -> None:
        if not node.up or (node.stalled and node.crash_stage is None):
            return
        node.process_ready(self, self.rng)
        if node.up and node.crash_stage is not None:
            node.crash()  # no Ready came to crash in the middle of: crash now
        if not node.up:
            self._after_crash(node)
            return
        self.workload.serve_reads(node.id, self.now, self)
        if self.coordination is not None:
            self.coordination.check_pairs(node, self.now)

    def _deliver(self) -> None:
        for message in self.network.deliver_due(self.now, self.is_up):
            node = self.nodes[message.to]
            if node.stalled:
                self.network.requeue(message, self.now + 1 + node.tick_period)
                continue
            raw = node.raw
            assert raw is not None
            outcome = "ok"
            if message.type is MessageType.SNAPSHOT:
                outcome = self.nemesis.snapshot_stream_outcome()
                if outcome == "cut":
                    self.counters["snapshot_streams_cut"] += 1
                    self.trace(f"snapshot stream cut {message.from_}>{message.to}")
                    self._report_snapshot(message, ok=False)
                    continue
            self.trace(
                f"deliver {message.type.name} {message.from_}>{message.to} t{message.term} "
                f"i{message.index} lt{message.log_term} n{len(message.entries)} "
                f"c{message.commit} r{int(message.reject)}"
            )
            raw.step(message)
            if message.type is MessageType.SNAPSHOT:
                self.counters["snapshots_delivered"] += 1
                if outcome == "ack_lost":
                    # Installed, but the leader hears the stream failed: sending it again
                    # is then a new need, not a resend (the leader could not know).
                    self.counters["snapshot_acks_lost"] += 1
                    self._report_snapshot(message, ok=False)
                    continue
                self._snapshots_delivered.add(self._snapshot_key(message))
                self._report_snapshot(message, ok=True)

    def _tick(self) -> None:
        for node in self.nodes.values():
            if node.up and not node.stalled and node.next_tick <= self.now:
                assert node.raw is not None
                self._propose_writes(node.id)
                node.raw.tick()
                node.next_tick = self.now + node.tick_period
                self.ticks += 1

    def _snapshot_key(self, message: Message) -> tuple[int, int, int, int, int]:
        """One need for a snapshot: which leader (and term) sends which snapshot to which
        incarnation of a follower."""
        assert message.snapshot is not None
        recipient = self.nodes[message.to].incarnation
        index = message.snapshot.metadata.index
        return (message.from_, message.term, message.to, recipient, index)

    def _count_snapshot_send(self, message: Message) -> None:
        """A snapshot goes to a follower once per need: sending one that the same
        incarnation of the follower already received from the same leader in the same term
        is counted as `snapshots_resent` (tests/sim assert there are none)."""
        self.counters["snapshots_sent"] += 1
        if self._snapshot_key(message) in self._snapshots_delivered:
            self.counters["snapshots_resent"] += 1

    def _on_drop(self, message: Message) -> None:
        if message.type is MessageType.SNAPSHOT:
            self._report_snapshot(message, ok=False)

    def _report_snapshot(self, message: Message, ok: bool) -> None:
        sender = self.nodes[message.from_]
        incarnation = sender.incarnation

        def report() -> None:
            if sender.raw is not None and sender.incarnation == incarnation:
                sender.raw.report_snapshot(message.to, ok)

        self.schedule(1, f"report_snapshot {message.from_}>{message.to} {ok}", report)

    # --- liveness ----------------------------------------------------------------------

    def _heal(self) -> None:
        self.healed = True
        self.trace("heal")
        self.nemesis.stop()
        self.network.heal()
        self.network.config = replace(
            self.network.config, drop_probability=0.0, duplicate_probability=0.0
        )
        for node in self.nodes.values():
            if not node.up:
                self.start_node(node)  # not a lost one
            elif node.paused:
                self.resume_node(node)

    def _drive_liveness(self) -> None:
        """Propose a marker write on the leader until one commits anywhere."""
        leader = self.leader()
        if leader is None or leader.raw is None:
            return
        if self._marker is not None and self._marker[:2] == (leader.id, leader.term):
            return
        self._marker_count += 1
        value = f"m{self._marker_count}"
        try:
            leader.raw.propose(self.encode_put(0, 0, LIVENESS_KEY, value))
        except RaftError:
            return
        self._marker = (leader.id, leader.term, value)
        self.trace(f"liveness propose n{leader.id} {value}")

    # --- NodeObserver ------------------------------------------------------------------

    def on_persisted(
        self, node: SimNode, ready: Ready, prev_term: int | None, role_changed: bool
    ) -> None:
        checker = self.checker
        checker.now = self.now
        self._persisted = True
        if ready.entries or ready.hard_state is not None:
            checker.observe_persisted(node.id, ready.hard_state, ready.entries, prev_term)
        if ready.soft_state is not None or ready.hard_state is not None:
            checker.observe_role(node.id, node.term, node.role is Role.LEADER, node.log)
            checker.observe_commit(node.id, node.term, node.commit, node.log)
            if node.role is Role.LEADER and node.raw is not None:
                checker.observe_leader_voters(node.id, node.term, node.raw.voters, node.commit)
        if role_changed:
            self.trace(f"role n{node.id} {node.role.value} t{node.term}")
            if node.role is Role.LEADER:
                self.counters["leaders_elected"] += 1

    def on_torn_save(self, node: SimNode, entries: Sequence[Entry], prev_term: int | None) -> None:
        self.checker.now = self.now
        self.checker.observe_persisted(node.id, None, entries, prev_term)
        self._persisted = True
        self.trace(f"torn save n{node.id} kept {len(entries)} entries")

    def on_send(self, node: SimNode, messages: Sequence[Message]) -> None:
        for message in messages:
            if message.type is MessageType.SNAPSHOT:
                self._count_snapshot_send(message)
            # Through the wire format, as the server's transport does.
            self.network.send(decode_message(encode_message(message)), self.now)

    def on_save_hung(self, node: SimNode, duration: int) -> None:
        """A save hangs: while it does, the node sends only the keepalives the policy
        allows (as the server's `StorageThread.run` does); then the save returns and the
        node goes on, client requests that reached it meanwhile first."""
        self.counters["saves_hung"] += 1
        self.trace(f"save hangs n{node.id} for {duration}")
        incarnation, since = node.incarnation, self.now
        policy = self.keepalive_policy(node)
        interval = max(1, int(policy.interval))

        def hanging() -> bool:
            return node.hung_ready is not None and node.incarnation == incarnation

        def keepalive() -> None:
            if not hanging() or not policy.allows(self.now - since):
                return
            self._send_keepalives(node)
            self.schedule(interval, f"keepalive n{node.id}", keepalive)

        def returned() -> None:
            if hanging():
                node.finish_hung_save(self, self.rng)
                if node.up:
                    self._release_held(node)

        self.schedule(interval, f"keepalive n{node.id}", keepalive)
        self.schedule(duration, f"save returns n{node.id}", returned)

    def _send_keepalives(self, node: SimNode) -> None:
        """The server's `StorageThread._send_keepalives`: a leader's heartbeats with commit
        0, only in a term that is already durable."""
        raw = node.raw
        assert raw is not None
        status = raw.status()
        if status.role is not Role.LEADER or node.storage.hard_state.term != status.term:
            return
        self.counters["keepalives"] += 1
        members = status.conf_state.voters + status.conf_state.learners
        self.on_send(
            node,
            [
                Message(type=MessageType.HEARTBEAT, to=peer, from_=node.id, term=status.term)
                for peer in members
                if peer != node.id
            ],
        )

    def on_restored(self, node: SimNode, index: int) -> None:
        self.checker.observe_restored(node.id, index)
        self.trace(f"restore n{node.id} {index}")

    def on_applied(self, node: SimNode, entry: Entry) -> None:
        assert node.machine is not None
        self.checker.observe_applied(node.id, entry)
        if entry.type is not EntryType.NORMAL:
            return  # a membership change: no client's write
        self.workload.on_applied(node.id, entry, self.now, self)
        if self.coordination is not None:
            self.coordination.on_applied(node, entry, self.now)
        if (
            self._marker is not None
            and self.healed
            and any(key == LIVENESS_KEY for key, _ in self.decode_puts(entry.data))
        ):
            self.liveness_ok = True

    def on_state(self, node: SimNode) -> None:
        machine = node.machine
        assert machine is not None
        self.checker.observe_state(node.id, machine.applied_index, machine.digest())

    def on_read_states(self, node: SimNode, read_states: Sequence[ReadState]) -> None:
        for read_state in read_states:
            self.workload.on_read_state(node.id, read_state)
        if self.coordination is not None:
            self.coordination.on_read_states(node, read_states, self.now)

    def on_snapshot_taken(self, node: SimNode, index: int) -> None:
        self.counters["snapshots_taken"] += 1
        self.trace(f"snapshot n{node.id} {index}")

    def on_snapshot_begun(self, node: SimNode, job: SnapshotJob) -> None:
        """The server encodes a snapshot on a thread of its own while turns go on: here its
        encoding finishes a few ticks later, as an event of its own, which a crash, a pause
        or a hung save may come before (the job then dies with the process, or waits)."""
        self.counters["snapshots_begun"] += 1
        self.trace(f"snapshot begun n{node.id} {job.index}")
        incarnation = node.incarnation

        def encoded() -> None:
            if node.snapshot_job is not job or node.incarnation != incarnation or not node.up:
                return  # the process died meanwhile: the job died with it
            if node.stalled:
                # The storage thread is busy with a hung save, or the process is frozen:
                # storing waits (as `SnapshotTender.tend` waits between two saves).
                self.schedule(node.tick_period, f"snapshot waits n{node.id}", encoded)
                return
            taken = node.complete_snapshot_job()
            if taken:
                self.on_snapshot_taken(node, taken)

        delay = self.rng.randint(1, 3 * node.tick_period)
        self.schedule(delay, f"snapshot encoded n{node.id}", encoded)

    # --- workload Target -------------------------------------------------------------------

    def is_up(self, node: int) -> bool:
        return self.nodes[node].up

    def leader_of(self, node: int) -> int:
        return self.nodes[node].leader_id if self.nodes[node].up else 0

    def propose(self, node: int, data: bytes) -> bool:
        raw = self.nodes[node].raw
        if raw is None:
            return False
        if self.nodes[node].stalled:
            self.nodes[node].held_requests.append(("propose", data))
            return True
        try:
            raw.propose(data)
        except RaftError:
            return False
        return True

    def propose_write(self, node: int, data: bytes) -> bool:
        """Propose a workload's put on `node`, batched with the others proposed on it until
        its next tick (`_propose_writes`), as the server's driver batches the writes of one
        turn; False when the node refused at once (down, or not the leader). A batch the
        core refuses later (it lost the leadership meanwhile) leaves its writes to time out."""
        sim_node = self.nodes[node]
        raw = sim_node.raw
        if raw is None or sim_node.stalled:
            return self.propose(node, data)
        if raw.status().role is not Role.LEADER:
            return False
        self._write_batches.setdefault(node, []).append(data)
        return True

    def _propose_writes(self, node: int) -> None:
        """Propose the writes waiting on `node` as one entry (one alone as itself)."""
        writes = self._write_batches.pop(node, None)
        raw = self.nodes[node].raw
        if writes and raw is not None:
            if len(writes) > 1:
                self.counters["write_batches"] += 1
                if self.counters["write_batches"] % _DUPLICATE_EVERY == 0:
                    writes.insert(1, writes[0])  # a retry in the same batch: applied once
                    self.counters["write_batch_duplicates"] += 1
            try:
                raw.propose(writes[0] if len(writes) == 1 else encode_batch(writes))
            except RaftError:
                self.trace(f"write batch refused n{node} {len(writes)}")

    def read_index(self, node: int) -> bytes | None:
        """The core's context for a new read on `node` (as the server's driver gets it), or
        None when it refused. A paused node's core is asked at once too (its context is
        needed now): its state cannot change until it resumes (no ticks, no messages, no
        Ready), so it answers as it would then, and what it sends waits for the resume."""
        raw = self.nodes[node].raw
        if raw is None:
            return None
        try:
            return raw.read_index()
        except RaftError:
            return None

    def applied_index(self, node: int) -> int:
        machine = self.nodes[node].machine
        return machine.applied_index if machine is not None else 0

    def read_value(self, node: int, key: str) -> str | None:
        machine = self.nodes[node].machine
        assert machine is not None
        found = machine.get(key)
        return None if found is None else found.value.decode()

    def encode_put(self, client: int, seq: int, key: str, value: str) -> bytes:
        """A kv Put with a request id (client 0: the liveness probe, without one). Its
        time is the simulated time, as the server uses its clock."""
        request = RequestId(f"c{client}", seq) if client else None
        return encode_command(Put(key, value.encode(), request, time_ms=self.now))

    def decode_puts(self, data: bytes) -> list[tuple[str, str]]:
        if not data:
            return []
        return [
            (command.key, command.value.decode())
            for command in decode_commands(data)
            if isinstance(command, Put)
        ]

    def live_nodes(self) -> list[SimNode]:
        return [node for node in self.nodes.values() if node.up]

    def all_nodes(self) -> list[SimNode]:
        return list(self.nodes.values())

    def trace_hash(self) -> str:
        return self._trace.hexdigest()


def node_ids(simulation: Simulation) -> list[int]:
    return sorted(simulation.nodes)


__all__ = ["SimConfig", "Simulation", "node_ids"]
