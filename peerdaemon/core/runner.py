"""Running a trio service as a process: logging, one-line start-up failures, an exit code.

`peerdaemon run` and `peerdaemon hub serve` both start a supervisor under `trio.run`; a start-up
failure that is the user's to fix (data dir in use, port taken, bad config) must print one line,
not a traceback nested in exception groups.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio


def run_process(
    main: Callable[[Any], Awaitable[None]],
    config: Any,
    *,
    expected: tuple[type[BaseException], ...],
    stopped: str,
) -> int:
    """`trio.run(main, config)`; returns 0, or 1 after one line on stderr for `expected` errors."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(main, config)
    except BaseException as exc:
        reason = expected_failure(exc, expected)
        if reason is None:
            raise
        print(f"peerdaemon: {' '.join(str(reason).split())}", file=sys.stderr)
        return 1
    logging.getLogger("peerdaemon").info(stopped)
    return 0


def expected_failure(
    exc: BaseException, expected: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The failure to report in one line, if every leaf of `exc` is an expected one."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [expected_failure(e, expected) for e in exc.exceptions]
        return leaves[0] if leaves and all(leaves) else None
    return exc if isinstance(exc, expected) else None
