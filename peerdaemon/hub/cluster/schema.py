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
- `env_reservations` has no SQLite counterpart: one process counts its own documents, several
  need a place per environment taken under a per-space lock (`reserve_env`) before creating.
- `accounts_version` replaces SQLite's `PRAGMA data_version`: every statement that changes an
  accounts table bumps it (a trigger), so a hub process polling one row sees an admin command's
  change, even one whose kick it missed.
"""

from __future__ import annotations

__all__ = ["ENV_LOCK_NS", "LOCK_ID", "MIGRATIONS", "SCHEMA_VERSION"]

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

ENV_LOCK_NS = 0x70640002
"""First key of the two-key advisory lock `reserve_env` takes per space (hashtext of its id is
the second): two-key locks never meet `LOCK_ID`'s one-key lock."""

_V2 = f"""
-- envs_per_space across processes (docs/hub-cluster.md, "Limits across the cluster"): one row
-- per environment a space holds or is creating, taken by `reserve_env` under a per-space lock
-- before a process creates it, so what is still in a writer's queue counts. Space documents
-- and files ('space:', 'files:': hub/docs.py's prefixes) are not environments.
CREATE TABLE IF NOT EXISTS env_reservations (
    space   text    NOT NULL,
    doc     text    NOT NULL,
    holders integer NOT NULL DEFAULT 1,      -- processes that reserved it (released on failure)
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (space, doc)
);
INSERT INTO env_reservations (space, doc, created)
    SELECT space, doc, created FROM documents
    WHERE doc NOT LIKE 'space:%' AND doc NOT LIKE 'files:%'
    ON CONFLICT DO NOTHING;

-- every stored environment holds a place, however it came (a process that could not reserve
-- while PostgreSQL was away); deleting a document frees it
CREATE FUNCTION env_stored() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO env_reservations (space, doc) VALUES (NEW.space, NEW.doc) ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER documents_reserve AFTER INSERT ON documents FOR EACH ROW
    WHEN (NEW.doc NOT LIKE 'space:%' AND NEW.doc NOT LIKE 'files:%')
    EXECUTE FUNCTION env_stored();
CREATE FUNCTION env_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM env_reservations WHERE space = OLD.space AND doc = OLD.doc;
    RETURN NULL;
END $$;
CREATE TRIGGER documents_free AFTER DELETE ON documents FOR EACH ROW
    EXECUTE FUNCTION env_deleted();

-- A place for `p_doc` in `p_space`, in one statement (one round trip, its own transaction):
-- (true, environments held with it) if it has one already or the space holds fewer than
-- `p_limit` (counting `p_known`, what the caller knows of, if more), else (false, held).
-- Before refusing, places older than `p_grace` seconds whose document was never stored are
-- given back (a process killed between reserving and its first commit).
CREATE FUNCTION reserve_env(
    p_space text, p_doc text, p_limit bigint, p_known bigint, p_grace double precision,
    OUT reserved boolean, OUT held bigint
) LANGUAGE plpgsql AS $$
BEGIN
    -- not waiting for the disk: the document's own first commit (synchronous) flushes this
    -- with it; a PostgreSQL crash before that loses both, and the trigger above then
    -- reserves when the writer stores it again
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock({ENV_LOCK_NS}, hashtext(p_space));
    UPDATE env_reservations SET holders = holders + 1 WHERE space = p_space AND doc = p_doc;
    IF FOUND THEN
        reserved := true;
        SELECT count(*) INTO held FROM env_reservations WHERE space = p_space;
        RETURN;
    END IF;
    SELECT count(*) INTO held FROM env_reservations WHERE space = p_space;
    IF greatest(held, p_known) >= p_limit THEN
        DELETE FROM env_reservations r
            WHERE r.space = p_space AND r.created < now() - make_interval(secs => p_grace)
            AND NOT EXISTS (SELECT 1 FROM documents d WHERE d.space = r.space AND d.doc = r.doc);
        IF FOUND THEN
            SELECT count(*) INTO held FROM env_reservations WHERE space = p_space;
        END IF;
    END IF;
    reserved := greatest(held, p_known) < p_limit;
    IF reserved THEN
        INSERT INTO env_reservations (space, doc) VALUES (p_space, p_doc);
        held := held + 1;
    END IF;
END $$;

-- A reservation the caller took but did not use (the update created nothing, or was refused
-- for its size): given back unless another process holds it too or the document is stored.
CREATE FUNCTION release_env(p_space text, p_doc text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock({ENV_LOCK_NS}, hashtext(p_space));
    UPDATE env_reservations SET holders = greatest(holders - 1, 0)
        WHERE space = p_space AND doc = p_doc;
    DELETE FROM env_reservations r WHERE r.space = p_space AND r.doc = p_doc AND r.holders = 0
        AND NOT EXISTS (SELECT 1 FROM documents d WHERE d.space = r.space AND d.doc = r.doc);
END $$;
"""

MIGRATIONS: dict[int, str] = {1: _V1, 2: _V2}
"""version -> the script that upgrades (version - 1) to it; each runs in one transaction."""
SCHEMA_VERSION = max(MIGRATIONS)
