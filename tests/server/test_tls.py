"""TLS on both ports (kvstore/server/tls.py): mutual TLS between peers with the member identity
check, reload without a restart, the client port over https, and `kvstore certs init`."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from kvstore.client import Client, ClientConfig
from kvstore.errors import ProtocolError, UnavailableError
from kvstore.raft.types import Message, MessageType
from kvstore.server.certs import init_pki
from kvstore.server.config import ServeConfig
from kvstore.server.localcluster import LocalCluster
from kvstore.server.tls import TlsContexts, TlsFiles, check_peer_identity
from kvstore.server.transport import PeerTransport


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory, nodes=3)
    return directory


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other-pki")
    init_pki(directory, nodes=3)
    return directory


def _files(directory: Path, node_id: int) -> TlsFiles:
    return TlsFiles(
        cert=str(directory / f"node{node_id}.pem"),
        key=str(directory / f"node{node_id}-key.pem"),
        ca=str(directory / "ca.pem"),
    )


def _contexts(directory: Path, node_id: int) -> TlsContexts:
    return TlsContexts(client_files=None, peer_files=_files(directory, node_id))


# --- the identity rule -----------------------------------------------------------------------


def test_a_node_uri_names_exactly_that_member() -> None:
    certificate: dict[str, object] = {
        "subjectAltName": (("URI", "urn:kvstore:node:2"), ("IP Address", "127.0.0.1"))
    }
    check_peer_identity(certificate, 2, "127.0.0.1:7102")
    # The IP matches too, but a certificate naming a member is only that member.
    with pytest.raises(ProtocolError, match="claimed to be node 3"):
        check_peer_identity(certificate, 3, "127.0.0.1:7103")


def test_without_a_node_uri_the_host_of_the_members_address_must_match() -> None:
    wildcard: dict[str, object] = {"subjectAltName": (("DNS", "*.kvstore-peer.prod.svc"),)}
    check_peer_identity(wildcard, 1, "kvstore-0.kvstore-peer.prod.svc:7101")
    for address in ("kvstore-peer.prod.svc:7101", "a.b.kvstore-peer.prod.svc:7101", "evil:7101"):
        with pytest.raises(ProtocolError, match="does not name"):
            check_peer_identity(wildcard, 1, address)
    by_ip: dict[str, object] = {"subjectAltName": (("IP Address", "10.0.0.7"),)}
    check_peer_identity(by_ip, 1, "10.0.0.7:7101")
    with pytest.raises(ProtocolError):
        check_peer_identity(by_ip, 1, "10.0.0.8:7101")
    with pytest.raises(ProtocolError, match="no certificate"):
        check_peer_identity(None, 1, "10.0.0.7:7101")


# --- the peer port ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


class _Node:
    def __init__(self, node_id: int, peers: dict[int, str], tls: TlsContexts | None) -> None:
        self.received: list[Message] = []
        self.transport = PeerTransport(
            node_id=node_id,
            cluster_id="c1",
            client_url=f"https://client-{node_id}",
            listen=peers[node_id],
            peers=peers,
            on_message=self.received.append,
            on_peer_down=lambda peer: None,
            tls=tls,
        )


def _heartbeat(to: int, from_: int) -> Message:
    return Message(MessageType.HEARTBEAT, to=to, from_=from_, term=3)


async def _exchange(a: _Node, b: _Node) -> None:
    await a.transport.start()
    await b.transport.start()


async def test_peers_with_certificates_of_the_cluster_ca_talk(pki: Path) -> None:
    peers = {1: f"127.0.0.1:{_free_port()}", 2: f"127.0.0.1:{_free_port()}"}
    a, b = _Node(1, peers, _contexts(pki, 1)), _Node(2, peers, _contexts(pki, 2))
    await _exchange(a, b)
    try:
        a.transport.send(_heartbeat(2, 1))
        b.transport.send(_heartbeat(1, 2))
        await _wait_for(lambda: len(a.received) == 1 and len(b.received) == 1)
        assert a.transport.peer_urls == {2: "https://client-2"}
    finally:
        await a.transport.close()
        await b.transport.close()


@pytest.mark.parametrize("forgery", ["another member's certificate", "another CA", "no TLS"])
async def test_a_forged_peer_is_refused_and_nothing_reaches_raft(
    forgery: str, pki: Path, other_pki: Path
) -> None:
    """Node 2's place is taken by a process that knows the cluster id: with node 3's
    certificate (right CA, wrong member), with a certificate of another CA, or without TLS."""
    peers = {1: f"127.0.0.1:{_free_port()}", 2: f"127.0.0.1:{_free_port()}"}
    tls = {
        "another member's certificate": _contexts(pki, 3),
        "another CA": _contexts(other_pki, 2),
        "no TLS": None,
    }[forgery]
    a, forged = _Node(1, peers, _contexts(pki, 1)), _Node(2, peers, tls)
    await _exchange(a, forged)
    try:
        forged.transport.send(_heartbeat(1, 2))

        # Refused either way, several times: whichever end notices first counts it (a
        # failed TLS handshake on a listener is asyncio's and counts nowhere).
        def refusals() -> int:
            return sum(
                node.transport.dials_rejected + node.transport.handshakes_failed
                for node in (a, forged)
            )

        await _wait_for(lambda: refusals() >= 4)
        assert a.received == [] and a.transport.peer_urls == {}
        assert not forged.transport.is_connected(1)
    finally:
        await a.transport.close()
        await forged.transport.close()


async def test_rotated_certificates_are_used_after_a_reload(
    pki: Path, other_pki: Path, tmp_path: Path
) -> None:
    """Node 1's files are replaced by certificates of a new CA and reloaded: a peer with the
    new CA's certificate gets in, one of the old CA no longer does; no restart."""
    live = tmp_path / "live"
    live.mkdir()
    for name in ("node1.pem", "node1-key.pem", "ca.pem"):
        shutil.copy(pki / name, live / name)
    contexts = _contexts(live, 1)
    peers = {1: f"127.0.0.1:{_free_port()}", 2: f"127.0.0.1:{_free_port()}"}
    a = _Node(1, peers, contexts)
    old = _Node(2, peers, _contexts(pki, 2))
    await _exchange(a, old)
    try:
        old.transport.send(_heartbeat(1, 2))
        await _wait_for(lambda: len(a.received) == 1)
        await old.transport.close()
        assert not contexts.changed()
        for name in ("node1.pem", "node1-key.pem", "ca.pem"):
            shutil.copy(other_pki / name, live / name)
        assert contexts.changed()
        assert contexts.reload("test")
        stale = _Node(2, peers, _contexts(pki, 2))
        await stale.transport.start()
        stale.transport.send(_heartbeat(1, 2))
        await _wait_for(lambda: stale.transport.dials_rejected >= 2)
        assert len(a.received) == 1
        await stale.transport.close()
        new = _Node(2, peers, _contexts(other_pki, 2))
        await new.transport.start()
        try:
            new.transport.send(_heartbeat(1, 2))
            await _wait_for(lambda: len(a.received) == 2)
        finally:
            await new.transport.close()
        # A half-written rotation (a bad file) keeps the working contexts.
        (live / "node1-key.pem").write_text("not a key")
        assert not contexts.reload("test") and contexts.peer_dial is not None
    finally:
        await a.transport.close()


# --- configuration ---------------------------------------------------------------------------


def _config(**values: Any) -> ServeConfig:
    return ServeConfig(id=1, peers=((1, "127.0.0.1:7101"),), data_dir=Path("d"), **values)


def test_tls_settings_are_checked_at_start() -> None:
    with pytest.raises(ValueError, match="go together"):
        _config(cert_file="c.pem")
    with pytest.raises(ValueError, match="go together"):
        _config(peer_cert_file="c.pem", peer_key_file="k.pem")
    with pytest.raises(ValueError, match="needs ca_file"):
        _config(cert_file="c.pem", key_file="k.pem", client_cert_auth="required")
    with pytest.raises(ValueError, match="client_cert_auth must be"):
        _config(cert_file="c.pem", key_file="k.pem", ca_file="ca.pem", client_cert_auth="yes")
    assert _config(cert_file="c.pem", key_file="k.pem").client_url == "https://127.0.0.1:7001"
    # Peer TLS alone is enough to listen beyond loopback.
    ServeConfig(
        id=1,
        peers=((1, "0.0.0.0:7101"),),
        data_dir=Path("d"),
        listen_peer="0.0.0.0:7101",
        peer_cert_file="c.pem",
        peer_key_file="k.pem",
        peer_ca_file="ca.pem",
    )


def test_certs_init_writes_a_ca_and_certificates_that_verify(tmp_path: Path) -> None:
    from kvstore.cli import main

    assert main(["certs", "init", "--dir", str(tmp_path), "--nodes", "2", "--client", "app"]) == 0
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == [
        "ca-key.pem", "ca.pem", "client-app-key.pem", "client-app.pem",
        "node1-key.pem", "node1.pem", "node2-key.pem", "node2.pem",
    ]  # fmt: skip
    assert (tmp_path / "node1-key.pem").stat().st_mode & 0o777 == 0o600
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(str(tmp_path / "client-app.pem"), str(tmp_path / "client-app-key.pem"))
    ca_before = (tmp_path / "ca.pem").read_bytes()
    assert main(["certs", "init", "--dir", str(tmp_path), "--nodes", "3"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() == ca_before  # the CA is reused
    assert (tmp_path / "node3.pem").exists()


# --- end to end ------------------------------------------------------------------------------


async def test_a_tls_cluster_serves_https_and_reloads_on_sighup(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, 3, tls=True)
    try:
        await asyncio.to_thread(cluster.start)
        leader = await asyncio.to_thread(cluster.wait_for_leader, 15.0)
        assert cluster.client_url(leader).startswith("https://")
        config = ClientConfig(ca_file=cluster.ca_file, timeout_s=5.0)
        async with Client(cluster.client_urls, config=config) as client:
            await client.put("k", b"v")
            assert (await client.get("k")).value == b"v"
        # Without the CA the node's certificate is not trusted: nothing is sent.
        # (over HTTP: a stream dial that the deadline cuts short ends with another message)
        untrusting = ClientConfig(timeout_s=2.0, binary_stream=False)
        async with Client(cluster.client_urls, config=untrusting) as client:
            with pytest.raises(UnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get("k")
        pid = cluster.pid(leader)
        assert pid is not None
        os.kill(pid, signal.SIGHUP)
        await asyncio.to_thread(
            cluster.wait_until,
            lambda: (
                "event=tls_reloaded reason=sighup"
                in cluster.log_path(leader).read_text(errors="replace")
            ),
            10.0,
            "reload",
        )
        assert cluster.pid(leader) == pid
        async with Client(cluster.client_urls, config=config) as client:
            await client.put("k", b"w")
            assert (await client.get("k")).value == b"w"
    finally:
        await asyncio.to_thread(cluster.stop)


def test_peer_tls_connects_at_once_under_uvloop(pki: Path) -> None:
    """Regression: the listener upgraded accepted connections with start_tls, which hangs
    under uvloop (the server's TLS handshake never completed; dials failed at the handshake
    timeout and only some got through, tripling write latency). The nodes run on uvloop."""
    uvloop = pytest.importorskip("uvloop")

    async def exchange() -> None:
        peers = {1: f"127.0.0.1:{_free_port()}", 2: f"127.0.0.1:{_free_port()}"}
        a, b = _Node(1, peers, _contexts(pki, 1)), _Node(2, peers, _contexts(pki, 2))
        await _exchange(a, b)
        try:
            for i in range(50):
                a.transport.send(_heartbeat(2, 1))
                await _wait_for(lambda i=i: len(b.received) == i + 1, timeout_s=0.5)
            assert a.transport.dials_rejected == 0 and b.transport.handshakes_failed == 0
        finally:
            await a.transport.close()
            await b.transport.close()

    uvloop.run(exchange())


async def test_the_client_listener_switches_to_reloaded_certificates(
    pki: Path, other_pki: Path, tmp_path: Path
) -> None:
    """A listener keeps the context it was given; its SNI callback hands each new connection
    the reloaded one, so clients trusting only the new CA get in after a reload."""
    for name in ("node1.pem", "node1-key.pem"):
        shutil.copy(pki / name, tmp_path / name)
    contexts = TlsContexts(
        client_files=TlsFiles(
            cert=str(tmp_path / "node1.pem"), key=str(tmp_path / "node1-key.pem")
        ),
        peer_files=None,
    )

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=contexts.client_listener)
    port = server.sockets[0].getsockname()[1]

    async def greeting(ca: Path) -> bytes | str:
        context = ssl.create_default_context(cafile=str(ca / "ca.pem"))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        except ssl.SSLError as exc:
            return str(exc.reason)
        data = await reader.read()
        writer.close()
        return data

    try:
        assert await greeting(pki) == b"hi"
        assert await greeting(other_pki) == "CERTIFICATE_VERIFY_FAILED"
        for name in ("node1.pem", "node1-key.pem"):
            shutil.copy(other_pki / name, tmp_path / name)
        assert contexts.reload("test")
        assert await greeting(other_pki) == b"hi"
        assert await greeting(pki) == "CERTIFICATE_VERIFY_FAILED"
    finally:
        server.close()


def _cluster_wide_certificate(directory: Path, stem: str, ca_directory: Path) -> TlsContexts:
    """One certificate for every member naming hosts, not members (no node URI): what the
    Kubernetes example's cert-manager Certificate (`*.kvstore-peer...`) is."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from kvstore.server.certs import _alt_names, _issue, _load_or_make_ca

    ca = _load_or_make_ca(ca_directory, 1)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    _issue(directory, stem, "kvstore", ca, alt_names=_alt_names(None, ()), usages=usages, days=1)
    files = TlsFiles(
        cert=str(directory / f"{stem}.pem"),
        key=str(directory / f"{stem}-key.pem"),
        ca=str(ca_directory / "ca.pem"),
    )
    return TlsContexts(client_files=None, peer_files=files)


@pytest.mark.parametrize("certificate", ["cluster-wide", "another member's node URI"])
async def test_a_fresh_process_under_an_unknown_id_may_ask_with_a_cluster_wide_certificate(
    tmp_path: Path, pki: Path, certificate: str
) -> None:
    """A pod of a StatefulSet scaled up (id 4, which no member knows yet) asks member 1
    whether a cluster exists. With a cluster-wide certificate (the CA's word that it is one
    of the cluster) it is answered; a certificate that names another member is refused as
    before. (Without this a scaled-up pod under the Kubernetes TLS example waited forever.)"""
    shared = _cluster_wide_certificate(tmp_path, "members", pki)
    member_peers = {1: f"127.0.0.1:{_free_port()}"}
    member = _Node(1, member_peers, shared)
    asker_tls = shared if certificate == "cluster-wide" else _contexts(pki, 3)
    asker = PeerTransport(
        node_id=4,
        cluster_id="c1",
        client_url="https://client-4",
        listen=f"127.0.0.1:{_free_port()}",
        peers=dict(member_peers),
        on_message=lambda message: None,
        on_peer_down=lambda peer: None,
        tls=asker_tls,
        fresh=True,
        name_slot=4,
    )
    await member.transport.start()
    await asker.start()
    try:
        if certificate == "cluster-wide":
            await _wait_for(lambda: asker.peer_fresh.get(1) is False)
            assert asker.peer_urls[1] == "https://client-1"
        else:
            await _wait_for(lambda: member.transport.handshakes_failed >= 2)
            assert 1 not in asker.peer_fresh
        assert member.received == []
    finally:
        await asker.close()
        await member.transport.close()
