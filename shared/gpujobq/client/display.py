"""What the CLI prints: squeue-like tables, durations, the pending line. Pure: the clock
and the time zone are passed in."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# squeue's compact state codes.
STATE_CODES = {"pending": "PD", "running": "R", "completed": "CD", "failed": "F",
               "cancelled": "CA"}
HEADERS = ("ID", "ST", "COMPETITION", "NODE", "TIME", "REASON")
RIGHT = frozenset({"TIME"})  # right-aligned columns, as squeue has them
NONE = "-"


def parse_time(text: str | None) -> dt.datetime | None:
    """The API's timestamps: ISO 8601, UTC when no offset is given."""
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def duration(seconds: float) -> str:
    """squeue's TIME: M:SS, H:MM:SS, or D-HH:MM:SS."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def relative(seconds: float) -> str:
    """A short "in ..." for a time ahead: "in 45s", "in 2m", "in 1h05m", "now"."""
    s = round(seconds)
    if s <= 0:
        return "now"
    if s < 60:
        return f"in {s}s"
    if s < 3600:
        return f"in {round(s / 60)}m"
    hours, minutes = divmod(round(s / 60), 60)
    return f"in {hours}h{minutes:02d}m" if hours < 48 else f"in {round(s / 86400)}d"


def clock(when: dt.datetime, now: dt.datetime, tz: dt.tzinfo | None = None) -> str:
    """A wall-clock time in ``tz`` (default: local): "12:04:31", with the date when it is
    not today."""
    local, today = when.astimezone(tz), now.astimezone(tz)
    if local.date() == today.date():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M")


def run_time(job: Mapping[str, Any], now: dt.datetime) -> str:
    """TIME: elapsed while running, the run time once ended, 0:00 before it starts."""
    started = parse_time(job.get("started_at"))
    if started is None:
        return duration(0)
    ended = parse_time(job.get("completed_at")) if job.get("status") != "running" else None
    return duration(((ended or now) - started).total_seconds())


def reason(job: Mapping[str, Any], now: dt.datetime, tz: dt.tzinfo | None = None) -> str:
    """REASON: why it waits (with its place and expected start), or why it ended."""
    status = job.get("status")
    if status == "pending":
        return pending_text(job, now, tz) or NONE
    if status == "running":
        return NONE
    why = job.get("reason")
    if why == "exit_code" and job.get("exit_code") is not None:
        return f"exit {job['exit_code']}"
    return str(why) if why else NONE


def pending_text(job: Mapping[str, Any], now: dt.datetime, tz: dt.tzinfo | None = None) -> str:
    """"waiting for a free GPU; position 3, start ~12:04:31 (in 2m)"."""
    parts = []
    if job.get("queue_position"):
        parts.append(f"position {job['queue_position']}")
    start = parse_time(job.get("estimated_start"))
    if start is not None:
        parts.append(f"start ~{clock(start, now, tz)} ({relative((start - now).total_seconds())})")
    why = str(job.get("pending_reason") or "")
    return "; ".join(p for p in (why, ", ".join(parts)) if p)


def pending_line(job: Mapping[str, Any], now: dt.datetime, tz: dt.tzinfo | None = None) -> str:
    """The live line of a waiting `gpujobq submit`."""
    text = pending_text(job, now, tz)
    return f"pending: {text}" if text else "pending"


def row(job: Mapping[str, Any], now: dt.datetime, tz: dt.tzinfo | None = None) -> list[str]:
    """One job as the cells of HEADERS (from /api/status, or a /api/jobs item)."""
    status = str(job.get("status", ""))
    return [str(job.get("job_id", NONE)), STATE_CODES.get(status, status.upper() or NONE),
            str(job.get("competition_id") or NONE), str(job.get("node") or NONE),
            run_time(job, now), reason(job, now, tz)]


def table(headers: Sequence[str], rows: Iterable[Sequence[str]],
          right: frozenset[str] = RIGHT) -> str:
    """Columns padded to their widest cell, two spaces apart; the last one unpadded."""
    body = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in body) for i in range(len(headers))]
    lines = []
    for r in body:
        cells = [c.rjust(w) if h in right else c.ljust(w)
                 for c, w, h in zip(r, widths, headers, strict=True)]
        cells[-1] = r[-1] if headers[-1] not in right else cells[-1]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def jobs_table(jobs: Iterable[Mapping[str, Any]], now: dt.datetime,
               tz: dt.tzinfo | None = None) -> str:
    return table(HEADERS, (row(j, now, tz) for j in jobs))


def ending(job_id: str, status: str, exit_code: int | None, why: str | None) -> str:
    """A one-line account of how a job ended (printed when it did not complete)."""
    if status == "completed":
        return f"job {job_id} completed"
    if why == "exit_code" and exit_code is not None:
        return f"job {job_id} {status} with exit code {exit_code}"
    detail = {"timeout": "ran past its time limit", "oom": "killed for using too much memory",
              "output_limit": "wrote more output than allowed",
              "cancelled_by_user": "cancelled", "node_lost": "its host was lost too often",
              "infra_error": "the platform could not run it"}.get(why or "", why or "")
    return f"job {job_id} {status}" + (f": {detail}" if detail and detail != status else "")


def artifacts_table(files: list[Any]) -> str:
    """NAME and SIZE (bytes) of a job's files, as `gpujobq artifacts` lists them."""
    if not files:
        return "(no files)"
    width = max(len("NAME"), *(len(f["name"]) for f in files))
    lines = [f"{'NAME':<{width}}  {'SIZE':>10}"]
    lines += [f"{f['name']:<{width}}  {f['size']:>10}" for f in files]
    return "\n".join(lines)
