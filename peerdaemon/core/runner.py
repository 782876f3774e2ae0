"""Running a trio service as a process: logging, one-line start-up failures, an exit code.

`peerdaemon run` and `peerdaemon hub serve` both start a supervisor under `trio.run`; a start-up
failure that is the user's to fix (data dir in use, port taken, bad config) must print one line,
not a traceback nested in exception groups.

Logging: a level (`debug`, `info`, `warning`, `error`) and a format, `text` (one
`TIME LEVEL LOGGER: MESSAGE` line, as always) or `json` (one object per line: `time`, ISO 8601
UTC; `level`; `logger`; `message`; `exc_info`, the traceback as a string, when there is one),
on stderr. When stderr is the systemd journal (`$JOURNAL_STREAM` names it), text lines drop
the time the journal keeps anyway and begin with a `<N>` priority prefix (sd-daemon(3)), so
`journalctl -p warning` filters them. Each is taken from the command line, else `$PEERDAEMON_LOG_LEVEL` /
`$PEERDAEMON_LOG_FORMAT`, else the hub's config file (`[log]`), else `info` and `text`.
This module imports trio only to run: the command line reads its names without paying for it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = [
    "FORMAT_ENV",
    "LEVEL_ENV",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "TEXT_FORMAT",
    "JournalFormatter",
    "JsonFormatter",
    "LogSettingError",
    "configure_logging",
    "expected_failure",
    "resolve_logging",
    "run_process",
    "to_journal",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
LEVEL_ENV = "PEERDAEMON_LOG_LEVEL"
FORMAT_ENV = "PEERDAEMON_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("peerdaemon")


class LogSettingError(ValueError):
    """An unknown log level or format (says where it came from)."""


def resolve_logging(
    level: str | None = None,
    format: str | None = None,
    *,
    file_level: str | None = None,
    file_format: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """(level, format): the command line's, else the environment's, else the config file's,
    else `info` / `text`; lower-cased and checked (LogSettingError)."""
    env = os.environ if environ is None else environ
    chosen_level = _pick(
        "log level", LOG_LEVELS, "info", (level, None), (env.get(LEVEL_ENV), LEVEL_ENV), file_level
    )
    chosen_format = _pick(
        "log format",
        LOG_FORMATS,
        "text",
        (format, None),
        (env.get(FORMAT_ENV), FORMAT_ENV),
        file_format,
    )
    return chosen_level, chosen_format


def _pick(what: str, choices: tuple[str, ...], default: str, *sources: Any) -> str:
    """The first value given among `sources` ((value, where) pairs, or a bare value)."""
    for source in sources:
        value, where = source if isinstance(source, tuple) else (source, None)
        if value is None or value == "":
            continue
        chosen = str(value).strip().lower()
        if chosen not in choices:
            prefix = f"{where}: " if where else ""
            raise LogSettingError(
                f"{prefix}unknown {what} {value!r} (one of: {', '.join(choices)})"
            )
        return chosen
    return default


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (like Mockoon CLI's JSON logs)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


_PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class JournalFormatter(logging.Formatter):
    """`<N>LOGGER: MESSAGE`: the journal stamps the time and reads the priority prefix; a
    traceback's lines follow on their own lines (each one a journal entry at that priority)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITIES.get(record.levelname, 6)}>"
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is the journal's: `$JOURNAL_STREAM` is `DEVICE:INODE` of it
    (systemd.exec(5)); a stream redirected elsewhere by the unit's child is not."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def configure_logging(
    level: str = "info", format: str = "text", *, stream: TextIO | None = None
) -> None:
    """The root logger's level and one handler on `stream` (stderr), as `logging.basicConfig`:
    nothing changes if the root logger already has a handler."""
    number = logging.getLevelName(level.upper())
    stream = stream if stream is not None else sys.stderr
    if format == "json":
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=number, handlers=[handler])
    elif to_journal(stream):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JournalFormatter())
        logging.basicConfig(level=number, handlers=[handler])
    else:
        logging.basicConfig(level=number, format=TEXT_FORMAT, stream=stream)


def run_process(
    main: Callable[[Any], Awaitable[None]],
    config: Any,
    *,
    expected: tuple[type[BaseException], ...],
    stopped: str,
    log_level: str | None = None,
    log_format: str | None = None,
    file_level: str | None = None,
    file_format: str | None = None,
) -> int:
    """`trio.run(main, config)`; returns 0, or 1 after one line on stderr for `expected` errors
    (in the JSON format, that line is a log record too). Logging as `resolve_logging` says:
    `log_level`/`log_format` (the command line's), the environment, `file_level`/`file_format`
    (a config file's)."""
    try:
        level, fmt = resolve_logging(
            log_level, log_format, file_level=file_level, file_format=file_format
        )
    except LogSettingError as exc:
        print(f"peerdaemon: {exc}", file=sys.stderr)
        return 1
    configure_logging(level, fmt)
    import trio

    try:
        trio.run(main, config)
    except BaseException as exc:
        reason = expected_failure(exc, expected)
        if reason is None:
            if fmt == "json" and isinstance(exc, Exception):
                log.critical("stopped by an unexpected error", exc_info=exc)
            raise
        line = " ".join(str(reason).split())
        if fmt == "json":
            log.error("%s", line)
        else:
            print(f"peerdaemon: {line}", file=sys.stderr)
        return 1
    log.info(stopped)
    return 0


def expected_failure(
    exc: BaseException, expected: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The failure to report in one line, if every leaf of `exc` is an expected one."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [expected_failure(e, expected) for e in exc.exceptions]
        return leaves[0] if leaves and all(leaves) else None
    return exc if isinstance(exc, expected) else None
