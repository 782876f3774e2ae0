"""Mirrors: environments kept in step with files on disk (docs/mirror.md).

Read top-down: `service` owns the links and their lifetime, `operations` are its socket
operations, `runner` is the trio task of one link, `files` the blocking file I/O it runs in worker
threads, `settings` what survives a restart. Below them, without I/O: `link` decides what one link
must do, `format` writes environment JSON as Mockoon does.
"""

from .attached import Folder, FolderSync, materialize
from .attached import inside as inside_folder
from .files import conflict_path_for
from .format import format_environment, stringify
from .link import LinkMachine
from .service import MirrorService
from .settings import mirror_file_name

__all__ = [
    "Folder",
    "FolderSync",
    "LinkMachine",
    "MirrorService",
    "conflict_path_for",
    "format_environment",
    "inside_folder",
    "materialize",
    "mirror_file_name",
    "stringify",
]
