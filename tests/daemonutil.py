"""A whole daemon in the test's own process, with a client on its socket; restartable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from peerdaemon.api.client import open_client
from peerdaemon.daemon.supervisor import DaemonConfig, serve


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
