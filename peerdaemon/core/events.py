"""The daemon's event log: a bounded, numbered history that clients follow from a cursor.

Like Syncthing's `/rest/events?since=`: every event has an increasing id, a client remembers the
last id it saw and resumes from it after a reconnect, and the log tells it when events it asked
for have already been dropped (so it knows to re-read the state).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]

log = logging.getLogger("peerdaemon.events")


class EventLog:
    def __init__(self, capacity: int = 10_000, first_id: int | None = None) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        # Ids go on increasing across restarts (they start at the start time in milliseconds),
        # so a cursor from an earlier run is recognisably older than anything this run holds.
        self.first_id = first_id if first_id is not None else int(time.time() * 1000)
        self._next_id = self.first_id
        self._listeners: dict[int, Callable[[Event], None]] = {}
        self._next_listener = 1

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    @property
    def listening(self) -> bool:
        return bool(self._listeners)

    @property
    def oldest_id(self) -> int:
        return self._events[0]["id"] if self._events else self._next_id

    def emit(self, type_: str, **data: Any) -> Event:
        event = {"id": self._next_id, "type": type_, "time": time.time(), "data": data}
        self._next_id += 1
        self._events.append(event)
        for listener in list(self._listeners.values()):
            # Isolated: a listener that raises (a bug in one service or one client's push) must
            # not cost the others their event, nor fail the change that emitted it. Logged only:
            # an event about it would reach that same listener again.
            try:
                listener(event)
            except BaseException as exc:
                if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
                    raise  # pycrdt's panics are failures; a cancellation or an interrupt is not
                log.error("event listener %r failed on %s", listener, type_, exc_info=exc)
        return event

    def since(self, cursor: int) -> list[Event]:
        """Events after `cursor` still held; ids below `oldest_id` are gone."""
        if cursor >= self.last_id:
            return []
        start = max(0, cursor + 1 - self.oldest_id)
        return list(self._events)[start:]

    def listen(self, listener: Callable[[Event], None]) -> int:
        token = self._next_listener
        self._next_listener += 1
        self._listeners[token] = listener
        return token

    def unlisten(self, token: int) -> None:
        self._listeners.pop(token, None)
