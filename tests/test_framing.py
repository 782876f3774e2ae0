"""Sans-I/O framing: every way bytes can arrive, without sockets."""

import struct

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerdaemon.api.framing import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    decode_payload,
    encode_frame,
)

MESSAGES = [
    {"id": 1, "op": "status"},
    {"id": "abc", "op": "env.merge", "args": {"id": "e1", "update": b"\x00\x01\xff"}},
    {"id": 2, "result": {"nested": [1, 2.5, None, True, "é"], "bytes": b""}},
    {"id": None, "error": {"code": "bad-frame", "message": "x"}},
    {"sub": 3, "event": {"type": "change", "paths": ["/routes/0"], "update": b"\x01" * 1000}},
]


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_round_trip_each_message():
    dec = FrameDecoder()
    for msg in MESSAGES:
        dec.feed(encode_frame(msg))
        assert dec.next_event() == msg
        assert dec.next_event() is None
    assert dec.buffered == 0


def test_many_frames_in_one_feed():
    dec = FrameDecoder()
    dec.feed(b"".join(encode_frame(m) for m in MESSAGES))
    assert dec.events() == MESSAGES


def test_byte_by_byte():
    dec = FrameDecoder()
    data = b"".join(encode_frame(m) for m in MESSAGES)
    out = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        out.extend(dec.events())
    assert out == MESSAGES


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=20))
def test_any_split_gives_same_events(cuts):
    data = b"".join(encode_frame(m) for m in MESSAGES)
    points = sorted({min(c * 7, len(data)) for c in cuts})
    dec = FrameDecoder()
    out = []
    prev = 0
    for p in [*points, len(data)]:
        dec.feed(data[prev:p])
        prev = p
        out.extend(dec.events())
    assert out == MESSAGES


def test_header_only_waits_for_payload():
    dec = FrameDecoder()
    data = encode_frame({"id": 1, "op": "x"})
    dec.feed(data[:4])
    assert dec.next_event() is None
    dec.feed(data[4:])
    assert dec.next_event() == {"id": 1, "op": "x"}


def test_oversized_frame_reported_at_header_and_streamed_away():
    dec = FrameDecoder(max_frame=100)
    size = 10_000
    dec.feed(struct.pack(">I", size) + b"\xaa" * 10)
    err = dec.next_event()
    assert isinstance(err, FrameError) and err.code == "frame-too-large"
    assert "10000" in err.message
    assert dec.next_event() is None
    remaining = size - 10
    while remaining > 0:
        n = min(999, remaining)
        dec.feed(b"\xaa" * n)
        remaining -= n
        assert dec.buffered == 0  # never buffered
        assert dec.next_event() is None
    assert dec.skipping == 0
    dec.feed(encode_frame({"id": 7, "op": "ok"}))
    assert dec.next_event() == {"id": 7, "op": "ok"}


def test_oversized_tail_and_next_frame_in_one_chunk():
    dec = FrameDecoder(max_frame=100)
    good = encode_frame({"id": 1, "op": "a"})
    dec.feed(struct.pack(">I", 300) + b"\x00" * 50)
    assert dec.next_event().code == "frame-too-large"
    dec.feed(b"\x00" * 250 + good + good[:3])
    assert dec.next_event() == {"id": 1, "op": "a"}
    assert dec.next_event() is None
    dec.feed(good[3:])
    assert dec.next_event() == {"id": 1, "op": "a"}


def test_exactly_max_frame_is_accepted():
    msg = {"id": 1, "op": "x", "args": {"b": b"\x00" * 50}}
    payload = cbor2.dumps(msg)
    dec = FrameDecoder(max_frame=len(payload))
    dec.feed(frame(payload))
    assert dec.next_event() == msg


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",  # break code without indefinite item
        b"\xa1\x01",  # map missing its value
        b"\x62\xff\xfe",  # text string that is not UTF-8
        b"\x5a\x10\x00\x00\x00",  # byte string claiming 256 MiB in a 5-byte frame
        b"",  # empty frame
    ],
)
def test_malformed_cbor_then_valid_frame(payload):
    dec = FrameDecoder()
    dec.feed(frame(payload) + encode_frame({"id": 1, "op": "ok"}))
    err = dec.next_event()
    assert isinstance(err, FrameError) and err.code == "bad-frame"
    assert dec.next_event() == {"id": 1, "op": "ok"}


@pytest.mark.parametrize("value", [[1, 2], 5, "text", b"bytes", None, 1.5])
def test_non_map_frames_are_bad_frames(value):
    dec = FrameDecoder()
    dec.feed(frame(cbor2.dumps(value)) + encode_frame({"id": 2, "op": "ok"}))
    err = dec.next_event()
    assert isinstance(err, FrameError) and err.code == "bad-frame"
    assert "expected a map" in err.message
    assert dec.next_event() == {"id": 2, "op": "ok"}


def test_trailing_bytes_after_item_are_bad_frame():
    result = decode_payload(cbor2.dumps({"id": 1}) + b"\x00")
    assert isinstance(result, FrameError) and "trailing" in result.message


def test_encode_frame_limit():
    with pytest.raises(FrameTooLarge):
        encode_frame({"b": b"\x00" * 200}, max_frame=100)
    assert len(encode_frame({"b": b"\x00" * 50}, max_frame=100)) < 104


def test_decoder_rejects_silly_limits():
    with pytest.raises(ValueError):
        FrameDecoder(0)
    with pytest.raises(ValueError):
        FrameDecoder(2**32)
    assert FrameDecoder().max_frame == DEFAULT_MAX_FRAME
