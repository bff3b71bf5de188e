"""Running seeds: one run's end-of-run checks, many runs, and the one-line summary.

`run_seed(seed)` never raises for a failure of the system under test: an exception escaping
the core (an assertion in our own code) is reported as a violation of its seed, so a sweep
over thousands of seeds always finishes and prints every failing seed with its replay
command. End-of-run checks add the full pairwise log matching check, read freshness and the
linearizability of the clients' history (kvstore.verify, with a step budget instead of a
clock so it stays deterministic).
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kvstore.sim.cluster import Simulation
from kvstore.sim.invariants import Invariant, Violation, check_log_matching, check_reads
from kvstore.verify.linearizability import Verdict, check_linearizability

# Search steps the linearizability check may take per run (deterministic, no clock).
LINEARIZABILITY_STEP_BUDGET = 1_000_000


@dataclass(frozen=True, slots=True)
class SimResult:
    seed: int
    trace_hash: str
    violations: tuple[str, ...]
    liveness_failure: str | None
    ticks: int
    time: int
    committed: int
    events: int
    # How much of each thing happened (crashes, snapshots delivered, elections won, ...).
    counters: tuple[tuple[str, int], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations and self.liveness_failure is None


def replay_command(seed: int) -> str:
    return f"python -m kvstore.sim --seed {seed}"


def final_checks(simulation: Simulation) -> SimResult:
    """Checks that need the whole run, then the run's result."""
    now = simulation.now
    violations = list(simulation.checker.violations)
    if not violations:
        logs = {node.id: node.log for node in simulation.all_nodes()}
        violations.extend(check_log_matching(logs, now))
        violations.extend(_check_history(simulation, now))
        if simulation.coordination is not None:
            violations.extend(simulation.coordination.check_watchers(now))
    liveness_failure = None
    if simulation.config.liveness and not violations and not simulation.liveness_ok:
        leader = simulation.leader()
        liveness_failure = (
            f"no write committed within {simulation.config.liveness_bound} time units after "
            f"healing at t={simulation.config.fault_time} "
            f"(leader: {'none' if leader is None else f'n{leader.id} t{leader.term}'})"
        )
    simulation.trace(f"end violations={len(violations)} live={simulation.liveness_ok}")
    return SimResult(
        seed=simulation.seed,
        trace_hash=simulation.trace_hash(),
        violations=tuple(str(v) for v in violations),
        liveness_failure=liveness_failure,
        ticks=simulation.ticks,
        time=now,
        committed=simulation.checker.committed_count(),
        events=simulation.events,
        counters=_counters(simulation),
    )


def _counters(simulation: Simulation) -> tuple[tuple[str, int], ...]:
    counters = simulation.counters.copy()
    network = simulation.network.stats()
    counters["compactions_refused"] = sum(
        node.storage.compactions_refused for node in simulation.all_nodes()
    )
    counters["messages_sent"] = network.sent
    counters["messages_dropped"] = network.dropped
    counters["messages_duplicated"] = network.duplicated
    stats = simulation.workload.stats
    counters["writes_acked"] = stats.writes_acked
    counters["writes_unknown"] = stats.writes_unknown
    counters["reads_ok"] = stats.reads_ok
    return tuple(sorted(counters.items()))


def _check_history(simulation: Simulation, now: int) -> list[Violation]:
    workload = simulation.workload
    reads = workload.read_records()
    violations = check_reads(reads, workload.write_records(), now)
    for read in reads:
        if read.value_index < 0:
            violations.append(
                Violation(
                    Invariant.READ_FRESHNESS,
                    now,
                    f"read of {read.key!r} returned a value no node ever applied",
                )
            )
    for value, first, second in workload.duplicate_applies:
        violations.append(
            Violation(
                Invariant.STATE_MACHINE_SAFETY,
                now,
                f"write {value!r} proposed once was applied at indexes {first} and {second}",
            )
        )
    result = check_linearizability(workload.history, max_steps=LINEARIZABILITY_STEP_BUDGET)
    if result.verdict is Verdict.VIOLATION:
        violations.append(Violation(Invariant.LINEARIZABILITY, now, result.describe()))
    elif result.verdict is Verdict.TIMED_OUT:
        # Out of search budget: not a verdict either way; counted so it cannot hide.
        simulation.counters["linearizability_timed_out"] += 1
    return violations


def run_seed(
    seed: int,
    overrides: Mapping[str, object] | None = None,
    *,
    trace_to: Callable[[str], None] | None = None,
) -> SimResult:
    """One run; failures are reported in the result, never raised. With `trace_to`, the
    readable trace is handed over line by line at the end."""
    simulation: Simulation | None = None
    try:
        simulation = Simulation(seed, record_trace=trace_to is not None, **(overrides or {}))
        simulation.run()
        result = final_checks(simulation)
        _emit_trace(simulation, trace_to)
        return result
    except Exception as exc:  # a crash of the code under test is a finding
        if simulation is not None:
            _emit_trace(simulation, trace_to)
        where = "".join(traceback.format_exception(exc)).strip().splitlines()[-16:]
        return SimResult(
            seed=seed,
            trace_hash="" if simulation is None else simulation.trace_hash(),
            violations=(
                f"exception at t={0 if simulation is None else simulation.now}: "
                f"{type(exc).__name__}: {exc}\n{chr(10).join(where)}",
            ),
            liveness_failure=None,
            ticks=0 if simulation is None else simulation.ticks,
            time=0 if simulation is None else simulation.now,
            committed=0,
            events=0 if simulation is None else simulation.events,
        )


def _emit_trace(simulation: Simulation, trace_to: Callable[[str], None] | None) -> None:
    if trace_to is not None and simulation.trace_lines is not None:
        for line in simulation.trace_lines:
            trace_to(line.rstrip("\n"))


@dataclass(slots=True)
class Summary:
    seeds: int = 0
    violations: int = 0
    liveness_failures: int = 0
    ticks: int = 0
    failures: list[SimResult] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)

    def add(self, result: SimResult) -> None:
        self.seeds += 1
        self.ticks += result.ticks
        self.counters.update(dict(result.counters))
        if result.violations:
            self.violations += 1
        elif result.liveness_failure is not None:
            self.liveness_failures += 1
        if not result.ok:
            self.failures.append(result)

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self, seconds: float | None = None) -> str:
        text = (
            f"{self.seeds} seeds, {self.violations} violations, "
            f"{self.liveness_failures} liveness failures, {self.ticks} ticks simulated"
        )
        if seconds is not None and seconds > 0:
            text += f", {self.ticks / seconds:.0f} simulated ticks/s ({seconds:.1f} s CPU)"
        unchecked = self.counters["linearizability_timed_out"]
        if unchecked:
            text += f", {unchecked} histories too long to check for linearizability"
        return text


def run_seeds(
    seeds: Iterable[int],
    *,
    stop_at_first_failure: bool = False,
    on_result: Callable[[SimResult], None] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Summary:
    summary = Summary()
    for seed in seeds:
        result = run_seed(seed, overrides)
        summary.add(result)
        if on_result is not None:
            on_result(result)
        if stop_at_first_failure and not result.ok:
            break
    return summary


def describe_failure(result: SimResult) -> str:
    lines = [f"seed {result.seed} FAILED (replay: {replay_command(result.seed)})"]
    lines.extend(f"  violation: {v}" for v in result.violations)
    if result.liveness_failure is not None:
        lines.append(f"  liveness: {result.liveness_failure}")
    return "\n".join(lines)
