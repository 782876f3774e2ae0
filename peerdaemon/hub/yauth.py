"""Who may open `/yjs/SPACE/DOC`, and who may stay: the y-websocket endpoint's rules, without I/O.

A client is checked once, when its websocket opens (`YjsAuth.admit`), in this order: a token
that names a user (else `unauthorized`), a space that user can reach (`forbidden`), well-formed
ids (`bad-request`), a free device slot (`too-many-devices`: the `?device=NAME` parameter, or
the connection itself). After any accounts change, every live connection is checked again
(`YjsAuth.recheck`): a revoked token or a lost membership ends it. The reason goes to the
client as the auth message's permission-denied, with its close code (`ywebsocket.CLOSE_CODES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .accounts import LimitExceeded
from .docs import check_ids

__all__ = ["Admitted", "Refused", "YjsAuth"]


class Lease(Protocol):
    def release(self) -> None: ...


class AccountsLike(Protocol):
    """What the rules read of `Accounts` (docs/architecture.md)."""

    @property
    def devices(self) -> Any: ...  # `acquire(user, device) -> Lease`, LimitExceeded past the limit

    def user_of(self, token: str) -> Any: ...  # User (`name`, `token_hash`) or None
    def user_of_hash(self, token_hash: str) -> Any: ...
    def can_access(self, user: str, space_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Admitted:
    """Let in as `user` from `device`; `lease` holds the device slot until released."""

    user: str
    token_hash: str
    device: str
    lease: Lease


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str  # unauthorized | forbidden | bad-request | too-many-devices
    detail: str = ""


class YjsAuth:
    def __init__(self, accounts: AccountsLike, removals: Any = None) -> None:
        self.accounts = accounts
        self.removals = removals
        """`removals.Removals`: a token a removed device used is refused for that space."""

    def _removed(self, token_hash: str, space_id: str) -> bool:
        return self.removals is not None and self.removals.refused(space_id, None, token_hash)

    def admit(
        self, query: Mapping[str, str], space_id: str, doc_id: str, connection: str
    ) -> Admitted | Refused:
        """The verdict on a new connection (`connection`: its own name, the device it counts
        as without `?device=`)."""
        accounts = self.accounts
        user = accounts.user_of(query.get("token", ""))
        if user is None:
            return Refused("unauthorized")
        if not accounts.can_access(user.name, space_id):
            return Refused("forbidden", f"{user.name} cannot reach space {space_id}")
        if self._removed(user.token_hash, space_id):
            return Refused("forbidden", f"a device removed from space {space_id} used this token")
        try:
            check_ids(space_id, doc_id)
        except ValueError as exc:
            return Refused("bad-request", str(exc))
        device = query.get("device") or connection
        try:
            lease = accounts.devices.acquire(user.name, device)
        except LimitExceeded as exc:
            return Refused(exc.reason, f"{user.name}: {exc}")
        return Admitted(user.name, user.token_hash, device, lease)

    def stale_refusal(self, query: Mapping[str, str], space_id: str) -> bool:
        """Whether `admit` would refuse for what the accounts may not have read yet: a token
        it does not know, a space the user cannot reach (created or added a moment ago)."""
        user = self.accounts.user_of(query.get("token", ""))
        return user is None or not self.accounts.can_access(user.name, space_id)

    def recheck(self, token_hash: str, space_id: str) -> str | None:
        """Why a live connection admitted with `token_hash` to `space_id` must end now, or
        None if it may stay."""
        user = self.accounts.user_of_hash(token_hash)
        if user is None:
            return "unauthorized"
        if not self.accounts.can_access(user.name, space_id):
            return "forbidden"
        if self._removed(token_hash, space_id):
            return "forbidden"
        return None
