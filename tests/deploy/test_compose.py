"""deploy/compose.yaml: three nodes whose settings agree with each other, with the image and
with the `kvstore serve` contract. Parsed only: no Docker engine runs here."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import pytest

from tests.deploy.deployfiles import (
    Document,
    compose_environment,
    compose_file,
    load_serve_config,
    serve_environment_names,
)

SERVICES = ("kvstore-1", "kvstore-2", "kvstore-3")


def _services() -> dict[str, Document]:
    services: dict[str, Document] = compose_file()["services"]
    return services


def test_three_nodes_with_distinct_ids() -> None:
    services = _services()
    assert sorted(services) == list(SERVICES)
    ids = [compose_environment(services[name])["KVSTORE_ID"] for name in SERVICES]
    assert ids == ["1", "2", "3"]


def test_peers_name_every_service_on_its_peer_port() -> None:
    services = _services()
    peers = {compose_environment(services[name])["KVSTORE_PEERS"] for name in SERVICES}
    assert len(peers) == 1, "every node must be given the same peer list"
    expected = ",".join(
        f"{i}={name}:{compose_environment(services[name])['KVSTORE_LISTEN_PEER'].split(':')[-1]}"
        for i, name in enumerate(SERVICES, start=1)
    )
    assert peers.pop() == expected


def test_named_volumes_hold_each_data_directory() -> None:
    document = compose_file()
    declared = set(document["volumes"])
    mounted = []
    for name in SERVICES:
        service = document["services"][name]
        data_dir = compose_environment(service)["KVSTORE_DATA_DIR"]
        (volume,) = service["volumes"]
        source, target = volume.split(":")
        assert PurePosixPath(target) in PurePosixPath(data_dir).parents
        mounted.append(source)
    assert sorted(mounted) == sorted(declared)
    assert len(set(mounted)) == 3


def test_client_ports_are_published_and_advertised() -> None:
    published = []
    for name in SERVICES:
        service = _services()[name]
        env = compose_environment(service)
        (mapping,) = service["ports"]
        match = re.fullmatch(r"(?:127\.0\.0\.1:)?(\d+):(\d+)", mapping)
        assert match, mapping
        host_port, container_port = match.groups()
        assert env["KVSTORE_LISTEN_CLIENT"] == f"0.0.0.0:{container_port}"
        assert env["KVSTORE_ADVERTISE_CLIENT_URL"].endswith(f":{host_port}")
        published.append(host_port)
    assert published == ["7001", "7002", "7003"]


def test_nodes_get_time_to_hand_over_leadership() -> None:
    for name in SERVICES:
        service = _services()[name]
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace and int(grace.group(1)) >= 20
        assert service["restart"] in ("unless-stopped", "always", "on-failure")
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"


def test_every_variable_is_one_kvstore_serve_reads() -> None:
    known = serve_environment_names()
    for name in SERVICES:
        assert set(compose_environment(_services()[name])) <= known


@pytest.mark.parametrize("index", [0, 1, 2])
def test_kvstore_serve_accepts_each_node_configuration(index: int) -> None:
    name = SERVICES[index]
    config = load_serve_config(compose_environment(_services()[name]))
    assert config.id == index + 1
    assert config.peer_addresses == {i: f"kvstore-{i}:7101" for i in (1, 2, 3)}
    assert config.client_url == f"http://127.0.0.1:{7001 + index}"
