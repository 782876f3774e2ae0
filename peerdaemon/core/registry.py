"""The environments a daemon holds, and the one update stream that leaves them.

Every change to a document, whoever makes it (a socket client, a merged Yjs update, later a LAN
peer or the hub), goes through `Registry`, which turns the document's transaction into one Yjs
update and hands that same update to the store (durability), to subscribers (the socket) and to
listeners (mirrors, peers, the hub). Documents stay on the trio thread; only bytes leave it.

Every environment is listed (`envs`), but its document is in memory only while used: it is
loaded from the store on first use (`Environment.doc`), and a sweep unloads it again once idle
(core/residency.py), keeping the facts that listings and a peer's initial exchange read
(`summary`, `state_vector`, `model_of`, an in-step `state_update`). Services that need a
document loaded say so with `add_keeper`, never by holding a `Doc` across awaits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pycrdt import Doc, Map, get_update

from ..model import LAST_MIGRATION, apply_environment, export_environment
from ..model.layout import ENV_ROOT
from ..model.lib0 import EMPTY_UPDATE
from ..model.migrations import META_ROOT, daemon_version, doc_version, migrate
from ..model.strays import Malformed, StrayFinder, decode, delete_update, has_strays
from ..store import Store, Ticket
from .errors import is_failure
from .events import EventLog
from .pointers import Touched, changed_paths
from .residency import Facts, Residency, covers, holds_news

log = logging.getLogger("peerdaemon.registry")

ChangeListener = Callable[[str, bytes, str], None]
"""(env id, Yjs update, origin): called for every change, after it is queued for the store."""
Keeper = Callable[[str], bool]
"""(env id) -> whether a service needs the environment's document to stay loaded."""

Subscriber = Callable[[dict[str, Any]], None]
Follower = tuple[str, int]
"""(what it is, its token): `("subscriber", 3)`, `("listener MirrorService._on_change", 1)`."""
"""Receives `{"type": "change", ...}` / `{"type": "deleted", ...}` events of one environment."""


class UnknownEnvironment(KeyError):
    def __init__(self, env_id: str) -> None:
        super().__init__(env_id)
        self.env_id = env_id


class UpdateRejected(ValueError):
    """Bytes that are not a Yjs update, or an update that creates no environment."""


class UnsupportedUpdate(Exception):
    """An update yrs would take but that is not standard Yjs (yrs' own move and weak-link
    content): refused, since what it holds cannot be checked (model/strays.py). Not a
    ValueError: on a peer link it is that document's failure, not the peer's protocol error,
    so one such update relayed by a hub does not end every daemon's link."""


class Environment:
    """One environment: its document while loaded (`doc` loads it from the store when it is
    not), else its `facts`; what follows it (subscribers) and its last store write."""

    __slots__ = (
        "id",
        "_doc",
        "_loader",
        "facts",
        "used",
        "created",
        "ticket",
        "cache",
        "subscribers",
        "pending",
        "strays",
        "kept",
        "model",
        "_meta_watch",
    )

    def __init__(
        self,
        id: str,
        doc: Doc | None = None,
        *,
        loader: Callable[[Environment], None] | None = None,
        facts: Facts | None = None,
    ) -> None:
        self.id = id
        self._doc = doc
        self._loader = loader
        self.facts = facts
        """What listings read while the document is not loaded (core/residency.py)."""
        self.used = True
        """Whether anything used the document since the last sweep (core/residency.py)."""
        self.created = time.time()
        self.ticket: Ticket | None = None
        """The store ticket of the document's last change."""
        self.cache: dict[str, Any] | None = None
        self.subscribers: dict[int, Subscriber] = {}
        self.pending: list[bytes] = []
        self.strays = StrayFinder()
        """Finds text that updates put in the document's arrays (model/strays.py)."""
        self.kept: tuple[int | None, int | None] | None = None
        """The store marks of the state whose facts the store keeps (`Store.index`)."""
        self.model: int | None = None
        """The loaded document's model version (`model_of`), until its `meta` map changes
        (`Registry._track` observes it): every check of whether a change may sync reads it."""
        self._meta_watch: Any = None  # (the subscription lasts while it is referenced)

    @property
    def doc(self) -> Doc:
        """The document, loaded from the store if it is not in memory (a use: see `used`)."""
        self.used = True
        doc = self._doc
        if doc is None:
            if self._loader is None:
                raise RuntimeError(f"environment {self.id}: no document and no store to load it")
            self._loader(self)
            doc = self._doc
            assert doc is not None
        return doc

    @doc.setter
    def doc(self, doc: Doc) -> None:
        self._doc = doc
        self.model = None

    @property
    def loaded(self) -> bool:
        return self._doc is not None

    @property
    def last_ticket(self) -> Ticket | None:
        """What says the document as it is now is durable: the newest attempt of its last
        write (a write that failed for a passing reason is retried by the store)."""
        return self.ticket.latest if self.ticket is not None else None

    def environment_map(self) -> Map:
        return self.doc.get(ENV_ROOT, type=Map)


class Registry:
    def __init__(self, store: Store, events: EventLog, *, model_version: int | None = None) -> None:
        self.store = store
        self.events = events
        self.model_version = daemon_version() if model_version is None else model_version
        """The model this daemon writes new documents at and migrates to (model/migrations.py);
        lower than MODEL_VERSION only in tests of two daemon versions side by side."""
        self.before_migrate: list[Callable[[str], None]] = []
        """(env id): before `migrate` changes a document (a history checkpoint, "migration")."""
        self.envs: dict[str, Environment] = {}
        self._listeners: dict[int, ChangeListener] = {}
        self._next_token = 1
        self._failing: dict[tuple[str, str, int], str] = {}
        """(env id, follower) -> the reason it last failed: reported once, not on every change."""
        self.before_apply: list[Callable[[str, dict[str, Any], dict[str, Any], str], None]] = []
        """(env id, its JSON now, the JSON replacing it, origin): before a whole-environment
        write changes the document (core/history.py keeps what a large removal replaces)."""
        self.before_delete: list[Callable[[str, str], None]] = []
        """(env id, origin): before any deletion, while the environment is still readable
        (core/history.py: the trash). Every deletion path passes here."""
        self._keepers: dict[int, Keeper] = {}
        self._failed_keepers: set[int] = set()
        self.loads = 0
        """Documents loaded from the store since start (at start, or later on first use)."""
        self.unloads = 0

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> int:
        """List every environment of the store; called once at start. An environment whose
        facts were kept for the state stored (it was unloaded, or the daemon stopped, with
        nothing written since) stays unloaded; any other one is loaded now, as it may have
        changed since (a crash), or was stored by an older daemon."""
        for env_id, (upto, seq, meta) in self.store.index().items():
            if env_id.startswith(("space:", "files:")):
                continue  # space documents (the spaces service), files (core/attachments.py)
            facts = Facts.from_meta(meta, (upto, seq))
            env = Environment(env_id, loader=self._load, facts=facts)
            env.kept = (upto, seq) if facts is not None else None
            self.envs[env_id] = env
            if facts is None:
                self._load(env)
        return len(self.envs)

    def _load(self, env: Environment) -> None:
        """Rebuild a document from the store: the first use of an environment not in memory."""
        doc = Doc()
        for update in self.store.updates_of(env.id):
            doc.apply_update(update)
        env.doc = doc
        env.facts = None
        env.cache = None
        env.strays = StrayFinder()
        env.used = True
        self.loads += 1
        self._track(env)
        if has_strays(doc):  # stored before they were removed (roots: cheap to tell)
            self._remove_strays(env, None)

    def _track(self, env: Environment) -> Environment:
        def on_transaction(event: Any) -> None:
            update = event.update
            if update != EMPTY_UPDATE:
                env.pending.append(update)

        def on_meta(_event: Any) -> None:
            env.model = None  # `meta.model` may have changed (a migration, a peer's)

        assert env._doc is not None
        env._doc.observe(on_transaction)
        env._meta_watch = env._doc.get(META_ROOT, type=Map).observe(on_meta)
        return env

    # -- reading -------------------------------------------------------------------------------

    def get(self, env_id: str) -> Environment:
        """The environment, for a use of it (an unused one is unloaded after a while: reads of
        its facts, `summary`, `state_vector`, `model_of`, are no use)."""
        try:
            env = self.envs[env_id]
        except KeyError:
            raise UnknownEnvironment(env_id) from None
        env.used = True
        return env

    def _held(self, env_id: str) -> Environment:
        try:
            return self.envs[env_id]
        except KeyError:
            raise UnknownEnvironment(env_id) from None

    def export(self, env_id: str) -> dict[str, Any]:
        """The environment's JSON; cached until the next change (callers must not mutate it)."""
        env = self.get(env_id)
        if env.cache is None:
            env.cache = export_environment(env.doc, env_id)
        return env.cache

    def summary(self, env_id: str) -> dict[str, Any]:
        """Cheap facts for listings, read without exporting the whole environment (or loading
        it: an unloaded one's are kept)."""
        env = self._held(env_id)
        doc, facts = env._doc, env.facts
        if doc is None and facts is not None:
            name, last, newer, routes = facts.name, facts.last_migration, facts.newer, facts.routes
        else:
            name, last, newer, routes = _listing(doc if doc is not None else env.doc)
        summary: dict[str, Any] = {
            "id": env_id,
            "name": name,
            "lastMigration": last,
            "newer": newer,
            "routes": routes,
        }
        if errors := self.errors(env_id):
            summary["errors"] = errors
        return summary

    def state_vector(self, env_id: str) -> bytes:
        """The document's state vector, without loading it."""
        env = self._held(env_id)
        doc = env._doc
        if doc is None and env.facts is not None:
            return env.facts.state_vector
        return (doc if doc is not None else env.doc).get_state()

    def model_of(self, env_id: str) -> int:
        """The document's model version (`meta.model`, model/migrations.py), without loading it."""
        env = self._held(env_id)
        doc = env._doc
        if doc is None and env.facts is not None:
            return env.facts.model
        if env.model is None or doc is None:
            env.model = doc_version(doc if doc is not None else env.doc)
        return env.model

    def loaded(self, env_id: str) -> bool:
        env = self.envs.get(env_id)
        return env is not None and env._doc is not None

    def errors(self, env_id: str) -> list[str]:
        """Why followers of the environment failed on its last changes (`environment-error`);
        a follower's entry goes once it takes a change again, or stops following."""
        return sorted(r for (e, _f, _t), r in self._failing.items() if e == env_id)

    def state_update(self, env_id: str, state_vector: bytes | None = None) -> bytes:
        """What `state_vector` misses (everything, without one). A state vector that holds the
        document's (a peer in step) is answered from an unloaded one's facts."""
        env = self._held(env_id)
        facts = env.facts if env._doc is None else None
        if facts is not None and state_vector and _covers(state_vector, facts.state_vector):
            return facts.deletions
        env = self.get(env_id)
        return env.doc.get_update(state_vector) if state_vector else env.doc.get_update()

    # -- changing ------------------------------------------------------------------------------

    def create(self, env_id: str, prepared: dict[str, Any], origin: str) -> Ticket:
        env = self._track(Environment(env_id, Doc(), loader=self._load))
        # registered only once it holds the environment
        apply_environment(env.doc, prepared, model=self.model_version)
        self.envs[env_id] = env
        self.events.emit("environment-created", id=env_id, origin=origin)
        self._commit(env, origin, new=prepared)
        assert env.last_ticket is not None
        return env.last_ticket

    def before_replace(self, env_id: str, new: dict[str, Any], origin: str) -> None:
        """A whole-environment write that arrives as a merge (a linked file's save): the
        `before_apply` hooks see it as they see `apply`, so history keeps what a save removes."""
        if self.before_apply and env_id in self.envs:
            self._before_replace(env_id, self.export(env_id), new, origin)

    def _before_replace(
        self, env_id: str, old: dict[str, Any], new: dict[str, Any], origin: str
    ) -> None:
        for hook in self.before_apply:  # a failing hook is reported, never the write's failure
            self._follow(env_id, origin, ("history", 0), hook, env_id, old, new, origin)

    def apply(
        self, env_id: str, prepared: dict[str, Any], origin: str
    ) -> tuple[bool, Ticket | None]:
        """A whole-environment write, as minimal edits."""
        env = self.get(env_id)
        old = self.export(env_id)
        self._before_replace(env_id, old, prepared, origin)
        try:
            apply_environment(env.doc, prepared, old=old)
        except BaseException:
            self._rollback(env)
            raise
        for update in env.pending:
            self._learn(env, update)
        # `prepared` is exactly what the document now exports (tests/modelutil.py checks it), so
        # it becomes the cache: no export after a local write.
        return self._commit(env, origin, new=prepared), env.last_ticket

    def merge(
        self, env_id: str, update: bytes, origin: str, *, items: list[Any] | None = None
    ) -> tuple[bool, bool, Ticket | None]:
        """Apply a Yjs update; an unknown id creates the environment. -> (created, changed, ticket)

        `items`: the update's `strays.decode`, when the caller read them already (the spaces
        service does, for its model check): each update is decoded once."""
        if items is None:
            items = _decode(update)
        env = self.envs.get(env_id)
        created = env is None
        if env is not None and env._doc is None and env.facts is not None:
            if not holds_news(env.facts, bytes(update), get_update):
                return False, False, env.last_ticket  # a copy of what it holds: left unloaded
        touched: Touched | None = None
        if env is None:
            env = self._track(Environment(env_id, Doc(), loader=self._load))
            try:
                env.doc.apply_update(update)
            except Exception as exc:  # pycrdt raises ValueError on undecodable bytes
                raise UpdateRejected(f"not a Yjs update: {exc}") from None
            if not len(env.environment_map()):
                raise UpdateRejected(
                    "the update holds no environment (its 'environment' map is empty)"
                )
            self.envs[env_id] = env
            self.events.emit("environment-created", id=env_id, origin=origin)
        else:
            touched = Touched(env.doc)  # the change's paths, from its events
            try:
                with touched.watch():
                    env.doc.apply_update(update)
            except Exception as exc:
                env.pending.clear()
                raise UpdateRejected(f"not a Yjs update: {exc}") from None
            if not env.pending and _maybe_news(update, env.doc):
                self._keep_quiet_update(env, bytes(update))
        merged = env.pending
        env.pending = []
        repair = self._remove_strays(env, items, commit=False)  # before anything reads it
        env.pending = merged
        with self.store.wake_after():  # the followers (change events, relays) first
            changed = self._commit(env, origin, touched=touched)
            if repair:
                env.pending = repair
                self._commit(env, "repair")  # to every follower: the origin keeps them too
        return created, changed, env.last_ticket

    def migrate(self, env_id: str, origin: str = "migration") -> Ticket | None:
        """Bring an environment's document up to this daemon's model (model/migrations.py), as
        one change of this device's that every replica converges to; None if it needs none.

        The one place a migration runs (the spaces service decides when); `before_migrate`
        hooks see the document before it (a failing hook is reported, never the migration's)."""
        env = self.get(env_id)
        if doc_version(env.doc) >= self.model_version:
            return None
        for hook in self.before_migrate:
            self._follow(env_id, origin, ("history", 0), hook, env_id)
        self._before_change(env)
        try:
            steps = migrate(env.doc, self.model_version, origin)
        except BaseException:
            self._rollback(env)
            raise
        for update in env.pending:
            self._learn(env, update)
        self._commit(env, origin)
        self.events.emit(
            "environment-migrated",
            id=env_id,
            origin=origin,
            model=self.model_version,
            migrations=[m.summary for m in steps],
        )
        return env.last_ticket

    def _remove_strays(
        self, env: Environment, update: list[Any] | None, commit: bool = True
    ) -> list[bytes]:
        """Text a client wrote into an array of the document hangs yrs on reading that array
        (model/strays.py): delete it, as this daemon's change. `update`: the items of what the
        document just applied (None: look at the whole document). -> the updates that deleted it,
        unless `commit`, which sends them down the stream with the origin "repair"."""
        try:
            if update is None:
                found = env.strays.rebuild(env.doc)
            else:
                found = env.strays.check(env.doc, update)
            if found:
                env.doc.apply_update(delete_update(found))
        except BaseException as exc:  # cannot tell: the document stays as it is
            if not is_failure(exc):
                raise
            env.strays = StrayFinder()
            log.error("environment %s: looking for text in its arrays failed", env.id, exc_info=exc)
            return []
        if not found:
            return []
        log.warning("environment %s: deleted %d text items from its arrays", env.id, len(found))
        if commit:
            self._commit(env, "repair")
            return []
        updates, env.pending = env.pending, []
        return updates

    def _learn(self, env: Environment, update: bytes) -> None:
        """Index a local write's items, so that later updates built on them are checked
        without a scan of the whole document."""
        try:
            env.strays.learn(update)
        except BaseException as exc:
            if not is_failure(exc):
                raise
            env.strays = StrayFinder()  # rebuilt from the whole document when next needed

    def _keep_quiet_update(self, env: Environment, update: bytes) -> None:
        """An update with structs beyond the document's state vector that the transaction did
        not report: waiting for what it depends on, or (pycrdt 0.14, yrs) integrated after a gap
        in a client's clocks: yrs then shows its content behind a Skip block, leaves the state
        vector where it was and reports an empty update (Yjs would keep it pending). Store it as
        received, so what the document shows is durable, and drop the cached export, which may
        no longer be what the document holds (a whole-environment write computed from it would
        delete that content). Not forwarded: copies of known updates (a mesh delivers each one
        along several paths) never get here, so nothing can ping-pong."""
        env.ticket = self.store.enqueue_append(env.id, update)
        env.cache = None
        env.model = None

    def delete(self, env_id: str, origin: str) -> Ticket:
        env = self._held(env_id)
        for hook in self.before_delete:  # the trash: enqueued before the delete itself
            self._follow(env_id, origin, ("trash", 0), hook, env_id, origin)
        del self.envs[env_id]
        ticket = self.store.enqueue_delete(env_id)
        for subscriber in list(env.subscribers.values()):
            try:
                subscriber({"type": "deleted", "id": env_id, "origin": origin})
            except BaseException as exc:
                self._follower_failed(env_id, origin, ("subscriber", 0), exc)
        env.subscribers.clear()
        for key in [k for k in self._failing if k[0] == env_id]:
            del self._failing[key]
        self.events.emit("environment-deleted", id=env_id, origin=origin)
        return ticket

    def _rollback(self, env: Environment) -> None:
        """A write failed half-way (a bug, e.g. in the model): drop its partial transaction,
        which was neither stored nor sent, and rebuild the document from the store, which holds
        (committed or queued) every change the document had before. Rebuilding only on failure
        saves a full-state copy on every write (tens of ms on a 15 MB environment)."""
        env.pending.clear()
        doc = Doc()  # a new client id: the dropped partial update's ids are never reused
        for update in self.store.updates_of(env.id):
            doc.apply_update(update)
        env.doc = doc
        env.cache = None
        self._track(env)

    def _before_change(self, env: Environment) -> None:
        if env.subscribers and env.cache is None:
            try:
                env.cache = export_environment(env.doc, env.id)
            except BaseException as exc:  # then the change's paths are "" (everything)
                if not is_failure(exc):
                    raise
                env.cache = None

    def _commit(
        self,
        env: Environment,
        origin: str,
        new: dict[str, Any] | None = None,
        touched: Touched | None = None,
    ) -> bool:
        """Send the updates of the transactions just made down the stream; True if any.

        `new`: the environment's JSON after the change when the caller knows it (its paths are
        then a diff with the JSON before, which shares what did not change: cheap); `touched`:
        the change's events (a merged update: its paths come from them, with no export).

        Once the updates are queued for the store the change has happened: nothing after that
        (describing it, subscribers, listeners, events, compaction) may fail the write that made
        it. Each follower is isolated: one that raises is that environment's error (logged, an
        `environment-error` event), and the others still get the change.
        """
        updates, env.pending = env.pending, []
        if not updates:
            return False
        for update in updates:
            env.ticket = self.store.enqueue_append(env.id, update)
        old, env.cache = env.cache, new

        def describe() -> list[str]:
            if touched is not None:
                return touched.pointers()
            return self._paths(old, env.id) if old is not None else [""]

        paths: list[str] | None = None
        followed = bool(env.subscribers) or self.events.listening
        if env.subscribers:
            event: dict[str, Any]
            try:
                paths = describe()
                self._succeeded(env.id, ("change event", 0))
                update = updates[0] if len(updates) == 1 else _merge(updates)
                event = {
                    "type": "change",
                    "id": env.id,
                    "paths": paths,
                    "update": update,
                    "origin": origin,
                }
            except BaseException as exc:
                reason = self._follower_failed(env.id, origin, ("change event", 0), exc)
                event = {"type": "error", "id": env.id, "origin": origin, "reason": reason}
                paths = [""]
            for token, subscriber in list(env.subscribers.items()):
                self._follow(env.id, origin, ("subscriber", token), subscriber, event)
        for update in updates:
            for token, listener in list(self._listeners.items()):
                follower = (_name(listener), token)
                self._follow(env.id, origin, follower, listener, env.id, update, origin)
        if paths is None:
            # The event log promises paths too (docs/local-api.md): precise when the change's
            # events or the JSON from before it are at hand (exporting a big environment after
            # a change only for the log is not free: only if someone follows the events), else
            # "" (everything).
            known = touched is not None or (old is not None and (followed or env.cache is not None))
            try:
                paths = describe() if known else [""]
                self._succeeded(env.id, ("change event", 0))
            except BaseException as exc:
                self._follower_failed(env.id, origin, ("change event", 0), exc)
                paths = [""]
        emit = self.events.emit
        changed = {"id": env.id, "origin": origin, "paths": paths}
        self._follow(
            env.id, origin, ("event log", 0), lambda: emit("environment-changed", **changed)
        )
        try:
            if self.store.needs_compaction(env.id):
                self.store.enqueue_compact(env.id, env.doc.get_update())
        except BaseException as exc:  # the updates are queued: compaction can wait
            self._follower_failed(env.id, origin, ("compaction", 0), exc)
        return True

    def _paths(self, old: dict[str, Any], env_id: str) -> list[str]:
        return changed_paths(old, self.export(env_id))

    def _follow(
        self, env_id: str, origin: str, follower: Follower, fn: Callable[..., Any], *args: Any
    ) -> None:
        """Hand a change to one follower; its failure is reported, never raised."""
        try:
            fn(*args)
        except BaseException as exc:
            self._follower_failed(env_id, origin, follower, exc)
            return
        self._succeeded(env_id, follower)

    def _succeeded(self, env_id: str, follower: Follower) -> None:
        if self._failing:
            self._failing.pop((env_id, *follower), None)

    def _follower_failed(
        self, env_id: str, origin: str, follower: Follower, exc: BaseException
    ) -> str:
        """Log and emit `environment-error` once per distinct failure of a follower of `env_id`
        (a follower that fails on every change is reported again only if its reason changes);
        -> the reason. Only cancellations and interrupts go on."""
        if not is_failure(exc):
            raise exc
        name = follower[0]
        reason = f"{name} failed: {type(exc).__name__}: {exc}"
        key = (env_id, *follower)
        if self._failing.get(key) == reason:
            return reason
        self._failing[key] = reason
        log.error("environment %s: %s", env_id, reason, exc_info=exc)
        try:
            self.events.emit(
                "environment-error", id=env_id, origin=origin, follower=name, reason=reason
            )
        except BaseException as emit_exc:  # the event log itself failed: the log line stays
            if not is_failure(emit_exc):
                raise
        return reason

    # -- documents in memory (core/residency.py) -----------------------------------------------

    def add_keeper(self, keeper: Keeper) -> int:
        """A service that needs some documents loaded while it uses them (a served mock, an
        offline hold, a version not taken yet) says so here, rather than by holding `doc`."""
        token = self._token()
        self._keepers[token] = keeper
        return token

    def remove_keeper(self, token: int) -> None:
        self._keepers.pop(token, None)

    def may_unload(self, env_id: str) -> bool:
        """Whether the document could go now, nothing lost: loaded, no subscriber, no change
        on its way, its last write durable, and no keeper needing it."""
        env = self.envs.get(env_id)
        if env is None or env._doc is None or env.subscribers or env.pending:
            return False
        last = env.last_ticket
        if last is not None and (not last.done or last.failed):
            return False
        for token, keeper in list(self._keepers.items()):
            try:
                if keeper(env_id):
                    return False
            except BaseException as exc:  # a failing keeper keeps everything (reported once)
                if not is_failure(exc):
                    raise
                if token not in self._failed_keepers:
                    self._failed_keepers.add(token)
                    log.error(
                        "%s failed", _name(keeper).replace("listener", "keeper"), exc_info=exc
                    )
                return False
        return True

    def unload(self, env_id: str) -> bool:
        """Drop the document from memory, keeping its facts (in memory, and in the store beside
        the state they describe, for the next start); False if it may not go now."""
        if not self.may_unload(env_id):
            return False
        marks = self.store.marks(env_id)
        if marks is None:  # a write of it still queued (a compaction): the next sweep
            return False
        env = self.envs[env_id]
        facts = _facts(env)
        if marks != env.kept:  # else the store has them already (it was only read)
            self.store.enqueue_meta(env_id, facts.to_meta(marks))
            env.kept = marks
        env.facts = facts
        env._doc = None
        env.cache = None
        env.model = None
        env.strays = StrayFinder()
        self.unloads += 1
        return True

    def sweep(self, residency: Residency, now: float) -> list[str]:
        """One sweep: unload the documents `residency` finds idle. -> their ids."""
        loaded = []
        for env in self.envs.values():
            if env._doc is not None:
                used, env.used = env.used, False
                loaded.append((env.id, used, self.may_unload(env.id)))
        gone = []
        for env_id in residency.decide(now, loaded):
            try:
                if self.unload(env_id):
                    gone.append(env_id)
            except BaseException as exc:  # it stays loaded: nothing lost
                if not is_failure(exc):
                    raise
                log.error("environment %s: unloading failed", env_id, exc_info=exc)
        return gone

    def keep_facts(self) -> int:
        """At shutdown, before the store closes: keep the facts of every loaded document that
        could be unloaded now, so that the next start loads none of them (one a keeper needs,
        a version waiting for instance, is loaded again then). -> how many."""
        kept = 0
        for env in self.envs.values():
            if not self.may_unload(env.id):
                continue
            try:
                marks = self.store.marks(env.id)
                if marks is not None and marks != env.kept:
                    self.store.enqueue_meta(env.id, _facts(env).to_meta(marks))
                    env.kept = marks
                    kept += 1
            except BaseException as exc:
                if not is_failure(exc):
                    raise
                log.error("environment %s: its facts not kept", env.id, exc_info=exc)
        return kept

    def resident(self) -> int:
        """How many documents are in memory."""
        return sum(env._doc is not None for env in self.envs.values())

    # -- followers -----------------------------------------------------------------------------

    def subscribe(self, env_id: str, subscriber: Subscriber) -> int:
        env = self.get(env_id)
        token = self._token()
        env.subscribers[token] = subscriber
        return token

    def unsubscribe(self, env_id: str, token: int) -> None:
        env = self.envs.get(env_id)
        if env is not None:
            env.subscribers.pop(token, None)
        self._failing.pop((env_id, "subscriber", token), None)

    def add_listener(self, listener: ChangeListener) -> int:
        token = self._token()
        self._listeners[token] = listener
        return token

    def remove_listener(self, token: int) -> None:
        self._listeners.pop(token, None)
        for key in [k for k in self._failing if k[2] == token and k[1].startswith("listener")]:
            del self._failing[key]

    def _token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token


def _listing(doc: Doc) -> tuple[str, int | float | None, bool, int]:
    """(name, lastMigration, newer, route count) as listings show them."""
    top = doc.get(ENV_ROOT, type=Map)
    last = top.get("lastMigration")
    name = top.get("name")
    if type(last) is int:  # a Yjs BigInt
        last = float(last)
    if type(last) is not float or last != last or abs(last) == float("inf"):
        last = None  # any client may have written anything there (a Map, NaN...)
    return (
        name if isinstance(name, str) else "",
        int(last) if last is not None and last.is_integer() else last,
        last is not None and last > LAST_MIGRATION,
        len(doc.get("routes", type=Map)),
    )


def _facts(env: Environment) -> Facts:
    """What the environment is while unloaded, read from its (loaded) document."""
    doc = env._doc
    assert doc is not None
    name, last, newer, routes = _listing(doc)
    sv = doc.get_state()
    return Facts(name, last, newer, routes, doc_version(doc), sv, doc.get_update(sv))


def _covers(state_vector: bytes, ours: bytes) -> bool:
    try:
        return covers(state_vector, ours)
    except ValueError:  # not a state vector: the document answers (and raises) as it would
        return False


def _merge(updates: list[bytes]) -> bytes:
    from pycrdt import merge_updates

    return merge_updates(*updates)


def _name(fn: Callable[..., Any]) -> str:
    """A follower as logs and events name it: `listener MirrorService._on_change`."""
    return f"listener {getattr(fn, '__qualname__', None) or type(fn).__name__}"


def _decode(update: bytes) -> list[Any]:
    """The update's items, checked before the document takes them: bytes that are not a Yjs
    update are UpdateRejected (as yrs rejects them), a yrs-only update UnsupportedUpdate."""
    try:
        return decode(bytes(update))
    except Malformed as exc:
        try:
            Doc().apply_update(update)
        except Exception as yrs_exc:
            raise UpdateRejected(f"not a Yjs update: {yrs_exc}") from None
        raise UnsupportedUpdate(f"not a standard Yjs update: {exc}") from None


def _maybe_news(update: bytes, doc: Doc) -> bool:
    """`_holds_news`, or True when that cannot be told: storing a known update again is harmless,
    not storing an applied one loses it."""
    try:
        return _holds_news(update, doc)
    except BaseException as exc:
        if not is_failure(exc):
            raise
        return True


def _holds_news(update: bytes, doc: Doc) -> bool:
    """Whether `update` holds structs the document has not seen (beyond its state vector). The diff
    against that state vector starts with its count of clients with structs: a 0 byte, none."""
    return get_update(update, doc.get_state())[0] != 0
