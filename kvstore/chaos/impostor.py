"""The impostor fault: a process that knows the cluster id, but not the secret (nor a member
certificate), attacks the peer ports while the workload runs (issue 16's attacks).

Each round it dials every follower's peer port directly (not through the drill's proxies),
claims to be the leader in a handshake carrying a fake client URL, answers the node's proof
with a wrong one, and sends forged Raft frames right behind: an append at the current term
that would overwrite a workload key, a TIMEOUT_NOW, and a heartbeat at term + 1000. Between
rounds it churns handshakes (connect, claim to be the leader, disconnect). Against a TLS peer
port the same bytes go out in clear text and fail the TLS handshake.

None of it may change anything: the drill's checkers (linearizability, lost writes,
exactly-once, invariants) judge the run as for any fault, and `Impostor.summary()` records
how many attacks were refused (the node closed the connection) and the highest term any node
reported (a term + 1000 adopted from a forged heartbeat would show there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct

from kvstore.codec import encode_message
from kvstore.kv.commands import Put, encode_command
from kvstore.raft.types import Entry, Message, MessageType
from kvstore.server import peerauth
from kvstore.server.localcluster import LocalCluster
from kvstore.server.transport import encode_frame

logger = logging.getLogger("kvstore.chaos")

_FAKE_URL = "http://impostor.invalid:7001"
_ROUND_PAUSE_S = 0.05


class Impostor:
    """Runs attack rounds until stopped; see the module docstring."""

    def __init__(self, cluster: LocalCluster, rng: random.Random) -> None:
        self.cluster = cluster
        self._rng = rng
        self.attempts = 0
        self.refused = 0
        self.highest_term = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="impostor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def summary(self) -> str:
        return (
            f"impostor: {self.refused}/{self.attempts} attacks refused; highest term seen "
            f"{self.highest_term}"
        )

    async def _run(self) -> None:
        while True:
            statuses = {
                node: status
                for node in self.cluster.running()
                if (status := await asyncio.to_thread(self.cluster.status, node, 0.5))
            }
            leaders = [s for s in statuses.values() if s.get("role") == "leader"]
            if leaders:
                leader = leaders[0]
                self.highest_term = max(
                    [self.highest_term, *(int(s["term"]) for s in statuses.values())]
                )
                for node, status in statuses.items():
                    if node != leader["id"]:
                        await self._attack(node, int(leader["id"]), status)
            await asyncio.sleep(_ROUND_PAUSE_S)

    async def _attack(self, node: int, leader: int, status: dict[str, object]) -> None:
        term = int(str(status["term"]))
        last = int(str(status["last_index"]))
        put = Put(key="chaos-impostor", value=b"forged", request=None, time_ms=0)
        forged = [
            Message(
                MessageType.APPEND, to=node, from_=leader, term=term, log_term=term,
                index=last, entries=(Entry(term=term, index=last + 1, data=encode_command(put)),),
                commit=last + 1,
            ),
            Message(MessageType.TIMEOUT_NOW, to=node, from_=leader, term=term),
            Message(MessageType.HEARTBEAT, to=node, from_=leader, term=term + 1000),
        ]  # fmt: skip
        for frames in ([encode_frame(encode_message(m)) for m in forged], []):
            self.attempts += 1
            if await self._one(node, leader, frames):
                self.refused += 1

    async def _one(self, node: int, leader: int, frames: list[bytes]) -> bool:
        """One connection as the leader; True when the node refused it (closed it)."""
        host, port = self.cluster.peer_listen[node].rsplit(":", 1)
        try:
            async with asyncio.timeout(2.0):
                reader, writer = await asyncio.open_connection(host, int(port))
                try:
                    hello = peerauth.new_hello(
                        cluster_id=self.cluster.cluster_id, node_id=leader, to=node,
                        client_url=_FAKE_URL,
                    )  # fmt: skip
                    writer.write(encode_frame(peerauth.encode_handshake(hello)))
                    if not frames:  # the churn: claim, then disconnect
                        return True
                    length, _ = struct.unpack(">II", await reader.readexactly(8))
                    await reader.readexactly(length)
                    wrong = self._rng.randbytes(peerauth.PROOF_BYTES)
                    writer.write(encode_frame(peerauth.encode_proof(wrong)) + b"".join(frames))
                    await writer.drain()
                    return await reader.read(1) == b""
                finally:
                    writer.close()
        except (OSError, asyncio.IncompleteReadError):
            return True  # reset or closed before the answer: refused too
        except TimeoutError:
            return False
