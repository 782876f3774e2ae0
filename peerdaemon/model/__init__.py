"""Mockoon environments as Yjs-compatible CRDT documents (layout in docs/model.md).

The package's face is loaded on first use (a module `__getattr__`): a process that needs one
narrow module (the hub reads `lib0` and `schema`) does not keep the document machinery in
memory.

The function `repair.repair` is not on the face: the name is its module's, which a lazy face
would hand out instead once anything imported the module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .document import apply_environment, export_environment, import_environment, prepare
    from .repair import ModelError, NotAnEnvironment, check_environment, is_newer
    from .schema import FIRST_GATED_MODEL, LAST_MIGRATION, MODEL_VERSION

__all__ = [
    "LAST_MIGRATION",
    "FIRST_GATED_MODEL",
    "MODEL_VERSION",
    "ModelError",
    "NotAnEnvironment",
    "apply_environment",
    "check_environment",
    "export_environment",
    "import_environment",
    "is_newer",
    "prepare",
]

_LAZY = {
    "apply_environment": "document",
    "export_environment": "document",
    "import_environment": "document",
    "prepare": "document",
    "ModelError": "repair",
    "NotAnEnvironment": "repair",
    "check_environment": "repair",
    "is_newer": "repair",
    "FIRST_GATED_MODEL": "schema",
    "LAST_MIGRATION": "schema",
    "MODEL_VERSION": "schema",
}
"""Names loaded on first use, by module."""


__getattr__ = lazy_names(__name__, _LAZY, globals())
