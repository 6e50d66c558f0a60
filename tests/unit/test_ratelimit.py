from __future__ import annotations

import pytest
from gpujobq.controller.ratelimit import ActiveJob, Limits, check

LIMITS = Limits(submits=5, window=60.0, active=3)
NOW = 10_000.0


def test_allowed_under_limits() -> None:
    assert check(LIMITS, [], [], NOW) is None
    assert check(LIMITS, [ActiveJob(10.0, None)] * 2, [NOW - 1] * 4, NOW) is None


def test_sixth_submission_in_window_refused() -> None:
    recent = [NOW - 50, NOW - 40, NOW - 30, NOW - 20, NOW - 10]
    refusal = check(LIMITS, [], recent, NOW)
    assert refusal is not None
    # The oldest (NOW - 50) leaves the window at NOW + 10.
    assert refusal.retry_after == 10
    assert "5 submissions per minute" in refusal.detail


def test_retry_after_is_rounded_up() -> None:
    recent = [NOW - 49.2] + [NOW - 1] * 4
    refusal = check(LIMITS, [], recent, NOW)
    assert refusal is not None and refusal.retry_after == 11  # 10.8 s -> 11


def test_retry_after_is_at_least_one() -> None:
    recent = [NOW - 59.999] + [NOW] * 4
    refusal = check(LIMITS, [], recent, NOW)
    assert refusal is not None and refusal.retry_after == 1


def test_retry_after_waits_for_the_oldest_that_still_counts() -> None:
    # Seven in the window with a limit of five: three must leave, the third oldest last.
    recent = [NOW - 55, NOW - 50, NOW - 45, NOW - 5, NOW - 4, NOW - 3, NOW - 2]
    refusal = check(LIMITS, [], recent, NOW)
    assert refusal is not None and refusal.retry_after == 15


def test_submissions_older_than_window_do_not_count() -> None:
    recent = [NOW - 60, NOW - 61, NOW - 500, NOW - 1, NOW - 2, NOW - 3, NOW - 4]
    assert check(LIMITS, [], recent, NOW) is None


def test_active_limit_uses_started_at_plus_expected_time() -> None:
    active = [
        ActiveJob(expected_time=100.0, started_at=NOW - 30),  # ends in 70 s
        ActiveJob(expected_time=500.0, started_at=NOW - 10),
        ActiveJob(expected_time=1000.0, started_at=None),
    ]
    refusal = check(LIMITS, active, [], NOW)
    assert refusal is not None
    assert refusal.retry_after == 70
    assert "at most 3 active job(s)" in refusal.detail


def test_active_limit_not_started_counts_from_now() -> None:
    active = [ActiveJob(expected_time=42.5, started_at=None)] * 3
    refusal = check(LIMITS, active, [], NOW)
    assert refusal is not None and refusal.retry_after == 43


def test_active_limit_overrun_job_gives_one_second() -> None:
    active = [ActiveJob(expected_time=10.0, started_at=NOW - 1000)] * 3
    refusal = check(LIMITS, active, [], NOW)
    assert refusal is not None and refusal.retry_after == 1


@pytest.mark.parametrize(
    ("n_active", "n_recent", "refused"),
    [(0, 1, False), (0, 2, True), (2, 0, False), (3, 0, True)],
)
def test_configurable_limits(n_active: int, n_recent: int, refused: bool) -> None:
    limits = Limits(submits=2, window=30.0, active=3)
    active = [ActiveJob(5.0, None)] * n_active
    recent = [NOW - 1] * n_recent
    assert (check(limits, active, recent, NOW) is not None) is refused


def test_configurable_window() -> None:
    limits = Limits(submits=2, window=30.0, active=3)
    assert check(limits, [], [NOW - 31, NOW - 1], NOW) is None
    refusal = check(limits, [], [NOW - 29, NOW - 1], NOW)
    assert refusal is not None and refusal.retry_after == 1
    assert "30 seconds" in refusal.detail
