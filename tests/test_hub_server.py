"""The hub server for real, on 127.0.0.1 port 0: health, y-websocket auth (ok / wrong / revoked
/ forbidden), limits hit and reported with nothing lost, slow clients, restart durability,
kill -9 of a real `peerdaemon hub serve`, TLS, and the admin commands."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers import SPACE, YClient, client, running_hub, self_signed, setup_accounts, url
from pycrdt import Doc, Map, Text
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

from peerdaemon.cli import main as cli_main
from peerdaemon.core.events import EventLog
from peerdaemon.hub.accounts import Accounts, AccountsError, Limits
from peerdaemon.hub.docs import HubDocs
from peerdaemon.hub.http import HttpConfig
from peerdaemon.hub.peer_socket import NotAvailablePeerHandler
from peerdaemon.hub.server import ConfigError, build_config
from peerdaemon.hub.transport import MAX_HEAD, BadRequest, HttpExchange
from peerdaemon.hub.ywebsocket import (
    MSG_AUTH,
    SYNC_STEP2,
    decode_message,
    sync_step1,
    sync_update,
)
from peerdaemon.store import Store


# ------------------------------------------------------------------------------------ helpers
async def expect_denied(server, space: str, doc: str, token: str, reason: str, code: int, **params):
    """Connecting gets the auth message's permission-denied, then a close: no data at all."""
    async with open_websocket_url(url(server, space, doc, token, **params)) as ws:
        first = decode_message(bytes(await ws.get_message()))
        assert (first.kind, first.sub, first.payload) == (MSG_AUTH, 0, reason.encode())
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason.code == code
        assert info.value.reason.reason == reason


async def http_get(port: int, path: str, *, ssl_context: ssl.SSLContext | None = None):
    if ssl_context is None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    else:
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ssl_context)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# ------------------------------------------------------------------------------------ HubDocs
def map_update(doc: Doc, key: str, value: object) -> bytes:
    before = doc.get_state()
    doc.get("m", type=Map)[key] = value
    return doc.get_update(before)


@contextmanager
def reloaded_docs(data_dir: Path) -> Iterator[HubDocs]:
    """The hub's documents as a restart on `data_dir` loads them."""
    with Store.open(data_dir) as store:
        docs = HubDocs(store, EventLog())
        docs.load()
        yield docs


async def test_hubdocs_relays_in_order(tmp_path):
    store = Store.open(tmp_path, compact_count=5)
    try:
        docs = HubDocs(store, EventLog())
        heard, flushes = [], []
        docs.add_listener(lambda *args: heard.append(args))
        docs.add_flush_listener(lambda: flushes.append(len(heard)))
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(docs.run)
            writer = Doc()
            tickets = [
                docs.apply(SPACE, "env-1", map_update(writer, f"k{i}", i), "yws:1")
                for i in range(12)
            ]
            assert heard == [] and docs.pending_ticket(SPACE, "env-1") is tickets[-1]
            await docs.wait_durable(SPACE, "env-1")
            await trio.testing.wait_all_tasks_blocked()
            assert len(heard) == 12 and {h[:2] + h[3:] for h in heard} == {
                (SPACE, "env-1", "yws:1")
            }
            replica = Doc()
            for i, (_, _, update, _) in enumerate(heard):  # in the order they were applied
                replica.apply_update(update)
                assert replica.get("m", type=Map).get(f"k{i}") == i
            assert flushes and flushes[-1] == 12
            assert docs.pending_ticket(SPACE, "env-1") is None
            # nothing new: no ticket, nothing relayed
            assert docs.apply(SPACE, "env-1", writer.get_update(), "yws:2") is None
            with pytest.raises(ValueError):
                docs.apply(SPACE, "env-1", b"\x01\x02garbage", "yws:1")
            with pytest.raises(ValueError):
                docs.apply("bad/space", "env-1", writer.get_update(), "yws:1")
            with pytest.raises(ValueError):
                docs.apply(SPACE, "space:other", writer.get_update(), "yws:1")
            with pytest.raises(ValueError):
                docs.diff(SPACE, "env-1", b"\xff\xff")
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    store = Store.open(tmp_path)  # compacted on the way; reloads the same document
    try:
        again = HubDocs(store, EventLog())
        assert again.load() == 1
        assert dict(again.get_doc(SPACE, "env-1").get("m", type=Map)) == {
            f"k{i}": i for i in range(12)
        }
        assert again.size(SPACE, "env-1") > 0
    finally:
        store.close()


async def test_hubdocs_relay_at_once_and_store_what_a_full_disk_refused_once_it_can(tmp_path):
    """The relay does not wait for the disk (docs/hub.md, "Durability"): on a full disk
    (SQLite's max_page_count) the updates are relayed all the same, each once, and the
    store's retry commits them once there is room."""
    store = Store.open(tmp_path)
    try:
        docs = HubDocs(store, EventLog())
        heard: list[bytes] = []
        docs.add_listener(lambda space, doc_id, update, origin: heard.append(update))
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(docs.run)
            writer = Doc()
            docs.apply(SPACE, "env-1", map_update(writer, "k0", 0), "yws:1")
            await docs.wait_durable(SPACE, "env-1")
            await trio.testing.wait_all_tasks_blocked()
            with store._db_lock:
                used = store._db.execute("PRAGMA page_count").fetchone()[0]
                store._db.execute(f"PRAGMA max_page_count = {used + 2}")
            updates = [map_update(writer, f"k{i}", "x" * 200_000) for i in (1, 2)]
            for update in updates:
                docs.apply(SPACE, "env-1", update, "yws:1")
            with trio.move_on_after(0.8):  # failing and retried meanwhile
                while not store.stats()["error"]:
                    await trio.sleep(0.01)
            assert store.stats()["error"] and sorted(heard[1:]) == sorted(updates)
            assert docs.stats()["unconfirmed"] >= 1
            with store._db_lock:
                store._db.execute("PRAGMA max_page_count = 1073741823")
            with trio.fail_after(20):
                while docs.stats()["unconfirmed"] or store.stats()["error"]:
                    await trio.sleep(0.01)
            await docs.wait_durable(SPACE, "env-1")  # the retried writes are committed...
            await trio.testing.wait_all_tasks_blocked()  # ...and nothing else is under way
            assert len(heard) == 3  # relayed once each, the retries included
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    with reloaded_docs(tmp_path) as again:
        assert set(again.get_doc(SPACE, "env-1").get("m", type=Map)) == {"k0", "k1", "k2"}


async def test_hubdocs_env_ids_come_from_the_space_document(tmp_path):
    from peerdaemon.spaces.document import SpaceDoc

    store = Store.open(tmp_path)
    try:
        docs = HubDocs(store, EventLog())
        space_doc = SpaceDoc()
        space_doc.init("Team", "DEV", "laptop")
        space_doc.set_state("env-a", "shared", "DEV")
        space_doc.set_state("env-b", "unshared", "DEV")
        space_doc.set_state("env-c", "shared", "DEV")
        docs.apply(SPACE, f"space:{SPACE}", space_doc.doc.get_update(), "peer:DEV")
        assert docs.env_ids(SPACE) == ["env-a", "env-c"]
        assert docs.env_ids("other") == []
        assert docs.env_count(SPACE) == 0  # the space document is not an environment
        assert docs.state_vector("other", "nope") == b"\x00"
        assert docs.diff("other", "nope", b"\x00") == b"\x00\x00"
    finally:
        store.close()


async def test_hubdocs_retries_a_failed_store_write(tmp_path):
    from peerdaemon.store import StoreError, Ticket

    store = Store.open(tmp_path)
    real = store.enqueue_append
    failures = [1]

    def flaky(key: str, update: bytes) -> Ticket:
        if failures:
            failures.pop()
            ticket = Ticket()
            ticket._complete(StoreError("disk full"))
            return ticket
        return real(key, update)

    store.enqueue_append = flaky
    try:
        docs = HubDocs(store, EventLog())
        heard = []
        docs.add_listener(lambda *args: heard.append(args))
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(docs.run)
            docs.apply(SPACE, "env-1", map_update(Doc(), "k", 1), "yws:1")
            with trio.fail_after(5):
                while not heard:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    with reloaded_docs(tmp_path) as again:
        assert dict(again.get_doc(SPACE, "env-1").get("m", type=Map)) == {"k": 1}


# -------------------------------------------------------------------------------- HTTP, auth
async def test_health_and_unknown_paths(tmp_path):
    async with running_hub(tmp_path) as server:
        status, body = await http_get(server.port, "/health")
        assert status == 200
        assert body["status"] == "ok" and body["rooms"] == 0 and body["clients"] == 0
        assert body["version"]
        status, _ = await http_get(server.port, "/nope")
        assert status == 404
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 400")


async def raw_answer(port: int, request: bytes) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request)
        data = b""
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    return data


async def test_http_edges_on_the_port(tmp_path):
    async with running_hub(tmp_path) as server:
        head = await raw_answer(server.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # no body
        big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2 * MAX_HEAD  # no end
        assert (await raw_answer(server.port, big)).startswith(b"HTTP/1.1 431 ")
        key = base64.b64encode(os.urandom(16))
        upgrade = (
            b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        for path, status in ((b"/yjs/only-space", b"404"), (b"/elsewhere", b"404")):
            answer = await raw_answer(server.port, b"GET " + path + b" HTTP/1.1\r\n" + upgrade)
            assert answer.startswith(b"HTTP/1.1 " + status + b" ")
        old = upgrade.replace(b"Version: 13", b"Version: 8")
        answer = await raw_answer(server.port, b"GET /peer HTTP/1.1\r\n" + old)
        assert (
            answer.startswith(b"HTTP/1.1 426 ") and b"sec-websocket-version: 13" in answer.lower()
        )
        assert server.http.admission.count == 0  # every one answered: released


# --------------------------------------------------------------- HTTP/1.1 and the upgrade, no port
async def exchange_of(data: bytes, *, eof: bool = True):
    """An `HttpExchange` whose client sent `data` (then hung up), and that client's stream."""
    client_end, server_end = trio.testing.memory_stream_pair()
    await client_end.send_all(data)
    if eof:
        await client_end.send_stream.aclose()
    return HttpExchange(server_end), client_end


async def answer_of(client_end) -> bytes:
    data = b""
    while chunk := await client_end.receive_some(65536):
        data += chunk
    return data


async def test_h11_reads_the_head_and_answers_even_a_bad_one():
    exchange, peer = await exchange_of(b"NOT HTTP AT ALL\r\n\r\n")
    with pytest.raises(BadRequest) as bad:
        await exchange.read_request()
    assert bad.value.status == 400
    await exchange.respond_json(bad.value.status, {"error": str(bad.value)})
    await exchange.stream.send_stream.aclose()
    assert (await answer_of(peer)).startswith(b"HTTP/1.1 400 Bad Request\r\n")

    exchange, _ = await exchange_of(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD, eof=False)
    with pytest.raises(BadRequest) as bad:
        await exchange.read_request()
    assert bad.value.status == 431  # too large, before its end arrived

    for partial in (b"", b"GET /health HTTP/1.1\r\nHost"):  # the client left: nobody to answer
        exchange, _ = await exchange_of(partial)
        assert await exchange.read_request() is None

    exchange, peer = await exchange_of(b"GET /health?a=1&b= HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n")
    request = await exchange.read_request()
    assert request is not None and not request.wants_websocket
    assert (request.method, request.path, request.query) == ("GET", "/health", {"a": "1", "b": ""})
    assert request.headers["x-a"] == "1"
    await exchange.respond_json(200, {"status": "ok"})
    await exchange.stream.send_stream.aclose()
    head, _, body = (await answer_of(peer)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in head.lower()
    assert json.loads(body) == {"status": "ok"}


async def test_the_upgrade_is_accepted_and_declines_compression():
    key = base64.b64encode(os.urandom(16))
    client = Connection(ConnectionType.CLIENT)
    first_frame = client.send(BytesMessage(b"early"))
    exchange, peer = await exchange_of(
        b"GET /peer HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n" + first_frame,
        eof=False,
    )
    request = await exchange.read_request()
    assert request is not None and request.wants_websocket
    upgraded = await exchange.upgrade(request)
    head = await peer.receive_some(65536)
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-accept: " + accept.lower() in head.lower()
    assert b"extensions" not in head.lower()  # permessage-deflate declined
    assert upgraded.leftover == first_frame  # read with the head: not lost

    good = {
        b"Host": b"x",
        b"Upgrade": b"websocket",
        b"Connection": b"keep-alive, Upgrade",
        b"Sec-WebSocket-Key": key,
        b"Sec-WebSocket-Version": b"13",
    }
    for method, changed, status in (
        (b"GET", {}, 101),
        (b"POST", {}, 400),
        (b"GET", {b"Sec-WebSocket-Version": b"7"}, 426),
        (b"GET", {b"Sec-WebSocket-Version": None}, 400),
        (b"GET", {b"Sec-WebSocket-Key": None}, 400),
        (b"GET", {b"Connection": b"keep-alive"}, 400),
        (b"GET", {b"Upgrade": b"h2c"}, 400),
    ):
        fields = {k: v for k, v in {**good, **changed}.items() if v is not None}
        exchange, peer = await exchange_of(
            method
            + b" /peer HTTP/1.1\r\n"
            + b"".join(k + b": " + v + b"\r\n" for k, v in fields.items())
            + b"\r\n",
            eof=False,
        )
        request = await exchange.read_request()
        assert request is not None
        if status == 101:
            await exchange.upgrade(request)
            assert (await peer.receive_some(65536)).startswith(b"HTTP/1.1 101 ")
            continue
        with pytest.raises(BadRequest) as refused:
            await exchange.upgrade(request)
        assert refused.value.status == status
        if status == 426:
            assert (b"Sec-WebSocket-Version", b"13") in refused.value.headers


async def test_token_ok_syncs_and_relays(tmp_path):
    tokens = setup_accounts(tmp_path, "alice", "bob")
    with Accounts.open(tmp_path) as accounts:
        accounts.add_member(SPACE, "bob")
    async with running_hub(tmp_path) as server:
        async with client(server, SPACE, "env-1", tokens["alice"]) as a:
            async with client(server, SPACE, "env-1", tokens["bob"]) as b:
                await a.edit("hello", "world")
                await b.wait_for(lambda: b.map().get("hello") == "world")
                status, body = await http_get(server.port, "/health")
                assert body["rooms"] == 1 and body["clients"] == 2
        assert server.docs.has(SPACE, "env-1")
        # the personal space of each user: reachable by its owner only
        personal = server.accounts.user_of(tokens["bob"]).personal_space
        async with client(server, personal, "notes", tokens["bob"]) as p:
            await p.edit("mine", 1)
        await expect_denied(server, personal, "notes", tokens["alice"], "forbidden", 4403)


async def test_a_token_or_member_added_by_an_admin_command_is_let_in_at_once(tmp_path):
    """What an admin command added a moment ago counts at once, without the poll (an hour
    here): the hub reads the accounts file itself (a cluster's copy is read again before a
    refusal: test_cluster_accounts.py)."""
    tokens = setup_accounts(tmp_path, "alice", "bob")
    async with running_hub(tmp_path, accounts_poll=3600.0) as server:
        with Accounts.open(tmp_path) as admin:
            fresh = admin.add_token("alice")
        async with client(server, SPACE, "env-1", fresh) as a:
            await a.edit("k", 1)
        await expect_denied(server, SPACE, "env-1", tokens["bob"], "forbidden", 4403)
        with Accounts.open(tmp_path) as admin:
            admin.add_member(SPACE, "bob")
        async with client(server, SPACE, "env-1", tokens["bob"]) as b:
            assert b.map() == {"k": 1}
        await expect_denied(server, SPACE, "env-1", "wrong-token", "unauthorized", 4401)


async def test_wrong_missing_and_revoked_tokens_get_nothing(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    async with running_hub(tmp_path) as server:
        async with client(server, SPACE, "env-1", tokens["alice"]) as a:
            await a.edit("secret", 42)
            with trio.fail_after(5):  # the hub holds it: there is something to leak
                while (doc := server.docs.get_doc(SPACE, "env-1")) is None or doc.get(
                    "m", type=Map
                ).get("secret") != 42:
                    await trio.sleep(0.01)
        await expect_denied(server, SPACE, "env-1", "wrong-token", "unauthorized", 4401)
        await expect_denied(server, SPACE, "env-1", "", "unauthorized", 4401)
        spare = server.accounts.add_token("alice")
        async with client(server, SPACE, "env-1", spare) as live:
            # revoked by the admin command, from another process's view of the file
            with Accounts.open(tmp_path) as admin:
                admin.revoke_token(spare[:12])
            with trio.fail_after(5):
                while True:
                    try:
                        msg = await live.recv()
                    except ConnectionClosed as exc:
                        assert exc.reason.code == 4401
                        break
                    if msg.kind == MSG_AUTH:
                        assert msg.payload == b"unauthorized"
        await expect_denied(server, SPACE, "env-1", spare, "unauthorized", 4401)
        # the other token of the same user still works
        async with client(server, SPACE, "env-1", tokens["alice"]) as again:
            assert again.map() == {"secret": 42}


async def test_removed_member_is_cut_off(tmp_path):
    tokens = setup_accounts(tmp_path, "alice", "bob")
    with Accounts.open(tmp_path) as accounts:
        accounts.add_member(SPACE, "bob")
    async with running_hub(tmp_path) as server:
        async with client(server, SPACE, "env-1", tokens["bob"]) as b:
            with Accounts.open(tmp_path) as admin:
                admin.remove_member(SPACE, "bob")
            with pytest.raises(ConnectionClosed) as info:
                with trio.fail_after(5):
                    while True:
                        await b.recv()
            assert info.value.reason.code == 4403
        await expect_denied(server, SPACE, "env-1", tokens["bob"], "forbidden", 4403)


async def test_peer_path_stub_closes_not_available(tmp_path):
    stub = lambda docs, accounts, events: NotAvailablePeerHandler()  # noqa: E731
    async with running_hub(tmp_path, peer_endpoint=stub) as server:
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/peer") as ws:
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason.reason == "not-available"


async def test_peer_endpoint_plugs_in(tmp_path):
    """The factory gets (HubDocs, Accounts, EventLog); its handler gets a trio-websocket-like
    socket with the query string."""
    seen = {}

    class Echo:
        async def handle_peer(self, ws):
            seen["token"] = ws.query.get("token")
            message = await ws.get_message()
            await ws.send_message(message + b"!")
            await ws.aclose(1000, "bye")

    def factory(docs, accounts, events):
        seen["args"] = (type(docs), type(accounts), type(events))
        return Echo()

    async with running_hub(tmp_path, peer_endpoint=factory) as server:
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/peer?token=t0k") as ws:
            await ws.send_message(b"ping")
            assert await ws.get_message() == b"ping!"
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason.reason == "bye"
    assert seen == {"token": "t0k", "args": (HubDocs, Accounts, EventLog)}


async def test_message_larger_than_the_limit_is_refused(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    async with running_hub(tmp_path, http=HttpConfig(max_message=10_000)) as server:
        async with client(server, SPACE, "env-1", tokens["alice"]) as a:
            await a.edit("big", "z" * 20_000)
            with pytest.raises(ConnectionClosed) as info:
                with trio.fail_after(5):
                    while True:
                        await a.recv()
            assert info.value.reason.code == 1009
        assert not server.docs.has(SPACE, "env-1")


# ------------------------------------------------------------------------------------ limits
async def test_environments_per_space_limit(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    with Accounts.open(tmp_path) as accounts:
        accounts.set_limit("envs_per_space", 1, "alice")
        accounts.set_limit("devices_per_user", 10, "alice")
    async with running_hub(tmp_path) as server:
        async with client(server, SPACE, "env-1", tokens["alice"]) as a1:
            await a1.edit("first", 1)
            async with client(server, SPACE, "env-1", tokens["alice"]) as a2:
                await a2.wait_for(lambda: a2.map().get("first") == 1)
                async with client(server, SPACE, "env-2", tokens["alice"]) as over:
                    await over.edit("second", 2)
                    with pytest.raises(ConnectionClosed) as info:
                        with trio.fail_after(5):
                            while True:
                                await over.recv()
                    assert info.value.reason.code == 4422
                    assert info.value.reason.reason == "quota-exceeded"
                    assert over.messages[-1].kind == MSG_AUTH
                    assert over.messages[-1].payload == b"quota-exceeded"
                # the other environment keeps syncing; nothing stored was touched
                await a1.edit("after", 3)
                await a2.wait_for(lambda: a2.map().get("after") == 3)
        assert not server.docs.has(SPACE, "env-2")
        assert server.events.since(0)[-1]["type"] in ("limit-exceeded", "hub-doc-created")
        assert any(e["data"].get("reason") == "quota-exceeded" for e in server.events.since(0))


async def test_bytes_per_environment_limit_loses_nothing(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    with Accounts.open(tmp_path) as accounts:
        accounts.set_limit("bytes_per_env", 3000, "alice")
    async with running_hub(tmp_path) as server:
        async with client(server, SPACE, "env-1", tokens["alice"]) as a:
            await a.edit("small", "x" * 100)
            await a.edit("big", "y" * 5000)
            with pytest.raises(ConnectionClosed) as info:
                with trio.fail_after(5):
                    while True:
                        await a.recv()
            assert (info.value.reason.code, info.value.reason.reason) == (
                4413,
                "environment-too-large",
            )
        assert server.docs.size(SPACE, "env-1") < 3000
        async with client(server, SPACE, "env-1", tokens["alice"]) as b:
            assert b.map() == {"small": "x" * 100}  # what was stored is intact
    async with running_hub(tmp_path) as server:  # and on disk
        async with client(server, SPACE, "env-1", tokens["alice"]) as c:
            assert c.map() == {"small": "x" * 100}


async def test_devices_per_user_limit(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    async with running_hub(tmp_path) as server:  # the default: 2
        async with client(server, SPACE, "env-1", tokens["alice"], device="laptop"):
            async with client(server, SPACE, "env-2", tokens["alice"], device="laptop"):
                async with client(server, SPACE, "env-1", tokens["alice"], device="phone"):
                    await expect_denied(
                        server,
                        SPACE,
                        "env-1",
                        tokens["alice"],
                        "too-many-devices",
                        4429,
                        device="tablet",
                    )
                    await expect_denied(
                        server, SPACE, "env-1", tokens["alice"], "too-many-devices", 4429
                    )
        # slots are given back when connections end
        async with client(server, SPACE, "env-1", tokens["alice"], device="tablet"):
            pass
        assert server.accounts.devices.of("alice") == []


async def test_slow_reader_is_dropped_and_the_room_goes_on(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    with Accounts.open(tmp_path) as accounts:
        accounts.set_limit("devices_per_user", 10, "alice")
    http = HttpConfig(coalesce_bytes=32 << 10, limit_bytes=256 << 10, stall_seconds=1.0)
    async with running_hub(tmp_path, http=http) as server:
        async with client(server, SPACE, "env-1", tokens["alice"]) as writer:
            async with client(server, SPACE, "env-1", tokens["alice"]) as reader:
                # a client that reads nothing, with a tiny receive buffer
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                await sock.connect(("127.0.0.1", server.port))
                key = base64.b64encode(os.urandom(16)).decode()
                await sock.send(
                    (
                        f"GET /yjs/{SPACE}/env-1?token={tokens['alice']} HTTP/1.1\r\nHost: x\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                    ).encode()
                )
                with trio.fail_after(5):
                    while server.rooms.clients < 3:
                        await trio.sleep(0.01)
                text = writer.doc.get("t", type=Text)
                for i in range(120):
                    before = writer.doc.get_state()
                    text += f"{i:05d}" * 2000  # 10 kB of distinct text each
                    await writer.ws.send_message(sync_update(writer.doc.get_update(before)))
                    # the good reader keeps up (it shares this process's CPU with the hub)
                    await reader.wait_for(
                        lambda n=i: len(str(reader.doc.get("t", type=Text))) == (n + 1) * 10_000
                    )
                with trio.fail_after(10):
                    while server.rooms.clients > 2:
                        await trio.sleep(0.02)
                sock.close()
        assert any(e["type"] == "client-dropped" for e in server.events.since(0))


def _all_tasks() -> list[trio.lowlevel.Task]:
    def walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    return list(walk(trio.lowlevel.current_root_task()))


async def test_an_idle_client_costs_the_hub_one_task(tmp_path):
    """What a waiting connection keeps alive counts thousands of times (docs/hub.md, "Storage"):
    once synced, an idle y-websocket client is one task on the hub, its reader, with no
    nursery of its own and no writer task; its deadlines are in the port's `Timers`."""
    tokens = setup_accounts(tmp_path, "alice")
    async with running_hub(tmp_path, limits=Limits(devices_per_user=50)) as server:
        async with AsyncExitStack() as stack:
            for i in range(20):
                await stack.enter_async_context(
                    client(server, SPACE, "env-1", tokens["alice"], device=f"d{i}")
                )
            await trio.testing.wait_all_tasks_blocked()
            tasks = _all_tasks()
            handlers = [t for t in tasks if t.name.endswith("serve_listeners._run_handler")]
            assert len(handlers) == 20
            assert all(not t.child_nurseries for t in handlers)  # one task a connection
            assert not [t for t in tasks if "_writer" in t.name]  # nothing held back: no writer
            timers = server.http._timers
            assert timers is not None and len(timers) >= 20  # a deadline each, in one heap


async def test_silent_clients_are_pinged_and_dead_ones_dropped(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    http = HttpConfig(ping_interval=0.2)
    async with running_hub(tmp_path, http=http) as server:
        async with client(server, SPACE, "env-1", tokens["alice"], device="alive") as alive:
            # a client that opened its websocket and then went silent (no pongs): gone
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", server.port))
            key = base64.b64encode(os.urandom(16)).decode()
            await sock.send(
                (
                    f"GET /yjs/{SPACE}/env-1?token={tokens['alice']}&device=dead HTTP/1.1\r\n"
                    "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            with trio.fail_after(5):
                while server.accounts.devices.of("alice") != ["alive", "dead"]:
                    await trio.sleep(0.01)
            with trio.fail_after(5):  # dropped after unanswered pings: its slot is free again
                while server.accounts.devices.of("alice") != ["alive"]:
                    await trio.sleep(0.01)
            assert server.rooms.clients == 1
            await alive.edit("still", "here")  # the live one answered the pings: still open
            async with client(server, SPACE, "env-1", tokens["alice"], device="x") as other:
                await other.wait_for(lambda: other.map().get("still") == "here")
            sock.close()


# -------------------------------------------------------------------------------- durability
async def test_restart_keeps_everything(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    async with running_hub(tmp_path) as server:
        async with client(server, SPACE, "env-1", tokens["alice"]) as a:
            for i in range(50):
                await a.edit(f"k{i}", i)
            async with client(server, SPACE, "env-1", tokens["alice"]) as b:
                await b.wait_for(lambda: len(b.map()) == 50)
    async with running_hub(tmp_path, compact_count=10) as server:
        async with client(server, SPACE, "env-1", tokens["alice"]) as c:
            assert c.map() == {f"k{i}": i for i in range(50)}
            for i in range(50, 80):
                await c.edit(f"k{i}", i)
            async with client(server, SPACE, "env-1", tokens["alice"]) as d:
                await d.wait_for(lambda: len(d.map()) == 80)
    store = Store.open(tmp_path)
    try:
        docs = HubDocs(store, EventLog())
        docs.load()
        assert dict(docs.get_doc(SPACE, "env-1").get("m", type=Map)) == {
            f"k{i}": i for i in range(80)
        }
    finally:
        store.close()


def start_hub_process(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peerdaemon",
                "hub",
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                "127.0.0.1:0",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"hub listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"hub did not start: {log_path.read_text()}")


async def test_kill9_loses_nothing_once_its_clients_reconnect(tmp_path):
    """The hub relays before its store commits (docs/hub.md, "Durability"): a writer streams
    edits, a reader records what reaches it, the hub is killed with SIGKILL mid-stream. What
    the data dir lacks, the clients still hold: once both reconnect to the restarted hub (a
    Yjs sync each), the hub holds every edit the writer made, and so everything the reader saw."""
    tokens = setup_accounts(tmp_path, "alice")
    proc, port = start_hub_process(tmp_path, tmp_path / "hub.log")
    acknowledged: set[str] = set()
    writer_doc, reader_doc = Doc(), Doc()
    try:
        base = f"ws://127.0.0.1:{port}/yjs/{SPACE}/env-1?token={tokens['alice']}"
        async with trio.open_nursery() as nursery:
            async with open_websocket_url(base) as wa, open_websocket_url(base) as wb:
                writer, reader = YClient(wa, writer_doc), YClient(wb, reader_doc)
                await writer.sync()
                await reader.sync()
                observed = reader.doc.get("m", type=Map)  # keep it: the subscription lives on it
                subscription = observed.observe(lambda ev: acknowledged.update(ev.keys.keys()))

                async def write() -> None:
                    i = 0
                    while True:
                        await writer.edit(f"k{i}", i)
                        i += 1
                        if i % 5 == 0:
                            await trio.sleep(0.001)

                async def read() -> None:
                    while True:
                        await reader.recv()

                nursery.start_soon(write)
                nursery.start_soon(read)
                with trio.fail_after(20):
                    while len(acknowledged) < 300:
                        await trio.sleep(0.005)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
    except* (ConnectionClosed, trio.BrokenResourceError):
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    del subscription, observed
    sent = set(writer_doc.get("m", type=Map).keys())
    assert len(acknowledged) >= 300 and acknowledged <= sent

    # the real server restarts on it; the clients come back; it serves it all to a new client,
    # and a SIGTERM stops it cleanly
    proc, port = start_hub_process(tmp_path, tmp_path / "hub-back.log")
    try:
        base = f"ws://127.0.0.1:{port}/yjs/{SPACE}/env-1?token={tokens['alice']}"
        for doc in (reader_doc, writer_doc):  # the reader first: it may hold less
            async with open_websocket_url(base) as ws:
                back = YClient(ws, doc)
                await back.sync()  # the hub's step 1 is answered with what it lacks
                await back.ws.send_message(sync_step1(b"\x00"))  # answered once that is stored
                await back.wait_for(lambda c=back: c.messages[-1].sub == SYNC_STEP2)
        async with open_websocket_url(base) as ws:
            c = YClient(ws)
            await c.sync()
            assert sent <= set(c.map())
            await c.edit("after-restart", True)
            async with open_websocket_url(base) as ws2:
                d = YClient(ws2)
                await d.sync()
                await d.wait_for(lambda: "after-restart" in d.map())
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = Store.open(tmp_path)
    try:
        docs = HubDocs(store, EventLog())
        docs.load()
        stored = set(docs.get_doc(SPACE, "env-1").get("m", type=Map).keys())
    finally:
        store.close()
    assert sent | {"after-restart"} <= stored, sorted(sent - stored)[:10]


# --------------------------------------------------------------------------------------- TLS
async def test_tls_directly(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    async with running_hub(tmp_path, tls_cert=cert, tls_key=key) as server:
        assert server.url.startswith("wss://")
        status, body = await http_get(server.port, "/health", ssl_context=context)
        assert status == 200 and body["status"] == "ok"
        wss = f"wss://127.0.0.1:{server.port}/yjs/{SPACE}/env-1?token={tokens['alice']}"
        async with open_websocket_url(wss, ssl_context=context) as ws:
            c = YClient(ws)
            await c.sync()
            await c.edit("over", "tls")
        async with open_websocket_url(wss, ssl_context=context) as ws:
            c = YClient(ws)
            await c.sync()
            assert c.map() == {"over": "tls"}


# ----------------------------------------------------------------------- config and commands
def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text(
        'listen = "0.0.0.0:9000"\ndata_dir = "data"\n'
        '[limits]\nbytes_per_env = "15MB"\ndevices_per_user = 5\n'
        '[fanout]\nstall_seconds = 5\nlimit_bytes = "8MiB"\n'
    )
    config = build_config(config_file=path)
    assert config.listen == ("0.0.0.0", 9000)
    assert config.data_dir == tmp_path / "data"
    assert config.limits == Limits(bytes_per_env=15_000_000, devices_per_user=5)
    assert config.http.stall_seconds == 5 and config.http.limit_bytes == 8 << 20
    config = build_config(config_file=path, listen=("127.0.0.1", 0), data_dir=tmp_path / "x")
    assert config.listen == ("127.0.0.1", 0) and config.data_dir == tmp_path / "x"
    path.write_text("[limits]\nenvs_per_spaces = 3\n")  # a typo: warned about, not applied
    config = build_config(config_file=path)
    assert config.limits == Limits()
    assert len(config.warnings) == 1 and "envs_per_spaces" in config.warnings[0]
    path.write_text("[limits]\nenvs_per_space = -3\n")
    with pytest.raises(ConfigError, match="limits.envs_per_space"):
        build_config(config_file=path)
    with pytest.raises(ConfigError, match="tls-key"):
        build_config(tls_cert=tmp_path / "c.pem")


def test_admin_commands(tmp_path, capsys):
    d = ["--data-dir", str(tmp_path)]

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_main(["hub", *argv, *d])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("user", "add", "alice")
    assert code == 0 and err == ""
    token = out.strip()
    assert re.fullmatch(r"pdh_[A-Za-z0-9][A-Za-z0-9_-]{42}", token) and out == token + "\n"
    assert run("user", "add", "bob")[0] == 0
    code, _, err = run("user", "add", "alice")
    assert code == 1 and err.count("\n") == 1 and "already exists" in err
    assert run("space", "create", "team", "--owner", "alice", "--name", "Team")[0] == 0
    assert run("space", "add-member", "team", "bob")[0] == 0
    code, _, err = run("space", "add-member", "team", "carol")
    assert code == 1 and "no such user" in err
    code, out, _ = run("space", "list", "--json")
    spaces = {s["id"]: s for s in json.loads(out)}
    assert spaces["team"]["members"] == ["bob"] and spaces["team"]["owner"] == "alice"
    assert sum(s["personal"] for s in spaces.values()) == 2
    assert run("space", "remove-member", "team", "bob")[0] == 0
    assert run("limits", "set", "--user", "alice", "devices_per_user", "5")[0] == 0
    assert run("limits", "set", "bytes_per_env", "15MB")[0] == 0
    with pytest.raises(SystemExit) as info:
        run("limits", "set", "no_such_limit", "5")
    assert info.value.code == 2
    capsys.readouterr()
    code, out, _ = run("token", "add", "alice")
    second = out.strip()
    code, out, _ = run("token", "list", "alice")
    assert code == 0 and out.splitlines()[0].startswith(token[:12] + "...  alice")
    assert run("token", "revoke", token[:12])[0] == 0
    code, _, err = run("token", "revoke", token[:12])
    assert code == 1 and "no such token" in err
    with Accounts.open(tmp_path) as accounts:
        assert accounts.user_of(token) is None
        assert accounts.user_of(second).name == "alice"
        assert accounts.limits_for("alice") == Limits(bytes_per_env=15_000_000, devices_per_user=5)
        assert accounts.limits_for("bob").devices_per_user == 2
        assert not accounts.can_access("bob", "team")
        with pytest.raises(AccountsError):
            accounts.revoke_token("abc")  # too short to be a prefix
        with pytest.raises(AccountsError):
            accounts.revoke_token(second[:9])  # `pdh_` + 5: too short as well


def test_tokens_have_a_recognisable_prefix_and_never_start_with_a_dash(tmp_path):
    """`pdh_` + 43 base64url characters, the first a letter or a digit: secret scanners find
    them, and a command line never takes one for an option (1 in 64 `token_urlsafe(32)` did
    start with `-`, and then `hub token revoke TOKEN` was a usage error)."""
    with Accounts.open(tmp_path) as accounts:
        tokens = [accounts.add_user("alice")] + [accounts.add_token("alice") for _ in range(300)]
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert re.fullmatch(r"pdh_[A-Za-z0-9][A-Za-z0-9_-]{42}", token), token
    with Accounts.open(tmp_path) as accounts:
        assert all(accounts.user_of(t).name == "alice" for t in tokens[:5])
        assert {t["prefix"] for t in accounts.tokens("alice")} == {t[:12] for t in tokens}


def _store_old_token(tmp_path, user: str, token: str) -> None:
    """A token of the older form (`token_urlsafe(32)`, handle: its first 8 characters), stored
    as the hub stored them before the `pdh_` prefix."""
    import sqlite3
    import time

    from peerdaemon.hub.accounts import ACCOUNTS_DB, hash_token

    db = sqlite3.connect(tmp_path / ACCOUNTS_DB)
    with db:
        db.execute(
            "INSERT INTO tokens (hash, prefix, user, created) VALUES (?, ?, ?, ?)",
            (hash_token(token), token[:8], user, time.time()),
        )
    db.close()


def test_old_tokens_keep_working_and_dash_tokens_are_revoked_with_token_equals(tmp_path, capsys):
    d = ["--data-dir", str(tmp_path)]

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_main(["hub", *argv[:2], *d, *argv[2:]])  # options first: `--` may follow
        out, err = capsys.readouterr()
        return code, out, err

    assert run("user", "add", "alice")[0] == 0
    dash = "-" + "x" * 42  # an old-form token as 1 in 64 of them were: it starts with '-'
    plain = "Ab" + "y" * 41
    other = "Ac" + "z" * 41
    for token in (dash, plain, other):
        _store_old_token(tmp_path, "alice", token)
    with Accounts.open(tmp_path) as accounts:
        assert all(accounts.user_of(t).name == "alice" for t in (dash, plain, other))
    # the positional form takes it for an option: a usage error, as before...
    with pytest.raises(SystemExit) as info:
        run("token", "revoke", dash)
    assert info.value.code == 2
    capsys.readouterr()
    # ...while --token=VALUE (and `--` then the token) revoke it
    code, out, err = run("token", "revoke", f"--token={dash}")
    assert (code, out, err) == (0, "", "")
    code, _, err = run("token", "revoke", "--", dash)
    assert code == 1 and "no such token" in err and err.count("\n") == 1
    assert run("token", "revoke", "--token", plain[:8])[0] == 0  # an old handle, by prefix
    code, _, err = run("token", "revoke", "Ab")
    assert code == 1 and "at least 6" in err
    with pytest.raises(SystemExit) as info:
        run("token", "revoke", other, f"--token={other}")  # one or the other
    assert info.value.code == 2
    capsys.readouterr()
    with Accounts.open(tmp_path) as accounts:
        assert accounts.user_of(dash) is None and accounts.user_of(plain) is None
        assert accounts.user_of(other).name == "alice"


def test_limits_precedence_and_personal_spaces(tmp_path):
    with Accounts.open(tmp_path, defaults=Limits(envs_per_space=7)) as accounts:
        token = accounts.add_user("alice")
        accounts.add_user("bob")
        alice = accounts.user_of(token)
        assert alice is not None and accounts.spaces_of("alice") == [alice.personal_space]
        assert accounts.space(alice.personal_space)["personal"]
        with pytest.raises(AccountsError, match="personal"):
            accounts.add_member(alice.personal_space, "bob")
        assert accounts.limits_for("alice") == Limits(envs_per_space=7)  # the config file
        accounts.set_limit("envs_per_space", 9)  # the whole hub
        accounts.set_limit("devices_per_user", 4, "alice")  # one user
        assert accounts.limits_for("alice") == Limits(envs_per_space=9, devices_per_user=4)
        assert accounts.limits_for("bob") == Limits(envs_per_space=9)
        assert accounts.space_limits(alice.personal_space).devices_per_user == 4
        with pytest.raises(AccountsError):
            accounts.set_limit("nope", 1)
        with pytest.raises(AccountsError):
            accounts.set_limit("envs_per_space", 1, "carol")
        lease = accounts.devices.acquire("alice", "d1")
        for d in ("d2", "d3", "d4"):
            accounts.devices.acquire("alice", d)
        with pytest.raises(Exception, match="too-many-devices"):
            accounts.devices.acquire("alice", "d5")
        lease.release()
        lease.release()  # idempotent
        accounts.devices.acquire("alice", "d5")
        assert accounts.user_of("x" * 1000) is None and accounts.user_of("") is None
