"""Key schedule and AEAD framing of the peer protocol (docs/peer-protocol.md, "Cryptography").

Every value that proves something is bound to the transcript hash `th` of the two hellos, which
holds both random nonces and both ephemeral keys: a signature or a space tag made for one
connection means nothing on another (no replay), and a man in the middle, who cannot make both
sides see the same hellos, gets a different `th` on each side (nothing verifies).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import messages
from .messages import PROTOCOL_ERROR, LocalProtocolError, PeerProtocolError

__all__ = [
    "AUTH_LABEL",
    "DIALER",
    "HUB_TOKEN_ID_LEN",
    "HUB_TOKEN_LABEL",
    "KEYS_LABEL",
    "LISTENER",
    "SPACE_LABEL",
    "Ephemeral",
    "SecureChannel",
    "SessionKeys",
    "auth_payload",
    "derive_keys",
    "hub_token_hash",
    "hub_token_id",
    "hub_token_proof",
    "nonce_of",
    "space_tag",
    "transcript_hash",
]

DIALER = b"D"
LISTENER = b"L"
AUTH_LABEL = b"peerdaemon-auth-v1"
SPACE_LABEL = b"peerdaemon-space-v1"
KEYS_LABEL = b"peerdaemon-keys-v1"
HUB_TOKEN_LABEL = b"peerdaemon-hub-token-v1"
HUB_TOKEN_ID_LEN = 8
MAX_COUNTER = (1 << 64) - 1


class Ephemeral:
    """One connection's X25519 key pair; never reused, never stored."""

    def __init__(self, random: Callable[[int], bytes] = os.urandom) -> None:
        self._key = X25519PrivateKey.from_private_bytes(random(32))
        self.public = self._key.public_key().public_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        """The shared secret; a low-order peer key (all-zero result) is a protocol error."""
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise PeerProtocolError(PROTOCOL_ERROR, "invalid ephemeral key") from None


def transcript_hash(hello_dialer: bytes, hello_listener: bytes) -> bytes:
    """SHA-256 over the two hellos exactly as sent (both are self-delimiting CBOR items)."""
    return hashlib.sha256(hello_dialer + hello_listener).digest()


@dataclass(frozen=True)
class SessionKeys:
    dialer_to_listener: bytes
    listener_to_dialer: bytes


def derive_keys(shared: bytes, th: bytes) -> SessionKeys:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=th, info=KEYS_LABEL).derive(shared)
    return SessionKeys(okm[:32], okm[32:])


def auth_payload(role: bytes, th: bytes) -> bytes:
    """What a device signs to prove it holds its key on this connection, in this role."""
    return AUTH_LABEL + role + th


def space_tag(secret: bytes, role: bytes, th: bytes) -> bytes:
    """Proof of holding a space's secret, fresh per connection and role; reveals nothing else."""
    return hmac.new(secret, SPACE_LABEL + role + th, hashlib.sha256).digest()


def hub_token_hash(token: str) -> bytes:
    """SHA-256 of a hub token (UTF-8): what the hub stores (as hex), and the proof's key."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def hub_token_id(token_hash: bytes) -> bytes:
    """The first bytes of the token's hash: lets the hub find the candidate token(s) to check a
    proof against, and reveals nothing that helps to authenticate."""
    return token_hash[:HUB_TOKEN_ID_LEN]


def hub_token_proof(token_hash: bytes, role: bytes, th: bytes) -> bytes:
    """Proof of knowing a hub token on this connection, in this role (hub mode): the token itself
    never travels, and the proof is worthless on any other connection (another `th`)."""
    return hmac.new(token_hash, HUB_TOKEN_LABEL + role + th, hashlib.sha256).digest()


def nonce_of(counter: int) -> bytes:
    """The ChaCha20-Poly1305 nonce of the `counter`-th box of a direction: 4 zero bytes + u64 BE."""
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


class SecureChannel:
    """Both directions of one connection's AEAD: seal our messages, open the peer's, in order.

    Each direction has its own key and a counter starting at 0; a box must carry exactly the next
    counter, so a replayed, dropped or reordered box is a protocol error, as is any tampering.
    """

    def __init__(self, keys: SessionKeys, *, dialer: bool) -> None:
        send, receive = (
            (keys.dialer_to_listener, keys.listener_to_dialer)
            if dialer
            else (keys.listener_to_dialer, keys.dialer_to_listener)
        )
        self._send = ChaCha20Poly1305(send)
        self._receive = ChaCha20Poly1305(receive)
        self.sent = 0
        self.received = 0

    def seal(self, inner: dict[str, Any]) -> bytes:
        """One inner message -> the wire bytes of its box."""
        if self.sent > MAX_COUNTER:
            raise LocalProtocolError(PROTOCOL_ERROR, "send counter exhausted")
        n = self.sent
        self.sent += 1
        ciphertext = self._send.encrypt(nonce_of(n), messages.encode(inner), None)
        return messages.encode({"t": "box", "n": n, "c": ciphertext})

    def open(self, box: dict[str, Any], max_size: int) -> dict[str, Any]:
        """A validated `box` map -> the validated inner message."""
        n = box["n"]
        if n != self.received:
            raise PeerProtocolError(
                PROTOCOL_ERROR, f"box counter {n}, expected {self.received} (replayed or reordered)"
            )
        try:
            plaintext = self._receive.decrypt(nonce_of(n), box["c"], None)
        except InvalidTag:
            raise PeerProtocolError(PROTOCOL_ERROR, "box does not authenticate") from None
        self.received += 1
        inner = messages.decode(plaintext, max_size)
        messages.validate_inner(inner)
        return inner
