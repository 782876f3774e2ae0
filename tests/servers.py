"""The private Redis and PostgreSQL servers of the cluster tests live in lab/servers.py, shared
with the benchmarks (which import nothing from tests/).

Under pytest, tests/conftest.py puts lab/ first on sys.path, so `from servers import ...` finds
lab/servers.py itself. This file answers when tests/ comes first instead (a script run from
tests/): it hands over to that same module, so there is one `servers` module, one set of live
servers for the atexit cleanup, and one `PostgresServer` class for isinstance.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_LAB = Path(__file__).resolve().parents[1] / "lab" / "servers.py"
_spec = importlib.util.spec_from_file_location(__name__, _LAB)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _module  # what `import servers` returns once this file has run
_spec.loader.exec_module(_module)
