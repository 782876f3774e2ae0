"""Figures of presence (docs/presence.md), loopback only.

    .venv/bin/python benchmarks/bench_presence.py [--changes 200] [--window 60] [--quick]

- latency: `presence.set` on daemon A to the `presence` event on a `presence.subscribe`
  subscriber of daemon B showing that selection, p50 and p99 over sequential changes: on a LAN
  link (B dials A on 127.0.0.1), and through a hub (A and B attached to one hub, no LAN link).
  Whole daemons and the hub run in this process (`serve`, `serve_hub`), so their trio loops
  share one CPU: the figures are an upper bound of a real setup's.
- idle traffic, measured: bytes on the LAN link (the peer protocol's messages, both directions)
  per minute while both daemons are idle, A with an editor's selection (renewals every 15 s,
  keep-alive pings included), over `--window` seconds scaled to a minute.
- idle traffic of 50 editors, measured on the wire: a hub, and 50 y-websocket clients (web
  editors) in one environment's room, each holding an awareness state the size of a daemon's
  and renewing it every 15 s as y-protocols does; the TCP bytes every client sends and receives
  (websocket framing included) over `--window` seconds scaled to a minute.
- the same, computed with the sans-I/O cores (`presence.Awareness`, a fake
  clock): 50 devices, each with a state on one environment, linked to one relay (a hub's core);
  the awareness payload bytes (y-protocols encoding) every device sends and receives in a
  minute of renewals, and the relay's total. Add ~100 bytes per message for the peer protocol's
  box and websocket framing (the `messages` count is printed).

Prints one line per figure, then a JSON line with everything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]

from peerdaemon.api.client import open_client  # noqa: E402
from peerdaemon.daemon.supervisor import DaemonConfig, serve  # noqa: E402
from peerdaemon.hub.accounts import Accounts  # noqa: E402
from peerdaemon.hub.server import HubConfig, serve_hub  # noqa: E402
from peerdaemon.peer import PeerConfig  # noqa: E402
from peerdaemon.presence import Awareness, Me  # noqa: E402

LOCAL = "127.0.0.1"
FIXTURE = ROOT / "tests" / "fixtures" / "mockoon" / "test-env.json"
FAST = PeerConfig(backoff_initial=0.05, backoff_max=0.5, connect_timeout=2.0, close_grace=0.5)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def start_daemon(nursery: trio.Nursery, base: Path, name: str, peers: list) -> Any:
    config = DaemonConfig(
        base / name,
        base / f"{name}.s",
        name=name,
        listen=(LOCAL, 0),
        peers=peers,
        peer_config=FAST,
        mdns=False,
    )
    return await nursery.start(serve, config)


async def wait_for(predicate: Any, what: str, timeout: float = 20) -> Any:
    with trio.fail_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(0.02)


async def setup(nursery: trio.Nursery, base: Path, via_hub: bool) -> tuple[Any, Any, str, str]:
    """Daemons A and B sharing one environment in a space, linked on the LAN or by a hub."""
    a = await start_daemon(nursery, base, "a", [])
    b = await start_daemon(nursery, base, "b", [] if via_hub else [(LOCAL, a.peer_port)])
    async with open_client(a.config.socket_path) as ca, open_client(b.config.socket_path) as cb:
        space = (await ca.call("space.create", name="Bench"))["id"]
        env = (await ca.import_env(FIXTURE.read_text(), new_id=True))["id"]
        await ca.call("env.share", id=env, space=space)
        code = (await ca.call("space.invite", space=space, addresses=[]))["code"]
        await cb.call("space.join", code=code)
        if via_hub:
            with Accounts.open(base / "hub") as accounts:
                token = accounts.add_user("bench")
            hub = await nursery.start(
                serve_hub, HubConfig(data_dir=base / "hub", listen=(LOCAL, 0), accounts_poll=0.05)
            )
            key = hub.peer_endpoint.identity.device_id
            url = f"ws://{LOCAL}:{hub.port}"
            for c in (ca, cb):
                await c.call("space.hub", space=space, url=url, token=token, hub_key=key)

        async def synced() -> bool:
            return env in {e["id"] for e in await cb.list_envs()}

        await wait_for(synced, "B has the environment")
    return a, b, space, env


async def latency(base: Path, via_hub: bool, changes: int) -> list[float]:
    async with trio.open_nursery() as nursery:
        a, b, space, env = await setup(nursery, base, via_hub)
        device_a = a.identity.device_id
        async with open_client(a.config.socket_path) as ca, open_client(b.config.socket_path) as cb:
            sub = await cb.subscribe("presence.subscribe", space=space)

            async def seen(entity: str) -> None:
                async for event in sub:
                    for e in event["environments"]:
                        for editor in e["editors"]:
                            if editor["device"] == device_a and any(
                                x.get("entity") == entity for x in editor.get("editing", ())
                            ):
                                return

            await ca.call("presence.set", env=env, entity="warm-up")
            with trio.fail_after(30):  # the first one waits for the link and the share
                await seen("warm-up")
            out = []
            for i in range(changes):
                entity = f"route-{i}"
                started = time.perf_counter()
                await ca.call("presence.set", env=env, entity=entity)
                with trio.fail_after(10):
                    await seen(entity)
                out.append((time.perf_counter() - started) * 1000)
            await sub.aclose()
        nursery.cancel_scope.cancel()
    return out


async def idle_bytes(base: Path, window: float) -> float:
    """Bytes per minute on an idle LAN link, A holding an editor's selection."""
    async with trio.open_nursery() as nursery:
        a, b, space, env = await setup(nursery, base, False)
        async with open_client(a.config.socket_path) as ca:
            await ca.call("presence.set", env=env, entity="idle")
            await trio.sleep(1.0)  # the set and the share's traffic are done

            def link_bytes() -> int:
                return sum(
                    link.bytes_sent + link.bytes_received
                    for row in a.peers._rows.values()
                    for link in row.links
                )

            before = link_bytes()
            await trio.sleep(window)
            after = link_bytes()
        nursery.cancel_scope.cancel()
    return (after - before) * 60 / window


class CountingStream(trio.abc.Stream):
    """A TCP stream that counts the bytes it moves: what the wire carries."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.sent = self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def idle_wire_editors(base: Path, n: int, window: float) -> dict[str, float]:
    """`n` y-websocket clients idle in one room of a hub, each renewing its awareness state
    every 15 s; bytes on the wire per client per minute, and the hub's total."""
    from trio_websocket import wrap_client_stream

    from peerdaemon.core.awareness import AwarenessEntry, encode_awareness
    from peerdaemon.hub.ywebsocket import awareness_message

    with Accounts.open(base / "hub") as accounts:
        token = accounts.add_user("bench")
        accounts.create_space("bench-space", "bench")
        accounts.set_limit("devices_per_user", n + 10, user="bench")
    streams: list[CountingStream] = []
    async with trio.open_nursery() as nursery:
        hub = await nursery.start(
            serve_hub, HubConfig(data_dir=base / "hub", listen=(LOCAL, 0), accounts_poll=0.05)
        )

        async def editor(i: int, ready: trio.Event) -> None:
            stream = CountingStream(await trio.open_tcp_stream(LOCAL, hub.port))
            streams.append(stream)
            resource = f"/yjs/bench-space/env-1?token={token}&device=editor-{i}"
            ws = await wrap_client_stream(nursery, stream, LOCAL, resource)  # type: ignore[arg-type]
            client = 5000 + i
            state = json.dumps(
                Me(
                    f"DEVICE{i:02d}-XXXXXXX-XXXXXXX-XXXXXXX-XXXXXXX", f"laptop-{i}", f"Editor {i}"
                ).state([{"via": "editor", "entity": "route-uuid-" + "x" * 28}])
            )
            clock = 1

            async def drain() -> None:
                while True:  # y-websocket clients read everything the hub sends
                    await ws.get_message()

            nursery.start_soon(drain)
            await ws.send_message(
                awareness_message(encode_awareness([AwarenessEntry(client, clock, state)]))
            )
            ready.set()
            await trio.sleep(15 * (i + 1) / n)  # renewals spread over the 15 s
            while True:
                clock += 1
                await ws.send_message(
                    awareness_message(encode_awareness([AwarenessEntry(client, clock, state)]))
                )
                await trio.sleep(15)

        for i in range(n):
            ready = trio.Event()
            nursery.start_soon(editor, i, ready)
            await ready.wait()
        await trio.sleep(16)  # every client renewed once: the joins are done
        sent0 = [s.sent for s in streams]
        recv0 = [s.received for s in streams]
        await trio.sleep(window)
        sent = sum(s.sent for s in streams) - sum(sent0)
        received = sum(s.received for s in streams) - sum(recv0)
        nursery.cancel_scope.cancel()
    per = 60 / window
    return {
        "editors": n,
        "bytes_sent_per_editor": sent / n * per,
        "bytes_received_per_editor": received / n * per,
        "hub_bytes_out": received * per,
    }


def idle_editors(n: int = 50, minutes: float = 1.0) -> dict[str, float]:
    """`n` editors (devices) on one environment, each linked to one relay, for a minute."""
    relay = Awareness(0)
    devices = []
    for i in range(n):
        device = Awareness(1000 + i)
        me = Me(f"DEVICE-{i:03d}", f"laptop-{i}", f"Editor {i}")
        device.set_local(
            "env", me.state([{"via": "editor", "entity": "route-uuid-" + "x" * 28}]), 0
        )
        devices.append(device)
    sent = received = relayed = messages = 0

    def pump(now: float) -> None:
        nonlocal sent, received, relayed, messages
        moving = True
        while moving:
            moving = False
            for i, device in enumerate(devices):
                for s in device.sends():
                    if s.exclude == "relay" or (s.to is not None and s.to != "relay"):
                        continue  # a relay of what the relay sent: its only link is the relay
                    moving = True
                    sent += len(s.payload)
                    messages += 1
                    relay.receive(f"d{i}", s.doc, s.payload, now)
            for s in relay.sends():
                moving = True
                for i, device in enumerate(devices):
                    source = f"d{i}"
                    if source == s.exclude or (s.to is not None and s.to != source):
                        continue
                    relayed += len(s.payload)
                    received += len(s.payload)
                    messages += 1
                    device.receive("relay", s.doc, s.payload, now)

    for i in range(n):
        relay.link_opened(f"d{i}", ["env"], 0)
        devices[i].link_opened("relay", ["env"], 0)
    pump(0)
    sent = received = relayed = messages = 0  # the joins are done: now only idle renewals
    now = 0.0
    while now < minutes * 60:
        now += 0.5
        for device in devices:
            device.handle_timer(now)
        relay.handle_timer(now)
        pump(now)
    per = 1 / minutes
    return {
        "editors": n,
        "bytes_sent_per_editor": sent / n * per,
        "bytes_received_per_editor": received / n * per,
        "relay_bytes_out": relayed * per,
        "messages": messages * per,
    }


def summary(name: str, values: list[float]) -> dict[str, float]:
    out = {"p50": statistics.median(values), "p99": pct(values, 0.99), "n": len(values)}
    print(f"{name}: p50 {out['p50']:.2f} ms, p99 {out['p99']:.2f} ms ({len(values)} changes)")
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for via_hub, name in ((False, "lan"), (True, "hub")):
        base = Path(tempfile.mkdtemp(prefix="pdbp"))
        try:
            values = await latency(base, via_hub, args.changes)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        results[f"latency_{name}_ms"] = summary(f"presence latency ({name})", values)
    base = Path(tempfile.mkdtemp(prefix="pdbp"))
    try:
        per_minute = await idle_bytes(base, args.window)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["idle_lan_link_bytes_per_minute"] = per_minute
    print(f"idle LAN link, one editor: {per_minute:.0f} bytes/minute (both directions)")
    base = Path(tempfile.mkdtemp(prefix="pdbp"))
    try:
        wire = await idle_wire_editors(base, 50, args.window)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["idle_50_editors_on_the_wire_per_minute"] = wire
    print(
        f"50 idle y-websocket editors on a hub, on the wire: {wire['bytes_sent_per_editor']:.0f}"
        f" B sent and {wire['bytes_received_per_editor']:.0f} B received per editor per minute,"
        f" hub out {wire['hub_bytes_out']:.0f} B/min"
    )
    editors = idle_editors()
    results["idle_50_editors_per_minute"] = editors
    print(
        f"50 idle editors via one relay: {editors['bytes_sent_per_editor']:.0f} B sent and "
        f"{editors['bytes_received_per_editor']:.0f} B received per editor per minute, relay "
        f"out {editors['relay_bytes_out']:.0f} B/min, {editors['messages']:.0f} messages/min"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of idle measured")
    parser.add_argument("--quick", action="store_true", help="30 changes, a 16 s window")
    args = parser.parse_args()
    if args.quick:
        args.changes, args.window = 30, 16.0
    print(json.dumps(trio.run(main_async, args)))


if __name__ == "__main__":
    main()
