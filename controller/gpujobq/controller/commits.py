"""The event loop's writes to the database: grouped into one durable COMMIT per turn
(GroupCommit), and the WAL copied back into the file off the loop (Checkpointer)."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import sqlite_utils
from gpujobq.controller import walsync
from gpujobq.controller.database import write

T = TypeVar("T")
log = logging.getLogger(__name__)


class GroupCommit:
    """The event loop's writes, grouped: one write transaction and one durable COMMIT
    (one fsync, one append of each page to the WAL) for everything written in a turn.

    ``await run(fn)`` queues ``fn`` and waits for its result; ``call(fn)`` queues it
    without waiting. At the end of the loop's current pass, or sooner when
    ``flush_with`` runs work that cannot wait (the dispatcher's), every queued ``fn`` runs
    inside one write transaction, each under its own savepoint (one that raises undoes
    only its own writes), then one COMMIT. Nobody hears back before that COMMIT is on
    disk: acknowledged still means on disk. What a writer must do only once its writes
    are durable (tell an agent, answer a waiter) it registers with ``after``. A failed
    COMMIT fails them all, and nothing registered with ``after`` runs.

    With a running ``syncer`` (walsync) the COMMIT skips its fsync and the helper process
    syncs the WAL while the loop goes on; the group's writers hear back when it is done.
    Meanwhile the next group gathers, and is written once that sync is done.
    """

    def __init__(self, db: sqlite_utils.Database, syncer: walsync.WalSync | None = None) -> None:
        self.db = db
        # With a running syncer, a group COMMITs without the fsync and its writers hear
        # back once the syncer has the WAL on disk; meanwhile the next group gathers.
        self.syncer = syncer
        self._queued: list[_Queued] = []
        self._after: list[Callable[[], None]] | None = None  # while flushing
        # Groups committed and waiting for their sync: what to do once it is done. The
        # groups of the sync in flight, then those committed since (synced next).
        self._in_flight: list[Callable[[BaseException | None], None]] = []
        self._unsynced: list[Callable[[BaseException | None], None]] = []
        self._syncing = False

    async def run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._queue(_Queued(fn, done, None))
        return await done

    def call(self, fn: Callable[[], object],
             on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Run ``fn`` in the next group transaction; ``on_failure`` hears if its writes
        are not stored (it raised, or the COMMIT failed)."""
        self._queue(_Queued(fn, None, on_failure))

    def after(self, action: Callable[[], None]) -> None:
        """Once the COMMIT of the transaction being written is on disk. Outside one: at
        once, or, while groups wait for their sync, once they have been told (what it
        does may follow from their writes: a Cancel must not overtake the RunJob)."""
        if self._after is not None:
            self._after.append(action)
        elif self._unsynced:
            self._unsynced.append(lambda exc: _run(action) if exc is None else None)
        elif self._syncing:
            self._in_flight.append(lambda exc: _run(action) if exc is None else None)
        else:
            action()

    def flush_with(self, fn: Callable[[], T]) -> T:
        """Run what is queued and ``fn`` in one transaction, now; ``fn``'s result, or its
        exception (its writes undone), or the COMMIT's."""
        if self._after is not None or not (self._queued or self._syncing):
            # Inside a flush already: join its transaction. Nothing queued or syncing:
            # ``fn`` takes a transaction only if it writes (a dispatcher pass that places
            # nothing costs no BEGIN and COMMIT). While a group syncs, ``fn`` goes through
            # a group too, so that what it tells follows what that group tells.
            return fn()
        now = _Queued(fn, None, None)
        self._queued.append(now)
        outcomes, failed = self._flush()
        if failed is not None:
            raise failed
        for item, value, exc in outcomes:  # at once: what it tells waits for the sync
            if item is now:
                if exc is not None:
                    raise exc
                return value  # type: ignore[no-any-return]
        raise AssertionError("flush_with: its writer did not run")

    def _queue(self, item: _Queued) -> None:
        if not self._queued and not self._syncing:  # else: flushed once the sync is done
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append(item)

    def _flush(self) -> tuple[list[_Outcome], BaseException | None]:
        """Write the queued group and COMMIT it; what each writer returned or raised, and
        the BEGIN's or COMMIT's exception. They hear back after the sync."""
        batch, self._queued = self._queued, []
        outcomes: list[_Outcome] = []
        if not batch:
            return outcomes, None
        self._after = after = []
        unsynced = self.syncer is not None and self.syncer.alive
        try:
            if unsynced:
                self.db.execute("PRAGMA synchronous=NORMAL")
            with write(self.db):
                self.db._batched = True  # type: ignore[attr-defined]  # writes inside: savepoints
                try:
                    for item in batch:
                        self.db.execute("SAVEPOINT one")
                        try:
                            outcomes.append((item, item.fn(), None))
                        except Exception as exc:
                            self.db.execute("ROLLBACK TO one")
                            outcomes.append((item, None, exc))
                        self.db.execute("RELEASE one")
                finally:
                    self.db._batched = False  # type: ignore[attr-defined]
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the batch is stored
            for item in batch:
                item.fail(exc)
            return outcomes, exc
        finally:
            self._after = None
            if unsynced:
                self.db.execute("PRAGMA synchronous=FULL")
        if unsynced or self._syncing or self._unsynced:
            # Told after the groups before it, even if this COMMIT synced by itself (the
            # helper died meanwhile): they hear back in the order they were written.
            self._unsynced.append(lambda exc: self._told(after, outcomes, batch, exc))
            if not self._syncing:
                self._sync()
        else:
            self._told(after, outcomes, batch, None)
        return outcomes, None

    def _sync(self) -> None:
        assert self.syncer is not None
        self._in_flight, self._unsynced = self._unsynced, []
        self._syncing = True
        self.syncer.sync(self._synced)

    def _synced(self, exc: BaseException | None) -> None:
        waiting, self._in_flight = self._in_flight, []
        self._syncing = False
        for tell in waiting:
            tell(exc)
        if exc is not None:  # the syncer stops the controller
            return
        if self._queued:  # gathered while the sync ran: the next group, synced in turn
            self._flush()
        if self._unsynced and not self._syncing:  # committed meanwhile, or a failed flush
            self._sync()

    def _told(self, after: list[Callable[[], None]],
              outcomes: list[_Outcome],
              batch: list[_Queued], failed: BaseException | None) -> None:
        """A group's writers hear back, once its COMMIT (and sync) is done."""
        if failed is not None:  # not on disk: nobody may act on it
            for item in batch:
                item.fail(failed)
            return
        for action in after:
            _run(action)
        for item, value, exc in outcomes:
            if exc is None:
                item.succeed(value)
            else:
                item.fail(exc)


def _run(action: Callable[[], None]) -> None:
    try:  # one failing must not keep the rest back
        action()
    except Exception:
        log.exception("an action after a commit failed")


class _Queued:
    """A writer of a group transaction, and whom to tell how it went."""

    def __init__(self, fn: Callable[[], Any], done: asyncio.Future[Any] | None,
                 on_failure: Callable[[BaseException], None] | None,
                 on_success: Callable[[Any], None] | None = None) -> None:
        self.fn, self.done = fn, done
        self.on_failure, self.on_success = on_failure, on_success

    def succeed(self, value: Any) -> None:
        if self.done is not None and not self.done.done():  # its request may be gone
            self.done.set_result(value)
        if self.on_success is not None:
            self.on_success(value)

    def fail(self, exc: BaseException) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        if self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:
                log.exception("handling a failed write failed")


_Outcome = tuple[_Queued, Any, BaseException | None]  # what a writer returned, or raised


# ---- checkpoints ------------------------------------------------------------------------

CHECKPOINT_EVERY = 1.0  # seconds between background checkpoints
# Past this many WAL pages (~80 MiB) a COMMIT checkpoints by itself after all, as SQLite
# does by default past 1,000: the WAL stays bounded if the background one falls behind.
BACKSTOP_PAGES = 20_000


class Checkpointer:
    """Copies the WAL back into the database file from a thread, on a connection of its
    own, so that a COMMIT on the event loop only appends to the WAL.

    By default SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages:
    the event loop would copy and fsync megabytes every few hundred jobs. PASSIVE
    checkpoints never block the writer or readers; once one has copied everything, the
    next write starts the WAL over from its beginning, so it does not grow.
    """

    def __init__(self, path: pathlib.Path, every: float = CHECKPOINT_EVERY) -> None:
        self.path = path
        self.every = every
        self.runs = 0

    def take_over(self, db: sqlite_utils.Database) -> None:
        """The serving connection leaves checkpoints to this one (but for the backstop)."""
        db.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")

    async def run(self) -> None:
        conn = await asyncio.to_thread(
            sqlite3.connect, self.path, isolation_level=None, timeout=10.0,
            check_same_thread=False)
        pending: asyncio.Future[tuple[int, int, int]] | None = None
        try:
            while True:
                await asyncio.sleep(self.every)
                pending = asyncio.ensure_future(asyncio.to_thread(self.once, conn))
                try:
                    await asyncio.shield(pending)
                except sqlite3.Error as exc:  # a busy or full disk: tried again next time
                    log.warning("background checkpoint failed: %s", exc)
        finally:
            if pending is not None:  # never close the connection under a running checkpoint
                await asyncio.wait([pending])
            conn.close()

    def once(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        """One PASSIVE checkpoint: (busy, WAL pages, pages copied)."""
        self.runs += 1
        busy, pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(busy), int(pages), int(copied)
