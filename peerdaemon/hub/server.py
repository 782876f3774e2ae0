"""`peerdaemon hub serve`: the hub's supervisor, like the daemon's (daemon/supervisor.py).

One nursery: the store writer first (every relay waits on it), then the HubDocs relay, the
peer endpoint (if it has a background task), the accounts watcher, and the listener. SIGTERM
or SIGINT: every client is told `1001 shutdown`, the nursery is cancelled, and the store
writer commits what is still queued before the process exits.

The wiring: HubDocs relays durable updates to the rooms (`rooms.on_update`) and, after each
batch, to the `/yjs` endpoint (`yjs.flush`: the rooms send, the endpoint wakes the writers);
accounts changes re-check live connections (`yjs.revalidate`).

The daemons' protocol (`/peer`) plugs in through `HubConfig.peer_endpoint`, a factory
`(hub_docs, accounts, events) -> PeerHandler`, by default `peerdaemon.hub.peers.
create_peer_endpoint`.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import sqlite3
import ssl
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import cbor2
import platformdirs
import trio

from .. import __version__
from ..core.addresses import parse_address
from ..core.events import EventLog
from ..core.heap import release_free_heap
from ..core.identity import SETTING, Identity, load_or_create_identity
from ..core.runner import run_process
from ..store import DB_NAME, Store, StoreError
from ..store.errors import StoreLockedError
from ..store.lock import LOCK_NAME
from .accounts import Accounts, Limits
from .docs import HubDocs
from .http import HttpConfig, HubHttp
from .mockproxy import MockProxy
from .mocks import HostedMocks, MockConfig
from .peer_socket import PeerHandler
from .peers import create_peer_endpoint
from .wsconn import ws_frame
from .yjs import YjsEndpoint
from .ywebsocket import CLOSE_CODES, Rooms

__all__ = [
    "DEFAULT_LISTEN",
    "ConfigError",
    "HubConfig",
    "HubServer",
    "PeerHandlerFactory",
    "build_config",
    "default_hub_dir",
    "hub_key_of",
    "hub_status",
    "parse_listen",
    "parse_size",
    "run_hub",
    "serve_hub",
]

log = logging.getLogger("peerdaemon.hub")

DEFAULT_LISTEN = ("127.0.0.1", 8765)
SHUTDOWN_GRACE = 1.0

PeerHandlerFactory = Callable[[HubDocs, Accounts, EventLog], PeerHandler]


class ConfigError(Exception):
    """A bad `--config` file or option (reported in one line, exit status 1)."""


def default_hub_dir() -> Path:
    """`$PEERDAEMON_HUB_DIR`, else `<user data dir>/peerdaemon/hub`."""
    env = os.environ.get("PEERDAEMON_HUB_DIR")
    if env:
        return Path(env).expanduser()
    return platformdirs.user_data_path("peerdaemon", appauthor=False) / "hub"


@dataclass
class HubConfig:
    data_dir: Path
    listen: tuple[str, int] = DEFAULT_LISTEN
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)  # hub defaults; `hub limits set` overrides
    http: HttpConfig = field(default_factory=HttpConfig)
    compact_count: int = 1000
    compact_bytes: int = 8 << 20
    accounts_poll: float = 1.0  # how often admin commands' changes are picked up
    peer_endpoint: PeerHandlerFactory | None = None
    mock: MockConfig = field(default_factory=MockConfig)  # the Cloud Mock (`[mock]`)


@dataclass
class HubServer:
    """A running hub, as `serve_hub` reports it (for tests and the peer endpoint's owner)."""

    config: HubConfig
    store: Store
    docs: HubDocs
    accounts: Accounts
    events: EventLog
    rooms: Rooms
    http: HubHttp
    peer_endpoint: PeerHandler
    host: str
    port: int
    mocks: HostedMocks | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.tls_cert else "ws"
        return f"{scheme}://{self.host}:{self.port}"

    def close_clients(self, code: int = CLOSE_CODES["shutdown"], reason: str = "shutdown") -> None:
        self.http.yjs.close_all(code, reason)


async def serve_hub(
    config: HubConfig, *, task_status: trio.TaskStatus[HubServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the hub until cancelled; `task_status.started(HubServer)` once it listens."""
    started = time.monotonic()
    ssl_context = _ssl_context(config) if config.tls_cert else None
    store = Store.open(
        config.data_dir, compact_count=config.compact_count, compact_bytes=config.compact_bytes
    )
    accounts = None
    try:
        accounts = Accounts.open(config.data_dir, defaults=config.limits)
        events = EventLog()
        docs = HubDocs(
            store,
            events,
            limits=accounts.space_limits,
            compact_count=config.compact_count,
            compact_bytes=config.compact_bytes,
        )
        count = docs.load()
        rooms = Rooms(docs, framer=ws_frame)
        yjs = YjsEndpoint(rooms, docs, accounts, events=events)
        docs.add_listener(rooms.on_update)
        docs.add_flush_listener(yjs.flush)
        accounts.add_change_listener(yjs.revalidate)
        factory = config.peer_endpoint or create_peer_endpoint
        endpoint = factory(docs, accounts, events)
        mocks = HostedMocks(docs, accounts, events, config.data_dir, config.mock)
        http = HubHttp(
            yjs,
            endpoint,
            config=config.http,
            version=__version__,
            stats=lambda: {"documents": docs.stats()["documents"], "mocks": len(mocks.hosted)},
            mocks=MockProxy(mocks, tls=ssl_context is not None) if config.mock.enabled else None,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(docs.run)
            run = getattr(endpoint, "run", None)
            if run is not None:
                await nursery.start(run)
            nursery.start_soon(_watch_accounts, accounts, config.accounts_poll)
            if config.mock.enabled:
                await nursery.start(mocks.run)  # serves nothing until a space asks for it
            nursery.start_soon(release_free_heap)  # bursts of connections leave free heap
            host, port = config.listen
            try:
                listeners: list[Any] = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            bound = listeners[0].socket.getsockname()[1]
            if ssl_context is not None:
                listeners = [trio.SSLListener(lis, ssl_context) for lis in listeners]
            nursery.start_soon(partial(trio.serve_listeners, http.handle, listeners))
            server = HubServer(
                config, store, docs, accounts, events, rooms, http, endpoint, host, bound, mocks
            )
            events.emit(
                "hub-started",
                documents=count,
                port=bound,
                startup_seconds=round(time.monotonic() - started, 4),
            )
            log.info(
                "hub listening on %s:%d (%s), %d documents, data %s",
                host,
                bound,
                "TLS" if ssl_context else "no TLS",
                count,
                config.data_dir,
            )
            key = hub_key_of(endpoint)
            if key is not None:
                # what daemons check the hub by: `space hub ... --hub-key KEY` (docs/hublink.md)
                log.info("hub key fingerprint: %s", key)
            task_status.started(server)
    finally:
        if accounts is not None:
            accounts.close()
        store.close()


def hub_key_of(endpoint: object) -> str | None:
    """The key fingerprint daemons see in the hub's hello (its device id), if the `/peer`
    endpoint has an identity."""
    identity = getattr(endpoint, "identity", None)
    device = getattr(identity, "device_id", None)
    return device if isinstance(device, str) else None


def hub_status(data_dir: Path) -> dict[str, Any]:
    """`peerdaemon hub status`: the hub's key fingerprint, read from its data dir, and whether a
    hub runs on it.

    The key is the one `hub serve` keeps in its store (`peers.PeerEndpoint`); if no hub ever
    ran on the dir, it is created now, so an admin can hand the fingerprint out before the
    first start. A running hub holds the store's lock: its settings are then read from the database file
    without the lock (read-only; SQLite's WAL lets a reader beside the writer)."""
    data_dir = Path(data_dir)
    try:
        store = Store.open(data_dir)
    except StoreLockedError:
        return {
            "data_dir": str(data_dir),
            "running": True,
            "pid": _lock_holder(data_dir),
            "hub_key": _read_key(data_dir),
        }
    try:
        identity = load_or_create_identity(store, "hub")
    finally:
        store.close()  # commits a new identity
    return {"data_dir": str(data_dir), "running": False, "pid": None, "hub_key": identity.device_id}


def _read_key(data_dir: Path) -> str | None:
    uri = (data_dir / DB_NAME).absolute().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (SETTING,)).fetchone()
        finally:
            db.close()
        saved = cbor2.loads(row[0]) if row is not None else None
    except (sqlite3.Error, ValueError, cbor2.CBORDecodeError) as exc:
        raise StoreError(f"cannot read the hub's key in {data_dir}: {exc}") from None
    raw = saved.get("private_key") if isinstance(saved, dict) else None
    if not (isinstance(raw, bytes) and len(raw) == 32):
        return None
    return Identity.from_private_bytes(raw, "hub").device_id


def _lock_holder(data_dir: Path) -> int | None:
    try:
        first = (data_dir / LOCK_NAME).read_text(encoding="ascii").split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None


async def _watch_accounts(accounts: Accounts, poll: float) -> None:
    """Pick up admin commands' changes (revoked tokens, members) from the shared file."""
    while True:
        await trio.sleep(poll)
        try:
            accounts.refresh()
        except sqlite3.Error:
            log.exception("hub: cannot read the accounts file")


def _ssl_context(config: HubConfig) -> ssl.SSLContext:
    if not config.tls_key:
        raise ConfigError("--tls-cert needs --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from None
    return ctx


# ------------------------------------------------------------------------------- config file
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]i?b|b)?\s*", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}


def parse_size(value: object) -> int:
    """An int, or a string like "15MB" / "64MiB" -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must be >= 0")
        return value
    m = _SIZE_RE.fullmatch(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (e.g. 1000, 15MB, 64MiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def parse_listen(text: str) -> tuple[str, int]:
    return parse_address(str(text), any_port=True)


_TOP_KEYS = {"listen", "data_dir", "tls", "limits", "fanout", "connections", "store", "mock"}
SIZE_LIMITS = ("bytes_per_env", "mock_body_bytes")


def build_config(
    *,
    config_file: Path | None = None,
    data_dir: Path | None = None,
    listen: tuple[str, int] | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> HubConfig:
    """The config file (TOML, docs/hub.md) overlaid by command-line options."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if config_file is not None:
        try:
            raw = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {config_file}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file}: {exc}") from None
        base = Path(config_file).expanduser().resolve().parent
    where = str(config_file)
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")

    def path_of(value: object) -> Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else base / p

    config = HubConfig(data_dir=default_hub_dir())
    try:
        if "data_dir" in raw:
            config.data_dir = path_of(raw["data_dir"])
        if "listen" in raw:
            config.listen = parse_listen(raw["listen"])
        tls = _table(raw, "tls", {"cert", "key"}, where)
        if "cert" in tls:
            config.tls_cert = path_of(tls["cert"])
        if "key" in tls:
            config.tls_key = path_of(tls["key"])
        limits = _table(raw, "limits", {f.name for f in fields(Limits)}, where)
        config.limits = replace(
            config.limits,
            **{k: parse_size(v) if k in SIZE_LIMITS else _int(v, k) for k, v in limits.items()},
        )
        fanout = _table(
            raw,
            "fanout",
            {"coalesce_bytes", "limit_bytes", "stall_seconds", "ping_interval", "max_message"},
            where,
        )
        for key, value in fanout.items():
            seconds = key in ("stall_seconds", "ping_interval")
            parsed = float(value) if seconds else parse_size(value)
            setattr(config.http, key, parsed)
        connections = _table(
            raw,
            "connections",
            {"max_half_open", "max_half_open_per_ip", "head_timeout", "handshake_timeout"},
            where,
        )
        for key, value in connections.items():
            if key.endswith("_timeout"):
                setattr(config.http, key, _seconds(value, key))
            elif _int(value, key) < 1:
                raise ValueError(f"{key} must be at least 1")
            else:
                setattr(config.http, key, value)
        mock = _table(
            raw,
            "mock",
            {
                "enabled",
                "max_hosted",
                "allow_hosts",
                "request_timeout",
                "max_in_flight",
                "max_connections",
                "faker_seed",
            },
            where,
        )
        for key, value in mock.items():
            if key == "enabled":
                if not isinstance(value, bool):
                    raise ValueError("[mock] enabled must be true or false")
                config.mock.enabled = value
            elif key == "allow_hosts":
                if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
                    raise ValueError("[mock] allow_hosts must be a list of host names")
                config.mock.allow_hosts = list(value)
            elif key == "request_timeout":
                config.mock.request_timeout = _seconds(value, key)
            else:
                setattr(config.mock, key, _int(value, key))
        store = _table(raw, "store", {"compact_count", "compact_bytes"}, where)
        if "compact_count" in store:
            config.compact_count = _int(store["compact_count"], "compact_count")
        if "compact_bytes" in store:
            config.compact_bytes = parse_size(store["compact_bytes"])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if data_dir is not None:
        config.data_dir = Path(data_dir).expanduser()
    if listen is not None:
        config.listen = listen
    if tls_cert is not None:
        config.tls_cert = Path(tls_cert).expanduser()
    if tls_key is not None:
        config.tls_key = Path(tls_key).expanduser()
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    return config


def _table(raw: dict[str, Any], name: str, keys: set[str], where: str) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    unknown = set(table) - keys
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    return table


def _seconds(value: object, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0")
    return float(value)


def _int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0")
    return value


# ------------------------------------------------------------------------------------ process
async def _main(config: HubConfig) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            server: HubServer = await nursery.start(serve_hub, config)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                server.close_clients()
                with trio.move_on_after(SHUTDOWN_GRACE):
                    while server.rooms.clients:
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
                break


def run_hub(config: HubConfig) -> int:
    """`peerdaemon hub serve`: returns the process exit code."""
    # Fewer cyclic-GC passes: the hub holds many long-lived objects (connections, rooms,
    # documents), and frequent collections that walk them all show up as fan-out delays.
    gc.set_threshold(50_000, 20, 20)
    gc.freeze()
    return run_process(
        _main,
        config,
        expected=(StoreError, OSError, ConfigError, sqlite3.Error),
        stopped="hub stopped",
    )
