"""Progress of long CLI work (a large import or export, the first sync of a joined space).

Drawn on stderr only when stderr is a terminal, so piped output and scripts see nothing extra
and stdout never carries progress. One line, redrawn in place with `\\r` at most every
`interval` seconds and cleared at the end: nothing is left behind on success. `TERM=dumb`
(no cursor control) gets each phase once on a line of its own instead of redraws. No colours
are used at all, so `NO_COLOR` is honoured by construction. Free of trio: the CLI's client is
the blocking one, and a single long request is covered by `run`, which spins from a thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TextIO, TypeVar

__all__ = ["BYTES", "Progress", "format_bytes", "format_elapsed"]

T = TypeVar("T")

BYTES = "bytes"
"""The unit of a phase counted in bytes (`12.3 MiB / 40.0 MiB`); any other unit is a noun
(`3/12 environments`)."""
INTERVAL = 0.1  # at most ~10 redraws a second: a terminal is not a benchmark
SPINNER = "|/-\\"
OFF, LINES, REDRAW = "off", "lines", "redraw"


def format_bytes(size: float) -> str:
    """Binary units (`512 B`, `12.3 MiB`), one decimal: enough to see it move."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class Progress:
    """One progress line for a command, as a context manager: `phase()` names what is being
    done (with a total when known), `update()` says how far it got, `tick()` keeps a spinner
    turning, `run(fn)` spins while one blocking call runs; leaving the block clears the line.
    Every method is a no-op when the stream is not a terminal. Thread-safe (`run`'s spinner
    thread draws beside the caller)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = INTERVAL,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        env = os.environ if environ is None else environ
        if not _isatty(self.stream):
            self.mode = OFF
        elif env.get("TERM", "") == "dumb":
            self.mode = LINES
        else:
            self.mode = REDRAW
        self._clock = clock
        self._interval = interval
        self._lock = threading.RLock()
        self._start = clock()
        self._label = ""
        self._unit = BYTES
        self._done: float | None = None
        self._total: float | None = None
        self._detail = ""
        self._frame = 0
        self._last_draw: float | None = None
        self._shown = 0  # characters of the line now on screen (to clear it)

    @property
    def enabled(self) -> bool:
        return self.mode != OFF

    # -- what to show --------------------------------------------------------------------------

    def phase(
        self,
        label: str,
        *,
        total: float | None = None,
        unit: str = BYTES,
        done: float | None = None,
        detail: str = "",
    ) -> None:
        """Start a phase: a new label, its total if known; the count starts over. A new label
        is drawn at once (a command has a handful), the same label again (a poll loop) only
        updates the numbers, throttled."""
        with self._lock:
            new = label != self._label
            if self.mode == LINES and new:
                self._write(f"{label}...\n")
            self._label, self._unit, self._total, self._done = label, unit, total, done
            self._detail = detail
            self._maybe_draw(force=new)

    def update(
        self,
        done: float | None = None,
        *,
        advance: float = 0,
        total: float | None = None,
        detail: str | None = None,
    ) -> None:
        """How far the phase got: `done` (absolute) or `advance` (added); a total learnt late."""
        with self._lock:
            if done is not None:
                self._done = done
            if advance:
                self._done = (self._done or 0) + advance
            if total is not None:
                self._total = total
            if detail is not None:
                self._detail = detail
            self._maybe_draw()

    def tick(self) -> None:
        """Redraw if due: the spinner and the elapsed time move while nothing else does."""
        with self._lock:
            self._maybe_draw()

    def run(self, fn: Callable[[], T]) -> T:
        """`fn()` in this thread (so Ctrl-C still reaches it), the spinner turning from another
        thread meanwhile: for one blocking request that gives no progress of its own."""
        if self.mode != REDRAW:
            return fn()
        stop = threading.Event()

        def spin() -> None:
            while not stop.wait(self._interval):
                self.tick()

        self.tick()
        spinner = threading.Thread(target=spin, name="progress", daemon=True)
        spinner.start()
        try:
            return fn()
        finally:
            stop.set()
            spinner.join()

    def close(self) -> None:
        """Clear the line (a dumb terminal keeps its phase lines: they cannot be taken back)."""
        with self._lock:
            if self.mode == REDRAW and self._shown:
                self._write("\r" + " " * self._shown + "\r")
            self._shown = 0
            self.mode = OFF

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- drawing -------------------------------------------------------------------------------

    def line(self) -> str:
        """The line as it would be drawn now (without the spinner's turn)."""
        parts = [self._label] if self._label else []
        amount = self._amount()
        if amount:
            parts.append(amount)
        if self._detail:
            parts.append(self._detail)
        parts.append(format_elapsed(self._clock() - self._start))
        prefix = SPINNER[self._frame % len(SPINNER)] + " " if self._spinning() else ""
        return prefix + "  ".join(parts)

    def _spinning(self) -> bool:
        """No amount to show how far it got: a spinner shows it is still alive."""
        return self._done is None or self._total is None

    def _amount(self) -> str:
        done, total = self._done, self._total
        if done is None:
            return ""
        if self._unit == BYTES:
            if total is None:
                return format_bytes(done)
            percent = f" ({100 * done / total:.0f}%)" if total else ""
            return f"{format_bytes(done)} / {format_bytes(total)}{percent}"
        if total is None:
            return f"{done:g} {self._unit}"
        return f"{done:g}/{total:g} {self._unit}"

    def _maybe_draw(self, *, force: bool = False) -> None:
        if self.mode != REDRAW:
            return
        now = self._clock()
        due = self._last_draw is None or now - self._last_draw >= self._interval
        if not (due or force):
            return
        self._last_draw = now
        text = self.line()[: self._width() - 1]
        self._frame += self._spinning()
        pad = " " * max(0, self._shown - len(text))  # what is left of a longer line before
        self._write("\r" + text + pad)
        self._shown = len(text)

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        return max(20, columns) if columns else 80  # a pty nobody sized says 0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: stop drawing, keep working
            self.mode = OFF
