"""Membership on a running node: the admin API (list, add a learner, promote, remove,
hand leadership over; docs/api.md, "Membership"), the address book kept in step with the
membership (`MemberBook`), and the leader's self-healing (`Healer`).

Routes:
- `GET /v1/members`: the configuration in force on this node (voters, learners, removed ids)
  and each member's name and addresses, and, on the leader, its replication lag.
- `POST /v1/members/add` `{"name", "peer_address", "client_url", "promote"}`: add a learner
  under a new id (one above every id the cluster ever used: ids are never reused), with
  that member context (kvstore/kv/members.py). A name held by a member already makes that
  member the one it `replaces`. Answered once applied here, with the new id and the
  address book the new member starts with. `kvstore serve` sends it when it joins.
- `POST /v1/members/promote` `{"id": N}` and `POST /v1/members/remove` `{"id": N}`: one
  membership change (kvstore/raft/confchange.py), proposed on the leader (a follower answers
  307 to it) and answered once this node has applied it, with the new member list. A change
  the core refuses (one already in flight, a learner not caught up, the last voter, an id
  not a member) is a 409 `conf_change_refused` that changed nothing.
- `POST /v1/leader/transfer` `{"to": N}`: leadership transfer (dissertation §3.10), answered
  once another leader is known; 409 when `to` is not a voter, 504 when no transfer happened
  within an election timeout or two.

`MemberBook`: the transport's peers are the bootstrap `--peers` plus the contexts of the
members added at runtime (the state machine's member table, in every snapshot), restricted
to the members of the configuration in force; refreshed after every apply. A node that finds
itself removed says so in its log (the core already keeps it from taking part).

`Healer` (a task on every node, acting only while it leads): every `promote_stable_ms / 4`
it asks `kv.members.heal_step` for the next change, counting a learner caught up once the
core would promote it (`RawNode.learner_caught_up`: heard from lately, replicating, at most
`promote_lag_entries_max` entries behind, dissertation §4.2.1) continuously for
`promote_stable_ms`. It acts only on
positive evidence (a learner that asked for promotion, and a member whose name it took),
never because a member was silent; a change the core refuses is tried again later.

Every input is checked before the core sees it: the body is a bounded JSON object of known
fields, a member id in [1, 2^63), names and addresses bounded (kv/members.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from kvstore.errors import (
    BadRequestError,
    ConfChangeRefusedError,
    DeadlineExceededError,
)
from kvstore.kv import members as kv_members
from kvstore.kv.members import MemberInfo
from kvstore.raft import confchange
from kvstore.raft.confchange import NODE_ID_MAX, ConfChange, ConfChangeType
from kvstore.raft.types import ConfState, Role
from kvstore.server.discovery import split_host_port
from kvstore.server.driver import Driver
from kvstore.server.http import HttpApi, _json

logger = logging.getLogger("kvstore.server")


class MemberBook:
    """The address book of this node (see the module docstring)."""

    def __init__(
        self,
        driver: Driver,
        *,
        name: str,
        bootstrap: dict[int, str],
        own_peer_address: str,
        set_peers: Callable[[dict[int, str], dict[int, int]], None],
    ) -> None:
        self.driver = driver
        self.name = name
        self.bootstrap = dict(bootstrap)
        self.own_peer_address = own_peer_address
        self._set_peers = set_peers
        self._seen: tuple[ConfState, int, int] | None = None
        self._said_removed = False
        driver.apply_listeners.append(lambda _applied: self.refresh())

    @property
    def conf(self) -> ConfState:
        return self.driver.node.conf_state

    def infos(self) -> dict[int, MemberInfo]:
        return self.driver.replica.state_machine.members.infos()

    def current(self) -> dict[int, str]:
        return kv_members.address_book(
            self.bootstrap, self.infos(), self.conf, self.driver.config.id, self.name
        )

    def address(self, member: int) -> str | None:
        if member == self.driver.config.id:
            return self.own_peer_address
        info = self.driver.replica.state_machine.members.info(member)
        return info.peer_address if info is not None else self.bootstrap.get(member)

    def refresh(self) -> None:
        """After an apply: hand the transport the new book when the membership changed."""
        table = self.driver.replica.state_machine.members
        seen = (self.conf, id(table), len(table.contexts))
        if seen == self._seen:
            return
        self._seen = seen
        book = self.current()
        infos = self.infos()
        self._set_peers(book, {m: kv_members.member_slot(m, infos.get(m)) for m in book})
        self.driver.storage.set_peer_ids(sorted(book))
        if self.driver.node.is_removed and not self._said_removed:
            self._said_removed = True
            logger.warning(
                "event=removed id=%s name=%s action=takes_no_part (this member was removed "
                "from the cluster; its data directory can be deleted)",
                self.driver.config.id,
                self.name,
            )


class Healer:
    """Self-healing on the leader (see the module docstring)."""

    def __init__(self, driver: Driver, book: MemberBook, stable_s: float) -> None:
        self.driver = driver
        self.book = book
        self.stable_s = stable_s
        # Learner -> since when (loop time) it has been caught up without a break.
        self._caught_up_since: dict[int, float] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.stable_s / 4)
            if not self.driver.is_leader():
                self._caught_up_since.clear()
                continue
            change = self.next_change(loop.time())
            if change is None:
                continue
            try:
                index = await self.driver.call(
                    functools.partial(self.driver.node.propose_conf_change, change)
                )
            except ConfChangeRefusedError as exc:
                logger.debug("event=heal_refused change=%s reason=%s", change, exc)
                continue
            except Exception as exc:  # not leader any more, stopping: try later
                logger.debug("event=heal_failed change=%s reason=%r", change, exc)
                continue
            logger.info(
                "event=heal step=%s member=%s index=%s",
                change.type.name.lower(),
                change.node_id,
                index,
            )

    def next_change(self, now: float) -> ConfChange | None:
        status = self.driver.status()
        conf = status.conf_state
        if status.conf_index > status.commit_index:
            return None  # one change in flight
        since = self._caught_up_since
        for learner in list(since):
            if learner not in conf.learners:
                del since[learner]
        for learner in conf.learners:
            if self.driver.node.learner_caught_up(learner):
                since.setdefault(learner, now)
            else:
                since.pop(learner, None)
        return kv_members.heal_step(
            conf,
            self.book.infos(),
            lambda learner: learner in since and now - since[learner] >= self.stable_s,
        )


class MembershipApi:
    """The routes above, registered on the node's HttpApi."""

    def __init__(self, http: HttpApi, book: MemberBook) -> None:
        self.http = http
        self.book = book
        self.driver: Driver = http.driver
        self.config = http.config
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.driver.apply_listeners.append(lambda _applied: self._on_applied())
        http.add_routes(
            {
                ("/v1/members", "GET"): self.list_members,
                ("/v1/members/add", "POST"): self.add,
                ("/v1/members/promote", "POST"): self.promote,
                ("/v1/members/remove", "POST"): self.remove,
                ("/v1/leader/transfer", "POST"): self.transfer,
            }
        )

    # --- routes ----------------------------------------------------------------------------

    async def list_members(self, request: web.BaseRequest) -> web.Response:
        return _json(self.members_document())

    async def add(self, request: web.BaseRequest) -> web.Response:
        info = _member_info(await self.http.json_body(request))
        driver = self.driver
        if driver.status().role is not Role.LEADER:
            raise driver._not_leader_error()
        allocated: list[ConfChange] = []

        def propose() -> int:
            # On the driver task: the id comes from the configuration the change goes from.
            conf = driver.node.conf_state
            replaces = kv_members.holder_of(info.name, conf, self.book.infos())
            context = kv_members.encode_context(
                MemberInfo(info.name, info.peer_address, info.client_url, replaces, info.promote)
            )
            change = ConfChange(
                ConfChangeType.ADD_LEARNER, confchange.next_member_id(conf), context
            )
            index = driver.node.propose_conf_change(change)
            allocated.append(change)
            return int(index)

        index = await driver.call(propose)
        await self._wait_applied(index)
        change = allocated[0]
        member = change.node_id
        if self.driver.replica.state_machine.members.contexts.get(member) != change.context:
            # A new leader's log replaced the entry before it committed.
            raise ConfChangeRefusedError(
                f"the addition at index {index} was lost in a change of leader; retry"
            )
        replaces = kv_members.decode_context(change.context).replaces
        logger.info(
            "event=member_added id=%s name=%s peer=%s replaces=%s",
            member,
            info.name,
            info.peer_address,
            replaces,
        )
        peers = {
            m: a
            for m in (*self.book.conf.voters, *self.book.conf.learners)
            if (a := self.book.address(m)) is not None
        }
        return _json(
            {
                "id": member,
                "name": info.name,
                "replaces": replaces,
                "cluster_id": self.http.cluster_id,
                "peers": {str(m): a for m, a in sorted(peers.items())},
                "members": self.members_document(),
            }
        )

    async def promote(self, request: web.BaseRequest) -> web.Response:
        member = _member_id(await self.http.json_body(request), "id")
        return await self._change(ConfChange(ConfChangeType.PROMOTE, member))

    async def remove(self, request: web.BaseRequest) -> web.Response:
        member = _member_id(await self.http.json_body(request), "id")
        return await self._change(ConfChange(ConfChangeType.REMOVE, member))

    async def transfer(self, request: web.BaseRequest) -> web.Response:
        target = _member_id(await self.http.json_body(request), "to")
        driver = self.driver
        status = driver.status()
        if status.role is not Role.LEADER:
            raise driver._not_leader_error()
        if target not in status.conf_state.voters:
            raise ConfChangeRefusedError(f"node {target} is not a voter")
        if target != self.config.id:
            timeout_s = 2 * self.config.election_ticks * self.config.tick_interval_ms / 1000
            moved = await driver.hand_over(target, timeout_s)
            # An admin transfer is no shutdown: this node answers as any node again.
            driver.handover.active = False
            if not moved:
                raise DeadlineExceededError(f"leadership did not move to node {target}")
        return _json({"leader_id": driver.leader_id, "members": self.members_document()})

    # --- plumbing --------------------------------------------------------------------------

    def members_document(self) -> dict[str, Any]:
        status = self.driver.status()
        conf = status.conf_state
        members: dict[str, dict[str, Any]] = {}
        infos = self.book.infos()
        for member in (*conf.voters, *conf.learners):
            entry: dict[str, Any] = {"role": "voter" if member in conf.voters else "learner"}
            info = infos.get(member)
            entry["name"] = kv_members.member_name(member, info)
            address = self.book.address(member)
            if address is not None:
                entry["peer_address"] = address
            if info is not None:
                if info.client_url:
                    entry["client_url"] = info.client_url
                if info.replaces:
                    entry["replaces"] = info.replaces
                entry["promote"] = info.promote
            progress = status.progress.get(member)
            if progress is not None:
                entry["match_index"] = progress.match_index
                entry["lag"] = max(0, status.last_index - progress.match_index)
            members[str(member)] = entry
        return {
            "id": self.config.id,
            "leader_id": status.leader_id,
            "voters": list(conf.voters),
            "learners": list(conf.learners),
            "removed": list(conf.removed),
            "conf_index": status.conf_index,
            "members": members,
        }

    async def _change(self, change: ConfChange) -> web.Response:
        driver = self.driver
        if driver.status().role is not Role.LEADER:
            raise driver._not_leader_error()
        index = await driver.call(lambda: driver.node.propose_conf_change(change))
        await self._wait_applied(index)
        return _json(self.members_document())

    async def _wait_applied(self, index: int) -> None:
        timeout_s = self.config.request_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout_s):
                await self._applied(index)
        except TimeoutError:
            raise DeadlineExceededError(
                f"the change at index {index} was not applied within {timeout_s} s; it may still be"
            ) from None

    async def _applied(self, index: int) -> None:
        if self.driver.applied_index() >= index:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (index, future)
        self._applied_waiters.append(entry)
        try:
            await future
        finally:
            if entry in self._applied_waiters:
                self._applied_waiters.remove(entry)

    def _on_applied(self) -> None:
        if not self._applied_waiters:
            return
        applied = self.driver.applied_index()
        for index, future in list(self._applied_waiters):
            if index <= applied and not future.done():
                future.set_result(None)


def _member_id(body: dict[str, Any], field: str) -> int:
    if unknown := set(body) - {field}:
        raise BadRequestError(f"unknown fields: {sorted(unknown)}")
    value = body.get(field)
    if type(value) is not int or not 1 <= value <= NODE_ID_MAX:
        raise BadRequestError(f"{field} must be a member id in 1..{NODE_ID_MAX}")
    return value


_ADD_FIELDS = frozenset({"name", "peer_address", "client_url", "promote"})


def _member_info(body: dict[str, Any]) -> MemberInfo:
    """The body of `POST /v1/members/add`, checked; BadRequestError naming the problem."""
    if unknown := set(body) - _ADD_FIELDS:
        raise BadRequestError(f"unknown fields: {sorted(unknown)}")
    name, peer = body.get("name"), body.get("peer_address")
    client, promote = body.get("client_url", ""), body.get("promote", False)
    if type(name) is not str or type(peer) is not str or type(client) is not str:
        raise BadRequestError("name and peer_address (and client_url) must be strings")
    if type(promote) is not bool:
        raise BadRequestError("promote must be a boolean")
    try:
        split_host_port(peer)
    except ValueError as exc:
        raise BadRequestError(f"peer_address: {exc}") from exc
    if client and not client.startswith(("http://", "https://")):
        raise BadRequestError("client_url must start with http:// or https://")
    try:
        return MemberInfo(name, peer, client, 0, promote)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from exc
