"""Invite codes: everything a new device needs to join a space, in one line a user can paste.

    pd1-<base32, lower case, no padding, of: CBOR map || checksum>

The version is in the prefix so that a later format gets a clear "upgrade" error instead of a
garbled one (fields added to the map since, like the hub key `hk`, are optional: older codes
still decode, and a decoder ignores keys it does not know); the checksum (4 bytes of SHA-256 over the CBOR) turns a mistyped or truncated code
into "mistyped" rather than a confusing join. The code carries the space's secret: whoever holds
it can join, so it is shared like a password. See docs/spaces.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field

import cbor2

from ..core.addresses import parse_address

__all__ = ["PREFIX", "Invite", "InviteError", "decode_invite", "encode_invite", "parse_address"]

VERSION = 1
PREFIX = f"pd{VERSION}-"
CHECKSUM_BYTES = 4
_CHECKSUM_CONTEXT = b"peerdaemon invite\x00"
_PREFIX_RE = re.compile(r"^pd(\d+)-", re.IGNORECASE)
_B32_ALPHABET = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


class InviteError(ValueError):
    """An invite code that cannot be used; the message says why, for the user."""


@dataclass(frozen=True)
class Invite:
    space_id: str
    name: str
    secret: bytes
    inviter: str  # device id of the inviting device
    addresses: tuple[str, ...] = field(default=())  # "host:port" where the inviter listens
    hub: str | None = None
    hub_key: str | None = None  # the hub's key fingerprint (device id), if the inviter has one
    epoch: int = 0  # the secret's key epoch (after `space remove-device`); absent means 0


def _checksum(payload: bytes) -> bytes:
    return hashlib.sha256(_CHECKSUM_CONTEXT + payload).digest()[:CHECKSUM_BYTES]


def encode_invite(invite: Invite) -> str:
    body: dict[str, object] = {
        "s": invite.space_id,
        "n": invite.name,
        "k": bytes(invite.secret),
        "d": invite.inviter,
        "a": list(invite.addresses),
    }
    if invite.epoch:
        body["e"] = invite.epoch
    if invite.hub:
        body["h"] = invite.hub
        if invite.hub_key:
            body["hk"] = invite.hub_key
    payload = cbor2.dumps(body)
    data = base64.b32encode(payload + _checksum(payload)).decode("ascii").rstrip("=")
    return PREFIX + data.lower()


def decode_invite(code: str) -> Invite:
    """The invitation in `code`; InviteError says what is wrong (version, typo, truncation)."""
    if not isinstance(code, str) or not code.strip():
        raise InviteError("the invite code is empty")
    text = "".join(code.split())  # codes wrapped by mail clients or terminals still work
    match = _PREFIX_RE.match(text)
    if match is None:
        raise InviteError(f"not a peerdaemon invite code (it should start with {PREFIX!r})")
    version = int(match.group(1))
    if version != VERSION:
        if version > VERSION:
            raise InviteError(
                f"this invite code was made by a newer peerdaemon (format {version}); upgrade"
            )
        raise InviteError(f"unknown invite code format {version} (expected {VERSION})")
    data = text[match.end() :].upper()
    for pos, ch in enumerate(data):
        if ch not in _B32_ALPHABET:
            raise InviteError(
                f"the invite code has an invalid character {ch!r} at position "
                f"{match.end() + pos + 1}; it was probably mistyped"
            )
    if len(data) % 8 in (1, 3, 6):
        raise InviteError("the invite code is incomplete or mistyped (wrong length)")
    try:
        raw = base64.b32decode(data + "=" * (-len(data) % 8))
    except (binascii.Error, ValueError):
        raise InviteError("the invite code is incomplete or mistyped") from None
    payload, checksum = raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:]
    canonical = base64.b32encode(raw).decode("ascii").rstrip("=") == data  # unused last bits
    if len(raw) <= CHECKSUM_BYTES or _checksum(payload) != checksum or not canonical:
        raise InviteError("the invite code is damaged or mistyped (its checksum does not match)")
    try:
        body = cbor2.loads(payload)
    except Exception:  # cbor2 raises several types for garbage
        raise InviteError("the invite code does not hold an invitation") from None
    return _invite_of(body)


def _invite_of(body: object) -> Invite:
    if not isinstance(body, dict):
        raise InviteError("the invite code does not hold an invitation")
    space_id, name, secret = body.get("s"), body.get("n"), body.get("k")
    inviter, addresses, hub = body.get("d"), body.get("a", []), body.get("h")
    hub_key = body.get("hk")
    epoch = body.get("e", 0)
    if not (isinstance(space_id, str) and space_id and isinstance(name, str)):
        raise InviteError("the invitation has no valid space id or name")
    if not (isinstance(secret, bytes) and len(secret) == 32):
        raise InviteError("the invitation has no valid space key")
    if not isinstance(inviter, str) or not inviter:
        raise InviteError("the invitation does not name the inviting device")
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise InviteError("the invitation's addresses are malformed")
    if hub is not None and not isinstance(hub, str):
        raise InviteError("the invitation's hub url is malformed")
    if hub_key is not None and not (isinstance(hub_key, str) and _is_key(hub_key) and hub):
        raise InviteError("the invitation's hub key is malformed")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < 1 << 32:
        raise InviteError("the invitation's key epoch is malformed")
    return Invite(
        space_id, name, secret, inviter, tuple(addresses), hub or None, hub_key or None, epoch
    )


def _is_key(text: str) -> bool:
    """A device id as `Identity.device_id_of` writes it: 52 base32 characters in groups of 7."""
    raw = text.replace("-", "")
    return (
        len(raw) == 52
        and set(raw) <= _B32_ALPHABET
        and text == "-".join(raw[i : i + 7] for i in range(0, 52, 7))
    )
