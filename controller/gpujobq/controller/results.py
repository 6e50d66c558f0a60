"""Result records: ``{user_id}_{competition_id}_{timestamp}.jsonl`` in the results folder.

Created exclusively and never through a link; the IDs in the name were validated at
submission (letters, digits, '.', '_', '-'), so no name can leave the folder. Should
two records ever want the same name, the second gets the job id appended (and the
attempt, for an admin's rerun of the same job).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import os
import pathlib
import stat
import time
from collections.abc import Callable
from typing import NamedTuple

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


class Entry(NamedTuple):
    """A record as it goes to disk: its name (without what tells apart two that would
    share it) and its one line."""

    base: str
    job_id: str
    attempt: int
    line: bytes


def entry(job: store.Job) -> Entry:
    """The record of an ended job, ready to write (no I/O)."""
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
    return Entry(f"{job.user_id}_{job.competition_id}_{stamp}", job.id, job.attempt,
                 msgspec.json.encode(record) + b"\n")


def write(folder: pathlib.Path, job: store.Job) -> pathlib.Path:
    return put(folder, entry(job))


def put(folder: pathlib.Path, record: Entry) -> pathlib.Path:
    """Write a record to a new file in ``folder`` and fsync it; the file's path."""
    base, job_id, attempt = record.base, record.job_id, record.attempt
    # An admin's rerun of a job writes a record of its own: records are never replaced.
    for name in (f"{base}.jsonl", f"{base}_{job_id}.jsonl", f"{base}_{job_id}_{attempt}.jsonl"):
        path = folder / name
        try:
            fd = _create(path)
        except FileExistsError:
            if _holds(path, job_id, attempt):
                return path  # written before a crash: never a second record
            continue
        try:
            with memoryview(record.line) as view:
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
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

    While the event loop runs (``running``), the files are written and fsynced by one
    thread of their own, off the loop that carries every other job's reports, and noted
    as written (``jobs.recorded``) with the next group of writes. Jobs that end while it
    writes wait, and it takes them all in its next round: one hand-off to the thread and
    back per round, not per turn of the loop, and no writers racing each other for the
    GIL and the folder's lock. Otherwise (a test's step, a stopped loop) they are written
    and noted at once. A record that could not be written (a full disk, a crash in
    between) is left unnoted; ``record_missing`` writes it later.
    """

    def __init__(self, folder: pathlib.Path, jobs: store.Store, group: commits.GroupCommit,
                 notify: Callable[[str], None]) -> None:
        self.folder, self.store, self.commits, self.notify = folder, jobs, group, notify
        self.running = False
        self._rounds: asyncio.Task[None] | None = None  # the writer at work
        self._waiting: list[store.Job] = []  # ended, for the writer's next round
        self._writing_ids: set[str] = set()  # the jobs waiting or being written
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def record_then_notify(self, jobs: list[store.Job]) -> None:
        crashpoints.reach("before_record")  # the jobs are stored as ended; records not yet
        if not self.running:
            self._record_all(jobs)
            for job in jobs:
                self.notify(job.id)
            return
        self._writing_ids.update(j.id for j in jobs)  # record_missing leaves them be
        self._waiting += jobs
        if self._rounds is None:
            self._rounds = asyncio.create_task(self._write_rounds(), name="records")

    @property
    def writing(self) -> set[asyncio.Task[None]]:
        """The writer's task while it has records to write (to wait for on shutdown)."""
        return set() if self._rounds is None else {self._rounds}

    def record_missing(self) -> int:
        """Write the records a crash (or a full disk) kept from being written; how many."""
        # Not those the writer has: two writers of one record could both find the name
        # free (or the other's file still empty) and write it twice.
        return self._record_all([j for j in self.store.unrecorded()
                                 if j.id not in self._writing_ids])

    def close(self) -> None:
        """Let the writer's thread go (once its rounds are done); a later one starts anew."""
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None

    async def _write_rounds(self) -> None:
        """Rounds until nothing waits: each writes every job that waits when it begins."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="records")
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                jobs, self._waiting = self._waiting, []
                try:
                    entries = self._entries(jobs)
                    written = await loop.run_in_executor(self._thread, self._put_all, entries)
                    if written:  # noted with the next group of writes (else record_missing)
                        self.commits.call(lambda w=written: self.store.mark_recorded(*w))
                except Exception:  # the records are written later (record_missing)
                    log.exception("could not note written result records")
                finally:
                    self._writing_ids.difference_update(j.id for j in jobs)
                    for job in jobs:
                        self.notify(job.id)
        finally:
            # No await since the last look at _waiting: what ends from now on starts a
            # writer of its own. Cancelled (the loop stops): what waits is left to
            # record_missing.
            self._rounds = None
            self._writing_ids.difference_update(j.id for j in self._waiting)
            self._waiting = []

    @staticmethod
    def _entries(jobs: list[store.Job]) -> list[Entry]:
        """What to write for these jobs: built on the loop, so that the writer's thread
        runs little more than system calls (each of its turns at the GIL is one the
        loop waits for)."""
        entries = []
        for job in jobs:
            try:
                entries.append(entry(job))
            except ValueError:  # ids are checked at submission: never expected
                log.exception("job %s can have no result record", job.id)
        return entries

    def _put_all(self, entries: list[Entry]) -> list[str]:
        """Write these records, stopping at the first that fails (tried again later);
        the ids written. No database: safe in a thread."""
        written = []
        for record in entries:
            try:
                put(self.folder, record)
            except OSError:
                log.exception("could not write the result record of job %s (tried again "
                              "later)", record.job_id)
                break
            written.append(record.job_id)
        return written

    def _record_all(self, jobs: list[store.Job]) -> int:
        written = self._put_all(self._entries(jobs))
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
