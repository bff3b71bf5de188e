"""The client port's connections: how many a node holds, how long each may take, and the
answer to a request aiohttp could not parse.

Without bounds anyone could open sockets until the process ran out of file descriptors, and
then new clients were not answered (aiohttp closes an idle connection only after an hour and
has no header or body timeout). `ClientServer` is aiohttp's low-level server with:

- a bound on open connections (`client_connections_max`, lowered at start so that it fits
  under RLIMIT_NOFILE with `FD_RESERVE` descriptors left for the WAL, snapshots and peers)
  and one per source address (`client_connections_per_source_max`). A connection beyond
  the per-source bound, or beyond the total bound when no connection is idle, is answered
  at once with a canned 503 (Retry-After: 1) and closed: it costs the node one accept, one
  write and one close. At the total bound a new connection instead evicts the connection
  that has been idle longest (no request in progress), so a crowd of idle sockets from many
  addresses cannot lock out a client that wants to send a request.
- three timeouts per connection, one deadline at a time (swept, see ClientServer.arm):
  idle (`client_idle_timeout_ms`, a connection with no request in progress, including a
  new one that has sent nothing, is closed), head (`client_header_timeout_ms`, from the first byte of a request until its
  head is complete; then 408, our side shut, and close a second later) and body
  (`client_body_timeout_ms`, enforced by the handler that reads the body, http.py).
- `handle_error` answering what the HTTP parser refuses (bad request line, bad header,
  oversized head) with the JSON error body of the rest of the API and one short DEBUG log
  record, rate-limited, instead of aiohttp's text body and an ERROR record with a traceback.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from kvstore.errors import (
    BadRequestError,
    KVStoreError,
    PayloadTooLargeError,
    RequestTimeoutError,
    TooManyConnectionsError,
    http_status,
)
from kvstore.server.logthrottle import LogThrottle, clip
from kvstore.server.metrics import NodeMetrics

logger = logging.getLogger("kvstore.server.http")

# Descriptors kept free of client connections: the WAL segments, snapshot files being
# written or sent, peer connections, and the listening sockets.
FD_RESERVE = 256

# How long a connection cut for a slow head still drains (and drops) input after its 408.
_LINGER_S = 1.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _canned(error: KVStoreError, extra_headers: str = "") -> bytes:
    """A whole HTTP/1.1 answer for `error`, written on a connection before aiohttp sees it
    (the registry's status and JSON body, like every other error answer)."""
    status = http_status(error)
    body = json.dumps(error.to_json()).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"{extra_headers}Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_REFUSED = _canned(
    TooManyConnectionsError(
        "this node holds as many connections as it allows (from this address or in all); retry",
        retry_after_s=1.0,
    ),
    "Retry-After: 1\r\n",
)
_HEAD_TIMEOUT = _canned(RequestTimeoutError("the request head did not arrive in time"))


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The bounds of one client port (from ServeConfig, see `limits_from_config`)."""

    connections_max: int
    per_source_max: int
    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float


def limits_from_config(config: Any, nofile: int | None = None) -> ConnectionLimits:
    """The configured limits, with the connection bound lowered to fit under `nofile`
    (the soft RLIMIT_NOFILE) minus FD_RESERVE."""
    connections_max = config.client_connections_max
    if nofile is not None:
        connections_max = max(1, min(connections_max, nofile - FD_RESERVE))
    return ConnectionLimits(
        connections_max=connections_max,
        per_source_max=min(config.client_connections_per_source_max, connections_max),
        header_timeout_s=config.client_header_timeout_ms / 1000,
        body_timeout_s=config.client_body_timeout_ms / 1000,
        idle_timeout_s=config.client_idle_timeout_ms / 1000,
    )


def raise_nofile_limit() -> int | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (a node holds one descriptor
    per client connection); returns the soft limit in force, None where there is none."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("event=nofile_limit_unchanged soft=%s hard=%s error=%s", soft, hard, exc)
    return None if soft == resource.RLIM_INFINITY else soft


class _Phase(enum.Enum):
    IDLE = "idle"  # no request in progress and no byte of the next one
    HEAD = "head"  # part of a request head has arrived
    BUSY = "busy"  # a request is being handled (its body is read under the body timeout)
    CLOSING = "closing"  # 408 sent and our side shut: what still comes in is dropped


class ClientConnection(RequestHandler):
    """One client connection: aiohttp's protocol plus admission, the idle and head deadlines,
    and JSON answers for requests the parser refused."""

    __slots__ = (
        "_admitted",
        "_client_transport",
        "_phase",
        "_server",
        "_source",
        "counted",
        "timer_delay",
    )

    def __init__(self, server: ClientServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._server = server
        self._phase = _Phase.IDLE
        self.timer_delay: float | None = None  # which of the server's timer queues it is in
        self._admitted = False  # aiohttp's protocol was started (connection_made passed on)
        self.counted = False  # in ClientServer's counts (until released)
        self._source = ""
        self._client_transport: asyncio.Transport | None = None

    # --- asyncio protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self._source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._client_transport = transport
        if not self._server.admit(self):
            transport.write(_REFUSED)
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._arm(self._server.limits.idle_timeout_s)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        self._server.release(self)
        if self._admitted:
            super().connection_lost(exc)
        self._client_transport = None

    def data_received(self, data: bytes) -> None:
        if self._phase is _Phase.CLOSING:
            return
        if self._phase is _Phase.IDLE and data:
            self._phase = _Phase.HEAD
            self._server.head_started(self)
        super().data_received(data)

    # --- called by ClientServer around each request ---------------------------------------

    def request_started(self) -> None:
        self._phase = _Phase.BUSY
        self._server.busy(self)

    def request_finished(self) -> None:
        if not self.counted:  # closed (evicted, timed out, or gone) while it was handled
            return
        self._phase = _Phase.IDLE
        self._server.idle(self)

    @property
    def source(self) -> str:
        return self._source

    def close_now(self, reason: str | None) -> None:
        """Close at once (eviction or a timeout; `reason` is counted): abort if a response is
        still queued, since a client that does not read would hold a closing socket open."""
        self._cancel_timer()
        if reason is not None:
            self._server.closed_for(reason)
        transport = self._client_transport
        if transport is not None and transport.get_write_buffer_size() > 0:
            transport.abort()
        self.force_close()

    # --- timers -------------------------------------------------------------------------

    def _arm(self, delay_s: float) -> None:
        self._server.arm(self, delay_s)

    def _cancel_timer(self) -> None:
        self._server.disarm(self)

    def on_timeout(self) -> None:
        """The server's sweep found this connection's deadline passed (it is disarmed)."""
        if self._phase is _Phase.HEAD:
            self._server.throttle.log(
                "header_timeout",
                logging.DEBUG,
                "event=client_header_timeout source=%s",
                clip(self._source),
            )
            self._server.closed_for("header_timeout")
            transport = self._client_transport
            if transport is None or transport.is_closing() or not transport.can_write_eof():
                self.close_now(None)
                return
            # Send the 408 and shut our side, then drop what the client still sends for a
            # moment before closing: closing with its bytes unread would send a reset, which
            # can destroy the 408 before the client reads it.
            transport.write(_HEAD_TIMEOUT)
            transport.write_eof()
            self._phase = _Phase.CLOSING
            self._arm(_LINGER_S)
        elif self._phase is _Phase.CLOSING:
            self.close_now(None)
        elif self._phase is _Phase.IDLE:
            self.close_now("idle_timeout")

    # --- aiohttp hooks ------------------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """What the parser refused (400, 413, 431, ...) or what escaped a handler (500):
        a JSON error, the connection closed, one short rate-limited log record. A client
        that went away mid-request (its connection lost while its body was read) is no
        error of ours: DEBUG, without a traceback."""
        if isinstance(exc, ConnectionError):
            self._server.throttle.log(
                "client_gone",
                logging.DEBUG,
                "event=client_gone source=%s error=%s",
                clip(self._source),
                clip(exc),
            )
            error: KVStoreError = BadRequestError("the connection was lost during the request")
            status = 400
        elif status >= 500:
            self._server.throttle.log(
                "handler_error",
                logging.ERROR,
                "event=internal_error status=%d source=%s error=%s",
                status,
                clip(self._source),
                clip(exc),
                exc_info=exc,
            )
            error = KVStoreError("internal error")
        else:
            self._server.throttle.log(
                "parse_error",
                logging.DEBUG,
                "event=client_parse_error status=%d source=%s error=%s",
                status,
                clip(self._source),
                clip(getattr(exc, "message", exc)),
            )
            reason = str(getattr(exc, "message", "") or "").strip().split("\n", 1)[0]
            error = BadRequestError(f"the request is not valid HTTP/1.1: {reason[:80]}")
            if status == 413 or status == 431:
                error = PayloadTooLargeError("the request line or a header is too long")
        response = web.Response(
            body=json.dumps(error.to_json()).encode(),
            status=status,
            content_type="application/json",
        )
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        message = args[0] % args[1:] if args else "exception"
        exc = kw.get("exc_info")
        self._server.throttle.log(
            "protocol_error",
            logging.ERROR,
            "event=http_protocol_error message=%s error=%s",
            clip(message),
            clip(exc),
            exc_info=exc,
        )


class ClientServer(web.Server):
    """aiohttp's low-level server for the client port, with `ConnectionLimits`."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: ConnectionLimits,
        metrics: NodeMetrics | None = None,
        throttle: LogThrottle | None = None,
        **kwargs: Any,
    ) -> None:
        # aiohttp's own keep-alive timer is a backstop for ours, set to fire after it (ours
        # may be one sweep late); lingering (reading and dropping a body the handler did
        # not read) is bounded by the head timeout.
        kwargs.setdefault("keepalive_timeout", limits.idle_timeout_s + 1.0)
        kwargs.setdefault("lingering_time", min(limits.header_timeout_s, limits.body_timeout_s))
        kwargs.setdefault("access_log", None)
        super().__init__(self._tracked, **kwargs)
        self._inner = handler
        self._protocol_kwargs = kwargs
        self._protocol_kwargs.pop("request_factory", None)
        self._protocol_kwargs.pop("handler_cancellation", None)
        self.event_loop = asyncio.get_running_loop()
        self.limits = limits
        self.metrics = metrics
        self.throttle = throttle or LogThrottle(logger)
        self.open_connections = 0
        self._per_source: dict[str, int] = {}
        # One queue per timeout length (idle, head, linger), each in deadline order since
        # its length is fixed: a sweep every `_sweep_period_s` pops the expired from the
        # front. A uvloop TimerHandle per connection cost ~20 us to arm: a burst of
        # thousands of connections held the loop (and Raft's ticks) that much longer.
        self._timers: dict[float, dict[ClientConnection, float]] = {}
        shortest_s = min(limits.header_timeout_s, limits.idle_timeout_s, _LINGER_S)
        self._sweep_period_s = min(0.5, max(0.01, shortest_s / 4))
        self._sweeper: asyncio.TimerHandle | None = self.event_loop.call_later(
            self._sweep_period_s, self._sweep
        )
        # Connections with no request in progress, longest idle first (dicts keep order).
        self._idle: dict[ClientConnection, None] = {}
        if metrics is not None:
            # Read at scrape time: a gauge set per connect and close takes a lock each time,
            # and thousands of clients may come or go in one turn of the loop.
            metrics.client_connections.set_function(lambda: self.open_connections)

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await super().shutdown(timeout)

    # --- timers (a timeout fires at most one sweep period late) ---------------------------

    def arm(self, connection: ClientConnection, delay_s: float) -> None:
        if connection.timer_delay is not None:  # disarm, inline: this runs per request
            self._timers[connection.timer_delay].pop(connection, None)
        queue = self._timers.get(delay_s)
        if queue is None:
            queue = self._timers[delay_s] = {}
        queue[connection] = self.event_loop.time() + delay_s
        connection.timer_delay = delay_s

    def disarm(self, connection: ClientConnection) -> None:
        if connection.timer_delay is not None:
            self._timers[connection.timer_delay].pop(connection, None)
            connection.timer_delay = None

    def _sweep(self) -> None:
        now = self.event_loop.time()
        expired: list[ClientConnection] = []
        for queue in self._timers.values():
            for connection, deadline in queue.items():
                if deadline > now:
                    break
                expired.append(connection)
        for connection in expired:
            self.disarm(connection)
            try:
                connection.on_timeout()
            except Exception as exc:  # a bug of ours: keep sweeping the others
                self.throttle.log(
                    "sweep_error", logging.ERROR, "event=client_timer_error", exc_info=exc
                )
        self._sweeper = self.event_loop.call_later(self._sweep_period_s, self._sweep)

    def __call__(self) -> ClientConnection:
        return ClientConnection(self, loop=self.event_loop, **self._protocol_kwargs)

    async def _tracked(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = request.protocol
        if not isinstance(connection, ClientConnection):
            return await self._inner(request)
        connection.request_started()
        try:
            return await self._inner(request)
        finally:
            connection.request_finished()

    # --- admission ----------------------------------------------------------------------

    def admit(self, connection: ClientConnection) -> bool:
        """Count a new connection in, evicting the longest idle one at the total bound;
        False if it must be refused."""
        source = connection.source
        if self._per_source.get(source, 0) >= self.limits.per_source_max:
            self._refused("per_source")
            return False
        if self.open_connections >= self.limits.connections_max:
            victim = next(iter(self._idle), None)
            if victim is None:
                self._refused("total")
                return False
            self.release(victim)
            victim.close_now("evicted")
        self.open_connections += 1
        connection.counted = True
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self._idle[connection] = None
        return True

    def release(self, connection: ClientConnection) -> None:
        """Count a connection out (idempotent: eviction releases before the close lands)."""
        self._idle.pop(connection, None)
        if not connection.counted:
            return
        connection.counted = False
        self.open_connections -= 1
        source = connection.source
        left = self._per_source.get(source, 0) - 1
        if left > 0:
            self._per_source[source] = left
        else:
            self._per_source.pop(source, None)

    # The three steps of each request, one call each (they run for every request, so the
    # bookkeeping is written out here rather than spread over small helpers).

    def head_started(self, connection: ClientConnection) -> None:
        """A request head began to arrive: the head timeout runs, and the connection moves
        to the end of the eviction order (the newest; it still counts as idle there, since
        a crowd of half-sent heads must not lock out a client with a whole request)."""
        if connection.counted:
            self._idle.pop(connection, None)
            self._idle[connection] = None
        self.arm(connection, self.limits.header_timeout_s)

    def busy(self, connection: ClientConnection) -> None:
        """A request is being handled: no deadline of ours, and never evicted."""
        self.disarm(connection)
        self._idle.pop(connection, None)

    def idle(self, connection: ClientConnection) -> None:
        """A request was answered: the idle timeout runs, and the connection is the newest
        in the eviction order."""
        self._idle.pop(connection, None)
        self._idle[connection] = None
        self.arm(connection, self.limits.idle_timeout_s)

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.client_connections_refused.labels(bound=reason).inc()
        self.throttle.log(
            "connection_refused", logging.WARNING, "event=client_connection_refused bound=%s", reason
        )

    def closed_for(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.client_connections_closed.labels(reason=reason).inc()
