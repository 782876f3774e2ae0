"""What users expect of the CLI (issue 11), against whole daemons in this process:

`--socket`/`--json` anywhere on the command line; a readable `status`; `config get` of an unset
key, `config list`, `config set` saying when a setting applies; `space create` refusing a name
the device has; environments named by id prefix or name (`resolve_env`); SHARED and LINKED in
`env list`; space members reached through a hub in `peers`; precise address errors; `--json`
and an `Example:` on every command; shell completion for bash, zsh and fish; the README's word
on where the socket goes and that `run` keeps the terminal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from daemonutil import InProcessDaemon, file_config
from helpers import run_cli, running_hub, until
from modelutil import load

from peerdaemon import cli
from peerdaemon.cli.common import CliError, duration, match_env, megabytes, short_path
from peerdaemon.cli.completion import walk
from peerdaemon.cli.daemon import print_status
from peerdaemon.core.addresses import parse_address
from peerdaemon.daemon.supervisor import DaemonConfig
from peerdaemon.hub.accounts import Accounts

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = str(Path(sys.executable).parent)  # where the venv's `peerdaemon` is, for completion


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="pdc"))  # short: AF_UNIX paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def start(nursery: trio.Nursery, base: Path, name: str) -> InProcessDaemon:
    daemon = InProcessDaemon(base, name)
    config = DaemonConfig(daemon.data_dir, daemon.socket_path, name=name, mdns=False)
    await daemon.start_with(nursery, config)
    return daemon


@pytest.fixture
async def daemon(nursery, base):
    d = await start(nursery, base, "alpha")
    yield d
    await d.stop()


async def cli_run(capsys, *argv: str) -> tuple[int, str, str]:
    code = await run_cli(*argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def import_env(d: InProcessDaemon, name: str) -> str:
    env = load("test-env.json")
    env["name"] = name
    return (await d.client.import_env(env, new_id=True))["id"]


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("peerdaemon: ") and "Traceback" not in err, err
    return err


def fields(out: str) -> dict[str, str]:
    """`label: value` lines of the top of `status`."""
    return {
        k.strip(): v.strip()
        for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)
        if not k.startswith(" ")
    }


# --- 1. --socket and --json anywhere --------------------------------------------------------------
async def test_socket_and_json_go_before_or_after_the_command(daemon, capsys):
    sock = str(daemon.socket_path)
    env_id = await import_env(daemon, "Anywhere")
    for argv in (
        ["env", "list", "--socket", sock],
        ["env", "--socket", sock, "list"],
        ["--socket", "/nonexistent/pd.sock", "env", "list", "--socket", sock],  # the later wins
    ):
        code, out, err = await cli_run(capsys, *argv)
        assert (code, err) == (0, ""), argv
        assert out.split()[0] == "ID" and env_id in out
    for argv in (["--json", "env", "list", "--socket", sock], ["env", "list", "--json"]):
        code, out, _ = await cli_run(capsys, *argv, "--socket", sock)
        assert code == 0 and [e["id"] for e in json.loads(out)] == [env_id], argv

    parser = cli.build_parser()
    args = parser.parse_args(["status"])
    assert (args.socket, args.json) == (None, False)
    assert parser.parse_args(["status", "--json"]).json is True
    assert parser.parse_args(["run", "--socket", "/a"]).socket == "/a"  # run's own, unchanged
    assert parser.parse_args(["--socket", "/b", "run"]).socket == "/b"
    assert parser.parse_args(["--socket", "/b", "run", "--socket", "/c"]).socket == "/c"
    with pytest.raises(SystemExit) as info:  # a hub command never talks to a daemon
        parser.parse_args(["hub", "status", "--socket", "/x"])
    assert info.value.code == 2
    capsys.readouterr()

    with pytest.raises(SystemExit) as info:  # --json where it does not apply
        cli.main(["--json", "--socket", sock, "env", "delete", env_id])
    assert info.value.code == 2
    assert "`peerdaemon env delete` has no JSON output" in capsys.readouterr().err

    with pytest.raises(SystemExit) as info:
        cli.main(["env", "list", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--socket PATH" in text and "--json" in text and "Example: peerdaemon env list" in text


# --- 2. status ------------------------------------------------------------------------------------
def test_durations_and_sizes():
    assert duration(874.7124264240265) == "14m 34s"
    assert duration(0.4) == "0s" and duration(59) == "59s" and duration(60) == "1m"
    assert duration(7260) == "2h 1m" and duration(26 * 3600 + 61) == "1d 2h"
    assert duration(None) == "-"
    assert megabytes(49448) == "0.05 MB" and megabytes(12_345_678) == "12.3 MB"
    assert short_path("/a/b.json") == "/a/b.json"
    long = "/srv/" + "/".join(["folder"] * 10) + "/environment.json"
    assert short_path(long).startswith(".../") and short_path(long).endswith("/environment.json")
    assert len(short_path(long)) <= 40
    assert short_path(os.path.expanduser("~/x.json")) == "~/x.json"


async def test_status_is_readable_and_json_is_raw(daemon, capsys):
    sock = ["--socket", str(daemon.socket_path)]
    await daemon.op("space.create", name="Team")
    code, out, err = await cli_run(capsys, *sock, "status")
    assert (code, err) == (0, "")
    top = fields(out)
    assert re.fullmatch(r"\d+s|\d+m \d+s", top["uptime"]), top["uptime"]
    assert top["store"].endswith(" MB on disk") and top["socket"] == str(daemon.socket_path)
    assert top["device"] == f"alpha ({daemon.daemon.identity.device_id})"
    assert "\nspaces (1):\n  Team (" in out and "0 other members, 0 environments" in out
    assert '{"' not in out  # no inline JSON dumps
    code, out, _ = await cli_run(capsys, *sock, "status", "--json")
    raw = json.loads(out)
    assert isinstance(raw["uptime"], float) and isinstance(raw["store"], dict)
    assert raw["spaces"] == 1 and raw["name"] == "alpha"


def test_status_sections_for_hubs_and_mocks(capsys):
    status = {
        "version": "1.2.3",
        "pid": 7,
        "uptime": 3700,
        "socket": "/s",
        "data_dir": "/d",
        "environments": 2,
        "newer": ["e2"],
        "store": {"db_bytes": 2_500_000, "error": "disk full"},
        "spaces": 1,
        "hub": [
            {
                "url": "wss://hub.example:443",
                "state": "connected",
                "user": "alice",
                "synced": True,
                "hub_key": "KEY-1",
                "spaces": {"s1": "ok"},
                "errors": [{"doc": "e1", "reason": "quota-exceeded", "detail": ""}],
            },
            {
                "url": "ws://192.0.2.1:8765",
                "state": "disconnected",
                "reason": "unreachable",
                "detail": "connection refused",
                "hub_key": None,
                "spaces": {},
            },
        ],
        "status_page": {"url": "http://127.0.0.1:7611/", "error": None, "tls": False},
        "config": {"file": "/c.toml", "pending": ["lan.listen", "mirror_dir"], "error": None},
        "future_key": [1, 2],
        "incompatible": [
            {
                "space": "s1",
                "name": "Team",
                "state": "incompatible-version",
                "needs": 3,
                "model": 2,
                "environments": ["e1"],
                "action": "upgrade peerdaemon",
            }
        ],
    }
    spaces = [{"id": "s1", "name": "Team", "members": [{"self": True}, {}], "environments": [{}]}]
    mocks = [
        {
            "id": "e1",
            "name": "Demo",
            "state": "running",
            "url": "http://127.0.0.1:3000",
            "requests": 4,
        },
        {
            "id": "e2",
            "name": "",
            "state": "error",
            "url": None,
            "error": {"code": "E", "message": "m"},
        },
    ]
    print_status(status, spaces, mocks, "/fallback")
    out = capsys.readouterr().out
    top = fields(out)
    assert top["uptime"] == "1h 1m" and top["environments"] == "2 (1 from a newer Mockoon: e2)"
    assert top["store"] == "2.50 MB on disk; ERROR: disk full"
    assert top["config"] == "/c.toml; restart to apply: lan.listen, mirror_dir"
    assert "  Team (s1): 1 other member, 1 environment\n" in out
    assert (
        "  incompatible-version: Team (1 environment) needs model 3, this device runs 2: "
        "upgrade peerdaemon; not synced until then\n" in out
    )
    assert "incompatible:" not in out  # not printed raw as well
    assert (
        "  wss://hub.example:443: connected as alice, synced; key KEY-1; spaces: Team ok\n" in out
    )
    assert "    error: e1: quota-exceeded\n" in out
    assert (
        "  ws://192.0.2.1:8765: disconnected (unreachable: connection refused); key NOT PINNED\n"
        in out
    )
    assert "  Demo: running at http://127.0.0.1:3000, 4 requests\n" in out
    assert "  e2: error; error E: m\n" in out
    assert "\nstatus page:\n  url: http://127.0.0.1:7611/\n  error: -\n  tls: no\n" in out
    assert "future key: [1, 2]\n" in out


# --- 3. config ------------------------------------------------------------------------------------
async def test_config_get_list_and_set(nursery, base, capsys):
    """Against a daemon that reads a config file: `get` of an unset key exits 1, `set` says
    whether the change applied now or at the next start, `list` shows value, source and when
    it applies (and what waits for a restart)."""
    d = InProcessDaemon(base, "alpha")
    path = base / "config.toml"
    path.write_text('name = "alpha"\n')
    await d.start_with(nursery, file_config(d, path))
    sock = ["--socket", str(d.socket_path), "--config", str(path)]
    code, out, err = await cli_run(capsys, *sock, "config", "get", "lan.listen")
    assert (code, out, err) == (1, "", "peerdaemon: lan.listen is not set\n")
    assert await cli_run(capsys, *sock, "config", "get", "listen", "--json") == (0, "null\n", "")
    code, out, err = await cli_run(capsys, *sock, "config", "set", "listen", "127.0.0.1:7600")
    assert (code, err) == (0, "")
    assert out.startswith(f"lan.listen set in {path}; applies at the next start")
    # what runs is unchanged; the file's value waits for a restart
    assert (await cli_run(capsys, *sock, "config", "get", "lan.listen"))[0] == 1
    assert await cli_run(capsys, *sock, "config", "set", "name", "beta") == (
        0,
        f"name set in {path}; applied now\n",
        "",
    )
    assert await cli_run(capsys, *sock, "config", "get", "name") == (0, "beta\n", "")
    assert (await d.op("identity"))["name"] == "beta"

    code, out, _ = await cli_run(capsys, *sock, "config", "list")
    lines = out.splitlines()
    assert lines[0] == f"config file: {path}"
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["KEY"] == ["VALUE", "SOURCE", "APPLIES"]
    assert rows["name"] == ["beta", "file", "now"]
    assert rows["lan.listen"] == ["-", "default", "restart", "to", "use", "127.0.0.1:7600"]
    assert rows["lan.mdns"] == ["off", "flag", "at", "start"]
    assert rows["data_dir"][1] == "flag" and "limits.max_frame" in rows
    code, out, _ = await cli_run(capsys, *sock, "config", "list", "--json")
    config = json.loads(out)
    assert config["file"] == str(path) and config["running"] is True
    assert config["settings"]["name"] == {
        "value": "beta",
        "source": "file",
        "live": True,
        "env": "PEERDAEMON_NAME",
        "help": config["settings"]["name"]["help"],
    }
    assert config["settings"]["lan.listen"]["pending"] == "127.0.0.1:7600"
    assert config["settings"]["lan.peers"]["value"] == []
    code, out, _ = await cli_run(capsys, *sock, "config", "set", "listen", "")
    assert out == f"lan.listen removed from {path}; applied now\n"  # back to what runs
    assert "listen" not in path.read_text()
    code, out, _ = await cli_run(capsys, *sock, "config", "list", "--json")
    assert "pending" not in json.loads(out)["settings"]["lan.listen"]
    code, out, err = await cli_run(capsys, *sock, "config", "get", "colour")
    assert code == 1 and "unknown setting 'colour'" in one_line(err)


# --- 4. space names -------------------------------------------------------------------------------
async def test_space_create_refuses_a_name_this_device_has(daemon, capsys):
    sock = ["--socket", str(daemon.socket_path)]
    code, first, _ = await cli_run(capsys, *sock, "space", "create", "Team")
    assert code == 0
    code, out, err = await cli_run(capsys, *sock, "space", "create", "Team")
    assert (code, out) == (1, "")
    assert f"already has a space named 'Team' ({first.strip()})" in one_line(err)
    assert "choose another name, such as 'Team 2'" in err and err.endswith("(exists)\n")
    assert (await cli_run(capsys, *sock, "space", "create", " Team 2 "))[0] == 0
    code, _, err = await cli_run(capsys, *sock, "space", "create", "Team")
    assert code == 1 and "'Team 3'" in err
    code, out, _ = await cli_run(capsys, *sock, "space", "invite", "Team")  # not ambiguous
    assert code == 0 and out.startswith("pd1-")
    assert len(await daemon.op("space.list")) == 2


# --- 5. naming environments -----------------------------------------------------------------------
ENVS = [
    {"id": "abcd", "name": "Exact"},
    {"id": "abcdef01-0000-4000-8000-000000000001", "name": "Demo"},
    {"id": "fedc0002-0000-4000-8000-000000000002", "name": "abcd0"},
    {"id": "0a0a0003-0000-4000-8000-000000000003", "name": "Twin"},
    {"id": "0b0b0004-0000-4000-8000-000000000004", "name": "Twin"},
]


def test_match_env_precedence_and_errors():
    assert match_env(ENVS, "abcd") == "abcd"  # the exact id wins over a prefix of another
    assert match_env(ENVS, "abcde") == ENVS[1]["id"]
    assert match_env(ENVS, "ABCDEF") == ENVS[1]["id"]  # prefixes ignore case
    assert match_env(ENVS, "abcd0") == ENVS[2]["id"]  # no id starts so: the exact name
    assert match_env(ENVS, "Demo") == ENVS[1]["id"]
    assert match_env(ENVS, ENVS[3]["id"]) == ENVS[3]["id"]
    with pytest.raises(CliError) as info:
        match_env(ENVS, "Twin")
    message = str(info.value)
    assert "'Twin' names 2 environments" in message and message.endswith("(ambiguous)")
    assert ENVS[3]["id"] in message and ENVS[4]["id"] in message
    assert match_env(ENVS, "0a0a0003-0000-4000-8000-00000000000") == ENVS[3]["id"]
    with pytest.raises(CliError) as info:
        match_env(ENVS, "nope")
    assert str(info.value).startswith("no environment 'nope';")
    assert str(info.value).endswith("(not-found)")
    with pytest.raises(CliError) as info:
        match_env(ENVS, "demo")
    assert f"did you mean {ENVS[1]['id']} (Demo)?" in str(info.value)
    with pytest.raises(CliError) as info:
        match_env(ENVS, "fed")
    assert "at least 4 characters" in str(info.value)
    assert match_env(ENVS, "nope", missing_ok=True) == "nope"


async def test_every_env_command_takes_a_prefix_or_a_name(daemon, capsys, tmp_path):
    sock = ["--socket", str(daemon.socket_path)]
    demo = await import_env(daemon, "Demo")
    other = await import_env(daemon, "Other")
    await import_env(daemon, "Twin")
    await import_env(daemon, "Twin")
    await daemon.op("space.create", name="Team")

    code, out, _ = await cli_run(capsys, *sock, "env", "get", demo[:6], "/name")
    assert (code, out) == (0, '"Demo"\n')
    assert await cli_run(capsys, *sock, "env", "get", "Other", "/name") == (0, '"Other"\n', "")
    target = tmp_path / "demo.json"
    assert (await cli_run(capsys, *sock, "env", "export", "Demo", "-o", str(target)))[0] == 0
    assert json.loads(target.read_text())["uuid"] == demo
    patch = tmp_path / "p.json"
    patch.write_text('[{"op": "replace", "path": "/port", "value": 3999}]')
    assert (await cli_run(capsys, *sock, "env", "patch", "Other", str(patch)))[0] == 0
    assert await daemon.op("env.get", id=other, pointer="/port") == 3999
    put = load("test-env.json")
    put.update(uuid=other, name="Other")
    (tmp_path / "put.json").write_text(json.dumps(put))
    assert (await cli_run(capsys, *sock, "env", "put", other[:8], str(tmp_path / "put.json")))[
        0
    ] == 0
    code, out, _ = await cli_run(capsys, *sock, "env", "share", "Demo", "--space", "Team")
    assert (code, out) == (0, f"{demo}\n")
    assert (await cli_run(capsys, *sock, "env", "mock", demo[:5], "--json"))[0] == 0
    assert (await cli_run(capsys, *sock, "env", "unshare", "Demo"))[0] == 0
    linked = tmp_path / "other.json"
    assert (await cli_run(capsys, *sock, "env", "link", "Other", str(linked)))[0] == 0
    assert [link["id"] for link in await daemon.op("env.links")] == [other]
    assert (await cli_run(capsys, *sock, "env", "unlink", other[:4]))[0] == 0
    code, _, err = await cli_run(capsys, *sock, "mock", "stop", "Demo")  # resolved, not served
    assert code == 1 and f"environment {demo} is not being served" in one_line(err)

    code, out, err = await cli_run(capsys, *sock, "env", "get", "Twin")
    assert (code, out) == (1, "") and "'Twin' names 2 environments" in one_line(err)
    code, _, err = await cli_run(capsys, *sock, "env", "delete", "Nothing")
    assert code == 1 and "no environment 'Nothing'" in one_line(err) and "(not-found)" in err
    assert (await cli_run(capsys, *sock, "env", "delete", "Demo"))[0] == 0
    assert demo not in {e["id"] for e in await daemon.op("env.list")}


# --- 6. env list: shared and linked --------------------------------------------------------------
async def test_env_list_shows_the_space_and_the_linked_file(daemon, capsys, tmp_path):
    sock = ["--socket", str(daemon.socket_path)]
    shared = await import_env(daemon, "Shared")
    linked = await import_env(daemon, "Linked")
    alone = await import_env(daemon, "Alone")
    space = (await daemon.op("space.create", name="Team"))["id"]
    await daemon.op("env.share", id=shared, space=space)
    path = tmp_path / "linked.json"
    await daemon.op("env.link", id=linked, path=str(path))

    code, out, _ = await cli_run(capsys, *sock, "env", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "ROUTES", "SHARED", "LINKED", "FLAGS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[shared][1:] == ["Shared", "11", "Team", "-", "-"]
    assert rows[linked][1:] == ["Linked", "11", "-", short_path(str(path)), "-"]
    assert rows[alone][1:] == ["Alone", "11", "-", "-", "-"]
    code, out, _ = await cli_run(capsys, *sock, "env", "list", "--json")
    entries = {e["id"]: e for e in json.loads(out)}
    assert entries[shared]["shared"] == {"id": space, "name": "Team"}
    assert entries[linked]["linked"] == str(path) and entries[linked]["shared"] is None
    assert entries[alone]["routes"] == 11 and entries[alone]["linked"] is None


# --- 7. peers: members reached through a hub ------------------------------------------------------
async def test_peers_lists_space_members_reached_through_the_hub(nursery, base, capsys):
    hub_dir = base / "hub"
    with Accounts.open(hub_dir) as accounts:
        token_a = accounts.add_user("alice")
        token_b = accounts.add_token("alice")
    async with running_hub(hub_dir) as hub:
        url, key = f"ws://127.0.0.1:{hub.port}", hub.peer_endpoint.identity.device_id
        a, b = await start(nursery, base, "a"), await start(nursery, base, "b")
        space = (await a.op("space.create", name="Team"))["id"]
        await a.op("space.hub", space=space, url=url, token=token_a, hub_key=key, wait=10)
        code = (await a.op("space.invite", space=space, addresses=[]))["code"]
        await b.op("space.join", code=code)
        await b.op("space.hub", space=space, token=token_b, wait=10)  # URL and key: the invite's

        async def b_is_a_member() -> Any:
            [listed] = await a.op("space.list")
            return len(listed["members"]) == 2

        await until(b_is_a_member, what="b's membership reaching a through the hub")
        sock = ["--socket", str(a.socket_path)]
        code, out, err = await cli_run(capsys, *sock, "peers")
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].split() == ["NAME", "DEVICE", "ADDRESS", "STATE", "REASON"]
        row = next(line.split() for line in lines if line.startswith("b "))
        assert row == ["b", b.daemon.identity.device_id, "via", "hub", url, "connected", "-"]
        code, out, _ = await cli_run(capsys, *sock, "peers", "--json")
        result = json.loads(out)
        assert [r.get("kind") for r in result["peers"]] == ["hub"]  # the raw rows, unchanged
        [via] = result["via_hub"]
        assert (via["device"], via["name"], via["hub"]) == (b.daemon.identity.device_id, "b", url)
        assert via["spaces"] == ["Team"] and via["state"] == "connected"

        code, out, _ = await cli_run(capsys, *sock, "doctor", "--json")  # test_doctor.py: the rest
        checks = {c["check"]: c for c in json.loads(out)["checks"]}
        assert checks["hub"]["status"] == "ok" and key in checks["hub"]["message"]
        assert checks["clock"]["status"] in ("ok", "skip")
        await a.stop()
        await b.stop()


# --- 8. addresses ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("999.1.1.1:99999", "port 99999 is not in 1-65535"),
        ("999.1.1.1:80", "999.1.1.1 is not an IP address or host name"),
        ("bad_host-:80", "bad_host- is not an IP address or host name"),
        ("[not-v6]:80", "not-v6 is not an IP address or host name"),
        ("host:http", "the port 'http' is not a number (1-65535)"),
        ("host", "is not an address of the form host:port"),
        ("2001:db8::1:80", "write an IPv6 address as [address]:port"),
    ],
)
def test_addresses_say_what_is_wrong(text, message):
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert message in str(info.value)


def test_addresses_that_are_fine():
    assert parse_address("0.0.0.0:0", any_port=True) == ("0.0.0.0", 0)
    assert parse_address("my-host.local.:7600") == ("my-host.local.", 7600)
    assert parse_address("[fe80::1%eth0]:7600") == ("fe80::1%eth0", 7600)


def test_run_listen_says_which_number_is_wrong(capsys):
    for argv, message in (
        (["run", "--listen", "999.1.1.1:99999"], "argument --listen: port 99999 is not in 0-65535"),
        (["run", "--listen", "999.1.1.1:80"], "999.1.1.1 is not an IP address or host name"),
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


# --- 9. the README --------------------------------------------------------------------------------
def test_readme_says_where_the_socket_goes_and_that_run_keeps_the_terminal():
    text = README.read_text(encoding="utf-8")
    assert "/tmp/peerdaemon-UID/peerdaemon.sock" in text and "XDG_RUNTIME_DIR` is not set" in text
    assert "`run` keeps the terminal" in text and "peerdaemon service install" in text


# --- 10. --json, examples, completion -------------------------------------------------------------
SHOWS = {
    "peers",
    "status",
    "doctor",
    "env list",
    "env links",
    "env import",
    "env mock",
    "space list",
    "mock list",
    "mock logs",
    "config get",
    "config list",
    "hub status",
    "hub user list",
    "hub token list",
    "hub space list",
}


def _leaves() -> dict[str, Any]:
    return {n.path.replace("/", " "): n for n in walk(cli.build_parser()) if not n.subcommands}


def test_every_command_has_an_example_and_json_where_it_lists_or_shows():
    parser = cli.build_parser()
    leaves = _leaves()
    assert SHOWS <= set(leaves)
    for path in SHOWS:
        assert any("--json" in o.flags for o in leaves[path].options), path
    for path in leaves:
        sub = parser
        for name in path.split():
            sub = cli._children(sub)[name]
        assert sub.epilog and sub.epilog.startswith(f"Example: peerdaemon {path}"), path
        assert len(sub.epilog) <= 76, path  # one line in --help
        words = shlex.split(sub.epilog[len("Example: ") :])
        for i, word in enumerate(words):  # drop redirections: `> FILE`, `< FILE`
            if word in (">", ">>", "<"):
                words = words[:i]
                break
        args = parser.parse_args(words[1:])  # every example is a valid command line
        assert args.command_path == path


def _bash_complete(script: str, words: list[str], env: dict[str, str]) -> list[str]:
    program = (
        f"source {shlex.quote(script)}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_peerdaemon\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, env=env, timeout=60, check=True
    ).stdout
    return sorted(line for line in out.splitlines() if line)


async def test_completion_scripts(daemon, capsys, tmp_path):
    for shell in ("bash", "zsh", "fish"):
        code, out, _ = await cli_run(capsys, "completion", shell)
        assert code == 0 and "env" in out and "--socket" in out
        (tmp_path / f"c.{shell}").write_text(out)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("PEERDAEMON_SOCKET", None)
    script = str(tmp_path / "c.bash")
    sock = str(daemon.socket_path)
    env_id = await import_env(daemon, "Completed")

    def bash(*words: str) -> list[str]:
        return _bash_complete(script, ["peerdaemon", *words], env)

    assert "env" in bash("") and "doctor" in bash("") and "completion" in bash("")
    assert bash("env", "li") == ["link", "links", "list"]
    assert bash("--socket", sock, "env", "export", "x", "--format", "") == ["json", "yjs"]
    assert bash("env", "list", "--") == ["--config", "--help", "--json", "--socket"]
    assert bash("completion", "") == ["bash", "fish", "zsh"]
    (tmp_path / "some.json").write_text("{}")
    assert bash("env", "import", str(tmp_path / "some.")) == [str(tmp_path / "some.json")]
    ids = await trio.to_thread.run_sync(lambda: bash("--socket", sock, "env", "get", ""))
    assert ids == [env_id]  # asked of the daemon on --socket
    # the second positional of `env put ID FILE` is a file; an option's value counts for nothing
    second = bash("env", "put", "--socket", sock, env_id[:6], str(tmp_path / "some."))
    assert second == [str(tmp_path / "some.json")]

    if shutil.which("zsh"):  # the walk, with zsh's completion builtins stubbed
        program = (
            "compdef() { :; }\n"
            f"source {shlex.quote(str(tmp_path / 'c.zsh'))}\n"
            '_describe() { [[ $1 == -o ]] && shift; print -r -- "$1: ${(P)2}"; }\n'
            'compadd() { shift; print -r -- "compadd: $*"; }\n'
            '_files() { print -r -- "files $*"; }\n'
            't() { words=("$@"); CURRENT=${#words}; _peerdaemon; }\n'
            "t peerdaemon env ''\n"
            "t peerdaemon env export x --format ''\n"
            "t peerdaemon --socket /x env list --\n"
            "t peerdaemon run --data-dir ''\n"
        )
        out = subprocess.run(
            ["zsh", "-c", program], capture_output=True, text=True, timeout=60, check=True
        ).stdout.splitlines()
        assert out[0].startswith("command: list:list environments") and "watch:" in out[0]
        assert out[1] == "compadd: json yjs"
        assert out[2].startswith("option: -h:") and "--json:print the list as JSON" in out[2]
        assert out[3] == "files -/"
    if shutil.which("fish"):

        def fish(line: str) -> list[str]:
            program = (
                f"source {shlex.quote(str(tmp_path / 'c.fish'))}; complete -C {shlex.quote(line)}"
            )
            out = subprocess.run(
                ["fish", "-c", program], capture_output=True, text=True, env=env, timeout=60
            ).stdout
            return sorted(line.split("\t")[0] for line in out.splitlines())

        assert fish("peerdaemon env li") == ["link", "links", "list"]
        assert fish("peerdaemon env export x --format ") == ["json", "yjs"]
        assert "--socket" in fish("peerdaemon env list --")
        ids = await trio.to_thread.run_sync(lambda: fish(f"peerdaemon --socket {sock} env get "))
        assert ids == [env_id]
