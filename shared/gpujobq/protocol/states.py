"""Public job statuses and the reasons a job ends where it does."""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = frozenset({Status.PENDING, Status.RUNNING})
TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


class Reason(enum.StrEnum):
    """Why a finished job ended (or, for ``requeued``, why it went back to the queue)."""

    EXIT_CODE = "exit_code"  # the program exited on its own; see exit_code
    TIMEOUT = "timeout"  # ran past its time limit and was stopped
    OOM = "oom"  # killed for memory
    OUTPUT_LIMIT = "output_limit"  # wrote more than its output folder may hold
    CANCELLED_BY_USER = "cancelled_by_user"
    NODE_LOST = "node_lost"  # its host went away more often than the retry budget allows
    INFRA_ERROR = "infra_error"  # the platform could not run it (bad image, spawn failed)
    REQUEUED = "requeued"  # platform failure; back in the queue with a new attempt


def final_status(reason: Reason, exit_code: int | None) -> Status:
    """The public status a job ends in, given why it ended."""
    if reason is Reason.CANCELLED_BY_USER:
        return Status.CANCELLED
    if reason is Reason.EXIT_CODE and exit_code == 0:
        return Status.COMPLETED
    return Status.FAILED
