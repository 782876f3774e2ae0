"""Two real daemons with no LAN link and a real hub process, writing at once while the hub or a
daemon is kill -9ed and restarted again and again: afterwards the daemons converge, every edit
either of them acknowledged is there once, and the hub's own store holds all of it."""

from __future__ import annotations

import random
import socket
import subprocess
import time

from daemonproc import CHAOS_TIMEOUT as TIMEOUT
from daemonproc import (  # noqa: F401  (fixture)
    PYTHON,
    Daemons,
    Writers,
    call,
    check_everything_acknowledged_is_there,
    child_env,
    daemons_fixture,
    share_fixture,
)
from helpers import LOCAL, free_port
from pycrdt import Doc

from peerdaemon.model import export_environment
from peerdaemon.store import Store

KILLS = 8


class HubProcess:
    def __init__(self, daemons: Daemons) -> None:
        self.daemons = daemons
        self.dir = daemons.base / "hub"
        self.port = free_port()
        self.url = f"ws://{LOCAL}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def admin(self, *argv: str) -> str:
        argv = (PYTHON, "-m", "peerdaemon", "hub", *argv, "--data-dir", str(self.dir))
        done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def start(self) -> None:
        argv = [PYTHON, "-m", "peerdaemon", "hub", "serve", "--data-dir", str(self.dir)]
        with open(self.daemons.base / "hub.log", "ab") as log:
            self.proc = self.daemons.track(
                subprocess.Popen(
                    [*argv, "--listen", f"{LOCAL}:{self.port}"],
                    stdout=log,
                    stderr=log,
                    env=child_env(),
                )
            )
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection((LOCAL, self.port), 0.5).close()
                return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "hub start"
                time.sleep(0.05)  # bounded wait for the listening port

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL, by pid
        self.proc.wait(TIMEOUT)


def test_acknowledged_edits_survive_kill9_chaos_through_a_hub(daemons):
    hub = HubProcess(daemons)
    tokens = [hub.admin("user", "add", "alice"), hub.admin("token", "add", "alice")]
    [hub_key] = [ln[9:] for ln in hub.admin("status").splitlines() if ln.startswith("hub key: ")]
    hub.start()
    nodes = [daemons.new() for _ in range(2)]
    for i, d in enumerate(nodes):
        d.argv += ["--no-mdns", "--name", f"n{i}"]
        d.start()
    space = call(nodes[0], "space.create", name="Chaos")["id"]
    # ws:// does not authenticate the hub: give its key (node 1's invite then carries it)
    call(nodes[0], "space.hub", space=space, url=hub.url, token=tokens[0], hub_key=hub_key)
    call(nodes[1], "space.join", code=call(nodes[0], "space.invite", space=space)["code"])
    call(nodes[1], "space.hub", space=space, token=tokens[1])
    env_id = share_fixture(nodes, space)

    rng = random.Random(5)
    with Writers(nodes, env_id) as writers:
        for n in range(KILLS):  # the hub and a daemon in turn, at random moments
            time.sleep(rng.uniform(0.3, 1.0))
            if writers.stop.is_set():
                break  # a writer saw a refusal: Writers fails the test with it
            victim = hub if n % 2 == 0 else rng.choice(nodes)
            victim.kill9()
            time.sleep(rng.uniform(0.1, 0.6))
            victim.start()
    keys = check_everything_acknowledged_is_there(nodes, env_id, writers.acked)
    for d in nodes:
        assert d.stop() == 0
    hub.kill9()
    with Store.open(hub.dir) as store:  # what the hub made durable: everything
        [key] = [k for k in store.load() if k.endswith(f"/{env_id}")]
        doc = Doc()
        for update in store.load()[key].updates:
            doc.apply_update(update)
    assert {h["key"] for h in export_environment(doc, env_id)["headers"]} == set(keys)
