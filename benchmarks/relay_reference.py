"""The reference for a LAN hop: a minimal pycrdt relay carrying an edit from one client to another.

    .venv/bin/python benchmarks/relay_reference.py [--edits 300]

The relay is a separate process (this file with `--serve PORT`): a trio-websocket server on
127.0.0.1 that keeps one pycrdt document, applies every update a client sends and forwards it
to every other client. No authentication, encryption, store or model: the floor that any Python
sync path on pycrdt and trio-websocket sits above. Two clients in this process, each with its
own pycrdt document: A edits (a map key, a small text) and sends the update; the latency is from
A's edit to B's document holding it, p50 and p99 over sequential edits.

`bench_lan.py` runs this in the same run as its daemon-to-daemon hop, so the two figures share
the machine's state.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from typing import Any

import trio
from pycrdt import Doc, Map
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
    serve_websocket,
)

LOCAL = "127.0.0.1"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


async def serve(port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    doc = Doc()
    clients: set[WebSocketConnection] = set()

    async def handler(request: Any) -> None:
        ws = await request.accept()
        clients.add(ws)
        try:
            while True:
                update = await ws.get_message()
                assert isinstance(update, bytes)
                doc.apply_update(update)
                for other in list(clients):
                    if other is not ws:
                        try:
                            await other.send_message(update)
                        except ConnectionClosed:
                            clients.discard(other)
        except ConnectionClosed:
            pass
        finally:
            clients.discard(ws)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, LOCAL, port, None)
        task_status.started(server.port)


def start_relay() -> tuple[subprocess.Popen[bytes], int]:
    """The relay process and its port (it prints the port once listening)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError("the reference relay did not start")
    return proc, int(line)


async def latency(port: int, edits: int, warmup: int = 10) -> dict[str, float]:
    """A's edit -> B's document holds it (ms), over the relay on `port`."""
    url = f"ws://{LOCAL}:{port}/"
    doc_a, doc_b = Doc(), Doc()
    map_a = doc_a.get("m", type=Map)
    map_b = doc_b.get("m", type=Map)
    samples: list[float] = []
    async with open_websocket_url(url) as a, open_websocket_url(url) as b:
        await trio.sleep(0.05)  # both registered with the relay
        for i in range(edits + warmup):
            value = f"edit {i}"
            t0 = time.perf_counter()
            with doc_a.transaction():
                map_a["k"] = value
            await a.send_message(doc_a.get_update(doc_b.get_state()))
            while map_b.get("k") != value:
                doc_b.apply_update(await b.get_message())
            if i >= warmup:
                samples.append((time.perf_counter() - t0) * 1000)
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": pct(samples, 0.99),
        "edits": float(edits),
    }


def measure(edits: int) -> dict[str, float]:
    proc, port = start_relay()
    try:
        return trio.run(latency, port, edits)
    finally:
        proc.kill()  # ours, by its id
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve, args.serve)
                print(port, flush=True)  # for the parent: listening

        trio.run(run)
        return
    result = measure(args.edits)
    print(
        f"pycrdt relay, client to client: p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms"
    )


if __name__ == "__main__":
    main()
