"""Record framing: every single-bit flip of a record is caught, even in the length field of the
last record of the last segment (where a damaged length could otherwise pass for a torn write)."""

from __future__ import annotations

import pytest

from kvstore import codec
from kvstore.errors import CorruptionError
from kvstore.storage.wal import HEADER_SIZE, RecordType, frame, scan_records


def _records() -> bytes:
    return frame(RecordType.HARD_STATE, codec.pack([1, 2, 3])) + frame(
        RecordType.ENTRIES, codec.pack([[1, 1, 0, b"x" * 300]])
    )


@pytest.mark.parametrize("is_last", [False, True])
def test_every_bit_flip_is_reported(is_last: bool) -> None:
    data = _records()
    records, valid = scan_records("seg", data, is_last=is_last)
    assert (len(records), valid) == (2, len(data))
    for position in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            with pytest.raises(CorruptionError) as caught:
                scan_records("seg", bytes(damaged), is_last=is_last)
            assert caught.value.path == "seg"
            assert caught.value.offset <= position


def test_a_torn_or_zeroed_tail_is_cut_only_in_the_last_segment() -> None:
    data = _records()
    second = len(frame(RecordType.HARD_STATE, codec.pack([1, 2, 3])))
    for cut in range(second, len(data)):
        records, valid = scan_records("seg", data[:cut], is_last=True)
        assert (len(records), valid) == (1, second)
        if cut > second:
            with pytest.raises(CorruptionError):
                scan_records("seg", data[:cut], is_last=False)
    zeroed = data[:second] + bytes(len(data) - second)
    assert scan_records("seg", zeroed, is_last=True)[1] == second
    with pytest.raises(CorruptionError):
        scan_records("seg", zeroed, is_last=False)


def test_header_size() -> None:
    assert HEADER_SIZE == 9  # length u32, crc32 u32, type u8
