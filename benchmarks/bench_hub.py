"""The hub's y-websocket figures, side by side with the classic Node y-websocket server.

    .venv/bin/python benchmarks/bench_hub.py [--rounds 3] [--out DIR]
    .venv/bin/python benchmarks/bench_hub.py --prepare /tmp/yh      # npm ci, once (registry)
    ../shared/tools/leakcheck .venv/bin/python benchmarks/bench_hub.py --harness /tmp/yh/bench
    git archive HEAD | tar -x -C /tmp/base && .venv/bin/python benchmarks/bench_hub.py \
        --harness /tmp/yh/bench --baseline /tmp/base    # + a column for the committed hub

Runs the shared harness (`shared/bench/yjs-bench/bench.mjs` beside the checkout, stock y-websocket 3.1.0
clients in one Node process) against `peerdaemon hub serve` and against the reference server
(`shared/bench/run-ywebsocket.sh`: y-websocket 1.5.4's bin/server.js), alternately, on a
fresh server for every run. The shared folder is read-only, so it is copied into a temporary
directory and `npm ci` runs there. Everything listens on 127.0.0.1 only. The harness is optional
and outside this repository (`YJS_BENCH_DIR` points elsewhere): without it, or without Node, the
benchmark says what it skips and why, and exits 0.

Figures (medians over the rounds, each round's values listed):
  latency  A -> B through the server, 500 edits 5 ms apart: p50 and p99 (ms)
  fanout   1 writer, 200 edits to 200 readers: delivered messages/s, the p50 and p99 delay
           (ms), and the server's CPU over the client's run (s)
  bigdoc   a 15 MB document: initial sync of a new client (ms)
  idle     server RSS (MB) with 200 clients connected (fanout with a single edit)
  idle10k  10,000 idle clients connected in batches of 200 (benchmarks/hub_idle.mjs: the
           harness stops at 5,000): how many were served at the first try and in the end,
           the time until all synced, the server's RSS then and its peak, and a new client's
           sync (creation to `synced`) while they stay, in their room and in another

The hub relays an update at once and commits it alongside (docs/hub.md, "Durability"); the
reference server keeps documents in memory only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procutil import stop_process, wait_hub_port  # noqa: E402

SHARED = Path(
    os.environ.get("YJS_BENCH_DIR", Path(__file__).resolve().parents[2] / "shared" / "bench")
)
SPACE = "bench"

SCENARIOS: dict[str, list[str]] = {
    "latency": ["--scenario", "latency", "--ops", "500"],
    "fanout": ["--scenario", "fanout", "--clients", "200", "--ops", "200"],
    "bigdoc": ["--scenario", "bigdoc", "--size", "15MB", "--timeout", "120"],
    "idle": ["--scenario", "fanout", "--clients", "200", "--ops", "1"],
}

IDLE_CLIENTS = 10_000
DRIVERS: dict[str, list[str]] = {
    # scenarios run by benchmarks/hub_idle.mjs instead of the harness
    "idle10k": [
        "--clients",
        str(IDLE_CLIENTS),
        "--batch",
        "200",
        "--probes",
        "100",
        "--timeout",
        "120",
    ],
}
DRIVER = Path(__file__).resolve().with_name("hub_idle.mjs")

FIGURES: list[tuple[str, str, str, Any]] = [
    # (scenario, label, unit, extractor)
    ("latency", "edit latency p50", "ms", lambda r: r["result"]["latency_ms"]["p50"]),
    ("latency", "edit latency p99", "ms", lambda r: r["result"]["latency_ms"]["p99"]),
    ("fanout", "fan-out 200x200 delivered", "msg/s", lambda r: r["result"]["delivered_msgs_per_s"]),
    ("fanout", "fan-out 200x200 delay p50", "ms", lambda r: r["result"]["latency_ms"]["p50"]),
    ("fanout", "fan-out 200x200 delay p99", "ms", lambda r: r["result"]["latency_ms"]["p99"]),
    # the server's CPU over the client's whole run (its 200 connections, then the edits): the
    # client is one Node process, busy all along, and the server's CPU is taken from it
    ("fanout", "fan-out 200x200 server CPU", "s", lambda r: r["server"]["cpu_s"]),
    ("bigdoc", "15 MB initial sync", "ms", lambda r: r["result"]["initial_sync_ms"]),
    ("idle", "RSS, 200 idle clients", "MB", lambda r: round(r["server"]["vm_rss_kb"] / 1024, 1)),
    ("idle10k", "10k idle: served", "clients", lambda r: r["result"]["served"]),
    ("idle10k", "10k idle: refused 1st try", "clients", lambda r: r["result"]["refused_first_try"]),
    (
        "idle10k",
        "10k idle: all synced",
        "s",
        lambda r: round(r["result"]["connect_all_ms"] / 1000, 2),
    ),
    (
        "idle10k",
        "10k idle: RSS",
        "MB",
        lambda r: round(r["server"]["rss_after_connect_kb"] / 1024, 1),
    ),
    ("idle10k", "10k idle: peak RSS", "MB", lambda r: round(r["server"]["vm_hwm_kb"] / 1024, 1)),
    ("idle10k", "10k idle: new client p50", "ms", lambda r: r["result"]["probe_ms"]["p50"]),
    ("idle10k", "10k idle: new client p99", "ms", lambda r: r["result"]["probe_ms"]["p99"]),
    ("idle10k", "10k: other room p50", "ms", lambda r: r["result"]["probe_other_room_ms"]["p50"]),
    ("idle10k", "10k: other room p99", "ms", lambda r: r["result"]["probe_other_room_ms"]["p99"]),
]
ALL_SCENARIOS = [*SCENARIOS, *DRIVERS]


def harness_missing(root: Path = SHARED) -> str:
    """Why the optional outside harness cannot run here, or "" when it can. It is not part of
    this repository (it lives beside the checkout, or where YJS_BENCH_DIR says; `--harness`
    names a prepared copy)."""
    needed = [
        root / "yjs-bench" / "bench.mjs",
        root / "ref-ywebsocket",
        root / "run-ywebsocket.sh",
    ]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        return f"the y-websocket bench harness is absent ({', '.join(absent)}; set YJS_BENCH_DIR)"
    tools = [t for t in ("node", "npm") if shutil.which(t) is None]
    if tools:
        return f"{' and '.join(tools)} not installed"
    return ""


def prepare_harness(work: Path) -> Path:
    """Copy the shared bench folder and install its pinned packages there."""
    copy = work / "bench"
    shutil.copytree(SHARED, copy, ignore=shutil.ignore_patterns("node_modules"))
    for root, dirs, files in os.walk(copy):
        for name in dirs + files:
            os.chmod(
                os.path.join(root, name), 0o755 if name in dirs or name.endswith(".sh") else 0o644
            )
    os.chmod(copy, 0o755)
    for sub in ("yjs-bench", "ref-ywebsocket"):
        subprocess.run(
            ["npm", "ci", "--silent", "--no-audit", "--no-fund"],
            cwd=copy / sub,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return copy


class Hub:
    """A fresh `peerdaemon hub serve` process with one user (device limit raised) and space."""

    def __init__(self, root: Path, tree: Path | None = None) -> None:
        self.root = root
        self.tree = tree  # run the peerdaemon package of this source tree (None: this one)
        self.data = root / "hub-data"
        self.log = root / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.token = ""

    def _where(self) -> dict[str, Any]:
        if self.tree is None:
            return {}
        return {"cwd": self.tree, "env": {**os.environ, "PYTHONPATH": str(self.tree)}}

    def _cli(self, *argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "peerdaemon", "hub", *argv, "--data-dir", str(self.data)],
            check=True,
            capture_output=True,
            text=True,
            **self._where(),
        )
        return done.stdout.strip()

    def start(self) -> None:
        self.token = self._cli("user", "add", "bench")
        self._cli("space", "create", SPACE, "--owner", "bench")
        self._cli("limits", "set", "--user", "bench", "devices_per_user", str(2 * IDLE_CLIENTS))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "peerdaemon",
                    "hub",
                    "serve",
                    "--data-dir",
                    str(self.data),
                    "--listen",
                    "127.0.0.1:0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                **self._where(),
            )
        self.port = wait_hub_port(self.proc, self.log, 30)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"no output (exit {done.returncode}): {done.stderr[-500:]}"}
    return json.loads(lines[-1])


def driver_copy(harness: Path, work: Path) -> Path:
    """hub_idle.mjs beside a link to the harness's packages (it imports them by name)."""
    target = work / "driver"
    if not target.exists():
        target.mkdir()
        shutil.copy(DRIVER, target / DRIVER.name)
        (target / "node_modules").symlink_to(harness / "yjs-bench" / "node_modules")
    return target / DRIVER.name


def client_argv(
    harness: Path, work: Path, scenario: str, url: str, pid: int, query: str | None = None
) -> list[str]:
    """The Node client of `scenario` against the server at `url` (process `pid`)."""
    extra = ["--query", query] if query else []
    if scenario in DRIVERS:
        script = driver_copy(harness, work)
        return [
            "node",
            str(script),
            "--url",
            url,
            "--server-pid",
            str(pid),
            *extra,
            *DRIVERS[scenario],
        ]
    bench = harness / "yjs-bench" / "bench.mjs"
    return [
        "node",
        str(bench),
        "--url",
        url,
        "--server-pid",
        str(pid),
        *extra,
        *SCENARIOS[scenario],
    ]


def run_hub(
    harness: Path, work: Path, scenario: str, n: int, tree: Path | None = None
) -> dict[str, Any]:
    root = work / f"hub-{scenario}-{n}{'-base' if tree else ''}"
    root.mkdir()
    hub = Hub(root, tree)
    try:
        hub.start()
        assert hub.proc is not None
        url = f"ws://127.0.0.1:{hub.port}/yjs/{SPACE}"
        argv = client_argv(harness, work, scenario, url, hub.proc.pid, f"token={hub.token}")
        return run_json([*argv, "--label", "peerdaemon-hub"], timeout=300)
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_ref(harness: Path, work: Path, scenario: str) -> dict[str, Any]:
    if scenario in DRIVERS:  # the reference server, started here (run-ywebsocket.sh runs bench.mjs)
        return run_ref_driver(harness, work, scenario)
    argv = SCENARIOS[scenario]
    i = argv.index("--scenario")  # run-ywebsocket.sh takes the scenario as its first argument
    rest = argv[:i] + argv[i + 2 :]
    return run_json(["bash", str(harness / "run-ywebsocket.sh"), argv[i + 1], *rest], 300)


def run_ref_driver(harness: Path, work: Path, scenario: str) -> dict[str, Any]:
    """What run-ywebsocket.sh does, for a driver: y-websocket 1.5.4's server on a free loopback
    port, the client against it, the server stopped by its pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = harness / "ref-ywebsocket" / "node_modules" / "y-websocket" / "bin" / "server.js"
    log = work / "ref.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["node", str(server)],
            env={**os.environ, "HOST": "127.0.0.1", "PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while "running at" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        argv = client_argv(harness, work, scenario, f"ws://127.0.0.1:{port}", proc.pid)
        return run_json([*argv, "--label", "ywebsocket-1.5.4"], timeout=300)
    finally:
        stop_process(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help="comma-separated")
    parser.add_argument("--out", metavar="DIR", help="keep every JSON line in DIR/results.jsonl")
    parser.add_argument(
        "--prepare",
        metavar="DIR",
        help="only install the harness's packages into DIR (needs the npm registry), and exit",
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="also run the hub of this source tree (e.g. `git archive HEAD | tar -x -C TREE`), "
        "alternating with this one's, for before/after figures from one run",
    )
    parser.add_argument(
        "--harness",
        metavar="DIR",
        help="a harness --prepare installed: nothing is installed, so the run can go under "
        "../shared/tools/leakcheck (which lets nothing leave the machine)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the summary (JSON) to FILE")
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    missing = harness_missing(Path(args.harness) if args.harness else SHARED)
    if missing:
        print(f"bench_hub: skipped every scenario ({', '.join(scenarios)}): {missing}")
        return 0
    if args.prepare:
        target = Path(args.prepare)
        target.mkdir(parents=True, exist_ok=True)
        print(f"installed in {prepare_harness(target)}")
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # idle10k: 10,000 sockets a side
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if "idle10k" in scenarios and hard < 2 * IDLE_CLIENTS:
        print(f"bench_hub: idle10k needs {2 * IDLE_CLIENTS} open files; the limit is {hard}")
    work = Path(tempfile.mkdtemp(prefix="pdbench-hub"))
    results: list[dict[str, Any]] = []
    try:
        if args.harness:
            harness = Path(args.harness)
        else:
            print(f"preparing the harness in {work} ...", file=sys.stderr)
            harness = prepare_harness(work)
        baseline = Path(args.baseline).resolve() if args.baseline else None
        servers = ("hub", "ref", "base") if baseline else ("hub", "ref")
        for n in range(args.rounds):
            for scenario in scenarios:
                order = servers[n % len(servers) :] + servers[: n % len(servers)]
                for server in order:
                    t0 = time.monotonic()
                    if server == "hub":
                        out = run_hub(harness, work, scenario, n)
                    elif server == "base":
                        out = run_hub(harness, work, scenario, n, baseline)
                    else:
                        out = run_ref(harness, work, scenario)
                    out["_server"], out["_scenario"], out["_round"] = server, scenario, n
                    results.append(out)
                    status = "ok" if out.get("ok") else f"FAILED: {out.get('error')}"
                    print(
                        f"round {n + 1} {scenario:8s} {server}: {status} "
                        f"({time.monotonic() - t0:.1f} s)",
                        file=sys.stderr,
                    )
        if args.out:
            out_dir = Path(args.out)
            out_dir.mkdir(parents=True, exist_ok=True)
            with (out_dir / "results.jsonl").open("w") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = report(results, scenarios, args.rounds, servers)
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary))
    return 0 if all(r.get("ok") for r in results) else 1


COLUMNS = {"hub": "peerdaemon hub", "ref": "Node y-websocket 1.5.4", "base": "hub (--baseline)"}


def report(
    results: list[dict[str, Any]],
    scenarios: list[str],
    rounds: int,
    servers: tuple[str, ...] = ("hub", "ref"),
) -> dict[str, Any]:
    print(f"\nmedians over {rounds} round(s); each round's values in brackets")
    print(f"{'figure':34s}" + "".join(f" {COLUMNS[s]:>30s}" for s in servers))
    summary: dict[str, Any] = {"rounds": rounds, "figures": {}}
    for scenario, label, unit, get in FIGURES:
        if scenario not in scenarios:
            continue
        row = {}
        for server in servers:
            values = []
            for r in results:
                if r["_server"] == server and r["_scenario"] == scenario and r.get("ok"):
                    try:
                        values.append(get(r))
                    except (KeyError, TypeError):
                        pass
            row[server] = {
                "median": statistics.median(values) if values else None,
                "values": values,
            }
        summary["figures"][f"{label} ({unit})"] = row

        def cell(d: dict[str, Any]) -> str:
            if d["median"] is None:
                return "n/a"
            vals = ", ".join(f"{v:g}" for v in d["values"])
            return f"{d['median']:g} [{vals}]"

        name = f"{label} ({unit})"
        print(f"{name:34s}" + "".join(f" {cell(row[s]):>30s}" for s in servers))
    failed = [r for r in results if not r.get("ok")]
    for r in failed:  # what a failed run still tells (e.g. how many clients were served)
        result = r.get("result") or {}
        got = {k: result[k] for k in ("served", "refused_first_try", "delivered") if k in result}
        print(
            f"failed: {r['_server']} {r['_scenario']} round {r['_round'] + 1}: {r.get('error')} {got}"
        )
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
