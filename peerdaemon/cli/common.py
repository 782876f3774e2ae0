"""What every command group shares: the one-line failure, the daemon connection, reading input
files, writing output files and printing tables and JSON."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peerdaemon.api.client import Client
from peerdaemon.core.addresses import parse_address
from peerdaemon.core.files import replace_file
from peerdaemon.core.locations import default_socket_path

PROG = "peerdaemon"

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A failure to report as one `peerdaemon: <message>` line with exit status 1."""


@dataclass
class Commands:
    """One level of subcommands. Groups are kept by name so that a module can add commands to a
    group another module built (`space` adds `env share`) instead of building it twice."""

    action: argparse._SubParsersAction[argparse.ArgumentParser]
    groups: dict[str, Commands] = field(default_factory=dict)

    def command(
        self, name: str, handler: Handler, help: str, **kwargs: Any
    ) -> argparse.ArgumentParser:
        """A command whose help line is also its description; `main` calls `handler(args)`."""
        parser = self.action.add_parser(name, help=help, description=help, **kwargs)
        parser.set_defaults(handler=handler)
        return parser

    def add_group(
        self, name: str, *, help: str, metavar: str, dest: str, description: str | None = None
    ) -> Commands:
        """A command that only holds subcommands (one of which is required)."""
        parser = self.action.add_parser(name, help=help, description=description)
        group = Commands(parser.add_subparsers(dest=dest, metavar=metavar, required=True))
        self.groups[name] = group
        return group

    def group(self, name: str) -> Commands:
        """A group built earlier (by its own module: keep the module order in `GROUPS`)."""
        return self.groups[name]


# --- output ---------------------------------------------------------------------------------------
def one_line(text: object) -> str:
    return " ".join(str(text).split()) or "error"


def warn(message: str) -> None:
    print(f"{PROG}: {one_line(message)}", file=sys.stderr, flush=True)


def _json_default(value: object) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def to_json(value: Any, *, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, default=_json_default)


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )


def cell(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(map(str, value)) or "-"
    return "-" if value is None or value == "" else str(value)


# --- files ----------------------------------------------------------------------------------------
def read_bytes(name: str) -> bytes:
    """Read FILE, or stdin for `-`."""
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None


def read_text(name: str) -> str:
    """Read FILE as UTF-8 text (a BOM is dropped); JSON parsing is left to the daemon."""
    data = read_bytes(name)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        label = "stdin" if name == "-" else name
        raise CliError(
            f"{label}: not valid UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _new_file_mode(path: Path) -> int:
    """Keep an existing file's mode; otherwise what open() would give (0666 minus umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_file(path: Path, data: bytes) -> None:
    """Replace `path` whole, so a reader (Mockoon) never sees half a file."""
    try:
        replace_file(path, data, _new_file_mode(path))
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


# --- the daemon -----------------------------------------------------------------------------------
def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT), for argparse."""
    try:
        return parse_address(text, any_port=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def socket_path(args: argparse.Namespace) -> Path:
    return Path(args.socket).expanduser() if args.socket else default_socket_path()


def connect(args: argparse.Namespace) -> Client:
    return Client.connect(socket_path(args))


def call(args: argparse.Namespace, op: str, **call_args: Any) -> Any:
    """One request on a connection of its own."""
    with connect(args) as client:
        return client.call(op, **call_args)
