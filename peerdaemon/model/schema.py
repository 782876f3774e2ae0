"""What peerdaemon knows of Mockoon's environment format (Mockoon 9.x, lastMigration 33).

Only what the CRDT layout and the repairs need: which lists hold entities with uuids, which strings
are long texts merged per character, which lists hold plain objects merged per item, and the
defaults Mockoon gives a new entity (packages/commons/src/constants/environment-schema.constants.ts
of @mockoon/commons 9.9.0). Everything else in a file is preserved as it is.
"""

from __future__ import annotations

import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

LAST_MIGRATION = 33
"""The newest Mockoon migration this model knows; newer files are kept as they are and flagged."""

MODEL_VERSION = 1
"""Version of the Yjs layout in docs/model.md; written in the document's `meta` map."""


@dataclass(frozen=True)
class Kind:
    """One kind of object in an environment and how its fields are laid out in Yjs."""

    name: str
    texts: frozenset[str] = frozenset()
    """Keys whose string values are Y.Text (merged per character)."""
    entity_lists: dict[str, str] = field(default_factory=dict)
    """Keys holding lists of entities with uuids -> the entities' kind name."""
    object_lists: dict[str, str] = field(default_factory=dict)
    """Keys holding lists of plain objects (no uuid) merged per item -> the items' kind name."""
    ref_lists: frozenset[str] = frozenset()
    """Keys holding lists of {type, uuid} references, stored as atomic items."""


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "environment",
            object_lists={
                "headers": "header",
                "proxyReqHeaders": "header",
                "proxyResHeaders": "header",
            },
        ),
        Kind(
            "route",
            texts=frozenset({"documentation"}),
            entity_lists={"responses": "response"},
        ),
        Kind(
            "response",
            texts=frozenset({"body"}),
            object_lists={"headers": "header", "rules": "rule", "callbacks": "callbackRef"},
        ),
        Kind("folder", ref_lists=frozenset({"children"})),
        Kind("data", texts=frozenset({"value", "documentation"})),
        Kind(
            "callback",
            texts=frozenset({"body", "documentation"}),
            object_lists={"headers": "header"},
        ),
        Kind("header"),
        Kind("rule"),
        Kind("callbackRef"),
        Kind("generic"),
    )
}

ROOT_ENTITY_LISTS: dict[str, str] = {
    "routes": "route",
    "folders": "folder",
    "data": "data",
    "callbacks": "callback",
}
"""Environment-level entity lists; each is a pair of root types in the Yjs document."""

ROOT_REF_LIST = "rootChildren"

ORDER_SUFFIX = ".order"


def _new_uuid() -> str:
    return str(uuid.uuid4())


def _new_short_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(4))


def entity_defaults(kind: str) -> dict[str, Any]:
    """Fields Mockoon gives a new entity of this kind (its `*Default` constants, 9.9.0)."""
    if kind == "route":
        return {
            "uuid": _new_uuid(),
            "type": "http",
            "documentation": "",
            "method": "get",
            "endpoint": "",
            "responses": [],
            "responseMode": None,
            "streamingMode": None,
            "streamingInterval": 0,
        }
    if kind == "response":
        return {
            "uuid": _new_uuid(),
            "body": "{}",
            "latency": 0,
            "statusCode": 200,
            "label": "",
            "headers": [],
            "bodyType": "INLINE",
            "filePath": "",
            "databucketID": "",
            "sendFileAsBody": False,
            "rules": [],
            "rulesOperator": "OR",
            "disableTemplating": False,
            "fallbackTo404": False,
            "default": False,
            "crudKey": "id",
            "callbacks": [],
        }
    if kind == "folder":
        return {"uuid": _new_uuid(), "name": "New folder", "children": []}
    if kind == "data":
        return {
            "uuid": _new_uuid(),
            "id": _new_short_id(),
            "name": "New data",
            "documentation": "",
            "value": "",
        }
    if kind == "callback":
        return {
            "uuid": _new_uuid(),
            "id": _new_short_id(),
            "name": "Callback",
            "documentation": "",
            "method": "get",
            "uri": "",
            "headers": [],
            "body": "",
            "bodyType": "INLINE",
            "filePath": "",
            "databucketID": "",
            "sendFileAsBody": False,
        }
    return {}
