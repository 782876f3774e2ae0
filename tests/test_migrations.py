"""Model migrations (docs/model.md, "Migrations"; docs/spaces.md, "Model versions"): each
migration on a document built at its version, chains, concurrent migrations merged, reading the
versions an update writes, then two daemon versions side by side: in-process devices joined by
the relay of tests/test_spaces.py, and real daemon processes (one run with the override)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from daemonproc import daemons_fixture, export, lan_pair, pd, shared_space  # noqa: F401 (fixture)
from daemonutil import base_fixture  # noqa: F401 (fixture)
from helpers import until as wait_until
from helpers import until_sync
from modelutil import assert_strict_equal, clone, edit, load, sync_pair
from pycrdt import Doc, Map
from test_hub_link import Dev as HubDev
from test_hub_link import Hub, hub_holds, hub_state, join, same_env, team
from test_spaces import Node, Relay

from peerdaemon.core.errors import OpError
from peerdaemon.core.events import EventLog
from peerdaemon.core.identity import load_or_create_identity
from peerdaemon.core.registry import Registry
from peerdaemon.hub.accounts import Accounts
from peerdaemon.model import MODEL_VERSION, apply_environment, export_environment, prepare
from peerdaemon.model.migrations import (
    ENV_OVERRIDE,
    MIGRATIONS,
    Migration,
    ModelOverrideError,
    daemon_version,
    doc_version,
    migrate,
    model_item_ids,
    update_models,
)
from peerdaemon.operations import Operations
from peerdaemon.spaces import SpacesService
from peerdaemon.store import Store

LOCAL = "127.0.0.1"
ENV_FILE = "test-env.json"


def v1_document(env: dict | None = None) -> tuple[Doc, dict]:
    """A document as a model-1 daemon wrote it: `meta.model` 1 and the legacy `meta.absent`
    (written by the oldest daemons, kept by model 1 until the next write)."""
    prepared, _ = prepare(copy.deepcopy(env or load(ENV_FILE)))
    doc = Doc()
    apply_environment(doc, prepared, model=1)
    doc.get("meta", type=Map)["absent"] = []
    return doc, prepared


# --- the migrations themselves ---------------------------------------------------------------------
def test_the_chain_reaches_the_current_model():
    assert MODEL_VERSION == 2
    assert [m.version for m in MIGRATIONS] == list(range(1, MODEL_VERSION))


def test_1_to_2_drops_meta_absent_and_reads_as_the_same_environment():
    doc, prepared = v1_document()
    assert doc_version(doc) == 1 and "absent" in doc.get("meta", type=Map)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    applied = migrate(doc)
    assert [m.version for m in applied] == [1]
    assert len(updates) == 1  # one transaction: one recorded change
    meta = doc.get("meta", type=Map)
    assert doc_version(doc) == 2 and meta["model"] == 2 and "absent" not in meta
    assert_strict_equal(export_environment(doc), prepared)
    assert migrate(doc) == [] and len(updates) == 1  # at the target: nothing to do


def test_a_document_without_a_usable_version_reads_as_model_1():
    doc, prepared = v1_document()
    for junk in ("x", -3, 1.5, True, None):
        doc.get("meta", type=Map)["model"] = junk
        assert doc_version(doc) == 1
    del doc.get("meta", type=Map)["model"]
    assert doc_version(doc) == 1
    migrate(doc)
    assert doc_version(doc) == 2
    assert_strict_equal(export_environment(doc), prepared)


def _rename_header_key(doc: Doc) -> None:  # a second step, for the chain
    env = doc.get("environment", type=Map)
    env["migratedBy"] = "step-2"


CHAIN = (*MIGRATIONS, Migration(2, "test: a field of step 2", _rename_header_key))


def test_a_document_two_versions_old_migrates_through_both_in_one_change():
    doc, prepared = v1_document()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    applied = migrate(doc, 3, migrations=CHAIN)
    assert [m.version for m in applied] == [1, 2] and len(updates) == 1
    assert doc_version(doc) == 3 and "absent" not in doc.get("meta", type=Map)
    out = export_environment(doc)
    assert out.pop("migratedBy") == "step-2"  # an unknown field: kept, as every export does
    assert_strict_equal(out, prepared)
    # a document at 2 takes only the second step; beyond the chain is refused
    other, _ = v1_document()
    migrate(other)
    assert [m.version for m in migrate(other, 3, migrations=CHAIN)] == [2]
    with pytest.raises(ValueError, match="no migrations to model 4"):
        migrate(other, 4, migrations=CHAIN)
    with pytest.raises(ValueError, match=f"no migrations to model {MODEL_VERSION + 1}"):
        migrate(other, MODEL_VERSION + 1)


def test_two_replicas_migrating_concurrently_merge_to_one_migrated_environment():
    """Devices that were apart each migrate their copy, and edit it: the merge reads as one
    migration, with both edits."""
    a, prepared = v1_document()
    b = clone(a)
    migrate(a)
    edit(a, lambda e: e["routes"][0].__setitem__("endpoint", "from-a"))
    edit(b, lambda e: e["routes"][1].__setitem__("endpoint", "from-b"))  # b, still at 1, edits
    migrate(b)
    sync_pair(a, b)
    out_a, out_b = export_environment(a), export_environment(b)
    assert_strict_equal(out_a, out_b)
    assert [r["endpoint"] for r in out_a["routes"][:2]] == ["from-a", "from-b"]
    for doc in (a, b):
        assert doc_version(doc) == 2 and "absent" not in doc.get("meta", type=Map)
    expected = copy.deepcopy(prepared)
    expected["routes"][0]["endpoint"], expected["routes"][1]["endpoint"] = "from-a", "from-b"
    assert_strict_equal(out_a, expected)


def test_a_model_2_writer_keeps_an_older_documents_version():
    """Only a migration changes `meta.model`: a write by a newer daemon does not stamp an
    unmigrated document as migrated, and a new document gets the writer's model."""
    doc, _ = v1_document()
    edit(doc, lambda e: e.__setitem__("name", "renamed"))
    assert doc_version(doc) == 1
    fresh = Doc()
    apply_environment(fresh, prepare(load(ENV_FILE))[0])
    assert doc_version(fresh) == MODEL_VERSION
    lowered = Doc()
    apply_environment(lowered, prepare(load(ENV_FILE))[0], model=1)
    assert doc_version(lowered) == 1
    # a document a client built without `meta.model` is model 1, and a write says so
    del doc.get("meta", type=Map)["model"]
    edit(doc, lambda e: e.__setitem__("name", "again"))
    assert doc.get("meta", type=Map)["model"] == 1


# --- versions read from update bytes ---------------------------------------------------------------
def test_update_models_reads_the_versions_an_update_writes():
    doc, _ = v1_document()
    known = model_item_ids(doc.get_update())
    assert len(known) == 1
    state = doc.get_state()
    migrated = clone(doc)
    migrate(migrated)
    migration = migrated.get_update(state)  # only the migration: replaces the known entry
    versions, ids = update_models(migration, known)
    assert versions == [2] and ids and not ids & known
    assert update_models(migration, set())[0] == []  # without the document's entries: unseen
    assert update_models(migrated.get_update(), set())[0] == [2]  # a whole state (1: deleted)
    edited = clone(doc)
    edit(edited, lambda e: e.__setitem__("port", 3999))
    assert update_models(edited.get_update(state), known)[0] == []
    # the document's entries are read only for an update that replaces a number
    calls: list[int] = []

    def lazy() -> set:
        calls.append(1)
        return known

    renamed = clone(doc)
    edit(renamed, lambda e: e.__setitem__("name", "text only"))
    assert update_models(renamed.get_update(state), lazy) == ([], set()) and calls == []
    assert update_models(migration, lazy)[0] == [2] and calls == [1]
    with pytest.raises(ValueError):
        update_models(b"\x05\x01", known)


def test_daemon_version_override():
    assert daemon_version({}) == MODEL_VERSION
    assert daemon_version({ENV_OVERRIDE: "1"}) == 1
    assert daemon_version({ENV_OVERRIDE: " "}) == MODEL_VERSION
    for bad, message in (
        ("0", "models 1 to"),
        (str(MODEL_VERSION + 1), "models 1 to"),
        ("x", "not a number"),
    ):
        with pytest.raises(ModelOverrideError, match=message):
            daemon_version({ENV_OVERRIDE: bad})


async def test_registry_migrate_is_one_stored_change_that_followers_get(tmp_path, nursery):
    store = Store.open(tmp_path / "d")
    await nursery.start(store.run)
    events = EventLog()
    old = Registry(store, events, model_version=1)
    prepared, _ = prepare(load(ENV_FILE))
    await old.create(prepared["uuid"], prepared, "local").wait()
    env_id = prepared["uuid"]
    assert doc_version(old.get(env_id).doc) == 1
    assert old.migrate(env_id) is None  # already at this registry's model
    new = Registry(store, events)
    assert new.model_version == MODEL_VERSION
    new.load()
    seen: list[tuple[str, str]] = []
    new.add_listener(lambda e, update, origin: seen.append((e, origin)))
    before: list[int] = []  # what a history checkpoint would see: the document unmigrated
    new.before_migrate.append(lambda e: before.append(doc_version(new.get(e).doc)))
    ticket = new.migrate(env_id)
    assert before == [1]
    assert ticket is not None
    await ticket.wait()
    assert seen == [(env_id, "migration")]
    migrated = events.since(0)[-1]
    assert migrated["type"] == "environment-migrated"
    assert migrated["data"]["model"] == MODEL_VERSION and migrated["data"]["id"] == env_id
    assert new.migrate(env_id) is None
    again = Registry(store, EventLog())
    again.load()
    assert doc_version(again.get(env_id).doc) == MODEL_VERSION
    assert_strict_equal(again.export(env_id), prepared)
    nursery.cancel_scope.cancel()


# --- two daemon versions side by side (in-process) -------------------------------------------------
class VersionedNode(Node):
    """A device of tests/test_spaces.py run at a given model (None: the current one)."""

    def __init__(self, path: Path, name: str, model: int | None = None) -> None:
        super().__init__(path, name)
        self.model = model

    async def start(self, nursery: trio.Nursery) -> VersionedNode:
        self.store = Store.open(self.path)
        self.events = EventLog()
        self.registry = Registry(self.store, self.events, model_version=self.model)
        self.registry.load()
        self.identity = load_or_create_identity(self.store, self.name)
        self.spaces = SpacesService(self.registry, self.store, self.identity, self.events)
        self.spaces.load()
        self.service = Operations(self.registry, data_dir=self.path, socket_path=self.path / "s")
        self.spaces.register(self.service)
        self.scope = await nursery.start(self._run_store)
        return self


@pytest.fixture
async def versioned(nursery, tmp_path):
    made: list[VersionedNode] = []

    async def make(name: str, model: int | None = None) -> VersionedNode:
        node = await VersionedNode(tmp_path / name, name, model).start(nursery)
        made.append(node)
        return node

    yield make
    for node in made:
        if not node.stopped.is_set():
            await node.stop()


async def restart(node: VersionedNode, make, model: int | None) -> VersionedNode:
    await node.stop()
    return await make(node.name, model)


def incompatible_events(node: Node) -> list[dict]:
    return [e["data"] for e in node.events.since(0) if e["type"] == "incompatible-version"]


async def model1_pair(versioned) -> tuple[VersionedNode, VersionedNode, Relay, str, str]:
    """A and B at model 1, relayed, sharing one environment that B has received."""
    a, b = await versioned("a", 1), await versioned("b", 1)
    space_id = (await a.op("space.create", name="Team"))["id"]
    code = (await a.op("space.invite", space=space_id))["code"]
    await b.op("space.join", code=code)
    relay = Relay(a, b)
    relay.connect()
    env_id = a.import_env()
    await a.op("env.share", id=env_id, space=space_id)
    relay.flush()
    return a, b, relay, space_id, env_id


async def test_space_migrated_while_an_older_device_is_offline(versioned):
    """A and B at model 1 share an environment; B goes offline; A is upgraded and migrates
    the space; B edits offline and reconnects still at 1: it keeps its copy, syncs nothing of
    the space and says so. Upgraded, B migrates its copy and both converge, B's edit kept."""
    a, b, relay, space_id, env_id = await model1_pair(versioned)
    assert b.export(env_id) == a.export(env_id)
    assert doc_version(b.registry.get(env_id).doc) == 1
    assert a.space(space_id)["model"] == 1 and "state" not in b.space(space_id)

    relay.pause()
    a = await restart(a, versioned, None)  # upgraded: migrates at start
    assert doc_version(a.registry.get(env_id).doc) == MODEL_VERSION
    assert a.space(space_id)["model"] == MODEL_VERSION
    assert [e["type"] for e in a.events.since(0)].count("environment-migrated") == 1
    b.edit(env_id, lambda e: e["routes"][0].__setitem__("endpoint", "b-offline"))
    a.edit(env_id, lambda e: e["routes"][1].__setitem__("endpoint", "a-after-migration"))
    b_before = copy.deepcopy(b.export(env_id))
    b_state = b.registry.get(env_id).doc.get_state()

    relay = Relay(a, b)
    relay.connect()
    # B learnt from the space document that the space moved on, before any environment
    listed = b.space(space_id)
    assert (listed["state"], listed["needs"], listed["action"]) == (
        "incompatible-version",
        MODEL_VERSION,
        "upgrade peerdaemon",
    )
    assert listed["environments"] == [
        {
            "id": env_id,
            "present": True,
            "name": b_before["name"],
            "state": "incompatible-version",
            "needs": MODEL_VERSION,
        }
    ]
    assert_strict_equal(b.export(env_id), b_before)  # its copy: untouched
    assert b.registry.get(env_id).doc.get_state() == b_state  # not one item more
    assert doc_version(b.registry.get(env_id).doc) == 1
    assert a.export(env_id)["routes"][1]["endpoint"] == "a-after-migration"
    assert b_before["routes"][1]["endpoint"] != "a-after-migration"  # nothing of A's merged
    assert b.spaces.docs_of([space_id]) == [f"space:{space_id}"]
    assert not b.spaces.allowed(env_id, [space_id])
    assert b.spaces.state_vector(env_id) is None
    # shown in status, env list and an event (once)
    status = await b.op("status")
    assert status["model_version"] == 1
    assert status["incompatible"] == [
        {
            "space": space_id,
            "name": "Team",
            "state": "incompatible-version",
            "needs": MODEL_VERSION,
            "model": 1,
            "environments": [env_id],
            "action": "upgrade peerdaemon",
        }
    ]
    [row] = await b.op("env.list")
    assert row["flags"] == ["incompatible-version"]
    assert row["incompatible"]["needs"] == MODEL_VERSION
    assert [(e["space"], e.get("id"), e["needs"]) for e in incompatible_events(b)] == [
        (space_id, None, MODEL_VERSION),
        (space_id, env_id, MODEL_VERSION),
    ]
    assert "incompatible" not in await a.op("status")
    members = {m["device"]: m["model"] for m in a.space(space_id)["members"]}
    assert members == {a.device: MODEL_VERSION, b.device: 1}
    other = b.import_env(new_id=True)  # a new share into the space would never sync: refused
    with pytest.raises(OpError, match="needs model 2 .* upgrade peerdaemon") as refused:
        await b.op("env.share", id=other, space=space_id)
    assert refused.value.code == "incompatible-version"
    assert other not in b.spaces.bindings
    # B's local edits after that stay local
    b.edit(env_id, lambda e: e.__setitem__("name", "b-still-old"))
    relay.flush()
    assert a.export(env_id)["name"] != "b-still-old"

    relay.pause()
    b = await restart(b, versioned, None)  # upgraded
    assert "state" not in b.space(space_id)
    assert doc_version(b.registry.get(env_id).doc) == MODEL_VERSION
    relay = Relay(a, b)
    relay.connect()
    out = a.export(env_id)
    assert_strict_equal(b.export(env_id), out)
    assert [r["endpoint"] for r in out["routes"][:2]] == ["b-offline", "a-after-migration"]
    assert out["name"] == "b-still-old"
    assert "absent" not in a.registry.get(env_id).doc.get("meta", type=Map)
    assert "incompatible" not in await b.op("status")
    assert all("flags" not in row for row in await b.op("env.list"))


async def test_an_older_device_refuses_a_migrated_update_whatever_the_order(versioned):
    """The space document may not have told B yet (here B never got A's mark): the migrated
    environment itself is refused, read from the update's bytes, and B reports it."""
    a, b, relay, space_id, env_id = await model1_pair(versioned)
    relay.pause()
    state = b.registry.get(env_id).doc.get_state()
    migrated = clone(a.registry.get(env_id).doc)
    migrate(migrated)  # what a newer device sends, without its space document
    before = copy.deepcopy(b.export(env_id))
    b.spaces.apply(env_id, migrated.get_update(state), "peer:someone")
    assert_strict_equal(b.export(env_id), before)
    assert doc_version(b.registry.get(env_id).doc) == 1
    assert not b.spaces.allowed(env_id, [space_id])
    [event] = incompatible_events(b)
    assert (event["id"], event["needs"], event["action"]) == (env_id, 2, "upgrade peerdaemon")
    assert b.space(space_id)["environments"][0]["state"] == "incompatible-version"
    assert "state" not in b.space(space_id)  # the space document itself says nothing yet
    # an ordinary edit still merges on a device at the same model
    edited = clone(a.registry.get(env_id).doc)
    c_state = edited.get_state()
    edit(edited, lambda e: e.__setitem__("name", "plain edit"))
    a.spaces.apply(env_id, edited.get_update(c_state), "peer:someone")
    assert a.export(env_id)["name"] == "plain edit"


async def test_an_ask_space_neither_holds_nor_merges_a_migrated_state(versioned):
    """Under the `ask` policy a link's first exchange goes to `apply_initial`, not `apply`: the
    model gate holds there too, so a newer model's state is not kept apart for a resolve that
    would merge it into an older device."""
    a, b, relay, space_id, env_id = await model1_pair(versioned)
    relay.pause()
    await b.op("space.policy", space=space_id, policy="ask")
    await b.op("env.patch", id=env_id, patch=[{"op": "replace", "path": "/name", "value": "b"}])
    migrated = clone(a.registry.get(env_id).doc)
    migrate(migrated)
    before = copy.deepcopy(b.export(env_id))
    assert b.spaces.apply_initial(env_id, migrated.get_update(), "peer:someone") == "refused"
    assert env_id not in b.spaces.holds and b.spaces.offline.conflicts() == []
    assert_strict_equal(b.export(env_id), before)
    assert b.space(space_id)["environments"][0]["state"] == "incompatible-version"


async def test_a_newer_device_joining_migrates_what_it_receives_once(versioned):
    """B (current) joins a space of model-1 documents. A, the older member, stops syncing as
    soon as B's mark arrives; B gets the environment as a hub would keep it (at 1), migrates it
    on arrival, once, and the migration goes out to B's links as B's own change."""
    a, b = await versioned("a", 1), await versioned("b")
    space_id = (await a.op("space.create", name="Team"))["id"]
    env_id = a.import_env()
    await a.op("env.share", id=env_id, space=space_id)
    code = (await a.op("space.invite", space=space_id))["code"]
    await b.op("space.join", code=code)  # B marks the space at its model on joining
    relay = Relay(a, b)
    relay.connect()
    assert a.space(space_id)["state"] == "incompatible-version"  # A is the older one now
    assert env_id not in b.registry.envs  # A sent nothing of the space's environments
    sent: list[tuple[str, str]] = []
    b.spaces.add_listener(lambda doc, update, origin: sent.append((doc, origin)))
    kept_by_hub = a.registry.state_update(env_id)
    b.spaces.apply(env_id, kept_by_hub, "peer:hub")
    assert doc_version(b.registry.get(env_id).doc) == MODEL_VERSION
    assert_strict_equal(b.export(env_id), a.export(env_id))
    assert sent == [(env_id, "peer:hub"), (env_id, "migration")]
    b.spaces.apply(env_id, kept_by_hub, "peer:hub")  # again: nothing more to migrate
    assert [e["type"] for e in b.events.since(0)].count("environment-migrated") == 1
    relay.flush()
    assert doc_version(a.registry.get(env_id).doc) == 1  # A did not take the migration


async def test_sharing_an_environment_merged_in_at_an_older_model_migrates_it(versioned):
    """A socket client may merge a model-1 document in (`env.merge`): sharing it migrates it
    first, so the space gets it at this device's model."""
    a = await versioned("a")
    doc, prepared = v1_document()
    env_id = prepared["uuid"]
    await a.op("env.merge", id=env_id, update=doc.get_update())
    assert doc_version(a.registry.get(env_id).doc) == 1
    space_id = (await a.op("space.create", name="Team"))["id"]
    await a.op("env.share", id=env_id, space=space_id)
    migrated = a.registry.get(env_id).doc
    assert doc_version(migrated) == MODEL_VERSION and "absent" not in migrated.get("meta", type=Map)
    assert_strict_equal(a.export(env_id), prepared)


# --- real daemon processes -------------------------------------------------------------------------
def status_of(daemon) -> dict:
    return json.loads(pd(daemon.socket_path, "status", "--json"))


def test_real_daemons_older_one_offline_then_upgraded(daemons, fixture_dir):
    """A real daemon run with PEERDAEMON_MODEL_VERSION=1 beside a current one."""
    a, b = lan_pair(daemons)
    current_a, current_b = list(a.argv), list(b.argv)
    a.argv = ["env", f"{ENV_OVERRIDE}=1", *current_a]  # exec'd by env(1): the same pid
    b.argv = ["env", f"{ENV_OVERRIDE}=1", *current_b]
    a.start()
    b.start()
    assert status_of(a)["model_version"] == 1
    space, [env_id] = shared_space(a, b, "Procs", fixture_dir / ENV_FILE)

    assert b.stop() == 0  # B, still at model 1, goes offline
    assert a.stop() == 0
    a.argv = current_a  # A upgraded
    a.start()
    assert status_of(a)["model_version"] == MODEL_VERSION
    patch = json.dumps([{"op": "replace", "path": "/routes/1/endpoint", "value": "a-new"}])
    pd(a.socket_path, "env", "patch", env_id, "-", input=patch)
    b.start()  # still at model 1
    patch = json.dumps([{"op": "replace", "path": "/routes/0/endpoint", "value": "b-offline"}])
    pd(b.socket_path, "env", "patch", env_id, "-", input=patch)

    def b_told() -> bool:
        return "incompatible" in status_of(b)

    until_sync(b_told, what="B learns that the space moved on")
    listed = json.loads(pd(b.socket_path, "space", "list", "--json"))
    assert (listed[0]["state"], listed[0]["needs"]) == ("incompatible-version", MODEL_VERSION)
    text = pd(b.socket_path, "space", "list")
    assert "incompatible-version" in text and "upgrade peerdaemon" in text
    envs = json.loads(pd(b.socket_path, "env", "list", "--json"))
    assert envs[0]["incompatible"]["needs"] == MODEL_VERSION
    assert "incompatible-version" in pd(b.socket_path, "env", "list")
    text = pd(b.socket_path, "status")
    assert "incompatible-version" in text and "upgrade peerdaemon" in text
    b_copy = export(b, env_id)
    assert b_copy["routes"][0]["endpoint"] == "b-offline"
    assert b_copy["routes"][1]["endpoint"] != "a-new"  # nothing of the space merged
    assert "a-new" not in json.dumps(export(b, env_id))

    assert b.stop() == 0
    b.argv = current_b  # B upgraded
    b.start()
    merged = until_sync(
        lambda: (e := export(b, env_id)) and e == export(a, env_id) and e,
        what="converged after the upgrade",
    )
    assert [r["endpoint"] for r in merged["routes"][:2]] == ["b-offline", "a-new"]
    assert "incompatible" not in status_of(b)
    assert a.stop() == 0 and b.stop() == 0


# --- through a hub -------------------------------------------------------------------------------
async def test_through_a_hub_the_older_device_keeps_its_copy_until_upgraded(
    base, nursery, monkeypatch
):
    """The same story with the hub as the only link: A, upgraded while B is away, migrates the
    space on the hub; B, back at model 1, merges nothing of it; upgraded, B converges."""
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    token_a, token_b = admin.add_user("alice"), admin.add_token("alice")

    async def start(dev: HubDev, model: int | None) -> HubDev:
        if model is None:
            monkeypatch.delenv(ENV_OVERRIDE, raising=False)
        else:
            monkeypatch.setenv(ENV_OVERRIDE, str(model))
        await dev.start(nursery)
        monkeypatch.delenv(ENV_OVERRIDE, raising=False)
        return dev

    a = await start(HubDev(base, "a"), 1)
    b = await start(HubDev(base, "b"), 1)
    space, [env] = await team(a, hub, token_a)
    await join(b, a, space, token_b)
    await hub_state(b, "connected")
    await wait_until(lambda: same_env(a, b, env))
    assert (await b.op("status"))["model_version"] == 1

    await b.stop()
    await a.stop()
    await start(a, None)  # upgraded: migrates at start, and the hub takes it
    assert doc_version(a.daemon.registry.get(env).doc) == MODEL_VERSION
    await a.set_name(env, "a, migrated")
    await hub_holds(hub, space, a, env)

    await start(b, 1)  # back, still at model 1
    await b.op("env.patch", id=env, patch=[{"op": "replace", "path": "/port", "value": 4321}])

    async def told() -> Any:
        return (await b.op("status")).get("incompatible")

    [entry] = await wait_until(told)
    assert (entry["space"], entry["needs"], entry["environments"]) == (space, MODEL_VERSION, [env])
    await hub_state(b, "connected")  # the link is up: it is the space that is held back
    assert doc_version(b.daemon.registry.get(env).doc) == 1
    assert (await b.get(env))["name"] != "a, migrated"
    assert (await b.get(env))["port"] == 4321

    await b.stop()
    await start(b, None)  # upgraded
    await wait_until(lambda: same_env(a, b, env))
    out = await a.get(env)
    assert (out["name"], out["port"]) == ("a, migrated", 4321)
    assert "incompatible" not in await b.op("status")


def test_a_model_override_this_code_does_not_have_stops_the_daemon_in_one_line(daemons):
    d = daemons.new()
    d.argv = ["env", f"{ENV_OVERRIDE}={MODEL_VERSION + 1}", *d.argv, "--no-mdns"]
    with pytest.raises(RuntimeError, match="exited with 1"):
        d.start()
    lines = d.output().strip().splitlines()
    assert lines == [
        f"peerdaemon: {ENV_OVERRIDE}={MODEL_VERSION + 1}: this peerdaemon has models 1 to {MODEL_VERSION}"
    ]
