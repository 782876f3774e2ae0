"""Ending the processes a benchmark started: by their pid, politely first."""

from __future__ import annotations

import os
import signal
import subprocess


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
