"""The membership admin API: list the members, promote a learner, remove a member, and hand
leadership to a given member, over HTTP (docs/api.md, "Membership").

Routes:
- `GET /v1/members`: the configuration in force on this node (voters, learners, removed ids)
  and, on the leader, each member's replication lag.
- `POST /v1/members/promote` `{"id": N}` and `POST /v1/members/remove` `{"id": N}`: one
  membership change (kvstore/raft/confchange.py), proposed on the leader (a follower answers
  307 to it) and answered once this node has applied it, with the new member list. A change
  the core refuses (one already in flight, a learner not caught up, the last voter, an id
  not a member) is a 409 `conf_change_refused` that changed nothing.
- `POST /v1/leader/transfer` `{"to": N}`: leadership transfer (dissertation §3.10), answered
  once another leader is known; 409 when `to` is not a voter, 504 when no transfer happened
  within an election timeout or two.

Adding a learner (a new process under a new id) and `kvstore serve --join` are not here
yet: the peer transport knows its peers' addresses from the configuration it started with.

Every input is checked before the core sees it: the body is a bounded JSON object whose only
field is a member id in [1, 2^63).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from kvstore.errors import (
    BadRequestError,
    ConfChangeRefusedError,
    DeadlineExceededError,
)
from kvstore.raft.confchange import NODE_ID_MAX, ConfChange, ConfChangeType
from kvstore.raft.types import Role
from kvstore.server.driver import Driver
from kvstore.server.http import HttpApi, _json


class MembershipApi:
    """The routes above, registered on the node's HttpApi."""

    def __init__(self, http: HttpApi) -> None:
        self.http = http
        self.driver: Driver = http.driver
        self.config = http.config
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.driver.apply_listeners.append(lambda _applied: self._on_applied())
        http.add_routes(
            {
                ("/v1/members", "GET"): self.list_members,
                ("/v1/members/promote", "POST"): self.promote,
                ("/v1/members/remove", "POST"): self.remove,
                ("/v1/leader/transfer", "POST"): self.transfer,
            }
        )

    # --- routes ----------------------------------------------------------------------------

    async def list_members(self, request: web.BaseRequest) -> web.Response:
        return _json(self.members_document())

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
        for member in (*conf.voters, *conf.learners):
            entry: dict[str, Any] = {"role": "voter" if member in conf.voters else "learner"}
            address = self.config.peer_addresses.get(member)
            if address is not None:
                entry["peer_address"] = address
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
        timeout_s = self.config.request_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout_s):
                await self._applied(index)
        except TimeoutError:
            raise DeadlineExceededError(
                f"the change at index {index} was not applied within {timeout_s} s; it may still be"
            ) from None
        return _json(self.members_document())

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
