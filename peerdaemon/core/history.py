"""Environments' history, restore and trash (docs/history.md).

A version is the environment's whole JSON at one moment, stored compressed. Versions are taken
while an environment changes (once per `interval` of activity, so a burst of edits is one
version), and before every act that replaces content: a restore, a resolve or a migration (the
spaces service calls `History.checkpoint`), a whole-environment write that removes more than
`put_threshold` of its entities, and a delete (the trash). Restoring writes the old JSON back
through `Registry.apply`: minimal edits that every replica converges to, never a rewind.

The policy (what is due, what to prune, what changed) is plain functions and synchronous
methods on the trio thread; `run` is the thin loop that calls them. Rows go through the store's
writer, ordered with the update log: a version taken before a change is enqueued before it, so
it is durable whenever the change is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import compress
from operator import is_not
from typing import TYPE_CHECKING, Any

import trio

from ..store import StoreError
from .errors import EXISTS, NOT_FOUND, OpError, is_failure

if TYPE_CHECKING:
    from ..store import HistoryRow, Store, Ticket, TrashRow
    from .registry import Registry

log = logging.getLogger("peerdaemon.history")

DAY = 86400.0
PRUNE_EVERY = 600.0  # seconds between two retention passes
COMPRESS_LEVEL = 6  # zlib: 9 saves ~2% more for twice the time on environment JSON

# reasons of a version (the `reason` column): `interval` and `first` are taken while the
# environment changes; the others before (or, `restored`/`untrashed`, after) an act
INTERVAL, FIRST, RESTORE, RESTORED, PUT, UNTRASHED, MIGRATION = (
    "interval",
    "first",
    "restore",
    "restored",
    "put",
    "untrashed",
    "migration",
)


@dataclass
class HistorySettings:
    """`history.*` in the config file (docs/config.md)."""

    enabled: bool = True
    interval: float = 300.0  # seconds of activity per interval version
    keep_days: float = 90.0  # versions older than this go (the newest of each env stays)
    keep_count: int = 200  # versions per environment, at most
    put_threshold: float = 0.5  # share of entities a whole-environment write may remove unrecorded
    trash_days: float = 30.0  # how long a deleted environment stays restorable

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> HistorySettings:
        """From `history.*` keys (or bare names); unknown names are ignored."""
        names = set(cls.__dataclass_fields__)
        picked = {k.removeprefix("history."): v for k, v in values.items() if "." not in k}
        picked.update({k[8:]: v for k, v in values.items() if k.startswith("history.")})
        return cls(**{k: v for k, v in picked.items() if k in names})


# -- content --------------------------------------------------------------------------------


def canonical(env: dict[str, Any]) -> bytes:
    """The JSON a version stores: sorted keys, so equal content hashes equal."""
    return json.dumps(env, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def pack(text: bytes) -> bytes:
    return zlib.compress(text, COMPRESS_LEVEL)


def unpack(blob: bytes) -> dict[str, Any]:
    value = json.loads(zlib.decompress(blob))
    if not isinstance(value, dict):
        raise ValueError("a stored version is not a JSON object")
    return value


_COLLECTIONS = (
    ("routes", "route", "routes"),
    ("data", "data bucket", "data buckets"),
    ("folders", "folder", "folders"),
    ("callbacks", "callback", "callbacks"),
)


def _by_uuid(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, item in enumerate(items if isinstance(items, list) else ()):
        key = item.get("uuid") if isinstance(item, dict) else None
        out[key if isinstance(key, str) and key else f"#{i}"] = item
    return out


def summarize(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What changed from `old` to `new`, short: "+2 routes, 1 route changed, name"."""
    if old is None:
        return "first version"
    parts: list[str] = []
    for key, one, many in _COLLECTIONS:
        before, after = _by_uuid(old.get(key)), _by_uuid(new.get(key))
        added = len(after.keys() - before.keys())
        removed = len(before.keys() - after.keys())
        changed = sum(1 for k in after.keys() & before.keys() if after[k] != before[k])
        if added:
            parts.append(f"+{added} {one if added == 1 else many}")
        if removed:
            parts.append(f"-{removed} {one if removed == 1 else many}")
        if changed:
            parts.append(f"{changed} {one if changed == 1 else many} changed")
    skip = {key for key, _, _ in _COLLECTIONS}
    fields = sorted(
        k for k in old.keys() | new.keys() if k not in skip and old.get(k) != new.get(k)
    )
    if fields:
        parts.append(", ".join("order" if k == "rootChildren" else k for k in fields))
    return ", ".join(parts) or "no change"


def _keeps_entities(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when `new` holds every entity of `old` at its place: told from the entities `new`
    does not share with `old` (a patch shares what it leaves, model.prepare), so a small edit of
    a big environment is not counted whole on every write."""
    for key, _, _ in _COLLECTIONS:
        a, b = old.get(key), new.get(key)
        if a is b:
            continue
        if type(a) is not list or type(b) is not list or len(a) != len(b):
            return False
        for i in compress(range(len(a)), map(is_not, a, b)):
            x, y = a[i], b[i]
            if type(x) is not dict or type(y) is not dict or x.get("uuid") != y.get("uuid"):
                return False
            if key == "routes" and not _same_uuids(x.get("responses"), y.get("responses")):
                return False
    return True


def _same_uuids(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not list or type(b) is not list or len(a) != len(b):
        return False
    return all(
        type(x) is dict and type(y) is dict and x.get("uuid") == y.get("uuid")
        for x, y in zip(a, b, strict=True)
    )


def _units(env: dict[str, Any]) -> set[str]:
    """The entities of an environment (routes, their responses, folders, data buckets,
    callbacks), by uuid: what "content removed" counts."""
    units: set[str] = set()
    for key, _, _ in _COLLECTIONS:
        for k, item in _by_uuid(env.get(key)).items():
            units.add(f"{key}:{k}")
            if key == "routes" and isinstance(item, dict):
                units.update(f"response:{r}" for r in _by_uuid(item.get("responses")))
    return units


def removed_share(old: dict[str, Any], new: dict[str, Any]) -> float:
    """The share (0..1) of `old`'s entities that `new` no longer holds."""
    if _keeps_entities(old, new):
        return 0.0
    before = _units(old)
    if not before:
        return 0.0
    return len(before - _units(new)) / len(before)


def prunable(
    rows: Iterable[HistoryRow],
    now: float,
    settings: HistorySettings,
    alive: Callable[[str], bool],
) -> dict[str, list[int]]:
    """env id -> versions retention removes: older than `keep_days`, or beyond the newest
    `keep_count`. The newest version of an environment that exists (or is in the trash) stays
    whatever its age: it is what the next version is compared with."""
    by_env: dict[str, list[HistoryRow]] = {}
    for row in rows:
        by_env.setdefault(row.env_id, []).append(row)
    out: dict[str, list[int]] = {}
    horizon = now - settings.keep_days * DAY
    for env_id, versions in by_env.items():
        versions.sort(key=lambda r: r.version)
        keep_newest = alive(env_id)
        extra = len(versions) - max(1, settings.keep_count)
        drop = [
            r.version
            for i, r in enumerate(versions)
            if (i < extra or r.time < horizon) and not (keep_newest and i == len(versions) - 1)
        ]
        if drop:
            out[env_id] = drop
    return out


# -- the service ----------------------------------------------------------------------------


@dataclass
class _Pending:
    """Changes since an environment's last version."""

    since: float
    devices: set[str] = field(default_factory=set)
    changes: int = 0


@dataclass
class _Head:
    """An environment's newest version: its number, digest, and content when at hand."""

    version: int
    digest: bytes
    blob: bytes | None = None


class History:
    """Versions and the trash of every environment of one registry (see the module's doc)."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        device_id: str,
        settings: HistorySettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.store = store
        self.device_id = device_id
        self.settings = settings or HistorySettings()
        self.clock = clock
        self._heads: dict[str, _Head] = {}
        self._pending: dict[str, _Pending] = {}
        self._last: Ticket | None = None
        self._token: int | None = None
        self._wakeup: trio.Event | None = None

    # -- wiring --------------------------------------------------------------------------------

    def attach(self) -> None:
        """Read the newest version of each environment and follow the registry. Environments
        that may have changed unrecorded are checked once against their newest version
        (changes made before a crash, or before history was on, become a version; one without
        any becomes `first`): those the registry loaded at start. One it did not load was
        unloaded with nothing waiting here (a document with changes waiting for a version
        stays loaded: the keeper below), and has not changed since."""
        self._heads = {e: _Head(v, d) for e, (v, d) in self.store.history_heads().items()}
        now = self.clock()
        loaded = getattr(self.registry, "loaded", None)
        for env_id in self.registry.envs:
            if loaded is None or loaded(env_id):
                self._pending.setdefault(env_id, _Pending(now))
        self._token = self.registry.add_listener(self._on_change)
        keep = getattr(self.registry, "add_keeper", None)  # core/residency.py
        if keep is not None:
            keep(lambda env_id: self.settings.enabled and env_id in self._pending)
        self.registry.before_apply.append(self._before_apply)
        self.registry.before_delete.append(self._before_delete)
        migrating = getattr(self.registry, "before_migrate", None)  # model/migrations.py
        if migrating is not None:
            migrating.append(self._before_migrate)

    def configure(self, settings: HistorySettings) -> None:
        """New settings (a reload of the config file): the loop picks them up at once."""
        self.settings = settings
        if self._wakeup is not None:
            self._wakeup.set()

    def _on_change(self, env_id: str, update: bytes, origin: str) -> None:
        if env_id.startswith(("space:", "files:")):
            return
        pending = self._pending.get(env_id)
        if pending is None:
            pending = self._pending[env_id] = _Pending(self.clock())
            if env_id not in self._heads and self._wakeup is not None:
                self._wakeup.set()  # a new environment: its first version now
        pending.changes += 1
        device = self._device(origin)
        if device is not None:
            pending.devices.add(device)

    def _device(self, origin: str) -> str | None:
        """Who made a change: a peer's device id, a hub (`hub:URL`: the device behind it is not
        known here), else this device (socket clients, linked files); repairs are no one's."""
        if origin == "repair":
            return None
        if origin.startswith("peer:"):
            return origin[len("peer:") :]
        if origin.startswith("hub:"):
            return origin
        return self.device_id

    def _before_apply(
        self, env_id: str, old: dict[str, Any], new: dict[str, Any], origin: str
    ) -> None:
        """A whole-environment write that removes much: keep what it replaces."""
        if not self.settings.enabled:
            return
        share = removed_share(old, new)
        if share > self.settings.put_threshold:
            self.checkpoint(
                env_id, PUT, state=old, note=f"removed {round(share * 100)}% of its entities"
            )

    def _before_migrate(self, env_id: str) -> None:
        """A model migration rewrites the document: what it holds now becomes a version."""
        self.checkpoint(env_id, MIGRATION)

    def _before_delete(self, env_id: str, origin: str) -> None:
        """Every deletion passes here (`Registry.delete`): the environment's last content goes
        to the trash, in the store's queue before the delete itself."""
        env = self.registry.export(env_id)
        info = {
            "name": env.get("name") if isinstance(env.get("name"), str) else "",
            "origin": origin,
            "device": self._device(origin) or self.device_id,
            "routes": len(env.get("routes") or ()),
        }
        self._last = self.store.enqueue_trash(env_id, self.clock(), info, pack(canonical(env)))
        self._pending.pop(env_id, None)

    # -- versions --------------------------------------------------------------------------------

    def checkpoint(
        self,
        env_id: str,
        reason: str,
        *,
        state: dict[str, Any] | None = None,
        note: str | None = None,
    ) -> Ticket | None:
        """Take a version of `env_id` now (or of `state`, its JSON, when the caller has it), as
        the act `reason` is about to replace its content: "resolve", "migration", "restore"...
        Call it on the trio thread before making the change: the version is enqueued ahead of
        it. None if the content is the newest version's already (or history is off)."""
        if not self.settings.enabled:
            return None
        return self._record(env_id, reason, state, note)

    def _record(
        self, env_id: str, reason: str, state: dict[str, Any] | None, note: str | None = None
    ) -> Ticket | None:
        env = state if state is not None else self.registry.export(env_id)
        head = self._heads.get(env_id)
        built = _build(env_id, env, head.digest if head else None, self._head_blob(env_id, head))
        held = self.registry.envs.get(env_id)
        if state is None or (held is not None and held.cache is state):
            pending = self._pending.pop(env_id, None)  # the version holds those changes
        else:  # another content (a side that loses a resolve): the document's changes still wait
            pending = None
        return self._enqueue(env_id, reason, built, head, pending, note)

    async def _record_in_thread(self, env_id: str, reason: str) -> Ticket | None:
        """`_record` of an interval version, with the JSON's encoding, hash, compression and
        summary in a worker thread: an environment of many MB must not stall the daemon's
        thread every interval. Only the export (pycrdt) stays on it."""
        env = self.registry.export(env_id)  # the cached export: never mutated, safe to share
        head = self._heads.get(env_id)
        pending = self._pending.get(env_id)
        seen = pending.changes if pending else 0
        digest = head.digest if head else None
        blob = self._head_blob(env_id, head)
        built = await trio.to_thread.run_sync(_build, env_id, env, digest, blob)
        if env_id not in self.registry.envs:
            return None  # deleted meanwhile (it is in the trash)
        if self._heads.get(env_id) is not head:
            return self._record(env_id, reason, None)  # a checkpoint came first: compare anew
        pending = self._pending.pop(env_id, None)
        if pending is not None and pending.changes != seen:  # changed meanwhile: not in `env`
            self._pending[env_id] = _Pending(self.clock(), set(pending.devices))
        return self._enqueue(env_id, reason, built, head, pending, None)

    def _enqueue(
        self,
        env_id: str,
        reason: str,
        built: _Built | None,
        head: _Head | None,
        pending: _Pending | None,
        note: str | None,
    ) -> Ticket | None:
        if built is None:
            return None  # the newest version's content already
        info: dict[str, Any] = {
            "devices": sorted(pending.devices) if pending else [],
            "summary": built.summary,
            "size": built.size,
        }
        if note:
            info["note"] = note
        version = head.version + 1 if head is not None else 1
        ticket = self.store.enqueue_version(
            env_id, version, self.clock(), reason, info, built.digest, built.blob
        )
        self._heads[env_id] = _Head(version, built.digest, built.blob)
        self._last = ticket
        return ticket

    def _head_blob(self, env_id: str, head: _Head | None) -> bytes | None:
        """The newest version's compressed JSON (read from the store after a restart)."""
        if head is None:
            return None
        return head.blob or self.store.history_blob(env_id, head.version)

    def due(self, now: float) -> list[str]:
        """Environments whose changes wait for a version: `interval` passed since the first
        of them, or it has none yet."""
        out = []
        for env_id, pending in list(self._pending.items()):
            if env_id not in self.registry.envs:
                del self._pending[env_id]
            elif env_id not in self._heads or now - pending.since >= self.settings.interval:
                out.append(env_id)
        return out

    def take_due(self, now: float) -> int:
        """Take the versions that are due; -> how many were written."""
        if not self.settings.enabled:
            self._pending.clear()
            return 0
        written = 0
        for env_id in self.due(now):
            reason = INTERVAL if env_id in self._heads else FIRST
            try:
                written += self._record(env_id, reason, None) is not None
            except BaseException as exc:
                if not is_failure(exc):
                    raise
                log.error("environment %s: no version taken", env_id, exc_info=exc)
        return written

    def prune(self, now: float) -> int:
        """Retention: old versions and expired trash entries; -> rows queued for removal."""
        trash = {row.env_id for row in self.store.trash_rows()}

        def alive(env_id: str) -> bool:
            return env_id in self.registry.envs or env_id in trash

        removed = 0
        for env_id, versions in prunable(
            self.store.history_rows(), now, self.settings, alive
        ).items():
            self._last = self.store.enqueue_prune(env_id, versions)
            head = self._heads.get(env_id)
            if head is not None and head.version in versions:
                del self._heads[env_id]
            removed += len(versions)
        horizon = now - self.settings.trash_days * DAY
        for row in self.store.trash_rows():
            if row.time < horizon:
                self._last = self.store.enqueue_untrash(row.env_id)
                removed += 1
        return removed

    async def settled(self) -> None:
        """Until every history row enqueued so far is durable (reads see committed rows)."""
        if self._last is not None:
            try:
                await self._last.latest.wait()
            except StoreError:
                pass  # logged by the store; reads show what was committed

    def versions(self, env_id: str) -> list[dict[str, Any]]:
        """An environment's versions, oldest first (committed: `await settled()` first)."""
        rows = self.store.history_rows(env_id)
        if not rows and env_id not in self.registry.envs:
            raise OpError(NOT_FOUND, f"no environment with id {env_id!r}, and no history of it")
        return [
            {
                "version": r.version,
                "time": r.time,
                "reason": r.reason,
                "devices": list(r.info.get("devices") or ()),
                "summary": r.info.get("summary", ""),
                "note": r.info.get("note"),
                "size": r.info.get("size"),
                "stored": r.size,
            }
            for r in rows
        ]

    def at(self, env_id: str, version: int) -> dict[str, Any]:
        """The JSON of one version (committed: `await settled()` first)."""
        blob = self.store.history_blob(env_id, version)
        if blob is None:
            known = [r.version for r in self.store.history_rows(env_id)]
            have = f"versions {known[0]}..{known[-1]}" if known else "no versions"
            raise OpError(NOT_FOUND, f"environment {env_id!r} has no version {version} ({have})")
        return unpack(blob)

    def restore(self, env_id: str, version: int, origin: str) -> tuple[bool, Ticket | None]:
        """Make `env_id` what it was at `version`, as new edits every replica converges to;
        the current content is kept as a version first. -> (changed, last ticket)."""
        from ..model import prepare

        self.registry.get(env_id)  # UnknownEnvironment: not-found
        old = self.at(env_id, version)
        old["uuid"] = env_id
        prepared, _notes = prepare(old, env_id)
        before = self.checkpoint(env_id, RESTORE, note=f"before restoring version {version}")
        changed, ticket = self.registry.apply(env_id, prepared, origin)
        after = self.checkpoint(env_id, RESTORED, note=f"version {version}")
        last = after or ticket or before
        return changed, last

    # -- trash -----------------------------------------------------------------------------------

    def trash(self) -> list[dict[str, Any]]:
        """The trash, oldest first, with when each entry expires (committed rows)."""
        days = self.settings.trash_days
        return [_trash_entry(row, days) for row in self.store.trash_rows()]

    def untrash(self, env_id: str, origin: str, *, new_id: bool = False) -> tuple[str, Ticket]:
        """Bring a trashed environment back as a local one (under a fresh id with `new_id`).
        An environment with that id that exists again is never replaced: `exists`."""
        from ..model import prepare

        blob = self.store.trash_blob(env_id)
        if blob is None:
            raise OpError(NOT_FOUND, f"no environment with id {env_id!r} in the trash")
        if env_id in self.registry.envs and not new_id:
            raise OpError(
                EXISTS,
                f"an environment with id {env_id} exists again (re-imported, or shared back): "
                "untrash it with new_id (--new-id) to bring the trashed one back beside it",
            )
        env = unpack(blob)
        target = str(uuid.uuid4()) if new_id else env_id
        env["uuid"] = target
        prepared, _notes = prepare(env, target)
        self.registry.create(target, prepared, origin)
        self.store.enqueue_untrash(env_id)
        note = f"from the trash as {target}" if target != env_id else "from the trash"
        ticket = self.checkpoint(target, UNTRASHED, state=prepared, note=note)
        last = ticket or self.registry.get(target).last_ticket
        assert last is not None
        self._last = last
        return target, last

    # -- the loop --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take due versions and prune, until cancelled."""
        task_status.started()
        next_prune = 0.0
        while True:
            now = self.clock()
            if not self.settings.enabled:
                self._pending.clear()
            for env_id in self.due(now) if self.settings.enabled else ():
                reason = INTERVAL if env_id in self._heads else FIRST
                try:
                    await self._record_in_thread(env_id, reason)
                except BaseException as exc:
                    if not is_failure(exc):
                        raise
                    log.error("environment %s: no version taken", env_id, exc_info=exc)
            if now >= next_prune:
                next_prune = now + min(PRUNE_EVERY, self.settings.interval)
                await self.settled()  # a pass reads committed rows
                try:
                    self.prune(now)
                except BaseException as exc:
                    if not is_failure(exc):
                        raise
                    log.error("history: pruning failed", exc_info=exc)
            self._wakeup = trio.Event()
            with trio.move_on_after(max(0.05, min(self.settings.interval / 4, 10.0))):
                await self._wakeup.wait()

    def stats(self) -> dict[str, Any]:
        return {**self.store.history_stats(), "waiting": len(self._pending)}


@dataclass(frozen=True)
class _Built:
    """A version ready to store."""

    digest: bytes
    blob: bytes
    summary: str
    size: int


def _build(
    env_id: str, env: dict[str, Any], head_digest: bytes | None, head_blob: bytes | None
) -> _Built | None:
    """Encode, hash, compress and summarize `env` against the newest version; None if it is
    that version's content. Pure: runs in a worker thread for interval versions."""
    text = canonical(env)
    digest = hashlib.sha256(text).digest()
    if digest == head_digest:
        return None
    previous = None
    if head_blob is not None:
        try:
            previous = unpack(head_blob)
        except (ValueError, zlib.error):
            log.warning("environment %s: its newest version is unreadable", env_id)
    return _Built(digest, pack(text), summarize(previous, env), len(text))


def _trash_entry(row: TrashRow, days: float) -> dict[str, Any]:
    return {
        "id": row.env_id,
        "name": row.info.get("name", ""),
        "deleted": row.time,
        "expires": row.time + days * DAY,
        "origin": row.info.get("origin"),
        "device": row.info.get("device"),
        "routes": row.info.get("routes"),
        "stored": row.size,
    }
