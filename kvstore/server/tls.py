"""TLS for both ports with the standard library's ssl module, reloadable without a restart.

What lives here: the SSL contexts of the client port (a server context) and of the peer port
(a server context for inbound connections and a client context for dials, both presenting
this node's certificate and requiring the peer's), their reload, and the check that a peer's
certificate names the member it claims to be.

Rules that hold here:
- TLS 1.2 at least; the ssl module's defaults otherwise (OpenSSL's secure cipher list,
  compression off, renegotiation off in 1.3).
- A peer's certificate must chain to the peer CA (`peer_ca_file`) and name the member it
  claims to be (`check_peer_identity`): a URI SAN `urn:kvstore:node:<id>` when the certificate
  has any such URI (`kvstore certs init` writes one), else a DNS or IP SAN matching the host
  of that member's configured peer address (one shared wildcard certificate, as cert-manager
  issues for a StatefulSet, then proves membership but not which member). A fresh process
  (an empty data directory asking whether a cluster exists) under an id no member knows yet
  has no address to match: a certificate without node URIs is taken on the CA's word
  (`check_fresh_peer_identity`); that connection carries nothing after the handshake.
- Reload: `TlsContexts.reload()` reads every file again and builds new contexts; if any file
  is missing or bad it logs an error and keeps the old ones (a half-written rotation never
  takes a node down). A server context handed to a listener once is switched per connection
  through its SNI callback, which OpenSSL calls for every ClientHello (with or without a
  server name), so new connections get the new certificate and existing ones are untouched.
  Reload runs on SIGHUP and when a watched file's mtime, size or inode changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstore.errors import ProtocolError
from kvstore.server.discovery import split_host_port

logger = logging.getLogger("kvstore.server")

NODE_URI_PREFIX = "urn:kvstore:node:"
"""A URI SAN naming a member: NODE_URI_PREFIX + its node id."""
RELOAD_POLL_S = 5.0
"""How often certificate files are checked for a change (SIGHUP reloads at once)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    """One port's files: its certificate chain and key (PEM), and the CA that signs the other
    side's certificates ("" for none: a client port that does not ask for certificates)."""

    cert: str
    key: str
    ca: str = ""

    def paths(self) -> tuple[str, ...]:
        return tuple(path for path in (self.cert, self.key, self.ca) if path)


def _base(purpose: int, files: TlsFiles) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if purpose == 0 else ssl.PROTOCOL_TLS_CLIENT
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    if files.ca:
        context.load_verify_locations(cafile=files.ca)
    return context


def server_context(files: TlsFiles, *, client_cert: str) -> ssl.SSLContext:
    """A listener's context. `client_cert`: "none", "optional" (verified when presented) or
    "required" (the handshake fails without one signed by `files.ca`)."""
    context = _base(0, files)
    if client_cert != "none":
        if not files.ca:
            raise ValueError("asking for client certificates needs a CA file")
        context.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
    return context


def peer_dial_context(files: TlsFiles) -> ssl.SSLContext:
    """The context of a dial to a peer: it presents our certificate and requires the peer's,
    signed by the peer CA. The host name is not checked by OpenSSL: `check_peer_identity`
    checks the member instead (the dialled address may be a proxy or a KVSTORE_RESOLVE
    override)."""
    context = _base(1, files)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _names(certificate: dict[str, object], kind: str) -> list[str]:
    sans = certificate.get("subjectAltName", ())
    assert isinstance(sans, tuple)
    return [str(value) for name, value in sans if name == kind]


def _dns_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = host.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return pattern == host


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def check_peer_identity(
    certificate: dict[str, object] | None, node_id: int, address: str, slot: int = 0
) -> None:
    """Raise ProtocolError unless `certificate` (ssl's getpeercert()) names member `node_id`,
    whose configured peer address is `address` (see the module docstring). `slot`: the
    bootstrap slot the member holds (its name, kvstore/kv/members.py), which its certificate
    may name instead: a member that replaced a lost disk runs under a new id on the slot's
    machine, with the slot's certificate."""
    if not certificate:
        raise ProtocolError(f"node {node_id} presented no certificate")
    uris = [uri for uri in _names(certificate, "URI") if uri.startswith(NODE_URI_PREFIX)]
    if uris:
        if f"{NODE_URI_PREFIX}{node_id}" in uris or (slot and f"{NODE_URI_PREFIX}{slot}" in uris):
            return
        raise ProtocolError(
            f"a certificate of {', '.join(uris)[:200]} claimed to be node {node_id}"
        )
    if not address:
        raise ProtocolError(f"node {node_id} is not a member: no address to check it against")
    host, _ = split_host_port(address)
    wanted_ip = _ip(host)
    if wanted_ip is not None:
        if any(_ip(value) == wanted_ip for value in _names(certificate, "IP Address")):
            return
    elif any(_dns_matches(value, host) for value in _names(certificate, "DNS")):
        return
    raise ProtocolError(f"the certificate of node {node_id} does not name {host!r}")


def check_fresh_peer_identity(certificate: dict[str, object] | None, node_id: int) -> None:
    """The check of a fresh process's certificate when its id is no member's (a pod of a set
    scaled up asking whether a cluster exists): a certificate that names members must name
    `node_id`; one that names none (a cluster-wide certificate) proves only that the CA
    issued it to the cluster, which is all this handshake needs (see the module docstring)."""
    if not certificate:
        raise ProtocolError(f"node {node_id} presented no certificate")
    uris = [uri for uri in _names(certificate, "URI") if uri.startswith(NODE_URI_PREFIX)]
    if uris and f"{NODE_URI_PREFIX}{node_id}" not in uris:
        raise ProtocolError(f"a certificate of {', '.join(uris)[:200]} claimed to be node {node_id}")


def _stamp(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    stamps = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(stamps)


class TlsContexts:
    """The current contexts of this node's TLS ports, rebuilt by `reload()`.

    `client_files`: the client port's (None: plain HTTP). `peer_files`: the peer port's
    (None: plain TCP). Raises ValueError or OSError at construction when a file is bad, so a
    node with a broken TLS setting never starts."""

    def __init__(
        self,
        *,
        client_files: TlsFiles | None,
        client_cert: str = "none",
        peer_files: TlsFiles | None,
    ) -> None:
        self.client_files = client_files
        self.client_cert = client_cert
        self.peer_files = peer_files
        self.reloads = 0
        self._stamp = _stamp(self._paths())
        self._build()
        # The contexts handed to listeners once; their SNI callback switches each new
        # connection to the current context.
        self._client_listener = self.client_server
        if self._client_listener is not None:
            self._client_listener.sni_callback = self._switch_client
        self._peer_listener = self.peer_server
        if self._peer_listener is not None:
            self._peer_listener.sni_callback = self._switch_peer

    def _paths(self) -> tuple[str, ...]:
        return tuple(
            path
            for files in (self.client_files, self.peer_files)
            if files
            for path in files.paths()
        )

    def _build(self) -> None:
        self.client_server = (
            None
            if self.client_files is None
            else server_context(self.client_files, client_cert=self.client_cert)
        )
        self.peer_server = (
            None
            if self.peer_files is None
            else server_context(self.peer_files, client_cert="required")
        )
        self.peer_dial = None if self.peer_files is None else peer_dial_context(self.peer_files)

    @property
    def client_listener(self) -> ssl.SSLContext | None:
        """The context to give the client port's listener (it follows reloads)."""
        return self._client_listener

    @property
    def peer_listener(self) -> ssl.SSLContext | None:
        """The context to give the peer port's listener (it follows reloads)."""
        return self._peer_listener

    def _switch_client(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        if self.client_server is not None and connection.context is not self.client_server:
            connection.context = self.client_server

    def _switch_peer(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        if self.peer_server is not None and connection.context is not self.peer_server:
            connection.context = self.peer_server

    def reload(self, reason: str) -> bool:
        """Rebuild every context from the files; keep the old ones if that fails."""
        stamp = _stamp(self._paths())
        try:
            self._build()
        except (OSError, ValueError, ssl.SSLError) as exc:
            logger.error("event=tls_reload_failed reason=%s error=%r kept=previous", reason, exc)
            self._stamp = stamp  # do not retry until a file changes again
            return False
        self._stamp = stamp
        self.reloads += 1
        logger.info("event=tls_reloaded reason=%s reloads=%d", reason, self.reloads)
        return True

    def changed(self) -> bool:
        return _stamp(self._paths()) != self._stamp

    async def watch(self, interval_s: float = RELOAD_POLL_S) -> None:
        """Reload whenever a file changes; runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            if self.changed():
                self.reload("file_changed")


def install_sighup(loop: asyncio.AbstractEventLoop, reload: Callable[[], object]) -> None:
    """Reload on SIGHUP (where signals can be handled on this loop)."""
    import signal

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, reload)


def contexts_from_config(config: Any) -> TlsContexts | None:
    """The TLS contexts a ServeConfig asks for, or None when both ports are plain.
    Raises OSError, ValueError or ssl.SSLError naming what is wrong with a file."""
    client = (
        TlsFiles(cert=config.cert_file, key=config.key_file, ca=config.ca_file)
        if config.cert_file
        else None
    )
    peer = (
        TlsFiles(cert=config.peer_cert_file, key=config.peer_key_file, ca=config.peer_ca_file)
        if config.peer_cert_file
        else None
    )
    if client is None and peer is None:
        return None
    return TlsContexts(client_files=client, client_cert=config.client_cert_auth, peer_files=peer)
