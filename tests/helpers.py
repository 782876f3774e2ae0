"""Helpers shared by test modules: the loopback address, a free port, waiting for a condition,
running the CLI; a fake handler for the socket server; a hub in this process and a y-websocket
client for it.

Written once here, so that a fix (a bound, a better failure message) reaches every test. Test
modules import helpers from here and from the other utility modules (`modelutil`, `peerutil`,
`daemonutil`, `daemonproc`...), never from another test module.
"""

from __future__ import annotations

import inspect
import socket
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from pycrdt import Doc, Map
from trio_websocket import open_websocket_url

from peerdaemon import cli
from peerdaemon.api.client import ClientError, DaemonError
from peerdaemon.api.protocol import OpError, Pending
from peerdaemon.api.server import Session
from peerdaemon.hub.accounts import Accounts
from peerdaemon.hub.server import HubConfig, serve_hub
from peerdaemon.hub.ywebsocket import (
    MSG_SYNC,
    SYNC_STEP1,
    SYNC_STEP2,
    SYNC_UPDATE,
    decode_message,
    sync_step1,
    sync_step2,
    sync_update,
)

__all__ = [
    "LOCAL",
    "SPACE",
    "TIMEOUT",
    "FakeHandler",
    "YClient",
    "client",
    "free_port",
    "run_cli",
    "running_hub",
    "setup_accounts",
    "until",
    "until_sync",
    "url",
]

LOCAL = "127.0.0.1"
TIMEOUT = 10.0
POLL = 0.01


def free_port(host: str = LOCAL) -> int:
    """A TCP port nobody listens on right now (a dial to it is refused)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def until(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
    """Poll `predicate` (sync, or returning an awaitable) every 10 ms until it returns something
    truthy, and return that; fail with the last value after `timeout` seconds.

    For conditions only the code under test can make true. To show that something did NOT
    happen, wait instead for what makes it impossible (a marker sent after it arrived, the task
    that would do it ended), never for a fixed time."""
    last: Any = None
    with trio.move_on_after(timeout):
        while True:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
            await trio.sleep(POLL)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what or predicate}; last: {last!r}"
    )


def until_sync(
    predicate: Callable[[], Any],
    timeout: float = TIMEOUT,
    what: str = "",
    *,
    while_down: bool = False,
) -> Any:
    """`until` for code outside trio (threads, real processes): blocking, same contract.

    `while_down`: a daemon that cannot be reached (not started yet, restarting) counts as "not
    yet"; an error answer (`DaemonError`) still fails at once, as any other exception does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = predicate()
        except DaemonError:
            raise
        except (ClientError, OSError) as exc:
            if not while_down:
                raise
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or predicate}; last: {last!r}"
            )
        time.sleep(POLL)


async def run_cli(*argv: str) -> int:
    """`peerdaemon ARGV...` in a thread (it blocks on the socket): its exit status."""
    return await trio.to_thread.run_sync(cli.main, list(argv))


# -- the local API: a fake handler behind the real socket server --------------------------
class FakeHandler:
    """Records what it applies; ops let tests control durability, failures and pushes."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, dict]] = []
        self.gates: dict[str, trio.Event] = {}
        self.sessions: list[Session] = []
        self.closed_subs: list[int] = []
        self.sessions_closed: list[Session] = []
        self.session_closed = trio.Event()
        self.sub_closed = trio.Event()
        self.blocked = trio.Event()
        self.block_returned = trio.Event()
        self.responses: dict[str, Any] = {}  # op -> canned result (for client tests)

    def gate(self, name: str) -> trio.Event:
        return self.gates.setdefault(name, trio.Event())

    def _sub_closed(self, sub: int) -> None:
        self.closed_subs.append(sub)
        self.sub_closed.set()

    async def handle(self, op: str, args: dict, session: Session) -> Any:
        self.applied.append((op, dict(args)))
        if session not in self.sessions:
            self.sessions.append(session)

            def closed(s: Session = session) -> None:
                self.sessions_closed.append(s)
                self.session_closed.set()

            session.on_close(closed)
        if op in self.responses:
            value = self.responses[op]
            return value(args) if callable(value) else value
        if op == "echo":
            return args
        if op == "fail":
            raise OpError("not-found", "no such thing")
        if op == "boom":
            raise RuntimeError("kaboom")
        if op == "durable":
            return Pending(self.gate(args["gate"]).wait, {"n": args.get("n")})
        if op == "durable-fail":

            async def fail() -> None:
                await self.gate(args["gate"]).wait()
                raise OpError("bad-update", "could not persist")

            return Pending(fail, None)
        if op == "block":
            self.blocked.set()
            await self.gate(args["gate"]).wait()
            self.block_returned.set()
            return "unblocked"
        if op in ("subscribe", "env.subscribe", "events.subscribe", "subscribe-fail"):
            box: list[int] = []
            sub = session.open_subscription(on_close=lambda: self._sub_closed(box[0]))
            box.append(sub)
            for event in args.get("early", []):
                session.push(sub, event)
            if op == "subscribe-fail":
                raise OpError("not-found", "cannot subscribe")
            if op == "env.subscribe":
                return {"sub": sub, "snapshot": {"uuid": args.get("id")}, "update": b"\x00\x00"}
            if op == "events.subscribe":
                return {"sub": sub, "cursor": args.get("since", 0)}
            return {"sub": sub}
        if op == "emit":
            session.push(args["sub"], args["event"])
            return None
        if op == "unsubscribe":
            return session.close_subscription(args["sub"])
        if op == "bytes":
            return b"\x00\x01\x02"
        if op == "unencodable":
            return object()
        if op == "big":
            return b"x" * args["n"]
        raise OpError("unknown-op", f"unknown operation {op!r}")


# -- the hub: a real hub in this process, and a y-websocket client -------------------------
SPACE = "team"


@asynccontextmanager
async def running_hub(data_dir: Path, **options):
    config = HubConfig(data_dir=data_dir, listen=("127.0.0.1", 0), accounts_poll=0.05)
    for key, value in options.items():
        setattr(config, key, value)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_hub, config)
        yield server
        nursery.cancel_scope.cancel()


def setup_accounts(data_dir: Path, *users: str) -> dict[str, str]:
    """Users (the first owns SPACE) -> tokens, written like the admin command does."""
    with Accounts.open(data_dir) as accounts:
        tokens = {user: accounts.add_user(user) for user in users}
        accounts.create_space(SPACE, users[0], "Team")
        return tokens


class YClient:
    """A minimal y-websocket client: a pycrdt doc kept in sync over one websocket."""

    def __init__(self, ws, doc: Doc | None = None) -> None:
        self.ws = ws
        self.doc = doc if doc is not None else Doc()  # a doc of an earlier connection: a reconnect
        self.messages: list = []

    async def recv(self):
        msg = decode_message(bytes(await self.ws.get_message()))
        self.messages.append(msg)
        if msg.kind == MSG_SYNC and msg.sub in (SYNC_STEP2, SYNC_UPDATE):
            self.doc.apply_update(msg.payload)
        elif msg.kind == MSG_SYNC and msg.sub == SYNC_STEP1:
            await self.ws.send_message(sync_step2(self.doc.get_update(msg.payload)))
        return msg

    async def sync(self) -> None:
        """Answer the server's step 1, send ours, wait for its step 2."""
        first = await self.recv()
        assert (first.kind, first.sub) == (MSG_SYNC, SYNC_STEP1)
        await self.ws.send_message(sync_step1(self.doc.get_state()))
        while True:
            msg = await self.recv()
            if msg.kind == MSG_SYNC and msg.sub == SYNC_STEP2:
                return

    async def edit(self, key: str, value: object) -> None:
        before = self.doc.get_state()
        self.doc.get("m", type=Map)[key] = value
        await self.ws.send_message(sync_update(self.doc.get_update(before)))

    def map(self) -> dict:
        return dict(self.doc.get("m", type=Map))

    async def wait_for(self, predicate, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self.recv()


def url(server, space: str, doc: str, token: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"token": token, **params}.items())
    return f"ws://127.0.0.1:{server.port}/yjs/{space}/{doc}?{query}"


@asynccontextmanager
async def client(server, space: str, doc: str, token: str, *, sync: bool = True, **params):
    async with open_websocket_url(
        url(server, space, doc, token, **params), max_message_size=64 << 20
    ) as ws:
        c = YClient(ws)
        if sync:
            await c.sync()
        yield c


def self_signed(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA, so a client can trust it as
    `cafile`) and its key, as PEM files in `where`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = where / "cert.pem", where / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
