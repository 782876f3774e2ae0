"""A TOML config file described by a schema: read with line numbers, resolved by precedence,
edited in place keeping the user's comments.

The daemon (`daemon/config.py`) and the hub (`hub/config.py`) each describe their settings as a
`Schema` of `Setting`s, keyed by dotted names (`lan.listen` is `listen` in `[lan]`). One order
of precedence for all: the command line, then the environment (`PEERDAEMON_LAN_LISTEN`: the
schema's prefix and the key upper-cased), then the file, then the default. A value the file
cannot hold is a one-line `ConfigFileError` naming the file, the line and the key; a key the
schema does not know is a warning (with the closest known key), never an error and never
silently dropped. `set_value`/`unset_value` rewrite the file with tomlkit, which keeps
comments, order and formatting of everything else, and replace it atomically.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .addresses import parse_address
from .files import replace_file

__all__ = [
    "ConfigFileError",
    "FileValues",
    "Kind",
    "Resolved",
    "Schema",
    "Setting",
    "kinds",
    "locate",
    "read_file",
    "set_value",
    "unset_value",
]


class ConfigFileError(ValueError):
    """A file, a value or an environment variable the settings cannot take: one line."""


# ------------------------------------------------------------------------------------ kinds
@dataclass(frozen=True)
class Kind:
    """How one setting's value is checked and written.

    `check` takes what TOML (or `from_text`) gives and returns the value the program uses,
    raising ValueError with a message for a person; `from_text` reads a command-line or
    environment string into a TOML value; `show` turns the program's value back into one.
    """

    name: str
    check: Callable[[Any], Any]
    from_text: Callable[[str], Any]
    show: Callable[[Any], Any] = lambda value: value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _bool_text(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise ValueError("must be on or off (true/false)")


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _int(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"must be an integer >= {minimum}")
        return value

    return check


def _int_text(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("must be an integer") from None


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?|B)?\s*", re.IGNORECASE)
_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(value: Any, minimum: int = 0) -> int:
    """Bytes from an integer or a string: "15MB" is 15 000 000 and "64MiB" (or "64M", as nginx
    reads it) 64 * 2**20; K, M, G, T; a fraction is allowed ("1.5 GiB")."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        digits, unit, binary = match.groups()
        whole_unit = match.group(0).strip()[len(digits) :].strip()
        if unit is None:
            factor = 1
        elif binary or whole_unit.upper() == unit.upper():  # "MiB", "MIB" or a bare "M"
            factor = 1024 ** _POWERS[unit.upper()]
        else:  # "MB"
            factor = 1000 ** _POWERS[unit.upper()]
        number = int(float(digits) * factor)
    else:
        raise ValueError('must be a number of bytes, such as 1048576, "15MB" or "64 MiB"')
    if number < minimum:
        raise ValueError(f"must be at least {minimum} bytes")
    return number


def _size_text(text: str) -> int | str:
    stripped = text.strip()
    return int(stripped) if stripped.isdigit() else stripped


def _seconds(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError("must be a number of seconds > 0")
    return float(value)


def _seconds_text(text: str) -> float:
    try:
        return float(text.strip().removesuffix("s"))
    except ValueError:
        raise ValueError("must be a number of seconds") from None


def _address(value: Any) -> tuple[str, int]:
    return parse_address(_text(value), any_port=True)


def _show_address(value: tuple[str, int]) -> str:
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addresses(value: Any) -> list[tuple[str, int]]:
    if isinstance(value, str):  # one address, or a comma-separated list as on a command line
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ValueError('must be a list of "HOST:PORT" strings')
    return [parse_address(_text(v).strip(), any_port=True) for v in value]


def _text_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return list(value)


def _path(value: Any) -> Path:
    text = _text(value)
    if not text:
        raise ValueError("must be a path")
    return Path(text).expanduser()


def _choice(*choices: str) -> Kind:
    def check(value: Any) -> str:
        lowered = _text(value).strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return lowered

    return Kind("|".join(choices), check, str)


class kinds:  # noqa: N801  (a namespace of kinds, read as `kinds.address`)
    text = Kind("text", _text, str)
    boolean = Kind("bool", _bool, _bool_text)
    integer = Kind("integer", _int(0), _int_text)
    positive = Kind("integer", _int(1), _int_text)
    size = Kind("size", parse_size, _size_text)
    seconds = Kind("seconds", _seconds, _seconds_text)
    address = Kind("HOST:PORT", _address, str, _show_address)
    addresses = Kind(
        "HOST:PORT list",
        _addresses,
        lambda text: [v.strip() for v in text.split(",") if v.strip()],
        lambda v: [_show_address(a) for a in v],
    )
    text_list = Kind("list", _text_list, _text_list)
    path = Kind("path", _path, str, str)
    choice = staticmethod(_choice)

    @staticmethod
    def minimum_size(minimum: int) -> Kind:
        return Kind("size", lambda v: parse_size(v, minimum), _size_text)


# ----------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Setting:
    key: str  # dotted: "lan.listen" is `listen` in `[lan]`
    kind: Kind
    help: str
    default: Any = None  # the program's value when nothing sets it (None: not set)
    live: bool = False  # a running program applies a change without a restart
    env: str | None = None  # the environment variable; None: the schema's prefix + KEY
    flag: str | None = None  # the command-line flag that sets it, for `config list`


@dataclass
class Schema:
    settings: list[Setting]
    env_prefix: str  # "PEERDAEMON_" or "PEERDAEMON_HUB_"
    aliases: dict[str, str] = field(default_factory=dict)  # old names still accepted by `set`
    list_command: str = "peerdaemon config list"  # named in messages about unknown keys

    def __post_init__(self) -> None:
        self.by_key = {s.key: s for s in self.settings}

    def setting(self, key: str) -> Setting:
        """The setting `key` names (or an alias of it); ConfigFileError naming the closest."""
        key = self.aliases.get(key, key)
        if key in self.by_key:
            return self.by_key[key]
        raise ConfigFileError(f"unknown setting {key!r}{self.suggest(key)}")

    def suggest(self, key: str) -> str:
        import difflib  # here: only a mistyped key needs it

        close = difflib.get_close_matches(key, list(self.by_key) + list(self.aliases), 1, 0.6)
        if close:
            return f" (did you mean {self.aliases.get(close[0], close[0])!r}?)"
        return f" (`{self.list_command}` shows them all)"

    def env_name(self, setting: Setting) -> str:
        return setting.env or self.env_prefix + re.sub(r"[.\-]", "_", setting.key).upper()


# ------------------------------------------------------------------------------------ reading
def locate(
    explicit: str | os.PathLike[str] | None,
    variable: str,
    filename: str,
    environ: Mapping[str, str] | None = None,
) -> tuple[Path, bool]:
    """A config file and whether it must exist: the one named on the command line (must),
    else `$variable`, else `filename` in the platform's config dir (~/.config/peerdaemon on
    Linux, `$XDG_CONFIG_HOME` honoured), read only if it is there."""
    if explicit:
        return Path(explicit).expanduser().absolute(), True
    env = (os.environ if environ is None else environ).get(variable)
    if env:
        return Path(env).expanduser().absolute(), False
    import platformdirs

    from .locations import APP_NAME

    return platformdirs.user_config_path(APP_NAME, appauthor=False) / filename, False


@dataclass
class FileValues:
    """What one config file sets: the program's values by key, their lines, the warnings."""

    path: Path | None
    exists: bool = False
    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_file(schema: Schema, path: Path | None, *, required: bool = False) -> FileValues:
    """The settings `path` holds. A missing file is empty unless `required` (one given with
    `--config` must exist); relative paths inside it are relative to its directory."""
    if path is None:
        return FileValues(None)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigFileError(f"{path}: no such file") from None
        return FileValues(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(
            f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    return parse_text(schema, text, path)


_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def parse_text(schema: Schema, text: str, path: Path) -> FileValues:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _AT_LINE.search(message)
        if match:
            message = message[: match.start()]
            raise ConfigFileError(f"{path}:{match.group(1)}: {message}") from None
        raise ConfigFileError(f"{path}: {message}") from None
    out = FileValues(path, exists=True)
    lines = key_lines(text)
    base = path.expanduser().absolute().parent
    for key, value in _flatten(raw):
        line = lines.get(key)
        where = f"{path}:{line}" if line else str(path)
        setting = schema.by_key.get(key)
        if setting is None:
            if key in schema.aliases:
                setting = schema.by_key[schema.aliases[key]]
                out.warnings.append(f"{where}: {key} is now {setting.key}")
            else:
                out.warnings.append(f"{where}: unknown key {key!r} ignored{schema.suggest(key)}")
                continue
        try:
            checked = setting.kind.check(value)
        except (ValueError, TypeError) as exc:
            raise ConfigFileError(f"{where}: {key} {exc}") from None
        if isinstance(checked, Path) and not checked.is_absolute():
            checked = base / checked
        out.values[setting.key] = checked
        if line:
            out.lines[setting.key] = line
    return out


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from _flatten(value, key + ".")
        else:
            yield key, value


_HEADER = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(
    r'\s*((?:[A-Za-z0-9_\-]+|"[^"]*"|\'[^\']*\')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|"[^"]*"|\'[^\']*\'))*)\s*='
)


def key_lines(text: str) -> dict[str, int]:
    """Dotted key -> the line (1-based) that sets it, for messages; tables of arrays and keys
    inside multi-line values are not tracked (a message then names the file alone)."""
    out: dict[str, int] = {}
    table = ""
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = None
            continue
        header = _HEADER.match(line)
        if header and not line.lstrip().startswith("[["):
            table = _dotted(header.group(1)) + "."
            continue
        if line.lstrip().startswith("[["):
            table = "\0"  # an array of tables: its keys are not ours to number
            continue
        match = _KEY.match(line)
        if match and table != "\0":
            out.setdefault(
                table + _dotted(match.group(1)) if table else _dotted(match.group(1)), number
            )
            rest = line[match.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2:
                    in_string = quote
    return out


def _dotted(text: str) -> str:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_\-]+)', text)
    return ".".join(next(p for p in part if p) if any(part) else "" for part in parts)


# ---------------------------------------------------------------------------------- resolving
@dataclass
class Resolved:
    """Every setting's value (None: not set) and where it came from: `flag`, `env NAME`,
    `file`, `default`."""

    values: dict[str, Any]
    sources: dict[str, str]
    file: FileValues

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def resolve(
    schema: Schema,
    file: FileValues,
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Flags (program values, None: not given), then the environment, then the file, then the
    defaults. A bad environment value is a ConfigFileError naming the variable."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in schema.settings:
        key = setting.key
        name = schema.env_name(setting)
        if flags and flags.get(key) is not None:
            values[key], sources[key] = flags[key], "flag"
        elif env.get(name, "") != "":
            try:
                values[key] = setting.kind.check(setting.kind.from_text(env[name]))
            except (ValueError, TypeError) as exc:
                raise ConfigFileError(f"${name}={env[name]!r}: {key} {exc}") from None
            sources[key] = f"env {name}"
        elif key in file.values:
            values[key], sources[key] = file.values[key], "file"
        else:
            values[key], sources[key] = setting.default, "default"
    return Resolved(values, sources, file)


# ----------------------------------------------------------------------------------- editing
def set_value(schema: Schema, path: Path, key: str, text: str, *, header: str = "") -> Any:
    """Write `key = text` (read as the setting's kind) into `path`, keeping the rest of the
    file as it is; creates the file (and its directory) with `header` when there is none.
    Returns the program's value. "" unsets the key (as `unset_value`)."""
    setting = schema.setting(key)
    if text == "":
        unset_value(schema, path, key)
        return None
    try:
        toml_value = setting.kind.from_text(text)
        program_value = setting.kind.check(toml_value)
    except (ValueError, TypeError) as exc:
        raise ConfigFileError(f"{setting.key} {exc}") from None
    if isinstance(program_value, Path):
        program_value = program_value.absolute()
        toml_value = str(program_value)
    _edit(schema, path, setting.key, toml_value, header)
    return program_value


def unset_value(schema: Schema, path: Path, key: str) -> bool:
    """Remove `key` from the file (and old names of it); False if it was not there."""
    setting = schema.setting(key)
    if not path.exists():
        return False
    return _edit(schema, path, setting.key, None, "")


def _edit(schema: Schema, path: Path, key: str, value: Any, header: str) -> bool:
    import tomlkit  # only `config set` pays for it
    from tomlkit.exceptions import TOMLKitError

    if path.is_symlink():  # a file kept elsewhere (dotfiles): edit it there, keep the link
        path = path.resolve()

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if value is None:
            return False
        text = header
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    parse_text(schema, text, path)  # a broken file is reported, not overwritten
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    old_names = [alias for alias, target in schema.aliases.items() if target == key]
    changed = False
    for name in [key, *old_names]:
        changed |= _remove(doc, name.split(".")) if (value is None or name != key) else False
    if value is not None:
        *tables, last = key.split(".")
        container: Any = doc
        for name in tables:
            if name not in container:
                container[name] = tomlkit.table()
            container = container[name]
        container[last] = value
        changed = True
    if changed:
        try:
            before: os.stat_result | None = path.stat()
        except FileNotFoundError:
            before = None
        # it may hold a token (the hub's metrics) or a TLS key's path: the owner's alone
        mode = before.st_mode & 0o7777 if before else 0o600
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, tomlkit.dumps(doc).encode("utf-8"), mode)
            if before is not None and os.geteuid() == 0:
                # root editing /etc/peerdaemon/hub.toml (root:peerdaemon-hub 0640): the service
                # must still read it
                os.chown(path, before.st_uid, before.st_gid)
        except OSError as exc:
            raise ConfigFileError(f"{path}: cannot write it: {exc.strerror or exc}") from None
    return changed


def _remove(container: Any, parts: list[str]) -> bool:
    head, *rest = parts
    if head not in container:
        return False
    if rest:
        inner = container[head]
        if not hasattr(inner, "keys"):
            return False
        removed = _remove(inner, rest)
        return removed
    del container[head]
    return True
