"""Result records: ``{user_id}_{competition_id}_{timestamp}.jsonl`` in the results folder.

Created exclusively and never through a link; the IDs in the name were validated at
submission (letters, digits, '.', '_', '-'), so no name can leave the folder. Should
two records ever want the same name, the second gets the job id appended (and the
attempt, for an admin's rerun of the same job).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import pathlib
import stat
import time
from collections.abc import Callable

import msgspec
from gpujobq.controller import commits, crashpoints, store
from gpujobq.protocol import jobconfig

log = logging.getLogger(__name__)


class Record(msgspec.Struct, frozen=True):
    job_id: str
    user_id: str
    competition_id: str
    project_id: str
    status: str
    reason: str | None
    exit_code: int | None
    stdout: str
    stderr: str
    node: str | None
    attempt: int
    created_at: str
    started_at: str | None
    completed_at: str | None


def iso(ts: float | None) -> str | None:
    """The guide's timestamps: UTC, ISO 8601, to the second ("2025-11-06T10:30:00")."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))  # 2x datetime's speed


def text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _holds(path: pathlib.Path, job_id: str, attempt: int) -> bool:
    """Whether an existing record (a regular file, never followed) is this attempt's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return False
        try:
            found = msgspec.json.decode(fh.readline(1 << 26))
            return bool(found.get("job_id") == job_id and found.get("attempt") == attempt)
        except (msgspec.DecodeError, AttributeError):
            return False


def write(folder: pathlib.Path, job: store.Job) -> pathlib.Path:
    for part in (job.user_id, job.competition_id):
        if not jobconfig.valid_id(part):
            raise ValueError(f"unsafe name part {part!r}")
    stamp = dt.datetime.fromtimestamp(job.completed_at or 0.0, dt.UTC).strftime(
        "%Y%m%dT%H%M%S.%fZ"
    )
    record = Record(
        job_id=job.id, user_id=job.user_id, competition_id=job.competition_id,
        project_id=job.project_id, status=job.status.value, reason=job.reason,
        exit_code=job.exit_code, stdout=text(job.stdout), stderr=text(job.stderr),
        node=job.node, attempt=job.attempt, created_at=iso(job.created_at) or "",
        started_at=iso(job.started_at), completed_at=iso(job.completed_at),
    )
    line = msgspec.json.encode(record) + b"\n"
    base = f"{job.user_id}_{job.competition_id}_{stamp}"
    # An admin's rerun of a job writes a record of its own: records are never replaced.
    for name in (f"{base}.jsonl", f"{base}_{job.id}.jsonl", f"{base}_{job.id}_{job.attempt}.jsonl"):
        path = folder / name
        try:
            fd = _create(path)
        except FileExistsError:
            if _holds(path, job.id, job.attempt):
                return path  # written before a crash: never a second record
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return path
    raise FileExistsError(f"{base}: every record name is taken")


def _create(path: pathlib.Path) -> int:
    """A new record file, open for writing; its folder is made the first time."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o640)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o640)


class Recorder:
    """Writes the records of jobs whose end is stored, then wakes whoever waits on them.

    While the event loop runs (``running``), the files are written and fsynced in a
    thread, off the loop that carries every other job's reports, and noted as written
    (``jobs.recorded``) with the next group of writes. Otherwise (a test's step, a
    stopped loop) they are written and noted at once. A record that could not be written
    (a full disk, a crash in between) is left unnoted; ``record_missing`` writes it later.
    """

    def __init__(self, folder: pathlib.Path, jobs: store.Store, group: commits.GroupCommit,
                 notify: Callable[[str], None]) -> None:
        self.folder, self.store, self.commits, self.notify = folder, jobs, group, notify
        self.running = False
        self.writing: set[asyncio.Task[None]] = set()  # records being written in threads
        self._writing_ids: set[str] = set()  # the jobs they write

    def record_then_notify(self, jobs: list[store.Job]) -> None:
        crashpoints.reach("before_record")  # the jobs are stored as ended; records not yet
        if not self.running:
            self._record_all(jobs)
            for job in jobs:
                self.notify(job.id)
            return
        self._writing_ids.update(j.id for j in jobs)  # record_missing leaves them be
        task = asyncio.create_task(self._record_in_thread(jobs))
        self.writing.add(task)
        task.add_done_callback(self.writing.discard)

    def record_missing(self) -> int:
        """Write the records a crash (or a full disk) kept from being written; how many."""
        # Not those a thread is writing now: two writers of one record could both find
        # the name free (or the other's file still empty) and write it twice.
        return self._record_all([j for j in self.store.unrecorded()
                                 if j.id not in self._writing_ids])

    async def _record_in_thread(self, jobs: list[store.Job]) -> None:
        try:
            written = await asyncio.to_thread(self._write_all, jobs)
            if written:  # noted with the next group of writes (record_missing otherwise)
                self.commits.call(lambda: self.store.mark_recorded(*written))
        except Exception:  # the records are written later (record_missing)
            log.exception("could not note written result records")
        finally:
            self._writing_ids.difference_update(j.id for j in jobs)
            for job in jobs:
                self.notify(job.id)

    def _write_all(self, jobs: list[store.Job]) -> list[str]:
        """Write these jobs' record files, stopping at the first that fails (tried again
        later); the ids written. No database: safe in a thread."""
        written = []
        for job in jobs:
            try:
                write(self.folder, job)
            except (OSError, ValueError):
                log.exception("could not write the result record of job %s (tried again "
                              "later)", job.id)
                break
            written.append(job.id)
        return written

    def _record_all(self, jobs: list[store.Job]) -> int:
        written = self._write_all(jobs)
        if written:
            self.store.mark_recorded(*written)
        return len(written)


def prune(folder: pathlib.Path, older_than_days: float, now: float) -> list[str]:
    """Delete result records last written more than ``older_than_days`` days before
    ``now``; the names removed, sorted.

    Only ``*.jsonl`` regular files directly in ``folder`` count: links (even to a record),
    folders and anything else are left alone, and nothing is followed. A missing folder
    has nothing to prune.
    """
    if older_than_days < 0:
        raise ValueError(f"older_than_days must be >= 0, not {older_than_days}")
    cutoff = now - older_than_days * 86400
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return []
    removed = []
    try:
        # Names relative to the open folder: a folder swapped for a link midway is not
        # followed, and unlink of a name never touches what a link points to.
        with os.scandir(fd) as entries:
            for entry in entries:
                if not entry.name.endswith(".jsonl") or not entry.is_file(follow_symlinks=False):
                    continue
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.name, dir_fd=fd)
                    removed.append(entry.name)
    finally:
        os.close(fd)
    return sorted(removed)
