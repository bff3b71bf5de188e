"""The retry policy and circuit breaker, driven by a fake clock and a seeded random source.

Nothing here sleeps: time is a number the test moves.
"""

from __future__ import annotations

import random

import pytest

from kvstore.client.config import ClientConfig
from kvstore.client.responses import parse_retry_after
from kvstore.client.retry import (
    BreakerState,
    CircuitBreaker,
    Failure,
    FailureKind,
    RetryPolicy,
    Verdict,
)

from .fakes import FakeClock

TRANSIENT = Failure(FailureKind.TRANSIENT, "transport")


class TopOfRange(random.Random):
    """Full jitter always drawing the top of its range, to see the ceilings themselves."""

    def uniform(self, a: float, b: float) -> float:
        return b


def make_policy(
    rng: random.Random | None = None, **config: object
) -> tuple[RetryPolicy, FakeClock]:
    clock = FakeClock()
    defaults: dict[str, object] = {"timeout_s": 100.0, "max_attempts": 100}
    policy = RetryPolicy(
        ClientConfig(**{**defaults, **config}),  # type: ignore[arg-type]
        clock=clock,
        rng=rng or random.Random(7),
    )
    return policy, clock


def test_backoff_ceilings_double_then_stay_at_the_cap() -> None:
    policy, _ = make_policy(TopOfRange(), backoff_base_s=0.01, backoff_cap_s=0.1)
    budget = policy.begin()
    delays = []
    for _ in range(8):
        budget.start_attempt()
        decision = budget.decide(TRANSIENT)
        assert decision.verdict is Verdict.RETRY
        delays.append(decision.delay_s)
    assert delays == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.1, 0.1, 0.1, 0.1])


def test_backoff_is_fully_jittered_within_zero_and_the_ceiling() -> None:
    policy, _ = make_policy(random.Random(1), backoff_base_s=0.01, backoff_cap_s=0.1)
    for backoff_number in range(12):
        ceiling = min(0.1, 0.01 * 2**backoff_number)
        samples = [policy.backoff_s(backoff_number) for _ in range(200)]
        assert all(0.0 <= sample <= ceiling for sample in samples)
        # Full jitter spreads over the whole range, not around the ceiling.
        assert min(samples) < 0.1 * ceiling
        assert max(samples) > 0.9 * ceiling
    # A huge retry number neither overflows nor exceeds the cap.
    assert 0.0 <= policy.backoff_s(10_000) <= 0.1


def test_same_seed_gives_the_same_delays() -> None:
    first, _ = make_policy(random.Random(42))
    second, _ = make_policy(random.Random(42))
    assert [first.backoff_s(n) for n in range(10)] == [second.backoff_s(n) for n in range(10)]


def test_stops_at_the_deadline_and_never_sleeps_past_it() -> None:
    policy, clock = make_policy(random.Random(3), timeout_s=1.0, backoff_base_s=0.05)
    budget = policy.begin()
    deadline = clock.now + 1.0
    while True:
        attempt_time = budget.start_attempt()
        assert attempt_time > 0
        clock.now += min(attempt_time, 0.01)  # the attempt fails quickly
        decision = budget.decide(TRANSIENT)
        if not decision.retry:
            break
        assert clock.now + decision.delay_s < deadline
        clock.now += decision.delay_s
    assert decision.verdict is Verdict.GIVE_UP_DEADLINE
    assert clock.now <= deadline
    assert budget.attempts > 3


def test_attempt_time_is_clipped_to_the_time_left() -> None:
    policy, clock = make_policy(timeout_s=1.0, attempt_timeout_s=0.4)
    budget = policy.begin()
    assert budget.start_attempt() == pytest.approx(0.4)
    clock.now += 0.9
    assert budget.start_attempt() == pytest.approx(0.1)


def test_stops_at_max_attempts() -> None:
    policy, _ = make_policy(max_attempts=4)
    budget = policy.begin()
    verdicts = []
    for _ in range(4):
        budget.start_attempt()
        verdicts.append(budget.decide(TRANSIENT).verdict)
    assert verdicts == [Verdict.RETRY] * 3 + [Verdict.GIVE_UP_ATTEMPTS]


def test_retry_after_is_honoured_and_clipped() -> None:
    policy, _ = make_policy(random.Random(5), backoff_base_s=0.01, retry_after_max_s=2.0)
    budget = policy.begin()
    budget.start_attempt()
    decision = budget.decide(Failure(FailureKind.TRANSIENT, "no_leader", retry_after_s=0.75))
    assert decision.retry and decision.delay_s == pytest.approx(0.75)
    budget.start_attempt()
    decision = budget.decide(Failure(FailureKind.TRANSIENT, "overloaded", retry_after_s=30.0))
    assert decision.delay_s == pytest.approx(2.0)


def test_a_retry_after_beyond_the_deadline_gives_up_at_once() -> None:
    policy, _ = make_policy(timeout_s=0.5)
    budget = policy.begin()
    budget.start_attempt()
    decision = budget.decide(Failure(FailureKind.TRANSIENT, "no_leader", retry_after_s=1.0))
    assert decision.verdict is Verdict.GIVE_UP_DEADLINE


def test_leader_hints_are_followed_at_once_then_treated_as_stale() -> None:
    policy, _ = make_policy(TopOfRange(), immediate_redirects_max=3, backoff_base_s=0.01)
    budget = policy.begin()
    hint = Failure(FailureKind.NOT_LEADER, "not_leader", leader_url="http://n2")
    delays = []
    for _ in range(5):
        budget.start_attempt()
        delays.append(budget.decide(hint).delay_s)
    assert delays[:3] == [0.0, 0.0, 0.0]
    assert delays[3] > 0 and delays[4] > delays[3]
    # A different kind of failure resets the count: the next hint is followed at once again.
    budget.start_attempt()
    budget.decide(TRANSIENT)
    budget.start_attempt()
    assert budget.decide(hint).delay_s == 0.0


def test_not_leader_without_a_hint_backs_off() -> None:
    policy, _ = make_policy(TopOfRange())
    budget = policy.begin()
    budget.start_attempt()
    assert budget.decide(Failure(FailureKind.NOT_LEADER, "not_leader")).delay_s > 0


def test_permanent_failures_are_not_retried() -> None:
    policy, _ = make_policy()
    budget = policy.begin()
    budget.start_attempt()
    assert budget.decide(Failure(FailureKind.PERMANENT, "412")).verdict is Verdict.GIVE_UP_PERMANENT


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("1", 1.0),
        ("0.25", 0.25),
        (" 3 ", 3.0),
        ("-4", 0.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("Thu, 26 Nov 2026 17:00:05 GMT", 5.0),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = 1795712400.0  # Thu, 26 Nov 2026 17:00:00 GMT
    assert parse_retry_after(header, now_wall_s=now) == (
        None if expected is None else pytest.approx(expected)
    )


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ClientConfig(timeout_s=0)
    with pytest.raises(ValueError, match="backoff_cap_s"):
        ClientConfig(backoff_base_s=1.0, backoff_cap_s=0.5)
    with pytest.raises(ValueError, match="max_attempts"):
        ClientConfig(max_attempts=-1)
    assert ClientConfig(immediate_redirects_max=0).immediate_redirects_max == 0


# --- circuit breaker -----------------------------------------------------------------------


def make_breaker(threshold: int = 3, cooldown_s: float = 1.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    config = ClientConfig(breaker_failure_threshold=threshold, breaker_cooldown_s=cooldown_s)
    return CircuitBreaker(config, clock=clock), clock


def test_breaker_opens_after_consecutive_failures() -> None:
    breaker, _ = make_breaker(threshold=3)
    for _ in range(2):
        breaker.record_failure()
        assert breaker.allows()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows()
    assert breaker.opens == 1


def test_a_success_resets_the_failure_count() -> None:
    breaker, _ = make_breaker(threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_cools_down_then_lets_one_probe_through() -> None:
    breaker, clock = make_breaker(threshold=1, cooldown_s=1.0)
    breaker.record_failure()
    clock.now += 0.99
    assert not breaker.allows()
    assert breaker.reopens_at() == pytest.approx(clock.now + 0.01)
    clock.now += 0.02
    assert breaker.allows()
    breaker.before_call()
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allows(), "only one probe at a time"


def test_a_successful_probe_closes_the_breaker() -> None:
    breaker, clock = make_breaker(threshold=1)
    breaker.record_failure()
    clock.now += 1.5
    breaker.before_call()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allows()


def test_a_failed_probe_reopens_for_another_cooldown() -> None:
    breaker, clock = make_breaker(threshold=1)
    breaker.record_failure()
    clock.now += 1.5
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.opens == 2
    clock.now += 0.5
    assert not breaker.allows()
    clock.now += 0.6
    assert breaker.allows()


def test_a_probe_that_never_reports_does_not_block_forever() -> None:
    breaker, clock = make_breaker(threshold=1)
    breaker.record_failure()
    clock.now += 1.5
    breaker.before_call()  # the probe's call is then cancelled: no success or failure
    clock.now += 1.5
    assert breaker.allows()


def test_a_node_that_did_not_answer_is_left_at_once_the_first_time_in_a_row() -> None:
    """Issue 15: a dead leader's in-flight calls move to another node without a back-off;
    a second dead node in a row backs off as any transient failure, and an answer in
    between (here a 503) starts the count again."""
    policy, _ = make_policy(TopOfRange(), backoff_base_s=0.01, backoff_cap_s=0.1)
    budget = policy.begin()
    node_down = Failure(FailureKind.NODE_DOWN, "transport")
    delays = []
    for failure in (node_down, node_down, node_down, TRANSIENT, node_down):
        budget.start_attempt()
        decision = budget.decide(failure)
        assert decision.verdict is Verdict.RETRY
        delays.append(decision.delay_s)
    assert delays == pytest.approx([0.0, 0.01, 0.02, 0.04, 0.0])


def test_a_dead_node_and_a_hint_naming_it_do_not_alternate_without_back_off() -> None:
    policy, _ = make_policy(TopOfRange(), immediate_redirects_max=3, backoff_base_s=0.01)
    budget = policy.begin()
    hint = Failure(FailureKind.NOT_LEADER, "not_leader", leader_url="http://n1")
    node_down = Failure(FailureKind.NODE_DOWN, "transport")
    delays = []
    for failure in (hint, node_down) * 4:
        budget.start_attempt()
        delays.append(budget.decide(failure).delay_s)
    assert delays[:3] == [0.0, 0.0, 0.0]
    # At most immediate_redirects_max hints and one dead node go without a back-off.
    assert sum(1 for delay in delays if delay == 0) <= 3 + 1, delays
    assert all(delay > 0 for delay in delays[-3:]), delays
