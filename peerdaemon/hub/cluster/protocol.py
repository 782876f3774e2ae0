"""The cluster bus's layout in Redis, without I/O: key names, entries, readers' cursors, kicks.

Per room (one document of one space) two streams, both with the room in a hash tag so that a
room's keys live in one slot of a Redis Cluster and one XREAD reads them together:

- `pd:{SPACE/DOC}:u`, the room's document updates. Every hub process with clients in the room
  reads it and applies its entries in stream order. It is trimmed only by the compaction
  worker (`safe_trim_id`), after PostgreSQL holds what it trims.
- `pd:{SPACE/DOC}:a`, the room's awareness. Every append trims what is older than
  `AWARENESS_TTL_MS` (XADD MINID ~) and renews the key's expiry, so a room whose clients went
  quiet loses its awareness stream by itself, compaction or not (y/hub's issue #64: awareness-only
  streams that grow without bound while nobody compacts).

Cluster-wide: `pd:kicks` (revocations and removed members, a stream capped by length, read by
every process beside its rooms), `pd:epoch` (a random value set by the first process that finds
it missing: a Redis that restarted empty has a new one, which tells every reader what it lost),
per-room compaction locks `pd:{SPACE/DOC}:lock`, and counters under `pd:{c:NAME}`.

On a Redis Cluster each master can restart empty on its own, so each room has its own epoch,
`pd:{SPACE/DOC}:e` (`room_epoch_key`: in the room's slot, so it moves with the room's streams
when the cluster is resharded, and one script reads it with the streams), and the kicks theirs,
`{pd:kicks}:e`. A process learns a room's epoch from its first append there (the XADD's script
returns it) or its first read, whichever comes first: a master lost after that is seen, and
only that master's rooms are resynced. A room's epoch key expires a day after the last process
following it last looked (`ROOM_EPOCH_TTL_MS`).

Entry fields are short byte keys: `k` (kind: `u` update, `a` awareness), `o` (origin: the
process id and the connection, so a process skips what it sent itself), `d` (the payload, a Yjs
update or a y-protocols awareness update, opaque here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "AWARENESS",
    "AWARENESS_TTL_MS",
    "EPOCH_KEY",
    "KICKS_KEY",
    "UPDATE",
    "BusEntry",
    "Cursors",
    "Kick",
    "StreamId",
    "ALIVE_TTL_MS",
    "alive_key",
    "awareness_key",
    "counter_key",
    "decode_entry",
    "devices_key",
    "encode_entry",
    "lock_key",
    "room_of",
    "safe_trim_id",
    "KICKS_EPOCH_KEY",
    "ROOM_EPOCH_TTL_MS",
    "room_epoch_key",
    "update_key",
]

UPDATE = b"u"
AWARENESS = b"a"
AWARENESS_TTL_MS = 30_000
"""y-protocols' awareness timeout: a state not renewed for this long is gone anyway."""
AWARENESS_KEY_TTL_MS = 2 * AWARENESS_TTL_MS
"""An awareness stream nobody appended to for this long expires as a whole."""
KICKS_KEY = "pd:kicks"
KICKS_MAXLEN = 10_000
EPOCH_KEY = "pd:epoch"
START = "0-0"
"""A cursor that reads a stream from its first entry."""

_ROOM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_ID_RE = re.compile(r"(\d{1,20})-(\d{1,20})")


def room_of(space_id: str, doc_id: str) -> str:
    """The room name `SPACE/DOC` (the hub's ids: letters, digits and `._-`, `:` in doc ids), so
    no braces can reach a key's hash tag. ValueError on anything else."""
    room = f"{space_id}/{doc_id}"
    if not _ROOM_RE.fullmatch(room):
        raise ValueError(f"not a room: {room!r}")
    return room


def update_key(room: str) -> str:
    return f"pd:{{{room}}}:u"


def awareness_key(room: str) -> str:
    return f"pd:{{{room}}}:a"


def lock_key(room: str) -> str:
    return f"pd:{{{room}}}:lock"


def counter_key(name: str) -> str:
    return f"pd:{{c:{name}}}"


def devices_key(user: str) -> str:
    return f"pd:{{d:{user}}}"


def room_epoch_key(room: str) -> str:
    """The room's epoch on a Redis Cluster (KICKS_KEY: the kicks' epoch)."""
    return KICKS_EPOCH_KEY if room == KICKS_KEY else f"pd:{{{room}}}:e"


KICKS_EPOCH_KEY = "{pd:kicks}:e"  # (the tag is the kicks' whole key: the same slot)
ROOM_EPOCH_TTL_MS = 24 * 3600 * 1000


def alive_key(process: str) -> str:
    """A hub process's heartbeat: set every second, gone `ALIVE_TTL_MS` after it died."""
    return f"pd:{{p:{process}}}:alive"


ALIVE_TTL_MS = 3000


@dataclass(frozen=True, order=True)
class StreamId:
    """A Redis stream id, `MS-SEQ`, ordered as Redis orders them."""

    ms: int
    seq: int = 0

    @classmethod
    def parse(cls, text: str | bytes) -> StreamId:
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        m = _ID_RE.fullmatch(text)
        if m is None:
            raise ValueError(f"not a stream id: {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


def safe_trim_id(folded_upto: StreamId, now_ms: int, commit_lag_ms: int) -> StreamId:
    """Where the compaction worker may trim a room's update stream (XTRIM MINID: entries below
    it go): below what its fold covered, and never within `commit_lag_ms` of now.

    An entry is relayed before its writer's PostgreSQL commit (docs/hub-cluster.md,
    "Accepted"), so the newest entries may not be in the database yet even when older ones
    are; a process that opens the room loads PostgreSQL and then reads the stream from its
    start, so the stream must keep whatever may still be on its way to the database. A writer
    whose commit takes longer than half the lag publishes the update again.
    """
    horizon = StreamId(max(0, now_ms - commit_lag_ms), 0)
    return min(folded_upto, horizon)


@dataclass(frozen=True)
class BusEntry:
    """One entry read from a room's stream (`room` None: a kick, in `kick`)."""

    room: str | None
    kind: bytes
    id: StreamId
    origin: str
    data: bytes
    kick: Kick | None = None


def encode_entry(kind: bytes, origin: str, data: bytes) -> dict[bytes, bytes]:
    if kind not in (UPDATE, AWARENESS):
        raise ValueError(f"unknown entry kind {kind!r}")
    return {b"k": kind, b"o": origin.encode("utf-8"), b"d": bytes(data)}


def decode_entry(
    room: str, entry_id: str | bytes, fields: Mapping[bytes | str, bytes | str]
) -> BusEntry | None:
    """An entry of a room's stream, or None if it is not one of ours (skipped, not fatal)."""
    values = {(k.encode() if isinstance(k, str) else k): v for k, v in fields.items()}
    kind, origin, data = values.get(b"k"), values.get(b"o"), values.get(b"d")
    if isinstance(kind, str):
        kind = kind.encode()
    if isinstance(origin, bytes):
        origin = origin.decode("utf-8", "replace")
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if kind not in (UPDATE, AWARENESS) or not isinstance(origin, str) or data is None:
        return None
    try:
        sid = StreamId.parse(entry_id)
    except ValueError:
        return None
    return BusEntry(room, kind, sid, origin, data)


@dataclass(frozen=True)
class Kick:
    """Cut connections cluster-wide: those of `user` (all, or in `space` only), or those admitted
    with the token whose hash is `token_hash`; `reason` is the close reason
    (`unauthorized`, `forbidden`, `device-removed`)."""

    reason: str
    user: str | None = None
    space: str | None = None
    token_hash: str | None = None

    def encode(self) -> dict[bytes, bytes]:
        body = {k: v for k, v in self.__dict__.items() if v is not None}
        return {b"kick": json.dumps(body, sort_keys=True).encode("utf-8")}

    @classmethod
    def decode(cls, fields: Mapping[bytes | str, bytes | str]) -> Kick | None:
        raw = fields.get(b"kick", fields.get("kick"))
        try:
            body = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("reason"), str):
            return None
        opt = {k: body.get(k) for k in ("user", "space", "token_hash")}
        if not all(v is None or isinstance(v, str) for v in opt.values()):
            return None
        return cls(body["reason"], **opt)

    def matches(self, user: str, space: str, token_hash: str) -> bool:
        """Whether a connection of `user` to `space`, admitted with `token_hash`, must go."""
        if self.token_hash is not None and self.token_hash != token_hash:
            return False
        if self.user is not None and self.user != user:
            return False
        if self.space is not None and self.space != space:
            return False
        return any(v is not None for v in (self.user, self.token_hash))


@dataclass
class Cursors:
    """What one process reads: for each room it serves, how far it read each of the room's two
    streams, and how far it read the kicks. `streams()` is XREAD's argument; `advance` takes
    what came back. Rooms are added at `START` (after loading PostgreSQL: docs/hub-cluster.md,
    "Opening a room") and removed when their last client leaves."""

    kicks: str = START  # the shell starts it at the newest kick (`RoomBus.start_cursors`)
    epoch: str | None = None
    """The Redis epoch these positions are in (set by the first read): ids mean nothing in
    another one, so a reader that stopped and starts again still sees a loss in between."""
    room_epochs: dict[str, str] = field(default_factory=dict)
    """On a Redis Cluster: the epoch of each room followed, and of the kicks (KICKS_KEY)."""
    _ids: dict[str, str] = field(default_factory=dict)  # stream key -> last id read
    _rooms: dict[str, str] = field(default_factory=dict)  # stream key -> room

    def add(self, room: str, since: str = START) -> None:
        for key in (update_key(room), awareness_key(room)):
            self._ids.setdefault(key, since)
            self._rooms[key] = room

    def remove(self, room: str) -> None:
        self.room_epochs.pop(room, None)
        for key in (update_key(room), awareness_key(room)):
            self._ids.pop(key, None)
            self._rooms.pop(key, None)

    def follows(self, room: str) -> bool:
        return update_key(room) in self._ids

    def rooms(self) -> list[str]:
        return sorted(set(self._rooms.values()))

    def streams(self) -> dict[str, str]:
        out = dict(self._ids)
        out[KICKS_KEY] = self.kicks
        return out

    def keys(self) -> list[str]:
        """Every stream read, the kicks' included (a cluster's reader groups them by slot)."""
        return [*self._ids, KICKS_KEY]

    def streams_of(self, keys: Iterable[str]) -> dict[str, str]:
        """XREAD's argument for those of `keys` still followed (one slot's, on a cluster)."""
        out = {key: self._ids[key] for key in keys if key in self._ids}
        if KICKS_KEY in keys:
            out[KICKS_KEY] = self.kicks
        return out

    def rooms_of(self, keys: Iterable[str]) -> list[str]:
        """The rooms of those stream keys still followed (KICKS_KEY for the kicks)."""
        rooms = {KICKS_KEY if key == KICKS_KEY else self._rooms.get(key) for key in keys}
        return sorted(r for r in rooms if r is not None)

    def reset_rooms(self, rooms: Iterable[str]) -> None:
        """Those rooms' master restarted empty: read their streams from the start again."""
        for room in rooms:
            if room == KICKS_KEY:
                self.kicks = START
                continue
            for key in (update_key(room), awareness_key(room)):
                if key in self._ids:
                    self._ids[key] = START

    def reset(self) -> None:
        """Redis lost its data (a new epoch): read every stream from its start again."""
        for key in self._ids:
            self._ids[key] = START
        self.kicks = START

    def advance(
        self, replies: Iterable[tuple[str | bytes, Sequence[tuple[str | bytes, Mapping]]]]
    ) -> list[BusEntry]:
        """XREAD's reply (stream key, [(id, fields)]) as entries in stream order per stream;
        cursors move past everything read, also past entries that are not ours."""
        out: list[BusEntry] = []
        for raw_key, entries in replies:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            room = self._rooms.get(key)
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if key == KICKS_KEY:
                    self.kicks = eid
                    kick = Kick.decode(fields)
                    if kick is not None:
                        out.append(BusEntry(None, b"", StreamId.parse(eid), "", b"", kick))
                    continue
                if room is None:
                    continue  # a room removed while the read was out
                self._ids[key] = eid
                entry = decode_entry(room, eid, fields)
                if entry is not None:
                    out.append(entry)
        return out
