"""Mock serving figures: the hub's Cloud Mock against `mockoon-cli`, edit-to-served latency,
and the runner's memory.

    .venv/bin/python benchmarks/bench_mock.py [--reps 3] [--duration 5] [--concurrency 16]
                                              [--edits 30] [--envs 50] [--json]

Prints a table of medians over `--reps` repetitions (each repetition's values in brackets);
`--json` adds one JSON line with every figure. Needs Node, the mock runner
(`peerdaemon mock install --data-dir tests/.mock`, or PEERDAEMON_MOCK_RUNNER) and mockoon-cli
(`npm ci --prefix tests/interop`).

1. Throughput: one environment (GET /hello, a small JSON body), served three ways, driven by the
   same load generator: `mockoon-cli start` directly, the runner of a device (`mock.start`)
   directly, and the hub's Cloud Mock (`/mock/SPACE/ENV/hello`: the hub's Python proxy in front
   of its confined runner). The load generator is this script in a separate process (epoll, raw
   non-blocking sockets): `--concurrency` connections at once, ONE request per connection
   (`Connection: close`, as the hub answers), a new connection as soon as one ends; one untimed
   2 s run per server first, then per run 0.5 s of warm-up and `--duration` s counted; the
   servers' order rotates between repetitions. Reported: requests/s, p50/p99 latency (connect to
   the server's close), non-200 answers, and the CPU of the servers and of the load generator (in
   % of one core: on 2 cores, a sum near 200 % means the machine, not the server, is the limit).
   The hub/direct ratios compare the hub with `mockoon-cli`.
2. Edit-to-served: an `env.patch` on daemon A's socket replaces the /hello body by a new marker;
   a thread polls the served URL (a new connection per request, 1 ms apart) and the latency is
   from just before the patch is sent to the end of the first answer holding the marker.
   (a) A's own `mock.start`; (b) daemon B, a LAN peer of A (static peer on 127.0.0.1), serving
   it; (c) the hub's Cloud Mock, A attached to the hub. After each edit, the next waits until all
   three serve it. p99 over 30 edits is the slowest of them.
3. Memory: VmRSS of the runner (the node process of a fresh daemon's `mock.start`s) once
   serving 1 environment and once serving `--envs`, each having answered one request, after 2 s
   (a fresh daemon per repetition). For reference, one reading of mockoon-cli's and the hub
   runner's VmRSS, each serving the environment, 2 s after answering a request.

Everything listens on 127.0.0.1 only, mDNS off. Processes started here are ended by their pid
(SIGTERM, then SIGKILL) in `finally` blocks; every wait is bounded. The hub gets a config with
`max_half_open_per_ip` raised (16 by default: the load generator's connections all come from
127.0.0.1) and the owner's `mock_rps` limit raised to 1,000,000.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procutil import stop_process  # noqa: E402

from peerdaemon.api.client import Client, ClientError  # noqa: E402
from peerdaemon.model import prepare  # noqa: E402

LOCAL = "127.0.0.1"
RUNNER = Path(os.environ.get("PEERDAEMON_MOCK_RUNNER", ROOT / "tests" / ".mock" / "mock-runner"))
MOCKOON_CLI = ROOT / "tests" / "interop" / "node_modules" / ".bin" / "mockoon-cli"
NODE = shutil.which("node")
CALL_TIMEOUT = 30.0
BODY_PATH = "/routes/0/responses/0/body"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the environment ---------------------------------------------------------------------------
def bench_env(name: str = "Bench") -> dict[str, Any]:
    """One GET route, /hello, answering a small JSON body (and Mockoon's CORS headers); the
    other fields are Mockoon's defaults, filled in by the model's repair (`prepare`)."""
    body = json.dumps({"id": 1, "name": "bench", "items": [1, 2, 3], "ok": True}, indent=2)
    response = {
        "uuid": str(uuid.uuid4()),
        "body": body,
        "headers": [{"key": "Content-Type", "value": "application/json"}],
        "default": True,
    }
    route = {
        "uuid": str(uuid.uuid4()),
        "method": "get",
        "endpoint": "hello",
        "responses": [response],
    }
    env = {"uuid": str(uuid.uuid4()), "name": name, "port": 3000, "hostname": LOCAL, "cors": True}
    env["routes"] = [route]
    return prepare(env, env["uuid"])[0]


# --- small helpers ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET on a connection of its own (`Connection: close`): (status, whole answer)."""
    with socket.create_connection((LOCAL, port), timeout=timeout) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {LOCAL}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    raw = b"".join(chunks)
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return (int(m.group(1)) if m else 0), raw


def serves(port: int, path: str, marker: bytes) -> bool:
    try:
        status, raw = http_get(port, path)
    except OSError:
        return False
    return status == 200 and marker in raw


def wait_until(probe: Any, what: str, timeout: float = 30.0, every: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    env["PEERDAEMON_NO_MDNS"] = "1"
    env["PEERDAEMON_MOCK_RUNNER"] = str(RUNNER)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def runner_pid(parent: int, timeout: float = 30.0) -> int:
    """The pid of `parent`'s runner child (`node .../runner.mjs`), read from /proc."""

    def find() -> int | None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"runner.mjs" in cmdline:
                return int(entry)
        return None

    return wait_until(find, f"the runner of pid {parent}", timeout, 0.05)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pids: list[int]) -> list[float]:
    """utime + stime of each of these processes (not their children), in seconds."""
    out = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


class Procs:
    """Every process this run started; ended by pid on exit, whatever happened."""

    def __init__(self) -> None:
        self.all: list[subprocess.Popen[bytes]] = []

    def popen(self, argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kw
            )
        self.all.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        stop_process(proc, grace=10)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.all):
            stop_process(proc, grace=10)


# --- the things served -------------------------------------------------------------------------
class Daemon:
    """A `peerdaemon run` process on 127.0.0.1 (mDNS off), with a blocking client."""

    def __init__(self, procs: Procs, root: Path, name: str, peers: list[int] = ()) -> None:  # type: ignore[assignment]
        self.root = root / name
        self.root.mkdir(parents=True)
        self.name = name
        self.sock = root / f"{name}.s"
        self.port = free_port()
        argv = [
            sys.executable,
            "-m",
            "peerdaemon",
            "run",
            "--data-dir",
            str(self.root / "data"),
            "--socket",
            str(self.sock),
            "--name",
            name,
            "--no-mdns",
            "--listen",
            f"{LOCAL}:{self.port}",
        ]
        for port in peers:
            argv += ["--peer", f"{LOCAL}:{port}"]
        self.log = self.root / "log"
        self.proc = procs.popen(argv, self.log, env=child_env())
        self.client = self._connect()

    def _connect(self) -> Client:
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                client = Client.connect(self.sock, timeout=CALL_TIMEOUT)
                if client.status()["pid"] == self.proc.pid:
                    return client
                client.close()
            except (ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)

    def op(self, op: str, **args: Any) -> Any:
        return self.client.call(op, **args)

    def serve(self, env_id: str) -> int:
        port = free_port()
        served = self.op("mock.start", id=env_id, port=port, hostname=LOCAL)
        if served["state"] != "running":
            raise RuntimeError(f"{self.name}: mock.start {env_id}: {served}")
        return port


class Hub:
    """`peerdaemon hub serve` on 127.0.0.1:0 with one user, `bench`, whose limits are raised."""

    def __init__(self, procs: Procs, root: Path) -> None:
        self.root = root / "hub"
        self.root.mkdir(parents=True)
        self.data = self.root / "data"
        self.token = self._cli("user", "add", "bench")
        self._cli("limits", "set", "--user", "bench", "mock_rps", "1000000")
        config = self.root / "hub.toml"
        config.write_text("[connections]\nmax_half_open = 1024\nmax_half_open_per_ip = 1024\n")
        self.log = self.root / "log"
        argv = [sys.executable, "-m", "peerdaemon", "hub", "serve", "--data-dir", str(self.data)]
        argv += ["--config", str(config), "--listen", f"{LOCAL}:0"]
        self.proc = procs.popen(argv, self.log, env=child_env())

        def listening() -> int | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the hub exited: {self.log.read_text()[-2000:]}")
            m = re.search(r"hub listening on 127\.0\.0\.1:(\d+)", self.log.read_text())
            return int(m.group(1)) if m else None

        self.port: int = wait_until(listening, "the hub to listen", 30, 0.05)

    def _cli(self, *argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "peerdaemon", "hub", *argv, "--data-dir", str(self.data)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
        )
        return done.stdout.strip()


def start_mockoon_cli(procs: Procs, root: Path, env: dict[str, Any]) -> tuple[Any, int]:
    """`mockoon-cli start` on the environment's JSON (as exported by the daemon)."""
    data = root / "mockoon-env.json"
    data.write_text(json.dumps(env))
    home = root / "mockoon-home"
    home.mkdir()
    port = free_port()
    argv = [NODE or "node", str(MOCKOON_CLI), "start", "--data", str(data), "--port", str(port)]
    argv += ["--hostname", LOCAL, "--disable-log-to-file", "--disable-admin-api"]
    proc = procs.popen(argv, root / "mockoon-cli.log", env={**os.environ, "HOME": str(home)})
    return proc, port


# --- 1. throughput -------------------------------------------------------------------------
def loadgen(spec: dict[str, Any]) -> None:
    """The load generator (its own process): prints "go", "end", then a JSON line."""
    addr = (LOCAL, spec["port"])
    request = (
        f"GET {spec['path']} HTTP/1.1\r\nHost: {LOCAL}:{spec['port']}\r\n"
        "User-Agent: bench_mock\r\nConnection: close\r\n\r\n"
    ).encode()
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    now = time.monotonic()
    t_go = now + spec["warmup"]
    t_end = t_go + spec["duration"]
    went = ended = False
    usage_go = usage_end = None

    def fail(kind: str) -> None:
        if t_go <= time.monotonic() < t_end:
            errors[kind] = errors.get(kind, 0) + 1

    def start() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            fail(errno.errorcode.get(err, str(err)))
            return
        sel.register(s, selectors.EVENT_WRITE, [t0, False, bytearray()])

    def finish(s: socket.socket, state: list[Any], kind: str | None) -> None:
        sel.unregister(s)
        s.close()
        t1 = time.monotonic()
        if kind is not None:
            fail(kind)
        elif t_go <= t1 < t_end:
            m = re.match(rb"HTTP/1\.[01] (\d{3})", bytes(state[2][:16]))
            status = m.group(1).decode() if m else "bad"
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200":
                latencies.append(t1 - state[0])
        if not ended:
            start()

    for _ in range(spec["concurrency"]):
        start()
    while True:
        now = time.monotonic()
        if not went and now >= t_go:
            went = True
            usage_go = resource.getrusage(resource.RUSAGE_SELF)
            print("go", flush=True)
        if not ended and now >= t_end:
            ended = True
            usage_end = resource.getrusage(resource.RUSAGE_SELF)
            print("end", flush=True)
        if ended and (not sel.get_map() or now > t_end + 5):
            break
        for key, _mask in sel.select(timeout=0.02):
            s, state = key.fileobj, key.data
            assert isinstance(s, socket.socket)
            if not state[1]:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(s, state, errno.errorcode.get(err, str(err)))
                    continue
                try:
                    s.send(request)  # a few hundred bytes: one send on a fresh socket
                except OSError as exc:
                    finish(s, state, type(exc).__name__)
                    continue
                state[1] = True
                sel.modify(s, selectors.EVENT_READ, state)
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                finish(s, state, type(exc).__name__)
                continue
            if data:
                state[2] += data
            else:
                finish(s, state, None)
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    assert usage_go is not None and usage_end is not None
    cpu = (usage_end.ru_utime + usage_end.ru_stime) - (usage_go.ru_utime + usage_go.ru_stime)
    ms = sorted(x * 1000 for x in latencies)
    print(
        json.dumps(
            {
                "rps": len(ms) / spec["duration"],
                "ok": len(ms),
                "p50_ms": pct(ms, 0.5) if ms else None,
                "p99_ms": pct(ms, 0.99) if ms else None,
                "statuses": statuses,
                "errors": errors,
                "loadgen_cpu_pct": 100 * cpu / spec["duration"],
            }
        ),
        flush=True,
    )


def run_load(
    port: int,
    path: str,
    server_pids: list[int],
    args: argparse.Namespace,
    duration: float | None = None,
) -> dict[str, Any]:
    """One load run against `port`; the servers' CPU is read at the loadgen's "go" and "end"."""
    duration = duration or args.duration
    spec = {
        "port": port,
        "path": path,
        "concurrency": args.concurrency,
        "duration": duration,
        "warmup": 0.5,
    }
    proc = subprocess.Popen(
        [sys.executable, __file__, "--loadgen", json.dumps(spec)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + duration + 30
        buf = b""
        lines: list[str] = []
        cpu: dict[str, tuple[float, list[float]]] = {}
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while len(lines) < 3:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("the load generator did not finish in time")
            if not sel.select(timeout=left):
                continue
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                raise RuntimeError(f"the load generator failed: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode()
                lines.append(text)
                if text in ("go", "end"):
                    cpu[text] = (time.monotonic(), cpu_seconds(server_pids))
        sel.close()
        proc.wait(timeout=30)
    finally:
        stop_process(proc, grace=5)
    result = json.loads(lines[2])
    (t0, c0), (t1, c1) = cpu["go"], cpu["end"]
    parts = [100 * (y - x) / (t1 - t0) for x, y in zip(c0, c1, strict=True)]
    result["server_cpu_pct"] = sum(parts)
    result["server_cpu_parts_pct"] = parts
    return result


# --- 2. edit-to-served -----------------------------------------------------------------------
class Poller(threading.Thread):
    """Polls one URL, 1 ms apart, while armed; records when an answer first holds the marker."""

    def __init__(self, port: int, path: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.path = path
        self.marker: bytes | None = None
        self.seen_at = 0.0
        self.seen = threading.Event()
        self.armed = threading.Event()
        self.quit = False
        self.polls = 0

    def arm(self, marker: bytes) -> None:
        self.seen.clear()
        self.marker = marker
        self.armed.set()

    def run(self) -> None:
        while not self.quit:
            if not self.armed.wait(0.1):
                continue
            marker = self.marker
            try:
                status, raw = http_get(self.port, self.path)
            except OSError:
                status, raw = 0, b""
            self.polls += 1
            if marker is not None and status == 200 and marker in raw:
                self.seen_at = time.perf_counter()
                self.armed.clear()
                self.seen.set()
                continue
            time.sleep(0.001)


def edit_latencies(
    a: Daemon, env_id: str, targets: dict[str, tuple[int, str]], order: list[str], edits: int
) -> dict[str, dict[str, list[float]]]:
    """`edits` (+3 warm-up) edits on A per target, measured at that target: {"served": ms from
    the patch to the new body served, "ack": ms until the patch's answer (durable on A)}."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in order:
        port, path = targets[name]
        poller = Poller(port, path)
        poller.start()
        try:
            served, acked = [], []
            for n in range(edits + 3):
                marker = f"edit-{name}-{n}-{uuid.uuid4().hex[:8]}"
                mark = marker.encode()
                poller.arm(mark)
                t0 = time.perf_counter()
                a.client.patch(env_id, [{"op": "replace", "path": BODY_PATH, "value": marker}])
                t_ack = time.perf_counter()
                if not poller.seen.wait(30):
                    raise RuntimeError(f"{name}: edit {n} not served in 30 s")
                if n >= 3:
                    served.append((poller.seen_at - t0) * 1000)
                    acked.append((t_ack - t0) * 1000)
                for p, q in targets.values():  # every server has it before the next edit
                    wait_until(lambda p=p, q=q, m=mark: serves(p, q, m), "the edit", 30, 0.005)
                time.sleep(0.02)
            out[name] = {"served": served, "ack": acked}
        finally:
            poller.quit = True
            poller.armed.set()
            poller.join(5)
    return out


# --- 3. memory ---------------------------------------------------------------------------------
def runner_memory(procs: Procs, root: Path, counts: list[int]) -> dict[int, float]:
    """A fresh daemon serving 1, then `counts[-1]` environments: its runner's VmRSS (MB)."""
    d = Daemon(procs, root, "m")
    try:
        served: list[int] = []
        out: dict[int, float] = {}
        pid = None
        for count in counts:
            while len(served) < count:
                env_id = d.op("env.import", env=bench_env(f"mem {len(served)}"))["id"]
                served.append(d.serve(env_id))
            for port in served:  # each has answered a request
                wait_until(lambda port=port: serves(port, "/hello", b'"bench"'), "served", 10)
            pid = pid or runner_pid(d.proc.pid)
            time.sleep(2.0)
            samples = []
            for _ in range(3):
                samples.append(rss_kb(pid))
                time.sleep(0.2)
            out[count] = statistics.median(samples) / 1024
        if runner_pid(d.proc.pid) != pid:
            raise RuntimeError("the runner was restarted during the memory figure")
        return out
    finally:
        procs.stop(d.proc)


# --- the run -------------------------------------------------------------------------------------
def missing() -> str:
    if NODE is None:
        return "node is not installed"
    if not (RUNNER / "node_modules" / "@mockoon" / "commons-server").is_dir():
        return f"the mock runner is not installed in {RUNNER} (peerdaemon mock install)"
    if not MOCKOON_CLI.exists():
        return f"mockoon-cli is not installed (npm ci --prefix {MOCKOON_CLI.parents[2]})"
    return ""


def setup(procs: Procs, root: Path) -> dict[str, Any]:
    """Hub; daemons A and B (LAN peers) sharing a space attached to the hub; the environment
    served by A, by B, by the hub's Cloud Mock and by mockoon-cli."""
    hub = Hub(procs, root)
    a = Daemon(procs, root, "a")
    b = Daemon(procs, root, "b", [a.port])
    space = a.op("space.create", name="Bench")["id"]
    code = a.op("space.invite", space=space, addresses=[])["code"]
    b.op("space.join", code=code)
    env_id = a.op("env.import", env=bench_env())["id"]
    a.op("env.share", id=env_id, space=space)
    attached = a.op(
        "space.hub",
        space=space,
        url=f"ws://{LOCAL}:{hub.port}",
        token=hub.token,
        trust_first_use=True,
        wait=15,
    )
    if attached.get("outcome") != "accepted":
        raise RuntimeError(f"the hub did not accept the space: {attached}")
    setting = a.op("env.mock", id=env_id, hub=True, access="public")
    hub_path = f"/mock/{space}/{env_id}/hello"
    assert setting["url"] == f"http://{LOCAL}:{hub.port}/mock/{space}/{env_id}/", setting
    exported = a.client.export(env_id)
    env = json.loads(exported) if isinstance(exported, str | bytes) else exported
    wait_until(lambda: b.op("env.list") and _has(b, env_id), "B to receive the environment", 30)
    port_a = a.serve(env_id)
    port_b = b.serve(env_id)
    cli, port_cli = start_mockoon_cli(procs, root, env)
    marker = b'"bench"'
    wait_until(lambda: serves(port_a, "/hello", marker), "A's mock", 30)
    wait_until(lambda: serves(port_b, "/hello", marker), "B's mock", 30)
    wait_until(lambda: serves(hub.port, hub_path, marker), "the Cloud Mock", 30)
    wait_until(lambda: serves(port_cli, "/hello", marker), "mockoon-cli", 30)
    status, raw = http_get(port_cli, "/hello")
    body_bytes = len(raw.split(b"\r\n\r\n", 1)[1])
    return {
        "hub": hub,
        "a": a,
        "b": b,
        "env_id": env_id,
        "cli": cli,
        "body_bytes": body_bytes,
        "targets": {
            "mockoon-cli": (port_cli, "/hello", {"node": cli.pid}),
            "device runner": (
                port_a,
                "/hello",
                {"runner": runner_pid(a.proc.pid), "daemon": a.proc.pid},
            ),
            "hub Cloud Mock": (
                hub.port,
                hub_path,
                {"hub": hub.proc.pid, "runner": runner_pid(hub.proc.pid)},
            ),
        },
        "edit_targets": {
            "same device (A)": (port_a, "/hello"),
            "LAN peer B": (port_b, "/hello"),
            "hub Cloud Mock": (hub.port, hub_path),
        },
    }


def _has(d: Daemon, env_id: str) -> bool:
    return any(e["id"] == env_id for e in d.op("env.list"))


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--envs", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="also print a JSON line")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        loadgen(json.loads(args.loadgen))
        return 0
    why = missing()
    if why:
        print(f"bench_mock: skipped: {why}")
        return 0

    t_start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="pdm"))  # short: AF_UNIX socket paths
    load: dict[str, list[dict[str, Any]]] = {}
    edits: dict[str, list[dict[str, list[float]]]] = {}
    memory: list[dict[int, float]] = []
    try:
        with Procs() as procs:
            s = setup(procs, root)
            print(f"set up in {time.monotonic() - t_start:.1f} s", file=sys.stderr)
            time.sleep(2.0)  # each has answered a request: references for the memory figure
            reference = {
                "mockoon-cli (node)": rss_kb(s["cli"].pid) / 1024,
                "hub runner, 1 Cloud Mock": rss_kb(s["targets"]["hub Cloud Mock"][2]["runner"])
                / 1024,
            }
            names = list(s["targets"])
            for name in names:  # untimed: JIT, caches and pools warm before the first rep
                port, path, pids = s["targets"][name]
                run_load(port, path, list(pids.values()), args, duration=2.0)
            for rep in range(args.reps):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    port, path, pids = s["targets"][name]
                    r = run_load(port, path, list(pids.values()), args)
                    r["server_parts"] = list(pids)
                    load.setdefault(name, []).append(r)
                    print(
                        f"rep {rep + 1} load {name}: {r['rps']:.0f} req/s "
                        f"p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
                        f"server CPU {r['server_cpu_pct']:.0f}% "
                        f"loadgen CPU {r['loadgen_cpu_pct']:.0f}% {r['statuses']} {r['errors']}",
                        file=sys.stderr,
                    )
            edit_names = list(s["edit_targets"])
            for rep in range(args.reps):
                order = edit_names[rep % 3 :] + edit_names[: rep % 3]
                got = edit_latencies(s["a"], s["env_id"], s["edit_targets"], order, args.edits)
                for name, values in got.items():
                    edits.setdefault(name, []).append(values)
                print(
                    f"rep {rep + 1} edits: "
                    + ", ".join(f"{k} p50 {med(v['served']):.1f} ms" for k, v in got.items()),
                    file=sys.stderr,
                )
            for proc in (s["cli"], s["b"].proc, s["a"].proc, s["hub"].proc):
                procs.stop(proc)  # the memory figure's daemon alone
            for rep in range(args.reps):
                memory.append(runner_memory(procs, root / f"mem{rep}", [1, args.envs]))
                print(f"rep {rep + 1} memory: {memory[-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - t_start
    figures = report(args, s["body_bytes"], load, edits, memory, reference)
    figures["elapsed_s"] = round(elapsed, 1)
    print(f"\n(total {elapsed:.0f} s)")
    if args.json:
        print(json.dumps(figures))
    return 0


def report(
    args: argparse.Namespace,
    body_bytes: int,
    load: dict[str, list[dict[str, Any]]],
    edits: dict[str, list[dict[str, list[float]]]],
    memory: list[dict[int, float]],
    reference: dict[str, float],
) -> dict[str, Any]:
    def row(values: list[float], fmt: str) -> str:
        runs = " ".join(fmt.format(v) for v in values)
        return f"{fmt.format(med(values)):>8s}  [{runs}]"

    figures: dict[str, Any] = {"reps": args.reps, "throughput": {}, "edit_to_served": {}}
    print(
        f"\n1. Throughput: GET /hello ({body_bytes}-byte JSON body); {args.concurrency} "
        f"connections at once, ONE request per connection (Connection: close), the same "
        f"Python epoll load generator in its own process; {args.duration:g} s per run; "
        f"medians of {args.reps} runs [each run]"
    )
    cols = [
        ("req/s", "rps", "{:.0f}"),
        ("p50 ms", "p50_ms", "{:.2f}"),
        ("p99 ms", "p99_ms", "{:.2f}"),
        ("server CPU %", "server_cpu_pct", "{:.0f}"),
        ("loadgen CPU %", "loadgen_cpu_pct", "{:.0f}"),
    ]
    for name, runs in load.items():
        print(f"  {name}")
        fig: dict[str, Any] = {}
        for label, key, fmt in cols:
            values = [r[key] for r in runs]
            line = f"    {label:14s} {row(values, fmt)}"
            if key == "server_cpu_pct":
                parts = runs[0]["server_parts"]
                shares = [
                    med([r["server_cpu_parts_pct"][i] for r in runs]) for i in range(len(parts))
                ]
                line += (
                    "  ("
                    + " + ".join(f"{p} {v:.0f}" for p, v in zip(parts, shares, strict=True))
                    + ")"
                )
                fig["server_cpu_parts_pct"] = dict(zip(parts, shares, strict=True))
            print(line)
            fig[key] = med(values)
            fig[key + "_runs"] = values
        bad = [
            {**r["errors"], **{k: v for k, v in r["statuses"].items() if k != "200"}} for r in runs
        ]
        fig["non_200_or_errors"] = bad
        print(f"    non-200/errors {bad if any(bad) else 'none'}")
        figures["throughput"][name] = fig
    t = figures["throughput"]
    hub, direct = t["hub Cloud Mock"], t["mockoon-cli"]
    ratios = {
        "rps": hub["rps"] / direct["rps"],
        "p50": hub["p50_ms"] / direct["p50_ms"],
        "p99": hub["p99_ms"] / direct["p99_ms"],
    }
    figures["hub_over_mockoon_cli"] = ratios
    print(
        f"  hub Cloud Mock / mockoon-cli direct (ratio of the medians): "
        f"req/s x{ratios['rps']:.2f}, p50 x{ratios['p50']:.2f}, p99 x{ratios['p99']:.2f}"
    )
    print("  (CPU in % of one core, 2 cores in all; the processes serving, each named)")

    print(
        f"\n2. Edit-to-served: env.patch on A's socket -> first answer holding the new body "
        f"(polled 1 ms apart, a connection each); {args.edits} edits per run, p99 = slowest; "
        f"medians of {args.reps} runs [each run], ms"
    )
    for name, runs in edits.items():
        p50 = [med(v["served"]) for v in runs]
        p99 = [pct(v["served"], 0.99) for v in runs]
        ack = [med(v["ack"]) for v in runs]
        print(f"  {name}")
        print(f"    p50            {row(p50, '{:.1f}')}")
        print(f"    p99            {row(p99, '{:.1f}')}")
        print(f"    (patch answered, durable on A, p50 {med(ack):.1f})")
        figures["edit_to_served"][name] = {
            "p50_ms": med(p50),
            "p99_ms": med(p99),
            "p50_runs": p50,
            "p99_runs": p99,
            "patch_ack_p50_ms": med(ack),
        }

    counts = sorted(memory[0])
    print(
        f"\n3. Runner memory: VmRSS of the node runner of a fresh daemon, each environment "
        f"served and asked once, 2 s later; medians of {len(memory)} daemons [each], MB"
    )
    figures["runner_rss_mb"] = {}
    for count in counts:
        values = [m[count] for m in memory]
        label = f"{count} environment{'s' if count > 1 else ''}"
        print(f"    {label:14s} {row(values, '{:.1f}')}")
        figures["runner_rss_mb"][str(count)] = med(values)
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        per = (figures["runner_rss_mb"][str(hi)] - figures["runner_rss_mb"][str(lo)]) / (hi - lo)
        figures["runner_rss_mb"]["per_extra_env"] = per
        print(f"    per extra environment {per:.2f} MB")
    print("  for reference, the same environment asked once, 2 s later (one reading):")
    for name, mb in reference.items():
        print(f"    {name:26s} {mb:.1f}")
    figures["reference_rss_mb"] = reference
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
