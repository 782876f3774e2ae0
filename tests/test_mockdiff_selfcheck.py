"""Self-check of tests/mockdiff.py, the differential tester of mock serving against the real
`@mockoon/cli` 9.9.0: its generated environments are what the generator writes and valid for
Mockoon's strict schema, they cover what they are meant to, every corpus is deterministic (two
fresh mockoon-cli processes with the same faker seed answer it identically, and as each request's
expectations say), and `compare` does see a difference when one side serves a changed environment.

Only loopback: every server listens on 127.0.0.1, on a port chosen free by the OS.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mockdiff as md
import pytest

needs_mockoon = pytest.mark.skipif(
    shutil.which("node") is None or not md.MOCKOON_CLI.exists(),
    reason=f"node and @mockoon/cli are needed: `npm ci --prefix {md.INTEROP}`",
)
WORKERS = 4  # environments checked at once (two mockoon-cli processes each)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mockdiff"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the fixtures -----------------------------------------------------------------------------


def test_fixture_files_are_what_the_generator_writes():
    expected = md.generated_fixtures()
    on_disk = {
        str(p.relative_to(md.GEN_DIR)): p.read_bytes() for p in md.GEN_DIR.rglob("*") if p.is_file()
    }
    stale = sorted(k for k in expected if on_disk.get(k) != expected[k])
    extra = sorted(set(on_disk) - set(expected))
    assert not stale and not extra, (
        f"tests/fixtures/mockdiff/ is out of date (stale {stale}, extra {extra}): "
        "run `.venv/bin/python tests/mockdiff.py`"
    )


def test_environment_names_and_files_are_unique_and_exist():
    names = [case.name for case in md.ENVIRONMENTS]
    assert len(names) == len(set(names))
    for case in md.ENVIRONMENTS:
        assert case.path.is_file(), case.path
        assert case.corpus, case.name
        assert all(r.path.startswith("/") for r in case.corpus), case.name
    assert set(md.REPAIRED_ON_LOAD) <= set(names)


@needs_mockoon
def test_environments_against_mockoons_strict_schema():
    """Generated environments pass EnvironmentSchemaNoFix, need no repairRefs and hold no uuid
    twice; the real fixtures pass too, except those mockoon-cli repairs when it loads them."""
    results = md.validate_envs([case.path for case in md.ENVIRONMENTS])
    wrong = []
    for case, result in zip(md.ENVIRONMENTS, results, strict=True):
        should_pass = case.name not in md.REPAIRED_ON_LOAD
        if result["ok"] != should_pass:
            wrong.append(f"{case.name}: expected ok={should_pass}, got {result}")
    assert not wrong, "\n".join(wrong)


def _generated() -> list[dict[str, Any]]:
    return [load(case.path) for case in md.GENERATED_ENVIRONMENTS]


def _responses(envs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for env in envs:
        for route in env["routes"]:
            yield from route["responses"]


def test_generated_environments_cover_rules_modes_bodies_and_settings():
    envs = _generated()
    rules = [r for resp in _responses(envs) for r in resp["rules"]]
    operators = {r["operator"] for r in rules}
    targets = {r["target"] for r in rules}
    assert operators == {
        "equals",
        "regex",
        "regex_i",
        "null",
        "empty_array",
        "array_includes",
        "valid_json_schema",
    }
    assert targets == {
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
    }
    assert any(r["invert"] for r in rules)
    with_rules = [resp for resp in _responses(envs) if len(resp["rules"]) > 1]
    assert {resp["rulesOperator"] for resp in with_rules} == {"AND", "OR"}
    routes = [route for env in envs for route in env["routes"]]
    assert {r["responseMode"] for r in routes} == {
        None,
        "RANDOM",
        "SEQUENTIAL",
        "DISABLE_RULES",
        "FALLBACK",
    }
    assert {r["type"] for r in routes} == {"http", "crud"}
    files = [resp for resp in _responses(envs) if resp["bodyType"] == "FILE"]
    assert {resp["sendFileAsBody"] for resp in files} == {True, False}
    paths = {resp["filePath"] for resp in files}
    assert any(p and not (md.GEN_DIR / p).exists() and "{{" not in p for p in paths)  # missing
    assert all(not Path(p).is_absolute() for p in paths)
    assert any(resp["latency"] == 50 for resp in _responses(envs))
    assert {env["cors"] for env in envs} == {True, False}
    assert any(env["endpointPrefix"] for env in envs)
    bodies = " ".join(resp["body"] for resp in _responses(envs))
    bodies += " ".join(d["value"] for env in envs for d in env["data"])
    for helper in (
        "urlParam",
        "queryParam",
        "body",
        "header",
        "cookie",
        "repeat",
        "add",
        "jsonParse",
        "faker",
        "setData",
        "setGlobalVar",
        "getEnvVar",
        "status",
    ):
        assert re.search(r"(\{\{|\()#?" + helper + r"\b", bodies), helper
    # what each environment's corpus sends
    corpus = [r for case in md.GENERATED_ENVIRONMENTS for r in case.corpus]
    types = {v.split(";")[0] for r in corpus for k, v in r.headers if k.lower() == "content-type"}
    assert {"application/json", "application/x-www-form-urlencoded", "multipart/form-data"} <= types
    assert any(k.lower() == "cookie" for r in corpus for k, _ in r.headers)
    assert any(
        r.method == "OPTIONS"
        and dict(r.headers).keys() >= {"Origin", "Access-Control-Request-Method"}
        for r in corpus
    )
    assert {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"} <= {
        r.method for r in corpus
    }
    assert any(r.expect_status == 404 for r in corpus)
    assert any(r.min_ms >= 50 for r in corpus)


def test_no_callback_leaves_loopback():
    """Callbacks a response fires must stay on loopback (the real callbacks.json defines callbacks
    to playground.mockoon.com, but no response fires them)."""
    for case in md.ENVIRONMENTS:
        env = load(case.path)
        fired = {c["uuid"] for resp in _responses([env]) for c in resp.get("callbacks", [])}
        for callback in env.get("callbacks", []):
            if callback["uuid"] in fired:
                host = urlsplit(callback["uri"]).hostname
                assert host in (None, "127.0.0.1", "localhost"), (case.name, callback["uri"])


# --- compare on its own -----------------------------------------------------------------------


def _obs(req: md.Req, status: int = 200, headers=(), body: bytes = b"x", ms: float = 1.0):
    return md.Observed(req, status, "OK", tuple(headers), body, ms)


def test_compare_names_each_kind_of_difference():
    r = md.get("/a", label="first")
    slow = md.get("/slow", min_ms=50)
    base = [_obs(r, headers=[("x-a", "1")]), _obs(slow, ms=60)]
    assert md.compare(base, list(base)) == []
    assert md.compare(base, [_obs(r, 201, [("x-a", "1")]), base[1]]) == [
        "#0 GET /a [first]: status 200 vs 201"
    ]
    (diff,) = md.compare(base, [_obs(r, headers=[("x-a", "2")]), base[1]])
    assert "('x-a', '1')" in diff and "('x-a', '2')" in diff
    assert (
        md.compare(base, [_obs(r, headers=[("x-a", "2")]), base[1]], ignore_headers=["X-A"]) == []
    )
    (diff,) = md.compare(base, [_obs(r, headers=[("x-a", "1")], body=b"y"), base[1]])
    assert "body differs at byte 0" in diff
    (diff,) = md.compare(base, [base[0], _obs(slow, ms=3)])
    assert "latency" in diff
    assert md.compare(base, base[:1]) == ["recordings differ in length: 2 vs 1"]
    failed = md.Observed(r, 0, "", (), b"", 1.0, "ConnectionRefusedError: refused")
    assert "error" in md.compare(base, [failed, base[1]])[0]


# --- against the real Mockoon CLI -------------------------------------------------------------


def _check_case(case: md.EnvCase, target: md.Target) -> list[str]:
    diffs, first, second = md.diff_targets(case.path, case.corpus, target, target)
    problems = [f"{case.name}: not deterministic: {d}" for d in diffs]
    problems += [f"{case.name}: {p}" for p in md.check_expectations(first)]
    if all(o.status == 404 for o in first):
        problems.append(f"{case.name}: every request answered 404")
    return problems


@needs_mockoon
@pytest.mark.timeout(150)
def test_every_corpus_is_deterministic_against_two_mockoon_cli(workdir):
    """Two fresh mockoon-cli processes (same file, same faker seed) answer every corpus
    identically, and as its requests' expectations say."""
    target = md.mockoon_cli_target(workdir)
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda case: _check_case(case, target), md.ENVIRONMENTS))
    problems = [p for result in results for p in result]
    assert not problems, "\n".join(problems)


def _modified(case: md.EnvCase, workdir: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    env = load(case.path)
    edit(env)
    path = workdir / case.path.name
    path.write_text(json.dumps(env, indent=2), encoding="utf-8")
    return path


def _route(env: dict[str, Any], endpoint: str) -> dict[str, Any]:
    return next(r for r in env["routes"] if r["endpoint"] == endpoint)


@needs_mockoon
@pytest.mark.timeout(60)
def test_compare_sees_a_modified_environment(workdir):
    """One server serves a changed copy of an environment: compare reports exactly the requests
    the change affects (a body, a status, a header, a rule, a faker call shifting later values)."""
    case = next(c for c in md.GENERATED_ENVIRONMENTS if c.name == "gen-templating")

    def edit(env: dict[str, Any]) -> None:
        math = _route(env, "t/math")["responses"][0]
        math["body"] = math["body"].replace("{{add 1 2 3}}", "{{add 1 2 4}}")
        _route(env, "t/env")["responses"][0]["statusCode"] = 201
        _route(env, "t/jwt")["responses"][0]["headers"].append(md.H("X-Extra", "1"))
        each = _route(env, "t/each")["responses"][0]
        each["body"] = each["body"] + "{{faker 'string.uuid'}}"

    modified = _modified(case, workdir, edit)
    target = md.mockoon_cli_target(workdir)
    diffs, _, _ = md.diff_targets(case.path, case.corpus, target, target, b_env_path=modified)
    text = "\n".join(diffs)
    assert "GET /t/math: body differs" in text, text
    assert "GET /t/env: status 200 vs 201" in text, text
    assert "GET /t/jwt: headers only in first [], only in second [('x-extra', '1')]" in text, text
    assert "GET /t/each: body differs" in text, text
    # the extra faker call shifts every later faker value; requests without faker stay equal
    assert "GET /t/faker: body differs" in text, text
    assert not any("GET /t/strings" in d or "GET /t/vars" in d for d in diffs), text
