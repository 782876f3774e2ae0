"""Where the mock runner lives and how it gets there.

The runner is a small Node program shipped in this package (`runner/`), whose dependencies
(`@mockoon/commons-server`, pinned by the shipped lock file) `peerdaemon mock install` puts into
the data dir with `npm ci`. Node.js is optional: without it, or without the installed runner,
serving says so in one line and everything else works.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "ENGINE_VERSION",
    "INSTALL_HINT",
    "RUNNER_SOURCE",
    "InstallError",
    "RunnerUnavailable",
    "install",
    "locate",
    "runner_dir",
]

RUNNER_SOURCE = Path(__file__).parent / "runner"
ENGINE_VERSION = "9.9.0"
MIN_NODE = 18
INSTALL_HINT = "run `peerdaemon mock install`"
RUNNER_ENV = "PEERDAEMON_MOCK_RUNNER"
"""A directory holding an installed runner (runner.mjs and node_modules): tests and packagers."""
NODE_ENV = "PEERDAEMON_NODE"
SHIPPED = ("runner.mjs", "package.json", "package-lock.json")


class RunnerUnavailable(Exception):
    """Serving cannot start; the message is one line that says what to do."""


class InstallError(Exception):
    pass


def runner_dir(data_dir: Path) -> Path:
    override = os.environ.get(RUNNER_ENV)
    return Path(override) if override else Path(data_dir) / "mock-runner"


def find_node() -> str:
    return _find_node()[0]


def _find_node() -> tuple[str, int]:
    """Node's path and major version."""
    node = os.environ.get(NODE_ENV) or shutil.which("node")
    if node is None:
        raise RunnerUnavailable(
            f"mock serving needs Node.js {MIN_NODE}+, which is not installed (then {INSTALL_HINT})"
        )
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RunnerUnavailable(f"mock serving needs Node.js {MIN_NODE}+: {node}: {exc}") from None
    match = re.match(r"v(\d+)\.", out.strip())
    if match is None or int(match.group(1)) < MIN_NODE:
        raise RunnerUnavailable(
            f"mock serving needs Node.js {MIN_NODE}+, {node} is {out.strip() or 'unknown'}"
        )
    return node, int(match.group(1))


def sandbox_flags(major: int, readable: list[Path]) -> list[str]:
    """Node's permission model, where this Node has it (20+): the runner may read only
    `readable` (and the runner itself), start no process or worker, load no native addon."""
    if major < 20:
        return []
    flag = "--experimental-permission" if major < 23 else "--permission"
    return [flag, "--no-warnings", *(f"--allow-fs-read={path}" for path in readable)]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locate(data_dir: Path, sandbox: list[Path] | None = None) -> list[str]:
    """The runner's command line, or `RunnerUnavailable` saying why and what to run.

    A runner installed by an older peerdaemon with the same lock file gets the shipped
    `runner.mjs` copied over (no npm needed); a different lock file needs `mock install`.
    `sandbox`: run it in Node's permission model, reading only the runner and these folders.
    """
    node, major = _find_node()
    where = runner_dir(data_dir)
    engine = where / "node_modules" / "@mockoon" / "commons-server" / "package.json"
    try:
        version = json.loads(engine.read_text()).get("version")
    except (OSError, ValueError):
        version = None
    if version != ENGINE_VERSION:
        raise RunnerUnavailable(f"the mock runner is not installed in {where}: {INSTALL_HINT}")
    if os.environ.get(RUNNER_ENV) is None:
        lock = where / "package-lock.json"
        if not lock.exists() or _digest(lock) != _digest(RUNNER_SOURCE / "package-lock.json"):
            raise RunnerUnavailable(f"the mock runner in {where} is outdated: {INSTALL_HINT}")
        script = where / "runner.mjs"
        if not script.exists() or _digest(script) != _digest(RUNNER_SOURCE / "runner.mjs"):
            shutil.copyfile(RUNNER_SOURCE / "runner.mjs", script)
    flags = sandbox_flags(major, [where.resolve(), *sandbox]) if sandbox is not None else []
    return [node, *flags, str(where / "runner.mjs")]


def install(data_dir: Path) -> Path:
    """`npm ci` of the shipped lock file into the data dir (network needed, once)."""
    find_node_or_fail()
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError("npm is not installed (it comes with Node.js)")
    where = Path(data_dir) / "mock-runner"
    where.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        shutil.copyfile(RUNNER_SOURCE / name, where / name)
    result = subprocess.run(
        [npm, "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=where,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()
        raise InstallError(f"npm ci failed in {where}: {last[-1] if last else result.returncode}")
    return where


def find_node_or_fail() -> str:
    try:
        return find_node()
    except RunnerUnavailable as exc:
        raise InstallError(str(exc).replace(f" (then {INSTALL_HINT})", "")) from None
