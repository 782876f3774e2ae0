"""Hub accounts: users, hashed tokens, spaces and their members, limits (docs/hub.md).

One SQLite file, `hub-accounts.sqlite3` in the hub's data dir, shared by the running hub and
the admin commands (`peerdaemon hub user add ...`) that run beside it: WAL mode lets both open
it, and the hub notices another process's commit through `PRAGMA data_version` (`refresh()`,
polled by the server), so a revoked token or a removed member is cut off within a second.

Tokens are `pdh_` + 43 base64url characters (256 random bits; the first is a letter or a digit),
shown once: the fixed prefix lets secret scanners recognise a leaked one, and no token starts
with `-`, which command lines would take for an option. Only their SHA-256 (hex) is stored, with
the first 12 characters (8 for tokens made before the prefix) as a handle for listing and
revoking; tokens of the older form (`token_urlsafe(32)`) keep working. Every user owns a
personal space (a random id) besides the team spaces created by the admin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "ACCOUNTS_DB",
    "LIMIT_KEYS",
    "Accounts",
    "AccountsError",
    "DeviceLease",
    "Devices",
    "LimitExceeded",
    "Limits",
    "User",
    "hash_token",
    "new_token",
]

ACCOUNTS_DB = "hub-accounts.sqlite3"
TOKEN_SCHEME = "pdh_"
"""Every token made now starts with this (as GitHub's start with `ghp_`)."""
TOKEN_RE = re.compile(r"pdh_[A-Za-z0-9][A-Za-z0-9_-]{42}")
TOKEN_PREFIX_LEN = len(TOKEN_SCHEME) + 8
"""Characters of a token kept as its handle (listing, revoking by prefix); 8 for older tokens."""
MIN_REVOKE_PREFIX = 6
"""Characters a revoke prefix needs, not counting `pdh_`."""
MAX_HASH_CANDIDATES = 16
"""At most this many tokens share a daemon's 8-byte `token_id` (in practice: one)."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name           TEXT PRIMARY KEY,
    personal_space TEXT NOT NULL UNIQUE,
    created        REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    hash    TEXT PRIMARY KEY,          -- sha256(token) hex
    prefix  TEXT NOT NULL,             -- the token's first 8 characters, to list and revoke
    user    TEXT NOT NULL REFERENCES users (name),
    created REAL NOT NULL,
    revoked REAL                       -- NULL while valid
);
CREATE INDEX IF NOT EXISTS tokens_prefix ON tokens (prefix);
CREATE TABLE IF NOT EXISTS spaces (
    id       TEXT PRIMARY KEY,
    owner    TEXT NOT NULL REFERENCES users (name),
    name     TEXT NOT NULL DEFAULT '',
    personal INTEGER NOT NULL DEFAULT 0,
    created  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    space TEXT NOT NULL REFERENCES spaces (id),
    user  TEXT NOT NULL REFERENCES users (name),
    PRIMARY KEY (space, user)
);
CREATE TABLE IF NOT EXISTS limits (
    scope TEXT NOT NULL,               -- '' for the whole hub, else a user name
    key   TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
"""


class AccountsError(Exception):
    """An admin operation that cannot be done (unknown user, duplicate, ambiguous prefix)."""


class LimitExceeded(Exception):
    """A limit refused a change; `reason` is the wire reason (`quota-exceeded`,
    `environment-too-large`, `too-many-devices`), the message says which limit and by how much."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Per-user limits (the owner's apply to a space's documents)."""

    envs_per_space: int = 100
    bytes_per_env: int = 64 << 20
    devices_per_user: int = 2
    hosted_mocks: int = 10  # Cloud Mocks served for the spaces a user owns
    mock_rps: int = 50  # requests per second to one Cloud Mock (429 past it)
    mock_body_bytes: int = 1 << 20  # largest request body a Cloud Mock takes (413 past it)


LIMIT_KEYS = tuple(f.name for f in fields(Limits))


@dataclass(frozen=True)
class User:
    name: str
    personal_space: str
    token_hash: str = ""  # the hash of the token this user was found by (to re-check it later)


def new_token() -> str:
    """`pdh_` + 256 random bits in base64url whose first character is a letter or a digit.

    Drawing again when the body starts with `-` or `_` costs under 0.05 bit of the 256.
    """
    while True:
        body = secrets.token_urlsafe(32)
        if body[0].isalnum():
            return TOKEN_SCHEME + body


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _new_space_id() -> str:
    """16 lower-case base32 characters, like the daemons' space ids."""
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


class Accounts:
    """Users, tokens, spaces, members and limits, on the trio thread (or an admin command)."""

    def __init__(self, db: sqlite3.Connection, path: Path, defaults: Limits) -> None:
        self._db = db
        self.path = path
        self.defaults = defaults
        self._version = self._data_version()
        self._limits_cache: dict[str, Limits] = {}
        self._owner_cache: dict[str, str | None] = {}
        self.devices = Devices(lambda user: self.limits_for(user).devices_per_user)
        self._listeners: dict[int, Callable[[], None]] = {}
        self._next_listener = 1

    @classmethod
    def open(cls, data_dir: Path, *, defaults: Limits | None = None) -> Accounts:
        data_dir = Path(data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = data_dir / ACCOUNTS_DB
        db = sqlite3.connect(str(path), isolation_level=None, timeout=10.0)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return cls(db, path, defaults or Limits())

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Accounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- change notification ---------------------------------------------------------------------
    def _data_version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def refresh(self) -> bool:
        """True (and caches dropped, listeners called) if another process changed the file."""
        version = self._data_version()
        if version == self._version:
            return False
        self._version = version
        self._changed()
        return True

    def add_change_listener(self, fn: Callable[[], None]) -> int:
        """`fn()` after any change of accounts (here or by an admin command, seen at refresh)."""
        token = self._next_listener
        self._next_listener += 1
        self._listeners[token] = fn
        return token

    def remove_change_listener(self, token: int) -> None:
        self._listeners.pop(token, None)

    def _changed(self) -> None:
        self._limits_cache.clear()
        self._owner_cache.clear()
        for fn in list(self._listeners.values()):
            fn()

    def _write(self, sql: str, *params: Any) -> sqlite3.Cursor:
        cur = self._db.execute(sql, params)
        self._changed()
        return cur

    # -- users and tokens ------------------------------------------------------------------------
    def add_user(self, name: str) -> str:
        """Create `name` with its personal space; returns its first token (shown once)."""
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise AccountsError(
                f"invalid user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-'"
            )
        if self._user_row(name) is not None:
            raise AccountsError(f"user {name!r} already exists")
        now = time.time()
        space = _new_space_id()
        token = new_token()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO users (name, personal_space, created) VALUES (?, ?, ?)",
                (name, space, now),
            )
            self._db.execute(
                "INSERT INTO spaces (id, owner, name, personal, created) VALUES (?, ?, ?, 1, ?)",
                (space, name, f"{name} (personal)", now),
            )
            self._insert_token(name, token, now)
        self._changed()
        return token

    def add_token(self, name: str) -> str:
        """Another token for `name` (a second device, a rotation); shown once."""
        self._require_user(name)
        token = new_token()
        self._insert_token(name, token, time.time())
        self._changed()
        return token

    def _insert_token(self, name: str, token: str, now: float) -> None:
        self._db.execute(
            "INSERT INTO tokens (hash, prefix, user, created) VALUES (?, ?, ?, ?)",
            (hash_token(token), token[:TOKEN_PREFIX_LEN], name, now),
        )

    def revoke_token(self, token_or_prefix: str) -> str:
        """Revoke a token given whole or by a unique prefix of its handle (>= 6 characters
        after `pdh_`); -> its user."""
        text = (token_or_prefix or "").strip()
        row = self._db.execute(
            "SELECT hash, user FROM tokens WHERE hash = ? AND revoked IS NULL", (hash_token(text),)
        ).fetchone()
        if row is None:
            body = text.removeprefix(TOKEN_SCHEME)
            if len(body) < MIN_REVOKE_PREFIX:
                raise AccountsError(
                    f"give the whole token or at least {MIN_REVOKE_PREFIX} characters of it"
                    f" (after {TOKEN_SCHEME!r})"
                )
            rows = self._db.execute(
                "SELECT hash, user FROM tokens WHERE revoked IS NULL"
                " AND length(prefix) >= ? AND substr(prefix, 1, ?) = ?",
                (len(text), len(text), text),
            ).fetchall()
            if not rows:
                raise AccountsError("no such token (or it is already revoked)")
            if len(rows) > 1:
                raise AccountsError("ambiguous token prefix: give the whole token")
            row = rows[0]
        self._write("UPDATE tokens SET revoked = ? WHERE hash = ?", time.time(), row[0])
        return str(row[1])

    def tokens(self, user: str | None = None) -> list[dict[str, Any]]:
        """Tokens as `{prefix, user, created, revoked}` (never the token itself)."""
        sql = "SELECT prefix, user, created, revoked FROM tokens"
        rows = self._db.execute(
            sql + (" WHERE user = ? ORDER BY created" if user else " ORDER BY user, created"),
            (user,) if user else (),
        ).fetchall()
        return [
            {"prefix": p, "user": u, "created": c, "revoked": r is not None} for p, u, c, r in rows
        ]

    def user_of(self, token: str) -> User | None:
        """The user a valid token belongs to, else None (unknown, revoked, malformed)."""
        if not isinstance(token, str) or not token or len(token) > 512:
            return None
        return self.user_of_hash(hash_token(token))

    def user_of_hash(self, token_hash: str) -> User | None:
        row = self._db.execute(
            "SELECT t.hash, u.name, u.personal_space FROM tokens t JOIN users u ON u.name = t.user"
            " WHERE t.hash = ? AND t.revoked IS NULL",
            (token_hash,),
        ).fetchone()
        if row is None or not hmac.compare_digest(row[0], token_hash):
            return None
        return User(row[1], row[2], row[0])

    def users_by_hash_prefix(self, prefix: bytes) -> list[tuple[str, User]]:
        """The valid (not revoked) tokens whose SHA-256 starts with `prefix` (a daemon's
        `token_id`, hub mode), as `(token hash hex, user)`: the candidates to check its proof
        against. A range scan of the primary key (hashes are lower-case hex)."""
        if not isinstance(prefix, bytes) or not 0 < len(prefix) <= 32:
            return []
        low = prefix.hex()
        rows = self._db.execute(
            "SELECT t.hash, u.name, u.personal_space FROM tokens t JOIN users u ON u.name = t.user"
            " WHERE t.hash >= ? AND t.hash < ? AND t.revoked IS NULL ORDER BY t.hash LIMIT ?",
            (low, low + "g", MAX_HASH_CANDIDATES),
        ).fetchall()
        return [(h, User(name, space, h)) for h, name, space in rows if h.startswith(low)]

    def users(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT name, personal_space, created FROM users ORDER BY name"
        ).fetchall()
        return [{"name": n, "personal_space": s, "created": c} for n, s, c in rows]

    def _user_row(self, name: str) -> tuple | None:
        return self._db.execute("SELECT name FROM users WHERE name = ?", (name,)).fetchone()

    def _require_user(self, name: str) -> None:
        if self._user_row(name) is None:
            raise AccountsError(f"no such user {name!r}")

    # -- spaces ----------------------------------------------------------------------------------
    def create_space(self, space_id: str, owner: str, name: str = "") -> None:
        if not isinstance(space_id, str) or not _SPACE_RE.fullmatch(space_id):
            raise AccountsError(
                f"invalid space id {space_id!r}: 1-64 letters, digits, '.', '_' or '-'"
            )
        self._require_user(owner)
        if self.space(space_id) is not None:
            raise AccountsError(f"space {space_id!r} already exists")
        self._write(
            "INSERT INTO spaces (id, owner, name, personal, created) VALUES (?, ?, ?, 0, ?)",
            space_id,
            owner,
            name,
            time.time(),
        )

    def add_member(self, space_id: str, user: str) -> None:
        info = self._require_space(space_id)
        self._require_user(user)
        if info["personal"]:
            raise AccountsError(f"space {space_id!r} is {info['owner']}'s personal space")
        self._write("INSERT OR IGNORE INTO members (space, user) VALUES (?, ?)", space_id, user)

    def remove_member(self, space_id: str, user: str) -> None:
        self._require_space(space_id)
        cur = self._write("DELETE FROM members WHERE space = ? AND user = ?", space_id, user)
        if cur.rowcount == 0:
            raise AccountsError(f"{user!r} is not a member of space {space_id!r}")

    def can_access(self, user: str, space_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM spaces s WHERE s.id = ? AND (s.owner = ? OR EXISTS"
            " (SELECT 1 FROM members m WHERE m.space = s.id AND m.user = ?))",
            (space_id, user, user),
        ).fetchone()
        return row is not None

    def spaces_of(self, user: str) -> list[str]:
        """The spaces `user` reaches: its personal space first, then owned and member spaces."""
        rows = self._db.execute(
            "SELECT id FROM spaces WHERE owner = ? OR id IN (SELECT space FROM members WHERE user = ?)"
            " ORDER BY personal DESC, id",
            (user, user),
        ).fetchall()
        return [r[0] for r in rows]

    def space(self, space_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT id, owner, name, personal, created FROM spaces WHERE id = ?", (space_id,)
        ).fetchone()
        if row is None:
            return None
        members = [
            r[0]
            for r in self._db.execute(
                "SELECT user FROM members WHERE space = ? ORDER BY user", (space_id,)
            )
        ]
        return {
            "id": row[0],
            "owner": row[1],
            "name": row[2],
            "personal": bool(row[3]),
            "created": row[4],
            "members": members,
        }

    def spaces(self) -> list[dict[str, Any]]:
        ids = [r[0] for r in self._db.execute("SELECT id FROM spaces ORDER BY personal, id")]
        return [s for s in (self.space(i) for i in ids) if s is not None]

    def owner_of(self, space_id: str) -> str | None:
        if space_id not in self._owner_cache:
            row = self._db.execute("SELECT owner FROM spaces WHERE id = ?", (space_id,)).fetchone()
            self._owner_cache[space_id] = row[0] if row else None
        return self._owner_cache[space_id]

    def _require_space(self, space_id: str) -> dict[str, Any]:
        info = self.space(space_id)
        if info is None:
            raise AccountsError(f"no such space {space_id!r}")
        return info

    # -- limits ----------------------------------------------------------------------------------
    def set_limit(self, key: str, value: int, user: str | None = None) -> None:
        """Set a limit for the whole hub (`user=None`) or for one user."""
        if key not in LIMIT_KEYS:
            raise AccountsError(f"unknown limit {key!r} (one of: {', '.join(LIMIT_KEYS)})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise AccountsError(f"limit {key} must be an integer >= 0")
        if user is not None:
            self._require_user(user)
        self._write(
            "INSERT INTO limits (scope, key, value) VALUES (?, ?, ?)"
            " ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
            user or "",
            key,
            value,
        )

    def set_defaults(self, defaults: Limits) -> None:
        """New hub-wide defaults (the config file's `[limits]`, re-read by a running hub): they
        take effect as a `hub limits set` does, caches dropped and listeners told."""
        if defaults != self.defaults:
            self.defaults = defaults
            self._changed()

    def limits_for(self, user: str | None) -> Limits:
        """Built-in defaults < the config file (`defaults`) < `hub limits set` < `--user`."""
        name = user or ""
        cached = self._limits_cache.get(name)
        if cached is not None:
            return cached
        limits = self.defaults
        scopes = ("", name) if name else ("",)
        for scope in scopes:
            rows = self._db.execute(
                "SELECT key, value FROM limits WHERE scope = ?", (scope,)
            ).fetchall()
            values = {k: v for k, v in rows if k in LIMIT_KEYS}
            if values:
                limits = replace(limits, **values)
        self._limits_cache[name] = limits
        return limits

    def space_limits(self, space_id: str) -> Limits:
        """The limits that apply to a space's documents: its owner's."""
        return self.limits_for(self.owner_of(space_id))

    def limits_table(self) -> dict[str, dict[str, int]]:
        """What `hub limits set` stored: {'' (hub) or user: {key: value}}."""
        out: dict[str, dict[str, int]] = {}
        for scope, key, value in self._db.execute("SELECT scope, key, value FROM limits"):
            out.setdefault(scope, {})[key] = value
        return out


class DeviceLease:
    """One connection's hold on a device slot; `release()` (idempotent) gives it back."""

    __slots__ = ("_devices", "user", "device", "_released")

    def __init__(self, devices: Devices, user: str, device: str) -> None:
        self._devices = devices
        self.user = user
        self.device = device
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._devices._release(self.user, self.device)

    def __enter__(self) -> DeviceLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Devices:
    """Devices connected right now, per user (in memory): the `devices_per_user` limit.

    A device is a daemon's device id, or a y-websocket client's `?device=` parameter, or else
    the connection itself. Several connections of one device take one slot.
    """

    def __init__(self, limit_of: Callable[[str], int]) -> None:
        self._limit_of = limit_of
        self._held: dict[str, dict[str, int]] = {}

    def acquire(self, user: str, device: str) -> DeviceLease:
        held = self._held.setdefault(user, {})
        if device not in held:
            limit = self._limit_of(user)
            if len(held) >= limit:
                if not held:
                    self._held.pop(user, None)
                raise LimitExceeded(
                    "too-many-devices",
                    f"user {user} already has {len(held)} device(s) connected (limit {limit})",
                )
        held[device] = held.get(device, 0) + 1
        return DeviceLease(self, user, device)

    def _release(self, user: str, device: str) -> None:
        held = self._held.get(user)
        if held is None or device not in held:
            return
        held[device] -= 1
        if held[device] <= 0:
            del held[device]
        if not held:
            del self._held[user]

    def of(self, user: str) -> list[str]:
        return sorted(self._held.get(user, {}))
