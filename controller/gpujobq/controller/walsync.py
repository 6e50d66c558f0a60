"""The WAL's fdatasync, in a helper process, so that the event loop never waits on the disk.

A durable COMMIT on the loop (``synchronous=FULL``) holds the whole controller still for
the fsync: ~0.3 ms on a virtual disk under load, 2-10 ms on a real one, with every request
and agent report waiting behind it. The group transaction (commits.GroupCommit) instead
commits with ``synchronous=NORMAL`` (the WAL is written, not synced) and asks this helper
to fdatasync the WAL; nobody hears of the writes before the helper answers. That is the
same durability as FULL: a WAL frame is on disk before anyone acts on it.

A process, not a thread: a thread coming back from fdatasync must take the GIL from a busy
event loop, and waits up to the switch interval (5 ms) for it; the helper's answer is a
byte on a pipe the loop reads with its other sockets. The helper does nothing but
fdatasync: `python -m gpujobq.controller.walsync DATABASE` reads one byte per request on
stdin and answers ``.`` once the WAL is on disk, or ``!`` (and exits) if it is not.

If the helper dies, syncs happen on the loop again (logged once). A failed fdatasync is not
retried: what the kernel did with the pages is unknown (a later fsync may "succeed" having
dropped them), so the controller stops and recovers from the disk when restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the helper process imports nothing it does not use
    import sqlite_utils

log = logging.getLogger(__name__)

OK, FAILED = b".", b"!"


def wal_of(database: pathlib.Path) -> pathlib.Path:
    return database.with_name(database.name + "-wal")


def sync_once(database: pathlib.Path, fd: int | None) -> int:
    """fdatasync the WAL (the database file itself while there is no WAL); the WAL's open
    fd, or -1. The fd is opened again when the WAL file was replaced (SQLite deletes it
    when the last connection closes, and a new one starts over)."""
    wal = wal_of(database)
    try:
        inode = os.stat(wal).st_ino
        if fd is None or os.fstat(fd).st_ino != inode:
            _close(fd)
            fd = None
            fd = os.open(wal, os.O_RDONLY)
    except FileNotFoundError:
        _close(fd)
        once = os.open(database, os.O_RDONLY)
        try:
            os.fdatasync(once)
        finally:
            os.close(once)
        return -1
    os.fdatasync(fd)
    return fd


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def main() -> None:
    # Ctrl-C in a terminal and systemd's SIGTERM reach the whole group: the controller
    # may still need a sync while it stops. The helper ends when the controller closes
    # its end of the pipe (or exits, however it exits).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    database = pathlib.Path(sys.argv[1])
    fd: int | None = None
    while os.read(0, 1):  # empty: the controller is gone
        try:
            got = sync_once(database, fd)
            fd = got if got >= 0 else None
        except OSError as exc:
            print(f"gpujobq walsync: fdatasync of {wal_of(database)} failed: {exc}",
                  file=sys.stderr, flush=True)
            os.write(1, FAILED)
            return
        os.write(1, OK)


class WalSync:
    """The controller's end: ``sync(done)`` asks for one fdatasync of everything written to
    the WAL so far; ``done(None)`` runs on the loop once it is on disk, ``done(exc)`` if it
    failed. One request at a time (GroupCommit chains them)."""

    def __init__(self, database: pathlib.Path,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        # SQLite keeps the WAL beside the file a symlink points to (the file named by
        # PRAGMA database_list: see of()).
        self.database = database.resolve()
        self.on_failure = on_failure or _stop
        self.proc: subprocess.Popen[bytes] | None = None
        self._done: Callable[[BaseException | None], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None  # the loop's own, once the helper is gone

    @classmethod
    def of(cls, db: sqlite_utils.Database) -> WalSync:
        """For the database file a connection has open, as SQLite names it."""
        (path,) = [row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"]
        return cls(pathlib.Path(path))

    @property
    def alive(self) -> bool:
        return self.proc is not None

    def start(self) -> None:
        """Start the helper and listen for its answers (inside the running loop)."""
        self._loop = asyncio.get_running_loop()
        if not wal_of(self.database).exists():  # not in WAL mode, or not where we look
            log.warning("no WAL beside %s: syncing on the event loop", self.database)
            return
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpujobq.controller.walsync", str(self.database)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            log.warning("no WAL sync helper (%s): syncing on the event loop", exc)
            return
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._loop.add_reader(self.proc.stdout.fileno(), self._answered)

    def sync(self, done: Callable[[BaseException | None], None]) -> None:
        assert self._done is None, "one sync at a time"
        if self.proc is not None:
            assert self.proc.stdin is not None
            try:
                os.write(self.proc.stdin.fileno(), b"s")
                self._done = done
                return
            except OSError:  # the helper is gone
                self._gone("it stopped reading")
        self._tell(done, self._sync_here())

    def _sync_here(self) -> BaseException | None:
        try:
            got = sync_once(self.database, self._fd)
        except OSError as exc:
            return exc
        self._fd = got if got >= 0 else None
        return None

    def _tell(self, done: Callable[[BaseException | None], None] | None,
              failed: BaseException | None) -> None:
        if done is not None:
            done(failed)
        if failed is not None:
            self.on_failure(failed)

    def _answered(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            answer = os.read(self.proc.stdout.fileno(), 16)
        except BlockingIOError:
            return
        except OSError:
            answer = b""
        done, self._done = self._done, None
        if answer == OK:
            self._tell(done, None)
            return
        failed = answer == FAILED
        self._gone("its fdatasync failed" if failed else "it exited")
        self._tell(done, OSError(f"fdatasync of {wal_of(self.database)} failed") if failed
                   else self._sync_here())

    def _gone(self, why: str) -> None:
        if self.proc is None:
            return
        log.error("the WAL sync helper is gone (%s): syncing on the event loop", why)
        self._close_proc()

    def _close_proc(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        assert self._loop is not None and proc.stdout is not None and proc.stdin is not None
        self._loop.remove_reader(proc.stdout.fileno())
        proc.stdin.close()  # the helper reads EOF and exits
        proc.stdout.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the helper; a sync still asked for is done here first."""
        done, self._done = self._done, None
        self._close_proc()
        if done is not None:
            self._tell(done, self._sync_here())
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


EXIT_SYNC_FAILED = 74  # EX_IOERR: systemd restarts the controller (Restart=on-failure)


def _stop(exc: BaseException) -> None:
    """At once, without a graceful shutdown (it would write and sync more): nothing not
    on disk has been told to anyone, and the restart recovers from what is."""
    log.critical("the database's WAL could not be synced (%s): stopping", exc)
    logging.shutdown()  # the log's lines out first
    os._exit(EXIT_SYNC_FAILED)


if __name__ == "__main__":
    main()
