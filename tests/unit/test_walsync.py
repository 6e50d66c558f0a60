"""The group transaction's WAL sync in a helper process: nobody hears back before it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import signal
from collections.abc import AsyncIterator, Callable

import pytest
import sqlite_utils
from gpujobq.controller import commits, database, walsync


@contextlib.asynccontextmanager
async def synced_group(tmp_path: pathlib.Path) -> AsyncIterator[
        tuple[sqlite_utils.Database, commits.GroupCommit, walsync.WalSync, list[str]]]:
    """A database, its group transaction with a running helper, and the COMMITs seen."""
    db = database.open_database(tmp_path / "g.db")
    db.execute("CREATE TABLE t (v INTEGER UNIQUE)")
    syncer = walsync.WalSync(tmp_path / "g.db")
    syncer.start()
    group = commits.GroupCommit(db, syncer)
    commits_seen: list[str] = []
    db.conn.set_trace_callback(lambda sql: commits_seen.append(sql) if sql == "COMMIT" else None)
    try:
        yield db, group, syncer, commits_seen
    finally:
        if syncer.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(syncer.proc.pid, signal.SIGCONT)
        syncer.close()
        db.close()


def insert(db: sqlite_utils.Database, v: int) -> int:
    db.execute("INSERT INTO t (v) VALUES (?)", [v])
    return v


@contextlib.contextmanager
def helper_stopped(syncer: walsync.WalSync):  # type: ignore[no-untyped-def]
    """The helper frozen (SIGSTOP): a sync asked for now is not done until it goes on."""
    assert syncer.proc is not None
    os.kill(syncer.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(syncer.proc.pid, signal.SIGCONT)


async def until(done: Callable[[], bool], timeout: float = 10) -> None:
    """Turns of the loop until ``done()`` (the helper answers in its own time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0.01)


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0.005)


async def test_writers_hear_back_only_once_the_wal_is_synced(tmp_path: pathlib.Path) -> None:
    async with synced_group(tmp_path) as (db, group, syncer, seen):
        with helper_stopped(syncer):
            told: list[str] = []
            pending = asyncio.ensure_future(group.run(lambda: insert(db, 1)))
            group.call(lambda: group.after(lambda: told.append("agent told")))
            await turns()
            assert seen == ["COMMIT"]  # written without an fsync
            assert not pending.done() and told == []  # but nobody hears of it yet
            # The connection is durable again for writes outside the group.
            assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert await asyncio.wait_for(pending, 10) == 1
        assert told == ["agent told"]


async def test_the_next_group_gathers_while_one_syncs(tmp_path: pathlib.Path) -> None:
    async with synced_group(tmp_path) as (db, group, syncer, seen):
        with helper_stopped(syncer):
            first = asyncio.ensure_future(group.run(lambda: insert(db, 1)))
            await turns(2)
            rest = [asyncio.ensure_future(group.run(lambda v=v: insert(db, v)))
                    for v in (2, 3, 4)]
            await turns()
            assert seen == ["COMMIT"]  # 2-4 wait for the sync, not for a COMMIT each
        assert await asyncio.wait_for(asyncio.gather(first, *rest), 10) == [1, 2, 3, 4]
        assert seen == ["COMMIT", "COMMIT"]


async def test_flush_with_answers_at_once_and_tells_after_the_earlier_group(
        tmp_path: pathlib.Path) -> None:
    async with synced_group(tmp_path) as (db, group, syncer, _):
        order: list[str] = []
        with helper_stopped(syncer):
            group.call(lambda: group.after(lambda: order.append("earlier group")))
            await turns(2)

            def dispatch() -> str:
                insert(db, 7)
                group.after(lambda: order.append("RunJob sent"))
                return "placed"

            assert group.flush_with(dispatch) == "placed"  # its result now, for the pass
            assert order == []
        await until(lambda: len(order) == 2)
        assert order == ["earlier group", "RunJob sent"]


async def test_a_dead_helper_leaves_the_sync_to_the_loop(tmp_path: pathlib.Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    async with synced_group(tmp_path) as (db, group, syncer, _):
        assert syncer.proc is not None
        with helper_stopped(syncer):
            pending = asyncio.ensure_future(group.run(lambda: insert(db, 1)))
            await turns(2)
            os.kill(syncer.proc.pid, signal.SIGKILL)  # with a sync asked for
        with caplog.at_level(logging.ERROR):
            assert await asyncio.wait_for(pending, 10) == 1
        assert not syncer.alive and "syncing on the event loop" in caplog.text
        # From now on the group COMMITs with synchronous=FULL and answers at once.
        assert await asyncio.wait_for(group.run(lambda: insert(db, 2)), 10) == 2


async def test_a_failed_sync_fails_its_writers_and_stops_the_controller(
        tmp_path: pathlib.Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    stopped: list[BaseException] = []
    syncer = walsync.WalSync(gone / "g.db", on_failure=stopped.append)
    syncer.start()
    heard: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    try:
        gone.rmdir()  # neither the WAL nor the database can be opened: the sync fails
        syncer.sync(heard.set_result)
        failed = await asyncio.wait_for(heard, 10)
    finally:
        syncer.close()
    assert isinstance(failed, OSError) and stopped == [failed]
    assert not syncer.alive


def test_sync_once_follows_a_replaced_wal(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "g.db"
    db.write_bytes(b"db")
    wal = walsync.wal_of(db)
    wal.write_bytes(b"one")
    fd = walsync.sync_once(db, None)
    assert os.fstat(fd).st_ino == wal.stat().st_ino
    wal.unlink()
    wal.write_bytes(b"two")  # SQLite started a new WAL: the new file is the one synced
    again = walsync.sync_once(db, fd)
    assert os.fstat(again).st_ino == wal.stat().st_ino
    wal.unlink()
    assert walsync.sync_once(db, again) == -1  # no WAL: the database file is synced
    with pytest.raises(OSError):
        os.fstat(again)  # closed, not leaked


async def test_the_helper_outlives_the_signals_that_stop_the_controller(
        tmp_path: pathlib.Path) -> None:
    """Ctrl-C and systemd's SIGTERM reach the helper too; it goes on until the controller
    closes the pipe (the controller may need a sync while it stops)."""
    async with synced_group(tmp_path) as (db, group, syncer, _):
        assert syncer.proc is not None
        assert await asyncio.wait_for(group.run(lambda: insert(db, 1)), 10) == 1  # it is up
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(syncer.proc.pid, sig)
        assert await asyncio.wait_for(group.run(lambda: insert(db, 2)), 10) == 2
        assert syncer.alive and syncer.proc.poll() is None
        proc = syncer.proc
        syncer.close()
        assert proc.wait(10) == 0


async def test_without_a_helper_the_group_syncs_on_the_loop(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    db = database.open_database(tmp_path / "g.db")
    db.execute("CREATE TABLE t (v INTEGER UNIQUE)")
    monkeypatch.setattr(walsync.sys, "executable", str(tmp_path / "no-python"))
    syncer = walsync.WalSync(tmp_path / "g.db")
    with caplog.at_level(logging.WARNING):
        syncer.start()
    assert not syncer.alive and "no WAL sync helper" in caplog.text
    group = commits.GroupCommit(db, syncer)
    modes: list[str] = []
    db.conn.set_trace_callback(lambda sql: modes.append(sql) if "synchronous" in sql else None)
    assert await asyncio.wait_for(group.run(lambda: insert(db, 1)), 10) == 1
    assert modes == []  # FULL throughout: the COMMIT itself syncs
    syncer.close()
    db.close()


async def test_what_is_told_outside_a_group_waits_for_the_groups_before_it(
        tmp_path: pathlib.Path) -> None:
    """A Cancel read from a dispatched (not yet synced) job must not overtake its RunJob."""
    async with synced_group(tmp_path) as (_db, group, syncer, _):
        order: list[str] = []
        with helper_stopped(syncer):
            group.call(lambda: group.after(lambda: order.append("RunJob")))
            await turns(2)  # committed, syncing
            group.after(lambda: order.append("Cancel"))
            await turns()
            assert order == []
        await until(lambda: len(order) == 2)
        assert order == ["RunJob", "Cancel"]
        group.after(lambda: order.append("at once"))  # nothing waits for a sync now
        assert order[-1] == "at once"


async def test_groups_written_while_the_helper_dies_are_all_told_in_order(
        tmp_path: pathlib.Path) -> None:
    async with synced_group(tmp_path) as (db, group, syncer, _):
        assert syncer.proc is not None
        order: list[str] = []
        with helper_stopped(syncer):
            first = asyncio.ensure_future(group.run(lambda: insert(db, 1)))
            group.call(lambda: group.after(lambda: order.append("first group")))
            await turns(2)  # the first group syncs

            def dispatch() -> None:
                insert(db, 2)
                group.after(lambda: order.append("dispatch"))

            group.flush_with(dispatch)  # a second group, committed behind the sync
            last = asyncio.ensure_future(group.run(lambda: insert(db, 3)))
            group.call(lambda: group.after(lambda: order.append("last group")))
            await turns(2)
            os.kill(syncer.proc.pid, signal.SIGKILL)
        assert await asyncio.wait_for(asyncio.gather(first, last), 10) == [1, 3]
        assert order == ["first group", "dispatch", "last group"]
        assert not syncer.alive
