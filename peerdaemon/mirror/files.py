"""The linked files themselves: every blocking file-system call of the mirror, run in worker
threads by `runner.py` and `operations.py`.

Each function answers in values (an `Observation`, a `WriteResult`, a `Refusal`), never with an
OSError: what went wrong with a file is that link's state, said in words a person can act on.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ..core.errors import BAD_PATH, LINK_REFUSED
from ..core.files import replace_file
from ..model import ModelError, prepare
from .format import content_hash, json_hash
from .link import Observation, Sig, StartMode, WriteOutcome

RACY_NS = 2_000_000_000
"""A file whose mtime is this recent may change again without its sig changing (timestamps are
as coarse as a clock tick, 1 s on ext3, 2 s on FAT): its content is compared as well."""
CONFLICT_SUFFIX = ".peerdaemon-conflict.json"

PathKind = Literal["file", "missing", "dir", "error"]


class FileRead(NamedTuple):
    """A linked file as read: what the machine is told, and what an apply and a render need."""

    observation: Observation
    environment: dict[str, Any] | None
    """The content prepared as an environment (None: not one)."""
    raw: Any
    """The content's JSON as it stands in the file: the key order a render follows."""


class WriteResult(NamedTuple):
    outcome: WriteOutcome
    sig: Sig | None
    """The written file's sig ("ok" only)."""
    error: str | None
    """Why not ("failed" only)."""


class Refusal(NamedTuple):
    """Why a file cannot be linked: an operation error code and its message."""

    code: str
    message: str


def conflict_path_for(path: Path) -> Path:
    """`env.json` -> `env.peerdaemon-conflict.json`, next to it."""
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return path.with_name(stem + CONFLICT_SUFFIX)


def current_umask() -> int:
    """The process umask, read without setting it where possible (os.umask changes it for
    every thread for a moment, and the store writer's thread may be creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def file_sig(st: os.stat_result) -> Sig:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def stat_path(path: Path) -> tuple[PathKind, Sig | None]:
    """What is at `path`, cheaply: the poll that runs every tick."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing", None
    except OSError:
        return "error", None
    if stat.S_ISDIR(st.st_mode):
        return "dir", file_sig(st)
    return "file", file_sig(st)


def os_reason(path: Path, exc: OSError, verb: str) -> str:
    """An OSError in words: the reason an event and `env links` show."""
    if exc.errno == errno.ENOENT:
        return f"cannot {verb} {path}: the folder {path.parent} does not exist"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot {verb} {path}: permission denied"
    if exc.errno == errno.EISDIR:
        return f"cannot {verb} {path}: it is a directory"
    if exc.errno == errno.ENOTDIR:
        return f"cannot {verb} {path}: a part of {path.parent} is not a folder"
    return f"cannot {verb} {path}: {exc.strerror or exc}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"malformed JSON: {name} is not a JSON value")


def parse_environment(data: bytes, env_id: str) -> tuple[dict[str, Any], Any, str]:
    """File bytes -> (prepared environment, raw JSON, JSON hash); ValueError says why not."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError("the file is empty")
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    if "\\u" in text:  # "\ud800" parses, but a lone surrogate is not text (pycrdt panics on it)
        try:
            json.dumps(raw, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff)") from None
    if isinstance(raw, dict) and isinstance(raw.get("uuid"), str) and raw["uuid"] != env_id:
        raise ValueError(f"it holds another environment (uuid {raw['uuid']})")
    try:
        prepared, _notes = prepare(raw, env_id)
    except ModelError as exc:
        raise ValueError(exc.message) from None
    return prepared, raw, json_hash(raw)


def read_file(path: Path, env_id: str) -> FileRead:
    """Stat, read and parse the linked file, the stat taken from the very descriptor read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return FileRead(Observation("missing"), None, None)
    except IsADirectoryError:
        _kind, sig = stat_path(path)
        return FileRead(Observation("dir", sig), None, None)
    except OSError as exc:
        kind, sig = stat_path(path)
        if kind == "dir":
            return FileRead(Observation("dir", sig), None, None)
        return FileRead(Observation("error", sig, error=os_reason(path, exc, "read")), None, None)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return FileRead(Observation("dir", file_sig(st)), None, None)
        if not stat.S_ISREG(st.st_mode):
            not_regular = Observation("error", file_sig(st), error=f"{path} is not a regular file")
            return FileRead(not_regular, None, None)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
        sig = file_sig(os.fstat(fd))
    except OSError as exc:
        return FileRead(Observation("error", None, error=os_reason(path, exc, "read")), None, None)
    finally:
        os.close(fd)
    try:
        prepared, raw, parsed_hash = parse_environment(data, env_id)
    except (ValueError, RecursionError) as exc:
        return FileRead(Observation("file", sig, data, None, str(exc)), None, None)
    return FileRead(Observation("file", sig, data, parsed_hash), prepared, raw)


def is_racy(sig: Sig) -> bool:
    """Whether the file may have changed since `sig` without its sig changing: its mtime is so
    recent that another save within the timestamp's granularity would keep it (git's "racy"
    entries). Then only the content can tell. (A save sets the mtime to now, so an mtime far
    from now, even in the future, would change with any save.)"""
    return abs(time.time_ns() - sig[0]) < RACY_NS


def content_is(path: Path, known: str | None) -> bool:
    """Whether the file's bytes still hash to `known` (for a stat that cannot tell)."""
    try:
        with open(path, "rb") as f:
            return content_hash(f.read()) == known
    except OSError:
        return False  # let an observation say what is wrong


def write_if_unchanged(
    path: Path,
    data: bytes,
    expect: Sig | None | Literal["any"],
    umask: int,
    expect_hash: str | None = None,
) -> WriteResult:
    """Replace the file whole (`core.files.replace_file`), unless someone saved it meanwhile.

    Unless `expect` is "any", nothing is written when the file is no longer what the link last
    saw: the link reads it first, so their save is not lost. While the sig is racy, the content
    is compared with `expect_hash` too. A new file gets the umask's mode, an old one keeps its.
    """
    try:
        current = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        current = None
    except OSError as exc:
        return WriteResult("failed", None, os_reason(path, exc, "write"))
    if current is not None and stat.S_ISDIR(current.st_mode):
        return WriteResult("failed", None, f"{path} is a directory, not a file: not writing there")
    if expect != "any" and (None if current is None else file_sig(current)) != expect:
        return WriteResult("changed", None, None)
    if (
        expect not in ("any", None)
        and expect_hash is not None
        and is_racy(expect)
        and not content_is(path, expect_hash)
    ):
        return WriteResult("changed", None, None)
    mode = stat.S_IMODE(current.st_mode) if current is not None else 0o666 & ~umask
    try:
        written = replace_file(path, data, mode)
    except OSError as exc:
        return WriteResult("failed", None, os_reason(path, exc, "write"))
    return WriteResult("ok", file_sig(written), None)


def inspect_target(path: Path, env_id: str) -> StartMode | Refusal:
    """Can `env_id` be linked to `path`? Asked before a link starts, so that a refusal is the
    operation's answer rather than a link in error.

    "overwrite": absent or empty, the document is written there; "adopt": a file of this same
    environment, applied.
    """
    parent = path.parent
    try:
        parent_stat = os.stat(parent)
    except FileNotFoundError:
        return Refusal(BAD_PATH, f"the folder {parent} does not exist")
    except OSError as exc:
        return Refusal(BAD_PATH, os_reason(path, exc, "write"))
    if not stat.S_ISDIR(parent_stat.st_mode):
        return Refusal(BAD_PATH, f"{parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        return Refusal(BAD_PATH, f"cannot write in {parent}: permission denied")
    kind, _sig = stat_path(path)
    if kind == "missing":
        return "overwrite"
    if kind == "dir":
        return Refusal(BAD_PATH, f"{path} is a directory")
    observation = read_file(path, env_id).observation
    if observation.kind == "error":
        return Refusal(BAD_PATH, observation.error or f"cannot read {path}")
    if not os.access(path, os.W_OK):
        return Refusal(BAD_PATH, f"cannot write {path}: permission denied")
    if not observation.content or not observation.content.strip():
        return "overwrite"
    if observation.json_hash is None:
        return Refusal(
            LINK_REFUSED,
            f"{path} is not an environment {env_id} can be linked to "
            f"({observation.error}); pass overwrite to replace it with the environment",
        )
    return "adopt"
