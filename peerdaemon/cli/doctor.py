"""`doctor`: checks what commonly goes wrong and says what to do, one line per check.

Each check ends `ok`, `warn` (works, but something is off or missing for a part of it), `fail`
(broken: the line says what to do) or `skip` (does not apply, or cannot be told). The command
exits 0 unless a check failed. It only reads: nothing is changed, started or repaired.
"""

from __future__ import annotations

import argparse
import email.utils
import errno
import fcntl
import hashlib
import json
import os
import socket
import ssl
import stat
import struct
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from pathlib import Path
from typing import Any

from peerdaemon.api.client import Client, ClientError, DaemonNotRunning
from peerdaemon.cli.common import (
    PROG,
    Commands,
    data_dir_of,
    optional_call,
    socket_path,
    to_json,
)

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
TIMEOUT = 5.0
SKEW_WARN = 30.0  # seconds: tokens, certificates and event times start to disagree
SKEW_FAIL = 300.0  # TLS certificates "not yet valid", hub sessions refused
IFF_UP, IFF_LOOPBACK, IFF_MULTICAST = 0x1, 0x8, 0x1000


def register(commands: Commands) -> None:
    p = commands.command(
        "doctor",
        cmd_doctor,
        "check the socket, the data dir, mDNS, hubs, Node.js and the clock; say what to do",
        example="peerdaemon doctor --json",
    )
    p.add_argument(
        "--data-dir", metavar="DIR", help="the daemon's data dir (default: the running one's)"
    )
    p.add_argument("--json", action="store_true", help="print the checks as JSON")


@dataclass
class Check:
    check: str
    status: str
    message: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.status:<4}  {self.check:<10}  {self.message}{fix}"


@dataclass
class Daemon:
    """What the running daemon told (nothing if none answers)."""

    status: dict[str, Any] | None = None
    config: dict[str, Any] | None = None


def cmd_doctor(args: argparse.Namespace) -> int:
    path = socket_path(args)
    checks: list[Check] = [check_socket(path)]
    daemon = Daemon()
    checks.append(check_daemon(path, daemon))
    data_dir = (
        Path(args.data_dir).expanduser()
        if args.data_dir
        else Path(daemon.status["data_dir"])
        if daemon.status and daemon.status.get("data_dir")
        else data_dir_of(args)
    )
    checks.append(check_lock(data_dir, daemon, path))
    checks.append(check_mdns(daemon))
    checks += check_hubs(daemon)
    checks += check_node(data_dir)
    checks.append(check_clock(daemon))
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        print(to_json({"ok": not failed, "checks": [asdict(c) for c in checks]}))
    else:
        for check in checks:
            print(check.line())
    return 1 if failed else 0


# --- the socket and the daemon ------------------------------------------------------------------
def check_socket(path: Path) -> Check:
    start = f"`{PROG} run` (in the background: `{PROG} service install`)"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Check(
            "socket",
            FAIL,
            f"no socket at {path}",
            f"start the daemon: {start}; or give the socket it uses (--socket, $PEERDAEMON_SOCKET)",
        )
    except OSError as exc:
        return Check("socket", FAIL, f"cannot look at {path}: {exc.strerror or exc}")
    if not stat.S_ISSOCK(st.st_mode):
        return Check(
            "socket", FAIL, f"{path} is not a socket", "remove it or use another --socket PATH"
        )
    problems = []
    if st.st_uid != os.getuid():
        problems.append(f"owned by uid {st.st_uid}, not you ({os.getuid()})")
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o600:
        problems.append(f"mode {mode:04o}, not 0600")
    try:
        dst = os.stat(path.parent)
    except OSError as exc:
        return Check("socket", FAIL, f"cannot look at {path.parent}: {exc.strerror or exc}")
    dmode = stat.S_IMODE(dst.st_mode)
    if dst.st_uid != os.getuid():
        problems.append(f"in {path.parent}, a folder of uid {dst.st_uid} that others may write")
    elif dmode != 0o700:
        problems.append(f"in a folder of mode {dmode:04o}, not 0700")
    if problems:
        return Check(
            "socket",
            WARN,
            f"{path}: {'; '.join(problems)}",
            "use the default location (no --socket), or a folder only you can open (chmod 700)",
        )
    return Check("socket", OK, f"{path}: mode 0600 in a 0700 folder of yours")


def check_daemon(path: Path, daemon: Daemon) -> Check:
    try:
        with Client.connect(path, timeout=TIMEOUT) as client:
            status = client.status()
            daemon.status = status if isinstance(status, dict) else {}
            config = optional_call(client, "config.get", None)
            settings = config.get("settings") if isinstance(config, dict) else None
            daemon.config = (
                {key: row.get("value") for key, row in settings.items() if isinstance(row, dict)}
                if isinstance(settings, dict)
                else None
            )
    except DaemonNotRunning:
        if path.exists():
            return Check(
                "daemon",
                FAIL,
                f"nothing answers on {path} (left by a daemon that stopped?)",
                f"start it again: `{PROG} run` replaces a socket nobody answers on",
            )
        return Check("daemon", FAIL, "not running", f"start it: `{PROG} run`")
    except (ClientError, OSError) as exc:
        return Check("daemon", FAIL, f"{path}: {exc}")
    store = daemon.status.get("store")
    if isinstance(store, dict) and store.get("error"):
        return Check(
            "daemon",
            FAIL,
            f"pid {daemon.status.get('pid')} answers, but cannot store: {store['error']}",
            "free disk space or fix the data dir's permissions; writes are kept until then",
        )
    return Check(
        "daemon",
        OK,
        f"pid {daemon.status.get('pid')} answers (version {daemon.status.get('version')})",
    )


# --- the data dir -------------------------------------------------------------------------------
def _lock_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def check_lock(data_dir: Path, daemon: Daemon, sock: Path) -> Check:
    lock = data_dir / "peerdaemon.lock"  # store/lock.py: LOCK_NAME
    if not data_dir.exists():
        return Check("data dir", SKIP, f"{data_dir} does not exist yet (made at the first start)")
    running = daemon.status or {}
    if running.get("data_dir") and Path(running["data_dir"]) == data_dir:
        holder = _lock_pid(lock)
        if holder not in (None, running.get("pid")):
            return Check(
                "data dir",
                WARN,
                f"{lock} names pid {holder}, but the daemon using {data_dir} is pid "
                f"{running.get('pid')}",
            )
        return Check("data dir", OK, f"{data_dir}: locked by the daemon (pid {running.get('pid')})")
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return Check("data dir", OK, f"{data_dir}: not locked (no daemon has used it yet)")
    except OSError as exc:
        return Check(
            "data dir",
            FAIL,
            f"cannot open {lock}: {exc.strerror or exc}",
            "the daemon will refuse to start: make it a regular file of yours (or remove it)",
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # let go at once: only asking
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return Check("data dir", WARN, f"cannot test {lock}: {exc.strerror or exc}")
        holder = _lock_pid(lock)
        who = f"pid {holder}" if holder is not None else "another process"
        return Check(
            "data dir",
            FAIL,
            f"{data_dir} is locked by {who}, which does not answer on {sock}",
            f"another peerdaemon uses this data dir with another socket: stop it (`kill {holder}`)"
            " or give its --socket"
            if holder is not None
            else "another peerdaemon uses this data dir: stop it or give its --socket",
        )
    finally:
        os.close(fd)  # drops the shared lock, if taken
    if daemon.status:
        return Check(
            "data dir",
            WARN,
            f"{data_dir} is not locked, and the daemon answering uses {running.get('data_dir')}",
            "give --data-dir of the daemon you mean, or its --socket",
        )
    return Check("data dir", OK, f"{data_dir}: not locked (no daemon runs on it)")


# --- mDNS -----------------------------------------------------------------------------------------
def _if_flags(name: str) -> int | None:
    """The interface's flags (SIOCGIFFLAGS), None where they cannot be read. Not from
    /sys/class/net: sysfs shows the network namespace of whoever mounted it, not ours."""
    if sys.platform.startswith("linux"):
        request, layout = 0x8913, "16sH22x"
    elif sys.platform == "darwin":
        request, layout = 0xC0206911, "16sH14x"
    else:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = struct.pack(layout, name.encode()[:15], 0)
            return int(struct.unpack(layout, fcntl.ioctl(s, request, packed))[1])
    except (OSError, UnicodeError, struct.error):
        return None


def _interfaces() -> list[str]:
    try:
        return [name for _index, name in socket.if_nameindex()]
    except OSError:
        return []


def check_mdns(daemon: Daemon) -> Check:
    config = daemon.config or {}
    if config.get("lan.mdns") is False:
        return Check("mdns", SKIP, "mDNS discovery is off (config lan.mdns off)")
    names = _interfaces()
    chosen = config.get("lan.mdns_interface")
    if chosen:
        if chosen not in names:
            return Check(
                "mdns",
                FAIL,
                f"interface {chosen} (config lan.mdns_interface) does not exist; there are: "
                f"{', '.join(names) or 'none'}",
                f'`{PROG} config set lan.mdns_interface IF` with one of them, or "" for all',
            )
        flags = _if_flags(chosen)
        if flags is None:
            return Check("mdns", OK, f"on {chosen} (it exists; its state cannot be read here)")
        if not flags & IFF_UP:
            return Check(
                "mdns",
                FAIL,
                f"interface {chosen} (config lan.mdns_interface) is down",
                f"bring it up, or `{PROG} config set lan.mdns_interface IF` with another",
            )
        if not flags & IFF_MULTICAST:
            return Check(
                "mdns",
                FAIL,
                f"interface {chosen} has no multicast: mDNS cannot work on it",
                f'`{PROG} config set lan.mdns_interface IF` with another, or "" for all',
            )
        return Check("mdns", OK, f"{chosen} (config lan.mdns_interface) is up, with multicast")
    usable = []
    for name in names:
        flags = _if_flags(name)
        if name == "lo" or (flags is not None and (flags & IFF_LOOPBACK or not flags & IFF_UP)):
            continue
        if flags is None or flags & IFF_MULTICAST:
            usable.append(name)
    if not usable:
        return Check(
            "mdns",
            WARN,
            "no network interface besides loopback is up: LAN discovery finds nobody",
            "connect to a network, or name peers: `run --peer HOST:PORT`",
        )
    note = ""
    if os.environ.get("PEERDAEMON_NO_MDNS") == "1":  # the daemon's environment may differ
        note = " (PEERDAEMON_NO_MDNS=1 here: a daemon started from this shell runs no mDNS)"
    return Check("mdns", OK, f"interfaces up for LAN discovery: {', '.join(usable)}{note}")


# --- hubs -----------------------------------------------------------------------------------------
_HUB_FIXES = {
    "unauthorized": f"the hub refused the token: `{PROG} space hub SPACE URL --token TOKEN` again",
    "hub-key-unknown": "the hub's key is not pinned: add --hub-key FINGERPRINT (`hub status`)",
    "hub-key-mismatch": "the hub shows another key than the pinned one: ask its admin",
    "unreachable": "is the hub running, and its address and port open from here?",
    "incompatible-version": "the hub runs another protocol version: upgrade one side",
}


def _hubs(daemon: Daemon) -> list[dict[str, Any]]:
    hubs = (daemon.status or {}).get("hub")
    return [h for h in hubs if isinstance(h, dict)] if isinstance(hubs, list) else []


def check_hubs(daemon: Daemon) -> list[Check]:
    if daemon.status is None:
        return [Check("hub", SKIP, "the daemon does not answer")]
    hubs = _hubs(daemon)
    if not hubs:
        return [Check("hub", SKIP, "no space syncs through a hub")]
    out = []
    for hub in hubs:
        url, state, reason = hub.get("url"), hub.get("state"), hub.get("reason")
        key = hub.get("hub_key")
        if state != "connected":
            detail = f": {hub['detail']}" if hub.get("detail") else ""
            why = f" ({reason}{detail})" if reason else detail
            out.append(
                Check(
                    "hub",
                    FAIL,
                    f"{url}: {state}{why}",
                    _HUB_FIXES.get(str(reason), f"see `{PROG} peers` and `{PROG} status`"),
                )
            )
        elif not key:
            out.append(
                Check(
                    "hub",
                    WARN,
                    f"{url}: connected, but its key is not pinned",
                    "pin it: `space hub SPACE URL --token T --hub-key FINGERPRINT`",
                )
            )
        else:
            refused = [
                s
                for s, v in (hub.get("spaces") or {}).items()
                if v not in ("ok", "registered", "pending")
            ]
            if refused:
                out.append(
                    Check(
                        "hub",
                        WARN,
                        f"{url}: connected, key pinned; not syncing space {', '.join(refused)}",
                        "ask the hub's admin to add you (`hub space add-member`)",
                    )
                )
            else:
                out.append(Check("hub", OK, f"{url}: connected, key {key} pinned"))
    return out


def _http_url(url: str) -> urllib.parse.SplitResult | None:
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    return parts._replace(scheme=scheme) if scheme and parts.hostname else None


def hub_clock(url: str, timeout: float = TIMEOUT) -> tuple[float | None, str]:
    """The hub's clock minus ours (s) from the Date header of `GET /health`, and what was seen."""
    parts = _http_url(url)
    if parts is None:
        return None, f"{url} is not a ws(s):// URL"
    conn: HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False  # only its clock is read: the hub's key is checked
        context.verify_mode = ssl.CERT_NONE  # by the sync link, not by this
        conn = HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
    else:
        conn = HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        before = time.time()
        conn.request("GET", "/health")
        response = conn.getresponse()
        after = time.time()
        date = response.getheader("Date")
        body = response.read(65536)
    except (OSError, HTTPException) as exc:
        return None, f"cannot reach {url}: {exc}"
    finally:
        conn.close()
    theirs = None
    if date:
        try:
            theirs = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            theirs = None
    if theirs is None:
        try:  # a hub may put its time in /health instead
            value = json.loads(body).get("time")
            theirs = float(value) if isinstance(value, int | float) else None
        except (ValueError, AttributeError):
            theirs = None
    if theirs is None:
        return None, f"{url} answers without a Date header: its clock cannot be read"
    return theirs - (before + after) / 2, ""


def check_clock(daemon: Daemon) -> Check:
    hubs = _hubs(daemon)
    if not hubs:
        return Check("clock", SKIP, "no hub to compare with")
    url = str(hubs[0].get("url"))
    skew, why = hub_clock(url)
    if skew is None:
        return Check("clock", SKIP, why)
    ahead = "ahead of" if skew > 0 else "behind"
    text = f"{url} is {abs(skew):.0f} s {ahead} this machine"
    fix = "set the clock right (NTP: `timedatectl set-ntp true`) here or on the hub"
    if abs(skew) > SKEW_FAIL:
        return Check("clock", FAIL, text, fix)
    if abs(skew) > SKEW_WARN:
        return Check("clock", WARN, text, fix)
    return Check("clock", OK, f"within {SKEW_WARN:.0f} s of {url} ({skew:+.0f} s)")


# --- Node.js, for mock serving --------------------------------------------------------------------
def check_node(data_dir: Path) -> list[Check]:
    from peerdaemon.mock.install import (
        ENGINE_VERSION,
        INSTALL_HINT,
        RUNNER_SOURCE,
        RunnerUnavailable,
        find_node,
        runner_dir,
    )

    try:
        node = find_node()
    except RunnerUnavailable as exc:
        return [
            Check("node", WARN, f"{exc} (needed only to serve mocks on this device)"),
            Check("runner", SKIP, "no Node.js"),
        ]
    out = [Check("node", OK, f"Node.js 18+ at {node}")]
    where = runner_dir(data_dir)
    engine = where / "node_modules" / "@mockoon" / "commons-server" / "package.json"
    try:
        version = json.loads(engine.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        version = None
    if version != ENGINE_VERSION:
        out.append(
            Check(
                "runner",
                WARN,
                f"the mock runner is not installed in {where} (needed only to serve mocks)",
                INSTALL_HINT,
            )
        )
        return out
    lock = where / "package-lock.json"
    shipped = RUNNER_SOURCE / "package-lock.json"
    try:
        same = (
            hashlib.sha256(lock.read_bytes()).digest()
            == hashlib.sha256(shipped.read_bytes()).digest()
        )
    except OSError:
        same = os.environ.get("PEERDAEMON_MOCK_RUNNER") is not None  # a packaged runner
    if not same and os.environ.get("PEERDAEMON_MOCK_RUNNER") is None:
        out.append(Check("runner", WARN, f"the mock runner in {where} is outdated", INSTALL_HINT))
    else:
        out.append(Check("runner", OK, f"Mockoon engine {ENGINE_VERSION} in {where}"))
    return out
