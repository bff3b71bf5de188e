"""What each route needs under --auth (kvstore/server/auth.py's AuthGate), without a cluster:
requests made by aiohttp's test helper, a table holding users and roles."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from kvstore.errors import PermissionDeniedError, UnauthenticatedError
from kvstore.kv.auth import AuthTable
from kvstore.server.auth import AuthGate, token_digest


def _gate() -> AuthGate:
    table = AuthTable()
    table.roles["reader"] = (("app/", "read"),)
    table.roles["writer"] = (("app/", "write"),)
    table.users["bob"] = ("reader",)
    table.users["alice"] = ("writer",)
    table.tokens[token_digest("bob-token-0123456789")] = "bob"
    table.tokens[token_digest("alice-token-0123456789")] = "alice"
    return AuthGate(
        table=lambda: table, root_digest="", protect_status=False, protect_metrics=False
    )


def _check(gate: AuthGate, method: str, url: str, route: str, token: str) -> str | None:
    request = make_mocked_request(method, url, headers={"Authorization": f"Bearer {token}"})
    return gate.check(request, route, request.path)


@pytest.mark.parametrize(
    "url", ["/v1/watch?prefix=app/", "/v1/watch?key=app/x", "/v1/watch?prefix=app/sub/"]
)
def test_a_reader_may_watch_what_it_may_read(url: str) -> None:
    assert _check(_gate(), "GET", url, "/v1/watch", "bob-token-0123456789") == "bob"


@pytest.mark.parametrize("url", ["/v1/watch?prefix=", "/v1/watch?prefix=ap", "/v1/watch?key=b"])
def test_a_watch_beyond_what_the_user_may_read_is_403(url: str) -> None:
    with pytest.raises(PermissionDeniedError):
        _check(_gate(), "GET", url, "/v1/watch", "bob-token-0123456789")


def test_a_watch_without_a_known_token_is_401() -> None:
    with pytest.raises(UnauthenticatedError):
        _check(_gate(), "GET", "/v1/watch?prefix=app/", "/v1/watch", "nobody-0123456789")


def test_keys_need_read_or_write_and_other_routes_admin() -> None:
    gate = _gate()
    reader, writer = "bob-token-0123456789", "alice-token-0123456789"
    assert _check(gate, "GET", "/v1/kv/app/x", "/v1/kv/{key}", reader) == "bob"
    with pytest.raises(PermissionDeniedError):
        _check(gate, "PUT", "/v1/kv/app/x", "/v1/kv/{key}", reader)
    assert _check(gate, "PUT", "/v1/kv/app/x", "/v1/kv/{key}", writer) == "alice"
    with pytest.raises(PermissionDeniedError):
        _check(gate, "POST", "/v1/txn", "/v1/txn", writer)
    assert _check(gate, "GET", "/healthz", "/healthz", "") is None
