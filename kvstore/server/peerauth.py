"""The peer handshake: who is on the other end of a peer connection, and the proof of it.

A peer connection is authenticated before anything from it reaches the node: the transport
(kvstore/server/transport.py) reads no Raft frame, learns no client URL and takes no
connection event (redial, peer alive) from a connection until this handshake has completed.

The exchange (three frames; the dialer sends its first Raft frame right after the third, so
a connection costs no round trip more than before):

1. dialer -> acceptor  HELLO  [magic, version, cluster id, node id, to, client url, nonce, b""]
2. acceptor -> dialer  ANSWER [magic, version, cluster id, node id, to, client url, nonce, proof]
   (either may end with a ninth element, `true`: the sender is fresh, see `Handshake.fresh`;
   the proofs then cover both flags)
3. dialer -> acceptor  PROOF  ["kvstore-peer-proof", proof]

Each proof is HMAC-SHA256, keyed by the cluster secret, over the whole transcript: both
nonces (32 bytes each from `secrets`), both node ids, the cluster id, both client URLs and
the role of the side that proves ("acceptor" or "dialer", so that one side's proof can never
be reflected back as the other's). Each side checks the other's proof with
`hmac.compare_digest`. A replayed answer or proof fails, because it covers a nonce that the
checking side has just drawn. The cluster id is not a secret (`/v1/status` serves it); the
secret is, and it never travels.

Without a secret (a loopback-only cluster or an explicitly trusted network) the proofs are
keyed by the empty key: the exchange is the same and proves nothing, and the transport logs
`auth=none`. With TLS on the peer port, the certificate check (kvstore/server/tls.py) comes on
top and the secret is optional.

What this does not do: without TLS, the frames after the handshake are neither encrypted nor
authenticated, so an attacker who can rewrite packets on the path (not just connect to the
port) could still inject into an established connection. TLS covers that.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, replace

from kvstore.codec import NODE_ID_LIMIT, pack, unpack
from kvstore.errors import ProtocolError

MAGIC = "kvstore-peer"
VERSION = 2
_PROOF_MAGIC = "kvstore-peer-proof"
_TRANSCRIPT_MAGIC = "kvstore-peer-auth"
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
SECRET_BYTES_MIN = 16
"""A shorter secret could be guessed offline from one recorded handshake."""
CLUSTER_ID_CHARS_MAX = 128
CLIENT_URL_CHARS_MAX = 2048
ACCEPTOR = "acceptor"
DIALER = "dialer"


@dataclass(frozen=True, slots=True, kw_only=True)
class Handshake:
    """A HELLO (proof empty) or an ANSWER (proof set); see the module docstring."""

    cluster_id: str
    node_id: int
    to: int  # the node the sender means to talk to
    client_url: str
    nonce: bytes
    proof: bytes = b""
    # The sender has an empty data directory and is finding out whether a cluster exists
    # (kvstore/server/identity.py): it takes no part in Raft. A ninth element, sent only
    # when true, so the handshake of a member is what it was before.
    fresh: bool = False


def new_hello(
    *, cluster_id: str, node_id: int, to: int, client_url: str, fresh: bool = False
) -> Handshake:
    return Handshake(
        cluster_id=cluster_id,
        node_id=node_id,
        to=to,
        client_url=client_url,
        nonce=secrets.token_bytes(NONCE_BYTES),
        fresh=fresh,
    )


def encode_handshake(handshake: Handshake) -> bytes:
    fields: list[object] = [
        MAGIC,
        VERSION,
        handshake.cluster_id,
        handshake.node_id,
        handshake.to,
        handshake.client_url,
        handshake.nonce,
        handshake.proof,
    ]
    if handshake.fresh:
        fields.append(True)
    return pack(fields)


def decode_handshake(payload: bytes) -> Handshake:
    """The handshake in `payload`; ProtocolError on anything malformed or out of range."""
    obj = unpack(payload)
    if type(obj) is not list or len(obj) < 2 or obj[0] != MAGIC:
        raise ProtocolError("not a kvstore peer handshake")
    if obj[1] != VERSION or len(obj) not in (8, 9):
        raise ProtocolError(f"peer handshake version {obj[1]!r:.20} is not {VERSION}")
    _, _, cluster_id, node_id, to, client_url, nonce, proof = obj[:8]
    fresh = obj[8] if len(obj) == 9 else False
    if fresh is not True and fresh is not False:
        raise ProtocolError("handshake: the fresh flag must be a boolean")
    if type(cluster_id) is not str or not 0 < len(cluster_id) <= CLUSTER_ID_CHARS_MAX:
        raise ProtocolError(f"handshake: cluster id must be 1..{CLUSTER_ID_CHARS_MAX} chars")
    if type(client_url) is not str or len(client_url) > CLIENT_URL_CHARS_MAX:
        raise ProtocolError(f"handshake: client url must be at most {CLIENT_URL_CHARS_MAX} chars")
    for name, value in (("node id", node_id), ("to", to)):
        if type(value) is not int or not 1 <= value < NODE_ID_LIMIT:
            raise ProtocolError(f"handshake: bad {name} {value!r:.40}")
    if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
        raise ProtocolError(f"handshake: the nonce must be {NONCE_BYTES} bytes")
    if type(proof) is not bytes or len(proof) not in (0, PROOF_BYTES):
        raise ProtocolError(f"handshake: the proof must be {PROOF_BYTES} bytes")
    return Handshake(
        cluster_id=cluster_id,
        node_id=node_id,
        to=to,
        client_url=client_url,
        nonce=nonce,
        proof=proof,
        fresh=fresh,
    )


def encode_proof(proof: bytes) -> bytes:
    return pack([_PROOF_MAGIC, proof])


def decode_proof(payload: bytes) -> bytes:
    obj = unpack(payload)
    if (
        type(obj) is not list
        or len(obj) != 2
        or obj[0] != _PROOF_MAGIC
        or type(obj[1]) is not bytes
        or len(obj[1]) != PROOF_BYTES
    ):
        raise ProtocolError("not a kvstore peer proof")
    return bytes(obj[1])


def prove(secret: bytes, role: str, hello: Handshake, answer: Handshake) -> bytes:
    """The proof that the side in `role` knows `secret`, bound to this exchange."""
    fields: list[object] = [
        _TRANSCRIPT_MAGIC,
        VERSION,
        role,
        hello.cluster_id,
        answer.cluster_id,
        hello.node_id,
        hello.to,
        hello.client_url,
        hello.nonce,
        answer.node_id,
        answer.to,
        answer.client_url,
        answer.nonce,
    ]
    if hello.fresh or answer.fresh:
        # Proven like the rest: a forged "fresh" could make a wiped node bootstrap.
        fields.extend((hello.fresh, answer.fresh))
    transcript = pack(fields)
    return hmac.new(secret, transcript, hashlib.sha256).digest()


def check_proof(
    secret: bytes, role: str, hello: Handshake, answer: Handshake, proof: bytes
) -> None:
    """Raise ProtocolError unless `proof` is the `role` side's proof of this exchange."""
    if not hmac.compare_digest(prove(secret, role, hello, answer), proof):
        raise ProtocolError(
            f"node {hello.node_id if role == DIALER else answer.node_id} claimed, but did not "
            "prove the cluster secret"
        )


def answer_to(
    hello: Handshake,
    *,
    secret: bytes,
    cluster_id: str,
    node_id: int,
    client_url: str,
    fresh: bool = False,
) -> Handshake:
    """The acceptor's ANSWER to `hello`, carrying the acceptor's proof."""
    answer = new_hello(
        cluster_id=cluster_id, node_id=node_id, to=hello.node_id, client_url=client_url, fresh=fresh
    )
    return replace(answer, proof=prove(secret, ACCEPTOR, hello, answer))
