"""Figures of LAN sync, measured with real daemon processes.

    .venv/bin/python benchmarks/bench_lan.py [--rounds 3] [--quick] [--no-netns]

Prints one line per figure with the median over rounds (and each round's value), then a JSON
line with everything. Each round starts fresh daemons in a temporary directory.

- edit latency: a socket edit (`env.patch`) on daemon A to the `change` event on a subscriber of
  daemon B (B dials A on 127.0.0.1), p50 and p99 over sequential edits; in the same round, the
  reference (relay_reference.py: a minimal pycrdt relay carrying an edit client to client) and
  the ratio of the two.
- convergence: 5 daemons in a full mesh (static peers through loopback TCP proxies that this
  script controls), converged on one shared environment; the proxies cut every link and hold
  the redials, each daemon makes 200 edits while apart (1,000 in all: conflicting endpoint
  changes and per-daemon text appended to a response body), the proxies let the held dials
  through, and we time until all five export identical JSON.
- bytes on the wire for one small edit (one character appended to an endpoint): the Yjs update,
  the peer protocol message (the link's byte counters, `bytes_sent` in `peers`), and the TCP
  payload (websocket framing included) counted by a loopback proxy, both directions.
- discovery: three daemon processes, each in its own private network namespace (lab/netnslab.py)
  with mDNS on and the spaces already joined; time from spawning them to `peers` showing both
  others connected on every daemon. Needs root and `ip netns`; skipped otherwise (`--no-netns`).

Everything else runs on 127.0.0.1 with mDNS off (`--no-mdns` and PEERDAEMON_NO_MDNS=1); zeroconf
only ever runs in daemon processes inside the namespaces, which check that they are inside one
before they start (this script never runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lab"))  # netnslab.py: the namespace lab and its safety checks
sys.path.insert(0, str(Path(__file__).resolve().parent))
from envgen import FIXTURE  # noqa: E402
from procutil import stop_process  # noqa: E402
from relay_reference import measure as relay_latency  # noqa: E402

from peerdaemon.api.client import AsyncClient, Client, ClientError, open_client  # noqa: E402

LOCAL = "127.0.0.1"
NETNS_PORT = 22000

# A daemon started inside a namespace: refuses to run (exit 3) unless it is in a pdtest-
# namespace other than its creator's, so mDNS never reaches the machine's own interfaces.
NETNS_CHILD = f"""
import sys
sys.path.insert(0, {str(ROOT / "lab")!r})
from netnslab import private_namespace_problem
problem = private_namespace_problem()
if problem:
    print("refusing to run mDNS outside a private test namespace:", problem, file=sys.stderr)
    raise SystemExit(3)
from peerdaemon.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def child_env(mdns: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    if not mdns:
        env["PEERDAEMON_NO_MDNS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


class Proc:
    """One `peerdaemon run` process (loopback listener, mDNS off unless in a namespace)."""

    def __init__(
        self,
        root: Path,
        name: str,
        port: int,
        peers: list[int] = (),  # type: ignore[assignment]
        tree: Path | None = None,
    ) -> None:
        self.tree = tree
        """Where the daemon's code comes from (PYTHONPATH), if not this checkout."""
        self.root = root / name
        self.name = name
        self.sock = root / f"{name}.s"
        self.port = port
        self.peers = list(peers)
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "peerdaemon",
            "run",
            "--data-dir",
            str(self.root / "data"),
            "--socket",
            str(self.sock),
            "--name",
            self.name,
            "--no-mdns",
            "--listen",
            f"{LOCAL}:{self.port}",
        ]
        for port in self.peers:
            argv += ["--peer", f"{LOCAL}:{port}"]
        return argv

    def spawn(
        self, argv: list[str] | None = None, popen: Any = subprocess.Popen, mdns: bool = False
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "log", "ab") as log:
            env = child_env(mdns)
            if self.tree is not None:
                env["PYTHONPATH"] = str(self.tree)
            self.proc = popen(
                argv or self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.root,  # `-m` puts the working directory first: not a checkout's
            )

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {(self.root / 'log').read_text()[-2000:]}")
            try:
                with Client.connect(self.sock, timeout=5) as c:
                    if c.status()["pid"] == self.proc.pid:
                        return
            except (ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready")
            time.sleep(0.005)

    def start(self) -> Proc:
        self.spawn()
        self.wait_ready()
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class Procs:
    """Processes of one round: stopped (by pid) on exit, whatever happened."""

    def __init__(self) -> None:
        self.all: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.all.append(proc)
        return proc

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.all:
            proc.stop()


class Proxy:
    """A loopback TCP proxy to `target`, counting bytes; `cut()` closes every connection and
    holds new ones (accepted, not forwarded) until `release()`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.up = 0  # dialer -> listener bytes
        self.down = 0
        self.held = 0
        self._gate = trio.Event()
        self._gate.set()
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOCAL)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with client:
                    if not self._gate.is_set():
                        self.held += 1
                        try:
                            await self._gate.wait()
                        finally:
                            self.held -= 1
                    upstream = await trio.open_tcp_stream(LOCAL, self.target)
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, client, upstream, True, nursery.cancel_scope)
                        nursery.start_soon(
                            self._pipe, upstream, client, False, nursery.cancel_scope
                        )
            except (trio.BrokenResourceError, OSError):
                pass
            finally:
                self._scopes.discard(scope)

    async def _pipe(
        self, src: trio.SocketStream, dst: trio.SocketStream, up: bool, done: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(65536):
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    def cut(self) -> None:
        self._gate = trio.Event()
        for scope in list(self._scopes):
            scope.cancel()

    def release(self) -> None:
        self._gate.set()


# --- helpers over the socket ----------------------------------------------------------------------
async def wait_for(probe: Any, what: str, timeout: float = 60) -> Any:
    with trio.move_on_after(timeout):
        while True:
            value = await probe()
            if value:
                return value
            await trio.sleep(0.005)
    raise RuntimeError(f"timed out waiting for {what}")


async def connected(client: AsyncClient, count: int) -> bool:
    rows = (await client.call("peers"))["peers"]
    return sum(r["state"] == "connected" for r in rows) == count


async def exports_equal(clients: list[AsyncClient], env_id: str) -> dict | None:
    exports: list[Any] = [None] * len(clients)

    async def one(i: int) -> None:
        try:
            exports[i] = await clients[i].export(env_id)
        except ClientError:
            exports[i] = None

    async with trio.open_nursery() as nursery:
        for i in range(len(clients)):
            nursery.start_soon(one, i)
    first = exports[0]
    return first if first is not None and all(e == first for e in exports) else None


async def share_space(owner: AsyncClient, members: list[AsyncClient]) -> tuple[str, str]:
    """A space (invites without addresses) joined by every member; a shared test environment."""
    space = (await owner.call("space.create", name="Bench"))["id"]
    for member in members:
        code = (await owner.call("space.invite", space=space, addresses=[]))["code"]
        await member.call("space.join", code=code)
    env_id = (await owner.import_env(FIXTURE.read_text()))["id"]
    await owner.call("env.share", id=env_id, space=space)
    return space, env_id


def endpoint_patch(index: int, value: str) -> list[dict]:
    return [{"op": "replace", "path": f"/routes/{index}/endpoint", "value": value}]


# --- figures ----------------------------------------------------------------------------------------
async def bench_latency(base: Path, edits: int, tree: Path | None = None) -> dict[str, float]:
    """Socket edit on A -> change event on a subscriber of B (both daemons from `tree`, if
    given, instead of this checkout)."""
    with Procs() as procs:
        port_a = free_port()
        a = procs.add(Proc(base, "a", port_a, tree=tree)).start()
        b = procs.add(Proc(base, "b", free_port(), [port_a], tree=tree)).start()
        async with open_client(a.sock) as ca, open_client(b.sock) as cb:
            _, env_id = await share_space(ca, [cb])
            await wait_for(lambda: exports_equal([ca, cb], env_id), "first sync")
            latencies: list[float] = []
            local: list[float] = []  # the same edit's change event on a subscriber of A itself
            async with (
                await cb.subscribe_env(env_id) as sub,
                await ca.subscribe_env(env_id) as sub_a,
            ):
                for n in range(edits + 20):  # the first 20 are warm-up
                    t0 = time.perf_counter()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(ca.patch, env_id, endpoint_patch(n % 11, f"edit-{n}"))
                        event_a = await sub_a.__anext__()
                        t_local = time.perf_counter()
                        event = await sub.__anext__()
                        t1 = time.perf_counter()
                    assert event["type"] == "change" and event["origin"].startswith("peer:"), event
                    assert event_a["update"] == event["update"]
                    if n >= 20:
                        latencies.append((t1 - t0) * 1000)
                        local.append((t_local - t0) * 1000)
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": pct(latencies, 0.99),
        "max_ms": max(latencies),
        "edits": len(latencies),
        "local_p50_ms": statistics.median(local),
        "local_p99_ms": pct(local, 0.99),
    }


async def bench_bytes(base: Path, edits: int = 10) -> dict[str, float]:
    """One small edit A -> B: Yjs update, peer message (link counters), TCP payload (proxy)."""
    with Procs() as procs:
        port_a = free_port()
        a = procs.add(Proc(base, "a", port_a)).start()
        async with trio.open_nursery() as nursery:
            proxy = Proxy(port_a)
            await nursery.start(proxy.run)
            b = procs.add(Proc(base, "b", free_port(), [proxy.port])).start()
            async with open_client(a.sock) as ca, open_client(b.sock) as cb:
                _, env_id = await share_space(ca, [cb])
                await wait_for(lambda: exports_equal([ca, cb], env_id), "first sync")
                await wait_for(lambda: connected(ca, 1), "connected")

                async def counters() -> tuple[int, int, int, int]:
                    [row] = (await ca.call("peers"))["peers"]
                    return row["bytes_sent"], row["bytes_received"], proxy.up, proxy.down

                async def settled() -> tuple[int, int, int, int]:
                    """The counters once two reads 50 ms apart agree (the link is quiet)."""
                    last = await counters()
                    while True:
                        await trio.sleep(0.05)
                        now = await counters()
                        if now == last:
                            return now
                        last = now

                rows: list[dict[str, int]] = []
                async with await cb.subscribe_env(env_id) as sub:
                    value = "test"
                    for _ in range(edits):
                        before = await settled()
                        value += "x"  # one character more: the smallest edit of a property
                        await ca.patch(env_id, endpoint_patch(0, value))
                        event = await sub.__anext__()
                        after = await settled()
                        d = [y - x for x, y in zip(before, after, strict=True)]
                        rows.append(
                            {
                                "yjs_update": len(event["update"]),
                                "message_a_to_b": d[0],
                                "message_b_to_a": d[1],
                                "tcp_a_to_b": d[3],
                                "tcp_b_to_a": d[2],
                            }
                        )
            nursery.cancel_scope.cancel()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


async def bench_convergence(base: Path, per_daemon: int, count: int = 5) -> dict[str, float]:
    """`count` daemons, full mesh through proxies; cut, `per_daemon` edits each, reconnect."""
    with Procs() as procs:
        ports = [free_port() for _ in range(count)]
        async with trio.open_nursery() as nursery:
            proxies = [Proxy(port) for port in ports]
            for proxy in proxies:
                await nursery.start(proxy.run)
            daemons = []
            for i in range(count):
                peers = [proxies[j].port for j in range(count) if j != i]
                daemons.append(procs.add(Proc(base, f"d{i}", ports[i], peers)))
            for d in daemons:
                d.spawn()
            for d in daemons:
                d.wait_ready()
            async with AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(open_client(d.sock)) for d in daemons]
                _, env_id = await share_space(clients[0], clients[1:])
                await wait_for(lambda: exports_equal(clients, env_id), "first sync")
                for c in clients:
                    await wait_for(lambda c=c: connected(c, count - 1), "full mesh")

                for proxy in proxies:
                    proxy.cut()
                t_cut = time.perf_counter()

                async def edit(i: int) -> None:
                    c = clients[i]
                    body = f"/routes/{i}/responses/0/body"
                    text = await c.get(env_id, body)
                    for n in range(per_daemon):
                        if n % 2:
                            text += f"[d{i}:{n}]"
                            await c.patch(env_id, [{"op": "replace", "path": body, "value": text}])
                        else:
                            await c.patch(env_id, endpoint_patch(5 + n % 6, f"d{i}-{n}"))

                async with trio.open_nursery() as editors:
                    for i in range(count):
                        editors.start_soon(edit, i)
                t_edited = time.perf_counter()
                dials = count * (count - 1)
                await wait_for(lambda: _true(sum(p.held for p in proxies) >= dials), "held dials")
                assert await exports_equal(clients, env_id) is None, "still converged: not apart"
                t0 = time.perf_counter()
                for proxy in proxies:
                    proxy.release()
                final = await wait_for(lambda: exports_equal(clients, env_id), "convergence")
                t1 = time.perf_counter()
                for i in range(count):
                    body = final["routes"][i]["responses"][0]["body"]
                    assert all(f"[d{i}:{n}]" in body for n in range(1, per_daemon, 2)), i
            nursery.cancel_scope.cancel()
    return {
        "converge_s": t1 - t0,
        "offline_edits": count * per_daemon,
        "edit_phase_s": t_edited - t_cut,
        "daemons": count,
    }


async def _true(value: bool) -> bool:
    return value


def bench_discovery(base: Path) -> dict[str, float] | None:
    """Spawn -> every daemon shows both others connected, three namespaces, mDNS on."""
    from netnslab import NetnsLab, netns_unavailable_reason

    if netns_unavailable_reason():
        return None
    names = ["na", "nb", "nc"]
    procs = [Proc(base, n, NETNS_PORT) for n in names]
    # Spaces first, with no network at all (no listener, no mDNS): A's space, joined by B and C.
    for p in procs:
        p.spawn(
            [
                sys.executable,
                "-m",
                "peerdaemon",
                "run",
                "--data-dir",
                str(p.root / "data"),
                "--socket",
                str(p.sock),
                "--name",
                p.name,
                "--no-mdns",
            ]
        )
    try:
        for p in procs:
            p.wait_ready()

        async def join() -> None:
            async with open_client(procs[0].sock) as a:
                space = (await a.call("space.create", name="Disco"))["id"]
                for p in procs[1:]:
                    code = (await a.call("space.invite", space=space, addresses=[]))["code"]
                    async with open_client(p.sock) as c:
                        await c.call("space.join", code=code)

        trio.run(join)
    finally:
        for p in procs:
            p.stop()

    with NetnsLab(3) as lab:
        t0 = time.perf_counter()
        for i, p in enumerate(procs):
            argv = [
                sys.executable,
                "-c",
                NETNS_CHILD,
                "run",
                "--data-dir",
                str(p.root / "data"),
                "--socket",
                str(p.sock),
                "--listen",
                f"0.0.0.0:{NETNS_PORT}",
                "--mdns-interface",
                lab.interface,
            ]
            p.spawn(argv, popen=lambda argv, i=i, **kw: lab.popen(i, argv, **kw), mdns=True)
        found: dict[str, float] = {}
        startup: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while len(found) < len(procs):
            for p in procs:
                if p.name in found:
                    continue
                assert p.proc is not None
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited: {(p.root / 'log').read_text()[-2000:]}")
                try:
                    with Client.connect(p.sock, timeout=5) as c:
                        rows = c.call("peers")["peers"]
                except (ClientError, OSError):
                    continue
                if sum(r["state"] == "connected" for r in rows) == 2:
                    found[p.name] = time.perf_counter() - t0
            if time.monotonic() > deadline:
                raise RuntimeError(f"discovery timed out: {found}")
            time.sleep(0.01)
        for p in procs:  # the daemon's own start-up (store, spaces, listener, mDNS registered)
            with Client.connect(p.sock, timeout=5) as c, c.subscribe_events(since=0) as sub:
                started = [e for e in sub.initial["events"] if e["type"] == "daemon-started"]
                startup[p.name] = started[0]["data"]["startup_seconds"]
            p.stop()
    return {"spawn_to_connected_s": max(found.values()), "daemon_startup_s": max(startup.values())}


# --- main -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer edits, to check the script")
    parser.add_argument("--no-netns", action="store_true", help="skip the discovery figure")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another tree (e.g. `git archive HEAD | tar -x -C DIR`) whose edit latency is"
        " measured in the same rounds, alternating which goes first",
    )
    parser.add_argument(
        "--only-latency", action="store_true", help="only the edit latency (and its references)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results (JSON) to FILE")
    args = parser.parse_args()
    edits = 50 if args.quick else 300
    per_daemon = 20 if args.quick else 200
    results: dict[str, list[dict[str, Any]]] = {
        "latency": [],
        "latency_base": [],
        "relay": [],
        "bytes": [],
        "converge": [],
        "discovery": [],
    }
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="pdl") as tmp:
            base = Path(tmp)
            trees = [("latency", None)] + (
                [("latency_base", args.baseline)] if args.baseline else []
            )
            for key, tree in trees if r % 2 == 0 else trees[::-1]:
                results[key].append(trio.run(bench_latency, base / key, edits, tree))
            relay = relay_latency(edits)
            lat = results["latency"][-1]
            relay["ratio_p50"] = lat["p50_ms"] / relay["p50_ms"]
            relay["ratio_p99"] = lat["p99_ms"] / relay["p99_ms"]
            results["relay"].append(relay)
            if args.only_latency:
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
                continue
            results["bytes"].append(trio.run(bench_bytes, base / "b"))
            results["converge"].append(trio.run(bench_convergence, base / "c", per_daemon))
            if not args.no_netns:
                disco = bench_discovery(base / "d")
                if disco is not None:
                    results["discovery"].append(disco)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    def line(label: str, key: str, field: str, fmt: str = "{:.2f}") -> None:
        vals = [res[field] for res in results[key]]
        if not vals:
            from netnslab import netns_unavailable_reason

            why = "--no-netns" if args.no_netns else netns_unavailable_reason()
            print(f"{label}: skipped (needs private network namespaces: {why or 'none ran'})")
            return
        print(
            f"{label}: median {fmt.format(statistics.median(vals))}  (rounds: "
            + ", ".join(fmt.format(v) for v in vals)
            + ")"
        )

    n_lat = results["latency"][0]["edits"]
    line(f"edit A -> change event on B, p50 ms ({n_lat} edits/round)", "latency", "p50_ms")
    line("edit A -> change event on B, p99 ms", "latency", "p99_ms")
    line(
        "  (same edit -> change event on a subscriber of A itself, p50 ms)",
        "latency",
        "local_p50_ms",
    )
    if results["latency_base"]:
        line("  baseline tree: edit A -> change event on B, p50 ms", "latency_base", "p50_ms")
        line("  baseline tree: p99 ms", "latency_base", "p99_ms")
        line("  baseline tree: same-daemon event p50 ms", "latency_base", "local_p50_ms")
    line("  reference: minimal pycrdt relay, client to client, p50 ms", "relay", "p50_ms")
    line("  reference p99 ms", "relay", "p99_ms")
    line("  ratio LAN hop / reference, p50", "relay", "ratio_p50")
    line("  ratio LAN hop / reference, p99", "relay", "ratio_p99")
    if args.only_latency:
        print(json.dumps({"rounds": args.rounds, **results}))
        if args.json:
            Path(args.json).write_text(json.dumps({"rounds": args.rounds, **results}))
        return
    c0 = results["converge"][0]
    line(
        f"convergence of {c0['daemons']} daemons after {c0['offline_edits']} offline edits, s",
        "converge",
        "converge_s",
    )
    line("  (time to make those edits while apart, s)", "converge", "edit_phase_s")
    line("one small edit: Yjs update bytes", "bytes", "yjs_update", "{:.0f}")
    line("  peer message bytes A->B (link counter)", "bytes", "message_a_to_b", "{:.0f}")
    line("  peer message bytes B->A", "bytes", "message_b_to_a", "{:.0f}")
    line("  TCP payload bytes A->B (websocket framing included)", "bytes", "tcp_a_to_b", "{:.0f}")
    line("  TCP payload bytes B->A", "bytes", "tcp_b_to_a", "{:.0f}")
    line(
        "discovery in 3 namespaces: spawn -> all connected, s", "discovery", "spawn_to_connected_s"
    )
    line(
        "  of which the daemons' own start-up (mDNS registered), s", "discovery", "daemon_startup_s"
    )
    print(json.dumps({"rounds": args.rounds, **results}))
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, **results}))


if __name__ == "__main__":
    main()
