"""Child process for the kill -9 test in test_store.py (run with sys.executable).

usage: store_crash_child.py DATA_DIR {plain|compact}

Several tasks append random updates to a few environments as fast as group commit allows.
After `await ticket.wait()` returns, a task prints "ENV INDEX SHA256" (INDEX = position of the
update in ENV's enqueue order) and flushes: every printed line is a durability promise the
parent checks after SIGKILLing this process. In "compact" mode the tasks also compact whenever
`needs_compaction` says so; the snapshot is b"S" + CBOR list of the digests of every update
enqueued to ENV before it, so the parent can rebuild the full sequence. Updates are b"U" +
random bytes. Runs until killed (bounded, in case the parent vanished).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

import cbor2
import trio

from peerdaemon.store import Store

ENVS = ("env-a", "env-b", "env-c")
WRITERS = 12
MAX_UPDATES = 200_000


async def main(data_dir: Path, mode: str) -> None:
    compact = mode == "compact"
    store = Store.open(data_dir, compact_count=25, compact_bytes=64 << 10)
    enqueued: dict[str, list[str]] = {env: [] for env in ENVS}
    out = sys.stdout

    async def writer(rng: random.Random) -> None:
        while sum(len(v) for v in enqueued.values()) < MAX_UPDATES:
            env = rng.choice(ENVS)
            update = b"U" + os.urandom(rng.randint(1, 4096))
            digests = enqueued[env]
            index = len(digests)
            digests.append(hashlib.sha256(update).hexdigest())
            ticket = store.enqueue_append(env, update)
            if compact and store.needs_compaction(env):
                store.enqueue_compact(env, b"S" + cbor2.dumps(list(digests)))
            await ticket.wait()
            out.write(f"{env} {index} {digests[index]}\n")
            out.flush()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            print("READY", flush=True)
            async with trio.open_nursery() as writers:
                for i in range(WRITERS):
                    writers.start_soon(writer, random.Random(i))
            nursery.cancel_scope.cancel()
    finally:
        store.close()


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), sys.argv[2])
