"""Lock files are opened without following symlinks.

With `--socket` in a shared directory, another user can plant `<socket>.lock` as a symlink to a
file of their choosing (or of the daemon user's, to have it truncated and locked); the data
dir's `peerdaemon.lock` likewise. The daemon refuses to start with a clear error and leaves the
link's target alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from peerdaemon.api.server import ServerStartError, serve_unix
from peerdaemon.store.errors import StoreError
from peerdaemon.store.lock import LOCK_NAME, DataDirLock


class NoHandler:
    async def handle(self, op, args, session):  # pragma: no cover - never connected
        raise AssertionError("no request expected")


def plant(link: Path, target: Path) -> None:
    target.write_bytes(b"precious\n")
    link.symlink_to(target)


async def test_a_symlink_at_the_socket_lock_path_is_refused(tmp_path):
    sock = tmp_path / "pd.sock"
    target = tmp_path / "victim"
    plant(tmp_path / "pd.sock.lock", target)
    with trio.fail_after(10), pytest.raises(ServerStartError, match="symbolic link"):
        await serve_unix(sock, NoHandler())  # (it used to serve, through the link)
    assert target.read_bytes() == b"precious\n" and not sock.exists()

    # a dangling link: O_CREAT would have created its target
    (tmp_path / "pd.sock.lock").unlink()
    (tmp_path / "pd.sock.lock").symlink_to(tmp_path / "created-elsewhere")
    with trio.fail_after(10), pytest.raises(ServerStartError, match="symbolic link"):
        await serve_unix(sock, NoHandler())  # (it used to serve, through the link)
    assert not (tmp_path / "created-elsewhere").exists()


async def test_a_socket_lock_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pd.sock.lock")
    with trio.fail_after(10), pytest.raises(ServerStartError, match="not a regular file"):
        await serve_unix(tmp_path / "pd.sock", NoHandler())


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a file of another uid")
async def test_a_socket_lock_of_another_user_is_refused(tmp_path):
    """Another user's lock file (mode 0666, say) would let them hold the lock and keep the
    daemon from starting, with a misleading "already running"."""
    lock = tmp_path / "pd.sock.lock"
    lock.write_bytes(b"")
    lock.chmod(0o666)
    os.chown(lock, 65534, 65534)
    with trio.fail_after(10), pytest.raises(ServerStartError, match="owned by uid 65534"):
        await serve_unix(tmp_path / "pd.sock", NoHandler())


async def test_an_ordinary_socket_lock_still_works(tmp_path):
    (tmp_path / "pd.sock.lock").write_bytes(b"")  # left by an earlier run
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, tmp_path / "pd.sock", NoHandler())
        assert (tmp_path / "pd.sock").exists()
        nursery.cancel_scope.cancel()


def test_a_symlink_at_the_data_dir_lock_path_is_refused(tmp_path):
    target = tmp_path / "victim"
    data = tmp_path / "data"
    data.mkdir()
    plant(data / LOCK_NAME, target)
    lock = DataDirLock(data)
    with pytest.raises(StoreError, match="symbolic link"):
        lock.acquire()
    assert not lock.held
    assert target.read_bytes() == b"precious\n"  # not truncated to our pid

    (data / LOCK_NAME).unlink()
    (data / LOCK_NAME).symlink_to(tmp_path / "created-elsewhere")
    with pytest.raises(StoreError, match="symbolic link"):
        DataDirLock(data).acquire()
    assert not (tmp_path / "created-elsewhere").exists()

    (data / LOCK_NAME).unlink()
    lock = DataDirLock(data)
    lock.acquire()  # a plain file: as before
    assert lock.held and (data / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    lock.release()
