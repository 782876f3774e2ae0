"""`env`: environments in the daemon, and the files linked to them (docs/mirror.md)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from peerdaemon.api.client import DaemonError
from peerdaemon.api.protocol import UUID_MISMATCH
from peerdaemon.cli.common import (
    PROG,
    CliError,
    Commands,
    call,
    cell,
    connect,
    match_env,
    optional_call,
    print_table,
    read_bytes,
    read_text,
    resolve_env,
    short_path,
    to_json,
    warn,
    write_file,
)
from peerdaemon.cli.presence import editor_label, editors_by_env
from peerdaemon.cli.progress import Progress, format_bytes
from peerdaemon.model.schema import LAST_MIGRATION

ID_HELP = "environment id, a unique id prefix (4+ characters) or its exact name"


def register(commands: Commands) -> None:
    envs = commands.add_group(
        "env",
        help="manage environments",
        description="manage environments",
        dest="env_command",
        metavar="ENV_COMMAND",
        example="peerdaemon env list",
    )
    p = envs.command(
        "list",
        cmd_env_list,
        "list environments: routes, the space each is shared in, the file linked to it",
        example="peerdaemon env list --json",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    p = envs.command(
        "import",
        cmd_env_import,
        "import a Mockoon environment file; prints its id",
        example="peerdaemon env import ~/mockoon/demo.json --link",
    )
    p.add_argument("file", metavar="FILE", help="environment JSON file, or - for stdin")
    p.add_argument("--new-id", action="store_true", help="give the environment a fresh id")
    p.add_argument("--link", action="store_true", help="keep FILE linked to the environment")
    p.add_argument("--json", action="store_true", help="print the result (id, repairs) as JSON")

    p = envs.command(
        "export",
        cmd_env_export,
        "export an environment (JSON, as Mockoon writes it)",
        example="peerdaemon env export Demo -o demo.json",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("--format", choices=("json", "yjs"), default="json", help="default: json")

    p = envs.command(
        "get",
        cmd_env_get,
        "print an environment, or the value at a JSON Pointer (as JSON)",
        example="peerdaemon env get 3f2a /routes/0/endpoint",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument("pointer", metavar="POINTER", nargs="?", help="RFC 6901 JSON Pointer")

    p = envs.command(
        "put",
        cmd_env_put,
        "replace an environment with the content of FILE",
        example="peerdaemon env put Demo demo.json",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument("file", metavar="FILE", help="environment JSON file, or - for stdin")
    p.add_argument(
        "--force-id",
        action="store_true",
        help="put FILE even if its uuid names another environment (ID keeps its id)",
    )

    p = envs.command(
        "patch",
        cmd_env_patch,
        "apply an RFC 6902 JSON Patch file",
        example="peerdaemon env patch Demo fix.json",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument("file", metavar="FILE", help="JSON Patch file, or - for stdin")

    p = envs.command(
        "merge",
        cmd_env_merge,
        "merge a binary Yjs update file",
        example="peerdaemon env merge 3f2a update.yjs",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP + " (an unknown id is created)")
    p.add_argument("file", metavar="FILE", help="Yjs update file, or - for stdin")

    p = envs.command(
        "delete", cmd_env_delete, "delete an environment", example="peerdaemon env delete 3f2a"
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    _register_history(envs)

    p = envs.command(
        "watch",
        cmd_env_watch,
        "print one JSON line per change (Ctrl-C to stop)",
        example="peerdaemon env watch Demo",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)

    p = envs.command(
        "link",
        cmd_env_link,
        "mirror an environment to FILE, both ways",
        example="peerdaemon env link Demo ~/.config/mockoon/storage/demo.json",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument("file", metavar="FILE", help="the file to keep in step (e.g. Mockoon's own)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace FILE even if it is not this environment"
    )

    p = envs.command(
        "unlink",
        cmd_env_unlink,
        "stop mirroring an environment (the file stays)",
        example="peerdaemon env unlink Demo",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)

    p = envs.command(
        "links",
        cmd_env_links,
        "list linked files and their state",
        example="peerdaemon env links --json",
    )
    p.add_argument("--json", action="store_true", help="print the links as JSON")


def _report_repairs(result: Any) -> None:
    if isinstance(result, dict):
        for repair in result.get("repairs") or ():
            warn(f"repaired: {repair}")
        if result.get("newer"):
            _warn_newer()


def _warn_newer() -> None:
    warn(
        "warning: this environment was written by a newer Mockoon than peerdaemon knows "
        f"(lastMigration > {LAST_MIGRATION}); it is kept exactly as it is"
    )


def _flags(env: dict[str, Any]) -> list[str]:
    """`flags` from the daemon plus the boolean facts worth a glance (`newer`: the file was
    written by a newer Mockoon than peerdaemon knows)."""
    flags = [str(f) for f in env.get("flags") or ()]
    for name in ("newer",):
        if env.get(name) is True and name not in flags:
            flags.append(name)
    return flags


def _sharing(spaces: Any) -> dict[str, dict[str, Any]]:
    """env id -> {id, name} of the space it is shared in here (from `space.list`)."""
    out: dict[str, dict[str, Any]] = {}
    for space in spaces if isinstance(spaces, list) else ():
        if not isinstance(space, dict):
            continue
        for env in space.get("environments") or ():
            if isinstance(env, dict) and env.get("present") and not env.get("conflict"):
                out[str(env.get("id"))] = {"id": space.get("id"), "name": space.get("name")}
    return out


def cmd_env_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        envs = [e if isinstance(e, dict) else {"id": e} for e in client.list_envs() or ()]
        shared = _sharing(optional_call(client, "space.list", []))
        links = optional_call(client, "env.links", [])
        editors = editors_by_env(optional_call(client, "presence.list", {}))
    links = links if isinstance(links, list) else []
    linked = {str(link.get("id")): link.get("path") for link in links if isinstance(link, dict)}
    if args.json:  # env.list's entries, plus where each is shared and linked
        for env in envs:
            env.setdefault("shared", shared.get(str(env.get("id"))))
            env.setdefault("linked", linked.get(str(env.get("id"))))
            env.setdefault("editors", editors.get(str(env.get("id")), []))
        print(to_json(envs))
        return 0
    # who edits what (presence): a column only while someone does, so the usual table is
    # unchanged
    editing = any(editors.get(str(env.get("id"))) for env in envs)
    head = ("ID", "NAME", "ROUTES", "SHARED", "LINKED")
    rows = [(*head, "EDITORS", "FLAGS") if editing else (*head, "FLAGS")]
    for env in envs:
        space = shared.get(str(env.get("id")))
        row = (
            cell(env.get("id")),
            cell(env.get("name")),
            cell(env.get("routes")),
            cell(space and (space.get("name") or space.get("id"))),
            short_path(linked.get(str(env.get("id")))),
        )
        if editing:
            row += (cell([editor_label(e) for e in editors.get(str(env.get("id")), [])]),)
        rows.append((*row, cell(_flags(env))))
    print_table(rows)
    return 0


CHUNK = 1 << 20  # read and write a MiB at a time: a large file shows progress as it goes


def _read_input(name: str, progress: Progress) -> str:
    """`read_text`, in chunks so that reading a large FILE (or stdin) shows how far it got."""
    label = "stdin" if name == "-" else name
    try:
        stream = sys.stdin.buffer if name == "-" else open(name, "rb")  # noqa: SIM115
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None
    chunks: list[bytes] = []
    typed = name == "-" and sys.stdin.isatty()  # no line drawn across what the user types
    try:
        total = None if name == "-" else os.fstat(stream.fileno()).st_size
        if not typed:
            progress.phase(f"reading {os.path.basename(label)}", total=total, done=0)
        while chunk := stream.read(CHUNK):
            chunks.append(chunk)
            if not typed:
                progress.update(advance=len(chunk))
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None
    finally:
        if name != "-":
            stream.close()
    data = b"".join(chunks)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CliError(
            f"{label}: not valid UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def cmd_env_import(args: argparse.Namespace) -> int:
    if getattr(args, "link", False) and args.file == "-":
        raise CliError("--link needs a FILE to link, not stdin")
    with Progress() as progress:
        text = _read_input(args.file, progress)
        with connect(args) as client:
            size = format_bytes(len(text.encode("utf-8")))
            progress.phase(f"importing {size}")  # one request: a spinner and the time it takes
            if getattr(args, "link", False):  # import, then keep FILE linked (docs/mirror.md)
                path = os.path.abspath(args.file)
                result = progress.run(
                    lambda: client.call("env.import_link", json=text, new_id=args.new_id, path=path)
                )
            else:
                result = progress.run(lambda: client.import_env(text, new_id=args.new_id))
    _report_repairs(result)
    if args.json:
        print(to_json(result))
    else:
        print(result["id"] if isinstance(result, dict) else result)
    return 0


def _print_text(text: str, progress: Progress) -> None:
    """`print(text)`, in chunks while progress shows, so that `env export ID > big.json` shows
    how far it got (on stderr); the same characters either way. On a terminal the text itself
    scrolls by: the progress line is cleared first, not drawn across it."""
    if not progress.enabled or sys.stdout.isatty():
        progress.close()
        print(text)
        return
    progress.phase("writing to stdout", total=len(text.encode("utf-8")), done=0)
    for start in range(0, len(text), CHUNK):
        chunk = text[start : start + CHUNK]
        sys.stdout.write(chunk)
        progress.update(advance=len(chunk.encode("utf-8")))
    sys.stdout.write("\n")
    sys.stdout.flush()


def _write_binary(data: bytes, progress: Progress) -> None:
    """The binary update on stdout, in chunks while progress shows."""
    sys.stdout.flush()
    progress.phase("writing to stdout", total=len(data), done=0)
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        sys.stdout.buffer.write(view[start : start + CHUNK])
        progress.update(advance=min(CHUNK, len(view) - start))
    sys.stdout.buffer.flush()


def _write_output(path: Path, data: bytes, progress: Progress) -> None:
    """`write_file` replaces FILE whole in one call (atomic, fsynced): its size and a spinner."""
    progress.phase(f"writing {path.name} ({format_bytes(len(data))})")
    progress.run(lambda: write_file(path, data))


def _is_newer(result: Any) -> bool:
    last = result.get("lastMigration") if isinstance(result, dict) else None
    number = isinstance(last, int | float) and not isinstance(last, bool)
    return number and last > LAST_MIGRATION


def cmd_env_export(args: argparse.Namespace) -> int:
    with Progress() as progress:
        with connect(args) as client:
            env_id = resolve_env(client, args.id)
            progress.phase(f"exporting {env_id}")  # one request: a spinner meanwhile
            result = progress.run(lambda: client.export(env_id, format=args.format))
        if args.format == "yjs":
            if not isinstance(result, bytes | bytearray):
                raise CliError("the daemon did not return a binary update")
            data = bytes(result)
            if args.output is None:
                if sys.stdout.isatty():
                    raise CliError(
                        "refusing to write a binary Yjs update to a terminal; use -o FILE"
                    )
                _write_binary(data, progress)
            else:
                _write_output(Path(args.output), data, progress)
            return 0
        newer = _is_newer(result)
        # Mockoon's own layout: JSON.stringify(env, null, 2)
        text = progress.run(lambda: to_json(result))
        if args.output is None:
            _print_text(text, progress)
        else:
            _write_output(Path(args.output), text.encode("utf-8"), progress)
    if newer:
        _warn_newer()
    return 0


def cmd_env_get(args: argparse.Namespace) -> int:
    with connect(args) as client:
        value = client.get(resolve_env(client, args.id), args.pointer)
    print(to_json(value))
    return 0


def cmd_env_put(args: argparse.Namespace) -> int:
    text = read_text(args.file)
    with connect(args) as client:
        env_id = resolve_env(client, args.id)
        try:
            result = client.put(env_id, text, force_id=args.force_id)
        except DaemonError as exc:
            if exc.code != UUID_MISMATCH:
                raise
            label = "stdin" if args.file == "-" else args.file
            raise CliError(
                f"{label} is not environment {env_id} (its uuid is another id): refusing "
                f"to replace {env_id} with it; use --force-id to do it anyway ({exc.code})"
            ) from None
    _report_repairs(result)
    return 0


def cmd_env_patch(args: argparse.Namespace) -> int:
    text = read_text(args.file)
    with connect(args) as client:
        client.patch(resolve_env(client, args.id), text)
    return 0


def cmd_env_merge(args: argparse.Namespace) -> int:
    update = read_bytes(args.file)
    with connect(args) as client:  # an unknown id is created from the update
        client.merge(resolve_env(client, args.id, missing_ok=True), update)
    return 0


def cmd_env_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        client.delete(resolve_env(client, args.id))
    return 0


def cmd_env_watch(args: argparse.Namespace) -> int:
    """One JSON line per change until the environment is deleted or Ctrl-C (exit 0)."""
    try:
        with connect(args) as client:
            wanted = resolve_env(client, args.id)
            for event in client.subscribe_env(wanted):
                if not isinstance(event, dict):
                    continue
                env_id = event.get("id", wanted)
                if event.get("type") == "deleted":
                    print(to_json({"id": env_id, "deleted": True}, indent=None), flush=True)
                    return 0
                if event.get("type") == "change":
                    line = {
                        "id": env_id,
                        "paths": event.get("paths", []),
                        "origin": event.get("origin"),
                    }
                    print(to_json(line, indent=None), flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_env_link(args: argparse.Namespace) -> int:
    path = os.path.abspath(os.path.expanduser(args.file))  # the daemon's cwd is not ours
    with connect(args) as client:
        env_id = resolve_env(client, args.id)
        result = client.call("env.link", id=env_id, path=path, overwrite=args.overwrite)
    if isinstance(result, dict) and result.get("error"):  # linked, but not writable yet
        warn(f"linked, but: {result['error']} (retrying; see `peerdaemon env links`)")
    return 0


def cmd_env_unlink(args: argparse.Namespace) -> int:
    with connect(args) as client:
        # a link can outlive its environment: an unknown ID is asked for as it is
        client.call("env.unlink", id=resolve_env(client, args.id, missing_ok=True))
    return 0


def cmd_env_links(args: argparse.Namespace) -> int:
    links = call(args, "env.links")
    if args.json:
        print(to_json(links))
        return 0
    rows = [("ID", "STATE", "PATH")]
    for link in links or ():
        state = cell(link.get("state")) + (" (auto)" if link.get("auto") else "")
        rows.append((cell(link.get("id")), state, cell(link.get("path"))))
    print_table(rows)
    for link in links or ():
        if link.get("error"):
            warn(f"{link.get('id')}: {link['error']}")
    return 0


# --- history, restore and the trash (docs/history.md) ----------------------------------------
def _register_history(envs: Any) -> None:
    p = envs.command(
        "history",
        cmd_env_history,
        "list an environment's versions: when, who, what changed",
        example="peerdaemon env history Demo",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP + " (or a deleted environment's id)")
    p.add_argument("--json", action="store_true", help="print the versions as JSON")

    p = envs.command(
        "show",
        cmd_env_show,
        "print an environment's JSON, or a version's (--at)",
        example="peerdaemon env show Demo --at 3",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP + " (or a deleted environment's id)")
    p.add_argument("--at", metavar="VERSION", type=int, help="the version to print")

    p = envs.command(
        "restore",
        cmd_env_restore,
        "make an environment what it was at VERSION (new edits every replica converges to)",
        example="peerdaemon env restore Demo 3",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument("version", metavar="VERSION", type=int, help="as `env history` lists it")

    p = envs.command(
        "trash",
        cmd_env_trash,
        "list deleted environments that can be brought back",
        example="peerdaemon env trash",
    )
    p.add_argument("--json", action="store_true", help="print the trash as JSON")

    p = envs.command(
        "untrash",
        cmd_env_untrash,
        "bring a deleted environment back from the trash, as a local environment",
        example="peerdaemon env untrash 3f2a",
    )
    p.add_argument("id", metavar="ID", help="its id, a unique id prefix or its exact name")
    p.add_argument(
        "--new-id",
        action="store_true",
        help="give it a fresh id (when an environment with its id exists again)",
    )


def _when(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _who(devices: Any, me: Any) -> str:
    names = []
    for device in devices if isinstance(devices, list) else ():
        names.append("this device" if device == me else str(device).split("-")[0])
    return ", ".join(names) or "-"


def cmd_env_history(args: argparse.Namespace) -> int:
    with connect(args) as client:
        env_id = resolve_env(client, args.id, missing_ok=True)
        result = client.call("env.history", id=env_id)
        me = (optional_call(client, "status", {}) or {}).get("device")
    versions = result.get("versions") if isinstance(result, dict) else None
    if args.json:
        print(to_json(result))
        return 0
    rows = [("VERSION", "TIME", "REASON", "BY", "CHANGES")]
    for v in versions or ():
        changes = cell(v.get("summary"))
        if v.get("note"):
            changes = f"{changes} ({v['note']})"
        rows.append(
            (
                cell(v.get("version")),
                _when(v.get("time")),
                cell(v.get("reason")),
                _who(v.get("devices"), me),
                changes,
            )
        )
    print_table(rows)
    return 0


def cmd_env_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.at is None:
            value = client.export(resolve_env(client, args.id))
        else:
            env_id = resolve_env(client, args.id, missing_ok=True)
            value = client.call("env.at", id=env_id, version=args.at)
    print(to_json(value))
    return 0


def cmd_env_restore(args: argparse.Namespace) -> int:
    with connect(args) as client:
        env_id = resolve_env(client, args.id)
        result = client.call("env.restore", id=env_id, version=args.version)
    if isinstance(result, dict) and not result.get("changed"):
        warn(f"{env_id} is version {args.version} already: nothing changed")
    return 0


def cmd_env_trash(args: argparse.Namespace) -> int:
    entries = call(args, "env.trash")
    if args.json:
        print(to_json(entries))
        return 0
    rows = [("ID", "NAME", "ROUTES", "DELETED", "EXPIRES", "BY")]
    for e in entries or ():
        rows.append(
            (
                cell(e.get("id")),
                cell(e.get("name")),
                cell(e.get("routes")),
                _when(e.get("deleted")),
                _when(e.get("expires")),
                cell(e.get("origin")),
            )
        )
    print_table(rows)
    return 0


def cmd_env_untrash(args: argparse.Namespace) -> int:
    with connect(args) as client:
        trashed = client.call("env.trash")
        env_id = match_env(trashed if isinstance(trashed, list) else [], args.id, missing_ok=True)
        try:
            result = client.call("env.untrash", id=env_id, new_id=args.new_id)
        except DaemonError as exc:
            if exc.code != "exists":
                raise
            raise CliError(
                f"an environment with id {env_id} exists again; `{PROG} env untrash {env_id} "
                "--new-id` brings the trashed one back beside it, under a new id (exists)"
            ) from None
    print(result["id"] if isinstance(result, dict) else result)
    return 0
