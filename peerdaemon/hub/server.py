"""`peerdaemon hub serve`: the hub's supervisor, like the daemon's (daemon/supervisor.py).

One nursery: the store writer first (every relay waits on it), then the HubDocs relay, the
peer endpoint (if it has a background task), the accounts watcher, and the listener. SIGTERM
or SIGINT: every client is told `1001 shutdown`, the nursery is cancelled, and the store
writer commits what is still queued before the process exits. SIGHUP, or an edit of the config
file (`ConfigWatcher`), re-reads it: the log level, the metrics token and the default limits
apply at once, the rest at the next start (hub/config.py).

The wiring: HubDocs relays applied updates to the rooms (`rooms.on_update`) and, after each
batch, to the `/yjs` endpoint (`yjs.flush`: the rooms send, the endpoint wakes the writers);
accounts changes re-check live connections (`yjs.revalidate`).

The daemons' protocol (`/peer`) plugs in through `HubConfig.peer_endpoint`, a factory
`(hub_docs, accounts, events) -> PeerHandler`, by default `peerdaemon.hub.peers.
create_peer_endpoint`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sqlite3
import ssl
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2
import trio

from .. import __version__
from ..core.addresses import parse_address
from ..core.configfile import ConfigFileError, Resolved
from ..core.events import EventLog
from ..core.files import replace_file
from ..core.heap import release_free_heap
from ..core.identity import SETTING, Identity, load_or_create_identity
from ..core.runner import run_process
from ..store import DB_NAME, Store, StoreError
from ..store.errors import StoreLockedError
from ..store.lock import LOCK_NAME
from . import config as hubconfig
from .accounts import Accounts, Limits
from .cloudmock import CloudMock, MockConfig, MockDoor
from .config import SIZE_LIMITS, parse_size
from .docs import HubDocs
from .http import HttpConfig, HubHttp
from .metrics import EventCounts, Histogram, parse
from .peers import create_peer_endpoint
from .removals import Removals
from .wsconn import ws_frame
from .yjs import YjsEndpoint
from .ywebsocket import CLOSE_CODES, Rooms

if TYPE_CHECKING:
    from .peer_socket import PeerHandler  # (loads the peer protocol: with the first daemon)

__all__ = [
    "DEFAULT_LISTEN",
    "SIZE_LIMITS",
    "ConfigError",
    "ConfigWatcher",
    "HubConfig",
    "HubServer",
    "PeerHandlerFactory",
    "build_config",
    "default_hub_dir",
    "hub_config",
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
RUNTIME_NAME = "hub-serve.json"
"""In the data dir while a hub serves: its pid and the address it listens on (`hub status`)."""

PeerHandlerFactory = Callable[[HubDocs, Accounts, EventLog], "PeerHandler"]


class ConfigError(Exception):
    """A bad `--config` file or option (reported in one line, exit status 1)."""


def default_hub_dir() -> Path:
    """`$PEERDAEMON_HUB_DIR`, else `<user data dir>/peerdaemon/hub`."""
    env = os.environ.get(hubconfig.DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return hubconfig.default_data_dir()


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
    sweep_interval: float = hubconfig.SWEEP_INTERVAL  # idle checkpoints of loaded documents
    accounts_poll: float = 1.0  # how often admin commands' changes are picked up
    peer_endpoint: PeerHandlerFactory | None = None
    mock: MockConfig = field(default_factory=MockConfig)  # the Cloud Mock (`[mock]`)
    # `[log]`: below `$PEERDAEMON_LOG_LEVEL` / `_FORMAT` and the command line (`run_hub`)
    log_level: str | None = None
    log_format: str | None = None
    # where the settings came from (`build_config`): the file a running hub watches (None:
    # none), what was resolved, the flags and environment a reload keeps on top, and the
    # file's warnings (unknown keys), logged at start
    config_file: Path | None = None
    config_required: bool = False
    settings: Resolved | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    environ: dict[str, str] | None = None
    warnings: list[str] = field(default_factory=list)
    config_poll: float = 2.0  # how often the file's mtime, size and inode are checked
    # scaled mode (docs/hub-cluster.md): both set, or neither (the embedded store)
    redis: str | None = None
    postgres: str | None = None

    @property
    def clustered(self) -> bool:
        return bool(self.redis or self.postgres)


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
    mocks: CloudMock | None = None  # HostedMocks, loaded with the first hosted mock
    watcher: ConfigWatcher | None = None  # None: no config file to follow

    def reload_config(self) -> bool:
        """Re-read the config file now (SIGHUP); False if the hub has none."""
        if self.watcher is None:
            return False
        self.watcher.request()
        return True

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
    runtime: Path | None = None
    for warning in config.warnings:
        log.warning("hub: %s", warning)
    ssl_context = _ssl_context(config) if config.tls_cert else None
    node = None
    if config.clustered:  # scaled mode: documents in PostgreSQL, rooms over Redis
        from .cluster.node import ClusterNode  # (the optional extra `cluster`)

        node = ClusterNode(str(config.redis), str(config.postgres))
        store: Any = await node.open()
    else:
        store = Store.open(
            config.data_dir,
            compact_count=config.compact_count,
            compact_bytes=config.compact_bytes,
            wake_late=True,  # relayed before it is durable: the relay goes first (sqlite.py)
        )
    accounts = None
    try:
        if node is None:
            accounts = Accounts.open(config.data_dir, defaults=config.limits)
        else:
            accounts = node.open_accounts(config.limits)
        events = EventLog()
        docs = (HubDocs if node is None else node.docs_class)(
            store,
            events,
            limits=accounts.space_limits,
            compact_count=config.compact_count,
            compact_bytes=config.compact_bytes,
            sweep_interval=config.sweep_interval,
        )
        count = docs.load()
        rooms = Rooms(docs, framer=ws_frame) if node is None else node.rooms_for(docs, ws_frame)
        docs.in_use = lambda space, doc: (space, doc) in rooms.rooms  # open rooms stay loaded
        yjs = YjsEndpoint(rooms, docs, accounts, events=events)
        if node is not None:
            node.wake = yjs.wake_ready  # awareness from the bus: have the connections send it
        docs.add_listener(rooms.on_update)
        docs.add_flush_listener(yjs.flush)
        accounts.add_change_listener(yjs.revalidate)
        factory = config.peer_endpoint or create_peer_endpoint
        endpoint = factory(docs, accounts, events)
        if node is not None:
            node.peer_endpoint = endpoint  # the documents its daemons sync are followed too
        removals = Removals(docs)  # devices removed from a space: /peer and /yjs refuse them
        yjs.auth.removals = removals
        if hasattr(endpoint, "removals"):
            endpoint.removals = removals
        docs.add_listener(partial(_removals_changed, yjs))
        bridge = getattr(endpoint, "bridge_rooms", None)
        if bridge is not None:  # presence between the daemons and the y-websocket clients
            bridge(rooms)
        mocks = CloudMock(
            docs,
            accounts,
            events,
            config.data_dir,
            config.mock,
            tls=ssl_context is not None,
            factory=None if node is None else node.mocks_for,
            eager=node is not None,  # a cluster's process follows every hosted mock's documents
        )
        refusals = EventCounts("limit-exceeded", "reason")
        events.listen(refusals)
        http = HubHttp(
            yjs,
            endpoint,
            config=config.http,
            version=__version__,
            stats=lambda: {"documents": docs.stats()["documents"], "mocks": len(mocks.hosted)},
            mocks=MockDoor(mocks) if config.mock.enabled else None,
            metrics_source=partial(_figures, store, docs, mocks, refusals),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(docs.run)
            run = getattr(endpoint, "run", None)
            if run is not None:
                await nursery.start(run)
            nursery.start_soon(_watch_accounts, accounts, config.accounts_poll)
            if config.mock.enabled:
                await nursery.start(mocks.run)  # loads nothing until a space asks for it
            nursery.start_soon(release_free_heap)  # bursts of connections leave free heap
            nursery.start_soon(yjs.expire_awareness)
            watcher: ConfigWatcher | None = None
            if config.config_file is not None and config.settings is not None:
                watcher = ConfigWatcher(config, partial(_apply_live, http=http, accounts=accounts))
                nursery.start_soon(watcher.run)
            host, port = config.listen
            try:
                listeners: list[Any] = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            bound = listeners[0].socket.getsockname()[1]
            if ssl_context is not None:
                listeners = [trio.SSLListener(lis, ssl_context) for lis in listeners]
            nursery.start_soon(http.serve, listeners)
            server = HubServer(
                config,
                store,
                docs,
                accounts,
                events,
                rooms,
                http,
                endpoint,
                host,
                bound,
                mocks,
                watcher,
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
            runtime = _write_runtime(config, host, bound, ssl_context is not None)
            if node is not None:
                node.address = _url((host, bound), ssl_context is not None)
            task_status.started(server)
    finally:
        if runtime is not None:
            _remove_runtime(runtime)
        if accounts is not None:
            accounts.close()
        store.close()
        if node is not None:
            await node.aclose()


def _removals_changed(
    yjs: YjsEndpoint, space_id: str, doc_id: str, update: bytes, origin: str
) -> None:
    """A space document changed: it may list a removed device, whose token's Yjs clients go."""
    if doc_id == f"space:{space_id}":
        yjs.revalidate()


def _figures(
    store: Store, docs: HubDocs, mocks: CloudMock, refusals: EventCounts
) -> dict[str, Any]:
    """The hub's figures for `/metrics` beside the port's own (`metrics.hub_families`' keys):
    cheap counters only, read on every scrape."""
    stats = docs.stats()
    commits = store.commit_times
    states: dict[str, int] = {}
    for key, mock in mocks.hosted.items():
        server = mocks.engine.servers.get(key)
        state = "refused" if mock.refused else (server.state if server else "waiting")
        states[state] = states.get(state, 0) + 1
    cluster = getattr(store, "cluster_figures", None)  # scaled mode: the process's part
    return (cluster() if cluster is not None else {}) | {
        "spaces": stats["spaces"],
        "documents": stats["documents"],
        "documents_loaded": stats["loaded"],
        "documents_evicted": docs.evictions,
        "stored_bytes": docs.stored_bytes,
        "relay_queued": stats["relay_queued"],
        "updates_relayed": docs.relayed,
        "relayed_bytes": docs.relayed_bytes,
        "store_commit": Histogram(commits.bounds, list(commits.counts), commits.count, commits.sum),
        "limit_refusals": dict(refusals.counts),
        "mock_requests": mocks.requests,
        "hosted_mocks": states,
    }


def _write_runtime(config: HubConfig, host: str, port: int, tls: bool) -> Path | None:
    """`hub-serve.json`: where this hub listens, for `hub status` (a failure costs only that)."""
    path = config.data_dir / RUNTIME_NAME
    info = {"pid": os.getpid(), "host": host, "port": port, "tls": tls, "version": __version__}
    try:
        replace_file(path, (json.dumps(info) + "\n").encode("utf-8"), 0o600)
    except OSError as exc:
        log.warning("hub: cannot write %s: %s", path, exc)
        return None
    return path


def _remove_runtime(path: Path) -> None:
    try:
        if _read_runtime(path.parent).get("pid") == os.getpid():
            path.unlink()
    except OSError:
        pass


def hub_key_of(endpoint: object) -> str | None:
    """The key fingerprint daemons see in the hub's hello (its device id), if the `/peer`
    endpoint has an identity."""
    identity = getattr(endpoint, "identity", None)
    device = getattr(identity, "device_id", None)
    return device if isinstance(device, str) else None


def hub_status(
    data_dir: Path,
    *,
    listen: tuple[str, int] | None = None,
    tls: bool = False,
    metrics_token: str | None = None,
    probe: bool = True,
    timeout: float = 3.0,
    cluster: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """`peerdaemon hub status`: what the hub's data dir holds, and what a running hub reports.

    With `cluster` (Redis URL, PostgreSQL DSN: scaled mode) the figures come from the cluster
    instead (`cluster.status.cluster_status`: its processes, PostgreSQL and Redis), and
    `running` is the process of this data dir (its `hub-serve.json`).

    - `hub_key`: the key fingerprint `hub serve` keeps in its store (`peers.PeerEndpoint`); if
      no hub ever ran on the dir, it is created now, so an admin can hand the fingerprint out
      before the first start.
    - `running`, `pid`: whether a hub holds the store's lock (its pid, from the lock file).
    - `users`, `spaces` (each with its owner, members, documents and bytes stored),
      `documents`, `stored_bytes`, `db_bytes`: read from the accounts file and the store,
      without the lock (read-only; SQLite's WAL lets a reader beside the writer).
    - `address`, `live`: a running hub's address (from `hub-serve.json`, which it writes in its
      data dir, else `listen`, the config's) and what it answers there: `/health`, and
      `/metrics` (with `metrics_token`, or from loopback), summed up; `live_error` if it could
      not be asked."""
    import http.client  # here, not at the top: a serving hub does not keep it loaded

    data_dir = Path(data_dir)
    status: dict[str, Any] = {"data_dir": str(data_dir)}
    if cluster is not None:  # scaled mode: the cluster's PostgreSQL and Redis, not the dir
        from .cluster.status import cluster_status

        status.update(cluster_status(*cluster, timeout=timeout))
        runtime = _read_runtime(data_dir)
        pid = runtime.get("pid")
        status.update(running=isinstance(pid, int) and _alive(pid), pid=pid)
        if status["running"] and probe:
            address = (str(runtime["host"]), int(runtime["port"]))
            status["address"] = _url(address, bool(runtime.get("tls")))
            try:
                status["live"] = _probe(address, bool(runtime.get("tls")), metrics_token, timeout)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                status["live_error"] = f"cannot ask it at {status['address']}: {exc}"
        return status
    try:
        store = Store.open(data_dir)
    except StoreLockedError:
        pid = _lock_holder(data_dir)
        status.update(running=True, pid=pid, hub_key=_read_key(data_dir))
    else:
        try:
            identity = load_or_create_identity(store, "hub")
        finally:
            store.close()  # commits a new identity
        status.update(running=False, pid=None, hub_key=identity.device_id)
    stored = _store_figures(data_dir)
    with Accounts.open(data_dir) as accounts:
        users = accounts.users()
        spaces = accounts.spaces()
    known = {sp["id"] for sp in spaces}
    for space_id in sorted(set(stored["by_space"]) - known):  # (not in the accounts file)
        spaces.append({"id": space_id, "owner": None, "name": "", "members": []})
    status["users"] = len(users)
    status["spaces"] = [
        {
            "id": sp["id"],
            "name": sp.get("name", ""),
            "owner": sp.get("owner"),
            "members": sp.get("members", []),
            "documents": stored["by_space"].get(sp["id"], (0, 0))[0],
            "stored_bytes": stored["by_space"].get(sp["id"], (0, 0))[1],
        }
        for sp in spaces
    ]
    status["documents"] = stored["documents"]
    status["stored_bytes"] = stored["stored_bytes"]
    status["db_bytes"] = stored["db_bytes"]
    if status["running"]:
        runtime = _read_runtime(data_dir)
        if runtime.get("pid") == status["pid"] or status["pid"] is None and runtime:
            address: tuple[str, int] | None = (str(runtime["host"]), int(runtime["port"]))
            tls = bool(runtime.get("tls"))
        else:
            address = listen if listen is not None and listen[1] else None
        if address is None:
            status["address"] = None
            status["live_error"] = "its address is unknown (no hub-serve.json, port 0)"
        else:
            status["address"] = _url(address, tls)
            if probe:
                try:
                    status["live"] = _probe(address, tls, metrics_token, timeout)
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    status["live_error"] = f"cannot ask it at {status['address']}: {exc}"
    return status


def _url(address: tuple[str, int], tls: bool) -> str:
    host, port = address
    return f"{'wss' if tls else 'ws'}://{f'[{host}]' if ':' in host else host}:{port}"


def _probe(
    address: tuple[str, int], tls: bool, token: str | None, timeout: float
) -> dict[str, Any]:
    """Ask a running hub for `/health` and `/metrics` (on this machine: a wildcard address is
    asked on loopback; its TLS certificate names its public host, so it is not checked)."""
    host, port = address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)

    import http.client

    def get(path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        conn: http.client.HTTPConnection
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    status, body = get("/health", {})
    if status != 200:
        raise ValueError(f"/health answered {status}")
    live: dict[str, Any] = {"health": json.loads(body)}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, body = get("/metrics", headers)
    if status == 200:
        live["metrics"] = _metric_summary(parse(body.decode("utf-8")))
    else:
        live["metrics_error"] = f"/metrics answered {status}" + (
            " (set [metrics] token in the config file given to `hub status`)"
            if status in (401, 403)
            else ""
        )
    return live


def _metric_summary(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> dict[str, Any]:
    """`peerdaemon_hub_NAME` -> its value, or {label value: value} for a labelled family
    (histogram buckets and `info` left out)."""
    prefix = "peerdaemon_hub_"
    out: dict[str, Any] = {}
    for (name, labels), value in sorted(samples.items()):
        if not name.startswith(prefix) or name.endswith("_bucket") or name == prefix + "info":
            continue
        key = name[len(prefix) :]
        number: int | float = int(value) if value.is_integer() else value
        if labels:
            out.setdefault(key, {})[labels[0][1]] = number
        else:
            out[key] = number
    return out


def _store_figures(data_dir: Path) -> dict[str, Any]:
    """Documents and the bytes they take (snapshot + log), per space, read-only."""
    uri = (data_dir / DB_NAME).absolute().as_uri() + "?mode=ro"
    by_space: dict[str, tuple[int, int]] = {}
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            rows = db.execute(
                "SELECT env_id, sum(n) FROM (SELECT env_id, length(blob) AS n FROM log"
                " UNION ALL SELECT env_id, length(blob) AS n FROM snapshots) GROUP BY env_id"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the hub's store in {data_dir}: {exc}") from None
    for key, size in rows:
        space, sep, _doc = str(key).partition("/")
        if sep:
            count, total = by_space.get(space, (0, 0))
            by_space[space] = (count + 1, total + int(size or 0))
    db_bytes = 0
    for suffix in ("", "-wal"):
        try:
            db_bytes += os.path.getsize(str(data_dir / DB_NAME) + suffix)
        except OSError:
            pass
    return {
        "by_space": by_space,
        "documents": sum(c for c, _ in by_space.values()),
        "stored_bytes": sum(b for _, b in by_space.values()),
        "db_bytes": db_bytes,
    }


def _read_runtime(data_dir: Path) -> dict[str, Any]:
    """`hub-serve.json` as the running hub wrote it, or {} (none, unreadable, not ours)."""
    path = data_dir / RUNTIME_NAME
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return {}
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(info, dict) and isinstance(info.get("port"), int) and "host" in info
    return info if ok else {}


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
    public = saved.get("public_key")
    kept = isinstance(public, bytes) and len(public) == 32
    return Identity.from_private_bytes(raw, "hub", public if kept else None).device_id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_holder(data_dir: Path) -> int | None:
    try:
        first = (data_dir / LOCK_NAME).read_text(encoding="ascii").split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None


async def _watch_accounts(accounts: Accounts, poll: float) -> None:
    """Pick up admin commands' changes (revoked tokens, members) from the shared file."""
    refresh_async = getattr(accounts, "refresh_async", None)  # (a cluster's: off the loop)
    while True:
        await trio.sleep(poll)
        try:
            if refresh_async is not None:
                await refresh_async()
            else:
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
def parse_listen(text: str) -> tuple[str, int]:
    return parse_address(str(text), any_port=True)


def build_config(
    *,
    config_file: Path | None = None,
    data_dir: Path | None = None,
    listen: tuple[str, int] | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    redis: str | None = None,
    postgres: str | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    required: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> HubConfig:
    """The hub's settings (hub/config.py): the options given here (the command line's), then
    `PEERDAEMON_HUB_*` variables, then `config_file`, then the defaults. `required`: the file
    must exist (by default, when one is given; `hub config` locates one that may not exist).
    A bad file is one line (ConfigError); unknown keys are `warnings` on the result."""
    flags: dict[str, Any] = {
        "data_dir": Path(data_dir).expanduser() if data_dir is not None else None,
        "listen": listen,
        "tls.cert": Path(tls_cert).expanduser() if tls_cert is not None else None,
        "tls.key": Path(tls_key).expanduser() if tls_key is not None else None,
        "cluster.redis": redis,
        "cluster.postgres": postgres,
        "log.level": log_level.lower() if log_level else None,
        "log.format": log_format.lower() if log_format else None,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    path = Path(config_file).expanduser() if config_file is not None else None
    must = path is not None if required is None else required
    env = dict(environ) if environ is not None else None
    try:
        resolved = hubconfig.load(path, required=must, flags=flags, environ=env)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    config = hub_config(resolved)
    config.config_file, config.config_required = path, must
    config.flags, config.environ = flags, env
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    if bool(config.redis) != bool(config.postgres):
        raise ConfigError(
            "the scaled mode needs both Redis and PostgreSQL (--redis and --postgres)"
        )
    return config


def hub_config(resolved: Resolved) -> HubConfig:
    """A `HubConfig` from resolved settings (hub/config.py)."""
    v = resolved.values
    http = HttpConfig(
        **hubconfig.section(v, "fanout"),
        **hubconfig.section(v, "connections"),
        metrics_token=v["metrics.token"],
    )
    mock = MockConfig(**hubconfig.section(v, "mock"))
    mock.allow_hosts = list(mock.allow_hosts)
    return HubConfig(
        data_dir=Path(v["data_dir"]),
        listen=v["listen"],
        tls_cert=v["tls.cert"],
        tls_key=v["tls.key"],
        limits=Limits(**hubconfig.section(v, "limits")),
        http=http,
        compact_count=v["store.compact_count"],
        compact_bytes=v["store.compact_bytes"],
        sweep_interval=v["store.sweep_interval"],
        mock=mock,
        log_level=v["log.level"],
        log_format=v["log.format"],
        redis=v["cluster.redis"],
        postgres=v["cluster.postgres"],
        settings=resolved,
        warnings=list(resolved.file.warnings),
    )


class ConfigWatcher:
    """Re-reads the config file when asked (SIGHUP) and when it changes on disk (its mtime,
    size or inode, checked every `config.config_poll` seconds), and hands what changed to
    `apply` (`hubconfig.plan_reload`). A file that cannot be read is one warning, and the
    running settings stay; keys that need a restart are logged once per new value."""

    def __init__(self, config: HubConfig, apply: Callable[[hubconfig.Reload], None]) -> None:
        assert config.config_file is not None and config.settings is not None
        self.path = config.config_file
        self.required = config.config_required
        self.flags = config.flags
        self.environ = config.environ
        self.poll = config.config_poll
        self.apply = apply
        self.schema = hubconfig.schema()
        self.running = config.settings  # the values in effect (pending changes not among them)
        self.pending: dict[str, Any] = {}
        self.stamp = _stamp(self.path)
        self.reloads = 0  # files read again (a bad one included): what tests wait on
        self._wake = trio.Event()

    def request(self) -> None:
        """Re-read the file now, changed or not (SIGHUP)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self.poll):
                await self._wake.wait()
            forced = self._wake.is_set()
            if forced:
                self._wake = trio.Event()
            stamp = _stamp(self.path)
            if forced or stamp != self.stamp:
                self.stamp = stamp
                self.reload()

    def reload(self) -> hubconfig.Reload | None:
        """Read, compare, apply; None if the file could not be read."""
        self.reloads += 1
        try:
            new = hubconfig.load(
                self.path,
                required=self.required,
                flags=self.flags,
                environ=self.environ,
                settings=self.schema,
            )
        except ConfigFileError as exc:
            log.warning("hub: config file not reloaded, the running settings stay: %s", exc)
            return None
        plan = hubconfig.plan_reload(self.running, new, self.schema)
        for warning in plan.warnings:
            log.warning("hub: %s", warning)
        if plan.live:
            self.apply(plan)
            log.info(
                "hub: applied from %s: %s",
                self.path,
                ", ".join(f"{k} = {self._shown(k, v)}" for k, v in sorted(plan.live.items())),
            )
        values = dict(self.running.values) | plan.live
        for key in sorted(set(self.pending) - set(plan.pending)):
            log.info("hub: %s is back to the value it runs with", key)
        for key, value in sorted(plan.pending.items()):
            if key not in self.pending or self.pending[key] != value:
                log.warning(
                    "hub: %s = %s in %s applies at the next start",
                    key,
                    self._shown(key, value),
                    self.path,
                )
        self.pending = dict(plan.pending)
        self.running = Resolved(values, new.sources, new.file)
        return plan

    def _shown(self, key: str, value: Any) -> str:
        if key == "metrics.token":
            return "(set)" if value else "(none)"
        return json.dumps(hubconfig.shown(self.schema, key, value))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _apply_live(plan: hubconfig.Reload, http: HubHttp, accounts: Accounts) -> None:
    """The settings a running hub takes at once: the log level, the metrics token (read by
    each scrape), the default limits (as `hub limits set` changes them)."""
    live = plan.live
    if "log.level" in live:
        logging.getLogger().setLevel(str(live["log.level"]).upper())
    if "metrics.token" in live:
        http.config.metrics_token = live["metrics.token"]
    limits = hubconfig.section(live, "limits")
    if limits:
        accounts.set_defaults(replace(accounts.defaults, **limits))


# ------------------------------------------------------------------------------------ process
async def _main(config: HubConfig) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            server: HubServer = await nursery.start(serve_hub, config)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if server.reload_config():
                        log.info("received SIGHUP, re-reading %s", config.config_file)
                    else:
                        log.info("received SIGHUP: no config file to re-read")
                    continue
                log.info("received %s, shutting down", signal.Signals(signum).name)
                server.close_clients()
                with trio.move_on_after(SHUTDOWN_GRACE):
                    while server.rooms.clients:
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
                break


def _raise_open_files_limit() -> None:
    """Each client is an open file: take the hard limit, not the soft one (systemd's default
    soft limit, 1024, would refuse the thousand-and-first client), as Go programs do."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: keep the soft limit
        pass


def run_hub(
    config: HubConfig, *, log_level: str | None = None, log_format: str | None = None
) -> int:
    """`peerdaemon hub serve`: returns the process exit code. `log_level` and `log_format` (the
    command line's) win over `$PEERDAEMON_LOG_LEVEL` / `_FORMAT`, which win over `[log]`."""
    _raise_open_files_limit()
    # Fewer cyclic-GC passes: the hub holds many long-lived objects (connections, rooms,
    # documents), and frequent collections that walk them all show up as fan-out delays.
    gc.set_threshold(50_000, 20, 20)
    gc.freeze()
    return run_process(
        _main,
        config,
        expected=(StoreError, OSError, ConfigError, sqlite3.Error),
        stopped="hub stopped",
        log_level=log_level,
        log_format=log_format,
        file_level=config.log_level,
        file_format=config.log_format,
    )
