"""When to retry a call, how long to wait first, and which endpoints to skip: pure policy.

Nothing here does I/O, sleeps or reads a clock of its own: `RetryPolicy` and
`CircuitBreaker` take a clock (a `Callable[[], float]` of monotonic seconds) and a
`random.Random`, so the unit tests drive them with a fake clock and a seeded random source and
never sleep. The client (`kvstore.client.core`) asks the policy after every failed attempt
and does what the returned `Decision` says.

The rules, in order:
- a failure that cannot succeed on retry (400, 404, 412, 413, ...) ends the call;
- a not-leader answer with a hint is followed at once (no back-off), up to
  `immediate_redirects_max` hints in a row, after which hints are treated as stale;
- a node that did not answer (refused or reset connection, timeout) is left for another
  node at once, the first time in a row: a dead leader's in-flight calls move without a
  back-off; from the second such failure in a row on, it backs off like the rest;
- any other transient failure (503, 429, 504, no leader yet, a second dead node in a row)
  sleeps `uniform(0, min(cap, base * 2**n))` (full jitter, AWS architecture
  blog "Exponential Backoff and Jitter"), or the server's Retry-After if that is longer;
- the call stops when its attempts are used up, or when the next attempt could not start
  before the deadline.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.client.config import ClientConfig

Clock = Callable[[], float]

# Below this much time left, an attempt cannot do anything useful: give up instead.
_ATTEMPT_TIME_MIN_S = 0.001


class FailureKind(enum.Enum):
    """What an attempt's failure means for the next attempt."""

    # The node is not the leader and named one: go there at once.
    NOT_LEADER = "not_leader"
    # May succeed later or elsewhere: back off, then try again.
    TRANSIENT = "transient"
    # The node did not answer (refused, reset, timed out): another node at once, once in a
    # row; then as TRANSIENT.
    NODE_DOWN = "node_down"
    # Cannot succeed on retry: the call ends with this error.
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt, as the policy needs to see it."""

    kind: FailureKind
    reason: str
    # The server's Retry-After, in seconds, when it sent one.
    retry_after_s: float | None = None
    # Where the leader is, for NOT_LEADER.
    leader_url: str | None = None


class Verdict(enum.Enum):
    RETRY = "retry"
    GIVE_UP_PERMANENT = "permanent"
    GIVE_UP_ATTEMPTS = "attempts_exhausted"
    GIVE_UP_DEADLINE = "deadline_exceeded"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    # How long to sleep before the next attempt (0 for a hint followed at once).
    delay_s: float = 0.0

    @property
    def retry(self) -> bool:
        return self.verdict is Verdict.RETRY


class RetryPolicy:
    """Makes `CallBudget`s: the retry state of one call, bounded in attempts and time."""

    def __init__(self, config: ClientConfig, *, clock: Clock, rng: random.Random) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng

    def begin(self, timeout_s: float | None = None) -> CallBudget:
        """Start a call whose deadline is `timeout_s` (default: config.timeout_s) from now."""
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout!r}")
        return CallBudget(self, deadline=self.clock() + timeout)

    def backoff_s(self, backoff_number: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**n)] for the n-th back-off (n >= 0)."""
        # min() before the power would overflow for large n, so clamp the exponent first.
        exponent = min(backoff_number, 62)
        ceiling = min(self.config.backoff_cap_s, self.config.backoff_base_s * (2**exponent))
        return self.rng.uniform(0.0, ceiling)


class CallBudget:
    """The retry state of one call: attempts made, back-offs taken, and its deadline."""

    def __init__(self, policy: RetryPolicy, *, deadline: float) -> None:
        self._policy = policy
        # Invariant: never moves; every sleep and attempt of the call ends before it.
        self.deadline = deadline
        self.attempts = 0
        self.backoffs = 0
        self._redirects_in_a_row = 0
        self._nodes_down_in_a_row = 0

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - self._policy.clock())

    def expired(self) -> bool:
        return self.remaining_s() < _ATTEMPT_TIME_MIN_S

    def start_attempt(self, limit_s: float | None = None) -> float:
        """Count an attempt; returns the time it may take: the configured attempt timeout, or
        `limit_s` when that is shorter, clipped to the time left."""
        self.attempts += 1
        attempt_s = self._policy.config.attempt_timeout_s
        if limit_s is not None:
            attempt_s = min(attempt_s, limit_s)
        return min(attempt_s, self.remaining_s())

    def decide(self, failure: Failure) -> Decision:
        """What to do after `failure` ended the latest attempt."""
        config = self._policy.config
        if failure.kind is FailureKind.PERMANENT:
            return Decision(Verdict.GIVE_UP_PERMANENT)
        if self.attempts >= config.max_attempts:
            return Decision(Verdict.GIVE_UP_ATTEMPTS)
        if self.expired():
            return Decision(Verdict.GIVE_UP_DEADLINE)
        # Both counts run across each other (a dead leader and a node still naming it would
        # otherwise alternate without end); any other failure resets them.
        if failure.kind is FailureKind.NODE_DOWN:
            self._nodes_down_in_a_row += 1
            if self._nodes_down_in_a_row == 1:
                return Decision(Verdict.RETRY, 0.0)
        elif failure.kind is FailureKind.NOT_LEADER and failure.leader_url:
            self._redirects_in_a_row += 1
            if self._redirects_in_a_row <= config.immediate_redirects_max:
                return Decision(Verdict.RETRY, 0.0)
        else:
            self._redirects_in_a_row = self._nodes_down_in_a_row = 0
        delay = self._policy.backoff_s(self.backoffs)
        if failure.retry_after_s is not None:
            delay = max(delay, min(failure.retry_after_s, config.retry_after_max_s))
        # Sleeping past the deadline only to give up afterwards would waste the caller's time.
        if delay + _ATTEMPT_TIME_MIN_S >= self.remaining_s():
            return Decision(Verdict.GIVE_UP_DEADLINE)
        self.backoffs += 1
        return Decision(Verdict.RETRY, delay)


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # skipped until the cool-down ends
    HALF_OPEN = "half_open"  # one probe is in flight; its result closes or re-opens


class CircuitBreaker:
    """One endpoint's breaker: skip an endpoint that keeps failing, probe it after a cool-down.

    Only transport failures (refused, reset, timed out) count: a node that answers, even
    503 "no leader", is alive and its answers carry information.
    """

    def __init__(self, config: ClientConfig, *, clock: Clock) -> None:
        self._threshold = config.breaker_failure_threshold
        self._cooldown_s = config.breaker_cooldown_s
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        # How many times this breaker went from closed (or half-open) to open.
        self.opens = 0

    def allows(self) -> bool:
        """May a call use this endpoint now? An open breaker past its cool-down allows a probe."""
        # A half-open breaker whose probe never reported (the call was cancelled) lets another
        # probe through one cool-down later, so it cannot stay shut forever.
        if self.state is BreakerState.CLOSED:
            return True
        return self._clock() >= self.opened_at + self._cooldown_s

    def reopens_at(self) -> float:
        """When an endpoint that is not allowed now will be (0.0 when it is closed)."""
        return 0.0 if self.state is BreakerState.CLOSED else self.opened_at + self._cooldown_s

    def before_call(self) -> None:
        """The call is about to use this endpoint: an open breaker past cool-down goes half-open."""
        if self.state is not BreakerState.CLOSED and self.allows():
            self.state = BreakerState.HALF_OPEN
            self.opened_at = self._clock()

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.consecutive_failures >= self._threshold
        ):
            self.state = BreakerState.OPEN
            self.opened_at = self._clock()
            self.opens += 1
        elif self.state is BreakerState.OPEN:
            # A forced use of an open endpoint (all were open, or a leader hint) failed again.
            self.opened_at = self._clock()
