"""What the status page checks before it answers (sans-I/O but for reading two small files).

- `ApiKey`: the random key every `/api` request carries in `X-API-Key`, kept in the data dir
  (`status-api-key`, mode 0600) so that it survives restarts and only the daemon's user reads it.
- `Guard`: the `Host` header (DNS rebinding: a page on an attacker's name resolved to 127.0.0.1
  must not reach us), the `Origin` of requests that act or stream (a foreign page cannot), the key.
- `connection_uid`: on Linux, which user owns the other end of a loopback TCP connection
  (`/proc/net/tcp`, as identd reads it): the page embeds the key only for the daemon's own user,
  as the local socket answers only its own user (SO_PEERCRED).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("peerdaemon.status")

KEY_FILE = "status-api-key"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


class StatusConfigError(RuntimeError):
    """A status page setting the daemon refuses to start with (one line for the user)."""


# -- the API key ----------------------------------------------------------------------------------


def load_or_create_key(data_dir: Path) -> str:
    """The key in `data_dir/status-api-key`, made (32 random bytes, URL-safe text) if absent.

    Written with mode 0600 from the start (O_EXCL: two daemons racing cannot both write); a key
    file that others can read is tightened back to 0600 with a warning, and a key file that is not
    a regular file, or holds no usable key, is replaced.
    """
    path = data_dir / KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            key = secrets.token_urlsafe(32)
            try:
                fd = os.open(
                    path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
            except FileExistsError:
                continue  # another process made it meanwhile: read that one
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
                f.flush()
                os.fsync(f.fileno())
            return key
        with os.fdopen(fd) as f:
            info = os.fstat(f.fileno())
            text = f.read(256).strip() if stat.S_ISREG(info.st_mode) else ""
        if stat.S_IMODE(info.st_mode) & 0o077 and stat.S_ISREG(info.st_mode):
            log.warning("%s was readable by others: mode set to 0600", path)
            os.chmod(path, 0o600)
        if len(text) >= 16 and text.isprintable() and " " not in text:
            return text
        log.warning("%s holds no usable key: a new one replaces it", path)
        os.unlink(path)
    raise StatusConfigError(f"cannot create {path}")


def same_key(given: str | None, key: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


# -- addresses ------------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """`Host`/authority text -> (host as written, lower-case; IPv6 in brackets), port or None."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/?#@\\ \t"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    elif value.count(":") > 1:
        return None  # a bare IPv6 address is not a valid Host
    else:
        host, _, port_text = value.partition(":")
        port_text = port_text if ":" in value else None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or len(port_text) > 5:
        return None
    return host, int(port_text)


def check_tls(listen: tuple[str, int], cert: Path | None, key: Path | None) -> None:
    """A listener other than loopback serves the LAN: only over TLS (the key and every answer
    cross the network). Raises `StatusConfigError` with the one line to print."""
    if (cert is None) != (key is None):
        raise StatusConfigError("--status-tls-cert and --status-tls-key go together")
    if not is_loopback_host(listen[0]) and cert is None:
        shown = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
        raise StatusConfigError(
            f"--status-listen {shown}:{listen[1]} is not a loopback address: the status page "
            "serves other machines only over TLS (give --status-tls-cert and --status-tls-key)"
        )
    for what, path in (("--status-tls-cert", cert), ("--status-tls-key", key)):
        if path is not None and not path.is_file():
            raise StatusConfigError(f"{what} {path}: no such file")


@dataclass
class Guard:
    """The checks of one listener: which `Host` names it answers to, on which port."""

    port: int
    tls: bool = False
    hosts: set[str] = field(default_factory=set)
    """Host names accepted besides the loopback ones (lower-case; IPv6 in brackets)."""
    any_ip: bool = False
    """Listening on a wildcard address: any IP literal names this machine (an IP literal cannot
    be rebound; only names can)."""

    @classmethod
    def for_listener(
        cls, listen_host: str, port: int, *, tls: bool, extra_hosts: Iterable[str] = ()
    ) -> Guard:
        hosts = set(LOOPBACK_NAMES)
        wildcard = listen_host in _WILDCARDS
        if not wildcard:
            hosts.add(f"[{listen_host}]" if ":" in listen_host.strip("[]") else listen_host)
        hosts.update(h.strip().lower() for h in extra_hosts if h.strip())
        return cls(port=port, tls=tls, hosts={h.lower() for h in hosts}, any_ip=wildcard)

    def host_ok(self, host_header: str | None) -> bool:
        if host_header is None:
            return False
        parts = split_host(host_header)
        if parts is None:
            return False
        host, port = parts
        default = 443 if self.tls else 80
        if (port if port is not None else default) != self.port:
            return False
        return host in self.hosts or (self.any_ip and is_ip_literal(host))

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        """No `Origin` (a command-line client: the key is its proof), or this very page's."""
        if origin is None:
            return True
        scheme = "https" if self.tls else "http"
        prefix = f"{scheme}://"
        if not origin.lower().startswith(prefix) or host_header is None:
            return False
        authority = origin[len(prefix) :]
        origin_parts, host_parts = split_host(authority), split_host(host_header)
        if origin_parts is None or host_parts is None:
            return False
        default = 443 if self.tls else 80
        return (origin_parts[0], origin_parts[1] or default) == (
            host_parts[0],
            host_parts[1] or default,
        )


# -- who is on the other end ----------------------------------------------------------------------


def _proc_address(ip: str, port: int) -> str | None:
    """How /proc/net/tcp{,6} writes an address: the 32-bit words in host byte order, hex."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    packed = addr.packed
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def _mapped(ip: str) -> str | None:
    """The IPv4-mapped IPv6 form of an IPv4 address (how a dual-stack socket sees it)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return f"::ffff:{addr}" if addr.version == 4 else None


def parse_uid(table: str, local: str, remote: str) -> int | None:
    """The uid column of the row whose local and remote addresses are these (or None)."""
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[1] == local and fields[2] == remote:
            try:
                return int(fields[7])
            except ValueError:
                return None
    return None


def connection_uid(
    client: tuple[str, int], server: tuple[str, int], proc_net: Path = Path("/proc/net")
) -> int | None | bool:
    """The uid owning the client end of a loopback TCP connection from `client` to `server`.

    False when this system cannot tell (no /proc/net/tcp: not Linux); None when it can but the
    connection is not there (gone, or not ours to see: treated as a foreign user).
    """
    tables = [proc_net / "tcp", proc_net / "tcp6"]
    if not any(t.exists() for t in tables):
        return False
    candidates = [(client, server)]
    mc, ms = _mapped(client[0]), _mapped(server[0])
    if mc and ms:
        candidates.append(((mc, client[1]), (ms, server[1])))
    for path in tables:
        try:
            text = path.read_text()
        except OSError:
            continue
        for c, s in candidates:
            local, remote = _proc_address(*c), _proc_address(*s)
            if local is None or remote is None:
                continue
            uid = parse_uid(text, local, remote)
            if uid is not None:
                return uid
    return None


def client_is_loopback(client: tuple[str, int] | None) -> bool:
    if client is None:
        return False
    host = client[0]
    if host.startswith("::ffff:"):
        host = host[len("::ffff:") :]
    return is_loopback_host(host)


def canonical_host(host: str) -> str:
    """An address as a URL writes it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


__all__ = [
    "KEY_FILE",
    "LOOPBACK_NAMES",
    "Guard",
    "StatusConfigError",
    "canonical_host",
    "check_tls",
    "client_is_loopback",
    "connection_uid",
    "is_loopback_host",
    "load_or_create_key",
    "parse_uid",
    "same_key",
    "split_host",
]
