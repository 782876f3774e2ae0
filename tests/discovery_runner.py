"""Run one MdnsDiscovery inside a private network namespace and report as JSON lines.

    ip netns exec NS python tests/discovery_runner.py --device-id A --port 7001 \
        --space SPACE_ID:HEX_SECRET [--space ...] [--interface eth0]

stdout, one JSON object per line; "t" is seconds since this process started:
    {"event": "started", "t": 0.61, "addresses": ["192.0.2.1"]}   registered, browsing
    {"event": "found", "t": 1.9, "since_run": 1.3, "device_id": "B", "addresses": [...], "port": 7002}
    {"event": "lost", "t": ..., "device_id": "B", "addresses": [...], "port": 7002}
    {"event": "log", "t": ..., "level": "DEBUG", "msg": "..."}     peerdaemon.discovery records
    {"event": "stopped", "t": ...}                                unregistered and closed
stdin: a line {"spaces": ["ID:HEX", ...]} replaces the spaces and calls refresh(); EOF stops.

Refuses to run (exit 3) unless it is in a `pdtest-` namespace other than its creator's (see
`netns.private_namespace_problem`): mDNS must never go out on the machine's own interfaces.
"""

from __future__ import annotations

import time

T0 = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import trio  # noqa: E402
from netns import private_namespace_problem  # noqa: E402  (tests/ is sys.path[0])

from peerdaemon.discovery import MdnsDiscovery, SpaceKey  # noqa: E402


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": round(time.monotonic() - T0, 4), **fields}), flush=True)


class JsonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        emit("log", level=record.levelname, msg=record.getMessage())


def parse_space(text: str) -> SpaceKey:
    space_id, _, secret = text.partition(":")
    return SpaceKey(space_id, bytes.fromhex(secret))


async def main(args: argparse.Namespace) -> None:
    spaces = [parse_space(s) for s in args.space]
    run_start = time.monotonic()

    def on_found(device_id: str, addresses: list[str], port: int) -> None:
        emit(
            "found",
            since_run=round(time.monotonic() - run_start, 4),
            device_id=device_id,
            addresses=addresses,
            port=port,
        )

    def on_lost(device_id: str, addresses: list[str], port: int) -> None:
        emit("lost", device_id=device_id, addresses=addresses, port=port)

    discovery = MdnsDiscovery(
        args.device_id,
        args.port,
        lambda: spaces,
        on_found,
        interface=args.interface,
        on_lost=on_lost,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(discovery.run)
        emit(
            "started",
            since_run=round(time.monotonic() - run_start, 4),
            addresses=discovery.addresses,
        )
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buffer = b""
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    spaces = [parse_space(s) for s in json.loads(line)["spaces"]]
                    discovery.refresh()
        nursery.cancel_scope.cancel()
    emit("stopped")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--space", action="append", default=[])
    parser.add_argument("--interface")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    problem = private_namespace_problem()
    if problem:
        print(f"refusing to run mDNS outside a private test namespace: {problem}", file=sys.stderr)
        raise SystemExit(3)
    handler = JsonLogHandler()
    logger = logging.getLogger("peerdaemon.discovery")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.debug else logging.INFO)
    trio.run(main, args)
