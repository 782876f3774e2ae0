"""Devices removed from a space, as the hub enforces it (docs/hub.md, "Removed devices").

The hub holds no space secrets, so a new key epoch means nothing to it; it reads the space
documents in the clear instead. A device the space document lists in `removed`
(docs/spaces.md) is refused on `/peer` for that space and its live links there are closed
(`device-removed`). A stolen laptop also holds its user's account token, so the hub remembers
which token each daemon authenticated with (`note`, kept in the hub store's settings) and
refuses, for that space, every token a removed device used, on `/peer` and on `/yjs` alike:
the user's other devices that used the same token need a new token for that space.

No I/O besides the store setting; the endpoints ask `refused` on each auth and after each change
of a space document.
"""

from __future__ import annotations

import logging
from typing import Any

from pycrdt import Map

__all__ = ["DEVICE_REMOVED", "SETTING", "Removals"]

log = logging.getLogger("peerdaemon.hub.removals")

DEVICE_REMOVED = "device-removed"
SETTING = "hub.device-tokens"
"""Store setting: {device id: [token hashes (hex) it authenticated with, newest last]}."""
MAX_TOKENS_PER_DEVICE = 8
MAX_DEVICES = 100_000
REMOVED = "removed"
SPACE_PREFIX = "space:"


class Removals:
    """Which devices and tokens a space refuses, from its space document."""

    def __init__(self, docs: Any) -> None:
        self.docs = docs
        self._store = getattr(docs, "store", None)
        saved = self._load()
        self._tokens: dict[str, list[str]] = saved

    def _load(self) -> dict[str, list[str]]:
        get = getattr(self._store, "get_setting", None)
        value = get(SETTING) if callable(get) else None
        if not isinstance(value, dict):
            return {}
        return {
            str(device): [t for t in tokens if isinstance(t, str)][-MAX_TOKENS_PER_DEVICE:]
            for device, tokens in value.items()
            if isinstance(tokens, list)
        }

    def note(self, device: str, token_hash: str) -> None:
        """`device` authenticated with the token whose hash is `token_hash` (a daemon's auth)."""
        tokens = self._tokens.setdefault(device, [])
        if token_hash in tokens:
            return
        tokens.append(token_hash)
        del tokens[:-MAX_TOKENS_PER_DEVICE]
        if len(self._tokens) > MAX_DEVICES:  # oldest first: dicts keep insertion order
            self._tokens.pop(next(iter(self._tokens)))
        put = getattr(self._store, "put_setting", None)
        if callable(put):
            put(SETTING, self._tokens)

    def removed(self, space_id: str) -> frozenset[str]:
        """The device ids the space document lists as removed (malformed entries skipped)."""
        get_doc = getattr(self.docs, "get_doc", None)
        doc = get_doc(space_id, SPACE_PREFIX + space_id) if callable(get_doc) else None
        if doc is None:
            return frozenset()
        try:
            entries = doc.get(REMOVED, type=Map)
            return frozenset(d for d, entry in entries.items() if isinstance(entry, dict))
        except Exception:  # a document where `removed` is not a map: nothing removed
            log.warning("hub: space %s has a malformed `removed`", space_id)
            return frozenset()

    def blocked_tokens(self, space_id: str) -> frozenset[str]:
        return frozenset(t for d in self.removed(space_id) for t in self._tokens.get(d, ()))

    def refused(self, space_id: str, device: str | None, token_hash: str | None) -> bool:
        """Whether a connection of `device` (None: a Yjs client, no proven device) with the
        token `token_hash` may not sync `space_id` any more."""
        removed = self.removed(space_id)
        if not removed:
            return False
        if device is not None and device in removed:
            return True
        return token_hash is not None and any(
            token_hash in self._tokens.get(d, ()) for d in removed
        )
