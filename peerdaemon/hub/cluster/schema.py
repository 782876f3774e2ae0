"""The cluster's PostgreSQL schema and its migrations, as SQL (no I/O: `store.py` runs them).

It mirrors what the single hub keeps in its two SQLite files: the store's documents (log +
snapshots, `store/sqlite.py`) and settings (the hub's key, `hub.device-tokens`), and the
accounts file's users, tokens, spaces, members and limits (`hub/accounts.py`). Hosted-mock
settings need no table: they live in the space documents (`mocks`, docs/spaces.md), stored
here like any document. Differences from SQLite, and why:

- `doc_updates.seq` is global (bigserial) like the SQLite log's, but several processes insert
  at once, so a smaller seq may commit after a larger one: a compaction deletes exactly the
  rows it folded (by seq), and a load takes every row left, never "rows after the snapshot".
- `user` is reserved in PostgreSQL: those columns are `user_name`.
- `accounts_version` replaces SQLite's `PRAGMA data_version`: every statement that changes an
  accounts table bumps it (a trigger), so a hub process polling one row sees an admin command's
  change, even one whose kick it missed.
"""

from __future__ import annotations

__all__ = ["LOCK_ID", "MIGRATIONS", "SCHEMA_VERSION"]

LOCK_ID = 0x70645F6875620001
"""pg_advisory_xact_lock key: processes starting together migrate one at a time."""

_V1 = """
CREATE TABLE documents (
    space          text   NOT NULL,
    doc            text   NOT NULL,
    snapshot       bytea,                    -- the fold of every update compacted so far
    snapshot_bytes bigint NOT NULL DEFAULT 0,
    version        bigint NOT NULL DEFAULT 0,  -- compactions so far
    meta           bytea,                    -- CBOR map, as the SQLite store's env_meta
    created        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (space, doc)
);
CREATE TABLE doc_updates (
    seq    bigserial PRIMARY KEY,
    space  text  NOT NULL,
    doc    text  NOT NULL,
    blob   bytea NOT NULL,                   -- one Yjs update, opaque to the store
    origin text  NOT NULL DEFAULT '',
    FOREIGN KEY (space, doc) REFERENCES documents (space, doc) ON DELETE CASCADE
);
CREATE INDEX doc_updates_doc ON doc_updates (space, doc, seq);
CREATE TABLE settings (
    key   text  PRIMARY KEY,
    value bytea NOT NULL                     -- CBOR, as the SQLite store's settings
);

CREATE TABLE users (
    name           text PRIMARY KEY,
    personal_space text NOT NULL UNIQUE,
    created        double precision NOT NULL
);
CREATE TABLE tokens (
    hash      text PRIMARY KEY,              -- sha256(token) hex
    prefix    text NOT NULL,                 -- the token's handle, to list and revoke
    user_name text NOT NULL REFERENCES users (name),
    created   double precision NOT NULL,
    revoked   double precision               -- NULL while valid
);
CREATE INDEX tokens_prefix ON tokens (prefix);
CREATE TABLE spaces (
    id       text PRIMARY KEY,
    owner    text NOT NULL REFERENCES users (name),
    name     text NOT NULL DEFAULT '',
    personal boolean NOT NULL DEFAULT false,
    created  double precision NOT NULL
);
CREATE TABLE members (
    space     text NOT NULL REFERENCES spaces (id),
    user_name text NOT NULL REFERENCES users (name),
    PRIMARY KEY (space, user_name)
);
CREATE TABLE limits (
    scope text   NOT NULL,                   -- '' for the whole hub, else a user name
    key   text   NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE TABLE accounts_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);
INSERT INTO accounts_version VALUES (true, 0);
CREATE FUNCTION bump_accounts_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts_version SET version = version + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION bump_accounts_version();
CREATE TRIGGER tokens_changed AFTER INSERT OR UPDATE OR DELETE ON tokens
    FOR EACH STATEMENT EXECUTE FUNCTION bump_accounts_version();
CREATE TRIGGER spaces_changed AFTER INSERT OR UPDATE OR DELETE ON spaces
    FOR EACH STATEMENT EXECUTE FUNCTION bump_accounts_version();
CREATE TRIGGER members_changed AFTER INSERT OR UPDATE OR DELETE ON members
    FOR EACH STATEMENT EXECUTE FUNCTION bump_accounts_version();
CREATE TRIGGER limits_changed AFTER INSERT OR UPDATE OR DELETE ON limits
    FOR EACH STATEMENT EXECUTE FUNCTION bump_accounts_version();
"""

MIGRATIONS: dict[int, str] = {1: _V1}
"""version -> the script that upgrades (version - 1) to it; each runs in one transaction."""
SCHEMA_VERSION = max(MIGRATIONS)
