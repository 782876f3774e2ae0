"""Logs of `peerdaemon run` and `peerdaemon hub serve` (core/runner.py): the text format is the
one it always was; `--log-format json` writes one object per line (time, level, logger,
message, exc_info); `--log-level` filters; `$PEERDAEMON_LOG_LEVEL` / `_FORMAT` come between
the command line and the hub's `[log]`. Checked in child processes (pytest owns this one's
root logger), and on a real daemon and a real hub."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from peerdaemon import cli
from peerdaemon.core.runner import JsonFormatter, LogSettingError, resolve_logging

PYTHON = sys.executable
TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: .*"
)
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
KEYS = {"time", "level", "logger", "message"}

# A supervisor that logs at each level and a traceback, then ends (or fails: argv[1] == "fail").
CHILD = """
import logging, sys
from peerdaemon.core.runner import run_process

async def main(config):
    log = logging.getLogger("peerdaemon.child")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line\\nwith a second line")
    log.error("an error line: %s", {"quoted": '"x"'})
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("with a traceback")
    if config == "fail":
        raise OSError("port 1 taken\\n(a second line)")

options = dict(arg.split("=", 1) for arg in sys.argv[2:])
raise SystemExit(
    run_process(main, sys.argv[1], expected=(OSError,), stopped="child stopped", **options)
)
"""


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    env.update(PYTHONUNBUFFERED="1", PEERDAEMON_NO_MDNS="1", **extra)
    return env


def run_child(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        env=child_env(**env),
        timeout=60,
    )


def json_lines(stderr: str) -> list[dict]:
    records = [json.loads(line) for line in stderr.splitlines()]
    for record in records:
        assert KEYS <= set(record) <= KEYS | {"exc_info", "stack_info"}, record
        assert ISO_UTC.fullmatch(record["time"]), record["time"]
    return records


# --------------------------------------------------------------------------- without I/O
def test_the_command_line_wins_then_the_environment_then_the_file():
    env = {"PEERDAEMON_LOG_LEVEL": "warning", "PEERDAEMON_LOG_FORMAT": "json"}
    assert resolve_logging(environ={}) == ("info", "text")
    assert resolve_logging(file_level="error", file_format="json", environ={}) == ("error", "json")
    assert resolve_logging(file_level="error", file_format="text", environ=env) == (
        "warning",
        "json",
    )
    assert resolve_logging("DEBUG", "Text", file_level="error", environ=env) == ("debug", "text")
    assert resolve_logging(environ={"PEERDAEMON_LOG_LEVEL": ""}) == ("info", "text")  # unset
    with pytest.raises(LogSettingError, match="PEERDAEMON_LOG_LEVEL: unknown log level 'loud'"):
        resolve_logging(environ={"PEERDAEMON_LOG_LEVEL": "loud"})
    with pytest.raises(LogSettingError, match="PEERDAEMON_LOG_FORMAT"):
        resolve_logging("info", environ={"PEERDAEMON_LOG_FORMAT": "xml"})
    assert resolve_logging("info", "json", environ={"PEERDAEMON_LOG_FORMAT": "xml"})  # not read


def test_a_json_record_is_one_line_with_its_traceback_as_a_string():
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "peerdaemon.x", logging.WARNING, __file__, 1, "a %s\nb", ("c",), None
    )
    line = formatter.format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out == {
        "time": out["time"],
        "level": "warning",
        "logger": "peerdaemon.x",
        "message": "a c\nb",
    }
    stamp = datetime.fromisoformat(out["time"].replace("Z", "+00:00"))
    assert (
        abs(stamp.timestamp() - record.created) < 0.001 and stamp.utcoffset().total_seconds() == 0
    )
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord("p", logging.ERROR, __file__, 1, "failed", (), info)
    out = json.loads(formatter.format(record))
    assert out["exc_info"].startswith("Traceback") and "ValueError: boom" in out["exc_info"]


# --------------------------------------------------------------------------- child processes
def test_text_is_unchanged_by_default():
    done = run_child("ok")
    assert done.returncode == 0, done.stderr
    # the format of always: "%(asctime)s %(levelname)s %(name)s: %(message)s", INFO and up
    records = [line[24:] for line in done.stderr.splitlines() if TEXT_LINE.fullmatch(line)]
    assert records == [
        "INFO peerdaemon.child: an info line",
        "WARNING peerdaemon.child: a warning line",
        "ERROR peerdaemon.child: an error line: {'quoted': '\"x\"'}",
        "ERROR peerdaemon.child: with a traceback",
        "INFO peerdaemon: child stopped",
    ]
    assert "WARNING peerdaemon.child: a warning line\nwith a second line\n" in done.stderr
    traceback = "ERROR peerdaemon.child: with a traceback\nTraceback (most recent call last):"
    assert traceback in done.stderr and "ZeroDivisionError" in done.stderr
    # and a start-up failure is still one plain line
    done = run_child("fail")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "peerdaemon: port 1 taken (a second line)"


def test_json_lines_parse_and_carry_the_traceback():
    done = run_child("ok", "log_format=json")
    assert done.returncode == 0, done.stderr
    records = json_lines(done.stderr)
    assert [(r["level"], r["message"]) for r in records] == [
        ("info", "an info line"),
        ("warning", "a warning line\nwith a second line"),
        ("error", "an error line: {'quoted': '\"x\"'}"),
        ("error", "with a traceback"),
        ("info", "child stopped"),
    ]
    assert "ZeroDivisionError" in records[3]["exc_info"]
    assert all("exc_info" not in r for r in records[:3])
    # a start-up failure is a record too, so that every line parses
    done = run_child("fail", "log_format=json")
    assert done.returncode == 1
    last = json_lines(done.stderr)[-1]
    assert (last["level"], last["logger"]) == ("error", "peerdaemon")
    assert last["message"] == "port 1 taken (a second line)"


@pytest.mark.parametrize(
    ("level", "seen"),
    [
        ("debug", ["debug", "info", "warning", "error", "error", "info"]),
        ("info", ["info", "warning", "error", "error", "info"]),
        ("warning", ["warning", "error", "error"]),
        ("error", ["error", "error"]),
    ],
)
def test_levels_filter(level, seen):
    done = run_child("ok", f"log_level={level}", "log_format=json")
    assert done.returncode == 0, done.stderr
    assert [r["level"] for r in json_lines(done.stderr)] == seen


def test_environment_variables_and_what_wins_over_them():
    done = run_child("ok", PEERDAEMON_LOG_LEVEL="warning", PEERDAEMON_LOG_FORMAT="JSON")
    assert [r["level"] for r in json_lines(done.stderr)] == ["warning", "error", "error"]
    done = run_child("ok", "log_format=text", "log_level=error", PEERDAEMON_LOG_FORMAT="json")
    lines = [line for line in done.stderr.splitlines() if TEXT_LINE.fullmatch(line)]
    assert [line.split(" ")[2] for line in lines] == ["ERROR", "ERROR"]
    done = run_child("ok", "file_level=error", PEERDAEMON_LOG_LEVEL="info")  # the env wins
    assert "INFO peerdaemon.child: an info line" in done.stderr
    done = run_child("ok", PEERDAEMON_LOG_LEVEL="loud")
    assert done.returncode == 1
    assert done.stderr == (
        "peerdaemon: PEERDAEMON_LOG_LEVEL: unknown log level 'loud'"
        " (one of: debug, info, warning, error)\n"
    )


def test_the_flags_are_on_run_and_hub_serve():
    parser = cli.build_parser()
    args = parser.parse_args(["run", "--log-level", "WARNING", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("warning", "json")
    args = parser.parse_args(["hub", "serve", "--log-level", "debug", "--log-format", "text"])
    assert (args.log_level, args.log_format) == ("debug", "text")
    args = parser.parse_args(["run"])
    assert (args.log_level, args.log_format) == (None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--log-format", "xml"])


# --------------------------------------------------------------------------- real processes
@contextmanager
def process(argv: list[str], **env: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A child whose stderr goes to a file; SIGKILLed by pid if still running at the end, its
    directory removed."""
    base = Path(tempfile.mkdtemp(prefix="pd"))
    log = base / "stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [arg.replace("{base}", str(base)) for arg in argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=child_env(**env),
        )
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(20)
        shutil.rmtree(base, ignore_errors=True)


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = log.read_text(encoding="utf-8", errors="replace")
        if text in out:
            return out
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {text!r}:\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} after {timeout} s:\n{out}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes]) -> int:
    os.kill(proc.pid, signal.SIGTERM)
    return proc.wait(20)


RUN = [PYTHON, "-m", "peerdaemon", "run", "--data-dir", "{base}/data", "--socket", "{base}/s"]
SERVE = [PYTHON, "-m", "peerdaemon", "hub", "serve", "--data-dir", "{base}/hub"]


def test_a_real_daemon_logs_json_lines():
    with process([*RUN, "--log-format", "json"]) as (proc, log):
        wait_for_line(proc, log, "peerdaemon ready")
        assert stop(proc) == 0
        records = json_lines(log.read_text(encoding="utf-8"))
    messages = [r["message"] for r in records]
    assert any(m.startswith("peerdaemon ready: ") for m in messages)
    assert messages[-2:] == ["received SIGTERM, shutting down", "peerdaemon stopped"]
    assert {r["logger"] for r in records} >= {"peerdaemon", "peerdaemon.api"}
    assert {r["level"] for r in records} == {"info"}


def test_a_real_daemon_takes_the_environment_and_keeps_text_by_default():
    with process([*RUN, "--log-level", "warning"], PEERDAEMON_LOG_FORMAT="json") as (proc, log):
        # nothing at warning while it starts: wait for its socket instead
        deadline = time.monotonic() + 20
        sock = Path(proc.args[proc.args.index("--socket") + 1])
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        assert stop(proc) == 0
        assert log.read_text(encoding="utf-8") == ""  # info lines filtered out
    with process(RUN) as (proc, log):
        wait_for_line(proc, log, "peerdaemon ready")
        assert stop(proc) == 0
        lines = log.read_text(encoding="utf-8").splitlines()
    assert lines and all(TEXT_LINE.fullmatch(line) for line in lines)
    assert lines[-1].endswith(" INFO peerdaemon: peerdaemon stopped")


def test_a_real_hub_follows_its_config_the_environment_and_its_flags(tmp_path):
    config = tmp_path / "hub.toml"
    config.write_text('listen = "127.0.0.1:0"\n[log]\nlevel = "warning"\nformat = "json"\n')
    with process([*SERVE, "--config", str(config)], PEERDAEMON_LOG_LEVEL="info") as (proc, log):
        out = wait_for_line(proc, log, "hub key fingerprint")  # info: the environment's
        assert stop(proc) == 0
        records = json_lines(log.read_text(encoding="utf-8"))  # json: the file's
    assert "hub listening on 127.0.0.1:" in out
    assert records[-1]["message"] == "hub stopped"
    argv = [*SERVE, "--config", str(config), "--log-format", "text", "--log-level", "info"]
    with process(argv, PEERDAEMON_LOG_FORMAT="json") as (proc, log):  # the flags win
        wait_for_line(proc, log, "hub key fingerprint")
        assert stop(proc) == 0
        lines = log.read_text(encoding="utf-8").splitlines()
    assert lines and all(TEXT_LINE.fullmatch(line) for line in lines)


def test_a_hub_that_cannot_start_says_so_in_one_json_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [*SERVE, "--listen", f"127.0.0.1:{port}", "--log-format", "json"]
        with process(argv) as (proc, log):
            assert proc.wait(30) == 1
            records = json_lines(log.read_text(encoding="utf-8"))
    assert records[-1]["level"] == "error" and "cannot listen" in records[-1]["message"]


def test_journal_lines_carry_priorities_and_no_time(tmp_path):
    """stderr that is the journal's stream ($JOURNAL_STREAM names its device and inode, as
    systemd sets it): `<N>` priority prefixes, no timestamp, one prefix per line."""
    err = tmp_path / "stderr"
    with err.open("w") as stream:
        info = os.fstat(stream.fileno())
        done = subprocess.run(
            [PYTHON, "-c", CHILD, "ok"],
            stdout=subprocess.PIPE,
            stderr=stream,
            text=True,
            env=child_env(JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}"),
            timeout=60,
        )
    assert done.returncode == 0
    lines = err.read_text().splitlines()
    assert lines[:4] == [
        "<6>peerdaemon.child: an info line",
        "<4>peerdaemon.child: a warning line",
        "<4>with a second line",
        "<3>peerdaemon.child: an error line: {'quoted': '\"x\"'}",
    ]
    assert "<3>peerdaemon.child: with a traceback" in lines
    assert "<3>Traceback (most recent call last):" in lines
    assert lines[-1] == "<6>peerdaemon: child stopped"
    assert all(re.fullmatch(r"<[2-7]>.*", line) for line in lines)
    # a JOURNAL_STREAM that names another file (stderr redirected by the unit): plain text
    done = run_child("ok", JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
    assert any(TEXT_LINE.fullmatch(line) for line in done.stderr.splitlines())
    assert not done.stderr.startswith("<")
