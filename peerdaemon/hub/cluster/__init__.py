"""The hub's scaled mode (issue 14, docs/hub-cluster.md): several hub processes sharing rooms
through a Redis bus and keeping documents in PostgreSQL.

`protocol` is the bus's layout without I/O (keys, entries, cursors, kicks, the trim rule);
`schema` the PostgreSQL schema and its migrations, as SQL; `bus` (coredis) and `store`
(psycopg 3 in worker threads) are the trio shells. The shells import their drivers, which are
the optional extra `cluster`: import them only where the cluster mode runs.
"""

from .protocol import BusEntry, Cursors, Kick, StreamId, room_of, safe_trim_id

__all__ = ["BusEntry", "Cursors", "Kick", "StreamId", "room_of", "safe_trim_id"]
