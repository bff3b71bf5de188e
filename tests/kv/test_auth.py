"""Users, roles and tokens as replicated state (kvstore/kv/auth.py): apply, the permission
rule, the log encoding, and snapshots."""

from __future__ import annotations

import hashlib

import pytest

from kvstore.errors import ProtocolError
from kvstore.kv.auth import AuthChange, AuthTable
from kvstore.kv.commands import WriteError, decode_command, encode_command
from kvstore.kv.state_machine import StateMachine
from kvstore.raft.types import Entry

DIGEST = hashlib.sha256(b"a token").hexdigest()


def _change(op: str, name: str, *value: object) -> AuthChange:
    return AuthChange(op, name, tuple(value), None, 1)


def _table() -> AuthTable:
    table = AuthTable()
    for change in (
        _change("put_role", "app-rw", ("app/", "write")),
        _change("put_role", "reader", ("app/", "read"), ("public/", "read")),
        _change("put_role", "ops", ("", "admin")),
        _change("put_user", "alice", "app-rw"),
        _change("put_user", "bob", "reader"),
        _change("put_user", "carol", "ops"),
        _change("put_token", DIGEST, "bob"),
    ):
        assert table.apply(change) is None
    return table


def test_roles_grant_access_by_prefix_and_level() -> None:
    table = _table()
    assert table.allowed("alice", "write", "app/x") and table.allowed("alice", "read", "app/x")
    assert not table.allowed("alice", "write", "other/x") and not table.allowed(
        "alice", "admin", ""
    )
    assert table.allowed("bob", "read", "public/a") and not table.allowed("bob", "write", "app/x")
    assert table.allowed("carol", "admin", "") and table.allowed("carol", "write", "anything")
    assert not table.allowed("nobody", "read", "app/x")
    # Reading a prefix needs a permission that covers the whole prefix.
    assert table.allowed("bob", "read", "app/sub/") and not table.allowed("bob", "read", "ap")
    assert table.user_of_token(DIGEST) == "bob"


def test_deletes_keep_the_references_whole() -> None:
    table = _table()
    assert table.apply(_change("put_user", "dave", "missing-role")) == "role"
    assert table.apply(_change("put_token", DIGEST, "missing-user")) == "user"
    assert table.apply(_change("delete_role", "reader")) is None
    assert table.users["bob"] == () and not table.allowed("bob", "read", "app/x")
    assert table.apply(_change("delete_user", "bob")) is None
    assert table.user_of_token(DIGEST) is None
    assert table.apply(_change("delete_user", "bob")) == "user"
    assert table.apply(_change("delete_token", DIGEST[:16])) == "token"


def test_bad_changes_are_refused_before_the_log() -> None:
    for op, name, value in (
        ("put_user", "bad name", ()),
        ("put_role", "r", (("p", "superuser"),)),
        ("put_token", "not-a-hash", ("alice",)),
        ("delete_token", "abc", ()),
        ("drop_table", "x", ()),
    ):
        with pytest.raises(ValueError):
            AuthChange(op, name, value, None, 1)


def test_changes_travel_through_the_log_and_snapshots() -> None:
    machine = StateMachine()
    changes = [
        _change("put_role", "reader", ("app/", "read")),
        _change("put_user", "bob", "reader"),
        _change("put_token", DIGEST, "bob"),
        _change("put_user", "eve", "missing"),
    ]
    results = []
    for index, change in enumerate(changes, start=1):
        data = encode_command(change)
        assert decode_command(data) == change
        results.append(machine.apply(Entry(term=1, index=index, data=data)))
    assert [r.ok for r in results if r is not None] == [True, True, True, False]
    assert results[-1] is not None and results[-1].error == WriteError.AUTH_NOT_FOUND
    restored = StateMachine()
    restored.restore(machine.snapshot(), machine.applied_index)
    assert restored.auth.allowed("bob", "read", "app/k")
    assert restored.auth.user_of_token(DIGEST) == "bob"
    assert restored.digest() == machine.digest()
    # A store without auth keeps its snapshot bytes (no "auth" section).
    assert b"auth" not in StateMachine().snapshot()


def test_a_damaged_auth_section_is_refused() -> None:
    table = AuthTable()
    with pytest.raises(ProtocolError):
        table.load_obj([[["bob", ["missing"]]], [], []])
    with pytest.raises(ProtocolError):
        table.load_obj([[], [], [["xyz", "bob"]]])
    assert table.users == {}
