"""Removing a device from a space: the removal record, key epochs and who a link admits.

docs/spaces.md "Removing a device" and docs/peer-protocol.md 6.1. A removal is two things:

* a record in the space document (`removed`: device id -> {by, at, epoch}), which every member
  and the hub read, so the removed device is refused by its id whatever secret it shows;
* a new space secret (the next **key epoch**), so that a copy of the old secret (a stolen
  laptop's data directory under a new device key, an old invite code) opens nothing: a peer
  that proves only an older epoch is admitted only if it is a current member, and is then
  handed the current key.

Pure functions of a `SpacesService`'s state (no I/O, no trio), so every rule is checked
in memory; `SpacesService` exposes them as its `remove_device`, `refuse_peer` and
`receive_space_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.errors import AMBIGUOUS, BAD_REQUEST, EXISTS, NOT_FOUND
from ..core.identity import Identity

if TYPE_CHECKING:
    from .service import Space

__all__ = [
    "DEVICE_REMOVED",
    "MAX_PREVIOUS",
    "KeyEpoch",
    "adopt_key",
    "commit_key",
    "current_key_invalid",
    "key_check",
    "valid_keys",
    "load_previous",
    "previous_setting",
    "refusal",
    "resolve_device",
    "rotate",
]

DEVICE_REMOVED = "device-removed"
"""The close reason (and event) for a device refused because a space lists it as removed."""
MAX_PREVIOUS = 2
"""Older secrets kept per space: a member offline across this many rotations still meets the
others (and is handed the current key); one offline longer needs a new invite."""
UNAUTHORIZED = "unauthorized"


@dataclass(frozen=True)
class KeyEpoch:
    """One secret a space had, and its key epoch (0 for the secret the space was created with)."""

    epoch: int
    secret: bytes


KEY_CHECK = b"peerdaemon-space-key-check-v1"
KEY_SIGNED = b"peerdaemon-space-key-v1\0"


def key_check(secret: bytes) -> str:
    """What the space document shows of a key: 16 bytes of an HMAC keyed by it (hex), which
    names the key without revealing it."""
    return hmac.new(secret, KEY_CHECK, hashlib.sha256).hexdigest()[:32]


def _signed(space_id: str, epoch: int, check: str) -> bytes:
    return KEY_SIGNED + space_id.encode() + b"\0" + epoch.to_bytes(8, "big") + bytes.fromhex(check)


def commit_key(space: Space, epoch: int, secret: bytes, identity: Any) -> None:
    """Record in the space document that `identity`'s device rotated the space to this key:
    `keys[check] = {epoch, by, pk, sig, at}`, signed with the device key. A member takes a key
    handed to it only if such a record of a device that is not removed vouches for it."""
    check = key_check(secret)
    entry = {
        "epoch": epoch,
        "by": identity.device_id,
        "pk": bytes(identity.public_key),
        "sig": identity.sign(_signed(space.id, epoch, check)),
        "at": time.time(),
    }
    space.doc.commit_key(check, entry)


def valid_keys(space: Space) -> dict[str, int]:
    """check -> epoch of every key record that counts: well formed, signed by the device it
    names, and that device not removed. A removed device's records stop counting, so a key it
    handed out before its removal reached everyone is dropped for the remover's."""
    removed = space.doc.removed()
    out: dict[str, int] = {}
    for check, entry in space.doc.key_commitments().items():
        epoch, by, pk, sig = entry.get("epoch"), entry.get("by"), entry.get("pk"), entry.get("sig")
        if isinstance(epoch, float) and epoch.is_integer():
            epoch = int(epoch)  # Yjs numbers read back as floats
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            continue
        if not (isinstance(by, str) and isinstance(pk, bytes | bytearray)):
            continue
        if not isinstance(sig, bytes | bytearray):  # Yjs binary reads back as a bytearray
            continue
        if by in removed or Identity.device_id_of(pk) != by:
            continue
        try:
            signed = _signed(space.id, epoch, check)
        except ValueError:  # a check that is not hex
            continue
        if Identity.verify(pk, sig, signed):
            out[check] = epoch
    return out


def current_key_invalid(space: Space) -> bool:
    """The space's current key is one a record vouched for, and no record that counts does any
    more (its author was removed): it must not admit anyone new."""
    if space.epoch == 0:
        return False  # the key the space was created with (from an invite)
    check = key_check(space.secret)
    return check in space.doc.key_commitments() and check not in valid_keys(space)


def _better(a: tuple[int, str], b: tuple[int, str]) -> bool:
    """The order members converge on: the higher epoch, then the smaller check."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def load_previous(value: object) -> tuple[KeyEpoch, ...]:
    """The `previous` list of a saved space; malformed entries are dropped."""
    out = []
    for entry in value if isinstance(value, list) else ():
        if isinstance(entry, dict):
            epoch, secret = entry.get("epoch"), entry.get("secret")
            if isinstance(epoch, int) and isinstance(secret, bytes) and len(secret) == 32:
                out.append(KeyEpoch(epoch, bytes(secret)))
    return tuple(out[:MAX_PREVIOUS])


def previous_setting(previous: tuple[KeyEpoch, ...]) -> list[dict[str, Any]]:
    return [{"epoch": k.epoch, "secret": k.secret} for k in previous]


def resolve_device(space: Space, ref: object, me: str) -> str:
    """A member of `space` named by device id, unique id prefix (4+ characters, dashes
    ignored) or unique member name -> its device id; `OpError` otherwise."""
    from .service import SpaceError

    if not isinstance(ref, str) or not ref.strip():
        raise SpaceError(BAD_REQUEST, "name a device by its id, an id prefix or its name")
    ref = ref.strip()
    members = space.doc.members()
    removed = space.doc.removed()
    if ref in removed or ref.upper() in removed:
        raise SpaceError(EXISTS, f"device {ref} is already removed from this space")
    if ref.upper() in members:
        matches = [ref.upper()]
    else:
        matches = [d for d, info in members.items() if info.get("name") == ref]
        bare = ref.replace("-", "").upper()
        if not matches and len(bare) >= 4:
            matches = [d for d in members if d.replace("-", "").startswith(bare)]
    if not matches:
        raise SpaceError(
            NOT_FOUND, f"no member {ref!r} in space {space.display_name!r} (see `space list`)"
        )
    if len(matches) > 1:
        raise SpaceError(AMBIGUOUS, f"{ref!r} names several members ({', '.join(sorted(matches))})")
    device = matches[0]
    if device == me:
        raise SpaceError(BAD_REQUEST, "this is this device: use `peerdaemon space leave`")
    return device


def rotate(space: Space) -> None:
    """Give `space` a new secret at the next key epoch, keeping the current one as previous."""
    # at least the epoch any removal recorded (a member may have removed one while apart)
    epoch = max([space.epoch + 1, *(e["epoch"] for e in space.doc.removed().values())])
    space.previous = (KeyEpoch(space.epoch, space.secret), *space.previous)[:MAX_PREVIOUS]
    space.secret = secrets.token_bytes(32)
    space.epoch = epoch


def refusal(space: Space | None, device: str, epoch: int) -> str | None:
    """Why a peer that proved `epoch` of `space` may not sync it (None: it may).

    A removed device is refused whatever it proves; one that proves only an older epoch must
    be a current member (a stolen secret under a new device key, or an old invite, is not)."""
    if space is None:
        return UNAUTHORIZED
    if space.doc.is_removed(device):
        return DEVICE_REMOVED
    if device in space.doc.members():
        return None
    if epoch < space.epoch or current_key_invalid(space):
        return UNAUTHORIZED  # an old secret, or a key a removed device handed out
    return None


def adopt_key(space: Space, sender: str, epoch: int, secret: bytes, me: str) -> bool:
    """A member's `space-key` for `space`: take it if the sender is a member that is not removed
    (in this device's view), a record of a device that is not removed vouches for the key
    (`valid_keys`), and it comes after ours in the order members converge on (a higher epoch;
    at the same epoch the smaller check), or ours lost its voucher. -> adopted."""
    if not isinstance(secret, bytes) or len(secret) != 32 or epoch < 1:
        return False
    if sender not in space.doc.members() or space.doc.is_removed(sender):
        return False
    if space.doc.is_removed(me):
        return False
    valid = valid_keys(space)
    check = key_check(secret)
    if valid.get(check) != epoch:
        return False
    ours = (space.epoch, key_check(space.secret))
    if not (_better((epoch, check), ours) or current_key_invalid(space)):
        return False
    if check == ours[1]:
        return False
    kept = (KeyEpoch(space.epoch, space.secret), *space.previous)
    # older keys only, and none a removed device vouched for: `proven` takes the highest
    space.previous = tuple(
        k for k in kept if k.epoch < epoch and (k.epoch == 0 or key_check(k.secret) in valid)
    )[:MAX_PREVIOUS]
    space.secret, space.epoch = secret, epoch
    return True
