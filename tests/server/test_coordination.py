"""The coordination API in one process (driver + HTTP + leases + watches on MemoryStorage):
transactions, paginated and past-revision ranges, range deletes, watches and leases."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvstore.raft.config import RaftConfig
from kvstore.replica import Replica
from kvstore.server.config import ServeConfig
from kvstore.server.coordination import CoordinationApi
from kvstore.server.driver import Driver
from kvstore.server.http import HttpApi
from kvstore.server.leases import LeaseService
from kvstore.server.metrics import NodeMetrics
from kvstore.server.node import kv_config
from kvstore.server.watch import WatchApi, WatchHub
from kvstore.storage.memory import MemoryStorage


async def _until(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.002)


class Node:
    def __init__(
        self, client: aiohttp.ClientSession, driver: Driver, leases: LeaseService, hub: WatchHub
    ) -> None:
        self.client, self.driver, self.leases, self.hub = client, driver, leases, hub


@pytest.fixture
async def node(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    config = ServeConfig(
        id=1,
        peers=((1, "127.0.0.1:1"),),
        data_dir=tmp_path,
        tick_interval_ms=1,
        lease_check_interval_ms=5,
        **overrides,
    )
    replica = Replica(
        RaftConfig(id=1, peers=(1,)),
        MemoryStorage(),
        random.Random(7),
        defer_snapshots=True,
        kv_config=kv_config(config),
    )
    driver = Driver(config, replica, NodeMetrics(1), lambda message: None, lambda peer: None)
    http = HttpApi(driver, "test")
    leases = LeaseService(driver)
    hub = WatchHub(driver)
    CoordinationApi(http, leases)
    WatchApi(http, hub)
    loop = asyncio.get_running_loop()
    task = loop.create_task(driver.run())
    lease_task = loop.create_task(leases.run())
    runner = web.ServerRunner(http.build_server())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
    try:
        await _until(driver.is_leader)
        await _until(lambda: driver.applied_index() >= 1)
        yield Node(client, driver, leases, hub)
    finally:
        hub.close()
        await client.close()
        await runner.cleanup()
        lease_task.cancel()
        driver.stop()
        await asyncio.wait_for(task, 5)
        driver.close()


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


async def _txn(node: Node, body: dict[str, Any], status: int = 200, **headers: str) -> Any:
    response = await node.client.post("/v1/txn", json=body, headers=headers)
    answer = await response.json()
    assert response.status == status, answer
    return answer


async def test_a_four_key_cas_txn_applies_in_one_revision_and_exactly_once(node: Node) -> None:
    keys = ["a", "b", "c", "d"]
    revisions = []
    for key in keys:
        answer = await (await node.client.put(f"/v1/kv/{key}", data=b"0")).json()
        revisions.append(answer["mod_revision"])
    body = {
        "compare": [
            {"key": k, "target": "mod_revision", "op": "=", "value": r}
            for k, r in zip(keys, revisions)
        ],
        "success": [{"op": "put", "key": k, "value_text": "1"} for k in keys],
        "failure": [{"op": "get", "key": k} for k in keys],
    }
    answer = await _txn(node, body, **{"Kvstore-Request-Id": "app:1"})
    assert answer["succeeded"] and answer["revision"] == 5
    assert [r["revision"] for r in answer["responses"]] == [5] * 4
    again = await _txn(node, body, **{"Kvstore-Request-Id": "app:1"})
    assert again["succeeded"] and again["revision"] == 5  # the first answer, not re-applied
    failed = await _txn(node, body, **{"Kvstore-Request-Id": "app:2"})
    assert not failed["succeeded"] and failed["revision"] == 5
    assert [r["kvs"][0]["value"] for r in failed["responses"]] == [b64(b"1")] * 4


async def test_a_read_only_txn_is_not_proposed(node: Node) -> None:
    await node.client.put("/v1/kv/x", data=b"1")
    applied = node.driver.applied_index()
    body = {
        "compare": [{"key": "x", "target": "value", "value": b64(b"1")}],
        "success": [{"op": "range", "prefix": "", "limit": 5}],
    }
    answer = await _txn(node, body)
    assert answer["succeeded"] and answer["responses"][0]["count"] == 1
    assert node.driver.applied_index() == applied


@pytest.mark.parametrize("node", [{"txn_ops_max": 4}], indirect=True)
async def test_bad_transactions_are_400_and_change_nothing(node: Node) -> None:
    too_many = {"success": [{"op": "put", "key": f"k{i}", "value": ""} for i in range(5)]}
    cases: list[Any] = [
        too_many,
        {"success": [{"op": "put", "key": "a"}, {"op": "delete", "key": "a"}]},
        {"compare": [{"key": "a", "target": "colour", "value": 1}]},
        {"compare": [{"key": "a", "target": "version", "op": "~", "value": 1}]},
        {"success": [{"op": "put", "key": "a", "value": "not base64!"}]},
        {"success": [{"op": "put", "key": "a\x01", "value": ""}]},
        {"success": [{"op": "range", "prefix": "", "limit": 0}]},
        {"success": "put"},
        {"surprise": []},
        [1, 2],
    ]
    for body in cases:
        error = await _txn(node, body, status=400)
        assert error["error"]["code"] == "bad_request", body
    response = await node.client.post("/v1/txn", data=b"{nope")
    assert response.status == 400
    assert node.driver.replica.state_machine.revision == 0


async def test_pagination_reads_every_key_past_any_limit_and_range_delete(node: Node) -> None:
    for i in range(25):
        await node.client.put(f"/v1/kv/p/{i:02d}", data=b"v")
    await node.client.put("/v1/kv/q", data=b"v")
    seen: list[str] = []
    start = ""
    while True:
        page = await (
            await node.client.get("/v1/kv", params={"prefix": "p/", "limit": "10", "start": start})
        ).json()
        seen += [item["key"] for item in page["items"]]
        if not page["more"]:
            assert page["next"] is None
            break
        start = page["next"]
    assert seen == [f"p/{i:02d}" for i in range(25)]
    answer = await (await node.client.delete("/v1/kv", params={"prefix": "p/"})).json()
    assert answer == {"revision": 27, "deleted": 25}
    page = await (await node.client.get("/v1/kv", params={"prefix": ""})).json()
    assert [item["key"] for item in page["items"]] == ["q"]
    # The store as it was, while the history keeps it.
    past = await (await node.client.get("/v1/kv", params={"prefix": "p/", "revision": "3"})).json()
    assert [item["key"] for item in past["items"]] == ["p/00", "p/01", "p/02"]
    old = await node.client.get("/v1/kv/p/01?revision=26")
    assert old.status == 200 and old.headers["Kvstore-Mod-Revision"] == "2"
    assert (await node.client.delete("/v1/kv")).status == 400


async def _lines(response: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    lines = []
    async with asyncio.timeout(5):
        while len(lines) < count:
            line = await response.content.readline()
            assert line, "the stream ended early"
            lines.append(json.loads(line))
    return lines


async def test_a_watch_streams_history_then_live_events_in_order(node: Node) -> None:
    await node.client.put("/v1/kv/w/a", data=b"1")
    await node.client.put("/v1/kv/other", data=b"1")
    response = await node.client.get(
        "/v1/watch",
        params={
            "prefix": "w/",
            "start_revision": "1",
            "prev_kv": "true",
            "progress_ms": "50",
        },
    )
    assert response.status == 200
    created, first = await _lines(response, 2)
    assert created["created"] and created["start_revision"] == 1
    assert [(e["type"], e["key"], e["revision"]) for e in first["events"]] == [("put", "w/a", 1)]
    await node.client.put("/v1/kv/w/a", data=b"2")
    await _txn(
        node,
        {"success": [{"op": "put", "key": "w/b", "value": ""}, {"op": "delete", "key": "w/a"}]},
    )
    events: list[dict[str, Any]] = []
    progress = None
    while progress is None:
        for line in await _lines(response, 1):
            events += line.get("events", [])
            if line.get("progress"):
                progress = line
    assert [(e["type"], e["key"], e["revision"]) for e in events] == [
        ("put", "w/a", 3), ("put", "w/b", 4), ("delete", "w/a", 4),
    ]  # fmt: skip
    assert events[0]["prev"]["value"] == b64(b"1") and progress["revision"] == 4
    response.close()


@pytest.mark.parametrize("node", [{"history_revisions_max": 2}], indirect=True)
async def test_a_watch_from_a_compacted_revision_names_the_oldest_kept(node: Node) -> None:
    for i in range(4):
        await node.client.put(f"/v1/kv/k{i}", data=b"v")
    response = await node.client.get("/v1/watch", params={"key": "k0", "start_revision": "1"})
    assert response.status == 410
    error = (await response.json())["error"]
    assert error["code"] == "revision_compacted" and error["oldest_revision"] == 3
    compact = await node.client.post("/v1/compact", json={"revision": 3})
    assert (await compact.json())["oldest_revision"] == 4
    assert (await node.client.get("/v1/kv/k0?revision=3")).status == 410
    assert (await node.client.post("/v1/compact", json={"revision": 99})).status == 400


async def test_a_lease_expires_its_keys_only_after_keepalives_stop(node: Node) -> None:
    grant = await (await node.client.post("/v1/lease/grant", json={"ttl_ms": 150})).json()
    lease_id = grant["id"]
    response = await node.client.put(f"/v1/kv/svc/a?lease={lease_id}", data=b"up")
    assert response.status == 200
    loop = asyncio.get_running_loop()
    until = loop.time() + 0.5
    while loop.time() < until:
        answer = await node.client.post("/v1/lease/keepalive", json={"id": lease_id})
        assert answer.status == 200, await answer.text()
        assert (await node.client.get("/v1/kv/svc/a")).status == 200
        await asyncio.sleep(0.03)
    listing = await (await node.client.get("/v1/leases")).json()
    assert listing["leases"][0]["keys"] == ["svc/a"]
    await _until(lambda: node.driver.replica.state_machine.get("svc/a") is None, 3)
    assert lease_id not in node.driver.replica.state_machine.leases
    metrics = await (await node.client.get("/metrics")).text()
    assert "kvstore_leases_expired_total 1.0" in metrics and "kvstore_watchers 0.0" in metrics
    missing = await node.client.post("/v1/lease/keepalive", json={"id": lease_id})
    assert missing.status == 404
    bad = await node.client.put("/v1/kv/x?lease=12345", data=b"v")
    assert bad.status == 404


async def test_revoking_a_lease_deletes_its_keys_at_once(node: Node) -> None:
    grant = await (await node.client.post("/v1/lease/grant", json={"ttl_ms": 60_000})).json()
    for key in ("r/1", "r/2"):
        await node.client.put(f"/v1/kv/{key}?lease={grant['id']}", data=b"v")
    answer = await (await node.client.post("/v1/lease/revoke", json={"id": grant["id"]})).json()
    assert answer["deleted"] == 2
    assert (await node.client.get("/v1/kv/r/1")).status == 404
    for body in ({"ttl_ms": 0}, {"ttl_ms": "5"}, {}):
        assert (await node.client.post("/v1/lease/grant", json=body)).status == 400


def test_the_openapi_document_names_the_coordination_routes() -> None:
    from kvstore.server.openapi import openapi_document

    paths = openapi_document()["paths"]
    for route in ("/v1/txn", "/v1/watch", "/v1/compact", "/v1/lease/grant", "/v1/leases"):
        assert route in paths, route
    assert "delete" in paths["/v1/kv"]
    assert any(p["name"] == "start" for p in paths["/v1/kv"]["get"]["parameters"])


def test_a_watch_is_cancelled_when_compacted_past_or_too_slow_and_lines_hold_whole_revisions() -> (
    None
):
    from kvstore.kv.commands import KeyValue
    from kvstore.kv.history import Event
    from kvstore.server.watch import _LINE_EVENTS_MAX, _collect

    api = WatchApi.__new__(WatchApi)
    api.hub = WatchHub.__new__(WatchHub)
    api.hub.closed = False
    api._lag_max = 10
    compacted = api._cancel_reason(5, 50, 7, check_lag=False)
    assert compacted is not None and compacted.code == "revision_compacted"
    slow = api._cancel_reason(30, 50, 7, check_lag=True)
    assert slow is not None and slow.code == "watch_canceled" and "too slow" in slow.message
    assert api._cancel_reason(30, 50, 7, check_lag=False) is None  # still catching up
    # A revision is never split across lines, even past the per-line bound.
    events = [
        Event("put", KeyValue(f"k{i}", b"", 1, 1 + i // 600, 1), None, 0) for i in range(1800)
    ]
    matched, following = _collect(iter(events), "k", True, 1, 3)
    # Past the bound at the end of revision 2: the line stops there, whole revisions only.
    assert len(matched) == 1200 > _LINE_EVENTS_MAX and following == 3
    assert {event.revision for event in matched} == {1, 2}


def test_a_watch_line_is_bounded_in_bytes_of_values_too() -> None:
    """A line of 1000 events of large values was one JSON line of up to a GB per watcher."""
    from kvstore.kv.commands import KeyValue
    from kvstore.kv.history import Event
    from kvstore.server.watch import _LINE_VALUE_BYTES_MAX, _collect

    value = b"v" * (300 << 10)
    events = [
        Event("put", KeyValue("k", value, 1, revision, revision), None, 0)
        for revision in range(1, 101)
    ]
    matched, following = _collect(iter(events), "k", False, 1, 100)
    size = sum(len(event.kv.value) for event in matched)
    assert _LINE_VALUE_BYTES_MAX <= size < _LINE_VALUE_BYTES_MAX + len(value)
    assert following == len(matched) + 1, "the next line starts where this one stopped"
