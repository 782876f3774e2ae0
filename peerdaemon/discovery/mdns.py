"""mDNS advertise + browse for `_peerdaemon._tcp.local.` (the trio shell around zeroconf).

zeroconf runs its own asyncio loop in a thread (there is no asyncio loop under trio) and calls
browser handlers in yet another thread. So: blocking zeroconf calls (construct, register, update,
get_service_info, unregister, close) go through `trio.to_thread.run_sync`; browser callbacks hop
into trio with `trio.from_thread.run_sync` on the captured trio token. All decisions about a TXT
record are in the sans-I/O `tags` module.
"""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from functools import partial

import ifaddr
import trio
from zeroconf import InterfaceChoice, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from .tags import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    SpaceKeyLike,
    accept,
    build_txt,
    epoch_of,
    seconds_to_next_epoch,
)

log = logging.getLogger(__name__)

OnFound = Callable[[str, list[str], int], None]
"""(device_id, addresses, port); also the shape of `on_lost`."""

ADDRESS_POLL_SECONDS = 60.0
"""How often addresses (DHCP, roaming) and matches of known services are re-checked."""
RESOLVE_TIMEOUT_MS = 3000
CLOSE_TIMEOUT_SECONDS = 5.0
"""Goodbye packets take ~0.4 s; never let a wedged zeroconf hold up daemon shutdown longer."""


class DiscoveryError(Exception):
    """Discovery cannot start as configured (e.g. `--mdns-interface` has no IPv4 address)."""


def ipv4_addresses(interface: str | None = None) -> list[str]:
    """IPv4 addresses to publish: those of `interface`, or of every non-loopback interface.

    Raises DiscoveryError if a named interface does not exist.
    """
    found: list[str] = []
    seen_interface = False
    for adapter in ifaddr.get_adapters():
        if interface is not None and interface not in (adapter.name, adapter.nice_name):
            continue
        seen_interface = True
        for ip in adapter.ips:
            if not ip.is_IPv4 or not isinstance(ip.ip, str):
                continue
            if interface is None and ip.ip.startswith("127."):
                continue
            if ip.ip not in found:
                found.append(ip.ip)
    if interface is not None and not seen_interface:
        raise DiscoveryError(f"no network interface named {interface!r}")
    return found


class MdnsDiscovery:
    """Advertise this daemon and report devices that share a space with it.

    `on_found(device_id, addresses, port)` is called in the trio thread when a service newly
    matches one of our spaces (tag of the current or previous epoch, compatible `v`, not our own
    device id), and again only if its addresses or port change, or after it went away and came
    back. The optional `on_lost(device_id, addresses, port)` is called with addresses that a
    reported service no longer has: it went away (goodbye or TTL expiry), stopped matching, or
    moved (only the stale addresses). Not called when `run` itself stops.
    `space_keys()` is called whenever tags are built or checked, so call `refresh()` after the
    set of spaces changes; tags also rotate on the hour by themselves.
    """

    def __init__(
        self,
        device_id: str,
        port: int,
        space_keys: Callable[[], Sequence[SpaceKeyLike]],
        on_found: OnFound,
        *,
        interface: str | None = None,
        on_lost: OnFound | None = None,
        protocol_version: int = PROTOCOL_VERSION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device_id = device_id
        self.port = port
        self.interface = interface
        self._space_keys = space_keys
        self._on_found = on_found
        self._on_lost = on_lost
        self._protocol_version = protocol_version
        self._clock = clock
        self._decoy_key = secrets.token_bytes(32)
        self._refresh_wanted = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._published: tuple[dict[str, str], list[str]] | None = None
        self._closed = False
        self._limiter = trio.CapacityLimiter(8)
        self._live: set[str] = set()  # names the browser currently sees
        self._known: dict[str, ServiceInfo] = {}  # last resolution of each live name
        self._resolving: set[str] = set()
        self._again: set[str] = set()  # changed while being resolved: resolve once more
        self._reported: dict[str, tuple[str, tuple[str, ...], int]] = {}

    @property
    def addresses(self) -> list[str]:
        """The IPv4 addresses currently published (empty before `run` registered)."""
        return list(self._published[1]) if self._published else []

    def refresh(self) -> None:
        """The set of spaces changed: re-publish the TXT and re-check known services soon."""
        self._refresh_wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, browse until cancelled, then unregister (goodbye) and close.

        `started()` once the service is registered and the browser runs. Raises DiscoveryError
        if `interface` has no IPv4 address.
        """
        self._token = trio.lowlevel.current_trio_token()
        addresses = ipv4_addresses(self.interface)
        if self.interface is not None and not addresses:
            raise DiscoveryError(f"interface {self.interface!r} has no IPv4 address")
        # An explicit interface restricts zeroconf's sockets to its addresses.
        interfaces = list(addresses) if self.interface is not None else InterfaceChoice.All
        zc = await trio.to_thread.run_sync(partial(Zeroconf, interfaces=interfaces))
        self._zc = zc
        browser: ServiceBrowser | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # Browse first: peers' announcements arrive while our own probing (~1 s) runs.
                browser = await trio.to_thread.run_sync(
                    partial(ServiceBrowser, zc, SERVICE_TYPE, handlers=[self._on_change])
                )
                txt = self._build_txt()
                info = self._service_info(f"{self._instance_name()}.{SERVICE_TYPE}", txt, addresses)
                await trio.to_thread.run_sync(
                    partial(zc.register_service, info, allow_name_change=True)
                )
                self._info = info
                self._published = (txt, addresses)
                log.info(
                    "mDNS: advertising %s on %s port %d",
                    info.name,
                    ", ".join(addresses) or "(no address yet)",
                    self.port,
                )
                task_status.started()
                nursery.start_soon(self._maintain)
        finally:
            self._closed = True
            self._nursery = None
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT_SECONDS
                await trio.to_thread.run_sync(
                    self._close_sync, zc, browser, self._info, abandon_on_cancel=True
                )

    # -- advertising ---------------------------------------------------------------------------

    def _instance_name(self) -> str:
        # One DNS label (<= 63 bytes). The device id is in the TXT anyway.
        return self.device_id.encode("utf-8")[:63].decode("utf-8", "ignore")

    def _server_name(self) -> str:
        return f"pd-{hashlib.sha256(self.device_id.encode()).hexdigest()[:16]}.local."

    def _keys(self) -> list[SpaceKeyLike]:
        try:
            return list(self._space_keys())
        except Exception:
            log.exception("mDNS: space_keys() failed; treating as no spaces")
            return []

    def _build_txt(self) -> dict[str, str]:
        return build_txt(
            self.device_id,
            self._keys(),
            now=self._clock(),
            decoy_key=self._decoy_key,
            protocol_version=self._protocol_version,
        )

    def _service_info(self, name: str, txt: dict[str, str], addresses: list[str]) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            name,
            port=self.port,
            properties=txt,
            server=self._server_name(),
            parsed_addresses=list(addresses),
        )

    def _next_wakeup(self) -> float:
        # Just after the hour (tags rotate; small jitter so a LAN does not update in lockstep).
        to_epoch = seconds_to_next_epoch(self._clock()) + random.uniform(0.05, 2.0)
        return min(to_epoch, ADDRESS_POLL_SECONDS)

    async def _maintain(self) -> None:
        """Re-publish on refresh(), on the hour and when addresses change; re-check matches."""
        epoch = epoch_of(self._clock())
        while True:
            with trio.move_on_after(self._next_wakeup()):
                await self._refresh_wanted.wait()
            self._refresh_wanted = trio.Event()
            await self._republish()
            now_epoch = epoch_of(self._clock())
            if now_epoch != epoch:
                log.debug("mDNS: tag epoch %d -> %d", epoch, now_epoch)
                epoch = now_epoch
            self._reevaluate()

    async def _republish(self) -> None:
        assert self._info is not None
        try:
            addresses = ipv4_addresses(self.interface)
        except DiscoveryError as exc:
            log.warning("mDNS: %s; keeping the published addresses", exc)
            addresses = self.addresses
        txt = self._build_txt()
        if self._published == (txt, addresses):
            return
        if self._published and self._published[1] != addresses:
            log.info("mDNS: addresses now %s", ", ".join(addresses) or "(none)")
            if self.interface is not None:
                log.warning(
                    "mDNS: addresses of %s changed; restart the daemon to rebind", self.interface
                )
        info = self._service_info(self._info.name, txt, addresses)
        try:
            await self._update_service(info)
        except Exception:
            log.exception("mDNS: updating the advertisement failed; retrying later")
            return
        self._info = info
        self._published = (txt, addresses)

    async def _update_service(self, info: ServiceInfo) -> None:
        assert self._zc is not None
        await trio.to_thread.run_sync(self._zc.update_service, info)

    def _close_sync(
        self, zc: Zeroconf, browser: ServiceBrowser | None, info: ServiceInfo | None
    ) -> None:
        """Worker thread: stop the browser, send goodbyes, close the sockets."""
        try:
            if browser is not None:
                browser.cancel()
            if info is not None:
                zc.unregister_service(info)
        except Exception:
            log.exception("mDNS: unregistering failed")
        finally:
            zc.close()
            log.info("mDNS: stopped")

    # -- browsing ------------------------------------------------------------------------------

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Browser thread: hand the event to trio (never block the browser on resolution)."""
        if self._closed or self._token is None:
            return
        try:
            trio.from_thread.run_sync(
                self._state_changed, name, state_change, trio_token=self._token
            )
        except trio.RunFinishedError:
            pass

    def _state_changed(self, name: str, state_change: ServiceStateChange) -> None:
        """Trio thread: start (or re-arm) the resolution of a name, or forget it."""
        if state_change is ServiceStateChange.Removed:
            log.debug("mDNS: service removed: %s", name)
            self._live.discard(name)
            self._known.pop(name, None)
            self._again.discard(name)
            gone = self._reported.pop(name, None)
            if gone is not None:
                self._lost(gone[0], list(gone[1]), gone[2])
            return
        self._live.add(name)
        if self._closed or self._nursery is None:
            return
        if name in self._resolving:
            self._again.add(name)
            return
        self._resolving.add(name)
        try:
            self._nursery.start_soon(self._resolve, name)
        except RuntimeError:  # nursery closing
            self._resolving.discard(name)

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        try:
            while True:
                self._again.discard(name)
                info = await trio.to_thread.run_sync(
                    self._zc.get_service_info,
                    SERVICE_TYPE,
                    name,
                    RESOLVE_TIMEOUT_MS,
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
                if name not in self._live:
                    return
                if info is None:
                    log.debug("mDNS: could not resolve %s", name)
                else:
                    self._known[name] = info
                    self._evaluate(name, info)
                if name not in self._again:
                    return
        finally:
            self._resolving.discard(name)

    def _lost(self, device_id: str, addresses: list[str], port: int) -> None:
        log.info("mDNS: lost %s at %s port %d", device_id, ", ".join(addresses), port)
        if self._on_lost is None or self._closed:
            return
        try:
            self._on_lost(device_id, addresses, port)
        except Exception:
            log.exception("mDNS: on_lost failed")

    def _reevaluate(self) -> None:
        for name, info in list(self._known.items()):
            self._evaluate(name, info)

    def _evaluate(self, name: str, info: ServiceInfo) -> None:
        advert, reason = accept(
            info.properties,
            own_device_id=self.device_id,
            keys=self._keys(),
            now=self._clock(),
            protocol_version=self._protocol_version,
        )
        addresses = info.parsed_scoped_addresses()
        port = info.port
        if not reason and (not addresses or not port):
            reason = "no address or port"
        if reason or advert is None:
            gone = self._reported.pop(name, None)
            if gone is None:
                log.debug(
                    "mDNS: ignoring %s (device %s): %s",
                    name,
                    advert.device_id if advert else "?",
                    reason,
                )
            else:
                log.debug("mDNS: %s no longer matches: %s", name, reason)
                self._lost(gone[0], list(gone[1]), gone[2])
            return
        assert port is not None
        found = (advert.device_id, tuple(addresses), port)
        before = self._reported.get(name)
        if before == found:
            return
        self._reported[name] = found
        if before is not None:
            same_target = before[0] == advert.device_id and before[2] == port
            stale = [a for a in before[1] if not same_target or a not in addresses]
            if stale:
                self._lost(before[0], stale, before[2])
        log.info("mDNS: found %s at %s port %d", advert.device_id, ", ".join(addresses), port)
        try:
            self._on_found(advert.device_id, list(addresses), port)
        except Exception:
            log.exception("mDNS: on_found failed")


__all__ = ["DiscoveryError", "MdnsDiscovery", "ipv4_addresses"]
