"""SyncClient from plain synchronous code: its own loop thread, closeable, same API."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvstore import SyncClient
from kvstore.client.transport import HttpResponse
from kvstore.errors import NotFoundError

from .fakes import ScriptedTransport, SentRequest, error_response, put_ok


def handler(request: SentRequest) -> HttpResponse:
    if request.method == "PUT":
        return put_ok("k", 3)
    if request.path == "/v1/kv/missing":
        return error_response(404, "not_found")
    return HttpResponse(200, {"kvstore-mod-revision": "3"}, b"v")


def test_sync_client_works_without_an_event_loop() -> None:
    transport = ScriptedTransport(handler)
    threads_before = threading.active_count()
    with SyncClient(["http://n1:7001"], transport=transport) as kv:
        assert threading.active_count() == threads_before + 1
        assert kv.put("k", "v").mod_revision == 3
        assert kv.get("k").value == b"v"
        with pytest.raises(NotFoundError):
            kv.get("missing")
        assert kv.stats.calls == 3
    assert transport.closed
    assert threading.active_count() == threads_before, "close() joins the loop thread"
    with pytest.raises(RuntimeError):
        kv.get("k")
    kv.close()  # idempotent


def test_sync_client_from_many_threads_keeps_request_ids_unique() -> None:
    transport = ScriptedTransport(handler)
    kv = SyncClient(["http://n1:7001"], transport=transport, client_id="c")
    with kv, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: kv.put(f"k{i}", b"v"), range(64)))
    ids = sorted(int(r.headers["Kvstore-Request-Id"].split(":")[1]) for r in transport.sent)
    assert ids == list(range(1, 65))


async def test_sync_client_can_be_called_from_inside_another_event_loop() -> None:
    with SyncClient(["http://n1:7001"], transport=ScriptedTransport(handler)) as kv:
        assert kv.get("k").value == b"v"
