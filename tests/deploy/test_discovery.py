"""Unit tests of kvstore.server.discovery: StatefulSet identity and KVSTORE_RESOLVE overrides."""

from __future__ import annotations

import socket

import pytest

from kvstore.server.discovery import (
    derive_statefulset_identity,
    parse_resolve_overrides,
    resolve_address,
    split_host_port,
    statefulset_identity_from_environ,
)


@pytest.mark.parametrize("ordinal", [0, 1, 2])
def test_ordinal_gives_id_and_all_peers(ordinal: int) -> None:
    node_id, peers, joins = derive_statefulset_identity(
        f"kvstore-{ordinal}", 3, "kvstore-peer", 7101
    )
    assert node_id == ordinal + 1
    assert not joins  # the bootstrap set: these three form the cluster at its first start
    assert peers == {
        1: "kvstore-0.kvstore-peer:7101",
        2: "kvstore-1.kvstore-peer:7101",
        3: "kvstore-2.kvstore-peer:7101",
    }


def test_every_pod_derives_the_same_peer_map() -> None:
    maps = [derive_statefulset_identity(f"db-{i}", 5, "db-peers", 9000)[1] for i in range(5)]
    assert all(m == maps[0] for m in maps)
    assert sorted(maps[0]) == [1, 2, 3, 4, 5]


def test_fully_qualified_hostname_uses_first_label() -> None:
    fqdn = "kvstore-2.kvstore-peer.prod.svc.cluster.local."
    node_id, peers, _ = derive_statefulset_identity(fqdn, 3, "kvstore-peer", 7101)
    assert node_id == 3
    assert peers[1] == "kvstore-0.kvstore-peer:7101"


def test_set_name_with_dashes_and_digits() -> None:
    node_id, peers, _ = derive_statefulset_identity("my-db-2-10", 11, "svc", 7101)
    assert node_id == 11
    assert peers[1] == "my-db-2-0.svc:7101"


def test_hostname_case_is_ignored() -> None:
    assert derive_statefulset_identity("KVStore-1", 3, "Peer", 7101) == (
        2,
        {1: "kvstore-0.peer:7101", 2: "kvstore-1.peer:7101", 3: "kvstore-2.peer:7101"},
        False,
    )


def test_qualified_service_and_empty_service() -> None:
    _, peers, _ = derive_statefulset_identity("kv-0", 1, "kv-peer.prod.svc", 7101)
    assert peers == {1: "kv-0.kv-peer.prod.svc:7101"}
    _, bare, _ = derive_statefulset_identity("kv-0", 2, "", 7101)
    assert bare == {1: "kv-0:7101", 2: "kv-1:7101"}


@pytest.mark.parametrize(
    "hostname",
    [
        "kvstore",  # no ordinal
        "kvstore-",  # empty ordinal
        "-0",  # empty set name
        "kvstore-01",  # leading zero: would alias kvstore-1
        "kvstore-x",
        "kvstore_0",  # underscore is not a DNS label character
        "kvstore--0",  # set name ending in a dash
        "",
        "a" * 62 + "-0",  # longer than one DNS label
    ],
)
def test_bad_hostnames_are_rejected(hostname: str) -> None:
    with pytest.raises(ValueError, match="hostname"):
        derive_statefulset_identity(hostname, 3, "kvstore-peer", 7101)


@pytest.mark.parametrize("ordinal", [3, 4, 9])
def test_pod_beyond_the_bootstrap_set_joins(ordinal: int) -> None:
    """The set scaled up: the new pod's peers are the bootstrap set (whom it asks to join)
    and itself (its slot's address, which it gives the cluster); it never bootstraps."""
    node_id, peers, joins = derive_statefulset_identity(
        f"kvstore-{ordinal}", 3, "kvstore-peer", 7101
    )
    assert (node_id, joins) == (ordinal + 1, True)
    assert peers == {
        1: "kvstore-0.kvstore-peer:7101",
        2: "kvstore-1.kvstore-peer:7101",
        3: "kvstore-2.kvstore-peer:7101",
        ordinal + 1: f"kvstore-{ordinal}.kvstore-peer:7101",
    }


def test_absurd_ordinal_is_rejected() -> None:
    with pytest.raises(ValueError, match="above 9999"):
        derive_statefulset_identity("kvstore-10000", 3, "kvstore-peer", 7101)


@pytest.mark.parametrize(
    ("replicas", "service", "port", "match"),
    [
        (0, "svc", 7101, "replicas"),
        (3, "svc", 0, "peer port"),
        (3, "svc", 65536, "peer port"),
        (3, "bad_service", 7101, "peer service"),
        (3, "svc..cluster", 7101, "peer service"),
    ],
)
def test_bad_set_parameters_are_rejected(
    replicas: int, service: str, port: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        derive_statefulset_identity("kvstore-0", replicas, service, port)


def test_environ_explicit_id_wins_over_statefulset_mode() -> None:
    env = {"KVSTORE_ID": "2", "KVSTORE_STATEFULSET_REPLICAS": "3", "KVSTORE_HOSTNAME": "kv-0"}
    assert statefulset_identity_from_environ(env) is None
    assert statefulset_identity_from_environ({}) is None


def test_environ_statefulset_mode() -> None:
    env = {
        "KVSTORE_STATEFULSET_REPLICAS": "3",
        "KVSTORE_PEER_SERVICE": "kvstore-peer",
        "KVSTORE_PEER_PORT": "7201",
        "KVSTORE_HOSTNAME": "kvstore-1",
    }
    node_id, peers, _ = statefulset_identity_from_environ(env) or (0, {}, False)
    assert node_id == 2
    assert peers[3] == "kvstore-2.kvstore-peer:7201"


def test_environ_defaults_port_and_hostname() -> None:
    hostname = socket.gethostname()
    env = {"KVSTORE_STATEFULSET_REPLICAS": "3", "KVSTORE_ID": ""}
    try:
        derive_statefulset_identity(hostname, 3, "", 7101)
    except ValueError:
        with pytest.raises(ValueError, match="hostname"):
            statefulset_identity_from_environ(env)
        env["KVSTORE_HOSTNAME"] = "kvstore-0"
    result = statefulset_identity_from_environ(env)
    assert result is not None
    assert result[1][1].endswith(":7101")


@pytest.mark.parametrize("name", ["KVSTORE_STATEFULSET_REPLICAS", "KVSTORE_PEER_PORT"])
def test_environ_non_integer_is_rejected(name: str) -> None:
    env = {"KVSTORE_STATEFULSET_REPLICAS": "3", "KVSTORE_HOSTNAME": "kv-0", name: "three"}
    with pytest.raises(ValueError, match=name):
        statefulset_identity_from_environ(env)


def test_resolve_override_maps_name_and_port() -> None:
    env = {
        "KVSTORE_RESOLVE": "kvstore-0.kvstore-peer:7101=127.0.0.1:40001, "
        "kvstore-1.kvstore-peer:7101=127.0.0.1:40002,"
    }
    assert resolve_address("kvstore-0.kvstore-peer:7101", env) == ("127.0.0.1", 40001)
    assert resolve_address("KVSTORE-1.kvstore-peer.:7101", env) == ("127.0.0.1", 40002)
    # Another port of the same name, and unknown names, pass through unchanged.
    assert resolve_address("kvstore-0.kvstore-peer:7102", env) == ("kvstore-0.kvstore-peer", 7102)
    assert resolve_address("other:7101", env) == ("other", 7101)


def test_resolve_without_overrides_and_ipv6() -> None:
    assert resolve_address("10.0.0.5:7101", {}) == ("10.0.0.5", 7101)
    assert resolve_address("[::1]:7101", {}) == ("::1", 7101)
    env = {"KVSTORE_RESOLVE": "kv-0:7101=[::1]:9000"}
    assert resolve_address("kv-0:7101", env) == ("::1", 9000)


def test_resolve_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_RESOLVE", "kv-2:7101=127.0.0.1:1234")
    assert resolve_address("kv-2:7101") == ("127.0.0.1", 1234)


@pytest.mark.parametrize(
    "text",
    [
        "kv-0:7101",  # no target
        "kv-0=127.0.0.1:1",  # source without a port
        "kv-0:7101=127.0.0.1",  # target without a port
        "kv-0:7101=127.0.0.1:0",
        "kv-0:7101=127.0.0.1:70000",
        "kv-0:7101=:80",
        "kv-0:7101=[]:80",
    ],
)
def test_bad_resolve_overrides_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_resolve_overrides(text)


@pytest.mark.parametrize("address", ["host", "host:", ":7101", "host:port", "host:-1"])
def test_bad_addresses_are_rejected(address: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(address)

