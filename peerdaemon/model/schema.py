"""What peerdaemon knows of Mockoon's environment format (Mockoon 9.x, lastMigration 33).

Only what the CRDT layout and the repairs need: which lists hold entities with uuids, which strings
are long texts merged per character, which lists hold plain objects merged per item, and the
fields of Mockoon's strict schema with the defaults its repairing loader gives them
(packages/commons/src/constants/environment-schema.constants.ts of @mockoon/commons 9.9.0:
`EnvironmentSchemaNoFix`, and `EnvironmentSchema`'s `.failover()` values). Unknown fields are
preserved as they are.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

LAST_MIGRATION = 33
"""The newest Mockoon migration this model knows; newer files are flagged (docs/model.md)."""

MAX_DEPTH = 64
"""Deepest JSON object or array an environment may hold (the environment object is depth 0, its
`routes` list 1, a route 2...). Deeper containers read as absent and are refused on writes, so
that no reader or writer recurses without bound."""

MODEL_VERSION = 2
"""Version of the Yjs layout in docs/model.md; written in the document's `meta` map. Raising it
takes a migration in model/migrations.py."""

FIRST_GATED_MODEL = 2
"""The first model whose devices gate every space by its model (docs/spaces.md "Model
versions"): links accept a peer of this model or any newer one, and leave what syncs to the
spaces. Older devices have no gate and are refused at the handshake."""


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


# ---------------------------------------------------------------------------------------------
# Mockoon's strict schema (EnvironmentSchemaNoFix of @mockoon/commons 9.9.0)


@dataclass(frozen=True)
class Spec:
    """One known field: what the strict schema accepts, and the failover default."""

    type: str
    """"string", "number", "boolean", "list" (items of kind `items`), "object" (of kind `items`),
    "entities" (entities of kind `items`, with uuids), "refs" ({type, uuid} references)."""
    default: Any = None
    values: frozenset[Any] | None = None
    """The only values allowed (Joi `.valid()`), for strings."""
    empty: bool = True
    """Whether "" is allowed (Joi strings refuse it unless `.allow('')`)."""
    null: bool = False
    minimum: float | None = None
    maximum: float | None = None
    items: str = ""

    def expected(self) -> str:
        """What a field must be, for error messages: "/port must be a number from 0 to 65535"."""
        if self.type == "string":
            if self.values is not None:
                shown = " or ".join(
                    "null" if v is None else repr(v).replace("'", '"')
                    for v in sorted(self.values | ({None} if self.null else set()), key=str)
                )
                return f"one of {shown}"
            return (
                "a string"
                + ("" if self.empty else " (not empty)")
                + (" or null" if self.null else "")
            )
        if self.type == "number":
            if self.minimum is not None and self.maximum is not None:
                return f"a number from {self.minimum:g} to {self.maximum:g}"
            if self.minimum is not None:
                return f"a number of at least {self.minimum:g}"
            return "a number"
        if self.type == "boolean":
            return "true or false"
        if self.type == "object":
            return "an object"
        return "a list"


def _s(default: str, values: tuple[Any, ...] | None = None, *, empty: bool = True) -> Spec:
    return Spec(
        "string",
        default,
        frozenset(v for v in values if v is not None) if values else None,
        empty=empty,
        null=bool(values) and None in values,
    )


def _n(default: float, minimum: float | None = None, maximum: float | None = None) -> Spec:
    return Spec("number", default, minimum=minimum, maximum=maximum)


_B_FALSE = Spec("boolean", False)
_B_TRUE = Spec("boolean", True)
_TEXT = _s("")
_HEADERS = Spec("list", items="header")
_GENERATED_ID = Spec("string", None)
"""Data bucket and callback `id`: Mockoon draws a random one; here it comes from the uuid."""

METHODS = (
    "get", "post", "put", "patch", "delete", "head", "options",
    "propfind", "proppatch", "move", "copy", "mkcol", "lock", "unlock",
)  # fmt: skip
BODY_TYPES = ("INLINE", "FILE", "DATABUCKET")

TLS_DEFAULT = {
    "enabled": False,
    "type": "CERT",
    "pfxPath": "",
    "certPath": "",
    "keyPath": "",
    "caPath": "",
    "passphrase": "",
}

FIELDS: dict[str, dict[str, Spec]] = {
    "environment": {
        "uuid": Spec("uuid"),
        "lastMigration": _n(LAST_MIGRATION),
        "name": _s("New environment"),
        "endpointPrefix": _TEXT,
        "latency": _n(0, 0),
        "port": _n(3000, 0, 65535),
        "hostname": _TEXT,
        "folders": Spec("entities", items="folder"),
        "routes": Spec("entities", items="route"),
        "rootChildren": Spec("refs"),
        "proxyMode": _B_FALSE,
        "proxyHost": _TEXT,
        "proxyRemovePrefix": _B_FALSE,
        "tlsOptions": Spec("object", items="tls"),
        "cors": _B_TRUE,
        "headers": _HEADERS,
        "proxyReqHeaders": _HEADERS,
        "proxyResHeaders": _HEADERS,
        "data": Spec("entities", items="data"),
        "callbacks": Spec("entities", items="callback"),
    },
    "tls": {
        "enabled": _B_FALSE,
        "type": _s("CERT", ("CERT", "PFX")),
        "pfxPath": _TEXT,
        "certPath": _TEXT,
        "keyPath": _TEXT,
        "caPath": _TEXT,
        "passphrase": _TEXT,
    },
    "route": {
        "uuid": Spec("uuid"),
        "type": _s("http", ("http", "crud", "ws")),
        "documentation": _TEXT,
        "method": _s("get", ("", "all", *METHODS)),
        "endpoint": _TEXT,
        "responses": Spec("entities", items="response"),
        "responseMode": _s(None, (None, "RANDOM", "SEQUENTIAL", "DISABLE_RULES", "FALLBACK")),  # type: ignore[arg-type]
        "streamingMode": _s(None, (None, "UNICAST", "BROADCAST")),  # type: ignore[arg-type]
        "streamingInterval": _n(0, 0),
    },
    "response": {
        "uuid": Spec("uuid"),
        "body": _s("{}"),
        "latency": _n(0, 0),
        "statusCode": _n(200, 100, 999),
        "label": _TEXT,
        "headers": _HEADERS,
        "bodyType": _s("INLINE", BODY_TYPES),
        "filePath": _TEXT,
        "databucketID": _TEXT,
        "sendFileAsBody": _B_FALSE,
        "rules": Spec("list", items="rule"),
        "rulesOperator": _s("OR", ("OR", "AND")),
        "disableTemplating": _B_FALSE,
        "fallbackTo404": _B_FALSE,
        "default": _B_FALSE,
        "crudKey": _s("id", empty=False),
        "callbacks": Spec("list", items="callbackRef"),
    },
    "header": {"key": _TEXT, "value": _TEXT},
    "rule": {
        "target": _s(
            "body",
            (
                "body",
                "query",
                "header",
                "cookie",
                "params",
                "path",
                "method",
                "request_number",
                "global_var",
                "data_bucket",
                "templating",
            ),
        ),  # fmt: skip
        "modifier": _TEXT,
        "value": _TEXT,
        "invert": _B_FALSE,
        "operator": _s(
            "equals",
            (
                "equals",
                "regex",
                "regex_i",
                "null",
                "empty_array",
                "array_includes",
                "valid_json_schema",
            ),
        ),  # fmt: skip
    },
    "callbackRef": {"uuid": Spec("uuid"), "latency": _n(0)},
    "folder": {"uuid": Spec("uuid"), "name": _s("New folder"), "children": Spec("refs")},
    "data": {
        "uuid": Spec("uuid"),
        "id": _GENERATED_ID,
        "name": _s("New data"),
        "documentation": _TEXT,
        "value": _s("[\n]"),
    },
    "callback": {
        "uuid": Spec("uuid"),
        "id": _GENERATED_ID,
        "name": _s("Callback", empty=False),
        "documentation": _TEXT,
        "method": _s("post", METHODS),
        "uri": _TEXT,
        "headers": _HEADERS,
        "body": _TEXT,
        "bodyType": _s("INLINE", BODY_TYPES),
        "filePath": _TEXT,
        "sendFileAsBody": _B_TRUE,
        "databucketID": _TEXT,
    },
}
"""Known fields per kind, in Mockoon's order. `tlsOptions` is optional in the strict schema but
its loader adds it; `callbackRef.latency` is optional too, and defaults to 0."""

ITEM_DEFAULTS: dict[str, dict[str, Any]] = {
    "header": {"key": "", "value": ""},
    "rule": {"target": "body", "modifier": "", "value": "", "invert": False, "operator": "equals"},
}
"""What Mockoon's failover puts in place of a header or rule that is not an object."""

_GUID = re.compile(
    r"([\[{(]?)[0-9A-F]{8}([:-]?)[0-9A-F]{4}\2?[0-9A-F]{4}\2?[0-9A-F]{4}\2?[0-9A-F]{12}([\]})]?)",
    re.IGNORECASE | re.ASCII,
)
_BRACKETS = {"": "", "[": "]", "{": "}", "(": ")"}


def is_guid(value: Any) -> bool:
    """Joi's `string().uuid()` (no version given): 32 hex digits, optional separators, brackets."""
    if type(value) is not str or len(value) < 32 or len(value) > 38:
        return False
    m = _GUID.fullmatch(value)
    return m is not None and _BRACKETS[m.group(1)] == m.group(3)


_NAMESPACE = uuid.UUID("2f1b8d7e-6a51-5c0e-9a37-5d3c1f0e4b21")


def derived_uuid(kind: str, scope: str, old: str, taken: set[str]) -> str:
    """A replacement uuid that every replica derives alike from what it replaces."""
    n = 0
    while True:
        new = str(uuid.uuid5(_NAMESPACE, f"{kind}\x00{scope}\x00{old}\x00{n}"))
        if new not in taken:
            return new
        n += 1


_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def derived_id(entity_uuid: str) -> str:
    """A 4-character `id` (as Mockoon's GenerateUniqueID makes) derived from the entity's uuid."""
    n = uuid.uuid5(_NAMESPACE, f"id\x00{entity_uuid}").int
    out = []
    for _ in range(4):
        n, r = divmod(n, 36)
        out.append(_ID_ALPHABET[r])
    return "".join(out)
