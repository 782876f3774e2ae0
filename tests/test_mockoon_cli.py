"""Interop with the real Mockoon CLI (`@mockoon/cli`, pinned in tests/interop/package-lock.json,
installed by `npm ci --prefix tests/interop`): it serves a linked file with `--watch` and follows
edits made through the daemon's socket; an editor's save of that file reaches the document.

Only loopback: the mock server listens on 127.0.0.1, on a port chosen free by the OS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
from helpers import free_port
from modelutil import FIXTURE_DIR

from peerdaemon.api.client import AsyncClient
from peerdaemon.daemon.supervisor import DaemonConfig, serve

INTEROP = Path(__file__).parent / "interop"
MOCKOON_CLI = INTEROP / "node_modules" / ".bin" / "mockoon-cli"
POLLING_MS = 100  # mockoon-cli --polling-interval: how often it stats the data file
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def http_get(url: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None


def start_mockoon_cli(data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`mockoon-cli start --data FILE --watch` on 127.0.0.1:port (logs to `log`)."""
    if not MOCKOON_CLI.exists():
        pytest.fail(f"@mockoon/cli is not installed: run `npm ci --prefix {INTEROP}`")
    home = log.parent / "home"
    home.mkdir(exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                NODE or "node",
                str(MOCKOON_CLI),
                "start",
                "--data",
                str(data),
                "--port",
                str(port),
                "--hostname",
                "127.0.0.1",
                "--watch",
                "--polling-interval",
                str(POLLING_MS),
                "--disable-log-to-file",
                "--disable-admin-api",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "HOME": str(home)},
        )


async def served(url: str, expected: str, timeout: float, log: Path) -> float:
    """Poll `url` until it answers 200 with `expected`; returns the seconds it took."""
    start = trio.current_time()
    last = None
    with trio.move_on_after(timeout):
        while True:
            last = await trio.to_thread.run_sync(http_get, url)
            if last == (200, expected):
                return trio.current_time() - start
            await trio.sleep(0.05)
    raise AssertionError(
        f"{url} did not serve {expected!r} within {timeout} s (last answer {last!r}); "
        f"mockoon-cli said:\n{log.read_text(errors='replace')[-3000:]}"
    )


async def peerdaemon_cli(sock: Path, *args: str) -> str:
    result = await trio.run_process(
        [sys.executable, "-m", "peerdaemon", "--socket", str(sock), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_mockoon_cli_serves_a_linked_file_and_follows_both_ways():
    root = Path(tempfile.mkdtemp(prefix="pdmk"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        data = root / "env.json"
        shutil.copy(FIXTURE_DIR / "test-env.json", data)
        sock = root / "pd.sock"
        config = DaemonConfig(data_dir=root / "data", socket_path=sock)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            # `peerdaemon env import FILE --link`, as a user would
            env_id = (await peerdaemon_cli(sock, "env", "import", str(data), "--link")).strip()
            links = json.loads(await peerdaemon_cli(sock, "env", "links", "--json"))
            assert [(x["id"], x["path"]) for x in links] == [(env_id, str(data))]

            port = free_port()
            log = root / "mockoon-cli.log"
            proc = start_mockoon_cli(data, port, log)
            url = f"http://127.0.0.1:{port}/test2"
            await served(url, '{\n  "route": "test2"\n}', 30.0, log)

            # 1. an edit through the socket: daemon -> file -> mockoon-cli --watch -> HTTP
            async with await AsyncClient.connect(sock) as client:
                body = '{"route": "edited through the peerdaemon socket"}'
                await client.patch(
                    env_id, [{"op": "replace", "path": "/routes/1/responses/0/body", "value": body}]
                )
                took = await served(url, body, 20.0, log)
                assert took < 20.0

                # 2. an editor saves the file: file -> document (and mockoon-cli serves it too)
                env = json.loads(data.read_text(encoding="utf-8"))
                env["routes"][1]["responses"][0]["body"] = "saved in an editor"
                tmp = data.with_name(".env.json.swp")
                tmp.write_text(json.dumps(env, indent=2), encoding="utf-8")
                os.replace(tmp, data)
                pointer = "/routes/1/responses/0/body"
                with trio.fail_after(5):
                    while (
                        json.loads(await peerdaemon_cli(sock, "env", "get", env_id, pointer))
                        != "saved in an editor"
                    ):
                        await trio.sleep(0.05)
                await served(url, "saved in an editor", 20.0, log)
                assert proc.poll() is None, log.read_text(errors="replace")
            nursery.cancel_scope.cancel()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()  # by pid: the process this test started
            proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
