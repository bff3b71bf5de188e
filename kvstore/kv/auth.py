"""Users, roles and tokens: who may do what, as replicated state.

Every node enforces the same rules because the rules are state-machine state: they change
only through the `AuthChange` command, applied in log order on every replica, and travel in
snapshots (the section "auth"). The HTTP layer (kvstore/server/auth.py) asks `AuthTable`
whom a token or a certificate belongs to and whether that user may read, write or
administer a key.

- A role is a list of `(prefix, access)` permissions; access is "read", "write" (implies
  read) or "admin" (implies both, and on the prefix "" the cluster's own operations: users,
  roles, tokens, membership).
- A user has roles; a user with no role may do nothing.
- A token is stored as the SHA-256 of its text (hex), never the text: a leaked snapshot or
  log reveals no usable token. The server hashes a presented token and looks the hash up; a
  token is 32 random bytes, so a plain hash is enough (nothing to brute-force).

Deterministic like the rest of kvstore.kv: `apply` depends on the command and the state only.

Invariants: every role a user names exists; every token names an existing user (deleting a
role removes it from its users, deleting a user removes its tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kvstore.errors import ProtocolError
from kvstore.kv.commands import (
    CommandKind,
    RequestId,
    check_common,
    request_from_obj,
    request_to_obj,
)

ACCESS_LEVELS = ("read", "write", "admin")
"""Each level includes the ones before it."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_HASH = re.compile(r"[0-9a-f]{64}")
TOKEN_ID_CHARS = 16
"""A token's id: the first characters of its hash (what lists show and deletes name)."""
PERMISSIONS_MAX = 256
ROLES_PER_USER_MAX = 64
PREFIX_CHARS_MAX = 1024
OPS = ("put_user", "delete_user", "put_role", "delete_role", "put_token", "delete_token")


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{what} name must be 1..128 of A-Z a-z 0-9 . _ @ - (starting with a letter or digit)"
        )
    return name


def _check_permissions(value: object) -> list[tuple[str, str]]:
    if not isinstance(value, list) or len(value) > PERMISSIONS_MAX:
        raise ValueError(f"permissions must be a list of at most {PERMISSIONS_MAX}")
    permissions = []
    for item in value:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or len(item[0]) > PREFIX_CHARS_MAX
            or item[1] not in ACCESS_LEVELS
        ):
            raise ValueError(f"a permission is [prefix, one of {ACCESS_LEVELS}]")
        permissions.append((str(item[0]), str(item[1])))
    return permissions


@dataclass(frozen=True, slots=True)
class AuthChange:
    """One change of users, roles or tokens (`op` in OPS):

    - put_user NAME [roles...]        - delete_user NAME
    - put_role NAME [[prefix, access], ...]   - delete_role NAME
    - put_token SHA256-HEX [user]     - delete_token TOKEN-ID (first 16 hex of the hash)
    """

    op: str
    name: str
    value: tuple[Any, ...]
    request: RequestId | None
    time_ms: int
    acked_below: int = 0

    def __post_init__(self) -> None:
        check_common(None, self.request, self.time_ms, None, self.acked_below)
        if self.op not in OPS:
            raise ValueError(f"auth change: op must be one of {OPS}")
        if self.op == "put_token":
            if not isinstance(self.name, str) or not _HASH.fullmatch(self.name):
                raise ValueError("put_token names a token by its SHA-256 (64 hex digits)")
            if len(self.value) != 1:
                raise ValueError("put_token takes one user")
            check_name(self.value[0], "user")
        elif self.op == "delete_token":
            if not isinstance(self.name, str) or not re.fullmatch(
                f"[0-9a-f]{{{TOKEN_ID_CHARS}}}", self.name
            ):
                raise ValueError(f"delete_token names a token by its id ({TOKEN_ID_CHARS} hex)")
        else:
            check_name(self.name, "user" if self.op.endswith("user") else "role")
        if self.op == "put_user":
            if len(self.value) > ROLES_PER_USER_MAX:
                raise ValueError(f"a user has at most {ROLES_PER_USER_MAX} roles")
            for role in self.value:
                check_name(role, "role")
        if self.op == "put_role":
            _check_permissions(list(self.value))

    def to_obj(self) -> list[Any]:
        value = [list(item) if isinstance(item, tuple) else item for item in self.value]
        return [
            int(CommandKind.AUTH),
            self.op,
            self.name,
            value,
            request_to_obj(self.request),
            self.time_ms,
            self.acked_below,
        ]

    @staticmethod
    def from_obj(obj: list[Any]) -> AuthChange:
        if len(obj) != 7 or not isinstance(obj[3], list):
            raise ProtocolError("auth change: expected an array of 7")
        _, op, name, value, request, time_ms, acked_below = obj
        items = tuple(tuple(item) if isinstance(item, list) else item for item in value)
        return AuthChange(op, name, items, request_from_obj(request), time_ms, acked_below)


class AuthTable:
    """The replicated users, roles and tokens (see the module docstring)."""

    def __init__(self) -> None:
        self.users: dict[str, tuple[str, ...]] = {}
        self.roles: dict[str, tuple[tuple[str, str], ...]] = {}
        self.tokens: dict[str, str] = {}  # sha256 hex -> user

    def apply(self, change: AuthChange) -> str | None:
        """Apply `change`; None when it took effect, else why not ("user", "role" or
        "token": the named one does not exist)."""
        match change.op:
            case "put_role":
                self.roles[change.name] = tuple(_check_permissions(list(change.value)))
            case "delete_role":
                if self.roles.pop(change.name, None) is None:
                    return "role"
                for user, roles in self.users.items():
                    self.users[user] = tuple(r for r in roles if r != change.name)
            case "put_user":
                if any(role not in self.roles for role in change.value):
                    return "role"
                self.users[change.name] = tuple(dict.fromkeys(str(r) for r in change.value))
            case "delete_user":
                if self.users.pop(change.name, None) is None:
                    return "user"
                self.tokens = {h: u for h, u in self.tokens.items() if u != change.name}
            case "put_token":
                if change.value[0] not in self.users:
                    return "user"
                self.tokens[change.name] = str(change.value[0])
            case "delete_token":
                found = [h for h in self.tokens if h.startswith(change.name)]
                if not found:
                    return "token"
                for digest in found:
                    del self.tokens[digest]
        return None

    def user_of_token(self, digest: str) -> str | None:
        return self.tokens.get(digest)

    def allowed(self, user: str, access: str, key: str) -> bool:
        """May `user` have `access` to `key` (a prefix: to every key under it)?"""
        needed = ACCESS_LEVELS.index(access)
        for role in self.users.get(user, ()):
            for prefix, granted in self.roles.get(role, ()):
                if ACCESS_LEVELS.index(granted) >= needed and key.startswith(prefix):
                    return True
        return False

    def describe(self) -> dict[str, Any]:
        """For GET /v1/auth: everything but the token hashes (their ids only)."""
        return {
            "users": {user: list(roles) for user, roles in sorted(self.users.items())},
            "roles": {
                role: [{"prefix": p, "access": a} for p, a in permissions]
                for role, permissions in sorted(self.roles.items())
            },
            "tokens": sorted(
                (
                    {"id": digest[:TOKEN_ID_CHARS], "user": user}
                    for digest, user in self.tokens.items()
                ),
                key=lambda token: (token["user"], token["id"]),
            ),
        }

    # --- snapshots ----------------------------------------------------------------------------

    def to_obj(self) -> list[Any]:
        return [
            [[user, list(roles)] for user, roles in sorted(self.users.items())],
            [[role, [list(p) for p in perms]] for role, perms in sorted(self.roles.items())],
            sorted([digest, user] for digest, user in self.tokens.items()),
        ]

    def load_obj(self, obj: Any) -> None:
        try:
            users, roles, tokens = obj
            table = AuthTable()
            for role, permissions in roles:
                table.roles[check_name(role, "role")] = tuple(_check_permissions(permissions))
            for user, user_roles in users:
                if any(role not in table.roles for role in user_roles):
                    raise ValueError(f"user {user!r} names a missing role")
                table.users[check_name(user, "user")] = tuple(str(r) for r in user_roles)
            for digest, user in tokens:
                if (
                    not isinstance(digest, str)
                    or not _HASH.fullmatch(digest)
                    or user not in table.users
                ):
                    raise ValueError("a token must be a SHA-256 of an existing user")
                table.tokens[digest] = user
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"state machine snapshot: bad auth section: {exc}") from exc
        self.users, self.roles, self.tokens = table.users, table.roles, table.tokens
