"""The database file: schema versions and forward migrations, write transactions, storage
failures, online backups; and the retention of result records (results.prune)."""

from __future__ import annotations

import os
import pathlib
import sqlite3

import pytest
from gpujobq.controller import __main__ as controller_main
from gpujobq.controller import database, errors, ratelimit, results, store
from gpujobq.protocol import sshkeys

# The schema of the first release (commit 6ff51ae), verbatim: no job_files table, no
# users.admin, no jobs.gpu_count, and no user_version (0).
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL
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
"""


def v1_file(path: pathlib.Path) -> None:
    """A first-release database with a user, a token, a node, a finished job and events."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_SCHEMA)
    conn.execute("INSERT INTO users VALUES ('alice', 1.0)")
    conn.execute("INSERT INTO tokens VALUES ('t1', 'alice', 'h1', 1.0, 99.0, NULL)")
    conn.execute("INSERT INTO nodes VALUES (0, 'node-a')")
    conn.execute(
        "INSERT INTO jobs (id, user_id, competition_id, project_id, expected_time,"
        " time_limit, status, reason, attempt, node, gpus, created_at, started_at,"
        " completed_at, exit_code, stdout, stderr, code, config)"
        " VALUES ('j1', 'alice', 'comp', 'proj', 60, 120, 'completed', 'exit_code', 1,"
        " 'node-a', '[0]', 10, 11, 12, 0, X'6f6b0a', X'', X'7072696e742829', X'613a2031')")
    conn.execute("INSERT INTO jobs (id, user_id, competition_id, project_id, expected_time,"
                 " time_limit, status, created_at, code, config)"
                 " VALUES ('j2', 'alice', 'comp', 'proj', 60, 120, 'pending', 13, X'00', X'00')")
    conn.executemany(
        "INSERT INTO job_events (job_id, attempt, to_status, at) VALUES (?, ?, ?, ?)",
        [("j1", 0, "pending", 10), ("j1", 1, "running", 11), ("j1", 1, "completed", 12),
         ("j2", 0, "pending", 13)])
    conn.commit()
    conn.close()


def user_version(path: pathlib.Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def shape(db: database.sqlite_utils.Database) -> dict[str, object]:
    """Tables with their columns (name, type, not null, default, pk), and indexes."""
    tables = [r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    out: dict[str, object] = {
        t: sorted(tuple(c[1:]) for c in db.execute(f"PRAGMA table_info({t})")) for t in tables}
    out["indexes"] = sorted(r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
    return out


# ---- versions and migrations ------------------------------------------------------------


def test_a_new_file_gets_the_current_schema_and_version(tmp_path: pathlib.Path) -> None:
    db = database.open_database(tmp_path / "new.db")
    assert database.VERSION == 5
    assert database.version(db) == database.VERSION
    assert db.execute("PRAGMA user_version").fetchone()[0] == database.VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_first_release_file_is_migrated_and_keeps_its_rows(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "v1.db"
    v1_file(path)
    assert user_version(path) == 0
    db = database.open_database(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == database.VERSION
    assert [tuple(r) for r in db.execute("SELECT id, admin FROM users")] == [("alice", 0)]
    assert db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM job_events").fetchone()[0] == 4
    assert db.execute("SELECT COUNT(*) FROM job_files").fetchone()[0] == 0
    jobs = store.Store(db, lambda: 100.0)
    old = jobs.get("j1")
    assert old is not None
    assert (old.status.value, old.stdout, old.gpus, old.gpu_count) == ("completed", b"ok\n",
                                                                       (0,), 1)
    assert db.execute("SELECT code, config FROM jobs WHERE id = 'j1'").fetchone() == (
        b"print()", b"a: 1")
    # The migrated file is fully usable: the pending job runs, a new job is stored.
    running = jobs.dispatch("j2", "node-a", [1]).job
    assert (running.status.value, running.attempt) == ("running", 1)
    jobs.submit(store.NewJob(id="j3", user_id="bob", competition_id="c", project_id="p",
                             expected_time=1, time_limit=2, code=b"x", config=b"y",
                             gpu_count=2), ratelimit.Limits(submits=9, window=60, active=9))
    assert jobs.get("j3").gpu_count == 2  # type: ignore[union-attr]
    db.close()
    # Opening again is a no-op.
    again = database.open_database(path)
    assert again.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3
    again.close()


def test_a_migrated_file_has_the_same_schema_as_a_new_one(tmp_path: pathlib.Path) -> None:
    v1_file(tmp_path / "v1.db")
    migrated = database.open_database(tmp_path / "v1.db")
    new = database.open_database(tmp_path / "new.db")
    assert shape(migrated) == shape(new)
    migrated.close()
    new.close()


def test_a_file_made_before_versions_with_the_new_columns_opens(tmp_path: pathlib.Path) -> None:
    """Files made between the first release and versioning already have some of step 2."""
    path = tmp_path / "between.db"
    conn = sqlite3.connect(path)
    conn.executescript(database.SCHEMA)
    conn.execute("INSERT INTO users (id, created_at, admin) VALUES ('root', 1.0, 1)")
    conn.commit()
    conn.close()
    assert user_version(path) == 0
    db = database.open_database(path)
    assert database.version(db) == database.VERSION
    assert db.execute("SELECT admin FROM users").fetchone()[0] == 1
    db.close()


def test_a_newer_schema_is_refused_and_left_alone(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "future.db"
    database.open_database(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {database.VERSION + 1}")
    conn.close()
    expected = (f"database schema version {database.VERSION + 1} is newer than this gpujobq "
                f"({database.VERSION}): upgrade gpujobq")
    with pytest.raises(errors.SchemaError) as caught:
        database.open_database(path)
    assert caught.value.detail == expected
    assert user_version(path) == database.VERSION + 1


def test_each_step_commits_on_its_own_and_a_failing_step_rolls_back(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(db: database.sqlite_utils.Database) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("step 6 failed")

    path = tmp_path / "v1.db"
    v1_file(path)
    monkeypatch.setattr(database, "MIGRATIONS", (*database.MIGRATIONS, broken))
    monkeypatch.setattr(database, "VERSION", 6)
    with pytest.raises(RuntimeError, match="step 6 failed"):
        database.open_database(path)
    assert user_version(path) == 5  # steps 2 to 5 are kept, step 6 left nothing behind
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "half_done" not in tables and "job_files" in tables
    monkeypatch.undo()
    database.open_database(path).close()  # the released code opens it as usual


def test_serve_refuses_a_newer_schema_with_exit_2(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "future.db"
    database.open_database(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    (tmp_path / "inventory.yaml").write_text("hosts: []\n")
    sshkeys.ensure_private_key(tmp_path / "id_ed25519", comment="test")
    code = controller_main.main(
        ["serve", "--database", str(path), "--inventory", str(tmp_path / "inventory.yaml"),
         "--client-key", str(tmp_path / "id_ed25519"), "--port", "1"])
    assert code == 2
    assert (f"database schema version 99 is newer than this gpujobq ({database.VERSION}): "
            "upgrade gpujobq") in capsys.readouterr().err
    # Admin commands say the same and exit 1.
    assert controller_main.main(["token", "list", "--database", str(path)]) == 1
    assert "upgrade gpujobq" in capsys.readouterr().err


# ---- write transactions and storage failures ----------------------------------------------


def test_a_failed_commit_leaves_no_transaction_open(tmp_path: pathlib.Path) -> None:
    db = database.open_database(tmp_path / "db")
    # A deferred foreign key fails at COMMIT, and SQLite keeps the transaction open.
    db.execute("CREATE TABLE child (user_id TEXT REFERENCES users(id)"
               " DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError), database.write(db):
        db.execute("INSERT INTO child VALUES ('nobody')")
    assert not db.conn.in_transaction
    with database.write(db):
        db.execute("INSERT INTO users (id, created_at) VALUES ('u', 1)")
    assert db.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 1
    db.close()


def test_storage_failures_are_told_apart_from_other_errors(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "db"
    database.open_database(path).close()
    readonly = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as real:
        readonly.execute("INSERT INTO users (id, created_at) VALUES ('x', 1)")
    readonly.close()
    assert database.storage_failure(real.value)
    for message in ("database or disk is full", "attempt to write a readonly database",
                    "disk I/O error", "unable to open database file"):
        assert database.storage_failure(sqlite3.OperationalError(message))
    assert database.storage_failure(sqlite3.DatabaseError("database or disk is full"))
    assert not database.storage_failure(sqlite3.OperationalError("no such table: x"))
    assert not database.storage_failure(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not database.storage_failure(OSError(28, "No space left on device"))
    assert not database.storage_failure(ValueError("database or disk is full"))


# ---- online backup --------------------------------------------------------------------------


def test_backup_writes_a_checked_private_copy(tmp_path: pathlib.Path) -> None:
    db = database.open_database(tmp_path / "live.db")
    with database.write(db):
        db.execute("INSERT INTO users (id, created_at) VALUES ('alice', 1)")
    dest = tmp_path / "copy.db"
    (tmp_path / "copy.db.tmp").write_text("left by an interrupted backup")
    size = database.backup(tmp_path / "live.db", dest)
    assert size == dest.stat().st_size > 0
    assert not (tmp_path / "copy.db.tmp").exists()
    assert dest.stat().st_mode & 0o777 == 0o600  # tokens' hashes and users' code are in it
    copy = sqlite3.connect(dest)
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file
    assert copy.execute("PRAGMA user_version").fetchone()[0] == database.VERSION
    assert copy.execute("SELECT id FROM users").fetchall() == [("alice",)]
    copy.close()
    db.close()


def test_backup_refuses_to_overwrite_unless_forced(tmp_path: pathlib.Path) -> None:
    database.open_database(tmp_path / "live.db").close()
    dest = tmp_path / "copy.db"
    dest.write_text("precious")
    with pytest.raises(errors.Conflict, match="exists: pass --force"):
        database.backup(tmp_path / "live.db", dest)
    assert dest.read_text() == "precious"
    database.backup(tmp_path / "live.db", dest, force=True)
    assert dest.read_bytes().startswith(b"SQLite format 3")


def test_backup_of_a_missing_database_creates_nothing(tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.NotFound):
        database.backup(tmp_path / "none.db", tmp_path / "copy.db")
    assert sorted(tmp_path.iterdir()) == []


def test_backup_into_a_missing_folder_fails_cleanly(tmp_path: pathlib.Path) -> None:
    database.open_database(tmp_path / "live.db").close()
    with pytest.raises(errors.ControllerError, match=r"backup to .* failed"):
        database.backup(tmp_path / "live.db", tmp_path / "no" / "copy.db")


def test_backup_command_prints_path_and_size(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = tmp_path / "live.db"
    database.open_database(live).close()
    dest = tmp_path / "copy.db"
    assert controller_main.main(["backup", str(dest), "--database", str(live)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"{dest} {dest.stat().st_size} bytes (integrity_check ok)"
    assert controller_main.main(["backup", str(dest), "--database", str(live)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert controller_main.main(["backup", str(dest), "--database", str(live), "--force"]) == 0


# ---- retention of result records --------------------------------------------------------------

NOW = 1_800_000_000.0
DAY = 86400.0


def aged(path: pathlib.Path, days: float, text: str = "{}\n") -> pathlib.Path:
    path.write_text(text)
    os.utime(path, (NOW - days * DAY, NOW - days * DAY))
    return path


def test_prune_removes_only_old_records_directly_in_the_folder(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    aged(folder / "alice_c_old.jsonl", 31)
    aged(folder / "alice_c_older.jsonl", 400)
    aged(folder / "bob_c_new.jsonl", 29)
    aged(folder / "notes.txt", 400)
    sub = folder / "archive.jsonl"
    sub.mkdir()
    aged(sub / "inner.jsonl", 400)
    outside = aged(tmp_path / "elsewhere.jsonl", 400)
    (folder / "link.jsonl").symlink_to(outside)
    os.utime(folder / "link.jsonl", (NOW - 400 * DAY,) * 2, follow_symlinks=False)
    (folder / "dangling.jsonl").symlink_to(tmp_path / "gone")

    removed = results.prune(folder, 30, NOW)
    assert removed == ["alice_c_old.jsonl", "alice_c_older.jsonl"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "archive.jsonl", "bob_c_new.jsonl", "dangling.jsonl", "link.jsonl", "notes.txt"]
    assert (sub / "inner.jsonl").exists() and outside.exists()
    assert results.prune(folder, 30, NOW) == []


def test_prune_of_a_missing_folder_and_bad_ages(tmp_path: pathlib.Path) -> None:
    assert results.prune(tmp_path / "none", 1, NOW) == []
    with pytest.raises(ValueError):
        results.prune(tmp_path, -1, NOW)


def test_prune_command_prints_what_it_removed(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    old = aged(folder / "a_c_1.jsonl", 10)
    os.utime(old, (1.0, 1.0))  # the command uses the wall clock
    new = folder / "a_c_2.jsonl"
    new.write_text("{}\n")
    assert controller_main.main(["prune", "--results-days", "7",
                                 "--results-dir", str(folder)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [str(old)]
    assert "removed 1 result record(s) older than 7 days" in captured.err
    assert not old.exists() and new.exists()
    for bad in ("0", "-3", "soon", "nan", "inf"):
        with pytest.raises(SystemExit) as exited:
            controller_main.main(["prune", "--results-days", bad, "--results-dir", str(folder)])
        assert exited.value.code == 2


def test_v3_counts_the_records_of_ended_jobs_as_written(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "v1.db"
    v1_file(path)
    db = database.open_database(path)
    rows = db.execute("SELECT status, recorded FROM jobs").fetchall()
    assert rows and all(rec == (status in ("completed", "failed", "cancelled"))
                        for status, rec in rows)
