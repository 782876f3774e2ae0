"""Cloud Mocks across a cluster (docs/hub-cluster.md, "Hosted mocks across the cluster").

Every process serves every hosted mock of the cluster through its own runner: a request for
`/mock/SPACE/ENV/` may reach any process behind the balancer, which answers it itself, with no
hop to an owning process and nothing to hand over when a process dies. For that, each process
follows every space document and the documents of every hosted environment (`rooms()`, read by
`ClusterNode`), as it follows an open room.

The limits are the cluster's:
- `hosted_mocks`: which of an owner's mocks are served is decided from the space documents
  alone (the first `hosted_mocks` turned on, over all the owner's spaces), so every process
  that has read the same documents makes the same choice, with no shared state to rebuild
  after Redis restarts empty.
- `mock_rps`: a fixed one-second window per mock in Redis (`bus.Counters`), asked after this
  process's own token bucket let the request through; while Redis is away the bucket is the
  limit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...spaces import SpaceDoc
from ..docs import FILES_PREFIX, SPACE_PREFIX
from ..mocks import HostedMocks
from .bus import BusError, Counters
from .protocol import room_of

if TYPE_CHECKING:
    from .node import ClusterNode

__all__ = ["ClusterMocks", "owner_ranking"]

log = logging.getLogger("peerdaemon.hub.cluster")


def owner_ranking(wanted: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """`SPACE/ENV` keys of one owner's wanted mocks (space -> env -> setting), first turned on
    first (ties by key): the same order on every process that read the same documents."""
    keys = [
        ((setting.get("at") or 0, f"{space}/{env}"))
        for space, envs in wanted.items()
        for env, setting in envs.items()
    ]
    return [key for _, key in sorted(keys)]


class ClusterMocks(HostedMocks):
    def __init__(self, node: ClusterNode, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node = node
        self.counters = Counters(node.bus.client)
        self.shared_refusals = 0

    # -- which documents this process follows ------------------------------------------------------
    def rooms(self) -> set[str]:
        """Every space document, and each hosted environment's documents (content, files)."""
        if not self.config.enabled or self.accounts is None:
            return set()
        out: set[str] = set()
        for info in self.accounts.spaces():
            space = info["id"]
            try:
                out.add(room_of(space, SPACE_PREFIX + space))
            except ValueError:
                continue
            for env in self._wanted(space):
                out.add(room_of(space, env))
                out.add(room_of(space, FILES_PREFIX + env))
        return out

    def _wanted(self, space: str) -> dict[str, dict[str, Any]]:
        if not self.docs.has(space, SPACE_PREFIX + space):
            return {}
        doc = self.docs.get_doc(space, SPACE_PREFIX + space)
        return SpaceDoc(doc).hosted() if doc is not None else {}

    # -- hosted_mocks: the same choice on every process --------------------------------------------
    def _reconcile(self, space: str) -> None:
        """The space's mocks, and those of the owner's other spaces: a mock turned on or off
        here may move another space's mock in or out of the owner's limit."""
        owner = self.accounts.owner_of(space) if self.accounts is not None else None
        others = [
            s
            for s in self.docs.spaces()
            if s != space and owner is not None and self.accounts is not None
            if self.accounts.owner_of(s) == owner
        ]
        super()._reconcile(space)
        for other in others:
            super()._reconcile(other)

    def _over_limit(self, key: str, owner: str | None, per_owner: int | None) -> str | None:
        refused = super()._over_limit(key, owner, None)  # this process's `max_hosted`
        if refused is not None or per_owner is None or owner is None or self.accounts is None:
            return refused
        spaces = [s for s in self.docs.spaces() if self.accounts.owner_of(s) == owner]
        wanted = {
            s: {e: m for e, m in self._wanted(s).items() if self.docs.has(s, e)} for s in spaces
        }
        if key in owner_ranking(wanted)[:per_owner]:
            return None
        return f"the space's owner may host at most {per_owner} Cloud Mocks"

    # -- mock_rps: the cluster's window --------------------------------------------------------------
    async def allow_rate(self, space: str, env: str, rate: float) -> bool:
        try:
            hits = await self.counters.hit(f"mock:{space}/{env}", 1000)
        except BusError as exc:
            log.debug("hub: mock rate counter unavailable, this process's bucket applies: %s", exc)
            return True
        if hits <= rate:
            return True
        self.shared_refusals += 1
        return False
