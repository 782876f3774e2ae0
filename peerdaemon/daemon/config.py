"""The daemon's settings: one TOML file, one order of precedence (docs/config.md).

Every setting the daemon has is a `Setting` of `SCHEMA`, keyed by its dotted name in the file
(`lan.listen` is `listen` in `[lan]`). `load` resolves them: `run`'s flags, then `PEERDAEMON_*`
variables, then the file, then the defaults; `daemon_config` turns that into the supervisor's
`DaemonConfig`. `plan_reload` is the sans-I/O half of picking up an edited file: what changed,
which of it a running daemon applies (`live`), and what waits for the next start.

Imported by every CLI command that finds the socket (it may be set in the file), so it loads no
trio and no service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.configfile import (
    ConfigFileError,
    Kind,
    Resolved,
    Schema,
    Setting,
    kinds,
    locate,
    read_file,
    resolve,
    set_value,
)
from ..core.locations import default_data_dir, default_socket_path
from ..core.runner import LOG_FORMATS, LOG_LEVELS

if TYPE_CHECKING:
    from ..peer import PeerConfig

__all__ = [
    "CONFIG_ENV",
    "HEADER",
    "HISTORY_KEYS",
    "SCHEMA",
    "ConfigFileError",
    "DaemonConfig",
    "PEER_DEFAULTS",
    "Reload",
    "config_path",
    "daemon_config",
    "load",
    "migrate_legacy",
    "plan_reload",
    "shown",
]

CONFIG_ENV = "PEERDAEMON_CONFIG"
DEFAULT_MAX_FRAME = 64 << 20
DEFAULT_STATUS_LISTEN = ("127.0.0.1", 7611)
# PeerConfig's defaults, written out so that a CLI command finding its socket does not load the
# peer core (tests/test_config.py checks they agree)
PEER_DEFAULTS = {
    "max_message": 256 << 20,
    "max_queued": 64 << 20,
    "max_half_open": 64,
    "max_half_open_per_ip": 8,
}


# -- history (core/history.py, docs/history.md) ---------------------------------------------
def _share(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError("must be a share between 0 and 1 (0.5: half)")
    return float(value)


def _days(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError("must be a number of days > 0")
    return float(value)


def _number_text(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError("must be a number") from None


def _idle_seconds(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise ValueError("must be a number of seconds >= 0 (0: never)")
    if value == float("inf"):
        raise ValueError("must be a number of seconds (0: never)")
    return float(value)


def _seconds_text(text: str) -> float:
    try:
        return float(text.strip().removesuffix("s"))
    except ValueError:
        raise ValueError("must be a number of seconds") from None


DEFAULT_EVICT_AFTER = 60.0
DEFAULT_EVICT_SWEEPS = 2

HISTORY_KEYS = (
    "history.enabled",
    "history.interval",
    "history.keep_days",
    "history.keep_count",
    "history.put_threshold",
    "history.trash_days",
)

S = Setting
SCHEMA = Schema(
    [
        S(
            "name",
            kinds.text,
            "this device's name, as the members of its spaces see it",
            live=True,
            flag="--name",
        ),
        S(
            "display_name",
            kinds.text,
            "your name in presence (who edits what), as others see it (unset: the device name)",
            live=True,
        ),
        S(
            "data_dir",
            kinds.path,
            "where environments, spaces and keys are stored",
            default=None,
            flag="--data-dir",
        ),
        S("socket", kinds.path, "the local socket (editors, the CLI)", flag="--socket"),
        S(
            "mirror_dir",
            kinds.path,
            "mirror every environment into this folder, one file each",
            flag="--mirror-dir",
        ),
        S(
            "lan.listen",
            kinds.address,
            "accept LAN peers on HOST:PORT (unset: no listener)",
            flag="--listen",
        ),
        S(
            "lan.peers",
            kinds.addresses,
            "static peers to dial, HOST:PORT each",
            default=[],
            live=True,
            flag="--peer",
        ),
        S(
            "lan.mdns",
            kinds.boolean,
            "find peers with mDNS (needs lan.listen)",
            default=True,
            flag="--no-mdns",
        ),
        S(
            "lan.mdns_interface",
            kinds.text,
            "run mDNS on this interface only",
            flag="--mdns-interface",
        ),
        S(
            "limits.max_frame",
            kinds.minimum_size(1024),
            "largest local socket frame accepted",
            default=DEFAULT_MAX_FRAME,
            flag="--max-frame",
        ),
        S(
            "limits.max_message",
            kinds.minimum_size(1 << 20),
            "largest message a peer or hub may send (a first sync of a big environment is one)",
            default=PEER_DEFAULTS["max_message"],
        ),
        S(
            "limits.max_queued",
            kinds.minimum_size(1 << 20),
            "bytes queued for a slow peer before its link is closed",
            default=PEER_DEFAULTS["max_queued"],
        ),
        S(
            "limits.max_half_open",
            kinds.positive,
            "incoming connections still in their handshake, at most",
            default=PEER_DEFAULTS["max_half_open"],
        ),
        S(
            "limits.max_half_open_per_ip",
            kinds.positive,
            "the same, per remote address",
            default=PEER_DEFAULTS["max_half_open_per_ip"],
        ),
        S(
            "store.compact_count",
            kinds.positive,
            "updates logged for an environment before it is compacted into a snapshot",
            default=1000,
        ),
        S(
            "store.compact_bytes",
            kinds.minimum_size(1024),
            "bytes logged for an environment before it is compacted",
            default=8 << 20,
        ),
        S(
            "store.evict_after",
            Kind("seconds", _idle_seconds, _seconds_text),
            "seconds an environment's document stays in memory unused (0: every one stays)",
            default=DEFAULT_EVICT_AFTER,
            live=True,
        ),
        S(
            "store.evict_sweeps",
            kinds.positive,
            "sweeps for unused documents per store.evict_after (an unused one goes after as"
            " many sweeps in a row)",
            default=DEFAULT_EVICT_SWEEPS,
            live=True,
        ),
        S(
            "history.enabled",
            kinds.boolean,
            "keep versions of environments (the trash is kept either way)",
            default=True,
            live=True,
        ),
        S(
            "history.interval",
            kinds.seconds,
            "seconds of changes to an environment per version",
            default=300.0,
            live=True,
        ),
        S(
            "history.keep_days",
            Kind("days", _days, _number_text),
            "versions older than this many days are pruned (the newest stays)",
            default=90.0,
            live=True,
        ),
        S(
            "history.keep_count",
            kinds.positive,
            "versions kept per environment, at most",
            default=200,
            live=True,
        ),
        S(
            "history.put_threshold",
            Kind("share", _share, _number_text),
            "a whole-environment write removing more than this share of its entities is"
            " preceded by a version",
            default=0.5,
            live=True,
        ),
        S(
            "history.trash_days",
            Kind("days", _days, _number_text),
            "days a deleted environment stays in the trash",
            default=30.0,
            live=True,
        ),
        S(
            "mock.faker_seed",
            kinds.integer,
            "seed faker.js in served mocks (repeatable data, as mockoon-cli --faker-seed)",
            flag="--mock-faker-seed",
        ),
        S(
            "status.enabled",
            kinds.boolean,
            "serve the local status page",
            default=True,
            live=True,
            flag="--no-status",
        ),
        S(
            "status.listen",
            kinds.address,
            "the status page's address (off loopback only with TLS)",
            default=DEFAULT_STATUS_LISTEN,
            live=True,
            flag="--status-listen",
        ),
        S(
            "status.tls_cert",
            kinds.path,
            "the status page's TLS certificate",
            live=True,
            flag="--status-tls-cert",
        ),
        S(
            "status.tls_key",
            kinds.path,
            "the certificate's private key",
            live=True,
            flag="--status-tls-key",
        ),
        S(
            "status.hosts",
            kinds.text_list,
            "Host names the status page answers to besides localhost",
            default=[],
            live=True,
            flag="--status-host",
        ),
        S(
            "log.level",
            kinds.choice(*LOG_LEVELS),
            "least severe messages logged",
            default="info",
            live=True,
            flag="--log-level",
        ),
        S(
            "log.format",
            kinds.choice(*LOG_FORMATS),
            "text lines, or one JSON object per line",
            default="text",
            flag="--log-format",
        ),
    ],
    env_prefix="PEERDAEMON_",
    # the names `config set` took when settings lived in the data dir
    aliases={
        "mirror-dir": "mirror_dir",
        "listen": "lan.listen",
        "peers": "lan.peers",
        "mdns": "lan.mdns",
        "mdns-interface": "lan.mdns_interface",
        "max-frame": "limits.max_frame",
    },
)
del S

HEADER = """\
# peerdaemon's settings. `peerdaemon config list` shows every key, its value and where that
# came from; docs/config.md describes each. Command-line flags win over PEERDAEMON_* variables,
# which win over this file. `peerdaemon config set KEY VALUE` edits it and keeps comments.

"""


def config_path(explicit: str | os.PathLike[str] | None = None) -> tuple[Path, bool]:
    """The config file and whether it must exist: `--config` (must), else `$PEERDAEMON_CONFIG`,
    else `config.toml` in the platform's config dir (~/.config/peerdaemon on Linux)."""
    return locate(explicit, CONFIG_ENV, "config.toml")


def load(
    path: Path | None,
    *,
    required: bool = False,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Every setting resolved; the defaults of data_dir and socket filled in (they depend on
    the environment, as they always have)."""
    file = read_file(SCHEMA, path, required=required)
    resolved = resolve(SCHEMA, file, flags=flags, environ=environ)
    if resolved.values["data_dir"] is None:
        resolved.values["data_dir"] = default_data_dir()
    if resolved.values["socket"] is None:
        resolved.values["socket"] = default_socket_path()
    return resolved


def shown(key: str, value: Any) -> Any:
    """A program value as `config list` and the socket show it (JSON-friendly)."""
    if value is None:
        return None
    return SCHEMA.by_key[key].kind.show(value)


@dataclass
class DaemonConfig:
    data_dir: Path
    socket_path: Path
    max_frame: int = DEFAULT_MAX_FRAME
    compact_count: int = 1000
    compact_bytes: int = 8 << 20
    # documents in memory (core/residency.py): unused ones go after this long (0: never), found
    # by this many sweeps in that time
    evict_after: float = DEFAULT_EVICT_AFTER
    evict_sweeps: int = DEFAULT_EVICT_SWEEPS
    name: str | None = None  # this device's display name (`run --name`); kept once given
    mirror_dir: Path | None = None
    listen: tuple[str, int] | None = None  # LAN peers: `run --listen HOST:PORT`; None: no listener
    peers: list[tuple[str, int]] = field(default_factory=list)  # static peers (`--peer`)
    mdns: bool = True  # discovery runs only with a listener, and never when PEERDAEMON_NO_MDNS=1
    mdns_interface: str | None = None
    peer_config: PeerConfig | None = None  # limits and timers of peer links (tests, benchmarks)
    mock_faker_seed: int | None = None  # `run --mock-faker-seed`: faker.js repeatable in mocks
    # the status page (docs/status-page.md): on for `run` (`--no-status`: off); off by default
    # here so that daemons embedded in tests and benchmarks do not contend for its fixed port
    status: bool = False
    status_listen: tuple[str, int] = DEFAULT_STATUS_LISTEN  # `run --status-listen HOST:PORT`
    status_tls_cert: Path | None = None  # required (with the key) off loopback
    status_tls_key: Path | None = None
    status_hosts: list[str] = field(default_factory=list)  # more Host names the page answers to
    # where the settings came from (`run`): the file the daemon watches, and what it resolved,
    # with the flags and environment it was started with (a reload keeps them on top)
    config_file: Path | None = None
    settings: Resolved | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    environ: dict[str, str] | None = None
    extra: dict[str, object] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)  # `history.*` (HISTORY_KEYS) set


def daemon_config(resolved: Resolved, **extra: Any) -> DaemonConfig:
    """The supervisor's config from resolved settings."""
    from ..peer import PeerConfig

    v = resolved.values
    limits = {name: v[f"limits.{name}"] for name in PEER_DEFAULTS}
    peer = PeerConfig(**limits)
    return DaemonConfig(
        data_dir=Path(v["data_dir"]),
        socket_path=Path(v["socket"]),
        max_frame=v["limits.max_frame"],
        compact_count=v["store.compact_count"],
        compact_bytes=v["store.compact_bytes"],
        evict_after=v["store.evict_after"],
        evict_sweeps=v["store.evict_sweeps"],
        name=v["name"],
        mirror_dir=v["mirror_dir"].absolute() if v["mirror_dir"] else None,
        listen=v["lan.listen"],
        peers=list(v["lan.peers"]),
        mdns=v["lan.mdns"],
        mdns_interface=v["lan.mdns_interface"],
        peer_config=None if limits == PEER_DEFAULTS else peer,
        mock_faker_seed=v["mock.faker_seed"],
        status=v["status.enabled"],
        status_listen=v["status.listen"],
        status_tls_cert=v["status.tls_cert"].absolute() if v["status.tls_cert"] else None,
        status_tls_key=v["status.tls_key"].absolute() if v["status.tls_key"] else None,
        status_hosts=list(v["status.hosts"]),
        history={key: v[key] for key in HISTORY_KEYS},
        config_file=resolved.file.path,
        settings=resolved,
        **extra,
    )


@dataclass
class Reload:
    """What a re-read file changes: `live` to apply now (key -> new value), `pending` waiting
    for the next start (key -> new value), `reverted` pending keys set back to what runs."""

    live: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def plan_reload(running: Resolved, new: Resolved) -> Reload:
    """Compare what the daemon runs with (`running`) with the settings now resolved."""
    plan = Reload(warnings=list(new.file.warnings))
    for setting in SCHEMA.settings:
        key = setting.key
        if new.values[key] == running.values[key]:
            continue
        if setting.live:
            plan.live[key] = new.values[key]
        else:
            plan.pending[key] = new.values[key]
    return plan


def migrate_legacy(config: DaemonConfig, store: Any) -> None:
    """Settings an older daemon kept in the data dir (`core/settings.py`) move into the config
    file, once: a key the file sets already stays as the file says. A daemon without a file
    (embedded) or one that cannot write it reads them as before."""
    import logging
    from dataclasses import fields

    from ..core import settings as legacy

    old = legacy.stored(store)
    if not old:
        return
    path = config.config_file
    if path is None:
        legacy.apply(config, store)
        return
    log = logging.getLogger("peerdaemon.config")
    try:
        present = read_file(SCHEMA, path).values
        moved = []
        for old_key, value in old.items():
            key = SCHEMA.aliases.get(old_key)
            if key is None or key in present or value is None:
                continue
            shown_value = legacy.shown(old_key, value)
            if isinstance(shown_value, bool):
                shown_value = "on" if shown_value else "off"
            set_value(SCHEMA, path, key, str(shown_value), header=HEADER)
            moved.append(key)
    except ConfigFileError as exc:
        log.warning("settings kept in the data dir not moved to the config file: %s", exc)
        legacy.apply(config, store)
        return
    store.put_setting(legacy.SETTING, {})
    if moved:
        log.info("settings moved from the data dir to %s: %s", path, ", ".join(moved))
    fresh = daemon_config(
        load(path, flags=config.flags, environ=config.environ),
        flags=config.flags,
        environ=config.environ,
        extra=config.extra,
    )
    for f in fields(DaemonConfig):
        if f.name not in ("data_dir", "socket_path"):
            setattr(config, f.name, getattr(fresh, f.name))
