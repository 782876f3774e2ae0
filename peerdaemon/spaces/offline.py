"""Offline choices (docs/spaces.md, "Offline choices"): what an `ask` space's device does when a
link's initial exchange finds that both sides changed an environment.

The decision compares whole Yjs states, never edits: `contains(big, small)` says whether `big`
already holds every item and every deletion of `small` (deletions do not advance a state
vector, so the delete sets are compared too). `decide` turns the two answers into push, pull or
hold. `Holds` keeps the held environments and the remote states apart from the documents, in
the store setting `spaces.conflicts`, so a hold survives a restart; resolving one is
`SpacesService.resolve`, which uses what is kept here.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pycrdt import Doc, merge_updates

from ..core.errors import BAD_REQUEST, NOT_SHARED, OpError, arg, is_failure, when_durable
from ..model import export_environment, prepare
from ..model.lib0 import EMPTY_UPDATE, read_var_uint
from ..model.yupdate import covered, read_delete_set, read_state_vector
from ..store import Store, Ticket

if TYPE_CHECKING:
    from .service import SpacesService

log = logging.getLogger("peerdaemon.spaces")

__all__ = [
    "ASK",
    "CHOICES",
    "CONFLICTS_SETTING",
    "HOLD",
    "MERGE",
    "POLICIES",
    "PULL",
    "PUSH",
    "Held",
    "Holds",
    "OfflineChoices",
    "contains",
    "decide",
]

MERGE = "merge"
ASK = "ask"
POLICIES = (MERGE, ASK)
PUSH = "push"
PULL = "pull"
HOLD = "hold"
REFUSED = "refused"
KEEP_LOCAL = "keep-local"
TAKE_REMOTE = "take-remote"
CHOICES = (KEEP_LOCAL, TAKE_REMOTE, MERGE)
CONFLICTS_SETTING = "spaces.conflicts"


def _state(update: bytes) -> tuple[dict[int, int], dict[int, list[tuple[int, int]]]]:
    """The state vector and the delete set (client -> sorted (clock, end) ranges) of a whole
    Yjs state."""
    doc = Doc()
    doc.apply_update(update)
    sv_bytes = doc.get_state()
    sv = read_state_vector(sv_bytes)
    # the diff against its own state vector: no structs, just the whole delete set
    ds_bytes = doc.get_update(sv_bytes)
    structs, pos = read_var_uint(ds_bytes, 0)
    if structs:
        raise ValueError("unexpected structs in a delete set")
    ds = read_delete_set(ds_bytes, pos)
    return sv, ds


def contains(big: bytes, small: bytes) -> bool:
    """Whether the state `big` holds everything `small` does: every item (state vectors) and
    every deletion (delete sets)."""
    if small == EMPTY_UPDATE:
        return True
    big_sv, big_ds = _state(big)
    small_sv, small_ds = _state(small)
    if any(clock > big_sv.get(client, 0) for client, clock in small_sv.items()):
        return False
    for client, ranges in small_ds.items():
        have = big_ds.get(client, [])
        if not all(covered(have, a, b) for a, b in ranges):
            return False
    return True


def decide(local: bytes, remote: bytes) -> str:
    """push: the remote has nothing we lack; pull: we have nothing it lacks; else hold."""
    if contains(local, remote):
        return PUSH
    if contains(remote, local):
        return PULL
    return HOLD


@dataclass
class Held:
    """An environment held on this device: the remote state kept apart, and where from."""

    space: str
    remote: bytes
    origin: str
    at: float

    def setting(self) -> dict[str, Any]:
        return {"space": self.space, "remote": self.remote, "origin": self.origin, "at": self.at}


class Holds:
    """env id -> `Held`, kept in the store setting `spaces.conflicts`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.held: dict[str, Held] = {}

    def load(self) -> None:
        saved = self.store.get_setting(CONFLICTS_SETTING) or {}
        for env_id, entry in saved.items() if isinstance(saved, dict) else ():
            try:
                self.held[str(env_id)] = Held(
                    str(entry["space"]),
                    bytes(entry["remote"]),
                    str(entry.get("origin") or ""),
                    float(entry.get("at") or 0.0),
                )
            except (KeyError, TypeError, ValueError):
                continue

    def __contains__(self, env_id: object) -> bool:
        return env_id in self.held

    def get(self, env_id: str) -> Held | None:
        return self.held.get(env_id)

    def hold(self, env_id: str, space: str, remote: bytes, origin: str) -> Ticket:
        self.held[env_id] = Held(space, bytes(remote), origin, time.time())
        return self.save()

    def add(self, env_id: str, update: bytes) -> Ticket:
        """More of the remote side (a live update, another link's state): merged in."""
        held = self.held[env_id]
        held.remote = merge_updates(held.remote, bytes(update))
        return self.save()

    def release(self, env_id: str) -> Ticket | None:
        if self.held.pop(env_id, None) is None:
            return None
        return self.save()

    def save(self) -> Ticket:
        return self.store.put_setting(
            CONFLICTS_SETTING, {env_id: h.setting() for env_id, h in self.held.items()}
        )


def _bytes(update: bytes) -> bytes:
    """`update` checked to be a Yjs update (ValueError otherwise: the peer's fault)."""
    try:
        Doc().apply_update(bytes(update))
    except BaseException as exc:
        if not is_failure(exc):
            raise
        raise ValueError(f"not a Yjs update: {exc}") from None
    return bytes(update)


def _content(state: bytes, env_id: str) -> dict[str, Any]:
    doc = Doc()
    doc.apply_update(state)
    content = copy.deepcopy(export_environment(doc, env_id))
    content["uuid"] = env_id
    return content


class OfflineChoices:
    """The `ask` policy's decisions, holds and resolves, on `SpacesService`'s state (its
    registry, bindings, listeners and events)."""

    def __init__(self, service: SpacesService) -> None:
        self.service = service

    @property
    def holds(self) -> Holds:
        return self.service.holds

    # -- the links (SyncHost.apply_initial, and apply for a held environment) ---------------

    def initial(self, env_id: str, update: bytes, origin: str) -> str:
        """Decide on the peer's whole state of an ask environment at a link's opening (the model
        gate first, as for every update: `SpacesService.apply`)."""
        svc = self.service
        space_id = svc._sharing_space(env_id)
        if space_id is None or env_id not in svc.registry.envs or not svc.ask(env_id):
            svc.apply(env_id, update, origin)  # nothing here to keep apart: a plain receive
            return PULL
        update = _bytes(update)
        if svc._refuses(env_id, space_id, update, origin):
            return REFUSED  # a newer model's state: neither merged nor kept for a resolve
        if env_id in self.holds:
            self.add_remote(env_id, update, origin)
            return HOLD if env_id in self.holds else PULL
        choice = decide(svc.registry.state_update(env_id), update)
        log.info("spaces: %s from %s: %s", env_id, origin, choice)
        if choice == PULL:
            svc.apply(env_id, update, origin)
        elif choice == HOLD:
            self.holds.hold(env_id, space_id, update, origin)
            svc.events.emit("environment-conflict", id=env_id, space=space_id, origin=origin)
        return choice

    def answer_held(self, env_id: str, origin: str) -> bytes | None:
        """While held, a peer's step 1 is answered with the empty update, so that none of this
        side's changes reach a peer that would merge them. The peer whose state is held is the
        exception when it asks for the whole state (the empty state vector): it decides
        itself, and it gets this side's whole state so that it holds too. Without it, when one
        side decided first (on another link to the same device: both dialed, and one link was
        dropped as a duplicate after its exchange; or on a reconnect), the other took the empty
        answer for "nothing to take", and only one side held."""
        held = self.holds.get(env_id)
        if held is None or held.origin != origin or env_id not in self.service.registry.envs:
            return None
        return self.service.registry.state_update(env_id)

    def add_remote(self, env_id: str, update: bytes, origin: str) -> None:
        """More of the remote side of a held environment (a live update, another link): kept
        apart; once the remote side holds all of ours (the other device resolved, with our
        changes), the hold ends as a plain pull."""
        self.holds.add(env_id, _bytes(update))
        held = self.holds.get(env_id)
        assert held is not None
        svc = self.service
        if not contains(held.remote, svc.registry.state_update(env_id)):
            return
        self.holds.release(env_id)
        svc._merge(env_id, held.remote, origin)
        svc.events.emit(
            "environment-resolved", id=env_id, space=held.space, choice=PULL, origin=origin
        )

    def settle(self) -> list[Ticket]:
        """Holds of spaces whose policy is no longer `ask` (switched back to `merge`, here or by
        another member) end as the CRDT merge: that is what `merge` means. Called after every
        change of a space document and at start."""
        svc = self.service
        tickets: list[Ticket] = []
        for env_id, held in list(self.holds.held.items()):
            space = svc.spaces.get(held.space)
            if space is None or space.doc.policy() == ASK or env_id not in svc.registry.envs:
                continue
            tickets += self.resolve(env_id, MERGE)[1]
        return tickets

    # -- reads ------------------------------------------------------------------------------

    def conflicts(self) -> list[dict[str, Any]]:
        """The held environments (for `status`)."""
        svc = self.service
        return [
            {"id": env_id, "space": held.space, "origin": held.origin, "at": held.at}
            for env_id, held in sorted(self.holds.held.items())
            if env_id in svc.registry.envs
        ]

    def decorate(self, summary: dict[str, Any]) -> None:
        """`env.list`: a held environment's `conflict` flag."""
        held = self.holds.get(summary.get("id", ""))
        if held is None:
            return
        summary["flags"] = [*summary.get("flags", ()), "conflict"]
        summary["conflict"] = {"space": held.space, "origin": held.origin, "at": held.at}

    # -- operations -------------------------------------------------------------------------

    def policy(self, ref: str, policy: str | None) -> tuple[dict[str, Any], list[Ticket]]:
        svc = self.service
        space = svc.resolve(ref)
        tickets: list[Ticket] = []
        if policy is not None:
            if policy not in POLICIES:
                raise OpError(BAD_REQUEST, f"space.policy: policy must be one of {POLICIES}")
            if policy != space.doc.policy():
                space.doc.set_policy(policy, svc.identity.device_id)
                tickets = svc._commit_space(space, "local")
                svc.events.emit("space-policy", space=space.id, policy=policy, origin="local")
                tickets += self.settle()
        return {"id": space.id, "name": space.display_name, "policy": space.doc.policy()}, tickets

    def resolve(self, env_id: str, choice: str) -> tuple[dict[str, Any], list[Ticket]]:
        """End a hold: `keep-local`, `take-remote` or `merge`, each as new edits on top of the
        CRDT merge of both sides, so every replica converges to the result. The losing side is
        a version in history first (`env restore` brings it back)."""
        svc = self.service
        if choice not in CHOICES:
            raise OpError(BAD_REQUEST, f"env.resolve: choice must be one of {CHOICES}")
        svc.registry.get(env_id)  # UnknownEnvironment: not-found
        held = self.holds.get(env_id)
        if held is None:
            raise OpError(
                NOT_SHARED if env_id not in svc.bindings else BAD_REQUEST,
                f"environment {env_id} is not held: there is no conflict to resolve",
            )
        local = copy.deepcopy(svc.registry.export(env_id))
        remote = _content(held.remote, env_id)
        tickets: list[Ticket] = []
        if svc.history is not None:
            loser = remote if choice == KEEP_LOCAL else None  # None: the current (local) one
            note = {KEEP_LOCAL: "the remote side", TAKE_REMOTE: "the local side"}.get(
                choice, "the local side, before the merge"
            )
            ticket = svc.history.checkpoint(env_id, "resolve", state=loser, note=note)
            if ticket is not None:
                tickets.append(ticket)
        release = self.holds.release(env_id)
        if release is not None:
            tickets.append(release)
        svc._merge(env_id, held.remote, "local")
        if choice != MERGE:
            prepared, _notes = prepare(local if choice == KEEP_LOCAL else remote, env_id)
            _changed, ticket = svc.registry.apply(env_id, prepared, "local")
            if ticket is not None:
                tickets.append(ticket)
        # What was edited here while held never went out: the whole state does now, on every
        # link (a device holding the other side takes it as a plain pull: it holds its changes).
        full = svc.registry.state_update(env_id)
        for listener in list(svc._listeners.values()):
            listener(env_id, full, "local")
        last = svc.registry.get(env_id).last_ticket
        if last is not None:
            tickets.append(last)
        svc.events.emit(
            "environment-resolved", id=env_id, space=held.space, choice=choice, origin="local"
        )
        return {"id": env_id, "space": held.space, "choice": choice}, tickets

    async def op_policy(self, args: dict[str, Any], session: Any) -> Any:
        ref = arg(args, "space", str, op="space.policy")
        policy = arg(args, "policy", str, default=None, op="space.policy")
        result, tickets = self.policy(ref, policy)
        return when_durable(tickets, result)

    async def op_resolve(self, args: dict[str, Any], session: Any) -> Any:
        env_id = arg(args, "id", str, op="env.resolve")
        choice = arg(args, "choice", str, op="env.resolve")
        result, tickets = self.resolve(env_id, choice)
        return when_durable(tickets, result)
