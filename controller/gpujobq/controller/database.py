"""The SQLite file: WAL, durable commits, schema, and explicit write transactions."""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
from collections.abc import Iterator

import sqlite_utils

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0     -- may see the fleet (/api/admin/...)
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
CREATE INDEX IF NOT EXISTS jobs_user_created ON jobs(user_id, created_at);
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
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)  # we BEGIN ourselves
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
    db.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    _migrate(db)
    return db


# Columns added after the first release: (table, column, type and default). A database
# made by an older version gains them on open; nothing is ever dropped or rewritten.
ADDED_COLUMNS = (
    ("users", "admin", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "gpu_count", "INTEGER NOT NULL DEFAULT 1"),
)


def _migrate(db: sqlite_utils.Database) -> None:
    for table, column, kind in ADDED_COLUMNS:
        if column not in db[table].columns_dict:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


@contextlib.contextmanager
def write(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One write transaction, taken with BEGIN IMMEDIATE so count-then-insert cannot race."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
