"""Three real daemons on loopback, writing at once while one of them is kill -9ed and restarted
again and again: afterwards they converge, and every edit any of them acknowledged is there,
once, on all three."""

from __future__ import annotations

import random
import time

from daemonproc import (  # noqa: F401  (fixture)
    Writers,
    call,
    check_everything_acknowledged_is_there,
    daemons_fixture,
    share_fixture,
)
from helpers import LOCAL, free_port

KILLS = 12


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
            if writers.stop.is_set():
                break  # a writer saw a refusal: Writers fails the test with it
            victim = rng.choice(nodes)
            victim.kill9()
            time.sleep(rng.uniform(0.1, 0.6))
            victim.start()
    check_everything_acknowledged_is_there(nodes, env_id, writers.acked)
    for d in nodes:
        assert d.stop() == 0
