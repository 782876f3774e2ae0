"""Shared test setup: the network guard, per-test timeouts that trio tests survive, and where the
real Mockoon fixtures live (helpers are in modelutil.py)."""

import fcntl
import functools
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import pytest_timeout
import trio
from modelutil import FIXTURE_DIR, load

# lab/: what the tests and the benchmarks both use (the namespace lab, Chromium's switches)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab"))

HOW_TO_RUN = "tests/isolated .venv/bin/python -m pytest [ARGS]"


def network_exposure() -> str:
    """Empty when this process's network namespace holds only a loopback that is up, else what
    else it has. (Not /sys/class/net: sysfs shows the namespace of whoever mounted it.)"""
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ["lo"]:
        return "it has network interfaces " + ", ".join(names)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, request))[1]  # SIOCGIFFLAGS
    return "" if flags & 0x1 else "its loopback is down"  # IFF_UP


def pytest_sessionstart(session: pytest.Session) -> None:
    """Network safety by construction: the suite runs only where a mistaken address has nowhere to
    go, a network namespace with nothing but loopback (plus those the namespace tests create)."""
    exposure = network_exposure()
    if exposure:
        pytest.exit(
            "refusing to run the tests outside a network namespace of their own ("
            + exposure
            + f"): run them as `{HOW_TO_RUN}`",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


LOG_TAIL = 150


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that ran daemon processes shows the end of each one's log: a flake in CI is
    then diagnosable from the report alone (the logs go with the temp dir)."""
    outcome = yield
    report = outcome.get_result()
    daemons = getattr(item, "funcargs", {}).get("daemons")
    if report.when != "call" or not report.failed or daemons is None:
        return
    for daemon in getattr(daemons, "all", ()):
        try:
            lines = daemon.log_path.read_text("utf-8", "replace").splitlines()[-LOG_TAIL:]
        except OSError:
            continue
        title = f"log of {daemon.log_path.name} (last {LOG_TAIL} lines)"
        report.sections.append((title, "\n".join(lines)))


# --- per-test timeout ---------------------------------------------------------------------------
# pytest-timeout (`timeout` in pyproject.toml) fails a test that hangs. Its SIGALRM raises wherever
# the main thread is; for a trio test that is usually trio's run loop, which cannot take it: that
# run is abandoned, not unwound, and the next trio test fails with "run() from inside a run()". So
# a trio test is cancelled instead, from a timer thread, when its time is up, and fails with a
# timeout; only a test that ignores the cancellation for TIMEOUT_GRACE more seconds meets the
# alarm: an exception if a task is running, else (trio idle in its run loop) a stack dump and the
# end of the run, bounded either way. (pytest-trio runs a Hypothesis trio test's examples with its
# own trio.run: only the alarm bounds those.)
TIMEOUT_GRACE = 30.0
_DEADLINE = pytest.StashKey[tuple[float, float]]()  # (monotonic deadline, timeout in seconds)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("trio") is not None:
            run = functools.partial(_run_with_deadline, item)
            item.add_marker(pytest.mark.trio(run=run), append=False)  # before pytest-trio's


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """A trio test's timer: the deadline for its cancellation, and the alarm as a backstop."""
    if (
        item.get_closest_marker("trio") is None
        or settings.method != "signal"
        or threading.current_thread() is not threading.main_thread()
    ):
        return None  # pytest-timeout's own timer
    item.stash[_DEADLINE] = (time.monotonic() + settings.timeout, settings.timeout)

    def backstop(signum: int, frame: object) -> None:
        __tracebackhide__ = True
        if trio.lowlevel.in_trio_run() and not trio.lowlevel.in_trio_task():
            capture = item.config.pluginmanager.getplugin("capturemanager")
            if capture is not None:
                capture.suspend_global_capture(in_=True)
            sys.stderr.write(
                f"\n{item.nodeid}: still running {TIMEOUT_GRACE:g} s after its {settings.timeout:g} s"
                f" timeout cancelled it; ending the run. Its trio tasks:\n{_trio_tasks()}\n"
            )
            pytest_timeout.timeout_timer(item, settings)  # captured output, then os._exit(1)
        pytest_timeout.timeout_sigalrm(item, settings)  # raises Failed in the running task

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout calls it
    signal.signal(signal.SIGALRM, backstop)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout + TIMEOUT_GRACE)
    return True


TRIO_DIR = os.path.dirname(trio.__file__) + os.sep


def _trio_tasks() -> str:
    """Where each task of the current trio run waits, indented by nursery."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        lines.append(f"{'  ' * depth}{task.name}")
        for frame, lineno in task.iter_await_frames():
            code = frame.f_code
            if code.co_filename.startswith(TRIO_DIR):
                continue
            lines.append(f"{'  ' * depth}  {code.co_filename}:{lineno} in {code.co_name}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "\n".join(lines)


def _run_with_deadline(
    item: pytest.Item, afn: Callable[[], Awaitable[object]], **run_kwargs: Any
) -> object:
    """trio.run(afn) for pytest-trio, cancelled when the test's timeout is up (real time)."""
    limit = item.stash.get(_DEADLINE, None)
    if limit is None:  # no timeout for this test
        return trio.run(afn, **run_kwargs)
    deadline, timeout = limit

    async def bounded() -> object:
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:

            def expire() -> None:
                try:
                    token.run_sync_soon(scope.cancel)
                except trio.RunFinishedError:
                    pass

            timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
            timer.daemon = True
            timer.start()
            try:
                result = await afn()
            except BaseException:
                if scope.cancel_called:
                    pytest.fail(f"Timeout: not done after {timeout:g} s; the test was cancelled")
                raise
            finally:
                timer.cancel()
        if scope.cancel_called:
            pytest.fail(f"Timeout: not done after {timeout:g} s; the test was cancelled")
        return result

    return trio.run(bounded, **run_kwargs)


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def fixture_dir():
    return FIXTURE_DIR


@pytest.fixture
def load_fixture():
    """`load_fixture("test-env.json")` -> a fresh parsed copy of a fixture."""
    return load


@pytest.fixture(autouse=True, scope="session")
def _no_mdns_outside_namespaces():
    """Network safety: no daemon a test starts (in process or as a child) may run mDNS on this
    machine's own interfaces; the namespace tests opt back in explicitly for their children."""
    previous = os.environ.get("PEERDAEMON_NO_MDNS")
    os.environ["PEERDAEMON_NO_MDNS"] = "1"
    yield
    if previous is None:
        os.environ.pop("PEERDAEMON_NO_MDNS", None)
    else:
        os.environ["PEERDAEMON_NO_MDNS"] = previous


@pytest.fixture(autouse=True, scope="session")
def _no_user_config(tmp_path_factory):
    """No test reads or writes the config file of the user running the suite: the default
    config dir is a fresh one (tests of the default location set XDG_CONFIG_HOME themselves),
    and a PEERDAEMON_CONFIG or setting variable from the caller's shell is dropped."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("PEERDAEMON_")}
    home = tmp_path_factory.mktemp("xdg-config")
    previous = os.environ.get("XDG_CONFIG_HOME")
    for key in saved:
        if key not in ("PEERDAEMON_NO_MDNS", "PEERDAEMON_DEBUG"):
            os.environ.pop(key)
    os.environ["XDG_CONFIG_HOME"] = str(home)
    yield
    os.environ.update(saved)
    if previous is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = previous
