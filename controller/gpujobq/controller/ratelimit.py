"""Submission limits, as pure arithmetic: (what the user has, limits, now) -> verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec


class Limits(msgspec.Struct, frozen=True):
    submits: int  # per sliding window
    window: float  # seconds
    active: int  # pending or running jobs at once


class ActiveJob(msgspec.Struct, frozen=True):
    expected_time: float
    started_at: float | None


class Refusal(msgspec.Struct, frozen=True):
    detail: str
    retry_after: int  # whole seconds, for the Retry-After header


def check(
    limits: Limits,
    active: Sequence[ActiveJob],
    recent_submits: Sequence[float],
    now: float,
) -> Refusal | None:
    """None when one more submission is allowed; otherwise why not and when to retry."""
    if len(active) >= limits.active:
        return Refusal(
            detail=(
                f"Too Many Requests: at most {limits.active} active job(s) (pending or running) "
                f"per user; wait for your job to finish or cancel it"
            ),
            retry_after=_until_first_ends(active, now),
        )
    in_window = sorted(t for t in recent_submits if t > now - limits.window)
    if len(in_window) >= limits.submits:
        # The window frees a slot when the oldest submission that still counts leaves it.
        oldest = in_window[len(in_window) - limits.submits]
        wait = _whole_seconds(oldest + limits.window - now)
        return Refusal(
            detail=(
                f"Too Many Requests: at most {limits.submits} submissions per "
                f"{_seconds(limits.window)}; retry in {wait} s"
            ),
            retry_after=wait,
        )
    return None


def _until_first_ends(active: Sequence[ActiveJob], now: float) -> int:
    ends = [(j.started_at if j.started_at is not None else now) + j.expected_time for j in active]
    return _whole_seconds(min(ends) - now)


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _seconds(window: float) -> str:
    return "minute" if window == 60 else f"{window:g} seconds"
