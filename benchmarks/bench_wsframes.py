"""The hub reading its clients' frames: CPU per message and memory per idle connection of the
websocket core (`hub.wsconn.WsConn`), this tree's against another's (issue 13: wsproto's parsing
was the hub's largest CPU item in a join's awareness flood).

    .venv/bin/python benchmarks/bench_wsframes.py [--messages 20000] [--size 120] [--rounds 7]
        [--baseline TREE]   # e.g. `git archive HEAD | tar -x -C TREE`: the tree before

Each round runs this script once per tree as a child (PYTHONPATH=the tree), alternating, and the
medians are printed side by side. A child feeds `WsConn` masked binary frames of `--size` bytes
as a client's reads bring them: one frame per read (a join's flood: every client sends a few),
and 64 per read (a burst), taking every message (`next_message`); a ping every 100 frames is
answered. Memory: `tracemalloc`'s count for 2000 connections' cores, each having read one frame
(as an idle client has), outlets not counted. No sockets: the bytes are made in memory.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MASK = b"\x5a\x13\xc7\x81"
CONNECTIONS = 2000


def client_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    key = (MASK * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + MASK + masked


def new_core() -> Any:
    """A `WsConn` as the hub of the tree on `sys.path` makes it after an upgrade."""
    from peerdaemon.hub import transport
    from peerdaemon.hub.wsconn import WsConn
    from peerdaemon.hub.ywebsocket import Outbox, Outlet

    outlet = Outlet(1, Outbox(), ready=None)
    if "proto" not in inspect.signature(WsConn).parameters:
        return WsConn(outlet, now=0.0)
    from wsproto.connection import Connection, ConnectionType  # the tree before: wsproto

    proto = Connection(ConnectionType.SERVER, extensions=[])
    queue = getattr(transport, "_EventQueue", None)
    if queue is not None:
        proto._events = queue()
    return WsConn(outlet, now=0.0, proto=proto)


def child(messages: int, size: int) -> dict[str, Any]:
    payload = bytes(range(256)) * (size // 256 + 1)
    frames = [client_frame(0x2, payload[i % 7 : i % 7 + size]) for i in range(messages)]
    for i in range(0, messages, 100):
        frames[i] = client_frame(0x9, b"p") + frames[i]
    out: dict[str, Any] = {}
    for name, reads in (
        ("one_per_read", frames),
        ("64_per_read", [b"".join(frames[i : i + 64]) for i in range(0, messages, 64)]),
    ):
        core = new_core()
        got = 0
        start = time.perf_counter()
        for data in reads:
            core.receive_data(data, 1.0)
            while core.next_message() is not None:
                got += 1
            core.outlet.outbox.take()  # the pongs
        elapsed = time.perf_counter() - start
        assert got == messages, (name, got)
        out[name] = round(elapsed / messages * 1e6, 3)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cores = []
    for _ in range(CONNECTIONS):
        core = new_core()
        core.receive_data(frames[1], 1.0)
        while core.next_message() is not None:
            pass
        cores.append(core)
    outlets = sum(sys.getsizeof(c.outlet) + sys.getsizeof(c.outlet.outbox) for c in cores)
    used = tracemalloc.get_traced_memory()[0] - before - outlets - sys.getsizeof(cores)
    tracemalloc.stop()
    out["bytes_per_idle_core"] = round(used / CONNECTIONS)
    import peerdaemon

    out["tree"] = str(Path(peerdaemon.__file__).resolve().parents[1])
    return out


def run_child(tree: Path, messages: int, size: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, __file__, "--child", "--messages", str(messages), "--size", str(size)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, cwd=tree)
    result = json.loads(done.stdout.splitlines()[-1])
    if Path(result["tree"]) != tree:
        raise SystemExit(f"bench_wsframes: {tree} ran the code of {result['tree']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=120, help="payload bytes per message")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline", type=Path, help="a source tree to compare with")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.messages, args.size)))
        return 0
    trees = {"this": ROOT}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():  # alternating: the machine's load falls on both
            runs[name].append(run_child(tree, args.messages, args.size))
    summary: dict[str, dict[str, float]] = {}
    print(f"{args.messages} messages of {args.size} bytes, {args.rounds} rounds (medians)")
    for figure, unit in (
        ("one_per_read", "us/message"),
        ("64_per_read", "us/message"),
        ("bytes_per_idle_core", "bytes"),
    ):
        row = {name: statistics.median(r[figure] for r in rs) for name, rs in runs.items()}
        summary[figure] = row
        line = f"{figure:22} {row['this']:10.2f} {unit}"
        if "baseline" in row:
            line += (
                f"   baseline {row['baseline']:10.2f}   ratio {row['this'] / row['baseline']:.2f}"
            )
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "medians": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
