"""`host:port` as users write it (flags, settings, invites, hub config), parsed in one place."""

from __future__ import annotations

import ipaddress
import re

# One label of a host name: letters, digits, hyphens inside (and `_`, which some local names
# use), at most 63 characters.
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def _check_host(host: str, bracketed: bool) -> None:
    """ValueError naming `host` unless it is an IP address or a host name."""
    wrong = ValueError(f"{host} is not an IP address or host name")
    if bracketed:  # [v6]: only an IPv6 address (a zone as in fe80::1%eth0 is fine)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise wrong from None
        return
    if re.fullmatch(r"[0-9.]+", host):  # all digits and dots: meant as IPv4, so it must be one
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise wrong from None
        return
    name = host[:-1] if host.endswith(".") else host  # a fully qualified name's final dot
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise wrong


def parse_address(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """`host:port` or `[v6 address]:port` -> (host, port); ValueError saying what is wrong.

    `any_port` admits port 0, which only makes sense for a listener ("pick a free port").
    """
    if not isinstance(text, str):
        raise ValueError("an address must be a string 'host:port'")
    text = text.strip()
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, rest = text[1:].partition("]:")
    else:
        host, sep, rest = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as [address]:port")
    if not sep or not host or not rest:
        raise ValueError(f"{text!r} is not an address of the form host:port")
    low = 0 if any_port else 1
    if not rest.isascii() or not rest.isdigit():
        raise ValueError(f"{text!r}: the port {rest!r} is not a number ({low}-65535)")
    if not low <= int(rest) <= 65535:
        raise ValueError(f"port {int(rest)} is not in {low}-65535")
    _check_host(host, bracketed)
    return host, int(rest)
