"""Key order of an environment's JSON as Mockoon writes it.

A Yjs map has no key order (pycrdt hands keys back in hash order, which differs between document
instances), so exports are ordered here: like a previous text of the same environment where
there is one (small git diffs), else in the order of Mockoon's own objects, unknown keys last by
name. The same JSON thus always gives the same text.
"""

from __future__ import annotations

from typing import Any

# Canonical key orders: the order of Mockoon's Build*() / *Default objects.
ORDERS: dict[str, tuple[str, ...]] = {
    "environment": (
        "uuid",
        "lastMigration",
        "name",
        "endpointPrefix",
        "latency",
        "port",
        "hostname",
        "folders",
        "routes",
        "rootChildren",
        "proxyMode",
        "proxyHost",
        "proxyRemovePrefix",
        "tlsOptions",
        "cors",
        "headers",
        "proxyReqHeaders",
        "proxyResHeaders",
        "data",
        "callbacks",
    ),
    "route": (
        "uuid",
        "type",
        "documentation",
        "method",
        "endpoint",
        "responses",
        "responseMode",
        "streamingMode",
        "streamingInterval",
    ),
    "response": (
        "uuid",
        "body",
        "latency",
        "statusCode",
        "label",
        "headers",
        "bodyType",
        "filePath",
        "databucketID",
        "sendFileAsBody",
        "rules",
        "rulesOperator",
        "disableTemplating",
        "fallbackTo404",
        "default",
        "crudKey",
        "callbacks",
    ),
    "folder": ("uuid", "name", "children"),
    "databucket": ("uuid", "id", "name", "documentation", "value"),
    "callback": (
        "uuid",
        "id",
        "uri",
        "name",
        "documentation",
        "method",
        "headers",
        "bodyType",
        "body",
        "databucketID",
        "filePath",
        "sendFileAsBody",
    ),
    "callbackRef": ("uuid", "latency"),
    "rule": ("target", "modifier", "value", "invert", "operator"),
    "header": ("key", "value"),
    "ref": ("type", "uuid"),
    "tls": ("enabled", "type", "pfxPath", "certPath", "keyPath", "caPath", "passphrase"),
}

# kind -> {key: (child kind, is an entity list matched by uuid)}
_CHILDREN: dict[str, dict[str, tuple[str, bool]]] = {
    "environment": {
        "folders": ("folder", True),
        "routes": ("route", True),
        "data": ("databucket", True),
        "callbacks": ("callback", True),
        "rootChildren": ("ref", False),
        "headers": ("header", False),
        "proxyReqHeaders": ("header", False),
        "proxyResHeaders": ("header", False),
        "tlsOptions": ("tls", False),
    },
    "route": {"responses": ("response", True)},
    "response": {
        "headers": ("header", False),
        "rules": ("rule", False),
        "callbacks": ("callbackRef", False),
    },
    "folder": {"children": ("ref", False)},
    "callback": {"headers": ("header", False)},
}

_RANK = {kind: {key: i for i, key in enumerate(keys)} for kind, keys in ORDERS.items()}


def order_like(value: Any, template: Any, kind: str | None = "environment") -> Any:
    """`value` with the key order of `template` where it has the same object, else canonical."""
    if isinstance(value, dict):
        rank = _RANK.get(kind or "", {})
        if isinstance(template, dict):
            keys = [k for k in template if k in value]
            seen = set(keys)
            new = [k for k in value if k not in seen]
        else:
            keys, new = [], list(value)
            template = {}
        # new keys: known ones in canonical order, then unknown ones by name, so that the same
        # JSON gives the same text on every replica and after every restart
        new.sort(key=lambda k: (rank.get(k, len(rank)), "" if k in rank else k))
        children = _CHILDREN.get(kind or "", {})
        out: dict[str, Any] = {}
        for k in keys + new:
            child_kind, by_uuid = children.get(k, (None, False))
            out[k] = _order_child(value[k], template.get(k), child_kind, by_uuid)
        return out
    if isinstance(value, list):
        return _order_child(value, template, kind, False)
    return value


def _order_child(value: Any, template: Any, kind: str | None, by_uuid: bool) -> Any:
    if not isinstance(value, list):
        return order_like(value, template, kind)
    old = template if isinstance(template, list) else []
    if by_uuid:
        index = {t.get("uuid"): t for t in old if isinstance(t, dict)}
        return [
            order_like(v, index.get(v.get("uuid")) if isinstance(v, dict) else None, kind)
            for v in value
        ]
    return [order_like(v, old[i] if i < len(old) else None, kind) for i, v in enumerate(value)]
