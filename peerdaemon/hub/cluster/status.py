"""`peerdaemon hub status` of a cluster (docs/hub.md, "Scaled mode"): what PostgreSQL holds
and which hub processes Redis knows alive, read with one short connection to each, so it
works from any machine that reaches them, with or without a hub process running there.

Every process renews its heartbeat each second with a few figures of its own (its rooms,
clients, queued commits, bus lag: `ClusterNode._heartbeat_info`); a process killed drops out
within `ALIVE_TTL_MS`. A server that cannot be reached is reported, not raised: the status
of a cluster in trouble is what an admin needs most.
"""

from __future__ import annotations

import json
from typing import Any

import cbor2
import psycopg
import trio

from ...core.identity import SETTING, Identity
from .accounts import ClusterAccounts
from .bus import RoomBus, connect
from .store import _sizes

__all__ = ["cluster_status"]


def cluster_status(redis_url: str, dsn: str, *, timeout: float = 3.0) -> dict[str, Any]:
    """`hub_key`, `users`, `spaces` (as the embedded hub's status gives them), `documents`,
    `stored_bytes`, `db_bytes`, and `cluster`: `postgres` and `redis` (`reachable`, `error`),
    `epoch`, `processes` (name -> the figures of its last heartbeat)."""
    out: dict[str, Any] = {
        "hub_key": None,
        "users": 0,
        "spaces": [],
        "documents": 0,
        "stored_bytes": 0,
        "db_bytes": 0,
    }
    cluster: dict[str, Any] = {}
    try:
        out.update(_postgres_figures(dsn, timeout))
        cluster["postgres"] = {"reachable": True}
    except psycopg.Error as exc:
        cluster["postgres"] = {"reachable": False, "error": str(exc).strip()}
    try:
        epoch, processes = trio.run(_redis_figures, redis_url, timeout)
        cluster["redis"] = {"reachable": True}
        cluster["epoch"] = epoch
        cluster["processes"] = processes
    except Exception as exc:  # (BusError, OSError, TooSlowError, in an ExceptionGroup too)
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        cluster["redis"] = {"reachable": False, "error": str(exc).strip() or "no answer"}
        cluster["processes"] = {}
    out["cluster"] = cluster
    return out


def _postgres_figures(dsn: str, timeout: float) -> dict[str, Any]:
    with psycopg.connect(dsn, connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
        sizes = _sizes(conn)
        row = conn.execute("SELECT value FROM settings WHERE key = %s", (SETTING,)).fetchone()
        db_row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    by_space: dict[str, tuple[int, int]] = {}
    for (space, _doc), size in sizes.items():
        count, total = by_space.get(space, (0, 0))
        by_space[space] = (count + 1, total + size)
    accounts = ClusterAccounts.open_pg(dsn)
    try:
        users = accounts.users()
        spaces = accounts.spaces()
    finally:
        accounts.close()
    known = {sp["id"] for sp in spaces}
    for space_id in sorted(set(by_space) - known):
        spaces.append({"id": space_id, "owner": None, "name": "", "members": []})
    return {
        "hub_key": _hub_key(row[0] if row else None),
        "users": len(users),
        "spaces": [
            {
                "id": sp["id"],
                "name": sp.get("name", ""),
                "owner": sp.get("owner"),
                "members": sp.get("members", []),
                "documents": by_space.get(sp["id"], (0, 0))[0],
                "stored_bytes": by_space.get(sp["id"], (0, 0))[1],
            }
            for sp in spaces
        ],
        "documents": len(sizes),
        "stored_bytes": sum(sizes.values()),
        "db_bytes": int(db_row[0]) if db_row else 0,
    }


def _hub_key(value: bytes | None) -> str | None:
    """The key fingerprint every process of the cluster shows (None: no process ran yet)."""
    try:
        saved = cbor2.loads(bytes(value)) if value is not None else None
    except (ValueError, cbor2.CBORDecodeError):
        return None
    raw = saved.get("private_key") if isinstance(saved, dict) else None
    if not (isinstance(raw, bytes) and len(raw) == 32):
        return None
    public = saved.get("public_key")
    kept = isinstance(public, bytes) and len(public) == 32
    return Identity.from_private_bytes(raw, "hub", public if kept else None).device_id


async def _redis_figures(redis_url: str, timeout: float) -> tuple[str, dict[str, Any]]:
    with trio.fail_after(timeout):
        async with connect(redis_url, connect_timeout=timeout) as client:
            bus = RoomBus(client, "status")
            epoch = await bus.epoch()
            raw = await bus.processes()
    processes: dict[str, Any] = {}
    for name, info in sorted(raw.items()):
        try:
            processes[name] = json.loads(info)
        except ValueError:
            processes[name] = {}
    return epoch, processes
