"""The request id: how one client request is named for exactly-once application (Raft
dissertation §6.3), and its text form `<client_id>:<seq>`, the `Kvstore-Request-Id` header.

It sits below both sides of the client API, so the format is written in one place: the
client checks its id here (`check_client_id`) and writes each request's with
`request_id_text`, the server reads the header with
`parse_request_id`, and the state machine keys its session table by `RequestId`
(`kvstore.kv` re-exports both names).

Rules that hold here:
- A client id is 1 to 64 of `[A-Za-z0-9_.-]` (so it never contains the `:` that ends it);
  a seq is an integer in 1..2^64-1 (what msgpack carries in the log). `RequestId` refuses
  anything else with `ValueError` (a caller's mistake); `parse_request_id` refuses bad
  header text with `BadRequestError` (HTTP 400).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvstore.errors import BadRequestError
from kvstore.frozen import quick_init

SEQ_MAX = (1 << 64) - 1
"""The largest seq: the largest integer msgpack encodes."""

CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
"""What a client id may be (matched whole)."""

# The longest seq text accepted before int(): SEQ_MAX has 20 digits.
_SEQ_DIGITS_MAX = 20


@quick_init
@dataclass(frozen=True, slots=True)
class RequestId:
    """Identifies one client request for exactly-once application (dissertation §6.3)."""

    client_id: str
    seq: int

    def __post_init__(self) -> None:
        client_id, seq = self.client_id, self.seq
        if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
            raise ValueError(f"client_id must match [A-Za-z0-9_.-]{{1,64}}: {client_id!r}")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= SEQ_MAX:
            raise ValueError(f"seq must be an integer in 1..2**64-1: {seq!r}")

    def __str__(self) -> str:
        """The header's text form, `<client_id>:<seq>` (`parse_request_id` reads it back)."""
        return request_id_text(self.client_id, self.seq)


def request_id_text(client_id: str, seq: int) -> str:
    """`str(RequestId(client_id, seq))` without building and checking one: for a caller that
    checked `client_id` once (`check_client_id`) and counts seqs up from 1 (the client, once
    per write)."""
    return f"{client_id}:{seq}"


def parse_request_id(text: str) -> RequestId:
    """Parse the `Kvstore-Request-Id` header (`<client_id>:<seq>`); BadRequestError if bad."""
    client_id, sep, seq_text = text.strip().rpartition(":")
    if (
        not sep
        or not seq_text.isascii()
        or not seq_text.isdigit()
        or len(seq_text) > _SEQ_DIGITS_MAX
    ):
        raise BadRequestError(f"request id must be <client_id>:<seq>, got {text!r}")
    try:
        return RequestId(client_id, int(seq_text))
    except ValueError as exc:
        raise BadRequestError(f"bad request id {text!r}: {exc}") from exc


def check_client_id(client_id: str) -> str:
    """`client_id` if it may name a client's requests; ValueError otherwise."""
    RequestId(client_id, 1)
    return client_id
