"""Mock serving with Mockoon's own engine (`@mockoon/commons-server`), driven by a Node runner
we ship (docs/mock-runner.md): the sans-I/O protocol and supervisor (`protocol`, `engine`), the
runner process's trio shell (`process`), where the runner is installed (`install`), and the
device's service (`service`). The hub's Cloud Mock uses the same engine and shell.
"""

from .engine import ERROR, RUNNING, STARTING, UNAVAILABLE, MockEngine, Notice, Server, ServerSpec
from .install import (
    ENGINE_VERSION,
    INSTALL_HINT,
    InstallError,
    RunnerUnavailable,
    install,
    locate,
    runner_dir,
)
from .process import RunnerShell
from .protocol import RunnerEvent, RunnerProtocolError, encode, parse_event
from .service import MOCKS_KEY, MockService, mock_url, safe_dirname

__all__ = [
    "ENGINE_VERSION",
    "ERROR",
    "INSTALL_HINT",
    "MOCKS_KEY",
    "RUNNING",
    "STARTING",
    "UNAVAILABLE",
    "InstallError",
    "MockEngine",
    "MockService",
    "Notice",
    "RunnerEvent",
    "RunnerProtocolError",
    "RunnerShell",
    "RunnerUnavailable",
    "Server",
    "ServerSpec",
    "encode",
    "install",
    "locate",
    "mock_url",
    "parse_event",
    "runner_dir",
    "safe_dirname",
]
