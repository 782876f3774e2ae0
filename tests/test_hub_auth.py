"""Hub-mode token proofs (docs/peer-protocol.md, section 11), in memory: a daemon's
`HubClientAuth` against the hub's real `HubAuth` over real `Accounts`, two `PeerConnection`s
wired back to back.

Covered: the token (and its whole hash) never appears in anything the daemon sends, cleartext or
inside a box; the auth carries `token_id` and a proof bound to the transcript; a proof taken from
one connection is refused on another (replay, or a man in the middle relaying it); a proof made
for the other role is refused; a wrong, a revoked, and an old-style plain token get
`unauthorized`; `Accounts.users_by_hash_prefix` finds only valid tokens; a pinned hub device id
that differs refuses the hub before the daemon's auth is sent (`hub-key-changed`).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

import cbor2
import pytest
from peerutil import FakeHost, drain_events, exchange, make_identity, make_space

from peerdaemon.hub.accounts import Accounts, hash_token
from peerdaemon.hub.peers import HubAuth, HubRequest
from peerdaemon.hublink import HubClientAuth
from peerdaemon.peer import PeerConnection
from peerdaemon.peer.crypto import DIALER, LISTENER, SecureChannel, hub_token_proof
from peerdaemon.peer.session import Closed


class Endpoint:
    """What `HubAuth` needs of the hub's `PeerEndpoint`: the accounts, and registering spaces."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    def register_space(self, space_id: str, owner: str, name: str) -> bool:
        if self.accounts.space(space_id) is not None:
            return False
        self.accounts.create_space(space_id, owner, name)
        return True


@pytest.fixture
def accounts(tmp_path: Path):
    with Accounts.open(tmp_path / "hub") as acc:
        yield acc


class Capture:
    """Every message a connection sends: its wire bytes, and the plaintext of each box it seals
    (recorded by wrapping `SecureChannel.seal`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sealed: list[tuple[SecureChannel, dict[str, Any]]] = []
        self.wire: dict[int, list[bytes]] = {}
        seal = SecureChannel.seal

        def recording_seal(channel: SecureChannel, inner: dict[str, Any]) -> bytes:
            self.sealed.append((channel, inner))
            return seal(channel, inner)

        monkeypatch.setattr(SecureChannel, "seal", recording_seal)

    def watch(self, conn: PeerConnection) -> PeerConnection:
        out = self.wire.setdefault(id(conn), [])
        send = conn.data_to_send

        def recording_send() -> list[bytes]:
            data = send()
            out.extend(data)
            return data

        conn.data_to_send = recording_send  # type: ignore[method-assign]
        return conn

    def sent_by(self, conn: PeerConnection) -> tuple[list[bytes], list[dict[str, Any]]]:
        """(wire messages, plaintexts of its boxes)."""
        channel = conn.handshake.channel
        return self.wire.get(id(conn), []), [m for ch, m in self.sealed if ch is channel]


def pair(
    daemon_auth: Any, accounts: Accounts, *, hub_ident: Any = None
) -> tuple[PeerConnection, PeerConnection]:
    s1 = make_space("s1")
    d = PeerConnection(
        make_identity("daemon"), FakeHost([s1]), dialer=True, now=0.0, auth=daemon_auth
    )
    h = PeerConnection(
        hub_ident or make_identity("hub"),
        FakeHost(),
        dialer=False,
        now=0.0,
        auth=HubAuth(Endpoint(accounts)),  # type: ignore[arg-type]
    )
    return d, h


def closed(conn: PeerConnection) -> Closed:
    return next(e for e in drain_events(conn) if isinstance(e, Closed))


def test_the_token_never_leaves_the_daemon(accounts, monkeypatch):
    token = accounts.add_user("alice")
    capture = Capture(monkeypatch)
    d, h = pair(HubClientAuth(token, {"s1": "Team"}, trust_first_use=True), accounts)
    capture.watch(d)
    exchange(d, h)
    assert d.state == h.state == "open" and d.spaces == {"s1"}
    assert h.handshake.auth.user == "alice"  # type: ignore[union-attr]
    assert accounts.space("s1")["owner"] == "alice"  # registered by the first attach

    wire, plain = capture.sent_by(d)
    [auth] = [m for m in plain if m["t"] == "auth"]
    digest = hashlib.sha256(token.encode()).digest()
    assert auth["hub"]["token_id"] == digest[:8] and len(auth["hub"]["proof"]) == 32
    assert "token" not in auth["hub"]
    assert wire and plain
    secrets = [token.encode(), digest, digest.hex().encode(), token[:8].encode()]
    for data in [*wire, *(cbor2.dumps(m) for m in plain)]:
        for secret in secrets:
            assert secret not in data


def test_a_proof_from_another_connection_is_refused(accounts, monkeypatch):
    token = accounts.add_user("alice")
    capture = Capture(monkeypatch)
    d1, h1 = pair(HubClientAuth(token, {"s1": "Team"}, trust_first_use=True), accounts)
    exchange(d1, h1)
    assert h1.state == "open"
    [auth] = [m for ch, m in capture.sealed if ch is d1.handshake.channel and m["t"] == "auth"]
    th1 = d1.handshake.th

    class Replay(HubClientAuth):
        """Shows the proof seen on the first connection (a replay, or a man in the middle
        relaying one side's proof to the other: either way, another transcript)."""

        def auth_fields(self, peer: Any, th: bytes, role: bytes) -> dict[str, Any]:
            return {"tags": [], "hub": dict(auth["hub"])}

    d2, h2 = pair(Replay("not-the-token", {"s1": "Team"}), accounts)
    exchange(d2, h2)
    assert d2.handshake.th != th1
    assert closed(h2).reason == "unauthorized" and h2.session is None
    assert closed(d2).reason == "unauthorized" and d2.session is None

    request = HubRequest.parse(auth)
    assert request.verify(hash_token(token), th1, DIALER)
    assert not request.verify(hash_token(token), d2.handshake.th, DIALER)
    assert not request.verify(hash_token(token), th1, LISTENER)  # not a reflected proof
    assert not request.verify(hash_token("other"), th1, DIALER)


def test_wrong_revoked_and_plain_tokens_are_unauthorized(accounts):
    good = accounts.add_user("alice")
    spare = accounts.add_token("alice")
    accounts.revoke_token(spare)
    for token in ("not-a-token", spare):
        d, h = pair(HubClientAuth(token, {"s1": "Team"}, trust_first_use=True), accounts)
        exchange(d, h)
        event = closed(h)
        assert (event.reason, event.detail) == ("unauthorized", "unknown or revoked token")
        assert closed(d).reason == "unauthorized"
    assert accounts.space("s1") is None  # nothing registered

    class Plain(HubClientAuth):
        """An old-style auth that sends the token itself: refused."""

        def auth_fields(self, peer: Any, th: bytes, role: bytes) -> dict[str, Any]:
            return {"tags": [], "hub": {"token": good, "spaces": ["s1"], "register": []}}

    d, h = pair(Plain(good, {"s1": "Team"}), accounts)
    exchange(d, h)
    assert closed(h).reason == "unauthorized" and h.session is None

    # the good one still works
    d, h = pair(HubClientAuth(good, {"s1": "Team"}, trust_first_use=True), accounts)
    exchange(d, h)
    assert d.state == h.state == "open"


def test_users_by_hash_prefix(accounts):
    token = accounts.add_user("alice")
    second = accounts.add_token("alice")
    digest = bytes.fromhex(hash_token(token))
    [(found_hash, user)] = accounts.users_by_hash_prefix(digest[:8])
    assert found_hash == hash_token(token) and user.name == "alice"
    assert user.token_hash == found_hash
    assert accounts.users_by_hash_prefix(bytes.fromhex(hash_token(second))[:8])[0][1].name == (
        "alice"
    )
    accounts.revoke_token(token)
    assert accounts.users_by_hash_prefix(digest[:8]) == []  # revoked: no candidate
    assert accounts.users_by_hash_prefix(bytes(8)) == []
    assert accounts.users_by_hash_prefix(b"") == []


def test_a_changed_hub_key_is_refused_before_the_auth(accounts, monkeypatch):
    token = accounts.add_user("alice")
    hub = make_identity("hub")
    capture = Capture(monkeypatch)
    d, h = pair(HubClientAuth(token, {"s1": "Team"}, pinned=hub.device_id), accounts, hub_ident=hub)
    exchange(d, h)
    assert d.state == h.state == "open"  # the pinned key: accepted

    d, h = pair(HubClientAuth(token, {"s1": "Team"}, pinned=hub.device_id), accounts)
    capture.watch(d)
    exchange(d, h)
    event = closed(d)
    assert event.reason == "hub-key-changed" and hub.device_id in event.detail
    assert closed(h).reason == "hub-key-changed"  # told why, in a box
    _, plain = capture.sent_by(d)
    assert [m["t"] for m in plain] == ["close"]  # no auth, no proof: nothing but the close
    assert d.session is None and h.session is None


def test_the_proof_is_the_documented_hmac():
    th = bytes(range(32))
    key = hashlib.sha256(b"tok").digest()  # the raw hash: what the hub stores, in hex
    mac = hmac.new(key, b"peerdaemon-hub-token-v1" + b"D" + th, hashlib.sha256).digest()
    assert hub_token_proof(key, DIALER, th) == mac
