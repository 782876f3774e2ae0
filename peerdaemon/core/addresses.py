"""`host:port` as users write it (flags, settings, invites, hub config), parsed in one place."""

from __future__ import annotations


def parse_address(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """`host:port` or `[v6 address]:port` -> (host, port); ValueError if it is neither.

    `any_port` admits port 0, which only makes sense for a listener ("pick a free port").
    """
    if not isinstance(text, str):
        raise ValueError("an address must be a string 'host:port'")
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
    else:
        host, sep, rest = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as [address]:port")
    low = 0 if any_port else 1
    if not sep or not host or not rest.isdigit() or not low <= int(rest) < 65536:
        raise ValueError(f"{text!r} is not an address of the form host:port")
    return host, int(rest)
