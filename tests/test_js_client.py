"""The documented JavaScript client of the local socket (docs/js-client/peerdaemon-client.mjs,
no dependency) against a real daemon: status, import, an error's code, Yjs bytes both ways, and
a subscription that receives a change made from Python."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from daemonutil import (
    InProcessDaemon,
    base_fixture,  # noqa: F401  (fixture)
)
from modelutil import FIXTURE_DIR

from peerdaemon.daemon.supervisor import DaemonConfig

SCRIPT = Path(__file__).parent / "interop" / "local_socket_client.mjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


async def test_the_javascript_client_talks_to_a_real_daemon(base, nursery):
    d = InProcessDaemon(base, "d")
    await d.start_with(nursery, DaemonConfig(d.data_dir, d.socket_path))
    process = await trio.lowlevel.open_process(
        [NODE or "node", str(SCRIPT), str(d.socket_path), str(FIXTURE_DIR / "test-env.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    steps: dict[str, dict] = {}
    buffer = b""
    try:
        with trio.fail_after(20):
            async for chunk in process.stdout:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    step = json.loads(line)
                    steps[step["step"]] = step
                    if step["step"] == "subscribed":  # now a change from elsewhere
                        await d.op(
                            "env.patch",
                            id=steps["imported"]["id"],
                            patch=[{"op": "replace", "path": "/name", "value": "from python"}],
                        )
            assert await process.wait() == 0, (await process.stderr.receive_some()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert steps["status"]["environments"] == 0
    assert steps["error"] == {"step": "error", "code": "not-found"}
    assert steps["yjs"]["isBytes"] and steps["yjs"]["bytes"] > 100
    assert steps["yjs"]["changed"] is False
    assert steps["subscribed"]["name"] == "Test env"
    assert steps["change"] == {
        "step": "change",
        "paths": ["/name"],
        "origin": "local",
        "update": True,
    }
    await d.stop()
