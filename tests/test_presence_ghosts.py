"""No ghosts (docs/presence.md), with real daemon processes on loopback: an editor's socket
connection killed with -9 takes only its own selection with it (on its daemon and on the peer),
and a daemon killed with -9 leaves the other's presence as soon as the link drops, long before
the 30 s time-out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from daemonproc import daemons_fixture, export, lan_pair, pd, shared_space  # noqa: F401  (fixture)
from helpers import until_sync

from peerdaemon.api.client import Client

ENV_FILE = "test-env.json"

EDITOR = """
import sys, time
from peerdaemon.api.client import Client
client = Client.connect(sys.argv[1])
client.call("presence.set", env=sys.argv[2], entity=sys.argv[3])
print("set", flush=True)
time.sleep(600)
"""


def _selections(daemon, env_id: str) -> dict[tuple[str | None, str], bool]:
    """(device, entity) of every editor selection of `env_id` that `daemon` shows."""
    with daemon.client() as c:
        listing = c.call("presence.list")
    out = {}
    for space in listing["spaces"]:
        for env in space["environments"]:
            if env["id"] != env_id:
                continue
            for editor in env["editors"]:
                for item in editor["editing"]:
                    if item["via"] == "editor":
                        out[(editor["device"], item.get("entity"))] = True
    return out


def _connected(daemon, space: str) -> set[str]:
    with daemon.client() as c:
        listing = c.call("presence.list", space=space)
    return {c["device"] for c in listing["spaces"][0]["connected"]}


def test_kill9_of_an_editor_and_of_a_daemon_leaves_no_ghost(daemons, fixture_dir):
    a, b = lan_pair(daemons)
    a.start()
    b.start()
    dev_a = json.loads(pd(a.socket_path, "status", "--json"))["device"]
    dev_b = json.loads(pd(b.socket_path, "status", "--json"))["device"]
    space, [env_id] = shared_space(a, b, "Procs", fixture_dir / ENV_FILE)
    until_sync(lambda: _connected(a, space) == {dev_a, dev_b}, what="both connected")

    # two editors on b: one in a process of its own (killed -9 below), one on this connection
    editor = daemons.track(
        subprocess.Popen(
            [sys.executable, "-c", EDITOR, str(b.socket_path), env_id, "killed-route"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
    )
    assert editor.stdout is not None and editor.stdout.readline() == b"set\n"
    with Client.connect(b.socket_path) as mine:
        mine.call("presence.set", env=env_id, entity="kept-route")
        both = {(dev_b, "killed-route"): True, (dev_b, "kept-route"): True}
        until_sync(lambda: _selections(a, env_id) == both, what="both selections on a")
        assert _selections(b, env_id) == both

        os.kill(editor.pid, signal.SIGKILL)
        editor.wait(10)
        kept = {(dev_b, "kept-route"): True}
        until_sync(lambda: _selections(a, env_id) == kept, what="only the live editor's, on a")
        assert _selections(b, env_id) == kept

        # the daemon itself, killed -9: a drops its states when the link goes
        started = time.monotonic()
        b.kill9()
        until_sync(
            lambda: _connected(a, space) == {dev_a} and not _selections(a, env_id),
            what="b gone from a's presence",
        )
        assert time.monotonic() - started < 25  # the link's end, not the 30 s time-out
    assert a.stop() == 0
