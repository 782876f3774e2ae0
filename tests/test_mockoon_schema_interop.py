"""Exports of arbitrary documents are valid for the real Mockoon.

Documents built from generated Yjs updates (tests/yjsgen.py: a fixed-seed batch, plus the issue's
named cases on an empty document and on every fixture), and from updates the npm `yjs` makes with
content pycrdt cannot (tests/interop/yjs_exotic.mjs: undefined, BigInt, Uint8Array in maps, text
formats and embeds, XML types in maps, lone surrogates...), are exported and checked by
tests/interop/validate_env.mjs with the npm `@mockoon/commons` pinned in
tests/interop/package-lock.json: no `EnvironmentSchemaNoFix` error (Mockoon's strict schema, the
one that repairs nothing), nothing for `repairRefs` to change, no uuid held twice. Node runs once
per batch.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from yjsgen import (
    ENV_ID,
    base_update,
    bases,
    check_document,
    doc_of,
    fixture_names,
    make_update,
    named_cases,
    ops,
)

from peerdaemon.model import export_environment

INTEROP = Path(__file__).parent / "interop"
VALIDATE = INTEROP / "validate_env.mjs"
EXOTIC = INTEROP / "yjs_exotic.mjs"
NODE = shutil.which("node")
BATCH = 200

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def need(package: str) -> None:
    if not (INTEROP / "node_modules" / package / "package.json").exists():
        pytest.skip(f"npm {package} is not installed: run `npm ci --prefix {INTEROP}`")


def validate(envs: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    """validate_env.mjs's verdict on each environment, in one run of node."""
    need("@mockoon/commons")
    batch = tmp_path / "envs.json"
    batch.write_text(json.dumps(envs, allow_nan=False), encoding="utf-8")
    done = subprocess.run(
        [NODE or "node", str(VALIDATE), str(batch)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode in (0, 1), done.stderr
    results = json.loads(done.stdout)
    assert len(results) == len(envs)
    return results


def assert_all_valid(labelled: list[tuple[str, dict[str, Any]]], tmp_path: Path) -> None:
    results = validate([env for _, env in labelled], tmp_path)
    bad = [
        f"{label}: {json.dumps({k: v for k, v in r.items() if v and k != 'ok'})[:600]}"
        for (label, _), r in zip(labelled, results, strict=True)
        if not r["ok"]
    ]
    assert not bad, f"{len(bad)} of {len(labelled)} exports invalid for Mockoon:\n" + "\n".join(
        bad[:12]
    )


def test_validator_catches_what_mockoon_refuses(tmp_path):
    """The checker itself: a valid fixture passes; a string port, a dangling reference and a
    repeated uuid are each reported."""
    env = export_environment(doc_of(base_update("test-env.json")), ENV_ID)
    broken = [json.loads(json.dumps(env)) for _ in range(3)]
    broken[0]["port"] = "3000"
    broken[1]["rootChildren"].append({"type": "route", "uuid": ENV_ID})
    broken[2]["routes"][1]["uuid"] = broken[2]["routes"][0]["uuid"]
    results = validate([env, *broken], tmp_path)
    assert results[0]["ok"], results[0]
    assert any("port" in e for e in results[1]["schemaErrors"]), results[1]
    assert results[2]["refsRepaired"], results[2]
    assert results[3]["duplicateUuids"], results[3]


def test_fixture_exports_are_valid(tmp_path):
    """Each fixture, imported and exported, is what Mockoon loads without repairing."""
    assert_all_valid(
        [(name, export_environment(doc_of(base_update(name)), ENV_ID)) for name in fixture_names()],
        tmp_path,
    )


def test_named_cases_are_valid(tmp_path):
    """The issue's reproductions, on an empty document and on every fixture."""
    labelled = []
    for base in [None, *fixture_names()]:
        b = base_update(base)
        for name, case in named_cases().items():
            labelled.append((f"{name} on {base}", check_document(b, make_update(b, case))))
    assert_all_valid(labelled, tmp_path)


def test_generated_exports_are_valid(tmp_path):
    """A fixed batch of generated documents (two clients' updates on a base)."""
    labelled: list[tuple[str, dict[str, Any]]] = []

    @settings(
        max_examples=BATCH,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(bases, ops, ops)
    def collect(base, first, second):
        b = base_update(base)
        u1, u2 = make_update(b, first), make_update(b, second)
        env = export_environment(doc_of(b, u1, u2), ENV_ID)  # totality: test_model_fuzz.py
        labelled.append((f"base={base} first={first!r:.400} second={second!r:.400}", env))

    collect()
    assert len(labelled) >= BATCH // 2
    assert_all_valid(labelled, tmp_path)


def exotic_updates(base: bytes, tmp_path: Path) -> dict[str, bytes]:
    need("yjs")
    argv = [NODE or "node", str(EXOTIC)]
    if base:
        (tmp_path / "base.bin").write_bytes(base)
        argv.append(str(tmp_path / "base.bin"))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {k: base64.b64decode(v) for k, v in json.loads(done.stdout).items()}


@pytest.mark.parametrize("base", [None, "test-env.json", "basic-folder-2-routes.json"])
def test_yjs_made_content_reads_valid(base, tmp_path):
    """Content only a JavaScript client makes: the export is total and valid for Mockoon.

    An update yrs cannot decode at all (a Y.XmlHook) is refused whole by `apply_update`, as the
    daemon's merge refuses it; then nothing of it is stored, so there is nothing to read.
    """
    b = base_update(base)
    labelled = []
    for name, update in exotic_updates(b, tmp_path).items():
        try:
            doc_of(update)
        except ValueError:
            assert name == "xml-hook", f"yrs cannot decode the {name!r} update"
            continue
        labelled.append((f"{name} on {base}", check_document(b, update)))
    assert len(labelled) >= 10
    assert_all_valid(labelled, tmp_path)
