"""Issue 13's whole table from one command: every figure, its reference, the tree before, the goal.

    .venv/bin/python benchmarks/table.py [--quick] [--only ROWS] [--rounds N] [--json FILE]
    .venv/bin/python benchmarks/bench_hub.py --prepare /tmp/yh     # once, needs the npm registry
    git archive HEAD | tar -x -C /tmp/base
    ../shared/tools/leakcheck .venv/bin/python benchmarks/table.py \\
        --harness /tmp/yh/bench --baseline /tmp/base

The figures are measured by the scripts beside this one, each run once as a subprocess with
`--json` (their own output goes to stderr as they run): bench_hub.py (the hub against the Node
y-websocket server; only with `--harness`, the Node harness `bench_hub.py --prepare` installed:
without it those rows say so and how to prepare it), bench_lan.py (a LAN hop against a minimal
pycrdt relay), bench_daemon.py (`writes`, `memory`), bench_store.py, bench_hub_memory.py. Each
runs its reference and, with `--baseline TREE`, the code of TREE in the same rounds, alternating:
on a shared machine only figures taken side by side compare. Then one markdown table goes to
stdout: figure | after | reference | ratio (after / reference) | before (and after / before) |
goal | met?.

The issue names no reference for the two memory rows; this table holds them against the same
program storing only the environments in use (memory should follow use, not what is stored),
and the database against a fresh store holding only its compacted state. `--quick` runs one round
with smaller sizes (named in the figure column): it checks the plumbing, and the goals are for
the full sizes. Everything listens on 127.0.0.1 or Unix sockets only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

Outputs = dict[str, Any]
"""Each job's JSON (what its script wrote with `--json`), by job name."""
Getter = Callable[[Outputs], float | None]


# --- what each row reads ------------------------------------------------------------------------


def _safe(fn: Callable[[Outputs], Any]) -> Getter:
    """None when the job did not run or its figure is missing (a failed round, a skipped job)."""

    def get(out: Outputs) -> float | None:
        try:
            value = fn(out)
        except (KeyError, IndexError, TypeError, statistics.StatisticsError):
            return None
        return None if value is None else float(value)

    return get


def hub(label: str, server: str = "hub") -> Getter:
    """A median bench_hub.py printed: `label` as in its FIGURES, with the unit."""
    return _safe(lambda out: out["hub"]["figures"][label][server]["median"])


def rounds(job: str, key: str, name: str, scale: float = 1.0) -> Getter:
    """The median over rounds of `out[job][key][i][name]` (bench_lan, bench_daemon, bench_store,
    bench_hub_memory all keep a list of rounds per key)."""
    return _safe(lambda out: statistics.median(r[name] for r in out[job][key]) * scale)


@dataclass(frozen=True)
class Goal:
    """The issue's goal: `checks` of the value or of the ratio to the reference, all to hold."""

    text: str
    checks: tuple[tuple[str, str, float], ...] = ()  # ("value" | "ratio", "<=" | ">=", bound)

    def met(self, value: float | None, ratio: float | None) -> str:
        if not self.checks:
            return "-"
        results = []
        for what, op, bound in self.checks:
            x = value if what == "value" else ratio
            if x is None:
                return "?"
            results.append(x <= bound if op == "<=" else x >= bound)
        return "yes" if all(results) else "no"


NO_GOAL = Goal("-")


@dataclass(frozen=True)
class Row:
    key: str
    """Its name for `--only` (a prefix up to a dash selects a group: `hub-10k`, `lan`)."""
    figure: str
    """The figure column; `{big}`, `{stored}`, `{edits}` name the sizes (--quick: smaller)."""
    job: str
    part: str
    """What the job must measure for it (bench_hub's scenario, bench_daemon's `--only`)."""
    after: Getter
    goal: Goal = NO_GOAL
    reference: Getter | None = None
    ref_name: str = ""
    ref_job: str | None = None
    """The job the reference comes from, if not `job`."""
    before: Getter | None = None


NODE = "Node y-websocket 1.5.4"
RELAY = "pycrdt relay"

ROWS: list[Row] = [
    Row(
        "hub-latency-p50",
        "hub edit latency client to client, p50 (ms)",
        "hub",
        "latency",
        hub("edit latency p50 (ms)"),
        Goal("at most Node's", (("ratio", "<=", 1.0),)),
        hub("edit latency p50 (ms)", "ref"),
        NODE,
        before=hub("edit latency p50 (ms)", "base"),
    ),
    Row(
        "hub-latency-p99",
        "hub edit latency client to client, p99 (ms)",
        "hub",
        "latency",
        hub("edit latency p99 (ms)"),
        Goal("at most Node's", (("ratio", "<=", 1.0),)),
        hub("edit latency p99 (ms)", "ref"),
        NODE,
        before=hub("edit latency p99 (ms)", "base"),
    ),
    Row(
        "hub-fanout-p50",
        "hub fan-out 200 edits to 200 clients, delay p50 (ms)",
        "hub",
        "fanout",
        hub("fan-out 200x200 delay p50 (ms)"),
        Goal("at most Node's", (("ratio", "<=", 1.0),)),
        hub("fan-out 200x200 delay p50 (ms)", "ref"),
        NODE,
        before=hub("fan-out 200x200 delay p50 (ms)", "base"),
    ),
    Row(
        "hub-fanout-p99",
        "hub fan-out 200 edits to 200 clients, delay p99 (ms)",
        "hub",
        "fanout",
        hub("fan-out 200x200 delay p99 (ms)"),
        Goal("at most Node's", (("ratio", "<=", 1.0),)),
        hub("fan-out 200x200 delay p99 (ms)", "ref"),
        NODE,
        before=hub("fan-out 200x200 delay p99 (ms)", "base"),
    ),
    Row(
        "hub-fanout-rate",
        "hub fan-out 200 edits to 200 clients, delivered (msg/s)",
        "hub",
        "fanout",
        hub("fan-out 200x200 delivered (msg/s)"),
        Goal("stays ahead of Node's", (("ratio", ">=", 1.0),)),
        hub("fan-out 200x200 delivered (msg/s)", "ref"),
        NODE,
        before=hub("fan-out 200x200 delivered (msg/s)", "base"),
    ),
    Row(
        "hub-fanout-cpu",
        "hub fan-out 200 edits to 200 clients, server CPU per run (s)",
        "hub",
        "fanout",
        hub("fan-out 200x200 server CPU (s)"),
        reference=hub("fan-out 200x200 server CPU (s)", "ref"),
        ref_name=NODE,
        before=hub("fan-out 200x200 server CPU (s)", "base"),
    ),
    Row(
        "hub-bigdoc",
        "15 MB initial sync of a new client (ms)",
        "hub",
        "bigdoc",
        hub("15 MB initial sync (ms)"),
        Goal("at most Node's", (("ratio", "<=", 1.0),)),
        hub("15 MB initial sync (ms)", "ref"),
        NODE,
        before=hub("15 MB initial sync (ms)", "base"),
    ),
    Row(
        "hub-idle-rss",
        "hub RSS with 200 idle clients (MB)",
        "hub",
        "idle",
        hub("RSS, 200 idle clients (MB)"),
        Goal("at most 0.6x Node's", (("ratio", "<=", 0.6),)),
        hub("RSS, 200 idle clients (MB)", "ref"),
        NODE,
        before=hub("RSS, 200 idle clients (MB)", "base"),
    ),
    Row(
        "hub-10k-served",
        "10,000 idle y-websocket clients in batches of 200: served (clients)",
        "hub",
        "idle10k",
        hub("10k idle: served (clients)"),
        Goal("all 10,000", (("value", ">=", 10_000),)),
        hub("10k idle: served (clients)", "ref"),
        NODE,
        before=hub("10k idle: served (clients)", "base"),
    ),
    Row(
        "hub-10k-refused",
        "10k idle: refused at the first try (clients)",
        "hub",
        "idle10k",
        hub("10k idle: refused 1st try (clients)"),
        Goal("none (a well-behaved burst is served)", (("value", "<=", 0),)),
        hub("10k idle: refused 1st try (clients)", "ref"),
        NODE,
        before=hub("10k idle: refused 1st try (clients)", "base"),
    ),
    Row(
        "hub-10k-time",
        "10k idle: all synced (s)",
        "hub",
        "idle10k",
        hub("10k idle: all synced (s)"),
        NO_GOAL,
        hub("10k idle: all synced (s)", "ref"),
        NODE,
        before=hub("10k idle: all synced (s)", "base"),
    ),
    Row(
        "hub-10k-rss",
        "10k idle: server RSS once all synced (MB; reference: Node's peak)",
        "hub",
        "idle10k",
        hub("10k idle: RSS (MB)"),
        Goal("at most Node's peak", (("ratio", "<=", 1.0),)),
        hub("10k idle: peak RSS (MB)", "ref"),
        f"{NODE}, peak",
        before=hub("10k idle: RSS (MB)", "base"),
    ),
    Row(
        "hub-10k-probe-p50",
        "10k idle: a new client's sync, p50 (ms)",
        "hub",
        "idle10k",
        hub("10k idle: new client p50 (ms)"),
        NO_GOAL,
        hub("10k idle: new client p50 (ms)", "ref"),
        NODE,
        before=hub("10k idle: new client p50 (ms)", "base"),
    ),
    Row(
        "hub-10k-probe-p99",
        "10k idle: a new client's sync, p99 (ms)",
        "hub",
        "idle10k",
        hub("10k idle: new client p99 (ms)"),
        NO_GOAL,
        hub("10k idle: new client p99 (ms)", "ref"),
        NODE,
        before=hub("10k idle: new client p99 (ms)", "base"),
    ),
    Row(
        "lan-p50",
        "socket edit on daemon A to the change event on a subscriber of LAN peer B, p50 (ms)",
        "lan",
        "latency",
        rounds("lan", "latency", "p50_ms"),
        Goal("1.5 ms", (("value", "<=", 1.5),)),
        rounds("lan", "relay", "p50_ms"),
        RELAY,
        before=rounds("lan", "latency_base", "p50_ms"),
    ),
    Row(
        "lan-p99",
        "socket edit on A to the change event on LAN peer B, p99 (ms)",
        "lan",
        "latency",
        rounds("lan", "latency", "p99_ms"),
        Goal("4 ms", (("value", "<=", 4.0),)),
        rounds("lan", "relay", "p99_ms"),
        RELAY,
        before=rounds("lan", "latency_base", "p99_ms"),
    ),
    Row(
        "lan-local-p50",
        "the same edit's change event on a subscriber of A itself, p50 (ms)",
        "lan",
        "latency",
        rounds("lan", "latency", "local_p50_ms"),
        NO_GOAL,
        rounds("lan", "relay", "p50_ms"),
        RELAY,
        before=rounds("lan", "latency_base", "local_p50_ms"),
    ),
    Row(
        "writes-big",
        "small patch on a {big} environment, ack p50 (ms; reference: a small one, same daemon)",
        "daemon",
        "writes",
        rounds("daemon", "writes", "big_p50_ms"),
        Goal(
            "2 ms, independent of the size (at most 1.25x the small one)",
            (("value", "<=", 2.0), ("ratio", "<=", 1.25)),
        ),
        rounds("daemon", "writes", "small_p50_ms"),
        "small environment",
        before=rounds("daemon", "writes_base", "big_p50_ms"),
    ),
    Row(
        "writes-seq",
        "durable patches, one client, sequential (/s)",
        "daemon",
        "writes",
        rounds("daemon", "writes", "sequential_per_s"),
        Goal("2,000/s, every ack durable", (("value", ">=", 2000),)),
        before=rounds("daemon", "writes_base", "sequential_per_s"),
    ),
    Row(
        "memory-hub",
        "hub RSS, {stored} stored environments of 100 kB, 10 in use (MB)",
        "hub-memory",
        "memory",
        rounds("hub-memory", "this", "in_use_kb", 1 / 1024),
        Goal("follows use (at most 1.25x the reference)", (("ratio", "<=", 1.25),)),
        rounds("hub-memory-ref", "this", "in_use_kb", 1 / 1024),
        "the same hub storing only those 10",
        ref_job="hub-memory-ref",
        before=rounds("hub-memory", "base", "in_use_kb", 1 / 1024),
    ),
    Row(
        "memory-daemon",
        "daemon RSS, {stored} stored environments of 100 kB, 10 in use (MB)",
        "daemon",
        "memory",
        rounds("daemon", "memory", "rss_in_use_mb"),
        Goal("follows use (at most 1.25x the reference)", (("ratio", "<=", 1.25),)),
        rounds("daemon-ref", "memory", "rss_in_use_mb"),
        "the same daemon storing only those 10",
        ref_job="daemon-ref",
        before=rounds("daemon", "memory_base", "rss_in_use_mb"),
    ),
    Row(
        "memory-db",
        "daemon database after {edits} edits, 5 of 10 environments deleted (MB)",
        "store",
        "db",
        rounds("store", "this", "db_kib", 1 / 1024),
        Goal("gives its space back (at most 1.1x the compacted state)", (("ratio", "<=", 1.1),)),
        rounds("store", "this", "compacted_kib", 1 / 1024),
        "a fresh store with the compacted state",
        before=rounds("store", "base", "db_kib", 1 / 1024),
    ),
]

SIZES = {
    False: {
        "big": "15 MB",
        "stored": "1,000",
        "edits": "100k",
        "stored_n": 1000,
        "edits_n": 100_000,
    },
    True: {"big": "1 MB", "stored": "100", "edits": "2,000", "stored_n": 100, "edits_n": 2000},
}


# --- which rows, which jobs --------------------------------------------------------------------


def select(only: str | None) -> list[Row]:
    """The rows `--only` names (comma-separated keys, or prefixes ending before a dash)."""
    if not only:
        return list(ROWS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if not any(_matches(row.key, w) for row in ROWS)]
    if unknown:
        keys = ", ".join(row.key for row in ROWS)
        raise SystemExit(f"table: no row {', '.join(unknown)} (rows: {keys})")
    return [row for row in ROWS if any(_matches(row.key, w) for w in wanted)]


def _matches(key: str, wanted: str) -> bool:
    return key == wanted or key.startswith(wanted + "-")


@dataclass
class Options:
    quick: bool = False
    rounds: int = 3
    baseline: Path | None = None
    harness: Path | None = None


@dataclass
class Job:
    """One run of one script, for the rows that read it."""

    name: str
    argv: list[str]
    needs_harness: bool = False
    rows: list[str] = field(default_factory=list)


def plan(rows: Iterable[Row], opts: Options) -> list[Job]:
    """The script runs these rows need, cheapest first; without `--json FILE` (run() adds it)."""
    rows = list(rows)
    parts: dict[str, list[str]] = {}
    for row in rows:
        for job in {row.job, row.ref_job} - {None}:
            assert job is not None
            parts.setdefault(job, [])
            if row.part not in parts[job]:
                parts[job].append(row.part)
    py = [sys.executable]
    common = ["--rounds", str(opts.rounds)]
    base = ["--baseline", str(opts.baseline)] if opts.baseline else []
    quick = ["--quick"] if opts.quick else []
    size = SIZES[opts.quick]
    jobs: list[Job] = []
    if "lan" in parts:
        argv = [*py, str(HERE / "bench_lan.py"), "--only-latency", *common, *quick, *base]
        jobs.append(Job("lan", argv))
    if "store" in parts:
        edits = ["--edits", str(size["edits_n"])]
        jobs.append(Job("store", [*py, str(HERE / "bench_store.py"), *edits, *common, *base]))
    if "daemon" in parts:
        only = ["--only", ",".join(parts["daemon"])]
        argv = [*py, str(HERE / "bench_daemon.py"), *only, *common, *quick, *base]
        jobs.append(Job("daemon", argv))
    if "daemon-ref" in parts:
        only = ["--only", "memory", "--memory-envs", "10"]
        jobs.append(Job("daemon-ref", [*py, str(HERE / "bench_daemon.py"), *only, *common]))
    if "hub-memory" in parts:
        envs = ["--envs", str(size["stored_n"])]
        argv = [*py, str(HERE / "bench_hub_memory.py"), *envs, *common, *base]
        jobs.append(Job("hub-memory", argv))
    if "hub-memory-ref" in parts:
        argv = [*py, str(HERE / "bench_hub_memory.py"), "--envs", "10", *common]
        jobs.append(Job("hub-memory-ref", argv))
    if "hub" in parts:
        scenarios = ["--scenarios", ",".join(parts["hub"])]
        harness = ["--harness", str(opts.harness)] if opts.harness else []
        argv = [*py, str(HERE / "bench_hub.py"), *scenarios, *harness, *common, *base]
        jobs.append(Job("hub", argv, needs_harness=True))
    for job in jobs:
        job.rows = [r.key for r in rows if job.name in (r.job, r.ref_job)]
    return jobs


HARNESS_HOWTO = (
    "prepare the Node harness once, with the npm registry (so outside leakcheck): "
    "`.venv/bin/python benchmarks/bench_hub.py --prepare /tmp/yh`, then pass "
    "`--harness /tmp/yh/bench`"
)


Problems = dict[str, tuple[str, str]]
"""By job: ("skipped" | "failed" | "partly failed", why)."""


def run(jobs: list[Job], opts: Options, work: Path) -> tuple[Outputs, Problems]:
    """Each job's JSON, and what went wrong with the others."""
    outputs: Outputs = {}
    problems: Problems = {}
    for job in jobs:
        if job.needs_harness and opts.harness is None:
            problems[job.name] = ("skipped", f"no --harness: {HARNESS_HOWTO}")
            print(f"table: {job.name}: skipped, no --harness: {HARNESS_HOWTO}", file=sys.stderr)
            continue
        out = work / f"{job.name}.json"
        argv = [*job.argv, "--json", str(out)]
        print(f"table: {job.name}: {' '.join(argv)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        last = ""
        with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # theirs on stderr, so the table alone is on stdout
                if line.startswith("{"):
                    continue  # their JSON line: we read the file
                sys.stderr.write(line)
                last = line.strip() or last
        seconds = time.monotonic() - t0
        print(f"table: {job.name}: exit {proc.returncode} ({seconds:.0f} s)", file=sys.stderr)
        if out.exists():
            outputs[job.name] = json.loads(out.read_text())
            if proc.returncode:
                why = f"exit {proc.returncode}, some runs failed (its output above): {last}"
                problems[job.name] = ("partly failed", why)
        elif "skipped" in last:
            problems[job.name] = ("skipped", last)
        else:
            problems[job.name] = ("failed", f"exit {proc.returncode}: {last}")
    return outputs, problems


# --- the table --------------------------------------------------------------------------------


def build(rows: Iterable[Row], outputs: Outputs, quick: bool = False) -> list[dict[str, Any]]:
    """One dict per row: the figures (None where not measured) and the verdict."""
    size = SIZES[quick]
    built = []
    for row in rows:
        after = row.after(outputs)
        ref = row.reference(outputs) if row.reference else None
        before = row.before(outputs) if row.before else None
        ratio = after / ref if after is not None and ref else None
        built.append(
            {
                "key": row.key,
                "figure": row.figure.format(**size),
                "after": after,
                "reference": ref,
                "reference_name": row.ref_name,
                "ratio": ratio,
                "before": before,
                "after_to_before": after / before if after is not None and before else None,
                "goal": row.goal.text,
                "met": row.goal.met(after, ratio),
                "jobs": [j for j in (row.job, row.ref_job) if j],
            }
        )
    return built


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render(built: list[dict[str, Any]], problems: Problems | None = None) -> str:
    """The markdown table, then a line per job that went wrong."""
    problems = problems or {}
    lines = [
        "| figure | after | reference | ratio | before | goal | met? |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in built:
        after = number(r["after"])
        if r["after"] is None:
            after = next((problems[j][0] for j in r["jobs"] if j in problems), after)
        ref = "-"
        if r["reference"] is not None:
            ref = f"{number(r['reference'])} ({r['reference_name']})"
        elif r["reference_name"]:
            ref = f"- ({r['reference_name']})"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        before = number(r["before"])
        if r["after_to_before"] is not None:
            before += f" (after {r['after_to_before']:.2f}x)"
        cells = [r["figure"], after, ref, ratio, before, r["goal"], r["met"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if problems:
        lines.append("")
    for job, (status, why) in problems.items():
        lines.append(f"{job}: {status}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="rows: " + ", ".join(row.key for row in ROWS),
    )
    parser.add_argument("--quick", action="store_true", help="one round, smaller sizes")
    parser.add_argument("--rounds", type=int, help="rounds of every script (3; --quick 1)")
    parser.add_argument("--only", metavar="ROWS", help="comma-separated rows or prefixes")
    parser.add_argument(
        "--baseline", metavar="TREE", type=Path, help="a source tree for the before column"
    )
    parser.add_argument(
        "--harness", metavar="DIR", type=Path, help="the Node harness (bench_hub.py --prepare)"
    )
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write rows and raw JSON")
    a = parser.parse_args(argv)
    if a.baseline is not None and not (a.baseline / "peerdaemon").is_dir():
        parser.error(f"--baseline {a.baseline}: no peerdaemon package there")
    opts = Options(
        quick=a.quick,
        rounds=a.rounds or (1 if a.quick else 3),
        baseline=a.baseline.resolve() if a.baseline else None,
        harness=a.harness.resolve() if a.harness else None,
    )
    rows = select(a.only)
    jobs = plan(rows, opts)
    with tempfile.TemporaryDirectory(prefix="pdtable") as tmp:
        outputs, problems = run(jobs, opts, Path(tmp))
    built = build(rows, outputs, opts.quick)
    print(render(built, problems))
    what = f"medians of {opts.rounds} round(s)" + (", --quick sizes" if opts.quick else "")
    print(f"\n{what}; ratio = after / reference; before: --baseline {opts.baseline or '(none)'}")
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "quick": opts.quick,
                    "rounds": opts.rounds,
                    "baseline": str(opts.baseline) if opts.baseline else None,
                    "rows": built,
                    "problems": problems,
                    "jobs": {j.name: j.argv for j in jobs},
                    "outputs": outputs,
                },
                indent=1,
            )
        )
    return 1 if any(status != "skipped" for status, _ in problems.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
