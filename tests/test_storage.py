"""Storage with a real controller and agent: online backups while jobs are written, a full
database disk (503, reads go on, recovery), and an unwritable results folder."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from gpujobq.controller import errors

from tests import cluster as cluster_mod

FAST = {"submit_limit": 1000, "active_limit": 1000}


def controller_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpujobq.controller", *args],
                          env=cluster_mod.env(), capture_output=True, text=True, timeout=60)


def rows(path: pathlib.Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


# ---- online backup --------------------------------------------------------------------------


def test_backups_taken_while_jobs_are_written_are_consistent(tmp_path: pathlib.Path) -> None:
    with cluster_mod.running(tmp_path / "c", **FAST) as c:
        user = c.user()
        stop = threading.Event()
        submitted: list[str] = []
        failures: list[str] = []

        def submit_until_stopped() -> None:
            while not stop.is_set() or len(submitted) < 10:
                r = c.submit(user, f"print({len(submitted)})", wait=False)
                if r.status_code not in (200, 202):
                    failures.append(r.text)
                    return
                submitted.append(r.json()["job_id"])
                time.sleep(0.03)

        writer = threading.Thread(target=submit_until_stopped)
        writer.start()
        copies = []
        try:
            while len(submitted) < 3 and writer.is_alive():
                time.sleep(0.02)
            for n in range(5):
                dest = tmp_path / f"backup-{n}.db"
                run = controller_cli("backup", str(dest), "--database", str(c.db_path))
                assert run.returncode == 0, run.stderr
                assert run.stdout.strip() == (
                    f"{dest} {dest.stat().st_size} bytes (integrity_check ok)")
                copies.append((dest, len(submitted)))
        finally:
            stop.set()
            writer.join(60)
        assert not failures, failures
        for job_id in submitted:
            c.wait_status(user, job_id, {"completed", "failed"})

        live = dict(rows(c.db_path, "SELECT seq, id FROM jobs"))
        live_done = {r[0]: r[1:] for r in rows(
            c.db_path, "SELECT id, status, exit_code, stdout FROM jobs")}
        sizes = []
        for dest, _ in copies:
            assert not pathlib.Path(f"{dest}.tmp").exists()
            assert rows(dest, "PRAGMA integrity_check") == [("ok",)]
            assert rows(dest, "SELECT name FROM sqlite_master WHERE name = 'jobs'") == [("jobs",)]
            copy = dict(rows(dest, "SELECT seq, id FROM jobs"))
            # One committed state: the jobs submitted up to some point, no gaps, same ids.
            assert copy == {seq: job_id for seq, job_id in live.items()
                            if seq <= max(copy, default=0)}
            # ... and every job's status is the one its last event row says.
            mismatched = rows(dest, """
                SELECT j.id FROM jobs j WHERE j.status != (
                    SELECT e.to_status FROM job_events e WHERE e.job_id = j.id
                    ORDER BY e.id DESC LIMIT 1)""")
            assert mismatched == []
            for job_id, *result in rows(dest, "SELECT id, status, exit_code, stdout FROM jobs"
                                        " WHERE status IN ('completed', 'failed')"):
                assert live_done[job_id] == tuple(result)  # terminal states never change
            sizes.append(len(copy))
        # The copies were taken while the writer went on: the first lacks the last jobs.
        assert sizes == sorted(sizes)
        assert 0 < sizes[0] < len(live) == len(submitted)
        # An existing copy is kept unless --force.
        again = controller_cli("backup", str(copies[0][0]), "--database", str(c.db_path))
        assert again.returncode == 1 and "pass --force" in again.stderr
        assert len(rows(copies[0][0], "SELECT id FROM jobs")) == sizes[0]


# ---- a full database disk -----------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(folder: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("filling a disk needs a tmpfs of our own: run as root with mount(8)")
    folder.mkdir(parents=True)
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                          str(folder)], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {run.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(path: pathlib.Path) -> int:
    """Write ``path`` until its filesystem is full; the bytes written."""
    chunk = b"\0" * 65536
    written = 0
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                written += fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    # The last partial page too, so that no write of a page can fit.
    with open(path, "ab", buffering=0) as fh, contextlib.suppress(OSError):
        while fh.write(b"\0" * 512):
            written += 512
    return written


def test_a_full_database_disk_answers_503_and_recovers(tmp_path: pathlib.Path) -> None:
    small = tmp_path / "small"
    with small_tmpfs(small, "16m"):
        root = tmp_path / "c"
        root.mkdir()
        # The controller's database (and its -wal and -shm) live on the small filesystem;
        # the agent, its spool and the results folder stay on the big one.
        (root / "gpujobq.db").symlink_to(small / "gpujobq.db")
        with cluster_mod.running(root, **FAST) as c:
            user = c.user()
            earlier = c.submit(user, "print('before')")
            assert earlier.status_code == 200 and earlier.json()["status"] == "completed"
            earlier_id = earlier.json()["job_id"]
            wal = small / "gpujobq.db-wal"
            assert wal.exists(), sorted(p.name for p in small.iterdir())
            # Below one auto-checkpoint (1000 pages) the WAL has never been reset, so a new
            # commit must grow it: a write cannot fit in space the file already has.
            assert wal.stat().st_size < 1000 * 4096
            filler = small / "filler"
            assert fill(filler) > 0

            big = "print('never stored')\n#" + "x" * 300_000 + "\n"
            full = c.submit(user, big, timeout=30)
            assert full.status_code == 503, full.text
            assert full.json() == {"detail": errors.STORAGE_UNAVAILABLE}
            assert full.json()["detail"] == (
                "Server storage is full or not writable; nothing was stored. Try again later.")
            assert full.headers["Retry-After"] == "30"
            small_job = c.submit(user, "print('small')", timeout=30)  # fails at COMMIT
            assert (small_job.status_code, small_job.json()) == (503, full.json())
            # Reads go on working, and the controller keeps serving.
            status = c.get(user, "status", earlier_id)
            assert status.status_code == 200 and status.json()["status"] == "completed"
            assert c.get(user, "results", earlier_id).json()["stdout"] == "before\n"
            listing = c.get(user, "jobs")
            assert listing.status_code == 200
            assert [j["job_id"] for j in listing.json()] == [earlier_id]
            assert "storage failure" in c.log("controller")
            assert "database or disk is full" in c.log("controller")

            filler.unlink()
            after = c.submit(user, "print('after')")
            assert after.status_code in (200, 202), after.text
            done = c.wait_status(user, after.json()["job_id"], {"completed"})
            assert done["status"] == "completed"
            assert c.get(user, "results", after.json()["job_id"]).json()["stdout"] == "after\n"
            again = c.submit(user, big)  # the refused job, sent again, is stored now
            assert again.status_code == 200, again.text
            assert [j["job_id"] for j in c.get(user, "jobs").json()][1:] == [
                after.json()["job_id"], earlier_id]
        assert rows(root / "gpujobq.db", "PRAGMA integrity_check") == [("ok",)]


# ---- the WAL's sync ------------------------------------------------------------------------


@contextlib.contextmanager
def helper_frozen(c: cluster_mod.Cluster) -> Iterator[None]:
    """The controller's WAL sync helper stopped (SIGSTOP): nothing it is asked to sync is
    synced until the block ends."""
    assert c.proc is not None
    children = pathlib.Path(f"/proc/{c.proc.pid}/task/{c.proc.pid}/children").read_text()
    (helper,) = [int(pid) for pid in children.split()
                 if "gpujobq.controller.walsync" in
                 pathlib.Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(helper, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGCONT)


def keyed_submit(c: cluster_mod.Cluster, user: cluster_mod.User, key: str
                 ) -> requests.Response:
    config = {"competition_id": "test", "project_id": "demo", "user_id": user.name,
              "expected_time": 30}
    return requests.post(f"{c.url}/api/submit?wait=false",
                         headers={**user.headers, "Idempotency-Key": key},
                         files={"code": ("solution.py", "print('synced')"),
                                "config_file": ("config.yaml", str(config))}, timeout=30)


def wait_written(c: cluster_mod.Cluster, user: cluster_mod.User) -> list[tuple[object, ...]]:
    deadline = time.monotonic() + 30
    while not (found := rows(c.db_path, f"SELECT id FROM jobs WHERE user_id = '{user.name}'")):
        assert time.monotonic() < deadline, "the submit was never written"
        time.sleep(0.05)
    return found


def test_a_submit_is_answered_only_once_its_wal_is_on_disk(tmp_path: pathlib.Path) -> None:
    """The group transaction COMMITs without an fsync and a helper process syncs the WAL:
    while the helper is frozen, the submit is written but not answered."""
    with cluster_mod.running(tmp_path / "c", **FAST) as c:
        user = c.user()
        answer: list[requests.Response] = []
        with helper_frozen(c):
            sender = threading.Thread(target=lambda: answer.append(
                c.submit(user, "print('synced')", wait=False)))
            sender.start()
            wait_written(c, user)
            time.sleep(0.5)
            assert answer == []  # written, not yet on disk: not answered
        sender.join(30)
        assert answer and answer[0].status_code == 202, answer
        done = c.wait_status(user, answer[0].json()["job_id"], {"completed"})
        assert done["status"] == "completed"


def test_a_controller_killed_before_the_sync_leaves_one_job_for_the_retry(
        tmp_path: pathlib.Path) -> None:
    """Killed between the COMMIT and the sync: the client heard nothing and retries with
    its Idempotency-Key; whatever reached the disk, there is one job, and it runs."""
    with cluster_mod.running(tmp_path / "c", **FAST) as c:
        user = c.user()
        answer: list[requests.Response | Exception] = []

        def send() -> None:
            try:
                answer.append(keyed_submit(c, user, "once"))
            except requests.RequestException as exc:
                answer.append(exc)

        with helper_frozen(c):
            sender = threading.Thread(target=send)
            sender.start()
            wait_written(c, user)
            assert c.proc is not None
            c.proc.kill()  # SIGKILL, the sync still asked for
            c.proc.wait(10)
        sender.join(30)
        assert len(answer) == 1 and isinstance(answer[0], requests.RequestException), answer
        c.start_controller()
        retry = keyed_submit(c, user, "once")
        assert retry.status_code in (200, 202), retry.text
        stored = rows(c.db_path, f"SELECT id FROM jobs WHERE user_id = '{user.name}'")
        assert stored == [(retry.json()["job_id"],)]  # the one written before the kill
        done = c.wait_status(user, retry.json()["job_id"], {"completed"})
        assert done["status"] == "completed"


# ---- an unwritable results folder ---------------------------------------------------------


def test_a_job_is_kept_when_its_result_record_cannot_be_written(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    blocker = root / "not-a-folder"
    blocker.write_text("a file where the results folder's parent should be\n")
    # chmod would not stop root: a path under a regular file fails for everyone.
    with cluster_mod.running(root, results_dir=blocker / "results") as c:
        user = c.user()
        r = c.submit(user, "print('kept')")
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["status"], body["stdout"], body["exit_code"]) == ("completed", "kept\n", 0)
        job_id = body["job_id"]
        assert c.get(user, "status", job_id).json()["status"] == "completed"
        assert c.get(user, "results", job_id).json()["stdout"] == "kept\n"
        assert rows(c.db_path, f"SELECT status FROM jobs WHERE id = '{job_id}'") == [
            ("completed",)]
        assert f"could not write the result record of job {job_id}" in c.log("controller")
        # The controller goes on: the next job runs too.
        assert c.submit(user, "print('next')").json()["stdout"] == "next\n"
    assert blocker.is_file()
