"""Watches: `GET /v1/watch` streams a key's or a prefix's events as the node applies them.

Every watch reads the replicated revision history (kvstore.kv.history) of the node it is
connected to, so any node serves watches and a follower never shows an event before it is
committed (its state machine applies committed entries only). A watch keeps one number of
its own, the next revision it is to send; the events live once, in the history, however
many watchers there are. The driver tells the `WatchHub` after every batch of applied
entries, and each watch then sends what it has not sent yet.

The answer is newline-delimited JSON (`application/x-ndjson`), one object per line:
- `{"created": true, "revision": R, "start_revision": S}` first;
- `{"revision": R, "events": [...]}`: the events of whole revisions, in revision order (a
  revision's events are never split across lines, so a client that resumes from the
  revision after the last one it received misses and repeats nothing);
- `{"revision": R, "progress": true}` when there was nothing to send for
  `watch_progress_interval_ms`: every event up to R has been sent;
- `{"canceled": true, "revision": R, "error": {...}}` last, when the node ends the watch:
  the history was compacted past it, it fell `watch_lag_revisions_max` revisions behind
  (it reads too slowly), or the node is shutting down. The error's code says which; the
  client resumes from its next revision, here or elsewhere.

Slow watchers are bounded: what a watch holds is one line being written (a line ends at the
first revision boundary at or past `_LINE_EVENTS_MAX` events or `_LINE_VALUE_BYTES_MAX`
bytes of values), a write that does not finish
within `_WRITE_TIMEOUT_S` closes the connection, and a watch that lags too far is cancelled.
None of it slows the driver: it only wakes the waiting watches.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from kvstore.errors import (
    BadRequestError,
    KVStoreError,
    OverloadedError,
    RevisionCompactedError,
    WatchCanceledError,
)
from kvstore.kv.commands import KeyValue
from kvstore.kv.history import Event
from kvstore.replica import Applied
from kvstore.server.driver import Driver
from kvstore.server.http import _CONTROL, HttpApi, _query, _uint

logger = logging.getLogger("kvstore.server")

_LINE_EVENTS_MAX = 1000
# Values (and prev values) in one line: without it, a line of 1000 events of 1 MiB values
# would be over a GB of JSON, built by every watcher catching up on them.
_LINE_VALUE_BYTES_MAX = 1 << 20
_WRITE_TIMEOUT_S = 10.0
_PROGRESS_MS_MIN = 10
_PROGRESS_MS_MAX = 600_000


def key_value_json(kv: KeyValue) -> dict[str, Any]:
    """A key's state as the API writes it (the value in base64)."""
    return {
        "key": kv.key,
        "value": base64.b64encode(kv.value).decode("ascii"),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    }


def event_json(event: Event, prev_kv: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"type": event.type, "revision": event.revision}
    body.update(key_value_json(event.kv))
    if prev_kv and event.prev is not None:
        body["prev"] = key_value_json(event.prev)
    return body


class WatchHub:
    """Wakes every watch of the node after each batch of applied entries."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self._wakeup: asyncio.Future[None] | None = None
        self.watchers = 0
        self.closed = False
        driver.apply_listeners.append(self._on_applied)

    def _on_applied(self, applied: Sequence[Applied]) -> None:
        self.notify()

    def notify(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def close(self) -> None:
        """End every watch (a shutdown): each sends its cancel line and returns."""
        self.closed = True
        self.notify()

    async def wait(self, timeout_s: float) -> None:
        """Until the next batch is applied, `close`, or `timeout_s`."""
        if self._wakeup is None:
            self._wakeup = asyncio.get_running_loop().create_future()
        await asyncio.wait((self._wakeup,), timeout=timeout_s)


class WatchApi:
    """`GET /v1/watch`; see the module docstring."""

    def __init__(self, http: HttpApi, hub: WatchHub) -> None:
        self.http = http
        self.hub = hub
        config = http.config
        self._progress_ms = config.watch_progress_interval_ms
        self._lag_max = config.watch_lag_revisions_max
        self._watchers_max = config.watchers_max
        http.add_routes({("/v1/watch", "GET"): self.watch})
        http.metrics.watchers.set_function(lambda: hub.watchers)

    def _filter(self, query: dict[str, str]) -> tuple[str, bool]:
        """(key or prefix, is_prefix) from the query; exactly one of key= and prefix=."""
        if ("key" in query) == ("prefix" in query):
            raise BadRequestError("a watch needs exactly one of key= or prefix=")
        text = query.get("key", query.get("prefix", ""))
        max_bytes = self.http.config.max_key_bytes
        if _CONTROL.search(text) or len(text.encode()) > max_bytes:
            raise BadRequestError(f"key or prefix: at most {max_bytes} bytes, no controls")
        if "key" in query and not text:
            raise BadRequestError("the key is empty")
        return text, "prefix" in query

    async def watch(self, request: web.BaseRequest) -> web.StreamResponse:
        query = _query(request)
        text, is_prefix = self._filter(query)
        start = _uint(query.get("start_revision", "0"), "start_revision")
        prev_kv = query.get("prev_kv", "false") in ("true", "1")
        progress_ms = _uint(
            query.get("progress_ms", str(self._progress_ms)),
            "progress_ms",
            _PROGRESS_MS_MAX,
            minimum=_PROGRESS_MS_MIN,
        )
        if self.hub.watchers >= self._watchers_max:
            raise OverloadedError(f"{self.hub.watchers} watches open", retry_after_s=1.0)
        machine = self.http.driver.replica.state_machine
        if start == 0:
            start = machine.revision + 1
        if start <= machine.history.compacted:
            raise RevisionCompactedError(
                f"revision {start} is compacted; the oldest kept is {machine.history.oldest}",
                oldest_revision=machine.history.oldest,
            )
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/x-ndjson",
                "Kvstore-Node": str(self.http.config.id),
                "Cache-Control": "no-store",
            }
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        self.hub.watchers += 1
        try:
            await self._write(response, {"created": True, "revision": machine.revision,
                                         "start_revision": start})  # fmt: skip
            await self._stream(response, text, is_prefix, start, prev_kv, progress_ms / 1000)
        except (TimeoutError, ConnectionError):
            # A watcher that does not read, or went away: drop the connection.
            response.force_close()
        finally:
            self.hub.watchers -= 1
        return response

    async def _stream(
        self,
        response: web.StreamResponse,
        text: str,
        is_prefix: bool,
        next_revision: int,
        prev_kv: bool,
        progress_s: float,
    ) -> None:
        machine = self.http.driver.replica.state_machine
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        # The lag bound applies once the watch has caught up: one that starts far back
        # catches up at the speed of its connection, bounded by the history's own bounds.
        caught_up = next_revision > machine.revision
        while True:
            history = machine.history
            caught_up = caught_up or next_revision > machine.revision
            error = self._cancel_reason(
                next_revision, machine.revision, history.compacted, check_lag=caught_up
            )
            if error is not None:
                body = error.to_json()
                await self._write(response, {"canceled": True, "revision": machine.revision,
                                             **body})  # fmt: skip
                return
            events, next_revision = _collect(history.since(next_revision), text, is_prefix,
                                             next_revision, machine.revision)  # fmt: skip
            if events:
                lines = [event_json(event, prev_kv) for event in events]
                await self._write(response, {"revision": events[-1].revision, "events": lines})
                quiet_since = loop.time()
                continue
            if loop.time() - quiet_since >= progress_s:
                await self._write(response, {"revision": machine.revision, "progress": True})
                quiet_since = loop.time()
            if next_revision <= machine.revision:
                continue  # more to send (a line was full)
            await self.hub.wait(max(0.0, progress_s - (loop.time() - quiet_since)))

    def _cancel_reason(
        self, next_revision: int, revision: int, compacted: int, *, check_lag: bool
    ) -> KVStoreError | None:
        if self.hub.closed:
            return WatchCanceledError("the node is shutting down; resume elsewhere")
        if next_revision <= compacted:
            return RevisionCompactedError(
                f"the history was compacted past revision {next_revision} before it was sent",
                oldest_revision=compacted + 1,
            )
        if check_lag and revision - next_revision >= self._lag_max:
            return WatchCanceledError(
                f"watcher too slow: {revision - next_revision + 1} revisions behind "
                f"(limit {self._lag_max}); resume from revision {next_revision}"
            )
        return None

    @staticmethod
    async def _write(response: web.StreamResponse, body: dict[str, Any]) -> None:
        async with asyncio.timeout(_WRITE_TIMEOUT_S):
            await response.write(json.dumps(body).encode() + b"\n")


def _collect(
    events: Any, text: str, is_prefix: bool, next_revision: int, current: int
) -> tuple[list[Event], int]:
    """The matching events from `events` (the history from `next_revision` on), whole
    revisions only, ending at the first revision boundary at or past `_LINE_EVENTS_MAX`
    events or `_LINE_VALUE_BYTES_MAX` bytes of values (prev values included); and the next
    revision to send after them."""
    matched: list[Event] = []
    size = 0
    scanned_to = next_revision - 1
    for event in events:
        revision = event.revision
        if revision != scanned_to and (
            len(matched) >= _LINE_EVENTS_MAX or size >= _LINE_VALUE_BYTES_MAX
        ):
            return matched, revision
        scanned_to = revision
        key = event.kv.key
        if key == text or (is_prefix and key.startswith(text)):
            matched.append(event)
            size += len(event.kv.value) + (len(event.prev.value) if event.prev else 0)
    return matched, max(next_revision, current + 1)
