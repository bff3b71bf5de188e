"""The identity file and the empty-data-directory rules (kvstore/server/identity.py), and
the "fresh" handshake flag they rely on (kvstore/server/peerauth.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from kvstore.codec import pack, unpack
from kvstore.errors import CorruptionError, ProtocolError
from kvstore.raft.types import HardState
from kvstore.server import peerauth
from kvstore.server.config import load_config
from kvstore.server.identity import (
    Identity,
    has_storage,
    identity_path,
    read_identity,
    resolve_identity,
    write_identity,
)
from kvstore.storage.disk import DiskStorage


def test_the_identity_file_round_trips(tmp_path: Path) -> None:
    identity = Identity(4, "kvstore", "3", True, {1: "a:1", 2: "b:1"})
    write_identity(tmp_path / "d", identity)
    assert read_identity(tmp_path / "d") == identity
    assert read_identity(tmp_path / "none") is None
    assert not (tmp_path / "d" / "member.tmp").exists()


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"version": 1, "member_id": 0, "cluster_id": "k", "name": "1", "joined": false, "peers": {}}',
        '{"version": 1, "member_id": 1, "cluster_id": "k", "name": "1", "joined": 1, "peers": {}}',
        '{"version": 9, "member_id": 1, "cluster_id": "k", "name": "1", "joined": false, "peers": {}}',
        '{"version": 1, "member_id": 1, "cluster_id": "k", "name": "1", "joined": false, "peers": {"x": "a"}}',
    ],
)
def test_a_damaged_identity_file_stops_the_node_naming_it(tmp_path: Path, text: str) -> None:
    identity_path(tmp_path).write_text(text)
    with pytest.raises(CorruptionError, match=r"member\.json"):
        read_identity(tmp_path)


def test_an_empty_write_ahead_log_is_no_state(tmp_path: Path) -> None:
    """A tool that opened the directory (creating an empty log) does not make it a member:
    only a term, an entry or a snapshot does."""
    assert not has_storage(tmp_path / "missing")
    DiskStorage(tmp_path).close()
    assert not has_storage(tmp_path)
    storage = DiskStorage(tmp_path)
    storage.save(HardState(term=1, vote=1, commit=0), [], None)
    storage.close()
    assert has_storage(tmp_path)


def test_a_lone_node_bootstraps_and_keeps_its_identity(tmp_path: Path) -> None:
    config = load_config(None, {"KVSTORE_ID": "2", "KVSTORE_DATA_DIR": str(tmp_path)})
    identity = asyncio.run(resolve_identity(config))
    assert identity == Identity(2, "kvstore", "2")
    storage = DiskStorage(tmp_path)  # the node takes part: its first save
    storage.save(HardState(term=1, vote=2, commit=0), [], None)
    storage.close()
    # The file decides from now on, whatever --id says.
    other = load_config(None, {"KVSTORE_ID": "7", "KVSTORE_DATA_DIR": str(tmp_path)})
    assert asyncio.run(resolve_identity(other)) == identity
    # ... but not for another cluster.
    foreign = load_config(
        None,
        {"KVSTORE_ID": "2", "KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_CLUSTER_ID": "other"},
    )
    with pytest.raises(CorruptionError, match="belongs to cluster"):
        asyncio.run(resolve_identity(foreign))


def test_a_directory_from_before_identity_files_is_its_id(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path)
    storage.save(HardState(term=3, vote=1, commit=0), [], None)
    storage.close()
    config = load_config(
        None,
        {
            "KVSTORE_ID": "1",
            "KVSTORE_DATA_DIR": str(tmp_path),
            "KVSTORE_PEERS": "1=127.0.0.1:1,2=127.0.0.1:2",
        },
    )
    assert asyncio.run(resolve_identity(config)) == Identity(1, "kvstore", "1")
    assert json.loads(identity_path(tmp_path).read_text())["member_id"] == 1


def test_the_fresh_flag_is_optional_on_the_wire_and_proven() -> None:
    hello = peerauth.new_hello(cluster_id="c", node_id=1, to=2, client_url="u")
    assert len(unpack(peerauth.encode_handshake(hello))) == 8  # as before
    fresh = peerauth.new_hello(cluster_id="c", node_id=1, to=2, client_url="u", fresh=True)
    assert peerauth.decode_handshake(peerauth.encode_handshake(fresh)).fresh
    answer = peerauth.answer_to(fresh, secret=b"s" * 16, cluster_id="c", node_id=2, client_url="v")
    # A proof made for one flag does not prove the other: "fresh" cannot be forged.
    with pytest.raises(ProtocolError):
        peerauth.check_proof(
            b"s" * 16,
            peerauth.ACCEPTOR,
            dataclasses.replace(fresh, fresh=False),
            answer,
            answer.proof,
        )
    peerauth.check_proof(b"s" * 16, peerauth.ACCEPTOR, fresh, answer, answer.proof)
    bad = pack([*unpack(peerauth.encode_handshake(fresh))[:8], 1])
    with pytest.raises(ProtocolError):
        peerauth.decode_handshake(bad)


def test_an_identity_without_raft_state_is_not_trusted(tmp_path: Path) -> None:
    """member.json survived, the log did not: whether member 4 voted cannot be told, so the
    directory counts as empty (here, forced to bootstrap, it does so as --id, not as 4)."""
    write_identity(tmp_path, Identity(4, "kvstore", "2", True, {1: "a:1"}))
    DiskStorage(tmp_path).close()  # an empty log
    config = load_config(
        None,
        {
            "KVSTORE_ID": "2",
            "KVSTORE_DATA_DIR": str(tmp_path),
            "KVSTORE_PEERS": "1=127.0.0.1:1,2=127.0.0.1:2",
            "KVSTORE_INITIAL_CLUSTER_STATE": "new",
        },
    )
    assert asyncio.run(resolve_identity(config)) == Identity(2, "kvstore", "2")
    assert read_identity(tmp_path) == Identity(2, "kvstore", "2")
