"""What history costs: the store's size after many edits with history on and off, and how long
`env history` and `env restore` take (docs/history.md).

    .venv/bin/python benchmarks/bench_history.py [--rounds 1] [--edits 100000] [--quick]

Each round starts three daemon processes one after the other, each on a fresh data dir with a
config file: history off, history on with the default interval (300 s), and history on with a
1 s interval (a version every second of the run: far more versions than a person's editing
makes). Each gets the same edits (patches, 64 in flight, each acknowledged once durable) of one
environment; the SQLite files are measured after a clean stop. Then, on the 1 s daemon again,
`env history` and `env restore` of the small environment and of a 1 MB one. Prints one line per
figure with the median over rounds, then a JSON summary. Unix sockets only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from envgen import FIXTURE, make_environment  # noqa: E402
from procutil import stop_process, wait_daemon  # noqa: E402

from peerdaemon.api.client import AsyncClient, Client  # noqa: E402

MODES = {
    "off": "[history]\nenabled = false\n",
    "default": "",  # interval 300 s
    "1s": "[history]\ninterval = 1\n",
}


class Daemon:
    def __init__(self, root: Path, config: str) -> None:
        self.root = root
        self.data = root / "data"
        self.sock = root / "d.sock"
        self.config = root / "config.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peerdaemon",
                "--config",
                str(self.config),
                "run",
                "--data-dir",
                str(self.data),
                "--socket",
                str(self.sock),
                "--no-status",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_daemon(self.sock)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def db_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.data.glob("peerdaemon.sqlite3*"))


async def edit(sock: Path, env_id: str, total: int, inflight: int = 64) -> float:
    """`total` patches that each change one label (a new value every time); -> seconds."""
    counter = iter(range(total))
    async with await AsyncClient.connect(sock) as client:

        async def worker(w: int) -> None:
            for n in counter:
                path = f"/routes/{n % 11}/responses/0/label"
                await client.patch(env_id, [{"op": "replace", "path": path, "value": f"{w}-{n}"}])

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(inflight):
                nursery.start_soon(worker, w)
        return time.perf_counter() - t0


def timed(fn: Any, repeat: int) -> float:
    """Median milliseconds of `fn()`."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_size(root: Path, mode: str, edits: int) -> dict[str, Any]:
    d = Daemon(root / mode, MODES[mode])
    d.start()
    try:
        with Client.connect(d.sock) as c:
            env_id = c.import_env(FIXTURE.read_text())["id"]
        seconds = trio.run(edit, d.sock, env_id, edits)
        with Client.connect(d.sock) as c:
            history = c.status().get("history") or {}
            versions = len(c.call("env.history", id=env_id)["versions"])
    finally:
        d.stop()
    return {
        "db_kib": d.db_bytes() / 1024,
        "edits_per_s": edits / seconds,
        "versions": versions,
        "history_kib": history.get("history_bytes", 0) / 1024,
    }


def bench_ops(root: Path, edits: int) -> dict[str, float]:
    """`env history` and `env restore` on a daemon whose environments have versions."""
    d = Daemon(root / "ops", MODES["1s"])
    d.start()
    try:
        out: dict[str, float] = {}
        with Client.connect(d.sock, timeout=120) as c:
            small = c.import_env(FIXTURE.read_text())["id"]
            big = c.import_env(make_environment(1_000_000), new_id=True)["id"]
            for label, env_id, n in (("small", small, edits), ("1mb", big, 200)):
                trio.run(edit, d.sock, env_id, n, 16)
                deadline = time.monotonic() + 10  # the last edits become a version too
                while len(c.call("env.history", id=env_id)["versions"]) < 2:
                    if time.monotonic() > deadline:
                        raise RuntimeError("no second version")
                    time.sleep(0.05)
                versions = c.call("env.history", id=env_id)["versions"]
                first, last = versions[0]["version"], versions[-1]["version"]
                out[f"{label}_versions"] = len(versions)
                out[f"{label}_history_ms"] = timed(lambda i=env_id: c.call("env.history", id=i), 20)
                out[f"{label}_at_ms"] = timed(
                    lambda i=env_id, v=first: c.call("env.at", id=i, version=v), 10
                )
                turns = itertools.cycle([first, last])  # each restore changes the content
                out[f"{label}_restore_ms"] = timed(
                    lambda i=env_id, t=turns: c.call("env.restore", id=i, version=next(t)), 10
                )
    finally:
        d.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--edits", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="5000 edits, to check the script")
    a = parser.parse_args()
    edits = 5000 if a.quick else a.edits
    rounds: list[dict[str, Any]] = []
    for r in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="pdh") as tmp:
            base = Path(tmp)
            result: dict[str, Any] = {m: bench_size(base, m, edits) for m in MODES}
            result["ops"] = bench_ops(base, min(edits, 20_000))
            rounds.append(result)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

    def med(*path: str) -> float:
        values = []
        for res in rounds:
            v: Any = res
            for p in path:
                v = v[p]
            values.append(v)
        return statistics.median(values)

    print(f"store size after {edits} edits of one environment (SQLite files after a clean stop):")
    for mode, label in (
        ("off", "history off"),
        ("default", "history on, 300 s"),
        ("1s", "on, 1 s"),
    ):
        print(
            f"  {label:18} {med(mode, 'db_kib'):8.0f} KiB  ({med(mode, 'versions'):.0f} versions,"
            f" {med(mode, 'history_kib'):.0f} KiB of them; {med(mode, 'edits_per_s'):.0f} edits/s)"
        )
    for label in ("small", "1mb"):
        print(
            f"{label} env, {med('ops', f'{label}_versions'):.0f} versions: env history"
            f" {med('ops', f'{label}_history_ms'):.1f} ms, env at {med('ops', f'{label}_at_ms'):.1f}"
            f" ms, env restore {med('ops', f'{label}_restore_ms'):.1f} ms (medians)"
        )
    print(json.dumps(rounds))


if __name__ == "__main__":
    main()
