"""Differential test of mock serving: for every environment of `mockdiff.ENVIRONMENTS`, what we
serve answers its corpus exactly as the real `@mockoon/cli` 9.9.0 serving the same file does
(status, reason, headers, body byte for byte, latency floors; `tests/mockdiff.py`), on two targets:

DEVICE: a real daemon process (`python -m peerdaemon run ... --mock-faker-seed`), the environment
imported and linked to a copy of its file (`env.import_link`), served with `mock.start`. FILE
bodies resolve beside the linked file, so the copy sits in a copy of the fixture folders
(tests/fixtures/mockdiff and tests/fixtures/mockoon, with their files), and mockoon-cli serves its
own copy laid out the same way. Both run with `mockdiff.process_env` (`PROCESS_ENV_VARS`: TZ and
the variables `getEnvVar` reads).

HUB (Cloud Mock): a hub (`serve_hub`, in a thread of its own) holding the environment document
(`import_environment`) and a space document that says `hub: true, access: token`, answering at
`http://127.0.0.1:PORT/mock/SPACE/ENV/...`; every request carries the token in `X-Mock-Token`,
which the hub's gate must remove without a trace. The hub's runner is confined: its process
environment is empty and its files come only from the hub's per-space folder, where the files
synced with the environment are written (its files document, docs/files.md: the files it names
inside its folder, put into the hub's store as a member's device does). So its reference is a
mockoon-cli without any variable but HOME (no TZ, no MOCKOON_*: both use the system's time zone
and see no variable) serving the file copied with just those files into a folder laid out like
the hub's. The hub's own additions need no exclusion: `Connection: close` is
volatile for mockdiff anyway, no template in the corpus echoes the X-Forwarded-* headers the hub
sets, and paths in answers are redacted on both sides. Excluded (HUB_EXCLUSIONS, each checked to be
still needed and to be exactly what the runner reported refusing): FILE bodies outside the
environment's folder, which confinement refuses; the answer differs only in the path it names.

The device has no exclusion at all.

Every target is fresh per environment (a daemon, a hub, a mockoon-cli process each): request
numbers, data buckets, global variables and faker state are part of what is compared, and
faker.js is seeded per runner process (`--faker-seed`), as mockoon-cli seeds it per process.

Only loopback: everything listens on 127.0.0.1, on ports chosen free.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mockdiff as md
import pytest
import trio
from mockutil import RUNNER_DIR, require_runner

from peerdaemon.api.client import Client, ClientError
from peerdaemon.core.attachments import FilesDoc, referenced_paths
from peerdaemon.hub.accounts import Limits
from peerdaemon.hub.mocks import MockConfig
from peerdaemon.hub.server import HubConfig, HubServer, serve_hub
from peerdaemon.model import import_environment
from peerdaemon.spaces import SpaceDoc

ROOT = md.TESTS.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
FIXTURES = md.TESTS / "fixtures"
FIXTURE_DIRS = (md.GEN_DIR, md.REAL_DIR)  # FILE bodies point into both (gen-files' up-a-level)
WORKERS = 5  # environments compared at once (two servers each)
START_TIMEOUT = 30.0
SPACE = "mockdiffspace234"  # a space id: 16 characters of [a-z2-7]
TOKEN = "mockdiff-token-5vN2q8Lr0aZx"  # the Cloud Mock's token, sent in the X-Mock-Token header
DEVICE = "mockdiff-device"

needs_mockoon = pytest.mark.skipif(
    shutil.which("node") is None or not md.MOCKOON_CLI.exists(),
    reason=f"node and @mockoon/cli are needed: `npm ci --prefix {md.INTEROP}`",
)
pytestmark = [needs_mockoon]


# --- what is served, and how it is observed -----------------------------------------------------


@dataclass
class Serving:
    """A server answering a corpus: its base URL, where this machine's paths show in its answers
    (and what stands for them), and how to stop it."""

    base_url: str
    redact: list[tuple[str, str]]
    stop: Callable[[], None]
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request besides its own
    blocked: Callable[[], list[str]] = list  # what confinement refused while serving


Serve = Callable[[md.EnvCase], Serving]


def lay_out(case: md.EnvCase, root: Path) -> Path:
    """A copy of the fixture folders under `root` (so relative FILE paths, `../` included, find
    what they find beside the original); the copy of the case's file."""
    for folder in FIXTURE_DIRS:
        shutil.copytree(folder, root / folder.relative_to(FIXTURES))
    return root / case.path.relative_to(FIXTURES)


def hub_folder(data_dir: Path, case: md.EnvCase) -> Path:
    """Where a hub with this data dir keeps the case's files (HostedMocks: mock-files/SPACE/ENV).

    The reference's folder is built the same way under a data dir of the same length, so that an
    answer naming a path (a missing file) has the same length on both sides once redacted."""
    env_id = json.loads(case.path.read_text(encoding="utf-8"))["uuid"]
    return data_dir / "mock-files" / SPACE / env_id


def synced_files(case: md.EnvCase) -> dict[str, bytes]:
    """The files beside the case's file that a member's device syncs with it (docs/files.md):
    the ones it names inside its folder (`../` ones are refused) that exist."""
    env = json.loads(case.path.read_text(encoding="utf-8"))
    out = {}
    for relative in referenced_paths(env)[0]:
        source = case.path.parent / relative
        if source.is_file():
            out[relative] = source.read_bytes()
    return out


def alone(case: md.EnvCase, root: Path) -> Path:
    """The case's file copied into an empty folder under `root`, with only the files that are
    synced with it (what the hub's folder holds)."""
    folder = hub_folder(root / "data", case)
    folder.mkdir(parents=True)
    for relative, data in synced_files(case).items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return Path(shutil.copy(case.path, folder / case.path.name))


def play(serve: Serve, case: md.EnvCase) -> tuple[list[md.Observed], list[str]]:
    """The case's corpus played in order (each request with the serving's own headers, recorded
    as the corpus' request), and what confinement refused meanwhile."""
    serving = serve(case)
    try:
        out = []
        for req in case.corpus:
            sent = dataclasses.replace(req, headers=req.headers + serving.headers)
            observed = md.send(serving.base_url, sent, serving.redact)
            out.append(dataclasses.replace(observed, req=req))
        return out, serving.blocked()
    finally:
        serving.stop()


def diff(case: md.EnvCase, reference: Serve, ours: Serve) -> Outcome:
    """Both recordings of the case's corpus, played at once against both servers."""
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(play, reference, case)
        b = pool.submit(play, ours, case)
        (xa, _), (xb, blocked) = a.result(), b.result()
    return Outcome(xa, xb, blocked)


def workdir_for(base: Path, case: md.EnvCase, side: str) -> Path:
    path = base / case.name / side
    path.mkdir(parents=True)
    return path


# --- the reference: mockoon-cli -----------------------------------------------------------------


def cli_serve(base: Path, *, bare: bool) -> Serve:
    """mockoon-cli serving the case: with `process_env` and a copy of the fixture folders, or
    (`bare`) with no variable but HOME and the file alone in an empty folder."""

    def serve(case: md.EnvCase) -> Serving:
        work = workdir_for(base, case, "cli")  # as long as "dev" and "hub": see hub_folder
        env_path = alone(case, work) if bare else lay_out(case, work)
        if not bare:
            url, stop = md.mockoon_cli_target(work)(env_path)
            return Serving(url, md.env_redactions(env_path), stop)
        port = md.free_port()
        log = work / "mockoon-cli.log"
        home = work / "home"
        home.mkdir()
        argv = [
            shutil.which("node") or "node",
            str(md.MOCKOON_CLI),
            "start",
            "--data",
            str(env_path),
            "--port",
            str(port),
            "--hostname",
            md.LOCAL,
            "--faker-seed",
            str(md.FAKER_SEED),
            "--disable-log-to-file",
            "--disable-admin-api",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={"HOME": str(home)},
            )
        try:
            md.wait_listening(port, proc=proc, log_path=log)
        except BaseException:
            md.stop(proc)
            raise
        return Serving(
            f"http://{md.LOCAL}:{port}", md.env_redactions(env_path), lambda: md.stop(proc)
        )

    return serve


# --- DEVICE: a daemon process -------------------------------------------------------------------


def daemon_env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    env = md.process_env(base)
    env["PEERDAEMON_MOCK_RUNNER"] = str(RUNNER_DIR.resolve())
    env["PEERDAEMON_NO_MDNS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def end_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid (the daemon then stops its runner), SIGKILL if it lingers; reaped."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=15)


def connect(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> Client:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({proc.returncode}):\n{tail(log)}")
        try:
            return Client.connect(sock, timeout=START_TIMEOUT)
        except (ClientError, OSError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon did not answer on {sock}:\n{tail(log)}") from None
            time.sleep(0.05)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def device_serve(base: Path) -> Serve:
    """A fresh daemon per case (so a fresh runner, seeded like a fresh mockoon-cli), serving the
    environment linked to a copy of its file laid out like the fixtures."""

    def serve(case: md.EnvCase) -> Serving:
        work = workdir_for(base, case, "dev")
        env_path = lay_out(case, work)
        run = Path(tempfile.mkdtemp(prefix="pd"))  # AF_UNIX paths are short
        sock, log = run / "s", work / "daemon.log"
        argv = [
            PYTHON,
            "-m",
            "peerdaemon",
            "run",
            "--data-dir",
            str(run / "data"),
            "--socket",
            str(sock),
            "--no-mdns",
            "--mock-faker-seed",
            str(md.FAKER_SEED),
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=daemon_env(),
                cwd=ROOT,
            )

        def stop() -> None:
            try:
                end_process(proc)
            finally:
                shutil.rmtree(run, ignore_errors=True)

        try:
            with connect(sock, proc, log) as client:
                text = env_path.read_text(encoding="utf-8")
                imported = client.call("env.import_link", path=str(env_path), json=text)
                port = md.free_port()
                served = client.call("mock.start", id=imported["id"], port=port, hostname=md.LOCAL)
            assert served["state"] == "running", (served, tail(log))
        except BaseException:
            stop()
            raise
        return Serving(f"http://{md.LOCAL}:{port}", md.env_redactions(env_path), stop)

    return serve


# --- HUB: the Cloud Mock --------------------------------------------------------------------------


class HubThread:
    """A hub (`serve_hub`) in a trio run of its own, in a thread: blocking calls go in through
    `run`."""

    def __init__(self, data_dir: Path) -> None:
        self.config = HubConfig(
            data_dir,
            listen=(md.LOCAL, 0),
            limits=Limits(mock_rps=100_000),  # a corpus is a burst: no 429
            mock=MockConfig(faker_seed=md.FAKER_SEED),
        )
        self.server: HubServer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="hub", daemon=True)

    def start(self) -> HubThread:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError("the hub did not start")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.server = await nursery.start(serve_hub, self.config)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable, *args: object) -> object:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(START_TIMEOUT)
        assert not self._thread.is_alive(), "the hub did not stop"


def hub_serve(base: Path) -> Serve:
    """A fresh hub per case (its confined runner seeded like a fresh mockoon-cli), the
    environment put into its store with a space document that turns its Cloud Mock on."""

    def serve(case: md.EnvCase) -> Serving:
        work = workdir_for(base, case, "hub")
        data_dir = (work / "data").resolve()
        env = json.loads(case.path.read_text(encoding="utf-8"))
        doc, prepared, _ = import_environment(env)
        env_id = prepared["uuid"]
        space = SpaceDoc()
        space.init("mockdiff", DEVICE, "mockdiff")
        space.set_state(env_id, "shared", DEVICE)
        space.set_mock(env_id, True, "token", TOKEN, DEVICE)
        files = FilesDoc()
        synced = synced_files(case)
        for relative, data in synced.items():
            files.put(relative, data, DEVICE)
        hub = HubThread(data_dir).start()

        async def put_and_wait() -> int | None:
            assert hub.server is not None and hub.server.mocks is not None
            docs = hub.server.docs
            docs.apply(SPACE, env_id, doc.get_update(), "test")
            if synced:
                docs.apply(SPACE, "files:" + env_id, files.doc.get_update(), "test")
            docs.apply(SPACE, "space:" + SPACE, space.doc.get_update(), "test")
            mocks = hub.server.mocks
            folder = hub_folder(data_dir, case)
            with trio.move_on_after(START_TIMEOUT):
                while mocks.lookup(SPACE, env_id) is None:  # until the space doc is reconciled
                    await trio.sleep(0.01)
                port = await mocks.wait_running(SPACE, env_id, START_TIMEOUT)
                while not all((folder / r).is_file() for r in synced):  # the synced files
                    await trio.sleep(0.01)
                return port
            return None

        try:
            port = hub.run(put_and_wait)
            assert port is not None, (
                (hub.server.mocks.describe(), hub.server.mocks.engine.runner_reason)
                if hub.server and hub.server.mocks
                else None
            )
            assert hub.server is not None
        except BaseException:
            hub.stop()
            raise
        folder = hub_folder(data_dir, case)
        assert folder.name == env_id
        redact = md.env_redactions(folder / case.path.name)
        url = f"http://{md.LOCAL}:{hub.server.port}/mock/{SPACE}/{env_id}"
        events = hub.server.events

        def blocked() -> list[str]:
            """Files refused, relative to the environment's folder: the runner's message is
            "file path /abs/path is outside the environment directory"."""
            messages = [
                str(e["data"].get("message"))
                for e in events.since(0)
                if e["type"] == "mock-error" and e["data"].get("code") == "BLOCKED"
            ]
            return [
                os.path.relpath(m.removeprefix("file path ").rsplit(" is outside", 1)[0], folder)
                for m in messages
            ]

        return Serving(url, redact, hub.stop, (("X-Mock-Token", TOKEN),), blocked)

    return serve


# --- running every case once, in parallel -------------------------------------------------------


@dataclass(frozen=True)
class Exclusion:
    """A request whose answer legitimately differs, and how: `pattern` (on the body) is replaced
    by `replacement` on both sides, and `headers` are not compared. Everything else is."""

    request: str  # Req.describe() of the request at that index: a guard against a moved corpus
    reason: str
    pattern: re.Pattern[bytes]
    replacement: bytes
    headers: frozenset[str] = frozenset()
    path: str = ""  # the file confinement refuses (as the environment writes it)

    def normalize(self, observed: md.Observed) -> md.Observed:
        headers = tuple(h for h in observed.headers if h[0] not in self.headers)
        body = self.pattern.sub(self.replacement, observed.body)
        return dataclasses.replace(observed, headers=headers, body=body)


@dataclass
class Outcome:
    reference: list[md.Observed] = field(default_factory=list)
    ours: list[md.Observed] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # ours: what confinement refused
    error: str = ""


def run_all(reference: Serve, ours: Serve) -> dict[str, Outcome]:
    def one(case: md.EnvCase) -> Outcome:
        try:
            return diff(case, reference, ours)
        except Exception as exc:  # reported by the case's own test
            return Outcome(error=f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(one, md.ENVIRONMENTS))
    return {case.name: o for case, o in zip(md.ENVIRONMENTS, outcomes, strict=True)}


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mockdiff-serve")).resolve()
    with pytest.MonkeyPatch.context() as mp:
        require_runner(mp)  # the hub, in this process, finds the runner through the environment
        yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def device_outcomes(base: Path) -> dict[str, Outcome]:
    return run_all(cli_serve(base / "device", bare=False), device_serve(base / "device"))


@pytest.fixture(scope="module")
def hub_outcomes(base: Path) -> dict[str, Outcome]:
    return run_all(cli_serve(base / "hub", bare=True), hub_serve(base / "hub"))


def check(
    case: md.EnvCase, outcome: Outcome, exclusions: dict[tuple[str, int], Exclusion]
) -> list[str]:
    """The differences between the two recordings, with the exclusions of this case applied
    (each must still be needed), and recordings that prove nothing (a request that got no
    answer, every answer a 404)."""
    if outcome.error:
        return [outcome.error]
    reference, ours = list(outcome.reference), list(outcome.ours)
    problems = [f"ours: {o.req.describe()}: {o.error}" for o in ours if o.error]
    if all(o.status == 404 for o in reference):
        problems.append("every request answered 404")
    for (name, index), exclusion in exclusions.items():
        if name != case.name:
            continue
        req = case.corpus[index]
        if req.describe() != exclusion.request:
            problems.append(f"exclusion #{index} is {exclusion.request!r}, not {req.describe()!r}")
            continue
        if not md.compare(reference[index : index + 1], ours[index : index + 1]):
            problems.append(f"exclusion #{index} {exclusion.request} is not needed any more")
        reference[index] = exclusion.normalize(reference[index])
        ours[index] = exclusion.normalize(ours[index])
    return problems + md.compare(reference, ours)


# A FILE path that leads out of the environment's folder: mockoon-cli reads it (here it is missing
# in the reference's empty folder: ENOENT naming `<ENV_DIR>/../x`); the hub's confined runner
# refuses it before Mockoon opens it (docs/mock-runner.md, "Confinement") and Mockoon answers as
# for a missing file, naming the runner's stand-in `<ENV_DIR>/.peerdaemon-refused-<hash>/x`. Same
# status, headers and message but for the directory part of that path (and so Content-Length).
OUTSIDE = re.compile(rb"'<ENV_DIR>/[^']*/([^'/]+)'")


def outside(request: str, path: str) -> Exclusion:
    return Exclusion(
        request,
        "a file outside the environment's folder is refused by --confine",
        OUTSIDE,
        rb"'<outside the folder>/\1'",
        frozenset({"content-length"}),
        path,
    )


HUB_EXCLUSIONS: dict[tuple[str, int], Exclusion] = {
    ("test-env", 2): outside("GET /file [missing ../test.data]", "../test.data"),
    ("callbacks", 1): outside(
        "GET /file [missing ../body-files/file1.txt]", "../body-files/file1.txt"
    ),
    ("gen-files", 25): outside("GET /file/up-a-level", "../mockoon/basic-folder-2-routes.json"),
}

CASES = [pytest.param(case, id=case.name) for case in md.ENVIRONMENTS]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", CASES)
def test_device_serves_like_mockoon_cli(case: md.EnvCase, device_outcomes: dict[str, Outcome]):
    """No exclusion: a device serves its user's environment exactly as mockoon-cli does."""
    outcome = device_outcomes[case.name]
    problems = check(case, outcome, {})
    # the reference answered as each request expects (it reached the branch it was written for)
    problems += [f"mockoon-cli: {p}" for p in md.check_expectations(outcome.reference)]
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", CASES)
def test_hub_serves_like_mockoon_cli(case: md.EnvCase, hub_outcomes: dict[str, Outcome]):
    """Exclusions: only what confinement refuses, and confinement refused exactly that."""
    outcome = hub_outcomes[case.name]
    problems = check(case, outcome, HUB_EXCLUSIONS)
    expected = sorted(e.path for (name, _), e in HUB_EXCLUSIONS.items() if name == case.name)
    if not outcome.error and sorted(outcome.blocked) != expected:
        problems.append(f"confinement refused {sorted(outcome.blocked)}, expected {expected}")
    if case.name == "gen-files":  # the synced files were there: FILE bodies answered as written
        unmet = md.check_expectations(outcome.reference)  # (not `../` ones: not synced)
        problems += [f"mockoon-cli: {p}" for p in unmet if not _outside_expected(case, p)]
    assert not problems, "\n".join(problems)


def _outside_expected(case: md.EnvCase, problem: str) -> bool:
    return any(
        name == case.name and case.corpus[index].describe() in problem
        for (name, index) in HUB_EXCLUSIONS
    )
