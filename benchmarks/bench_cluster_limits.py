"""What `envs_per_space` costs a cluster process when it creates an environment (issue 14,
docs/hub-cluster.md "Limits across the cluster"): the check runs on the trio thread.

    .venv/bin/python benchmarks/bench_cluster_limits.py [--n 300] [--rounds 3] [--held 50]

One private PostgreSQL (lab/servers.py, loopback, fsync on), a space holding `--held`
environments. Per mode, alternating over the rounds, `--n` checks in a row as `ClusterDocs`
makes them (a synchronous call on one connection), p50/p99/max ms:
- `count`: the check before the reservations, `SELECT count(*)` of the space's documents
  (not atomic);
- `reserve`: `reserve_env` of a new environment (lock, count, insert, commit: one round trip);
- `reserve+release`: a reservation given back at once (a first update that created nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
from servers import have_postgres, running_postgres  # noqa: E402

from peerdaemon.hub.cluster.store import (  # noqa: E402
    _Connection,
    migrate,
    release_env,
    reserve_env,
)

SPACE = "bench"
MODES = ["count", "reserve", "reserve+release"]


def _count(conn: Any) -> int:  # ClusterStore.env_count before the reservations
    row = conn.execute(
        "SELECT count(*) FROM documents WHERE space = %s"
        " AND doc NOT LIKE 'space:%%' AND doc NOT LIKE 'files:%%'",
        (SPACE,),
    ).fetchone()
    return int(row[0]) if row else 0


def _round(conn: _Connection, mode: str, n: int, tag: str) -> list[float]:
    times = []
    for i in range(n):
        doc = f"{tag}-{i}"
        started = time.perf_counter()
        if mode == "count":
            conn._run(_count)
        else:
            reserved, _ = conn._run(lambda c, d=doc: reserve_env(c, SPACE, d, 1 << 40))
            assert reserved
            if mode == "reserve+release":
                conn._run(lambda c, d=doc: release_env(c, SPACE, d))
        times.append((time.perf_counter() - started) * 1000)
    if mode == "reserve":  # back to `--held` environments for the next round
        conn._run(
            lambda c: c.execute("DELETE FROM env_reservations WHERE doc LIKE %s", (f"{tag}-%",))
        )
    return times


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--held", type=int, default=50)
    args = parser.parse_args()
    if not have_postgres():
        print("skipped: needs PostgreSQL")
        return 0
    results: dict[str, list[list[float]]] = {m: [] for m in MODES}
    with running_postgres(fsync=True) as pg:
        conn = _Connection(pg.dsn, name="bench")
        conn._run(migrate)
        conn._run(
            lambda c: c.execute(
                "INSERT INTO documents (space, doc)"
                " SELECT %s, 'env' || g FROM generate_series(1, %s) g",
                (SPACE, args.held),
            )
        )
        for r in range(args.rounds):
            order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
            for mode in order:
                times = _round(conn, mode, args.n, f"{r}{mode}")
                results[mode].append(times)
                print(f"{mode:16} p50 {statistics.median(times):.3f} ms", flush=True)
        conn.close()
    print(f"\n{args.n} checks x {args.rounds} rounds, a space holding {args.held}; ms")
    print(f"{'':16}{'p50':>8}{'p99':>8}{'max':>8}")
    for mode in MODES:
        flat = [t for times in results[mode] for t in times]
        p50 = statistics.median(statistics.median(times) for times in results[mode])
        print(f"{mode:16}{p50:8.3f}{_pct(flat, 0.99):8.3f}{max(flat):8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
