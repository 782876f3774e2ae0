"""Private Redis and PostgreSQL servers for the cluster tests and benchmarks (issue 14), each on
a free loopback port in a temporary directory, so that a test can kill -9 them, stop and restart
them. Shared by tests/ (tests/servers.py) and benchmarks/ (bench_cluster.py): lab/ holds what
both use, since benchmarks import nothing from tests/.

`running_redis_cluster` starts a Redis Cluster of three masters the same way (the hub on a
Redis Cluster: tests/test_cluster_redis_cluster.py, `bench_cluster.py --redis-cluster`).

Both run from the Debian packages `.ci/run` installs (`redis-server`, `postgresql`); a test that
needs one is skipped with the reason when the binaries are missing (a benchmark says what it
skips). Servers listen on 127.0.0.1 only and work inside the tests' network namespace
(tests/isolated: only loopback).

PostgreSQL refuses to run as root. As a non-root user it runs as that user; as real root (CI,
this machine) as the `postgres` user the package creates (the data directory chowned to it);
as the root of a user namespace (tests/isolated's `unshare -rn`) in a nested one where it is
uid 1. Each server is started in a process group of its own, so `kill9()` takes its children
with it (PostgreSQL's backends, Redis' forks) as the loss of a machine would, and a restart on
the same data directory does not find the old backends still holding the shared memory.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = [
    "PostgresServer",
    "RedisServer",
    "free_port",
    "running_postgres",
    "running_redis",
    "have_postgres",
    "have_redis",
    "have_redis_cluster",
    "postgres_bin",
    "RedisCluster",
    "RedisClusterNode",
    "running_redis_cluster",
]

HOST = "127.0.0.1"
PG_USER = "peerdaemon"
PG_DB = "postgres"
START_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback port nobody listens on right now (a start that loses the race retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def have_redis() -> bool:
    return shutil.which("redis-server") is not None


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    which = shutil.which("postgres")
    return Path(which).parent if which else None


def have_postgres() -> bool:
    bindir = postgres_bin()
    return bindir is not None and (bindir / "initdb").exists()


_LIVE: set[_Server] = set()


@atexit.register
def _kill_leftovers() -> None:
    """A test process that ends without its fixtures' teardown leaves no server behind."""
    for server in list(_LIVE):
        server.kill9()
        server.release_ipc()


class _Server:
    """One server process: start, kill -9, stop, restart; everything by its pid."""

    name = "server"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / f"{self.name}.log"

    # -- what a subclass says ----------------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict:
        return {}

    def _ready(self) -> bool:
        raise NotImplementedError

    def _wipe(self) -> None:
        raise NotImplementedError

    # -- life --------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start on a new free port (or the same port on a restart) and wait until it serves."""
        if self.running:
            return
        last = ""
        for attempt in range(3):
            if not self.port or attempt:
                self.port = free_port()
            log = open(self.log_path, "ab")  # the child keeps its own copy
            try:
                self.proc = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                    **self._popen_kwargs(),
                )
            finally:
                log.close()
            if self._wait_ready():
                _LIVE.add(self)
                return
            last = self._log_tail()
            self._killpg(signal.SIGKILL)
            if "in use" not in last and "Address already" not in last:
                break
        raise RuntimeError(f"{self.name} did not start on {HOST}:{self.port}:\n{last}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with suppress(OSError):
                if self._ready():
                    return True
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _killpg(self, sig: int) -> None:
        if self.proc is None:
            return
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait()
            self._wait_group_gone()

    def _wait_group_gone(self, timeout: float = 10.0) -> None:
        """The server's children (its group) are gone too: a restart must not meet them."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(0.01)

    def kill9(self) -> None:
        """`kill -9` of the server and its children, at once: nothing gets to shut down."""
        self._killpg(signal.SIGKILL)
        _LIVE.discard(self)

    def pause(self) -> None:
        """SIGSTOP to the server and every process under it (PostgreSQL's backends each lead
        a session of their own, out of the group's reach): connections stay open and nothing
        answers, as with a server that hangs or a network that silently drops its packets."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_tree(signal.SIGCONT)

    def _signal_tree(self, sig: int) -> None:
        if self.proc is None:
            return
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        todo = [self.proc.pid]  # the parent first: it forks nothing more once stopped
        while todo:
            pid = todo.pop(0)
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            todo += children.get(pid, [])

    def stop(self, timeout: float = 20.0) -> None:
        """A clean shutdown (SIGTERM for Redis, SIGINT, PostgreSQL's fast shutdown); kill -9
        past `timeout`."""
        if not self.running:
            return
        assert self.proc is not None
        self._killpg(self._stop_signal)
        self._signal_tree(signal.SIGCONT)  # a paused server takes its stop signal once resumed
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._killpg(signal.SIGKILL)
        else:
            self._wait_group_gone()
        _LIVE.discard(self)

    _stop_signal = signal.SIGTERM

    def restart(self, *, kill: bool = True, empty: bool = False) -> None:
        """Stop (kill -9 by default) and start again on the same port; `empty`: without its data."""
        if kill:
            self.kill9()
        else:
            self.stop()
        if empty:
            self._wipe()
        self.start()

    def release_ipc(self) -> None:
        """Free what the killed server leaves outside its directory (see PostgreSQL's)."""

    def close(self) -> None:
        """Kill the server (by its group) and remove its directory."""
        self.kill9()
        self.release_ipc()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer(_Server):
    """A redis-server on 127.0.0.1:PORT with its data (an append-only file) in its directory.

    `appendfsync everysec` writes each command to the file before its reply leaves (Redis'
    beforeSleep), so a kill -9 keeps every acknowledged write; `restart(empty=True)` starts it
    without its data, as a Redis without persistence (or a new machine) would.
    """

    name = "redis"

    def __init__(self, root: Path, *, persist: bool = True) -> None:
        super().__init__(root)
        self.persist = persist
        self.data = self.root / "data"
        self.data.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            "redis-server",
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--dir",
            str(self.data),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persist else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            "",
        ]

    def _ready(self) -> bool:
        with socket.create_connection((HOST, self.port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def _wipe(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir()

    def command(self, *args: str | bytes | int) -> bytes:
        """One command by hand (tests): the raw RESP reply."""
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        out = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection((HOST, self.port), timeout=5.0) as s:
            s.sendall(out)
            return s.recv(65536)


_TEMPLATE: dict[str, Path] = {}
"""One initdb per test process (about 2 s), copied for each server (a few ms)."""


def _pg_run_as() -> tuple[dict, list[str], int | None]:
    """How to run initdb and postgres, which refuse root: Popen arguments, a command prefix,
    and the uid that must own the data directory (None: ours)."""
    if os.geteuid() != 0:
        return {}, [], None
    with open("/proc/self/uid_map", encoding="ascii") as f:
        real_root = f.read().split() == ["0", "0", "4294967295"]
    if real_root:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pw = pwd.getpwnam("nobody")
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}, [], pw.pw_uid
    # the root of a user namespace (tests/isolated as a non-root user): one level down, uid 1
    return {}, ["unshare", "--user", "--map-user=1", "--map-group=1", "--"], None


def _chown_tree(path: Path, uid: int | None) -> None:
    if uid is None:
        return
    gid = pwd.getpwuid(uid).pw_gid
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _pg_template() -> Path:
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    key = str(bindir)
    if key in _TEMPLATE and _TEMPLATE[key].exists():
        return _TEMPLATE[key]
    kwargs, prefix, uid = _pg_run_as()
    root = Path(tempfile.mkdtemp(prefix="peerdaemon-pgtemplate-"))
    _chown_tree(root, uid)
    data = root / "data"
    subprocess.run(
        [
            *prefix,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            PG_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kwargs,
    )
    _TEMPLATE[key] = data
    atexit.register(shutil.rmtree, root, True)
    return data


class PostgresServer(_Server):
    """A PostgreSQL server on 127.0.0.1:PORT, its cluster in its directory (user `peerdaemon`,
    trust auth on loopback, database `postgres`). `fsync=False` speeds up tests that only kill
    the process (the kernel keeps its writes); keep it on to measure a commit."""

    name = "postgres"
    _stop_signal = signal.SIGINT  # fast shutdown

    def __init__(self, root: Path | None = None, *, fsync: bool = True) -> None:
        # its own directory under /tmp: pytest's tmp_path is not reachable by the `postgres` user
        super().__init__(root or Path(tempfile.mkdtemp(prefix="peerdaemon-pg-")))
        self.fsync = fsync
        self.bindir = postgres_bin()
        self.data = self.root / "data"
        self._kwargs, self._prefix, self._uid = _pg_run_as()
        self._init_data()

    def _init_data(self) -> None:
        template = _pg_template()
        shutil.copytree(template, self.data, symlinks=True)
        os.chmod(self.data, 0o700)
        _chown_tree(self.root, self._uid)

    @property
    def dsn(self) -> str:
        return f"host={HOST} port={self.port} user={PG_USER} dbname={PG_DB}"

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@{HOST}:{self.port}/{PG_DB}"

    def _command(self) -> list[str]:
        assert self.bindir is not None
        return [
            *self._prefix,
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={HOST}",
            "-c",
            f"unix_socket_directories={self.root}",
            "-c",
            f"fsync={'on' if self.fsync else 'off'}",
            "-c",
            "max_connections=50",
            "-c",
            "shared_buffers=16MB",
            "-c",  # dynamic shared memory as files in the data directory: removed with it,
            "dynamic_shared_memory_type=mmap",  # not left in /dev/shm by a killed server
        ]

    def _popen_kwargs(self) -> dict:
        return dict(self._kwargs)

    def _ready(self) -> bool:
        assert self.bindir is not None
        done = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "-q",
                "-h",
                HOST,
                "-p",
                str(self.port),
                "-U",
                PG_USER,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return done.returncode == 0

    def _wipe(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)
        self._init_data()

    def release_ipc(self) -> None:
        """The System V segment a killed postmaster leaves behind (its interlock: a restart on
        the same data removes it, a deleted directory never does, and a machine allows 4,096).
        Only once the server is gone for good: a restart needs it to find stray backends."""
        release_sysv_segment(self.data / "postmaster.pid")


def sysv_segment(pid_file: Path) -> int | None:
    """The System V shared memory id a PostgreSQL `postmaster.pid` names (its 7th line: key and
    id), or None."""
    try:
        lines = pid_file.read_text().splitlines()
        shmid = int(lines[6].split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return shmid if shmid > 0 else None


def release_sysv_segment(pid_file: Path) -> None:
    """Mark the segment of a dead PostgreSQL for removal (it goes once nothing is attached)."""
    shmid = sysv_segment(pid_file)
    if shmid is None:
        return
    _libc().shmctl(shmid, IPC_RMID, None)  # already gone: EINVAL, nothing to do


def sysv_segment_exists(shmid: int) -> bool:
    buf = ctypes.create_string_buffer(512)  # struct shmid_ds (its size varies; 512 covers it)
    return _libc().shmctl(shmid, IPC_STAT, buf) == 0


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


IPC_RMID = 0
IPC_STAT = 2


@contextmanager
def running_redis(root: Path, **kwargs: bool) -> Iterator[RedisServer]:
    server = RedisServer(root, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextmanager
def running_postgres(root: Path | None = None, **kwargs: bool) -> Iterator[PostgresServer]:
    server = PostgresServer(root, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.close()


class RedisClusterNode(RedisServer):
    """One master of a private Redis Cluster: `cluster-enabled yes`, its cluster bus on a free
    port of its own (not PORT+10000, which may be taken or past 65535), and its node table
    (`nodes.conf`) beside its data, so `restart(empty=True)` brings the node back as the
    same member owning the same slots but without a key, as a master without persistence
    restarting would."""

    name = "redis-node"

    def __init__(self, root: Path, **kwargs: bool) -> None:
        super().__init__(root, **kwargs)
        self.bus_port = 0

    def _command(self) -> list[str]:
        if not self.bus_port:
            self.bus_port = free_port()
        return [
            *super()._command(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.root / "nodes.conf"),
            "--cluster-port",
            str(self.bus_port),
            "--cluster-node-timeout",
            "5000",
            # the other masters go on serving their slots while one is down
            "--cluster-require-full-coverage",
            "no",
        ]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


class RedisCluster:
    """`n` Redis Cluster masters (no replicas) on loopback, the slots split between them by
    `redis-cli --cluster create`. `url` is what the hub takes (`redis+cluster://` one of them:
    the client learns the others from it)."""

    def __init__(self, root: Path, n: int = 3, **kwargs: bool) -> None:
        self.root = Path(root)
        self.nodes = [RedisClusterNode(self.root / f"node{i}", **kwargs) for i in range(n)]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.nodes[0].port}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        done = subprocess.run(
            ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out}")
        self.wait_ok()

    def info(self, node: RedisClusterNode | None = None) -> dict[str, str]:
        """`CLUSTER INFO` of `node` (the first by default) as a dict."""
        raw = (node or self.nodes[0]).command("CLUSTER", "INFO")
        body = raw.split(b"\r\n", 1)[-1].decode(errors="replace")
        return dict(line.split(":", 1) for line in body.splitlines() if ":" in line)

    def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Until every node says `cluster_state:ok` and knows all the others."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(OSError):
                infos = [self.info(node) for node in self.nodes]
                if all(
                    i.get("cluster_state") == "ok"
                    and i.get("cluster_known_nodes") == str(len(self.nodes))
                    and i.get("cluster_slots_ok") == "16384"
                    for i in infos
                ):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis cluster not ok after {timeout} s: {self.info()}")

    def node_of(self, key: str | bytes) -> RedisClusterNode:
        """The master serving `key`'s slot."""
        raw = self.nodes[0].command("CLUSTER", "KEYSLOT", key)
        return self._owner(int(raw.strip().lstrip(b":")))

    def _owner(self, slot: int) -> RedisClusterNode:
        raw = subprocess.run(
            ["redis-cli", "-h", HOST, "-p", str(self.nodes[0].port), "CLUSTER", "NODES"],
            capture_output=True,
            check=True,
        ).stdout.decode()
        for line in raw.splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def kill9(self) -> None:
        for node in self.nodes:
            node.kill9()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.root, ignore_errors=True)


def have_redis_cluster() -> bool:
    return have_redis() and shutil.which("redis-cli") is not None


@contextmanager
def running_redis_cluster(root: Path, n: int = 3, **kwargs: bool) -> Iterator[RedisCluster]:
    cluster = RedisCluster(root, n, **kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
