"""Progress of long CLI work (issue 11): the reporter (`peerdaemon/cli/progress.py`) drawn to a
fake terminal with an injected clock; `env import` / `env export` of a large environment as real
processes whose stderr is a pseudo-terminal (progress) or a pipe (nothing), stdout unchanged;
`space join` waiting for the first sync between two daemons on loopback, `--no-wait`,
`--timeout` with the inviter offline, and Ctrl-C. `space.list`'s `synced` fields too.
"""

from __future__ import annotations

import copy
import fcntl
import io
import json
import os
import re
import signal
import struct
import subprocess
import termios
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from daemonproc import (  # noqa: F401  (fixture)
    PYTHON,
    child_env,
    daemons_fixture,
    sigint_as_from_a_terminal,
)
from daemonutil import (  # noqa: F401  (fixtures)
    Dev,
    base_fixture,
    devs_fixture,
)
from helpers import until
from modelutil import load

from peerdaemon.cli.progress import Progress, format_bytes, format_elapsed

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\n$")
CLI_TIMEOUT = 60.0


# --- the reporter ---------------------------------------------------------------------------------
class FakeTTY(io.StringIO):
    """A terminal as far as `Progress` can tell; records every write."""

    def __init__(self, tty: bool = True) -> None:
        super().__init__()
        self.tty = tty
        self.writes: list[str] = []
        self.drawn = threading.Condition()

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        with self.drawn:
            self.writes.append(text)
            self.drawn.notify_all()
        return super().write(text)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def screen(text: str) -> str:
    """The last line a terminal shows after `text`: `\\r` returns to its start, later
    characters overwrite earlier ones."""
    line: list[str] = []
    col = 0
    for ch in text.split("\n")[-1]:
        if ch == "\r":
            col = 0
            continue
        if col < len(line):
            line[col] = ch
        else:
            line.append(ch)
        col += 1
    return "".join(line)


def draws(stream: FakeTTY) -> list[str]:
    """What each redraw showed."""
    return [screen(w).rstrip() for w in stream.writes if w.startswith("\r") and w.strip()]


XTERM = {"TERM": "xterm-256color"}


def test_redraws_in_place_with_numbers_and_clears_at_the_end():
    stream, clock = FakeTTY(), Clock()
    with Progress(stream, clock=clock, environ=XTERM) as progress:
        assert progress.enabled
        progress.phase("reading big.json", total=40 * 2**20, done=0)
        clock.now += 0.5
        progress.update(advance=12.3 * 2**20)
        clock.now += 2
        progress.phase("importing 40.0 MiB")  # one request: a spinner
        clock.now += 0.2
        progress.tick()
        clock.now += 0.2
        progress.phase("receiving environments", total=12, done=3, unit="environments")
        assert "\n" not in stream.getvalue()  # one line, redrawn in place
    shown = draws(stream)
    assert shown[0] == "reading big.json  0 B / 40.0 MiB (0%)  0s"
    assert shown[1] == "reading big.json  12.3 MiB / 40.0 MiB (31%)  0s"
    assert shown[2] == "| importing 40.0 MiB  2s"
    assert shown[3] == "/ importing 40.0 MiB  2s"  # the spinner turned
    assert shown[4].startswith("receiving environments  3/12 environments  2s")
    assert screen(stream.getvalue()).strip() == ""  # cleared: nothing left behind
    assert stream.getvalue().endswith("\r")


def test_redraws_are_throttled_to_the_interval():
    stream, clock = FakeTTY(), Clock()
    with Progress(stream, clock=clock, environ=XTERM) as progress:
        progress.phase("reading", total=10_000, done=0)
        for _ in range(1000):  # a thousand chunks within 50 ms: no redraw
            clock.now += 0.00005
            progress.update(advance=1)
        assert len(draws(stream)) == 1
        clock.now += 0.1
        progress.update(advance=1)
        assert len(draws(stream)) == 2
        assert draws(stream)[-1].startswith("reading  1001 B / 9.8 KiB (10%)")
        for _ in range(30):  # ticks every 62.5 ms (exact in binary): one draw in two
            clock.now += 0.0625
            progress.tick()
        assert len(draws(stream)) == 2 + 15
        progress.phase("next")  # a new phase is drawn at once: a command has a handful
        assert draws(stream)[-1] == "| next  2s" and len(draws(stream)) == 18
        progress.phase("next", detail="polled again")  # the same phase: throttled
        assert len(draws(stream)) == 18


def test_a_shorter_line_overwrites_all_of_a_longer_one_and_long_lines_are_cut():
    stream, clock = FakeTTY(), Clock()
    with Progress(stream, clock=clock, environ=XTERM) as progress:
        progress.phase("x" * 200)
        assert len(draws(stream)[-1]) == 79  # never wraps (no terminal size: 80 columns)
        clock.now += 1
        progress.phase("short")
        assert screen(stream.getvalue()).rstrip() == "/ short  1s"


def test_nothing_when_not_a_terminal():
    stream, clock = FakeTTY(tty=False), Clock()
    with Progress(stream, clock=clock, environ=XTERM) as progress:
        assert not progress.enabled
        progress.phase("reading", total=10, done=0)
        progress.update(advance=5)
        clock.now += 5
        progress.tick()
        assert progress.run(lambda: 42) == 42
    assert stream.writes == []


def test_a_dumb_terminal_gets_each_phase_once_and_no_redraws():
    stream, clock = FakeTTY(), Clock()
    with Progress(stream, clock=clock, environ={"TERM": "dumb"}) as progress:
        progress.phase("reading big.json", total=100, done=0)
        for _ in range(5):
            clock.now += 1
            progress.update(advance=10)
            progress.tick()
            progress.phase("waiting for the space from its members")  # polled: said once
        assert progress.run(lambda: "done") == "done"
    assert "\r" not in stream.getvalue()
    assert stream.getvalue() == "reading big.json...\nwaiting for the space from its members...\n"


def test_run_spins_from_a_thread_while_the_call_blocks():
    stream = FakeTTY()
    with Progress(stream, interval=0.01, environ=XTERM) as progress:
        progress.phase("importing")

        def blocking_call() -> str:  # returns once the spinner has turned twice meanwhile
            with stream.drawn:
                assert stream.drawn.wait_for(lambda: len(draws(stream)) >= 3, timeout=10)
            return "result"

        assert progress.run(blocking_call) == "result"
    frames = {d[0] for d in draws(stream)}
    assert len(frames) >= 2
    assert screen(stream.getvalue()).strip() == ""


def test_units():
    assert format_bytes(512) == "512 B"
    assert format_bytes(12.3 * 2**20) == "12.3 MiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_elapsed(4.9) == "4s"
    assert format_elapsed(63) == "1m 03s"
    assert format_elapsed(3 * 3600 + 120) == "3h 02m"


class Ticking(Clock):
    """A clock that moves 0.2 s each time it is read: every update is due for a redraw."""

    def __call__(self) -> float:
        self.now += 0.2
        return self.now


def test_import_reads_a_large_file_in_chunks_and_export_writes_stdout_in_chunks(
    tmp_path, capsys, monkeypatch
):
    from peerdaemon.cli import env as env_cli

    source = tmp_path / "big.json"
    source.write_text("\ufeff" + "x" * (3 * env_cli.CHUNK + 5), encoding="utf-8")
    stream = FakeTTY()
    with Progress(stream, clock=Ticking(), environ=XTERM) as progress:
        assert env_cli._read_input(str(source), progress) == "x" * (3 * env_cli.CHUNK + 5)
    shown = draws(stream)
    assert [s.split("  ")[1] for s in shown] == [
        "0 B / 3.0 MiB (0%)",
        "1.0 MiB / 3.0 MiB (33%)",
        "2.0 MiB / 3.0 MiB (67%)",
        "3.0 MiB / 3.0 MiB (100%)",
        "3.0 MiB / 3.0 MiB (100%)",
    ]
    assert all(s.startswith("reading ") for s in shown)

    text = "é" * (2 * env_cli.CHUNK)  # 4 MiB of UTF-8
    stream = FakeTTY()
    with Progress(stream, clock=Ticking(), environ=XTERM) as progress:
        env_cli._print_text(text, progress)
    assert capsys.readouterr().out == text + "\n"  # what print(text) writes
    assert [s.split("  ")[1] for s in draws(stream)] == [
        "0 B / 4.0 MiB (0%)",
        "2.0 MiB / 4.0 MiB (50%)",
        "4.0 MiB / 4.0 MiB (100%)",
    ]
    quiet = FakeTTY(tty=False)
    with Progress(quiet, environ=XTERM) as progress:
        env_cli._print_text(text, progress)
    assert capsys.readouterr().out == text + "\n" and quiet.writes == []


# --- running the CLI on a pseudo-terminal ---------------------------------------------------------
class Run:
    def __init__(self, code: int, out: bytes, err: str) -> None:
        self.code, self.out, self.err = code, out, err


def start_cli(
    sock: Path, *argv: str, tty: bool, stdout: Any = subprocess.PIPE
) -> tuple[subprocess.Popen[bytes], Callable[[], Run], Callable[[], str]]:
    """`peerdaemon --socket SOCK ARGV` as a process whose stderr is a pty (`tty`) or a pipe.
    Returns it, a function that waits for it to end, and one that reads its stderr so far."""
    env = {**child_env(), "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    argv_ = [PYTHON, "-m", "peerdaemon", "--socket", str(sock), *argv]
    if not tty:
        proc = subprocess.Popen(
            argv_, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, env=env
        )

        def finish_pipe() -> Run:
            out, err = proc.communicate(timeout=CLI_TIMEOUT)
            return Run(proc.returncode, out or b"", err.decode())

        return proc, finish_pipe, lambda: ""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    seen: list[bytes] = []
    grew = threading.Condition()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every copy of the slave side is closed
                chunk = b""
            with grew:
                seen.append(chunk)
                grew.notify_all()
            if not chunk:
                return

    try:
        proc = subprocess.Popen(
            argv_,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=slave,
            env=env,
            preexec_fn=sigint_as_from_a_terminal,
        )
    finally:
        os.close(slave)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def so_far() -> str:
        with grew:
            return b"".join(seen).decode("utf-8", "replace")

    def finish_tty() -> Run:
        out = proc.stdout.read() if proc.stdout else b""
        code = proc.wait(CLI_TIMEOUT)
        reader.join(CLI_TIMEOUT)
        os.close(master)
        return Run(code, out, so_far())

    return proc, finish_tty, so_far


def run_cli_proc(sock: Path, *argv: str, tty: bool, stdout: Any = subprocess.PIPE) -> Run:
    _, finish, _ = start_cli(sock, *argv, tty=tty, stdout=stdout)
    return finish()


def large_env(mib: float) -> dict[str, Any]:
    """test-env.json with routes added until it is about `mib` MiB of JSON."""
    env = load("test-env.json")
    template = env["routes"][0]
    body = json.dumps([{"id": i, "text": "lorem ipsum dolor " * 8} for i in range(150)])
    count = int(mib * 2**20 / len(body)) + 1
    for i in range(count):
        route = copy.deepcopy(template)
        route["uuid"] = str(uuid.UUID(int=i + 1))
        route["endpoint"] = f"big/{i}"
        for n, response in enumerate(route["responses"]):
            response["uuid"] = str(uuid.UUID(int=(i + 1) << 32 | n))
            response["body"] = body
        env["routes"].append(route)
        env["rootChildren"].append({"type": "route", "uuid": route["uuid"]})
    return env


def redrawn(err: str) -> list[str]:
    """Each state of the progress line in a pty's output (the pty turns `\\n` into `\\r\\n`)."""
    return [part for part in err.replace("\r\n", "\n").split("\r") if part.strip()]


def test_env_import_and_export_show_progress_on_a_terminal_only(daemons, tmp_path):
    daemon = daemons.new()
    daemon.start()
    sock = daemon.socket_path
    env = large_env(6)
    source = tmp_path / "big.json"
    source.write_text(json.dumps(env, indent=2), encoding="utf-8")
    size = source.stat().st_size
    assert size > 5 * 2**20

    piped = run_cli_proc(sock, "env", "import", str(source), tty=False)
    assert (piped.code, piped.err, piped.out) == (0, "", f"{env['uuid']}\n".encode())

    shown = run_cli_proc(sock, "env", "import", str(source), "--new-id", tty=True)
    assert shown.code == 0, shown.err
    assert UUID.match(shown.out.decode()), shown.out  # stdout: only the id, as when piped
    states = redrawn(shown.err)
    assert "\n" not in shown.err.replace("\r\n", "\n").strip("\n"), shown.err
    assert states[0].startswith("reading big.json  0 B / 6.")  # bytes of the total
    assert states[1].startswith(f"| importing {format_bytes(size)}  ")  # a spinner: 1 request
    assert screen(shown.err).strip() == ""  # the line is cleared at the end
    new_id = shown.out.decode().strip()

    # export: stdout to a file, progress on the terminal; the same bytes as when piped
    quiet = run_cli_proc(sock, "env", "export", new_id, tty=False)
    assert (quiet.code, quiet.err) == (0, "")
    with open(tmp_path / "out.json", "wb") as out:
        loud = run_cli_proc(sock, "env", "export", new_id, tty=True, stdout=out)
    assert loud.code == 0, loud.err
    assert (tmp_path / "out.json").read_bytes() == quiet.out
    assert len(json.loads(quiet.out)["routes"]) == len(env["routes"])
    states = redrawn(loud.err)
    assert states[0].startswith(f"| exporting {new_id}  ")
    assert any(s.startswith("writing to stdout  0 B / ") for s in states), states
    assert screen(loud.err).strip() == ""

    to_file = run_cli_proc(sock, "env", "export", new_id, "-o", str(tmp_path / "o.json"), tty=True)
    assert (to_file.code, to_file.out) == (0, b"")
    assert (tmp_path / "o.json").read_bytes() + b"\n" == quiet.out
    assert screen(to_file.err).strip() == ""
    assert redrawn(to_file.err)[0].startswith(f"| exporting {new_id}  ")


# --- space join -----------------------------------------------------------------------------------
async def space_with_envs(a: Dev, count: int = 2) -> tuple[str, list[str], str]:
    space = (await a.op("space.create", name="Team"))["id"]
    env_ids = []
    for n in range(count):
        env_id = await a.import_env(new_id=True, name=f"env {n}")
        await a.op("env.share", id=env_id, space=space)
        env_ids.append(env_id)
    code = (await a.op("space.invite", space=space, addresses=[a.address]))["code"]
    return space, env_ids, code


async def listed(dev: Dev, space: str) -> dict[str, Any]:
    return next(s for s in await dev.op("space.list") if s["id"] == space)


async def test_space_join_waits_for_the_first_sync(devs, nursery):
    a, b = devs("a"), devs("b")
    await a.start(nursery)
    await b.start(nursery)
    space, env_ids, code = await space_with_envs(a)
    assert {k: v for k, v in (await listed(a, space)).items() if k.startswith(("sync", "env"))} == {
        "synced": True,
        "environments_total": 2,
        "environments_present": 2,
        "environments": [
            {"id": e, "present": True, "name": n}
            for e, n in sorted(zip(env_ids, ["env 0", "env 1"], strict=True))
        ],
    }
    await a.stop()  # the inviter is offline while b starts to wait

    proc, finish, so_far = start_cli(
        b.socket_path, "space", "join", code, "--timeout", "60", tty=True
    )
    await until(lambda: "waiting for the space from its members" in so_far(), what="waiting")
    await until(lambda: "0 peers connected, 0 B received" in so_far(), what="the peers shown")
    mine = await listed(b, space)
    assert (mine["synced"], mine["environments_total"], mine["environments_present"]) == (
        False,
        0,
        0,
    )
    assert proc.poll() is None  # still waiting: nothing arrived
    await a.start(nursery)  # same port: b's invite address
    run = await trio.to_thread.run_sync(finish)
    assert run.code == 0, run.err
    assert run.out.decode() == f"{space}\n"
    # the moment it returned, b had every environment the space lists
    mine = await listed(b, space)
    assert (mine["synced"], mine["environments_total"], mine["environments_present"]) == (
        True,
        2,
        2,
    )
    assert set(env_ids) <= await b.env_ids()
    assert screen(run.err).strip() == ""  # progress cleared; no message


async def test_space_join_no_wait_and_timeout_when_the_inviter_is_offline(devs, nursery):
    a, b, c = devs("a"), devs("b"), devs("c")
    await a.start(nursery)
    await b.start(nursery)
    await c.start(nursery)
    space, _, code = await space_with_envs(a, 1)
    await a.stop()

    run = await trio.to_thread.run_sync(
        lambda: run_cli_proc(b.socket_path, "space", "join", code, "--no-wait", tty=False)
    )
    assert (run.code, run.out, run.err) == (0, f"{space}\n".encode(), "")
    assert not (await listed(b, space))["synced"]

    run = await trio.to_thread.run_sync(
        lambda: run_cli_proc(c.socket_path, "space", "join", code, "--timeout", "0.5", tty=False)
    )
    assert run.code == 3, run.err
    assert run.out == f"{space}\n".encode()  # joined: the id, as always
    assert run.err.count("\n") == 1 and "\r" not in run.err  # one line, no progress when piped
    assert run.err.startswith("peerdaemon: not synced after 0.5 s: joined space ")
    assert "goes on in the background" in run.err
    assert not (await listed(c, space))["synced"]  # kept, not synced

    await a.start(nursery)  # the sync does go on in the background

    async def synced() -> bool:
        return (await listed(c, space))["synced"]

    await until(synced, what="c's first sync after the CLI gave up")


async def test_space_join_ctrl_c_keeps_the_join(devs, nursery):
    a, b = devs("a"), devs("b")
    await a.start(nursery)
    await b.start(nursery)
    space, _, code = await space_with_envs(a, 1)
    await a.stop()
    proc, finish, so_far = start_cli(
        b.socket_path, "space", "join", code, "--timeout", "0", tty=True
    )
    await until(lambda: "waiting for the space" in so_far(), what="waiting")
    os.kill(proc.pid, signal.SIGINT)
    run = await trio.to_thread.run_sync(finish)
    assert run.code == 130
    assert run.out == f"{space}\n".encode()
    lines = run.err.replace("\r\n", "\n").split("\r")[-1].strip().splitlines()
    assert lines == [
        f"peerdaemon: interrupted: joined space {space}, and the first sync goes on "
        "in the background (see `peerdaemon space list`, `peerdaemon peers`)"
    ]
    assert (await listed(b, space))["id"] == space


def test_join_flags_in_help_and_completion(capsys):
    from peerdaemon import cli

    parser = cli.build_parser()
    args = parser.parse_args(["space", "join", "pd1-x", "--no-wait", "--timeout", "5"])
    assert (args.no_wait, args.timeout) == (True, 5.0)
    assert parser.parse_args(["space", "join", "pd1-x"]).timeout == 120.0
    with pytest.raises(SystemExit):
        parser.parse_args(["space", "join", "pd1-x", "--timeout", "-1"])
    capsys.readouterr()
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "--no-wait" in script and "--timeout" in script
