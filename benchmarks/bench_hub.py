"""The hub's y-websocket figures, side by side with the classic Node y-websocket server.

    .venv/bin/python benchmarks/bench_hub.py [--rounds 3] [--out DIR]
    .venv/bin/python benchmarks/bench_hub.py --prepare /tmp/yh      # npm ci, once (registry)
    ../shared/tools/leakcheck .venv/bin/python benchmarks/bench_hub.py --harness /tmp/yh/bench

Runs the shared harness (`shared/bench/yjs-bench/bench.mjs` beside the checkout, stock y-websocket 3.1.0
clients in one Node process) against `peerdaemon hub serve` and against the reference server
(`shared/bench/run-ywebsocket.sh`: y-websocket 1.5.4's bin/server.js), alternately, on a
fresh server for every run. The shared folder is read-only, so it is copied into a temporary
directory and `npm ci` runs there. Everything listens on 127.0.0.1 only. The harness is optional
and outside this repository (`YJS_BENCH_DIR` points elsewhere): without it, or without Node, the
benchmark says what it skips and why, and exits 0.

Figures (medians over the rounds, each round's values listed):
  latency  A -> B through the server, 500 edits 5 ms apart: p50 and p99 (ms)
  fanout   1 writer, 200 edits to 200 readers: delivered messages/s and the p50 delay (ms)
  bigdoc   a 15 MB document: initial sync of a new client (ms)
  idle     server RSS (MB) with 200 clients connected (fanout with a single edit)

The hub relays an update at once and commits it alongside (docs/hub.md, "Durability"); the
reference server keeps documents in memory only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procutil import stop_process  # noqa: E402

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

FIGURES: list[tuple[str, str, str, Any]] = [
    # (scenario, label, unit, extractor)
    ("latency", "edit latency p50", "ms", lambda r: r["result"]["latency_ms"]["p50"]),
    ("latency", "edit latency p99", "ms", lambda r: r["result"]["latency_ms"]["p99"]),
    ("fanout", "fan-out 200x200 delivered", "msg/s", lambda r: r["result"]["delivered_msgs_per_s"]),
    ("fanout", "fan-out 200x200 delay p50", "ms", lambda r: r["result"]["latency_ms"]["p50"]),
    ("fanout", "fan-out 200x200 delay p99", "ms", lambda r: r["result"]["latency_ms"]["p99"]),
    ("bigdoc", "15 MB initial sync", "ms", lambda r: r["result"]["initial_sync_ms"]),
    ("idle", "RSS, 200 idle clients", "MB", lambda r: round(r["server"]["vm_rss_kb"] / 1024, 1)),
]


def harness_missing() -> str:
    """Why the optional outside harness cannot run here, or "" when it can. It is not part of
    this repository (it lives beside the checkout, or where YJS_BENCH_DIR says)."""
    needed = [
        SHARED / "yjs-bench" / "bench.mjs",
        SHARED / "ref-ywebsocket",
        SHARED / "run-ywebsocket.sh",
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

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "hub-data"
        self.log = root / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.token = ""

    def _cli(self, *argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "peerdaemon", "hub", *argv, "--data-dir", str(self.data)],
            check=True,
            capture_output=True,
            text=True,
        )
        return done.stdout.strip()

    def start(self) -> None:
        self.token = self._cli("user", "add", "bench")
        self._cli("space", "create", SPACE, "--owner", "bench")
        self._cli("limits", "set", "--user", "bench", "devices_per_user", "10000")
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
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = re.search(r"hub listening on 127\.0\.0\.1:(\d+)", self.log.read_text())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"hub did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"no output (exit {done.returncode}): {done.stderr[-500:]}"}
    return json.loads(lines[-1])


def run_hub(harness: Path, work: Path, scenario: str, n: int) -> dict[str, Any]:
    root = work / f"hub-{scenario}-{n}"
    root.mkdir()
    hub = Hub(root)
    try:
        hub.start()
        assert hub.proc is not None
        return run_json(
            [
                "node",
                str(harness / "yjs-bench" / "bench.mjs"),
                "--url",
                f"ws://127.0.0.1:{hub.port}/yjs/{SPACE}",
                "--query",
                f"token={hub.token}",
                "--server-pid",
                str(hub.proc.pid),
                "--label",
                "peerdaemon-hub",
                *SCENARIOS[scenario],
            ],
            timeout=300,
        )
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_ref(harness: Path, scenario: str) -> dict[str, Any]:
    argv = SCENARIOS[scenario]
    i = argv.index("--scenario")  # run-ywebsocket.sh takes the scenario as its first argument
    rest = argv[:i] + argv[i + 2 :]
    return run_json(["bash", str(harness / "run-ywebsocket.sh"), argv[i + 1], *rest], 300)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--out", metavar="DIR", help="keep every JSON line in DIR/results.jsonl")
    parser.add_argument(
        "--prepare",
        metavar="DIR",
        help="only install the harness's packages into DIR (needs the npm registry), and exit",
    )
    parser.add_argument(
        "--harness",
        metavar="DIR",
        help="a harness --prepare installed: nothing is installed, so the run can go under "
        "../shared/tools/leakcheck (which lets nothing leave the machine)",
    )
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    missing = harness_missing()
    if missing:
        print(f"bench_hub: skipped every scenario ({', '.join(scenarios)}): {missing}")
        return 0
    if args.prepare:
        target = Path(args.prepare)
        target.mkdir(parents=True, exist_ok=True)
        print(f"installed in {prepare_harness(target)}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="pdbench-hub"))
    results: list[dict[str, Any]] = []
    try:
        if args.harness:
            harness = Path(args.harness)
        else:
            print(f"preparing the harness in {work} ...", file=sys.stderr)
            harness = prepare_harness(work)
        for n in range(args.rounds):
            for scenario in scenarios:
                order = ("hub", "ref") if n % 2 == 0 else ("ref", "hub")
                for server in order:
                    t0 = time.monotonic()
                    if server == "hub":
                        out = run_hub(harness, work, scenario, n)
                    else:
                        out = run_ref(harness, scenario)
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
    summary = report(results, scenarios, args.rounds)
    print(json.dumps(summary))
    return 0 if all(r.get("ok") for r in results) else 1


def report(results: list[dict[str, Any]], scenarios: list[str], rounds: int) -> dict[str, Any]:
    print(f"\nmedians over {rounds} round(s); each round's values in brackets")
    print(f"{'figure':32s} {'peerdaemon hub':>28s}   {'Node y-websocket 1.5.4':>28s}")
    summary: dict[str, Any] = {"rounds": rounds, "figures": {}}
    for scenario, label, unit, get in FIGURES:
        if scenario not in scenarios:
            continue
        row = {}
        for server in ("hub", "ref"):
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

        print(f"{label + ' (' + unit + ')':32s} {cell(row['hub']):>28s}   {cell(row['ref']):>28s}")
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
