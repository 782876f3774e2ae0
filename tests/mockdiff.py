"""Differential testing of mock serving against the real Mockoon CLI (`@mockoon/cli` 9.9.0).

A *corpus* is an ordered list of requests (`Req`); `observe`/`run_corpus` play it against a base URL,
one request at a time (order matters: CRUD, SEQUENTIAL, request numbers, global variables, data
buckets and faker state all carry over), and record what came back (`Observed`); `compare` lists
the differences between two recordings. `ENVIRONMENTS` pairs environment files with their corpus:
the real Mockoon fixtures in tests/fixtures/mockoon/ that serve HTTP, and environments generated
here (`generated_fixtures()`, written to tests/fixtures/mockdiff/ by `python tests/mockdiff.py`).

A `Target` serves an environment file and gives back a base URL and a cleanup; `mockoon_cli_target`
is the reference. Both sides of a comparison must run with `PROCESS_ENV_VARS` in their environment
(templating reads environment variables; dates are formatted in the process's time zone) and with
the same faker seed (`FAKER_SEED`), freshly started: state is part of what is compared.

Everything is on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlencode, urlsplit

TESTS = Path(__file__).resolve().parent
INTEROP = TESTS / "interop"
MOCKOON_CLI = INTEROP / "node_modules" / ".bin" / "mockoon-cli"
VALIDATE_ENV = INTEROP / "validate_env.mjs"
REAL_DIR = TESTS / "fixtures" / "mockoon"
GEN_DIR = TESTS / "fixtures" / "mockdiff"
LOCAL = "127.0.0.1"
FAKER_SEED = 20240917
LAST_MIGRATION = 33  # @mockoon/commons 9.9.0's HighestMigrationId, as in the fixtures
REQUEST_TIMEOUT = 15.0

# Environment variables both sides must have (and no other MOCKOON_*): getEnvVar reads them (with
# the default "MOCKOON_" prefix), and TZ fixes how dates are formatted.
PROCESS_ENV_VARS: dict[str, str] = {
    "TZ": "UTC",
    "MOCKOON_TEST_ENV_VAR": "prefixed value",
    "MOCKOON_TEST_VAR": "mockdiff test var",
    "MOCKOON_MOCKDIFF": "from the environment",
    "TEST_ENV_VAR": "unprefixed value",
    "PREFIX_TEST_ENV_VAR": "custom prefix value",
    "OTHER_VAR": "other value",
}

# Response headers that vary between two runs of the same server, or belong to the connection.
VOLATILE_HEADERS = frozenset({"date", "connection", "keep-alive", "transfer-encoding"})


# ---------------------------------------------------------------------------------------------
# requests and observations


@dataclass(frozen=True)
class Req:
    """One request of a corpus. `query` is the raw query string (no "?"); headers keep order and
    duplicates. `expect_status`/`expect_body` (a substring) say what the real Mockoon answers,
    checked by the self-check so that each request provably reaches the branch it was written for;
    `min_ms` is a latency the answer must not beat."""

    method: str
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    label: str = ""
    expect_status: int | None = None
    expect_body: str | None = None
    min_ms: float = 0.0

    @property
    def target(self) -> str:
        """The request target: path and query."""
        return self.path + ("?" + self.query if self.query else "")

    def describe(self) -> str:
        """A one-line name for messages."""
        name = f"{self.method} {self.target}"
        return f"{name} [{self.label}]" if self.label else name


@dataclass(frozen=True)
class Observed:
    """What came back for `req` (status 0 and `error` when no HTTP answer came)."""

    req: Req
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # lower-cased names, sorted, volatile ones dropped
    body: bytes
    elapsed_ms: float
    error: str = ""

    def header(self, name: str) -> list[str]:
        """Every value of header `name`."""
        return [v for k, v in self.headers if k == name.lower()]


def _headers(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> tuple:
    if headers is None:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((str(k), str(v)) for k, v in items)


def req(method: str, path: str, query: str = "", headers: Any = None, **kw: Any) -> Req:
    """A request with an optional raw body (`body=` bytes or str)."""
    body = kw.pop("body", None)
    if isinstance(body, str):
        body = body.encode("utf-8")
    return Req(method.upper(), path, query, _headers(headers), body, **kw)


def get(path: str, query: str = "", headers: Any = None, **kw: Any) -> Req:
    """A GET without a body."""
    return req("GET", path, query, headers, **kw)


def json_req(method: str, path: str, value: Any, headers: Any = None, **kw: Any) -> Req:
    """A request with a JSON body (Content-Type application/json unless given)."""
    hs = _headers(headers)
    if not any(k.lower() == "content-type" for k, _ in hs):
        hs = (("Content-Type", "application/json"), *hs)
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Req(method.upper(), path, kw.pop("query", ""), hs, body, **kw)


def form_req(method: str, path: str, pairs: Sequence[tuple[str, str]], **kw: Any) -> Req:
    """A request with an application/x-www-form-urlencoded body."""
    hs = (("Content-Type", "application/x-www-form-urlencoded"), *_headers(kw.pop("headers", None)))
    return Req(method.upper(), path, kw.pop("query", ""), hs, urlencode(pairs).encode(), **kw)


BOUNDARY = "mockdiffBoundary7MA4YWxkTrZu0gW"


def multipart_req(
    method: str,
    path: str,
    fields: Sequence[tuple[str, str]],
    files: Sequence[tuple[str, str, str, bytes]] = (),
    **kw: Any,
) -> Req:
    """A multipart/form-data request: `fields` (name, value), `files` (name, filename, type, data)."""
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, filename, ctype, data in files:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    hs = (
        ("Content-Type", f"multipart/form-data; boundary={BOUNDARY}"),
        *_headers(kw.pop("headers", None)),
    )
    return Req(method.upper(), path, kw.pop("query", ""), hs, body, **kw)


def _redact(data: bytes, redact: Sequence[tuple[str, str]]) -> bytes:
    for old, new in redact:
        if old:
            data = data.replace(old.encode(), new.encode())
    return data


def env_redactions(env_path: Path) -> list[tuple[str, str]]:
    """Where this machine's paths show in answers (file errors name the file), and what stands
    for them: the environment's folder, then the folder above it."""
    env_dir = env_path.resolve().parent
    return [(str(env_dir), "<ENV_DIR>"), (str(env_dir.parent), "<ENV_DIR>/..")]


def send(base_url: str, request: Req, redact: Sequence[tuple[str, str]] = ()) -> Observed:
    """Send one request on a fresh connection and record the answer."""
    url = urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"not an http base URL: {base_url!r}")
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=REQUEST_TIMEOUT)
    start = time.monotonic()
    try:
        conn.putrequest(
            request.method, url.path.rstrip("/") + request.target, skip_accept_encoding=True
        )
        names = {k.lower() for k, _ in request.headers}
        for key, value in request.headers:
            conn.putheader(key, value)
        if request.body is not None and "content-length" not in names:
            conn.putheader("Content-Length", str(len(request.body)))
        conn.endheaders(request.body)
        resp = conn.getresponse()
        body = resp.read()
        elapsed = (time.monotonic() - start) * 1000
        headers = sorted(
            (k.lower(), _redact(v.encode("latin-1"), redact).decode("latin-1"))
            for k, v in resp.getheaders()
            if k.lower() not in VOLATILE_HEADERS
        )
        return Observed(
            request, resp.status, resp.reason, tuple(headers), _redact(body, redact), elapsed
        )
    except (OSError, http.client.HTTPException) as exc:
        elapsed = (time.monotonic() - start) * 1000
        return Observed(request, 0, "", (), b"", elapsed, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def observe(
    base_url: str, corpus: Sequence[Req], *, redact: Sequence[tuple[str, str]] = ()
) -> list[Observed]:
    """Play `corpus` against `base_url`, sequentially, in order."""
    return [send(base_url, r, redact) for r in corpus]


async def run_corpus(
    base_url: str, corpus: Sequence[Req], *, redact: Sequence[tuple[str, str]] = ()
) -> list[Observed]:
    """`observe` in a worker thread, for trio tests."""
    import trio

    return await trio.to_thread.run_sync(lambda: observe(base_url, corpus, redact=redact))


# ---------------------------------------------------------------------------------------------
# comparing


def _show(data: bytes, limit: int = 160) -> str:
    text = repr(data[:limit])
    return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")


def _body_diff(a: bytes, b: bytes) -> str:
    at = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    lo = max(0, at - 40)
    return (
        f"body differs at byte {at} (lengths {len(a)} and {len(b)}): "
        f"{_show(a[lo : at + 80])} vs {_show(b[lo : at + 80])}"
    )


def compare(
    a: Sequence[Observed],
    b: Sequence[Observed],
    *,
    check_reason: bool = True,
    ignore_headers: Iterable[str] = (),
) -> list[str]:
    """Human-readable differences between two recordings of the same corpus (empty: the same)."""
    diffs: list[str] = []
    if len(a) != len(b):
        diffs.append(f"recordings differ in length: {len(a)} vs {len(b)}")
    ignored = {h.lower() for h in ignore_headers}
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        where = f"#{i} {x.req.describe()}"
        if x.req != y.req:
            diffs.append(f"{where}: not the same request as {y.req.describe()}")
            continue
        if x.error or y.error:
            if x.error != y.error:
                diffs.append(f"{where}: error {x.error or 'none'!r} vs {y.error or 'none'!r}")
            continue
        if x.status != y.status:
            diffs.append(f"{where}: status {x.status} vs {y.status}")
        if check_reason and x.reason != y.reason:
            diffs.append(f"{where}: reason {x.reason!r} vs {y.reason!r}")
        hx = [h for h in x.headers if h[0] not in ignored]
        hy = [h for h in y.headers if h[0] not in ignored]
        if hx != hy:
            only_x = [h for h in hx if h not in hy]
            only_y = [h for h in hy if h not in hx]
            diffs.append(f"{where}: headers only in first {only_x}, only in second {only_y}")
        if x.body != y.body:
            diffs.append(f"{where}: {_body_diff(x.body, y.body)}")
        floor = x.req.min_ms
        if floor and (x.elapsed_ms >= floor) != (y.elapsed_ms >= floor):
            diffs.append(
                f"{where}: latency {x.elapsed_ms:.0f} ms vs {y.elapsed_ms:.0f} ms "
                f"(the route's latency is {floor:g} ms)"
            )
    return diffs


def check_expectations(observed: Sequence[Observed]) -> list[str]:
    """Where a recording does not answer as its requests' `expect_*` and `min_ms` say."""
    problems: list[str] = []
    for i, o in enumerate(observed):
        where = f"#{i} {o.req.describe()}"
        if o.error:
            problems.append(f"{where}: {o.error}")
            continue
        if o.req.expect_status is not None and o.status != o.req.expect_status:
            problems.append(f"{where}: status {o.status}, expected {o.req.expect_status}")
        if o.req.expect_body is not None and o.req.expect_body.encode() not in o.body:
            problems.append(f"{where}: {o.req.expect_body!r} not in body {_show(o.body)}")
        if o.req.min_ms and o.elapsed_ms < o.req.min_ms:
            problems.append(f"{where}: answered in {o.elapsed_ms:.0f} ms < {o.req.min_ms:g} ms")
    return problems


# ---------------------------------------------------------------------------------------------
# processes: the real Mockoon CLI


_GIVEN: set[int] = set()
_GIVEN_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, and never handed out before in this process.

    Servers start in parallel threads: without the memory, the kernel could give a port just
    released by one probe to the next, two servers would race for it, and the loser's requests
    would reach the winner (a Mockoon 404 for routes it does not have)."""
    with _GIVEN_LOCK:
        while True:
            with socket.socket() as s:
                s.bind((LOCAL, 0))
                port = s.getsockname()[1]
            if port not in _GIVEN:
                _GIVEN.add(port)
                return port


def process_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without MOCKOON_* variables, plus `PROCESS_ENV_VARS`."""
    env = {k: v for k, v in (os.environ if base is None else base).items()}
    env = {k: v for k, v in env.items() if not k.startswith("MOCKOON_")}
    env.update(PROCESS_ENV_VARS)
    return env


def start_mockoon_cli(
    env_path: Path, port: int, *, faker_seed: int = FAKER_SEED, log_path: Path
) -> subprocess.Popen[bytes]:
    """`mockoon-cli start` serving `env_path` on 127.0.0.1:`port` (output to `log_path`), with
    no admin API and no log files; its HOME is a folder beside the log."""
    node = shutil.which("node")
    if node is None or not MOCKOON_CLI.exists():
        raise RuntimeError(f"node and @mockoon/cli are needed: `npm ci --prefix {INTEROP}`")
    home = log_path.parent / f"{log_path.stem}.home"
    home.mkdir(parents=True, exist_ok=True)
    env = process_env()
    env["HOME"] = str(home)
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [
                node,
                str(MOCKOON_CLI),
                "start",
                "--data",
                str(env_path),
                "--port",
                str(port),
                "--hostname",
                LOCAL,
                "--faker-seed",
                str(faker_seed),
                "--disable-log-to-file",
                "--disable-admin-api",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )


def wait_listening(
    port: int,
    timeout: float = 30.0,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Return once 127.0.0.1:`port` accepts connections; raise after `timeout` s, or as soon as
    `proc` has exited (with the end of `log_path`)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"the server exited ({proc.returncode}) before listening:\n{tail}")
        try:
            with socket.create_connection((LOCAL, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise TimeoutError(f"nothing listens on {LOCAL}:{port} after {timeout} s:\n{tail}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process we started (by its pid) and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# targets


Served = tuple[str, Callable[[], None]]


class Target(Protocol):
    """Serves an environment file, freshly (no state from an earlier call), with the same faker
    seed and `PROCESS_ENV_VARS` as the reference; returns the base URL (http://127.0.0.1:PORT, with
    a path prefix if it has one) and a cleanup that stops serving. FILE bodies resolve relative to
    the given file's folder (error messages name them: `env_redactions` hides that folder)."""

    def __call__(self, env_path: Path) -> Served: ...


def mockoon_cli_target(workdir: Path, *, faker_seed: int = FAKER_SEED) -> Target:
    """The reference target: a fresh `mockoon-cli start` per call, logs in `workdir`."""

    def serve(env_path: Path) -> Served:
        port = free_port()
        fd, name = tempfile.mkstemp(prefix=f"{env_path.stem}.", suffix=".log", dir=workdir)
        os.close(fd)
        log = Path(name)
        proc = start_mockoon_cli(env_path, port, faker_seed=faker_seed, log_path=log)
        try:
            wait_listening(port, proc=proc, log_path=log)
        except BaseException:
            stop(proc)
            raise
        return f"http://{LOCAL}:{port}", lambda: stop(proc)

    return serve


@contextmanager
def serving(target: Target, env_path: Path) -> Iterator[str]:
    """`with serving(target, path) as base_url:` serve for the block, then clean up."""
    base_url, cleanup = target(env_path)
    try:
        yield base_url
    finally:
        cleanup()


def observe_target(target: Target, env_path: Path, corpus: Sequence[Req]) -> list[Observed]:
    """Serve `env_path` with `target`, play `corpus`, clean up."""
    with serving(target, env_path) as base_url:
        return observe(base_url, corpus, redact=env_redactions(env_path))


def diff_targets(
    env_path: Path, corpus: Sequence[Req], a: Target, b: Target, *, b_env_path: Path | None = None
) -> tuple[list[str], list[Observed], list[Observed]]:
    """Play `corpus` against both targets at once (each serving `env_path`, or `b` serving
    `b_env_path`); returns the differences and both recordings."""
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(observe_target, a, env_path, corpus)
        fb = pool.submit(observe_target, b, b_env_path or env_path, corpus)
        xa, xb = fa.result(), fb.result()
    return compare(xa, xb), xa, xb


def validate_envs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """tests/interop/validate_env.mjs's verdict (Mockoon's strict schema) on each file."""
    envs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(envs, f)
    try:
        done = subprocess.run(
            [shutil.which("node") or "node", str(VALIDATE_ENV), f.name],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.unlink(f.name)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"validate_env.mjs failed: {done.stderr}")
    return json.loads(done.stdout)


# ---------------------------------------------------------------------------------------------
# building environments (Mockoon 9.9.0's shape and defaults: @mockoon/commons BuildEnvironment,
# BuildHTTPRoute, BuildCRUDRoute, BuildRouteResponse, BuildDatabucket, BuildResponseRule)

_NS = uuid.UUID("6f1d3c2e-9a41-4c5e-8f0b-3d7e2a9c1b55")


def _uid(*parts: object) -> str:
    return str(uuid.uuid5(_NS, "/".join(map(str, parts))))


def H(key: str, value: str) -> dict[str, str]:
    """A header entry."""
    return {"key": key, "value": value}


def rule(
    target: str, modifier: str = "", value: str = "", operator: str = "equals", invert: bool = False
) -> dict[str, Any]:
    """A response rule."""
    return {
        "target": target,
        "modifier": modifier,
        "value": value,
        "invert": invert,
        "operator": operator,
    }


def response(
    body: str = "",
    status: int = 200,
    *,
    label: str = "",
    headers: Sequence[dict[str, str]] = (),
    rules: Sequence[dict[str, Any]] = (),
    operator: str = "OR",
    default: bool = False,
    latency: int = 0,
    body_type: str = "INLINE",
    file_path: str = "",
    send_file_as_body: bool = False,
    databucket: str = "",
    disable_templating: bool = False,
    fallback_to_404: bool = False,
    crud_key: str = "id",
) -> dict[str, Any]:
    """A route response (uuid filled in by `environment`)."""
    return {
        "uuid": "",
        "body": body,
        "latency": latency,
        "statusCode": status,
        "label": label,
        "headers": list(headers),
        "bodyType": body_type,
        "filePath": file_path,
        "databucketID": databucket,
        "sendFileAsBody": send_file_as_body,
        "rules": list(rules),
        "rulesOperator": operator,
        "disableTemplating": disable_templating,
        "fallbackTo404": fallback_to_404,
        "default": default,
        "crudKey": crud_key,
        "callbacks": [],
    }


def route(
    method: str,
    endpoint: str,
    responses: Sequence[dict[str, Any]],
    *,
    mode: str | None = None,
    kind: str = "http",
    documentation: str = "",
) -> dict[str, Any]:
    """An HTTP (or CRUD, `kind="crud"`, method "") route."""
    return {
        "uuid": "",
        "type": kind,
        "documentation": documentation,
        "method": method,
        "endpoint": endpoint,
        "responses": list(responses),
        "responseMode": mode,
        "streamingMode": None,
        "streamingInterval": 0,
    }


def crud(endpoint: str, bucket_id: str, *, crud_key: str = "id") -> dict[str, Any]:
    """A CRUD route on data bucket `bucket_id`."""
    resp = response("{}", body_type="DATABUCKET", databucket=bucket_id, default=True)
    resp["crudKey"] = crud_key
    return route("", endpoint, [resp], kind="crud")


def bucket(bucket_id: str, name: str, value: str) -> dict[str, Any]:
    """A data bucket (its `id`, 4 characters, is what responses point at)."""
    return {"uuid": "", "id": bucket_id, "name": name, "documentation": "", "value": value}


def environment(
    name: str,
    routes: Sequence[dict[str, Any]],
    *,
    data: Sequence[dict[str, Any]] = (),
    cors: bool = True,
    prefix: str = "",
    latency: int = 0,
    headers: Sequence[dict[str, str]] = (H("Content-Type", "application/json"),),
) -> dict[str, Any]:
    """A complete environment with deterministic uuids (derived from `name` and positions)."""
    routes = [dict(r) for r in routes]
    for i, r in enumerate(routes):
        r["uuid"] = _uid(name, "route", i)
        r["responses"] = [
            dict(x, uuid=_uid(name, "route", i, "response", j))
            for j, x in enumerate(r["responses"])
        ]
    return {
        "uuid": _uid(name),
        "lastMigration": LAST_MIGRATION,
        "name": name,
        "endpointPrefix": prefix,
        "latency": latency,
        "port": 3000,
        "hostname": "",
        "folders": [],
        "routes": routes,
        "rootChildren": [{"type": "route", "uuid": r["uuid"]} for r in routes],
        "proxyMode": False,
        "proxyHost": "",
        "proxyRemovePrefix": False,
        "tlsOptions": {
            "enabled": False,
            "type": "CERT",
            "pfxPath": "",
            "certPath": "",
            "keyPath": "",
            "caPath": "",
            "passphrase": "",
        },
        "cors": cors,
        "headers": list(headers),
        "proxyReqHeaders": [H("", "")],
        "proxyResHeaders": [H("", "")],
        "data": [dict(d, uuid=_uid(name, "data", i)) for i, d in enumerate(data)],
        "callbacks": [],
    }


# ---------------------------------------------------------------------------------------------
# generated environments and their corpus

PREFLIGHT = (("Origin", "http://client.example"), ("Access-Control-Request-Method", "POST"))


def _env_requests() -> tuple[dict[str, Any], list[Req]]:
    """Route params and path patterns, query strings, JSON / urlencoded / multipart / XML / text
    bodies, headers and cookies, all echoed through request templating helpers."""
    routes = [
        route(
            "get",
            "users/:id/posts/:postId",
            [
                response(
                    '{"id":"{{urlParam \'id\'}}","post":"{{urlParam \'postId\'}}",'
                    "\"q\":\"{{queryParam 'q' 'none'}}\"}",
                    default=True,
                    headers=[H("X-Echo-Q", "{{queryParam 'q' 'none'}}")],
                )
            ],
        ),
        route(
            "get",
            "query",
            [
                response(
                    "q={{queryParam 'q'}}|status={{queryParam 'filter.status'}}|arr={{queryParam 'arr'}}"
                    "|arr1={{queryParamRaw 'arr.1'}}|dflt={{queryParam 'missing' 'dflt'}}"
                    "|all={{{stringify (queryParams)}}}",
                    default=True,
                    headers=[H("Content-Type", "text/plain")],
                )
            ],
        ),
        route(
            "post",
            "echo/json",
            [
                response(
                    "ab={{body 'a.b'}}|l1={{body 'list.1'}}|dflt={{body 'missing' 'dflt'}}|obj={{body 'obj'}}"
                    "|each={{#each (bodyRaw 'list')}}[{{this}}]{{/each}}|raw={{{body}}}"
                    "|dots={{body 'key\\.with\\.dots'}}|jp={{body '$.list[2]'}}",
                    default=True,
                )
            ],
        ),
        route(
            "post",
            "echo/form",
            [
                response(
                    "name={{body 'name'}}|age={{body 'user.age'}}|multi={{body 'multi'}}|raw={{body}}",
                    default=True,
                    headers=[H("Content-Type", "text/plain")],
                )
            ],
        ),
        route(
            "post",
            "echo/multipart",
            [
                response(
                    "f1={{body 'field1'}}|multi={{body 'multi'}}|name={{body 'doc.filename'}}"
                    "|type={{body 'doc.mimetype'}}|size={{body 'doc.size'}}",
                    default=True,
                    headers=[H("Content-Type", "text/plain")],
                )
            ],
        ),
        route(
            "post",
            "echo/xml",
            [
                response(
                    "item={{body 'root.item._text'}}|id={{body 'root.item._attributes.id'}}",
                    default=True,
                    headers=[H("Content-Type", "text/plain")],
                )
            ],
        ),
        route(
            "post",
            "echo/text",
            [
                response(
                    "text={{body}}|path={{body 'a' 'no-parsed-body'}}",
                    default=True,
                    headers=[H("Content-Type", "text/plain")],
                )
            ],
        ),
        route(
            "get",
            "echo/headers",
            [
                response(
                    "x={{header 'X-Test'}}|lower={{header 'x-test'}}|none={{header 'X-None' 'dflt'}}"
                    "|session={{cookie 'session'}}|nocookie={{cookie 'none' 'c-dflt'}}|method={{method}}",
                    default=True,
                    headers=[
                        H("Content-Type", "text/plain"),
                        H("Set-Cookie", "sid={{cookie 'session' 'anon'}}; Path=/"),
                        H("Set-Cookie", "seen=1; Path=/; HttpOnly"),
                        H("X-Test-Echo", "{{header 'X-Test'}}"),
                    ],
                )
            ],
        ),
        route(
            "get",
            "wild/*",
            [
                response(
                    "wild {{{stringify (urlParams)}}}",
                    default=True,
                    headers=[H("Content-Type", "text/plain")],
                )
            ],
        ),
        route(
            "get",
            "opt/:a/:b?",
            [
                response(
                    "a={{urlParam 'a'}} b={{urlParam 'b'}}",
                    default=True,
                    headers=[H("Content-Type", "text/plain")],
                )
            ],
        ),
        route("get", "colou?r", [response("colour", default=True)]),
        route(
            "get",
            "file/:name.:ext",
            [response("name={{urlParam 'name'}} ext={{urlParam 'ext'}}", default=True)],
        ),
        route(
            "get",
            "charset",
            [
                response(
                    "café ü €uro",
                    default=True,
                    headers=[H("Content-Type", "text/plain; charset=iso-8859-1")],
                )
            ],
        ),
        route("get", "space path", [response("with a space", default=True)]),
    ]
    env = environment(
        "mockdiff requests",
        routes,
        headers=[H("Content-Type", "application/json"), H("X-Req-Method", "{{method}}")],
    )
    mp_files = [("doc", "notes.txt", "text/plain", b"hello multipart\n")]
    corpus = [
        get("/users/42/posts/7", "q=hello", expect_body='"id":"42"'),
        get("/users/a%20b/posts/%E2%9C%93", expect_body='"id":"a b"'),
        get("/users/42/posts", expect_status=404),
        get("/users/42/posts/7/extra", expect_status=404),
        get("//users//9//posts//1", expect_body='"id":"9"'),
        get("/USERS/1/POSTS/2", label="case"),
        get("/users/1/posts/2/", label="trailing slash"),
        get("/query", "q=one&filter[status]=open&arr=x&arr=y", expect_body="status=open"),
        get("/query", "q=a+b%20c&arr[]=1&arr[]=2&arr[]=3", expect_body="arr1=2"),
        get("/query", "filter.status=dotted&q=&empty", label="dotted key"),
        get("/query", "a[b][c][d][e][f][g][h][i][j][k][l]=deep", label="qs depth"),
        get("/query", "q=%ZZ", label="bad escape"),
        json_req(
            "POST",
            "/echo/json",
            {
                "a": {"b": "deep"},
                "list": [1, "two", 3],
                "obj": {"k": [True, None]},
                "key.with.dots": "dotted",
            },
            expect_body="ab=deep|l1=two",
        ),
        json_req("POST", "/echo/json", {"a": {"b": "ünï"}}, label="unicode"),
        json_req("POST", "/echo/json", [1, 2], label="array body"),
        json_req(
            "POST",
            "/echo/json",
            {"a": {"b": "vnd"}},
            headers={"Content-Type": "application/vnd.api+json"},
            expect_body="ab=vnd",
        ),
        req(
            "POST",
            "/echo/json",
            headers={"Content-Type": "application/json"},
            body='{"a": {"b": broken',
            label="invalid JSON",
        ),
        req("POST", "/echo/json", body='{"a": {"b": "no content type"}}', label="no content type"),
        form_req(
            "POST",
            "/echo/form",
            [("name", "Jo Doe"), ("user[age]", "33"), ("multi", "1"), ("multi", "2")],
            expect_body="age=33",
        ),
        multipart_req(
            "POST",
            "/echo/multipart",
            [("field1", "v1"), ("multi", "a"), ("multi", "b")],
            mp_files,
            expect_body="name=notes.txt",
        ),
        req(
            "POST",
            "/echo/xml",
            headers={"Content-Type": "application/xml"},
            body='<?xml version="1.0"?><root><item id="i1">xmlval</item></root>',
            expect_body="item=xmlval",
        ),
        req(
            "POST",
            "/echo/text",
            headers={"Content-Type": "text/plain"},
            body="just text",
            expect_body="text=just text",
        ),
        req("POST", "/echo/text", body=b"", label="empty body"),
        get(
            "/echo/headers",
            headers=[("X-Test", "hdr"), ("Cookie", "session=abc%20def; other=1")],
            expect_body="x=hdr|lower=hdr",
        ),
        get("/echo/headers", headers=[("Cookie", "session=; bad")], label="empty cookie"),
        req("POST", "/echo/headers", expect_status=404, label="method mismatch"),
        req("HEAD", "/echo/headers", label="HEAD on a GET route"),
        get("/wild/a/b/c.txt", expect_body="wild"),
        get("/wild", label="wildcard needs a segment"),
        get("/opt/1/2", expect_body="a=1 b=2"),
        get("/opt/1", expect_body="a=1 b="),
        get("/color", expect_body="colour"),
        get("/colour", expect_body="colour"),
        get("/file/report.pdf", expect_body="ext=pdf"),
        get("/charset", label="latin-1 body"),
        get("/space%20path", expect_body="with a space"),
        get("/nowhere", expect_status=404),
    ]
    return env, corpus


def _env_rules() -> tuple[dict[str, Any], list[Req]]:
    """Every rule target and operator, AND/OR, invert, templated modifiers and values."""
    schemas = {
        "user": {
            "type": "object",
            "required": ["id", "name"],
            "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
        },
        "query": {
            "type": "object",
            "required": ["x"],
            "properties": {"x": {"type": "string", "pattern": "^[0-9]+$"}},
        },
    }
    flags = {"enabled": True, "level": 3, "roles": ["admin", "ops"], "empty": [], "name": "flags"}
    data = [
        bucket("schm", "schemas", json.dumps(schemas)),
        bucket("flgs", "flags", json.dumps(flags)),
    ]
    plain = [H("Content-Type", "text/plain")]

    def hit(name: str, *rules_: dict[str, Any], op: str = "OR") -> dict[str, Any]:
        return response(name, headers=plain, rules=rules_, operator=op, label=name)

    def default(name: str) -> dict[str, Any]:
        return response(name, headers=plain, default=True, label=name)

    body_route = route(
        "post",
        "rules/body",
        [
            default("body:default"),
            hit("body:equals", rule("body", "user.name", "alice")),
            hit("body:regex", rule("body", "user.email", "^[a-z]+@example\\.com$", "regex")),
            hit("body:regex_i", rule("body", "user.role", "^admin$", "regex_i")),
            hit("body:array_includes", rule("body", "tags", "red", "array_includes")),
            hit("body:empty_array", rule("body", "tags", "", "empty_array")),
            hit(
                "body:null-and",
                rule("body", "user.nickname", "", "null"),
                rule("body", "kind", "nonick"),
                op="AND",
            ),
            hit("body:schema", rule("body", "", "schemas.user", "valid_json_schema")),
            hit("body:fullstring", rule("body", "", "PING")),
            hit("body:fullregex", rule("body", "", "^raw-\\d+$", "regex")),
            hit(
                "body:invert-and",
                rule("body", "mode", "strict", invert=True),
                rule("body", "kind", "inv"),
                op="AND",
            ),
            hit("body:or", rule("body", "a", "1"), rule("body", "b", "2")),
            hit("body:jsonpath", rule("body", "$.items[?(@.id==2)].name", "two")),
            hit("body:templated-modifier", rule("body", "{{queryParam 'field'}}", "dyn")),
            hit("body:templated-value", rule("body", "token", "{{header 'X-Token'}}")),
            hit("body:xml", rule("body", "root.item._text", "xmlval")),
            hit("body:form", rule("body", "form.field", "f1")),
            hit("body:multipart", rule("body", "upload.filename", "a.txt")),
            hit("body:number", rule("body", "count", "5")),
            hit("body:bool", rule("body", "flag", "false")),
        ],
    )
    query_route = route(
        "get",
        "rules/query",
        [
            default("query:default"),
            hit("query:equals", rule("query", "q", "one")),
            hit("query:regex", rule("query", "page", "^\\d+$", "regex")),
            hit("query:regex_i", rule("query", "lang", "^EN", "regex_i")),
            hit("query:array_includes", rule("query", "tags", "b", "array_includes")),
            hit(
                "query:null-and",
                rule("query", "absent", "", "null"),
                rule("query", "mode", "nullcheck"),
                op="AND",
            ),
            hit("query:schema", rule("query", "", "schemas.query", "valid_json_schema")),
            hit(
                "query:present",
                rule("query", "flag", "", "null", invert=True),
                rule("query", "mode", "flagged"),
                op="AND",
            ),
            hit("query:nested", rule("query", "filter.status", "open")),
            hit("query:empty_array", rule("query", "list", "", "empty_array")),
        ],
    )
    header_route = route(
        "get",
        "rules/header",
        [
            default("header:default"),
            hit("header:equals", rule("header", "X-Env", "prod")),
            hit("header:regex_i", rule("header", "Accept", "APPLICATION/XML", "regex_i")),
            hit(
                "header:null-and",
                rule("header", "X-Absent", "", "null"),
                rule("header", "X-Mode", "nullcheck"),
                op="AND",
            ),
            hit(
                "header:present",
                rule("header", "X-Present", "", "null", invert=True),
                rule("header", "X-Mode", "present"),
                op="AND",
            ),
            hit("header:templated-value", rule("header", "X-Echo", "{{queryParam 'expect'}}")),
            hit("header:regex", rule("header", "x-lower", "^v\\d$", "regex")),
        ],
    )
    cookie_route = route(
        "get",
        "rules/cookie",
        [
            default("cookie:default"),
            hit("cookie:no-modifier", rule("cookie", "", "", "null")),
            hit("cookie:equals", rule("cookie", "session", "abc")),
            hit("cookie:regex", rule("cookie", "theme", "^(dark|light)$", "regex")),
            hit(
                "cookie:null-and",
                rule("cookie", "missing", "", "null"),
                rule("cookie", "mode", "nullcheck"),
                op="AND",
            ),
        ],
    )
    params_route = route(
        "get",
        "rules/params/:kind/:id",
        [
            default("params:default"),
            hit(
                "params:and",
                rule("params", "kind", "book"),
                rule("params", "id", "^\\d{3}$", "regex"),
                op="AND",
            ),
            hit("params:regex_i", rule("params", "kind", "^MAG", "regex_i")),
            hit("params:no-modifier", rule("params", "", "x")),
        ],
    )
    method_route = route(
        "all",
        "rules/method",
        [
            default("method:default"),
            hit("method:post", rule("method", "", "post")),
            hit("method:put-patch", rule("method", "", "^(put|patch)$", "regex")),
            hit("method:not-get", rule("method", "", "get", invert=True)),
        ],
    )
    path_route = route(
        "get",
        "rules/path/*",
        [
            default("path:default"),
            hit("path:equals", rule("path", "", "/rules/path/exact?x=1")),
            hit("path:regex", rule("path", "", "^/rules/path/re/", "regex")),
            hit("path:route", rule("path", "", "*")),
        ],
    )
    number_route = route(
        "get",
        "rules/request-number",
        [
            default("rn:default"),
            hit("rn:2", rule("request_number", "", "2")),
            hit("rn:4or5", rule("request_number", "", "^[45]$", "regex")),
        ],
    )
    global_route = route(
        "get",
        "rules/global",
        [
            default("global:default"),
            hit("global:on", rule("global_var", "mode", "on")),
            hit("global:cfg", rule("global_var", "cfg.level", "5")),
            hit("global:no-modifier", rule("global_var", "", "on")),
        ],
    )
    set_mode = route(
        "get",
        "vars/mode/:v",
        [
            response(
                "{{setGlobalVar 'mode' (urlParam 'v')}}mode={{getGlobalVar 'mode'}}",
                default=True,
                headers=plain,
            )
        ],
    )
    set_cfg = route(
        "get",
        "vars/cfg",
        [
            response(
                "{{setGlobalVar 'cfg' (object level=5)}}cfg={{getGlobalVar 'cfg' 'level'}}",
                default=True,
                headers=plain,
            )
        ],
    )
    bucket_route = route(
        "get",
        "rules/bucket",
        [
            default("bucket:default"),
            hit("bucket:enabled", rule("data_bucket", "flags.enabled", "true")),
            hit(
                "bucket:empty",
                rule("data_bucket", "flags.empty", "", "empty_array"),
                rule("data_bucket", "flags.name", "emptied"),
                op="AND",
            ),
            hit("bucket:roles", rule("data_bucket", "flags.roles", "root", "array_includes")),
            hit("bucket:level-by-id", rule("data_bucket", "flgs.level", "^[4-9]$", "regex")),
        ],
    )
    bucket_set = route(
        "get",
        "bucket/set/:op",
        [
            response(
                "{{setData 'invert' 'flags' 'enabled'}}inverted",
                headers=plain,
                rules=[rule("params", "op", "invert")],
            ),
            response(
                "{{setData 'inc' 'flags' 'level' 2}}level={{data 'flags' 'level'}}",
                headers=plain,
                rules=[rule("params", "op", "inc")],
            ),
            response(
                "{{setData 'push' 'flags' 'roles' 'root'}}{{data 'flags' 'roles'}}",
                headers=plain,
                rules=[rule("params", "op", "push")],
            ),
            response(
                "{{setData 'set' 'flags' 'name' 'emptied'}}{{data 'flags'}}",
                headers=plain,
                default=True,
            ),
        ],
    )
    templating_route = route(
        "get",
        "rules/templating",
        [
            default("tpl:default"),
            hit("tpl:equals", rule("templating", "{{queryParam 'a'}}-{{queryParam 'b'}}", "x-y")),
            hit("tpl:regex_i", rule("templating", "{{header 'X-T'}}", "^YES$", "regex_i")),
            hit(
                "tpl:null-and",
                rule("templating", "{{queryParam 'none'}}", "", "null"),
                rule("templating", "{{queryParam 'mode'}}", "nullcheck"),
                op="AND",
            ),
            hit("tpl:broken", rule("templating", "{{#if}}", "{{#if}}")),
        ],
    )
    logic_route = route(
        "get",
        "rules/logic",
        [
            default("logic:default"),
            hit(
                "logic:and",
                rule("query", "a", "1"),
                rule("header", "X-B", "2"),
                rule("query", "c", "3", invert=True),
                op="AND",
            ),
            hit(
                "logic:or",
                rule("query", "a", "9"),
                rule("header", "X-B", "9"),
                rule("query", "d", "", "null", invert=True),
            ),
            response("logic:empty-rules", headers=plain, label="no rules never matches"),
        ],
    )
    routes = [
        body_route,
        query_route,
        header_route,
        cookie_route,
        params_route,
        method_route,
        path_route,
        number_route,
        global_route,
        set_mode,
        set_cfg,
        bucket_route,
        bucket_set,
        templating_route,
        logic_route,
    ]
    env = environment("mockdiff rules", routes, data=data)

    def b(value: Any, expect: str, **kw: Any) -> Req:
        return json_req("POST", "/rules/body", value, expect_body=expect, **kw)

    corpus = [
        b({"user": {"name": "alice"}}, "body:equals"),
        b({"user": {"name": "bob", "email": "bob@example.com"}}, "body:regex"),
        b({"user": {"email": "bob@example.org", "role": "ADMIN"}}, "body:regex_i"),
        b({"user": {"role": "superadmin"}}, "body:default"),
        b({"tags": ["blue", "red"]}, "body:array_includes"),
        b({"tags": []}, "body:empty_array"),
        b({"tags": "red"}, "body:default"),
        b({"kind": "nonick"}, "body:null-and"),
        b({"kind": "nonick", "user": {"nickname": "nn"}}, "body:default"),
        b({"id": 5, "name": "bob"}, "body:schema"),
        b({"id": "5", "name": "bob"}, "body:default"),
        req(
            "POST",
            "/rules/body",
            headers={"Content-Type": "text/plain"},
            body="PING",
            expect_body="body:fullstring",
        ),
        req("POST", "/rules/body", body="raw-123", expect_body="body:fullregex"),
        b({"kind": "inv"}, "body:invert-and"),
        b({"kind": "inv", "mode": "strict"}, "body:default"),
        b({"b": "2"}, "body:or"),
        b({"a": 1}, "body:or"),
        b({"items": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]}, "body:jsonpath"),
        json_req(
            "POST",
            "/rules/body",
            {"dynfield": "dyn"},
            query="field=dynfield",
            expect_body="body:templated-modifier",
        ),
        json_req(
            "POST",
            "/rules/body",
            {"token": "t0k"},
            headers={"X-Token": "t0k"},
            expect_body="body:templated-value",
        ),
        json_req(
            "POST",
            "/rules/body",
            {"token": ""},
            expect_body="body:templated-value",
            label="empty token vs missing header",
        ),
        req(
            "POST",
            "/rules/body",
            headers={"Content-Type": "application/xml"},
            body="<root><item>xmlval</item></root>",
            expect_body="body:xml",
        ),
        form_req("POST", "/rules/body", [("form[field]", "f1")], expect_body="body:form"),
        multipart_req(
            "POST",
            "/rules/body",
            [],
            [("upload", "a.txt", "text/plain", b"x")],
            expect_body="body:multipart",
        ),
        b({"count": 5}, "body:number"),
        b({"flag": False}, "body:bool"),
        b({"flag": None}, "body:default"),
        req("POST", "/rules/body", expect_body="body:templated-value", label="no body: '' == ''"),
        get("/rules/query", "q=one", expect_body="query:equals"),
        get("/rules/query", "page=12", expect_body="query:regex"),
        get("/rules/query", "page=x1", expect_body="query:default"),
        get("/rules/query", "lang=en-GB", expect_body="query:regex_i"),
        get("/rules/query", "tags=a&tags=b", expect_body="query:array_includes"),
        get("/rules/query", "tags[]=b", expect_body="query:array_includes"),
        get("/rules/query", "mode=nullcheck", expect_body="query:null-and"),
        get("/rules/query", "mode=nullcheck&absent=", label="empty value is null"),
        get("/rules/query", "x=12345", expect_body="query:schema"),
        get("/rules/query", "x=12a", expect_body="query:default"),
        get("/rules/query", "mode=flagged&flag=1", expect_body="query:present"),
        get("/rules/query", "filter[status]=open", expect_body="query:nested"),
        get("/rules/query", "list[]=", label="empty array?"),
        get("/rules/query", expect_body="query:default"),
        get("/rules/header", headers={"X-Env": "prod"}, expect_body="header:equals"),
        get("/rules/header", headers={"x-env": "PROD"}, expect_body="header:default"),
        get("/rules/header", headers={"Accept": "application/xml"}, expect_body="header:regex_i"),
        get("/rules/header", headers={"X-Mode": "nullcheck"}, expect_body="header:null-and"),
        get(
            "/rules/header",
            headers={"X-Mode": "present", "X-Present": "1"},
            expect_body="header:present",
        ),
        get(
            "/rules/header",
            "expect=abc",
            headers={"X-Echo": "abc"},
            expect_body="header:templated-value",
        ),
        get("/rules/header", headers={"X-Lower": "v7"}, expect_body="header:regex"),
        get("/rules/header", expect_body="header:default", label="a missing header is not ''"),
        get("/rules/cookie", headers={"Cookie": "session=abc"}, expect_body="cookie:equals"),
        get(
            "/rules/cookie",
            headers={"Cookie": "theme=dark; session=zzz"},
            expect_body="cookie:regex",
        ),
        get("/rules/cookie", headers={"Cookie": "mode=nullcheck"}, expect_body="cookie:null-and"),
        get("/rules/cookie", expect_body="cookie:default"),
        get("/rules/params/book/123", expect_body="params:and"),
        get("/rules/params/book/1234", expect_body="params:default"),
        get("/rules/params/magazine/1", expect_body="params:regex_i"),
        get("/rules/method", expect_body="method:default"),
        req("POST", "/rules/method", expect_body="method:post"),
        req("PATCH", "/rules/method", expect_body="method:put-patch"),
        req("DELETE", "/rules/method", expect_body="method:not-get"),
        req("OPTIONS", "/rules/method", label="user route before CORS"),
        get("/rules/path/exact", "x=1", expect_body="path:equals"),
        get("/rules/path/re/anything", expect_body="path:regex"),
        get("/rules/path/other", label="route pattern"),
        *[get("/rules/request-number", label=f"request {n}") for n in range(1, 7)],
        get("/rules/global", expect_body="global:default"),
        get("/vars/mode/on", expect_body="mode=on"),
        get("/rules/global", expect_body="global:on"),
        get("/vars/mode/off"),
        get("/vars/cfg"),
        get("/rules/global", expect_body="global:cfg"),
        get("/rules/bucket", expect_body="bucket:enabled"),
        get("/bucket/set/invert"),
        get("/rules/bucket", expect_body="bucket:default"),
        get("/bucket/set/inc", expect_body="level=5"),
        get("/rules/bucket", expect_body="bucket:level-by-id"),
        get("/bucket/set/push"),
        get("/rules/bucket", expect_body="bucket:roles"),
        get("/bucket/set/name"),
        get("/rules/bucket", expect_body="bucket:empty"),
        get("/bucket/set/invert"),
        get("/rules/bucket", expect_body="bucket:enabled"),
        get("/rules/templating", "a=x&b=y", expect_body="tpl:equals"),
        get("/rules/templating", headers={"X-T": "yes"}, expect_body="tpl:regex_i"),
        get("/rules/templating", "mode=nullcheck", expect_body="tpl:null-and"),
        get("/rules/templating", "a=x"),
        get("/rules/logic", "a=1", headers={"X-B": "2"}, expect_body="logic:and"),
        get("/rules/logic", "a=1&c=3", headers={"X-B": "2"}, expect_body="logic:default"),
        get("/rules/logic", "a=1&c=3&d=0", headers={"X-B": "2"}, expect_body="logic:or"),
        get("/rules/logic", headers={"X-B": "9"}, expect_body="logic:or"),
    ]
    return env, corpus


def _env_modes() -> tuple[dict[str, Any], list[Req]]:
    """Response modes (default, SEQUENTIAL, RANDOM, DISABLE_RULES, FALLBACK), defaults, latency,
    status codes and response headers."""
    plain = [H("Content-Type", "text/plain")]
    routes = [
        route(
            "get",
            "modes/sequential",
            [
                response("seq-1", 200, headers=plain, default=True),
                response("seq-2", 201, headers=plain, rules=[rule("query", "x", "1")]),
                response("seq-3", 202, headers=[H("Content-Type", "text/plain"), H("X-Seq", "3")]),
            ],
            mode="SEQUENTIAL",
        ),
        # RANDOM picks with Math.random, unseeded: the responses here all answer the same
        route(
            "get",
            "modes/random",
            [
                response("random", 200, headers=plain, rules=[rule("query", "x", "1")]),
                response("random", 200, headers=plain, default=True),
                response("random", 200, headers=plain, rules=[rule("query", "y", "2")]),
            ],
            mode="RANDOM",
        ),
        route(
            "get",
            "modes/random-one",
            [
                response(
                    "only {{queryParam 'x'}}",
                    203,
                    headers=plain,
                    rules=[rule("query", "x", "nope")],
                ),
            ],
            mode="RANDOM",
        ),
        route(
            "get",
            "modes/disable-rules",
            [
                response("rule matched", 200, headers=plain, rules=[rule("query", "x", "1")]),
                response("default", 202, headers=plain, default=True),
            ],
            mode="DISABLE_RULES",
        ),
        route(
            "get",
            "modes/default-not-first",
            [
                response("A", 200, headers=plain, rules=[rule("query", "pick", "a")]),
                response("B", 200, headers=plain, default=True),
                response("C", 200, headers=plain, rules=[rule("query", "pick", "c")]),
            ],
        ),
        route(
            "get",
            "modes/no-default",
            [
                response("first", 200, headers=plain, rules=[rule("query", "pick", "first")]),
                response("second", 200, headers=plain, rules=[rule("query", "pick", "second")]),
            ],
        ),
        route(
            "all",
            "guard/*",
            [
                response('{"error":"locked"}', 401, rules=[rule("header", "X-Key", "", "null")]),
            ],
            mode="FALLBACK",
        ),
        route(
            "all",
            "guard/*",
            [
                response("never", 500, rules=[]),
            ],
            mode="FALLBACK",
        ),
        route("get", "guard/open", [response("open", 200, headers=plain, default=True)]),
        route("get", "guard/open", [response("shadowed", 200, headers=plain, default=True)]),
        route(
            "get",
            "modes/slow",
            [
                response("slow", 200, headers=plain, default=True, latency=50),
            ],
        ),
        route("get", "status/418", [response("teapot", 418, headers=plain, default=True)]),
        route("get", "status/204", [response("ignored body", 204, headers=plain, default=True)]),
        route("get", "status/304", [response("ignored", 304, default=True)]),
        route("get", "status/299", [response("custom", 299, default=True)]),
        route("get", "status/500", [response("", 500, default=True)]),
        route(
            "get",
            "status/templated",
            [
                response("{{status 201}}created by template", 200, headers=plain, default=True),
            ],
        ),
        route(
            "get",
            "status/bad-template-status",
            [
                response("{{status 99}}kept", 202, headers=plain, default=True),
            ],
        ),
        route(
            "get",
            "headers",
            [
                response(
                    "h",
                    default=True,
                    headers=[
                        H("Content-Type", "text/plain"),
                        H("Set-Cookie", "a=1; Path=/"),
                        H("Set-Cookie", "b=2; Secure; HttpOnly"),
                        H("X-Dup", "first"),
                        H("X-Dup", "second"),
                        H("x-case", "lower"),
                        H("X-Empty", ""),
                        H("", "no key"),
                        H("X-Templated", "{{queryParam 'v' 'none'}}"),
                        H("X-Broken", "{{#if}}"),
                        H("Cache-Control", "no-store"),
                    ],
                )
            ],
        ),
        route("get", "no-content-type", [response("no content type", default=True)]),
        route(
            "get",
            "json-type-text-body",
            [response("not json", default=True, headers=[H("Content-Type", "application/json")])],
        ),
        route(
            "get",
            "disabled-templating",
            [
                response(
                    "{{urlParam 'x'}} {{faker 'string.uuid'}}",
                    default=True,
                    disable_templating=True,
                    headers=plain,
                )
            ],
        ),
        route("post", "modes/sequential", [response("post on the same path", 200, default=True)]),
    ]
    env = environment(
        "mockdiff modes",
        routes,
        headers=[H("Content-Type", "application/json"), H("X-Env", "modes")],
    )
    corpus = [
        *[get("/modes/sequential", "x=1", label=f"sequential {n}") for n in range(1, 8)],
        req("POST", "/modes/sequential", expect_body="post on the same path"),
        *[get("/modes/random", label=f"random {n}", expect_body="random") for n in range(1, 4)],
        *[
            get("/modes/random-one", "x=v", label=f"random-one {n}", expect_status=203)
            for n in range(1, 3)
        ],
        get("/modes/disable-rules", "x=1", expect_status=202),
        get("/modes/default-not-first", expect_body="B"),
        get("/modes/default-not-first", "pick=c", expect_body="C"),
        get("/modes/default-not-first", "pick=a", expect_body="A"),
        get("/modes/no-default", expect_body="first"),
        get("/modes/no-default", "pick=second", expect_body="second"),
        get("/guard/open", expect_status=401),
        get("/guard/open", headers={"X-Key": "k"}, expect_body="open"),
        req("DELETE", "/guard/open", expect_status=401),
        req("DELETE", "/guard/open", headers={"X-Key": "k"}, expect_status=404),
        get("/guard/else", headers={"X-Key": "k"}, expect_status=404),
        get("/modes/slow", expect_body="slow", min_ms=50),
        get("/status/418", expect_status=418),
        get("/status/204", expect_status=204),
        get("/status/304", expect_status=304),
        get("/status/299", expect_status=299),
        get("/status/500", expect_status=500),
        get("/status/templated", expect_status=201),
        get("/status/bad-template-status", expect_status=202),
        get("/headers", "v=tmpl", expect_body="h"),
        req("HEAD", "/headers", label="HEAD"),
        get("/no-content-type"),
        get("/json-type-text-body"),
        get("/disabled-templating", expect_body="{{urlParam 'x'}}"),
        get("/missing", expect_status=404),
    ]
    return env, corpus


def _env_crud() -> tuple[dict[str, Any], list[Req]]:
    """CRUD routes on data buckets (arrays with numeric and faker ids, an object, primitives, a
    custom key), in an order where each step sees the previous ones."""
    users = [
        {"id": 1, "name": "Ann", "age": 31, "city": "Oslo"},
        {"id": 2, "name": "bob", "age": 25, "city": "Rome"},
        {"id": 3, "name": "Cid", "age": 40, "city": "Oslo"},
    ]
    data = [
        bucket("usrs", "users", json.dumps(users, indent=2)),
        bucket(
            "itms",
            "items",
            '[\n{{#repeat 3}}\n  {"id": "{{faker \'string.uuid\'}}", "n": {{@index}} }\n'
            "{{/repeat}}\n]",
        ),
        bucket("stgs", "settings", '{"theme": "dark", "size": 10}'),
        bucket("tags", "tags", '["a", "b", "c"]'),
        bucket("ppl1", "people", '[{"uid": "p1", "name": "x"}, {"uid": "p2", "name": "y"}]'),
        bucket("txt1", "text", "plain text, not JSON"),
    ]
    routes = [
        crud("users", "usrs"),
        crud("items", "itms"),
        crud("settings", "stgs"),
        crud("tags", "tags"),
        crud("people", "ppl1", crud_key="uid"),
        crud("text", "txt1"),
        route(
            "get",
            "report",
            [
                response(
                    "{{len (dataRaw 'users')}} users; first={{data 'users' '0.name'}}; "
                    "all={{data 'usrs'}}",
                    default=True,
                )
            ],
        ),
    ]
    env = environment("mockdiff crud", routes, data=data)
    corpus = [
        get("/users", expect_body='"name":"Ann"'),
        get("/users", "limit=2&page=2", expect_body="Cid"),
        get("/users", "sort=name&order=desc"),
        get("/users", "sort=age&order=bogus"),
        get("/users", "search=bo"),
        get("/users", "city_eq=Oslo&age_gte=35"),
        get(
            "/users", "name_like=^a&name_start=A&name_end=n&age_ne=2&age_lt=40&age_lte=31&age_gt=1"
        ),
        get("/users/2", expect_body='"bob"'),
        get("/users/99", expect_status=404),
        json_req(
            "POST", "/users", {"name": "Dee", "age": 50}, expect_status=201, expect_body='"id":4'
        ),
        json_req("POST", "/users", {"id": 10, "name": "Eve"}, expect_status=201),
        json_req("POST", "/users", {"name": "after ten"}, expect_body='"id":11'),
        req(
            "POST",
            "/users",
            headers={"Content-Type": "text/plain"},
            body="not json",
            label="text body pushed",
        ),
        json_req("PUT", "/users/2", {"name": "Bobby"}, expect_body='"id":2'),
        json_req("PUT", "/users/98", {"name": "nobody"}, expect_status=404),
        json_req("PATCH", "/users/1", {"age": 32}, expect_body='"age":32'),
        json_req("PATCH", "/users/77", {"age": 1}, expect_status=404),
        req("DELETE", "/users/3"),
        req("DELETE", "/users/3", expect_status=404),
        get("/users"),
        get("/report"),
        json_req("PATCH", "/users", [{"id": 20, "name": "merged"}]),
        get("/users", "limit=3&page=3"),
        json_req("PUT", "/users", [{"id": 1, "name": "only"}]),
        get("/users"),
        req("DELETE", "/users"),
        get("/users", label="after deleting all"),
        get("/report"),
        json_req("POST", "/users", {"name": "into nothing"}, expect_status=201),
        get("/users"),
        get("/items", expect_body='"n":2'),
        json_req("POST", "/items", {"n": 9}, expect_status=201),
        get("/items", "n_eq=9"),
        get("/settings", expect_body="dark"),
        get("/settings/anything", expect_body="dark"),
        json_req("PATCH", "/settings", {"size": 12}),
        json_req("PUT", "/settings/x", {"theme": "light"}),
        get("/settings"),
        req("DELETE", "/settings/x"),
        get("/settings"),
        get("/tags/1", expect_body="b"),
        get("/tags/abc", expect_body="a", label="not a number: index 0"),
        json_req("PUT", "/tags/0", "z"),
        json_req("PATCH", "/tags/2", "y"),
        req("DELETE", "/tags/5", expect_status=404),
        json_req("POST", "/tags", "d", expect_status=201),
        get("/tags"),
        get("/people/p1", expect_body='"x"'),
        json_req("PUT", "/people/p1", {"name": "renamed"}, expect_body='"uid":"p1"'),
        json_req("POST", "/people", {"uid": "p3", "name": "z"}, expect_status=201),
        req("DELETE", "/people/p2"),
        get("/people"),
        get("/text"),
        get("/text/1"),
        json_req("POST", "/text", {"now": "json"}),
        get("/text"),
        req("OPTIONS", "/users", headers=PREFLIGHT, expect_status=200),
    ]
    return env, corpus


def _env_templating() -> tuple[dict[str, Any], list[Req]]:
    """Deterministic templating helpers, and faker ones (seeded: `FAKER_SEED`)."""
    data = [
        bucket("cntr", "counter", '{"n": 0, "list": []}'),
        bucket("reqb", "from request", "{\"q\": \"{{queryParam 'q' 'none'}}\"}"),
        bucket(
            "fkr1",
            "faked",
            '{"name": "{{faker \'person.firstName\'}}", "n": {{faker \'number.int\' 100}} }',
        ),
        bucket("brkn", "broken", '{"x": {{add 1 2}}}'),
    ]
    tpl: dict[str, str] = {
        "math": "{{add 1 2 3}} {{add '4' 1.5}} {{subtract 10 3 2}} {{multiply 2 3 4}} "
        "{{divide 10 4}} {{divide 1 0}} {{modulo 10 3}} {{ceil 1.2}} {{floor 1.8}} "
        "{{round 2.5}} {{round -2.5}} {{toFixed 3.14159 2}} {{parseInt '42px'}} {{add 'a' 1}}",
        "strings": "{{concat 'a' 'b' 1}} {{lowercase 'ABC'}} {{uppercase 'abc'}} "
        "{{padStart '7' 3 '0'}} {{padEnd 'x' 3 '-'}} {{replace 'a-b-c' '-' '+'}} "
        "{{substr 'abcdef' 1 3}} {{split 'a,b,c' ','}} {{join (split 'a b c' ' ') '|'}} "
        "{{len 'hello'}} {{len (array 1 2)}} {{indexOf 'abc' 'c'}} {{includes 'abc' 'b'}} "
        "{{base64 'hi there'}} {{base64Decode 'aGk='}} {{base64url 'a?b'}} "
        "{{base64urlDecode 'YT9i'}} {{reverse 'abc'}} {{title 'hello world'}} "
        "{{replaceAll 'aXbXc' 'X' '-'}} {{slice (array 1 2 3 4) 1 3}} {{newline}}end",
        "logic": "{{#if (gt (queryParam 'n') 5)}}big{{else}}small{{/if}} "
        "{{#switch (queryParam 'c')}}{{#case 'r'}}red{{/case}}{{#case 'g'}}green{{/case}}"
        "{{#default}}other{{/default}}{{/switch}} {{eq 1 1}} {{eq 'a' 'b'}} {{lt 1 2}} "
        "{{lte 2 2}} {{gte 1 2}} {{#unless (eq (queryParam 'c') 'r')}}not-red{{/unless}}",
        "each": "{{#each (array 'x' 'y' 'z')}}{{@index}}={{this}}{{#unless @last}},{{/unless}}"
        "{{/each}} {{#each (object a=1 b='two')}}{{@key}}:{{this}};{{/each}}",
        "repeat": '[{{#repeat 3}}{"i": {{@index}}, "first": {{@first}} }{{/repeat}}] '
        "{{#repeat 2 comma=false}}ab{{/repeat}} {{#repeat (queryParam 'n' '1')}}r{{/repeat}}",
        "json": '{{#with (jsonParse \'{"a":{"b":[1,2,3]}}\')}}{{a.b.[1]}}{{/with}} '
        "{{{stringify (jsonParse '{\"k\":[true,null]}')}}} {{{objectPath (bodyRaw) 'a.b'}}} "
        "{{{jsonPath (bodyRaw) '$.items[*].name'}}} "
        "{{{jmesPath (bodyRaw) 'items[?v > `1`].name'}}} "
        "{{{stringify (sort (array 3 1 2))}}} {{{stringify (sortBy (bodyRaw 'items') 'v' 'desc')}}} "
        "{{{stringify (filter (bodyRaw 'items') (object v=2))}}} "
        "{{{stringify (find (bodyRaw 'items') (object name='b'))}}} "
        "{{{stringify (objectMerge (object a=1) (object b=2))}}}",
        "vars": "{{setVar 'x' (add 1 2)}}{{@x}} {{setVar 'y' 'why'}}{{getVar 'y'}} "
        "{{#each (array 1 2)}}{{setVar 'z' this}}{{/each}}{{@z}}",
        "dates": "{{dateFormat '2021-03-04T05:06:07Z' 'yyyy-MM-dd HH:mm:ss'}} "
        "{{dateTimeShift date='2021-01-31T00:00:00.000Z' months=1 format='yyyy-MM-dd'}} "
        "{{dateTimeShift date='2021-01-31T10:00:00.000Z' days=-1 hours=3}} "
        "{{isValidDate '2021-02-30'}} {{isValidDate '2021-02-03'}} "
        "{{date '2020-01-01' '2020-12-31' 'yyyy-MM-dd'}}",
        "env": "{{getEnvVar 'MOCKDIFF'}}|{{getEnvVar 'MOCKOON_MOCKDIFF'}}|{{getEnvVar 'NOPE' 'dflt'}}",
        "faker": "{{faker 'person.firstName'}} {{faker 'number.int' min=1 max=100}} "
        "{{faker 'string.uuid'}} {{faker 'lorem.words' 3}} {{faker 'internet.email'}} "
        "{{faker 'location.city'}} {{faker 'number.float' '{min: 1, max: 2, fractionDigits: 3}'}} "
        "{{faker 'string.alphanumeric' 8}} {{faker 'datatype.boolean'}}",
        "faker-legacy": "{{int 1 10}} {{float 1 2}} {{uuid}} {{guid}} {{email}} {{firstName}} "
        "{{lastName}} {{city}} {{country}} {{countryCode}} {{boolean}} {{color}} {{hexColor}} "
        "{{ipv4}} {{ipv6}} {{objectId}} {{lorem 5}} {{company}} {{phone}} {{street}} "
        "{{zipcode}} {{postcode}} {{lat}} {{long}} {{domain}} {{tld}}",
        "faker-bad": "{{faker 'not.aMethod'}}",
        "data": "{{data 'counter' 'n'}} {{{data 'from request'}}} {{{data 'faked'}}} {{{data 'brkn'}}} "
        "{{#each (dataRaw 'counter' 'list')}}[{{this}}]{{/each}}",
        "set-data": "{{setData 'inc' 'counter' 'n' 2}}{{setData 'push' 'counter' 'list' "
        "(queryParam 'v')}}{{data 'counter'}}",
        "broken": "{{#if}}never closed",
        "missing-helper": "{{notAHelper 'x'}} after",
        "triple": "{{{body}}} vs {{body}}",
        "html-escape": "{{queryParam 'h'}} vs {{{queryParam 'h'}}}",
        "jwt": "{{jwtPayload 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMiLCJuYW1lIjoiSm8ifQ.sig' 'name'}}"
        "|{{jwtHeader 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.sig' 'alg'}}",
    }
    routes = [
        route(
            "all",
            f"t/{name}",
            [
                response(
                    body,
                    default=True,
                    headers=[
                        H("Content-Type", "text/plain"),
                    ],
                )
            ],
        )
        for name, body in tpl.items()
    ]
    routes.append(
        route(
            "get",
            "t/faker-header",
            [
                response(
                    "see headers",
                    default=True,
                    headers=[
                        H("X-Faker", "{{faker 'string.uuid'}}"),
                        H("X-Name", "{{faker 'person.lastName'}}"),
                    ],
                )
            ],
        )
    )
    env = environment("mockdiff templating", routes, data=data)
    items = {
        "a": {"b": {"c": 1}},
        "items": [{"name": "a", "v": 1}, {"name": "b", "v": 2}, {"name": "c", "v": 3}],
    }
    corpus = [
        get("/t/math", expect_body="6 "),
        get("/t/strings"),
        get("/t/logic", "n=7&c=r", expect_body="big red"),
        get("/t/logic", "n=3&c=g", expect_body="small green"),
        get("/t/logic", "c=x", expect_body="other"),
        get("/t/each", expect_body="0=x,1=y,2=z"),
        get("/t/repeat", "n=3"),
        json_req("POST", "/t/json", items),
        get("/t/vars"),
        get("/t/dates", expect_body="2021-03-04 05:06:07"),
        get("/t/env", expect_body="from the environment|from the environment|dflt"),
        get("/t/faker"),
        get("/t/faker"),
        get("/t/faker-legacy"),
        get("/t/faker-header"),
        get("/t/faker-bad"),
        get("/t/data", "q=first"),
        get("/t/data", "q=second", label="request-helper bucket fixed on first use"),
        get("/t/set-data", "v=one"),
        get("/t/set-data", "v=two"),
        get("/t/data"),
        get("/t/broken"),
        get("/t/missing-helper"),
        json_req("POST", "/t/triple", {"h": "<b>&'\""}),
        get("/t/html-escape", "h=%3Cb%3E%26%27%22"),
        get("/t/jwt"),
        get("/t/faker", label="faker state after everything"),
    ]
    return env, corpus


FILES: dict[str, bytes] = {
    "files/data.json": b'{\n  "name": "{{queryParam \'name\' \'anon\'}}",\n  "static": true\n}\n',
    "files/plain.txt": b"Hello {{urlParam 'who'}}!\nSecond line, \xc3\xa9t\xc3\xa9.\n",
    "files/page.html": b"<html><body><p>{{queryParam 'p' 'default'}}</p></body></html>\n",
    "files/report.csv": b"id,name\n{{#repeat 2 comma=false}}{{@index}},row{{@index}}\n{{/repeat}}",
    "files/template.handlebars": b"two plus three is {{add 2 3}}\n",
    "files/blob.bin": bytes(range(256)) + b"{{not templated}}",
    "files/no-extension": b"no extension {{add 1 1}}\n",
}


def _env_files() -> tuple[dict[str, Any], list[Req]]:
    """FILE bodies (`filePath` relative to the environment file), sent as body or as an
    attachment, templated or not, with ranges, missing files and templated paths."""

    def f(path: str, as_body: bool = True, **kw: Any) -> dict[str, Any]:
        return response(
            body_type="FILE", file_path=path, send_file_as_body=as_body, default=True, **kw
        )

    routes = [
        route("get", "file/json", [f("files/data.json")]),
        route("get", "file/json-download", [f("files/data.json", False)]),
        route("get", "file/text/:who", [f("files/plain.txt")]),
        route("get", "file/html", [f("files/page.html")]),
        route("get", "file/csv", [f("files/report.csv")]),
        route("get", "file/handlebars", [f("files/template.handlebars")]),
        route("get", "file/binary", [f("files/blob.bin")]),
        route("get", "file/binary-download", [f("files/blob.bin", False)]),
        route("get", "file/no-extension", [f("files/no-extension")]),
        route("get", "file/by-name/:name", [f("files/{{urlParam 'name'}}")]),
        route("get", "file/missing", [f("files/missing.txt")]),
        route(
            "get",
            "file/missing-404",
            [f("files/missing.txt", body="gone {{queryParam 'x'}}", fallback_to_404=True)],
        ),
        route(
            "get",
            "file/content-type",
            [f("files/data.json", headers=[H("Content-Type", "text/plain")])],
        ),
        route("get", "file/no-templating", [f("files/data.json", disable_templating=True)]),
        route("get", "file/empty-path", [f("", body="inline fallback {{queryParam 'x'}}")]),
        route("get", "file/up-a-level", [f("../mockoon/basic-folder-2-routes.json")]),
    ]
    env = environment("mockdiff files", routes, headers=[H("X-Env", "files")])
    corpus = [
        get("/file/json", "name=Zoe", expect_body='"name": "Zoe"'),
        get("/file/json-download"),
        get("/file/text/world", expect_body="Hello world!"),
        get("/file/html", "p=para"),
        get("/file/csv", expect_body="1,row1"),
        get("/file/handlebars", expect_body="two plus three is 5"),
        get("/file/binary"),
        get("/file/binary-download"),
        get("/file/binary", headers={"Range": "bytes=0-9"}, expect_status=206),
        get("/file/binary", headers={"Range": "bytes=250-"}, expect_status=206),
        get("/file/binary", headers={"Range": "bytes=-5"}, expect_status=206),
        get("/file/binary", headers={"Range": "bytes=400-500"}, expect_status=416),
        get("/file/binary", headers={"Range": "pages=1"}, label="malformed range"),
        get("/file/binary", headers={"Range": "bytes=0-1,4-5"}, label="multiple ranges"),
        req("HEAD", "/file/binary"),
        get("/file/no-extension"),
        get("/file/by-name/data.json", "name=byname"),
        get("/file/by-name/blob.bin"),
        get("/file/by-name/nope.txt", label="missing, templated path"),
        get("/file/by-name/..%2F..%2Fmockoon%2Ftest-env.json", label="path traversal"),
        get("/file/missing", expect_body="ENOENT"),
        get("/file/missing-404", "x=1", expect_status=404, expect_body="gone 1"),
        get("/file/content-type", "name=ct"),
        get("/file/no-templating", expect_body="{{queryParam"),
        get("/file/empty-path", "x=2", expect_body="inline fallback 2"),
        get("/file/up-a-level", expect_body="Basic folder 2 routes"),
    ]
    return env, corpus


def _env_cors_on() -> tuple[dict[str, Any], list[Req]]:
    """`cors: true` with an endpoint prefix and environment headers that override CORS ones."""
    routes = [
        route("get", "things", [response('{"things": []}', default=True)]),
        route("post", "things", [response('{"created": true}', 201, default=True)]),
        route("get", "things/:id", [response('{"id": "{{urlParam \'id\'}}"}', default=True)]),
        route(
            "options",
            "custom-options",
            [response("user options", 204, default=True, headers=[H("Allow", "GET, OPTIONS")])],
        ),
    ]
    env = environment(
        "mockdiff cors on",
        routes,
        cors=True,
        prefix="api/v1",
        headers=[
            H("Content-Type", "application/json"),
            H("Access-Control-Allow-Origin", "http://allowed.example"),
            H("X-Env-Method", "{{method}}"),
        ],
    )
    corpus = [
        get("/api/v1/things", expect_body="things"),
        get("/things", expect_status=404, label="outside the prefix"),
        req("OPTIONS", "/api/v1/things", headers=PREFLIGHT, expect_status=200),
        req("OPTIONS", "/api/v1/unknown", headers=PREFLIGHT, expect_status=200),
        req("OPTIONS", "/elsewhere", headers=PREFLIGHT, expect_status=200),
        req("OPTIONS", "/api/v1/things", label="OPTIONS without preflight headers"),
        req("OPTIONS", "/api/v1/custom-options", headers=PREFLIGHT, expect_status=204),
        req(
            "POST", "/api/v1/things", headers={"Origin": "http://client.example"}, expect_status=201
        ),
        get("/api/v1/things/7", expect_body='"id": "7"'),
        get("/api/v1//things", expect_body="things"),
        get("/api/v1/things/", label="trailing slash"),
        get("/API/V1/THINGS", label="case"),
        get("/api/v2/things", expect_status=404),
    ]
    return env, corpus


def _env_cors_off() -> tuple[dict[str, Any], list[Req]]:
    """`cors: false`, an environment latency, and an explicit OPTIONS route."""
    routes = [
        route("get", "hello", [response("hello", default=True)]),
        route("options", "hello", [response("", 204, default=True, headers=[H("Allow", "GET")])]),
    ]
    env = environment(
        "mockdiff cors off",
        routes,
        cors=False,
        latency=30,
        headers=[H("Content-Type", "text/plain")],
    )
    corpus = [
        req("OPTIONS", "/hello", headers=PREFLIGHT, expect_status=204, min_ms=30),
        req("OPTIONS", "/other", headers=PREFLIGHT, expect_status=404, min_ms=30),
        get("/hello", expect_body="hello", min_ms=30),
        get("/missing", expect_status=404, min_ms=30),
    ]
    return env, corpus


GENERATED: dict[str, Callable[[], tuple[dict[str, Any], list[Req]]]] = {
    "gen-requests.json": _env_requests,
    "gen-rules.json": _env_rules,
    "gen-modes.json": _env_modes,
    "gen-crud.json": _env_crud,
    "gen-templating.json": _env_templating,
    "gen-files.json": _env_files,
    "gen-cors-on.json": _env_cors_on,
    "gen-cors-off.json": _env_cors_off,
}


def generated_fixtures() -> dict[str, bytes]:
    """Every file of tests/fixtures/mockdiff/, by path relative to it."""
    out = {
        name: (json.dumps(build()[0], indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        for name, build in GENERATED.items()
    }
    out.update(FILES)
    return out


def write_fixtures(root: Path = GEN_DIR) -> None:
    """(Re)write tests/fixtures/mockdiff/ from `generated_fixtures()`."""
    for rel, content in generated_fixtures().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


# ---------------------------------------------------------------------------------------------
# the real fixtures' corpus


def _real_test_env() -> list[Req]:
    crud_path = "/data-bucket"
    return [
        get("/test", expect_body="{}"),
        get("/test2", expect_body='"route": "test2"'),
        get("/file", expect_body="ENOENT", label="missing ../test.data"),
        get("/faker"),
        get("/faker"),
        get("/envvar-prefix-default"),
        get("/envvar-prefix-custom"),
        get("/envvar-no-prefix"),
        get("/get-env-var", expect_body="mockdiff test var"),
        get("/get-global-var"),
        get("/set-global-var"),
        get("/get-global-var", expect_body="value1"),
        get(crud_path, expect_body="true"),
        get(crud_path + "/1"),
        json_req("POST", crud_path, {"a": 1}, expect_status=201),
        get(crud_path),
        json_req("PUT", crud_path + "/1", {"b": 2}),
        json_req("PATCH", crud_path, {"c": 3}),
        json_req("PATCH", crud_path + "/1", {"d": 4}),
        get(crud_path),
        req("DELETE", crud_path + "/1"),
        get(crud_path),
        json_req("PUT", crud_path, [1, 2]),
        req("DELETE", crud_path),
        get(crud_path),
        req("OPTIONS", "/test", headers=PREFLIGHT, expect_status=404, label="cors false"),
        req("POST", "/test", expect_status=404),
        get("/nope", expect_status=404),
    ]


def _real_response_rules() -> list[Req]:
    def r(expect: str, **kw: Any) -> Req:
        return Req("GET", "/rules/1", expect_body=expect, **kw)

    def rb(value: Any, expect: str) -> Req:
        return json_req("GET", "/rules/x", value, expect_body=expect)

    return [
        get("/users/1", expect_status=500),
        json_req("GET", "/users/1", {"test": "test"}, expect_status=500),
        get("/rules/x", expect_body="16", label="no body: property1 reads as ''"),
        json_req("GET", "/rules/x", {"other": 1}, expect_body="0"),
        get("/rules/x", "obj[prop2]=value1", expect_body="1"),
        get("/rules/x", "array[]=test2", expect_body="2"),
        get("/rules/x", "array=test3", expect_body="16"),
        r("3"),
        get("/rules/x", headers={"Accept-Charset": "UTF-8"}, expect_body="4"),
        get("/rules/x", headers={"Accept-Charset": "UTF-16"}, expect_body="5"),
        rb({"name": "john"}, "6"),
        rb({"user": [{"name": "John"}]}, "7"),
        rb({"users": ["Paul", "Ringo"]}, "8"),
        rb({"user": "Richard"}, "9"),
        rb({"users": ["Richard"]}, "10"),
        rb({"test": "test"}, "11"),
        rb({"test": 1}, "12"),
        rb({"test": True}, "13"),
        req(
            "GET",
            "/rules/x",
            headers={"Content-Type": "text/plain"},
            body="testfullbody",
            expect_body="14",
        ),
        req(
            "GET",
            "/rules/x",
            headers={"Content-Type": "text/plain"},
            body="the body2",
            expect_body="15",
        ),
        rb({"property1": None}, "16"),
        form_req(
            "GET",
            "/rules/x",
            [("var1", "val1"), ("object[property]", "objv1")],
            expect_body="formdata",
        ),
        rb(
            [
                {
                    "deep": {
                        "property.with.dots": "val1",
                        "deeper": {
                            "another.property.with.dots": [{"final.property.with.dots": "val2"}]
                        },
                    }
                }
            ],
            "propertywithdots",
        ),
        get("/operator/x", expect_status=500),
        *[get("/random-sequential", label=f"#{n}") for n in range(1, 4)],
        get("/disable-rules", expect_status=202),
        json_req("GET", "/disable-rules", {"test": "value1"}, expect_status=204),
        *[get("/requestnumber", label=f"#{n}") for n in range(1, 5)],
        req("OPTIONS", "/rules/1", headers=PREFLIGHT, expect_status=200),
        get("/nope", expect_status=404),
    ]


def _real_databuckets() -> list[Req]:
    return [
        get("/databucket", expect_body='"response"'),
        get("/databucketWithReqHelper", "param=first", expect_body="first"),
        get("/databucketWithReqHelper", "param=second", expect_body="first"),
        get("/databucketWithImbricatedReqHelper", "limit=3", expect_body="testtesttest"),
        get("/multipleDatabucketsFromBody", "param=p&limit=1"),
        get("/nestedDatabuckets", "param=zzz"),
        get("/databucket"),
        req("OPTIONS", "/databucket", headers=PREFLIGHT, expect_status=200),
        get("/nope", expect_status=404),
    ]


def _real_callbacks() -> list[Req]:
    return [
        get("/inline"),
        get("/file", expect_body="ENOENT", label="missing ../body-files/file1.txt"),
        get("/databucket", expect_body="hello"),
        req("OPTIONS", "/inline", headers=PREFLIGHT, expect_status=200),
    ]


def _real_basic_folder() -> list[Req]:
    return [
        get("/test1", expect_body="{}"),
        get("/test2", expect_body="{}"),
        get("/test3", expect_status=404),
        req("HEAD", "/test1"),
        req("OPTIONS", "/test1", headers=PREFLIGHT, expect_status=200),
    ]


def _real_demo() -> list[Req]:
    auth = {"Authorization": "Bearer t"}
    return [
        get("/users", "limit=3", expect_body='"username"'),
        get("/users", "limit=2&page=25&sort=username&order=desc"),
        get("/users/does-not-exist", expect_status=404),
        json_req("POST", "/users", {"username": "neo"}, expect_status=201),
        get("/users", "username_eq=neo", expect_body='"neo"'),
        get("/users", "search=neo"),
        req("DELETE", "/users/does-not-exist", expect_status=404),
        get("/template", "total=2", expect_body='"total": "2"'),
        get("/template", label="ten users"),
        req("POST", "/content/xyz", expect_body="Content XYZ"),
        req("POST", "/content/abc", expect_status=404),
        req("POST", "/content", expect_status=404),
        req("PUT", "/path/with/pattern/", expect_status=404, label="the demo text says it matches"),
        req("PUT", "/path/with/pattern/x", expect_body="match the following"),
        req("PUT", "/path/with/patterns/anything-else", expect_body="match the following"),
        req("PUT", "/path/with/x", expect_status=404),
        get("/protected/path", expect_status=401),
        get("/protected/path", headers=auth, expect_status=200),
        req("POST", "/protected/other", expect_status=401),
        req("POST", "/protected/other", headers=auth, expect_status=404),
        get("/forward-and-record", expect_body="proxy"),
        req("OPTIONS", "/users", headers=PREFLIGHT, expect_status=200),
    ]


class EnvCase(NamedTuple):
    """An environment file and the corpus to play against it."""

    name: str
    path: Path
    corpus: list[Req]


# Real fixtures Mockoon's strict schema rejects: mockoon-cli loads them through its repairing
# validation (EnvironmentSchema, migrations, repairRefs), so a second target must too.
REPAIRED_ON_LOAD: dict[str, str] = {
    "basic-folder-2-routes": "lastMigration 32: routes lack streamingMode/streamingInterval",
    "callbacks": "data buckets and callbacks lack documentation",
    "databuckets": "data buckets lack documentation",
    "demo-api-generated": "route 7 lacks uuid/type/modes and is missing from rootChildren",
}

# Not served: incompatible.json has lastMigration 9999999999999, which mockoon-cli refuses.
REAL_ENVIRONMENTS: list[EnvCase] = [
    EnvCase("test-env", REAL_DIR / "test-env.json", _real_test_env()),
    EnvCase("response-rules", REAL_DIR / "response-rules.json", _real_response_rules()),
    EnvCase("databuckets", REAL_DIR / "databuckets.json", _real_databuckets()),
    EnvCase("callbacks", REAL_DIR / "callbacks.json", _real_callbacks()),
    EnvCase("basic-folder-2-routes", REAL_DIR / "basic-folder-2-routes.json", _real_basic_folder()),
    EnvCase("demo-api-generated", REAL_DIR / "demo-api-generated-commons-9.9.0.json", _real_demo()),
    EnvCase("demo-api-repaired", REAL_DIR / "demo-api-repaired-commons-9.9.0.json", _real_demo()),
]

GENERATED_ENVIRONMENTS: list[EnvCase] = [
    EnvCase(name.removesuffix(".json"), GEN_DIR / name, build()[1])
    for name, build in GENERATED.items()
]

ENVIRONMENTS: list[EnvCase] = REAL_ENVIRONMENTS + GENERATED_ENVIRONMENTS


if __name__ == "__main__":
    write_fixtures()
    for case in ENVIRONMENTS:
        print(f"{case.name}: {len(case.corpus)} requests ({case.path.relative_to(TESTS)})")
