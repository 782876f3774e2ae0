"""Daemon settings an older peerdaemon kept in the data dir, read to move them into the config
file (daemon/config.py `migrate_legacy`) or, by a daemon that has none, at start.

`KEYS` are the names they were kept under (`config set mirror-dir ...` then); daemon/config.py
maps each to its key in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import Store

SETTING = "daemon-config"


KEYS = ("mirror-dir", "listen", "peers", "mdns", "mdns-interface", "max-frame")


def shown(key: str, value: Any) -> Any:
    if key == "listen" and value:
        return f"{value[0]}:{value[1]}"
    if key == "peers" and value:
        return ",".join(f"{h}:{p}" for h, p in value)
    return value


def stored(store: Store) -> dict[str, Any]:
    value = store.get_setting(SETTING)
    return value if isinstance(value, dict) else {}


def apply(config: Any, store: Store) -> None:
    """Fill `config` (a DaemonConfig) from stored settings where `run` gave no flag."""
    current = stored(store)
    if config.mirror_dir is None and current.get("mirror-dir"):
        config.mirror_dir = Path(current["mirror-dir"])
    if config.listen is None and current.get("listen"):
        host, port = current["listen"]
        config.listen = (host, int(port))
    if not config.peers and current.get("peers"):
        config.peers = [(h, int(p)) for h, p in current["peers"]]
    if current.get("mdns") is False:
        config.mdns = False
    if config.mdns_interface is None and current.get("mdns-interface"):
        config.mdns_interface = current["mdns-interface"]
    if current.get("max-frame") and config.max_frame == config.__class__.max_frame:
        config.max_frame = int(current["max-frame"])
