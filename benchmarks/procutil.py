"""Ending the processes a benchmark started: by their pid, politely first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 30) -> None:
    """SIGTERM (the servers flush their stores), then SIGKILL if it has not ended in `grace` s."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_daemon(sock: Path, timeout: float = 60) -> None:
    """Until a daemon answers `status` on `sock`."""
    from peerdaemon.api.client import Client, DaemonNotRunning

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with Client.connect(sock) as c:
                c.status()
            return
        except (DaemonNotRunning, OSError):
            time.sleep(0.005)
    raise RuntimeError("daemon did not start")


def wait_hub_port(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> int:
    """The port a `peerdaemon hub serve --listen 127.0.0.1:0` says it listens on (its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"hub listening on 127\.0\.0\.1:(\d+)", log.read_text())
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"hub did not start:\n{log.read_text()}")
