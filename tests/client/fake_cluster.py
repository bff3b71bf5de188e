"""An in-process stand-in for LocalCluster: three HTTP endpoints sharing one store.

It speaks the parts of the HTTP API contract the client relies on (leader headers, 307 to the
leader, 503 no_leader with Retry-After, request-id deduplication, If-Match / If-None-Match),
on real sockets, so the client's real transport sees real refused and reset connections
when a node is "killed" (its server closed). There is no Raft here: the store is one dict,
which is exactly what lets these tests check the *client* (each write applied once, every
call within its deadline) independently of the server's progress.

It runs its own event loop in a thread, so its methods are synchronous like LocalCluster's.
`crash_next_write_after_apply()` makes the leader apply the next write and then die without
answering: the client sees a reset after the write took effect, the case exactly-once is for.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")

NODE = web.AppKey("node", int)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Item:
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


class FakeCluster:
    def __init__(self, size: int = 3, *, election_delay_s: float = 0.05, seed: int = 1) -> None:
        self.size = size
        self.ports = {node: free_port() for node in range(1, size + 1)}
        self.client_urls = [f"http://127.0.0.1:{port}" for port in self.ports.values()]
        self.election_delay_s = election_delay_s
        self.rng = random.Random(seed)
        self.leader: int | None = None
        self.revision = 0
        self.store: dict[str, Item] = {}
        self.sessions: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
        # How many times each request id was applied (must never exceed 1).
        self.applied: dict[str, int] = {}
        self._crash_after_apply = False
        self._runners: dict[int, web.AppRunner] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    # --- the LocalCluster-like API ---------------------------------------------------------

    def client_url(self, node: int) -> str:
        return f"http://127.0.0.1:{self.ports[node]}"

    def start(self) -> None:
        for node in self.ports:
            self.start_node(node)
        self.leader = 1

    def start_node(self, node: int) -> None:
        self._run(self._start_node(node))

    def kill(self, node: int) -> None:
        self._run(self._kill(node))

    def pid(self, node: int) -> int | None:
        return node if node in self._runners else None

    def status(self, node: int, timeout_s: float = 1.0) -> dict[str, Any] | None:
        if node not in self._runners:
            return None
        role = "leader" if node == self.leader else "follower"
        return {"id": node, "role": role, "leader_id": self.leader or 0}

    def wait_for_leader(self, timeout_s: float = 10.0, exclude: Sequence[int] = ()) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.leader
            if leader is not None and leader not in exclude:
                return leader
            time.sleep(0.01)
        raise TimeoutError("no leader")

    def crash_next_write_after_apply(self) -> None:
        self._crash_after_apply = True

    def stop(self) -> None:
        for node in list(self._runners):
            self.kill(node)
        self._run(self._cancel_leftovers())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # --- internals ---------------------------------------------------------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _start_node(self, node: int) -> None:
        app = web.Application()
        app[NODE] = node
        app.router.add_route("*", "/v1/kv/{key:.+}", self._handle_key)
        app.router.add_get("/v1/status", self._handle_status)
        runner = web.AppRunner(app, shutdown_timeout=0.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.ports[node]).start()
        self._runners[node] = runner

    async def _cancel_leftovers(self) -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _kill(self, node: int) -> None:
        runner = self._runners.pop(node, None)
        if node == self.leader:
            self.leader = None
            self._loop.call_later(self.election_delay_s, self._elect)
        if runner is not None:
            await runner.cleanup()

    def _elect(self) -> None:
        alive = sorted(self._runners)
        if alive and self.leader is None:
            self.leader = self.rng.choice(alive)

    def _headers(self, node: int) -> dict[str, str]:
        leader = "" if self.leader is None else self.client_url(self.leader)
        return {"Kvstore-Node": str(node), "Kvstore-Leader": leader}

    def _error(self, node: int, status: int, code: str, **extra: Any) -> web.Response:
        leader = None if self.leader is None else self.client_url(self.leader)
        body = {"error": {"code": code, "message": code, "leader": leader, **extra}}
        headers = self._headers(node)
        if status == 503:
            headers["Retry-After"] = "0.05"
        if status == 307 and leader is not None:
            headers["Location"] = leader
        return web.json_response(body, status=status, headers=headers)

    async def _handle_status(self, request: web.Request) -> web.Response:
        node = request.app[NODE]
        return web.json_response(self.status(node), headers=self._headers(node))

    async def _handle_key(self, request: web.Request) -> web.StreamResponse:
        node = request.app[NODE]
        key = request.match_info["key"]
        if request.method == "GET":
            return self._get(node, key)
        if self.leader is None:
            return self._error(node, 503, "no_leader")
        if node != self.leader:
            return self._error(node, 307, "not_leader")
        request_id = request.headers.get("Kvstore-Request-Id", "")
        client_id, _, seq = request_id.rpartition(":")
        session_key = (client_id, int(seq or 0))
        if request_id and session_key in self.sessions:
            status, body = self.sessions[session_key]
            return web.json_response(body, status=status, headers=self._headers(node))
        status, body = self._apply_put(key, await request.read(), request.headers)
        if request_id:
            self.sessions[session_key] = (status, body)
            self.applied[request_id] = self.applied.get(request_id, 0) + 1
        if self._crash_after_apply:
            self._crash_after_apply = False
            # Like SIGKILL: the connection is reset with the answer unsent, then the node is gone.
            if request.transport is not None:
                request.transport.abort()
            await self._kill(node)
        return web.json_response(body, status=status, headers=self._headers(node))

    def _get(self, node: int, key: str) -> web.Response:
        item = self.store.get(key)
        if item is None:
            return self._error(node, 404, "not_found")
        headers = self._headers(node) | {
            "Kvstore-Revision": str(self.revision),
            "Kvstore-Create-Revision": str(item.create_revision),
            "Kvstore-Mod-Revision": str(item.mod_revision),
            "Kvstore-Version": str(item.version),
        }
        return web.Response(body=item.value, headers=headers)

    def _apply_put(self, key: str, value: bytes, headers: Any) -> tuple[int, dict[str, Any]]:
        item = self.store.get(key)
        current = 0 if item is None else item.mod_revision
        if_match = headers.get("If-Match")
        if (if_match is not None and int(if_match) != current) or (
            headers.get("If-None-Match") == "*" and item is not None
        ):
            error = {"code": "precondition_failed", "message": "", "current_revision": current}
            return 412, {"error": error}
        self.revision += 1
        created = self.revision if item is None else item.create_revision
        version = 1 if item is None else item.version + 1
        self.store[key] = Item(value, created, self.revision, version)
        answer = {"key": key, "revision": self.revision, "create_revision": created}
        return 200, answer | {"mod_revision": self.revision, "version": version}
