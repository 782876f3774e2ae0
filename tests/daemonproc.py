"""Real peerdaemon processes for tests: start, wait until the socket answers, stop, kill -9.

    def test_x(daemons):
        d = daemons.new()                  # a fresh data dir + socket under a short temp dir
        d.start()                          # `python -m peerdaemon run ...`; waits for `status`
        with d.client() as c: ...
        d.stop()                           # SIGTERM by pid; returns the exit code
        d.kill9()                          # SIGKILL by pid

Every process a `daemons` factory started is SIGKILLed by pid in the fixture's finalizer if it
still runs, and the temp dir is removed. Socket paths stay short (AF_UNIX allows ~107 bytes):
the base dir comes from `tempfile.mkdtemp(prefix="pd")`, not from pytest's long `tmp_path`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import LOCAL, free_port, until_sync
from modelutil import FIXTURE_DIR

from peerdaemon.api.client import Client, ClientError, DaemonError

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
PYTHON = sys.executable

# The supervisor as `run` starts it, with the compaction thresholds given (`store.compact_count`
# and `store.compact_bytes` in the config file), and no status page (no fixed port to contend for).
COMPACTING_CHILD = """
import sys
from pathlib import Path
from peerdaemon.daemon.config import DaemonConfig
from peerdaemon.daemon.supervisor import run_daemon
raise SystemExit(run_daemon(DaemonConfig(Path(sys.argv[1]), Path(sys.argv[2]),
                            compact_count=int(sys.argv[3]), compact_bytes=int(sys.argv[4]))))
"""


def child_env() -> dict[str, str]:
    """The environment for child processes: no inherited daemon selection or debug switches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    env["RUST_BACKTRACE"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sigint_as_from_a_terminal() -> None:
    """`preexec_fn` for a child a test stops with SIGINT (Ctrl-C). A test run started in the
    background by a non-interactive shell inherits SIGINT ignored, and a Python child then keeps
    ignoring it: the signal would be lost and the test would hang."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


ROOT_FOR_MOUNTS = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="mounts a small tmpfs (root)"
)


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (say "2m") mounted at `path` for the duration: a disk that fills up."""
    path.mkdir(parents=True, exist_ok=True)
    argv = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    mounted = subprocess.run(argv, capture_output=True, text=True)
    if mounted.returncode != 0:  # root without the right to mount (a container, say)
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow_disk(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def short_tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pd"))


class DaemonProcess:
    """One daemon process (restartable: `start()` again after `stop()`/`kill9()`)."""

    def __init__(
        self, data_dir: Path, socket_path: Path, log_path: Path, argv: Sequence[str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.log_path = log_path
        self.argv = (
            list(argv)
            if argv is not None
            else [
                PYTHON,
                "-m",
                "peerdaemon",
                "run",
                "--data-dir",
                str(data_dir),
                "--socket",
                str(socket_path),
            ]
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it (its output goes to `log_path`)."""
        assert not self.running, "already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env()
            )
        return self.proc

    def start(self, timeout: float = START_TIMEOUT) -> dict:
        """Spawn and wait until the socket answers `status` from this very process."""
        self.spawn()
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"daemon exited with {code} before answering:\n{self.output()}")
            try:
                with Client.connect(self.socket_path, timeout=5) as client:
                    status = client.status()
                if status.get("pid") == self.proc.pid:
                    return status
            except (ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill9()
                raise TimeoutError(f"daemon not answering after {timeout}s:\n{self.output()}")
            time.sleep(0.02)  # polling the socket with a bounded deadline

    def output(self) -> str:
        """What this run of the process wrote (stdout and stderr share the log)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def client(self, timeout: float | None = 30) -> Client:
        return Client.connect(self.socket_path, timeout=timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM by pid and wait; returns the exit code (kill -9 and raise on timeout)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise TimeoutError(f"daemon did not stop on SIGTERM:\n{self.output()}") from None

    def kill9(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(STOP_TIMEOUT)


class Daemons:
    """Factory of daemon processes sharing one short temp dir; `cleanup()` ends them all."""

    def __init__(self) -> None:
        self.base = short_tempdir()
        self.all: list[DaemonProcess] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self._n = 0

    def path(self, name: str) -> Path:
        return self.base / name

    def new(
        self,
        data_dir: Path | None = None,
        socket_path: Path | None = None,
        *,
        argv: Sequence[str] | None = None,
    ) -> DaemonProcess:
        self._n += 1
        n = self._n
        data_dir = data_dir or self.base / f"data{n}"
        socket_path = socket_path or self.base / f"run{n}" / "pd.sock"
        daemon = DaemonProcess(data_dir, socket_path, self.base / f"daemon{n}.log", argv)
        self.all.append(daemon)
        return daemon

    def compacting(
        self,
        data_dir: Path | None = None,
        socket_path: Path | None = None,
        *,
        compact_count: int = 20,
        compact_bytes: int = 8 << 20,
    ) -> DaemonProcess:
        """A daemon started by `run_daemon` with small compaction thresholds."""
        daemon = self.new(data_dir, socket_path)
        daemon.argv = [
            PYTHON,
            "-c",
            COMPACTING_CHILD,
            str(daemon.data_dir),
            str(daemon.socket_path),
            str(compact_count),
            str(compact_bytes),
        ]
        return daemon

    def track(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        """Have another child process (say `env watch`) killed by pid at cleanup."""
        self.others.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in [*self.others, *(d.proc for d in self.all if d.proc is not None)]:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(name="daemons")
def daemons_fixture() -> Iterator[Daemons]:
    """Import this into a test module to use the `daemons` fixture."""
    factory = Daemons()
    try:
        yield factory
    finally:
        factory.cleanup()


# -- talking to daemon processes (test_lan*.py) -------------------------------------------
def pd(sock: Path, *argv: str, input: str | None = None) -> str:
    """`peerdaemon --socket SOCK ...` as a child process; its stdout (raises on failure)."""
    done = subprocess.run(
        [PYTHON, "-m", "peerdaemon", "--socket", str(sock), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        input=input,
    )
    assert done.returncode == 0, f"peerdaemon {' '.join(argv)}: {done.stderr}"
    return done.stdout


def export(daemon, env_id: str) -> dict | None:
    with daemon.client() as c:
        try:
            return c.export(env_id)
        except DaemonError as exc:
            if exc.code == "not-found":
                return None
            raise


# -- chaos: writers through real daemons that are killed and restarted (test_*_chaos.py) ----
CHAOS_TIMEOUT = 60.0


def call(daemon: DaemonProcess, op: str, **args: object) -> dict:
    with daemon.client(timeout=10) as c:
        return c.call(op, **args)


def exports(daemons: list[DaemonProcess], env_id: str) -> list[dict | None]:
    """Each daemon's export; None from one that is down or does not hold `env_id` yet. Any
    other error answer fails the test: a daemon that refuses to export is not converging."""
    out: list[dict | None] = []
    for d in daemons:
        try:
            with d.client(timeout=10) as c:
                out.append(c.export(env_id))
        except DaemonError as exc:
            if exc.code != "not-found":
                raise
            out.append(None)
        except (ClientError, OSError):  # down (killed, restarting): a connection failure
            out.append(None)
    return out


def processes_converged(daemons: list[DaemonProcess], env_id: str) -> dict:
    """Wait until every daemon exports the same JSON for `env_id`; returns it."""

    def same() -> dict | None:
        first, *rest = exports(daemons, env_id)
        return first if first is not None and all(e == first for e in rest) else None

    return until_sync(same, CHAOS_TIMEOUT, f"{env_id} to converge")


class Writer(threading.Thread):
    """Appends headers with distinct keys through one daemon; records each acknowledged key.

    Only a connection failure means the daemon is down (killed or restarting): the edit was
    never acknowledged, and the writer tries again on a new connection. An error answer is the
    daemon refusing a valid write while it runs: the writer keeps it in `error` and stops all
    writers, and `Writers` fails the test with it.
    """

    def __init__(self, daemon: DaemonProcess, env_id: str, name: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.d, self.env_id, self.prefix, self.stop = daemon, env_id, name, stop
        self.acked: list[str] = []
        self.error: DaemonError | None = None

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with self.d.client(timeout=10) as c:
                    while not self.stop.is_set():
                        key = f"{self.prefix}-{n}"
                        n += 1
                        header = {"key": key, "value": "v"}
                        c.patch(self.env_id, [{"op": "add", "path": "/headers/-", "value": header}])
                        self.acked.append(key)
            except DaemonError as exc:  # an answer: the daemon is up and refused the write
                self.error = exc
                self.stop.set()
            except (ClientError, OSError):  # down: that edit was never acknowledged
                time.sleep(0.05)  # (bounded: until the daemon listens again)


def share_fixture(nodes: list[DaemonProcess], space: str) -> str:
    """Share the test fixture from the first node into `space`; once all hold it, its id."""
    env = json.loads((FIXTURE_DIR / "test-env.json").read_text())
    env_id = call(nodes[0], "env.import", env=env)["id"]
    call(nodes[0], "env.share", id=env_id, space=space)
    processes_converged(nodes, env_id)
    return env_id


class Writers:
    """A writer per node while the block runs; `acked` after it: every acknowledged key."""

    def __init__(self, nodes: list[DaemonProcess], env_id: str) -> None:
        self.stop = threading.Event()
        self.writers = [Writer(d, env_id, f"n{i}", self.stop) for i, d in enumerate(nodes)]
        self.acked: set[str] = set()

    def __enter__(self) -> Writers:
        for w in self.writers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for w in self.writers:
            w.join(CHAOS_TIMEOUT)
        assert not any(w.is_alive() for w in self.writers), "a writer is stuck"
        refused = [f"{w.prefix}: {w.error}" for w in self.writers if w.error is not None]
        assert not refused, f"a running daemon refused a write: {refused}"
        assert all(w.acked for w in self.writers), "every node acknowledged some edits"
        self.acked = {key for w in self.writers for key in w.acked}


def check_everything_acknowledged_is_there(
    nodes: list[DaemonProcess], env_id: str, acked: set[str]
) -> list[str]:
    merged = processes_converged(nodes, env_id)
    keys = [h["key"] for h in merged["headers"]]
    assert len(keys) == len(set(keys))
    assert acked <= set(keys), sorted(acked - set(keys))[:10]
    return keys


def lan_pair(daemons: Daemons, *, both_dial: bool = False) -> tuple[DaemonProcess, DaemonProcess]:
    """Two daemons (not started) on loopback ports, B dialing A; with `both_dial` A dials B
    too, so whichever restarts reconnects at once, whatever the other's backoff."""
    port_a, port_b = free_port(), free_port()
    a, b = daemons.new(), daemons.new()
    peer_a = ["--peer", f"{LOCAL}:{port_a}"]
    peer_b = ["--peer", f"{LOCAL}:{port_b}"] if both_dial else []
    for d, port, extra in ((a, port_a, peer_b), (b, port_b, peer_a)):
        d.argv += ["--listen", f"{LOCAL}:{port}", "--no-mdns", "--name", f"p{port}", *extra]
    return a, b


def shared_space(
    a: DaemonProcess, b: DaemonProcess, name: str, env_file: Path, count: int = 1
) -> tuple[str, list[str]]:
    """A creates space `name`, B joins it, A imports `env_file` `count` times (new ids after
    the first) and shares them; -> (space id, env ids) once B has every one."""
    space = pd(a.socket_path, "space", "create", name).strip()
    code = pd(a.socket_path, "space", "invite", space).strip()
    assert pd(b.socket_path, "space", "join", code).strip() == space
    envs = []
    for i in range(count):
        fresh = ["--new-id"] if i else []
        env_id = pd(a.socket_path, "env", "import", *fresh, str(env_file)).strip()
        assert pd(a.socket_path, "env", "share", env_id, "--space", space).strip() == env_id
        envs.append(env_id)
    for env_id in envs:
        until_sync(lambda e=env_id: export(a, e) == export(b, e) != None, what="first sync")  # noqa: E711
    return space, envs
