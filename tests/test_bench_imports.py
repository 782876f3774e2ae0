"""Benchmarks import nothing from tests/: what both use lives in lab/ (lab/servers.py, the
private Redis and PostgreSQL, moved there for benchmarks/bench_cluster.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def offenders(bench: Path, tests: Path, lab: Path) -> dict[str, set[str]]:
    """By benchmark file: the modules it imports that only tests/ has (a module lab/ or
    benchmarks/ also has is found there: both go before tests/ on the path, and tests/ is
    never put on a benchmark's path)."""
    only_tests = _modules(tests) - _modules(lab) - _modules(bench)
    out = {}
    for path in sorted(bench.glob("*.py")):
        bad = _imports(path) & only_tests
        if any("sys.path" in ln and "tests" in ln for ln in path.read_text().splitlines()):
            bad.add("tests/ on sys.path")
        if bad:
            out[path.name] = bad
    return out


def test_benchmarks_import_nothing_from_tests():
    assert offenders(ROOT / "benchmarks", ROOT / "tests", ROOT / "lab") == {}


def test_the_check_sees_an_import_from_tests(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_x.py").write_text(
        "import json\nfrom servers import free_port\nimport helpers\n"
    )
    tests = tmp_path / "tests"
    tests.mkdir()
    for name in ("servers", "helpers"):
        (tests / f"{name}.py").write_text("")
    lab = tmp_path / "lab"
    lab.mkdir()
    assert offenders(bench, tests, lab) == {"bench_x.py": {"servers", "helpers"}}
    (lab / "servers.py").write_text("")  # lab/ has it: the benchmark finds that one
    assert offenders(bench, tests, lab) == {"bench_x.py": {"helpers"}}
    (bench / "bench_y.py").write_text('import sys\nsys.path.insert(0, str(ROOT / "tests"))\n')
    assert offenders(bench, tests, lab)["bench_y.py"] == {"tests/ on sys.path"}
