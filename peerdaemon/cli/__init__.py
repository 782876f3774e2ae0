"""The `peerdaemon` command: `run` starts the daemon; every other command is a local API client,
except `hub`, which works on a hub's data dir.

Exit codes: 0 success, 1 failure (one `peerdaemon: <message>` line on stderr, never a
traceback unless PEERDAEMON_DEBUG is set), 2 bad usage (argparse), 3 `space join` timed out
(joined; the first sync goes on), 130 interrupted.
Client commands use the blocking `Client` so they do not pay for importing trio.

Each command group is a module that registers its parsers beside their handlers:
`register(commands)` adds the group's commands, each with `set_defaults(handler=...)`. A new
group is one more module and one more entry in `GROUPS`, whose order is the order of `--help`;
a group that adds commands to another's (`space` adds `env share`) comes after it.

Groups are imported only when needed: a command line naming a command loads the groups that
build it (`COMMANDS`), so a long-running `hub serve` does not keep every other command's code
and imports in memory; `--help`, completion and a command line without a known command load all.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from peerdaemon.cli.common import EXAMPLES, PROG, CliError, Commands, warn

__all__ = ["CliError", "build_parser", "main"]

GROUPS = (
    "daemon",
    "env",
    "space",
    "presence",
    "mock",
    "config",
    "hub",
    "service",
    "doctor",
    "completion",
)
"""The command groups' modules (in `peerdaemon.cli`), in `--help` order."""

COMMANDS: dict[str, tuple[str, ...]] = {
    "run": ("daemon",),
    "peers": ("daemon",),
    "status": ("daemon",),
    "env": ("env", "space"),  # `space` adds `env share`
    "space": ("env", "space"),  # ... to the `env` group, which must exist first
    "presence": ("presence",),
    "mock": ("mock",),
    "config": ("config",),
    "hub": ("hub",),
    "service": ("service",),
    "doctor": ("doctor",),
    "completion": ("completion",),
}
"""Each top-level command and the groups that build it (tests/test_cli_parse.py checks this
against the whole tree)."""


def _version() -> str:
    import peerdaemon

    return getattr(peerdaemon, "__version__", "unknown")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or with `command` (a key of `COMMANDS`) only what it needs."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Local-first sync daemon for Mockoon environments.",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="the daemon's socket (default: $PEERDAEMON_SOCKET, else "
        "$XDG_RUNTIME_DIR/peerdaemon/peerdaemon.sock, else /tmp/peerdaemon-UID/peerdaemon.sock)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="the daemon's config file (default: $PEERDAEMON_CONFIG, else "
        "~/.config/peerdaemon/config.toml or the platform's config dir)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON (commands that list or show something; also after the command)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = Commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    for group in COMMANDS[command] if command in COMMANDS else GROUPS:
        importlib.import_module(f"{__name__}.{group}").register(commands)
    _spread_global_options(parser)
    return parser


class _Unsure(Exception):
    pass


class _Probe(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Unsure(message)


def command_of(argv: Sequence[str]) -> str | None:
    """The top-level command `argv` names, read with the top-level options as `build_parser`
    defines them (abbreviations included); None when unsure or asked for help (the top-level
    help lists every command), and then everything is loaded: argparse itself reports the error
    or prints the help."""
    probe = _Probe(prog=PROG, add_help=False)
    probe.add_argument("-h", "--help", action="store_true")
    probe.add_argument("--socket")
    probe.add_argument("--config")
    probe.add_argument("--json", action="store_true")
    probe.add_argument("command", nargs="?")
    try:
        args, _ = probe.parse_known_args(list(argv))
    except _Unsure:
        return None
    return args.command if args.command in COMMANDS and not args.help else None


# Command groups that never talk to a daemon: no `--socket` there.
NO_DAEMON = ("hub", "service", "completion")


def _spread_global_options(parser: argparse.ArgumentParser) -> None:
    """`--socket`, `--config` and `--json` anywhere on the command line, not only before the
    command.

    Every parser below the top one gets `--socket` (unless it has its own, as `run` does), with
    `default=SUPPRESS` so that a subcommand that is not given it leaves the top-level value alone.
    A command's own `--json` gets the same default, so `peerdaemon --json env list` and
    `peerdaemon env list --json` mean the same; `--json` before a command that prints no JSON
    is refused (`json_ok` says which do). Each command also gets its `Example:` line, if its
    module gave none (`common.EXAMPLES`)."""
    socket = argparse.ArgumentParser(add_help=False)
    socket.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the daemon's socket (as before the command)",
    )
    socket_action = socket._actions[0]
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="the daemon's config file (as before the command)",
    )
    config_action = config._actions[0]

    def walk(sub: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        options = sub._option_string_actions
        if path[0] not in NO_DAEMON and "--socket" not in options:
            sub._add_action(socket_action)
        if path[0] not in NO_DAEMON and "--config" not in options:
            sub._add_action(config_action)
        json_action = options.get("--json")
        if json_action is not None:
            json_action.default = argparse.SUPPRESS
        children = _children(sub)
        if not children:
            sub.set_defaults(json_ok=json_action is not None, command_path=" ".join(path))
            if sub.epilog is None and " ".join(path) in EXAMPLES:
                sub.epilog = f"Example: {EXAMPLES[' '.join(path)]}"
        for name, child in children.items():
            walk(child, (*path, name))

    for name, child in _children(parser).items():
        walk(child, (name,))


def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _quiet_broken_pipe() -> NoReturn:
    # Reader went away (`| head`): stop quietly; point stdout at /dev/null so the interpreter's
    # final flush does not complain either.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)  # exits 2 on bad usage
    if getattr(args, "json", False) and not getattr(args, "json_ok", True):
        parser.error(f"`{PROG} {args.command_path}` has no JSON output: drop --json")
    try:
        return args.handler(args)
    except CliError as exc:
        warn(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_broken_pipe()
    except Exception as exc:
        client = sys.modules.get("peerdaemon.api.client")  # not loaded: no ClientError raised
        if client is not None and isinstance(exc, client.ClientError):
            warn(str(exc))
            return 1
        if os.environ.get("PEERDAEMON_DEBUG"):
            traceback.print_exc()
        warn(f"internal error: {type(exc).__name__}: {exc}")
        return 1


def __getattr__(name: str) -> Any:
    # `Client`, re-exported (tests stub `Client.connect`), is loaded on first use: `hub serve`
    # does not keep the daemon's client in memory
    if name == "Client":
        from peerdaemon.api.client import Client

        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
