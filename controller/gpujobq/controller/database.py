"""The SQLite file: WAL, durable commits, a versioned schema, write transactions, backups.

The schema's version is SQLite's ``PRAGMA user_version``. A new file gets ``SCHEMA`` at
``VERSION``; an older file is migrated forward on open, one numbered step per
transaction; a newer file (made by a newer gpujobq) is refused.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import TypeVar

import sqlite_utils
from gpujobq.controller import errors

T = TypeVar("T")
CACHE_KIB = 64 << 10  # page cache per connection

# The current schema, for a new file. A change to it is also a step in MIGRATIONS.
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,    -- may see the fleet (/api/admin/...)
    disabled_at REAL                     -- set: none of its tokens is accepted
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,                 -- public id, for listing and revoking
    user_id TEXT NOT NULL REFERENCES users(id),
    hash TEXT NOT NULL UNIQUE,           -- sha256 of the token; the token is never stored
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY,              -- the guide's node_id, stable across restarts
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    competition_id TEXT NOT NULL,
    project_id TEXT NOT NULL,
    expected_time REAL NOT NULL,
    time_limit REAL NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    detail TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    node TEXT,
    gpus TEXT,                           -- JSON list of GPU indexes on the node
    gpu_count INTEGER NOT NULL DEFAULT 1, -- GPUs the job needs on one host
    recorded INTEGER NOT NULL DEFAULT 0, -- its result record (results/*.jsonl) is written
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    exit_code INTEGER,
    stdout BLOB,
    stderr BLOB,
    code BLOB NOT NULL,
    config BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs(user_id, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_unrecorded ON jobs(seq) WHERE recorded = 0
    AND status IN ('completed', 'failed', 'cancelled');
CREATE INDEX IF NOT EXISTS jobs_user_created ON jobs(user_id, created_at);
CREATE INDEX IF NOT EXISTS jobs_user_active ON jobs(user_id)
    WHERE status IN ('pending', 'running');
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency
    ON jobs(user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    from_status TEXT,
    to_status TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id, id);
CREATE TABLE IF NOT EXISTS job_files (     -- regular files a job left in /output
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
);
"""


def open_database(path: pathlib.Path) -> sqlite_utils.Database:
    """Open (or create) the database and bring its schema to VERSION.

    Raises errors.SchemaError for a file made by a newer gpujobq.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)  # we BEGIN ourselves
    db = sqlite_utils.Database(conn)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
        db.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache instead of SQLite's 2 MiB: the jobs table's indexes stay in
        # memory; a status change then costs ~20% less (measured on 4,000 jobs).
        db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        migrate(db)
    except BaseException:
        conn.close()
        raise
    return db


def version(db: sqlite_utils.Database) -> int:
    """The file's schema version; 1 for a first-release file (user_version 0, tables)."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found == 0 and db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
    ).fetchone():
        return 1
    return found


def migrate(db: sqlite_utils.Database) -> None:
    """Create the schema in a new file, or step an older one forward to VERSION."""
    if version(db) == VERSION:
        return  # the usual case: no write lock taken
    while True:
        with write(db):
            # Read again under the write lock: another process may have migrated already.
            current = version(db)
            if current > VERSION:
                raise errors.SchemaError(
                    f"database schema version {current} is newer than this gpujobq "
                    f"({VERSION}): upgrade gpujobq")
            if current == VERSION:
                return
            if current == 0:
                for statement in _statements(SCHEMA):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {VERSION}")
                return
            MIGRATIONS[current - 1](db)  # version n -> n + 1, committed on its own
            db.execute(f"PRAGMA user_version = {current + 1}")


def _statements(script: str) -> Iterator[str]:
    """The statements of a script, one at a time (executescript would COMMIT first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:60]!r}")


# ---- migrations: MIGRATIONS[n - 1] takes version n to n + 1, inside a write transaction.
# Steps only add (tables, columns, indexes) and must be idempotent: files made between
# releases, before the version was kept, may already have some of what a step adds.


def _to_v2(db: sqlite_utils.Database) -> None:
    """Output files, admins, multi-GPU jobs."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS job_files ("
        " job_id TEXT NOT NULL, attempt INTEGER NOT NULL, name TEXT NOT NULL,"
        " data BLOB NOT NULL, PRIMARY KEY (job_id, name))"
    )
    _add_column(db, "users", "admin", "INTEGER NOT NULL DEFAULT 0")
    _add_column(db, "jobs", "gpu_count", "INTEGER NOT NULL DEFAULT 1")


def _add_column(db: sqlite_utils.Database, table: str, column: str, kind: str) -> None:
    if column not in db[table].columns_dict:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _to_v3(db: sqlite_utils.Database) -> None:
    """Result records written are noted, so one lost to a crash is written on restart."""
    if "recorded" not in db["jobs"].columns_dict:
        _add_column(db, "jobs", "recorded", "INTEGER NOT NULL DEFAULT 0")
        # Older versions wrote the record as the job ended: count those as written.
        db.execute("UPDATE jobs SET recorded = 1"
                   " WHERE status IN ('completed', 'failed', 'cancelled')")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_unrecorded ON jobs(seq) WHERE recorded = 0"
               " AND status IN ('completed', 'failed', 'cancelled')")


def _to_v4(db: sqlite_utils.Database) -> None:
    """Users can be disabled (their tokens refused) without deleting anything."""
    _add_column(db, "users", "disabled_at", "REAL")


def _to_v5(db: sqlite_utils.Database) -> None:
    """A user's pending and running jobs by an index of their own: the limits a submit
    checks cost the same for a user with one past job and for one with ten thousand."""
    db.execute("CREATE INDEX IF NOT EXISTS jobs_user_active ON jobs(user_id)"
               " WHERE status IN ('pending', 'running')")


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (
    _to_v2, _to_v3, _to_v4, _to_v5)
VERSION = 1 + len(MIGRATIONS)  # the schema this code reads and writes


@contextlib.contextmanager
def write(db: sqlite_utils.Database, *, nested: bool = True) -> Iterator[sqlite_utils.Database]:
    """One write transaction, taken with BEGIN IMMEDIATE so count-then-insert cannot race.

    Rolled back on any error, a failed COMMIT included (a full disk fails there), so the
    connection is never left inside a transaction. Inside batch() (or a GroupCommit) it
    is a savepoint of that transaction; ``nested=False``: not even that, for a writer
    whose failure leaves nothing to undo but what its caller's savepoint undoes (every
    writer in a batch runs under one: GroupCommit's, or the dispatcher's per agent).
    """
    batched = getattr(db, "_batched", False)
    if batched and not nested:
        yield db
    elif batched:  # inside batch(): a savepoint of its transaction
        db.execute("SAVEPOINT write")
        try:
            yield db
        except BaseException:
            if db.conn.in_transaction:
                db.execute("ROLLBACK TO write")
                db.execute("RELEASE write")
            raise
        db.execute("RELEASE write")
    else:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                db.execute("ROLLBACK")
            raise


@contextlib.contextmanager
def batch(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """Every write() inside shares one transaction and one COMMIT (one fsync); each is a
    savepoint, so a failing one undoes only itself. No await may happen inside: the
    transaction must not stay open while other requests run. Nested: joins the outer."""
    if getattr(db, "_batched", False):
        yield db
        return
    with write(db):
        db._batched = True  # type: ignore[attr-defined]
        try:
            yield db
        finally:
            db._batched = False  # type: ignore[attr-defined]


# ---- failures of the storage ------------------------------------------------------------

_STORAGE_CODES = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}
)
_STORAGE_MESSAGES = (
    "database or disk is full",
    "attempt to write a readonly database",
    "disk I/O error",
    "unable to open database file",
)


def storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite saying its file cannot be written: disk full, read-only,
    I/O error, or not openable (extended codes count as their primary code)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _STORAGE_CODES:
        return True
    return str(exc).startswith(_STORAGE_MESSAGES)


# ---- online backup ------------------------------------------------------------------------


def backup(source: pathlib.Path, dest: pathlib.Path, *, force: bool = False) -> int:
    """A consistent copy of the live database at ``dest``; its size in bytes.

    SQLite's backup API copies every page in one read transaction, so in WAL mode the
    controller keeps writing meanwhile and the copy is one committed state. The copy is
    written to ``DEST.tmp``, checked (``PRAGMA integrity_check``), synced, then renamed
    over ``dest``; an existing ``dest`` is refused unless ``force``. Raises
    errors.ControllerError with the reason.
    """
    if not source.is_file():
        raise errors.NotFound(f"no database at {source}")
    if (dest.exists() or dest.is_symlink()) and not force:
        raise errors.Conflict(f"{dest} exists: pass --force to replace it")
    if dest.is_dir():
        raise errors.Conflict(f"{dest} is a folder: name the backup file")
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by an interrupted backup
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        _copy(source, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except (OSError, sqlite3.Error) as exc:
        raise errors.ControllerError(f"backup to {dest} failed: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()  # gone after the rename; a failed copy is not left behind
    return dest.stat().st_size


def _copy(source: pathlib.Path, tmp: pathlib.Path) -> None:
    # mode=rw: never create an empty database where the live one was expected.
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True, timeout=10.0)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # pages=-1: all pages in one step, one consistent snapshot
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            check = [row[0] for row in dst.execute("PRAGMA integrity_check")]
        finally:
            dst.close()
    finally:
        src.close()
    if check != ["ok"]:
        raise errors.ControllerError(
            f"the copy failed PRAGMA integrity_check: {'; '.join(map(str, check[:5]))}")


def _fsync_dir(folder: pathlib.Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
