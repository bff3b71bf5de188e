"""Fault-injecting TCP proxies that sit on the directed links between peers.

Node i reaches node j's peer port only through the proxy for the link (i, j), so the nemesis
can cut, slow or break exactly that direction: a symmetric partition faults both (i, j) and
(j, i); a one-way partition faults only one. Each node sends its messages on the connection
it dialled itself, so the link (i, j) carries exactly the messages from i to j.

Faults on a link (`LinkFaults`):
- `stall`: what dropped packets look like to TCP, and what partitions use: a connection that
  carries a byte (or a FIN or RST) while the link is stalled stops forwarding anything, both
  ways, and stays open without an error (no RST, no FIN) for good, even after the heal, the way a real
  connection sits in retransmission backoff for seconds to minutes after a partition; the
  proxy stops reading it, so the sender's buffers fill as they would. New connections are
  accepted and held the same way; after the heal, new connections work;
- `blackhole`: bytes are swallowed in both directions and connections stay open; after the
  heal a connection that lost bytes is reset when it next carries one;
- `delay_ms` / `jitter_ms`: every chunk is held back, in order, before it is forwarded;
- `loss`: the probability, per chunk, that the link breaks (both sockets are reset), which is
  how packet loss surfaces to a TCP stream: a connection that stalls and is torn down;
- `reset`: every current connection is reset now and new ones are refused until cleared.

Randomness comes from an injected `random.Random` so a drill's fault schedule replays by seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from dataclasses import dataclass, replace

logger = logging.getLogger("kvstore.chaos")

_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkFaults:
    stall: bool = False
    blackhole: bool = False
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    reset: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be within [0, 1], got {self.loss}")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must not be negative")

    @property
    def healthy(self) -> bool:
        return self == HEALTHY


HEALTHY = LinkFaults()


class LinkProxy:
    """One listening socket on 127.0.0.1 forwarding to `target`, with switchable faults."""

    def __init__(
        self,
        name: str,
        target: tuple[str, int],
        rng: random.Random,
        listen_port: int = 0,
    ) -> None:
        self.name = name
        self.target = target
        self._rng = rng
        self._listen_port = listen_port
        self._faults = HEALTHY
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections_accepted = 0
        self.connections_broken = 0
        self.connections_stalled = 0
        self.bytes_swallowed = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        sockets = self._server.sockets
        port: int = sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def faults(self) -> LinkFaults:
        return self._faults

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, host="127.0.0.1", port=self._listen_port, reuse_address=True
        )

    def set_faults(self, faults: LinkFaults) -> None:
        """Switch the link's faults; a reset or blackhole applies to open connections now."""
        self._faults = faults
        if faults.reset:
            for connection in list(self._connections):
                self._break(connection, "reset")

    def heal(self) -> None:
        self.set_faults(HEALTHY)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    # --- connections -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self._faults.reset:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            # The target is down: the dialler sees its connection closed, as it would directly.
            _abort(writer)
            return
        connection = _Connection(writer, up_writer)
        self._connections.add(connection)
        try:
            async with asyncio.TaskGroup() as group:
                for source, sink in ((reader, up_writer), (up_reader, writer)):
                    task = group.create_task(
                        self._pump(connection, source, sink), name=f"proxy-{self.name}"
                    )
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except* (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(connection)
            connection.abort()

    async def _pump(
        self, connection: _Connection, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        while not connection.closed:
            try:
                chunk = await source.read(_CHUNK_BYTES)
            except ConnectionError:
                chunk = b""
            if not chunk:
                if connection.stalled or self._faults.stall:
                    # A FIN or RST is a packet too: on a stalled link it never arrives.
                    await self._hold(connection)
                    return
                connection.abort()
                return
            faults = self._faults
            if faults.reset:
                self._break(connection, "reset")
                return
            if faults.stall or connection.stalled:
                # Held, never forwarded: counted with what a blackhole swallows.
                self.bytes_swallowed += len(chunk)
                await self._hold(connection)
                return
            if faults.blackhole:
                # Swallowed bytes leave a hole in the stream: once healed, the connection is
                # broken rather than resumed mid-frame, as TCP would give up on it.
                connection.tainted = True
                self.bytes_swallowed += len(chunk)
                continue
            if connection.tainted:
                self._break(connection, "healed_after_blackhole")
                return
            if faults.loss and self._rng.random() < faults.loss:
                self._break(connection, "loss")
                return
            if faults.delay_ms or faults.jitter_ms:
                delay_ms = faults.delay_ms + self._rng.uniform(0.0, faults.jitter_ms)
                await asyncio.sleep(delay_ms / 1000.0)
            if connection.closed:
                return
            sink.write(chunk)
            await sink.drain()

    async def _hold(self, connection: _Connection) -> None:
        """Stall `connection` for good: stop reading and forwarding, until the proxy closes."""
        if not connection.stalled:
            connection.stalled = True
            self.connections_stalled += 1
            logger.debug("event=link_stalled link=%s", self.name)
        await connection.closed_event.wait()

    def _break(self, connection: _Connection, why: str) -> None:
        self.connections_broken += 1
        logger.debug("event=link_broken link=%s why=%s", self.name, why)
        connection.abort()


class _Connection:
    """Both sockets of one proxied connection; aborting either side aborts both."""

    def __init__(self, downstream: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.downstream = downstream
        self.upstream = upstream
        self.closed = False
        self.closed_event = asyncio.Event()
        self.tainted = False
        self.stalled = False

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.closed_event.set()
            _abort(self.downstream)
            _abort(self.upstream)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN, as a broken link looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ProxyMesh:
    """A proxy on every directed link (i, j), i != j, of a cluster's peer network."""

    def __init__(
        self,
        peer_targets: dict[int, tuple[str, int]],
        rng: random.Random,
        cut_faults: LinkFaults | None = None,
    ) -> None:
        self._targets = dict(peer_targets)
        self._rng = rng
        # What a partition does to a cut link: stall, as dropped packets do.
        self.cut_faults = cut_faults or LinkFaults(stall=True)
        self.links: dict[tuple[int, int], LinkProxy] = {}

    async def start(self) -> None:
        for source in self._targets:
            for target, address in self._targets.items():
                if source != target:
                    proxy = LinkProxy(f"{source}->{target}", address, self._rng)
                    await proxy.start()
                    self.links[(source, target)] = proxy

    def dial_addresses(self) -> dict[int, dict[int, str]]:
        """For each node, the address it should dial for each peer (its own stays direct)."""
        addresses: dict[int, dict[int, str]] = {}
        for source, (host, port) in self._targets.items():
            row = {source: f"{host}:{port}"}
            for target in self._targets:
                if target != source:
                    row[target] = self.links[(source, target)].address
            addresses[source] = row
        return addresses

    def set_link(self, source: int, target: int, faults: LinkFaults) -> None:
        self.links[(source, target)].set_faults(faults)

    def isolate(self, node: int, faults: LinkFaults | None = None) -> None:
        """Cut `node` off from every peer, both directions (by default by stalling)."""
        cut = faults or self.cut_faults
        for (source, target), proxy in self.links.items():
            if node in (source, target):
                proxy.set_faults(cut)

    def partition(self, *groups: set[int], one_way: bool = False) -> None:
        """Cut every link between nodes of different groups. With `one_way`, only links from
        an earlier group to a later one are cut: later groups still reach earlier ones."""
        for position, sources in enumerate(groups):
            for later in groups[position + 1 :]:
                self.cut_between(sources, later, one_way=one_way)

    def bridge(self, left: set[int], right: set[int]) -> None:
        """Cut `left` from `right`; nodes in neither group (the bridge) still reach both."""
        self.cut_between(left, right)

    def cut_between(self, sources: set[int], targets: set[int], *, one_way: bool = False) -> None:
        cut = self.cut_faults
        for (source, target), proxy in self.links.items():
            forward = source in sources and target in targets
            backward = source in targets and target in sources
            if forward or (backward and not one_way):
                proxy.set_faults(cut)

    def degrade(self, faults: LinkFaults) -> None:
        """Apply the same faults (slow, lossy) to every link."""
        for proxy in self.links.values():
            proxy.set_faults(replace(faults))

    def heal(self) -> None:
        for proxy in self.links.values():
            proxy.heal()

    def bytes_swallowed(self) -> int:
        return sum(proxy.bytes_swallowed for proxy in self.links.values())

    async def close(self) -> None:
        for proxy in self.links.values():
            await proxy.close()
