"""Rate-limited logging for events a client can cause, so that no client can fill the log.

A malformed request costs a client a few bytes and used to cost the node an ERROR record with
a traceback (2,000 garbage requests wrote 1 MB of log in 1.8 s). Every record the HTTP layer
writes because of something a client sent goes through a `LogThrottle`: a token bucket per
event kind (a burst of `burst` records, then one per `interval_s`), and the number of records
it dropped is reported on the next one it lets through (`suppressed=N`). Fields that come
from the client are shortened and escaped by `clip` so that one record stays one short line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

_CLIP_CHARS = 120


def clip(value: object, limit: int = _CLIP_CHARS) -> str:
    """`value` as one printable line of at most about `limit` characters (repr escapes
    control characters and newlines, so a client cannot forge log lines)."""
    text = repr(value) if isinstance(value, str | bytes) else repr(str(value))
    if len(text) > limit:
        return text[:limit] + "..."
    return text


class LogThrottle:
    """Token buckets per event kind in front of one logger."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 10,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        # kind -> [tokens, time of the last refill, records suppressed since the last one]
        self._buckets: dict[str, list[float]] = {}

    def log(self, kind: str, level: int, message: str, *args: Any, exc_info: Any = None) -> bool:
        """Log `message % args` at `level` unless `kind` is over its rate; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        bucket = self._buckets.get(kind)
        if bucket is None:
            bucket = self._buckets[kind] = [float(self.burst), now, 0.0]
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) / self.interval_s)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            bucket[2] += 1
            return False
        bucket[0] = tokens - 1.0
        suppressed = int(bucket[2])
        bucket[2] = 0.0
        if suppressed:
            message += " suppressed=%d"
            args = (*args, suppressed)
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True
