"""The daemon side of the hub: attach spaces to hubs and keep them synced through them.

`HubLinkService` keeps the attachments (store setting `"hubs"`), adds the `space.hub` /
`space.unhub` operations and the `hub` section of `status`, and runs one `HubDialer` per hub
URL: the peer protocol in hub mode over `ws(s)://HOST:PORT/peer` (docs/peer-protocol.md section
11, docs/hublink.md). The public names are listed here only; `service.py` holds them.
"""

from .service import (
    HUB_KEY_UNKNOWN,
    HUBS_SETTING,
    HubClientAuth,
    HubDialer,
    HubLinkService,
    HubUrl,
    normalize_hub_key,
    parse_hub_url,
)

__all__ = [
    "HUBS_SETTING",
    "HUB_KEY_UNKNOWN",
    "HubClientAuth",
    "HubDialer",
    "HubLinkService",
    "HubUrl",
    "normalize_hub_key",
    "parse_hub_url",
]
