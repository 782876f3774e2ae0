"""LAN discovery: zeroconf advertise/browse of `_peerdaemon._tcp.local.` (docs/discovery.md).

`tags` is sans-I/O (TXT records, hourly rotating space tags); `mdns` is the trio shell.
"""

from .mdns import DiscoveryError, MdnsDiscovery, ipv4_addresses
from .tags import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Advert,
    SpaceKey,
    SpaceKeyLike,
    accept,
    build_txt,
    matching_spaces,
    parse_txt,
    space_tag,
)

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Advert",
    "DiscoveryError",
    "MdnsDiscovery",
    "SpaceKey",
    "SpaceKeyLike",
    "accept",
    "build_txt",
    "ipv4_addresses",
    "matching_spaces",
    "parse_txt",
    "space_tag",
]
