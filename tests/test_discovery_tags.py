"""Discovery TXT records and space tags, without any network (zeroconf is never started)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroconf import ServiceInfo, ServiceStateChange

from peerdaemon.discovery import mdns
from peerdaemon.discovery.tags import (
    EPOCH_SECONDS,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    TAG_LENGTH,
    TAG_SLOTS,
    SpaceKey,
    accept,
    advertised_tags,
    build_txt,
    epoch_of,
    matching_spaces,
    parse_txt,
    seconds_to_next_epoch,
    space_tag,
)
from peerdaemon.model.schema import MODEL_VERSION

S1 = SpaceKey("space-1", b"\x01" * 32)
S2 = SpaceKey("space-2", b"\x02" * 32)
S3 = SpaceKey("space-3", b"\x03" * 32)
A = "AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAA"
B = "BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBB"
NOW = 1_750_000_000.0
DECOY_KEY = b"\x07" * 32


def txt_of(device_id: str, keys: list[SpaceKey], now: float = NOW, **kw) -> dict[str, str]:
    return build_txt(device_id, keys, now=now, decoy_key=kw.pop("decoy_key", DECOY_KEY), **kw)


def tags_in(txt: dict[str, str]) -> list[str]:
    return [t for k, v in sorted(txt.items()) if k.startswith("t") for t in v.split(",")]


def as_zeroconf(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    """Encode and decode through zeroconf's own TXT code (a data object; no sockets)."""
    return ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=1, properties=txt).properties


def test_members_match_and_non_members_do_not():
    advert = parse_txt(as_zeroconf(txt_of(A, [S1, S2])))
    assert advert is not None
    assert matching_spaces(advert, [S1], now=NOW) == ["space-1"]
    assert matching_spaces(advert, [S3, S2, S1], now=NOW) == ["space-2", "space-1"]
    assert matching_spaces(advert, [S3], now=NOW) == []
    assert matching_spaces(advert, [], now=NOW) == []
    # Same space id, different secret (e.g. a forged or stale space): no match.
    assert matching_spaces(advert, [SpaceKey("space-1", b"\x09" * 32)], now=NOW) == []


def test_tag_is_bound_to_device_so_co_members_are_not_linkable():
    epoch = epoch_of(NOW)
    assert space_tag(S1.secret, A, epoch) != space_tag(S1.secret, B, epoch)
    # A's advert does not verify as B's: the tag must be recomputed for the advertised id.
    txt = txt_of(A, [S1])
    txt["id"] = B
    assert matching_spaces(parse_txt(txt), [S1], now=NOW) == []


def test_tag_format_and_known_value():
    tag = space_tag(S1.secret, A, 5)
    assert (
        len(tag) == TAG_LENGTH
        and tag.isupper()
        and set(tag) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    )
    assert tag == space_tag(S1.secret, A, 5)  # deterministic
    # Pin the algorithm: base32(HMAC-SHA256(secret, context || id || epoch as 8 bytes BE))[:10].
    import base64
    import hashlib
    import hmac

    digest = hmac.new(
        S1.secret, b"peerdaemon-discovery-v1" + A.encode() + (5).to_bytes(8, "big"), hashlib.sha256
    ).digest()
    assert tag == base64.b32encode(digest).decode()[:10]


def test_tags_rotate_per_epoch():
    tags = {space_tag(S1.secret, A, e) for e in range(100)}
    assert len(tags) == 100
    assert epoch_of(NOW) == int(NOW // EPOCH_SECONDS)
    assert 0 < seconds_to_next_epoch(NOW) <= EPOCH_SECONDS
    assert seconds_to_next_epoch(epoch_of(NOW) * EPOCH_SECONDS) == EPOCH_SECONDS


def test_previous_epoch_accepted_older_and_future_not():
    hour = EPOCH_SECONDS
    for built_at, ok in [
        (NOW, True),
        (NOW - hour, True),
        (NOW - 2 * hour, False),
        (NOW + hour, False),
    ]:
        advert = parse_txt(txt_of(A, [S1], now=built_at))
        assert (matching_spaces(advert, [S1], now=NOW) == ["space-1"]) is ok, built_at
    # Right after the hour, an advert published a second before it still matches.
    boundary = (epoch_of(NOW) + 1) * hour
    advert = parse_txt(txt_of(A, [S1], now=boundary - 1))
    assert matching_spaces(advert, [S1], now=boundary + 1) == ["space-1"]


def test_decoys_hide_the_number_of_spaces():
    counts = {
        n: len(tags_in(txt_of(A, [SpaceKey(f"s{i}", bytes([i]) * 32) for i in range(n)])))
        for n in range(0, 10)
    }
    assert counts == {0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8, 9: 12}
    epoch = epoch_of(NOW)
    tags = advertised_tags([S1], A, epoch, DECOY_KEY)
    assert len(tags) == TAG_SLOTS and tags == sorted(tags)
    assert space_tag(S1.secret, A, epoch) in tags
    assert all(len(t) == TAG_LENGTH for t in tags)
    # Decoys are stable within an hour (a refresh does not single out the real tags)...
    assert advertised_tags([S1], A, epoch, DECOY_KEY) == tags
    decoys = set(tags) - {space_tag(S1.secret, A, epoch)}
    assert decoys < set(advertised_tags([], A, epoch, DECOY_KEY))
    # ...and rotate with the epoch and differ per process (decoy key).
    assert not decoys & set(advertised_tags([S1], A, epoch + 1, DECOY_KEY))
    assert not decoys & set(advertised_tags([S1], A, epoch, b"\x08" * 32))
    # Decoys match nobody's space.
    assert matching_spaces(parse_txt(txt_of(A, [])), [S1, S2, S3], now=NOW) == []


def test_txt_round_trip_through_zeroconf_encoding():
    txt = txt_of(A, [S1, S2], protocol_version=PROTOCOL_VERSION)
    assert set(txt) == {"v", "id", "t", "m"}
    assert txt["v"] == str(PROTOCOL_VERSION) and txt["m"] == str(MODEL_VERSION) and txt["id"] == A
    advert = parse_txt(as_zeroconf(txt))
    assert advert is not None
    assert advert.version == PROTOCOL_VERSION
    assert advert.device_id == A
    assert advert.model_version == MODEL_VERSION
    assert advert.tags == frozenset(tags_in(txt))
    assert parse_txt(txt) == advert  # str keys/values (e.g. decoded_properties) work too


def test_many_spaces_split_across_txt_strings():
    keys = [SpaceKey(f"s{i}", i.to_bytes(32, "big")) for i in range(45)]
    txt = txt_of(A, keys)
    assert set(txt) == {"v", "id", "m", "t", "t2", "t3"}
    for key, value in txt.items():
        assert len(f"{key}={value}".encode()) <= 255
    advert = parse_txt(as_zeroconf(txt))
    assert len(advert.tags) == 48
    assert matching_spaces(advert, [keys[44], S1], now=NOW) == ["s44"]


@pytest.mark.parametrize(
    "props",
    [
        {},
        {b"id": A.encode(), b"t": b""},  # no v
        {b"v": b"one", b"id": A.encode()},
        {b"v": b"-1", b"id": A.encode()},
        {b"v": b"99999999999", b"id": A.encode()},
        {b"v": b"1"},  # no id
        {b"v": b"1", b"id": b""},
        {b"v": b"1", b"id": None},
        {b"v": b"1", b"id": b"\xff\xfe"},  # not UTF-8
        {b"v": b"1", b"id": b"has space"},
        {b"v": b"1", b"id": b"x" * 200},
        {b"v": None, b"id": A.encode()},
    ],
)
def test_malformed_txt_is_ignored(props):
    assert parse_txt(props) is None
    assert accept(props, own_device_id=B, keys=[S1], now=NOW) == (None, "malformed TXT")


def test_bad_tags_are_dropped_and_case_ignored():
    good = space_tag(S1.secret, A, epoch_of(NOW))
    props = {
        b"v": b"1",
        b"id": A.encode(),
        b"m": b"zz",
        b"t": f"short,{good.lower()},TOOLONGTAG1,!!!!!!!!!!,,".encode(),
        b"tx": b"AAAAAAAAAA",
    }
    advert = parse_txt(props)
    assert advert is not None and advert.tags == {good} and advert.model_version is None
    assert matching_spaces(advert, [S1], now=NOW) == ["space-1"]


@given(
    st.dictionaries(
        st.binary(max_size=12), st.one_of(st.none(), st.binary(max_size=300)), max_size=8
    )
)
def test_parse_never_raises(props):
    advert = parse_txt(props)
    if advert is not None:
        matching_spaces(advert, [S1], now=NOW)


def test_accept_decisions():
    member = txt_of(A, [S1])
    assert accept(member, own_device_id=B, keys=[S1], now=NOW)[1] == ""
    assert accept(member, own_device_id=A, keys=[S1], now=NOW)[1] == "own service"
    assert accept(member, own_device_id=B, keys=[S2], now=NOW)[1] == "no shared space"
    other = txt_of(A, [S1], protocol_version=PROTOCOL_VERSION + 1)
    assert (
        accept(other, own_device_id=B, keys=[S1], now=NOW)[1]
        == f"protocol version {PROTOCOL_VERSION + 1}"
    )


def test_mdns_evaluation_reports_once_per_change_without_starting_zeroconf():
    """MdnsDiscovery's decision path on ServiceInfo data objects; no Zeroconf is constructed."""
    keys = [S1]
    found: list[tuple[str, list[str], int]] = []
    lost: list[tuple[str, list[str], int]] = []
    disc = mdns.MdnsDiscovery(
        B,
        7002,
        lambda: keys,
        lambda *a: found.append(a),
        on_lost=lambda *a: lost.append(a),
        clock=lambda: NOW,
    )

    def info(device: str, spaces: list[SpaceKey], addresses: list[str], port: int = 7001):
        return ServiceInfo(
            SERVICE_TYPE,
            f"{device[:8]}.{SERVICE_TYPE}",
            port=port,
            properties=txt_of(device, spaces),
            parsed_addresses=addresses,
        )

    disc._evaluate("a", info(A, [S1], ["192.0.2.1"]))
    disc._evaluate("a", info(A, [S1], ["192.0.2.1"]))  # an hourly update: nothing new
    assert found == [(A, ["192.0.2.1"], 7001)]
    disc._evaluate("a", info(A, [S1], ["192.0.2.9"]))  # moved
    assert found[-1] == (A, ["192.0.2.9"], 7001)
    assert lost == [(A, ["192.0.2.1"], 7001)]  # only the stale address
    disc._evaluate("own", info(B, [S1], ["192.0.2.2"]))
    disc._evaluate("c", info("CCCC", [S2], ["192.0.2.3"]))
    disc._evaluate("noaddr", info("DDDD", [S1], []))
    assert len(found) == 2
    keys.append(S2)  # joined C's space: a re-check reports it
    disc._evaluate("c", info("CCCC", [S2], ["192.0.2.3"]))
    assert found[-1] == ("CCCC", ["192.0.2.3"], 7001)
    keys.remove(S2)  # left it again: C no longer matches
    disc._evaluate("c", info("CCCC", [S2], ["192.0.2.3"]))
    assert lost[-1] == ("CCCC", ["192.0.2.3"], 7001)
    disc._live.add("a")
    disc._state_changed("a", ServiceStateChange.Removed)  # goodbye
    assert lost[-1] == (A, ["192.0.2.9"], 7001)
    disc._state_changed("own", ServiceStateChange.Removed)  # never reported: nothing
    assert len(lost) == 3 and len(found) == 3


def test_unknown_interface_is_an_error():
    with pytest.raises(mdns.DiscoveryError):
        mdns.ipv4_addresses("pd-no-such-if0")


async def test_republish_on_refresh_on_the_hour_and_on_address_change(autojump_clock, monkeypatch):
    import trio

    addresses = ["192.0.2.2"]
    monkeypatch.setattr(mdns, "ipv4_addresses", lambda interface=None: list(addresses))
    start = (epoch_of(NOW) + 1) * EPOCH_SECONDS - 200.0  # 200 s before the hour
    keys = [S1]
    disc = mdns.MdnsDiscovery(
        B, 7002, lambda: keys, lambda *a: None, clock=lambda: start + trio.current_time()
    )
    updates: list[ServiceInfo] = []

    async def update_service(info: ServiceInfo) -> None:  # no Zeroconf, no worker thread
        updates.append(info)

    disc._update_service = update_service  # type: ignore[method-assign]
    txt = disc._build_txt()
    disc._info = disc._service_info(f"{B[:8]}.{SERVICE_TYPE}", txt, addresses)
    disc._published = (txt, list(addresses))

    def current_match(info: ServiceInfo, key: SpaceKey) -> bool:
        advert = parse_txt(info.properties)
        return space_tag(key.secret, B, epoch_of(start + trio.current_time())) in advert.tags

    async with trio.open_nursery() as nursery:
        nursery.start_soon(disc._maintain)
        await trio.sleep(150)  # address polls, nothing changed: no update
        assert updates == []
        keys.append(S2)
        disc.refresh()
        await trio.sleep(1)
        assert len(updates) == 1 and current_match(updates[0], S2)
        assert updates[0].name == disc._info.name  # same (possibly renamed) instance
        await trio.sleep(55)  # crossed the hour: tags rotated
        assert len(updates) == 2
        assert current_match(updates[1], S1) and current_match(updates[1], S2)
        addresses[:] = ["192.0.2.7"]
        await trio.sleep(61)
        assert len(updates) == 3 and updates[2].parsed_addresses() == ["192.0.2.7"]
        assert disc.addresses == ["192.0.2.7"]
        nursery.cancel_scope.cancel()
