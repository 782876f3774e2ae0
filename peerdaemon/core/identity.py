"""This device's identity: an Ed25519 key pair, the device id derived from it, a display name.

Created at the first start and kept in the store's settings (`"identity"`), so a device keeps
its id across restarts: peers recognise it by that id, and spaces list their members by it. The
id is derived from the public key (as Syncthing's), so a peer can check during the handshake
that a device id really belongs to the key that signs for it.
"""

from __future__ import annotations

import base64
import hashlib
import socket
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..store import Store, Ticket

__all__ = [
    "SETTING",
    "Identity",
    "default_name",
    "load_or_create_identity",
    "save_name",
    "validate_name",
]

SETTING = "identity"
"""Store setting: `{"private_key": 32 raw bytes, "name": str | None}` (None: the hostname)."""

MAX_NAME = 64


def default_name() -> str:
    """The short hostname: what a user recognises in a member list until they pick a name."""
    host = socket.gethostname().split(".")[0].strip()
    return host or "peerdaemon"


def validate_name(name: object) -> str:
    """A display name is one short line; raises ValueError with a message for the user."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a device name must be a non-empty string")
    name = name.strip()
    if len(name) > MAX_NAME:
        raise ValueError(f"a device name is at most {MAX_NAME} characters")
    if any(ch < " " or ch == "\x7f" for ch in name):
        raise ValueError("a device name may not contain control characters")
    return name


class Identity:
    """The key pair plus the name; `name` may change (`config set name`), the id never does."""

    def __init__(self, private_key: Ed25519PrivateKey, name: str) -> None:
        self._private_key = private_key
        # the *_raw methods: `serialization` (with its SSH and PKCS machinery) stays unloaded
        self.public_key: bytes = private_key.public_key().public_bytes_raw()
        self.device_id: str = self.device_id_of(self.public_key)
        self.name = name

    @classmethod
    def generate(cls, name: str | None = None) -> Identity:
        return cls(Ed25519PrivateKey.generate(), name or default_name())

    @classmethod
    def from_private_bytes(cls, raw: bytes, name: str | None = None) -> Identity:
        return cls(Ed25519PrivateKey.from_private_bytes(raw), name or default_name())

    def private_bytes(self) -> bytes:
        return self._private_key.private_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)

    @staticmethod
    def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
        """True if `signature` is `public_key`'s over `data`; False for anything malformed."""
        try:
            Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), data)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    @staticmethod
    def device_id_of(public_key: bytes) -> str:
        """base32(sha256(key)) without padding, 52 characters in groups of 7 (Syncthing style)."""
        digest = hashlib.sha256(bytes(public_key)).digest()
        text = base64.b32encode(digest).decode("ascii").rstrip("=")[:52]
        return "-".join(text[i : i + 7] for i in range(0, len(text), 7))

    def __repr__(self) -> str:  # never the private key
        return f"Identity(device_id={self.device_id!r}, name={self.name!r})"


def _setting(store: Store) -> dict[str, Any]:
    value = store.get_setting(SETTING)
    return value if isinstance(value, dict) else {}


def load_or_create_identity(store: Store, name: str | None = None) -> Identity:
    """The stored identity, or a new one (persisted). A given `name` replaces the stored one.

    Without a stored or given name the hostname is used and not stored, so it follows a rename
    of the machine.
    """
    if name is not None:
        name = validate_name(name)
    saved = _setting(store)
    raw = saved.get("private_key")
    stored_name = saved.get("name") if isinstance(saved.get("name"), str) else None
    if isinstance(raw, bytes) and len(raw) == 32:
        identity = Identity.from_private_bytes(raw, name or stored_name)
        if name is not None and name != stored_name:
            store.put_setting(SETTING, {"private_key": raw, "name": name})
        return identity
    identity = Identity.generate(name)
    store.put_setting(SETTING, {"private_key": identity.private_bytes(), "name": name})
    return identity


def save_name(store: Store, identity: Identity, name: str) -> Ticket:
    """Rename the device (validated) and persist the new name."""
    identity.name = validate_name(name)
    return store.put_setting(
        SETTING, {"private_key": identity.private_bytes(), "name": identity.name}
    )
