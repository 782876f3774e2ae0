"""`service`: run peerdaemon as a service, with the systemd units and the launchd agent of
contrib/ (contrib/README.md).

`service install` writes the unit for this machine with the path of the running `peerdaemon` in
place of the shipped `/usr/bin/peerdaemon`, then has the service manager start it (`systemctl
[--user] daemon-reload`, `enable`, `restart`; `launchctl bootstrap`); `uninstall` stops,
disables and removes it; `status` asks the service manager and prints one line (exit 0 when the
service runs). `--root DIR` writes under DIR, as DESTDIR (packagers, tests), and runs nothing.

The templates are package data (`service_units/`), byte for byte the files of contrib/systemd and
contrib/launchd (tests/test_service_units.py checks it), so an installed package has them too.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from peerdaemon.cli.common import CliError, Commands, one_line, warn
from peerdaemon.core.files import replace_file

UNITS = Path(__file__).parent / "service_units"
"""The templates: copies of contrib/systemd/* and contrib/launchd/*."""
SHIPPED_EXE = "/usr/bin/peerdaemon"
"""The executable the shipped files name; `install` puts the running one's path in its place."""
PLIST_HOME = "/Users/YOU"
"""The home directory the shipped plist names (launchd expands no `~`)."""
LABEL = "com.peerdaemon"
SYSTEM_UNITS = Path("/etc/systemd/system")
HUB_CONFIG = Path("/etc/peerdaemon/hub.toml")
HUB_SYSUSERS = Path("/etc/sysusers.d/peerdaemon-hub.conf")
HUB_USER = "peerdaemon-hub"
HUB_DATA = Path("/var/lib/peerdaemon-hub")
SYSTEM_SOCKET = "/run/peerdaemon-{user}/peerdaemon.sock"
"""Where `peerdaemon@USER` listens (its Environment=PEERDAEMON_SOCKET, %t = /run)."""
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_HIDDEN_BY_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))


def register(commands: Commands) -> None:
    services = commands.add_group(
        "service",
        help="run peerdaemon as a service (systemd, launchd)",
        description="run the daemon or the hub as a service: systemd units on Linux, a "
        "LaunchAgent on macOS (the files are in contrib/)",
        dest="service_command",
        metavar="SERVICE_COMMAND",
    )
    p = services.command(
        "install",
        cmd_install,
        "write the service's unit with this peerdaemon's path, enable and start it",
    )
    _add_which(p)
    p.add_argument(
        "--root",
        metavar="DIR",
        help="write the files under DIR (as DESTDIR) and run no service manager",
    )
    p.add_argument(
        "--no-enable",
        action="store_true",
        help="only write the files (and reload the service manager)",
    )
    p = services.command("uninstall", cmd_uninstall, "stop, disable and remove the service")
    _add_which(p)
    p.add_argument("--root", metavar="DIR", help="remove the files under DIR, run nothing")
    p = services.command("status", cmd_status, "is the service installed, enabled, running")
    _add_which(p)


def _add_which(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--system",
        action="store_true",
        help="the system unit peerdaemon@USER (runs at boot as USER; needs root)",
    )
    which.add_argument(
        "--hub",
        action="store_true",
        help="the hub's system unit peerdaemon-hub (needs root)",
    )
    parser.add_argument(
        "--user-name",
        metavar="NAME",
        help="with --system: the user the daemon runs as (default: $SUDO_USER, else you)",
    )


# --- what goes where ------------------------------------------------------------------------------
@dataclass(frozen=True)
class File:
    template: str
    """Its name in `service_units/` (and contrib/)."""
    path: Path
    """Where it is installed (before `--root`)."""
    overwrite: bool = True
    """False for a config file: an existing one is kept."""
    remove: bool = True
    """False: `uninstall` leaves it (the hub's config, its system user's definition)."""


@dataclass(frozen=True)
class Service:
    manager: str
    """`systemd` or `launchd`."""
    scope: str
    """`user` (yours: a systemd user unit, a LaunchAgent), `system` (peerdaemon@USER), `hub`."""
    unit: str
    """Its name for the service manager: peerdaemon.service, peerdaemon@alice.service,
    peerdaemon-hub.service, com.peerdaemon."""
    files: tuple[File, ...]
    user: str | None = None
    """`system`: the user the daemon runs as."""

    @property
    def systemctl(self) -> list[str]:
        return ["systemctl", "--user"] if self.scope == "user" else ["systemctl"]

    @property
    def journal(self) -> str:
        user = "--user " if self.scope == "user" else ""
        return f"journalctl {user}-u {self.unit.removesuffix('.service')}"


def plan(
    *,
    platform: str,
    scope: str,
    home: Path,
    config_home: Path | None = None,
    user: str | None = None,
) -> Service:
    """The service of `scope` on `platform` (`sys.platform`) and its files."""
    if platform == "darwin":
        if scope != "user":
            raise CliError(
                f"--{scope} is for Linux with systemd; on macOS peerdaemon runs as your "
                "LaunchAgent (peerdaemon service install)"
            )
        plist = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        return Service("launchd", "user", LABEL, (File(f"{LABEL}.plist", plist),))
    if not platform.startswith("linux"):
        raise CliError(
            f"peerdaemon service supports Linux (systemd) and macOS (launchd), not {platform}; "
            "the unit files are in contrib/"
        )
    if scope == "user":
        base = config_home if config_home is not None else home / ".config"
        path = base / "systemd" / "user" / "peerdaemon.service"
        return Service("systemd", "user", "peerdaemon.service", (File("peerdaemon.service", path),))
    if scope == "system":
        assert user is not None
        path = SYSTEM_UNITS / "peerdaemon@.service"
        return Service(
            "systemd", "system", f"peerdaemon@{user}.service", (File(path.name, path),), user=user
        )
    return Service(
        "systemd",
        "hub",
        "peerdaemon-hub.service",
        (
            File("peerdaemon-hub.service", SYSTEM_UNITS / "peerdaemon-hub.service"),
            File("peerdaemon-hub.sysusers", HUB_SYSUSERS, remove=False),
            File("hub.toml", HUB_CONFIG, overwrite=False, remove=False),
        ),
    )


def render(template: str, text: str, exe: str, home: Path) -> str:
    """A shipped file with the executable (and, in the plist, the home directory) filled in."""
    if template.endswith(".plist"):
        old_exe, new_exe = f"<string>{SHIPPED_EXE}</string>", f"<string>{xml_escape(exe)}</string>"
        if old_exe not in text or f"<string>{PLIST_HOME}/" not in text:
            raise CliError(f"{template}: the shipped file does not name {SHIPPED_EXE}")
        text = text.replace(old_exe, new_exe)
        return text.replace(f"<string>{PLIST_HOME}/", f"<string>{xml_escape(str(home))}/")
    if template.endswith(".service"):
        old = f"\nExecStart={SHIPPED_EXE} "
        if old not in text:
            raise CliError(f"{template}: the shipped unit does not start {SHIPPED_EXE}")
        return text.replace(old, f"\nExecStart={exec_word(exe)} ")
    return text


def exec_word(path: str) -> str:
    """`path` as the first word of a systemd ExecStart=: specifiers (`%`) and variables (`$`)
    escaped, and quoted when it holds a space, a quote or a backslash."""
    if "\n" in path or "\r" in path:
        raise CliError(f"cannot name {path!r} in a unit: it holds a line break")
    word = path.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\;]", word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def executable() -> str:
    """The running `peerdaemon`: `sys.argv[0]` when that is it, else the one beside the running
    Python (`python -m peerdaemon` in a venv), else the one on PATH."""
    arg0 = sys.argv[0] if sys.argv else ""
    if Path(arg0).name == "peerdaemon" and os.sep in arg0 and os.access(arg0, os.X_OK):
        return os.path.abspath(arg0)
    beside = Path(sys.executable).parent / "peerdaemon"  # `python -m peerdaemon` in a venv
    if os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("peerdaemon")
    if found:
        return os.path.abspath(found)
    raise CliError(
        "cannot find the peerdaemon executable: run this command as `peerdaemon` (installed by "
        "pip, on PATH or by its path)"
    )


def _service(args: argparse.Namespace) -> Service:
    scope = "system" if args.system else "hub" if args.hub else "user"
    if args.user_name is not None and scope != "system":
        raise CliError("--user-name goes with --system")
    user = _instance_user(args) if scope == "system" else None
    config = os.environ.get("XDG_CONFIG_HOME")
    return plan(
        platform=sys.platform,
        scope=scope,
        home=Path.home(),
        config_home=Path(config) if config and os.path.isabs(config) else None,
        user=user,
    )


def _instance_user(args: argparse.Namespace) -> str:
    name = args.user_name
    if name is None:
        name = os.environ.get("SUDO_USER") or getpass.getuser()
        if name == "root":
            raise CliError("give --user-name NAME: the user the daemon runs as (not root)")
    if not _USER_NAME.fullmatch(name):
        raise CliError(f"--user-name {name!r}: not a user name a unit can carry")
    if getattr(args, "root", None) is None and sys.platform != "darwin":
        import pwd

        try:
            pwd.getpwnam(name)
        except KeyError:
            raise CliError(f"no such user: {name}") from None
    return name


def _under(root: Path | None, path: Path) -> Path:
    return root / path.relative_to(path.anchor) if root is not None else path


def _root(args: argparse.Namespace) -> Path | None:
    return Path(args.root).expanduser().absolute() if args.root else None


# --- commands -------------------------------------------------------------------------------------
def cmd_install(args: argparse.Namespace) -> int:
    service = _service(args)
    root = _root(args)
    exe = executable()
    if root is None:
        if service.scope != "user" and os.geteuid() != 0:
            raise CliError(
                f"installing {service.unit} needs root: sudo {exe} service install "
                + ("--hub" if service.scope == "hub" else f"--system --user-name {service.user}")
            )
        if service.scope == "user" and service.manager == "systemd" and os.environ.get("SUDO_USER"):
            raise CliError(
                "the user unit is yours: run `peerdaemon service install` without sudo "
                f"(or `sudo {exe} service install --system` for a unit that runs at boot)"
            )
        if service.scope == "hub":
            _check_outside_home(exe)
        if not args.no_enable:
            _need(service.systemctl[0] if service.manager == "systemd" else "launchctl")
    for file in service.files:
        dest = _under(root, file.path)
        if not file.overwrite and dest.exists():
            print(f"kept {dest}")
            continue
        text = render(file.template, (UNITS / file.template).read_text("utf-8"), exe, Path.home())
        _write(dest, text)
        print(f"wrote {dest}")
    if root is not None:
        return 0
    if service.manager == "launchd":
        _launchd_install(service, enable=not args.no_enable)
    else:
        _systemd_install(service, enable=not args.no_enable)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    service = _service(args)
    root = _root(args)
    if root is None:
        if service.scope != "user" and os.geteuid() != 0:
            raise CliError(f"removing {service.unit} needs root: run it with sudo")
        if service.manager == "launchd":
            _launchd_stop(service)
        else:
            _systemd_stop(service)
    kept: list[str] = []
    for file in service.files:
        dest = _under(root, file.path)
        if not file.remove:
            if dest.exists():
                kept.append(str(dest))
            continue
        others = _other_instances(service, root)
        if others:
            print(f"kept {dest}: {', '.join(others)} still use it")
            continue
        try:
            dest.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CliError(f"cannot remove {dest}: {exc.strerror or exc}") from None
        print(f"removed {dest}")
    if service.scope == "hub":
        kept.append(f"the hub's data ({_under(root, HUB_DATA)}, user {HUB_USER})")
        print(f"kept {', '.join(kept)}")
    if root is None and service.manager == "systemd":
        _run([*service.systemctl, "daemon-reload"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    service = _service(args)
    if service.manager == "launchd":
        line, running = _launchd_status(service)
    else:
        line, running = _systemd_status(service)
    print(line)
    return 0 if running else 1


# --- files ----------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        replace_file(path, text.encode("utf-8"), 0o644)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def _check_outside_home(exe: str) -> None:
    """The hub's unit hides home directories (ProtectHome=true): it could not start a
    peerdaemon installed in one."""
    import peerdaemon

    for path in (Path(exe), Path(peerdaemon.__file__).parent):
        if any(path.is_relative_to(hidden) for hidden in _HIDDEN_BY_PROTECT_HOME):
            raise CliError(
                f"the hub's unit cannot run a peerdaemon installed in a home directory ({path}: "
                "ProtectHome=true); install it elsewhere, e.g. python3 -m venv /opt/peerdaemon && "
                "/opt/peerdaemon/bin/pip install peerdaemon, and run that one's service install"
            )


def _other_instances(service: Service, root: Path | None) -> list[str]:
    """`peerdaemon@.service` is every user's: the other enabled instances that keep it."""
    if service.scope != "system":
        return []
    wants = _under(root, SYSTEM_UNITS)
    return sorted(
        {
            link.name
            for link in wants.glob("*.wants/peerdaemon@*.service")
            if link.name != service.unit
        }
    )


# --- running the service manager ------------------------------------------------------------------
_MISSING = {
    "systemctl": "this machine does not run systemd (the units are in contrib/systemd; "
    "--root DIR writes them anywhere)",
    "systemd-sysusers": "create the user yourself: useradd --system --home-dir "
    f"{HUB_DATA} --shell /usr/sbin/nologin {HUB_USER}",
    "launchctl": "this is not macOS (the LaunchAgent is in contrib/launchd)",
}


def _need(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise CliError(f"{program} not found: {_MISSING.get(program, 'is it installed?')}")
    return found


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    _need(cmd[0])
    shown = " ".join(arg for arg in cmd if not arg.startswith("--property="))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CliError(f"{shown}: {exc}") from None
    if check and result.returncode != 0:
        raise CliError(f"{shown} failed: {_last_line(result)}")
    return result


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return one_line(lines[-1]) if lines else f"exit status {result.returncode}"


def _systemd_install(service: Service, *, enable: bool) -> None:
    if service.scope == "hub":
        sysusers = next(f.path for f in service.files if f.template.endswith(".sysusers"))
        _run(["systemd-sysusers", str(sysusers)])
        _make_hub_data_dir()
    if not enable:
        if shutil.which("systemctl"):
            reload = _run([*service.systemctl, "daemon-reload"], check=False)
            if reload.returncode != 0:
                warn(f"systemctl daemon-reload failed: {_last_line(reload)}")
        print(f"not enabled: {' '.join(service.systemctl)} enable --now {service.unit}")
        return
    _run([*service.systemctl, "daemon-reload"])
    _run([*service.systemctl, "enable", service.unit])
    _run([*service.systemctl, "restart", service.unit])  # a reinstall runs the new ExecStart
    print(f"{service.unit}: enabled and started; logs: {service.journal}")
    if service.scope == "user":
        print(f"to keep it running when you are logged out: loginctl enable-linger {_me()}")
        _node_hint("systemctl --user edit peerdaemon")
    elif service.scope == "system":
        print(
            "its socket: export PEERDAEMON_SOCKET="
            f"{SYSTEM_SOCKET.format(user=service.user)} (or --socket) for peerdaemon commands"
        )
        _node_hint(f"systemctl edit {service.unit}")
    else:
        print(
            f"admin: sudo -u {HUB_USER} peerdaemon hub user add NAME --config {HUB_CONFIG}; "
            f"Cloud Mock: sudo -u {HUB_USER} peerdaemon mock install --data-dir {HUB_DATA}"
        )


def _make_hub_data_dir() -> None:
    """The hub's StateDirectory, before its first start: the admin commands (run as its user)
    may come first, and only root can create a folder in /var/lib."""
    import pwd

    if HUB_DATA.exists():
        return
    try:
        entry = pwd.getpwnam(HUB_USER)
        HUB_DATA.mkdir(mode=0o700, parents=True)
        os.chown(HUB_DATA, entry.pw_uid, entry.pw_gid)
    except (KeyError, OSError) as exc:
        raise CliError(f"cannot create {HUB_DATA} for {HUB_USER}: {exc}") from None


def _me() -> str:
    return os.environ.get("USER") or getpass.getuser()


def _node_hint(edit: str) -> None:
    """Mock serving starts `node` from the service's PATH, which has no nvm or ~/bin."""
    node = shutil.which("node")
    if node is None:
        return
    if Path(node).parent in (Path("/usr/bin"), Path("/usr/local/bin"), Path("/bin")):
        return
    print(
        f"note: the service may not find {node} on its PATH; to serve mocks with it, `{edit}` "
        f"and add [Service] Environment=PEERDAEMON_NODE={node}"
    )


def _systemd_show(service: Service) -> dict[str, str]:
    props = "LoadState,ActiveState,SubState,UnitFileState,MainPID,FragmentPath,Result"
    result = _run([*service.systemctl, "show", f"--property={props}", service.unit])
    shown: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            shown[key] = value
    return shown


def _systemd_stop(service: Service) -> None:
    if _systemd_show(service).get("LoadState") == "not-found":
        return
    _run([*service.systemctl, "disable", "--now", service.unit])
    print(f"{service.unit}: stopped and disabled")


def _systemd_status(service: Service) -> tuple[str, bool]:
    shown = _systemd_show(service)
    if shown.get("LoadState", "not-found") == "not-found":
        flag = {"user": "", "system": f" --system --user-name {service.user}", "hub": " --hub"}
        return (
            f"{service.unit}: not installed (peerdaemon service install{flag[service.scope]})",
            False,
        )
    active = shown.get("ActiveState") or "unknown"
    detail = [shown["SubState"]] if shown.get("SubState") else []
    if shown.get("MainPID", "0") not in ("", "0"):
        detail.append(f"pid {shown['MainPID']}")
    if active == "failed" and shown.get("Result") not in (None, "", "success"):
        detail.append(shown["Result"])
    state = f"{active} ({', '.join(detail)})" if detail else active
    enabled = shown.get("UnitFileState") or "unknown"
    where = f", {shown['FragmentPath']}" if shown.get("FragmentPath") else ""
    return f"{service.unit}: {state}, {enabled}{where}", active == "active"


def _domain() -> str:
    return f"gui/{os.getuid()}"


def _launchd_install(service: Service, *, enable: bool) -> None:
    plist = service.files[0].path
    (Path.home() / "Library" / "Logs").mkdir(parents=True, exist_ok=True)
    if not enable:
        print(f"not loaded: launchctl bootstrap {_domain()} {plist}")
        return
    _run(["launchctl", "bootout", f"{_domain()}/{service.unit}"], check=False)  # a reinstall
    _run(["launchctl", "enable", f"{_domain()}/{service.unit}"])
    _run(["launchctl", "bootstrap", _domain(), str(plist)])
    print(f"{service.unit}: loaded and started; logs: ~/Library/Logs/peerdaemon.log")


def _launchd_stop(service: Service) -> None:
    loaded = _run(["launchctl", "print", f"{_domain()}/{service.unit}"], check=False)
    if loaded.returncode != 0:
        return
    _run(["launchctl", "bootout", f"{_domain()}/{service.unit}"])
    print(f"{service.unit}: stopped and unloaded")


def _launchd_status(service: Service) -> tuple[str, bool]:
    plist = service.files[0].path
    result = _run(["launchctl", "print", f"{_domain()}/{service.unit}"], check=False)
    if result.returncode != 0:
        if plist.exists():
            return f"{service.unit}: not loaded (launchctl bootstrap {_domain()} {plist})", False
        return f"{service.unit}: not installed (peerdaemon service install)", False
    fields: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep and key not in fields:
            fields[key] = value.strip()
    state = fields.get("state", "unknown")
    detail = f"pid {fields['pid']}" if "pid" in fields else ""
    if state != "running" and "last exit code" in fields:
        detail = f"last exit code {fields['last exit code']}"
    shown = f"{state} ({detail})" if detail else state
    return f"{service.unit}: {shown}, {plist}", state == "running"
