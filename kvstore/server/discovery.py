"""How a node learns its id and its peers' addresses from where it runs.

Under a Kubernetes StatefulSet each pod is named `<set>-<ordinal>` and reachable at
`<set>-<ordinal>.<headless service>:<port>`, so a node derives its id (ordinal + 1) and every
peer's address from its own hostname; no per-pod configuration is needed.

`KVSTORE_RESOLVE` ("name:port=host:port,...") maps such names to other addresses, the way
`curl --resolve` does; tests use it to run StatefulSet-configured nodes on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

_ORDINAL_HOSTNAME = re.compile(r"^(?P<set>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-(?P<ordinal>[0-9]+)$")


def derive_statefulset_identity(
    hostname: str, replicas: int, peer_service: str, peer_port: int
) -> tuple[int, dict[int, str]]:
    """Return (node id, {peer id: "host:port"}) for a pod named `<set>-<ordinal>`.

    The hostname may be fully qualified; only its first label counts. Raises ValueError when
    the name has no ordinal or the ordinal is outside the set.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    label = hostname.split(".", 1)[0]
    match = _ORDINAL_HOSTNAME.match(label)
    if match is None:
        raise ValueError(f"hostname {hostname!r} is not of the form <statefulset>-<ordinal>")
    ordinal = int(match["ordinal"])
    if ordinal >= replicas:
        raise ValueError(f"ordinal {ordinal} of {hostname!r} is outside a set of {replicas}")
    name = match["set"]
    suffix = f".{peer_service}" if peer_service else ""
    peers = {i + 1: f"{name}-{i}{suffix}:{peer_port}" for i in range(replicas)}
    return ordinal + 1, peers


def parse_resolve_overrides(text: str) -> dict[str, tuple[str, int]]:
    """Parse "name:port=host:port,..." into {"name:port": (host, port)}."""
    overrides: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        source, sep, target = item.partition("=")
        if not sep:
            raise ValueError(f"resolve override {item!r} is not name:port=host:port")
        overrides[source.strip()] = split_host_port(target.strip())
    return overrides


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def resolve_address(address: str, environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """The (host, port) to connect to for a configured peer address, after overrides."""
    env = os.environ if environ is None else environ
    overrides = parse_resolve_overrides(env.get("KVSTORE_RESOLVE", ""))
    return overrides.get(address, split_host_port(address))
