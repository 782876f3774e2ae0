"""Which environments' documents stay in memory (docs/store.md, "Documents in memory").

A daemon holds many more environments than it uses: documents are loaded from the store the
first time something needs one (`Registry`), and a document idle through `sweeps` sweeps in a row
is unloaded again, as y-sweet drops a document after two idle checkpoints. While unloaded, an
environment is its `Facts`: what listings and a link's initial exchange read (name, route count,
model, state vector, delete set), kept in the store beside the updates they describe, so a
restart reads no document either.

`Residency` is the decision (sans-I/O: the caller passes what was used, and the time), `Sweeper`
its trio shell under the supervisor. The registry says what may go (no subscriber, nothing
pending, its last write durable, no service keeping it: `Registry.add_keeper`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..model.yupdate import covered, read_delete_set, read_state_vector
from .heap import FreeHeap

log = logging.getLogger("peerdaemon.residency")

__all__ = [
    "FACTS_VERSION",
    "Facts",
    "Residency",
    "Sweeper",
    "covers",
    "holds_news",
]

FACTS_VERSION = 1
"""The layout of `Facts` in the store's meta (`v`): another one is read as none."""


@dataclass(frozen=True, slots=True)
class Facts:
    """An unloaded environment, as read without its document."""

    name: str
    last_migration: int | float | None
    newer: bool
    routes: int
    model: int
    state_vector: bytes
    deletions: bytes
    """The document's update against its own state vector: no structs, its whole delete set.
    It is the answer to any state vector that holds ours (a peer in step)."""

    def to_meta(self, marks: tuple[int | None, int | None]) -> dict[str, Any]:
        return {
            "v": FACTS_VERSION,
            "marks": list(marks),
            "name": self.name,
            "lastMigration": self.last_migration,
            "newer": self.newer,
            "routes": self.routes,
            "model": self.model,
            "sv": self.state_vector,
            "ds": self.deletions,
        }

    @classmethod
    def from_meta(
        cls, meta: dict[str, Any] | None, marks: tuple[int | None, int | None]
    ) -> Facts | None:
        """The facts kept for exactly the stored state `marks` says; None if there are none
        (or they describe an older state, or anything in them is off)."""
        if not meta or meta.get("v") != FACTS_VERSION or meta.get("marks") != list(marks):
            return None
        last = meta.get("lastMigration")
        values = (
            meta.get("name"),
            meta.get("newer"),
            meta.get("routes"),
            meta.get("model"),
            meta.get("sv"),
            meta.get("ds"),
        )
        name, newer, routes, model, sv, ds = values
        if (
            not isinstance(name, str)
            or not isinstance(newer, bool)
            or type(routes) is not int
            or type(model) is not int
            or not isinstance(sv, bytes)
            or not isinstance(ds, bytes)
            or not (last is None or (type(last) in (int, float) and math.isfinite(last)))
        ):
            return None
        return cls(name, last, newer, routes, model, sv, ds)


# -- reading state vectors and delete sets ----------------------------------------------------


def covers(big: bytes, small: bytes) -> bool:
    """Whether state vector `big` holds every item state vector `small` does (raises
    ValueError on bytes that are not one)."""
    have = read_state_vector(big)
    return all(clock <= have.get(client, 0) for client, clock in read_state_vector(small).items())


def holds_news(facts: Facts, update: bytes, diff: Callable[[bytes, bytes], bytes]) -> bool:
    """Whether `update` holds anything the environment `facts` describes does not: an item
    beyond its state vector, or a deletion outside its delete set. `diff` is pycrdt's
    `get_update` (the update's structs beyond a state vector, and its whole delete set). True
    whenever that cannot be told: loading the document is never wrong."""
    try:
        beyond = diff(update, facts.state_vector)
        if beyond[:1] != b"\x00":  # structs this document has not seen
            return True
        theirs = read_delete_set(beyond, 1)
        if not theirs:
            return False
        ours = read_delete_set(facts.deletions, 1)
    except Exception:
        return True
    return not all(
        covered(ours.get(client, []), a, b) for client, ranges in theirs.items() for a, b in ranges
    )


# -- the decision -------------------------------------------------------------------------------


class Residency:
    """Which loaded documents to unload, sweep after sweep.

    `decide(now, loaded)` is one sweep: `loaded` lists every loaded document with whether it was
    used since the previous sweep and whether it may go now. One unused through `sweeps` sweeps
    in a row goes (as soon as it may: a subscription that ended, a write that became durable).
    Sweeps are `evict_after / sweeps` seconds apart (`next_sweep`); `evict_after` 0 keeps every
    document."""

    def __init__(self, evict_after: float = 60.0, sweeps: int = 2) -> None:
        self.evict_after = 0.0
        self.sweeps = 2
        self.configure(evict_after, sweeps)
        self._last_use: dict[str, int] = {}
        """env id -> the number of the last sweep that found it used (or newly loaded)."""
        self._count = 0
        self._last_sweep: float | None = None

    def configure(self, evict_after: float, sweeps: int = 2) -> None:
        if not evict_after >= 0 or not math.isfinite(evict_after):
            raise ValueError("evict_after must be a number of seconds >= 0")
        if type(sweeps) is not int or sweeps < 1:
            raise ValueError("sweeps must be a whole number >= 1")
        self.evict_after = float(evict_after)
        self.sweeps = sweeps

    @property
    def interval(self) -> float | None:
        """Seconds between two sweeps; None when documents stay loaded."""
        return self.evict_after / self.sweeps if self.evict_after > 0 else None

    def next_sweep(self, now: float) -> float | None:
        """When the next sweep is due (None: never)."""
        interval = self.interval
        if interval is None:
            return None
        return now if self._last_sweep is None else self._last_sweep + interval

    def decide(self, now: float, loaded: Iterable[tuple[str, bool, bool]]) -> list[str]:
        """One sweep: (env id, used since the previous sweep, may go) -> the ids to unload."""
        self._last_sweep = now
        self._count += 1
        count = self._count
        last_use = self._last_use
        seen: dict[str, int] = {}
        out: list[str] = []
        for env_id, used, may_go in loaded:
            last = last_use.get(env_id)
            if used or last is None:
                last = count
            seen[env_id] = last
            if may_go and self.interval is not None and count - last >= self.sweeps:
                out.append(env_id)
        self._last_use = {e: n for e, n in seen.items() if e not in out}
        return out


class Sweepable(Protocol):
    def sweep(self, residency: Residency, now: float) -> list[str]: ...


class Sweeper:
    """The sweep as a service: asks the registry to sweep when `Residency` says, and gives the
    freed heap back to the system after documents went (core/heap.py)."""

    def __init__(
        self, registry: Sweepable, residency: Residency, heap: FreeHeap | None = None
    ) -> None:
        self.registry = registry
        self.residency = residency
        self.heap = heap if heap is not None else FreeHeap()
        self.unloaded = 0
        self._changed = trio.Event()

    def configure(self, evict_after: float, sweeps: int | None = None) -> None:
        """New settings (a reload of the config file): the next sweep follows them."""
        self.residency.configure(evict_after, self.residency.sweeps if sweeps is None else sweeps)
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            due = self.residency.next_sweep(trio.current_time())
            self._changed = trio.Event()
            if due is None:
                await self._changed.wait()
                continue
            with trio.move_on_at(due):
                await self._changed.wait()
                continue
            self.sweep_now()

    def sweep_now(self) -> list[str]:
        try:
            gone = self.registry.sweep(self.residency, trio.current_time())
        except Exception:  # a bug here must not end the daemon: documents just stay loaded
            log.exception("unloading idle documents failed")
            return []
        if gone:
            self.unloaded += len(gone)
            log.debug("unloaded %d idle documents", len(gone))
            self.heap.trim()
        return gone
