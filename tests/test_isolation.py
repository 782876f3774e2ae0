"""The suite runs cut off from every network: `tests/isolated` gives it a network
namespace with nothing but loopback, and conftest.py refuses to start anywhere else, so even a
mistaken address has nowhere to go. These tests would fail on a run in the machine's own
namespace; they check the interfaces before dialing anything, so they never dial out there."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ISOLATED = ROOT / "tests" / "isolated"
REFUSAL = "refusing to run the tests outside a network namespace of their own"
LIST_INTERFACES = "import socket; print(' '.join(n for _, n in socket.if_nameindex()))"


def interfaces() -> list[str]:
    return [name for _, name in socket.if_nameindex()]


def test_this_run_has_only_loopback():
    assert interfaces() == ["lo"]


def test_an_address_elsewhere_has_nowhere_to_go():
    assert interfaces() == ["lo"]  # else this test must not dial
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        with pytest.raises(OSError) as failed:
            s.connect(("192.0.2.1", 22000))  # documentation range: "another machine"
        assert failed.value.errno == errno.ENETUNREACH  # no route at all, refused at once
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))  # while loopback works
        server.listen()
        socket.create_connection(server.getsockname(), timeout=5).close()


def test_the_runner_makes_a_loopback_only_namespace_and_keeps_the_status():
    listed = subprocess.run(
        [str(ISOLATED), sys.executable, "-c", LIST_INTERFACES],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["lo"]
    ns = subprocess.run(
        [str(ISOLATED), "sh", "-c", "readlink /proc/self/ns/net; exit 7"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ns.returncode == 7  # the command's own status
    assert ns.stdout.strip() != os.readlink("/proc/self/ns/net")  # a new namespace


def test_the_runner_refuses_to_run_in_the_open_when_it_cannot_isolate(tmp_path):
    fake = tmp_path / "unshare"  # an unshare that is not permitted, as in a locked-down container
    fake.write_text(
        "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    ran = tmp_path / "ran"
    done = subprocess.run(
        [str(ISOLATED), "touch", str(ran)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
    )
    assert done.returncode == 125
    assert not ran.exists()
    [line] = done.stderr.splitlines()
    assert line.startswith("tests/isolated: cannot create a network namespace")
    assert "Operation not permitted" in line


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("true", "its loopback is down"),
        (
            "ip link set lo up && ip link add pdtest0 type veth peer name pdtest1",
            "it has network interfaces lo, pdtest0, pdtest1",
        ),
    ],
)
def test_the_suite_refuses_to_start_outside_such_a_namespace(setup, reason):
    """In a fresh namespace of our own (only its own veth pair: nothing leaves it)."""
    pytest_argv = "-m pytest -q -p no:cacheprovider --collect-only tests/test_isolation.py"
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", f'{setup} && exec "{sys.executable}" {pytest_argv}'],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert REFUSAL in out and f"({reason})" in out and "tests/isolated" in out
    assert "collected" not in out  # refused at the start, before collecting anything
