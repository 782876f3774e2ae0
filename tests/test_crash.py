"""kill -9 of a real daemon while edits are in flight: every acknowledged edit survives.

Each round: writers (blocking `Client`s in threads, and one `AsyncClient` with many concurrent,
pipelined calls, so that writes share group commits) add headers with distinct keys to an
environment and record each key once its patch is ACKNOWLEDGED. After a random short delay the
daemon gets SIGKILL by pid, then restarts on the same data dir: every acknowledged key must be
there (and nothing that was never sent). Later rounds check the earlier rounds' environments too.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from daemonproc import (  # noqa: F401
    PYTHON,
    ROOT_FOR_MOUNTS,
    DaemonProcess,
    child_env,
    daemons_fixture,
    grow_disk,
    small_disk,
)
from modelutil import FIXTURE_DIR

from peerdaemon.api.client import AsyncClient, Client, ClientError, DaemonError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from envgen import make_environment  # noqa: E402

FIXTURE_ENV = FIXTURE_DIR / "test-env.json"
JOIN_TIMEOUT = 30
FIXTURE_HEADERS = [h["key"] for h in json.loads(FIXTURE_ENV.read_text())["headers"]]
MIN_ACKS = 40  # the kill comes once writes flow, after a further random delay


class Round:
    def __init__(self, env_id: str) -> None:
        self.env_id = env_id
        self.sent: set[str] = set()
        self.acked: list[str] = []
        self.in_flight_at_kill = 0
        self.lock = threading.Lock()

    def send(self, key: str) -> None:
        with self.lock:
            self.sent.add(key)

    def ack(self, key: str) -> None:
        with self.lock:
            self.acked.append(key)

    @property
    def in_flight(self) -> int:
        with self.lock:
            return len(self.sent) - len(self.acked)


def add_header(key: str) -> list[dict]:
    return [{"op": "add", "path": "/headers/-", "value": {"key": key, "value": key}}]


def blocking_writer(socket_path, state: Round, prefix: str) -> None:
    try:
        with Client.connect(socket_path, timeout=JOIN_TIMEOUT) as client:
            for n in range(1_000_000):
                key = f"{prefix}-{n}"
                state.send(key)
                client.patch(state.env_id, add_header(key))
                state.ack(key)
    except (ClientError, OSError):
        pass  # the daemon died under us: expected


def pipelined_writer(socket_path, state: Round, prefix: str, tasks: int) -> None:
    async def main() -> None:
        async with await AsyncClient.connect(socket_path) as client:

            async def one(t: int) -> None:
                for n in range(1_000_000):
                    key = f"{prefix}{t}-{n}"
                    state.send(key)
                    await client.patch(state.env_id, add_header(key))
                    state.ack(key)

            async with trio.open_nursery() as nursery:
                for t in range(tasks):
                    nursery.start_soon(one, t)

    try:
        trio.run(main)
    except* (ClientError, OSError):
        pass


def crash_round(daemon: DaemonProcess, state: Round, rng: random.Random) -> None:
    """Write from several clients at once, SIGKILL the daemon mid-stream, restart it."""
    threads = [
        threading.Thread(target=blocking_writer, args=(daemon.socket_path, state, f"b{i}"))
        for i in range(2)
    ]
    threads.append(
        threading.Thread(
            target=pipelined_writer, args=(daemon.socket_path, state, "p", rng.choice([16, 32, 64]))
        )
    )
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT
        while len(state.acked) < MIN_ACKS:
            assert time.monotonic() < deadline, "writes do not get acknowledged"
            assert daemon.running, daemon.output()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))  # the random delay before the crash (not a sync)
        state.in_flight_at_kill = state.in_flight
        daemon.kill9()
    finally:
        if daemon.running:
            daemon.kill9()
        for thread in threads:
            thread.join(JOIN_TIMEOUT)
            assert not thread.is_alive()
    daemon.start()


def check(daemon: DaemonProcess, rounds: list[Round]) -> None:
    with daemon.client() as client:
        for state in rounds:
            keys = [h["key"] for h in client.get(state.env_id, "/headers")]
            ours = [k for k in keys if k in state.sent]
            missing = set(state.acked) - set(ours)
            assert not missing, (
                f"{len(missing)} acknowledged edits lost, e.g. {sorted(missing)[:5]}"
            )
            assert len(ours) == len(set(ours)), "an edit was applied twice"
            # Besides the fixture's own headers, only keys that were really sent.
            assert keys[: len(FIXTURE_HEADERS)] == FIXTURE_HEADERS
            assert len(ours) == len(keys) - len(FIXTURE_HEADERS)


def new_round(daemon: DaemonProcess) -> Round:
    with daemon.client() as client, open(FIXTURE_ENV, encoding="utf-8") as f:
        return Round(client.import_env(f.read(), new_id=True)["id"])


def test_kill9_loses_no_acknowledged_edit(daemons):
    rng = random.Random(20240611)
    daemon = daemons.new()
    daemon.start()
    rounds: list[Round] = []
    for _ in range(4):
        state = new_round(daemon)
        rounds.append(state)
        crash_round(daemon, state, rng)
        check(daemon, rounds)
        assert len(state.acked) >= MIN_ACKS
    assert sum(r.in_flight_at_kill for r in rounds) > 0, "no request was ever in flight"
    with daemon.client() as client:
        assert client.status()["environments"] == len(rounds)
    assert daemon.stop() == 0


def test_kill9_during_compaction(daemons):
    rng = random.Random(7)
    daemon = daemons.compacting(compact_count=20, compact_bytes=64 << 10)
    daemon.start()
    rounds: list[Round] = []
    for _ in range(2):
        state = new_round(daemon)
        rounds.append(state)
        crash_round(daemon, state, rng)
        check(daemon, rounds)
    with daemon.client() as client:
        store = client.status()["store"]
    # Compaction did run: snapshots exist and the log holds only what came after them.
    assert store["snapshot_bytes"] > 0
    assert store["log_rows"] < sum(len(r.acked) for r in rounds) / 4, store
    assert daemon.stop() == 0


@ROOT_FOR_MOUNTS
def test_a_full_disk_loses_nothing_acknowledged(daemons, tmp_path):
    """A real daemon on a 2 MiB file system: an import that does not fit fails with
    `store-failed` and the daemon keeps running; a later edit of that environment is not
    acknowledged on top of the missing import. Once there is room, the daemon stores both by
    itself, and after a kill -9 the environment is back whole, with every acknowledged edit."""
    with small_disk(tmp_path / "disk", "2m") as disk:
        daemon = daemons.new(data_dir=disk / "data")
        daemon.start()
        env = make_environment(3_000_000, seed=7)
        env_id = env["uuid"]
        rename = [{"op": "replace", "path": "/name", "value": "renamed while the disk was full"}]
        with daemon.client() as c:
            with pytest.raises(DaemonError) as refused:
                c.import_env(json.dumps(env))
            assert refused.value.code == "store-failed"
            assert "kept in memory" in refused.value.message
            assert "full" in c.status()["store"]["error"]
            with pytest.raises(DaemonError) as also:  # behind the import, so not durable either
                c.patch(env_id, rename)
            assert also.value.code == "store-failed"
            cli = subprocess.run(
                [
                    PYTHON,
                    "-m",
                    "peerdaemon",
                    "--socket",
                    str(daemon.socket_path),
                    "env",
                    "patch",
                    env_id,
                    "-",
                ],
                input=json.dumps(rename),
                capture_output=True,
                text=True,
                env=child_env(),
                timeout=60,
            )
            assert cli.returncode == 1 and cli.stderr.count("\n") == 1
            assert "(store-failed)" in cli.stderr and "Traceback" not in cli.stderr

            grow_disk(disk, "64m")
            deadline = time.monotonic() + 30
            while c.status()["store"]["error"] is not None:  # stored by itself
                assert time.monotonic() < deadline, c.status()["store"]
                time.sleep(0.05)
            port = {"op": "replace", "path": "/port", "value": 4321}
            assert c.patch(env_id, [port])["changed"]  # acknowledged: durable
        daemon.kill9()
        daemon.start()
        with daemon.client() as c:
            after = c.get(env_id)
        assert after == {**env, "name": "renamed while the disk was full", "port": 4321}
        daemon.kill9()  # before the disk goes
