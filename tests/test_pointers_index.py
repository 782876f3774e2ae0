"""`core.pointers._index`, which reads an entity's place in its list straight from the
document (it runs on every merged change with subscribers), against the export's rule
(model/layout.py `assemble`): the order array's first occurrences of entities it holds, then
the others by uuid; a key "" or a value that is no map exports nothing."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pycrdt import Array, Doc, Map

from peerdaemon.core.pointers import _index


def exported_places(items: dict[str, Any], order: list[Any]) -> dict[str, int]:
    valid = {k for k, v in items.items() if k and isinstance(v, dict)}
    ids: list[str] = []
    for u in order:
        if isinstance(u, str) and u in valid and u not in ids:
            ids.append(u)
    ids.extend(sorted(valid - set(ids)))
    return {u: i for i, u in enumerate(ids)}


@pytest.mark.parametrize("seed", range(40))
def test_the_place_read_from_the_document_is_the_exports(seed: int) -> None:
    rng = random.Random(seed)
    names = ["", *(f"e{i}" for i in range(rng.randint(0, 9)))]
    doc = Doc()
    items_map, order_array = doc.get("routes", type=Map), doc.get("routes_order", type=Array)
    items: dict[str, Any] = {}
    with doc.transaction():
        for name in names:
            if rng.random() < 0.75:  # some are listed in the order only (deleted entities)
                value = {"n": 1} if rng.random() < 0.8 else rng.choice([1, "text", [1]])
                items[name] = value
                items_map[name] = Map(value) if isinstance(value, dict) else value
        order = [rng.choice([*names, "gone", 7]) for _ in range(rng.randint(0, 14))]
        order_array.extend(order)
    places = exported_places(items, order)
    uids = [*names, "gone", "absent"]
    for uid in uids:
        assert _index(items_map, order_array, uid, {}) == places.get(uid), uid
    for sequence in (uids, uids[::-1]):  # one change's lookups share what they read
        memo: dict[Any, dict[str, int]] = {}
        assert [_index(items_map, order_array, u, memo) for u in sequence] == [
            places.get(u) for u in sequence
        ]
