"""This device's identity: an Ed25519 key pair, the device id derived from it, a display name.

Created at the first start and kept in the store's settings (`"identity"`), so a device keeps
its id across restarts: peers recognise it by that id, and spaces list their members by it. The
id is derived from the public key (as Syncthing's), so a peer can check during the handshake
that a device id really belongs to the key that signs for it.

`cryptography` is loaded at the first signature or verification, not with the identity: the
hub needs its device id at start (its key fingerprint) but signs only when a daemon dials it,
and that library is 6-8 MB of an idle hub's memory (issue 13). So the public key is kept in the
store beside the private key (derived once, when the key is made or first read without it, by
the OpenSSL that Python's `ssl` already loaded where it can be reached), and checked against the
private key when `cryptography` is loaded to sign.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from typing import TYPE_CHECKING, Any

from ..store import Store, Ticket

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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

    def __init__(self, private_key: bytes, name: str, public_key: bytes | None = None) -> None:
        """`private_key`: the 32 raw bytes of an Ed25519 private key (its seed); `public_key`:
        its public key as kept beside it (else derived, which loads `cryptography`)."""
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise ValueError("an Ed25519 private key is 32 bytes")
        if public_key is not None and (not isinstance(public_key, bytes) or len(public_key) != 32):
            raise ValueError("an Ed25519 public key is 32 bytes")
        self._raw = private_key
        self._key: Ed25519PrivateKey | None = None  # loaded with `cryptography`, when signing
        self.public_key: bytes = (
            public_key if public_key is not None else _public_key_of(private_key)
        )
        self.device_id: str = self.device_id_of(self.public_key)
        self.name = name

    @classmethod
    def generate(cls, name: str | None = None) -> Identity:
        return cls(os.urandom(32), name or default_name())  # (what `generate()` does in OpenSSL)

    @classmethod
    def from_private_bytes(
        cls, raw: bytes, name: str | None = None, public_key: bytes | None = None
    ) -> Identity:
        return cls(bytes(raw), name or default_name(), public_key)

    def private_bytes(self) -> bytes:
        return self._raw

    def sign(self, data: bytes) -> bytes:
        if self._key is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            key = Ed25519PrivateKey.from_private_bytes(self._raw)
            if key.public_key().public_bytes_raw() != self.public_key:
                # a stored public key that is not the private key's: signing with it would
                # make every peer refuse this device, so say what is wrong instead
                raise ValueError("the stored identity's public key does not match its private key")
            self._key = key
        return self._key.sign(data)

    @staticmethod
    def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
        """True if `signature` is `public_key`'s over `data`; False for anything malformed."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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


NID_ED25519 = 1087  # OpenSSL's EVP_PKEY_ED25519


def _openssl_public_key(raw: bytes) -> bytes | None:
    """The Ed25519 public key of seed `raw`, computed by the libcrypto that Python's `ssl`
    module is linked with (OpenSSL 1.1.1 or later; in memory in every peerdaemon process: trio
    imports `ssl`), so that a hub's first start, which makes its key, does not load
    `cryptography` for it; None where it cannot be reached (a static build, LibreSSL)."""
    import ctypes

    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        new_key = lib.EVP_PKEY_new_raw_private_key
        get_public = lib.EVP_PKEY_get_raw_public_key
        free = lib.EVP_PKEY_free
    except (ImportError, OSError, AttributeError):
        return None
    new_key.restype = ctypes.c_void_p
    new_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    get_public.restype = ctypes.c_int
    get_public.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    key = new_key(NID_ED25519, None, raw, len(raw))
    if not key:
        return None
    try:
        out = ctypes.create_string_buffer(32)
        size = ctypes.c_size_t(32)
        if get_public(key, out, ctypes.byref(size)) != 1 or size.value != 32:
            return None
        return out.raw
    finally:
        free(key)


def _public_key_of(raw: bytes) -> bytes:
    """The public key of Ed25519 seed `raw` (by OpenSSL where at hand, else `cryptography`; the
    key is checked against `cryptography`'s anyway before the first signature)."""
    public = _openssl_public_key(raw)
    if public is not None:
        return public
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    # the *_raw methods: `serialization` (with its SSH and PKCS machinery) stays unloaded
    return Ed25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()


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
        public = saved.get("public_key")
        kept = isinstance(public, bytes) and len(public) == 32
        identity = Identity.from_private_bytes(raw, name or stored_name, public if kept else None)
        if not kept or (name is not None and name != stored_name):
            store.put_setting(SETTING, _saved(identity, name if name is not None else stored_name))
        return identity
    identity = Identity.generate(name)
    store.put_setting(SETTING, _saved(identity, name))
    return identity


def _saved(identity: Identity, name: str | None) -> dict[str, Any]:
    return {
        "private_key": identity.private_bytes(),
        "public_key": identity.public_key,
        "name": name,
    }


def save_name(store: Store, identity: Identity, name: str) -> Ticket:
    """Rename the device (validated) and persist the new name."""
    identity.name = validate_name(name)
    return store.put_setting(SETTING, _saved(identity, identity.name))
