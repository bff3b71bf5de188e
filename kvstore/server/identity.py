"""Who this process is in the cluster: the identity file of the data directory, and what a
process with an empty data directory does before it takes any part (bootstrap or join).

The identity file (`<data_dir>/member.json`: member id, cluster id, name, and the address
book the node joined with) is what makes a member: a data directory that holds one is that
member, whatever `--id` says. It is written atomically (a temporary file, fsync, rename,
fsync of the directory) before the node takes any part, so a directory without one never
voted or acknowledged anything. `--id` is the member's *name* (its slot): the id it
bootstraps under, and what tells the cluster that a process with an empty disk is the same
slot back under a new identity (kv/members.py).

A data directory with neither an identity file nor storage (`resolve_identity`):
- with `initial_cluster_state=new`, or as a single-node cluster: bootstrap as `--id`;
- with `--join URL...` or `initial_cluster_state=existing`: join through those members (or
  the peers');
- else ("auto", the default) ask the peers of `--peers` over the peer port, with a
  handshake that says "fresh" (kvstore/server/peerauth.py) and takes no part in Raft (every
  message is dropped, no snapshot is accepted). If any peer is a member, the cluster exists:
  join it. If every peer is fresh too (the first start of a new cluster), bootstrap, once
  each peer has also dialled us saying it is fresh: it then has our answer and knows we
  are fresh. A peer seen fresh stays counted fresh for this decision (it may bootstrap
  meanwhile: it did so after seeing us fresh), so two nodes of the same first start never
  take each other for members. Until every peer has answered (and none is a member) the
  node waits and says which peers it waits for; it never starts under its old id.
- Joining is `POST /v1/members/add` on a member (following the redirect to the leader; its
  host is mapped by KVSTORE_RESOLVE like a peer address, kvstore/server/discovery.py),
  which adds this process as a learner under a new id (ids are never reused), with the
  name's former holder as `replaces`; the answer's id is written to the identity file, and
  the node starts as that learner with empty storage. The leader's healer
  (membership.py) promotes it once it has caught up, after removing the member it replaces.

A data directory from before identity files (storage, no identity file) is the member
`--id`: its identity file is written then. An identity file without Raft state (no term, no
entry, no snapshot: the log was lost, or the node stopped before its first save) is not
trusted: whether that member ever voted cannot be told, so the directory counts as empty
and the node joins (or bootstraps) as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvstore.errors import ConfChangeRefusedError, CorruptionError, FatalDiskError
from kvstore.raft.confchange import NODE_ID_MAX
from kvstore.server.config import ServeConfig
from kvstore.server.discovery import resolve_address

logger = logging.getLogger("kvstore.server")

IDENTITY_FILE = "member.json"
_IDENTITY_VERSION = 1
_IDENTITY_BYTES_MAX = 1 << 20
_ASK_INTERVAL_S = 0.5
_LOG_INTERVAL_S = 5.0
_REDIRECTS_MAX = 5


@dataclass(frozen=True, slots=True)
class Identity:
    """This process's member id, the cluster's id, its name (the slot), whether it joined
    (else it bootstrapped: it is in the bootstrap configuration of `--peers`), and `peers`:
    the address book it joined with."""

    member_id: int
    cluster_id: str
    name: str
    joined: bool = False
    peers: dict[int, str] = field(default_factory=dict)


class StartRefusedError(Exception):
    """The node cannot start until a person acts (the message says why): the cluster
    refused the join for a reason a retry cannot fix, there is no cluster to join, or the
    peer port cannot be listened on."""


def identity_path(data_dir: Path) -> Path:
    return Path(data_dir) / IDENTITY_FILE


def read_identity(data_dir: Path) -> Identity | None:
    """The identity file's content, None without one; CorruptionError naming the file when
    it is unreadable or malformed (the node must not guess who it is)."""
    path = identity_path(data_dir)
    try:
        with open(path, "rb") as file:
            raw = file.read(_IDENTITY_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptionError(str(path), 0, f"cannot read the identity file: {exc}") from exc
    try:
        return _identity_from_obj(json.loads(raw.decode("utf-8")))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptionError(str(path), 0, f"bad identity file: {exc}") from exc


def _identity_from_obj(obj: Any) -> Identity:
    if type(obj) is not dict or obj.get("version") != _IDENTITY_VERSION:
        raise ValueError(f"expected an object of version {_IDENTITY_VERSION}")
    member, cluster, name, peers = (
        obj.get(k) for k in ("member_id", "cluster_id", "name", "peers")
    )
    joined = obj.get("joined")
    if type(joined) is not bool:
        raise ValueError("joined must be a boolean")
    if type(member) is not int or not 1 <= member <= NODE_ID_MAX:
        raise ValueError("member_id must be an id")
    if type(cluster) is not str or not 0 < len(cluster) <= 128:
        raise ValueError("cluster_id must be 1..128 characters")
    if type(name) is not str or not 0 < len(name) <= 253:
        raise ValueError("name must be 1..253 characters")
    if type(peers) is not dict:
        raise ValueError("peers must be an object")
    book: dict[int, str] = {}
    for key, address in peers.items():
        if not key.isdigit() or not 1 <= int(key) <= NODE_ID_MAX or type(address) is not str:
            raise ValueError("peers must map ids to addresses")
        book[int(key)] = address
    return Identity(member, cluster, name, joined, book)


def write_identity(data_dir: Path, identity: Identity) -> None:
    """Write the identity file atomically and durably (see the module docstring)."""
    directory = Path(data_dir)
    path = identity_path(directory)
    temporary = path.with_suffix(".tmp")
    document = {
        "version": _IDENTITY_VERSION,
        "member_id": identity.member_id,
        "cluster_id": identity.cluster_id,
        "name": identity.name,
        "joined": identity.joined,
        "peers": {str(peer): address for peer, address in sorted(identity.peers.items())},
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, (json.dumps(document, indent=1) + "\n").encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
        directory_descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_descriptor)
        finally:
            os.close(directory_descriptor)
    except OSError as exc:
        raise FatalDiskError(f"cannot write {path}: {exc}") from exc


def has_storage(data_dir: Path) -> bool:
    """The data directory holds Raft state: a term, a log entry or a snapshot. An empty
    write-ahead log (a tool, or a node that stopped before it took part, opened the
    directory) is no state: such a directory is as empty as a missing one. CorruptionError
    when the storage is damaged."""
    found = False
    with contextlib.suppress(FileNotFoundError), os.scandir(data_dir) as entries:
        found = any(entry.name.endswith((".wal", ".snap")) for entry in entries)
    if not found:
        return False
    from kvstore.storage.disk import DiskStorage

    storage = DiskStorage(data_dir)
    try:
        return (
            storage.hard_state.term > 0
            or storage.last_index() > 0
            or not storage.snapshot().is_empty()
        )
    finally:
        storage.close()


async def resolve_identity(config: ServeConfig) -> Identity:
    """Who this process is; bootstraps or joins first when the data directory is empty (see
    the module docstring). Raises StartRefusedError or CorruptionError when it cannot start."""
    identity = read_identity(config.data_dir)
    name = str(config.id)
    if identity is not None:
        if identity.cluster_id != config.cluster_id:
            raise CorruptionError(
                str(identity_path(config.data_dir)),
                0,
                f"the data directory belongs to cluster {identity.cluster_id!r}, "
                f"not {config.cluster_id!r}",
            )
        if has_storage(config.data_dir):
            return identity
        # An identity without Raft state: the log was lost (or the node stopped before its
        # first save). Whether it ever voted cannot be told, so the id is not used again:
        # the directory counts as empty.
        logger.warning(
            "event=identity_without_state member_id=%s file=%s action=treated_as_empty",
            identity.member_id,
            identity_path(config.data_dir),
        )
    elif has_storage(config.data_dir):
        identity = Identity(config.id, config.cluster_id, name)
        write_identity(config.data_dir, identity)
        return identity
    state = config.initial_cluster_state
    if config.join_urls:
        state = "existing"
    peers = {peer: address for peer, address in config.peer_addresses.items() if peer != config.id}
    if state == "new" or (state == "auto" and not peers):
        identity = Identity(config.id, config.cluster_id, name)
        logger.info("event=bootstrap id=%s reason=%s", config.id, state if peers else "single_node")
    else:
        urls = config.join_urls
        if not urls:
            urls = await _ask_peers(config, peers, bootstrap_allowed=state == "auto")
        if not urls:
            identity = Identity(config.id, config.cluster_id, name)
            logger.info("event=bootstrap id=%s reason=every_peer_fresh", config.id)
        else:
            identity = await _join(config, urls)
    write_identity(config.data_dir, identity)
    return identity


async def _ask_peers(
    config: ServeConfig, peers: dict[int, str], *, bootstrap_allowed: bool
) -> list[str]:
    """Client URLs of the members among `peers` once one is seen, or [] when every peer is
    fresh (and `bootstrap_allowed`); waits as long as it takes otherwise."""
    from kvstore.server.tls import contexts_from_config
    from kvstore.server.transport import PeerTransport

    tls = contexts_from_config(config) if config.peer_tls else None
    transport = PeerTransport(
        node_id=config.id,
        cluster_id=config.cluster_id,
        client_url=config.client_url,
        listen=config.listen_peer,
        peers=peers,
        on_message=lambda message: None,  # takes no part: every Raft message is dropped
        on_peer_down=lambda peer: None,
        cluster_secret=config.cluster_secret.encode(),
        tls=tls,
        handshake_timeout_s=config.peer_handshake_timeout_ms / 1000,
        snapshot_directory=None,  # and no snapshot is accepted
        fresh=True,
        name_slot=config.id,
    )
    try:
        await transport.start()
    except OSError as exc:
        raise StartRefusedError(
            f"cannot listen on {config.listen_peer} (peer port): {exc.strerror or exc}"
        ) from exc
    loop = asyncio.get_running_loop()
    seen_fresh = transport.seen_fresh
    logged_at = loop.time()
    logger.info(
        "event=empty_data_dir id=%s action=asking_peers peers=%s",
        config.id,
        ",".join(map(str, sorted(peers))),
    )
    try:
        while True:
            members = []
            for peer, fresh in transport.peer_fresh.items():
                if not fresh and peer not in seen_fresh:
                    members.append(peer)
            if members:
                urls = [transport.peer_urls[m] for m in members if m in transport.peer_urls]
                logger.info(
                    "event=cluster_exists members=%s action=join",
                    ",".join(map(str, sorted(members))),
                )
                return urls
            # Every peer was seen fresh, and knows we are: it dialled us saying it is fresh
            # (so it had our answer), or it is a member now, having bootstrapped after it
            # saw us fresh (a peer bootstraps only once every peer has dialled it so).
            settled = {
                peer
                for peer in seen_fresh
                if peer in transport.fresh_dialers or not transport.peer_fresh.get(peer, True)
            }
            if settled == set(peers):
                if bootstrap_allowed:
                    return []
                raise StartRefusedError(
                    "every peer is fresh: there is no cluster to join (use "
                    "--initial-cluster-state new to bootstrap one)"
                )
            if loop.time() - logged_at >= _LOG_INTERVAL_S:
                logged_at = loop.time()
                waiting = sorted(set(peers) - settled)
                logger.warning(
                    "event=waiting_for_peers id=%s waiting_for=%s reason=empty_data_dir "
                    "action=bootstraps_when_every_peer_is_fresh_joins_when_one_is_a_member "
                    "(see docs/operations.md, Replacing a lost disk)",
                    config.id,
                    ",".join(map(str, waiting)),
                )
            await asyncio.sleep(0.05)
    finally:
        await transport.close()


async def _join(config: ServeConfig, urls: list[str]) -> Identity:
    """Ask the cluster (through `urls`, following redirects to the leader) to add this
    process as a learner; retries until a member answers. StartRefusedError on a refusal
    that a retry cannot fix."""
    body = {
        "name": str(config.id),
        # Where the members dial us: our slot's entry of --peers (in a StatefulSet the
        # pod's DNS name), not the listen address (0.0.0.0:7101 there).
        "peer_address": config.peer_addresses.get(config.id, config.listen_peer),
        "client_url": config.client_url,
        "promote": not config.join_as_learner,
    }
    ssl_context: ssl.SSLContext | None = None
    if config.peer_ca_file or config.ca_file:
        ssl_context = ssl.create_default_context(cafile=config.peer_ca_file or config.ca_file)
    loop = asyncio.get_running_loop()
    logged_at = loop.time() - _LOG_INTERVAL_S
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_ms / 1000 + 2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            for url in urls:
                try:
                    answer = await _post_add(session, url, body, ssl_context)
                except ConfChangeRefusedError as exc:
                    reason = str(exc)
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                    reason = f"{url}: {exc!r}"
                else:
                    return _identity_from_answer(config, answer)
                if loop.time() - logged_at >= _LOG_INTERVAL_S:
                    logged_at = loop.time()
                    logger.warning(
                        "event=join_waiting name=%s reason=%s action=retrying (a cluster "
                        "without a quorum cannot add members: see docs/operations.md)",
                        body["name"],
                        reason[:300],
                    )
            await asyncio.sleep(_ASK_INTERVAL_S)


async def _post_add(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    ssl_context: ssl.SSLContext | None,
) -> dict[str, Any]:
    target = url.rstrip("/") + "/v1/members/add"
    for _ in range(_REDIRECTS_MAX):
        dialled, server_hostname = _resolved(target)
        async with session.post(
            dialled,
            json=body,
            allow_redirects=False,
            ssl=ssl_context or True,
            server_hostname=server_hostname,
        ) as response:
            if response.status in (307, 308) and response.headers.get("Location"):
                target = response.headers["Location"]
                continue
            document = await response.json(content_type=None)
            if response.status == 200 and isinstance(document, dict):
                return document
            message = document.get("message") if isinstance(document, dict) else None
            text = f"HTTP {response.status}: {message or document!r}"
            if response.status == 409:
                raise ConfChangeRefusedError(text)
            if 400 <= response.status < 500 and response.status != 429:
                raise StartRefusedError(f"the cluster refused the join: {text}")
            raise ValueError(text)
    raise ValueError(f"more than {_REDIRECTS_MAX} redirects from {url}")


def _resolved(url: str) -> tuple[str, str | None]:
    """`url` with its host and port mapped by KVSTORE_RESOLVE (discovery.py: the same
    mapping as the peer addresses), and the name TLS must verify when it was mapped."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None:
        return url, None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host, mapped_port = resolve_address(f"{parts.hostname}:{port}")
    if (host, mapped_port) == (parts.hostname, port):
        return url, None
    netloc = f"[{host}]:{mapped_port}" if ":" in host else f"{host}:{mapped_port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), parts.hostname


def _identity_from_answer(config: ServeConfig, answer: dict[str, Any]) -> Identity:
    member = answer.get("id")
    peers = answer.get("peers")
    if type(member) is not int or not 1 <= member <= NODE_ID_MAX or not isinstance(peers, dict):
        raise ValueError(f"a join answer without an id or peers: {answer!r:.200}")
    book = {int(k): str(v) for k, v in peers.items() if str(k).isdigit()}
    logger.info(
        "event=joined name=%s member_id=%s replaces=%s role=learner",
        config.id,
        member,
        answer.get("replaces", 0),
    )
    return Identity(member, config.cluster_id, str(config.id), True, book)
