"""Workloads for chaos drills: client processes that record what they asked and what came back.

Each logical process runs one operation at a time and records it in the history format of
kvstore/verify/history.py: `invoke` before the first attempt, `return` after the final answer (the
client library's retries happen inside one operation), `return: None` when the outcome is
unknown (after which the process continues under a new process id), `ok: False` for a definite
failure that did not take effect.

- `register`: get / put / cas over a window of keys that rotates during the run, so each key's
  history stays small enough for the linearizability search; values are unique, so a read
  names the write it saw. Reads go to a random node (followers answer through ReadIndex), so
  a node that answers from stale state is caught wherever it sits. A cas compares on the key's revision, which (values being unique)
  is the same as comparing on the value the process last read; it is recorded as a
  value-compare `cas` for the checker. Half the cas go through a transaction
  (`POST /v1/txn`: compare the revision, then put), so the checker covers transactions too.
- `counter`: a retry storm: every increment is a cas read-modify-write with a request id, and
  each attempt is also fired again, concurrently, with the same request id at other nodes; the
  counter must end within [acknowledged, acknowledged + unknown], and every duplicate must get
  the first answer.
- `append`: each operation appends a unique element to a key's list through a cas loop; the
  final lists must hold every acknowledged element exactly once.
- `watch`: the register workload, with watchers beside it (kvstore/chaos/coordination.py).
- `lock`: processes take a `Lock` in turns and act on a resource with their fencing token
  (kvstore/chaos/coordination.py); the holders' writes go into the register history.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kvstore.chaos.coordination import LockWorkload
from kvstore.client import Client, ClientConfig, Compare, Op, PutResult
from kvstore.client.transport import tls_context
from kvstore.errors import (
    ClusterError,
    DeadlineExceededError,
    KVStoreError,
    NotFoundError,
    PreconditionFailedError,
)

logger = logging.getLogger("kvstore.chaos")

WORKLOADS = ("register", "counter", "append", "watch", "lock")


@dataclass(slots=True)
class History:
    """Operations in kvstore/verify/history.py's format, in the order they completed."""

    operations: list[dict[str, Any]] = field(default_factory=list)
    _next_process: itertools.count[int] = field(default_factory=lambda: itertools.count(0))

    def new_process(self) -> int:
        return next(self._next_process)

    def record(self, operation: dict[str, Any]) -> None:
        self.operations.append(operation)

    def write_jsonl(self, path: Any) -> None:
        with open(path, "w", encoding="utf-8") as out:
            for operation in self.operations:
                out.write(json.dumps(operation, sort_keys=True) + "\n")

    def counts(self) -> dict[str, int]:
        ok = sum(1 for op in self.operations if op["ok"] and op["return"] is not None)
        unknown = sum(1 for op in self.operations if op["return"] is None)
        failed = sum(1 for op in self.operations if not op["ok"])
        return {"operations": len(self.operations), "ok": ok, "unknown": unknown, "failed": failed}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadConfig:
    kind: str = "register"
    processes: int = 6
    keys_per_window: int = 4
    key_window_s: float = 10.0
    operation_timeout_s: float = 3.0
    read_timeout_s: float = 0.5
    # Pause between a process's operations, so faults, not the workload, decide the load.
    think_s: float = 0.005
    storm_copies: int = 3
    # A cluster with TLS and --auth (a drill's --secure): the CA of the nodes' certificates
    # and the bearer token every request carries ("" for neither).
    ca_file: str = ""
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.kind!r}")
        if self.processes < 1:
            raise ValueError("processes must be at least 1")


@dataclass(slots=True)
class CounterTally:
    """What the counter workload knows at the end: acknowledged and unknown increments, and
    duplicates of a request that were answered differently from the first answer."""

    acknowledged: int = 0
    unknown: int = 0
    storm_duplicates_sent: int = 0
    storm_mismatches: list[str] = field(default_factory=list)


class Workload:
    """Runs `config.processes` concurrent logical clients against `endpoints` until stopped."""

    def __init__(
        self,
        endpoints: Sequence[str],
        config: WorkloadConfig,
        rng: random.Random,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.endpoints = list(endpoints)
        self.config = config
        self.history = History()
        self.tally = CounterTally()
        self._rng = rng
        self._clock_ns = clock_ns
        self._stop = asyncio.Event()
        self._started_ns = clock_ns()
        self.keys_used: set[str] = set()
        self.lock: LockWorkload | None = None

    def stop(self) -> None:
        self._stop.set()
        if self.lock is not None:
            self.lock.stop()

    async def run(self) -> None:
        config = self.config
        client_config = ClientConfig(
            timeout_s=config.operation_timeout_s, ca_file=config.ca_file, token=config.token
        )
        if config.kind == "lock":
            self.keys_used.add("lock-owner")
            self.lock = LockWorkload(
                self.endpoints, config.processes, self._rng, self._record, client_config
            )
            if self._stop.is_set():
                self.lock.stop()
            await self.lock.run(self.history.new_process)
            return
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(Client(self.endpoints, config=client_config))
            raw = await stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=tls_context(config.ca_file)),
                    headers={"Authorization": f"Bearer {config.token}"} if config.token else None,
                )
            )
            async with asyncio.TaskGroup() as group:
                for slot in range(self.config.processes):
                    seed = self._rng.getrandbits(64)
                    group.create_task(
                        self._process(client, raw, slot, random.Random(seed)),
                        name=f"workload-{slot}",
                    )

    # --- one logical process ---------------------------------------------------------------

    async def _process(
        self, client: Client, raw: aiohttp.ClientSession, slot: int, rng: random.Random
    ) -> None:
        process = self.history.new_process()
        serial = itertools.count(1)
        while not self._stop.is_set():
            if self.config.kind in ("register", "watch"):
                known = await self._register_step(client, raw, process, slot, serial, rng)
            elif self.config.kind == "counter":
                known = await self._counter_step(client, raw, process, rng)
            else:
                known = await self._append_step(client, process, slot, serial, rng)
            if not known:
                process = self.history.new_process()
            await asyncio.sleep(self.config.think_s)

    def _key(self, rng: random.Random) -> str:
        elapsed_s = (self._clock_ns() - self._started_ns) / 1e9
        window = int(elapsed_s // self.config.key_window_s)
        key = f"r{window}-{rng.randrange(self.config.keys_per_window)}"
        self.keys_used.add(key)
        return key

    async def _register_step(
        self,
        client: Client,
        raw: aiohttp.ClientSession,
        process: int,
        slot: int,
        serial: itertools.count[int],
        rng: random.Random,
    ) -> bool:
        key = self._key(rng)
        choice = rng.random()
        if choice < 0.5:
            return await self._get_at(raw, rng.choice(self.endpoints), process, key)
        value = f"v{slot}-{next(serial)}-{process}"
        if choice < 0.8:
            return await self._put(client, process, key, value)
        return await self._cas(client, process, key, value)

    async def _get_at(
        self, raw: aiohttp.ClientSession, endpoint: str, process: int, key: str
    ) -> bool:
        """A linearizable read at one node, over plain HTTP: the client library would learn
        the leader and send every read there, and the point is to read at every node (a
        follower serves it after a ReadIndex round with the leader)."""
        invoke = self._clock_ns()
        url = f"{endpoint}/v1/kv/{urllib.parse.quote(key, safe='')}"
        try:
            async with asyncio.timeout(self.config.read_timeout_s):
                async with raw.get(url, allow_redirects=False) as answer:
                    body, status = await answer.read(), answer.status
        except (TimeoutError, aiohttp.ClientError):
            status, body = 0, b""
        if status not in (200, 404):
            # A read that failed took no effect: a definite failure.
            self._record(process, "get", key, None, None, invoke, self._clock_ns(), False, None)
            return True
        output = body.decode() if status == 200 else None
        self._record(process, "get", key, None, None, invoke, self._clock_ns(), True, output)
        return True

    async def _put(self, client: Client, process: int, key: str, value: str) -> bool:
        invoke = self._clock_ns()
        try:
            await client.put(key, value.encode())
        except DeadlineExceededError:
            self._record(process, "put", key, value, None, invoke, None, True, None)
            return False
        except (ClusterError, KVStoreError):
            self._record(process, "put", key, value, None, invoke, None, True, None)
            return False
        self._record(process, "put", key, value, None, invoke, self._clock_ns(), True, None)
        return True

    async def _cas(self, client: Client, process: int, key: str, value: str) -> bool:
        try:
            current = await client.get(key)
            expected: str | None = current.value.decode()
            revision = current.mod_revision
        except NotFoundError:
            expected, revision = None, 0
        except KVStoreError:
            return True
        invoke = self._clock_ns()
        try:
            if len(value) % 2:
                # Half the compare-and-sets go through POST /v1/txn, so transactions are in
                # the linearizability check too (issue 14).
                result = await client.txn(
                    compare=[Compare.mod_revision(key, "=", revision)],
                    success=[Op.put(key, value.encode())],
                )
                if not result.succeeded:
                    raise PreconditionFailedError("the transaction's comparison failed")
            else:
                await client.cas(key, value.encode(), mod_revision=revision)
        except PreconditionFailedError:
            self._record(
                process, "cas", key, value, expected, invoke, self._clock_ns(), True, False
            )
            return True
        except KVStoreError:
            self._record(process, "cas", key, value, expected, invoke, None, True, None)
            return False
        self._record(process, "cas", key, value, expected, invoke, self._clock_ns(), True, True)
        return True

    def _record(
        self,
        process: int,
        op: str,
        key: str,
        value: str | None,
        expected: str | None,
        invoke: int,
        returned: int | None,
        ok: bool,
        output: Any,
    ) -> None:
        self.history.record(
            {
                "process": process,
                "op": op,
                "key": key,
                "value": value,
                "expected": expected,
                "invoke": invoke,
                "return": returned,
                "ok": ok,
                "output": output,
            }
        )

    # --- counter: a retry storm ------------------------------------------------------------

    async def _counter_step(
        self, client: Client, raw: aiohttp.ClientSession, process: int, rng: random.Random
    ) -> bool:
        key = "counter"
        self.keys_used.add(key)
        try:
            current = await client.get(key)
            count, revision = int(current.value), current.mod_revision
        except NotFoundError:
            count, revision = 0, 0
        except KVStoreError:
            return True
        try:
            result = await client.cas(key, str(count + 1).encode(), mod_revision=revision)
        except PreconditionFailedError:
            return True
        except KVStoreError:
            self.tally.unknown += 1
            return False
        self.tally.acknowledged += 1
        await self._storm(raw, key, str(count + 1), revision, result, rng)
        return True

    async def _storm(
        self,
        raw: aiohttp.ClientSession,
        key: str,
        value: str,
        revision: int,
        result: PutResult,
        rng: random.Random,
    ) -> None:
        """Send the request just answered again, same request id, at several nodes at once:
        every copy must be answered with the first answer (or refused as a request whose
        session entry was already released, 409 session_expired) and apply nothing."""
        request_id = result.request_id
        if not request_id:
            return
        # Acked-Below 0 releases nothing: a copy must not shorten the session it tests.
        headers = {
            "Kvstore-Request-Id": request_id,
            "Kvstore-Acked-Below": "0",
            "If-Match": str(revision),
        }
        targets = [rng.choice(self.endpoints) for _ in range(self.config.storm_copies)]

        async def put(url: str) -> tuple[int, str | None, Any]:
            # Redirects are followed here, one hop, not by aiohttp: it drops the
            # Authorization header (a secure drill's token) on a redirect to another port.
            async with raw.put(
                url, data=value.encode(), headers=headers, allow_redirects=False
            ) as answer:
                body = await answer.json(content_type=None)
                return answer.status, answer.headers.get("Location"), body

        async def duplicate(endpoint: str) -> None:
            url = f"{endpoint}/v1/kv/{key}"
            try:
                async with asyncio.timeout(self.config.operation_timeout_s):
                    status, location, body = await put(url)
                    if status == 307 and location:
                        status, location, body = await put(location)
                    if status == 307:
                        return
                    if status in (429, 503) or status >= 500:
                        return  # not answered: says nothing either way
                    self.tally.storm_duplicates_sent += 1
                    same = status == 200 and body.get("mod_revision") == result.mod_revision
                    released = status == 409 and _error_code(body) == ("session_expired")
                    if not (same or released):
                        self.tally.storm_mismatches.append(
                            f"{request_id} at {endpoint}: {status} {body}"
                        )
            except (TimeoutError, aiohttp.ClientError, ValueError):
                return

        async with asyncio.TaskGroup() as group:
            for endpoint in targets:
                group.create_task(duplicate(endpoint), name="storm-copy")

    # --- append ----------------------------------------------------------------------------

    async def _append_step(
        self,
        client: Client,
        process: int,
        slot: int,
        serial: itertools.count[int],
        rng: random.Random,
    ) -> bool:
        key = f"list-{rng.randrange(self.config.keys_per_window)}"
        self.keys_used.add(key)
        element = f"{slot}.{next(serial)}.{process}"
        try:
            current = await client.get(key)
            items, revision = json.loads(current.value), current.mod_revision
        except NotFoundError:
            items, revision = [], 0
        except KVStoreError:
            return True
        invoke = self._clock_ns()
        try:
            await client.cas(key, json.dumps([*items, element]).encode(), mod_revision=revision)
        except PreconditionFailedError:
            self._record(
                process, "append", key, element, None, invoke, self._clock_ns(), False, None
            )
            return True
        except KVStoreError:
            self._record(process, "append", key, element, None, invoke, None, True, None)
            return False
        self._record(process, "append", key, element, None, invoke, self._clock_ns(), True, None)
        return True


def _error_code(body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None
