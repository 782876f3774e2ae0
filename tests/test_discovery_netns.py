"""mDNS discovery between three processes, each in its own private network namespace.

A and B share space S1, C holds S2: A and B find each other, nobody finds C (its tag matches none
of their spaces) or itself. C then joins S1 (refresh()) and everybody finds it; C stops and the
others see its goodbye (on_lost). The namespaces (lab/netnslab.py) are created and deleted by this test;
zeroconf only ever runs in the runner processes inside them, never in this process.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netns import NetnsLab, require_netns

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("discovery_runner.py")
S1 = "space-one:" + "11" * 32
S2 = "space-two:" + "22" * 32
TIMEOUT = 20.0

Event = dict[str, Any]


class Runner:
    """One `discovery_runner.py` process; its JSON lines are collected by a reader thread."""

    def __init__(
        self,
        lab: NetnsLab,
        index: int,
        device_id: str,
        port: int,
        spaces: list[str],
        interface: str | None = None,
    ) -> None:
        self.device_id = device_id
        argv = [
            sys.executable,
            str(RUNNER),
            "--device-id",
            device_id,
            "--port",
            str(port),
            "--debug",
        ]
        for space in spaces:
            argv += ["--space", space]
        if interface:
            argv += ["--interface", interface]
        self.spawned = time.monotonic()
        self.proc = lab.popen(
            index,
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.events: list[Event] = []
        self._queue: queue.Queue[Event | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "raw", "line": line.rstrip()}
            event["_at"] = time.monotonic()
            self._queue.put(event)
        self._queue.put(None)

    def _drain(self, timeout: float) -> bool:
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            return True
        if event is None:
            self._queue.put(None)  # stay at EOF
            time.sleep(min(timeout, 0.05))
            return False
        self.events.append(event)
        return True

    def wait_for(self, what: str, pred: Callable[[Event], bool], timeout: float = TIMEOUT) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if pred(event):
                    return event
            left = deadline - time.monotonic()
            if left <= 0 or not self._drain(min(left, 0.2)) and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.device_id}: no {what} within {timeout}s; output:\n"
                    + "\n".join(json.dumps(e) for e in self.events)
                )

    def found(self, device_id: str, timeout: float = TIMEOUT) -> Event:
        return self.wait_for(
            f"found {device_id}",
            lambda e: e["event"] == "found" and e["device_id"] == device_id,
            timeout,
        )

    def logged(self, text: str, timeout: float = TIMEOUT) -> Event:
        return self.wait_for(
            f"log {text!r}", lambda e: e["event"] == "log" and text in e["msg"], timeout
        )

    def found_ids(self) -> set[str]:
        while self._drain(0):
            if self._queue.empty():
                break
        return {e["device_id"] for e in self.events if e["event"] == "found"}

    def set_spaces(self, spaces: list[str]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"spaces": spaces}) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> int:
        """Close stdin (the runner cancels run(): goodbye + close) and wait for the exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=TIMEOUT)
        self.wait_for("stopped", lambda e: e["event"] == "stopped", 5)
        return code


def test_three_daemons_discover_each_other_in_private_namespaces(capsys):
    require_netns()
    with NetnsLab(3) as lab:
        a = Runner(lab, 0, "DEV-AAAA", 7001, [S1], interface=lab.interface)  # --mdns-interface
        b = Runner(lab, 1, "DEV-BBBB", 7002, [S1])
        c = Runner(lab, 2, "DEV-CCCC", 7003, [S2])

        a_found_b = a.found("DEV-BBBB")
        b_found_a = b.found("DEV-AAAA")
        assert a_found_b["addresses"] == [lab.addresses[1]] and a_found_b["port"] == 7002
        assert b_found_a["addresses"] == [lab.addresses[0]] and b_found_a["port"] == 7001
        started_a = a.wait_for("started", lambda e: e["event"] == "started")
        assert started_a["addresses"] == [lab.addresses[0]]

        # C's advertisement reached A and B and was rejected on its tags (and vice versa), so
        # "not found" below is a decision, not a lost packet.
        a.logged("(device DEV-CCCC): no shared space")
        b.logged("(device DEV-CCCC): no shared space")
        c.logged("(device DEV-AAAA): no shared space")
        c.logged("(device DEV-BBBB): no shared space")
        for runner in (a, b, c):
            runner.logged(f"(device {runner.device_id}): own service")
        assert a.found_ids() == {"DEV-BBBB"}
        assert b.found_ids() == {"DEV-AAAA"}
        assert c.found_ids() == set()

        # C joins S1: its re-published TXT is picked up by A and B, and C re-checks what it knows.
        c.set_spaces([S2, S1])
        t_refresh = time.monotonic()
        a_found_c = a.found("DEV-CCCC")
        after_refresh = [a_found_c, b.found("DEV-CCCC"), c.found("DEV-AAAA"), c.found("DEV-BBBB")]
        refresh_latency = max(e["_at"] for e in after_refresh) - t_refresh
        assert a_found_c["addresses"] == [lab.addresses[2]]

        # Clean cancellation: C unregisters (goodbye packets) and the others see it go.
        assert c.stop() == 0
        for runner in (a, b):
            lost = runner.wait_for(
                "lost DEV-CCCC", lambda e: e["event"] == "lost" and e["device_id"] == "DEV-CCCC"
            )
            assert lost["addresses"] == [lab.addresses[2]] and lost["port"] == 7003
        assert a.stop() == 0
        assert b.stop() == 0

        for runner in (a, b, c):
            own = [
                e
                for e in runner.events
                if e["event"] == "found" and e["device_id"] == runner.device_id
            ]
            assert not own, f"{runner.device_id} reported itself"

    def since_spawn(runner: Runner, event: Event) -> float:
        return event["_at"] - runner.spawned

    with capsys.disabled():
        print(
            "\n[discovery] start->found inside netns: "
            f"A->B {a_found_b['since_run']:.2f}s, B->A {b_found_a['since_run']:.2f}s after run() "
            f"({since_spawn(a, a_found_b):.2f}s / {since_spawn(b, b_found_a):.2f}s after process "
            f"spawn); refresh->found {refresh_latency:.2f}s"
        )
