"""The `peerdaemon` command: usage errors, exit codes, one-line failures, and each client command
against serve_unix + the fake Handler (the CLI runs in a worker thread: it is blocking code)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from functools import partial

import pytest
import trio
from daemonproc import sigint_as_from_a_terminal
from helpers import FakeHandler, run_cli

from peerdaemon import cli
from peerdaemon.api.server import serve_unix

ENV = {"uuid": "e1", "name": "Démo", "routes": [{"uuid": "r1"}]}


# --- usage ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["env"],
        ["env", "get"],
        ["env", "export", "e1", "--format", "yaml"],
        ["status", "--bogus"],
        ["env", "import"],
        ["run", "extra"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["env", "--help"])
    assert info.value.code == 0
    assert "watch" in capsys.readouterr().out


def test_missing_daemon_is_one_line_exit_1():
    proc = subprocess.run(
        [sys.executable, "-m", "peerdaemon", "--socket", "/nonexistent/x", "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        "peerdaemon: no peerdaemon is running on /nonexistent/x (start one with `peerdaemon run`)\n"
    )


def test_socket_option_is_global_and_per_run(monkeypatch, tmp_path):
    calls = []

    def fake_run_daemon(config, **_log):
        calls.append((config.data_dir, config.socket_path))
        return 3

    import peerdaemon.daemon.supervisor as supervisor

    monkeypatch.setattr(supervisor, "run_daemon", fake_run_daemon)
    assert cli.main(["run", "--data-dir", str(tmp_path), "--socket", "/tmp/a.sock"]) == 3
    assert cli.main(["--socket", "/tmp/b.sock", "run", "--data-dir", str(tmp_path)]) == 3
    monkeypatch.setenv("PEERDAEMON_DATA_DIR", str(tmp_path / "d"))
    assert cli.main(["--socket", "/tmp/b.sock", "run", "--socket", "/tmp/c.sock"]) == 3
    assert [(str(d), str(s)) for d, s in calls] == [
        (str(tmp_path), "/tmp/a.sock"),
        (str(tmp_path), "/tmp/b.sock"),
        (str(tmp_path / "d"), "/tmp/c.sock"),
    ]


def test_token_values_that_start_with_a_dash_are_taken_with_token_equals():
    """1 in 64 hub tokens of the older form starts with `-`: `--token=VALUE` takes any value,
    wherever a token is taken (`space hub`, `hub token revoke`), and so does `--` + TOKEN."""
    parser = cli.build_parser()
    args = parser.parse_args(["space", "hub", "team", "ws://127.0.0.1:1", "--token=-a_b-c"])
    assert args.token == "-a_b-c"
    args = parser.parse_args(["hub", "token", "revoke", "--token=-a_b-c"])
    assert (args.token, args.token_option) == (None, "-a_b-c")
    args = parser.parse_args(["hub", "token", "revoke", "--", "-a_b-c"])
    assert (args.token, args.token_option) == ("-a_b-c", None)
    args = parser.parse_args(["hub", "token", "revoke", "pdh_abcdef"])
    assert (args.token, args.token_option) == ("pdh_abcdef", None)


@pytest.mark.parametrize(
    "argv",
    [
        ["hub", "token", "revoke"],
        ["hub", "token", "revoke", "-a_b-c"],
        ["hub", "token", "revoke", "pdh_abcdef", "--token=pdh_abcdef"],
    ],
)
def test_hub_token_revoke_needs_exactly_one_token(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


# --- commands against a fake daemon -------------------------------------------------------------------
@pytest.fixture
def handler():
    h = FakeHandler()
    h.responses.update(
        {
            "status": {
                "version": "0.1.0",
                "uptime": 874.7124264240265,
                "environments": 1,
                "store": {"db_bytes": 1234567},
            },
            "env.list": [
                {"id": "e1", "name": "Démo", "routes": 1, "newer": False},
                {"id": "e2-long-id", "name": "", "routes": 12, "newer": True},
            ],
            "env.import": {"id": "e1", "repairs": ["added missing 'cors'", "fixed\nnewline"]},
            "env.get": lambda args: ENV if "pointer" not in args else ENV["name"],
            "env.export": lambda args: ENV if args["format"] == "json" else b"\x01\x00yjs",
            "env.put": {"changed": True, "repairs": ["r1"]},
            "env.patch": {"changed": True},
            "env.merge": {"created": False, "changed": True},
            "env.delete": {"deleted": True},
        }
    )
    return h


@pytest.fixture
async def sock(nursery, tmp_path_factory, handler):
    path = tmp_path_factory.mktemp("cli") / "peerdaemon" / "pd.sock"
    await nursery.start(partial(serve_unix, path, handler))
    return str(path)


async def test_status(sock, capsys):
    assert await run_cli("--socket", sock, "status") == 0
    out = capsys.readouterr().out
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {key: value.strip() for key, value in fields.items()}
    assert fields["socket"] == sock and fields["version"] == "0.1.0"
    assert fields["uptime"] == "14m 34s" and fields["store"] == "1.23 MB on disk"
    assert await run_cli("--socket", sock, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["environments"] == 1


async def test_env_list(sock, capsys):
    assert await run_cli("--socket", sock, "env", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "ROUTES", "SHARED", "LINKED", "FLAGS"]
    assert lines[1].split() == ["e1", "Démo", "1", "-", "-", "-"]  # (no space.list, env.links)
    assert lines[2].split() == ["e2-long-id", "-", "12", "-", "-", "newer"]
    assert await run_cli("--socket", sock, "env", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out)[1]["id"] == "e2-long-id"


async def test_env_import_prints_only_the_id(sock, handler, tmp_path, capsys):
    text = '\ufeff{"uuid": "e1", "name": "x"}'
    (tmp_path / "env.json").write_text(text, encoding="utf-8")
    assert await run_cli("--socket", sock, "env", "import", str(tmp_path / "env.json")) == 0
    captured = capsys.readouterr()
    assert captured.out == "e1\n"
    assert captured.err.splitlines() == [
        "peerdaemon: repaired: added missing 'cors'",
        "peerdaemon: repaired: fixed newline",
    ]
    assert handler.applied[-1] == ("env.import", {"json": text[1:]})  # raw text, BOM dropped


async def test_env_import_from_stdin_with_new_id(sock, handler, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"uuid": "x"}')))
    assert await run_cli("--socket", sock, "env", "import", "-", "--new-id") == 0
    assert capsys.readouterr().out == "e1\n"
    assert handler.applied[-1] == ("env.import", {"json": '{"uuid": "x"}', "new_id": True})


async def test_env_export_json(sock, tmp_path, capsys):
    assert await run_cli("--socket", sock, "env", "export", "e1") == 0
    expected = json.dumps(ENV, indent=2, ensure_ascii=False)
    assert capsys.readouterr().out == expected + "\n"
    out = tmp_path / "out.json"
    assert await run_cli("--socket", sock, "env", "export", "e1", "-o", str(out)) == 0
    assert out.read_text(encoding="utf-8") == expected
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    out.chmod(0o600)
    assert await run_cli("--socket", sock, "env", "export", "e1", "-o", str(out)) == 0
    assert out.stat().st_mode & 0o777 == 0o600  # an existing file keeps its mode
    assert await run_cli("--socket", sock, "env", "export", "e1", "-o", "/nonexistent/x.json") == 1
    assert capsys.readouterr().err.startswith("peerdaemon: cannot write /nonexistent/x.json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_env_export_yjs(sock, tmp_path, capsys):
    out = tmp_path / "out.yjs"
    assert (
        await run_cli("--socket", sock, "env", "export", "e1", "--format", "yjs", "-o", str(out))
        == 0
    )
    assert out.read_bytes() == b"\x01\x00yjs"
    assert await run_cli("--socket", sock, "env", "export", "e1", "--format", "yjs") == 0
    assert capsys.readouterr().out == "\x01\x00yjs"


async def test_env_get(sock, handler, capsys):
    assert await run_cli("--socket", sock, "env", "get", "e1", "/name") == 0
    assert capsys.readouterr().out == '"Démo"\n'
    assert handler.applied[-1] == ("env.get", {"id": "e1", "pointer": "/name"})
    assert await run_cli("--socket", sock, "env", "get", "e1") == 0
    assert json.loads(capsys.readouterr().out) == ENV


async def test_env_put_patch_merge_delete(sock, handler, tmp_path, capsys):
    (tmp_path / "env.json").write_text('{"uuid": "e1"}')
    (tmp_path / "p.json").write_text('[{"op": "remove", "path": "/x"}]')
    (tmp_path / "u.bin").write_bytes(b"\x00\xff")
    assert await run_cli("--socket", sock, "env", "put", "e1", str(tmp_path / "env.json")) == 0
    assert await run_cli("--socket", sock, "env", "patch", "e1", str(tmp_path / "p.json")) == 0
    assert await run_cli("--socket", sock, "env", "merge", "e1", str(tmp_path / "u.bin")) == 0
    assert await run_cli("--socket", sock, "env", "delete", "e1") == 0
    applied = [a for a in handler.applied if a[0] != "env.list"]  # naming the environment
    assert applied[-4:] == [
        ("env.put", {"id": "e1", "json": '{"uuid": "e1"}'}),
        ("env.patch", {"id": "e1", "json": '[{"op": "remove", "path": "/x"}]'}),
        ("env.merge", {"id": "e1", "update": b"\x00\xff"}),
        ("env.delete", {"id": "e1"}),
    ]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "peerdaemon: repaired: r1\n"
    argv = ["--socket", sock, "env", "put", "--force-id", "e1", str(tmp_path / "env.json")]
    assert await run_cli(*argv) == 0
    assert handler.applied[-1] == (
        "env.put",
        {"id": "e1", "json": '{"uuid": "e1"}', "force_id": True},
    )


async def test_env_put_of_another_environment_is_one_line_naming_force_id(
    sock, handler, tmp_path, capsys
):
    def mismatch(args):
        from peerdaemon.api.protocol import OpError

        raise OpError("uuid-mismatch", "the environment given has uuid 'e2', not e1")

    handler.responses["env.put"] = mismatch
    (tmp_path / "env.json").write_text('{"uuid": "e2"}')
    assert await run_cli("--socket", sock, "env", "put", "e1", str(tmp_path / "env.json")) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "--force-id" in captured.err and "(uuid-mismatch)" in captured.err


async def test_daemon_error_is_one_line_exit_1(sock, handler, capsys):
    def missing(args):
        from peerdaemon.api.protocol import OpError

        raise OpError("not-found", "no environment with id 'zz'\nsecond line")

    handler.responses["env.get"] = missing
    assert await run_cli("--socket", sock, "env", "get", "e1") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "peerdaemon: no environment with id 'zz' second line (not-found)\n"


async def test_unreadable_and_non_utf8_files(sock, handler, tmp_path, capsys):
    assert await run_cli("--socket", sock, "env", "import", str(tmp_path / "nope.json")) == 1
    err = capsys.readouterr().err
    assert err.startswith("peerdaemon: cannot read ") and err.count("\n") == 1
    (tmp_path / "latin1.json").write_bytes(b'{"name": "\xe9"}')
    assert await run_cli("--socket", sock, "env", "put", "e1", str(tmp_path / "latin1.json")) == 1
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and err.count("\n") == 1
    assert handler.applied == []


async def test_env_watch_prints_json_lines_until_deleted(sock, handler, capsys):
    early = [
        {"type": "change", "id": "e1", "paths": ["/name"], "update": b"\x01", "origin": "local"},
        {
            "type": "change",
            "id": "e1",
            "paths": ["/routes/0", "/routes/1"],
            "update": b"",
            "origin": "peer",
        },
        {"type": "deleted", "id": "e1"},
    ]
    orig = handler.handle

    async def handle(op, args, session):
        if op == "env.subscribe":
            args = {**args, "early": early}
        return await orig(op, args, session)

    handler.handle = handle
    assert await run_cli("--socket", sock, "env", "watch", "e1") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {"id": "e1", "paths": ["/name"], "origin": "local"},
        {"id": "e1", "paths": ["/routes/0", "/routes/1"], "origin": "peer"},
        {"id": "e1", "deleted": True},
    ]


async def test_env_watch_sigint_in_a_real_process(sock, handler):
    """Ctrl-C while `env watch` blocks on the socket: exit 0, nothing on stderr."""
    subscribed = trio.Event()
    orig = handler.handle

    async def handle(op, args, session):
        result = await orig(op, args, session)
        if op == "env.subscribe":
            session.push(result["sub"], {"type": "change", "id": "e1", "paths": [], "origin": "x"})
            subscribed.set()
        return result

    handler.handle = handle
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(
                partial(
                    trio.run_process,
                    [sys.executable, "-m", "peerdaemon", "--socket", sock, "env", "watch", "e1"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                    preexec_fn=sigint_as_from_a_terminal,
                )
            )
            await subscribed.wait()
            line = b""
            while not line.endswith(b"\n"):  # the change line is out: the CLI is blocked reading
                line += await proc.stdout.receive_some(1024)
            proc.send_signal(signal.SIGINT)
            err = b""
            while chunk := await proc.stderr.receive_some(1024):
                err += chunk
            assert await proc.wait() == 0
    assert json.loads(line) == {"id": "e1", "paths": [], "origin": "x"}
    assert err == b""


def test_env_watch_ctrl_c_exits_0_quietly(monkeypatch, capsys):
    class FakeClient:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def call(self, op, **args):  # naming the environment
            assert op == "env.list"
            return [{"id": "e1", "name": "x"}]

        def subscribe_env(self, env_id):
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.Client, "connect", staticmethod(lambda path: FakeClient()))
    assert cli.main(["--socket", "/x", "env", "watch", "e1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_unexpected_error_is_one_line(monkeypatch, capsys):
    def explode(path):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(cli.Client, "connect", staticmethod(explode))
    monkeypatch.delenv("PEERDAEMON_DEBUG", raising=False)
    assert cli.main(["--socket", "/x", "status"]) == 1
    assert capsys.readouterr().err == "peerdaemon: internal error: ZeroDivisionError: oops\n"


# --- lazy command groups --------------------------------------------------------------------------
def _tree(parser) -> dict[str, str]:
    """Every parser below `parser` by its path, as its help text and defaults (the handler)."""
    out = {}
    for action in parser._actions:
        if action.choices is not None and isinstance(action.choices, dict):
            for name, child in action.choices.items():
                defaults = {k: getattr(v, "__qualname__", v) for k, v in child._defaults.items()}
                out[name] = child.format_help() + repr(sorted(defaults.items()))
                out.update({f"{name} {k}": v for k, v in _tree(child).items()})
    return out


def test_each_command_builds_as_in_the_whole_tree():
    """`COMMANDS` names every top-level command, and the groups it lists build that command
    exactly as the whole tree does (help, options, handlers)."""
    whole = _tree(cli.build_parser())
    assert {path for path in whole if " " not in path} == set(cli.COMMANDS)
    for command in cli.COMMANDS:
        part = {
            path: text
            for path, text in _tree(cli.build_parser(command)).items()
            if path.split()[0] == command
        }
        assert part == {path: text for path, text in whole.items() if path.split()[0] == command}


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["hub", "serve", "--data-dir", "d"], "hub"),
        (["--socket", "hub", "status"], "status"),  # `hub` is the socket's value
        (["--sock=s", "--json", "--conf", "c", "env", "list"], "env"),  # abbreviated options
        (["--json", "space", "list"], "space"),
        ([], None),
        (["--help"], None),
        (["-h", "hub"], None),  # the top-level help lists every command
        (["hub", "serve", "--he"], None),
        (["frobnicate"], None),
        (["--socket"], None),
    ],
)
def test_command_of_reads_the_command_as_argparse_does(argv, command):
    assert cli.command_of(argv) == command


def test_a_command_loads_only_its_groups():
    """What the lazy groups are for: `hub serve` does not import the client commands."""
    code = (
        "import sys; from peerdaemon import cli; cli.build_parser(cli.command_of(['hub', 'serve']));"
        "print(sorted(m for m in sys.modules if m.startswith('peerdaemon.cli.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = ["peerdaemon.cli.common", "peerdaemon.cli.daemon", "peerdaemon.cli.hub"]
    assert out.stdout.strip() == repr(loaded)
