"""What the daemon's database keeps on disk after much editing: its size after 100,000 edits
(compacted as they come) and the deletion of half the environments, against a fresh store that
holds only the compacted state (one snapshot per environment, the same history, trash and
settings). The ratio is what the file holds beyond the data (issue 13).

    .venv/bin/python benchmarks/bench_store.py [--edits 100000] [--rounds 1] [--baseline DIR]

`--baseline DIR` (or `--base`): also run the code in DIR (say a `git archive HEAD` copy) in the
same run, alternating with this tree, round by round. Each run starts a daemon process on a fresh
data dir, imports 10 environments of ~100 kB, gives routes new documentation (100 random
characters each, 64 patches in flight, each acknowledged once durable), deletes 5 environments,
lets the daemon idle for 2 s and stops it cleanly (SIGTERM); then the SQLite files are measured.
Unix sockets only, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENVS = 10
DELETED = 5
TEXT = 100
IDLE = 2.0


def db_bytes(data_dir: Path) -> int:
    return sum(
        p.stat().st_size for p in data_dir.glob("peerdaemon.sqlite3*") if "shm" not in p.name
    )


def free_bytes(data_dir: Path) -> int:
    """Pages of the file that hold nothing (SQLite's free list)."""
    conn = sqlite3.connect(data_dir / "peerdaemon.sqlite3")
    try:
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return free * conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()


def compact_copy(src: Path, dst: Path) -> None:
    """A fresh store with what `src` holds, compacted: one snapshot per document, the same
    metadata, settings, history and trash (run with the code under test on PYTHONPATH)."""
    from pycrdt import Doc

    from peerdaemon.store import Store

    with Store.open(src) as old, Store.open(dst) as new:
        for env_id, loaded in old.load().items():
            doc = Doc()
            for update in loaded.updates:
                doc.apply_update(update)
            new.enqueue_append(env_id, doc.get_update())
            if loaded.meta:
                new.enqueue_meta(env_id, loaded.meta)
        for key, value in old._settings.items():
            new.put_setting(key, value)
        for row in old.history_rows():
            blob = old.history_blob(row.env_id, row.version)
            assert blob is not None
            new.enqueue_version(
                row.env_id, row.version, row.time, row.reason, row.info, row.digest, blob
            )
        for trash in old.trash_rows():
            blob = old.trash_blob(trash.env_id)
            assert blob is not None
            new.enqueue_trash(trash.env_id, trash.time, trash.info, blob)
    # close() wrote the queue and checkpointed: the file holds only that


class Daemon:
    def __init__(self, root: Path, pythonpath: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.sock = root / "d.sock"
        self.env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from procutil import wait_daemon

        argv = [sys.executable, "-m", "peerdaemon", "run", "--data-dir", str(self.data)]
        self.proc = subprocess.Popen(
            [*argv, "--socket", str(self.sock), "--no-status"],
            env=self.env,
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_daemon(self.sock)

    def stop(self) -> None:
        from procutil import stop_process

        stop_process(self.proc)
        self.proc = None


async def edit(sock: Path, env_ids: list[str], total: int, inflight: int = 64) -> float:
    """`total` patches, each giving a route new documentation text; -> seconds."""
    from peerdaemon.api.client import AsyncClient

    counter = iter(range(total))
    async with await AsyncClient.connect(sock) as client:

        async def worker(w: int) -> None:
            rng = random.Random(w)
            for n in counter:
                env_id = env_ids[n % len(env_ids)]
                path = f"/routes/{(n // len(env_ids)) % 5}/documentation"
                text = "".join(rng.choices(string.ascii_letters, k=TEXT))
                await client.patch(env_id, [{"op": "replace", "path": path, "value": text}])

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(inflight):
                nursery.start_soon(worker, w)
        return time.perf_counter() - t0


def one_run(root: Path, tree: Path, edits: int) -> dict[str, Any]:
    from envgen import make_environment

    from peerdaemon.api.client import Client

    d = Daemon(root, tree)
    d.start()
    try:
        with Client.connect(d.sock, timeout=120) as c:
            ids = [
                c.import_env(make_environment(100_000, seed=i, routes=5), new_id=True)["id"]
                for i in range(ENVS)
            ]
        seconds = trio.run(edit, d.sock, ids, edits)
        with Client.connect(d.sock, timeout=120) as c:
            for env_id in ids[:DELETED]:
                c.delete(env_id)
        time.sleep(IDLE)  # what a daemon does between bursts of edits
    finally:
        d.stop()
    size = db_bytes(d.data)
    free = free_bytes(d.data)
    compacted = root / "compacted"
    subprocess.run(
        [sys.executable, __file__, "--compact-copy", str(d.data), str(compacted)],
        env=d.env,
        check=True,
    )
    fresh = db_bytes(compacted)
    return {
        "db_kib": size / 1024,
        "free_kib": free / 1024,
        "compacted_kib": fresh / 1024,
        "ratio": size / fresh,
        "edits_per_s": edits / seconds,
    }


def bare_commits(data_dir: Path, n: int, size: int = 60) -> float:
    """Commits per second of a bare SQLite loop with the store's durability settings (WAL,
    synchronous=FULL), one small row per transaction: what the disk allows a sequential writer,
    with no thread, queue or event loop around it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "bare.sqlite3", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY, env_id TEXT, blob BLOB)")
        row = os.urandom(size)
        for seq in range(-50, n):  # the first 50 warm the WAL up
            if seq == 0:
                t0 = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO log VALUES (?, ?, ?)", (seq, "e", row))
            db.execute("COMMIT")
        return n / (time.perf_counter() - t0)
    finally:
        db.close()


def store_alone(data_dir: Path, n: int, size: int = 60) -> float:
    """Durable writes per second of the store alone (the code on PYTHONPATH), one at a time:
    `enqueue_append` and `await ticket.wait()`, in a trio program that does nothing else."""
    from peerdaemon.store import Store

    row = os.urandom(size)

    async def go() -> float:
        store = Store.open(data_dir)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                for _ in range(50):
                    await store.enqueue_append("e", row).wait()
                t0 = time.perf_counter()
                for _ in range(n):
                    await store.enqueue_append("e", row).wait()
                elapsed = time.perf_counter() - t0
                nursery.cancel_scope.cancel()
        finally:
            store.close()
        return n / elapsed

    return trio.run(go)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--baseline", dest="base", type=Path, metavar="TREE", help="the code to compare with"
    )
    parser.add_argument("--base", dest="base", type=Path, help=argparse.SUPPRESS)  # old name
    parser.add_argument("--json", metavar="FILE", help="also write the results (JSON) to FILE")
    parser.add_argument("--compact-copy", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store-alone", nargs=2, help=argparse.SUPPRESS)  # DIR N (bench_daemon)
    a = parser.parse_args()
    if a.compact_copy:
        compact_copy(*a.compact_copy)
        return
    if a.store_alone:
        print(json.dumps(store_alone(Path(a.store_alone[0]), int(a.store_alone[1]))))
        return
    sys.path.insert(0, str(HERE))
    trees = {"this": ROOT}
    if a.base is not None:
        trees = {"base": a.base.resolve(), **trees}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for r in range(a.rounds):
        for name, tree in trees.items():
            with tempfile.TemporaryDirectory(prefix="pds") as tmp:
                results[name].append(one_run(Path(tmp), tree, a.edits))
            print(f"round {r + 1}/{a.rounds} {name}: {results[name][-1]}", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(res[key] for res in results[name])

    print(
        f"database after {a.edits} edits of {ENVS} environments and {DELETED} deleted"
        f" (SQLite files after a clean stop), medians of {a.rounds}:"
    )
    for name in trees:
        print(
            f"  {name:5} {med(name, 'db_kib'):8.0f} KiB ({med(name, 'free_kib'):.0f} KiB of it free);"
            f" compacted state {med(name, 'compacted_kib'):6.0f} KiB; ratio"
            f" {med(name, 'ratio'):5.2f}  ({med(name, 'edits_per_s'):.0f} edits/s)"
        )
    if a.base is not None:
        print(f"  this/base size: {med('this', 'db_kib') / med('base', 'db_kib'):.2f}")
    print(json.dumps(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
