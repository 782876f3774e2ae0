"""The local socket API (docs/local-api.md) against a real daemon: `supervisor.serve` in this
trio run, spoken to with `AsyncClient` and with raw frames over a plain Unix socket."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import cbor2
import pytest
import trio
from modelutil import FIXTURE_DIR, assert_strict_equal, load
from pycrdt import Doc, Map

from peerdaemon.api.client import AsyncClient, DaemonError
from peerdaemon.daemon.supervisor import DaemonConfig, serve
from peerdaemon.model import MODEL_VERSION, apply_environment, export_environment, prepare

MAX_FRAME = 1 << 18  # small, so that oversized frames are cheap to send
TEST_ENV = "test-env.json"
TEST_ID = "c6199444-5116-490a-99a2-074876253a4a"
WAIT = 10  # seconds: bound on every wait for a push or response


def fixture_text(name: str) -> str:
    return (FIXTURE_DIR / name).read_text(encoding="utf-8")


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def dirs():
    base = Path(tempfile.mkdtemp(prefix="pd"))
    yield base / "data", base / "run" / "pd.sock"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def daemon(nursery, dirs):
    data_dir, socket_path = dirs
    return await nursery.start(serve, DaemonConfig(data_dir, socket_path, max_frame=MAX_FRAME))


@pytest.fixture
async def client(daemon):
    async with await AsyncClient.connect(daemon.config.socket_path, max_frame=MAX_FRAME) as c:
        yield c


@pytest.fixture
async def env_id(client):
    result = await client.import_env(fixture_text(TEST_ENV))
    assert result == {"id": TEST_ID, "repairs": [], "newer": False}
    return TEST_ID


async def connect(daemon) -> AsyncClient:
    return await AsyncClient.connect(daemon.config.socket_path, max_frame=MAX_FRAME)


async def expect_error(code: str, call) -> DaemonError:
    with pytest.raises(DaemonError) as info:
        await call
    assert info.value.code == code, info.value
    return info.value


async def next_event(sub) -> dict:
    with trio.fail_after(WAIT):
        return await sub.__anext__()


async def assert_intact(client, expected: dict[str, dict]) -> None:
    """The daemon still answers, on this connection and a new one, and holds `expected`."""
    status = await client.status()
    assert status["environments"] == len(expected)
    for env_id, env in expected.items():
        assert_strict_equal(await client.export(env_id), env)
    async with await AsyncClient.connect(client.path, max_frame=MAX_FRAME) as other:
        assert sorted(e["id"] for e in await other.list_envs()) == sorted(expected)


def replica_of(update: bytes) -> Doc:
    doc = Doc()
    doc.apply_update(update)
    return doc


class Raw:
    """Frames by hand over a plain Unix socket (what a client in another language would do)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, daemon) -> Raw:
        return cls(await trio.open_unix_socket(os.fspath(daemon.config.socket_path)))

    async def send_payload(self, payload: bytes) -> None:
        await self.stream.send_all(struct.pack(">I", len(payload)) + payload)

    async def send(self, msg: dict) -> None:
        await self.send_payload(cbor2.dumps(msg))

    async def recv(self) -> dict:
        with trio.fail_after(WAIT):
            while True:
                if len(self.buf) >= 4:
                    (n,) = struct.unpack(">I", self.buf[:4])
                    if len(self.buf) >= 4 + n:
                        payload, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                        msg = cbor2.loads(payload)
                        assert isinstance(msg, dict)
                        return msg
                data = await self.stream.receive_some(1 << 16)
                if not data:
                    raise EOFError("daemon closed the connection")
                self.buf += data

    async def call(self, msg: dict) -> dict:
        await self.send(msg)
        return await self.recv()

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- status, list, import -----------------------------------------------------------------------
async def test_status_and_list_of_an_empty_daemon(daemon, client):
    status = await client.status()
    assert status["pid"] == os.getpid()
    assert status["data_dir"] == str(daemon.config.data_dir)
    assert status["socket"] == str(daemon.config.socket_path)
    assert status["environments"] == 0 and status["newer"] == []
    assert status["last_migration"] == 33 and status["model_version"] == MODEL_VERSION == 2
    assert isinstance(status["store"], dict) and status["uptime"] >= 0
    assert status["events"] >= 1  # daemon-started
    assert await client.list_envs() == []


async def test_import_returns_the_id_and_lists_it(client, env_id):
    source = load(TEST_ENV)
    [entry] = await client.list_envs()
    assert entry["id"] == env_id and entry["name"] == source["name"]
    assert entry["routes"] == len(source["routes"]) == 11
    assert entry["lastMigration"] == 33 and entry["newer"] is False
    assert (await client.status())["environments"] == 1
    assert_strict_equal(await client.export(env_id), source)


async def test_import_of_an_existing_id_is_refused_unless_new_id(client, env_id):
    before = await client.export(env_id)
    err = await expect_error("exists", client.import_env(fixture_text(TEST_ENV)))
    assert env_id in err.message
    assert len(await client.list_envs()) == 1
    result = await client.import_env(fixture_text(TEST_ENV), new_id=True)
    new = result["id"]
    assert new != env_id and result["repairs"] == []
    copy_ = await client.export(new)
    assert copy_["uuid"] == new
    assert_strict_equal({**copy_, "uuid": env_id}, before)
    assert sorted(e["id"] for e in await client.list_envs()) == sorted([env_id, new])
    # An object without a uuid (but with lastMigration) gets a fresh one.
    bare = {k: v for k, v in load(TEST_ENV).items() if k != "uuid"}
    third = (await client.import_env(bare))["id"]
    assert third not in (env_id, new)
    assert (await client.get(third, "/uuid")) == third


async def test_import_reports_the_repairs_of_the_generated_demo_api(client):
    result = await client.import_env(fixture_text("demo-api-generated-commons-9.9.0.json"))
    assert result["id"] == "f1622b6a-d8ee-4cb9-8bff-3c9f0d6f1bd0" and result["newer"] is False
    repairs = result["repairs"]
    assert any(r.startswith("/routes/6") and "uuid" in r for r in repairs), repairs
    assert any(r.startswith("/rootChildren") for r in repairs), repairs
    exported = await client.export(result["id"])
    assigned = exported["routes"][6]["uuid"]
    assert assigned and {"type": "route", "uuid": assigned} in exported["rootChildren"]
    # ...which is what Mockoon keeps after its own repair (up to the random uuid it assigned).
    repaired = load("demo-api-repaired-commons-9.9.0.json")
    expected = json.loads(json.dumps(repaired).replace(repaired["routes"][6]["uuid"], assigned))
    assert_strict_equal(exported, expected)


# --- get ----------------------------------------------------------------------------------------
async def test_get_whole_and_with_json_pointers(client, env_id):
    source = load(TEST_ENV)
    assert_strict_equal(await client.get(env_id), source)
    assert_strict_equal(await client.get(env_id, ""), source)
    assert await client.get(env_id, "/name") == source["name"]
    assert await client.get(env_id, "/routes/0/endpoint") == source["routes"][0]["endpoint"]
    assert await client.get(env_id, "/routes/1/responses/0") == source["routes"][1]["responses"][0]
    assert await client.get(env_id, "/port") == source["port"]
    await client.patch(env_id, [{"op": "add", "path": "/x~1y", "value": {"a~b": [7]}}])
    assert await client.get(env_id, "/x~1y/a~0b/0") == 7  # RFC 6901 escapes


@pytest.mark.parametrize("pointer", ["routes", "routes/0", "#/routes", "/routes/~2", "/name~"])
async def test_get_with_a_bad_pointer(client, env_id, pointer):
    before = await client.export(env_id)
    await expect_error("bad-pointer", client.get(env_id, pointer))
    await assert_intact(client, {env_id: before})


@pytest.mark.parametrize(
    "pointer", ["/nope", "/routes/99", "/routes/-", "/routes/x", "/port/0", "/routes/0/nope/1"]
)
async def test_get_of_a_missing_path(client, env_id, pointer):
    await expect_error("not-found", client.get(env_id, pointer))
    assert await client.get(env_id, "/name") == load(TEST_ENV)["name"]


async def test_get_of_an_unknown_environment(client):
    await expect_error("not-found", client.get("no-such-env"))
    await expect_error("not-found", client.export("no-such-env"))
    await expect_error("not-found", client.patch("no-such-env", []))
    await expect_error("not-found", client.put("no-such-env", load(TEST_ENV)))
    await expect_error("not-found", client.delete("no-such-env"))
    await expect_error("not-found", client.subscribe_env("no-such-env"))


# --- put ----------------------------------------------------------------------------------------
async def test_put_is_applied_as_minimal_edits_seen_by_a_concurrent_subscriber(
    daemon, client, env_id
):
    edited = load(TEST_ENV)
    edited["routes"][0]["endpoint"] = "renamed"
    edited["routes"][2]["responses"][0]["statusCode"] = 418
    edited["latency"] = 25
    expected_paths = {"/routes/0/endpoint", "/routes/2/responses/0/statusCode", "/latency"}
    async with await connect(daemon) as watcher:
        async with await watcher.subscribe_env(env_id) as sub:
            result = await client.put(env_id, json.dumps(edited, indent=2))
            assert result == {"changed": True, "repairs": []}
            event = await next_event(sub)
            assert event["type"] == "change" and event["id"] == env_id
            assert event["origin"] == "local"
            assert set(event["paths"]) == expected_paths
            # The update is small: it carries the edits, not the whole document.
            assert len(event["update"]) < len(sub.initial["update"]) / 10
            replica = replica_of(sub.initial["update"])
            replica.apply_update(event["update"])
            assert_strict_equal(export_environment(replica, env_id), edited)
            # The same file again changes nothing: no event, then the next edit's event.
            assert (await client.put(env_id, edited))["changed"] is False
            await client.patch(env_id, [{"op": "replace", "path": "/port", "value": 4000}])
            assert (await next_event(sub))["paths"] == ["/port"]
    edited["port"] = 4000
    assert_strict_equal(await client.get(env_id), edited)


async def test_put_of_another_environment_is_refused_unless_forced(client, env_id):
    """A file whose uuid is another environment (the wrong file, the wrong ID) must not
    silently replace this one: `uuid-mismatch`, nothing changed; `force_id` does it, keeping
    the id; content without a uuid is this environment's."""
    before = await client.export(env_id)
    other = (await client.import_env({**load(TEST_ENV), "name": "Other"}, new_id=True))["id"]
    other_before = await client.export(other)
    error = await expect_error("uuid-mismatch", client.put(env_id, other_before))
    assert other in error.message and env_id in error.message and "force_id" in error.message
    edited = {**load(TEST_ENV), "uuid": "another-id", "name": "put"}
    await expect_error("uuid-mismatch", client.put(env_id, json.dumps(edited)))
    await assert_intact(client, {env_id: before, other: other_before})

    result = await client.put(env_id, edited, force_id=True)
    assert result["changed"] is True
    assert [r for r in result["repairs"] if "another-id" in r], result
    assert await client.get(env_id, "/uuid") == env_id
    assert await client.get(env_id, "/name") == "put"
    assert sorted(e["id"] for e in await client.list_envs()) == sorted([env_id, other])

    no_uuid = {k: v for k, v in load(TEST_ENV).items() if k != "uuid"}
    assert (await client.put(env_id, no_uuid))["changed"] is True
    assert await client.get(env_id, "/uuid") == env_id
    assert await client.get(env_id, "/name") == load(TEST_ENV)["name"]


async def test_put_that_is_not_an_environment_changes_nothing(client, env_id):
    before = await client.export(env_id)
    await expect_error("malformed-json", client.put(env_id, '{"uuid": '))
    await expect_error("not-an-environment", client.put(env_id, "[1, 2]"))
    await expect_error("not-an-environment", client.put(env_id, {"name": "no uuid"}))
    await expect_error("not-an-environment", client.put(env_id, {**before, "routes": {}}))
    await assert_intact(client, {env_id: before})


# --- patch --------------------------------------------------------------------------------------
async def test_patch_applies_rfc6902(client, env_id):
    source = load(TEST_ENV)
    patch = [
        {"op": "test", "path": "/name", "value": source["name"]},
        {"op": "replace", "path": "/name", "value": "Patched"},
        {"op": "add", "path": "/headers/-", "value": {"key": "X-A", "value": "1"}},
        {"op": "remove", "path": "/routes/10"},
        {"op": "move", "from": "/routes/0", "path": "/routes/1"},
        {"op": "copy", "from": "/port", "path": "/x-port"},
    ]
    result = await client.patch(env_id, patch)
    assert result["changed"] is True
    # The removed route's reference is dangling now: repaired (dropped) as Mockoon would.
    removed_uuid = source["routes"][10]["uuid"]
    assert [r for r in result["repairs"] if removed_uuid in r and "rootChildren" in r]
    expected = copy.deepcopy(source)
    expected["name"] = "Patched"
    expected["headers"].append({"key": "X-A", "value": "1"})
    removed = expected["routes"].pop(10)
    expected["routes"].insert(1, expected["routes"].pop(0))
    expected["x-port"] = expected["port"]
    expected["rootChildren"] = [
        ref for ref in expected["rootChildren"] if ref["uuid"] != removed["uuid"]
    ]
    assert_strict_equal(await client.get(env_id), expected)
    # As JSON text too; a patch that changes nothing says so.
    text = json.dumps([{"op": "replace", "path": "/name", "value": "Patched"}])
    assert await client.patch(env_id, text) == {"changed": False, "repairs": []}


@pytest.mark.parametrize(
    "patch",
    [
        [
            {"op": "test", "path": "/name", "value": "not the name"},
            {"op": "remove", "path": "/port"},
        ],
        [{"op": "remove", "path": "/nope"}],
        [{"op": "replace", "path": "/routes/99/endpoint", "value": "x"}],
        [{"op": "frobnicate", "path": "/name"}],
        [{"op": "add", "value": 1}],
        [{"op": "add", "path": "name", "value": 1}],
        [{"op": "move", "from": "/routes", "path": "/routes/0/x"}],
        ["not an operation"],
        [{"op": "replace", "path": "/name", "value": "ok"}, {"op": "remove", "path": "/nope"}],
        '[{"op": "replace", "path": "/name", "value": "x"}, {"op": "test", "path": "/port", "value": 1}]',
    ],
)
async def test_bad_patch_changes_nothing(client, env_id, patch):
    before = await client.export(env_id)
    await expect_error("bad-patch", client.patch(env_id, patch))
    await assert_intact(client, {env_id: before})


@pytest.mark.parametrize(
    "patch",
    [
        [{"op": "replace", "path": "", "value": 5}],
        [{"op": "replace", "path": "/routes", "value": "x"}],
        [{"op": "replace", "path": "/uuid", "value": 5}],
        [{"op": "replace", "path": "/lastMigration", "value": "thirty-three"}],
        [{"op": "remove", "path": "/uuid"}, {"op": "remove", "path": "/lastMigration"}],
    ],
)
async def test_patch_that_breaks_the_environment_is_refused_and_changes_nothing(
    daemon, client, env_id, patch
):
    before = await client.export(env_id)
    async with await connect(daemon) as watcher:
        async with await watcher.subscribe_env(env_id) as sub:
            await expect_error("not-an-environment", client.patch(env_id, patch))
            await assert_intact(client, {env_id: before})
            # No change event was sent for it: the next event is the next real edit's.
            await client.patch(env_id, [{"op": "replace", "path": "/latency", "value": 9}])
            assert (await next_event(sub))["paths"] == ["/latency"]


async def test_malformed_patch_json(client, env_id):
    err = await expect_error("malformed-json", client.patch(env_id, '[{"op": "add",\n "path"'))
    assert "line 2" in err.message


# --- delete -------------------------------------------------------------------------------------
async def test_delete(daemon, client, env_id):
    other = (await client.import_env(fixture_text("callbacks.json")))["id"]
    kept = await client.export(other)
    async with await connect(daemon) as watcher:
        sub = await watcher.subscribe_env(env_id)
        assert await client.delete(env_id) == {"deleted": True}
        assert await next_event(sub) == {"type": "deleted", "id": env_id, "origin": "local"}
        with trio.fail_after(WAIT):
            assert [e async for e in sub] == []  # the daemon ended the subscription
    await expect_error("not-found", client.get(env_id))
    await expect_error("not-found", client.delete(env_id))
    assert [e["id"] for e in await client.list_envs()] == [other]
    await assert_intact(client, {other: kept})
    # The id is free again.
    assert (await client.import_env(fixture_text(TEST_ENV)))["id"] == env_id


# --- export -------------------------------------------------------------------------------------
async def test_export_json_and_yjs(client, env_id):
    await client.patch(env_id, [{"op": "replace", "path": "/routes/0/documentation", "value": "d"}])
    exported = await client.export(env_id)
    assert_strict_equal(exported, await client.export(env_id, "json"))
    update = await client.export(env_id, "yjs")
    assert isinstance(update, bytes)
    assert_strict_equal(export_environment(replica_of(update), env_id), exported)
    # With a state vector: only what that replica lacks.
    replica = replica_of(update)
    await client.patch(env_id, [{"op": "replace", "path": "/name", "value": "Newer"}])
    delta = await client.export(env_id, "yjs", state_vector=replica.get_state())
    assert 0 < len(delta) < len(update) / 10
    replica.apply_update(delta)
    assert_strict_equal(export_environment(replica, env_id), await client.get(env_id))
    await expect_error("bad-request", client.export(env_id, "xml"))


# --- merge --------------------------------------------------------------------------------------
async def test_merge_of_a_concurrent_replica_edit(client, env_id):
    replica = replica_of(await client.export(env_id, "yjs"))
    # The daemon and the replica each change a different field, concurrently.
    await client.patch(env_id, [{"op": "replace", "path": "/name", "value": "daemon side"}])
    edited = export_environment(replica, env_id)
    edited["routes"][0]["endpoint"] = "replica-side"
    edited["routes"][0]["responses"][0]["body"] += " + replica"
    apply_environment(replica, prepare(edited, env_id)[0])
    result = await client.merge(env_id, replica.get_update())
    assert result == {"created": False, "changed": True}
    merged = await client.get(env_id)
    assert merged["name"] == "daemon side"
    assert merged["routes"][0]["endpoint"] == "replica-side"
    assert merged["routes"][0]["responses"][0]["body"].endswith(" + replica")
    # Merging it again is idempotent.
    assert await client.merge(env_id, replica.get_update()) == {"created": False, "changed": False}
    assert_strict_equal(await client.get(env_id), merged)


async def test_merge_into_an_unknown_id_creates_the_environment(client):
    doc = Doc()
    apply_environment(doc, prepare(load("databuckets.json"))[0])
    result = await client.merge("from-a-peer", doc.get_update())
    assert result == {"created": True, "changed": True}
    expected = export_environment(doc, "from-a-peer")
    assert_strict_equal(await client.get("from-a-peer"), expected)
    assert [e["id"] for e in await client.list_envs()] == ["from-a-peer"]


@pytest.mark.parametrize(
    "update", [b"definitely not a yjs update", b"", b"\x01", b"\x00", "text, not bytes"]
)
async def test_merge_of_garbage_is_refused_and_changes_nothing(client, env_id, update):
    before = await client.export(env_id)
    yjs_before = await client.export(env_id, "yjs")
    await expect_error("bad-update", client.call("env.merge", id=env_id, update=update))
    await expect_error("bad-update", client.call("env.merge", id="new-env", update=update))
    await assert_intact(client, {env_id: before})
    assert await client.export(env_id, "yjs") == yjs_before


async def test_merge_of_an_update_without_an_environment_creates_nothing(client, env_id):
    before = await client.export(env_id)
    doc = Doc()
    doc.get("unrelated", type=Map)["x"] = 1
    for update in (b"\x00\x00", doc.get_update()):
        await expect_error("bad-update", client.merge("empty", update))
    await assert_intact(client, {env_id: before})


# --- subscriptions ------------------------------------------------------------------------------
async def test_env_subscribe_snapshot_then_one_event_per_edit(daemon, client, env_id):
    async with await connect(daemon) as watcher:
        async with await watcher.subscribe_env(env_id) as sub:
            assert set(sub.initial) >= {"sub", "snapshot", "update"}
            assert_strict_equal(sub.initial["snapshot"], await client.get(env_id))
            replica = replica_of(sub.initial["update"])
            assert_strict_equal(export_environment(replica, env_id), sub.initial["snapshot"])
            edits = [
                ([{"op": "replace", "path": "/name", "value": "one"}], ["/name"]),
                (
                    [{"op": "replace", "path": "/routes/3/responses/0/body", "value": "{}"}],
                    ["/routes/3/responses/0/body"],
                ),
                (
                    [
                        {
                            "op": "add",
                            "path": "/routes/0/responses/0/headers/0",
                            "value": {"key": "k", "value": "v"},
                        }
                    ],
                    ["/routes/0/responses/0/headers"],
                ),
                ([{"op": "replace", "path": "/data/1/value", "value": "[]"}], ["/data/1/value"]),
            ]
            for patch, _paths in edits:
                await client.patch(env_id, patch)
            other = (await client.import_env(fixture_text("callbacks.json")))["id"]
            await client.patch(other, [{"op": "replace", "path": "/name", "value": "elsewhere"}])
            await client.merge(env_id, replica.get_update())  # nothing new: no event
            await client.patch(env_id, [{"op": "replace", "path": "/port", "value": 1}])
            for _patch, paths in [*edits, (None, ["/port"])]:
                event = await next_event(sub)
                assert event["type"] == "change" and event["id"] == env_id
                assert event["paths"] == paths and event["origin"] == "local"
                replica.apply_update(event["update"])
            assert_strict_equal(export_environment(replica, env_id), await client.get(env_id))


async def test_two_subscriptions_on_one_connection_and_unsubscribe(daemon, env_id):
    raw = await Raw.open(daemon)
    try:
        first = await raw.call({"id": 1, "op": "env.subscribe", "args": {"id": env_id}})
        second = await raw.call({"id": 2, "op": "env.subscribe", "args": {"id": env_id}})
        events = await raw.call({"id": 3, "op": "events.subscribe"})
        s1, s2, s3 = first["result"]["sub"], second["result"]["sub"], events["result"]["sub"]
        assert len({s1, s2, s3}) == 3
        assert await raw.call({"id": 4, "op": "unsubscribe", "args": {"sub": s1}}) == {
            "id": 4,
            "result": {"unsubscribed": s1},
        }
        unknown = await raw.call({"id": 5, "op": "unsubscribe", "args": {"sub": s1}})
        assert unknown["error"]["code"] == "not-found"
        patch = [{"op": "replace", "path": "/name", "value": "after unsubscribe"}]
        await raw.send({"id": 6, "op": "env.patch", "args": {"id": env_id, "patch": patch}})
        # Pushes of a change are queued before the write's (durable) acknowledgement.
        pushes = []
        while (msg := await raw.recv()).get("id") != 6:
            pushes.append(msg)
        assert msg == {"id": 6, "result": {"changed": True, "repairs": []}}
        assert sorted(p["sub"] for p in pushes) == sorted([s2, s3])
        by_sub = {p["sub"]: p["event"] for p in pushes}
        assert by_sub[s2]["paths"] == ["/name"]
        assert by_sub[s3]["type"] == "environment-changed"
        assert by_sub[s3]["data"]["id"] == env_id
    finally:
        await raw.aclose()


async def test_events_subscribe_resumes_from_a_cursor(daemon, client, env_id):
    async with await connect(daemon) as follower:
        sub = await follower.subscribe_events()
        assert sub.initial["events"] == [] and sub.initial["missed"] == 0
        cursor = sub.initial["cursor"]
        await client.patch(env_id, [{"op": "replace", "path": "/name", "value": "seen"}])
        event = await next_event(sub)
        assert event["id"] == cursor + 1 and event["type"] == "environment-changed"
        assert event["data"] == {"id": env_id, "origin": "local", "paths": ["/name"]}
        assert isinstance(event["time"], float)
        cursor = event["id"]
    # Disconnected: these happen while nobody follows.
    await client.patch(env_id, [{"op": "replace", "path": "/name", "value": "missed 1"}])
    other = (await client.import_env(fixture_text("callbacks.json")))["id"]
    await client.delete(other)
    async with await connect(daemon) as follower:
        sub = await follower.subscribe_events(since=cursor)
        missed = sub.initial["events"]
        assert [(e["type"], e["data"]["id"]) for e in missed] == [
            ("environment-changed", env_id),
            ("environment-created", other),
            ("environment-changed", other),
            ("environment-deleted", other),
        ]
        assert [e["id"] for e in missed] == list(range(cursor + 1, cursor + 5))
        assert missed[0]["data"]["paths"] == ["/name"]
        assert missed[2]["data"]["paths"] == [""]  # a new environment: everything
        assert sub.initial["missed"] == 0 and sub.initial["cursor"] == cursor + 4
        # ...and from then on, live pushes continue the same numbering.
        await client.patch(env_id, [{"op": "replace", "path": "/name", "value": "live"}])
        event = await next_event(sub)
        assert event["id"] == cursor + 5 and event["data"]["id"] == env_id
        assert event["data"]["paths"] == ["/name"]
        # Resuming from the newest cursor gives nothing twice.
        again = await follower.subscribe_events(since=event["id"])
        assert again.initial["events"] == [] and again.initial["cursor"] == event["id"]
        await expect_error("bad-request", follower.call("events.subscribe", since=-1))


# --- bad input never takes the daemon down --------------------------------------------------------
async def test_malformed_and_non_environment_json(client, env_id):
    before = await client.export(env_id)
    err = await expect_error("malformed-json", client.import_env('{\n  "uuid": "x",\n  oops\n}'))
    assert "line 3" in err.message
    for text in (
        "",
        "[1, 2]",
        '"a string"',
        "null",
        '{"name": "no uuid, no lastMigration"}',
        '{"uuid": 5}',
        '{"uuid": "x", "lastMigration": "33"}',
        '{"uuid": "x", "routes": 1}',
    ):
        code = "malformed-json" if text == "" else "not-an-environment"
        await expect_error(code, client.import_env(text))
    await expect_error("not-an-environment", client.import_env([1, 2]))  # as a CBOR value
    await expect_error("bad-request", client.call("env.import"))
    await assert_intact(client, {env_id: before})


def wrong_values(kind) -> list:
    """Values of CBOR kinds other than `kind`, including numbers no 64-bit integer holds."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    samples = ["1" * 5000, b"\xff\xff", 2**70, -(2**70), True, ["x", ["y"]], {"k": ["v"]}, 1.5]

    def fits(value) -> bool:
        if isinstance(value, bool):
            return bool in kinds
        if isinstance(value, int):
            return int in kinds or float in kinds
        return isinstance(value, kinds)

    return [value for value in samples if not fits(value)]


async def test_every_argument_of_the_wrong_type_is_a_bad_request(daemon, client, env_id):
    """Table-driven over every operation's arguments (`ARG_KINDS`): a list, a map, a huge number
    or a string where another type belongs is `bad-request` naming the argument, never
    `internal` (`config.get` with a list as key was `internal`), and nothing changes."""
    from peerdaemon.operations.environments import ARG_KINDS

    no_args = {"status", "env.list", "env.links", "space.list", "identity", "peers"}
    undeclared = set(daemon.service._ops) - set(ARG_KINDS) - no_args
    assert not undeclared, f"declare the arguments of {undeclared} in service.ARG_KINDS"
    before = await client.export(env_id)
    tried = 0
    for op, kinds in ARG_KINDS.items():
        for name, kind in kinds.items():
            for value in wrong_values(kind):
                args = {"id": env_id, "space": "s", "key": "name", name: value}
                error = await expect_error("bad-request", client.call(op, **args))
                assert repr(name) in error.message and op in error.message, error
                tried += 1
    assert tried > 60
    await assert_intact(client, {env_id: before})


async def test_args_with_keys_that_are_not_text_are_a_bad_request(daemon, client, env_id):
    stream = await trio.open_unix_socket(str(daemon.config.socket_path))
    async with stream:
        payload = cbor2.dumps({"id": 7, "op": "env.get", "args": {"id": env_id, 1: "x"}})
        await stream.send_all(struct.pack(">I", len(payload)) + payload)
        data = b""
        with trio.fail_after(WAIT):
            while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
                data += await stream.receive_some(1 << 16)
    error = cbor2.loads(data[4:])["error"]
    assert error["code"] == "bad-request" and "keys" in error["message"]


@pytest.mark.parametrize(
    "pointer", ["/routes/" + "1" * 5000, "/routes/" + "9" * 30, "/routes/\u00b2", "/routes/01"]
)
async def test_array_indexes_too_big_or_not_ascii_digits_resolve_to_nothing(
    client, env_id, pointer
):
    """A 5,000-digit index used to be `internal` (Python's limit on int() of long strings) in
    `env.get`, and so was it or a superscript digit in an `env.patch` path."""
    before = await client.export(env_id)
    await expect_error("not-found", client.get(env_id, pointer))
    for op in ("replace", "remove"):
        patch = [{"op": op, "path": pointer + "/name", "value": 1}]
        await expect_error("bad-patch", client.patch(env_id, patch))
    await assert_intact(client, {env_id: before})


@pytest.mark.parametrize("value", ["NaN", "-Infinity", '"a\\ud800b"', '{"\\udfff": 1}'])
async def test_json_that_is_not_json_or_not_unicode_is_refused(client, env_id, value):
    """NaN/Infinity are not JSON; a lone surrogate escape is not Unicode (it used to make pycrdt
    panic, which took the whole daemon down)."""
    before = await client.export(env_id)
    text = '{"uuid": "new", "lastMigration": 33, "x": ' + value + "}"
    await expect_error("malformed-json", client.import_env(text))
    whole = json.dumps(before)[:-1] + ', "x": ' + value + "}"
    await expect_error("malformed-json", client.put(env_id, whole))
    patch = '[{"op": "add", "path": "/x", "value": ' + value + "}]"
    await expect_error("malformed-json", client.patch(env_id, patch))
    await assert_intact(client, {env_id: before})


async def test_newer_environment_is_kept_exactly_and_flagged(client, env_id):
    source = load("incompatible.json")
    result = await client.import_env(fixture_text("incompatible.json"))
    newer_id = source["uuid"]
    # made valid for Mockoon's schema (docs/model.md), with a note per repair; flagged
    expected, notes = prepare(source)
    assert result == {"id": newer_id, "repairs": notes, "newer": True} and notes
    assert_strict_equal(await client.export(newer_id), expected)
    assert_strict_equal(
        export_environment(replica_of(await client.export(newer_id, "yjs"))), expected
    )
    status = await client.status()
    assert status["newer"] == [newer_id] and status["environments"] == 2
    flags = {e["id"]: e["newer"] for e in await client.list_envs()}
    assert flags == {env_id: False, newer_id: True}
    entry = next(e for e in await client.list_envs() if e["id"] == newer_id)
    assert entry["lastMigration"] == 9999999999999
    # A whole-file write of it is kept as it is (nothing more to repair).
    edited = {**expected, "name": "still newer"}
    assert await client.put(newer_id, json.dumps(edited)) == {"changed": True, "repairs": []}
    assert_strict_equal(await client.export(newer_id), edited)


async def test_unknown_op_and_bad_requests(daemon, client, env_id):
    before = await client.export(env_id)
    err = await expect_error("unknown-op", client.call("env.frobnicate", id=env_id))
    assert "env.frobnicate" in err.message
    await expect_error("bad-request", client.call("env.get"))
    await expect_error("bad-request", client.call("env.get", id=5))
    await expect_error(
        "bad-request", client.call("env.export", id=env_id, format="yjs", state_vector="not bytes")
    )
    await expect_error("not-found", client.call("unsubscribe", sub=12345))
    await assert_intact(client, {env_id: before})


async def test_malformed_frames_keep_the_connection_and_the_daemon(daemon, client, env_id):
    before = await client.export(env_id)
    raw = await Raw.open(daemon)
    try:
        for payload in (
            b"\xff\xfe garbage",
            b"",
            b"\xa1",  # a map header with nothing after it
            cbor2.dumps([1, 2, 3]),  # CBOR, but not a map
            cbor2.dumps({"id": 1, "op": "status"}) + b"\x00",  # trailing data
            b"\x7f\xff",  # invalid indefinite text
        ):
            await raw.send_payload(payload)
            resp = await raw.recv()
            assert resp["id"] is None and resp["error"]["code"] == "bad-frame", (payload, resp)
        resp = await raw.call({"op": "status"})  # no id
        assert resp["id"] is None and resp["error"]["code"] == "bad-request"
        resp = await raw.call({"id": 7})  # no op
        assert resp["id"] == 7 and resp["error"]["code"] == "bad-request"
        resp = await raw.call({"id": 8, "op": "env.get", "args": [env_id]})
        assert resp["id"] == 8 and resp["error"]["code"] == "bad-request"
        resp = await raw.call(
            {"id": "s", "op": "env.get", "args": {"id": env_id, "pointer": "/name"}}
        )
        assert resp == {"id": "s", "result": before["name"]}
    finally:
        await raw.aclose()
    await assert_intact(client, {env_id: before})


async def test_oversized_frame_is_skipped(daemon, client, env_id):
    before = await client.export(env_id)
    raw = await Raw.open(daemon)
    try:
        size = MAX_FRAME + 1

        async def send_big() -> None:
            await raw.stream.send_all(struct.pack(">I", size))
            chunk = b"\xa1" * (1 << 16)  # would be a bad frame, were it read
            for offset in range(0, size, len(chunk)):
                await raw.stream.send_all(chunk[: size - offset])
            await raw.send({"id": 2, "op": "env.get", "args": {"id": env_id, "pointer": "/port"}})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_big)
            resp = await raw.recv()
            assert resp["id"] is None and resp["error"]["code"] == "frame-too-large"
            assert await raw.recv() == {"id": 2, "result": before["port"]}
    finally:
        await raw.aclose()
    # A client that announces 4 GiB and then hangs up does not hurt either.
    raw = await Raw.open(daemon)
    await raw.stream.send_all(struct.pack(">I", 0xFFFF_FFFF) + b"\x00" * 1000)
    await raw.aclose()
    await assert_intact(client, {env_id: before})


async def test_response_too_large_for_a_frame(client, env_id):
    body = "x" * (MAX_FRAME // 3)
    for n in range(4):  # each request fits in a frame; together they do not
        await client.patch(env_id, [{"op": "add", "path": f"/big{n}", "value": body}])
    await expect_error("frame-too-large", client.get(env_id))
    await expect_error("frame-too-large", client.export(env_id))
    await expect_error("frame-too-large", client.subscribe_env(env_id))
    # Smaller reads of the same environment still work, and so does the connection.
    assert await client.get(env_id, "/big3") == body
    assert (await client.status())["environments"] == 1
    await client.patch(
        env_id, [{"op": "remove", "path": "/big0"}, {"op": "remove", "path": "/big1"}]
    )
    assert len((await client.get(env_id))["big2"]) == len(body)


async def test_large_text_edits(daemon, client, env_id):
    """Per-character text diffs of large bodies (an edit in the middle of 80 KB of text)."""
    path = "/routes/0/responses/0/body"
    big = "x" * 80_000
    edited = big[:40_000] + "middle" + big[40_000:-1] + "y"
    async with await connect(daemon) as watcher:
        async with await watcher.subscribe_env(env_id) as sub:
            sizes = []
            for value in (big, edited, "short again"):
                await client.patch(env_id, [{"op": "replace", "path": path, "value": value}])
                assert await client.get(env_id, path) == value
                event = await next_event(sub)
                assert event["paths"] == [path]
                sizes.append(len(event["update"]))
            assert sizes[0] > 80_000 and sizes[1] < 1000 and sizes[2] < 1000, sizes


async def test_client_that_vanishes_mid_frame_or_mid_request(daemon, client, env_id):
    raw = await Raw.open(daemon)
    payload = cbor2.dumps({"id": 1, "op": "env.patch", "args": {"id": env_id, "patch": []}})
    await raw.stream.send_all(struct.pack(">I", len(payload)) + payload[:5])
    await raw.aclose()
    raw = await Raw.open(daemon)
    patch = [{"op": "replace", "path": "/name", "value": "sent, never read"}]
    await raw.send({"id": 1, "op": "env.patch", "args": {"id": env_id, "patch": patch}})
    await raw.send({"id": 2, "op": "env.subscribe", "args": {"id": env_id}})
    await raw.aclose()
    # The request read before the hang-up was applied; the daemon goes on.
    with trio.fail_after(WAIT):
        while await client.get(env_id, "/name") != "sent, never read":
            await trio.sleep(0.01)
    await client.patch(env_id, [{"op": "replace", "path": "/port", "value": 1}])
    assert (await client.status())["environments"] == 1


async def test_a_write_that_fails_half_way_is_rolled_back(dirs, monkeypatch):
    """A bug in the middle of a whole-environment write (here a real pycrdt panic after a first
    edit) answers `internal`; the daemon goes on, and the half-done edit is neither visible, nor
    sent to subscribers, nor stored (checked after a restart)."""
    from peerdaemon.core import registry as registry_mod

    config = DaemonConfig(*dirs, max_frame=MAX_FRAME)

    def half_then_fail(doc, env, origin=None):
        with doc.transaction():
            doc.get("environment", type=Map)["name"] = "half-applied"
            doc.get("environment", type=Map)["bad"] = "\ud800"  # pycrdt panics on this

    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config)
        async with await AsyncClient.connect(config.socket_path) as client:
            env_id = (await client.import_env(fixture_text(TEST_ENV)))["id"]
            before = await client.export(env_id)
            async with await client.subscribe_env(env_id) as sub:
                with monkeypatch.context() as m:
                    m.setattr(registry_mod, "apply_environment", half_then_fail)
                    patch = [{"op": "replace", "path": "/name", "value": "x"}]
                    await expect_error("internal", client.patch(env_id, patch))
                await assert_intact(client, {env_id: before})
                state = replica_of(await client.export(env_id, "yjs"))
                assert_strict_equal(export_environment(state, env_id), before)
                await client.patch(env_id, [{"op": "replace", "path": "/port", "value": 1}])
                event = await next_event(sub)
                assert event["paths"] == ["/port"]
                replica = replica_of(sub.initial["update"])
                replica.apply_update(event["update"])
                after = await client.get(env_id)
                assert_strict_equal(export_environment(replica, env_id), after)
                assert after == {**before, "port": 1}
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:  # restart on the same data dir
        await nursery.start(serve, config)
        async with await AsyncClient.connect(config.socket_path) as client:
            assert_strict_equal(await client.get(env_id), after)
        nursery.cancel_scope.cancel()


# --- restart ------------------------------------------------------------------------------------
async def restarted_exports(config: DaemonConfig, texts: list[str]) -> tuple[dict, dict]:
    """Import `texts` and edit them, stop the daemon, start it again: exports before and after."""
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config)
        async with await AsyncClient.connect(config.socket_path) as client:
            ids = [(await client.import_env(text))["id"] for text in texts]
            await client.patch(ids[0], [{"op": "replace", "path": "/name", "value": "edited"}])
            before = {i: await client.export(i) for i in ids}
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config)
        async with await AsyncClient.connect(config.socket_path) as client:
            after = {i: await client.export(i) for i in ids}
        nursery.cancel_scope.cancel()
    return before, after


async def test_restart_in_process_keeps_every_environment(dirs):
    texts = [fixture_text(n) for n in (TEST_ENV, "response-rules.json", "incompatible.json")]
    before, after = await restarted_exports(DaemonConfig(*dirs), texts)
    assert before.keys() == after.keys()
    for env_id, env in before.items():
        assert_strict_equal(after[env_id], env)


async def test_export_text_is_identical_across_a_restart(dirs):
    before, after = await restarted_exports(DaemonConfig(*dirs), [fixture_text(TEST_ENV)])
    for env_id, env in before.items():
        assert json.dumps(after[env_id], indent=2) == json.dumps(env, indent=2)


# --- pipelining ---------------------------------------------------------------------------------
async def test_pipelined_writes_are_all_acknowledged_and_share_commits(daemon, client, env_id):
    commits_before = (await client.status())["store"]["commits"]
    n = 200

    async def add(i: int) -> None:
        header = {"key": f"k{i}", "value": str(i)}
        await client.patch(env_id, [{"op": "add", "path": "/headers/-", "value": header}])

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(add, i)
    headers = await client.get(env_id, "/headers")
    assert sorted(h["key"] for h in headers if h["key"].startswith("k")) == sorted(
        f"k{i}" for i in range(n)
    )
    commits = (await client.status())["store"]["commits"] - commits_before
    assert 0 < commits < n / 2, commits
