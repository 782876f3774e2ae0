"""The space document: a space's membership and environment list, replicated as one Yjs doc.

Layout (docs/spaces.md), every value a plain JSON object so each key is last-writer-wins:

    info          Y.Map  name, created (Unix s), creator (device id), layout (1)
    members       Y.Map  device id -> {name, joined, model}
    environments  Y.Map  env id -> {state: "shared" | "unshared" | "deleted", by, at}
    mocks         Y.Map  env id -> {hub: bool, access: "public" | "token", token, by, at}
    models        Y.Map  "N" -> {by, at}: the environment model N reached the space
    settings      Y.Map  "offline" -> {policy: "merge" | "ask", by, at}: offline choices
    removed       Y.Map  device id -> {by, at, epoch}: devices removed from the space

Why a document and not messages: members and shares must converge on every device whatever the
order in which devices meet, including devices that were offline while things changed. Values
read from peers are checked here, so a malformed entry reads as absent instead of crashing.
"""

from __future__ import annotations

import time
from typing import Any

from pycrdt import Doc, Map

__all__ = [
    "DELETED",
    "ENVIRONMENTS",
    "ACCESS",
    "INFO",
    "LAYOUT",
    "MEMBERS",
    "MOCKS",
    "MODELS",
    "REMOVED",
    "SHARED",
    "STATES",
    "UNSHARED",
    "SpaceDoc",
]

LAYOUT = 1
INFO = "info"
MEMBERS = "members"
ENVIRONMENTS = "environments"
MOCKS = "mocks"
MODELS = "models"
SETTINGS = "settings"
OFFLINE = "offline"
POLICIES = ("merge", "ask")
REMOVED = "removed"
KEYS = "keys"
ACCESS = ("public", "token")

SHARED = "shared"
UNSHARED = "unshared"
DELETED = "deleted"
STATES = (SHARED, UNSHARED, DELETED)


class SpaceDoc:
    """Typed reads and writes of a space document (the `Doc` itself is `self.doc`)."""

    def __init__(self, doc: Doc | None = None) -> None:
        self.doc = doc if doc is not None else Doc()
        self._memo: dict[str | None, Any] | None = None

    def remember_reads(self) -> None:
        """Keep `state` and `model` answers until the document's next write transaction (any
        transaction that writes fires the observer; reads fire none). Every update a peer sends
        asks them several times (`SyncHost.allowed`, `apply`, the change listeners), and each
        is a pycrdt read. Opt-in: the observer lives as long as the document."""
        if self._memo is None:
            memo: dict[str | None, Any] = {}
            self._memo = memo
            self.doc.observe(lambda _event: memo.clear())

    def _map(self, name: str) -> Map:
        return self.doc.get(name, type=Map)

    # -- reading -------------------------------------------------------------------------------

    @property
    def name(self) -> str | None:
        value = self._map(INFO).get("name")
        return value if isinstance(value, str) else None

    def members(self) -> dict[str, dict[str, Any]]:
        """device id -> {name, joined}; malformed entries are skipped."""
        out: dict[str, dict[str, Any]] = {}
        for device, entry in self._map(MEMBERS).items():
            if isinstance(entry, dict):
                name = entry.get("name")
                joined = entry.get("joined")
                model = entry.get("model")
                out[device] = {
                    "name": name if isinstance(name, str) else "",
                    "joined": joined if isinstance(joined, int | float) else None,
                    "model": _version(model),
                }
        return out

    def removed(self) -> dict[str, dict[str, Any]]:
        """device id -> {by, at, epoch} for every device removed from the space (`space
        remove-device`); a key is never deleted, so a removal outlives any concurrent write of
        the device's own `members` entry. Malformed entries are skipped."""
        out: dict[str, dict[str, Any]] = {}
        for device, entry in self._map(REMOVED).items():
            if isinstance(entry, dict):
                by, at, epoch = entry.get("by"), entry.get("at"), entry.get("epoch")
                out[device] = {
                    "by": by if isinstance(by, str) else None,
                    "at": at if isinstance(at, int | float) else None,
                    "epoch": _version(epoch) or 0,  # Yjs numbers read back as floats
                }
        return out

    def is_removed(self, device: str) -> bool:
        return isinstance(self._map(REMOVED).get(device), dict)

    def remove_device(self, device: str, by: str, epoch: int) -> None:
        """Record the removal of `device` and drop its `members` entry (one transaction)."""
        with self.doc.transaction():
            self._map(REMOVED)[device] = {"by": by, "at": time.time(), "epoch": epoch}
            members = self._map(MEMBERS)
            if device in members:
                del members[device]

    def key_commitments(self) -> dict[str, dict[str, Any]]:
        """check (hex) -> {epoch, by, pk, sig, at}: the keys members rotated to (`keys` root;
        entries only added). Which of them count is `removal.target_key`'s decision."""
        out: dict[str, dict[str, Any]] = {}
        for check, entry in self._map(KEYS).items():
            if isinstance(entry, dict):
                out[check] = dict(entry)
        return out

    def commit_key(self, check: str, entry: dict[str, Any]) -> None:
        self._map(KEYS)[check] = entry

    def model(self) -> int:
        """The environment model the space's documents follow: the newest any member brought
        (`models` keys; 1 without any). Keys are only ever added, one per version, so concurrent
        marks by devices that were apart all survive the merge and the newest wins."""
        memo = self._memo
        if memo is not None and None in memo:
            return int(memo[None])
        versions = [_version(key) for key in self._map(MODELS).keys()]
        model = max((v for v in versions if v is not None), default=1)
        if memo is not None:
            memo[None] = model
        return model

    def mark_model(self, version: int, by: str) -> bool:
        """Record that a device of model `version` is in the space (before it migrates any of
        its documents, so that an older device learns it first); -> whether it wrote."""
        if self.model() >= version:
            return False
        self._map(MODELS)[str(version)] = {"by": by, "at": time.time()}
        return True

    def policy(self) -> str:
        """The space's offline policy (docs/spaces.md, "Offline choices"): `ask` only when a
        well-formed entry says so, `merge` for anything else."""
        value = self._map(SETTINGS).get(OFFLINE)
        if isinstance(value, dict) and value.get("policy") in POLICIES:
            return str(value["policy"])
        return "merge"

    def set_policy(self, policy: str, by: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown offline policy {policy!r}")
        self._map(SETTINGS)[OFFLINE] = {"policy": policy, "by": by, "at": time.time()}

    def entry(self, env_id: str) -> dict[str, Any] | None:
        value = self._map(ENVIRONMENTS).get(env_id)
        if isinstance(value, dict) and value.get("state") in STATES:
            return value
        return None

    def state(self, env_id: str) -> str | None:
        memo = self._memo
        if memo is not None and env_id in memo:
            return memo[env_id]  # type: ignore[no-any-return]
        entry = self.entry(env_id)
        state = entry["state"] if entry is not None else None
        if memo is not None:
            memo[env_id] = state
        return state

    def states(self) -> dict[str, str]:
        """env id -> state, for every well-formed entry."""
        out = {}
        for env_id in self._map(ENVIRONMENTS).keys():
            state = self.state(env_id)
            if state is not None:
                out[env_id] = state
        return out

    def shared(self) -> set[str]:
        return {env_id for env_id, state in self.states().items() if state == SHARED}

    def mock(self, env_id: str) -> dict[str, Any] | None:
        """The hosted-mock setting of an environment (the hub's Cloud Mock); None if never set
        or malformed. A `token` access without a usable token reads as off: the hub must never
        serve publicly what a member meant to protect."""
        value = self._map(MOCKS).get(env_id)
        if not isinstance(value, dict) or not isinstance(value.get("hub"), bool):
            return None
        access = value.get("access")
        token = value.get("token")
        if access not in ACCESS:
            return None
        if access == "token" and not (isinstance(token, str) and len(token) >= 16):
            return None
        return {
            "hub": value["hub"],
            "access": access,
            "token": token if isinstance(token, str) else None,
            "by": value.get("by") if isinstance(value.get("by"), str) else None,
            "at": value.get("at") if isinstance(value.get("at"), int | float) else None,
        }

    def hosted(self) -> dict[str, dict[str, Any]]:
        """env id -> setting, for shared environments whose mock the hub should serve."""
        shared = self.shared()
        out = {}
        for env_id in self._map(MOCKS).keys():
            setting = self.mock(env_id)
            if setting is not None and setting["hub"] and env_id in shared:
                out[env_id] = setting
        return out

    # -- writing (each call is one transaction, so one update) ---------------------------------

    def init(self, name: str, creator: str, member_name: str) -> None:
        """The creator's first write: the space's name and itself as the first member."""
        now = time.time()
        with self.doc.transaction():
            info = self._map(INFO)
            info["name"] = name
            info["created"] = now
            info["creator"] = creator
            info["layout"] = LAYOUT
            self._map(MEMBERS)[creator] = {"name": member_name, "joined": now}

    def set_member(
        self, device: str, name: str, joined: float | None = None, model: int | None = None
    ) -> None:
        """This device's own entry; `model`: the environment model it runs at."""
        current = self.members().get(device)
        if joined is None:
            joined = current["joined"] if current and current["joined"] else time.time()
        if model is None:
            model = current["model"] if current else None
        if current == {"name": name, "joined": joined, "model": model}:
            return  # no update for a no-op
        entry: dict[str, Any] = {"name": name, "joined": joined}
        if model is not None:
            entry["model"] = model
        self._map(MEMBERS)[device] = entry

    def remove_member(self, device: str) -> None:
        members = self._map(MEMBERS)
        if device in members:
            del members[device]

    def set_mock(self, env_id: str, hub: bool, access: str, token: str, by: str) -> None:
        if access not in ACCESS:
            raise ValueError(f"unknown mock access {access!r}")
        self._map(MOCKS)[env_id] = {
            "hub": hub,
            "access": access,
            "token": token,
            "by": by,
            "at": time.time(),
        }

    def set_state(self, env_id: str, state: str, by: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown environment state {state!r}")
        self._map(ENVIRONMENTS)[env_id] = {"state": state, "by": by, "at": time.time()}


def _version(value: object) -> int | None:
    """A model version from a peer's entry or key ("2", 2 or 2.0); None for anything else."""
    if isinstance(value, str):
        value = int(value) if value.isdigit() and len(value) < 10 else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    if value in (float("inf"), float("-inf")) or value != int(value) or value < 1:
        return None
    return int(value)
