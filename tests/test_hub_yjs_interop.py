"""The hub's `/yjs/SPACE/ENV` endpoint with the real npm `yjs` + `y-websocket` (pinned in
tests/interop/package-lock.json, installed by `npm ci --prefix tests/interop`).

`tests/interop/hub_yjs.test.mjs` joins an environment, sees what the daemon wrote, renames it
and edits a response body (a Y.Text), waits until a fresh client holds that edit, and checks
that a wrong token gets permission-denied and a close with no data. Here, the daemon's side:
a real daemon (in this process) shares the environment in a space attached to the hub, and its
export must show the JavaScript client's edit. A second test does the same against the hub's
documents alone (the model layout written and exported with `peerdaemon.model`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from modelutil import load
from pycrdt import Doc

from peerdaemon.api.client import open_client
from peerdaemon.core.events import EventLog
from peerdaemon.daemon.supervisor import DaemonConfig, serve
from peerdaemon.hub.accounts import Accounts
from peerdaemon.hub.docs import HubDocs
from peerdaemon.hub.server import HubConfig, serve_hub
from peerdaemon.model import apply_environment, export_environment, prepare
from peerdaemon.store import Store

INTEROP = Path(__file__).parent / "interop"
SCRIPT = INTEROP / "hub_yjs.test.mjs"
NODE = shutil.which("node")
NEW_NAME = "renamed by a yjs client"
PREFIX = "/* from yjs */"

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="pdyjs"))  # short: the daemon's socket lives here
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def running_hub(data_dir: Path):
    config = HubConfig(data_dir=data_dir, listen=("127.0.0.1", 0), accounts_poll=0.05)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_hub, config)
        yield server
        nursery.cancel_scope.cancel()


async def run_js(port: int, space: str, env_id: str, token: str, expect_name: str) -> dict:
    if not (INTEROP / "node_modules" / "y-websocket").exists():
        pytest.fail(f"y-websocket is not installed: run `npm ci --prefix {INTEROP}`")
    argv = [
        NODE or "node",
        str(SCRIPT),
        "--url",
        f"ws://127.0.0.1:{port}/yjs/{space}",
        "--room",
        env_id,
        "--token",
        token,
        "--device",
        "interop-js",
        "--expect-name",
        expect_name,
        "--set-name",
        NEW_NAME,
        "--body-prefix",
        PREFIX,
    ]
    with trio.fail_after(40):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    lines = done.stdout.decode().strip().splitlines()
    assert lines, done.stderr.decode()
    result = json.loads(lines[-1])
    assert done.returncode == 0 and result["ok"], (result, done.stderr.decode()[-2000:])
    return result


def first_body(env: dict) -> str:
    route = env["routes"][0]
    return route["responses"][0]["body"]


async def test_yjs_client_and_a_daemon_through_the_hub(base):
    env_json = load("test-env.json")
    with Accounts.open(base / "hub") as accounts:
        token = accounts.add_user("alice")
    async with running_hub(base / "hub") as hub:
        config = DaemonConfig(base / "d", base / "d.sock", name="laptop", mdns=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            async with open_client(config.socket_path) as daemon:
                space = (await daemon.call("space.create", name="Team"))["id"]
                env_id = (await daemon.import_env(env_json, new_id=True))["id"]
                await daemon.call("env.share", id=env_id, space=space)
                hub_url = f"ws://127.0.0.1:{hub.port}"
                key = hub.peer_endpoint.identity.device_id  # ws:// does not authenticate it
                await daemon.call("space.hub", space=space, url=hub_url, token=token, hub_key=key)
                with trio.fail_after(15):
                    while not hub.docs.has(space, env_id):
                        await trio.sleep(0.02)

                result = await run_js(hub.port, space, env_id, token, env_json["name"])
                assert result["steps"]["seen"]["routes"] == len(env_json["routes"])
                denied = result["steps"]["denied"]
                assert denied["close"] == {"code": 4401, "reason": "unauthorized"}

                with trio.fail_after(15):  # the daemon's export shows the JavaScript edit
                    while True:
                        exported = await daemon.export(env_id)
                        if exported["name"] == NEW_NAME and first_body(exported).startswith(PREFIX):
                            break
                        await trio.sleep(0.05)
                assert first_body(exported) == PREFIX + first_body(env_json)
            nursery.cancel_scope.cancel()


async def test_yjs_client_on_the_hubs_documents(base):
    """The same, with the environment written into the hub's documents as a daemon would."""
    env_json = load("test-env.json")
    with Accounts.open(base / "hub") as accounts:
        token = accounts.add_user("alice")
        accounts.create_space("team", "alice")
    prepared, _ = prepare(env_json)
    doc = Doc()
    apply_environment(doc, prepared)
    env_id = env_json["uuid"]
    async with running_hub(base / "hub") as hub:
        hub.docs.apply("team", env_id, doc.get_update(), "peer:TEST")
        await run_js(hub.port, "team", env_id, token, env_json["name"])
        exported = export_environment(hub.docs.get_doc("team", env_id), env_id)
        assert exported["name"] == NEW_NAME
        assert first_body(exported) == PREFIX + first_body(env_json)
    store = Store.open(base / "hub")  # and it is on disk
    try:
        docs = HubDocs(store, EventLog())
        docs.load()
        assert export_environment(docs.get_doc("team", env_id), env_id)["name"] == NEW_NAME
    finally:
        store.close()
