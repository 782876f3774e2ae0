"""The local status page (docs/status-page.md): a small web UI and JSON API over the socket's
operations, with live events, served on loopback by Hypercorn's trio worker.

`security` (the API key, Host/Origin checks, who is on the other end of a loopback connection),
`views` (the panels' JSON from the operations), `app` (the ASGI app), `service` (the trio
service the supervisor starts). Hypercorn is imported only when the service runs.
"""

from .security import KEY_FILE, Guard, StatusConfigError, load_or_create_key
from .service import DEFAULT_STATUS_LISTEN, DEFAULT_STATUS_PORT, StatusService, StatusSettings

__all__ = [
    "DEFAULT_STATUS_LISTEN",
    "DEFAULT_STATUS_PORT",
    "KEY_FILE",
    "Guard",
    "StatusConfigError",
    "StatusService",
    "StatusSettings",
    "load_or_create_key",
]
