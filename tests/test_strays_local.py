"""A local write looks for text in the arrays it reads, not in every array of the document
(model/document.py `apply_environment`): its cost follows the edit, not the environment. Text
that a merge brings is the registry's to find (tests/test_strays.py). ASCII text only here:
reading it does not hang yrs."""

from __future__ import annotations

import copy
import json

from modelutil import FIXTURE_DIR
from pycrdt import Text

from peerdaemon.model import apply_environment, export_environment, import_environment, prepare
from peerdaemon.model.strays import has_strays


def fixture() -> tuple[object, dict, str]:
    env = json.loads((FIXTURE_DIR / "test-env.json").read_text(encoding="utf-8"))
    doc = import_environment(env, env["uuid"])[0]
    return doc, export_environment(doc, env["uuid"]), env["uuid"]


def test_a_write_of_fields_reads_no_array():
    doc, old, env_id = fixture()
    doc.get("rootChildren", type=Text).insert(0, "b")
    doc.get("routes.order", type=Text).insert(0, "c")
    apply_environment(doc, prepare({**old, "name": "renamed"}, env_id, base=old)[0], old=old)
    assert has_strays(doc, ["rootChildren"]) and has_strays(doc, ["routes.order"])


def test_a_write_of_one_list_looks_in_its_array_and_deletes_every_stray():
    doc, old, env_id = fixture()
    doc.get("rootChildren", type=Text).insert(0, "b")
    new = copy.deepcopy(old)
    new["routes"][0]["endpoint"] = "elsewhere"
    apply_environment(doc, prepare(new, env_id, base=old)[0], old=old)
    assert has_strays(doc, ["rootChildren"])  # routes.order holds none: nothing else is read

    doc.get("routes.order", type=Text).insert(0, "c")
    newer = copy.deepcopy(new)
    newer["routes"][0]["endpoint"] = "again"
    apply_environment(doc, prepare(newer, env_id, base=new)[0], old=new)
    assert not has_strays(doc)  # found in routes.order: the whole document is cleaned
    assert export_environment(doc, env_id)["routes"][0]["endpoint"] == "again"
