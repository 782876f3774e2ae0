"""benchmarks/table.py: issue 13's table from the scripts' JSON (canned here: nothing measured but
in the one smoke run of a cheap row), which runs it needs, and what it says of a job that gave
nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import table  # noqa: E402


def hub_figure(hub: float, ref: float, base: float | None = None) -> dict:
    row = {"hub": {"median": hub, "values": [hub]}, "ref": {"median": ref, "values": [ref]}}
    if base is not None:
        row["base"] = {"median": base, "values": [base]}
    return row


# Shaped as each script writes it with --json (bench_hub: its summary; the others: their rounds).
CANNED = {
    "hub": {
        "rounds": 1,
        "figures": {
            "edit latency p50 (ms)": hub_figure(0.5, 0.64, 1.52),
            "edit latency p99 (ms)": hub_figure(4.0, 3.6, 4.69),
            "fan-out 200x200 delivered (msg/s)": hub_figure(40_000, 32_000, 36_000),
            "10k idle: served (clients)": hub_figure(9773, 10_000, 9000),
            "10k idle: RSS (MB)": hub_figure(127, 64, 234),
            "10k idle: peak RSS (MB)": hub_figure(130, 136),
        },
    },
    "lan": {
        "rounds": 3,
        "latency": [{"p50_ms": v, "p99_ms": 3.0, "local_p50_ms": 1.0} for v in (1.2, 1.4, 9.0)],
        "latency_base": [{"p50_ms": 5.4, "p99_ms": 7.6, "local_p50_ms": 1.3}],
        "relay": [{"p50_ms": 0.4, "p99_ms": 0.5}] * 3,
    },
    "daemon": {
        "writes": [{"big_p50_ms": 1.8, "small_p50_ms": 1.6, "sequential_per_s": 1800}],
        "writes_base": [{"big_p50_ms": 8.4, "small_p50_ms": 1.6, "sequential_per_s": 925}],
        "memory": [{"rss_in_use_mb": 60.0}],
        "memory_base": [{"rss_in_use_mb": 300.0}],
    },
    "daemon-ref": {"memory": [{"rss_in_use_mb": 50.0}], "memory_base": []},
    "store": {"this": [{"db_kib": 17_920, "compacted_kib": 17_920}]},
    "hub-memory": {"this": [{"in_use_kb": 59_392}], "base": [{"in_use_kb": 291_840}]},
    "hub-memory-ref": {"this": [{"in_use_kb": 51_200}]},
}


def by_key(built: list[dict]) -> dict[str, dict]:
    return {r["key"]: r for r in built}


def test_rows_read_their_figures_reference_ratio_before_and_goal():
    rows = by_key(table.build(table.ROWS, CANNED))
    lat = rows["hub-latency-p50"]
    assert (lat["after"], lat["reference"], lat["before"]) == (0.5, 0.64, 1.52)
    assert lat["ratio"] == pytest.approx(0.5 / 0.64) and lat["met"] == "yes"
    assert rows["hub-latency-p99"]["met"] == "no"  # 4.0 against Node's 3.6
    assert rows["hub-fanout-rate"]["met"] == "yes"  # more messages/s than Node: ahead
    assert rows["hub-10k-served"]["met"] == "no"  # goal: all 10,000
    rss = rows["hub-10k-rss"]  # ours once synced against Node's peak, not Node's settled RSS
    assert (rss["reference"], rss["met"]) == (136, "yes")
    lan = rows["lan-p50"]  # medians over the rounds
    assert (lan["after"], lan["reference"], lan["before"]) == (1.4, 0.4, 5.4)
    assert lan["met"] == "yes" and rows["lan-p99"]["met"] == "yes"
    big = rows["writes-big"]  # both checks: 2 ms and independent of the size
    assert big["ratio"] == pytest.approx(1.8 / 1.6) and big["met"] == "yes"
    assert rows["writes-seq"]["met"] == "no" and rows["writes-seq"]["reference"] is None
    assert rows["memory-hub"]["after"] == 58 and rows["memory-hub"]["reference"] == 50
    assert rows["memory-hub"]["before"] == 285 and rows["memory-hub"]["met"] == "yes"
    assert rows["memory-daemon"]["ratio"] == pytest.approx(1.2)
    assert rows["memory-db"]["ratio"] == 1.0 and rows["memory-db"]["before"] is None


def test_what_was_not_measured_is_a_dash_or_the_jobs_state_never_a_number():
    rows = by_key(table.build(table.ROWS, {"lan": CANNED["lan"]}))
    assert rows["hub-bigdoc"]["after"] is None and rows["hub-bigdoc"]["met"] == "?"
    assert rows["memory-db"]["after"] is None
    text = table.render(
        table.build(table.ROWS, {"lan": CANNED["lan"]}),
        {"hub": ("skipped", "no --harness: " + table.HARNESS_HOWTO)},
    )
    line = next(ln for ln in text.splitlines() if ln.startswith("| 15 MB initial sync"))
    assert line.split(" | ")[1] == "skipped"
    assert "hub: skipped: no --harness: prepare the Node harness once" in text
    assert "bench_hub.py --prepare" in text


def test_render_is_one_markdown_table_with_the_seven_columns():
    text = table.render(table.build(table.ROWS, CANNED, quick=True))
    lines = text.splitlines()
    assert lines[0] == "| figure | after | reference | ratio | before | goal | met? |"
    assert len(lines) == 2 + len(table.ROWS)
    assert all(ln.count(" | ") == 6 for ln in lines[2:])
    lat = next(ln for ln in lines if ln.startswith("| hub edit latency client to client, p50"))
    assert lat.split(" | ")[1:] == [
        "0.50",
        f"0.64 ({table.NODE})",
        "0.78x",
        "1.52 (after 0.33x)",
        "at most Node's",
        "yes |",
    ]
    assert "| small patch on a 1 MB environment" in text  # --quick names its sizes


def test_only_selects_rows_by_key_or_prefix_and_refuses_unknown_ones():
    assert [r.key for r in table.select("lan")] == ["lan-p50", "lan-p99", "lan-local-p50"]
    assert [r.key for r in table.select("hub-latency-p99,memory-db")] == [
        "hub-latency-p99",
        "memory-db",
    ]
    assert all(r.job == "hub" for r in table.select("hub"))  # the memory rows are memory-*
    with pytest.raises(SystemExit, match="no row hub-lat"):
        table.select("hub-lat")


def test_plan_runs_each_script_once_with_what_its_rows_need():
    opts = table.Options(quick=True, rounds=1, baseline=Path("/b"), harness=Path("/h"))
    jobs = {j.name: j for j in table.plan(table.select("hub-fanout,hub-bigdoc,memory"), opts)}
    assert set(jobs) == {"hub", "daemon", "daemon-ref", "store", "hub-memory", "hub-memory-ref"}
    hub = jobs["hub"].argv
    assert hub[hub.index("--scenarios") + 1] == "fanout,bigdoc"
    assert hub[hub.index("--harness") + 1] == "/h" and "--baseline" in hub
    daemon = jobs["daemon"].argv
    assert daemon[daemon.index("--only") + 1] == "memory" and "--quick" in daemon
    # the references are this tree's only, storing just the 10 in use
    for ref in ("daemon-ref", "hub-memory-ref"):
        assert "--baseline" not in jobs[ref].argv and "10" in jobs[ref].argv
    store = jobs["store"].argv
    assert store[store.index("--edits") + 1] == "2000" and "--baseline" in store
    assert jobs["store"].rows == ["memory-db"]


def test_a_job_without_its_harness_is_skipped_and_one_that_fails_is_said(tmp_path):
    writes = tmp_path / "writes.py"  # stands for a script: its JSON, whatever the arguments
    writes.write_text(
        "import json, sys\n"
        "out = sys.argv[sys.argv.index('--json') + 1]\n"
        "open(out, 'w').write(json.dumps({'this': [{'db_kib': 2048, 'compacted_kib': 1024}]}))\n"
    )
    jobs = [
        table.Job("hub", [sys.executable, "-c", "raise SystemExit(9)"], needs_harness=True),
        table.Job("store", [sys.executable, str(writes)]),
        table.Job("lan", [sys.executable, "-c", "print('it broke'); raise SystemExit(2)"]),
    ]
    outputs, problems = table.run(jobs, table.Options(), tmp_path)
    assert problems["hub"][0] == "skipped" and "--prepare" in problems["hub"][1]
    assert problems["lan"] == ("failed", "exit 2: it broke")
    assert "store" not in problems
    rows = by_key(table.build(table.select("memory-db"), outputs))
    assert rows["memory-db"]["ratio"] == 2.0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_smoke_of_one_cheap_row_measures_it(tmp_path):
    """The real plumbing once: table.py runs bench_store.py, which writes its --json."""
    out = tmp_path / "t.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "table.py"), "--quick", "--only", "memory-db"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("| figure | after | reference | ratio | before | goal | met? |")
    [row] = json.loads(out.read_text())["rows"]
    assert row["key"] == "memory-db"
    assert row["after"] > 0 and row["reference"] > 0 and row["ratio"] > 0.5
