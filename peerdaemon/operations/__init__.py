"""The socket's operations: a service that owns the environments' operations and lets the other
services add theirs (docs/local-api.md)."""

from .environments import Operations

__all__ = ["Operations"]
