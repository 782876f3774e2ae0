"""The hub's reader of client websocket frames (`core.wsframes`), fed bytes: every rule with its
close code, fragmentation with control frames in between, every way of splitting the bytes, and
the same answers as wsproto (the reader it replaced) on random valid and broken frame sequences.
Frames are built here by hand (wsproto's client cannot build broken ones), masked by a plain loop
so the reader's unmasking is not checked against itself."""

from __future__ import annotations

import random
import struct

import pytest
from wsproto import events as ws
from wsproto.connection import Connection, ConnectionState, ConnectionType

from peerdaemon.core.wsframes import (
    SMALL_MASK,
    ClientFrameReader,
    Close,
    FrameError,
    FrameReader,
    Ping,
    Pong,
    close_frame,
    mask_key,
    message_frame,
    ping_frame,
    pong_frame,
    unmask,
)

KEY = b"\x37\xfa\x21\x3d"


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = KEY,
    length: int | None = None,
) -> bytes:
    """A client frame; `length` forces the length's form (7, 16 or 64 bits), even a wrong one."""
    n = len(payload)
    form = length if length is not None else (7 if n < 126 else 16 if n < 65536 else 64)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask is not None else 0
    if form == 7:
        head += bytes([bit | n])
    elif form == 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def binary(data: bytes, **kw) -> bytes:
    return frame(0x2, data, **kw)


def text(data: str | bytes, **kw) -> bytes:
    return frame(0x1, data.encode() if isinstance(data, str) else data, **kw)


def cont(data: bytes | str, **kw) -> bytes:
    return frame(0x0, data.encode() if isinstance(data, str) else data, **kw)


def close(code: int | None = None, reason: bytes = b"") -> bytes:
    return frame(0x8, b"" if code is None else struct.pack("!H", code) + reason)


def read(
    wire: bytes,
    *,
    max_message: int = 1 << 20,
    pieces: list[int] | None = None,
    client: bool = False,
) -> list:
    """Everything the reader makes of `wire` (fed whole, or cut at `pieces`): messages and
    control events, and ("error", code) if it failed; `client`: read as a client."""
    reader = (ClientFrameReader if client else FrameReader)(max_message)
    out: list = []
    cuts = [0, *(pieces or []), len(wire)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        reader.feed(wire[a:b])
        try:
            while (event := reader.next_event()) is not None:
                out.append(event)
        except FrameError as exc:
            out.append(("error", exc.code))
            assert reader.done and reader.next_event() is None
    return out


def error_of(wire: bytes, **kw) -> int | None:
    events = read(wire, **kw)
    return events[-1][1] if events and type(events[-1]) is tuple else None


# -------------------------------------------------------------------------------- the rules
def test_messages_and_control_frames_in_order():
    wire = binary(b"abc") + text("héllo") + frame(0x9, b"p") + frame(0xA) + binary(b"")
    assert read(wire) == [b"abc", "héllo", Ping(b"p"), Pong(b""), b""]
    assert type(read(binary(b"x"))[0]) is bytes


@pytest.mark.parametrize(
    "wire",
    [
        binary(b"abc", mask=None),  # a client must mask
        frame(0x9, mask=None),
        *(binary(b"abc", rsv=r) for r in (1, 2, 4)),  # no extension was negotiated
        frame(0x9, rsv=4),
        *(frame(op, b"x") for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)),
        frame(0x9, b"x" * 126),  # control frames: at most 125 bytes ...
        frame(0xA, b"x" * 126),
        frame(0x8, b"\x03\xe8" + b"x" * 124),
        frame(0x9, b"x", fin=False),  # ... and never fragmented
        frame(0x8, b"\x03\xe8", fin=False),
        cont(b"x"),  # a continuation without a message
        binary(b"a", fin=False) + frame(0x9) + binary(b"b"),  # a new message inside one
        text("a", fin=False) + text("b"),
        binary(b"x" * 10, length=16),  # lengths in their shortest form
        binary(b"x" * 200, length=64),
        binary(b"x" * 10, length=64),
        b"\x82\xff" + b"\x80" + bytes(7) + KEY,  # a 64-bit length with its top bit set
    ],
)
def test_protocol_errors_close_with_1002(wire):
    assert error_of(wire) == 1002


def test_frames_before_an_error_are_delivered_and_nothing_after_it():
    wire = binary(b"ok") + frame(0x9, b"1") + binary(b"bad", mask=None) + binary(b"after")
    assert read(wire) == [b"ok", Ping(b"1"), ("error", 1002)]


@pytest.mark.parametrize(
    "wire",
    [
        text(b"\xff"),
        text(b"ok \xc3"),  # a character cut short at the end of the message
        text(b"\xed\xa0\x80"),  # a surrogate
        text(b"a", fin=False) + cont(b"\xc3", fin=False) + cont(b"\x28"),
        close(1000, b"\xff"),
    ],
)
def test_invalid_utf8_closes_with_1007(wire):
    assert error_of(wire) == 1007


def test_invalid_utf8_ends_a_fragmented_text_message_at_once():
    """Without waiting for the rest (RFC 6455 8.1: fail fast), whatever follows."""
    wire = text(b"\xff", fin=False)
    assert read(wire) == [("error", 1007)]
    assert read(text("é".encode()[:1], fin=False) + cont("é".encode()[1:])) == ["é"]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000, 65535])
def test_close_codes_not_allowed_on_the_wire_close_with_1002(code):
    assert error_of(close(code)) == 1002


def test_close_frames():
    assert read(close()) == [Close(1005, "")]
    assert read(frame(0x8, b"\x03")) == [("error", 1002)]  # a code cut in half
    for code in (1000, 1001, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 4999):
        assert read(close(code, "bye é".encode())) == [Close(code, "bye é")]
    assert read(close(1000) + binary(b"after") + b"garbage") == [Close(1000, "")]


def test_a_message_over_the_limit_is_refused_from_its_header():
    assert read(binary(b"x" * 10), max_message=10) == [b"x" * 10]
    assert read(binary(b"x" * 11), max_message=10) == [("error", 1009)]
    huge = b"\x82\xff" + struct.pack("!Q", 1 << 40) + KEY  # no payload needed to refuse it
    assert read(huge, max_message=1 << 20) == [("error", 1009)]
    parts = binary(b"x" * 6, fin=False) + frame(0x9) + cont(b"x" * 4, fin=False)
    assert read(parts + cont(b"", fin=True), max_message=10) == [Ping(b""), b"x" * 10]
    assert read(parts + cont(b"y"), max_message=10) == [Ping(b""), ("error", 1009)]
    assert read(text("é" * 6), max_message=11) == [("error", 1009)]  # counted in bytes


def test_fragmented_messages_with_control_frames_between_their_frames():
    wire = (
        text("hé", fin=False)
        + frame(0x9, b"a")
        + cont("l", fin=False)
        + frame(0xA, b"b")
        + cont("lo")
        + binary(b"1", fin=False)
        + frame(0x9)
        + cont(b"", fin=False)
        + cont(b"2")
    )
    assert read(wire) == [Ping(b"a"), Pong(b"b"), "héllo", Ping(b""), b"12"]


def sample_wire() -> tuple[bytes, list]:
    wire = (
        binary(bytes(range(200)))  # a 16-bit length
        + text("ünïcödé ✓", fin=False)
        + frame(0x9, b"ping")
        + cont("€€€"[:2] + "x")
        + binary(b"")
        + frame(0xA, b"pong")
        + binary(b"abcdefg", fin=False)
        + cont(b"h")
        + close(1001, b"going")
    )
    expected = [
        bytes(range(200)),
        Ping(b"ping"),
        "ünïcödé ✓€€x",
        b"",
        Pong(b"pong"),
        b"abcdefgh",
        Close(1001, "going"),
    ]
    return wire, expected


def test_the_bytes_may_be_cut_anywhere():
    wire, expected = sample_wire()
    assert read(wire) == expected
    for cut in range(1, len(wire)):
        assert read(wire, pieces=[cut]) == expected, cut
    assert read(wire, pieces=list(range(1, len(wire)))) == expected  # a byte at a time
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(2, 20)))
        assert read(wire, pieces=cuts) == expected


def test_a_large_frame_in_many_reads():
    """A 64-bit length, cut in its header, its key and at every offset modulo 4 of its
    payload (the key turns with each piece)."""
    payload = random.Random(1).randbytes(70_000)
    wire = text("a", fin=False) + cont(payload.hex()[:70_000]) + binary(payload) + frame(0x9)
    expected = ["a" + payload.hex()[:70_000], payload, Ping(b"")]
    assert read(wire) == expected
    big = len(text("a", fin=False) + cont(payload.hex()[:70_000]))
    for cut in [*range(big - 3, big + 20), big + 1001, big + 65_537, len(wire) - 3]:
        assert read(wire, pieces=[cut]) == expected
    assert read(wire, pieces=list(range(1000, len(wire), 4099))) == expected


def test_an_idle_reader_keeps_no_read_alive():
    reader = FrameReader()
    reader.feed(binary(b"x" * 300) + binary(b"y")[:3])
    assert reader.next_event() == b"x" * 300 and reader.next_event() is None
    assert len(reader._buf) == 3  # only the partial header
    reader.feed(binary(b"y")[3:])
    assert reader.next_event() == b"y" and reader.next_event() is None and reader._buf == b""


def test_any_bytes_like_input_gives_bytes():
    reader = FrameReader()
    reader.feed(bytearray(binary(b"")))
    reader.feed(memoryview(binary(b"ab", fin=False) + cont(b"c")))
    events = [reader.next_event(), reader.next_event()]
    assert events == [b"", b"abc"] and all(type(e) is bytes for e in events)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 100, SMALL_MASK - 1, SMALL_MASK, 5003])
def test_unmask(n):
    data = random.Random(n).randbytes(n)
    assert unmask(data, KEY) == bytes(b ^ KEY[i % 4] for i, b in enumerate(data))
    assert type(unmask(data, KEY)) is bytes


# ------------------------------------------------------------ a client reading a server
def test_a_client_reads_unmasked_frames_and_refuses_masked_ones():
    """The LAN link's dialer: a server's frames come unmasked (1002 otherwise, as wsproto)."""
    u = {"mask": None}
    payload = random.Random(3).randbytes(70_000)
    wire = (
        binary(b"abc", **u)
        + text("héllo", fin=False, **u)
        + frame(0x9, b"p", **u)
        + cont("!", **u)
        + binary(payload, **u)  # a 64-bit length
        + frame(0xA, **u)
        + frame(0x8, b"\x03\xe9bye", **u)
    )
    expected = [b"abc", Ping(b"p"), "héllo!", payload, Pong(b""), Close(1001, "bye")]
    assert read(wire, client=True) == expected
    for cut in [1, 2, 5, 11, 12, 13, 30, 70_020, len(wire) - 2]:
        assert read(wire, client=True, pieces=[cut]) == expected, cut
    assert read(binary(b"abc"), client=True) == [("error", 1002)]  # masked: refused
    assert read(frame(0x9, b"p"), client=True) == [("error", 1002)]
    assert read(binary(b"ok", **u) + binary(b"x"), client=True) == [b"ok", ("error", 1002)]
    assert read(binary(b"x" * 11, **u), client=True, max_message=10) == [("error", 1009)]
    assert read(binary(b"abc", **u)) == [("error", 1002)]  # and a server still refuses it


# ------------------------------------------------------------------ what a client sends
@pytest.mark.parametrize("n", [0, 1, 125, 126, 1000, 65_535, 65_536, 70_000])
def test_message_frames_are_wsprotos(n):
    """Unmasked (a server's), byte for byte what wsproto builds; masked (a client's), read back
    by wsproto's server as the same message, with a fresh key each time."""
    data = random.Random(n).randbytes(n)
    chars = "é✓" * (n // 2)
    assert message_frame(data) == Connection(ConnectionType.SERVER).send(ws.BytesMessage(data))
    assert message_frame(chars) == Connection(ConnectionType.SERVER).send(ws.TextMessage(chars))
    for message in (data, chars):
        server = Connection(ConnectionType.SERVER)
        wire = message_frame(message, masked=True) + message_frame(message, masked=True)
        server.receive_data(wire)
        got = [e.data for e in server.events()]
        assert got == [message, message]
    one, two = message_frame(data, masked=True), message_frame(data, masked=True)
    head = len(message_frame(data)) - n
    assert one[1] & 0x80 and one[head : head + 4] != two[head : head + 4]  # the keys


def test_control_frames_a_client_sends_are_masked_and_read_back():
    server = Connection(ConnectionType.SERVER)
    server.receive_data(
        ping_frame(b"p", masked=True)
        + pong_frame(b"q" * 125, masked=True)
        + close_frame(4400, "é" * 70, masked=True)
    )
    events = list(server.events())
    assert [type(e) for e in events] == [ws.Ping, ws.Pong, ws.CloseConnection]
    assert events[0].payload == b"p" and events[1].payload == b"q" * 125
    assert (events[2].code, events[2].reason) == (4400, "é" * 61)
    assert close_frame(None) == b"\x88\x00"  # the answer to a close without a code


def test_mask_keys_are_fresh_across_pool_refills():
    keys = [mask_key() for _ in range(3000)]  # three pools of 1024 keys
    assert all(len(k) == 4 for k in keys) and len(set(keys)) > 2990


# ------------------------------------------------------------- what the server sends back
def test_control_frames_sent_are_wsprotos():
    server = Connection(ConnectionType.SERVER)
    assert ping_frame() == server.send(ws.Ping(b""))
    assert pong_frame(b"p" * 125) == server.send(ws.Pong(b"p" * 125))
    for code, reason in [
        (1000, ""),
        (1002, "protocol error"),
        (1009, "too-large"),
        (4400, "é" * 70),  # cut to 123 bytes, on a character boundary
        (1013, "x" * 200),
        (1005, ""),  # the client's close had no code: answered with 1000
        (1006, "gone"),
    ]:
        server = Connection(ConnectionType.SERVER)
        assert close_frame(code, reason) == server.send(ws.CloseConnection(code, reason)), code


# ------------------------------------------------------------------ the same as wsproto
def wsproto_read(wire: bytes, *, max_message: int, pieces: list[int], client: bool = False) -> list:
    """What the hub made of `wire` with wsproto (its old `WsConn`: the message size counted
    as the pieces came); `client`: what a client's wsproto made of it."""
    server = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
    out: list = []
    parts: list = []
    size = 0
    cuts = [0, *pieces, len(wire)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        if server.state is not ConnectionState.OPEN:
            break
        server.receive_data(wire[a:b])
        for event in server.events():
            if isinstance(event, ws.BytesMessage | ws.TextMessage):
                parts.append(event.data)
                size += len(event.data.encode() if isinstance(event.data, str) else event.data)
                if size > max_message:
                    out.append(("error", 1009))
                    return out
                if event.message_finished:
                    out.append("".join(parts) if isinstance(event.data, str) else b"".join(parts))
                    parts, size = [], 0
            elif isinstance(event, ws.Ping):
                out.append(Ping(bytes(event.payload)))
            elif isinstance(event, ws.Pong):
                out.append(Pong(bytes(event.payload)))
            elif isinstance(event, ws.CloseConnection):
                if server.state is ConnectionState.REMOTE_CLOSING:
                    out.append(Close(int(event.code), event.reason or ""))
                else:  # a broken frame
                    out.append(("error", int(event.code)))
                return out
    return out


def random_payload(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 3, 5, 60, 125, 126, 127, 500, 2000, 65_536]))


def random_text(rng: random.Random) -> bytes:
    s = "".join(rng.choice("aé€✓😀 ") for _ in range(rng.choice([0, 1, 10, 50, 400])))
    data = s.encode()
    if rng.random() < 0.1:  # broken UTF-8
        i = rng.randrange(len(data) + 1)
        data = data[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + data[i:]
    return data


def random_control(rng: random.Random, m: dict) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        return frame(0x9, rng.randbytes(rng.choice([0, 4, 125])), **m)
    if kind < 0.8:
        return frame(0xA, rng.randbytes(rng.choice([0, 4])), **m)
    if kind < 0.9:
        return frame(0x9, b"x" * 126, **m)
    return frame(0x9, fin=False, **m)


def random_message(rng: random.Random, fragments: int, m: dict) -> bytes:
    is_text = rng.random() < 0.4
    data = random_text(rng) if is_text else random_payload(rng)
    cuts = sorted(rng.randint(0, len(data)) for _ in range(fragments - 1))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=False)]
    wire = b""
    for i, piece in enumerate(pieces):
        opcode = (0x1 if is_text else 0x2) if i == 0 else 0x0
        mask = m.get("mask", rng.randbytes(4))
        wire += frame(opcode, piece, fin=i == len(pieces) - 1, mask=mask)
        if i < len(pieces) - 1 and rng.random() < 0.3:
            wire += random_control(rng, m)
    return wire


def broken_frame(rng: random.Random, m: dict) -> bytes:
    wrong = {"mask": KEY} if m else {"mask": None}  # a server's frame masked, a client's not
    return rng.choice(
        [
            binary(b"abc", **wrong),
            frame(0x9, **wrong),
            binary(b"abc", rsv=rng.choice([1, 2, 4]), **m),
            frame(rng.choice([3, 7, 0xB, 0xF]), b"x", **m),
            cont(b"x", **m),
            binary(b"x" * 5, length=16, **m),
            binary(b"x" * 300, length=64, **m),
            frame(0x8, struct.pack("!H", rng.choice([999, 1004, 1005, 1014, 2000, 5000])), **m),
            frame(0x8, b"\x03\xe8\xff", **m),
            frame(0x8, b"\x03", **m),
        ]
    )


def random_wire(rng: random.Random, client: bool = False) -> bytes:
    """Frames as a client sends them or, for a `client` to read, as a server does (unmasked)."""
    m: dict = {"mask": None} if client else {}
    wire = b""
    for _ in range(rng.randint(1, 8)):
        roll = rng.random()
        if roll < 0.55:
            wire += random_message(rng, rng.choice([1, 1, 2, 3]), m)
        elif roll < 0.75:
            wire += random_control(rng, m)
        elif roll < 0.85:
            wire += broken_frame(rng, m)
        elif roll < 0.9:  # a message left open, then whatever comes
            wire += binary(b"open", fin=False, **m)
        elif roll < 0.95:
            code = struct.pack("!H", rng.choice([1000, 1001, 3000, 4999]))
            wire += frame(0x8, code + rng.choice([b"", b"bye"]), **m)
        else:  # a message inside one
            wire += text(b"x", fin=False, **m) + random_message(rng, 1, m)
    return wire


@pytest.mark.parametrize("client", [False, True], ids=["server", "client"])
@pytest.mark.parametrize("seed", range(8))
def test_same_answers_as_wsproto(seed, client):
    """Random valid and broken sequences, fed whole and cut at random: the same messages,
    control frames and close codes, read by a server (a client's masked frames) or by a client
    (a server's unmasked ones). With a small limit, only binary messages: wsproto's old
    reader counted the size after decoding a piece, so for an oversized text message with bad
    UTF-8 it could say 1007 where the header already says 1009."""
    rng = random.Random(seed)
    m: dict = {"mask": None} if client else {}
    compared = errors = 0
    for _ in range(60):
        wire = random_wire(rng, client)
        cut_sets = [[], sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, 5)))]
        for pieces in cut_sets:
            ours = read(wire, max_message=1 << 20, pieces=pieces, client=client)
            theirs = wsproto_read(wire, max_message=1 << 20, pieces=pieces, client=client)
            assert ours == theirs, wire[:200]
            compared += 1
            errors += bool(ours) and type(ours[-1]) is tuple
        small = rng.choice([0, 10, 200, 5000])
        sizes = [binary(random_payload(rng), fin=True, **m) for _ in range(3)]
        for wire2 in (b"".join(sizes), binary(b"x" * 7, fin=False, **m) + cont(b"y" * 7, **m)):
            assert read(wire2, max_message=small, client=client) == wsproto_read(
                wire2, max_message=small, pieces=[], client=client
            )
    assert errors > 5 and compared == 120  # the broken sequences were exercised
