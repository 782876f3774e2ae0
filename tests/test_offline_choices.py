"""Offline choices (docs/spaces.md, "Offline choices"; docs/peer-protocol.md section 5.2).

The sans-I/O core with fake hosts (an ask host deciding push / pull / hold, against a plain
host like the hub's and against another ask host), the decision on real Yjs states, then real
daemon processes on loopback partitioned (one stopped while the other edits) and rejoined,
under each policy, with each resolve choice and the loser restored from history.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from daemonproc import daemons_fixture, export, lan_pair, pd, shared_space  # noqa: F401 (fixture)
from daemonutil import base_fixture  # noqa: F401 (fixture)
from helpers import until as wait_until
from helpers import until_sync
from peerutil import FakeHost, MemoryConnection, drain_events, exchange, make_identity, make_space
from pycrdt import Array, Doc, Map
from test_hub_link import Dev as HubDev
from test_hub_link import Hub, hub_holds, hub_state, join, same_env, team

from peerdaemon.api.client import DaemonError
from peerdaemon.hub.accounts import Accounts
from peerdaemon.peer import PeerProtocolError, messages
from peerdaemon.peer.messages import SYNC_STEP1, SYNC_STEP2, SYNC_UPDATE
from peerdaemon.peer.session import EMPTY_STATE_VECTOR, SyncSession
from peerdaemon.spaces.offline import HOLD, PULL, PUSH, contains, decide

S1 = make_space("s1")
ALICE, BOB = make_identity("alice"), make_identity("bob")
LOCAL = "127.0.0.1"
ENV_FILE = "test-env.json"


# --- the decision on Yjs states --------------------------------------------------------------
def test_decide_compares_items_and_deletions():
    a = Doc()
    a.get("m", type=Map)["x"] = 1
    arr = a.get("a", type=Array)
    arr.extend([1, 2, 3])
    b = Doc()
    b.apply_update(a.get_update())
    assert decide(a.get_update(), b.get_update()) == PUSH  # equal: nothing to take
    del b.get("a", type=Array)[0]  # a deletion: no state vector moves
    assert a.get_state() == b.get_state()
    assert decide(a.get_update(), b.get_update()) == PULL
    assert decide(b.get_update(), a.get_update()) == PUSH
    a.get("m", type=Map)["y"] = 2
    assert decide(a.get_update(), b.get_update()) == HOLD
    assert decide(b.get_update(), a.get_update()) == HOLD
    b.apply_update(a.get_update())
    assert contains(b.get_update(), a.get_update())


# --- the core --------------------------------------------------------------------------------
class AskHost(FakeHost):
    """A host whose docs are in an ask space: decides on the peer's whole state, holds it
    apart (its diff gives nothing, its changes stay here) as SpacesService does."""

    def __init__(self, spaces: Any = ()) -> None:
        super().__init__(spaces)
        self.held: dict[str, bytes] = {}
        self.held_from: dict[str, str] = {}  # doc -> the origin whose state is held
        self.decisions: list[tuple[str, str]] = []
        self.initial: list[str] = []

    def ask(self, doc_id: str) -> bool:
        return doc_id in self.shared

    def apply_initial(self, doc_id: str, update: bytes, origin: str) -> str:
        self.initial.append(doc_id)
        doc = self.docs.get(doc_id)
        choice = decide(doc.get_update() if doc is not None else b"\x00\x00", update)
        if choice == PULL:
            self.apply(doc_id, update, origin)
        elif choice == HOLD:
            self.held[doc_id] = update
            self.held_from[doc_id] = origin
        self.decisions.append((doc_id, choice))
        return choice

    def answer_held(self, doc_id: str, origin: str) -> bytes | None:
        if doc_id not in self.held or self.held_from.get(doc_id) != origin:
            return None
        return self.docs[doc_id].get_update()

    def apply(self, doc_id: str, update: bytes, origin: str) -> None:
        if doc_id in self.held:
            self.held[doc_id] = update
            return
        super().apply(doc_id, update, origin)

    def diff(self, doc_id: str, state_vector: bytes) -> bytes:
        return b"\x00\x00" if doc_id in self.held else super().diff(doc_id, state_vector)


def pair(host_a: FakeHost, host_b: FakeHost) -> tuple[Any, Any]:
    a = MemoryConnection(ALICE, host_a, dialer=True, now=0.0)
    b = MemoryConnection(BOB, host_b, dialer=False, now=0.0)
    for host, conn in ((host_a, a), (host_b, b)):
        host.add_listener(lambda doc, u, origin, conn=conn: conn.local_update(doc, u, origin))
    return a, b


def same_base(host: FakeHost, other: FakeHost) -> None:
    """The same document on both, as after an earlier sync."""
    host.add_doc("env", ["s1"], {"base": 0})
    other.add_doc("env", ["s1"])
    other.apply("env", host.docs["env"].get_update(), "setup")


@pytest.mark.parametrize(
    "changed, expected",
    [("ask", PUSH), ("plain", PULL), ("both", HOLD)],
)
def test_an_ask_host_against_a_plain_host_pushes_pulls_or_holds(changed, expected):
    """The plain host stands for the hub: it merges whatever reaches it. The ask host's step 2
    waits for the decision, so with both changed nothing of its state reaches the plain host."""
    ask, plain = AskHost([S1]), FakeHost([S1])
    same_base(plain, ask)
    if changed in ("ask", "both"):
        ask.edit("env", {"ask": 1})
    if changed in ("plain", "both"):
        plain.edit("env", {"plain": 2})
    a, b = pair(ask, plain)
    exchange(a, b)
    assert ask.decisions == [("env", expected)]
    if expected == HOLD:
        assert plain.values("env") == {"base": 0, "plain": 2}  # nothing of ours went out
        assert ask.values("env") == {"base": 0, "ask": 1}  # nothing of theirs came in
        ask.edit("env", {"later": 3})  # the shell's host keeps these local (SpacesService)
        plain.edit("env", {"live": 4})
        exchange(a, b)
        assert ask.decisions == [("env", HOLD)]  # a live update is never a decision
        assert "live" in Doc_values(ask.held["env"])
    else:
        assert ask.values("env") == plain.values("env")
    assert any(e.__class__.__name__ == "Synced" for e in drain_events(b))


def Doc_values(update: bytes) -> dict[str, Any]:  # noqa: N802 (reads like a type)
    doc = Doc()
    doc.apply_update(update)
    return dict(doc.get("m", type=Map).to_py() or {})


def test_local_edits_wait_for_the_decision_when_the_peer_asked_with_its_state_vector():
    """Between our step 1 and the peer's step 2 a local edit is not sent: with both changed it
    would otherwise reach the plain host (and a hub would relay it to everybody)."""
    ask, plain = AskHost([S1]), FakeHost([S1])
    same_base(plain, ask)
    ask.edit("env", {"ask": 1})
    plain.edit("env", {"plain": 2})
    a, b = pair(ask, plain)
    # handshake only: deliver until both are open, without the plain side's step 2 yet
    for _ in range(10):
        for data in a.data_to_send():
            b.receive(data, 0.0)
        if a.session is not None and b.session is not None:
            break
        for data in b.data_to_send():
            a.receive(data, 0.0)
    ask.edit("env", {"during": 5})
    exchange(a, b)
    assert ask.decisions == [("env", HOLD)]
    assert "during" not in plain.values("env") and "ask" not in plain.values("env")


def test_the_session_holds_its_answer_back_and_checks_what_it_collects():
    """Sans-I/O: the empty state vector goes out, the peer's non-empty step 1 and our live
    edits wait, and bytes that are no update among what is collected are the peer's fault."""
    host = AskHost([S1])
    host.add_doc("env", ["s1"], {"mine": 1})
    sent: list[dict[str, Any]] = []
    session = SyncSession(host, "peer", frozenset({"s1"}), sent.append)
    session.open()
    assert [messages.decode_sync(m["m"]) for m in sent] == [(SYNC_STEP1, EMPTY_STATE_VECTOR)]
    sent.clear()
    theirs = Doc()
    theirs.get("m", type=Map)["theirs"] = 2

    def sync(kind: int, payload: bytes) -> dict[str, Any]:
        return {"t": "sync", "doc": "env", "m": messages.encode_sync(kind, payload)}

    assert session.receive(sync(SYNC_STEP1, theirs.get_state())) is None
    host.edit("env", {"during": 3})
    session.local_update("env", host.docs["env"].get_update(), "local")
    assert sent == []  # neither our answer nor the live edit before the decision
    assert session.receive(sync(SYNC_UPDATE, b"\x01garbage")) is None
    with pytest.raises(PeerProtocolError):
        session.receive(sync(SYNC_STEP2, theirs.get_update()))


@pytest.mark.parametrize("changed", ["a", "b", "both"])
def test_two_ask_hosts_decide_alike_without_waiting_for_each_other(changed):
    """Both ask for the other's whole state (the empty state vector), which is answered at
    once: no deadlock, and the two decisions mirror each other."""
    ha, hb = AskHost([S1]), AskHost([S1])
    same_base(ha, hb)
    if changed in ("a", "both"):
        ha.edit("env", {"a": 1})
    if changed in ("b", "both"):
        hb.edit("env", {"b": 2})
    a, b = pair(ha, hb)
    exchange(a, b)
    mirror = {PUSH: PULL, PULL: PUSH, HOLD: HOLD}
    [(_, da)], [(_, db)] = ha.decisions, hb.decisions
    assert db == mirror[da]
    if changed == "both":
        assert (da, db) == (HOLD, HOLD)
        assert ha.values("env") == {"base": 0, "a": 1}
        assert hb.values("env") == {"base": 0, "b": 2}
    else:
        assert ha.values("env") == hb.values("env")
    assert any(e.__class__.__name__ == "Synced" for e in drain_events(a))
    assert any(e.__class__.__name__ == "Synced" for e in drain_events(b))


@pytest.mark.parametrize("held_from", ["alice", "carol"])
def test_the_peer_whose_state_is_held_gets_the_whole_state_and_holds_too(held_from):
    """B holds A's state already: it decided on another link to A (both dialed) that was
    dropped as a duplicate before B's answer reached A. A asks again on the link kept: B's
    answer is its whole state, not the empty update (which A would take for "nothing to
    take"), so A holds too. Any other peer still gets the empty update: nothing of B's goes
    out while held."""
    ha, hb = AskHost([S1]), AskHost([S1])
    same_base(ha, hb)
    ha.edit("env", {"a": 1})
    hb.edit("env", {"b": 2})
    hb.held["env"] = ha.docs["env"].get_update()
    hb.held_from["env"] = (
        f"peer:{ {'alice': ALICE, 'carol': make_identity('carol')}[held_from].device_id }"
    )
    a, b = pair(ha, hb)
    exchange(a, b)
    if held_from == "alice":
        assert ha.decisions == [("env", HOLD)]
        assert Doc_values(ha.held["env"]) == {"base": 0, "b": 2}
    else:
        assert ha.decisions == [] and "env" not in ha.held
    assert ha.values("env") == {"base": 0, "a": 1}  # neither side merged
    assert hb.values("env") == {"base": 0, "b": 2}


def test_a_plain_host_is_unaffected():
    """Without `ask` (merge spaces, the hub) the exchange is the ordinary one."""
    ha, hb = FakeHost([S1]), FakeHost([S1])
    same_base(ha, hb)
    ha.edit("env", {"a": 1})
    hb.edit("env", {"b": 2})
    a, b = pair(ha, hb)
    exchange(a, b)
    assert ha.values("env") == hb.values("env") == {"base": 0, "a": 1, "b": 2}


# --- real daemons ------------------------------------------------------------------------------
def j(daemon: Any, *argv: str) -> Any:
    return json.loads(pd(daemon.socket_path, *argv, "--json"))


def patch(daemon: Any, env_id: str, path: str, value: Any) -> None:
    ops = json.dumps([{"op": "replace", "path": path, "value": value}])
    pd(daemon.socket_path, "env", "patch", env_id, "-", input=ops)


def conflicts(daemon: Any) -> list[str]:
    return [c["id"] for c in j(daemon, "status").get("conflicts", ())]


def two_daemons(daemons: Any, fixture_dir: Any, policy: str) -> tuple[Any, Any, str, str, str]:
    """A and B (each dials the other) in one space with the policy, two environments shared and synced."""
    a, b = lan_pair(daemons, both_dial=True)
    a.start()
    b.start()
    space, (env, other) = shared_space(a, b, "Offline", fixture_dir / ENV_FILE, count=2)
    assert pd(a.socket_path, "space", "policy", space, policy).strip() == policy
    until_sync(lambda: j(b, "space", "list")[0]["policy"] == policy, what="policy on B")
    return a, b, space, env, other


def endpoints(daemon: Any, env_id: str) -> list[str]:
    return [r["endpoint"] for r in export(daemon, env_id)["routes"][:2]]


def converged(a: Any, b: Any, env_id: str) -> dict:
    return until_sync(
        lambda: (e := export(a, env_id)) and e == export(b, env_id) and e, what="converged"
    )


def only_a_changed(a: Any, b: Any, env: str) -> None:
    assert b.stop() == 0
    patch(a, env, "/routes/0/endpoint", "a-offline")
    b.start()


def only_b_changed(a: Any, b: Any, env: str) -> None:
    assert a.stop() == 0
    patch(b, env, "/routes/1/endpoint", "b-offline")
    a.start()


def both_changed(a: Any, b: Any, env: str) -> None:
    assert b.stop() == 0
    patch(a, env, "/routes/0/endpoint", "a-offline")
    assert a.stop() == 0
    b.start()
    patch(b, env, "/routes/1/endpoint", "b-offline")
    a.start()


def test_merge_policy_merges_all_three_scenarios(daemons, fixture_dir):
    a, b, space, env, _ = two_daemons(daemons, fixture_dir, "merge")
    only_a_changed(a, b, env)
    assert converged(a, b, env)["routes"][0]["endpoint"] == "a-offline"
    only_b_changed(a, b, env)
    assert converged(a, b, env)["routes"][1]["endpoint"] == "b-offline"
    patch(a, env, "/routes/0/endpoint", "x")
    patch(b, env, "/routes/1/endpoint", "y")
    converged(a, b, env)
    both_changed(a, b, env)
    merged = converged(a, b, env)
    assert [r["endpoint"] for r in merged["routes"][:2]] == ["a-offline", "b-offline"]
    assert conflicts(a) == conflicts(b) == []


def test_ask_policy_pushes_and_pulls_one_sided_changes(daemons, fixture_dir):
    a, b, space, env, _ = two_daemons(daemons, fixture_dir, "ask")
    only_a_changed(a, b, env)  # A pushes (B pulls)
    assert converged(a, b, env)["routes"][0]["endpoint"] == "a-offline"
    only_b_changed(a, b, env)  # A pulls
    assert converged(a, b, env)["routes"][1]["endpoint"] == "b-offline"
    assert conflicts(a) == conflicts(b) == []
    assert "conflict" not in pd(a.socket_path, "env", "list")
    # live editing on both sides at once is never a conflict: only a link's opening decides
    for n in range(5):
        patch(a, env, "/routes/0/endpoint", f"a-live-{n}")
        patch(b, env, "/routes/1/endpoint", f"b-live-{n}")
    assert [r["endpoint"] for r in converged(a, b, env)["routes"][:2]] == ["a-live-4", "b-live-4"]
    assert conflicts(a) == conflicts(b) == []
    assert j(b, "space", "policy", space) == {"id": space, "name": "Offline", "policy": "ask"}
    assert "offline policy ask" in pd(b.socket_path, "space", "list")
    with a.client() as c:  # bad input: a clear error, the daemon goes on
        with pytest.raises(DaemonError) as bad:
            c.call("space.policy", space=space, policy="sometimes")
        assert bad.value.code == "bad-request"
        with pytest.raises(DaemonError) as bad:
            c.call("env.resolve", id=env, choice="keep-local")
        assert bad.value.code == "bad-request" and "not held" in str(bad.value)
        with pytest.raises(DaemonError) as bad:
            c.call("env.resolve", id=env, choice="both")
        assert bad.value.code == "bad-request"


def held_pair(daemons: Any, fixture_dir: Any) -> tuple[Any, Any, str, str, str, dict]:
    """Both changed under ask: both hold the environment, each keeping its own version."""
    a, b, space, env, other = two_daemons(daemons, fixture_dir, "ask")
    before = export(a, env)
    both_changed(a, b, env)
    until_sync(lambda: conflicts(a) == [env] and conflicts(b) == [env], what="both hold")
    # the other environment of the space keeps syncing meanwhile
    patch(a, other, "/routes/0/endpoint", "other-live")
    until_sync(lambda: endpoints(b, other)[0] == "other-live", what="the other env syncs")
    assert endpoints(a, env) == ["a-offline", before["routes"][1]["endpoint"]]
    assert endpoints(b, env) == [before["routes"][0]["endpoint"], "b-offline"]
    listed = j(a, "env", "list")
    flags = {e["id"]: e.get("flags", []) for e in listed}
    assert "conflict" in flags[env] and "conflict" not in flags[other]
    assert "conflict" in pd(a.socket_path, "env", "list")
    assert "conflict: environment" in pd(b.socket_path, "status")
    return a, b, space, env, other, before


def test_ask_policy_holds_both_changed_and_keep_local_wins_everywhere(daemons, fixture_dir):
    a, b, space, env, other, before = held_pair(daemons, fixture_dir)
    # the hold survives a restart of the holding daemon
    assert b.stop() == 0
    b.start()
    until_sync(lambda: conflicts(b) == [env], what="B still holds after its restart")
    assert endpoints(b, env)[0] == before["routes"][0]["endpoint"]

    pd(a.socket_path, "env", "resolve", env, "--keep-local")
    result = converged(a, b, env)
    assert [r["endpoint"] for r in result["routes"][:2]] == [
        "a-offline",
        before["routes"][1]["endpoint"],
    ]
    assert result["routes"][2]["endpoint"] == before["routes"][2]["endpoint"]
    until_sync(lambda: conflicts(a) == conflicts(b) == [], what="no conflict left")
    # the loser (B's version, as A held it) is a version in A's history
    versions = j(a, "env", "history", env)
    resolve = [
        v
        for v in (versions["versions"] if isinstance(versions, dict) else versions)
        if v["reason"] == "resolve"
    ]
    assert resolve
    pd(a.socket_path, "env", "restore", env, str(resolve[-1]["version"]))
    restored = converged(a, b, env)
    assert restored["routes"][1]["endpoint"] == "b-offline"


def test_ask_policy_take_remote_while_the_other_side_is_away(daemons, fixture_dir):
    """B, holding too, is stopped while A resolves: back, it meets the result in its link's
    initial exchange, which holds all of B's changes: a plain pull, no new conflict."""
    a, b, space, env, other, before = held_pair(daemons, fixture_dir)
    assert b.stop() == 0
    pd(a.socket_path, "env", "resolve", env, "--take-remote")
    assert conflicts(a) == []
    b.start()
    until_sync(lambda: conflicts(a) == conflicts(b) == [], what="no conflict left")
    result = converged(a, b, env)
    assert [r["endpoint"] for r in result["routes"][:2]] == [
        before["routes"][0]["endpoint"],
        "b-offline",
    ]
    versions = j(a, "env", "history", env)
    rows = versions["versions"] if isinstance(versions, dict) else versions
    [loser] = [v for v in rows if v["reason"] == "resolve"][-1:]
    pd(a.socket_path, "env", "restore", env, str(loser["version"]))
    assert converged(a, b, env)["routes"][0]["endpoint"] == "a-offline"


def test_ask_policy_merge_choice_and_a_held_live_edit(daemons, fixture_dir):
    """A live edit of a held environment stays local: the other side's resolve does not
    contain it, so this side keeps holding until it resolves too."""
    a, b, space, env, other, before = held_pair(daemons, fixture_dir)
    patch(b, env, "/routes/2/endpoint", "b-while-held")
    pd(a.socket_path, "env", "resolve", env, "--merge")
    merged = ["a-offline", "b-offline"]
    until_sync(lambda: endpoints(a, env) == merged, what="A merged")
    patch(a, other, "/routes/1/endpoint", "after-resolve")  # (a marker that B got A's news)
    until_sync(lambda: endpoints(b, other)[1] == "after-resolve", what="B got A's news")
    assert conflicts(a) == [] and conflicts(b) == [env]
    assert export(a, env)["routes"][2]["endpoint"] != "b-while-held"
    assert endpoints(b, env) == [before["routes"][0]["endpoint"], "b-offline"]
    pd(b.socket_path, "env", "resolve", env, "--merge")
    result = converged(a, b, env)
    assert [r["endpoint"] for r in result["routes"][:3]] == [*merged, "b-while-held"]
    until_sync(lambda: conflicts(a) == conflicts(b) == [], what="no conflict left")


def test_switching_the_space_back_to_merge_ends_the_holds_as_a_merge(daemons, fixture_dir):
    """`merge` means the CRDT merge: a hold of a space switched back to it (here, and on the
    other member when the change reaches it) ends as `env resolve --merge` would."""
    a, b, space, env, other, before = held_pair(daemons, fixture_dir)
    pd(a.socket_path, "space", "policy", space, "merge")
    assert conflicts(a) == []
    result = converged(a, b, env)
    assert [r["endpoint"] for r in result["routes"][:2]] == ["a-offline", "b-offline"]
    until_sync(lambda: conflicts(b) == [], what="B's hold ended too")
    versions = j(a, "env", "history", env)["versions"]
    assert "resolve" in [v["reason"] for v in versions]  # the local side, before the merge


def test_a_held_environment_deleted_and_brought_back_is_not_held(daemons, fixture_dir):
    """Deleting a held environment ends its hold: back from the trash, it is a local
    environment with nothing to resolve."""
    a, b, space, env, other, before = held_pair(daemons, fixture_dir)
    pd(a.socket_path, "env", "delete", env)
    pd(a.socket_path, "env", "untrash", env)
    assert export(a, env)["routes"][0]["endpoint"] == "a-offline"
    assert conflicts(a) == []
    assert "conflict" not in {e["id"]: e.get("flags", []) for e in j(a, "env", "list")}[env]


# --- through a hub -------------------------------------------------------------------------------
async def test_through_a_hub_the_device_back_last_with_changes_holds(base, nursery):
    """The hub merges whatever reaches it, so the first device back pushes its changes; the
    device back later with changes of its own holds (its step 2 waited: nothing of it reached
    the hub), and its resolve reaches the other device through the hub."""
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    token_a, token_b = admin.add_user("alice"), admin.add_token("alice")
    a = await HubDev(base, "a").start(nursery)
    b = await HubDev(base, "b").start(nursery)
    space, [env, other] = await team(a, hub, token_a, envs=2)
    await join(b, a, space, token_b)
    await hub_state(b, "connected")
    await a.op("space.policy", space=space, policy="ask")

    async def ready() -> bool:
        policy = (await b.op("space.policy", space=space))["policy"]
        return policy == "ask" and await same_env(a, b, env) and await same_env(a, b, other)

    await wait_until(ready)
    await hub_holds(hub, space, a, env)
    original = await a.get(env)

    await b.stop()
    await hub.stop()
    await hub_state(a, "disconnected")
    await a.set_name(env, "a offline")
    await b.start(nursery)  # the hub is down: B edits offline
    await b.op("env.patch", id=env, patch=[{"op": "replace", "path": "/port", "value": 4321}])
    await b.stop()
    await hub.start(nursery)
    await hub_state(a, "connected")
    await hub_holds(hub, space, a, env)  # A was back first: pushed

    async def held(dev: HubDev) -> list[str]:
        return [c["id"] for c in (await dev.op("status"))["conflicts"]]

    await b.start(nursery)
    await hub_state(b, "connected")
    await wait_until(lambda: _eq(held(b), [env]))
    assert await held(a) == []
    assert (await b.get(env))["name"] == original["name"] and await b.get(env, "/port") == 4321
    await a.set_name(other, "other live")  # the other environment keeps syncing
    await wait_until(lambda: _eq(b.get(other, "/name"), "other live"))
    assert await a.get(env, "/port") == original["port"]  # nothing of B's reached the hub

    await b.op("env.resolve", id=env, choice="keep-local")
    await wait_until(lambda: same_env(a, b, env))
    out = await a.get(env)
    assert (out["name"], out["port"]) == (original["name"], 4321)
    assert await held(a) == await held(b) == []
    admin.close()


async def _eq(value: Any, expected: Any) -> bool:
    return await value == expected
