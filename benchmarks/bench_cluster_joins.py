"""A burst of room joins on one cluster process (issue 14, docs/hub-cluster.md "Opening a
room"): every room that opens or closes changes what the process's one blocking XREAD reads.

    .venv/bin/python benchmarks/bench_cluster_joins.py [--rooms 200] [--rounds 3]

One private Redis and PostgreSQL (lab/servers.py, loopback). Two cluster nodes run in this
process (`ClusterNode` with its HubDocs and rooms, no HTTP server): A publishes an update
to a hot room every 2 ms; B follows it, and `--rooms` clients join as many new rooms on B
at once (each is loaded from PostgreSQL off the event loop, then followed). Per mode,
alternating over the rounds: how long until every room is open, how many times B's read
started again, and the delay of the hot room's updates on B (p50/p99/max ms) during the
burst against the same while idle. Modes: the node's current reader (`batched`) and one
that restarts the read at every change (`each`, what the node did first).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from pycrdt import Doc, Map

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
from servers import have_postgres, have_redis, running_postgres, running_redis  # noqa: E402

from peerdaemon.core.events import EventLog  # noqa: E402
from peerdaemon.hub.cluster.node import ClusterNode  # noqa: E402
from peerdaemon.hub.cluster.protocol import room_of  # noqa: E402
from peerdaemon.hub.cluster.store import migrate  # noqa: E402
from peerdaemon.hub.ywebsocket import YConn  # noqa: E402

SPACE = "bench"


async def _open(redis_url: str, dsn: str, **options) -> ClusterNode:
    node = ClusterNode(redis_url, dsn, **options)
    store = await node.open()
    docs = node.docs_class(store, EventLog(), sweep_interval=None)
    docs.load()
    rooms = node.rooms_for(docs, lambda *parts: b"".join(parts))
    docs.add_listener(rooms.on_update)
    return node


async def _run(nursery: trio.Nursery, node: ClusterNode) -> None:
    assert node.docs is not None
    await nursery.start(node.store.run)
    nursery.start_soon(node.docs.run)


def _update(key: str) -> bytes:
    doc = Doc()
    doc.get("m", type=Map)[key] = 1
    return doc.get_update()


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _round(redis_url: str, dsn: str, mode: str, rooms: int, tag: str) -> dict[str, float]:
    a = await _open(redis_url, dsn, block_ms=5000)
    b = await _open(redis_url, dsn, block_ms=5000)
    async with trio.open_nursery() as nursery:
        await _run(nursery, a)
        await _run(nursery, b)
        if mode == "each":
            b.restart_batch = 0.0
        assert b.rooms is not None
        hot = f"hot{tag}"
        b.rooms.join(SPACE, hot, YConn(0))
        while (SPACE, hot) not in b.rooms.rooms:
            await trio.sleep(0.01)
        sent: dict[bytes, float] = {}
        delays: list[tuple[float, float]] = []  # (when, delay)
        deliver = b.deliver

        def timed(entries):  # type: ignore[no-untyped-def]
            now = time.perf_counter()
            for e in entries:
                t = sent.pop(e.data, None)
                if t is not None:
                    delays.append((t, now - t))
            return deliver(entries)

        b.deliver = timed  # type: ignore[method-assign]
        b._changed.set()  # (the reader takes it)
        await trio.sleep(0.3)  # (the reader restarted with the hot room)

        async def pump() -> None:
            n = 0
            while True:
                data = _update(f"{tag}-{n}")
                n += 1
                sent[data] = time.perf_counter()
                await a.bus.publish_update(room_of(SPACE, hot), data, a.bus.origin("pump"))
                await trio.sleep(0.002)

        nursery.start_soon(pump)
        await trio.sleep(1.0)
        restarts0 = b.read_restarts
        start = time.perf_counter()
        for i in range(rooms):
            b.rooms.join(SPACE, f"r{tag}-{i}", YConn(i + 1))
        while len(b.rooms.rooms) < rooms + 1:
            await trio.sleep(0.001)
        opened = time.perf_counter()
        await trio.sleep(0.5)
        end = time.perf_counter()
        nursery.cancel_scope.cancel()
    await b.aclose(drain=0)  # (in the reverse order: their clients' scopes nest)
    await a.aclose(drain=0)
    idle = [d for t, d in delays if t < start]
    burst = [d for t, d in delays if start <= t <= opened]
    after = [d for t, d in delays if opened < t <= end]
    ms = 1000.0
    return {
        "open_ms": (opened - start) * ms,
        "restarts": float(b.read_restarts - restarts0),
        "idle_p50": _pct(idle, 0.5) * ms,
        "idle_p99": _pct(idle, 0.99) * ms,
        "burst_p50": _pct(burst, 0.5) * ms,
        "burst_p99": _pct(burst, 0.99) * ms,
        "burst_max": max(burst, default=float("nan")) * ms,
        "after_p50": _pct(after, 0.5) * ms,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (have_redis() and have_postgres()):
        print("skipped: needs redis-server and PostgreSQL")
        return 0
    modes = ["batched", "each"]
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        with (
            running_redis(Path(tmp) / "redis", persist=False) as redis,
            running_postgres(fsync=True) as pg,
        ):
            import psycopg

            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                migrate(conn)
            for r in range(args.rounds):
                for mode in modes if r % 2 == 0 else modes[::-1]:
                    res = trio.run(_round, redis.url, pg.dsn, mode, args.rooms, f"{r}{mode}")
                    results[mode].append(res)
                    print(mode, " ".join(f"{k}={v:.2f}" for k, v in res.items()), flush=True)
    print(f"\n{args.rooms} rooms joined at once on process B; medians of {args.rounds} rounds")
    keys = list(results[modes[0]][0])
    print(f"{'':10}" + "".join(f"{k:>11}" for k in keys))
    for mode in modes:
        med = {k: statistics.median(r[k] for r in results[mode]) for k in keys}
        print(f"{mode:10}" + "".join(f"{med[k]:11.2f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
