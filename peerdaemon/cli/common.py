"""What every command group shares: the one-line failure, the daemon connection, reading input
files, writing output files and printing tables and JSON."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerdaemon.core.addresses import parse_address
from peerdaemon.core.files import replace_file
from peerdaemon.core.locations import default_data_dir, default_socket_path

if TYPE_CHECKING:
    # loaded by the commands that talk to a daemon: `hub serve` keeps it out of memory
    from peerdaemon.api.client import Client

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
        self, name: str, handler: Handler, help: str, *, example: str = "", **kwargs: Any
    ) -> argparse.ArgumentParser:
        """A command whose help line is also its description; `main` calls `handler(args)`.
        `example`: one command line, shown as `Example:` at the end of its `--help`."""
        if example:
            kwargs.setdefault("epilog", f"Example: {example}")
        parser = self.action.add_parser(name, help=help, description=help, **kwargs)
        parser.set_defaults(handler=handler)
        return parser

    def add_group(
        self,
        name: str,
        *,
        help: str,
        metavar: str,
        dest: str,
        description: str | None = None,
        example: str = "",
    ) -> Commands:
        """A command that only holds subcommands (one of which is required)."""
        parser = self.action.add_parser(
            name,
            help=help,
            description=description,
            epilog=f"Example: {example}" if example else None,
        )
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


def duration(seconds: Any) -> str:
    """`14m 34s`, `2h 5m`, `3d 4h`: the two largest units (seconds as given by `status`)."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        return cell(seconds)
    total = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size or (unit == "s" and not parts):
            parts.append(f"{total // size}{unit}")
            total %= size
    return " ".join(parts[:2])


def megabytes(size: Any) -> str:
    """Bytes as `12.3 MB` (decimal megabytes, as file managers show them)."""
    if not isinstance(size, int | float) or isinstance(size, bool):
        return cell(size)
    mb = size / 1_000_000
    return f"{mb:.2f} MB" if mb < 10 else f"{mb:.1f} MB"


def short_path(path: Any, width: int = 40) -> str:
    """A path for a table cell: `~` for the home folder, then only its end if still long."""
    if not isinstance(path, str) or not path:
        return cell(path)
    home = os.path.expanduser("~")
    if home not in ("", "/") and (path == home or path.startswith(home + os.sep)):
        path = "~" + path[len(home) :]
    if len(path) <= width:
        return path
    parts = path.split(os.sep)
    tail = parts[-1]
    for part in reversed(parts[1:-1]):
        if len(part) + len(tail) + 5 > width:
            break
        tail = part + os.sep + tail
    return "..." + os.sep + tail


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
    """`--socket`, else `$PEERDAEMON_SOCKET`, else `socket` in the config file, else the
    default (core/locations.py): the order the daemon resolves it in."""
    if getattr(args, "socket", None):
        return Path(args.socket).expanduser()
    if os.environ.get("PEERDAEMON_SOCKET"):
        return default_socket_path()
    return _from_file(args, "socket") or default_socket_path()


def data_dir_of(args: argparse.Namespace) -> Path:
    """The daemon's data dir as `run` would find it: `$PEERDAEMON_DATA_DIR`, else the file's
    `data_dir`, else the default."""
    if os.environ.get("PEERDAEMON_DATA_DIR"):
        return default_data_dir()
    return _from_file(args, "data_dir") or default_data_dir()


def config_file(args: argparse.Namespace) -> tuple[Path, bool]:
    """The config file this command reads (`--config`, `$PEERDAEMON_CONFIG`, the default)
    and whether it must exist."""
    from peerdaemon.daemon.config import config_path

    return config_path(getattr(args, "config", None))


def _from_file(args: argparse.Namespace, key: str) -> Path | None:
    from peerdaemon.daemon.config import SCHEMA, ConfigFileError, read_file

    path, required = config_file(args)
    try:
        value = read_file(SCHEMA, path, required=required).values.get(key)
    except ConfigFileError as exc:
        raise CliError(str(exc)) from None
    return value if isinstance(value, Path) else None


def connect(args: argparse.Namespace) -> Client:
    from peerdaemon.api.client import Client

    return Client.connect(socket_path(args))


def call(args: argparse.Namespace, op: str, **call_args: Any) -> Any:
    """One request on a connection of its own."""
    with connect(args) as client:
        return client.call(op, **call_args)


def optional_call(client: Client, op: str, default: Any = None, **call_args: Any) -> Any:
    """A request whose answer is a nicety (an older daemon may not know `op`): `default` on an
    error answer."""
    from peerdaemon.api.client import DaemonError

    try:
        return client.call(op, **call_args)
    except DaemonError:
        return default


# --- naming environments --------------------------------------------------------------------------
MIN_PREFIX = 4
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


def _env_label(env: dict[str, Any]) -> str:
    name = env.get("name")
    return f"{env.get('id')} ({name})" if name else str(env.get("id"))


def _listing(envs: list[dict[str, Any]], most: int = 5) -> str:
    shown = ", ".join(_env_label(e) for e in envs[:most])
    return shown + (f" and {len(envs) - most} more" if len(envs) > most else "")


def match_env(envs: list[dict[str, Any]], ref: str, *, missing_ok: bool = False) -> str:
    """The id `ref` names among `envs` (as `env.list` gives them): the exact id, else a unique id
    prefix of at least MIN_PREFIX characters, else a unique exact name. Ambiguous or unknown: a
    `CliError` listing the candidates (`missing_ok`: an unknown `ref` is returned as it is)."""
    envs = [e for e in envs if isinstance(e, dict) and isinstance(e.get("id"), str)]
    if any(e["id"] == ref for e in envs):
        return ref
    prefixed = []
    if len(ref) >= MIN_PREFIX:
        prefixed = [e for e in envs if e["id"].lower().startswith(ref.lower())]
    if len(prefixed) == 1:
        return str(prefixed[0]["id"])
    named = [e for e in envs if e.get("name") == ref]
    if len(named) == 1:
        return str(named[0]["id"])
    candidates = prefixed + [e for e in named if e not in prefixed]
    if candidates:
        raise CliError(
            f"{ref!r} names {len(candidates)} environments: {_listing(candidates)}; "
            "give more of the id (ambiguous)"
        )
    if missing_ok:
        return ref
    names = [e.get("name") for e in envs if isinstance(e.get("name"), str) and e.get("name")]
    near = [e for e in envs if isinstance(e.get("name"), str) and e["name"].lower() == ref.lower()]
    import difflib

    close = set(difflib.get_close_matches(ref, names, n=3, cutoff=0.75))
    near += [e for e in envs if e.get("name") in close and e not in near]
    hint = f" (did you mean {_listing(near, 3)}?)" if near else ""
    if (
        not near
        and len(ref) < MIN_PREFIX
        and any(e["id"].lower().startswith(ref.lower()) for e in envs)
    ):
        hint = f" (an id prefix needs at least {MIN_PREFIX} characters)"
    raise CliError(
        f"no environment {ref!r}{hint}; name one by its id, a unique id prefix or its exact "
        f"name, as `{PROG} env list` shows them (not-found)"
    )


def list_envs(client_or_args: Client | argparse.Namespace) -> list[dict[str, Any]]:
    if isinstance(client_or_args, argparse.Namespace):
        envs = call(client_or_args, "env.list")
    else:
        envs = client_or_args.call("env.list")
    return [e if isinstance(e, dict) else {"id": e} for e in envs or ()]


def resolve_env(
    client_or_args: Client | argparse.Namespace, ref: str, *, missing_ok: bool = False
) -> str:
    """The environment id a command line's `ID` names (see `match_env`), asking the daemon for
    its environments; a full uuid is taken as it is, without asking."""
    if _UUID.match(ref):
        return ref
    return match_env(list_envs(client_or_args), ref, missing_ok=missing_ok)


# --- help -----------------------------------------------------------------------------------------
EXAMPLES: dict[str, str] = {
    # commands whose modules give no `example=` of their own (see `cli._spread_global_options`)
    "run": "peerdaemon run --listen 0.0.0.0:7600 --name laptop",
    "hub serve": "peerdaemon hub serve --listen 0.0.0.0:8765 --data-dir /srv/hub",
    "hub status": "peerdaemon hub status --data-dir /srv/hub",
    "hub user add": "peerdaemon hub user add alice",
    "hub user list": "peerdaemon hub user list --json",
    "hub token add": "peerdaemon hub token add alice",
    "hub token revoke": "peerdaemon hub token revoke pdh_3f9a",
    "hub token list": "peerdaemon hub token list alice",
    "hub space create": "peerdaemon hub space create SPACE_ID --owner alice --name Team",
    "hub space add-member": "peerdaemon hub space add-member SPACE_ID bob",
    "hub space remove-member": "peerdaemon hub space remove-member SPACE_ID bob",
    "hub space list": "peerdaemon hub space list",
    "hub limits set": "peerdaemon hub limits set --user alice bytes_per_env 64MiB",
    "service install": "peerdaemon service install",
    "service uninstall": "peerdaemon service uninstall",
    "service status": "peerdaemon service status",
    "mock install": "peerdaemon mock install",
    "mock start": "peerdaemon mock start Demo --port 3001",
    "mock stop": "peerdaemon mock stop Demo",
    "mock list": "peerdaemon mock list --json",
    "mock logs": "peerdaemon mock logs Demo --follow",
}
