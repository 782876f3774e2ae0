"""The mirror's socket operations: `env.link`, `env.unlink`, `env.links`, `env.import_link`
(docs/local-api.md section 6).

They check arguments and paths and answer; starting and stopping links is the service's. Both
the service and the daemon's operations sit on the same layer as this package, so each is known
here by a Protocol of what is used of it, not imported.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from ..core.errors import (
    BAD_PATH,
    BAD_REQUEST,
    LINK_CONFLICT,
    LINK_REFUSED,
    NOT_FOUND,
    OpError,
    Pending,
)
from ..core.registry import Registry
from ..store import Ticket
from .files import Refusal, inspect_target
from .link import StartMode

OpHandler = Callable[[dict[str, Any], object], Awaitable[Any]]
"""An operation: (arguments, the client's session, passed through) -> its result, or a
`Pending` one."""


class OperationTable(Protocol):
    """The daemon's operations (`peerdaemon.operations.Operations`): the mirror adds its own
    and runs `env.import` for `env.import_link`."""

    def register(self, op: str, handler: OpHandler) -> None: ...

    async def handle(self, op: str, args: dict[str, Any], session: object) -> Any: ...


class LinkControl(Protocol):
    """What the operations need of the service that owns the links (`MirrorService`)."""

    def owner(self, path: Path) -> str | None: ...

    async def link(
        self, env_id: str, path: Path, mode: StartMode
    ) -> tuple[Ticket | None, dict[str, Any]]: ...

    async def unlink(self, env_id: str) -> tuple[Path, Ticket | None] | None: ...

    def describe_links(self) -> list[dict[str, Any]]: ...


class MirrorOperations:
    def __init__(self, links: LinkControl, registry: Registry, operations: OperationTable) -> None:
        self.links = links
        self.registry = registry
        self.operations = operations

    def register(self) -> None:
        for op, handler in (
            ("env.link", self.op_link),
            ("env.unlink", self.op_unlink),
            ("env.links", self.op_links),
            ("env.import_link", self.op_import_link),
        ):
            self.operations.register(op, handler)

    async def op_link(self, args: dict[str, Any], session: object) -> dict[str, Any] | Pending:
        env_id = _env_id(args)
        self.registry.get(env_id)
        path, overwrite = self._target(args, env_id)
        found = await trio.to_thread.run_sync(inspect_target, path, env_id)
        if isinstance(found, Refusal):
            if not (overwrite and found.code == LINK_REFUSED):
                raise OpError(found.code, found.message)
            mode: StartMode = "overwrite"
        else:
            mode = "overwrite" if overwrite else found
        if self.links.owner(path) not in (None, env_id):  # someone linked it while we looked
            raise OpError(LINK_CONFLICT, f"{path} was linked to another environment meanwhile")
        ticket, result = await self.links.link(env_id, path, mode)
        return Pending(ticket.wait, result) if ticket is not None else result

    async def op_unlink(self, args: dict[str, Any], session: object) -> dict[str, Any] | Pending:
        env_id = _env_id(args)
        unlinked = await self.links.unlink(env_id)
        if unlinked is None:
            raise OpError(NOT_FOUND, f"environment {env_id} is not linked to a file")
        path, ticket = unlinked
        result = {"id": env_id, "path": str(path), "unlinked": True}
        return Pending(ticket.wait, result) if ticket is not None else result

    async def op_links(self, args: dict[str, Any], session: object) -> list[dict[str, Any]]:
        return self.links.describe_links()

    async def op_import_link(self, args: dict[str, Any], session: object) -> Pending:
        """`env.import` of a file, then a link to it: the file becomes the environment's mirror
        (rewritten at once if the import repaired it or gave it a new id)."""
        path, _ = self._target(args, None)
        found = await trio.to_thread.run_sync(inspect_target, path, "\0")
        if isinstance(found, Refusal) and found.code == BAD_PATH:
            raise OpError(found.code, found.message)
        import_args = {k: v for k, v in args.items() if k not in ("path", "overwrite")}
        imported = await self.operations.handle("env.import", import_args, session)
        waits: list[Callable[[], Awaitable[None]]] = []
        result = imported
        if isinstance(imported, Pending):
            waits.append(imported.wait)
            result = imported.result
        ticket, link = await self.links.link(result["id"], path, "overwrite")
        if ticket is not None:
            waits.append(ticket.wait)

        async def wait_all() -> None:
            for wait in waits:
                await wait()

        return Pending(wait_all, {**result, "path": link["path"], "link": link})

    def _target(self, args: dict[str, Any], env_id: str | None) -> tuple[Path, bool]:
        """The `path` argument, resolved (symlinks too), and `overwrite`; a file linked to
        another environment is refused here, whatever spelling of it is given."""
        raw = args.get("path")
        if not isinstance(raw, str) or not raw:
            raise OpError(BAD_REQUEST, "argument 'path' must be a non-empty string")
        if not os.path.isabs(raw):
            raise OpError(
                BAD_REQUEST, f"path {raw!r} must be absolute (the daemon's cwd is not yours)"
            )
        path = Path(os.path.realpath(raw))
        owner = self.links.owner(path)
        if owner is not None and owner != env_id:
            raise OpError(
                LINK_CONFLICT,
                f"{path} is linked to environment {owner} already; one file mirrors one "
                f"environment (`peerdaemon env unlink {owner}` first)",
            )
        return path, bool(args.get("overwrite"))


def _env_id(args: dict[str, Any]) -> str:
    env_id = args.get("id")
    if not isinstance(env_id, str) or not env_id:
        raise OpError(BAD_REQUEST, "argument 'id' must be a non-empty string")
    return env_id
