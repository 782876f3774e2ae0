"""Documents in memory (core/residency.py): loaded on first use, unloaded when idle, and an
environment that is not loaded reads and syncs as one that is.

The decision is driven with a fake clock; the registry's unloading with a real store; whole
daemons show that nothing that needs a document loses it (a subscription, a served mock, an
offline hold), that a LAN link's initial exchange loads no idle document, and (a real process)
that kill -9 after documents went loses nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from daemonproc import PYTHON, Daemons, daemons_fixture  # noqa: F401  (fixture)
from daemonutil import (
    Dev,
    InProcessDaemon,
    base_fixture,  # noqa: F401  (fixture)
    converged,
    make_space,
    wait_state,
)
from helpers import TIMEOUT, free_port, until, until_sync
from modelutil import load
from pycrdt import Doc, Map

from peerdaemon.core.events import EventLog
from peerdaemon.core.registry import Registry
from peerdaemon.core.residency import Facts, Residency, Sweeper, covers, holds_news
from peerdaemon.daemon.supervisor import DaemonConfig
from peerdaemon.model import export_environment, prepare
from peerdaemon.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from envgen import make_environment  # noqa: E402

NO_HISTORY = {"history.enabled": False}  # history keeps a changed document until its version


# -- the decision, with a fake clock -----------------------------------------------------------


def test_an_unused_document_goes_after_two_sweeps_and_only_when_it_may() -> None:
    r = Residency(evict_after=60, sweeps=2)
    assert r.interval == 30 and r.next_sweep(100.0) == 100.0
    # first sweep: everything loaded counts as just used
    assert r.decide(100, [("a", False, True), ("b", False, True), ("c", True, False)]) == []
    assert r.next_sweep(101.0) == 130.0
    assert r.decide(130, [("a", False, True), ("b", True, True), ("c", False, False)]) == []
    # a: unused through two sweeps -> goes; b was used at 130; c may not go (a subscriber)
    assert r.decide(160, [("a", False, True), ("b", False, True), ("c", False, False)]) == ["a"]
    assert r.decide(190, [("b", False, True), ("c", False, False)]) == ["b"]
    # c is idle all along: it goes as soon as it may
    assert r.decide(220, [("c", False, True)]) == ["c"]
    # a document loaded again starts afresh
    assert r.decide(250, [("a", False, True)]) == []


def test_no_eviction_when_off_and_settings_checked() -> None:
    r = Residency(evict_after=0)
    assert r.interval is None and r.next_sweep(5.0) is None
    for t in range(5):
        assert r.decide(float(t), [("a", False, True)]) == []
    r.configure(10, 1)
    assert r.interval == 10 and r.decide(10, [("a", False, True)]) == ["a"]
    with pytest.raises(ValueError):
        r.configure(-1)
    with pytest.raises(ValueError):
        r.configure(10, 0)


class Recorder:
    def __init__(self) -> None:
        self.sweeps: list[float] = []

    def sweep(self, residency: Residency, now: float) -> list[str]:
        self.sweeps.append(now)
        return residency.decide(now, [("a", False, True)])


async def test_the_sweeper_sweeps_every_interval_and_follows_new_settings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = Recorder()
    sweeper = Sweeper(registry, Residency(evict_after=20, sweeps=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(sweeper.run)
        start = trio.current_time()
        await trio.sleep(35)
        assert [t - start for t in registry.sweeps] == [0, 10, 20, 30]
        assert sweeper.unloaded == 1  # "a", at the third sweep
        sweeper.configure(0)  # off: no more sweeps
        await trio.sleep(100)
        assert len(registry.sweeps) == 4
        sweeper.configure(4, 4)  # on again, every second: overdue, so one at once
        await trio.sleep(3.5)
        assert [t - start for t in registry.sweeps[4:]] == [135, 136, 137, 138]
        nursery.cancel_scope.cancel()


# -- what is read of an unloaded document ----------------------------------------------------------


def test_state_vectors_and_delete_sets_read_without_the_document() -> None:
    from pycrdt import get_update

    doc = Doc()
    root = doc.get("m", type=Map)
    root["a"], root["b"] = 1, 2
    sv = doc.get_state()
    del root["a"]  # a deletion: the state vector stays, the delete set grows
    facts = Facts("n", None, False, 0, 1, doc.get_state(), doc.get_update(doc.get_state()))
    assert doc.get_state() == sv and facts.deletions != b"\x00\x00"
    other = Doc()
    other.apply_update(doc.get_update())
    assert covers(other.get_state(), facts.state_vector)
    assert not covers(b"\x00", facts.state_vector)
    # a copy of what the document holds is no news, a deletion it lacks or a new item is
    assert not holds_news(facts, doc.get_update(), get_update)
    assert not holds_news(facts, doc.get_update(sv), get_update)
    before = other.get_state()
    del other.get("m", type=Map)["b"]
    assert holds_news(facts, other.get_update(before), get_update)
    before = other.get_state()
    other.get("m", type=Map)["c"] = 3
    assert holds_news(facts, other.get_update(before), get_update)
    assert holds_news(facts, b"\x07junk", get_update)  # cannot tell: load it


def edited(registry: Registry, env_id: str) -> dict[str, Any]:
    """An edit with a deletion (a whole route removed), so the delete set is not empty."""
    env = dict(registry.export(env_id))
    env["routes"] = env["routes"][1:]
    env["name"] = "edited"
    return env


async def test_an_unloaded_environment_reads_syncs_and_loads_again_the_same(
    tmp_path: Path,
) -> None:
    env = load("test-env.json")
    e1 = env["uuid"]
    with Store.open(tmp_path) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            registry = Registry(store, EventLog())
            registry.create(e1, prepare(env, e1)[0], "local")
            registry.apply(e1, prepare(edited(registry, e1), e1)[0], "local")
            await registry.envs[e1].last_ticket.wait()
            json_before = registry.export(e1)
            summary, sv = registry.summary(e1), registry.state_vector(e1)
            full = registry.state_update(e1)
            in_step = registry.state_update(e1, sv)
            assert in_step != b"\x00\x00"  # the route's deletion

            assert registry.unload(e1) and not registry.loaded(e1)
            loads = registry.loads
            # listings, state vectors, model and an in-step peer's diff: no document
            assert registry.summary(e1) == summary and summary["name"] == "edited"
            assert registry.state_vector(e1) == sv and registry.model_of(e1) >= 1
            assert _same_delete_set(registry.state_update(e1, sv), in_step)
            # a copy of what it holds changes nothing and loads nothing
            assert registry.merge(e1, full, "peer:x")[:2] == (False, False)
            assert registry.loads == loads and not registry.loaded(e1)

            # the first real use loads it: the same JSON, state and update stream
            assert registry.export(e1) == json_before and registry.loaded(e1)
            assert registry.loads == loads + 1
            assert _export_of(registry.state_update(e1), e1) == json_before
            events: list[dict] = []
            registry.subscribe(e1, events.append)
            replica = Doc()
            replica.apply_update(full)
            before = replica.get_state()
            replica.get("environment", type=Map)["port"] = 4321
            created, changed, _ = registry.merge(e1, replica.get_update(before), "peer:x")
            assert (created, changed) == (False, True)
            assert [e["type"] for e in events] == ["change"]
            assert registry.export(e1)["port"] == 4321

            # a new registry on this store (a restart) lists it without loading it...
            await registry.envs[e1].last_ticket.wait()
            registry.unsubscribe(e1, next(iter(registry.envs[e1].subscribers)))
            assert registry.unload(e1)
            nursery.cancel_scope.cancel()
    with Store.open(tmp_path) as store:
        again = Registry(store, EventLog())
        assert again.load() == 1 and not again.loaded(e1) and again.loads == 0
        assert again.summary(e1)["name"] == "edited"
        assert again.export(e1)["port"] == 4321 and again.loads == 1
        # ...until something changed since its facts were kept: then it is loaded at start
        again.apply(e1, prepare({**again.export(e1), "port": 1}, e1)[0], "local")
    with Store.open(tmp_path) as store:
        third = Registry(store, EventLog())
        third.load()
        assert third.loaded(e1) and third.export(e1)["port"] == 1


def _export_of(update: bytes, env_id: str) -> dict[str, Any]:
    doc = Doc()
    doc.apply_update(update)
    return export_environment(doc, env_id)


def _same_delete_set(a: bytes, b: bytes) -> bool:
    from peerdaemon.model.yupdate import read_delete_set

    return a[:1] == b[:1] == b"\x00" and read_delete_set(a, 1) == read_delete_set(b, 1)


async def test_nothing_unloads_what_is_followed_not_durable_or_kept(tmp_path: Path) -> None:
    env = load("test-env.json")
    e1 = env["uuid"]
    with Store.open(tmp_path) as store:
        registry = Registry(store, EventLog())
        registry.create(e1, prepare(env, e1)[0], "local")
        assert not registry.may_unload(e1)  # its write is only queued (no writer yet)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await registry.envs[e1].last_ticket.wait()
            assert registry.may_unload(e1)
            token = registry.subscribe(e1, lambda event: None)
            assert not registry.may_unload(e1)
            registry.unsubscribe(e1, token)
            kept = {e1}
            keeper = registry.add_keeper(lambda env_id: env_id in kept)
            assert not registry.may_unload(e1) and not registry.unload(e1)
            registry.remove_keeper(keeper)
            registry.add_keeper(lambda env_id: 1 / 0)  # a failing keeper keeps everything
            assert not registry.may_unload(e1)
            nursery.cancel_scope.cancel()
        registry._keepers.clear()
        registry.envs[e1].pending.append(b"\x00\x00")  # a change on its way
        assert not registry.may_unload(e1)


# -- whole daemons ------------------------------------------------------------------------------


async def settle(d: InProcessDaemon) -> None:
    """Every environment's last write durable."""
    for env in list(d.daemon.registry.envs.values()):
        if env.last_ticket is not None:
            await env.last_ticket.wait()


def sweep(d: InProcessDaemon, times: int = 3) -> None:
    for _ in range(times):
        d.daemon.sweeper.sweep_now()


async def test_subscribed_served_and_held_documents_stay_loaded(base, nursery, monkeypatch):
    from mockutil import require_runner, small_env

    require_runner(monkeypatch)
    d = InProcessDaemon(base, "d")
    await d.start_with(nursery, DaemonConfig(d.data_dir, d.socket_path, history=NO_HISTORY))
    ids = [(await d.op("env.import", env=small_env(), new_id=True))["id"] for _ in range(4)]
    idle, subscribed, served, held = ids
    registry = d.daemon.registry
    port = free_port()
    assert (await d.op("mock.start", id=served, port=port, hostname="127.0.0.1"))["port"] == port
    d.daemon.spaces.holds.hold(held, "space-x", registry.state_update(held), "peer:x")
    async with await d.client.subscribe_env(subscribed) as sub:
        await settle(d)
        sweep(d)
        assert [registry.loaded(e) for e in ids] == [False, True, True, True]
        assert (await d.op("status"))["loaded"] == 3
        # the subscription still gets changes (and the idle one loads for the write)
        await d.client.patch(subscribed, [{"op": "replace", "path": "/port", "value": 3999}])
        with trio.fail_after(TIMEOUT):
            event = await sub.__anext__()
        assert event["type"] == "change" and "/port" in event["paths"]
    await d.op("mock.stop", id=served)
    d.daemon.spaces.holds.release(held)
    await until(lambda: not registry.envs[subscribed].subscribers, what="the unsubscribe")
    await settle(d)
    sweep(d)
    assert not any(registry.loaded(e) for e in ids)
    assert [e["id"] for e in await d.op("env.list")] == sorted(ids)
    await d.stop()


class QuietDev(Dev):
    """A LAN daemon without history (a changed document would stay loaded for its version)."""

    def config_extra(self) -> dict[str, Any]:
        return {"history": NO_HISTORY}


async def test_a_peers_initial_exchange_loads_no_idle_document(base, nursery):
    a, b = QuietDev(base, "a"), QuietDev(base, "b")
    await a.start(nursery)
    await b.start(nursery, a)
    space_id = await make_space(a, b)
    ids = [await a.import_env(new_id=True, name=f"env {n}") for n in range(3)]
    for env_id in ids:
        await a.op("env.share", id=env_id, space=space_id)
    for env_id in ids:
        await converged([a, b], env_id)
    # deletions on both sides, so that the in-step answers carry delete sets
    await a.patch(ids[0], {"op": "remove", "path": "/routes/0"})
    await b.patch(ids[1], {"op": "remove", "path": "/routes/1"})
    for env_id in ids:
        await converged([a, b], env_id)
    await b.stop()  # b keeps its documents' facts at shutdown
    await settle(a)
    sweep(a)
    assert a.daemon.registry.resident() == 0
    loads = a.daemon.registry.loads

    await b.start(nursery, a)
    assert b.daemon.registry.resident() == 0 and b.daemon.registry.loads == 0
    await wait_state(b, a, "connected")

    async def synced() -> bool:
        rows = [await a.row(b), await b.row(a)]
        return all(r is not None and r["synced"] for r in rows)

    await until(synced, what="the link's initial exchange")
    assert a.daemon.registry.loads == loads and b.daemon.registry.loads == 0
    assert a.daemon.registry.resident() == 0 and b.daemon.registry.resident() == 0
    assert sorted(e["name"] for e in await b.client.list_envs()) == ["env 0", "env 1", "env 2"]

    # a change still travels: only that document loads, on both sides
    await a.set_endpoint(ids[2], 0, "after-restart")
    after = await converged([a, b], ids[2])
    assert after["routes"][0]["endpoint"] == "after-restart"
    assert b.daemon.registry.loaded(ids[2]) and not b.daemon.registry.loaded(ids[0])
    await a.stop()
    await b.stop()


# -- kill -9 after documents went (a real process) --------------------------------------------

EVICTING_CHILD = """
import sys
from pathlib import Path
from peerdaemon.daemon.config import DaemonConfig
from peerdaemon.daemon.supervisor import run_daemon
raise SystemExit(run_daemon(DaemonConfig(Path(sys.argv[1]), Path(sys.argv[2]),
                            evict_after=float(sys.argv[3]), evict_sweeps=2,
                            history={"history.enabled": False})))
"""


@pytest.mark.slow
def test_kill9_after_documents_went_loses_nothing(daemons: Daemons) -> None:
    d = daemons.new()
    d.argv = [PYTHON, "-c", EVICTING_CHILD, str(d.data_dir), str(d.socket_path), "0.2"]
    d.start()
    expected: dict[str, dict] = {}
    with d.client() as c:
        for n in range(6):
            env = make_environment(20_000, seed=n)
            env_id = c.import_env(json.dumps(env))["id"]
            c.patch(env_id, [{"op": "replace", "path": "/name", "value": f"n{n}"}])
            expected[env_id] = c.export(env_id)
        until_sync(lambda: c.status()["loaded"] == 0, what="every document unloaded")
        # one is used again and changed (acknowledged), one only read; then kill -9
        changed, read = list(expected)[:2]
        c.patch(changed, [{"op": "remove", "path": "/routes/0"}])
        expected[changed] = c.export(changed)
        assert c.export(read) == expected[read]
    d.kill9()
    status = d.start()
    # the changed one was loaded at start (its kept facts were for an older state); the rest not
    assert status["environments"] == 6 and status["loaded"] == 1
    with d.client() as c:
        listed = {e["id"]: e for e in c.list_envs()}
        for env_id, env in expected.items():
            assert listed[env_id]["name"] == env["name"]
            assert listed[env_id]["routes"] == len(env["routes"])
            assert c.export(env_id) == env
    d.stop()
