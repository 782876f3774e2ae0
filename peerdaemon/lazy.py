"""A package face whose names load on first use (PEP 562's module `__getattr__`).

A process imports only what it uses: the hub never loads the document model past `lib0`, a
y-websocket client's awareness never loads presence's service (issue 13, the hub's idle
memory). Outside the layers (imports nothing of peerdaemon), so any package may use it."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, modules: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], Any]:
    """The `__getattr__` of `package`: `modules` maps a name to the submodule that defines it;
    a name once loaded is put in `namespace` (the package's globals), so later lookups skip
    this function."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    return __getattr__
