"""The hub's scaled mode (issue 14) side by side with itself on one process and with the
embedded hub, in one run, alternating.

    .venv/bin/python benchmarks/bench_hub.py --prepare /tmp/yh      # npm ci, once (registry)
    ../shared/tools/leakcheck .venv/bin/python benchmarks/bench_cluster.py --harness /tmp/yh/bench
        [--rounds 3] [--quick] [--json FILE] [--redis-cluster]

One private Redis and one private PostgreSQL (lab/servers.py: free loopback ports, temporary
directories), two `peerdaemon hub serve --redis --postgres` processes on them, and one embedded
`hub serve` (SQLite), all on 127.0.0.1, started once and stopped by their pids at the end.
The clients are stock y-websocket 3.1.0 providers in one Node process
(benchmarks/cluster_clients.mjs, run with the packages of the harness `bench_hub.py --prepare`
installs), awareness off. Every run uses a room of its own.

Figures (medians over the rounds, each round's values listed):
  latency   A -> B, 500 edits 5 ms apart, p50/p99 (ms): A and B on different processes of the
            cluster (`2 procs`), both on one process of it (`1 proc`), both on the embedded hub
  fanout    1 writer, 200 edits to 400 readers: delivered messages/s and delay p50/p99 (ms);
            readers alternating over the 2 processes, all on one, all on the embedded hub
  sync      a new client's initial sync of a 15 MB environment (benchmarks/envgen.py) that no
            process has open: loaded from PostgreSQL, and from the embedded hub's SQLite store
  failover  a client's room on process 1 (200 edits), process 1 killed -9, the client
            reconnects to process 2 with its document: ms from the kill until it is synced
            there, and until a new client on process 2 holds every edit; and the same with
            the client staying away (process 2 has only PostgreSQL and the stream). Process 1
            is started again after each

`--redis-cluster` adds two more processes on a private Redis Cluster (three masters,
lab/servers.py `running_redis_cluster`; the same PostgreSQL) and the latency configurations
`rc 2 procs` and `rc 1 proc` beside the single Redis's, alternating with them in each round.

Without Node, the harness's packages, redis-server or PostgreSQL it says what it skips and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
from procutil import stop_process, wait_hub_port  # noqa: E402
from servers import (  # noqa: E402
    free_port,
    have_postgres,
    have_redis,
    have_redis_cluster,
    running_postgres,
    running_redis,
    running_redis_cluster,
)

DRIVER = Path(__file__).resolve().with_name("cluster_clients.mjs")
SHARED = Path(
    os.environ.get("YJS_BENCH_DIR", Path(__file__).resolve().parents[2] / "shared" / "bench")
)
SPACE = "bench"
USER = "bench"
HOST = "127.0.0.1"
LIMITS = {"devices_per_user": 100_000, "envs_per_space": 100_000, "bytes_per_env": 256 << 20}

FULL = {"ops": 500, "fan_clients": 400, "fan_ops": 200, "env_bytes": 15_000_000, "fo_ops": 200}
QUICK = {"ops": 100, "fan_clients": 100, "fan_ops": 50, "env_bytes": 2_000_000, "fo_ops": 50}

# scenario -> the configurations it compares (each round rotates their order)
CONFIGS: dict[str, tuple[str, ...]] = {
    "latency": ("2procs", "1proc", "embedded"),
    "fanout": ("2procs", "1proc", "embedded"),
    "sync": ("postgres", "embedded"),
    "failover": ("reconnect", "alone"),
}
COLUMNS = {
    "2procs": "cluster, 2 procs",
    "1proc": "cluster, 1 proc",
    "embedded": "embedded hub",
    "postgres": "cluster (PostgreSQL)",
    "reconnect": "client reconnects",
    "alone": "client stays away",
    "rc2procs": "redis cluster, 2 procs",
    "rc1proc": "redis cluster, 1 proc",
}
FIGURES: list[tuple[str, str, str, Any]] = [
    ("latency", "edit latency p50", "ms", lambda r: r["latency_ms"]["p50"]),
    ("latency", "edit latency p99", "ms", lambda r: r["latency_ms"]["p99"]),
    ("fanout", "fan-out delivered", "msg/s", lambda r: r["delivered_msgs_per_s"]),
    ("fanout", "fan-out delay p50", "ms", lambda r: r["latency_ms"]["p50"]),
    ("fanout", "fan-out delay p99", "ms", lambda r: r["latency_ms"]["p99"]),
    ("sync", "env initial sync", "ms", lambda r: r["sync_ms"]),
    ("sync", "env update size", "MB", lambda r: round(r["update_bytes"] / 1e6, 1)),
    ("failover", "kill -9: client resynced", "ms", lambda r: r["resynced_ms"]),
    ("failover", "kill -9: room complete", "ms", lambda r: r["complete_ms"]),
]


def missing(harness: Path) -> str:
    """Why this benchmark cannot run here, or ""."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (harness / "yjs-bench" / "node_modules" / "y-websocket").exists():
        return f"no prepared harness in {harness} (bench_hub.py --prepare DIR; --harness DIR/bench)"
    if not (have_redis() and have_postgres()):
        return "needs redis-server and PostgreSQL (apt-get install redis-server postgresql)"
    try:
        import coredis  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError:
        return "needs the `cluster` extra (pip install 'peerdaemon[cluster]')"
    return ""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(data: Path, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "peerdaemon", "hub", *argv, "--data-dir", str(data)],
        check=True,
        capture_output=True,
        text=True,
        env=_env(),
    )
    return done.stdout.strip()


class HubProc:
    """One `hub serve` process on a fixed loopback port (a restart keeps it)."""

    def __init__(self, name: str, data: Path, cluster: tuple[str, str] | None = None) -> None:
        self.name = name
        self.data = data
        self.cluster = cluster  # (redis url, postgres dsn), or None: the embedded hub
        self.log = data.parent / f"{name}.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        data.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        argv = [sys.executable, "-m", "peerdaemon", "hub", "serve", "--data-dir", str(self.data)]
        argv += ["--listen", f"{HOST}:{self.port}"]
        if self.cluster:
            argv += ["--redis", self.cluster[0], "--postgres", self.cluster[1]]
        self.log.write_bytes(b"")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env())
        wait_hub_port(self.proc, self.log, 60)

    def stop(self) -> None:
        stop_process(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, token: str) -> str:
        return f"ws://{HOST}:{self.port}/yjs/{SPACE}?token={token}"


def environment_update(size: int) -> bytes:
    """A synthetic environment of about `size` bytes of JSON, as its first Yjs update."""
    from envgen import make_environment

    from peerdaemon.model import import_environment

    env = make_environment(size, seed=1)
    doc, _stored, _ = import_environment(env, env["uuid"])
    return doc.get_update()


def seed_postgres(dsn: str, docs: list[str], update: bytes) -> str:
    """Schema, the bench user and space, its limits, and `docs` stored: -> the user's token."""
    import psycopg
    import trio

    from peerdaemon.hub.cluster.accounts import ClusterAccounts
    from peerdaemon.hub.cluster.store import DocStore, migrate

    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
    with ClusterAccounts.open_pg(dsn) as accounts:
        token = accounts.add_user(USER)
        accounts.create_space(SPACE, USER, "bench")
        for key, value in LIMITS.items():
            accounts.set_limit(key, value, USER)

    async def store_docs() -> None:
        store = DocStore(dsn)
        try:
            await store.open()
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                tickets = [store.append(SPACE, doc, update) for doc in docs]
                for ticket in tickets:
                    await ticket.wait()
                nursery.cancel_scope.cancel()
        finally:
            store.close()

    trio.run(store_docs)
    return token


def seed_embedded(data: Path, docs: list[str], update: bytes) -> str:
    """The same for the embedded hub (before it starts: its store is then closed)."""
    from peerdaemon.store import Store

    token = _cli(data, "user", "add", USER)
    _cli(data, "space", "create", SPACE, "--owner", USER)
    for key, value in LIMITS.items():
        _cli(data, "limits", "set", "--user", USER, key, str(value))
    with Store.open(data) as store:
        for doc in docs:
            store.enqueue_append(f"{SPACE}/{doc}", update)
    return token


def drive(harness: Path, work: Path, argv: list[str], timeout: float = 300) -> dict[str, Any]:
    """cluster_clients.mjs beside a link to the harness's packages: its JSON line."""
    target = work / "driver"
    if not target.exists():
        target.mkdir()
        shutil.copy(DRIVER, target / DRIVER.name)
        (target / "node_modules").symlink_to(harness / "yjs-bench" / "node_modules")
    done = subprocess.run(
        ["node", str(target / DRIVER.name), *argv], capture_output=True, text=True, timeout=timeout
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"no output (exit {done.returncode}): {done.stderr[-500:]}"}
    return json.loads(lines[-1])


class Bench:
    def __init__(self, harness: Path, work: Path, sizes: dict[str, int], rounds: int) -> None:
        self.harness = harness
        self.work = work
        self.sizes = sizes
        self.rounds = rounds
        self.docs = [f"env-{n}" for n in range(rounds)]

    def setup(self, redis_url: str, dsn: str, rcluster_url: str | None = None) -> None:
        update = environment_update(self.sizes["env_bytes"])
        self.ctoken = seed_postgres(dsn, self.docs, update)
        self.one = HubProc("hub1", self.work / "hub1", (redis_url, dsn))
        self.two = HubProc("hub2", self.work / "hub2", (redis_url, dsn))
        self.emb = HubProc("embedded", self.work / "embedded")
        self.etoken = seed_embedded(self.emb.data, self.docs, update)
        self.hubs = [self.one, self.two, self.emb]
        if rcluster_url is not None:  # (--redis-cluster: the same PostgreSQL)
            self.rc1 = HubProc("rc1", self.work / "rc1", (rcluster_url, dsn))
            self.rc2 = HubProc("rc2", self.work / "rc2", (rcluster_url, dsn))
            self.hubs += [self.rc1, self.rc2]
        for hub in self.hubs:
            hub.start()

    def stop(self) -> None:
        for hub in self.hubs:
            hub.stop()

    def run(self, scenario: str, config: str, n: int) -> dict[str, Any]:
        s = self.sizes
        c1, c2 = self.one.url(self.ctoken), self.two.url(self.ctoken)
        e = self.emb.url(self.etoken)
        if scenario == "latency":
            pairs = {"2procs": (c1, c2), "1proc": (c1, c1), "embedded": (e, e)}
            if config.startswith("rc"):
                r1, r2 = self.rc1.url(self.ctoken), self.rc2.url(self.ctoken)
                pairs.update(rc2procs=(r1, r2), rc1proc=(r1, r1))
            a, b = pairs[config]
            argv = ["--url-a", a, "--url-b", b, "--ops", str(s["ops"])]
        elif scenario == "fanout":
            a, urls = {"2procs": (c1, f"{c1},{c2}"), "1proc": (c1, c1), "embedded": (e, e)}[config]
            argv = ["--url-a", a, "--urls", urls, "--clients", str(s["fan_clients"])]
            argv += ["--ops", str(s["fan_ops"])]
        elif scenario == "sync":
            # round n syncs env-n, stored and never opened: the process loads it from its store
            argv = ["--url-a", c2 if config == "postgres" else e, "--room", self.docs[n]]
        else:
            argv = ["--url-a", c1, "--url-b", c2, "--kill-pid", str(self.one.pid)]
            argv += ["--ops", str(s["fo_ops"]), "--reconnect", "off" if config == "alone" else "on"]
        try:
            return drive(self.harness, self.work, ["--scenario", scenario, *argv])
        finally:
            if scenario == "failover" and self.one.proc and self.one.proc.poll() is not None:
                self.one.start()  # the driver killed it: start it again


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, smaller figures")
    parser.add_argument("--scenarios", default=",".join(CONFIGS), help="comma-separated")
    parser.add_argument("--harness", metavar="DIR", help="a harness bench_hub.py --prepare made")
    parser.add_argument("--json", metavar="FILE", help="also write the summary (JSON) to FILE")
    parser.add_argument(
        "--redis-cluster", action="store_true", help="latency on a Redis Cluster too"
    )
    args = parser.parse_args()
    if args.redis_cluster:
        CONFIGS["latency"] = ("2procs", "rc2procs", "1proc", "rc1proc", "embedded")
    rounds = 1 if args.quick else args.rounds
    sizes = QUICK if args.quick else FULL
    scenarios = [s for s in args.scenarios.split(",") if s]
    harness = Path(args.harness) if args.harness else SHARED
    why = missing(harness)
    if not why and args.redis_cluster and not have_redis_cluster():
        why = "--redis-cluster needs redis-cli (apt-get install redis-server)"
    if why:
        print(f"bench_cluster: skipped every scenario ({', '.join(scenarios)}): {why}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="pdbench-cluster-"))
    results: list[dict[str, Any]] = []
    bench = Bench(harness, work, sizes, rounds)
    try:
        with (
            running_redis(work / "redis", persist=False) as redis,
            running_postgres() as pg,
            ExitStack() as more,
        ):
            rcluster_url = None
            if args.redis_cluster:
                rcluster_url = more.enter_context(
                    running_redis_cluster(work / "rcluster", persist=False)
                ).url
            t0 = time.monotonic()
            try:
                bench.setup(redis.url, pg.dsn, rcluster_url)
                print(f"set up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
                for n in range(rounds):
                    for scenario in scenarios:
                        configs = CONFIGS[scenario]
                        k = n % len(configs)
                        for config in configs[k:] + configs[:k]:
                            t = time.monotonic()
                            out = bench.run(scenario, config, n)
                            out.update(_scenario=scenario, _config=config, _round=n)
                            results.append(out)
                            status = "ok" if out.get("ok") else f"FAILED: {out.get('error')}"
                            print(
                                f"round {n + 1} {scenario:8s} {config:9s}: {status} "
                                f"({time.monotonic() - t:.1f} s)",
                                file=sys.stderr,
                            )
            finally:
                bench.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = report(results, scenarios, rounds, sizes)
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary))
    return 0 if all(r.get("ok") for r in results) else 1


def report(
    results: list[dict[str, Any]], scenarios: list[str], rounds: int, sizes: dict[str, int]
) -> dict[str, Any]:
    print(f"\nmedians over {rounds} round(s); each round's values in brackets; sizes {sizes}")
    summary: dict[str, Any] = {"rounds": rounds, "sizes": sizes, "figures": {}}
    for scenario, label, unit, get in FIGURES:
        if scenario not in scenarios:
            continue
        row: dict[str, Any] = {}
        for config in CONFIGS[scenario]:
            values = []
            for r in results:
                if (r["_scenario"], r["_config"]) == (scenario, config) and r.get("ok"):
                    try:
                        values.append(get(r["result"]))
                    except (KeyError, TypeError):
                        pass
            row[config] = {
                "median": statistics.median(values) if values else None,
                "values": values,
            }
        summary["figures"][f"{label} ({unit})"] = row
        cells = []
        for config, d in row.items():
            vals = ", ".join(f"{v:g}" for v in d["values"])
            med = "n/a" if d["median"] is None else f"{d['median']:g}"
            cells.append(f"{COLUMNS[config]}: {med} [{vals}]")
        print(f"{label + ' (' + unit + ')':30s} " + " | ".join(cells))
    for r in results:
        if not r.get("ok"):
            print(
                f"failed: {r['_config']} {r['_scenario']} round {r['_round'] + 1}: {r.get('error')}"
            )
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
