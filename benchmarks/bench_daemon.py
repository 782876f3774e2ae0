"""Figures of the local core, measured against real daemon processes.

    .venv/bin/python benchmarks/bench_daemon.py [--rounds 3] [--quick] [--only big,patch]
    .venv/bin/python benchmarks/bench_daemon.py --only writes --baseline /tmp/base

Prints one line per figure with the median over rounds (and each round's value), then a JSON
summary. Each round starts fresh daemons in a temporary directory; everything runs on this
machine's Unix sockets only.

`writes` (issue 13): a small patch's acknowledgement on a small and on a 15 MB environment of one
daemon, interleaved (their ratio says whether a write costs the change or the environment), and
durable patches per second from one client, sequential, with what bounds it ("floor"): requests
that write nothing (`env.get`: the socket, client and server), the store alone (enqueue to
durable ticket, `bench_store.py --store-alone`) and bare SQLite commits with the store's
settings, on the same disk. `--baseline DIR` runs the same figures on another tree (e.g. `git
archive HEAD | tar -x -C DIR`) in the same rounds, alternating which goes first, and prints both
with their ratio: this machine is shared, so only figures taken side by side compare. With
`--baseline`, the durable sequential patches are also measured with both daemons up at once, in
alternating chunks of 100 (the disk's speed here changes by the second: this pairing is what
compares them best).

`memory` (issue 13): a daemon's RSS holding 1,000 stored environments of ~100 kB with 10 in use,
and its start-up time, this tree against `--baseline DIR` (e.g. HEAD: every document in memory)
side by side on copies of one data directory, alternating which goes first. The directory is
made once by this tree's daemon, which imports them and stops once it unloaded them all (so it
holds what any daemon that ran this code holds: each environment's facts beside its updates).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_store import bare_commits  # noqa: E402
from envgen import FIXTURE, make_environment  # noqa: E402
from procutil import stop_process, wait_daemon  # noqa: E402

from peerdaemon.api.client import AsyncClient, Client  # noqa: E402


class Daemon:
    def __init__(
        self, root: Path, tree: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.tree = tree
        """Where the daemon's code comes from (PYTHONPATH), if not this checkout."""
        self.env = env or {}
        """More environment variables (`PEERDAEMON_*` settings)."""
        self.data = root / "data"
        self.sock = root / "d.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the daemon; returns seconds until it answered `status`."""
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peerdaemon",
                "run",
                "--data-dir",
                str(self.data),
                "--socket",
                str(self.sock),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={
                **os.environ,
                **({"PYTHONPATH": str(self.tree)} if self.tree else {}),
                **self.env,
            },
            cwd=self.root,  # `-m` puts the working directory first: not a checkout's
        )
        wait_daemon(self.sock)
        return time.perf_counter() - t0

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------------------------------------


async def patch_load(sock: Path, env_id: str, total: int, inflight: int) -> dict[str, float]:
    """`total` patches, `inflight` at a time, each acknowledged only once durable."""
    latencies: list[float] = []
    counter = iter(range(total))

    async with await AsyncClient.connect(sock) as client:

        async def worker(w: int) -> None:
            for n in counter:
                op = [
                    {"op": "replace", "path": "/routes/0/responses/0/label", "value": f"w{w}-{n}"}
                ]
                t = time.perf_counter()
                await client.patch(env_id, op)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(inflight):
                nursery.start_soon(worker, w)
        elapsed = time.perf_counter() - t0
    return {
        "per_s": total / elapsed,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
    }


def bench_patches(root: Path, total: int) -> dict[str, Any]:
    d = Daemon(root)
    d.start()
    try:
        with Client.connect(d.sock) as c:
            env_id = c.import_env(FIXTURE.read_text())["id"]
        seq = trio.run(patch_load, d.sock, env_id, max(200, total // 10), 1)
        par = trio.run(patch_load, d.sock, env_id, total, 32)
        with Client.connect(d.sock) as c:
            store = c.status()["store"]
        return {
            "sequential": seq,
            "concurrent32": par,
            "writes_per_commit": store["batched_writes"] / max(1, store["commits"]),
        }
    finally:
        d.stop()


def bench_big(root: Path, size: int) -> dict[str, float]:
    env = make_environment(size)
    text = json.dumps(env)
    d = Daemon(root)
    d.start()
    try:
        with Client.connect(d.sock) as c:
            t = time.perf_counter()
            env_id = c.import_env(text)["id"]
            t_import = time.perf_counter() - t
            t = time.perf_counter()
            out = c.export(env_id)
            t_export = time.perf_counter() - t
            t = time.perf_counter()
            update = c.export(env_id, format="yjs")
            t_export_yjs = time.perf_counter() - t
        assert out == env, "15 MB round trip changed the environment"
        small = trio.run(patch_load, d.sock, env_id, 50, 1)  # small edits of the big environment
        return {
            "json_mb": len(text) / 1e6,
            "import_s": t_import,
            "export_json_s": t_export,
            "export_yjs_s": t_export_yjs,
            "yjs_mb": len(update) / 1e6,
            "patch_p50_ms": small["p50_ms"],
            "patch_per_s": small["per_s"],
        }
    finally:
        d.stop()


PATCHED = "/routes/0/responses/0/label"


async def get_load(sock: Path, env_id: str, total: int) -> float:
    """Requests per second that write nothing (`env.get` of one field), one at a time: the
    round trip of the socket, the client and the server without the store."""
    async with await AsyncClient.connect(sock) as client:
        t0 = time.perf_counter()
        for _ in range(total):
            await client.call("env.get", id=env_id, pointer="/routes/0/responses/0/label")
        return total / (time.perf_counter() - t0)


async def interleaved(sock: Path, env_ids: list[str], each: int) -> list[list[float]]:
    """`each` small patches of every environment, one after the other in turn, sequential:
    the ack latencies (seconds) per environment, measured under the same conditions."""
    latencies: list[list[float]] = [[] for _ in env_ids]
    async with await AsyncClient.connect(sock) as client:
        for n in range(each):
            for i, env_id in enumerate(env_ids):
                op = [{"op": "replace", "path": "/routes/0/responses/0/label", "value": f"i{n}"}]
                t = time.perf_counter()
                await client.patch(env_id, op)
                latencies[i].append(time.perf_counter() - t)
    return latencies


def bench_writes(
    root: Path, size: int, each: int, total: int, tree: Path | None
) -> dict[str, float]:
    """A small patch's ack on a small and on a big environment of one daemon, interleaved;
    then durable sequential patches per second on the small one, and what bounds that figure
    (`floor`): a request that writes nothing (`env.get`) and the store alone, on this disk."""
    d = Daemon(root, tree)
    d.start()
    try:
        with Client.connect(d.sock) as c:
            small = c.import_env(FIXTURE.read_text())["id"]
            big = c.import_env(json.dumps(make_environment(size)))["id"]
        trio.run(interleaved, d.sock, [small, big], 20)  # warm up: caches, the WAL's size
        lat_small, lat_big = trio.run(interleaved, d.sock, [small, big], each)
        seq = trio.run(patch_load, d.sock, small, total, 1)
        gets = trio.run(get_load, d.sock, small, total)
    finally:
        d.stop()
    alone = subprocess.run(
        [
            sys.executable,
            str(HERE / "bench_store.py"),
            "--store-alone",
            str(root / "alone"),
            str(total),
        ],
        env={**os.environ, **({"PYTHONPATH": str(tree)} if tree else {})},
        cwd=root,
        capture_output=True,
        check=True,
        text=True,
    )
    return {
        "get_per_s": gets,
        "store_alone_per_s": float(alone.stdout),
        "bare_commit_per_s": bare_commits(root / "bare", total),
        "small_p50_ms": pct(lat_small, 0.5) * 1000,
        "small_p99_ms": pct(lat_small, 0.99) * 1000,
        "big_p50_ms": pct(lat_big, 0.5) * 1000,
        "big_p99_ms": pct(lat_big, 0.99) * 1000,
        "big_to_small_p50": pct(lat_big, 0.5) / pct(lat_small, 0.5),
        "sequential_per_s": seq["per_s"],
        "sequential_p50_ms": seq["p50_ms"],
        "sequential_p99_ms": seq["p99_ms"],
    }


def bench_paired(root: Path, tree: Path, total: int, chunk: int) -> dict[str, float]:
    """Durable sequential patches/s of this tree and of `tree`, both daemons up at once, in
    alternating chunks of `chunk` patches: on a shared disk whose speed changes by the second,
    both see the same disk (the separate runs of `bench_writes` may not). -> each one's rate
    and ack p50, and the ratio."""
    daemons = [Daemon(root / "ours"), Daemon(root / "base", tree)]
    for d in daemons:
        d.start()
    try:
        env_ids = []
        for d in daemons:
            with Client.connect(d.sock) as c:
                env_ids.append(c.import_env(FIXTURE.read_text())["id"])

        async def go() -> list[list[float]]:
            latencies: list[list[float]] = [[], []]
            async with (
                await AsyncClient.connect(daemons[0].sock) as a,
                await AsyncClient.connect(daemons[1].sock) as b,
            ):
                clients = (a, b)
                for n in range(-2 * chunk, total, chunk):  # one chunk each to warm up
                    order = (0, 1) if (n // chunk) % 2 == 0 else (1, 0)
                    for i in order:
                        for k in range(chunk):
                            op = [{"op": "replace", "path": PATCHED, "value": f"p{n}-{k}"}]
                            t = time.perf_counter()
                            await clients[i].patch(env_ids[i], op)
                            if n >= 0:
                                latencies[i].append(time.perf_counter() - t)
            return latencies

        ours, base = trio.run(go)
    finally:
        for d in daemons:
            d.stop()
    return {
        "per_s": len(ours) / sum(ours),
        "base_per_s": len(base) / sum(base),
        "ratio": sum(base) / sum(ours),
        "p50_ms": pct(ours, 0.5) * 1000,
        "base_p50_ms": pct(base, 0.5) * 1000,
        "p90_ms": pct(ours, 0.9) * 1000,
        "base_p90_ms": pct(base, 0.9) * 1000,
        "p99_ms": pct(ours, 0.99) * 1000,
        "base_p99_ms": pct(base, 0.99) * 1000,
    }


def bench_merge(root: Path, size: int, edits: int) -> dict[str, float]:
    """A peer typing in a response body, merged by the registry (in this process, store on
    disk), with the check for text in arrays (model/strays.py: decoding every update, an index
    of the document's items) and without it, in the same run; and a scan of the whole
    document, what the check falls back to. The store commits in its own thread: these are
    the registry's own costs, not the acknowledgement's."""
    from pycrdt import Doc, Map

    import peerdaemon.core.registry as registry_module
    from peerdaemon.core.events import EventLog
    from peerdaemon.core.registry import Registry
    from peerdaemon.model import prepare
    from peerdaemon.model.strays import ARRAY_ROOTS, StrayFinder, strays
    from peerdaemon.store import Store

    env = make_environment(size)
    out: dict[str, float] = {}
    real_check, real_decode = StrayFinder.check, registry_module.decode
    for label, check, decode in (
        ("on", real_check, real_decode),
        ("off", lambda self, doc, update: [], lambda update: []),  # as before the check
    ):
        StrayFinder.check = check  # type: ignore[method-assign]
        registry_module.decode = decode  # type: ignore[assignment]
        try:
            with Store.open(root / label) as store:
                registry = Registry(store, EventLog())
                registry.create(env["uuid"], prepare(env, env["uuid"])[0], "local")
                peer = Doc()
                peer.apply_update(registry.state_update(env["uuid"]))
                routes = peer.get("routes", type=Map)
                responses = routes[sorted(routes.keys())[0]]["responses"]
                body = responses[sorted(responses.keys())[0]]["body"]
                times = []
                for n in range(edits):
                    state = peer.get_state()
                    body.insert(n, "\u00e9")
                    update = peer.get_update(state)
                    t = time.perf_counter()
                    registry.merge(env["uuid"], update, "peer:bench")
                    times.append((time.perf_counter() - t) * 1000)
                out[f"first_ms_{label}"] = times[0]
                out[f"p50_ms_{label}"] = statistics.median(times[1:])
                full = registry.state_update(env["uuid"])
        finally:
            StrayFinder.check = real_check  # type: ignore[method-assign]
            registry_module.decode = real_decode
    t = time.perf_counter()
    strays(full, ARRAY_ROOTS)
    out["scan_ms"] = (time.perf_counter() - t) * 1000
    out["state_mb"] = len(full) / 1e6
    return out


def bench_rss(root: Path, count: int, size: int) -> dict[str, float]:
    d = Daemon(root)
    d.start()
    try:
        idle = d.rss_kb()
        with Client.connect(d.sock) as c:
            for i in range(count):
                c.import_env(json.dumps(make_environment(size, seed=i)))
        loaded = d.rss_kb()
    finally:
        d.stop()
    d.start()  # the same environments loaded back from the store
    try:
        restarted = d.rss_kb()
    finally:
        d.stop()
    return {
        "idle_mb": idle / 1024,
        "after_import_mb": loaded / 1024,
        "after_restart_mb": restarted / 1024,
    }


def bench_startup(root: Path, count: int, size: int, restarts: int) -> dict[str, Any]:
    d = Daemon(root)
    d.start()
    try:
        with Client.connect(d.sock) as c:
            for i in range(count):
                c.import_env(json.dumps(make_environment(size, seed=1000 + i)))
    finally:
        d.stop()
    times = []
    for _ in range(restarts):
        times.append(d.start())
        d.stop()
    return {"startup_s": statistics.median(times), "each": times}


def bench_db_size(root: Path, edits: int) -> dict[str, float]:
    d = Daemon(root)
    d.start()
    try:
        with Client.connect(d.sock) as c:
            env_id = c.import_env(FIXTURE.read_text())["id"]
        trio.run(patch_load, d.sock, env_id, edits, 64)
        with Client.connect(d.sock) as c:
            store = c.status()["store"]
            state = c.export(env_id, format="yjs")
    finally:
        d.stop()
    files = sum(p.stat().st_size for p in d.data.glob("peerdaemon.sqlite3*"))
    return {
        "edits": edits,
        "db_files_kb_after_stop": files / 1024,
        "db_bytes_running_kb": store["db_bytes"] / 1024,
        "log_kb": store["log_bytes"] / 1024,
        "snapshot_kb": store["snapshot_bytes"] / 1024,
        "compacted_state_kb": len(state) / 1024,
        "ratio_files_to_state": files / len(state),
    }


def prepare_memory_store(root: Path, count: int, size: int) -> Path:
    """`count` environments of ~`size` bytes stored by this tree's daemon, which stops once it
    unloaded them all (history on, as by default: each gets its first version). -> its data."""
    d = Daemon(root, env={"PEERDAEMON_STORE_EVICT_AFTER": "1"})
    d.start()
    try:
        with Client.connect(d.sock) as c:
            for i in range(count):
                c.import_env(json.dumps(make_environment(size, seed=5000 + i)))
            deadline = time.monotonic() + 300
            while c.status()["loaded"]:  # versions taken, then unloaded by the sweeps
                if time.monotonic() > deadline:
                    raise RuntimeError(f"documents still loaded: {c.status()['loaded']}")
                time.sleep(0.5)
    finally:
        d.stop()
    return d.data


async def use_envs(sock: Path, env_ids: list[str]) -> None:
    """Use each: read it and change it."""
    async with await AsyncClient.connect(sock) as client:
        for env_id in env_ids:
            await client.export(env_id)
            op = [{"op": "replace", "path": "/latency", "value": 1}]
            await client.patch(env_id, op)


def bench_memory(root: Path, data: Path, tree: Path | None, in_use: int) -> dict[str, float]:
    """One daemon (this tree, or `tree`) on a copy of `data`: start-up seconds until it answers,
    RSS once started, and RSS with `in_use` environments read and changed."""
    import shutil

    d = Daemon(root, tree)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(data, d.data)
    started = d.start()
    try:
        time.sleep(1.0)  # whatever the start left to do in the background
        rss_started = d.rss_kb()
        with Client.connect(d.sock) as c:
            ids = sorted(e["id"] for e in c.list_envs())
        trio.run(use_envs, d.sock, ids[:: max(1, len(ids) // in_use)][:in_use])  # spread out
        time.sleep(1.0)
        rss_in_use = d.rss_kb()
        with Client.connect(d.sock) as c:
            loaded = c.status().get("loaded", len(ids))  # a daemon without it holds every one
    finally:
        d.stop()
    shutil.rmtree(root, ignore_errors=True)
    return {
        "startup_s": started,
        "rss_started_mb": rss_started / 1024,
        "rss_in_use_mb": rss_in_use / 1024,
        "loaded": loaded,
        "environments": len(ids),
    }


def median_of(rounds: list[dict[str, Any]], path: list[str]) -> float:
    values = []
    for r in rounds:
        v: Any = r
        for p in path:
            v = v[p]
        values.append(v)
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, to check the script")
    parser.add_argument(
        "--only", help="comma-separated figures: writes,patch,big,merge,rss,start,db,memory"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another tree to run `writes` and `memory` on too, side by side",
    )
    parser.add_argument(
        "--memory-envs", type=int, help="environments stored for `memory` (1,000; --quick 100)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results (JSON) to FILE")
    a = parser.parse_args()
    q = a.quick
    results: dict[str, list[dict[str, Any]]] = {
        k: []
        for k in (
            *("writes", "writes_base", "patch", "big", "merge", "merge1", "rss", "start", "db"),
            *("memory", "memory_base", "writes_paired"),
        )
    }
    only = set(a.only.split(",")) if a.only else set(results) - {"writes_base", "memory_base"}
    only.discard("writes_paired")  # (part of `writes` with --baseline)
    if "merge" in only:
        only.add("merge1")
    memory_tmp = tempfile.TemporaryDirectory(prefix="pdm")
    memory_data: Path | None = None
    if "memory" in only:
        count = a.memory_envs or (100 if q else 1000)
        print(f"storing {count} environments of ~100 kB (once)...", file=sys.stderr)
        memory_data = prepare_memory_store(Path(memory_tmp.name) / "prep", count, 100_000)
    for r in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="pdb") as tmp:
            base = Path(tmp)
            if "writes" in only:
                size, each, total = (1_000_000, 50, 300) if q else (15_000_000, 300, 2000)
                trees = [("writes", None), ("writes_base", a.baseline)][: 2 if a.baseline else 1]
                for key, tree in trees if r % 2 == 0 else trees[::-1]:
                    results[key].append(bench_writes(base / key, size, each, total, tree))
                if a.baseline:
                    results["writes_paired"].append(
                        bench_paired(base / "paired", a.baseline, total, 50 if q else 100)
                    )
            if "patch" in only:
                results["patch"].append(bench_patches(base / "p", 500 if q else 5000))
            if "big" in only:
                results["big"].append(bench_big(base / "b", 1_000_000 if q else 15_000_000))
            if "merge" in only:
                results["merge1"].append(bench_merge(base / "m1", 1_000_000, 30 if q else 200))
                if not q:
                    results["merge"].append(bench_merge(base / "m", 15_000_000, 100))
            if "rss" in only:
                results["rss"].append(bench_rss(base / "r", 20, 100_000 if q else 1_000_000))
            if "start" in only:
                results["start"].append(bench_startup(base / "s", 10 if q else 100, 100_000, 3))
            if r == 0 and "db" in only:
                results["db"].append(bench_db_size(base / "d", 2000 if q else 100_000))
            if memory_data is not None:
                trees = [("memory", None), ("memory_base", a.baseline)][: 2 if a.baseline else 1]
                for key, tree in trees if r % 2 == 0 else trees[::-1]:
                    results[key].append(bench_memory(base / key, memory_data, tree, 10))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

    def line(label: str, key: str, path: list[str], fmt: str = "{:.1f}") -> None:
        if not results[key]:
            return
        vals = []
        for res in results[key]:
            v: Any = res
            for p in path:
                v = v[p]
            vals.append(v)
        print(
            f"{label}: median {fmt.format(statistics.median(vals))}  (rounds: "
            + ", ".join(fmt.format(v) for v in vals)
            + ")"
        )

    for key, label in (("writes", "this tree"), ("writes_base", f"baseline {a.baseline}")):
        if not results[key]:
            continue
        print(f"-- writes, {label}")
        line("small patch ack p50 ms, small env", key, ["small_p50_ms"], "{:.2f}")
        line("small patch ack p99 ms, small env", key, ["small_p99_ms"], "{:.2f}")
        line("small patch ack p50 ms, big env", key, ["big_p50_ms"], "{:.2f}")
        line("small patch ack p99 ms, big env", key, ["big_p99_ms"], "{:.2f}")
        line("  big / small p50", key, ["big_to_small_p50"], "{:.2f}")
        line("durable patches/s, 1 client sequential", key, ["sequential_per_s"], "{:.0f}")
        line("  ack p50 ms", key, ["sequential_p50_ms"], "{:.2f}")
        line("  ack p99 ms", key, ["sequential_p99_ms"], "{:.2f}")
        line("  floor: requests/s writing nothing (env.get)", key, ["get_per_s"], "{:.0f}")
        line("  floor: store alone, durable writes/s", key, ["store_alone_per_s"], "{:.0f}")
        line("  floor: bare SQLite commits/s (WAL, FULL)", key, ["bare_commit_per_s"], "{:.0f}")
    if results["writes"] and results["writes_base"]:
        print("-- writes, this tree / baseline (ratio of the medians)")
        for field in (
            *("small_p50_ms", "small_p99_ms", "big_p50_ms", "big_p99_ms", "sequential_per_s"),
            *("sequential_p50_ms", "get_per_s", "store_alone_per_s", "bare_commit_per_s"),
        ):
            ours = median_of(results["writes"], [field])
            theirs = median_of(results["writes_base"], [field])
            print(f"{field}: {ours:.2f} / {theirs:.2f} = {ours / theirs:.3f}")
        print("-- writes, both daemons at once, alternating chunks (this tree, baseline, ratio)")
        line("durable patches/s, 1 client sequential", "writes_paired", ["per_s"], "{:.0f}")
        line("  baseline", "writes_paired", ["base_per_s"], "{:.0f}")
        line("  this tree / baseline", "writes_paired", ["ratio"], "{:.3f}")
        for q in ("p50", "p90", "p99"):
            line(f"  ack {q} ms", "writes_paired", [f"{q}_ms"], "{:.2f}")
            line("  baseline", "writes_paired", [f"base_{q}_ms"], "{:.2f}")
    line("patches/s, 1 client sequential, durable", "patch", ["sequential", "per_s"], "{:.0f}")
    line("  ack latency p50 ms", "patch", ["sequential", "p50_ms"], "{:.2f}")
    line("  ack latency p99 ms", "patch", ["sequential", "p99_ms"], "{:.2f}")
    line("patches/s, 32 in flight, durable", "patch", ["concurrent32", "per_s"], "{:.0f}")
    line("  ack latency p50 ms", "patch", ["concurrent32", "p50_ms"], "{:.2f}")
    line("  ack latency p99 ms", "patch", ["concurrent32", "p99_ms"], "{:.2f}")
    line("  writes per commit (group commit)", "patch", ["writes_per_commit"], "{:.1f}")
    line("big env JSON MB", "big", ["json_mb"], "{:.1f}")
    line("  import s", "big", ["import_s"], "{:.2f}")
    line("  export json s", "big", ["export_json_s"], "{:.2f}")
    line("  export yjs s", "big", ["export_yjs_s"], "{:.2f}")
    line("  small patch, ack latency p50 ms", "big", ["patch_p50_ms"], "{:.1f}")
    line("  small patches/s, sequential", "big", ["patch_per_s"], "{:.0f}")
    for key, mb in (("merge1", "1"), ("merge", "15")):
        line(
            f"peer's body edit merged, {mb} MB env: p50 ms, strays check on",
            key,
            ["p50_ms_on"],
            "{:.2f}",
        )
        line("  same run, check off (p50 ms)", key, ["p50_ms_off"], "{:.2f}")
        line("  first merge ms (on: indexes the document)", key, ["first_ms_on"], "{:.1f}")
        line("  first merge ms (off)", key, ["first_ms_off"], "{:.1f}")
        line("  scan of the whole document ms", key, ["scan_ms"], "{:.1f}")
    line("RSS idle MB", "rss", ["idle_mb"])
    line("RSS with 20 envs, after import MB", "rss", ["after_import_mb"])
    line("RSS with 20 envs, after restart MB", "rss", ["after_restart_mb"])
    line("startup with 100 envs s", "start", ["startup_s"], "{:.2f}")
    for res in results["db"]:
        print(
            "db after {edits} edits: files {db_files_kb_after_stop:.0f} KiB after stop, "
            "{db_bytes_running_kb:.0f} KiB while running (log {log_kb:.0f} KiB, snapshot "
            "{snapshot_kb:.0f} KiB); compacted state {compacted_state_kb:.1f} KiB; ratio "
            "{ratio_files_to_state:.1f}".format(**res)
        )
    for key, label in (("memory", "this tree"), ("memory_base", f"baseline {a.baseline}")):
        if not results[key]:
            continue
        n = results[key][0]["environments"]
        print(f"-- memory, {label}: {n} stored environments of ~100 kB")
        line("  start-up s (until it answers)", key, ["startup_s"], "{:.2f}")
        line("  RSS once started MB", key, ["rss_started_mb"])
        line("  RSS with 10 in use MB", key, ["rss_in_use_mb"])
        line("  documents in memory", key, ["loaded"], "{:.0f}")
    if results["memory"] and results["memory_base"]:
        print("-- memory, this tree / baseline (ratio of the medians)")
        for field in ("startup_s", "rss_started_mb", "rss_in_use_mb"):
            ours = median_of(results["memory"], [field])
            theirs = median_of(results["memory_base"], [field])
            print(f"{field}: {ours:.2f} / {theirs:.2f} = {ours / theirs:.3f}")
    memory_tmp.cleanup()
    print(json.dumps(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
