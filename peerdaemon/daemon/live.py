"""Settings on a running daemon: the `config.*` socket operations and picking up an edited file.

The daemon reads its file at start (`daemon/config.py`); afterwards a change arrives by SIGHUP
(`systemctl reload`), by `config.reload` (what `peerdaemon config set` sends), or by the file
changing on disk (polled). Each re-reads the file under the flags and environment the daemon was
started with, applies the settings that can change live (the device name, static peers, the log
level) and keeps the rest as pending until the next start, so `config list` can say so. A file
that no longer parses is a warning and an event; the daemon keeps what it runs with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..core.configfile import ConfigFileError, Resolved, set_value
from ..core.errors import BAD_REQUEST, NOT_FOUND, OpError, Pending
from ..core.events import EventLog
from .config import HEADER, SCHEMA, DaemonConfig, load, plan_reload, shown

log = logging.getLogger("peerdaemon.config")

POLL_SECONDS = 2.0

Applier = Callable[[Any], Any]
"""Applies one live setting's new value (keyed `SECTION.*`: every new value, for a section
applied as one); may return a `Pending` (its writes' durability); raises what it refuses."""


class LiveConfig:
    def __init__(
        self,
        config: DaemonConfig,
        events: EventLog,
        appliers: dict[str, Applier],
        current_name: Callable[[], str | None],
    ) -> None:
        self.config = config
        self.events = events
        self.appliers = appliers
        self.current_name = current_name
        self.path: Path | None = config.config_file
        self.running: Resolved | None = config.settings
        self.pending: dict[str, Any] = {}
        self.error: str | None = None
        self._stamp = _stamp(self.path)
        self._lock = trio.Lock()

    def register(self, operations: Any) -> None:
        operations.register("config.get", self.op_get)
        operations.register("config.set", self.op_set)
        operations.register("config.reload", self.op_reload)
        operations.status_hooks.append(self.status)

    def status(self) -> dict[str, Any]:
        return {
            "config": {
                "file": str(self.path) if self.path else None,
                "pending": sorted(self.pending),
                "error": self.error,
            }
        }

    # -- the file -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the file for edits made by hand; SIGHUP and `config.reload` come in directly."""
        task_status.started()
        if self.path is None:
            return
        while True:
            await trio.sleep(POLL_SECONDS)
            stamp = await trio.to_thread.run_sync(_stamp, self.path)
            if stamp != self._stamp:
                await self.reload("the file changed")

    async def reload(self, why: str) -> dict[str, Any]:
        """Re-read the file; apply what is live; remember what waits for a restart."""
        async with self._lock:
            if self.path is None or self.running is None:
                raise OpError(BAD_REQUEST, "this daemon was started without a config file")
            self._stamp = await trio.to_thread.run_sync(_stamp, self.path)
            try:
                new = await trio.to_thread.run_sync(self._load)
            except ConfigFileError as exc:
                self.error = str(exc)
                log.warning("config not reloaded (%s): %s", why, exc)
                self.events.emit("config-error", reason=str(exc))
                raise OpError(BAD_REQUEST, str(exc)) from None
            self.error = None
            plan = plan_reload(self.running, new)
            for warning in plan.warnings:
                log.warning("%s", warning)
            applied: list[str] = []
            refused: dict[str, str] = {}
            groups: dict[str, list[str]] = {}
            for key in plan.live:
                if key in self.appliers:
                    groups[key] = [key]
                else:  # a section applied as one (`status.*`: the page is served again)
                    groups.setdefault(key.split(".")[0] + ".*", []).append(key)
            for name, keys in groups.items():
                applier = self.appliers.get(name)
                if applier is None:
                    continue
                value = plan.live[name] if name in plan.live else dict(new.values)
                try:
                    result = applier(value)
                    if isinstance(result, Pending):
                        await result.wait()
                except (OpError, ValueError, RuntimeError) as exc:
                    message = getattr(exc, "message", None) or str(exc)
                    log.warning("%s not applied: %s", ", ".join(keys), message)
                    plan.warnings.append(f"{', '.join(keys)} not applied: {message}")
                    refused.update(dict.fromkeys(keys, message))
                    continue
                for key in keys:
                    self.running.values[key] = new.values[key]
                    self.running.sources[key] = new.sources[key]
                applied += keys
            self.pending = dict(plan.pending)
            waits = sorted(self.pending)
            applied.sort(key=list(plan.live).index)
            if applied or waits:
                log.info(
                    "config reloaded (%s): applied %s; at the next start: %s",
                    why,
                    ", ".join(applied) or "nothing",
                    ", ".join(waits) or "nothing",
                )
            self.events.emit("config-reloaded", applied=applied, pending=waits)
            return {
                "file": str(self.path),
                "applied": applied,
                "pending": waits,
                "refused": refused,
                "warnings": plan.warnings,
            }

    def _load(self) -> Resolved:
        return load(
            self.path,
            flags=self.config.flags,
            environ=self.config.environ if self.config.environ is not None else os.environ,
        )

    # -- operations ---------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for setting in SCHEMA.settings:
            key = setting.key
            if self.running is not None:
                value, source = self.running.values[key], self.running.sources[key]
            else:  # a daemon embedded without settings (tests): its config is what it runs
                value, source = _embedded(self.config, key), "default"
            row: dict[str, Any] = {
                "value": shown(key, value),
                "source": source,
                "live": setting.live,
                "env": SCHEMA.env_name(setting),
                "help": setting.help,
            }
            if key == "name" and value is None:
                row["value"], row["source"] = self.current_name(), "device"
            if key in self.pending:
                row["pending"] = shown(key, self.pending[key])
            out[key] = row
        return out

    async def op_get(self, args: dict[str, Any], session: Any) -> Any:
        key = args.get("key")
        settings = self.describe()
        if key is None:
            return {
                "file": str(self.path) if self.path else None,
                "error": self.error,
                "settings": settings,
            }
        try:
            setting = SCHEMA.setting(key)
        except ConfigFileError as exc:
            raise OpError(NOT_FOUND, str(exc)) from None
        return settings[setting.key]["value"]

    async def op_set(self, args: dict[str, Any], session: Any) -> Any:
        """Write the setting into the daemon's file, then reload. Without a file (a daemon
        embedded in a test or a program), only live settings change, in memory."""
        key, value = args.get("key"), args.get("value")
        if not isinstance(key, str) or not isinstance(value, str):
            raise OpError(BAD_REQUEST, 'config.set: key and value are strings ("" unsets)')
        try:
            setting = SCHEMA.setting(key)
        except ConfigFileError as exc:
            raise OpError(NOT_FOUND, str(exc)) from None
        if self.path is None:
            return await self._set_in_memory(setting.key, value)
        path = self.path
        try:
            await trio.to_thread.run_sync(
                lambda: set_value(SCHEMA, path, setting.key, value, header=HEADER)
            )
        except ConfigFileError as exc:
            raise OpError(BAD_REQUEST, str(exc)) from None
        result = await self.reload("config.set")
        answer = {
            "key": setting.key,
            "value": self.describe()[setting.key]["value"],
            "applies": "at start" if setting.key in result["pending"] else "now",
            "file": result["file"],
        }
        if setting.key in result["refused"]:  # in the file, but the service would not take it
            answer["applies"] = "refused"
            answer["reason"] = result["refused"][setting.key]
        return answer

    async def _set_in_memory(self, key: str, text: str) -> Any:
        setting = SCHEMA.by_key[key]
        applier = self.appliers.get(key)
        if applier is None:
            raise OpError(BAD_REQUEST, f"{key}: this daemon was started without a config file")
        try:
            value = setting.kind.check(setting.kind.from_text(text)) if text != "" else None
        except (ValueError, TypeError) as exc:
            raise OpError(BAD_REQUEST, f"{key} {exc}") from None
        result = applier(value)
        if isinstance(result, Pending):
            await result.wait()
        return {"key": key, "value": self.describe()[key]["value"], "applies": "now", "file": None}

    async def op_reload(self, args: dict[str, Any], session: Any) -> Any:
        return await self.reload("config.reload")


def _embedded(config: DaemonConfig, key: str) -> Any:
    return {
        "data_dir": config.data_dir,
        "socket": config.socket_path,
        "mirror_dir": config.mirror_dir,
        "lan.listen": config.listen,
        "lan.peers": config.peers,
        "lan.mdns": config.mdns,
        "lan.mdns_interface": config.mdns_interface,
        "limits.max_frame": config.max_frame,
        "store.compact_count": config.compact_count,
        "store.compact_bytes": config.compact_bytes,
        "store.evict_after": config.evict_after,
        "store.evict_sweeps": config.evict_sweeps,
        "mock.faker_seed": config.mock_faker_seed,
        "status.enabled": config.status,
        "status.listen": config.status_listen,
        "status.tls_cert": config.status_tls_cert,
        "status.tls_key": config.status_tls_key,
        "status.hosts": config.status_hosts,
    }.get(key, SCHEMA.by_key[key].default)


def _stamp(path: Path | None) -> tuple[int, int, int, int] | None:
    """What tells an edited file from the one read: mtime, size, inode, device."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
