"""The daemon-to-daemon latency through the hub, measured on real processes.

    .venv/bin/python benchmarks/bench_hub_daemons.py [--rounds 3] [--edits 300] [--quick]

Each round starts, in a fresh temporary directory, a hub (`peerdaemon hub serve`) and two
daemons (`peerdaemon run --no-mdns`, no LAN listener: the hub is their only path), all on
127.0.0.1. Daemon A creates a space, shares the Mockoon test environment in it and attaches the
space to the hub (user alice); daemon B joins with A's invite and attaches it (user bob, added as
a member with `hub space add-member`). B subscribes to the environment on its socket. Then A gets
`--edits` sequential `env.patch` edits on its socket; each is timed from sending the patch to the
`change` event arriving at B's subscriber, i.e. A's socket -> A's registry -> hub link -> hub
(durable in its store) -> B's hub link -> B's registry -> B's socket. The first 10 are warm-up.

Prints p50 / p99 per round and their medians over the rounds, then a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from envgen import FIXTURE  # noqa: E402
from procutil import stop_process, wait_daemon  # noqa: E402

from peerdaemon.api.client import Client, open_client  # noqa: E402

LOCAL = "127.0.0.1"
WARMUP = 10


class Proc:
    """A peerdaemon process of ours, ended by its pid."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self._log = log.open("wb")
        env = dict(os.environ, PEERDAEMON_NO_MDNS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peerdaemon", *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: Proc) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError("the hub exited at start")
        try:
            with socket.create_connection((LOCAL, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("the hub did not start")


def hub_admin(hub_dir: Path, *argv: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "peerdaemon", "hub", *argv, "--data-dir", str(hub_dir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def measure(sock_a: Path, sock_b: Path, env_id: str, edits: int) -> list[float]:
    """Sequential edits on A; seconds from sending each to B's change event."""
    latencies: list[float] = []
    async with open_client(sock_a) as a, open_client(sock_b) as b:
        sub = await b.subscribe_env(env_id)
        events = sub.__aiter__()
        for i in range(edits + WARMUP):
            patch = [{"op": "replace", "path": "/name", "value": f"edit {i}"}]
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.patch, env_id, patch)
                with trio.fail_after(30):
                    while True:
                        event = await events.__anext__()
                        if event.get("type") == "change":
                            break
                t1 = time.perf_counter()
            if i >= WARMUP:
                latencies.append(t1 - t0)
        await sub.aclose()
    return latencies


def one_round(base: Path, edits: int) -> dict[str, Any]:
    hub_dir, port = base / "hub", free_port()
    procs: list[Proc] = []
    try:
        hub = Proc(
            ["hub", "serve", "--data-dir", str(hub_dir), "--listen", f"{LOCAL}:{port}"],
            base / "hub.log",
        )
        procs.append(hub)
        wait_port(port, hub)
        url = f"ws://{LOCAL}:{port}"
        alice = hub_admin(hub_dir, "user", "add", "alice")
        bob = hub_admin(hub_dir, "user", "add", "bob")
        socks = {}
        for name in ("a", "b"):
            socks[name] = base / f"{name}.sock"
            procs.append(
                Proc(
                    [
                        "run",
                        "--data-dir",
                        str(base / name),
                        "--socket",
                        str(socks[name]),
                        "--name",
                        name,
                        "--no-mdns",
                    ],
                    base / f"{name}.log",
                )
            )
        for sock in socks.values():
            wait_daemon(sock)
        with Client.connect(socks["a"]) as a, Client.connect(socks["b"]) as b:
            space = a.call("space.create", name="bench")["id"]
            env_id = a.import_env(FIXTURE.read_text(encoding="utf-8"), new_id=True)["id"]
            a.call("env.share", id=env_id, space=space)
            # loopback ws://: trust the key the hub shows first (b's invite then carries it)
            a.call("space.hub", space=space, url=url, token=alice, trust_first_use=True)
            deadline = time.monotonic() + 30
            while a.status()["hub"][0]["state"] != "connected":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"A did not connect: {a.status()['hub']}")
                time.sleep(0.02)
            hub_admin(hub_dir, "space", "add-member", space, "bob")
            code = a.call("space.invite", space=space, addresses=[])["code"]
            b.call("space.join", code=code)
            b.call("space.hub", space=space, token=bob)
            while True:
                try:
                    if b.get(env_id, "/uuid") == env_id:
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"B did not get the environment: {b.status()['hub']}")
                time.sleep(0.02)
            assert not [r for r in b.call("peers")["peers"] if r.get("kind") != "hub"]
        latencies = trio.run(measure, socks["a"], socks["b"], env_id, edits)
    finally:
        for proc in reversed(procs):
            proc.stop()
    ms = [x * 1000 for x in latencies]
    return {
        "edits": len(ms),
        "p50_ms": pct(ms, 0.5),
        "p99_ms": pct(ms, 0.99),
        "mean_ms": statistics.fmean(ms),
        "max_ms": max(ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="one short round, to check it runs")
    args = parser.parse_args()
    rounds, edits = (1, 30) if args.quick else (args.rounds, args.edits)
    results = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="pdhubbench") as tmp:
            results.append(one_round(Path(tmp), edits))
        print(
            f"round {r + 1}/{rounds}: p50 {results[-1]['p50_ms']:.2f} ms, "
            f"p99 {results[-1]['p99_ms']:.2f} ms",
            file=sys.stderr,
        )
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        values = [res[key] for res in results]
        print(
            f"daemon-to-daemon latency through the hub {label} ms: median "
            f"{statistics.median(values):.2f}  (rounds: "
            + ", ".join(f"{v:.2f}" for v in values)
            + ")"
        )
    print(json.dumps({"hub_daemon_latency": results}, indent=2))


if __name__ == "__main__":
    main()
