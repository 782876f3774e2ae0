"""Three real daemons on loopback, writing at once while one of them is kill -9ed and restarted
again and again: afterwards they converge, and every edit any of them acknowledged is there,
once, on all three."""

from __future__ import annotations

import json
import random
import threading
import time

from daemonproc import DaemonProcess, daemons_fixture  # noqa: F401  (fixture)
from modelutil import FIXTURE_DIR
from test_lan import LOCAL, free_port

from peerdaemon.api.client import ClientError

KILLS = 12
TIMEOUT = 60.0


def call(daemon: DaemonProcess, op: str, **args: object) -> dict:
    with daemon.client(timeout=10) as c:
        return c.call(op, **args)


def exports(daemons: list[DaemonProcess], env_id: str) -> list[dict | None]:
    out = []
    for d in daemons:
        try:
            with d.client(timeout=10) as c:
                out.append(c.export(env_id))
        except ClientError:
            out.append(None)
    return out


def converged(daemons: list[DaemonProcess], env_id: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        first, *rest = exports(daemons, env_id)
        if first is not None and all(e == first for e in rest):
            return first
        assert time.monotonic() < deadline, "no convergence"
        time.sleep(0.1)  # bounded polling of real processes


class Writer(threading.Thread):
    """Appends headers with distinct keys through one daemon; records each acknowledged key."""

    def __init__(self, daemon: DaemonProcess, env_id: str, name: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.d, self.env_id, self.prefix, self.stop = daemon, env_id, name, stop
        self.acked: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with self.d.client(timeout=10) as c:
                    while not self.stop.is_set():
                        key = f"{self.prefix}-{n}"
                        n += 1
                        header = {"key": key, "value": "v"}
                        c.patch(self.env_id, [{"op": "add", "path": "/headers/-", "value": header}])
                        self.acked.append(key)
            except (ClientError, OSError):  # killed meanwhile: that edit was never acknowledged
                time.sleep(0.05)


def share_fixture(nodes: list[DaemonProcess], space: str) -> str:
    """Share the test fixture from the first node into `space`; once all hold it, its id."""
    env = json.loads((FIXTURE_DIR / "test-env.json").read_text())
    env_id = call(nodes[0], "env.import", env=env)["id"]
    call(nodes[0], "env.share", id=env_id, space=space)
    converged(nodes, env_id)
    return env_id


class Writers:
    """A writer per node while the block runs; `acked` after it: every acknowledged key."""

    def __init__(self, nodes: list[DaemonProcess], env_id: str) -> None:
        self.stop = threading.Event()
        self.writers = [Writer(d, env_id, f"n{i}", self.stop) for i, d in enumerate(nodes)]
        self.acked: set[str] = set()

    def __enter__(self) -> Writers:
        for w in self.writers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for w in self.writers:
            w.join(TIMEOUT)
        assert all(w.acked for w in self.writers), "every node acknowledged some edits"
        self.acked = {key for w in self.writers for key in w.acked}


def check_everything_acknowledged_is_there(
    nodes: list[DaemonProcess], env_id: str, acked: set[str]
) -> list[str]:
    merged = converged(nodes, env_id)
    keys = [h["key"] for h in merged["headers"]]
    assert len(keys) == len(set(keys))
    assert acked <= set(keys), sorted(acked - set(keys))[:10]
    return keys


def test_acknowledged_edits_survive_kill9_chaos_on_a_lan(daemons):
    ports = [free_port() for _ in range(3)]
    nodes = [daemons.new() for _ in range(3)]
    for i, d in enumerate(nodes):
        peers = [arg for port in ports[:i] for arg in ("--peer", f"{LOCAL}:{port}")]
        d.argv += ["--listen", f"{LOCAL}:{ports[i]}", "--no-mdns", "--name", f"n{i}", *peers]
        d.start()
    space = call(nodes[0], "space.create", name="Chaos")["id"]
    for d in nodes[1:]:
        call(d, "space.join", code=call(nodes[0], "space.invite", space=space)["code"])
    env_id = share_fixture(nodes, space)

    rng = random.Random(4)
    with Writers(nodes, env_id) as writers:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.0))
            victim = rng.choice(nodes)
            victim.kill9()
            time.sleep(rng.uniform(0.1, 0.6))
            victim.start()
    check_everything_acknowledged_is_there(nodes, env_id, writers.acked)
    for d in nodes:
        assert d.stop() == 0
