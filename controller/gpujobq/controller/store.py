"""The job store: the only writer of job state.

Every change of status is one guarded UPDATE (``WHERE id = ? AND status IN (...)``,
and ``AND attempt = ?`` for what an agent reports), written in the same transaction
as its ``job_events`` row. "No row changed" raises TransitionError: wrong state, stale
attempt or unknown job. Terminal states are never left.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import msgspec
import sqlite_utils
from gpujobq.controller import database, errors, ratelimit
from gpujobq.protocol.states import TERMINAL, Reason, Status

_COLUMNS = (
    "id, user_id, competition_id, project_id, expected_time, time_limit, status, reason,"
    " detail, attempt, retries, node, gpus, cancel_requested, created_at, started_at,"
    " completed_at, exit_code, stdout, stderr, seq, gpu_count"
)


_NO_OUTPUT = _COLUMNS.replace("stdout, stderr", "NULL, NULL")


class Job(msgspec.Struct, frozen=True):
    id: str
    user_id: str
    competition_id: str
    project_id: str
    expected_time: float
    time_limit: float
    status: Status
    reason: str | None
    detail: str | None
    attempt: int
    retries: int
    node: str | None
    gpus: tuple[int, ...]
    cancel_requested: bool
    created_at: float
    started_at: float | None
    completed_at: float | None
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    seq: int
    gpu_count: int


class QueuedRow(msgspec.Struct, frozen=True, array_like=True):
    """What placement needs of a pending job (no code, no output)."""

    id: str
    user_id: str
    competition_id: str
    gpu_count: int
    time_limit: float
    expected_time: float


class Summary(msgspec.Struct, frozen=True):
    seq: int
    job_id: str
    status: str
    competition_id: str
    created_at: float


class NewJob(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    user_id: str
    competition_id: str
    project_id: str
    expected_time: float
    time_limit: float
    code: bytes
    config: bytes
    gpu_count: int = 1
    idempotency_key: str | None = None


_gpus = msgspec.json.Decoder(tuple[int, ...])


def _job(row: tuple[Any, ...]) -> Job:
    values = list(row)
    values[6] = Status(values[6])
    values[12] = _gpus.decode(values[12]) if values[12] else ()
    values[13] = bool(values[13])
    values[18] = values[18] or b""
    values[19] = values[19] or b""
    return Job(*values)


@functools.lru_cache(maxsize=64)
def _update_sql(allowed: frozenset[Status], columns: tuple[str, ...], raw_sets: str | None,
                fenced: bool, placed: bool = False, payload: bool = False
                ) -> tuple[str, tuple[str, ...]]:
    """A guarded transition's UPDATE (made once per kind of transition), and the states
    it may leave, in the order its placeholders take them."""
    assignments = ["status = ?", *(f"{col} = ?" for col in columns)]
    if raw_sets:
        assignments.append(raw_sets)
    states = tuple(sorted(s.value for s in allowed))
    sql = (f"UPDATE jobs SET {', '.join(assignments)} WHERE id = ?"
           f" AND status IN ({', '.join('?' * len(states))})")
    if fenced:
        sql += " AND attempt = ?"
    if placed:
        sql += " AND node = ?"
    return f"{sql} RETURNING {_COLUMNS}{', code, config' if payload else ''}", states


class Dispatched(NamedTuple):
    job: Job
    code: bytes
    config: bytes


class QueueStats(NamedTuple):
    pending: int
    running: int
    oldest_pending: float | None  # created_at of the first job in the queue


class Store:
    def __init__(self, db: sqlite_utils.Database, clock: Callable[[], float]) -> None:
        self.db = db
        self.clock = clock

    # ---- reads -----------------------------------------------------------------------

    def get(self, job_id: str, *, output: bool = True) -> Job | None:
        """The job; without ``output`` its stdout and stderr read as b"" (a status needs
        neither, and a finished job's may be megabytes)."""
        columns = _COLUMNS if output else _NO_OUTPUT
        row = self.db.execute(f"SELECT {columns} FROM jobs WHERE id = ?", [job_id]).fetchone()
        return _job(row) if row else None

    def by_status(self, status: Status, limit: int | None = None) -> list[Job]:
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE status = ? ORDER BY seq"
        args: list[Any] = [status.value]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [_job(r) for r in self.db.execute(sql, args)]

    def list_for_user(self, user_id: str, limit: int, before: int | None) -> list[Summary]:
        """A user's jobs, newest first, paged by keyset (``seq < before``), never OFFSET."""
        sql = "SELECT seq, id, status, competition_id, created_at FROM jobs WHERE user_id = ?"
        args: list[Any] = [user_id]
        if before is not None:
            sql += " AND seq < ?"
            args.append(before)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        return [Summary(*r) for r in self.db.execute(sql, args)]

    def recent_for_user(self, user_id: str, limit: int) -> list[Job]:
        """A user's pending and running jobs and ``limit`` newest ones, newest first, with
        no output (the web board's)."""
        sql = (f"SELECT {_NO_OUTPUT} FROM jobs WHERE user_id = ?"
               " AND status IN ('pending', 'running')"
               f" UNION SELECT * FROM (SELECT {_NO_OUTPUT} FROM jobs WHERE user_id = ?"
               " ORDER BY seq DESC LIMIT ?) ORDER BY seq DESC")
        return [_job(r) for r in self.db.execute(sql, [user_id, user_id, limit])]

    def queue_stats(self) -> QueueStats:
        """How many jobs wait and run, and when the first waiting one was submitted: one
        read through the status index (the board's and /metrics')."""
        pending, running, oldest = self.db.execute(
            "SELECT (SELECT COUNT(*) FROM jobs WHERE status = 'pending'),"
            " (SELECT COUNT(*) FROM jobs WHERE status = 'running'),"
            " (SELECT created_at FROM jobs WHERE status = 'pending' ORDER BY seq LIMIT 1)"
        ).fetchone()
        return QueueStats(pending, running, oldest)

    def by_idempotency_key(self, user_id: str, key: str) -> Job | None:
        row = self.db.execute(
            "SELECT id FROM jobs WHERE user_id = ? AND idempotency_key = ?", [user_id, key]
        ).fetchone()
        return self.get(row[0]) if row else None

    def unrecorded(self, limit: int = 100) -> list[Job]:
        """Ended jobs whose result record is not written yet (a crash came between)."""
        ids = [r[0] for r in self.db.execute(
            "SELECT id FROM jobs WHERE recorded = 0 AND status IN ('completed', 'failed',"
            " 'cancelled') ORDER BY seq LIMIT ?", [limit])]
        return [job for i in ids if (job := self.get(i)) is not None]

    def mark_recorded(self, *job_ids: str) -> None:
        with database.write(self.db):
            # Only while it is still ended: an admin's rerun meanwhile needs its own record.
            self.db.conn.executemany(
                "UPDATE jobs SET recorded = 1 WHERE id = ?"
                " AND status IN ('completed', 'failed', 'cancelled')", [(i,) for i in job_ids])

    def queue(self) -> list[QueuedRow]:
        """Every pending job, in submission order."""
        rows = self.db.execute(
            "SELECT id, user_id, competition_id, gpu_count, time_limit, expected_time"
            " FROM jobs WHERE status = 'pending' ORDER BY seq"
        ).fetchall()
        return msgspec.convert(rows, list[QueuedRow])

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return list(
            self.db.query(
                "SELECT attempt, from_status, to_status, at, reason, detail FROM job_events"
                " WHERE job_id = ? ORDER BY id",
                [job_id],
            )
        )

    def node_ids(self, names: Iterable[str]) -> dict[str, int]:
        """Stable ids for host names (the guide's node_id: 0, 1, ...), made on first sight."""
        with database.write(self.db):
            for name in names:
                self.db.execute(
                    "INSERT INTO nodes (id, name)"
                    " SELECT (SELECT COALESCE(MAX(id) + 1, 0) FROM nodes), ?"
                    " WHERE NOT EXISTS (SELECT 1 FROM nodes WHERE name = ?)",
                    [name, name],
                )
        return {name: nid for nid, name in self.db.execute("SELECT id, name FROM nodes")}

    # ---- submission --------------------------------------------------------------------

    def submit(self, new: NewJob, limits: ratelimit.Limits) -> tuple[Job, bool]:
        """Store a job, enforcing the user's limits atomically; (job, created).

        With an idempotency key already used by this user, the earlier job is returned
        and nothing is stored. A refusal raises RateLimited and stores nothing.
        """
        with database.write(self.db):
            return self.submit_within(new, limits)

    def submit_within(self, new: NewJob, limits: ratelimit.Limits) -> tuple[Job, bool]:
        """submit() inside a write transaction the caller holds (commits.GroupCommit)."""
        now = self.clock()
        if new.idempotency_key is not None:
            row = self.db.execute(
                "SELECT id FROM jobs WHERE user_id = ? AND idempotency_key = ?",
                [new.user_id, new.idempotency_key],
            ).fetchone()
            if row:
                job = self.get(row[0])
                assert job is not None
                return job, False
        # Counted first, through indexes, without reading a row (the usual case: under
        # both limits). At a limit, only what the verdict needs: the `active` jobs that
        # end first (the earliest gives Retry-After) and the `submits` latest submissions
        # in the window (the oldest of them leaves it first).
        n_active, n_recent = self.db.execute(
            "SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE user_id = ?"
            " AND status IN ('pending', 'running') LIMIT ?)),"
            " (SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE user_id = ? AND created_at > ?"
            " LIMIT ?))",
            [new.user_id, limits.active, new.user_id, now - limits.window, limits.submits],
        ).fetchone()
        if n_active >= limits.active or n_recent >= limits.submits:
            self._refuse(new.user_id, limits, now)
        seq = self.db.execute(
            "INSERT INTO jobs (id, user_id, competition_id, project_id, expected_time,"
            " time_limit, status, code, config, gpu_count, idempotency_key, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
            [new.id, new.user_id, new.competition_id, new.project_id, new.expected_time,
             new.time_limit, new.code, new.config, new.gpu_count, new.idempotency_key,
             now],
        ).lastrowid
        self._event(new.id, 0, None, Status.PENDING, now, "submitted", None)
        # The row as just written (the columns' defaults), without reading it back.
        return Job(
            id=new.id, user_id=new.user_id, competition_id=new.competition_id,
            project_id=new.project_id, expected_time=float(new.expected_time),
            time_limit=float(new.time_limit), status=Status.PENDING, reason=None,
            detail=None, attempt=0, retries=0, node=None, gpus=(), cancel_requested=False,
            created_at=now, started_at=None, completed_at=None, exit_code=None, stdout=b"",
            stderr=b"", seq=int(seq or 0), gpu_count=new.gpu_count), True

    def _refuse(self, user_id: str, limits: ratelimit.Limits, now: float) -> None:
        """At a limit: raise RateLimited with the verdict's detail and Retry-After."""
        active = [
            ratelimit.ActiveJob(*r)
            for r in self.db.execute(
                "SELECT expected_time, started_at FROM jobs"
                " WHERE user_id = ? AND status IN ('pending', 'running')"
                " ORDER BY COALESCE(started_at, ?) + expected_time LIMIT ?",
                [user_id, now, limits.active],
            )
        ]
        recent = [
            r[0]
            for r in self.db.execute(
                "SELECT created_at FROM jobs WHERE user_id = ? AND created_at > ?"
                " ORDER BY created_at DESC LIMIT ?",
                [user_id, now - limits.window, limits.submits],
            )
        ]
        refusal = ratelimit.check(limits, active, recent, now)
        if refusal is not None:
            raise errors.RateLimited(
                refusal.detail, headers={"Retry-After": str(refusal.retry_after)}
            )

    # ---- transitions -------------------------------------------------------------------

    def dispatch(self, job_id: str, node: str, gpus: Iterable[int]) -> Dispatched:
        """pending -> running on a node, as a new attempt; with the code and config its
        RunJob carries, returned by the same UPDATE."""
        payload: list[bytes] = []
        job = self._move(
            job_id, {Status.PENDING}, Status.RUNNING, reason="dispatched", detail=node,
            sets={"node": node, "gpus": json.dumps(list(gpus)), "started_at": None},
            raw_sets="attempt = attempt + 1", payload=payload,
        )
        return Dispatched(job, *payload)

    def mark_started(self, job_id: str, attempt: int, at: float) -> Job:
        return self._move(
            job_id, {Status.RUNNING}, Status.RUNNING, attempt=attempt, reason="started",
            sets={"started_at": at},
        )

    def finish(
        self,
        job_id: str,
        attempt: int,
        *,
        status: Status,
        reason: str,
        exit_code: int | None,
        stdout: bytes,
        stderr: bytes,
        detail: str | None,
        at: float,
        files: Iterable[tuple[str, bytes]] = (),
        node: str | None = None,
        started_at: float | None = None,
    ) -> Job:
        """running -> a terminal state, with the result (and the job's output files);
        ``node``: only if the attempt runs there. ``started_at``: its start too, stored
        in the same UPDATE with its own "started" event before the ending one (a job
        whose Started and Exited arrived together), as mark_started then finish would."""
        assert status in TERMINAL
        rows = [[job_id, attempt, name, data] for name, data in files]
        sets = {"exit_code": exit_code, "stdout": stdout, "stderr": stderr,
                "completed_at": at, "reason": reason, "detail": detail}
        if started_at is not None:
            sets["started_at"] = started_at
        return self._move(
            job_id, {Status.RUNNING}, status, attempt=attempt, node=node, reason=reason,
            detail=detail, sets=sets, started=started_at is not None,
            also=("INSERT INTO job_files (job_id, attempt, name, data) VALUES (?, ?, ?, ?)", rows),
        )

    def files(self, job_id: str) -> list[tuple[str, bytes]]:
        return [
            (r[0], r[1])
            for r in self.db.execute(
                "SELECT name, data FROM job_files WHERE job_id = ? ORDER BY name", [job_id]
            )
        ]

    def file_sizes(self, job_id: str) -> list[tuple[str, int]]:
        """The job's files by name, with their sizes (their data is not read)."""
        return [
            (r[0], r[1])
            for r in self.db.execute(
                "SELECT name, length(data) FROM job_files WHERE job_id = ? ORDER BY name",
                [job_id],
            )
        ]

    def file(self, job_id: str, name: str) -> bytes | None:
        row = self.db.execute(
            "SELECT data FROM job_files WHERE job_id = ? AND name = ?", [job_id, name]
        ).fetchone()
        return None if row is None else bytes(row[0])

    def cancel_pending(self, job_id: str, detail: str = "cancelled by the user") -> Job:
        return self._end_without_agent(job_id, Status.PENDING, detail)

    def force_cancel(self, job_id: str, attempt: int, detail: str) -> Job:
        """running -> cancelled without the agent's word (its host is unreachable)."""
        return self._end_without_agent(job_id, Status.RUNNING, detail, attempt=attempt)

    def request_cancel(self, job_id: str, attempt: int, detail: str | None = None) -> Job:
        return self._move(
            job_id, {Status.RUNNING}, Status.RUNNING, attempt=attempt,
            reason="cancel_requested", detail=detail, sets={"cancel_requested": 1},
        )

    def rerun(self, job_id: str, detail: str) -> Job:
        """An admin's second run of a finished job: pending again with a fresh retry budget;
        the old result, files and record are superseded (the events keep its history)."""
        return self._move(
            job_id, TERMINAL, Status.PENDING, reason=Reason.REQUEUED, detail=detail,
            sets={"reason": None, "detail": None, "exit_code": None, "stdout": None,
                  "stderr": None, "node": None, "gpus": None, "started_at": None,
                  "completed_at": None, "cancel_requested": 0, "retries": 0, "recorded": 0},
            also=("DELETE FROM job_files WHERE job_id = ?", [[job_id]]),
        )

    def requeue(
        self, job_id: str, attempt: int, detail: str, max_retries: int, *, count: bool = True
    ) -> Job:
        """A platform failure: back to the queue, or failed once the retry budget is spent.

        ``count=False`` is for a job whose RunJob never left the controller.
        """
        job = self.get(job_id)
        if count and job is not None and job.retries >= max_retries:
            return self._move(
                job_id, {Status.RUNNING}, Status.FAILED, attempt=attempt,
                reason=Reason.NODE_LOST, detail=detail,
                sets={"reason": Reason.NODE_LOST.value, "detail": detail,
                      "completed_at": self.clock()},
            )
        return self._move(
            job_id, {Status.RUNNING}, Status.PENDING, attempt=attempt,
            reason=Reason.REQUEUED, detail=detail,
            sets={"node": None, "gpus": None, "started_at": None, "cancel_requested": 0},
            raw_sets="retries = retries + 1" if count else None,
        )

    def _end_without_agent(
        self, job_id: str, current: Status, detail: str, attempt: int | None = None
    ) -> Job:
        return self._move(
            job_id, {current}, Status.CANCELLED, attempt=attempt,
            reason=Reason.CANCELLED_BY_USER, detail=detail,
            sets={"reason": Reason.CANCELLED_BY_USER.value, "completed_at": self.clock()},
        )

    def _move(
        self,
        job_id: str,
        allowed: set[Status],
        to: Status,
        *,
        attempt: int | None = None,
        node: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
        sets: dict[str, Any] | None = None,
        raw_sets: str | None = None,
        also: tuple[str, list[list[Any]]] | None = None,
        started: bool = False,
        payload: list[bytes] | None = None,
    ) -> Job:
        """The guarded transition. ``payload``: a list that receives the job's code and
        config (the same UPDATE returns them)."""
        sets = sets or {}
        sql, states = _update_sql(frozenset(allowed), tuple(sets), raw_sets,
                                  attempt is not None, node is not None, payload is not None)
        args: list[Any] = [to.value, *sets.values(), job_id, *states]
        if attempt is not None:
            args.append(attempt)
        if node is not None:
            args.append(node)
        now = self.clock()
        with database.write(self.db, nested=False):
            # Where it comes from, for the event: the one allowed state, or as it is now.
            before = (states[0],) if len(states) == 1 else self.db.execute(
                "SELECT status FROM jobs WHERE id = ?", [job_id]).fetchone()
            row = self.db.execute(sql, args).fetchone()
            if row is None:
                found = self.db.execute(
                    "SELECT status, attempt FROM jobs WHERE id = ?", [job_id]).fetchone()
                raise errors.TransitionError(
                    f"job {job_id}: cannot go to {to} from "
                    + (f"{found[0]} attempt {found[1]}" if found else "no such job")
                    + (f" (report for attempt {attempt})" if attempt is not None else "")
                )
            if payload is not None:
                *row, code, config = row
                payload[:] = [code, config]
            job = _job(row)  # as the UPDATE left it
            if started:  # the start it also stores, as mark_started records it
                self._event(job_id, job.attempt, Status.RUNNING.value, Status.RUNNING, now,
                            "started", None)
            self._event(job_id, job.attempt, before[0], to, now, reason, detail)
            if also is not None and also[1]:
                self.db.conn.executemany(*also)
        return job

    def _event(
        self, job_id: str, attempt: int, src: str | None, dst: Status, at: float,
        reason: str | None, detail: str | None,
    ) -> None:
        self.db.execute(
            "INSERT INTO job_events (job_id, attempt, from_status, to_status, at, reason, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [job_id, attempt, src, dst.value, at, reason, detail],
        )
