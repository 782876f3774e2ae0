"""Daemon settings kept in the data dir: `config set` now, applied at the next start."""

import tempfile
from pathlib import Path

import pytest
import trio

from peerdaemon.api.client import AsyncClient, DaemonError
from peerdaemon.daemon.supervisor import DaemonConfig, serve


@pytest.fixture
def dirs():
    root = Path(tempfile.mkdtemp(prefix="pds"))
    return root / "data", root / "d.sock"


async def test_settings_apply_at_the_next_start_and_flags_win(dirs):
    data, sock = dirs
    mirror = data.parent / "mirror"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, DaemonConfig(data, sock))
        async with await AsyncClient.connect(sock) as c:
            await c.call("config.set", key="mirror-dir", value=str(mirror))
            await c.call("config.set", key="peers", value="127.0.0.1:9, [::1]:10")
            await c.call("config.set", key="mdns", value="off")
            await c.call("config.set", key="max-frame", value="200000")
            shown = await c.call("config.get")
            assert shown["mirror-dir"] == str(mirror)
            assert shown["peers"] == "127.0.0.1:9,::1:10"
            assert shown["mdns"] is False
            for key, value in [("listen", "nope"), ("mdns", "maybe"), ("max-frame", "12")]:
                with pytest.raises(DaemonError) as err:
                    await c.call("config.set", key=key, value=value)
                assert err.value.code == "bad-request"
            with pytest.raises(DaemonError) as err:
                await c.call("config.set", key="colour", value="x")
            assert err.value.code == "not-found"
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        flags = DaemonConfig(data, sock, peers=[("127.0.0.1", 11)])
        daemon = await nursery.start(serve, flags)
        assert daemon.config.mirror_dir == mirror
        assert daemon.config.peers == [("127.0.0.1", 11)]  # the flag wins
        assert daemon.config.mdns is False
        assert daemon.config.max_frame == 200000
        assert mirror.is_dir()  # the mirror service used it
        async with await AsyncClient.connect(sock) as c:
            await c.call("config.set", key="mirror-dir", value="")
            assert (await c.call("config.get", key="mirror-dir")) is None
        nursery.cancel_scope.cancel()
