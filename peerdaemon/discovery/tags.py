"""Discovery TXT records and space tags (sans-I/O).

A daemon advertises `_peerdaemon._tcp.local.` with a TXT record that lets *members* of one of its
spaces recognise it and tells everybody else nothing about which (or how many) spaces it holds:

    v  protocol version          "1"
    id device id                 "ABCDEFG-HIJKLMN-..."
    t  space tags + decoys       "K3J2QO7XPA,MZ4T6B2CQE,..." (sorted; always a multiple of TAG_SLOTS)
    m  model version             "1"

For each local space: tag = base32(HMAC-SHA256(secret, "peerdaemon-discovery-v1" || device_id ||
epoch))[:10], epoch = floor(unix time / 3600) as 8 bytes big-endian. The tag binds the device id,
so two members of the same space advertise different tags (co-membership is not visible), and the
epoch makes tags rotate hourly so they cannot be linked across hours. Decoys are derived from a
per-process random key and the epoch, so they stay stable within an hour (a refresh does not
reveal which tags are real by which ones survive) and look exactly like real tags.
A browser recomputes the tag of each of its spaces for the advertised device id, for the current
and the previous epoch, and accepts the service when one of them is present. See docs/discovery.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from peerdaemon.model.schema import MODEL_VERSION

SERVICE_TYPE = "_peerdaemon._tcp.local."
PROTOCOL_VERSION = 1
"""Version of the peer protocol this daemon speaks; the `v` key. Browsers skip other versions."""

TAG_CONTEXT = b"peerdaemon-discovery-v1"
EPOCH_SECONDS = 3600
TAG_LENGTH = 10
"""Base32 characters per tag: 50 bits, so a random decoy or a stranger's tag never collides."""
TAG_SLOTS = 4
"""Tags are padded with decoys up to a multiple of this, hiding the number of spaces (up to it)."""
TAGS_PER_KEY = 20
"""Tags per TXT string (`t`, then `t2`, `t3`, ...): a TXT string holds at most 255 bytes."""
MAX_TAGS = 200
"""A parser ignores tags beyond this, bounding the work a hostile advert can cause."""
MAX_DEVICE_ID = 128

_TAG_RE = re.compile(rf"[A-Z2-7]{{{TAG_LENGTH}}}")
_TAG_KEY_RE = re.compile(r"t(?:[2-9]|[1-9][0-9])?")
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class SpaceKeyLike(Protocol):
    """Anything with a space id and its shared secret (e.g. `peerdaemon.spaces.SpaceKey`)."""

    @property
    def id(self) -> str: ...

    @property
    def secret(self) -> bytes: ...


@dataclass(frozen=True)
class SpaceKey:
    """Local stand-in for `peerdaemon.spaces.SpaceKey`; any object with `id`/`secret` works."""

    id: str
    secret: bytes


@dataclass(frozen=True)
class Advert:
    """A parsed TXT record of a discovered daemon."""

    version: int
    device_id: str
    tags: frozenset[str]
    model_version: int | None


def epoch_of(unix_time: float) -> int:
    """The tag epoch (hour number) of a wall-clock time."""
    return math.floor(unix_time / EPOCH_SECONDS)


def seconds_to_next_epoch(unix_time: float) -> float:
    """How long until tags rotate, so the advertiser re-registers right on the hour."""
    return (epoch_of(unix_time) + 1) * EPOCH_SECONDS - unix_time


def space_tag(secret: bytes, device_id: str, epoch: int) -> str:
    """The tag that `device_id` advertises for the space with `secret` during `epoch`."""
    message = TAG_CONTEXT + device_id.encode("utf-8") + epoch.to_bytes(8, "big", signed=True)
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii")[:TAG_LENGTH]


def _decoy_tag(decoy_key: bytes, epoch: int, index: int) -> str:
    message = b"peerdaemon-decoy" + epoch.to_bytes(8, "big", signed=True) + index.to_bytes(4, "big")
    digest = hmac.new(decoy_key, message, hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii")[:TAG_LENGTH]


def advertised_tags(
    keys: Iterable[SpaceKeyLike], device_id: str, epoch: int, decoy_key: bytes
) -> list[str]:
    """Real tags for `keys` plus decoys up to a multiple of TAG_SLOTS, sorted (order leaks nothing)."""
    real = {space_tag(k.secret, device_id, epoch) for k in keys}
    slots = max(TAG_SLOTS, math.ceil(len(real) / TAG_SLOTS) * TAG_SLOTS)
    tags = set(real)
    index = 0
    while len(tags) < slots:
        tags.add(_decoy_tag(decoy_key, epoch, index))
        index += 1
    return sorted(tags)


def build_txt(
    device_id: str,
    keys: Iterable[SpaceKeyLike],
    *,
    now: float,
    decoy_key: bytes,
    protocol_version: int = PROTOCOL_VERSION,
    model_version: int = MODEL_VERSION,
) -> dict[str, str]:
    """The TXT properties a daemon advertises at wall-clock time `now`."""
    tags = advertised_tags(keys, device_id, epoch_of(now), decoy_key)
    txt = {"v": str(protocol_version), "id": device_id, "m": str(model_version)}
    for n, start in enumerate(range(0, len(tags), TAGS_PER_KEY)):
        txt["t" if n == 0 else f"t{n + 1}"] = ",".join(tags[start : start + TAGS_PER_KEY])
    return txt


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _small_int(text: str | None) -> int | None:
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 6:
        return None
    return int(text)


def parse_txt(properties: Mapping[bytes, bytes | None] | Mapping[str, str | None]) -> Advert | None:
    """Parse TXT properties (as zeroconf returns them, bytes or str); None if malformed.

    A missing or non-numeric `v`, or a missing or odd `id`, makes the record unusable. Tags that
    are not TAG_LENGTH base32 characters are dropped (lower case is accepted); `m` is optional.
    """
    props: dict[str, str | None] = {}
    for raw_key, raw_value in properties.items():
        key = _text(raw_key)
        if key is not None:
            props[key.lower()] = _text(raw_value)
    version = _small_int(props.get("v"))
    device_id = props.get("id")
    if version is None or not device_id or len(device_id) > MAX_DEVICE_ID:
        return None
    if not _DEVICE_ID_RE.fullmatch(device_id):
        return None
    tags: set[str] = set()
    for key in sorted(props):
        value = props[key]
        if not _TAG_KEY_RE.fullmatch(key) or not value:
            continue
        for tag in value.split(","):
            tag = tag.strip().upper()
            if _TAG_RE.fullmatch(tag) and len(tags) < MAX_TAGS:
                tags.add(tag)
    return Advert(version, device_id, frozenset(tags), _small_int(props.get("m")))


def matching_spaces(advert: Advert, keys: Iterable[SpaceKeyLike], *, now: float) -> list[str]:
    """Ids of our spaces that the advertiser also holds (its tag, this or the previous epoch)."""
    if not advert.tags:
        return []
    epoch = epoch_of(now)
    found = []
    for key in keys:
        for e in (epoch, epoch - 1):
            if space_tag(key.secret, advert.device_id, e) in advert.tags:
                found.append(key.id)
                break
    return found


def is_compatible(advert: Advert, protocol_version: int = PROTOCOL_VERSION) -> bool:
    """Whether we can talk to the advertiser at all (same peer protocol version)."""
    return advert.version == protocol_version


def accept(
    properties: Mapping[bytes, bytes | None] | Mapping[str, str | None],
    *,
    own_device_id: str,
    keys: Iterable[SpaceKeyLike],
    now: float,
    protocol_version: int = PROTOCOL_VERSION,
) -> tuple[Advert | None, str]:
    """The browser's whole decision for one TXT record: (advert, "") to connect, else (advert or
    None, reason). Kept here so it is tested without any network."""
    advert = parse_txt(properties)
    if advert is None:
        return None, "malformed TXT"
    if advert.device_id == own_device_id:
        return advert, "own service"
    if not is_compatible(advert, protocol_version):
        return advert, f"protocol version {advert.version}"
    if not matching_spaces(advert, keys, now=now):
        return advert, "no shared space"
    return advert, ""
