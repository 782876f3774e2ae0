"""The daemon event log's cursor across restarts."""

import tempfile
from pathlib import Path

import trio
from modelutil import FIXTURE_DIR

from peerdaemon.api.client import AsyncClient
from peerdaemon.daemon.events import EventLog
from peerdaemon.daemon.supervisor import DaemonConfig, serve


def test_ids_increase_and_a_bounded_log_counts_what_it_dropped():
    log = EventLog(capacity=3, first_id=100)
    for n in range(5):
        log.emit("x", n=n)
    assert log.last_id == 104 and log.oldest_id == 102
    assert [e["data"]["n"] for e in log.since(101)] == [2, 3, 4]
    assert log.since(104) == []


async def test_a_cursor_from_an_earlier_run_says_reset():
    root = Path(tempfile.mkdtemp(prefix="pde"))
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
