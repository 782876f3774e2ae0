"""Three real daemon processes with mDNS on, each in its own private network namespace.

The namespaces (lab/netnslab.py: a private bridge in a hub namespace, nothing on the machine's own
interfaces) are created and deleted by this test. Each child checks that it really is inside a
`pdtest-` namespace other than ours before it runs the daemon with mDNS (exit 3 otherwise); this
process never runs zeroconf. The daemons listen on 0.0.0.0, so their invite codes carry no
address and they can only find each other by mDNS: A creates a space, B and C join with invite
codes, A shares an environment, and all three discover each other, connect pairwise and converge;
an edit on C reaches A and B. Their local sockets are plain files, reachable from here.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from daemonproc import PYTHON, DaemonProcess, child_env, daemons_fixture, export, pd  # noqa: F401
from daemonutil import ENV_FILE
from helpers import until_sync
from netns import NetnsLab, require_netns

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).parent
PORT = 22000
TIMEOUT = 30.0

# Refuses to run the daemon (and so mDNS) unless inside a private test namespace.
CHILD = f"""
import sys
sys.path.insert(0, {str(TESTS_DIR)!r})
from netns import private_namespace_problem
problem = private_namespace_problem()
if problem:
    print("refusing to run mDNS outside a private test namespace:", problem, file=sys.stderr)
    raise SystemExit(3)
from peerdaemon.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def spawn_in_namespace(lab: NetnsLab, index: int, daemon: DaemonProcess, name: str) -> None:
    """Start `daemon` inside namespace `index` with mDNS on its veth (no PEERDAEMON_NO_MDNS:
    child_env() drops every PEERDAEMON_ variable)."""
    argv = [
        PYTHON,
        "-c",
        CHILD,
        "run",
        "--data-dir",
        str(daemon.data_dir),
        "--socket",
        str(daemon.socket_path),
        "--listen",
        f"0.0.0.0:{PORT}",
        "--mdns-interface",
        lab.interface,
        "--name",
        name,
    ]
    env = child_env()
    assert "PEERDAEMON_NO_MDNS" not in env
    daemon.socket_path.parent.mkdir(parents=True, exist_ok=True)
    with open(daemon.log_path, "ab") as log:  # the child keeps its own copy of the fd
        daemon.proc = lab.popen(
            index, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
        )


def connected_devices(daemon: DaemonProcess) -> dict[str, dict]:
    with daemon.client() as c:
        return {r["device"]: r for r in c.call("peers")["peers"] if r["state"] == "connected"}


def test_three_daemons_discover_each_other_by_mdns_and_converge(daemons, fixture_dir, capsys):
    require_netns()
    names = ["na", "nb", "nc"]
    with NetnsLab(3) as lab:
        procs = [daemons.new() for _ in names]
        spawned = time.monotonic()
        for i, (daemon, name) in enumerate(zip(procs, names, strict=True)):
            spawn_in_namespace(lab, i, daemon, name)
        for daemon in procs:
            daemon.wait_ready(TIMEOUT)
        a, b, c = procs
        devices = [json.loads(pd(d.socket_path, "status", "--json"))["device"] for d in procs]

        space = pd(a.socket_path, "space", "create", "Lab").strip()
        for member in (b, c):
            code = pd(a.socket_path, "space", "invite", space).strip()
            assert pd(member.socket_path, "space", "join", code).strip() == space
        env_id = pd(a.socket_path, "env", "import", str(fixture_dir / ENV_FILE)).strip()
        pd(a.socket_path, "env", "share", env_id, "--space", space)

        def all_connected() -> bool:
            return all(
                set(connected_devices(d)) == {x for x in devices if x != own}
                for d, own in zip(procs, devices, strict=True)
            )

        until_sync(
            all_connected,
            what="every daemon connected to the two others",
            timeout=TIMEOUT,
            while_down=True,
        )
        discovered = time.monotonic() - spawned
        first = until_sync(
            lambda: (e := export(a, env_id)) and all(export(d, env_id) == e for d in (b, c)) and e,
            what="the shared environment on all three",
            timeout=TIMEOUT,
            while_down=True,
        )
        assert first["name"] == "Test env"

        # found by mDNS: the rows carry the namespace addresses (no invite had one)
        for i, daemon in enumerate(procs):
            for device, row in connected_devices(daemon).items():
                other = devices.index(device)
                host = row["address"].rsplit(":", 1)[0]
                assert host == lab.addresses[other], (names[i], row)
                assert row["spaces"] == 1 and row["name"] == names[other]

        patch = json.dumps([{"op": "replace", "path": "/routes/0/endpoint", "value": "from-c"}])
        pd(c.socket_path, "env", "patch", env_id, "-", input=patch)
        until_sync(
            lambda: all(
                (export(d, env_id) or {})["routes"][0]["endpoint"] == "from-c" for d in (a, b)
            ),
            what="c's edit on a and b",
            timeout=TIMEOUT,
            while_down=True,
        )
        for daemon in procs:
            assert daemon.stop() == 0, daemon.output()
            assert "mDNS discovery off" not in daemon.output()
    with capsys.disabled():
        print(f"\n[lan netns] 3 daemon processes: spawn -> all pairs connected {discovered:.2f}s")
