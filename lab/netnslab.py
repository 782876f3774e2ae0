"""Private network namespaces for multicast tests (mDNS never touches the machine's interfaces).

    with NetnsLab(3) as lab:            # namespaces pdtest-<pid>-<rand>-{hub,0,1,2}
        lab.names[0], lab.addresses[0]  # "pdtest-...-0", "192.0.2.1"; interface "eth0"
        proc = lab.popen(0, [sys.executable, "script.py"], stdout=subprocess.PIPE)
        lab.run_python(1, "print('hi')")
    # processes started with popen are SIGKILLed by pid, then every namespace is deleted by name

Layout: a hub namespace holds a bridge `br0`; each member namespace gets one end of a veth pair
(named `eth0`, 192.0.2.N/24, multicast on, plus a multicast route) whose other end is enslaved to
the bridge *inside the hub*. Nothing is created in, or moved through, the caller's namespace
besides the bookkeeping files `ip netns` keeps in /run/netns.

`netns_unavailable_reason()` says why `ip netns` is not available or not permitted here (not
root, no CAP_SYS_ADMIN, seccomp); tests skip on it (`tests/netns.py`, `require_netns`), benchmarks
say what they skip. Shared by tests/ and benchmarks/ (lab/ holds what both use: benchmarks
import nothing from tests/).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

SUBNET = "192.0.2"  # a documentation range: it stands for no real network
INTERFACE = "eth0"
_probe_result: str | None = None  # "" when namespaces work, else the reason they don't


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def netns_unavailable_reason() -> str:
    """Empty if this process may create network namespaces, else why not (cached)."""
    global _probe_result
    if _probe_result is not None:
        return _probe_result
    if shutil.which("ip") is None:
        _probe_result = "`ip` (iproute2) is not installed"
    elif os.geteuid() != 0:
        _probe_result = "creating network namespaces needs root"
    else:
        name = f"pdtest-{os.getpid()}-probe"
        try:
            made = _ip("netns", "add", name, check=False)
            if made.returncode != 0:
                _probe_result = f"`ip netns add` is not permitted: {made.stderr.strip()}"
            else:
                run = _ip("netns", "exec", name, "ip", "link", "set", "lo", "up", check=False)
                _probe_result = (
                    "" if run.returncode == 0 else f"`ip netns exec` fails: {run.stderr.strip()}"
                )
        finally:
            _ip("netns", "del", name, check=False)
    return _probe_result


OUTER_NETNS_ENV = "PDTEST_OUTER_NETNS"
"""Children get the caller's netns inode here, so they can verify they are somewhere else."""


def netns_inode() -> int:
    """The inode of this process's network namespace."""
    return os.stat("/proc/self/ns/net").st_ino


def private_namespace_problem() -> str:
    """For a child: empty if it runs in a pdtest namespace other than its creator's, else why not.

    Checks the inode against the creator's (OUTER_NETNS_ENV) and PID 1's (when readable), and
    that `ip netns identify` names a `pdtest-` namespace.
    """
    own = netns_inode()
    outer = os.environ.get(OUTER_NETNS_ENV)
    if not outer or not outer.isdigit():
        return f"{OUTER_NETNS_ENV} is not set"
    if int(outer) == own:
        return "still in the creator's network namespace"
    try:
        if os.stat("/proc/1/ns/net").st_ino == own:
            return "in PID 1's network namespace"
    except OSError:
        pass  # not readable in some sandboxes; the other checks stand
    name = subprocess.run(
        ["ip", "netns", "identify", str(os.getpid())], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    if not name.startswith("pdtest-"):
        return f"not in a pdtest- namespace (ip netns identify: {name!r})"
    return ""


class NetnsLab:
    """`count` namespaces on one private bridge; see the module docstring."""

    def __init__(self, count: int) -> None:
        if not 1 <= count <= 200:
            raise ValueError("count must be 1..200")
        base = f"pdtest-{os.getpid()}-{secrets.token_hex(2)}"
        self.hub = f"{base}-hub"
        self.names = [f"{base}-{i}" for i in range(count)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]
        self.interface = INTERFACE
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> NetnsLab:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        _ip("netns", "add", self.hub)
        self._created.append(self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        # No IGMP snooping: the bridge floods multicast to every port, as a dumb switch would.
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            _ip("netns", "add", name)
            self._created.append(name)
            port = f"p{i}"
            _ip(
                "-n",
                self.hub,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                INTERFACE,
                "netns",
                name,
            )
            _ip("-n", self.hub, "link", "set", port, "master", "br0")
            _ip("-n", self.hub, "link", "set", port, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{self.addresses[i]}/24", "dev", INTERFACE)
            _ip("-n", name, "link", "set", INTERFACE, "multicast", "on", "up")
            _ip("-n", name, "route", "add", "224.0.0.0/4", "dev", INTERFACE)

    def exec_argv(self, index: int, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside namespace `index` (`ip netns exec` keeps the pid)."""
        return ["ip", "netns", "exec", self.names[index], *argv]

    def popen(self, index: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside namespace `index`; killed by pid in `destroy()` if still running."""
        kwargs["env"] = {**(kwargs.get("env") or os.environ), OUTER_NETNS_ENV: str(netns_inode())}
        proc = subprocess.Popen(self.exec_argv(index, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self, index: int, argv: Sequence[str], timeout: float = 30, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run `argv` to completion inside namespace `index`."""
        kwargs["env"] = {**(kwargs.get("env") or os.environ), OUTER_NETNS_ENV: str(netns_inode())}
        return subprocess.run(self.exec_argv(index, argv), timeout=timeout, **kwargs)

    def run_python(
        self, index: int, code: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet (this interpreter, so the venv) inside namespace `index`."""
        return self.run(
            index, [sys.executable, "-c", code], timeout=timeout, capture_output=True, text=True
        )

    def destroy(self) -> None:
        """Kill what we started (by pid), then delete our namespaces (by name). Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()
        errors = []
        # Members first, then the hub (deleting it removes the bridge and the veth ends).
        for name in [n for n in self._created if n != self.hub] + [
            n for n in self._created if n == self.hub
        ]:
            done = _ip("netns", "del", name, check=False)
            if done.returncode != 0 and "No such file" not in done.stderr:
                errors.append(f"{name}: {done.stderr.strip()}")
        self._created.clear()
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))
