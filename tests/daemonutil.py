"""A whole daemon in the test's own process, with a client on its socket; restartable. And
the LAN tests' `Dev` (such a daemon with static peers) with the waits they share."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import LOCAL, TIMEOUT, until
from modelutil import load

from peerdaemon.api.client import DaemonError, open_client
from peerdaemon.daemon.supervisor import DaemonConfig, serve
from peerdaemon.peer import PeerConfig


class InProcessDaemon:
    """`serve()` in a cancel scope of its own, so a test can stop and start it again on the same
    data directory while the rest of its nursery goes on."""

    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.name = name
        self.data_dir = base / name
        self.socket_path = base / f"{name}.s"
        self.daemon: Any = None
        self.client: Any = None
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    async def start_with(self, nursery: trio.Nursery, config: DaemonConfig) -> Any:
        self.daemon = await nursery.start(self._run, config)
        return self.daemon

    async def _run(self, config: DaemonConfig, task_status: trio.TaskStatus[Any]) -> None:
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    daemon = await nursery.start(serve, config)
                    async with open_client(config.socket_path) as client:
                        self.client = client
                        task_status.started(daemon)
                        await trio.sleep_forever()
        finally:
            self.client = None
            self._stopped.set()

    async def stop(self) -> None:
        assert self._scope is not None and self._stopped is not None
        self._scope.cancel()
        await self._stopped.wait()

    async def op(self, op: str, **args: Any) -> Any:
        return await self.client.call(op, **args)


# -- LAN: whole daemons with static peers on 127.0.0.1 (test_lan*.py) ----------------------
ENV_FILE = "test-env.json"
FAST = PeerConfig(backoff_initial=0.05, backoff_max=0.5, connect_timeout=2.0, close_grace=0.5)


class Dev(InProcessDaemon):
    """One whole daemon in this process, with a client on its socket; restartable (same data
    directory, same peer port)."""

    def __init__(self, base: Path, name: str, peer_config: PeerConfig = FAST) -> None:
        super().__init__(base, name)
        self.peer_config = peer_config
        self.port: int | None = None
        self.peers: list[tuple[str, int]] = []

    def config_extra(self) -> dict[str, Any]:
        """More `DaemonConfig` fields of a subclass's daemons (a status page, no history...)."""
        return {}

    async def start(self, nursery: trio.Nursery, *peers: Dev | tuple[str, int]) -> Dev:
        self.peers = [(LOCAL, p.port) if isinstance(p, Dev) else p for p in peers]
        config = DaemonConfig(
            self.data_dir,
            self.socket_path,
            name=self.name,
            listen=(LOCAL, self.port or 0),
            peers=list(self.peers),
            peer_config=self.peer_config,
            **self.config_extra(),
        )
        await self.start_with(nursery, config)
        self.port = self.daemon.peer_port
        return self

    @property
    def running(self) -> bool:
        return self._stopped is not None and not self._stopped.is_set()

    @property
    def device(self) -> str:
        return self.daemon.identity.device_id

    @property
    def address(self) -> str:
        return f"{LOCAL}:{self.port}"

    async def import_env(self, *, new_id: bool = False, name: str | None = None) -> str:
        env = load(ENV_FILE)
        if name is not None:
            env["name"] = name
        return (await self.client.import_env(env, new_id=new_id))["id"]

    async def export(self, env_id: str) -> dict | None:
        try:
            return await self.client.export(env_id)
        except DaemonError as exc:
            if exc.code == "not-found":
                return None
            raise

    async def env_ids(self) -> set[str]:
        return {e["id"] for e in await self.client.list_envs()}

    async def patch(self, env_id: str, *ops: dict) -> None:
        await self.client.patch(env_id, list(ops))

    async def set_endpoint(self, env_id: str, index: int, value: str) -> None:
        await self.patch(
            env_id, {"op": "replace", "path": f"/routes/{index}/endpoint", "value": value}
        )

    async def rows(self) -> list[dict]:
        return (await self.op("peers"))["peers"]

    async def row(self, other: Dev | str) -> dict | None:
        device = other.device if isinstance(other, Dev) else other
        return next((r for r in await self.rows() if r["device"] == device), None)

    async def events(self) -> list[dict]:
        """Every event the daemon still holds (a subscription from 0, closed again)."""
        sub = await self.client.subscribe_events(since=0)
        await sub.aclose()
        return sub.initial["events"]

    async def peer_events(self) -> list[tuple[str, str | None, str | None]]:
        return [
            (e["type"], e["data"]["device"], e["data"]["reason"])
            for e in await self.events()
            if e["type"].startswith("peer-")
        ]


async def wait_state(dev: Dev, other: Dev | str, state: str, reason: str | None = None) -> dict:
    async def probe() -> dict | None:
        row = await dev.row(other)
        if row and row["state"] == state and (reason is None or row["reason"] == reason):
            return row
        return None

    return await until(probe, what=f"{dev.name}: peer row {state} {reason or ''}")


async def converged(devs: list[Dev], env_id: str, timeout: float = TIMEOUT) -> dict:
    """Wait until every daemon exports the same JSON for `env_id`; returns it."""

    async def probe() -> dict | None:
        exports = [await d.export(env_id) for d in devs]
        first = exports[0]
        return first if first is not None and all(e == first for e in exports) else None

    return await until(
        probe, what=f"{env_id} to converge on {[d.name for d in devs]}", timeout=timeout
    )


async def absent(dev: Dev, env_id: str) -> bool:
    return await dev.export(env_id) is None


async def make_space(owner: Dev, *members: Dev, name: str = "Team") -> str:
    """`owner` creates a space and invites each member (who joins with the code)."""
    space_id = (await owner.op("space.create", name=name))["id"]
    for member in members:
        code = (await owner.op("space.invite", space=space_id))["code"]
        assert (await member.op("space.join", code=code))["id"] == space_id
    return space_id


@pytest.fixture(name="base")
def base_fixture():
    path = Path(tempfile.mkdtemp(prefix="pd"))  # short: AF_UNIX paths are limited to ~107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="devs")
async def devs_fixture(base, nursery):
    """`await devs("a")` -> a not yet started `Dev` (start it with `await d.start(nursery, ...)`)."""
    made: list[Dev] = []

    def make(name: str, peer_config: PeerConfig = FAST) -> Dev:
        dev = Dev(base, name, peer_config)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        if dev.running:
            await dev.stop()


def file_config(d: InProcessDaemon, path: Path, **flags: Any) -> DaemonConfig:
    """The config `peerdaemon run --config PATH` would build for `d` (daemon/config.py), with
    its data dir and socket as flags, mDNS and the status page off unless a flag turns them on,
    and no environment variable taken (the daemon reloads PATH when it changes)."""
    from peerdaemon.daemon.config import daemon_config, load

    given = {
        "data_dir": d.data_dir,
        "socket": d.socket_path,
        "status.enabled": False,
        "lan.mdns": False,
        **flags,
    }
    return daemon_config(load(path, flags=given, environ={}), flags=given, environ={})
