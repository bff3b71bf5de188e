"""`Watch`: a key's or a prefix's events as an async iterator that survives failover.

    async for event in kv.watch(prefix="config/", start_revision=rev + 1):
        print(event.type, event.key, event.value, event.revision)

The server streams whole revisions in order (`GET /v1/watch`, docs/api.md). The watch
remembers the next revision it is to deliver (`next_revision`: one past the last event
delivered, or past the revision of the last progress line), and when the connection breaks,
the node stops answering (no line, not even a progress line, within three progress
intervals), or the node cancels the watch (it is shutting down, or this reader was too
slow), it reconnects to the next endpoint with `start_revision=next_revision`. Events below
it are skipped, so the application sees every event exactly once, in revision order, as long
as the cluster still keeps that revision; if it does not, iteration raises
`RevisionCompactedError` (its `oldest_revision` says where the history now starts), since
events were lost to compaction.

Every node serves watches from what it has applied (committed entries only), so a watch may
move to a follower that is behind: it then waits there until that node catches up.
`start_revision=0` means "from the connected node's next revision"; the watch pins the
revision the first node names, so a reconnect never skips what came in between.

The stream has its own aiohttp session (one connection per watch), closed with the watch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvstore.client.results import KeyValue
from kvstore.errors import (
    ClusterError,
    KVStoreError,
    ProtocolError,
    RevisionCompactedError,
    from_json,
)

log = logging.getLogger("kvstore.client")

_BACKOFF_MIN_S = 0.02
_BACKOFF_MAX_S = 1.0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change: `type` "put" or "delete"; `kv` the key after it (for a delete: empty
    value, version 0); `prev` the key before it when the watch asked for `prev_kv`."""

    type: str
    kv: KeyValue
    prev: KeyValue | None = None

    @property
    def key(self) -> str:
        return self.kv.key

    @property
    def value(self) -> bytes:
        return self.kv.value

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class WatchProgress:
    """Everything up to `revision` has been delivered (only with `progress=True`)."""

    revision: int


class Watch:
    """See the module docstring. Use as `async for` (and `async with`, or `close()`)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        key: str | None = None,
        prefix: str | None = None,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress: bool = False,
        progress_interval_s: float = 1.0,
        connect_timeout_s: float = 0.5,
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if (key is None) == (prefix is None):
            raise ValueError("watch needs exactly one of key= or prefix=")
        if isinstance(start_revision, bool) or start_revision < 0:
            raise ValueError("start_revision must be an integer >= 0")
        self.endpoints = tuple(endpoints)
        self._filter = {"key": key} if key is not None else {"prefix": prefix or ""}
        # 0 until the first node names the revision "now" is.
        self.next_revision = start_revision
        self._prev_kv = prev_kv
        self._progress = progress
        self._progress_ms = max(10, int(progress_interval_s * 1000))
        self._connect_timeout_s = connect_timeout_s
        self._rng = rng or random.Random()
        # https endpoints: the client's TLS context; a bearer token (nodes with --auth).
        self._ssl = ssl_context
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.reconnects = 0
        # The endpoint of the current (or last) connection.
        self.endpoint = ""

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __aiter__(self) -> AsyncIterator[WatchEvent | WatchProgress]:
        return self._events()

    async def _events(self) -> AsyncIterator[WatchEvent | WatchProgress]:
        index = self._rng.randrange(len(self.endpoints))
        delay = _BACKOFF_MIN_S
        while not self._closed:
            endpoint = self.endpoints[index % len(self.endpoints)]
            self.endpoint = endpoint
            index += 1
            try:
                async for item in self._stream(endpoint):
                    delay = _BACKOFF_MIN_S
                    yield item
            except RevisionCompactedError:
                raise
            except (aiohttp.ClientError, TimeoutError, ConnectionError, ClusterError) as exc:
                log.debug("watch endpoint=%s error=%r next_revision=%d", endpoint, exc,
                          self.next_revision)  # fmt: skip
            if self._closed:
                return
            self.reconnects += 1
            await asyncio.sleep(self._rng.uniform(0, delay))
            delay = min(_BACKOFF_MAX_S, delay * 2)

    def _params(self) -> dict[str, str]:
        params = dict(self._filter)
        params["start_revision"] = str(self.next_revision)
        params["progress_ms"] = str(self._progress_ms)
        if self._prev_kv:
            params["prev_kv"] = "true"
        return params

    async def _stream(self, endpoint: str) -> AsyncIterator[WatchEvent | WatchProgress]:
        """One connection's events; returns when the node ends the stream."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                headers=self._headers,
            )
        # No line for three progress intervals: the node is gone or cut off.
        read_timeout = 3 * self._progress_ms / 1000 + 1.0
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._connect_timeout_s, sock_read=read_timeout
        )
        url = endpoint.rstrip("/") + "/v1/watch"
        async with self._session.get(url, params=self._params(), timeout=timeout) as response:
            if response.status != 200:
                raise _error(response.status, await response.read())
            async for raw in response.content:
                for item in self._on_line(raw):
                    yield item

    def _on_line(self, raw: bytes) -> list[WatchEvent | WatchProgress]:
        try:
            line = json.loads(raw)
        except ValueError as exc:
            raise ProtocolError(f"watch: a line is not JSON: {raw[:100]!r}") from exc
        if not isinstance(line, dict):
            raise ProtocolError("watch: a line is not an object")
        if line.get("canceled"):
            raise from_json(503, line)
        if line.get("created"):
            if self.next_revision == 0:
                self.next_revision = int(line["start_revision"])
            return []
        revision = int(line.get("revision", 0))
        items: list[WatchEvent | WatchProgress] = []
        for raw_event in line.get("events", ()):
            event = _event(raw_event)
            if event.revision >= self.next_revision:
                items.append(event)
        if line.get("progress") and self._progress:
            items.append(WatchProgress(revision))
        self.next_revision = max(self.next_revision, revision + 1)
        return items


def _event(raw: Any) -> WatchEvent:
    try:
        kv = _key_value(raw, int(raw["revision"]))
        prev = raw.get("prev")
        return WatchEvent(
            type=str(raw["type"]),
            kv=kv,
            prev=None if prev is None else _key_value(prev, int(raw["revision"])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"watch: a malformed event: {raw!r}") from exc


def _key_value(raw: dict[str, Any], revision: int) -> KeyValue:
    return KeyValue(
        key=str(raw["key"]),
        value=base64.b64decode(str(raw.get("value", "")), validate=True),
        create_revision=int(raw["create_revision"]),
        mod_revision=int(raw["mod_revision"]),
        version=int(raw["version"]),
        revision=revision,
    )


def _error(status: int, body: bytes) -> KVStoreError:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {}
    return from_json(status, parsed if isinstance(parsed, dict) else {})
