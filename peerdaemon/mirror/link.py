"""One link between an environment document and a file, as a state machine without I/O.

The trio shell (`runner.py`) feeds it what happened, with the time: the document changed, the
file was observed (stat + content, already parsed), a write finished, a render is ready, an
apply finished; the machine answers with actions (render the document, write this content, apply
the file, emit an event, remember the synced content) and the next deadline it wants to be woken
at. Everything that decides *what* to do is here, so it is tested without files or sleeping.

How it avoids loops: it remembers the hash of the content last seen in the file, which a write
of its own sets. A file whose content is that is its own write, or a touch, and is not applied
again; any other content is a change, even one equal to an earlier write of ours (a restore).
A document change is rendered and compared, as JSON, with the file: when the file already says
it (after applying that very file, say), nothing is written. So a file write leads to at most
one apply and one write back (only if the merge changed something), and a watcher that reloads
the file (Mockoon, mockoon-cli --watch) sees each change once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .format import content_hash

# Timing (seconds). Debounce: a burst of edits becomes one write, at most MAX_DELAY after the
# first; SETTLE: how long an invalid or missing file must stay so before it counts (an editor's
# half-written save, or vim's rename-then-write, is not a conflict).
DEBOUNCE = 0.05
MAX_DELAY = 0.3
SETTLE = 0.5
BACKOFF_MIN = 0.5
BACKOFF_MAX = 15.0

FileKind = Literal["file", "missing", "dir", "error"]
StartMode = Literal["resume", "adopt", "overwrite"]
"""What a link's start does with an existing file (see `LinkMachine`)."""
Sig = tuple[int, int, int]
"""(mtime_ns, size, inode): a file changed when this changed (atomic renames change the inode)."""


@dataclass(frozen=True)
class Observation:
    """What the shell found at the linked path."""

    kind: FileKind
    sig: Sig | None = None
    content: bytes | None = None
    json_hash: str | None = None
    """Hash of the parsed environment (`format.json_hash`); None if the content is not one."""
    error: str | None = None
    """Why the content is not an environment (kind "file"), or why it cannot be read."""

    @property
    def hash(self) -> str | None:
        return content_hash(self.content) if self.content is not None else None


# -- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Render:
    """Export the document and format it (target "file" or "conflict"), then call `rendered`."""

    target: Literal["file", "conflict"]


@dataclass(frozen=True)
class Write:
    """Write `content` atomically to the target; only if the file's sig is still `expect` (and,
    where a sig cannot tell, its content still hashes to `expect_hash`)."""

    target: Literal["file", "conflict"]
    content: bytes
    expect: Sig | None | Literal["any"]
    expect_hash: str | None = None


@dataclass(frozen=True)
class Apply:
    """Apply the observed file content to the document (as minimal edits), then call `applied`."""

    content: bytes


@dataclass(frozen=True)
class Emit:
    type: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InSync:
    """File and document agree on `content_hash`: persist it (start-up compares against it)."""

    content_hash: str


Action = Render | Write | Apply | Emit | InSync

WriteOutcome = Literal["ok", "changed", "failed"]


class LinkMachine:
    """The state of one link. `mode` says what start-up does with an existing file:

    - "resume": a link that existed before; a file that differs from `synced` changed while the
      daemon was not running and is applied; an invalid one is a conflict.
    - "adopt": a new link to a file of the same environment: the file is applied.
    - "overwrite": a new link that replaces the file with the document.
    """

    def __init__(
        self,
        env_id: str,
        path: str,
        conflict_path: str,
        *,
        synced: str | None = None,
        mode: StartMode = "resume",
    ) -> None:
        self.env_id = env_id
        self.path = path
        self.conflict_path = conflict_path
        self.synced = synced
        self.mode = mode
        self.started = False
        # what we know of the file
        self.sig: Sig | None = None
        self.kind: FileKind | None = None
        self.file_hash: str | None = None  # content last seen in the file
        self.file_json: str | None = None  # its JSON hash, if it was a valid environment
        # document side
        self.dirty = False
        self.dirty_since = 0.0
        self.last_change = 0.0
        self.rendering: str | None = None  # target of an outstanding Render
        self.in_flight = False  # a Write or Apply is outstanding
        # trouble
        self.pending_invalid: float | None = None  # when an invalid file was first seen
        self.pending_missing: float | None = None
        self.invalid_reason: str | None = None
        self.conflict = False
        self.conflict_dirty = False
        self.error: str | None = None
        self.error_from: str | None = None  # "observe" (reading the path) or "write"
        self.want_observe = False  # the shell must look at the file before anything else
        self.retry_at: float | None = None
        self.backoff = BACKOFF_MIN
        self.stats = {"writes": 0, "applies": 0, "conflicts": 0, "errors": 0}

    # -- inputs ---------------------------------------------------------------------------------

    def doc_changed(self, now: float) -> None:
        """The document changed (any origin, our own applies too). Safe to call from a listener
        at any time: it only marks; the next `poll` renders once the debounce is over."""
        if not self.dirty:
            self.dirty = True
            self.dirty_since = now
        self.last_change = now
        if self.conflict:
            self.conflict_dirty = True

    def observed(self, now: float, obs: Observation) -> list[Action]:
        """The shell saw the path (at start, and whenever its stat changed)."""
        actions: list[Action] = []
        first = not self.started
        self.started = True
        self.want_observe = False
        kind_before = self.kind
        if self.error_from == "observe" and obs.kind in ("file", "missing"):
            actions += self._recovered()
        self.kind = obs.kind
        self.sig = obs.sig
        if obs.kind != "missing":
            self.pending_missing = None
        if obs.kind != "file":
            self.pending_invalid = None
        if obs.kind == "dir":
            actions += self._fail(
                now,
                f"{self.path} is a directory, not a file: not writing there "
                f"(remove it, or `peerdaemon env unlink {self.env_id}`)",
                source="observe",
            )
        elif obs.kind == "error":
            actions += self._fail(now, obs.error or f"cannot read {self.path}", source="observe")
        elif obs.kind == "missing":
            self.file_hash = self.file_json = None
            if first:
                if self.synced is not None and self.mode == "resume":
                    actions.append(self._deleted_event())
                self._force_dirty(now)
            elif kind_before != "missing":
                self.pending_missing = now
        else:
            actions += self._observed_file(now, obs, first)
        return actions + self.poll(now)

    def _observed_file(self, now: float, obs: Observation, first: bool) -> list[Action]:
        actions: list[Action] = []
        seen = obs.hash
        if first:
            self.file_hash = seen
            if self.mode == "overwrite" or (self.mode == "adopt" and not obs.content):
                self.file_json = obs.json_hash
                self._force_dirty(now)
                return actions
            if seen == self.synced and obs.json_hash is not None:
                # unchanged since the last sync: the document may be newer, render and compare
                self.file_json = obs.json_hash
                self._force_dirty(now)
                return actions
            if obs.json_hash is None:
                return actions + self._invalid(now, obs, settled=True)
            return actions + self._apply(obs)
        if seen == self.file_hash:
            # a touch, or our own write coming back (a write sets `file_hash`): not applied again.
            # Content equal to what we once wrote but not to what the file last held is a change:
            # the user restored it (`cp NAME.peerdaemon-conflict.json NAME.json`, an undo).
            return actions
        self.file_hash = seen
        if obs.json_hash is None:
            return actions + self._invalid(now, obs, settled=False)
        self.pending_invalid = None
        if self.conflict:
            self.conflict = False
            self.conflict_dirty = False
            self.invalid_reason = None
            actions.append(Emit("mirror-resumed", self._data(after="conflict")))
        if obs.json_hash == self.file_json:
            return actions  # reformatted only: nothing to apply
        return actions + self._apply(obs)

    def rendered(self, now: float, target: str, content: bytes, json_hash: str) -> list[Action]:
        """The document's text for `target`, with the JSON hash of what it says."""
        self.rendering = None
        if target == "conflict":
            if not self.conflict:
                return self.poll(now)
            self.in_flight = True
            self.conflict_dirty = False  # a change during the write sets it again
            return [Write("conflict", content, "any")]
        if self.conflict or self.kind in ("dir", "error"):
            return self.poll(now)
        if self.kind == "file" and json_hash == self.file_json and self.file_json is not None:
            # the file already says this (e.g. right after applying it): no write, no reload;
            # and an earlier failure to render or write is over, nothing is left to write
            self.dirty = False
            self.file_json = json_hash
            actions: list[Action] = self._recovered()
            if self.file_hash is not None and self.file_hash != self.synced:
                self.synced = self.file_hash
                actions.append(InSync(self.file_hash))
            return actions + self.poll(now)
        self.in_flight = True
        self.dirty = False  # a change during the write sets it again
        return [Write("file", content, self.sig, self.file_hash)]

    def write_done(
        self,
        now: float,
        target: str,
        outcome: WriteOutcome,
        *,
        content: bytes = b"",
        json_hash: str | None = None,
        sig: Sig | None = None,
        error: str | None = None,
    ) -> list[Action]:
        """A Write finished: "ok" (with the new sig), "changed" (the file moved under us, nothing
        written: observe it first) or "failed" (with a reason)."""
        self.in_flight = False
        actions: list[Action] = []
        if target == "conflict":
            if outcome == "ok":
                self.stats["conflicts"] += 1
                actions += self._recovered()
            else:
                self.conflict_dirty = True
                if outcome == "failed":
                    actions += self._fail(now, error or f"cannot write {self.conflict_path}")
            return actions + self.poll(now)
        if outcome == "ok":
            written = content_hash(content)
            self.file_hash = self.synced = written  # what we wrote is what the file holds
            self.file_json = json_hash
            self.sig = sig
            self.kind = "file"
            self.stats["writes"] += 1
            actions.append(InSync(written))
            actions += self._recovered()
        else:
            if not self.dirty:
                self.dirty = True
                self.dirty_since = now
            if outcome == "failed":
                actions += self._fail(now, error or f"cannot write {self.path}")
            else:
                self.want_observe = True  # the file moved under us: read it before writing
        return actions + self.poll(now)

    def applied(self, now: float, content: bytes, *, error: str | None = None) -> list[Action]:
        """An Apply finished (or failed: the content could not be applied after all)."""
        self.in_flight = False
        if error is not None:
            self.file_json = None
            obs = Observation("file", self.sig, content, None, error)
            return self._invalid(now, obs, settled=True) + self.poll(now)
        self.stats["applies"] += 1
        self.synced = content_hash(content)
        return [InSync(self.synced), *self._recovered(), *self.poll(now)]

    def failed(self, now: float, reason: str) -> list[Action]:
        """A step the shell ran for the link failed (the document could not be rendered, or a
        bug): the link is in error with `reason`, leaves the file as it is, and tries again with
        backoff. The reason stays in `error` until a render or a write succeeds."""
        if self.in_flight:
            # a write or an apply was under way: what the file holds now is not known, so it is
            # read (and applied: a three-way merge, harmless if already done) before anything
            self.file_hash = self.file_json = None
            self.want_observe = True
        self.in_flight = False
        self.rendering = None
        if not self.dirty:  # the document may not be in the file: render it again
            self.dirty = True
            self.dirty_since = self.last_change = now
        return self._fail(now, reason, source="internal") + self.poll(now)

    def poll(self, now: float) -> list[Action]:
        """Timers: debounced renders, settled conflicts and deletions, retries."""
        actions: list[Action] = []
        if self.in_flight or self.rendering is not None or not self.started or self.want_observe:
            return actions
        if self.pending_invalid is not None and now >= self.pending_invalid + SETTLE:
            self.pending_invalid = None
            actions += self._enter_conflict()
        if self.pending_missing is not None and now >= self.pending_missing + SETTLE:
            self.pending_missing = None
            actions.append(self._deleted_event())
            self._force_dirty(now)
        if self.retry_at is not None:
            if now < self.retry_at:
                return actions
            self.retry_at = None
            if self.error_from == "observe":
                self.want_observe = True  # look again: a chmod does not change the stat we poll
                return actions
        if self.kind in ("dir", "error") or self.pending_missing is not None:
            return actions
        if self.conflict:
            if self.conflict_dirty and now >= self._due():
                self.rendering = "conflict"
                actions.append(Render("conflict"))
            return actions
        if self.pending_invalid is not None:
            return actions
        if self.dirty and now >= self._due():
            self.rendering = "file"
            actions.append(Render("file"))
        return actions

    def deadline(self) -> float | None:
        """When `poll` next has something to do (None: only an input can change that)."""
        if self.in_flight or self.rendering is not None or not self.started or self.want_observe:
            return None
        times = []
        if self.pending_invalid is not None:
            times.append(self.pending_invalid + SETTLE)
        if self.pending_missing is not None:
            times.append(self.pending_missing + SETTLE)
        if self.retry_at is not None:
            times.append(self.retry_at)
        elif self.kind not in ("dir", "error"):
            if (self.conflict and self.conflict_dirty) or (
                self.dirty and not self.conflict and self.pending_invalid is None
            ):
                times.append(self._due())
        return min(times) if times else None

    # -- state for `env links` ------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.error is not None:
            return "error"
        if self.conflict:
            return "conflict"
        if self.dirty or self.in_flight or self.rendering or not self.started:
            return "syncing"
        return "ok"

    @property
    def reason(self) -> str | None:
        """Why the link is not in step, for `env links`: its error, or what makes it a conflict."""
        if self.error is not None:
            return self.error
        if self.conflict:
            return self._conflict_reason()
        return None

    # -- internals ------------------------------------------------------------------------------

    def _due(self) -> float:
        return min(self.last_change + DEBOUNCE, self.dirty_since + MAX_DELAY)

    def _force_dirty(self, now: float) -> None:
        """Write from the document now (no debounce)."""
        self.dirty = True
        self.dirty_since = self.last_change = now - MAX_DELAY

    def _data(self, **extra: Any) -> dict[str, Any]:
        return {"id": self.env_id, "path": self.path, **extra}

    def _deleted_event(self) -> Emit:
        return Emit(
            "mirror-file-deleted",
            self._data(
                reason=f"{self.path} was deleted; writing it again from the document "
                f"(`peerdaemon env unlink {self.env_id}` stops mirroring)"
            ),
        )

    def _apply(self, obs: Observation) -> list[Action]:
        self.file_json = obs.json_hash
        self.in_flight = True
        assert obs.content is not None
        return [Apply(obs.content)]

    def _invalid(self, now: float, obs: Observation, *, settled: bool) -> list[Action]:
        self.file_json = None
        self.invalid_reason = obs.error or "not a valid environment"
        if self.conflict:
            return []
        if settled:
            return self._enter_conflict()
        if self.pending_invalid is None:
            self.pending_invalid = now
        return []

    def _enter_conflict(self) -> list[Action]:
        self.conflict = True
        self.conflict_dirty = True
        self.dirty_since = self.last_change = -1e9  # write the conflict file at once
        return [
            Emit(
                "mirror-conflict",
                self._data(conflict_path=self.conflict_path, reason=self._conflict_reason()),
            )
        ]

    def _conflict_reason(self) -> str:
        return (
            f"{self.path} cannot be applied ({self.invalid_reason or 'not a valid environment'}); "
            f"it is left as it is and the merged environment is in {self.conflict_path} until "
            "the file is valid again"
        )

    def _fail(self, now: float, reason: str, source: str = "write") -> list[Action]:
        actions: list[Action] = []
        self.error_from = source
        if reason != self.error:
            self.stats["errors"] += 1
            actions.append(Emit("mirror-error", self._data(reason=reason)))
        else:
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        if self.error is None:
            self.backoff = BACKOFF_MIN
        self.error = reason
        self.retry_at = now + self.backoff
        return actions

    def _recovered(self) -> list[Action]:
        if self.error is None:
            return []
        self.error = None
        self.error_from = None
        self.retry_at = None
        self.backoff = BACKOFF_MIN
        return [Emit("mirror-resumed", self._data(after="error"))]
