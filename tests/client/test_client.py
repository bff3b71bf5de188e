"""The Client's retry loop against a scripted transport and a fake clock: no server, no sleep."""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest

from kvstore import Client
from kvstore.client import ClientConfig, KeyValue
from kvstore.client.transport import HttpResponse, TransportError
from kvstore.errors import (
    BadRequestError,
    DeadlineExceededError,
    DiskFullError,
    NotFoundError,
    PayloadTooLargeError,
    PreconditionFailedError,
    SessionExpiredError,
    UnavailableError,
)
from kvstore.request_id import RequestId, parse_request_id

from .fakes import (
    FakeClock,
    ScriptedTransport,
    SentRequest,
    error_response,
    json_response,
    put_ok,
    refused,
    reset,
)

A, B, C = "http://n1:7001", "http://n2:7001", "http://n3:7001"


def make_client(
    handler: Callable[[SentRequest], HttpResponse], **config: object
) -> tuple[Client, ScriptedTransport, FakeClock]:
    clock = FakeClock()
    transport = ScriptedTransport(handler, clock)
    client = Client(
        [A, B, C],
        config=ClientConfig(**config),  # type: ignore[arg-type]
        transport=transport,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(11),
        client_id="testclient",
    )
    # Start the round robin at A so the scripts read in order.
    client._round_robin = 0
    return client, transport, clock


async def test_a_not_leader_hint_is_followed_at_once_and_remembered() -> None:
    def handler(request: SentRequest) -> HttpResponse:
        if request.endpoint == B:
            return put_ok("k", 5, leader=B)
        return error_response(307, "not_leader", leader=B, headers={"location": B + request.path})

    client, transport, clock = make_client(handler)
    result = await client.put("k", b"v")
    assert result.mod_revision == 5
    assert [r.endpoint for r in transport.sent] == [A, B]
    assert clock.sleeps == [], "a hint is followed without back-off"
    assert client.leader_url == B
    assert client.stats.redirects == 1 and client.stats.leader_changes == 1
    await client.put("k", b"w")
    assert transport.sent[-1].endpoint == B, "the next call goes straight to the leader"


async def test_the_location_header_alone_is_a_usable_hint() -> None:
    def handler(request: SentRequest) -> HttpResponse:
        if request.endpoint == C:
            return put_ok("k", 2)
        return HttpResponse(307, {"location": C + "/v1/kv/k"}, b"")

    client, transport, clock = make_client(handler)
    await client.put("k", b"v")
    assert [r.endpoint for r in transport.sent] == [A, C]
    assert clock.sleeps == []


async def test_the_leader_is_learned_from_the_header_of_any_answer() -> None:
    def handler(request: SentRequest) -> HttpResponse:
        return HttpResponse(200, {"kvstore-leader": C, "kvstore-mod-revision": "3"}, b"x")

    client, transport, _ = make_client(handler)
    await client.get("a")
    await client.get("b")
    assert [r.endpoint for r in transport.sent] == [A, C]


async def test_every_attempt_of_a_write_reuses_its_request_id() -> None:
    failures = iter([reset(A), refused(B)])

    def handler(request: SentRequest) -> HttpResponse:
        error = next(failures, None)
        if error is not None:
            raise error
        return put_ok("k", 9)

    client, transport, _ = make_client(handler)
    result = await client.put("k", b"v")
    assert result.request_id == "testclient:1"
    ids = [r.headers["Kvstore-Request-Id"] for r in transport.sent]
    assert ids == ["testclient:1"] * 3
    assert [r.endpoint for r in transport.sent] == [A, B, C], "retries go across replicas"
    deleted = await client.delete("k")
    assert deleted.request_id == "testclient:2"
    assert transport.sent[-1].headers["Kvstore-Request-Id"] == "testclient:2"
    assert transport.sent[-1].headers["Kvstore-Acked-Below"] == "2"
    assert client.stats.retries == 2 and client.stats.attempts == 4


async def test_acked_below_is_the_lowest_seq_still_waiting() -> None:
    release = asyncio.Event()
    sent_headers: list[dict[str, str]] = []

    class SlowFirst(ScriptedTransport):
        async def request(
            self, endpoint: str, method: str, path: str, **kwargs: Any
        ) -> HttpResponse:
            headers = dict(kwargs["headers"])
            sent_headers.append(headers)
            if headers["Kvstore-Request-Id"].endswith(":1"):
                await release.wait()
            return put_ok("k", 1)

    transport = SlowFirst(lambda request: put_ok("k", 1))
    client = Client([A], transport=transport, client_id="c")
    first = asyncio.create_task(client.put("a", b"1"))
    await asyncio.sleep(0)
    await client.put("b", b"2")
    await client.put("c", b"3")
    release.set()
    await first
    await client.put("d", b"4")
    assert [(h["Kvstore-Request-Id"], h["Kvstore-Acked-Below"]) for h in sent_headers] == [
        ("c:1", "1"),
        ("c:2", "1"),
        ("c:3", "1"),
        ("c:4", "4"),
    ]


async def test_acked_below_follows_writes_that_finish_out_of_order() -> None:
    """The lowest seq still waiting, whichever order the answers come in."""
    releases = {seq: asyncio.Event() for seq in range(1, 7)}
    sent: list[tuple[int, int]] = []

    class Held(ScriptedTransport):
        async def request(
            self, endpoint: str, method: str, path: str, **kwargs: Any
        ) -> HttpResponse:
            headers = kwargs["headers"]
            seq = int(headers["Kvstore-Request-Id"].rpartition(":")[2])
            sent.append((seq, int(headers["Kvstore-Acked-Below"])))
            if seq in releases:
                await releases[seq].wait()
            return put_ok("k", 1)

    client = Client([A], transport=Held(lambda request: put_ok("k", 1)), client_id="c")
    tasks = [asyncio.create_task(client.put(f"k{seq}", b"v")) for seq in range(1, 7)]
    await asyncio.sleep(0)
    for seq in (2, 5, 1, 6, 3):  # 4 still waits: the bound stops there
        releases[seq].set()
        await tasks[seq - 1]
    await client.put("k7", b"v")
    releases[4].set()
    await tasks[3]
    await client.put("k8", b"v")
    assert sent[6:] == [(7, 4), (8, 8)]
    assert all(acked == 1 for _, acked in sent[:6])


async def test_reads_carry_no_request_id() -> None:
    client, transport, _ = make_client(lambda request: HttpResponse(200, {}, b"x"))
    await client.get("k")
    assert "Kvstore-Request-Id" not in transport.sent[0].headers
    assert transport.sent[0].query == {"consistency": "linearizable"}


@pytest.mark.parametrize(
    ("status", "code", "error_type"),
    [
        (400, "bad_request", BadRequestError),
        (404, "not_found", NotFoundError),
        (412, "precondition_failed", PreconditionFailedError),
        (413, "too_large", PayloadTooLargeError),
        (507, "disk_full", DiskFullError),
    ],
)
async def test_errors_that_cannot_succeed_are_not_retried(
    status: int, code: str, error_type: type[Exception]
) -> None:
    client, transport, clock = make_client(lambda request: error_response(status, code))
    with pytest.raises(error_type):
        await client.put("k", b"v")
    assert len(transport.sent) == 1
    assert clock.sleeps == []


async def test_a_failed_compare_reports_the_current_revision() -> None:
    client, _, _ = make_client(
        lambda request: error_response(412, "precondition_failed", extra={"current_revision": 17})
    )
    with pytest.raises(PreconditionFailedError) as caught:
        await client.cas("k", b"v", mod_revision=3)
    assert caught.value.current_revision == 17


async def test_cas_sends_if_match_or_if_none_match() -> None:
    client, transport, _ = make_client(lambda request: put_ok("k", 4))
    await client.cas("k", b"v", mod_revision=3)
    await client.cas("k", b"v", create_only=True)
    await client.cas("k", b"v", mod_revision=0)
    assert transport.sent[0].headers["If-Match"] == "3"
    assert transport.sent[1].headers["If-None-Match"] == "*"
    assert transport.sent[2].headers["If-Match"] == "0"
    with pytest.raises(BadRequestError):
        await client.cas("k", b"v")
    with pytest.raises(BadRequestError):
        await client.cas("k", b"v", mod_revision=1, create_only=True)


async def test_retry_after_is_honoured() -> None:
    answers = iter([error_response(503, "no_leader", headers={"retry-after": "0.3"})])

    def handler(request: SentRequest) -> HttpResponse:
        return next(answers, None) or put_ok("k", 1)

    client, transport, clock = make_client(handler)
    await client.put("k", b"v")
    assert len(transport.sent) == 2
    assert clock.sleeps and clock.sleeps[0] >= 0.3


async def test_a_precise_retry_after_in_the_body_wins_over_the_header() -> None:
    answers = iter(
        [
            error_response(
                503, "no_leader", headers={"retry-after": "1"}, extra={"retry_after_ms": 100}
            )
        ]
    )

    def handler(request: SentRequest) -> HttpResponse:
        return next(answers, None) or put_ok("k", 1)

    client, _, clock = make_client(handler, backoff_base_s=0.001, backoff_cap_s=0.001)
    await client.put("k", b"v")
    assert clock.sleeps == [pytest.approx(0.1)]


async def test_a_write_that_may_have_applied_times_out_with_outcome_unknown() -> None:
    def handler(request: SentRequest) -> HttpResponse:
        raise TransportError("hung", maybe_sent=True, timed_out=True)

    client, transport, clock = make_client(handler, timeout_s=2.0, attempt_timeout_s=0.5)
    start = clock.now
    with pytest.raises(DeadlineExceededError) as caught:
        await client.put("k", b"v")
    assert caught.value.outcome_unknown is True
    assert caught.value.attempts == len(transport.sent) >= 3
    assert clock.now - start <= 2.0 + 1e-9, "the call returns within its deadline"
    assert client.stats.deadline_exceeded == 1


async def test_a_write_refused_everywhere_is_unavailable_and_did_not_apply() -> None:
    """Nothing listening anywhere is `UnavailableError` naming the endpoints (not a timeout:
    no node was slow, none could be reached), within the deadline."""

    def handler(request: SentRequest) -> HttpResponse:
        raise refused(request.endpoint)

    client, _, clock = make_client(handler, timeout_s=1.0)
    start = clock.now
    with pytest.raises(UnavailableError) as caught:
        await client.put("k", b"v")
    assert not isinstance(caught.value, DeadlineExceededError)
    assert "no node could be reached" in str(caught.value) and A in str(caught.value)
    assert clock.now - start <= 1.0


async def test_unreachable_names_the_telling_error_not_a_last_short_timeout() -> None:
    """A node whose certificate does not check out, then attempts that time out before a
    connection opens (a loaded machine, the deadline's last milliseconds): the caller is
    told about the certificate, not "not open within 0.001s"."""
    calls = 0

    def handler(request: SentRequest) -> HttpResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TransportError(
                f"{request.endpoint}: TLS: certificate verify failed", maybe_sent=False
            )
        raise TransportError(
            f"{request.endpoint}: stream not open within 0.001s", maybe_sent=False, timed_out=True
        )

    client, transport, _ = make_client(handler, timeout_s=1.0)
    with pytest.raises(UnavailableError) as caught:
        await client.put("k", b"v")
    assert len(transport.sent) >= 2
    assert "certificate verify failed" in str(caught.value)


async def test_a_write_refused_by_some_and_timed_out_by_others_is_a_deadline() -> None:
    """One node reached (it may have applied): the deadline error, outcome unknown."""

    def handler(request: SentRequest) -> HttpResponse:
        if request.endpoint == A:
            raise TransportError("hung", maybe_sent=True, timed_out=True)
        raise refused(request.endpoint)

    client, _, _ = make_client(handler, timeout_s=1.0, attempt_timeout_s=0.2)
    with pytest.raises(DeadlineExceededError) as caught:
        await client.put("k", b"v")
    assert caught.value.outcome_unknown is True


async def test_used_up_attempts_without_doubt_raise_unavailable() -> None:
    client, transport, _ = make_client(
        lambda request: error_response(503, "no_leader"), max_attempts=4
    )
    with pytest.raises(UnavailableError) as caught:
        await client.put("k", b"v")
    assert not isinstance(caught.value, DeadlineExceededError)
    assert len(transport.sent) == 4


async def test_unavailable_after_a_step_down_leaves_a_write_in_doubt() -> None:
    client, _, _ = make_client(lambda request: error_response(503, "unavailable"), max_attempts=3)
    with pytest.raises(DeadlineExceededError) as caught:
        await client.put("k", b"v")
    assert caught.value.outcome_unknown is True


async def test_an_expired_session_is_not_retried() -> None:
    client, transport, _ = make_client(lambda request: error_response(409, "session_expired"))
    with pytest.raises(SessionExpiredError):
        await client.put("k", b"v")
    assert len(transport.sent) == 1


async def test_a_504_leaves_a_write_in_doubt_but_not_a_read() -> None:
    client, _, _ = make_client(lambda request: error_response(504, "timeout"), max_attempts=3)
    with pytest.raises(DeadlineExceededError) as caught:
        await client.put("k", b"v")
    assert caught.value.outcome_unknown is True
    with pytest.raises(UnavailableError):
        await client.get("k")


async def test_an_endpoint_that_keeps_failing_is_skipped_then_probed() -> None:
    def handler(request: SentRequest) -> HttpResponse:
        if request.endpoint == A:
            raise refused(A)
        return HttpResponse(200, {}, b"x")

    client, transport, clock = make_client(
        handler, breaker_failure_threshold=2, breaker_cooldown_s=5.0
    )
    for _ in range(30):
        await client.get("k")
    calls_to_a = [r for r in transport.sent if r.endpoint == A]
    assert len(calls_to_a) == 2, "after two failures A is skipped during its cool-down"
    assert client.stats.breaker_opens == 1
    clock.now += 5.1
    for _ in range(6):
        await client.get("k")
    assert len([r for r in transport.sent if r.endpoint == A]) == 3, "one probe after cool-down"


async def test_a_dead_leader_is_forgotten_and_the_new_one_found() -> None:
    leader = B

    def handler(request: SentRequest) -> HttpResponse:
        if request.endpoint == B and leader != B:
            raise refused(B)
        if request.endpoint == leader:
            return put_ok("k", 1, leader=leader)
        return error_response(307, "not_leader", leader=leader)

    client, transport, _ = make_client(handler)
    await client.put("k", b"v")
    assert client.leader_url == B
    leader = C  # B is killed, C wins the election
    sent_before = len(transport.sent)
    await client.put("k", b"w")
    tried = [r.endpoint for r in transport.sent[sent_before:]]
    assert tried[0] == B and tried[-1] == C and len(tried) <= 3
    assert client.leader_url == C
    assert client.stats.leader_changes == 2


async def test_get_list_and_status_results_are_typed() -> None:
    def handler(request: SentRequest) -> HttpResponse:
        if request.path == "/v1/kv/a%2Fb%20c":
            headers = {
                "kvstore-revision": "10",
                "kvstore-create-revision": "2",
                "kvstore-mod-revision": "7",
                "kvstore-version": "3",
                "etag": '"7"',
            }
            return HttpResponse(200, headers, b"value")
        if request.path == "/v1/kv":
            item: dict[str, object] = {
                "key": "p/1",
                "value": base64.b64encode(b"\x00\xff").decode(),
            }
            item |= {"create_revision": 1, "mod_revision": 4, "version": 2}
            return json_response(200, {"revision": 12, "items": [item], "more": True})
        status: dict[str, object] = {
            "id": 2,
            "cluster_id": "kv",
            "role": "leader",
            "term": 3,
            "leader_id": 2,
        }
        status |= {"leader_url": B, "commit_index": 9, "applied_index": 9, "last_index": 9}
        status["peers"] = {
            "1": {"match_index": 9, "next_index": 10, "lag": 0, "state": "replicate"}
        }
        return json_response(200, status)

    client, transport, _ = make_client(handler)
    assert await client.get("a/b c") == KeyValue("a/b c", b"value", 2, 7, 3, 10)
    listing = await client.list("p/", limit=5, consistency="stale")
    assert transport.sent[-1].query == {"prefix": "p/", "consistency": "stale", "limit": "5"}
    assert listing.revision == 12 and listing.more
    assert [(i.key, i.value, i.mod_revision, i.revision) for i in listing] == [
        ("p/1", b"\x00\xff", 4, 12)
    ]
    status = await client.status(C)
    assert transport.sent[-1].endpoint == C
    assert (status.endpoint, status.id, status.role, status.leader_url) == (C, 2, "leader", B)
    assert status.peers[1].state == "replicate"


async def test_retries_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    failures = iter([refused(A)])

    def handler(request: SentRequest) -> HttpResponse:
        error = next(failures, None)
        if error:
            raise error
        return HttpResponse(200, {}, b"x")

    client, _, _ = make_client(handler)
    with caplog.at_level(logging.DEBUG, logger="kvstore.client"):
        await client.get("k")
    retries = [r for r in caplog.records if r.name == "kvstore.client" and "retry" in r.message]
    assert len(retries) == 1
    assert (
        "endpoint=http://n1:7001" in retries[0].message and "reason=transport" in retries[0].message
    )


async def test_bad_keys_fail_before_any_request() -> None:
    client, transport, _ = make_client(lambda request: HttpResponse(200, {}, b""))
    with pytest.raises(BadRequestError):
        await client.get("")
    assert transport.sent == []


async def test_close_closes_the_transport_and_refuses_new_calls() -> None:
    client, transport, _ = make_client(lambda request: HttpResponse(200, {}, b""))
    async with client:
        await client.get("k")
    assert transport.closed
    with pytest.raises(RuntimeError):
        await client.get("k")


def test_endpoints_are_normalised() -> None:
    client = Client(
        "127.0.0.1:7001, http://127.0.0.1:7002/",
        transport=ScriptedTransport(lambda r: HttpResponse(200)),
    )
    assert client.endpoints == ("http://127.0.0.1:7001", "http://127.0.0.1:7002")
    assert len(client.client_id) == 16


async def test_a_stale_read_moves_past_frozen_nodes_quickly() -> None:
    """Two of three nodes frozen: a stale read (any node may answer) gives each a short
    attempt (stale_attempt_timeout_s), so it reaches the live node within about half a
    second instead of waiting a whole attempt_timeout_s at each frozen one (2.9 s seen with
    `kvstore get --consistency stale`). A linearizable read keeps the full attempt."""

    def handler(request: SentRequest) -> HttpResponse:
        if request.endpoint in (A, B):
            raise TransportError("frozen", maybe_sent=True, timed_out=True)
        return HttpResponse(200, {"kvstore-mod-revision": "3"}, b"v")

    client, transport, clock = make_client(handler)
    start = clock.now
    assert (await client.get("k", consistency="stale")).value == b"v"
    assert [request.timeout_s for request in transport.sent[:2]] == [0.25, 0.25]
    assert clock.now - start < 0.8
    transport.sent.clear()
    client._round_robin = 0
    await client.get("k", consistency="linearizable")
    assert transport.sent[0].timeout_s == 1.0


async def test_the_request_id_a_client_sends_is_the_one_the_server_parses() -> None:
    """The client writes the Kvstore-Request-Id header with kvstore.request_id, the module
    the server parses it with: the id each attempt carries, and the one the result names,
    read back to the client's id and the write's seq."""
    client, transport, _ = make_client(lambda request: put_ok("k", 1))
    result = await client.put("k", b"v")
    header = transport.sent[0].headers["Kvstore-Request-Id"]
    assert header == result.request_id
    assert parse_request_id(header) == RequestId("testclient", 1)


@pytest.mark.parametrize("client_id", ["has:colon", "x" * 65, "sp ace", "é"])
def test_a_client_id_the_server_would_refuse_is_refused_at_once(client_id: str) -> None:
    """Every write of such a client would get 400 bad_request from the server."""
    with pytest.raises(ValueError, match="client_id"):
        Client([A], client_id=client_id)
