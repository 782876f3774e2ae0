"""The runner process's trio shell: starts `node runner.mjs`, moves command and event lines
between it and the `MockEngine`, sleeps until the engine's deadline, and ends the process by its
id when the runner misbehaves or the service stops.
"""

from __future__ import annotations

import ctypes
import logging
import math
import resource
import subprocess
from collections.abc import Callable
from typing import Any

import trio

from .engine import MockEngine, Notice
from .install import RunnerUnavailable
from .protocol import LineReader, RunnerProtocolError, encode, parse_event

__all__ = ["RunnerShell"]

log = logging.getLogger("peerdaemon.mock")

PR_SET_NO_NEW_PRIVS = 38


class RunnerShell:
    def __init__(
        self,
        engine: MockEngine,
        locate: Callable[[], list[str]],
        on_notices: Callable[[list[Notice]], None],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        confined: bool = False,
    ) -> None:
        self.engine = engine
        self.locate = locate
        self.on_notices = on_notices
        self.env = env
        self.cwd = cwd
        self.confined = confined
        """Start it with no way to gain privileges and no core dumps (`_confine`)."""
        self.pid: int | None = None
        self._wake = trio.Event()

    def poke(self) -> None:
        """The engine has something new to send (or a wish that needs a runner)."""
        self._wake.set()

    def _flush(self) -> None:
        notices = self.engine.take_notices()
        if notices:
            try:
                self.on_notices(notices)
            except Exception:
                log.exception("mock notices failed")

    async def _sleep(self, deadline: float | None) -> None:
        with trio.move_on_at(deadline if deadline is not None else math.inf):
            await self._wake.wait()
        self._wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            now = trio.current_time()
            if self.engine.want_runner(now):
                try:
                    argv = await trio.to_thread.run_sync(self.locate)
                except RunnerUnavailable as exc:
                    self.engine.unavailable(str(exc), trio.current_time())
                    self._flush()
                    continue
                await self._run_process(argv)
                self._flush()
                continue
            self._flush()
            await self._sleep(self.engine.deadline())

    async def _run_process(self, argv: list[str]) -> None:
        reason = "runner exited"
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=_confine if self.confined else None,
                start_new_session=True,
            )
        except OSError as exc:
            self.engine.spawned(trio.current_time())
            self.engine.exited(f"cannot start the runner: {exc}", trio.current_time())
            return
        self.pid = process.pid
        self.engine.spawned(trio.current_time())
        try:
            async with trio.open_nursery() as nursery:

                async def read_events() -> None:
                    nonlocal reason
                    assert process.stdout is not None
                    lines = LineReader()
                    try:
                        async for chunk in process.stdout:
                            for line in lines.feed(chunk):
                                if line.strip():
                                    self.engine.receive(parse_event(line), trio.current_time())
                            self._flush()
                            self.poke()
                    except RunnerProtocolError as exc:
                        reason = f"runner broke the protocol: {exc}"
                        log.error("mock runner: %s", reason)
                    nursery.cancel_scope.cancel()

                async def log_stderr() -> None:
                    assert process.stderr is not None
                    lines = LineReader(1 << 16)
                    try:
                        async for chunk in process.stderr:
                            for line in lines.feed(chunk):
                                log.info("mock runner: %s", line.decode("utf-8", "replace"))
                    except RunnerProtocolError:
                        pass

                nursery.start_soon(read_events)
                nursery.start_soon(log_stderr)
                assert process.stdin is not None
                while True:
                    try:
                        for command in self.engine.take_commands():
                            await process.stdin.send_all(encode(command))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        reason = f"runner stopped reading: {exc}"
                        break
                    if self.engine.handle_timer(trio.current_time()):
                        reason = "runner did not become ready"
                        break
                    await self._sleep(self.engine.deadline())
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()  # by its pid: the runner has no children of its own
                code = await process.wait()
                self.pid = None
                for stream in (process.stdin, process.stdout, process.stderr):
                    if stream is not None:
                        await stream.aclose()
            if reason == "runner exited":
                reason = f"runner exited with code {code}"
            self.engine.exited(reason, trio.current_time())
            log.warning("mock runner: %s", reason)

    def describe(self) -> dict[str, Any]:
        return {"runner": self.engine.runner, "pid": self.pid, "reason": self.engine.runner_reason}


def _confine() -> None:
    """In the child before exec: `no_new_privs` (no setuid program can raise what it may do)
    and no core dumps (a crash writes no memory, with its secrets, to disk). Linux only; a
    system without it runs the runner as it is."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
