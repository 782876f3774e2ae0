"""What the mock serving tests share: the installed runner, HTTP on loopback, a small env."""

from __future__ import annotations

import http.client
import uuid
from pathlib import Path
from typing import Any

import pytest

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
    return {
        "uuid": str(uuid.uuid4()),
        "type": "http",
        "documentation": "",
        "method": method,
        "endpoint": endpoint,
        "responses": [
            {
                "uuid": str(uuid.uuid4()),
                "body": body,
                "latency": latency,
                "statusCode": 200,
                "label": "",
                "headers": [{"key": "Content-Type", "value": "text/plain"}],
                "bodyType": "INLINE",
                "filePath": "",
                "databucketID": "",
                "sendFileAsBody": False,
                "rules": [],
                "rulesOperator": "OR",
                "disableTemplating": False,
                "fallbackTo404": False,
                "default": True,
                "crudKey": "id",
                "callbacks": [],
            }
        ],
        "responseMode": None,
        "streamingMode": None,
        "streamingInterval": 0,
    }


def small_env(name: str = "Served", port: int = 3000, **extra: Any) -> dict[str, Any]:
    env_id = str(uuid.uuid4())
    routes = [route("hello", "hello v1"), route("slow", "slow done", latency=600)]
    return {
        "uuid": env_id,
        "lastMigration": 33,
        "name": name,
        "endpointPrefix": "",
        "latency": 0,
        "port": port,
        "hostname": "127.0.0.1",
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
        "cors": True,
        "headers": [],
        "proxyReqHeaders": [],
        "proxyResHeaders": [],
        "data": [],
        "callbacks": [],
        **extra,
    }


def env_runner_pid(data: Any) -> int | None:
    return data.mocks.shell.pid if data is not None and data.mocks is not None else None
