"""A save on this device marks its environment as edited for `Editors.window` seconds from the
last save (docs/presence.md). Saves in a row only move that end later, so the presence
service's loop is not woken for them: it wakes at the old end and sleeps on to the new one. A
wake on every save cost a task step on each socket write's way to its commit (issue 13:
durable sequential patches 7% slower)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from modelutil import load

from peerdaemon.core.events import EventLog
from peerdaemon.core.registry import Registry
from peerdaemon.model import prepare
from peerdaemon.presence.local import Me
from peerdaemon.presence.service import PresenceService
from peerdaemon.store import Store

WINDOW = 10.0


async def test_saves_in_a_row_keep_the_mark_until_a_window_after_the_last(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    env = load("test-env.json")
    env_id = env["uuid"]
    with Store.open(tmp_path) as store:
        registry = Registry(store, EventLog())
        presence = PresenceService(Me("device-a", "laptop"), registry)
        presence.editors.window = WINDOW
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(presence.run)
            start = trio.current_time()
            registry.create(env_id, prepare(env, env_id)[0], "local")  # a save: marked
            await trio.testing.wait_all_tasks_blocked()
            assert presence.editors.editing(env_id) == [{"via": "socket"}]

            for i in range(1, 4):  # a save every 6 s: each moves the end 6 s later
                await trio.sleep(6.0)
                waiting = presence._wake
                registry.apply(env_id, prepare({**env, "port": 4000 + i}, env_id)[0], "local")
                assert not waiting.is_set()  # the loop sleeps on
                await trio.testing.wait_all_tasks_blocked()
                assert presence.editors.editing(env_id) == [{"via": "socket"}]

            last = start + 18.0
            await trio.sleep_until(last + WINDOW - 0.5)
            assert presence.editors.editing(env_id) == [{"via": "socket"}]
            await trio.sleep_until(last + WINDOW + 0.5)
            assert presence.editors.editing(env_id) == []
            nursery.cancel_scope.cancel()
