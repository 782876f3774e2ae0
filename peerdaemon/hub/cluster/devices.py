"""`devices_per_user` across a cluster (docs/hub-cluster.md, "Limits across the cluster").

`ClusterDevices` is the single hub's `Devices` (this process's count, checked first and at once,
on the synchronous auth path) plus the cluster's slots in Redis (`bus.DeviceSlots`: a lease per
process and device, acquired by one Lua script, expiring after a process that died). The
cluster's answer comes a few milliseconds after the admission: a device the cluster refuses
(another process holds the user's other devices) has its y-websocket connections closed with
`too-many-devices`, as a refusal at admission would, and so are its daemons' links
(`PeerEndpoint.deny_device`, the same close reason). While Redis is away, this process's own
count is the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..accounts import DeviceLease, Devices
from .bus import BusError, DeviceSlots

if TYPE_CHECKING:
    from .node import ClusterNode

__all__ = ["ClusterDevices"]

log = logging.getLogger("peerdaemon.hub.cluster")

LEASE_TTL_MS = 15_000


class ClusterDevices(Devices):
    def __init__(self, limit_of: Callable[[str], int], node: ClusterNode) -> None:
        super().__init__(limit_of)
        self.node = node
        self.slots = DeviceSlots(node.bus.client)
        self._claimed: set[tuple[str, str]] = set()  # (user, device) holding a cluster slot
        self.refused = 0

    def acquire(self, user: str, device: str) -> DeviceLease:
        lease = super().acquire(user, device)  # LimitExceeded past this process's own count
        key = (user, device)
        if key not in self._claimed:
            self.node.spawn(self._claim, user, device)
        return lease

    def _release(self, user: str, device: str) -> None:
        super()._release(user, device)
        if device not in self._held.get(user, {}) and (user, device) in self._claimed:
            self._claimed.discard((user, device))
            self.node.spawn(self._give_back, user, device)

    async def _claim(self, user: str, device: str) -> None:
        try:
            ok = await self.slots.acquire(
                user, device, self.node.process, self._limit_of(user), LEASE_TTL_MS
            )
        except BusError as exc:
            log.warning("hub: device slots unavailable, this process's count applies: %s", exc)
            return
        if device not in self._held.get(user, {}):  # gone meanwhile
            if ok:
                await self._give_back(user, device)
            return
        if ok:
            self._claimed.add((user, device))
            return
        self.refused += 1
        log.info("hub: %s: device %s refused by the cluster (too many devices)", user, device)
        if self.node.rooms is not None:
            for conn in self.node.rooms.connections():
                if conn.user == user and conn.device == device:
                    conn.deny("too-many-devices")
        deny = getattr(self.node.peer_endpoint, "deny_device", None)
        if deny is not None:  # the daemons' links, with the reason a refusal at admission gives
            limit = self._limit_of(user)
            detail = f"user {user} already has {limit} device(s) connected (limit {limit})"
            deny(user, device, detail)  # (on the hub's other processes)
        self.node.wake()

    async def _give_back(self, user: str, device: str) -> None:
        try:
            await self.slots.release(user, device, self.node.process)
        except BusError:
            pass  # the lease expires by itself

    async def renew(self) -> None:
        """Keep this process's leases alive (a killed process's expire after `LEASE_TTL_MS`)."""
        while True:
            await trio.sleep(LEASE_TTL_MS / 3000)
            for user, device in list(self._claimed):
                try:
                    await self.slots.renew(
                        user, device, self.node.process, self._limit_of(user), LEASE_TTL_MS
                    )
                except BusError:
                    break
