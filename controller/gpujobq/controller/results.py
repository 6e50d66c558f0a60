"""Result records: ``{user_id}_{competition_id}_{timestamp}.jsonl`` in the results folder.

Created exclusively and never through a link; the IDs in the name were validated at
submission (letters, digits, '.', '_', '-'), so no name can leave the folder. Should
two records ever want the same name, the second gets the job id appended (and the
attempt, for an admin's rerun of the same job).
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import stat
import time

import msgspec
from gpujobq.controller import store
from gpujobq.protocol import jobconfig


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
