"""The presence service: the trio shell around `Awareness`, the socket's `presence.*` operations.

It feeds the core with what happens here (editors' selections through the socket, local saves
seen by a registry listener, the spaces joined) and with what the links receive, hands the
core's `Send`s to the links' owners (the peer manager and the hub dialers, through
`add_awareness_listener`: services never import each other) and pushes changes to the
`presence.subscribe` subscribers. Between events it sleeps until the core's next deadline
(a renewal, a time-out) or a save's end.

The links reach it as an `AwarenessHost` (`peerdaemon.peer`): `awareness_opened(source,
docs)`, `awareness_received(source, doc, payload)`, `awareness_closed(source)`, where `source`
names one link (`peer:<device>#<n>`, `hub:<url>#<n>`), so that closing a link removes exactly
the states it delivered.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import trio

from ..core.awareness import AwarenessError
from ..core.errors import BAD_REQUEST, NOT_FOUND, OpError
from ..core.registry import Registry
from .core import Awareness, StateTooLarge
from .local import MAX_FIELD, Editors, Me, Selection

__all__ = ["PresenceService", "SpacesView"]

log = logging.getLogger("peerdaemon.presence")

SPACE_PREFIX = "space:"
SAVE_ORIGINS = {"local": "socket", "file": "file"}
"""Registry origins that are a save on this device, and what the state calls them."""

AwarenessListener = Callable[[str, bytes, str | None, str | None], None]
"""(doc, payload, exclude, to): send an awareness update to the links (module docstring)."""


class SpacesView(Protocol):
    """What presence reads of the spaces service (docs/architecture.md, "Contracts")."""

    def list_spaces(self) -> list[dict[str, Any]]: ...
    def env_space(self, env_id: str) -> str | None: ...
    def add_docs_listener(self, fn: Callable[[], None]) -> int: ...


def _via(source: str) -> str:
    return "hub" if source.startswith("hub:") else "lan"


class PresenceService:
    """Presence of this device and of everyone it hears of (module docstring)."""

    def __init__(
        self,
        me: Me,
        registry: Registry,
        spaces: SpacesView | None = None,
        *,
        client_id: int | None = None,
        clock: Callable[[], float] | None = None,
        core: Awareness | None = None,
    ) -> None:
        self.me = me
        self.registry = registry
        self.spaces = spaces
        # a fresh client id per run: a restarted daemon starts its clocks over, and a y-protocols
        # peer ignores a client's state whose clock is not above the last one it saw
        self.core = core or Awareness(client_id or secrets.randbits(31) + 1)
        self.editors = Editors()
        self._now = clock or trio.current_time
        self._listeners: dict[int, AwarenessListener] = {}
        self._subscribers: dict[int, tuple[str | None, Callable[[dict[str, Any]], None]]] = {}
        self._next_token = 1
        self._wake = trio.Event()
        self._space_docs: set[str] = set()

    # -- wiring --------------------------------------------------------------------------------

    def register(self, operations: Any) -> None:
        operations.register("presence.set", self.op_set)
        operations.register("presence.clear", self.op_clear)
        operations.register("presence.list", self.op_list)
        operations.register("presence.subscribe", self.op_subscribe)

    def add_awareness_listener(self, fn: AwarenessListener) -> int:
        token = self._token()
        self._listeners[token] = fn
        return token

    def remove_awareness_listener(self, token: int) -> None:
        self._listeners.pop(token, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow local saves and the spaces; renew and time out states until cancelled."""
        token = self.registry.add_listener(self._on_change)
        docs = self.spaces.add_docs_listener(self._refresh_spaces) if self.spaces else None
        self._refresh_spaces()
        task_status.started()
        try:
            while True:
                deadline = min(
                    self.core.next_deadline() or math.inf,
                    self.editors.next_deadline() or math.inf,
                )
                self._wake = trio.Event()
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                self.tick()
        finally:
            self.registry.remove_listener(token)
            remove = getattr(self.spaces, "remove_docs_listener", None)
            if remove is not None and docs is not None:
                remove(docs)

    def tick(self) -> None:
        """Do what is due now (the run loop calls it; tests with a fake clock too)."""
        now = self._now()
        for env in self.editors.expire(now):
            self._publish_env(env)
        self.core.handle_timer(now)
        self._flush()

    # -- identity ------------------------------------------------------------------------------

    def set_display_name(self, name: str | None) -> None:
        self.me.display_name = name or None
        self._republish()

    def set_device_name(self, name: str | None) -> None:
        if name:
            self.me.device_name = name
            self._republish()

    def _republish(self) -> None:
        for doc in list(self._space_docs):
            self._set(doc, self.me.state())
        for env in self.editors.envs():
            self._publish_env(env)
        self._flush()

    def _refresh_spaces(self) -> None:
        """Say we are connected to each space we are in (its `space:` document), and no more
        to the ones we left."""
        if self.spaces is None:
            return
        docs = {SPACE_PREFIX + s["id"] for s in self.spaces.list_spaces()}
        for doc in self._space_docs - docs:
            self._set(doc, None)
        for doc in docs - self._space_docs:
            self._set(doc, self.me.state())
        self._space_docs = docs
        self._flush()

    # -- the links (AwarenessHost) -------------------------------------------------------------

    def awareness_opened(self, source: str, docs: Iterable[str]) -> None:
        self.core.link_opened(source, docs, self._now())
        self._flush()

    def awareness_received(self, source: str, doc: str, payload: bytes) -> None:
        try:
            self.core.receive(source, doc, payload, self._now())
        except AwarenessError as exc:
            log.info("presence: ignored a bad awareness update of %s from %s: %s", doc, source, exc)
            return
        refused = self.core.refused
        if refused:
            self.core.refused = 0
            log.info(
                "presence: refused %d awareness state(s) of %s from %s: over the %d-byte cap",
                refused,
                doc,
                source,
                self.core.max_state,
            )
        self._flush()

    def awareness_closed(self, source: str) -> None:
        self.core.link_closed(source, self._now())
        self._flush()

    # -- local changes -------------------------------------------------------------------------

    def _on_change(self, env_id: str, update: bytes, origin: str) -> None:
        via = SAVE_ORIGINS.get(origin)
        if via is None:
            return
        if self.editors.saved(env_id, via, self._now()):
            self._publish_env(env_id)
            self._flush()
        # else its end only moved later: the run loop, woken at the old one, sleeps on to it
        # (waking it on every save cost a task step on each write's path to its commit)

    def _publish_env(self, env: str) -> None:
        editing = self.editors.editing(env)
        self._set(env, self.me.state(editing) if editing else None)

    def _set(self, doc: str, state: dict[str, Any] | None) -> None:
        self.core.set_local(doc, state, self._now())

    def _flush(self) -> None:
        """Hand the core's sends to the links and its changes to the subscribers."""
        for send in self.core.sends():
            for fn in list(self._listeners.values()):
                try:
                    fn(send.doc, send.payload, send.exclude, send.to)
                except Exception:
                    log.exception("presence: sending an awareness update failed")
        changes = self.core.changes()
        if changes and self._subscribers:
            touched = {self._space_of(c.doc) for c in changes}
            for space in touched:
                view = self.space_view(space)
                event = {"type": "presence", **view}
                for wanted, push in list(self._subscribers.values()):
                    if wanted is None or wanted == space:
                        push(event)
        self._wake.set()

    # -- views ---------------------------------------------------------------------------------

    def _space_of(self, doc: str) -> str | None:
        if doc.startswith(SPACE_PREFIX):
            return doc[len(SPACE_PREFIX) :]
        return self.spaces.env_space(doc) if self.spaces is not None else None

    def _client(self, doc: str, client: int, state: dict[str, Any]) -> dict[str, Any]:
        user = state.get("user") if isinstance(state.get("user"), dict) else {}
        device = state.get("device") if isinstance(state.get("device"), dict) else {}
        mine = client == self.core.client_id
        out: dict[str, Any] = {
            "client": client,
            "self": mine,
            "user": user.get("name") if isinstance(user.get("name"), str) else None,
            "color": user.get("color") if isinstance(user.get("color"), str) else None,
            "device": device.get("id") if isinstance(device.get("id"), str) else None,
            "device_name": device.get("name") if isinstance(device.get("name"), str) else None,
            "app": state.get("app") if isinstance(state.get("app"), str) else None,
            "via": ["local"]
            if mine
            else sorted({_via(s) for s in self.core.sources_of(doc, client)}),
        }
        editing = state.get("editing")
        if isinstance(editing, list):
            out["editing"] = [e for e in editing if isinstance(e, dict)]
        return out

    def space_view(self, space: str | None) -> dict[str, Any]:
        """Who is connected to `space` and who edits each of its environments (None: the
        environments in no space)."""
        names = {s["id"]: s.get("name") for s in self.spaces.list_spaces()} if self.spaces else {}
        connected: list[dict[str, Any]] = []
        seen: set[Any] = set()

        def add(entry: dict[str, Any]) -> None:
            key = entry["device"] or entry["client"]
            if key not in seen:
                seen.add(key)
                connected.append({k: v for k, v in entry.items() if k != "editing"})

        if space is not None:
            for client, state in sorted(self.core.states(SPACE_PREFIX + space).items()):
                add(self._client(SPACE_PREFIX + space, client, state))
        envs = []
        for doc in self.core.docs():
            if doc.startswith(SPACE_PREFIX) or self._space_of(doc) != space:
                continue
            editors = [self._client(doc, c, s) for c, s in sorted(self.core.states(doc).items())]
            for editor in editors:
                editor.setdefault("editing", [])
                add(editor)
            name = self.registry.summary(doc)["name"] if doc in self.registry.envs else None
            envs.append({"id": doc, "name": name, "editors": editors})
        return {
            "space": space,
            "name": names.get(space) if space is not None else None,
            "connected": connected,
            "environments": envs,
        }

    def view(self, space: str | None = None) -> list[dict[str, Any]]:
        """Every space's presence (or one space's), then the unshared environments' editors."""
        if space is not None:
            return [self.space_view(space)]
        ids = [s["id"] for s in self.spaces.list_spaces()] if self.spaces else []
        out = [self.space_view(s) for s in ids]
        local = self.space_view(None)
        if local["environments"]:
            out.append(local)
        return out

    def editors_of(self, env: str) -> list[dict[str, Any]]:
        """Who edits `env` (for `env list`)."""
        return [self._client(env, c, s) for c, s in sorted(self.core.states(env).items())]

    # -- socket operations ---------------------------------------------------------------------

    def _resolve_space(self, args: dict[str, Any]) -> str | None:
        ref = args.get("space")
        if ref is None:
            return None
        if not isinstance(ref, str) or not ref:
            raise OpError(BAD_REQUEST, "space must be a space id or name")
        spaces = self.spaces.list_spaces() if self.spaces is not None else []
        for s in spaces:
            if s["id"] == ref:
                return ref
        named = [s["id"] for s in spaces if s.get("name") == ref]
        if len(named) == 1:
            return named[0]
        raise OpError(NOT_FOUND, f"no space {ref!r}" if not named else f"several spaces {ref!r}")

    async def op_set(self, args: dict[str, Any], session: Any) -> Any:
        env = args.get("env")
        if not isinstance(env, str) or not env:
            raise OpError(BAD_REQUEST, "presence.set needs env: an environment id")
        if env not in self.registry.envs:
            raise OpError(NOT_FOUND, f"no environment with id {env!r}")
        parts = {}
        for name in ("entity", "field"):
            value = args.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > MAX_FIELD):
                raise OpError(BAD_REQUEST, f"{name} must be a string of at most {MAX_FIELD} chars")
            parts[name] = value
        conn = self._connection(session)
        previous = self.editors.selections.get(env, {}).get(conn)
        if not self.editors.set(conn, env, Selection(parts["entity"], parts["field"])):
            return self._answer(env)
        try:
            self._publish_env(env)
        except StateTooLarge as exc:
            if previous is None:
                self.editors.clear(conn, env)
            else:
                self.editors.set(conn, env, previous)
            raise OpError(BAD_REQUEST, f"presence refused: {exc}") from None
        self._flush()
        return self._answer(env)

    async def op_clear(self, args: dict[str, Any], session: Any) -> Any:
        env = args.get("env")
        if env is not None and not isinstance(env, str):
            raise OpError(BAD_REQUEST, "env must be an environment id")
        self._clear(self._connection(session), env)
        return {"cleared": env}

    async def op_list(self, args: dict[str, Any], session: Any) -> Any:
        space = self._resolve_space(args)
        return {
            "device": self.me.device_id,
            "client": self.core.client_id,
            "spaces": self.view(space),
        }

    async def op_subscribe(self, args: dict[str, Any], session: Any) -> Any:
        space = self._resolve_space(args)
        token = self._token()
        sub = session.open_subscription(on_close=lambda: self._subscribers.pop(token, None))
        self._subscribers[token] = (space, lambda event: session.push(sub, event))
        return {
            "sub": sub,
            "device": self.me.device_id,
            "client": self.core.client_id,
            "spaces": self.view(space),
        }

    def _connection(self, session: Any) -> int:
        """The connection's number; its selections are cleared when it closes."""
        data = session.data
        if "presence" not in data:
            number = session.number
            data["presence"] = number
            session.on_close(lambda: self._clear(number, None))
        return int(data["presence"])

    def _clear(self, conn: int, env: str | None) -> None:
        for changed in self.editors.clear(conn, env):
            self._publish_env(changed)
        self._flush()

    def _answer(self, env: str) -> dict[str, Any]:
        return {"env": env, "editors": self.editors_of(env)}

    def _token(self) -> int:
        token, self._next_token = self._next_token, self._next_token + 1
        return token
