"""The local-socket client's own cost (issue 13): this tree's `AsyncClient` against another
tree's, on one daemon, side by side.

    .venv/bin/python benchmarks/bench_client.py --baseline /tmp/base [--rounds 5] [--each 300]

One daemon (this checkout) serves both. Each round runs a client process of each tree in turn
(alternating which goes first), which measures, sequentially and after a warm-up: a request's
round trip (`env.get` of one field), a small patch's acknowledgement, and the time from sending
that patch to its `change` event on a subscription of the same client (what `bench_lan.py`
calls the same-daemon event). Only the client differs, so the ratios are the client's share.
`bench_lan.py --baseline` runs the other tree's daemons under this tree's client instead.
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

HERE = Path(__file__).resolve().parent
FIGURES = ("call_p50_ms", "ack_p50_ms", "event_p50_ms", "call_p99_ms", "event_p99_ms")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def patch(c: Any, env_id: str, value: str, done: list[float]) -> None:
    await c.patch(env_id, [{"op": "replace", "path": "/name", "value": value}])
    done.append(time.perf_counter())


async def measure(sock: str, env_id: str, each: int) -> dict[str, Any]:
    """Runs in the client process: the figures of whichever `peerdaemon` it imports."""
    import trio

    from peerdaemon.api import client as client_mod

    calls: list[float] = []
    acks: list[float] = []
    events: list[float] = []
    async with client_mod.open_client(sock) as c:
        async with await c.subscribe_env(env_id) as sub:
            for n in range(each + 30):  # the first 30 are warm-up
                t0 = time.perf_counter()
                await c.get(env_id, "/name")
                t1 = time.perf_counter()
                done: list[float] = []
                t2 = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(patch, c, env_id, f"bench-{os.getpid()}-{n}", done)
                    event = await sub.__anext__()
                    t3 = time.perf_counter()
                assert event["type"] == "change", event
                if n >= 30:
                    calls.append((t1 - t0) * 1000)
                    events.append((t3 - t2) * 1000)
                    acks.append((done[0] - t2) * 1000)
    return {
        "client": client_mod.__file__,
        "call_p50_ms": statistics.median(calls),
        "call_p99_ms": pct(calls, 0.99),
        "ack_p50_ms": statistics.median(acks),
        "event_p50_ms": statistics.median(events),
        "event_p99_ms": pct(events, 0.99),
    }


def run_client(tree: Path | None, sock: Path, env_id: str, each: int) -> dict[str, Any]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(sock), env_id, str(each)],
        env=env,
        cwd=tempfile.gettempdir(),  # not a checkout: `peerdaemon` comes from PYTHONPATH or ours
        capture_output=True,
        check=True,
        text=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="the other tree (required)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--each", type=int, default=300, help="samples per round and client")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        import trio

        sock, env_id, each = a.worker
        print(json.dumps(trio.run(measure, sock, env_id, int(each))))
        return
    if a.baseline is None:
        parser.error("--baseline is required")

    sys.path.insert(0, str(HERE))
    from bench_daemon import Daemon
    from envgen import FIXTURE

    from peerdaemon.api.client import Client

    results: dict[str, list[dict[str, Any]]] = {"ours": [], "base": []}
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        d = Daemon(Path(tmp))
        d.start()
        try:
            with Client.connect(d.sock) as c:
                env_id = c.import_env(FIXTURE.read_text())["id"]
            for r in range(a.rounds):
                order = [("ours", None), ("base", a.baseline)]
                for key, tree in order if r % 2 == 0 else order[::-1]:
                    results[key].append(run_client(tree, d.sock, env_id, a.each))
                print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
        finally:
            d.stop()
    print(f"clients: {results['ours'][0]['client']} vs {results['base'][0]['client']}")
    for field in FIGURES:
        ours = [x[field] for x in results["ours"]]
        base = [x[field] for x in results["base"]]
        mo, mb = statistics.median(ours), statistics.median(base)
        print(
            f"{field}: this tree {mo:.3f}  baseline {mb:.3f}  ratio {mo / mb:.3f}  "
            f"(rounds: {', '.join(f'{x:.3f}' for x in ours)} | "
            f"{', '.join(f'{x:.3f}' for x in base)})"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
