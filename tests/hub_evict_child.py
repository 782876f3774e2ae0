"""Child process for the kill -9 test in test_hub_docs_memory.py (run with sys.executable).

usage: hub_evict_child.py DATA_DIR

HubDocs over a Store, as the hub runs them: tasks apply updates (a new key each) to a few
documents of one space and print "DOC KEY" once the update is durable; after half of their
applies, they drop every idle document from memory (two sweeps; "EVICTED N" now and then), so
that many updates go to a document reloaded from the store while others are still queued. Runs until killed (bounded).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import trio
from pycrdt import Doc, Map

from peerdaemon.core.events import EventLog
from peerdaemon.hub.docs import IDLE_SWEEPS, HubDocs
from peerdaemon.store import Store

SPACE = "team"
DOCS = ("env-a", "env-b", "env-c", "env-d")
MAX_UPDATES = 100_000


async def main(data_dir: Path) -> None:
    store = Store.open(data_dir, compact_count=8, compact_bytes=64 << 10)
    docs = HubDocs(store, EventLog(), compact_count=8, sweep_interval=None)
    docs.load()
    out = sys.stdout
    counter = iter(range(MAX_UPDATES))

    evicted = [0, 0.0]  # dropped since last told, when last told

    def sweep() -> None:
        for _ in range(IDLE_SWEEPS):
            evicted[0] += docs.sweep()
        if evicted[0] and trio.current_time() > evicted[1] + 0.05:
            out.write(f"EVICTED {evicted[0]}\n")
            out.flush()
            evicted[0], evicted[1] = 0, trio.current_time()

    async def writer(rng: random.Random) -> None:
        for n in counter:
            doc_id = rng.choice(DOCS)
            src = Doc()  # a client that knows nothing: its update stands alone
            src.get("m", type=Map)[f"k{n}"] = "x" * rng.randint(1, 2000)
            ticket = docs.apply(SPACE, doc_id, src.get_update(), f"yws:{n}")
            if rng.random() < 0.5:  # between the writers' applies: whatever may go, goes
                sweep()
            if ticket is not None:
                await ticket.wait()
            out.write(f"{doc_id} k{n}\n")
            out.flush()
            await trio.sleep(0)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(docs.run)
            async with trio.open_nursery() as writers:
                for i in range(6):
                    writers.start_soon(writer, random.Random(i))
            nursery.cancel_scope.cancel()
    finally:
        store.close()


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
