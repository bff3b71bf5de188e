"""LogThrottle: a burst per event kind, then one record per interval, and the count of what
was dropped on the next record; clip keeps client text to one escaped line. The clock is
injected."""

from __future__ import annotations

import logging

import pytest

from kvstore.server.logthrottle import LogThrottle, clip


def test_a_burst_then_one_per_interval_with_the_suppressed_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    throttle = LogThrottle(
        logging.getLogger("test.throttle"), burst=3, interval_s=10.0, clock=lambda: now[0]
    )
    caplog.set_level(logging.DEBUG, logger="test.throttle")
    logged = [throttle.log("parse", logging.INFO, "event=x n=%d", i) for i in range(100)]
    assert logged.count(True) == 3 and logged[:3] == [True, True, True]
    # Another kind has its own bucket.
    assert throttle.log("other", logging.INFO, "event=y")
    now[0] = 9.9
    assert not throttle.log("parse", logging.INFO, "event=x n=%d", 100)
    now[0] = 10.0
    assert throttle.log("parse", logging.INFO, "event=x n=%d", 101)
    assert caplog.records[-1].getMessage() == "event=x n=101 suppressed=98"
    assert len(caplog.records) == 5
    now[0] = 1000.0  # a long quiet spell refills the burst, no more
    assert [throttle.log("parse", logging.INFO, "event=x") for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]


def test_a_disabled_level_costs_no_token(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(logging.getLogger("test.throttle.off"), burst=1, clock=lambda: 0.0)
    caplog.set_level(logging.INFO, logger="test.throttle.off")
    assert not throttle.log("k", logging.DEBUG, "event=debug")
    assert throttle.log("k", logging.INFO, "event=info")


def test_clip_escapes_and_shortens() -> None:
    assert clip("a\nb") == "'a\\nb'"
    assert clip(b"\x00") == "b'\\x00'"
    assert len(clip("x" * 1000, 50)) == 53 and clip("x" * 1000, 50).endswith("...")
    assert clip(ValueError("bad\r\nline")) == "'bad\\r\\nline'"
