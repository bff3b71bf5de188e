"""The command encoding: round trips, and strict rejection of anything malformed."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import BadRequestError, ProtocolError
from kvstore.kv.commands import (
    COMMAND_FORMAT_VERSION,
    Command,
    Delete,
    Put,
    RequestId,
    decode_command,
    encode_command,
    parse_request_id,
)

client_ids = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
counts = st.integers(min_value=0, max_value=2**63 - 1)
keys = st.text(min_size=1, max_size=40).map(lambda k: k.encode("utf-8", "replace").decode("utf-8"))


@st.composite
def requests_and_acks(draw: st.DrawFn) -> tuple[RequestId | None, int]:
    if draw(st.booleans()):
        return None, 0
    seq = draw(st.integers(min_value=1, max_value=2**63 - 1))
    return RequestId(draw(client_ids), seq), draw(st.integers(min_value=0, max_value=seq))


@st.composite
def commands(draw: st.DrawFn) -> Command:
    request, acked_below = draw(requests_and_acks())
    key = draw(keys)
    time_ms = draw(counts)
    if_revision = draw(st.none() | counts)
    if draw(st.booleans()):
        create_only = if_revision is None and draw(st.booleans())
        return Put(
            key,
            draw(st.binary(max_size=64)),
            request,
            time_ms,
            if_revision=if_revision,
            create_only=create_only,
            acked_below=acked_below,
        )
    return Delete(key, request, time_ms, if_revision=if_revision, acked_below=acked_below)


@given(commands())
def test_round_trip(command: Command) -> None:
    data = encode_command(command)
    assert data[0] == COMMAND_FORMAT_VERSION
    assert decode_command(data) == command


@given(st.binary(max_size=80))
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        command = decode_command(data)
    except ProtocolError:
        return
    assert isinstance(command, Put | Delete)


@given(commands(), st.data())
def test_mutated_encodings_decode_or_raise_protocol_error(
    command: Command, data: st.DataObject
) -> None:
    encoded = bytearray(encode_command(command))
    position = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[position] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded)))
    try:
        decode_command(bytes(encoded[:cut]))
    except ProtocolError:
        pass


def _raw(obj: object, version: int = COMMAND_FORMAT_VERSION) -> bytes:
    return bytes((version,)) + msgpack.packb(obj, use_bin_type=True)


GOOD_PUT = [1, "k", b"v", ["c1", 5], 1000, None, False, 2]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        _raw(GOOD_PUT, version=2),
        _raw(GOOD_PUT)[:-1],
        _raw(GOOD_PUT) + b"\x00",
        _raw({"kind": 1}),
        _raw([]),
        _raw([3, "k", None, 0, None, 0]),
        _raw([True, *GOOD_PUT[1:]]),
        _raw(GOOD_PUT[:-1]),
        _raw([1, "", b"v", None, 0, None, False, 0]),  # empty key
        _raw([1, b"k", b"v", None, 0, None, False, 0]),  # key not a string
        _raw([1, "k", "v", None, 0, None, False, 0]),  # value not bytes
        _raw([1, "k", b"v", None, -1, None, False, 0]),  # negative time
        _raw([1, "k", b"v", None, 0, -1, False, 0]),  # negative if_revision
        _raw([1, "k", b"v", None, 0, True, False, 0]),  # bool if_revision
        _raw([1, "k", b"v", None, 0, None, 1, 0]),  # create_only not a bool
        _raw([1, "k", b"v", None, 0, 3, True, 0]),  # create_only with if_revision
        _raw([1, "k", b"v", None, 0, None, False, 1]),  # acked_below without request
        _raw([1, "k", b"v", ["c1", 5], 0, None, False, 6]),  # acked_below beyond seq
        _raw([1, "k", b"v", ["c 1", 5], 0, None, False, 0]),  # bad client id
        _raw([1, "k", b"v", ["c1", 0], 0, None, False, 0]),  # seq 0
        _raw([1, "k", b"v", ["c1"], 0, None, False, 0]),
        _raw([2, "k", None, 0, None]),
        bytes((COMMAND_FORMAT_VERSION,)) + b"\xc1",  # reserved msgpack byte
        bytes((COMMAND_FORMAT_VERSION, 0x92, 0x01, 0xA1, 0xFF)),  # invalid utf-8
    ],
)
def test_malformed_commands_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_command(data)


def test_constructors_validate() -> None:
    with pytest.raises(ValueError):
        RequestId("", 1)
    with pytest.raises(ValueError):
        RequestId("x" * 65, 1)
    with pytest.raises(ValueError):
        RequestId("ok", 0)
    with pytest.raises(ValueError):
        Put("k", b"v", None, 0, if_revision=1, create_only=True)
    with pytest.raises(ValueError):
        Delete("k", RequestId("c", 1), 0, acked_below=2)
    with pytest.raises(ValueError):  # msgpack could not encode it
        Put("k", b"", None, 0, if_revision=1 << 64)
    with pytest.raises(ValueError):
        RequestId("c", 1 << 64)
    top = Put("k", b"", RequestId("c", (1 << 64) - 1), (1 << 64) - 1, if_revision=(1 << 64) - 1)
    assert decode_command(encode_command(top)) == top


def test_parse_request_id() -> None:
    assert parse_request_id("abc-1.2_x:17") == RequestId("abc-1.2_x", 17)
    assert str(RequestId("c", 3)) == "c:3"
    assert parse_request_id(f"c:{(1 << 64) - 1}").seq == (1 << 64) - 1
    bad_ids = ("", "abc", "abc:", ":5", "abc:0", "abc:-1", "a b:1", "abc:1x", "abc:٣")
    for bad in (*bad_ids, f"c:{1 << 64}", "c:" + "9" * 5000):
        with pytest.raises(BadRequestError):
            parse_request_id(bad)
