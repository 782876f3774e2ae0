"""Mockoon environments as Yjs-compatible CRDT documents (layout in docs/model.md)."""

from .document import apply_environment, export_environment, import_environment, prepare
from .repair import ModelError, NotAnEnvironment, check_environment, is_newer, repair
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
    "repair",
]
