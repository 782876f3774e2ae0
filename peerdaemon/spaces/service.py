"""This device's spaces, the sharing of environments, and `SyncHost` for peer links.

State, all on the trio thread:

* `spaces`: the spaces this device belongs to (key = id + secret, kept in the store setting
  `"spaces"`), each with its space document (stored like an environment, id `space:<id>`);
* `bindings`: env id -> space id, the environments this device syncs in a space (setting
  `"spaces.bindings"`).

The space documents are the truth every member converges on; `bindings` is this device's view.
`_reconcile` brings the view in line with the documents after every change (and at start, which
also repairs a crash between two writes): an environment whose entry says `unshared` stops
syncing and stays as a local copy, one that says `deleted` is deleted here. Because this is a
function of the converged state rather than of the order of messages, devices that were apart
end up doing the same thing when they meet. See docs/spaces.md.

Model versions ("Model versions" in docs/spaces.md): each space document records the newest
environment model a member brought (`SpaceDoc.model`). This device marks its own on meeting a
space (`_meet`), migrates the documents it holds or receives below it (`_migrate`, through
`Registry.migrate`), and syncs none of a space's environments that need a newer model than its
own (`needs`, checked by `_sharing_space` and so by every SyncHost read; `_refuses` for an
update that writes a newer `meta.model`).
"""

from __future__ import annotations

import base64
import copy
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pycrdt import Doc, Map

from ..core.attachments import Attachments, env_of, files_doc_id
from ..core.errors import (
    AMBIGUOUS,
    BAD_INVITE,
    BAD_REQUEST,
    EXISTS,
    NOT_FOUND,
    NOT_SHARED,
    OpError,
    arg,
    is_failure,
    when_durable,
)
from ..core.events import EventLog
from ..core.identity import Identity, save_name
from ..core.registry import Registry
from ..model import prepare
from ..model.layout import ENV_ROOT
from ..model.lib0 import EMPTY_UPDATE
from ..model.migrations import model_item_ids, update_models
from ..model.strays import decode
from ..model.yupdate import Item
from ..store import Store, Ticket
from .document import ACCESS, DELETED, SHARED, UNSHARED, SpaceDoc
from .invite import Invite, InviteError, decode_invite, encode_invite, parse_address
from .offline import ASK, Holds, OfflineChoices
from .removal import (
    KeyEpoch,
    adopt_key,
    current_key_invalid,
    load_previous,
    previous_setting,
    refusal,
    resolve_device,
)
from .removal import commit_key as commit_space_key
from .removal import rotate as rotate_key

log = logging.getLogger("peerdaemon.spaces")

LOCAL = "local"
SPACE_PREFIX = "space:"
SPACES_SETTING = "spaces"
BINDINGS_SETTING = "spaces.bindings"
EMPTY_STATE_VECTOR = b"\x00"
MAX_SPACE_NAME = 100
MAX_EARLY_UPDATES = 256
INCOMPATIBLE = "incompatible-version"
UPGRADE = "upgrade peerdaemon"

ChangeListener = Callable[[str, bytes, str], None]


def space_doc_id(space_id: str) -> str:
    return SPACE_PREFIX + space_id


@dataclass(frozen=True)
class SpaceKey:
    id: str
    secret: bytes  # 32 random bytes; never leaves the device except in invite codes
    epoch: int = 0  # the key epoch (docs/spaces.md, "Removing a device")


@dataclass(frozen=True)
class InvitePeer:
    """An address from the invite a space was joined with: a static peer for the PeerManager."""

    space_id: str
    device_id: str  # the inviter, expected at that address
    address: str  # "host:port"


class SyncHost(Protocol):
    """What a peer link needs from the daemon (docs/architecture.md)."""

    def space_keys(self) -> list[SpaceKey]: ...
    def docs_of(self, space_ids: Iterable[str]) -> list[str]: ...
    def allowed(self, doc_id: str, space_ids: Iterable[str]) -> bool: ...
    def state_vector(self, doc_id: str) -> bytes | None: ...
    def diff(self, doc_id: str, state_vector: bytes) -> bytes: ...
    def apply(self, doc_id: str, update: bytes, origin: str) -> None: ...
    def add_listener(self, fn: ChangeListener) -> int: ...
    def remove_listener(self, token: int) -> None: ...
    def add_docs_listener(self, fn: Callable[[], None]) -> int: ...


class SpaceError(OpError):
    """A refused space operation (an `OpError`: the socket answers it as such)."""


@dataclass(eq=False)
class Space:
    id: str
    secret: bytes
    name: str  # given at creation or by the invite; the document's name wins once known
    joined: float
    doc: SpaceDoc = field(default_factory=SpaceDoc)
    inviter: str | None = None
    addresses: tuple[str, ...] = ()
    hub: str | None = None
    hub_key: str | None = None  # the key fingerprint trusted for `hub` (invite, or our pin)
    pending: list[bytes] = field(default_factory=list)
    epoch: int = 0  # key epoch of `secret`: bumped by each `space remove-device`
    previous: tuple[KeyEpoch, ...] = ()  # older secrets, newest first (spaces/removal.py)

    @property
    def doc_id(self) -> str:
        return space_doc_id(self.id)

    @property
    def display_name(self) -> str:
        return self.doc.name or self.name

    def key(self) -> SpaceKey:
        return SpaceKey(self.id, self.secret, self.epoch)

    def keys(self) -> list[SpaceKey]:
        """The current key, then the previous ones (a member offline at a rotation proves one)."""
        return [self.key(), *(SpaceKey(self.id, k.secret, k.epoch) for k in self.previous)]

    def setting(self) -> dict[str, Any]:
        return {
            "secret": self.secret,
            "name": self.name,
            "joined": self.joined,
            "inviter": self.inviter,
            "addresses": list(self.addresses),
            "hub": self.hub,
            "hub_key": self.hub_key,
            "epoch": self.epoch,
            "previous": previous_setting(self.previous),
        }


def _new_space_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def _validate_space_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise SpaceError(BAD_REQUEST, "a space name must be a non-empty string")
    name = name.strip()
    if len(name) > MAX_SPACE_NAME or any(ch < " " for ch in name):
        raise SpaceError(
            BAD_REQUEST, f"a space name is one line of at most {MAX_SPACE_NAME} characters"
        )
    return name


class SpacesService:
    """Spaces, sharing and the daemon side of sync; implements `SyncHost`."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        identity: Identity,
        events: EventLog,
        attachments: Attachments | None = None,
        history: Any = None,
    ) -> None:
        self.registry = registry
        self.history = history
        """`core.history.History`: a resolve records the losing side there first."""
        self.holds = Holds(store)
        """Environments held by an `ask` space's offline choice (spaces/offline.py)."""
        self.offline = OfflineChoices(self)
        self.attachments = attachments
        """Each shared environment's files document (`files:<env id>`) syncs beside it."""
        self.store = store
        self.identity = identity
        self.events = events
        self.spaces: dict[str, Space] = {}
        self.bindings: dict[str, str] = {}
        self._listeners: dict[int, ChangeListener] = {}
        self._docs_listeners: dict[int, Callable[[], None]] = {}
        self._next_token = 1
        self._docs: frozenset[str] = frozenset()
        self._access: frozenset[tuple[str, str, int]] = frozenset()
        """Removed devices and key epochs per space: a change re-checks every link."""
        self._early: dict[str, list[bytes]] = {}  # updates that came before the env's state
        self.model_version = registry.model_version
        """The environment model this device runs at (docs/model.md, "Migrations")."""
        self._newer: dict[str, int] = {}
        """env id -> the model of an update refused for it: a document that moved on."""
        self._model_ids: dict[str, set[tuple[int, int]]] = {}
        """env id -> the ids of its `meta.model` entries, to read versions from updates."""
        self._reported: set[str] = set()
        """Spaces and environments already reported as `incompatible-version`."""
        self.address_provider: Callable[[], list[str]] | None = None
        """Set by the peer side: this daemon's reachable `host:port`s, put into invites."""
        registry.add_listener(self._on_env_change)
        # a held environment's document stays loaded until resolved (core/residency.py)
        registry.add_keeper(lambda env_id: env_id in self.holds)
        if attachments is not None:
            attachments.add_listener(self._on_files_change)
            attachments.neighbours = self._neighbours

    # -- start ---------------------------------------------------------------------------------

    def load(self) -> int:
        """Read the spaces, their documents and the bindings; reconcile. Called once at start,
        after `Registry.load`. Returns the number of spaces."""
        saved = self.store.get_setting(SPACES_SETTING) or {}
        bindings = self.store.get_setting(BINDINGS_SETTING) or {}
        # only the space documents, and only for users of spaces
        loaded = self.store.load_prefixed(SPACE_PREFIX) if saved else {}
        self.holds.load()
        for space_id, entry in saved.items() if isinstance(saved, dict) else ():
            try:
                space = Space(
                    id=space_id,
                    secret=bytes(entry["secret"]),
                    name=str(entry.get("name") or ""),
                    joined=float(entry.get("joined") or 0.0),
                    inviter=entry.get("inviter"),
                    addresses=tuple(entry.get("addresses") or ()),
                    hub=entry.get("hub"),
                    hub_key=entry.get("hub_key") if isinstance(entry.get("hub_key"), str) else None,
                    epoch=int(entry.get("epoch") or 0),
                    previous=load_previous(entry.get("previous")),
                )
            except (KeyError, TypeError, ValueError):
                log.warning("spaces: ignoring a malformed saved space %r", space_id)
                continue
            stored = loaded.get(space.doc_id)
            for update in stored.updates if stored is not None else ():
                space.doc.doc.apply_update(update)
            self.spaces[space_id] = self._track(space)
        for doc_id in loaded:
            if doc_id.startswith(SPACE_PREFIX) and doc_id[len(SPACE_PREFIX) :] not in self.spaces:
                self.store.enqueue_delete(doc_id)  # left behind by a crash during create/leave
        if isinstance(bindings, dict):
            self.bindings = {str(e): str(s) for e, s in bindings.items() if isinstance(s, str)}
        self._reconcile("local")
        for space in self.spaces.values():
            self._meet(space)
        self._migrate_all()
        self._docs = self._syncable()
        self._access = self._access_state()
        self._report_incompatible()
        return len(self.spaces)

    def register(self, service: Any) -> None:
        """Add the socket operations and the env.delete / status hooks to the daemon's Operations."""
        ops: dict[str, Callable[[dict[str, Any], Any], Awaitable[Any]]] = {
            "space.create": self.op_create,
            "space.invite": self.op_invite,
            "space.join": self.op_join,
            "space.list": self.op_list,
            "space.leave": self.op_leave,
            "space.remove_device": self.op_remove_device,
            "env.share": self.op_share,
            "env.unshare": self.op_unshare,
            "env.mock": self.op_mock,
            "space.policy": self.offline.op_policy,
            "env.resolve": self.offline.op_resolve,
            "identity": self.op_identity,
        }
        for op, handler in ops.items():
            service.register(op, handler)
        service.before_delete.append(self.before_delete)
        service.status_hooks.append(self.status)
        service.summary_hooks.append(self.decorate_summary)

    def _track(self, space: Space) -> Space:
        def on_transaction(event: Any) -> None:
            if event.update != EMPTY_UPDATE:
                space.pending.append(event.update)

        space.doc.doc.observe(on_transaction)
        space.doc.remember_reads()
        return space

    # -- the local operations (Python API; the op_* wrappers below speak the socket) -----------

    def create_space(self, name: str) -> tuple[Space, list[Ticket]]:
        name = _validate_space_name(name)
        # Two spaces of one name make every command that names the space ambiguous (`resolve`).
        taken = {n for s in self.spaces.values() for n in (s.display_name, s.name)}
        if name in taken:
            same = next(s for s in self.spaces.values() if name in (s.display_name, s.name))
            free = next(
                f"{name} {n}" for n in range(2, len(taken) + 3) if f"{name} {n}" not in taken
            )
            such = f", such as {free!r}" if len(free) <= MAX_SPACE_NAME else ""
            raise SpaceError(
                EXISTS,
                f"this device already has a space named {name!r} ({same.id}); "
                f"choose another name{such}",
            )
        space = self._track(
            Space(id=_new_space_id(), secret=secrets.token_bytes(32), name=name, joined=time.time())
        )
        space.doc.init(name, self.identity.device_id, self.identity.name)
        self._meet(space, commit=False)
        self.spaces[space.id] = space
        tickets = self._commit_space(space, LOCAL)
        tickets.append(self._save_spaces())
        self.events.emit("space-created", space=space.id, name=name)
        self._docs_changed()
        return space, tickets

    def resolve(self, ref: str) -> Space:
        """A space by id, by name, or by a unique id prefix (at least 4 characters)."""
        if not isinstance(ref, str) or not ref:
            raise SpaceError(BAD_REQUEST, "name a space by its id or name")
        if ref in self.spaces:
            return self.spaces[ref]
        matches = [s for s in self.spaces.values() if ref in (s.display_name, s.name)]
        if not matches and len(ref) >= 4:
            matches = [s for s in self.spaces.values() if s.id.startswith(ref.lower())]
        if len(matches) == 1:
            return matches[0]
        if matches:
            ids = ", ".join(sorted(s.id for s in matches))
            raise SpaceError(AMBIGUOUS, f"{ref!r} names several spaces ({ids}); use the id")
        raise SpaceError(NOT_FOUND, f"no space {ref!r} (see `peerdaemon space list`)")

    def invite(self, ref: str, addresses: list[str] | None = None, hub: str | None = None) -> str:
        space = self.resolve(ref)
        if addresses is None:
            addresses = list(self.address_provider()) if self.address_provider else []
        for address in addresses:
            try:
                parse_address(address)
            except ValueError as exc:
                raise SpaceError(BAD_REQUEST, str(exc)) from None
        invite = Invite(
            space_id=space.id,
            name=space.display_name,
            secret=space.secret,
            inviter=self.identity.device_id,
            addresses=tuple(addresses),
            hub=hub or space.hub,
            # the hub key travels only with the URL it was trusted for
            hub_key=space.hub_key if (hub or space.hub) == space.hub else None,
            epoch=space.epoch,
        )
        return encode_invite(invite)

    def join(self, code: str) -> tuple[Space, list[Ticket]]:
        try:
            invite = decode_invite(code)
        except InviteError as exc:
            raise SpaceError(BAD_INVITE, str(exc)) from None
        if invite.space_id in self.spaces:
            known = self.spaces[invite.space_id]
            raise SpaceError(
                EXISTS, f"this device is already in space {known.display_name!r} ({known.id})"
            )
        space = self._track(
            Space(
                id=invite.space_id,
                secret=invite.secret,
                name=invite.name,
                joined=time.time(),
                inviter=invite.inviter,
                addresses=invite.addresses,
                hub=invite.hub,
                hub_key=invite.hub_key,
                epoch=invite.epoch,
            )
        )
        space.doc.set_member(
            self.identity.device_id, self.identity.name, space.joined, self.model_version
        )
        self._meet(space, commit=False)
        self.spaces[space.id] = space
        tickets = self._commit_space(space, LOCAL)
        tickets.append(self._save_spaces())
        self.events.emit("space-joined", space=space.id, name=space.name)
        self._docs_changed()
        return space, tickets

    def leave(self, ref: str) -> tuple[Space, list[Ticket]]:
        """Leave: drop this device from the members, forget the key, keep local copies."""
        space = self.resolve(ref)
        space.doc.remove_member(self.identity.device_id)
        tickets = self._commit_space(space, LOCAL)  # listeners see it while the space exists
        del self.spaces[space.id]
        tickets.append(self._save_spaces())
        tickets += self._reconcile(LOCAL)  # its environments become local copies
        tickets.append(self.store.enqueue_delete(space.doc_id))
        self.events.emit("space-left", space=space.id, name=space.display_name)
        self._docs_changed()
        return space, tickets

    def remove_device(self, ref: str, device_ref: object) -> tuple[Space, str, list[Ticket]]:
        """Remove a member: record it in the space document (before the key changes, so every
        link sends the record first), rotate the secret, and re-check every link."""
        space = self.resolve(ref)
        device = resolve_device(space, device_ref, self.identity.device_id)
        space.doc.remove_device(device, self.identity.device_id, space.epoch + 1)
        rotate_key(space)
        # in the same commit as the removal: a member takes the new key only once this signed
        # record of it has arrived, and the record arrives with the removal
        commit_space_key(space, space.epoch, space.secret, self.identity)
        tickets = self._commit_space(space, LOCAL)
        tickets.append(self._save_spaces())
        me = self.identity.device_id
        self.events.emit("device-removed", space=space.id, device=device, by=me)
        self._docs_changed()
        return space, device, tickets

    def refuse_peer(self, device: str, space_id: str, epoch: int) -> str | None:
        """Why a peer that proved key `epoch` of a space may not sync it (None: it may)."""
        return refusal(self.spaces.get(space_id), device, epoch)

    def receive_space_key(self, space_id: str, epoch: int, secret: bytes, sender: str) -> bool:
        """A member handed us a space's current key (docs/peer-protocol.md 6.1)."""
        space = self.spaces.get(space_id)
        if space is None or not adopt_key(space, sender, epoch, secret, self.identity.device_id):
            return False
        self._save_spaces()
        self.events.emit("space-key-changed", space=space.id, epoch=epoch, by=sender)
        self._docs_changed()
        return True

    def share(self, env_id: str, ref: str, *, copy_: bool = False) -> tuple[str, list[Ticket]]:
        """Share an environment in a space; with `copy_`, a duplicate under a new id."""
        space = self.resolve(ref)
        self.registry.get(env_id)  # UnknownEnvironment -> not-found
        needed = self.needs(None, space.id)
        if needed is not None:  # it would never sync: say so now
            raise SpaceError(
                INCOMPATIBLE,
                f"space {space.display_name!r} needs model {needed} and this peerdaemon runs "
                f"model {self.model_version}: upgrade peerdaemon to share into it",
            )
        tickets: list[Ticket] = []
        if copy_:
            duplicate = copy.deepcopy(self.registry.export(env_id))
            new_id = str(uuid.uuid4())
            prepared, _ = prepare(duplicate, new_id)
            tickets.append(self.registry.create(new_id, prepared, LOCAL))
            env_id = new_id
        elif env_id in self.bindings:
            other = self.spaces[self.bindings[env_id]]
            raise SpaceError(
                EXISTS,
                f"environment {env_id} is already shared in space {other.display_name!r}; "
                "unshare it first, or share a duplicate with --copy",
            )
        tickets += self._migrate(env_id)  # one a client merged in at an older model
        self.bindings[env_id] = space.id
        tickets.append(self._save_bindings())  # before the document: see _reconcile
        space.doc.set_state(env_id, SHARED, self.identity.device_id)
        tickets += self._commit_space(space, LOCAL)
        self.events.emit("environment-shared", id=env_id, space=space.id, origin=LOCAL)
        self._docs_changed()
        return env_id, tickets

    def unshare(self, env_id: str) -> tuple[Space, list[Ticket]]:
        """Convert to local: the space marks it unshared; every member keeps its own copy."""
        self.registry.get(env_id)
        space = self.spaces.get(self.bindings.get(env_id, ""))
        if space is None:
            raise SpaceError(NOT_SHARED, f"environment {env_id} is not shared in a space")
        space.doc.set_state(env_id, UNSHARED, self.identity.device_id)
        tickets = self._commit_space(space, LOCAL)
        tickets += self._reconcile(LOCAL)
        self._docs_changed()
        return space, tickets

    def hosted_mock(
        self,
        env_id: str,
        *,
        hub: bool | None = None,
        access: str | None = None,
        rotate_token: bool = False,
    ) -> tuple[dict[str, Any], list[Ticket]]:
        """Read or change an environment's Cloud Mock setting, kept in its space document so
        that every member's device sees it and the hub serves it (docs/spaces.md)."""
        self.registry.get(env_id)
        space = self.spaces.get(self.bindings.get(env_id, ""))
        if space is None:
            raise SpaceError(
                NOT_SHARED,
                f"environment {env_id} is not shared in a space: the hub serves shared ones only",
            )
        current = space.doc.mock(env_id) or {"hub": False, "access": "public", "token": None}
        tickets: list[Ticket] = []
        if hub is not None or access is not None or rotate_token:
            new_access = access or current["access"]
            token = current["token"]
            if rotate_token or not isinstance(token, str):
                token = secrets.token_urlsafe(24)
            space.doc.set_mock(
                env_id,
                current["hub"] if hub is None else hub,
                new_access,
                token,
                self.identity.device_id,
            )
            tickets = self._commit_space(space, LOCAL)
            self.events.emit("environment-mock", id=env_id, space=space.id, origin=LOCAL)
            current = space.doc.mock(env_id) or current
        result = {
            "id": env_id,
            "space": space.id,
            "hub": current["hub"],
            "access": current["access"],
            "token": current["token"] if current["access"] == "token" else None,
            "hub_url": space.hub,
            "url": _mock_url(space.hub, space.id, env_id, self.registry.export(env_id))
            if current["hub"]
            else None,
        }
        return result, tickets

    def hosted_mocks(self) -> list[dict[str, Any]]:
        """The hub Cloud Mocks of this device's shared environments (for `mock list`)."""
        out = []
        for env_id, space_id in sorted(self.bindings.items()):
            space = self.spaces.get(space_id)
            setting = space.doc.mock(env_id) if space is not None else None
            if space is None or setting is None or not setting["hub"]:
                continue
            try:
                environment = self.registry.export(env_id)
            except KeyError:
                continue
            name = environment.get("name")
            out.append(
                {
                    "id": env_id,
                    "name": name if isinstance(name, str) else "",
                    "where": "hub",
                    "state": "hub" if space.hub else "no-hub",
                    "access": setting["access"],
                    "url": _mock_url(space.hub, space.id, env_id, environment),
                }
            )
        return out

    def before_delete(self, env_id: str) -> None:
        """`env.delete` hook: a shared environment is deleted from the space, on every device."""
        space = self.spaces.get(self.bindings.get(env_id, ""))
        if space is None or env_id not in self.registry.envs:
            return
        space.doc.set_state(env_id, DELETED, self.identity.device_id)
        self._commit_space(space, LOCAL)
        del self.bindings[env_id]
        self._save_bindings()  # the env's own delete is enqueued next and acknowledged last
        self.holds.release(env_id)  # deleted everywhere: nothing left to resolve
        self._docs_changed()

    def set_name(self, name: str) -> list[Ticket]:
        """Rename this device, here and in the member list of every space."""
        try:
            tickets = [save_name(self.store, self.identity, name)]
        except ValueError as exc:
            raise SpaceError(BAD_REQUEST, str(exc)) from None
        for space in self.spaces.values():
            space.doc.set_member(self.identity.device_id, self.identity.name)
            tickets += self._commit_space(space, LOCAL)
        return tickets

    def env_space(self, env_id: str) -> str | None:
        """The space this device syncs `env_id` in, if any (for listings)."""
        return self._sharing_space(env_id)

    def invite_addresses(self) -> list[InvitePeer]:
        """The addresses of the invites this device joined with: static peers to dial."""
        return [
            InvitePeer(space.id, space.inviter, address)
            for space in self.spaces.values()
            if space.inviter
            for address in space.addresses
        ]

    def list_spaces(self) -> list[dict[str, Any]]:
        out = []
        for space in sorted(self.spaces.values(), key=lambda s: (s.display_name, s.id)):
            envs = []
            for env_id, state in sorted(space.doc.states().items()):
                if state != SHARED:
                    continue
                present = env_id in self.registry.envs
                conflict = present and self.bindings.get(env_id) != space.id
                entry: dict[str, Any] = {"id": env_id, "present": present}
                if present:
                    entry["name"] = self.registry.summary(env_id)["name"]
                if conflict:
                    entry["conflict"] = True  # a local environment with the same id: not synced
                elif (needs := self.needs(env_id, space.id)) is not None:
                    entry["state"] = INCOMPATIBLE  # kept as it is here, not synced
                    entry["needs"] = needs
                envs.append(entry)
            members = [
                {"device": device, **info, "self": device == self.identity.device_id}
                for device, info in sorted(space.doc.members().items())
            ]
            present = sum(1 for e in envs if e["present"])
            needs = self.needs(None, space.id)
            versions: dict[str, Any] = {"model": space.doc.model()}
            if needs is not None:  # the space moved on: its environments are not synced
                versions.update(state=INCOMPATIBLE, needs=needs, action=UPGRADE)
            out.append(
                {
                    "id": space.id,
                    "name": space.display_name,
                    "joined": space.joined,
                    "members": members,
                    "environments": envs,
                    "removed": [
                        {"device": device, **info}
                        for device, info in sorted(space.doc.removed().items())
                    ],
                    "key_epoch": space.epoch,
                    # the first sync after a join (`space join` waits for it): the document
                    # came from a member (its `info` is the creator's), and every environment
                    # it lists as shared is here
                    "synced": space.doc.name is not None and present == len(envs),
                    "environments_total": len(envs),
                    "environments_present": present,
                    "policy": space.doc.policy(),
                    **versions,
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        status = {
            "device": self.identity.device_id,
            "name": self.identity.name,
            "spaces": len(self.spaces),
            "model_version": self.model_version,
        }
        if incompatible := self.incompatible():
            status["incompatible"] = incompatible
        status["conflicts"] = self.offline.conflicts()
        return status

    # -- SyncHost ------------------------------------------------------------------------------

    def space_keys(self) -> list[SpaceKey]:
        """Every space's current key first, then their previous ones (tags are bounded)."""
        spaces = list(self.spaces.values())
        return [s.key() for s in spaces] + [k for s in spaces for k in s.keys()[1:]]

    def docs_of(self, space_ids: Iterable[str]) -> list[str]:
        """`space:<id>` and the environments shared there, including ones not received yet."""
        out: list[str] = []
        seen: set[str] = set()
        for space_id in space_ids:
            space = self.spaces.get(space_id)
            if space is None or space.doc_id in seen:
                continue
            seen.add(space.doc_id)
            out.append(space.doc_id)
            for env_id in sorted(space.doc.shared()):
                if env_id not in seen and self._sharing_space(env_id, (space_id,)) is not None:
                    seen.add(env_id)
                    out.append(env_id)
                    if self.attachments is not None:
                        out.append(files_doc_id(env_id))
        return out

    def allowed(self, doc_id: str, space_ids: Iterable[str]) -> bool:
        ids = tuple(space_ids)
        files_of = env_of(doc_id)
        if files_of is not None:
            return self.attachments is not None and self._sharing_space(files_of, ids) is not None
        if doc_id.startswith(SPACE_PREFIX):
            space_id = doc_id[len(SPACE_PREFIX) :]
            return space_id in ids and space_id in self.spaces
        return self._sharing_space(doc_id, ids) is not None

    def state_vector(self, doc_id: str) -> bytes | None:
        """None for a doc not synced here; the empty state vector for an environment shared in
        a space but not received yet, so that asking for it is the ordinary sync step."""
        space = self._space_of_doc(doc_id)
        if space is not None:
            return space.doc.doc.get_state()
        files_of = env_of(doc_id)
        if files_of is not None:
            if self.attachments is None or self._sharing_space(files_of) is None:
                return None
            return self.attachments.state_vector(files_of)
        if self._sharing_space(doc_id) is None:
            return None
        if doc_id not in self.registry.envs:
            return EMPTY_STATE_VECTOR
        return self.registry.state_vector(doc_id)  # no document loaded for it (residency.py)

    def diff(self, doc_id: str, state_vector: bytes) -> bytes:
        """What `state_vector` misses; the empty update for a doc that is not synced here."""
        space = self._space_of_doc(doc_id)
        try:
            if space is not None:
                return space.doc.doc.get_update(state_vector)
            files_of = env_of(doc_id)
            if files_of is not None:
                if self.attachments is None or self._sharing_space(files_of) is None:
                    return EMPTY_UPDATE
                return self.attachments.diff(files_of, state_vector or EMPTY_STATE_VECTOR)
            if self._sharing_space(doc_id) is None or doc_id not in self.registry.envs:
                return EMPTY_UPDATE
            if doc_id in self.holds:
                return EMPTY_UPDATE  # held: none of our state goes out until resolved
            return self.registry.state_update(doc_id, state_vector or EMPTY_STATE_VECTOR)
        except ValueError as exc:
            raise ValueError(f"bad state vector for {doc_id}: {exc}") from None

    def apply(self, doc_id: str, update: bytes, origin: str) -> None:
        """Merge a peer's update. A space document may change what is shared (reconciled here);
        an environment shared in a space but absent here is created. Updates for docs that are
        not (or no longer) shared are ignored: a deleted environment never comes back from a
        late update. Raises ValueError on bytes that are not a Yjs update."""
        if bytes(update) == EMPTY_UPDATE:
            return  # the answer to a state vector that misses nothing
        if doc_id.startswith(SPACE_PREFIX):
            space = self._space_of_doc(doc_id)
            if space is None:
                log.debug("spaces: ignoring an update of unknown %s from %s", doc_id, origin)
                return
            self._apply_space(space, update, origin)
            return
        files_of = env_of(doc_id)
        if files_of is not None:
            if self.attachments is not None and self._sharing_space(files_of) is not None:
                self.attachments.apply(files_of, update, origin)
            return
        space_id = self._sharing_space(doc_id)
        if space_id is None:
            log.debug("spaces: ignoring an update of %s (not synced) from %s", doc_id, origin)
            return
        items = _items(update)  # read once: the model check here, the stray check there
        if self._refuses(doc_id, space_id, update, origin, items):
            return
        if doc_id in self.holds:  # kept apart until resolved (docs/spaces.md)
            self.offline.add_remote(doc_id, update, origin)
            return
        if doc_id in self.registry.envs:
            self._merge(doc_id, update, origin, items)
        else:
            self._receive_new(doc_id, space_id, update, origin)
        self._migrate(doc_id)  # one that arrives at an older model: this device migrates it

    def ask(self, doc_id: str) -> bool:
        """Whether `doc_id` is an environment of an `ask` space (docs/spaces.md, "Offline
        choices"): the link's initial exchange lets `apply_initial` decide."""
        if doc_id.startswith(SPACE_PREFIX) or env_of(doc_id) is not None:
            return False
        space_id = self._sharing_space(doc_id)
        return space_id is not None and self.spaces[space_id].doc.policy() == ASK

    def answer_held(self, doc_id: str, origin: str) -> bytes | None:
        """A held environment's whole state, for the peer whose state is held when it asks
        for the whole state again (spaces/offline.py)."""
        return self.offline.answer_held(doc_id, origin)

    def apply_initial(self, doc_id: str, update: bytes, origin: str) -> str:
        """The peer's whole state of an ask environment at a link's initial exchange: push,
        pull or hold (spaces/offline.py)."""
        return self.offline.initial(doc_id, update, origin)

    def add_listener(self, fn: ChangeListener) -> int:
        token = self._token()
        self._listeners[token] = fn
        return token

    def remove_listener(self, token: int) -> None:
        self._listeners.pop(token, None)

    def add_docs_listener(self, fn: Callable[[], None]) -> int:
        token = self._token()
        self._docs_listeners[token] = fn
        return token

    def remove_docs_listener(self, token: int) -> None:
        self._docs_listeners.pop(token, None)

    # -- internals -----------------------------------------------------------------------------

    def _token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token

    def _space_of_doc(self, doc_id: str) -> Space | None:
        if not doc_id.startswith(SPACE_PREFIX):
            return None
        return self.spaces.get(doc_id[len(SPACE_PREFIX) :])

    def _sharing_space(self, env_id: str, space_ids: Iterable[str] | None = None) -> str | None:
        """The space in which this device syncs `env_id` (limited to `space_ids`), if any.

        A bound environment syncs in its space while the document says `shared`. An unbound
        one syncs (to be received) only if it is absent here: a local environment with the same
        id is never merged into a space behind the user's back (`env share` does that).
        """
        ids = self.spaces.keys() if space_ids is None else space_ids
        bound = self.bindings.get(env_id)
        if bound is not None:
            space = self.spaces.get(bound)
            ok = space is not None and bound in ids and space.doc.state(env_id) == SHARED
            return bound if ok and self.needs(env_id, bound) is None else None
        if env_id in self.registry.envs:
            return None
        for space_id in ids:
            space = self.spaces.get(space_id)
            if space is not None and space.doc.state(env_id) == SHARED:
                return space_id if self.needs(env_id, space_id) is None else None
        return None

    # -- model versions (docs/spaces.md, "Model versions") -----------------------------------

    def needs(self, env_id: str | None, space_id: str) -> int | None:
        """The model this device would need to sync `env_id` (None: the space itself) in the
        space; None if it has it. A space whose documents moved on to a newer model, or an
        environment that did (its document, or an update refused for it), is not synced."""
        space = self.spaces.get(space_id)
        needed = space.doc.model() if space is not None else 0
        if env_id is not None:
            needed = max(needed, self._newer.get(env_id, 0))
            if env_id in self.registry.envs:
                needed = max(needed, self.registry.model_of(env_id))
        return needed if needed > self.model_version else None

    def _meet(self, space: Space, *, commit: bool = True) -> list[Ticket]:
        """Publish this device's model in the space: its member entry, and the space's model
        if this device's is newer, written before any of its documents is migrated so that an
        older member learns that the space moved on before it would merge a migrated one."""
        me = self.identity.device_id
        entry = space.doc.members().get(me)
        if entry is not None and entry["model"] != self.model_version:
            space.doc.set_member(me, entry["name"] or self.identity.name, None, self.model_version)
        space.doc.mark_model(self.model_version, me)
        return self._commit_space(space, LOCAL) if commit else []

    def _migrate(self, env_id: str) -> list[Ticket]:
        """Migrate an environment this device holds up to its model, unless a space it is
        shared in needs a newer one (an older device keeps its copies untouched)."""
        if env_id not in self.registry.envs or self.registry.model_of(env_id) >= self.model_version:
            return []
        for space in self.spaces.values():
            if space.doc.state(env_id) == SHARED and self.needs(None, space.id) is not None:
                return []
        ticket = self.registry.migrate(env_id)
        self._model_ids.pop(env_id, None)  # it holds a new `meta.model` entry
        return [ticket] if ticket is not None else []

    def _migrate_all(self) -> list[Ticket]:
        return [t for env_id in sorted(self.registry.envs) for t in self._migrate(env_id)]

    def _refuses(
        self,
        env_id: str,
        space_id: str,
        update: bytes,
        origin: str,
        items: list[Item] | None = None,
    ) -> bool:
        """Whether `update` writes a `meta.model` newer than this device's: then it is not
        merged (the local copy stays as it is) and the environment is reported. Read from the
        update's bytes (or its `items`, read already), so it holds whatever order updates
        arrive in."""
        env = self.registry.envs.get(env_id)

        def known() -> set[tuple[int, int]]:
            ids = self._model_ids.get(env_id)
            if ids is None:
                ids = model_item_ids(env.doc.get_update()) if env is not None else set()
                self._model_ids[env_id] = ids
            return ids

        try:
            versions, ids = update_models(update if items is None else items, known)
        except ValueError:
            return False  # not decodable here: the registry refuses it with its reason
        newest = max(versions, default=0)
        if newest > self.model_version:
            self._newer[env_id] = max(newest, self._newer.get(env_id, 0))
            log.warning(
                "spaces: %s from %s is at model %d, this device at %d: not merged",
                env_id,
                origin,
                newest,
                self.model_version,
            )
            self._report_incompatible()
            self._docs_changed()
            return True
        if ids:
            known().update(ids)
        return False

    def incompatible(self) -> list[dict[str, Any]]:
        """Spaces and environments not synced because they moved on to a newer model."""
        out = []
        for space in sorted(self.spaces.values(), key=lambda s: s.id):
            needed = self.needs(None, space.id)
            envs = sorted(
                e
                for e in space.doc.shared()
                if (e in self.registry.envs or e in self._newer)
                and self.needs(e, space.id) is not None
            )
            if needed is None and not envs:
                continue
            out.append(
                {
                    "space": space.id,
                    "name": space.display_name,
                    "state": INCOMPATIBLE,
                    "needs": max([needed or 0, *(self.needs(e, space.id) or 0 for e in envs)]),
                    "model": self.model_version,
                    "environments": envs,
                    "action": UPGRADE,
                }
            )
        return out

    def _report_incompatible(self) -> None:
        """An `incompatible-version` event per space (or environment) the first time it is."""
        for entry in self.incompatible():
            whole = self.needs(None, entry["space"]) is not None
            for key in [entry["space"]] * whole + entry["environments"]:
                if key in self._reported:
                    continue
                self._reported.add(key)
                extra = {"id": key} if key != entry["space"] else {}
                self.events.emit(
                    INCOMPATIBLE,
                    space=entry["space"],
                    needs=entry["needs"],
                    model=self.model_version,
                    action=UPGRADE,
                    **extra,
                )

    def decorate_summary(self, summary: dict[str, Any]) -> None:
        """`env.list` hook: flag an environment this device holds but cannot sync."""
        env_id = summary.get("id")
        space_id = self.bindings.get(env_id) if isinstance(env_id, str) else None
        if space_id is None or space_id not in self.spaces:
            return
        self.offline.decorate(summary)
        needed = self.needs(env_id, space_id)
        if needed is None:
            return
        summary["flags"] = [*summary.get("flags", ()), INCOMPATIBLE]
        summary["incompatible"] = {
            "space": space_id,
            "needs": needed,
            "model": self.model_version,
            "action": UPGRADE,
        }

    def _receive_new(self, env_id: str, space_id: str, update: bytes, origin: str) -> None:
        """An environment shared in a space arrives here for the first time.

        A live edit may overtake the full state this device asked for (the peer answers the
        state vector after forwarding the edit). Such an update cannot create the environment
        by itself; it is kept until the one that does arrives, rather than failing the link.
        """
        probe = Doc()
        try:
            probe.apply_update(update)
        except BaseException as exc:
            if not is_failure(exc):
                raise
            raise ValueError(f"not a Yjs update: {exc}") from None
        if not len(probe.get(ENV_ROOT, type=Map)):
            early = self._early.setdefault(env_id, [])
            if len(early) < MAX_EARLY_UPDATES:  # beyond that, the full state carries them
                early.append(bytes(update))
            return
        self.bindings[env_id] = space_id  # first, so the listener forwards the new env
        self._save_bindings()
        self._merge(env_id, update, origin)
        for early_update in self._early.pop(env_id, ()):
            self._merge(env_id, early_update, origin)
        self.events.emit("environment-shared", id=env_id, space=space_id, origin=origin)

    def _merge(
        self, env_id: str, update: bytes, origin: str, items: list[Item] | None = None
    ) -> None:
        try:
            self.registry.merge(env_id, update, origin, items=items)
        except BaseException as exc:
            if type(exc).__name__ != "PanicException":  # pycrdt's Rust panics
                raise
            raise ValueError(f"pycrdt could not apply the update: {exc}") from None

    def _apply_space(self, space: Space, update: bytes, origin: str) -> None:
        try:
            space.doc.doc.apply_update(update)
        except BaseException as exc:
            if not is_failure(exc):
                raise
            space.pending.clear()
            raise ValueError(f"not a Yjs update: {exc}") from None
        if self._commit_space(space, origin):
            self._reconcile(origin)
            self._docs_changed()
            self._report_incompatible()

    def _commit_space(self, space: Space, origin: str) -> list[Ticket]:
        """Store the space document's new updates and hand them to the listeners."""
        updates, space.pending = space.pending, []
        tickets = [self.store.enqueue_append(space.doc_id, update) for update in updates]
        for update in updates:
            for listener in list(self._listeners.values()):
                listener(space.doc_id, update, origin)
        if updates and self.store.needs_compaction(space.doc_id):
            self.store.enqueue_compact(space.doc_id, space.doc.doc.get_update())
        return tickets

    def _reconcile(self, origin: str) -> list[Ticket]:
        """Make `bindings` (and the local environments) follow the space documents."""
        tickets: list[Ticket] = []
        changed = False
        for env_id, space_id in list(self.bindings.items()):
            space = self.spaces.get(space_id)
            state = space.doc.state(env_id) if space is not None else None
            present = env_id in self.registry.envs
            if state == SHARED and present:
                continue
            del self.bindings[env_id]
            changed = True
            self.holds.release(env_id)
            if not present:
                continue  # deleted here, or never arrived: nothing to keep
            if state == DELETED:
                tickets.append(self.registry.delete(env_id, origin))
            else:  # unshared, left, or unknown: this device keeps its copy as a local one
                self.events.emit("environment-unshared", id=env_id, space=space_id, origin=origin)
        if changed:
            tickets.append(self._save_bindings())
        tickets += self.offline.settle()  # holds of a space switched back to merge
        return tickets

    def _save_spaces(self) -> Ticket:
        return self.store.put_setting(
            SPACES_SETTING, {space_id: s.setting() for space_id, s in self.spaces.items()}
        )

    def _save_bindings(self) -> Ticket:
        return self.store.put_setting(BINDINGS_SETTING, dict(self.bindings))

    def _syncable(self) -> frozenset[str]:
        return frozenset(self.docs_of(self.spaces))

    def _docs_changed(self) -> None:
        """Tell the docs listeners if the set of syncable docs changed."""
        docs = self._syncable()
        access = self._access_state()
        if docs == self._docs and access == self._access:
            return
        self._docs, self._access = docs, access
        for env_id in [e for e in self._early if e not in docs]:
            del self._early[env_id]
        for listener in list(self._docs_listeners.values()):
            listener()

    def _access_state(self) -> frozenset[tuple[str, str, int, bool]]:
        return frozenset(
            (space.id, device, space.epoch, current_key_invalid(space))
            for space in self.spaces.values()
            for device in ["", *space.doc.removed()]
        )

    def _neighbours(self, env_id: str) -> list[str]:
        space = self.bindings.get(env_id)
        return [e for e, s in self.bindings.items() if s == space and e != env_id] if space else []

    def _on_files_change(self, doc_id: str, update: bytes, origin: str) -> None:
        env_id = env_of(doc_id)
        if env_id is not None and self._listeners and self._sharing_space(env_id) is not None:
            for listener in list(self._listeners.values()):
                listener(doc_id, update, origin)

    def _on_env_change(self, env_id: str, update: bytes, origin: str) -> None:
        if self._model_ids.get(env_id) == set() and not origin.startswith("peer:"):
            # A local write adds a `meta.model` entry only to a document that had none (merges
            # learn theirs in `_refuses`, a migration drops the ids): read them again if needed.
            del self._model_ids[env_id]
        if env_id in self.holds:
            return  # held: local edits stay here until resolved
        if self._listeners and self._sharing_space(env_id) is not None:
            for listener in list(self._listeners.values()):
                listener(env_id, update, origin)

    # -- socket operations ---------------------------------------------------------------------

    async def op_create(self, args: dict[str, Any], session: Any) -> Any:
        space, tickets = self.create_space(args.get("name"))
        return when_durable(tickets, {"id": space.id, "name": space.display_name})

    async def op_invite(self, args: dict[str, Any], session: Any) -> Any:
        addresses = args.get("addresses")
        if addresses is not None and not (
            isinstance(addresses, list) and all(isinstance(a, str) for a in addresses)
        ):
            raise OpError(BAD_REQUEST, "addresses must be a list of 'host:port' strings")
        hub = args.get("hub")
        if hub is not None and not isinstance(hub, str):
            raise OpError(BAD_REQUEST, "hub must be a string")
        code = self.invite(_space_arg(args), addresses, hub)
        return {"code": code}

    async def op_join(self, args: dict[str, Any], session: Any) -> Any:
        code = args.get("code")
        if not isinstance(code, str):
            raise OpError(BAD_REQUEST, "argument 'code' must be a string")
        space, tickets = self.join(code)
        return when_durable(tickets, {"id": space.id, "name": space.display_name})

    async def op_list(self, args: dict[str, Any], session: Any) -> Any:
        return self.list_spaces()

    async def op_leave(self, args: dict[str, Any], session: Any) -> Any:
        space, tickets = self.leave(_space_arg(args))
        return when_durable(tickets, {"id": space.id, "left": True})

    async def op_remove_device(self, args: dict[str, Any], session: Any) -> Any:
        space, device, tickets = self.remove_device(_space_arg(args), args.get("device"))
        result = {"space": space.id, "device": device, "epoch": space.epoch}
        return when_durable(tickets, result)

    async def op_share(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str(args, "id")
        copy_ = bool(args.get("copy", False))
        shared_id, tickets = self.share(env_id, _space_arg(args), copy_=copy_)
        space = self.spaces[self.bindings[shared_id]]
        return when_durable(tickets, {"id": shared_id, "space": space.id, "copy": copy_})

    async def op_mock(self, args: dict[str, Any], session: Any) -> Any:
        env_id = arg(args, "id", str, op="env.mock")
        hub = arg(args, "hub", bool, default=None, op="env.mock")
        access = arg(args, "access", str, default=None, op="env.mock")
        rotate = arg(args, "rotate_token", bool, default=False, op="env.mock")
        if access is not None and access not in ACCESS:
            raise SpaceError(BAD_REQUEST, f"env.mock: access must be one of {', '.join(ACCESS)}")
        result, tickets = self.hosted_mock(env_id, hub=hub, access=access, rotate_token=rotate)
        return when_durable(tickets, result)

    async def op_unshare(self, args: dict[str, Any], session: Any) -> Any:
        env_id = _str(args, "id")
        space, tickets = self.unshare(env_id)
        return when_durable(tickets, {"id": env_id, "space": space.id})

    async def op_identity(self, args: dict[str, Any], session: Any) -> Any:
        return {
            "device": self.identity.device_id,
            "name": self.identity.name,
            "public_key": self.identity.public_key,
        }


def _mock_url(
    hub: str | None, space_id: str, env_id: str, environment: dict[str, Any]
) -> str | None:
    """The Cloud Mock's base URL: the hub's address, `/mock/SPACE/ENV/`, the endpoint prefix."""
    if not hub:
        return None
    base = hub.rstrip("/")
    if base.startswith("wss://"):
        base = "https://" + base[len("wss://") :]
    elif base.startswith("ws://"):
        base = "http://" + base[len("ws://") :]
    prefix = environment.get("endpointPrefix")
    prefix = prefix.strip("/") if isinstance(prefix, str) else ""
    return f"{base}/mock/{space_id}/{env_id}/" + (f"{prefix}/" if prefix else "")


def _items(update: bytes) -> list[Item] | None:
    """The update's items (`strays.decode`), or None for bytes it cannot read: the registry
    then decodes them itself and refuses them with its own reason."""
    try:
        return decode(bytes(update))
    except ValueError:  # Malformed, or text that is no UTF-8
        return None


def _str(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise OpError(BAD_REQUEST, f"argument {name!r} must be a non-empty string")
    return value


def _space_arg(args: dict[str, Any]) -> str:
    return _str(args, "space")


__all__ = [
    "BINDINGS_SETTING",
    "SPACES_SETTING",
    "InvitePeer",
    "Space",
    "SpaceError",
    "SpaceKey",
    "SpacesService",
    "SyncHost",
    "space_doc_id",
]
