"""The page's JSON, built from the socket's operations (one source of truth: what `peerdaemon
status`, `env list`, `env links`, `mock list`, `space list` and `peers` show, joined per panel).

Every read goes through `Operations.handle(op, args, session)` as a socket request would; the
only fact not on the socket is an environment's stored size, read from the store (`sizes`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..core.errors import UNKNOWN_OP, OpError, Pending

Sizes = Callable[[list[str]], Awaitable[dict[str, int]]]


class OperationHandler(Protocol):
    """`peerdaemon.operations.Operations`, as the status page uses it."""

    async def handle(self, op: str, args: dict[str, Any], session: Any) -> Any: ...


class ReadSession:
    """The session of a request that opens no subscription (a plain read or an action)."""

    closed = False

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def open_subscription(self, on_close: Callable[[], None] | None = None) -> int:
        raise OpError("bad-request", "this operation needs a streaming session")

    def push(self, sub: int, event: Any) -> None:  # never called: no subscription is open
        pass

    def close_subscription(self, sub: int) -> bool:
        return False

    def on_close(self, callback: Callable[[], None]) -> None:
        callback()


async def call(ops: OperationHandler, op: str, session: Any = None, **args: Any) -> Any:
    """One operation, acknowledged as the socket would (a write once it is durable)."""
    result = await ops.handle(op, args, session if session is not None else ReadSession())
    if isinstance(result, Pending):
        await result.wait()
        return result.result
    return result


async def _optional(ops: OperationHandler, op: str, default: Any, **args: Any) -> Any:
    """An operation some daemons do not register (a service left out): its default then."""
    try:
        return await call(ops, op, **args)
    except OpError as exc:
        if exc.code == UNKNOWN_OP:
            return default
        raise


# -- panels ---------------------------------------------------------------------------------------


async def device(ops: OperationHandler) -> dict[str, Any]:
    """This device: `status`, less the API key."""
    status = await call(ops, "status")
    store = status.get("store") if isinstance(status.get("store"), dict) else {}
    page = status.get("status_page")
    return {
        "id": status.get("device"),
        "name": status.get("name"),
        "version": status.get("version"),
        "uptime": status.get("uptime"),
        "pid": status.get("pid"),
        "data_dir": status.get("data_dir"),
        "socket": status.get("socket"),
        "environments": status.get("environments"),
        "spaces": status.get("spaces"),
        "store_bytes": store.get("db_bytes"),
        "store": store,
        "events": status.get("events"),
        "status_page": {k: v for k, v in page.items() if k not in ("api_key", "open_url")}
        if isinstance(page, dict)
        else None,
    }


async def peers(ops: OperationHandler) -> dict[str, Any]:
    """`peers`, split: LAN devices, then hubs (rows with `kind: hub`)."""
    result = await _optional(ops, "peers", {"peers": []})
    rows = [r for r in result.get("peers", []) if isinstance(r, dict)]
    return {
        "peers": [r for r in rows if r.get("kind") != "hub"],
        "hubs": [r for r in rows if r.get("kind") == "hub"],
    }


async def spaces(ops: OperationHandler) -> list[dict[str, Any]]:
    """`space list`, each with its hub (from `status`'s `hub` section) and, per member, the state
    of the link to that device (from `peers`)."""
    listed = await _optional(ops, "space.list", [])
    status = await call(ops, "status")
    links = {r.get("device"): r for r in (await peers(ops))["peers"] if r.get("device")}
    hubs_of: dict[str, list[dict[str, Any]]] = {}
    for hub in status.get("hub") or []:
        if not isinstance(hub, dict):
            continue
        for space_id, state in (hub.get("spaces") or {}).items():
            hubs_of.setdefault(space_id, []).append(
                {
                    "url": hub.get("url"),
                    "state": hub.get("state"),
                    "reason": hub.get("reason"),
                    "space_state": state,
                    "synced": hub.get("synced"),
                }
            )
    out = []
    for space in listed:
        members = []
        for member in space.get("members", []):
            row = links.get(member.get("device"))
            members.append(
                {
                    **member,
                    "link": None
                    if member.get("self") or row is None
                    else {"state": row.get("state"), "reason": row.get("reason")},
                }
            )
        out.append({**space, "members": members, "hubs": hubs_of.get(space.get("id"), [])})
    return out


async def environments(ops: OperationHandler, sizes: Sizes | None = None) -> list[dict[str, Any]]:
    """`env list`, each with its size, space, linked file (and conflict), mock and Cloud Mock."""
    listed = await call(ops, "env.list")
    links = {link["id"]: link for link in await _optional(ops, "env.links", []) if "id" in link}
    mocks: dict[str, dict[str, Any]] = {}
    clouds: dict[str, dict[str, Any]] = {}
    for mock in await _optional(ops, "mock.list", []):
        if isinstance(mock, dict) and isinstance(mock.get("id"), str):
            (clouds if mock.get("where") == "hub" else mocks)[mock["id"]] = mock
    shared: dict[str, dict[str, Any]] = {}
    for space in await _optional(ops, "space.list", []):
        for env in space.get("environments", []):
            if env.get("present") and not env.get("conflict"):
                shared[env["id"]] = {"id": space.get("id"), "name": space.get("name")}
    ids = [e["id"] for e in listed]
    size_of = await sizes(ids) if sizes is not None else {}
    out = []
    for env in listed:
        env_id = env["id"]
        link = links.get(env_id)
        mock = mocks.get(env_id)
        cloud = clouds.get(env_id)
        out.append(
            {
                **env,
                "size": size_of.get(env_id),
                "space": shared.get(env_id),
                "link": None
                if link is None
                else {
                    "path": link.get("path"),
                    "state": link.get("state"),
                    "conflict": bool(link.get("conflict")),
                    "conflict_path": link.get("conflict_path"),
                    "error": link.get("error"),
                    "auto": link.get("auto"),
                },
                "mock": None
                if mock is None
                else {
                    k: mock.get(k)
                    for k in ("state", "url", "port", "hostname", "tls", "requests", "error")
                },
                "cloud_mock": None
                if cloud is None
                else {k: cloud.get(k) for k in ("state", "url", "access")},
            }
        )
    return out


async def recent_events(ops: OperationHandler, limit: int, session: Any) -> dict[str, Any]:
    """The last `limit` events the log holds, oldest first, and the cursor to stream from."""
    last = (await call(ops, "status")).get("events")
    since = max(0, int(last) - limit) if isinstance(last, int) else 0
    result = await call(ops, "events.subscribe", session, since=since)
    session.close_subscription(result["sub"])
    return {"cursor": result["cursor"], "events": result["events"][-limit:] if limit else []}


async def overview(
    ops: OperationHandler, sizes: Sizes | None, session: Any, limit: int = 50
) -> dict[str, Any]:
    """Everything the page shows, in one answer (its first render is one request)."""
    return {
        "device": await device(ops),
        "spaces": await spaces(ops),
        "environments": await environments(ops, sizes),
        **await peers(ops),
        **await recent_events(ops, limit, session),
    }


# -- JSON -----------------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: null instead (a browser's JSON.parse refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; bytes as hex, NaN as null."""
    try:
        text = json.dumps(value, default=_default, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(_finite(value), default=_default, separators=(",", ":"))
    return text.encode()
