"""The `peerdaemon` command: `run` starts the daemon; every other command is a local API client,
except `hub`, which works on a hub's data dir.

Exit codes: 0 success, 1 failure (one `peerdaemon: <message>` line on stderr, never a
traceback unless PEERDAEMON_DEBUG is set), 2 bad usage (argparse), 130 interrupted.
Client commands use the blocking `Client` so they do not pay for importing trio.

Each command group is a module that registers its parsers beside their handlers:
`register(commands)` adds the group's commands, each with `set_defaults(handler=...)`. A new
group is one more module and one more entry in `GROUPS`, whose order is the order of `--help`;
a group that adds commands to another's (`space` adds `env share`) comes after it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from peerdaemon.api.client import Client as Client  # re-exported: tests stub Client.connect
from peerdaemon.api.client import ClientError
from peerdaemon.cli import config, daemon, env, hub, mock, space
from peerdaemon.cli.common import PROG, CliError, Commands, warn

__all__ = ["CliError", "build_parser", "main"]

GROUPS = (daemon, env, space, mock, config, hub)


def _version() -> str:
    import peerdaemon

    return getattr(peerdaemon, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = Commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    for group in GROUPS:
        group.register(commands)
    return parser


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
    args = build_parser().parse_args(argv)  # exits 2 on bad usage
    try:
        return args.handler(args)
    except (ClientError, CliError) as exc:
        warn(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_broken_pipe()
    except Exception as exc:
        if os.environ.get("PEERDAEMON_DEBUG"):
            traceback.print_exc()
        warn(f"internal error: {type(exc).__name__}: {exc}")
        return 1
