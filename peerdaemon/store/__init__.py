"""Crash-safe SQLite store: update log + snapshots per environment, group commit, dir lock.

See docs/store.md.
"""

from .errors import StoreError, StoreLockedError
from .sqlite import DB_NAME, SCHEMA_VERSION, HistoryRow, LoadedEnv, Store, Ticket, TrashRow

__all__ = [
    "DB_NAME",
    "SCHEMA_VERSION",
    "HistoryRow",
    "LoadedEnv",
    "Store",
    "StoreError",
    "StoreLockedError",
    "Ticket",
    "TrashRow",
]
