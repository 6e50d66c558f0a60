"""GroupCommit: the event loop's writes of one turn in one transaction and one COMMIT."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3

import pytest
from gpujobq.controller import commits, database


async def test_group_commit_shares_one_commit_and_isolates_failures(tmp_path: pathlib.Path
                                                                    ) -> None:
    db = database.open_database(tmp_path / "g.db")
    db.execute("CREATE TABLE t (v INTEGER UNIQUE)")
    group = commits.GroupCommit(db)
    seen: list[int] = []
    db.conn.set_trace_callback(lambda sql: seen.append(1) if sql == "COMMIT" else None)

    def insert(v: int) -> int:
        db.execute("INSERT INTO t (v) VALUES (?)", [v])
        return v

    def clash() -> int:
        db.execute("INSERT INTO t (v) VALUES (?)", [3])
        db.execute("INSERT INTO t (v) VALUES (?)", [1])  # taken: only this fn is undone
        return -1

    got = await asyncio.gather(*(group.run(lambda v=v: insert(v)) for v in (1, 2)),
                               group.run(clash), return_exceptions=True)
    assert got[:2] == [1, 2]
    assert isinstance(got[2], sqlite3.IntegrityError)
    assert sorted(r[0] for r in db.execute("SELECT v FROM t")) == [1, 2]  # no 3
    assert len(seen) == 1  # one COMMIT for the three
    assert not db.conn.in_transaction


async def test_group_commit_failure_fails_every_write(tmp_path: pathlib.Path) -> None:
    db = database.open_database(tmp_path / "g.db")
    db.execute("CREATE TABLE t (v INTEGER)")
    group = commits.GroupCommit(db)
    other = sqlite3.connect(tmp_path / "g.db", timeout=0)
    other.execute("BEGIN IMMEDIATE")  # the write lock is taken: BEGIN IMMEDIATE fails
    db.conn.execute("PRAGMA busy_timeout = 0")
    try:
        got = await asyncio.gather(*(group.run(lambda: db.execute(
            "INSERT INTO t (v) VALUES (1)")) for _ in range(3)), return_exceptions=True)
    finally:
        other.rollback()
        other.close()
    assert all(isinstance(g, sqlite3.OperationalError) for g in got), got
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    assert not db.conn.in_transaction


async def test_flush_with_takes_the_queued_writes_into_one_commit(tmp_path: pathlib.Path
                                                                   ) -> None:
    """A writer that cannot wait (an agent's reports) takes the submits queued in this
    turn into its transaction; what must follow the COMMIT runs after it, in order."""
    db = database.open_database(tmp_path / "g.db")
    db.execute("CREATE TABLE t (v INTEGER UNIQUE)")
    group = commits.GroupCommit(db)
    events: list[str] = []
    db.conn.set_trace_callback(lambda sql: events.append(sql) if sql == "COMMIT" else None)
    failed: list[BaseException] = []

    def insert(v: int) -> int:
        db.execute("INSERT INTO t (v) VALUES (?)", [v])
        return v

    def reports() -> str:
        with database.write(db):  # a savepoint of the group's transaction
            db.execute("INSERT INTO t (v) VALUES (10)")
        group.after(lambda: events.append("told the agent"))
        assert not events  # nothing is told before the COMMIT
        return "stored"

    queued = asyncio.ensure_future(group.run(lambda: insert(1)))
    await asyncio.sleep(0)  # its flush is scheduled for the end of the turn
    group.call(lambda: insert(1), on_failure=failed.append)  # a clash: undone alone
    assert group.flush_with(reports) == "stored"
    assert events == ["COMMIT", "told the agent"]
    assert await queued == 1
    assert isinstance(failed[0], sqlite3.IntegrityError)
    assert sorted(r[0] for r in db.execute("SELECT v FROM t")) == [1, 10]

    # Nothing queued: the writer runs on its own and takes no transaction it does not need.
    events.clear()
    assert group.flush_with(lambda: "read only") == "read only"
    assert events == [] and not db.conn.in_transaction

    # A writer that raises: its own writes are undone, the queued ones are kept.
    def broken() -> None:
        db.execute("INSERT INTO t (v) VALUES (20)")
        raise RuntimeError("no")

    group.call(lambda: insert(2))
    with pytest.raises(RuntimeError):
        group.flush_with(broken)
    assert sorted(r[0] for r in db.execute("SELECT v FROM t")) == [1, 2, 10]
