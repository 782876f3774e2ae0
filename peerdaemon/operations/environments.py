"""The local API's operations (docs/local-api.md), on top of the registry.

Each write is applied to the document at once, in request order, and acknowledged (a `Pending`)
only when the store has made it durable: nothing a client saw acknowledged is lost.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonpatch
import jsonpointer

from .. import __version__
from ..core.errors import (
    BAD_PATCH,
    BAD_POINTER,
    BAD_REQUEST,
    BAD_UPDATE,
    EXISTS,
    INTERNAL,
    MALFORMED_JSON,
    NOT_FOUND,
    UNKNOWN_OP,
    UUID_MISMATCH,
    OpError,
    Pending,
    arg,
)
from ..core.history import History
from ..core.registry import Registry, UnknownEnvironment, UnsupportedUpdate, UpdateRejected
from ..model import LAST_MIGRATION, MODEL_VERSION, ModelError, is_newer, prepare
from ..model.keyorder import order_like
from ..store import Ticket

LOCAL = "local"

log = logging.getLogger("peerdaemon.operations")

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")


def _str_arg(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise OpError(BAD_REQUEST, f"argument {name!r} must be a non-empty string")
    return value


def _json_arg(args: dict[str, Any], obj_name: str) -> Any:
    """The value of `obj_name`, or of `json` parsed: clients that send file text get parse errors."""
    if obj_name in args:
        return args[obj_name]
    text = args.get("json")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise OpError(MALFORMED_JSON, f"not UTF-8 text: {exc}") from None
    if not isinstance(text, str):
        raise OpError(BAD_REQUEST, f"give {obj_name!r} (a value) or 'json' (its text)")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise OpError(
            MALFORMED_JSON, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:
        raise OpError(MALFORMED_JSON, f"malformed JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text):
        # "\ud800" parses, but a lone surrogate is not Unicode text: pycrdt panics on it.
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise OpError(
                MALFORMED_JSON,
                "a string holds a lone surrogate (\\ud800-\\udfff): not Unicode text",
            ) from None
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _resolve_pointer(value: Any, pointer: str) -> Any:
    """RFC 6901 on JSON values: `bad-pointer` for a malformed pointer, `not-found` for a miss."""
    try:
        parts = jsonpointer.JsonPointer(pointer).parts
    except jsonpointer.JsonPointerException as exc:
        raise OpError(BAD_POINTER, f"{pointer!r} is not a JSON Pointer: {exc}") from None
    for i, part in enumerate(parts):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and (index := _list_index(part, len(value))) is not None:
            value = value[index]
        else:
            where = jsonpointer.JsonPointer.from_parts(parts[: i + 1]).path
            raise OpError(NOT_FOUND, f"JSON Pointer {pointer!r}: nothing at {where!r}")
    return value


def _list_index(token: str, size: int) -> int | None:
    """The array index a pointer token names, or None: not an index, or past the end.

    The length is compared first: `int()` of a token of 5,000 digits raises (Python's limit on
    integer string conversion), and such a token is simply past the end of any array.
    """
    if not _ARRAY_INDEX.fullmatch(token) or len(token) > len(str(size)):
        return None
    index = int(token)
    return index if index < size else None


def _version_arg(args: dict[str, Any]) -> int:
    version = args.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise OpError(BAD_REQUEST, "argument 'version' must be a version number (1 or more)")
    return version


def _pending(ticket: Ticket | None, result: Any) -> Any:
    if ticket is None:
        return result
    return Pending(ticket.wait, result)


def _pointer_tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


def patch_along(env: Any, ops: Any) -> Any:
    """`ops`, a JSON Patch, applied to a copy of `env` that shares whatever the patch leaves as
    it is; `env` (the cached export) is never changed. Raises what jsonpatch raises.

    Copy on write, op by op: before each op, the containers on the way to its `path` and `from`
    are copied as that op sees them (after the ops before it, and `move` sees its `path` once
    `from` is removed: indexes shift). Copying the whole of a big environment for every patch
    would cost more than the edit, and what stays shared `prepare` need not check again.
    """
    root = copy.copy(env) if isinstance(env, dict | list) else env
    if not isinstance(ops, list):
        return jsonpatch.apply_patch(root, ops, in_place=True)  # its error says why
    copied = {id(root)}
    for op in ops:
        if isinstance(op, dict):
            source = op.get("from")
            removed = _copy_path(root, source, copied) if op.get("op") == "move" else None
            if op.get("op") == "copy":
                _copy_path(root, source, copied)
            _copy_path(root, op.get("path"), copied, removed)
        patched = jsonpatch.apply_patch(root, [op], in_place=True)
        if patched is not root and isinstance(patched, dict | list) and id(patched) not in copied:
            patched = copy.copy(patched)  # a part of `env` moved to the root
            copied.add(id(patched))
        root = patched
    return root


def _copy_path(
    root: Any, pointer: Any, copied: set[int], removed: tuple[Any, Any] | None = None
) -> tuple[Any, Any] | None:
    """Copy the containers on the way to `pointer` (up to its parent) that are not copies yet;
    -> (its parent, its key or index), or None if the path leads nowhere (then the patch
    library refuses it). `removed`: the (container, key or index) a `move` removes before
    it adds at `pointer`: indexes past it in that list shift by one."""
    if not isinstance(pointer, str) or not pointer.startswith("/"):
        return None
    tokens = _pointer_tokens(pointer)
    node: Any = root
    for depth, token in enumerate(tokens):
        if isinstance(node, dict):
            if removed is not None and node is removed[0] and token == removed[1]:
                return None  # gone by the time the op gets there
            index: Any = token
            if depth == len(tokens) - 1:
                return node, index
            if token not in node:
                return None
        elif isinstance(node, list):
            at = _list_index(token, len(node))
            if at is None:
                return None
            if removed is not None and node is removed[0] and at >= removed[1]:
                at += 1
                if at >= len(node):
                    return None
            if depth == len(tokens) - 1:
                return node, at
            index = at
        else:
            return None
        child = node[index]
        if not isinstance(child, dict | list):
            return None
        if id(child) not in copied:
            child = copy.copy(child)
            copied.add(id(child))
            node[index] = child
        node = child
    return None


_TEXT = (str, bytes)  # a `json` argument: JSON text, or its UTF-8 bytes

ARG_KINDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "env.import": {"json": _TEXT, "new_id": bool},
    "env.import_link": {"json": _TEXT, "new_id": bool, "path": str},
    "env.get": {"id": str, "pointer": str},
    "env.put": {"id": str, "json": _TEXT, "force_id": bool},
    "env.patch": {"id": str, "json": _TEXT},
    "env.delete": {"id": str},
    "env.export": {"id": str, "format": str, "state_vector": bytes},
    "env.merge": {"id": str},  # `update` of the wrong type is `bad-update` (the op says so)
    "env.history": {"id": str},
    "env.at": {"id": str, "version": int},
    "env.restore": {"id": str, "version": int},
    "env.trash": {},
    "env.untrash": {"id": str, "new_id": bool},
    "env.subscribe": {"id": str},
    "events.subscribe": {"since": int},
    "unsubscribe": {"sub": int},
    "env.link": {"id": str, "path": str, "overwrite": bool},
    "env.unlink": {"id": str},
    "env.share": {"id": str, "space": str, "copy": bool},
    "env.unshare": {"id": str},
    "space.create": {"name": str},
    "space.invite": {"space": str, "addresses": list, "hub": str},
    "space.join": {"code": str},
    "space.leave": {"space": str},
    "space.hub": {"space": str, "url": str, "token": str},
    "space.unhub": {"space": str},
    "config.get": {"key": str},
    "config.set": {"key": str, "value": str},
    "config.reload": {},
    "env.mock": {"id": str, "hub": bool, "access": str, "rotate_token": bool},
    "space.policy": {"space": str, "policy": str},
    "env.resolve": {"id": str, "choice": str},
    "space.remove_device": {"space": str, "device": str},
    "mock.start": {"id": str, "port": int, "hostname": str},
    "mock.stop": {"id": str},
    "mock.list": {},
    "mock.logs": {"id": str, "limit": int, "follow": bool},
    "presence.set": {"env": str, "entity": str, "field": str},
    "presence.clear": {"env": str},
    "presence.list": {"space": str},
    "presence.subscribe": {"space": str},
}
"""The type of each argument an operation takes (of every service on the socket), checked before
the operation runs: an argument of the wrong type is `bad-request` with a message, never an
exception deep inside an operation (`internal`). Absent (or null) arguments are left to the
operation, which knows which are required; arguments not listed are not checked here."""


def check_args(op: str, args: dict[Any, Any]) -> None:
    """Raise `bad-request` for an argument of `op` whose type is not the one it takes."""
    for name, kind in ARG_KINDS.get(op, {}).items():
        arg(args, name, kind, default=None, op=op)


class Operations:
    """Every socket operation by name: the environments' own here, the other services' added with
    `register`; the local socket server's `Handler`."""

    def __init__(self, registry: Registry, *, data_dir: Path, socket_path: Path) -> None:
        self.registry = registry
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.started = time.time()
        self.before_delete: list[Callable[[str], None]] = []
        """Called with the id before `env.delete` deletes an environment (spaces: delete it
        from its space, on every device)."""
        self.status_hooks: list[Callable[[], dict[str, Any]]] = []
        """Each adds keys to the `status` result (spaces: `device`, `name`)."""
        self.summary_hooks: list[Callable[[dict[str, Any]], None]] = []
        """Each may add keys to an `env.list` entry (spaces: `incompatible`, docs/spaces.md)."""
        self.history: History | None = None
        """Versions and the trash (core/history.py); the supervisor sets it."""
        self._ops: dict[str, Callable[[dict[str, Any], Any], Awaitable[Any]]] = {
            "status": self.op_status,
            "env.list": self.op_list,
            "env.import": self.op_import,
            "env.get": self.op_get,
            "env.put": self.op_put,
            "env.patch": self.op_patch,
            "env.delete": self.op_delete,
            "env.export": self.op_export,
            "env.merge": self.op_merge,
            "env.history": self.op_history,
            "env.at": self.op_at,
            "env.restore": self.op_restore,
            "env.trash": self.op_trash,
            "env.untrash": self.op_untrash,
            "env.subscribe": self.op_subscribe,
            "events.subscribe": self.op_events_subscribe,
            "unsubscribe": self.op_unsubscribe,
        }

    def register(self, op: str, handler: Callable[[dict[str, Any], Any], Awaitable[Any]]) -> None:
        """Let another service (mirrors, peers...) add its operations to the socket."""
        if op in self._ops:
            raise ValueError(f"operation {op!r} is registered already")
        self._ops[op] = handler

    async def handle(self, op: str, args: dict[str, Any], session: Any) -> Any:
        handler = self._ops.get(op)
        if handler is None:
            raise OpError(UNKNOWN_OP, f"unknown operation {op!r}; known: {', '.join(self._ops)}")
        check_args(op, args)
        try:
            return await handler(args, session)
        except UnknownEnvironment as exc:
            raise OpError(NOT_FOUND, f"no environment with id {exc.env_id!r}") from None
        except ModelError as exc:
            raise OpError(exc.code, exc.message) from None
        except (UpdateRejected, UnsupportedUpdate) as exc:
            raise OpError(BAD_UPDATE, str(exc)) from None
        except RecursionError:
            # before anything is stored: parsing or `prepare` (a write that fails half-way is
            # rolled back by the registry)
            raise OpError(BAD_REQUEST, "the JSON is nested too deeply") from None
        except BaseException as exc:
            # A Rust panic in pycrdt is a BaseException: as such it would end the whole daemon.
            if type(exc).__name__ != "PanicException":
                raise
            log.error("op %r: pycrdt panicked: %s", op, exc)
            raise OpError(INTERNAL, f"pycrdt panicked: {exc}") from None

    # -- daemon -------------------------------------------------------------------------------

    async def op_status(self, args: dict[str, Any], session: Any) -> Any:
        reg = self.registry
        newer = [i for i in reg.envs if reg.summary(i)["newer"]]
        status = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.time() - self.started,
            "data_dir": str(self.data_dir),
            "socket": str(self.socket_path),
            "environments": len(reg.envs),
            "loaded": reg.resident(),  # documents in memory (core/residency.py)
            "newer": newer,
            "last_migration": LAST_MIGRATION,
            "model_version": MODEL_VERSION,
            "store": reg.store.stats(),
            "events": reg.events.last_id,
        }
        if self.history is not None:
            status["history"] = self.history.stats()
        for hook in self.status_hooks:
            status.update(hook())
        return status

    async def op_list(self, args: dict[str, Any], session: Any) -> Any:
        summaries = [self.registry.summary(i) for i in sorted(self.registry.envs)]
        for hook in self.summary_hooks:
            for summary in summaries:
                hook(summary)
        return summaries

    # -- environments --------------------------------------------------------------------------

    async def op_import(self, args: dict[str, Any], session: Any) -> Any:
        env = _json_arg(args, "env")
        prepared, notes = prepare(env)
        if args.get("new_id") or "uuid" not in prepared:
            env_id = str(uuid.uuid4())
            prepared["uuid"] = env_id
        else:
            env_id = prepared["uuid"]
            if env_id in self.registry.envs:
                raise OpError(
                    EXISTS,
                    f"an environment with id {env_id} exists already (import with a new id: --new-id)",
                )
        ticket = self.registry.create(env_id, prepared, LOCAL)
        result = {"id": env_id, "repairs": notes, "newer": is_newer(prepared)}
        return _pending(ticket, result)

    async def op_get(self, args: dict[str, Any], session: Any) -> Any:
        env = self.registry.export(_str_arg(args, "id"))
        pointer = args.get("pointer") or ""
        if not isinstance(pointer, str):
            raise OpError(BAD_POINTER, "pointer must be a string")
        if not pointer:
            return order_like(env, None)  # the same text on every replica and after restarts
        return _resolve_pointer(env, pointer)

    async def op_put(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        self.registry.get(env_id)
        env = _json_arg(args, "env")
        other = env.get("uuid") if isinstance(env, dict) else None
        if isinstance(other, str) and other != env_id and not args.get("force_id"):
            # Most likely the wrong file (or the wrong ID): replacing one environment with
            # another's content would lose the first, and be acknowledged as a success.
            raise OpError(
                UUID_MISMATCH,
                f"the environment given has uuid {other!r}, not {env_id}: refusing to replace "
                f"{env_id} with another environment (force_id replaces it anyway, keeping id "
                f"{env_id})",
            )
        return self._write(env_id, env)

    async def op_patch(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        ops = _json_arg(args, "patch")
        base = self.registry.export(env_id)
        try:
            patched = patch_along(base, ops)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise OpError(BAD_PATCH, f"JSON Patch: {exc}") from None
        except (TypeError, AttributeError, KeyError, ValueError) as exc:
            raise OpError(BAD_PATCH, f"JSON Patch: not a list of operations ({exc})") from None
        # what the patch left shared with the export is prepared already (model.prepare)
        return self._write(env_id, patched, base)

    def _write(self, env_id: str, env: Any, base: dict[str, Any] | None = None) -> Any:
        prepared, notes = prepare(env, env_id, base)
        changed, ticket = self.registry.apply(env_id, prepared, LOCAL)
        return _pending(ticket, {"changed": changed, "repairs": notes})

    async def op_delete(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        for hook in self.before_delete:
            hook(env_id)
        ticket = self.registry.delete(env_id, LOCAL)
        return _pending(ticket, {"deleted": True})

    async def op_export(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        fmt = args.get("format", "json")
        if fmt == "json":
            return order_like(self.registry.export(env_id), None)
        if fmt == "yjs":
            sv = args.get("state_vector")
            if sv is not None and not isinstance(sv, bytes):
                raise OpError(BAD_REQUEST, "state_vector must be bytes")
            try:
                return self.registry.state_update(env_id, sv)
            except ValueError as exc:
                raise OpError(BAD_REQUEST, f"bad state vector: {exc}") from None
        raise OpError(BAD_REQUEST, f"unknown format {fmt!r} (json or yjs)")

    async def op_merge(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        update = args.get("update")
        if not isinstance(update, bytes):
            raise OpError(BAD_UPDATE, "update must be bytes (a Yjs v1 update)")
        created, changed, ticket = self.registry.merge(env_id, update, LOCAL)
        return _pending(ticket, {"created": created, "changed": changed})

    # -- history and trash (core/history.py, docs/history.md) ----------------------------------

    def _history(self) -> History:
        if self.history is None:
            raise OpError(BAD_REQUEST, "this daemon keeps no history")
        return self.history

    async def op_history(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        history = self._history()
        await history.settled()
        return {"id": env_id, "versions": history.versions(env_id)}

    async def op_at(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        version = _version_arg(args)
        history = self._history()
        await history.settled()
        return order_like(history.at(env_id, version), None)

    async def op_restore(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        version = _version_arg(args)
        history = self._history()
        await history.settled()
        changed, ticket = history.restore(env_id, version, LOCAL)
        return _pending(ticket, {"restored": version, "changed": changed})

    async def op_trash(self, args: dict[str, Any], session: Any) -> Any:
        history = self._history()
        await history.settled()
        return history.trash()

    async def op_untrash(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        history = self._history()
        await history.settled()
        new_id, ticket = history.untrash(env_id, LOCAL, new_id=bool(args.get("new_id")))
        return _pending(ticket, {"id": new_id, "from": env_id})

    # -- subscriptions -------------------------------------------------------------------------

    async def op_subscribe(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str_arg(args, "id")
        snapshot = self.registry.export(env_id)
        update = self.registry.state_update(env_id)
        token = 0
        sub = session.open_subscription(on_close=lambda: self.registry.unsubscribe(env_id, token))

        def deliver(event: dict[str, Any]) -> None:
            session.push(sub, event)
            if event["type"] == "deleted":
                session.close_subscription(sub)

        token = self.registry.subscribe(env_id, deliver)
        return {"sub": sub, "snapshot": snapshot, "update": update}

    async def op_events_subscribe(self, args: dict[str, Any], session: Any) -> Any:
        events = self.registry.events
        since = args.get("since")
        if since is None:
            since = events.last_id
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:
            raise OpError(BAD_REQUEST, "since must be a non-negative integer")
        backlog = events.since(since)
        missed = max(0, events.oldest_id - since - 1) if since < events.last_id else 0
        # a cursor from before this daemon started (or from the future): the events between
        # are unknown, so the client must re-read the state
        reset = 0 < since < events.first_id - 1 or since > events.last_id
        token = 0
        sub = session.open_subscription(on_close=lambda: events.unlisten(token))
        token = events.listen(lambda event: session.push(sub, event))
        return {
            "sub": sub,
            "cursor": events.last_id,
            "missed": missed,
            "reset": reset,
            "events": backlog if not since > events.last_id else [],
        }

    async def op_unsubscribe(self, args: dict[str, Any], session: Any) -> Any:
        sub = args.get("sub")
        if not isinstance(sub, int) or not session.close_subscription(sub):
            raise OpError(NOT_FOUND, f"no subscription {sub!r} on this connection")
        return {"unsubscribed": sub}
