"""Child process for the kill -9 tests in test_store_vacuum.py (run with sys.executable).

usage: store_vacuum_child.py DATA_DIR {vacuum|migrate}

vacuum: tasks append random updates to a few environments and compact them often (as
store_crash_child.py: a snapshot is b"S" + CBOR list of the digests it covers), in bursts that
end with the deletion of a 2 MB scratch environment and a pause, in which the writer gives the
pages back in small steps (and the next burst's writes go between them). Every acknowledged
update is printed "ENV INDEX SHA256"; "VACUUMED N" whenever the store gave more pages back.
Runs until killed (bounded).

migrate: opens a database made without incremental vacuum and starts the writer, which
converts it; prints "MIGRATING" first and "DONE" once converted, then waits to be killed.
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
from peerdaemon.store import sqlite as store_sqlite

ENVS = ("env-a", "env-b", "env-c")
WRITERS = 8
MAX_UPDATES = 200_000


async def vacuum(store: Store) -> None:
    enqueued: dict[str, list[str]] = {env: [] for env in ENVS}
    out = sys.stdout
    quiet = [False]  # the writers pause: the writer idles, and gives space back

    async def writer(rng: random.Random) -> None:
        while sum(len(v) for v in enqueued.values()) < MAX_UPDATES:
            while quiet[0]:
                await trio.sleep(0.02)
            env = rng.choice(ENVS)
            update = b"U" + os.urandom(rng.randint(1, 4096))
            digests = enqueued[env]
            index = len(digests)
            digests.append(hashlib.sha256(update).hexdigest())
            ticket = store.enqueue_append(env, update)
            if store.needs_compaction(env):
                store.enqueue_compact(env, b"S" + cbor2.dumps(list(digests)))
            await ticket.wait()
            out.write(f"{env} {index} {digests[index]}\n")
            out.flush()

    async def phases() -> None:
        """Bursts of writes that end with a big delete, then a pause of the writers (but not
        always long enough for the whole vacuum: writes also come between its steps)."""
        rng = random.Random(7)
        while True:
            tickets = [store.enqueue_append("scratch", os.urandom(8192)) for _ in range(256)]
            await tickets[-1].wait()
            await trio.sleep(0.3)
            await store.enqueue_delete("scratch").wait()
            quiet[0] = True
            await trio.sleep(store_sqlite.VACUUM_IDLE + rng.uniform(0, 0.3))
            quiet[0] = False

    async def monitor() -> None:
        seen = 0
        while True:
            pages = store.stats()["vacuumed_pages"]
            if pages > seen:
                seen = pages
                out.write(f"VACUUMED {pages}\n")
                out.flush()
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(phases)
        nursery.start_soon(monitor)
        async with trio.open_nursery() as writers:
            for i in range(WRITERS):
                writers.start_soon(writer, random.Random(i))
        nursery.cancel_scope.cancel()


async def main(data_dir: Path, mode: str) -> None:
    store_sqlite.VACUUM_STEP_PAGES = 32  # many steps per run: a kill lands in one
    store = Store.open(data_dir, compact_count=25, compact_bytes=64 << 10)
    try:
        async with trio.open_nursery() as nursery:
            if mode == "migrate":
                print("MIGRATING", flush=True)
                await nursery.start(store.run)
                await store.settled()
                print("DONE" if store.incremental_vacuum else "NOT CONVERTED", flush=True)
                await trio.sleep(60)
            else:
                await nursery.start(store.run)
                print("READY", flush=True)
                await vacuum(store)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), sys.argv[2])
