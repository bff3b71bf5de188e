"""Client authentication and authorization on the client port, and the /v1/auth API.

With `--auth` every request but the open ones proves an identity, and that identity's roles
(replicated state, kvstore/kv/auth.py) must grant what the request needs; otherwise 401
`unauthenticated` or 403 `permission_denied`, with the JSON error body of every other error.

Identity, first match:
- `Authorization: Bearer <token>`: the SHA-256 of the token names a user in the replicated
  token table; or it is the root token (`--auth-root-token-file`, compared with
  `hmac.compare_digest`): the user `root`, who may do everything. The root token is the
  bootstrap path: it exists before any user does, and is configured on every node alike.
  A presented token that matches nothing is a 401, even when a certificate would match.
- a client certificate (TLS with `--client-cert-auth`) verified against `--ca-file`: its
  subject's common name names a user.

What a route needs:
- open to anyone: /healthz, /readyz, /v1/openapi.json, and /v1/status and /metrics unless
  `--auth-protect-status` / `--auth-protect-metrics` (then any authenticated user);
- GET/HEAD /v1/kv/KEY: read on KEY; PUT/DELETE: write on KEY; GET /v1/kv?prefix=P: read on
  P; DELETE /v1/kv?prefix=P: write on P;
- GET /v1/watch?key=K or ?prefix=P: read on K or P (the events are what reads show);
- GET /v1/stream (the binary stream): any authenticated user may open it, with the token on
  the upgrade request; then each get on it needs read on its key and each put or delete
  write, as the same request over HTTP would (StreamAuthorizer), answered 401/403 by id;
- everything else (/v1/auth/*, transactions, leases, compaction, membership): admin
  on the prefix "" (the whole key space), until those routes learn to name their keys.

Audit: every denied request (rate-limited, with the count of lines left out) and every
change of users, roles or tokens goes to the `kvstore.server.audit` logger as one
key=value line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvstore.errors import (
    BadRequestError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from kvstore.kv.auth import ACCESS_LEVELS, TOKEN_ID_CHARS, AuthChange, AuthTable, check_name
from kvstore.server.logthrottle import LogThrottle, clip

if TYPE_CHECKING:
    from kvstore.server.http import HttpApi

audit = logging.getLogger("kvstore.server.audit")

ROOT = "root"
_OPEN = frozenset({"/healthz", "/readyz", "/v1/openapi.json"})
_KEY_ROUTE = "/v1/kv/{key}"
_STREAM_ROUTE = "/v1/stream"
_TOKEN_BYTES = 32


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def read_root_token(path: str) -> str:
    """The root token's SHA-256 from its file ("" without a file); ValueError if unusable."""
    if not path:
        return ""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"auth_root_token_file: cannot read {path}: {exc}") from exc
    if len(token) < 16:
        raise ValueError(f"auth_root_token_file: {path} holds under 16 characters")
    return token_digest(token)


class AuthGate:
    """Decides each request (see the module docstring)."""

    def __init__(
        self,
        *,
        table: Callable[[], AuthTable],
        root_digest: str,
        protect_status: bool,
        protect_metrics: bool,
        on_denied: Callable[[str], None] | None = None,
    ) -> None:
        self._table = table
        self._on_denied = on_denied
        self._root_digest = root_digest
        self._open = set(_OPEN)
        if not protect_status:
            self._open.add("/v1/status")
        if not protect_metrics:
            self._open.add("/metrics")
        self._throttle = LogThrottle(audit, burst=100, interval_s=1.0)
        self.denied = 0

    def check(self, request: web.BaseRequest, route: str, path: str) -> str | None:
        """The user the request acts as (None for an open route); raises 401/403."""
        if route in self._open:
            return None
        try:
            user = self._user_of(self._credential(request))
            access, resource = self._needs(request, route, path)
            if resource is not None:
                self._authorize(user, access, resource)
        except (UnauthenticatedError, PermissionDeniedError) as exc:
            self._denied(exc, request.method, route, path, request.remote)
            raise
        return user

    def stream_authorizer(self, request: web.BaseRequest) -> StreamAuthorizer:
        """What decides each operation of a binary stream opened by `request` (whose upgrade
        `check` let through: its credential is known good)."""
        return StreamAuthorizer(self, self._credential(request), request.remote)

    def _authorize(self, user: str, access: str, resource: str) -> None:
        if not self._allowed(user, access, resource):
            raise PermissionDeniedError(
                f"user {user!r} may not {access} {resource!r}"
                if resource
                else f"user {user!r} has no {access} permission on the whole key space"
            )

    def _denied(
        self,
        error: UnauthenticatedError | PermissionDeniedError,
        method: str,
        route: str,
        path: str,
        remote: str | None,
    ) -> None:
        """Count and audit one denied request (or stream operation)."""
        self.denied += 1
        if self._on_denied is not None:
            self._on_denied(error.code)
        self._throttle.log(
            "auth_denied",
            logging.WARNING,
            "event=auth_denied code=%s method=%s route=%s path=%s remote=%s reason=%s",
            error.code,
            clip(method, 20),
            route,
            clip(path),
            remote,
            clip(error.message),
        )

    def _credential(self, request: web.BaseRequest) -> _Credential:
        """The token's digest or the client certificate's name the request presents; 401
        if it presents neither, or a malformed Authorization header."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise UnauthenticatedError("Authorization must be 'Bearer <token>'")
            return _Credential(token_digest=token_digest(token.strip()), common_name="")
        certificate = request.transport.get_extra_info("peercert") if request.transport else None
        if certificate:
            return _Credential(token_digest="", common_name=_common_name(certificate))
        raise UnauthenticatedError(
            "this node requires a token (Authorization: Bearer) or a client certificate"
        )

    def _user_of(self, credential: _Credential) -> str:
        """The user a credential names now (a token may have been revoked since); 401 if
        none."""
        digest = credential.token_digest
        if digest:
            if self._root_digest and hmac.compare_digest(digest, self._root_digest):
                return ROOT
            user = self._table().user_of_token(digest)
            if user is None:
                raise UnauthenticatedError("the token is unknown or revoked")
            return user
        name = credential.common_name
        if name and name in self._table().users:
            return name
        raise UnauthenticatedError(f"the client certificate of {name!r} names no user")

    @staticmethod
    def _needs(request: web.BaseRequest, route: str, path: str) -> tuple[str, str | None]:
        """(access, resource): resource None means any authenticated user may."""
        method = request.method
        if route in ("/v1/status", "/metrics"):
            return "read", None
        if route == _STREAM_ROUTE:
            # Any user may open the stream; each operation on it is then checked as its HTTP
            # request would be (StreamAuthorizer).
            return "read", None
        if route == _KEY_ROUTE:
            return ("read" if method in ("GET", "HEAD") else "write"), path[len("/v1/kv/") :]
        if route == "/v1/kv" and method in ("GET", "DELETE"):
            prefix = request.rel_url.query.get("prefix", "")
            return ("read" if method == "GET" else "write"), prefix
        if route == "/v1/watch" and method == "GET":
            # What a watch shows is what a read of its key or prefix shows. A malformed
            # query (both or neither) is left to the route's 400; it needs read on "".
            query = request.rel_url.query
            return "read", query.get("key", query.get("prefix", ""))
        return "admin", ""

    def _allowed(self, user: str, access: str, resource: str) -> bool:
        return user == ROOT or self._table().allowed(user, access, resource)


@dataclass(frozen=True, slots=True)
class _Credential:
    """What a request presents: a token (its SHA-256) or a client certificate's name."""

    token_digest: str
    common_name: str


class StreamAuthorizer:
    """The checks of one binary stream's operations (kvstore/server/stream.py): each get
    needs read on its key and each put or delete write, as over HTTP, for the identity the
    upgrade request presented. The identity is looked up again for every operation (a dict
    lookup), so a token revoked while the stream is open stops working on it too."""

    def __init__(self, gate: AuthGate, credential: _Credential, remote: str | None) -> None:
        self._gate = gate
        self._credential = credential
        self._remote = remote

    def check(self, op: str, access: str, key: str) -> None:
        """Raise 401/403 (audited like HTTP's) unless the stream's user may `access` `key`."""
        gate = self._gate
        try:
            gate._authorize(gate._user_of(self._credential), access, key)
        except (UnauthenticatedError, PermissionDeniedError) as exc:
            gate._denied(exc, f"stream {op}", _STREAM_ROUTE, key, self._remote)
            raise


def _common_name(certificate: dict[str, Any]) -> str:
    for rdn in certificate.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return ""


class AuthApi:
    """GET /v1/auth, PUT|DELETE /v1/auth/users/NAME and /v1/auth/roles/NAME, POST
    /v1/auth/tokens, DELETE /v1/auth/tokens/ID (docs/api.md); admin only under --auth."""

    def __init__(self, http: HttpApi) -> None:
        self.http = http
        self.driver = http.driver
        http.add_routes(
            {("/v1/auth", "GET"): self.show, ("/v1/auth/tokens", "POST"): self.new_token}
        )
        http.add_prefix_routes(
            {
                ("/v1/auth/users/", "PUT"): self.put_user,
                ("/v1/auth/users/", "DELETE"): self.delete_user,
                ("/v1/auth/roles/", "PUT"): self.put_role,
                ("/v1/auth/roles/", "DELETE"): self.delete_role,
                ("/v1/auth/tokens/", "DELETE"): self.delete_token,
            }
        )

    def _table(self) -> AuthTable:
        table: AuthTable = self.driver.replica.state_machine.auth
        return table

    async def show(self, request: web.BaseRequest) -> web.Response:
        await self.driver.read_barrier()
        return _json(self._table().describe())

    async def put_user(self, request: web.BaseRequest) -> web.Response:
        name = _name(request, "/v1/auth/users/", "user")
        body = await self.http.json_body(request)
        roles = body.get("roles", [])
        if not isinstance(roles, list) or set(body) - {"roles"}:
            raise BadRequestError('the body is {"roles": [ROLE, ...]}')
        await self._change(request, "put_user", name, tuple(roles))
        return _json({"user": name, "roles": roles})

    async def delete_user(self, request: web.BaseRequest) -> web.Response:
        name = _name(request, "/v1/auth/users/", "user")
        await self._change(request, "delete_user", name, ())
        return _json({"user": name, "deleted": True})

    async def put_role(self, request: web.BaseRequest) -> web.Response:
        name = _name(request, "/v1/auth/roles/", "role")
        body = await self.http.json_body(request)
        items = body.get("permissions", [])
        if not isinstance(items, list) or set(body) - {"permissions"}:
            raise BadRequestError('the body is {"permissions": [{"prefix": P, "access": A}, ...]}')
        permissions = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"prefix", "access"}:
                raise BadRequestError(
                    f'a permission is {{"prefix": P, "access": one of {list(ACCESS_LEVELS)}}}'
                )
            permissions.append((item["prefix"], item["access"]))
        await self._change(request, "put_role", name, tuple(permissions))
        return _json({"role": name, "permissions": items})

    async def delete_role(self, request: web.BaseRequest) -> web.Response:
        name = _name(request, "/v1/auth/roles/", "role")
        await self._change(request, "delete_role", name, ())
        return _json({"role": name, "deleted": True})

    async def new_token(self, request: web.BaseRequest) -> web.Response:
        body = await self.http.json_body(request)
        user = body.get("user")
        if set(body) != {"user"}:
            raise BadRequestError('the body is {"user": NAME}')
        try:
            check_name(user, "user")
        except ValueError as exc:
            raise BadRequestError(str(exc)) from exc
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        digest = token_digest(token)
        await self._change(request, "put_token", digest, (user,))
        # The only time the token is ever shown: only its hash is kept.
        return _json({"token": token, "id": digest[:TOKEN_ID_CHARS], "user": user})

    async def delete_token(self, request: web.BaseRequest) -> web.Response:
        token_id = _name(request, "/v1/auth/tokens/", "token")
        await self._change(request, "delete_token", token_id, ())
        return _json({"id": token_id, "deleted": True})

    async def _change(
        self, request: web.BaseRequest, op: str, name: str, value: tuple[Any, ...]
    ) -> None:
        driver = self.driver
        if driver.leader_pending():
            await driver.wait_for_leader()
        driver.check_writable()
        request_id, acked_below, server_made = self.http._request_id(request)
        try:
            try:
                command = AuthChange(
                    op, name, value, request_id, int(time.time() * 1000), acked_below
                )
            except ValueError as exc:
                raise BadRequestError(str(exc)) from exc
            result = await driver.write(command, request_id)
        finally:
            if server_made:
                driver.release_request_id(request_id)
        self.http._raise_for_result(result)
        shown = name[:TOKEN_ID_CHARS] if op == "put_token" else name
        audit.info(
            "event=auth_change op=%s name=%s value=%s by=%s remote=%s",
            op,
            shown,
            clip(json.dumps(value)),
            request.get("kvstore_user", "-"),
            request.remote,
        )


def _name(request: web.BaseRequest, prefix: str, what: str) -> str:
    name = request.rel_url.path[len(prefix) :]
    if what == "token":
        if len(name) != TOKEN_ID_CHARS or not all(c in "0123456789abcdef" for c in name):
            raise BadRequestError(f"a token id is {TOKEN_ID_CHARS} hex digits")
        return name
    try:
        return check_name(name, what)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from exc


def _json(body: Any) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")
