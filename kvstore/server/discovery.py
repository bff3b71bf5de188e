"""How a node learns its id and its peers' addresses from where it runs.

Under a Kubernetes StatefulSet each pod is named `<set>-<ordinal>` and reachable at
`<set>-<ordinal>.<headless service>:<port>`, so a node derives its id (ordinal + 1: its name,
the slot it holds) and every peer's address from its own hostname; no per-pod configuration
is needed. StatefulSet mode is on when `KVSTORE_ID` is unset and `KVSTORE_STATEFULSET_REPLICAS`
is set; the hostname is `KVSTORE_HOSTNAME` (set from the pod name through the downward API)
or the machine's hostname.

`KVSTORE_STATEFULSET_REPLICAS` is the *bootstrap set*: the pods `<set>-0..N-1` that form the
cluster at its first start, and whose addresses every pod asks. It stays fixed when the
StatefulSet is scaled. A pod with a higher ordinal (the set scaled up) is never part of a
bootstrap: its peers are the bootstrap set and itself, and it must join the existing cluster
(`PodIdentity.joins`: the configuration sets `initial_cluster_state=existing`), as a learner
under a new id that the leader promotes once it has caught up (kvstore/server/identity.py).

`KVSTORE_RESOLVE` ("name:port=host:port,...") maps such names to other addresses, the way
`curl --resolve` does; tests use it to run StatefulSet-configured nodes on 127.0.0.1.

Rules that hold here: nothing in this module opens a socket or resolves a name (the transport
does that with the address `resolve_address()` returns); every mistake in the configuration
(a hostname without an ordinal, an absurd ordinal, a malformed address) raises
ValueError naming the offending value, so the node refuses to start instead of joining the
wrong cluster under the wrong id.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import NamedTuple

ID_ENV = "KVSTORE_ID"
REPLICAS_ENV = "KVSTORE_STATEFULSET_REPLICAS"
PEER_SERVICE_ENV = "KVSTORE_PEER_SERVICE"
PEER_PORT_ENV = "KVSTORE_PEER_PORT"
HOSTNAME_ENV = "KVSTORE_HOSTNAME"
RESOLVE_ENV = "KVSTORE_RESOLVE"
DEFAULT_PEER_PORT = 7101

# A StatefulSet pod is named `<set>-<ordinal>`; the ordinal is a canonical decimal (no leading
# zeros, so "db-01" cannot pose as "db-1"), and the whole name is one DNS label.
_ORDINAL_HOSTNAME = re.compile(
    r"^(?P<set>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-(?P<ordinal>0|[1-9][0-9]*)$"
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_LABEL_LENGTH_MAX = 63
# Ids are the ordinal + 1; no real set comes near this bound.
_ORDINAL_MAX = 10_000


class PodIdentity(NamedTuple):
    """What a pod's name says: its id (the name of its slot), the peers it starts with
    ({slot: "host:port"}, this pod included), and whether it joins an existing cluster (its
    ordinal is beyond the bootstrap set) rather than taking part in the first start."""

    node_id: int
    peers: dict[int, str]
    joins: bool


def derive_statefulset_identity(
    hostname: str, replicas: int, peer_service: str, peer_port: int
) -> PodIdentity:
    """The identity of a pod named `<set>-<ordinal>` in a set bootstrapped with `replicas`.

    The hostname may be fully qualified; only its first label counts. The peers are the
    bootstrap set's pods and this one. An empty peer_service gives bare pod names (reachable
    only with a resolver that knows them). Raises ValueError when the name has no ordinal,
    or the replicas, service or port are malformed.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if not 0 < peer_port < 65536:
        raise ValueError(f"peer port must be in 1..65535, got {peer_port}")
    label = hostname.strip().rstrip(".").split(".", 1)[0].lower()
    match = _ORDINAL_HOSTNAME.match(label)
    if match is None or len(label) > _DNS_LABEL_LENGTH_MAX:
        raise ValueError(f"hostname {hostname!r} is not of the form <statefulset>-<ordinal>")
    ordinal = int(match["ordinal"])
    if ordinal >= _ORDINAL_MAX:
        raise ValueError(f"ordinal {ordinal} of {hostname!r} is above {_ORDINAL_MAX - 1}")
    service = peer_service.strip().rstrip(".").lower()
    if service and not all(_DNS_LABEL.match(part) for part in service.split(".")):
        raise ValueError(f"peer service {peer_service!r} is not a DNS name")
    name = match["set"]
    suffix = f".{service}" if service else ""
    ordinals = sorted({*range(replicas), ordinal})
    peers = {i + 1: f"{name}-{i}{suffix}:{peer_port}" for i in ordinals}
    return PodIdentity(ordinal + 1, peers, ordinal >= replicas)


def statefulset_identity_from_environ(
    environ: Mapping[str, str] | None = None,
) -> PodIdentity | None:
    """The pod's identity in StatefulSet mode, or None when the node is configured explicitly.

    StatefulSet mode: `KVSTORE_ID` unset (or empty) and `KVSTORE_STATEFULSET_REPLICAS` set.
    Reads `KVSTORE_PEER_SERVICE` (default: bare pod names), `KVSTORE_PEER_PORT` (default
    7101) and `KVSTORE_HOSTNAME` (default: this machine's hostname).
    """
    env = os.environ if environ is None else environ
    if env.get(ID_ENV, "").strip() or not env.get(REPLICAS_ENV, "").strip():
        return None
    replicas = _parse_int(REPLICAS_ENV, env[REPLICAS_ENV])
    peer_port = _parse_int(PEER_PORT_ENV, env.get(PEER_PORT_ENV, "") or str(DEFAULT_PEER_PORT))
    hostname = env.get(HOSTNAME_ENV, "").strip() or socket.gethostname()
    return derive_statefulset_identity(hostname, replicas, env.get(PEER_SERVICE_ENV, ""), peer_port)


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def parse_resolve_overrides(text: str) -> dict[str, tuple[str, int]]:
    """Parse "name:port=host:port,..." into {"name:port": (host, port)}.

    Names are compared without case (DNS names are case-insensitive). Both sides must carry
    a port: an override maps one service endpoint, not a whole host.
    """
    overrides: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        source, sep, target = item.partition("=")
        if not sep:
            raise ValueError(f"resolve override {item!r} is not name:port=host:port")
        host, port = split_host_port(source.strip())
        overrides[_address_key(host, port)] = split_host_port(target.strip())
    return overrides


def split_host_port(address: str) -> tuple[str, int]:
    """Split "host:port" or "[v6 address]:port" into (host, port); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not host:port")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"address {address!r} has an empty host")
    return host, int(port)


def _address_key(host: str, port: int) -> str:
    return f"{host.rstrip('.').lower()}:{port}"


def resolve_address(address: str, environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """The (host, port) to connect to for a configured peer address, after overrides."""
    env = os.environ if environ is None else environ
    host, port = split_host_port(address)
    overrides = parse_resolve_overrides(env.get(RESOLVE_ENV, ""))
    return overrides.get(_address_key(host, port), (host, port))

