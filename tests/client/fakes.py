"""Test doubles for the client: a fake clock with its sleep, and a scripted transport.

`FakeClock.sleep` advances the clock instead of waiting, so a test of back-off over seconds
of virtual time runs in microseconds; `ScriptedTransport` answers from a handler function and
records every request, so tests assert on what the client sent where.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kvstore.client.transport import HttpResponse, TransportError


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass(frozen=True)
class SentRequest:
    endpoint: str
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes | None
    timeout_s: float
    at: float


Handler = Callable[[SentRequest], HttpResponse]


@dataclass
class ScriptedTransport:
    """Answers each request with `handler(request)`; the handler may raise TransportError."""

    handler: Handler
    clock: FakeClock | None = None
    # Virtual time each request takes.
    latency_s: float = 0.001
    sent: list[SentRequest] = field(default_factory=list)
    closed: bool = False

    async def request(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout_s: float,
    ) -> HttpResponse:
        assert timeout_s > 0, "an attempt must never start with no time left"
        now = self.clock.now if self.clock else 0.0
        request = SentRequest(
            endpoint, method, path, dict(query or {}), dict(headers or {}), body, timeout_s, now
        )
        self.sent.append(request)
        try:
            response = self.handler(request)
        except TransportError as exc:
            if self.clock is not None:
                self.clock.now += timeout_s if exc.timed_out else self.latency_s
            raise
        if self.clock is not None:
            self.clock.now += self.latency_s
        return response

    async def close(self) -> None:
        self.closed = True


def json_response(
    status: int, payload: object, *, leader: str = "", headers: Mapping[str, str] | None = None
) -> HttpResponse:
    return HttpResponse(
        status,
        {"kvstore-leader": leader, "content-type": "application/json", **(headers or {})},
        json.dumps(payload).encode(),
    )


def error_response(
    status: int,
    code: str,
    *,
    leader: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> HttpResponse:
    body = {"error": {"code": code, "message": code, "leader": leader, **(extra or {})}}
    return json_response(status, body, leader=leader or "", headers=headers)


def put_ok(key: str, revision: int, *, leader: str = "", version: int = 1) -> HttpResponse:
    return json_response(
        200,
        {
            "key": key,
            "revision": revision,
            "create_revision": revision - version + 1,
            "mod_revision": revision,
            "version": version,
        },
        leader=leader,
    )


def refused(endpoint: str) -> TransportError:
    return TransportError(f"{endpoint}: connection refused", maybe_sent=False)


def reset(endpoint: str) -> TransportError:
    return TransportError(f"{endpoint}: connection reset", maybe_sent=True)
