"""The daemon event log's cursor across restarts."""

import shutil
import tempfile
from pathlib import Path

import pytest
import trio
from modelutil import FIXTURE_DIR

from peerdaemon.api.client import AsyncClient, DaemonError
from peerdaemon.core.events import EventLog
from peerdaemon.daemon.supervisor import DaemonConfig, serve


@pytest.fixture(name="root")
def root_fixture():
    """A short directory (the daemon's socket lives there: AF_UNIX paths are limited), removed
    afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pde"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ids_increase_and_a_bounded_log_counts_what_it_dropped():
    log = EventLog(capacity=3, first_id=100)
    for n in range(5):
        log.emit("x", n=n)
    assert log.last_id == 104 and log.oldest_id == 102
    assert [e["data"]["n"] for e in log.since(101)] == [2, 3, 4]
    assert log.since(104) == []


async def test_a_cursor_from_an_earlier_run_says_reset(root: Path):
    config = DaemonConfig(root / "data", root / "d.sock")
    text = (FIXTURE_DIR / "test-env.json").read_text()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config)
        async with await AsyncClient.connect(config.socket_path) as c:
            await c.import_env(text)
            first = await c.call("events.subscribe", since=0)
            cursor = first["cursor"]
            assert first["reset"] is False and first["events"]
        nursery.cancel_scope.cancel()
    await trio.sleep(0.01)  # the next run starts at a later millisecond
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config)
        async with await AsyncClient.connect(config.socket_path) as c:
            again = await c.call("events.subscribe", since=cursor)
            assert again["reset"] is True
            assert again["cursor"] > cursor  # ids keep increasing across runs
            ahead = await c.call("events.subscribe", since=again["cursor"] + 1000)
            assert ahead["reset"] is True and ahead["events"] == []
            now = await c.call("events.subscribe", since=again["cursor"])
            assert now["reset"] is False and now["events"] == []
        nursery.cancel_scope.cancel()


async def test_deeply_nested_json_is_refused_and_the_daemon_goes_on(root: Path):
    config = DaemonConfig(root / "data", root / "d.sock")
    text = (FIXTURE_DIR / "test-env.json").read_text()
    deep = '{"uuid": "x", "lastMigration": 33, "routes": [], "x": ' + "[" * 5000 + "]" * 5000 + "}"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config)
        async with await AsyncClient.connect(config.socket_path) as c:
            env_id = (await c.import_env(text))["id"]
            before = await c.export(env_id)
            for call in (c.import_env(deep), c.put(env_id, deep)):
                try:
                    await call
                except DaemonError as exc:
                    assert exc.code in ("bad-request", "malformed-json")
                else:
                    raise AssertionError("deep JSON accepted")
            assert await c.export(env_id) == before
            assert (await c.status())["environments"] == 1
        nursery.cancel_scope.cancel()
