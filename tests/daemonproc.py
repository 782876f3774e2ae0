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

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from peerdaemon.api.client import Client, ClientError

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
PYTHON = sys.executable

# `run` does not expose the compaction thresholds: this child runs the same supervisor with them.
COMPACTING_CHILD = """
import sys
from pathlib import Path
from peerdaemon.daemon.supervisor import run_daemon
raise SystemExit(run_daemon(Path(sys.argv[1]), Path(sys.argv[2]),
                            compact_count=int(sys.argv[3]), compact_bytes=int(sys.argv[4])))
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
