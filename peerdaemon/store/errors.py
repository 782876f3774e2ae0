"""Exceptions raised by the store (kept apart so `lock.py` needs no SQLite)."""

from __future__ import annotations


class StoreError(Exception):
    """A store operation failed; for a Ticket, the write is not durable."""


class StoreLockedError(StoreError):
    """Another live process holds the data directory (two writers would corrupt the log order)."""
