"""The hub's memory with many stored environments and few in use (issue 13): RSS of a hub whose
store holds 1,000 environments of ~100 kB, of which 10 are open in y-websocket clients.

    .venv/bin/python benchmarks/bench_hub_memory.py [--baseline DIR] [--rounds 3] [--touch 200]

`--baseline DIR` (or `--base`): also run the code in DIR (say a `git archive HEAD` copy),
alternating with this tree round by round, on the same stored data. Per run: a fresh data dir
seeded by that code's own store (one update per environment, as a client's first upload leaves it)
with a user and a space; `peerdaemon hub serve` on 127.0.0.1; its RSS once started and idle, then
with 10 clients connected and synced to 10 environments (and how long their first sync took).
`--touch N`: then N more clients each sync one other environment and leave, and the RSS is read
right after and once the hub had time for two idle checkpoints (95 s). Loopback only.
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

import cbor2
import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPACE = "bench"
USER = "bench"
SETTLE = 2.0  # seconds for the hub to settle before its RSS is read
SWEEPS_WAIT = 95.0  # two idle checkpoints of 30 s, and some


def make_updates(path: Path, envs: int, size: int) -> None:
    """The environments' first uploads (a Yjs update each), written once, for every tree."""
    from envgen import make_environment

    from peerdaemon.model import import_environment

    out = []
    for i in range(envs):
        env = make_environment(size, seed=i, routes=5)
        doc, _stored, _ = import_environment(env, env["uuid"])
        out.append([env["uuid"], doc.get_update()])
    path.write_bytes(cbor2.dumps(out))


def seed(data_dir: Path, updates: Path) -> None:
    """Run with the code under test on PYTHONPATH: a user, a space, the stored environments."""
    from peerdaemon.hub.accounts import Accounts
    from peerdaemon.store import Store

    with Accounts.open(data_dir) as accounts:
        token = accounts.add_user(USER)
        accounts.create_space(SPACE, USER, "bench")
    with Store.open(data_dir) as store:
        for env_id, update in cbor2.loads(updates.read_bytes()):
            store.enqueue_append(f"{SPACE}/{env_id}", update)
    print(token)


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class Hub:
    def __init__(self, root: Path, tree: Path) -> None:
        self.data = root / "hub-data"
        self.log = root / "hub.log"
        self.env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.token = ""

    def _cli(self, *argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "peerdaemon", "hub", *argv, "--data-dir", str(self.data)],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        return done.stdout.strip()

    def seed(self, updates: Path) -> None:
        done = subprocess.run(
            [sys.executable, __file__, "--seed", str(self.data), str(updates)],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        self.token = done.stdout.strip().splitlines()[-1]
        self._cli("limits", "set", "--user", USER, "devices_per_user", "100000")

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "peerdaemon", "hub", "serve", "--data-dir", str(self.data)]
                + ["--listen", "127.0.0.1:0"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        from procutil import wait_hub_port

        self.port = wait_hub_port(self.proc, self.log, 120)

    def rss(self) -> dict[str, int]:
        assert self.proc is not None
        return rss_kb(self.proc.pid)

    def stop(self) -> None:
        from procutil import stop_process

        stop_process(self.proc)
        self.proc = None


async def sync_client(
    hub: Hub, env_id: str, hold: trio.Event | None = None, synced: list[float] | None = None
) -> float:
    """A y-websocket client of one environment: connect, sync (the seconds from connecting
    until its step 2 arrived go to `synced`); stay until `hold` (None: leave at once)."""
    from trio_websocket import open_websocket_url

    from peerdaemon.hub.ywebsocket import MSG_SYNC, SYNC_STEP2, decode_message, sync_step1

    url = f"ws://127.0.0.1:{hub.port}/yjs/{SPACE}/{env_id}?token={hub.token}"
    t0 = time.perf_counter()
    async with open_websocket_url(url, max_message_size=64 << 20) as ws:
        await ws.send_message(sync_step1(b"\x00"))
        while True:
            msg = decode_message(bytes(await ws.get_message()))
            if msg.kind == MSG_SYNC and msg.sub == SYNC_STEP2:
                break
        seconds = time.perf_counter() - t0
        if synced is not None:
            synced.append(seconds)
        if hold is not None:
            await hold.wait()
    return seconds


async def scenario(hub: Hub, env_ids: list[str], in_use: int, touch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    await trio.sleep(SETTLE)
    out["idle_kb"] = hub.rss()["VmRSS"]
    hold = trio.Event()
    syncs: list[float] = []

    async with trio.open_nursery() as nursery:
        for env_id in env_ids[:in_use]:
            nursery.start_soon(sync_client, hub, env_id, hold, syncs)
        with trio.fail_after(120):
            while len(syncs) < in_use:
                await trio.sleep(0.01)
        await trio.sleep(SETTLE)
        out["in_use_kb"] = hub.rss()["VmRSS"]
        out["first_sync_ms"] = statistics.median(syncs) * 1000
        if touch:
            for env_id in env_ids[in_use : in_use + touch]:
                await sync_client(hub, env_id, None)
            await trio.sleep(SETTLE)
            out["touched_kb"] = hub.rss()["VmRSS"]
            await trio.sleep(SWEEPS_WAIT)
            out["after_sweeps_kb"] = hub.rss()["VmRSS"]
        out["peak_kb"] = hub.rss()["VmHWM"]
        hold.set()
    return out


def one_run(root: Path, tree: Path, updates: Path, env_ids: list[str], a: Any) -> dict[str, Any]:
    hub = Hub(root, tree)
    hub.seed(updates)
    t0 = time.perf_counter()
    hub.start()
    started = time.perf_counter() - t0
    try:
        out = trio.run(scenario, hub, env_ids, a.in_use, a.touch)
    finally:
        hub.stop()
    out["start_s"] = started
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--envs", type=int, default=1000)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--in-use", type=int, default=10)
    parser.add_argument("--touch", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--baseline", dest="base", type=Path, metavar="TREE", help="the code to compare with"
    )
    parser.add_argument("--base", dest="base", type=Path, help=argparse.SUPPRESS)  # old name
    parser.add_argument("--json", metavar="FILE", help="also write the results (JSON) to FILE")
    parser.add_argument("--seed", nargs=2, type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.seed:
        seed(*a.seed)
        return
    sys.path.insert(0, str(HERE))
    trees = {"this": ROOT}
    if a.base is not None:
        trees = {"base": a.base.resolve(), **trees}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="pdhm") as tmp:
        updates = Path(tmp) / "updates.cbor"
        t0 = time.perf_counter()
        make_updates(updates, a.envs, a.size)
        env_ids = [env_id for env_id, _ in cbor2.loads(updates.read_bytes())]
        stored = sum(len(u) for _, u in cbor2.loads(updates.read_bytes()))
        print(
            f"{a.envs} environments, {stored >> 20} MB of updates, made in"
            f" {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
        for r in range(a.rounds):
            for name, tree in trees.items():
                with tempfile.TemporaryDirectory(prefix="run", dir=tmp) as run:
                    results[name].append(one_run(Path(run), tree, updates, env_ids, a))
                print(f"round {r + 1}/{a.rounds} {name}: {results[name][-1]}", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(res[key] for res in results[name])

    print(
        f"hub RSS with {a.envs} stored environments of ~{a.size // 1000} kB,"
        f" {a.in_use} in use (medians of {a.rounds}):"
    )
    for name in trees:
        line = (
            f"  {name:5} idle {med(name, 'idle_kb') / 1024:6.1f} MB;"
            f" {a.in_use} in use {med(name, 'in_use_kb') / 1024:6.1f} MB"
            f" (first sync {med(name, 'first_sync_ms'):.1f} ms);"
            f" peak {med(name, 'peak_kb') / 1024:6.1f} MB; start {med(name, 'start_s'):.1f} s"
        )
        if a.touch:
            line += (
                f"; after {a.touch} more used once {med(name, 'touched_kb') / 1024:6.1f} MB,"
                f" {SWEEPS_WAIT:.0f} s later {med(name, 'after_sweeps_kb') / 1024:6.1f} MB"
            )
        print(line)
    if a.base is not None:
        ratio = med("this", "in_use_kb") / med("base", "in_use_kb")
        print(f"  this/base RSS with {a.in_use} in use: {ratio:.2f}")
    print(json.dumps(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
