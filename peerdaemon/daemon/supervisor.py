"""The daemon's supervisor: one nursery that starts each long-running service and stops them all.

Services start in dependency order with `nursery.start`, so each is ready before the next needs
it: the store writer first (every acknowledgement waits on it), then the local socket. On SIGTERM
or SIGINT the nursery is cancelled; the store writer flushes what is queued before it returns.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..api import serve_unix
from ..core.addresses import parse_address
from ..core.attachments import Attachments
from ..core.errors import OpError, Pending
from ..core.events import EventLog
from ..core.history import History, HistorySettings
from ..core.identity import Identity, load_or_create_identity
from ..core.registry import Registry
from ..core.residency import Residency, Sweeper
from ..core.runner import run_process
from ..discovery import DiscoveryError, MdnsDiscovery
from ..hublink import HubLinkService
from ..mirror import Folder, FolderSync, MirrorService
from ..mock import MockService
from ..operations import Operations
from ..peer import PeerManager
from ..presence import Me, PresenceService
from ..spaces import SpacesService
from ..status import StatusService, StatusSettings
from ..store import Store, StoreError
from .config import DaemonConfig, migrate_legacy
from .live import LiveConfig

log = logging.getLogger("peerdaemon")


@dataclass
class Daemon:
    """What a started daemon exposes to tests and, later, to other services."""

    config: DaemonConfig
    store: Store
    registry: Registry
    service: Operations
    mirror: MirrorService
    identity: Identity | None = None
    spaces: SpacesService | None = None
    peers: PeerManager | None = None
    peer_port: int | None = None
    discovery: MdnsDiscovery | None = None
    hubs: HubLinkService | None = None
    mocks: MockService | None = None
    attachments: Attachments | None = None
    status: StatusService | None = None  # the status page; `status.port` once it listens
    settings: LiveConfig | None = None  # config.get/set/reload; a reload on SIGHUP
    presence: PresenceService | None = None  # who is connected and edits what (docs/presence.md)
    history: History | None = None  # versions and the trash (docs/history.md)
    sweeper: Sweeper | None = None  # unloads unused documents (core/residency.py)


async def serve(
    config: DaemonConfig, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the daemon's services until cancelled."""
    started = time.monotonic()
    store = Store.open(
        config.data_dir, compact_count=config.compact_count, compact_bytes=config.compact_bytes
    )
    registry: Registry | None = None
    try:
        migrate_legacy(config, store)
        events = EventLog()
        registry = Registry(store, events)
        count = registry.load()
        sweeper = Sweeper(registry, Residency(config.evict_after, config.evict_sweeps))
        service = Operations(registry, data_dir=config.data_dir, socket_path=config.socket_path)
        try:
            identity = load_or_create_identity(store, config.name)
        except ValueError as exc:
            raise RuntimeError(f"--name: {exc}") from None
        # history follows the registry before anything can delete (the trash sees every delete)
        history = History(
            registry, store, identity.device_id, HistorySettings.from_mapping(config.history)
        )
        history.attach()
        service.history = history
        attachments = Attachments(store, events, identity.device_id)
        attachments.load()
        spaces = SpacesService(registry, store, identity, events, attachments, history=history)
        spaces.load()
        spaces.register(service)
        presence = PresenceService(
            Me(identity.device_id, identity.name, _display_name(config)), registry, spaces
        )
        presence.register(service)
        status = None
        if config.status or config.config_file is not None:  # (a file may turn it on later)
            status = StatusService(
                service,
                store,
                events,
                config.data_dir,
                _status_settings(config),
                enabled=config.status,
            )
            status.register(service)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(history.run)
            await nursery.start(sweeper.run)
            mirror = MirrorService(registry, store, service, events, config.mirror_dir)
            await nursery.start(mirror.run)
            mocks = MockService(
                registry,
                store,
                events,
                data_dir=config.data_dir,
                directory_of=partial(_linked_dir, mirror),
                runner_args=[]
                if config.mock_faker_seed is None
                else ["--faker-seed", str(config.mock_faker_seed)],
                hosted=spaces.hosted_mocks,
            )
            mocks.register(service)
            await nursery.start(mocks.run)
            folders = partial(_folders, mirror, mocks)
            files = FolderSync(registry, attachments, events, folders, store=store)
            await nursery.start(files.run)
            await nursery.start(presence.run)
            manager, port, discovery = await _start_lan(
                nursery, config, identity, spaces, events, awareness=presence
            )
            hubs = HubLinkService(
                identity, spaces, store, events, config=config.peer_config, awareness=presence
            )
            hubs.load()
            hubs.register(service)
            await nursery.start(hubs.run)
            service.register("peers", hubs.peers_op(manager.op_peers))
            live = LiveConfig(
                config,
                events,
                _presence_appliers(
                    _appliers(config, spaces, manager, status, history, sweeper), presence
                ),
                current_name=lambda: identity.name,
            )
            live.register(service)
            await nursery.start(live.run)
            await nursery.start(
                partial(serve_unix, config.socket_path, service, max_frame=config.max_frame)
            )
            if status is not None:
                await nursery.start(status.run)
            events.emit(
                "daemon-started",
                environments=count,
                startup_seconds=round(time.monotonic() - started, 4),
            )
            log.info(
                "peerdaemon ready: %d environments (%d loaded), socket %s, data %s",
                count,
                registry.resident(),
                config.socket_path,
                config.data_dir,
            )
            task_status.started(
                Daemon(
                    config,
                    store,
                    registry,
                    service,
                    mirror,
                    identity=identity,
                    spaces=spaces,
                    peers=manager,
                    peer_port=port,
                    discovery=discovery,
                    hubs=hubs,
                    mocks=mocks,
                    attachments=attachments,
                    settings=live,
                    status=status,
                    history=history,
                    presence=presence,
                    sweeper=sweeper,
                )
            )
    finally:
        if registry is not None and not store.closed:
            try:  # the next start then loads none of the documents that could go now
                registry.keep_facts()
            except Exception:
                log.exception("keeping the environments' facts failed")
        store.close()


def _status_settings(config: DaemonConfig) -> StatusSettings:
    return StatusSettings(
        config.status_listen,
        config.status_tls_cert,
        config.status_tls_key,
        list(config.status_hosts),
    )


def _appliers(
    config: DaemonConfig,
    spaces: SpacesService,
    manager: PeerManager,
    status: StatusService | None,
    history: History | None = None,
    sweeper: Sweeper | None = None,
) -> dict[str, Callable[[Any], Any]]:
    """How each live setting (daemon/config.py) reaches the service that holds it."""
    static = list(config.peers)

    def name(value: str | None) -> Any:
        if value is None:  # unset in the file: the device keeps the name it has
            return None
        tickets = spaces.set_name(value)  # an OpError (a bad name) is the caller's to report
        return Pending(partial(_all_durable, tickets), None)

    def peers(value: list[tuple[str, int]]) -> None:
        for host, port in static:
            if (host, port) not in value:
                manager.remove_address(host, port)
        for host, port in value:
            if (host, port) not in static:
                manager.add_address(host, port, source="static")
        static[:] = value

    def log_level(value: str) -> None:
        logging.getLogger().setLevel(value.upper())

    def status_page(values: dict[str, Any]) -> Pending:
        if status is None:
            raise RuntimeError("the status page needs a restart of the daemon")
        settings = StatusSettings(
            values["status.listen"],
            values["status.tls_cert"].absolute() if values["status.tls_cert"] else None,
            values["status.tls_key"].absolute() if values["status.tls_key"] else None,
            list(values["status.hosts"]),
        )
        status.reconfigure(settings, bool(values["status.enabled"]))  # StatusConfigError
        return Pending(status.served, None)

    def history_settings(values: dict[str, Any]) -> None:
        if history is not None:
            history.configure(HistorySettings.from_mapping(values))

    def evict_after(value: float) -> None:
        if sweeper is not None:
            sweeper.configure(value)

    def evict_sweeps(value: int) -> None:
        if sweeper is not None:
            sweeper.configure(sweeper.residency.evict_after, value)

    return {
        "history.*": history_settings,
        "store.evict_after": evict_after,
        "store.evict_sweeps": evict_sweeps,
        "name": name,
        "lan.peers": peers,
        "log.level": log_level,
        "status.*": status_page,
    }


def _display_name(config: DaemonConfig) -> str | None:
    """The user's display name (`config set display_name`), shown to the other members."""
    if config.settings is not None:
        value = config.settings.values.get("display_name")
    else:
        value = config.extra.get("display_name")
    return value if isinstance(value, str) and value else None


def _presence_appliers(
    appliers: dict[str, Callable[[Any], Any]], presence: PresenceService
) -> dict[str, Callable[[Any], Any]]:
    """The display name goes to presence live, and so does a new device name."""
    rename = appliers.get("name")

    def name(value: str | None) -> Any:
        result = rename(value) if rename is not None else None
        presence.set_device_name(value)
        return result

    appliers["name"] = name
    appliers["display_name"] = presence.set_display_name
    return appliers


async def _all_durable(tickets: list[Any]) -> None:
    for ticket in tickets:
        await ticket.wait()


def _folders(mirror: MirrorService, mocks: MockService) -> dict[str, list[Folder]]:
    """Where environments' external files live: beside a linked file (both ways), and in the
    folder a mock serves an environment from when it was not linked (written only)."""
    out: dict[str, list[Folder]] = {}
    for link in mirror.describe_links():
        if isinstance(link.get("id"), str) and isinstance(link.get("path"), str):
            out.setdefault(link["id"], []).append(Folder(Path(link["path"]).parent, True))
    for env_id, path in mocks.folders().items():
        if all(folder.path != path for folder in out.get(env_id, ())):
            out.setdefault(env_id, []).append(Folder(path, two_way=False))
    return out


def _linked_dir(mirror: MirrorService, env_id: str) -> Path | None:
    """A linked environment's FILE bodies and certificates sit beside its file, where Mockoon
    resolves them (`environmentDirectory`)."""
    for link in mirror.describe_links():
        if link.get("id") == env_id and isinstance(link.get("path"), str):
            return Path(link["path"]).parent
    return None


def mdns_allowed(config: DaemonConfig) -> bool:
    """mDNS needs a listener to advertise; PEERDAEMON_NO_MDNS=1 is the test suite's guard.

    Not for a loopback listener either: discovery publishes the interfaces' addresses, where
    nothing would answer (peers would dial them in vain and show them as the device's address).
    """
    return (
        config.mdns
        and config.listen is not None
        and not _is_loopback(config.listen[0])
        and os.environ.get("PEERDAEMON_NO_MDNS") != "1"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _start_lan(
    nursery: trio.Nursery,
    config: DaemonConfig,
    identity: Identity,
    spaces: SpacesService,
    events: EventLog,
    *,
    awareness: PresenceService | None = None,
) -> tuple[PeerManager, int | None, MdnsDiscovery | None]:
    """The peer manager (listener, static peers, invite peers) and, if allowed, mDNS."""
    manager = PeerManager(
        identity,
        spaces,
        events.emit,
        listen=config.listen,
        static_peers=list(config.peers),
        config=config.peer_config,
        awareness=awareness,
    )
    port = await nursery.start(manager.run)
    if port is not None and config.listen is not None:
        host = config.listen[0]
        advertised = [f"{host}:{port}"] if host not in ("", "0.0.0.0", "::") else []
        spaces.address_provider = lambda: advertised

    dialed: set[tuple[str, str]] = set()

    def dial_invite_peers() -> None:
        for peer in spaces.invite_addresses():
            if (peer.device_id, peer.address) in dialed:
                continue
            dialed.add((peer.device_id, peer.address))
            try:
                host, port_ = parse_address(peer.address)
                manager.add_address(host, port_, peer.device_id, "invite")
            except ValueError:
                log.warning("ignoring invite address %r", peer.address)

    dial_invite_peers()
    spaces.add_docs_listener(dial_invite_peers)

    discovery = None
    if config.mdns and config.listen is not None and _is_loopback(config.listen[0]):
        log.info("mDNS discovery off: the peer listener is on a loopback address")
    if port is not None and mdns_allowed(config):

        def found(device: str, addresses: list[str], found_port: int) -> None:
            for address in addresses:
                manager.add_address(address, found_port, device, "mdns")

        def lost(device: str, addresses: list[str], lost_port: int) -> None:
            for address in addresses:
                manager.remove_address(address, lost_port)

        discovery = MdnsDiscovery(
            identity.device_id,
            port,
            spaces.space_keys,
            found,
            interface=config.mdns_interface,
            on_lost=lost,
        )
        nursery.start_soon(_run_discovery, discovery, events)
        spaces.add_docs_listener(discovery.refresh)
    return manager, port, discovery


async def _run_discovery(discovery: MdnsDiscovery, events: EventLog) -> None:
    """mDNS in the background: registering takes a second or two, and the local socket must not
    wait for it; a bad `--mdns-interface` turns discovery off, not the daemon."""
    try:
        await discovery.run()
    except DiscoveryError as exc:
        log.warning("mDNS discovery off: %s", exc)
        events.emit("discovery-error", reason=str(exc))


async def _main(config: DaemonConfig) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            daemon: Daemon = await nursery.start(serve, config)
            async for signum in signals:
                if signum == signal.SIGHUP:  # `systemctl reload`: re-read the config file
                    if daemon.settings is not None and config.config_file is not None:
                        nursery.start_soon(_reload, daemon.settings)
                    continue
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


async def _reload(settings: LiveConfig) -> None:
    try:
        await settings.reload("SIGHUP")
    except OpError:
        pass  # logged and emitted by the reload


def run_daemon(
    config: DaemonConfig, *, log_level: str | None = None, log_format: str | None = None
) -> int:
    """`peerdaemon run`: returns the process exit code. `log_level`/`log_format` win over
    `$PEERDAEMON_LOG_LEVEL`/`_FORMAT` (core/runner.py)."""
    return run_process(
        _main,
        config,
        expected=(StoreError, OSError, RuntimeError),
        stopped="peerdaemon stopped",
        log_level=log_level,
        log_format=log_format,
    )
