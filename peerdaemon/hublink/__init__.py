"""The daemon side of the hub (issue 5): attach spaces to hubs and keep them synced through them.

`HubLinkService` keeps the attachments (store setting `"hubs"`), adds the `space.hub` /
`space.unhub` operations and the `hub` section of `status`, and runs one `HubLink` per hub URL:
the peer protocol in hub mode over `ws(s)://HOST:PORT/peer` (docs/peer-protocol.md section 11,
docs/hublink.md).
"""

from .service import (
    HUB_KEY_UNKNOWN,
    HUBS_SETTING,
    HubClientAuth,
    HubLink,
    HubLinkService,
    HubUrl,
    normalize_hub_key,
    parse_hub_url,
)

__all__ = [
    "HUBS_SETTING",
    "HUB_KEY_UNKNOWN",
    "HubClientAuth",
    "HubLink",
    "HubLinkService",
    "HubUrl",
    "normalize_hub_key",
    "parse_hub_url",
]
