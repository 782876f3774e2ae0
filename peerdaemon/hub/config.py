"""The hub's settings: one TOML file, one order of precedence (docs/hub.md, "Config file").

Every key `hub serve` reads is a `Setting` of `schema()`, keyed by its dotted name in the file
(`limits.bytes_per_env` is `bytes_per_env` in `[limits]`). `load` resolves them: the command
line, then `PEERDAEMON_HUB_*` variables (and the older `PEERDAEMON_HUB_DIR`,
`PEERDAEMON_LOG_LEVEL`, `PEERDAEMON_LOG_FORMAT`), then the file, then the defaults;
`server.build_config` turns that into a `HubConfig`. `plan_reload` is the sans-I/O half of
picking up an edited file: what changed, what a running hub applies now, what waits for the
next start.

Imported by `hub config ...`, which should not pay for trio or the hub's HTTP stack: the
defaults of `HttpConfig` and `MockConfig` are written out here (tests/test_hub_config.py checks
that they agree).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.configfile import (
    ConfigFileError,
    Kind,
    Resolved,
    Schema,
    Setting,
    kinds,
    locate,
    parse_size,
    read_file,
    resolve,
)
from ..core.locations import APP_NAME
from ..core.runner import FORMAT_ENV, LEVEL_ENV, LOG_FORMATS, LOG_LEVELS
from .accounts import Limits

__all__ = [
    "CONFIG_ENV",
    "DATA_DIR_ENV",
    "FLAG_KEYS",
    "HEADER",
    "HTTP_DEFAULTS",
    "MOCK_DEFAULTS",
    "SIZE_LIMITS",
    "ConfigFileError",
    "Reload",
    "config_path",
    "default_data_dir",
    "load",
    "parse_size",
    "plan_reload",
    "schema",
    "section",
    "shown",
]

CONFIG_ENV = "PEERDAEMON_HUB_CONFIG"
DATA_DIR_ENV = "PEERDAEMON_HUB_DIR"
SIZE_LIMITS = ("bytes_per_env", "mock_body_bytes")
SWEEP_INTERVAL = 30.0
"""`store.sweep_interval`'s default: `docs.SWEEP_INTERVAL`, written out (the module's docstring)."""

# `http.HttpConfig`'s and `cloudmock.MockConfig`'s defaults (see the module's docstring)
HTTP_DEFAULTS: dict[str, Any] = {
    "max_message": 256 << 20,
    "coalesce_bytes": 1 << 20,
    "limit_bytes": 64 << 20,
    "stall_seconds": 30.0,
    "ping_interval": 30.0,
    "max_half_open": 256,
    "max_half_open_per_ip": 16,
    "max_waiting": 4096,
    "head_timeout": 10.0,
    "handshake_timeout": 10.0,
    "metrics_token": None,
}
MOCK_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "max_hosted": 200,
    "allow_hosts": [],
    "request_timeout": 30.0,
    "max_in_flight": 32,
    "max_connections": 1024,
    "faker_seed": None,
}

HEADER = """\
# The peerdaemon hub's settings (docs/hub.md, "Config file"). `peerdaemon hub config list`
# shows every key, its value and where that came from. Command-line flags win over
# PEERDAEMON_HUB_* variables, which win over this file. `peerdaemon hub config set KEY VALUE`
# edits it and keeps comments; a running hub applies [limits], [metrics] and [log] level at once.

"""


# ------------------------------------------------------------------------------------- kinds
def _token(value: Any) -> str | None:
    """`[metrics] token`: visible ASCII, no spaces (it goes in an `Authorization` header); ""
    is none."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if value and not all("!" <= c <= "~" for c in value):
        raise ValueError("must be printable ASCII without spaces")
    return value or None


SIZE = kinds.size  # "15MB" is 15 000 000 bytes, "64MiB" 64 * 2**20 (as it always was)
TOKEN = Kind("token", _token, str)


# ------------------------------------------------------------------------------------ schema
def default_data_dir() -> Path:
    """`<user data dir>/peerdaemon/hub` (`$PEERDAEMON_HUB_DIR` is the setting's variable)."""
    import platformdirs

    return platformdirs.user_data_path(APP_NAME, appauthor=False) / "hub"


def schema() -> Schema:
    """The hub's settings (a new one each time: cheap, and nothing shared to go stale)."""
    S = Setting
    limit_help = {
        "envs_per_space": "environments stored in one space",
        "bytes_per_env": "bytes one document takes in the store",
        "devices_per_user": "devices of one user connected at once",
        "hosted_mocks": "Cloud Mocks served for the spaces one user owns",
        "mock_rps": "requests per second to one Cloud Mock (429 past it)",
        "mock_body_bytes": "largest request body a Cloud Mock takes (413 past it)",
    }
    limits = [
        S(
            f"limits.{f.name}",
            SIZE if f.name in SIZE_LIMITS else kinds.integer,
            f"{limit_help.get(f.name, f.name)} (the hub's default; `hub limits set` wins)",
            default=f.default,
            live=True,
        )
        for f in fields(Limits)
    ]
    h, m = HTTP_DEFAULTS, MOCK_DEFAULTS
    settings = [
        S(
            "data_dir",
            kinds.path,
            "the hub's store and accounts",
            default=None,  # filled in by `load`: the platform's, as it always was
            env=DATA_DIR_ENV,
            flag="--data-dir",
        ),
        S(
            "listen",
            kinds.address,
            "the one port: y-websocket, daemons, /health, /metrics, Cloud Mocks",
            default=("127.0.0.1", 8765),
            flag="--listen",
        ),
        S("tls.cert", kinds.path, "serve TLS with this certificate (PEM)", flag="--tls-cert"),
        S("tls.key", kinds.path, "... and this private key (PEM)", flag="--tls-key"),
        *limits,
        S(
            "fanout.coalesce_bytes",
            SIZE,
            "a client's queued updates are merged past this",
            default=h["coalesce_bytes"],
        ),
        S(
            "fanout.limit_bytes",
            SIZE,
            "... and the client is dropped (1013 too-slow) past this",
            default=h["limit_bytes"],
        ),
        S(
            "fanout.stall_seconds",
            kinds.seconds,
            "a writer without progress this long drops its client",
            default=h["stall_seconds"],
        ),
        S(
            "fanout.ping_interval",
            kinds.seconds,
            "ping a silent client; drop one silent for twice this",
            default=h["ping_interval"],
        ),
        S(
            "fanout.max_message",
            SIZE,
            "largest websocket message accepted",
            default=h["max_message"],
        ),
        S(
            "connections.max_half_open",
            kinds.positive,
            "connections not authenticated yet, at once (one more waits for its turn)",
            default=h["max_half_open"],
        ),
        S(
            "connections.max_half_open_per_ip",
            kinds.positive,
            "... from one remote address",
            default=h["max_half_open_per_ip"],
        ),
        S(
            "connections.max_waiting",
            kinds.positive,
            "connections past those waiting for their turn (past this: 503 busy)",
            default=h["max_waiting"],
        ),
        S(
            "connections.head_timeout",
            kinds.seconds,
            "seconds to send the HTTP request head",
            default=h["head_timeout"],
        ),
        S(
            "connections.handshake_timeout",
            kinds.seconds,
            "seconds for a websocket to authenticate",
            default=h["handshake_timeout"],
        ),
        S("mock.enabled", kinds.boolean, "serve Cloud Mocks", default=m["enabled"]),
        S(
            "mock.max_hosted",
            kinds.integer,
            "Cloud Mocks on this hub in all",
            default=m["max_hosted"],
        ),
        S(
            "mock.allow_hosts",
            kinds.text_list,
            "what proxy mode and callbacks may reach (names, IPs, CIDRs, *.suffix)",
            default=list(m["allow_hosts"]),
        ),
        S(
            "mock.request_timeout",
            kinds.seconds,
            "seconds for the engine's answer (504 past it)",
            default=m["request_timeout"],
        ),
        S(
            "mock.max_in_flight",
            kinds.integer,
            "requests one Cloud Mock serves at once (503 past it)",
            default=m["max_in_flight"],
        ),
        S(
            "mock.max_connections",
            kinds.integer,
            "mock connections open at once",
            default=m["max_connections"],
        ),
        S(
            "mock.faker_seed",
            kinds.integer,
            "seed faker.js (repeatable data, as mockoon-cli --faker-seed)",
            default=m["faker_seed"],
        ),
        S(
            "store.compact_count",
            kinds.integer,
            "updates logged for a document before it is compacted",
            default=1000,
        ),
        S(
            "store.compact_bytes",
            SIZE,
            "bytes logged for a document before it is compacted",
            default=8 << 20,
        ),
        S(
            "store.sweep_interval",
            kinds.seconds,
            "seconds between idle checkpoints: a document unused for two is dropped from memory",
            default=SWEEP_INTERVAL,
        ),
        S(
            "cluster.redis",
            kinds.text,
            "scaled mode: this process joins a cluster whose rooms move through this Redis"
            " (redis://HOST:PORT/DB, rediss:// with TLS; a Redis Cluster:"
            " redis+cluster://HOST:PORT, any one node, or rediss+cluster://; with"
            " cluster.postgres)",
            flag="--redis",
        ),
        S(
            "cluster.postgres",
            kinds.text,
            "scaled mode: documents and accounts in this PostgreSQL (a libpq DSN or"
            " postgresql:// URL; keep its password in ~/.pgpass or $PGPASSFILE, not here)",
            flag="--postgres",
        ),
        S(
            "metrics.token",
            TOKEN,
            "GET /metrics needs `Authorization: Bearer TOKEN` (unset: loopback only)",
            live=True,
        ),
        S(
            "log.level",
            kinds.choice(*LOG_LEVELS),
            "least severe messages logged",
            default="info",
            live=True,
            env=LEVEL_ENV,
            flag="--log-level",
        ),
        S(
            "log.format",
            kinds.choice(*LOG_FORMATS),
            "text lines, or one JSON object per line",
            default="text",
            env=FORMAT_ENV,
            flag="--log-format",
        ),
    ]
    return Schema(settings, env_prefix="PEERDAEMON_HUB_", list_command="peerdaemon hub config list")


FLAG_KEYS = (
    "data_dir",
    "listen",
    "tls.cert",
    "tls.key",
    "cluster.redis",
    "cluster.postgres",
    "log.level",
    "log.format",
)
"""The settings `hub serve` takes on its command line (what a reload keeps on top)."""


# ---------------------------------------------------------------------------------- the file
def config_path(
    explicit: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Path, bool]:
    """The config file and whether it must exist: `--config` (must), else
    `$PEERDAEMON_HUB_CONFIG`, else `hub.toml` in the platform's config dir
    (~/.config/peerdaemon on Linux), read only if it is there."""
    return locate(explicit, CONFIG_ENV, "hub.toml", environ)


def load(
    path: Path | None,
    *,
    required: bool = False,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    settings: Schema | None = None,
) -> Resolved:
    """Every setting resolved (ConfigFileError: one line naming the file, line and key, or the
    variable); data_dir's default filled in."""
    settings = settings or schema()
    file = read_file(settings, path, required=required)
    resolved = resolve(settings, file, flags=flags, environ=environ)
    if resolved.values["data_dir"] is None:
        resolved.values["data_dir"] = default_data_dir()
    return resolved


def section(values: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`{field: value}` of the keys in `[name]`."""
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}


def shown(settings: Schema, key: str, value: Any) -> Any:
    """A program value as `hub config` shows it (JSON-friendly: paths and addresses as text)."""
    if value is None:
        return None
    return settings.by_key[key].kind.show(value)


# ------------------------------------------------------------------------------------ reload
@dataclass
class Reload:
    """What a re-read file changes: `live` to apply now, `pending` waiting for the next start
    (key -> new value each), and the file's warnings."""

    live: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def plan_reload(running: Resolved, new: Resolved, settings: Schema | None = None) -> Reload:
    """Compare what the hub runs with (`running`) with the settings now resolved. A key that a
    flag or a variable sets does not change with the file (`resolve` keeps them on top)."""
    settings = settings or schema()
    plan = Reload(warnings=list(new.file.warnings))
    for setting in settings.settings:
        key = setting.key
        if new.values.get(key) == running.values.get(key):
            continue
        if setting.live:
            plan.live[key] = new.values.get(key)
        else:
            plan.pending[key] = new.values.get(key)
    return plan
