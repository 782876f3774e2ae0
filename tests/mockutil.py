"""What the mock serving tests share: the installed runner, HTTP on loopback, a small env."""

from __future__ import annotations

import http.client
import uuid
from pathlib import Path
from typing import Any

import pytest

from peerdaemon.model import prepare

TESTS = Path(__file__).parent
RUNNER_DIR = TESTS / ".mock" / "mock-runner"
INSTALL = ".venv/bin/peerdaemon mock install --data-dir tests/.mock"


def require_runner(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the daemon at the runner `mock install` put under tests/.mock (README, .ci/run)."""
    if not (RUNNER_DIR / "node_modules" / "@mockoon" / "commons-server").is_dir():
        pytest.fail(f"the mock runner is not installed: run `{INSTALL}` (before the tests)")
    monkeypatch.setenv("PEERDAEMON_MOCK_RUNNER", str(RUNNER_DIR))
    return RUNNER_DIR


def request(
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own: (status, lower-case headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def route(endpoint: str, body: str, *, method: str = "get", latency: int = 0) -> dict[str, Any]:
    """A route with one text response; the rest are Mockoon's defaults (filled by `complete`)."""
    return {
        "uuid": str(uuid.uuid4()),
        "type": "http",
        "method": method,
        "endpoint": endpoint,
        "responses": [
            {
                "uuid": str(uuid.uuid4()),
                "body": body,
                "latency": latency,
                "headers": [{"key": "Content-Type", "value": "text/plain"}],
            }
        ],
    }


def complete(env: dict[str, Any]) -> dict[str, Any]:
    """Every field Mockoon writes, with its default where not given (the model's own repair)."""
    for r in env["routes"]:
        for response in r["responses"]:
            response.setdefault("default", response is r["responses"][0])
    return prepare(env, env["uuid"])[0]


def small_env(name: str = "Served", port: int = 3000, **extra: Any) -> dict[str, Any]:
    """Two routes: `/hello` answers `hello v1`, `/slow` after 600 ms; complete, so that tests
    may append routes (their `rootChildren` too) before importing it."""
    routes = [route("hello", "hello v1"), route("slow", "slow done", latency=600)]
    env = {
        "uuid": str(uuid.uuid4()),
        "name": name,
        "port": port,
        "hostname": "127.0.0.1",
        "cors": True,
        "routes": routes,
        **extra,
    }
    return complete(env)
