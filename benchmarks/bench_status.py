"""Figures of the status page (docs/status-page.md), against real daemon processes and a real
headless Chromium (Debian's `chromium`, driven by Playwright).

    .venv/bin/python benchmarks/bench_status.py [--rounds 3] [--envs 20] [--quick]

- time to first render: from navigation start to the panels filled (the page's
  `peerdaemon-panels-filled` mark, set once /api/overview is drawn), median of `--loads` loads;
- the daemon's memory (RSS): with the page off (`--no-status`), on but unvisited, and while a page
  is open and following the event stream;
- `peerdaemon status` start-up (the CLI, a subprocess), median of 20 runs;
- an environment edit's socket acknowledgement (`patch`, sequential, as bench_daemon.py
  measures it) with no page open and with a page open, side by side (alternating, medians): the
  page follows every edit's event and re-reads the environments.

Prints one line per figure, then a JSON summary. Everything listens on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lab"))  # chromium.py
from bench_daemon import patch_load  # noqa: E402
from chromium import CHROMIUM, chromium_args  # noqa: E402
from envgen import FIXTURE, make_environment  # noqa: E402
from procutil import stop_process  # noqa: E402

from peerdaemon.api.client import Client, DaemonNotRunning  # noqa: E402

CHROMIUM_ARGS = chromium_args()
CLI = Path(sys.executable).parent / "peerdaemon"


class Daemon:
    def __init__(self, root: Path, *, status: bool = True) -> None:
        self.root = root
        self.data = root / "data"
        self.sock = root / "d.sock"
        self.status = status
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        args = [sys.executable, "-m", "peerdaemon", "run", "--data-dir", str(self.data)]
        args += ["--socket", str(self.sock), "--no-mdns"]
        args += ["--status-listen", "127.0.0.1:0"] if self.status else ["--no-status"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with Client.connect(self.sock) as c:
                    status = c.status()
                if not self.status:
                    return
                if status["status_page"]["url"]:  # the page starts just after the socket
                    self.url = status["status_page"]["url"]
                    return
            except (DaemonNotRunning, OSError):
                pass
            time.sleep(0.005)
        raise RuntimeError("daemon did not start")

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        """User + system CPU seconds the daemon has used."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def fill(d: Daemon, envs: int) -> str:
    """`envs` environments (the fixture, then generated ones of ~50 kB); returns the fixture's id."""
    with Client.connect(d.sock) as c:
        first = c.import_env(FIXTURE.read_text())["id"]
        for i in range(envs - 1):
            c.import_env(make_environment(50_000, seed=i + 1))
    return first


def browser(p: Any, profile: str) -> Any:
    context = p.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    context.set_default_timeout(30_000)
    return context


def first_render_ms(context: Any, url: str) -> float:
    page = context.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        return float(
            page.evaluate("performance.getEntriesByName('peerdaemon-panels-filled')[0].startTime")
        )
    finally:
        page.close()


def cli_status_ms(sock: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(
            [str(CLI), "--socket", str(sock), "status"], check=True, stdout=subprocess.DEVNULL
        )
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def one_round(root: Path, envs: int, loads: int, patches: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    out: dict[str, Any] = {}
    off = Daemon(root / "off", status=False)
    off.start()
    try:
        fill(off, envs)
        time.sleep(0.5)
        out["rss_off_kb"] = off.rss_kb()
    finally:
        off.stop()

    d = Daemon(root / "on")
    d.start()
    profile = tempfile.mkdtemp(prefix="pd-bench-chromium-")
    try:
        env_id = fill(d, envs)
        time.sleep(0.5)
        out["rss_on_kb"] = d.rss_kb()
        out["cli_status_ms"] = cli_status_ms(d.sock, 20)
        with sync_playwright() as p:
            context = browser(p, profile)
            try:
                renders = [first_render_ms(context, d.url) for _ in range(loads)]
                out["first_render_ms"] = statistics.median(renders)
                out["first_render_all_ms"] = [round(r, 1) for r in renders]
                closed, opened, cpu_closed, cpu_open = [], [], [], []
                page = None
                for turn in range(4):  # closed, open, closed, open
                    if turn % 2:
                        page = context.new_page()
                        page.goto(d.url)
                        page.wait_for_selector("body[data-ready='1']")
                        page.wait_for_selector("#live[data-state='live']")
                    cpu = d.cpu_s()
                    result = trio.run(patch_load, d.sock, env_id, patches, 1)
                    cpu_ms = (d.cpu_s() - cpu) * 1000 / patches
                    (opened if turn % 2 else closed).append(result["p50_ms"])
                    (cpu_open if turn % 2 else cpu_closed).append(cpu_ms)
                    if page is not None:
                        if turn == 3:
                            out["rss_page_open_kb"] = d.rss_kb()
                            out["events_shown"] = page.locator("#event-list li").count()
                        page.close()
                        page = None
                out["patch_p50_closed_ms"] = statistics.median(closed)
                out["patch_p50_open_ms"] = statistics.median(opened)
                out["cpu_per_patch_closed_ms"] = statistics.median(cpu_closed)
                out["cpu_per_patch_open_ms"] = statistics.median(cpu_open)
            finally:
                context.close()
    finally:
        d.stop()
        shutil.rmtree(profile, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--envs", type=int, default=20, help="environments in the daemon")
    parser.add_argument("--loads", type=int, default=10, help="page loads per round")
    parser.add_argument("--patches", type=int, default=300, help="sequential patches per turn")
    parser.add_argument("--quick", action="store_true", help="1 round, small: checks the script")
    a = parser.parse_args()
    if a.quick:
        a.rounds, a.envs, a.loads, a.patches = 1, 5, 3, 50
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    os.environ.setdefault("PEERDAEMON_NO_MDNS", "1")
    rounds = []
    for r in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="pdbs") as tmp:
            rounds.append(one_round(Path(tmp), a.envs, a.loads, a.patches))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def line(label: str, key: str, fmt: str) -> None:
        values = ", ".join(fmt.format(r[key]) for r in rounds)
        print(f"{label:58s} {fmt.format(med(key)):>10s}   ({values})")

    print(f"status page, {a.envs} environments, {a.rounds} rounds (median, then each round)")
    line("first render, navigation to panels filled, ms", "first_render_ms", "{:.1f}")
    for r in rounds:
        for key in ("rss_off_kb", "rss_on_kb", "rss_page_open_kb"):
            r[key.replace("_kb", "_mib")] = r[key] / 1024
        r["extra_on_mib"] = r["rss_on_mib"] - r["rss_off_mib"]
        r["extra_open_mib"] = r["rss_page_open_mib"] - r["rss_on_mib"]
    line("daemon RSS, status page off (--no-status), MiB", "rss_off_mib", "{:.1f}")
    line("daemon RSS, status page on, no page open, MiB", "rss_on_mib", "{:.1f}")
    line("daemon RSS, a page open (after the edits), MiB", "rss_page_open_mib", "{:.1f}")
    line("  extra: page on vs off, MiB", "extra_on_mib", "{:+.1f}")
    line("  extra: a page open vs none, MiB", "extra_open_mib", "{:+.1f}")
    line("`peerdaemon status` start-up (CLI, median of 20), ms", "cli_status_ms", "{:.1f}")
    line("patch ack p50, no page open, ms", "patch_p50_closed_ms", "{:.2f}")
    line("patch ack p50, a page open and following, ms", "patch_p50_open_ms", "{:.2f}")
    line("daemon CPU per patch, no page open, ms", "cpu_per_patch_closed_ms", "{:.2f}")
    line("daemon CPU per patch, a page open and following, ms", "cpu_per_patch_open_ms", "{:.2f}")
    print(json.dumps({"rounds": rounds}, indent=None))


if __name__ == "__main__":
    main()
