"""Daemon settings kept in the data dir (`peerdaemon config set KEY VALUE`), read at start.

The issue asks for `--mirror-dir` and `--peer` "also in config": a daemon installed as a service
is started with no flags, so what a user configured once must live beside the data. Flags given
to `run` win over these; a change takes effect at the next start (except `name`, which is live).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import Store, Ticket
from .addresses import parse_address

SETTING = "daemon-config"


class SettingError(ValueError):
    pass


def _host_port(text: str) -> list[Any]:
    try:
        return list(parse_address(text, any_port=True))
    except ValueError as exc:
        raise SettingError(str(exc)) from None


def _parse(key: str, value: str) -> Any:
    """The stored form of a setting given as text; "" clears it."""
    if value == "":
        return None
    if key == "mirror-dir":
        return str(Path(value).expanduser().absolute())
    if key == "listen":
        return _host_port(value)
    if key == "peers":
        return [_host_port(v) for v in value.split(",") if v.strip()]
    if key == "mdns":
        if value.lower() in ("on", "true", "yes", "1"):
            return True
        if value.lower() in ("off", "false", "no", "0"):
            return False
        raise SettingError("mdns is on or off")
    if key == "mdns-interface":
        return value
    if key == "max-frame":
        if not value.isdigit() or int(value) < 1024:
            raise SettingError("max-frame is a number of bytes, at least 1024")
        return int(value)
    raise SettingError(f"unknown setting {key!r} (known: name, {', '.join(KEYS)})")


KEYS = ("mirror-dir", "listen", "peers", "mdns", "mdns-interface", "max-frame")


def _shown(key: str, value: Any) -> Any:
    if key == "listen" and value:
        return f"{value[0]}:{value[1]}"
    if key == "peers" and value:
        return ",".join(f"{h}:{p}" for h, p in value)
    return value


def stored(store: Store) -> dict[str, Any]:
    value = store.get_setting(SETTING)
    return value if isinstance(value, dict) else {}


def get_all(store: Store) -> dict[str, Any]:
    """Every setting as `config get` shows it (None: not set)."""
    current = stored(store)
    return {key: _shown(key, current.get(key)) for key in KEYS}


def set_one(store: Store, key: str, value: Any) -> Ticket:
    if not isinstance(value, str):
        raise SettingError('the value is text ("" clears it)')
    current = dict(stored(store))
    parsed = _parse(key, value)
    if parsed is None:
        current.pop(key, None)
    else:
        current[key] = parsed
    return store.put_setting(SETTING, current)


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
