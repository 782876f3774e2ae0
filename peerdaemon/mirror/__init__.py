"""Mirrors: environments kept in step with files on disk (docs/mirror.md).

`format` writes environment JSON as Mockoon does; `link` decides, without I/O, what one link
between a document and a file must do; `service` is the trio shell that watches and writes.
"""

from .format import format_environment, stringify
from .link import LinkMachine, Observation
from .service import MirrorService, conflict_path_for, mirror_file_name

__all__ = [
    "LinkMachine",
    "MirrorService",
    "Observation",
    "conflict_path_for",
    "format_environment",
    "mirror_file_name",
    "stringify",
]
