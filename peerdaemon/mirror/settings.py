"""What the mirror keeps in the store, so that links survive restarts: the links themselves
(setting `links`) and the mirror directory's chosen file names and exclusions (setting `mirror`).
"""

from __future__ import annotations

import logging
import re
from typing import TypedDict

from ..store import Store, StoreError, Ticket

log = logging.getLogger("peerdaemon.mirror")

LINKS_KEY = "links"
MIRROR_KEY = "mirror"


class LinkEntry(TypedDict, total=False):
    """One stored link; read with `.get`, since it comes from an older daemon as well."""

    path: str
    synced: str | None
    """Hash of the content file and document last agreed on: start-up compares the file with it."""
    auto: bool
    """Made by `--mirror-dir`, not by `env link`."""


class MirrorDirSetting(TypedDict):
    names: dict[str, str]
    """env id -> file name in the mirror directory, chosen once (a rename keeps it)."""
    excluded: list[str]
    """Env ids unlinked by hand: the mirror directory leaves them alone."""


def mirror_file_name(name: str, env_id: str) -> str:
    """`<sanitized name>-<first 8 chars of id>.json`: readable, and unique per environment."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60].strip("-") or "environment"
    short = re.sub(r"[^A-Za-z0-9]", "", env_id)[:8] or "env"
    return f"{slug}-{short}.json"


class MirrorSettings:
    """Reads and writes the two settings; every write is queued in order (the store's contract)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def links(self) -> dict[str, LinkEntry]:
        return dict(self.store.get_setting(LINKS_KEY) or {})

    def put_links(self, links: dict[str, LinkEntry]) -> Ticket | None:
        """None if the store is closed already (a link's last words during shutdown)."""
        try:
            return self.store.put_setting(LINKS_KEY, links)
        except StoreError as exc:
            log.warning("cannot save links: %s", exc)
            return None

    def save_synced(self, env_id: str, path: str, content_hash: str) -> None:
        """Remember what the link at `path` last agreed on, if that link is still the stored one."""
        links = self.links()
        entry = links.get(env_id)
        if entry is None or entry.get("path") != path:
            return
        if entry.get("synced") != content_hash:
            links[env_id] = {**entry, "synced": content_hash}
            self.put_links(links)

    def dir_setting(self) -> MirrorDirSetting:
        value = self.store.get_setting(MIRROR_KEY) or {}
        return {
            "names": dict(value.get("names") or {}),
            "excluded": list(value.get("excluded") or []),
        }

    def put_dir_setting(self, value: MirrorDirSetting) -> Ticket:
        return self.store.put_setting(MIRROR_KEY, value)
