"""The layer check (pyproject.toml [tool.importlinter]) holds, and fails on a back-up import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports finds `peerdaemon` on sys.path: the copy in `cwd` comes first
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "peerdaemon", tmp_path / "peerdaemon", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path / "peerdaemon"


def test_a_back_up_import_breaks_the_build(tmp_path: Path) -> None:
    registry = copy_of_the_package(tmp_path) / "core" / "registry.py"
    # the bottom reaching for a service, lazily: still an import
    registry.write_text(
        registry.read_text()
        + "\n\ndef _up() -> None:\n    from ..mirror import service  # noqa: F401\n"
    )
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "peerdaemon.core.registry -> peerdaemon.mirror.service" in result.stdout


def test_reaching_past_a_face_breaks_the_build(tmp_path: Path) -> None:
    service = copy_of_the_package(tmp_path) / "hublink" / "service.py"
    service.write_text(
        service.read_text() + "\nfrom ..peer.session import PeerConnection  # noqa\n"
    )
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "peer is used through its face BROKEN" in result.stdout
    assert "peerdaemon.hublink.service -> peerdaemon.peer.session" in result.stdout
