"""Synthetic Mockoon environments of a given size, shaped like real ones (lastMigration 33)."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

from peerdaemon.model.schema import TLS_DEFAULT

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mockoon" / "test-env.json"


def make_environment(target_bytes: int, seed: int = 0, routes: int | None = None) -> dict[str, Any]:
    """An environment whose JSON is about `target_bytes`, most of it in response bodies."""
    rng = random.Random(seed)
    n_routes = routes or max(1, min(400, target_bytes // 20_000))
    per_body = max(16, int(target_bytes * 0.7) // (n_routes * 2))
    env: dict[str, Any] = {
        "uuid": str(uuid.UUID(int=rng.getrandbits(128))),
        "lastMigration": 33,
        "name": f"bench {target_bytes}",
        "endpointPrefix": "",
        "latency": 0,
        "port": 3000,
        "hostname": "",
        "folders": [],
        "routes": [],
        "rootChildren": [],
        "proxyMode": False,
        "proxyHost": "",
        "proxyRemovePrefix": False,
        "tlsOptions": dict(TLS_DEFAULT),
        "cors": True,
        "headers": [{"key": "Content-Type", "value": "application/json"}],
        "proxyReqHeaders": [{"key": "", "value": ""}],
        "proxyResHeaders": [{"key": "", "value": ""}],
        "data": [],
        "callbacks": [],
    }
    words = ["alpha", "beta", "gamma", "delta", "users", "items", "id", "name", "value", "true"]
    for r in range(n_routes):
        responses = []
        for s in range(2):
            body_items = []
            size = 0
            while size < per_body:
                item = json.dumps(
                    {rng.choice(words): rng.choice(words) + str(rng.randint(0, 9999))}
                )
                body_items.append(item)
                size += len(item) + 2
            responses.append(
                {
                    "uuid": str(uuid.UUID(int=rng.getrandbits(128))),
                    "body": "[\n  " + ",\n  ".join(body_items) + "\n]",
                    "latency": 0,
                    "statusCode": 200 + s,
                    "label": f"response {s}",
                    "headers": [{"key": "Content-Type", "value": "application/json"}],
                    "bodyType": "INLINE",
                    "filePath": "",
                    "databucketID": "",
                    "sendFileAsBody": False,
                    "rules": [
                        {
                            "target": "query",
                            "modifier": "id",
                            "value": str(s),
                            "invert": False,
                            "operator": "equals",
                        }
                    ]
                    if s
                    else [],
                    "rulesOperator": "OR",
                    "disableTemplating": False,
                    "fallbackTo404": False,
                    "default": s == 0,
                    "crudKey": "id",
                    "callbacks": [],
                }
            )
        route = {
            "uuid": str(uuid.UUID(int=rng.getrandbits(128))),
            "type": "http",
            "documentation": f"route {r}",
            "method": "get",
            "endpoint": f"resource{r}/:id",
            "responses": responses,
            "responseMode": None,
            "streamingMode": None,
            "streamingInterval": 0,
        }
        env["routes"].append(route)
        env["rootChildren"].append({"type": "route", "uuid": route["uuid"]})
    return env
