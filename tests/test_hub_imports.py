"""What a started hub keeps loaded: not the daemon's machinery it never uses (issue 13, the
hub's idle memory). Each module below is loaded on first use instead (a daemon's link, an
awareness, a hosted mock, another CLI command)."""

from __future__ import annotations

import subprocess
import sys

from helpers import SPACE, setup_accounts

NOT_AT_START = [
    "peerdaemon.cli.env",  # other command groups (cli/__init__.py loads the invoked one)
    "peerdaemon.cli.doctor",
    "peerdaemon.spaces.service",  # the device's spaces (spaces/__init__.py)
    "peerdaemon.spaces.invite",
    "peerdaemon.mirror",  # a hosted mock's files (hub/mocks.py)
    "peerdaemon.presence",  # the first awareness (hub/peers.py)
    "peerdaemon.peer.link",  # the first daemon (hub/peers.py)
    "cryptography",  # the first signature: a daemon's handshake (core/identity.py)
    "peerdaemon.peer",  # the first daemon on /peer (hub/http.py, hub/peers.py)
    "peerdaemon.hub.peer_socket",
    "wsproto",  # (core/websocket.py: the hub reads its clients' frames with core/wsframes.py)
    "peerdaemon.hub.mocks",  # the first hosted mock or /mock/ request (hub/cloudmock.py)
    "peerdaemon.hub.mockproxy",
    "peerdaemon.hub.mockgate",
    "peerdaemon.mock",
    "peerdaemon.core.registry",  # (the mock runner's and presence's services)
    "peerdaemon.model.document",  # the document model (model/__init__.py: the hub reads lib0)
    "peerdaemon.presence.service",  # (presence/__init__.py: the hub's bridge uses the core)
    "peerdaemon.api.client",  # the daemon's client: commands that talk to one (cli/common.py)
    "http.client",  # `hub status` (hub/server.py)
]


def test_hub_serve_imports_leave_the_rest_unloaded():
    code = (
        "import sys; from peerdaemon import cli; cli.build_parser(cli.command_of(['hub', 'serve']));"
        "import peerdaemon.hub.server; print(' '.join(sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "peerdaemon.hub.server" in loaded
    assert [m for m in NOT_AT_START if m in loaded] == []


def test_a_started_hub_leaves_the_peer_protocol_and_cryptography_unloaded(tmp_path):
    """A hub that serves y-websocket clients only never needs the daemons' protocol: it starts,
    reads its identity (its key fingerprint is logged) and listens without loading it; the
    first daemon's connection loads it (tests/test_hub_link.py)."""
    code = f"""
import sys, trio
from pathlib import Path
from peerdaemon.hub.server import HubConfig, serve_hub

async def main():
    async with trio.open_nursery() as nursery:
        config = HubConfig(data_dir=Path({str(tmp_path)!r}), listen=("127.0.0.1", 0))
        server = await nursery.start(serve_hub, config)
        print(server.peer_endpoint.identity.device_id)
        nursery.cancel_scope.cancel()

trio.run(main)
print(" ".join(sys.modules))
"""
    devices = []
    for _ in range(2):  # the first start makes the key, the next reads it kept
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        device, modules = done.stdout.strip().split("\n")[-2:]
        devices.append(device)
        loaded = set(modules.split())
        assert len(device) == 59 and "peerdaemon.hub.peers" in loaded
        assert sorted(m for m in loaded if m.split(".")[0] == "cryptography") == []
        assert [m for m in ("peerdaemon.peer", "peerdaemon.hub.peer_socket") if m in loaded] == []
    assert devices[0] == devices[1]


def test_y_websocket_clients_awareness_leaves_the_presence_service_unloaded(tmp_path):
    """Every y-websocket client sends awareness, which the hub's presence bridge reads with the
    presence core: that loads neither the presence service nor the registry and the document
    model behind it."""
    token = setup_accounts(tmp_path, "alice")["alice"]
    code = f"""
import sys, trio
from pathlib import Path
from trio_websocket import open_websocket_url
from peerdaemon.core.awareness import AwarenessEntry, encode_awareness
from peerdaemon.hub.server import HubConfig, serve_hub
from peerdaemon.hub.ywebsocket import awareness_message

async def main():
    async with trio.open_nursery() as nursery:
        config = HubConfig(data_dir=Path({str(tmp_path)!r}), listen=("127.0.0.1", 0))
        server = await nursery.start(serve_hub, config)
        url = f"ws://127.0.0.1:{{server.port}}/yjs/{SPACE}/doc?token={token}"
        async with open_websocket_url(url) as ws:
            await ws.get_message()  # the hub's sync step 1: admitted
            state = AwarenessEntry(4242, 1, '{{"user":{{"name":"a"}}}}')
            await ws.send_message(awareness_message(encode_awareness([state])))
            with trio.fail_after(10):
                while "peerdaemon.presence.core" not in sys.modules:  # the bridge read it
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

trio.run(main)
print(" ".join(sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "peerdaemon.presence.core" in loaded
    unloaded = [
        "peerdaemon.presence.service",
        "peerdaemon.core.registry",
        "peerdaemon.model.document",
    ]
    assert [m for m in unloaded if m in loaded] == []
