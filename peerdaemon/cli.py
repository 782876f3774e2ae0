"""The `peerdaemon` command: `run` starts the daemon; every other command is a local API client.

Exit codes: 0 success, 1 failure (one `peerdaemon: <message>` line on stderr, never a
traceback unless PEERDAEMON_DEBUG is set), 2 bad usage (argparse), 130 interrupted.
Client commands use the blocking `Client` so they do not pay for importing trio.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from peerdaemon.api.client import Client, ClientError, DaemonError
from peerdaemon.api.protocol import UUID_MISMATCH
from peerdaemon.core.addresses import parse_address
from peerdaemon.core.locations import default_data_dir, default_socket_path
from peerdaemon.model.schema import LAST_MIGRATION

__all__ = ["CliError", "build_parser", "main"]

PROG = "peerdaemon"


class CliError(Exception):
    """A failure to report as one `peerdaemon: <message>` line with exit status 1."""


def _version() -> str:
    import peerdaemon

    return getattr(peerdaemon, "__version__", "unknown")


# --- helpers ------------------------------------------------------------------------------------
def _one_line(text: object) -> str:
    return " ".join(str(text).split()) or "error"


def _warn(message: str) -> None:
    print(f"{PROG}: {_one_line(message)}", file=sys.stderr, flush=True)


def _read_bytes(name: str) -> bytes:
    """Read FILE, or stdin for `-`."""
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None


def _read_text(name: str) -> str:
    """Read FILE as UTF-8 text (a BOM is dropped); JSON parsing is left to the daemon."""
    data = _read_bytes(name)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        label = "stdin" if name == "-" else name
        raise CliError(
            f"{label}: not valid UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _json_default(value: object) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _to_json(value: Any, *, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, default=_json_default)


def _new_file_mode(path: Path) -> int:
    """Keep an existing file's mode; otherwise what open() would give (0666 minus umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _write_file_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file + rename, so a reader (Mockoon) never sees half a file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def _report_repairs(result: Any) -> None:
    if isinstance(result, dict):
        for repair in result.get("repairs") or ():
            _warn(f"repaired: {repair}")
        if result.get("newer"):
            _warn_newer()


def _warn_newer() -> None:
    _warn(
        "warning: this environment was written by a newer Mockoon than peerdaemon knows "
        f"(lastMigration > {LAST_MIGRATION}); it is kept exactly as it is"
    )


def _socket_path(args: argparse.Namespace) -> Path:
    return Path(args.socket).expanduser() if args.socket else default_socket_path()


def _connect(args: argparse.Namespace) -> Client:
    return Client.connect(_socket_path(args))


# --- commands -----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    try:
        from peerdaemon.daemon.supervisor import run_daemon
    except ImportError as exc:
        raise CliError(f"the daemon is not available in this installation: {exc}") from None
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    options = {"name": args.name} if getattr(args, "name", None) else {}
    if getattr(args, "mirror_dir", None):
        options["mirror_dir"] = Path(args.mirror_dir).expanduser().absolute()
    if args.listen:
        options["listen"] = args.listen
    if args.peer:
        options["peers"] = list(args.peer)
    if args.no_mdns:
        options["mdns"] = False
    if args.mdns_interface:
        options["mdns_interface"] = args.mdns_interface
    if args.max_frame:
        options["max_frame"] = args.max_frame
    return int(run_daemon(data_dir, _socket_path(args), **options) or 0)


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT), for argparse."""
    try:
        return parse_address(text, any_port=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_peers(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        result = client.call("peers")
    if args.json:
        print(_to_json(result))
        return 0
    rows = [("NAME", "DEVICE", "ADDRESS", "STATE", "REASON")]
    for peer in result.get("peers", []):
        reason = peer.get("reason") or ""
        versions = peer.get("versions")
        if reason == "incompatible-version" and isinstance(versions, dict):
            local, remote = versions.get("local", {}), versions.get("remote", {})
            reason += (
                f" (ours: proto {local.get('proto')} model {local.get('model')};"
                f" theirs: proto {remote.get('proto')} model {remote.get('model')})"
            )
        rows.append(
            (
                _cell(peer.get("name")),
                _cell(peer.get("device")),
                _cell(peer.get("address")),
                _cell(peer.get("state")),
                reason or "-",
            )
        )
    _print_table(rows)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        status = client.status()
    if args.json:
        print(_to_json(status))
        return 0
    if not (isinstance(status, dict) and "socket" in status):
        print(f"socket: {_socket_path(args)}")
    if isinstance(status, dict):
        for key, value in status.items():
            shown = value if isinstance(value, str | int | float) else _to_json(value, indent=None)
            print(f"{key}: {shown}")
    else:
        print(_to_json(status))
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(map(str, value)) or "-"
    return "-" if value is None or value == "" else str(value)


def _flags(env: dict[str, Any]) -> list[str]:
    """`flags` from the daemon plus the boolean facts worth a glance (`newer`: the file was
    written by a newer Mockoon than peerdaemon knows)."""
    flags = [str(f) for f in env.get("flags") or ()]
    for name in ("newer",):
        if env.get(name) is True and name not in flags:
            flags.append(name)
    return flags


def cmd_env_list(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        envs = client.list_envs()
    if args.json:
        print(_to_json(envs))
        return 0
    rows = [("ID", "NAME", "ROUTES", "FLAGS")]
    for env in envs or ():
        env = env if isinstance(env, dict) else {"id": env}
        rows.append(
            (
                _cell(env.get("id")),
                _cell(env.get("name")),
                _cell(env.get("routes")),
                _cell(_flags(env)),
            )
        )
    _print_table(rows)
    return 0


def cmd_env_import(args: argparse.Namespace) -> int:
    if getattr(args, "link", False) and args.file == "-":
        raise CliError("--link needs a FILE to link, not stdin")
    text = _read_text(args.file)
    with _connect(args) as client:
        if getattr(args, "link", False):  # import, then keep FILE linked (docs/mirror.md)
            path = os.path.abspath(args.file)
            result = client.call("env.import_link", json=text, new_id=args.new_id, path=path)
        else:
            result = client.import_env(text, new_id=args.new_id)
    _report_repairs(result)
    print(result["id"] if isinstance(result, dict) else result)
    return 0


def cmd_env_export(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        result = client.export(args.id, format=args.format)
    if args.format == "yjs":
        if not isinstance(result, bytes | bytearray):
            raise CliError("the daemon did not return a binary update")
        data = bytes(result)
        if args.output is None:
            if sys.stdout.isatty():
                raise CliError("refusing to write a binary Yjs update to a terminal; use -o FILE")
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            _write_file_atomic(Path(args.output), data)
        return 0
    last = result.get("lastMigration") if isinstance(result, dict) else None
    if isinstance(last, int | float) and not isinstance(last, bool) and last > LAST_MIGRATION:
        _warn_newer()
    text = _to_json(result)  # Mockoon's own layout: JSON.stringify(env, null, 2)
    if args.output is None:
        print(text)
    else:
        _write_file_atomic(Path(args.output), text.encode("utf-8"))
    return 0


def cmd_env_get(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        value = client.get(args.id, args.pointer)
    print(_to_json(value))
    return 0


def cmd_env_put(args: argparse.Namespace) -> int:
    text = _read_text(args.file)
    with _connect(args) as client:
        try:
            result = client.put(args.id, text, force_id=args.force_id)
        except DaemonError as exc:
            if exc.code != UUID_MISMATCH:
                raise
            label = "stdin" if args.file == "-" else args.file
            raise CliError(
                f"{label} is not environment {args.id} (its uuid is another id): refusing "
                f"to replace {args.id} with it; use --force-id to do it anyway ({exc.code})"
            ) from None
    _report_repairs(result)
    return 0


def cmd_env_patch(args: argparse.Namespace) -> int:
    text = _read_text(args.file)
    with _connect(args) as client:
        client.patch(args.id, text)
    return 0


def cmd_env_merge(args: argparse.Namespace) -> int:
    update = _read_bytes(args.file)
    with _connect(args) as client:
        client.merge(args.id, update)
    return 0


def cmd_env_delete(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        client.delete(args.id)
    return 0


def cmd_env_watch(args: argparse.Namespace) -> int:
    """One JSON line per change until the environment is deleted or Ctrl-C (exit 0)."""
    try:
        with _connect(args) as client:
            for event in client.subscribe_env(args.id):
                if not isinstance(event, dict):
                    continue
                env_id = event.get("id", args.id)
                if event.get("type") == "deleted":
                    print(_to_json({"id": env_id, "deleted": True}, indent=None), flush=True)
                    return 0
                if event.get("type") == "change":
                    line = {
                        "id": env_id,
                        "paths": event.get("paths", []),
                        "origin": event.get("origin"),
                    }
                    print(_to_json(line, indent=None), flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


# --- spaces, sharing, config (docs/spaces.md) ---------------------------------------------------
def _call(args: argparse.Namespace, op: str, **call_args: Any) -> Any:
    with _connect(args) as client:
        return client.call(op, **call_args)


def cmd_space_create(args: argparse.Namespace) -> int:
    print(_call(args, "space.create", name=args.name)["id"])
    return 0


def cmd_space_invite(args: argparse.Namespace) -> int:
    call_args: dict[str, Any] = {"space": args.space}
    if args.address:
        call_args["addresses"] = args.address
    print(_call(args, "space.invite", **call_args)["code"])
    return 0


def cmd_space_join(args: argparse.Namespace) -> int:
    result = _call(args, "space.join", code=args.code)
    print(result["id"])
    return 0


def cmd_space_list(args: argparse.Namespace) -> int:
    spaces = _call(args, "space.list")
    if args.json:
        print(_to_json(spaces))
        return 0
    rows = [("ID", "NAME", "MEMBERS", "ENVIRONMENTS")]
    for space in spaces or ():
        members = [m.get("name") or m.get("device", "?")[:7] for m in space.get("members", ())]
        envs = [e.get("name") or e.get("id") for e in space.get("environments", ())]
        rows.append((_cell(space.get("id")), _cell(space.get("name")), _cell(members), _cell(envs)))
    _print_table(rows)
    return 0


def cmd_space_leave(args: argparse.Namespace) -> int:
    _call(args, "space.leave", space=args.space)
    return 0


def cmd_space_hub(args: argparse.Namespace) -> int:
    token = args.token
    if token == "-":  # keeps the token out of the shell history and `ps`
        token = sys.stdin.readline().strip()
    call_args: dict[str, Any] = {"space": args.space, "token": token, "wait": args.wait}
    if args.url:
        call_args["url"] = args.url
    if args.hub_key:
        call_args["hub_key"] = args.hub_key
    if args.trust_first_use:
        call_args["trust_first_use"] = True
    result = _call(args, "space.hub", **call_args)
    outcome = result.get("outcome")
    url, key = result.get("url"), result.get("hub_key") or "not pinned"
    if outcome == "accepted":
        print(f"{args.space}: syncing through {url} (hub key {key})")
    elif outcome == "refused":
        raise CliError(
            f"the hub at {url} refused: {result.get('reason')}: {result.get('detail') or '-'} "
            "(the attachment is kept and retried; `peerdaemon space unhub` removes it)"
        )
    elif outcome == "no-answer":
        raise CliError(
            f"no answer from the hub at {url} within {args.wait:g} s "
            f"(last: {result.get('reason') or 'connecting'}); the attachment is kept and "
            "retried: see `peerdaemon peers`"
        )
    return 0


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 to 60 seconds")
    return value


def cmd_space_unhub(args: argparse.Namespace) -> int:
    _call(args, "space.unhub", space=args.space)
    return 0


def cmd_env_share(args: argparse.Namespace) -> int:
    result = _call(args, "env.share", id=args.id, space=args.space, copy=args.copy)
    print(result["id"])
    return 0


def cmd_env_unshare(args: argparse.Namespace) -> int:
    _call(args, "env.unshare", id=args.id)
    return 0


def cmd_config_get(args: argparse.Namespace) -> int:
    value = _call(args, "config.get", key=args.key)
    print(value if isinstance(value, str) else _to_json(value))
    return 0


def cmd_config_set(args: argparse.Namespace) -> int:
    _call(args, "config.set", key=args.key, value=args.value)
    return 0


def _add_space_commands(commands: Any, envs: Any, command: Callable[..., Any]) -> None:
    p = command(envs, "share", cmd_env_share, "share an environment in a space; prints its id")
    p.add_argument("id", metavar="ID")
    p.add_argument("--space", metavar="SPACE", required=True, help="space id or name")
    p.add_argument(
        "--copy", action="store_true", help="share a duplicate with a new id, keep this one local"
    )
    p = command(envs, "unshare", cmd_env_unshare, "convert a shared environment back to local")
    p.add_argument("id", metavar="ID")

    space = commands.add_parser(
        "space", help="groups of devices sharing environments", description="manage spaces"
    )
    spaces = space.add_subparsers(dest="space_command", metavar="SPACE_COMMAND", required=True)
    p = command(spaces, "create", cmd_space_create, "create a space; prints its id")
    p.add_argument("name", metavar="NAME")
    p = command(spaces, "invite", cmd_space_invite, "print an invite code for a space")
    p.add_argument("space", metavar="SPACE", help="space id or name")
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        action="append",
        help="where this daemon can be reached (repeatable; default: what the daemon knows)",
    )
    p = command(spaces, "join", cmd_space_join, "join a space with an invite code; prints its id")
    p.add_argument("code", metavar="CODE")
    p = command(spaces, "list", cmd_space_list, "list spaces, members and shared environments")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p = command(spaces, "leave", cmd_space_leave, "leave a space (its environments stay local)")
    p.add_argument("space", metavar="SPACE", help="space id or name")
    p = command(spaces, "hub", cmd_space_hub, "sync a space through a hub too (docs/hublink.md)")
    p.add_argument("space", metavar="SPACE", help="space id or name")
    p.add_argument(
        "url", metavar="URL", nargs="?", help="ws(s)://HOST:PORT (default: the invite's hub)"
    )
    p.add_argument(
        "--token", metavar="TOKEN", required=True, help="your hub token (- reads it from stdin)"
    )
    trust = p.add_mutually_exclusive_group()
    trust.add_argument(
        "--hub-key",
        metavar="FINGERPRINT",
        help="the hub's key, as `peerdaemon hub status` prints it (default: the invite's)",
    )
    trust.add_argument(
        "--trust-first-use",
        action="store_true",
        help="trust the key the hub shows first, over a channel that does not authenticate it",
    )
    p.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_wait_seconds,
        default=15.0,
        help="wait this long for the hub's answer (default 15; 0: only store the attachment)",
    )
    p = command(spaces, "unhub", cmd_space_unhub, "stop syncing a space through its hub")
    p.add_argument("space", metavar="SPACE", help="space id or name")

    config = commands.add_parser("config", help="daemon settings", description="daemon settings")
    configs = config.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    p = command(configs, "get", cmd_config_get, "print a setting (name)")
    p.add_argument("key", metavar="KEY")
    p = command(configs, "set", cmd_config_set, "change a setting (name)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")


# --- mirrors (docs/mirror.md) ------------------------------------------------------------------
def cmd_env_link(args: argparse.Namespace) -> int:
    path = os.path.abspath(os.path.expanduser(args.file))  # the daemon's cwd is not ours
    with _connect(args) as client:
        result = client.call("env.link", id=args.id, path=path, overwrite=args.overwrite)
    if isinstance(result, dict) and result.get("error"):  # linked, but not writable yet
        _warn(f"linked, but: {result['error']} (retrying; see `peerdaemon env links`)")
    return 0


def cmd_env_unlink(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        client.call("env.unlink", id=args.id)
    return 0


def cmd_env_links(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        links = client.call("env.links")
    if args.json:
        print(_to_json(links))
        return 0
    rows = [("ID", "STATE", "PATH")]
    for link in links or ():
        state = _cell(link.get("state")) + (" (auto)" if link.get("auto") else "")
        rows.append((_cell(link.get("id")), state, _cell(link.get("path"))))
    _print_table(rows)
    for link in links or ():
        if link.get("error"):
            _warn(f"{link.get('id')}: {link['error']}")
    return 0


# --- the hub (docs/hub.md) ----------------------------------------------------------------------
def _hub_config(args: argparse.Namespace) -> Any:
    from peerdaemon.hub.server import ConfigError, build_config

    try:
        return build_config(
            config_file=Path(args.config).expanduser() if args.config else None,
            data_dir=Path(args.data_dir).expanduser() if args.data_dir else None,
            listen=getattr(args, "listen", None),
            tls_cert=getattr(args, "tls_cert", None),
            tls_key=getattr(args, "tls_key", None),
        )
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def cmd_hub_serve(args: argparse.Namespace) -> int:
    from peerdaemon.hub.server import run_hub

    return int(run_hub(_hub_config(args)) or 0)


def cmd_hub_status(args: argparse.Namespace) -> int:
    from peerdaemon.hub.server import hub_status
    from peerdaemon.store import StoreError

    try:
        status = hub_status(_hub_config(args).data_dir)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(_to_json(status))
        return 0
    print(f"data dir: {status['data_dir']}")
    print(f"hub key: {status['hub_key'] or '(none yet: start the hub once)'}")
    running = f"yes (pid {status['pid']})" if status["pid"] else "yes"
    print(f"running: {running if status['running'] else 'no'}")
    return 0


def _hub_admin(args: argparse.Namespace, fn: Callable[[Any], Any]) -> Any:
    """Run `fn(accounts)` on the hub's accounts file (beside a running hub, or without one)."""
    import sqlite3

    from peerdaemon.hub.accounts import Accounts, AccountsError

    try:
        with Accounts.open(_hub_config(args).data_dir) as accounts:
            return fn(accounts)
    except AccountsError as exc:
        raise CliError(str(exc)) from None
    except (OSError, sqlite3.Error) as exc:
        raise CliError(f"cannot open the hub's accounts: {exc}") from None


def cmd_hub_user_add(args: argparse.Namespace) -> int:
    print(_hub_admin(args, lambda a: a.add_user(args.name)))
    return 0


def cmd_hub_user_list(args: argparse.Namespace) -> int:
    users = _hub_admin(args, lambda a: a.users())
    if args.json:
        print(_to_json(users))
    else:
        for user in users:
            print(f"{user['name']}  personal space {user['personal_space']}")
    return 0


def cmd_hub_token_add(args: argparse.Namespace) -> int:
    print(_hub_admin(args, lambda a: a.add_token(args.user)))
    return 0


def cmd_hub_token_revoke(args: argparse.Namespace) -> int:
    token = args.token if args.token_option is None else args.token_option
    if token == "-":  # keeps the token out of the shell history and `ps`
        token = sys.stdin.readline().strip()
    _hub_admin(args, lambda a: a.revoke_token(token))
    return 0


def cmd_hub_token_list(args: argparse.Namespace) -> int:
    tokens = _hub_admin(args, lambda a: a.tokens(args.user))
    if args.json:
        print(_to_json(tokens))
    else:
        for t in tokens:
            print(f"{t['prefix']}...  {t['user']}{'  revoked' if t['revoked'] else ''}")
    return 0


def cmd_hub_space_create(args: argparse.Namespace) -> int:
    _hub_admin(args, lambda a: a.create_space(args.space, args.owner, args.name or ""))
    return 0


def cmd_hub_space_add_member(args: argparse.Namespace) -> int:
    _hub_admin(args, lambda a: a.add_member(args.space, args.user))
    return 0


def cmd_hub_space_remove_member(args: argparse.Namespace) -> int:
    _hub_admin(args, lambda a: a.remove_member(args.space, args.user))
    return 0


def cmd_hub_space_list(args: argparse.Namespace) -> int:
    spaces = _hub_admin(args, lambda a: a.spaces())
    if args.json:
        print(_to_json(spaces))
        return 0
    rows = [("ID", "NAME", "OWNER", "MEMBERS")]
    for sp in spaces:
        rows.append((_cell(sp["id"]), _cell(sp["name"]), _cell(sp["owner"]), _cell(sp["members"])))
    _print_table(rows)
    return 0


def cmd_hub_limits_set(args: argparse.Namespace) -> int:
    from peerdaemon.hub.server import parse_size

    try:
        value = parse_size(args.value)
    except ValueError as exc:
        raise CliError(f"{args.key}: {exc}") from None
    _hub_admin(args, lambda a: a.set_limit(args.key, value, args.user))
    return 0


def _add_hub_commands(commands: Any, command: Callable[..., Any]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", metavar="DIR", help="the hub's data dir")
    common.add_argument("--config", metavar="FILE", help="the hub's TOML config file")
    hub = commands.add_parser("hub", help="the self-hosted hub", description="the hub (server)")
    hubs = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND", required=True)

    def sub(group: Any, name: str, func: Callable[..., int], help: str) -> Any:
        p = group.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    p = sub(hubs, "serve", cmd_hub_serve, "run the hub in the foreground")
    p.add_argument("--listen", metavar="HOST:PORT", type=host_port, help="default 127.0.0.1:8765")
    p.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="... and this private key (PEM)")
    p = sub(hubs, "status", cmd_hub_status, "print the hub's key fingerprint and if it runs")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    group = hubs.add_parser("user", help="hub users").add_subparsers(
        dest="hub_user_command", metavar="USER_COMMAND", required=True
    )
    p = sub(group, "add", cmd_hub_user_add, "add a user (and its personal space); prints a token")
    p.add_argument("name", metavar="NAME")
    p = sub(group, "list", cmd_hub_user_list, "list users")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    group = hubs.add_parser("token", help="access tokens").add_subparsers(
        dest="hub_token_command", metavar="TOKEN_COMMAND", required=True
    )
    p = sub(group, "add", cmd_hub_token_add, "another token for a user; prints it")
    p.add_argument("user", metavar="USER")
    p = sub(group, "revoke", cmd_hub_token_revoke, "revoke a token (whole, or a unique prefix)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("token", metavar="TOKEN", nargs="?", help="- reads it from stdin")
    which.add_argument(
        "--token",
        dest="token_option",
        metavar="TOKEN",
        help="the same, for any value: --token=VALUE (a token of the older form may start with -)",
    )
    p = sub(group, "list", cmd_hub_token_list, "list tokens (their first characters)")
    p.add_argument("user", metavar="USER", nargs="?")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    group = hubs.add_parser("space", help="spaces on the hub").add_subparsers(
        dest="hub_space_command", metavar="SPACE_COMMAND", required=True
    )
    p = sub(group, "create", cmd_hub_space_create, "create a team space")
    p.add_argument("space", metavar="SPACE_ID")
    p.add_argument("--owner", metavar="USER", required=True)
    p.add_argument("--name", metavar="NAME")
    p = sub(group, "add-member", cmd_hub_space_add_member, "let a user reach a space")
    p.add_argument("space", metavar="SPACE_ID")
    p.add_argument("user", metavar="USER")
    p = sub(group, "remove-member", cmd_hub_space_remove_member, "remove a user from a space")
    p.add_argument("space", metavar="SPACE_ID")
    p.add_argument("user", metavar="USER")
    p = sub(group, "list", cmd_hub_space_list, "list spaces, owners and members")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    group = hubs.add_parser("limits", help="limits").add_subparsers(
        dest="hub_limits_command", metavar="LIMITS_COMMAND", required=True
    )
    p = sub(group, "set", cmd_hub_limits_set, "set a limit for the hub or one user")
    p.add_argument("--user", metavar="USER", help="only for this user")
    p.add_argument(
        "key", metavar="KEY", choices=("envs_per_space", "bytes_per_env", "devices_per_user")
    )
    p.add_argument("value", metavar="VALUE", help="an integer (bytes_per_env: also 15MB, 64MiB)")


# --- parser -------------------------------------------------------------------------------------
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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        group: Any, name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    run = command(commands, "run", cmd_run, "run the daemon in the foreground")
    run.add_argument("--data-dir", metavar="DIR", help="where environments are stored")
    run.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS, help="socket to listen on"
    )
    run.add_argument("--name", metavar="NAME", help="this device's name in spaces (kept)")
    run.add_argument(
        "--mirror-dir", metavar="DIR", help="mirror every environment into DIR, one file each"
    )
    run.add_argument(
        "--listen", metavar="HOST:PORT", type=host_port, help="accept LAN peers on this address"
    )
    run.add_argument(
        "--peer",
        metavar="HOST:PORT",
        type=host_port,
        action="append",
        default=[],
        help="a static peer to connect to (repeatable)",
    )
    run.add_argument("--no-mdns", action="store_true", help="do not use mDNS discovery")
    run.add_argument("--mdns-interface", metavar="NAME", help="run mDNS on this interface only")
    run.add_argument(
        "--max-frame", metavar="BYTES", type=int, help="largest socket frame accepted (64 MiB)"
    )

    peers = command(commands, "peers", cmd_peers, "show known devices and their link state")
    peers.add_argument("--json", action="store_true", help="print the peers as JSON")

    status = command(commands, "status", cmd_status, "show the daemon's status")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")

    env = commands.add_parser("env", help="manage environments", description="manage environments")
    envs = env.add_subparsers(dest="env_command", metavar="ENV_COMMAND", required=True)

    p = command(envs, "list", cmd_env_list, "list environments")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    p = command(envs, "import", cmd_env_import, "import a Mockoon environment file; prints its id")
    p.add_argument("file", metavar="FILE", help="environment JSON file, or - for stdin")
    p.add_argument("--new-id", action="store_true", help="give the environment a fresh id")
    p.add_argument("--link", action="store_true", help="keep FILE linked to the environment")

    p = command(envs, "export", cmd_env_export, "export an environment")
    p.add_argument("id", metavar="ID")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("--format", choices=("json", "yjs"), default="json", help="default: json")

    p = command(envs, "get", cmd_env_get, "print an environment, or the value at a JSON Pointer")
    p.add_argument("id", metavar="ID")
    p.add_argument("pointer", metavar="POINTER", nargs="?", help="RFC 6901 JSON Pointer")

    p = command(envs, "put", cmd_env_put, "replace an environment with the content of FILE")
    p.add_argument("id", metavar="ID")
    p.add_argument("file", metavar="FILE", help="environment JSON file, or - for stdin")
    p.add_argument(
        "--force-id",
        action="store_true",
        help="put FILE even if its uuid names another environment (ID keeps its id)",
    )

    p = command(envs, "patch", cmd_env_patch, "apply an RFC 6902 JSON Patch file")
    p.add_argument("id", metavar="ID")
    p.add_argument("file", metavar="FILE", help="JSON Patch file, or - for stdin")

    p = command(envs, "merge", cmd_env_merge, "merge a binary Yjs update file")
    p.add_argument("id", metavar="ID")
    p.add_argument("file", metavar="FILE", help="Yjs update file, or - for stdin")

    p = command(envs, "delete", cmd_env_delete, "delete an environment")
    p.add_argument("id", metavar="ID")

    p = command(envs, "watch", cmd_env_watch, "print one JSON line per change (Ctrl-C to stop)")
    p.add_argument("id", metavar="ID")

    p = command(envs, "link", cmd_env_link, "mirror an environment to FILE, both ways")
    p.add_argument("id", metavar="ID")
    p.add_argument("file", metavar="FILE", help="the file to keep in step (e.g. Mockoon's own)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace FILE even if it is not this environment"
    )

    p = command(envs, "unlink", cmd_env_unlink, "stop mirroring an environment (the file stays)")
    p.add_argument("id", metavar="ID")

    p = command(envs, "links", cmd_env_links, "list linked files and their state")
    p.add_argument("--json", action="store_true", help="print the links as JSON")
    _add_space_commands(commands, envs, command)
    _add_hub_commands(commands, command)
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
        return args.func(args)
    except (ClientError, CliError) as exc:
        _warn(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_broken_pipe()
    except Exception as exc:
        if os.environ.get("PEERDAEMON_DEBUG"):
            traceback.print_exc()
        _warn(f"internal error: {type(exc).__name__}: {exc}")
        return 1
