from __future__ import annotations

import pathlib
from collections.abc import Iterator

import msgspec
import pytest
from gpujobq.controller import database, errors, ratelimit, store
from gpujobq.protocol.states import Reason, Status

LIMITS = ratelimit.Limits(submits=100, window=60.0, active=100)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jobs(tmp_path: pathlib.Path, clock: Clock) -> Iterator[store.Store]:
    db = database.open_database(tmp_path / "state" / "jobs.sqlite")
    yield store.Store(db, clock)
    db.conn.close()


def new(job_id: str, user: str = "alice", key: str | None = None) -> store.NewJob:
    return store.NewJob(
        id=job_id, user_id=user, competition_id="comp", project_id="proj",
        expected_time=60.0, time_limit=120.0, code=b"print(1)", config=b"a: 1",
        idempotency_key=key,
    )


def submit(jobs: store.Store, job_id: str, user: str = "alice") -> store.Job:
    job, created = jobs.submit(new(job_id, user), LIMITS)
    assert created
    return job


def running(jobs: store.Store, job_id: str = "j1") -> store.Job:
    submit(jobs, job_id)
    return jobs.dispatch(job_id, "node-a", [0, 1]).job


def finish(jobs: store.Store, job_id: str, attempt: int, status: Status = Status.COMPLETED):
    return jobs.finish(
        job_id, attempt, status=status, reason=Reason.EXIT_CODE.value, exit_code=0,
        stdout=b"out", stderr=b"err", detail=None, at=jobs.clock(),
    )


def transitions(jobs: store.Store, job_id: str) -> list[tuple[str | None, str, str | None]]:
    return [(e["from_status"], e["to_status"], e["reason"]) for e in jobs.events(job_id)]


def row_count(jobs: store.Store, table: str) -> int:
    return jobs.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


# ---- submission ------------------------------------------------------------------------


def test_submit_creates_pending_and_event(jobs: store.Store, clock: Clock) -> None:
    job = submit(jobs, "j1")
    assert job.status is Status.PENDING
    assert (job.attempt, job.retries, job.node, job.gpus) == (0, 0, None, ())
    assert job.created_at == clock.now and job.started_at is None
    assert jobs.db.execute("SELECT code, config FROM jobs WHERE id = 'j1'").fetchone() == (
        b"print(1)", b"a: 1")
    assert jobs.events("j1") == [
        {"attempt": 0, "from_status": None, "to_status": "pending", "at": clock.now,
         "reason": "submitted", "detail": None}
    ]


def test_dispatch_returns_the_code_and_config_its_runjob_carries(jobs: store.Store) -> None:
    submit(jobs, "j1")
    job, code, config = jobs.dispatch("j1", "node-a", [0])
    assert (job.status, job.node, job.attempt) == (Status.RUNNING, "node-a", 1)
    assert (code, config) == (b"print(1)", b"a: 1")
    assert jobs.get("nope") is None


def test_submit_rate_limited_stores_nothing(jobs: store.Store, clock: Clock) -> None:
    limits = ratelimit.Limits(submits=2, window=60.0, active=10)
    jobs.submit(new("j1"), limits)
    clock.now += 20
    jobs.submit(new("j2"), limits)
    clock.now += 5
    with pytest.raises(errors.RateLimited) as info:
        jobs.submit(new("j3"), limits)
    assert info.value.headers == {"Retry-After": "35"}
    assert jobs.get("j3") is None and jobs.events("j3") == []
    assert row_count(jobs, "jobs") == 2
    # Another user is not affected, and the window slides.
    jobs.submit(new("b1", user="bob"), limits)
    clock.now += 35
    assert jobs.submit(new("j3"), limits)[1]


def test_submit_active_limit(jobs: store.Store, clock: Clock) -> None:
    limits = ratelimit.Limits(submits=10, window=60.0, active=1)
    jobs.submit(new("j1"), limits)
    with pytest.raises(errors.RateLimited) as info:
        jobs.submit(new("j2"), limits)
    assert info.value.headers == {"Retry-After": "60"}  # not started: now + expected_time
    jobs.cancel_pending("j1")
    assert jobs.submit(new("j2"), limits)[1]


def test_limits_lowered_below_what_a_user_has_still_give_the_exact_wait(
        jobs: store.Store, clock: Clock) -> None:
    """Only the jobs that end first and the latest submissions are read; the verdict and
    Retry-After are the same as from all of them."""
    for i in range(6):  # six active jobs; the last one started, and ends soonest
        jobs.submit(new(f"j{i}"), LIMITS)
        clock.now += 1
    jobs.dispatch("j5", "n", [0])
    jobs.mark_started("j5", 1, at=clock.now - 50)  # ends at now + 10
    with pytest.raises(errors.RateLimited) as info:
        jobs.submit(new("x"), ratelimit.Limits(submits=100, window=60.0, active=2))
    assert info.value.headers == {"Retry-After": "10"}
    # Six submissions within the window, three allowed: the fourth latest must leave.
    with pytest.raises(errors.RateLimited) as info:
        jobs.submit(new("y"), ratelimit.Limits(submits=3, window=60.0, active=100))
    assert info.value.headers == {"Retry-After": "57"}  # j3, made 3 s before now


def test_limits_are_counted_through_the_active_jobs_index(jobs: store.Store) -> None:
    """A user with a long history submits at the cost of one with none: the active-job
    count reads the partial index of pending and running jobs, never the history."""
    for i in range(30):
        finish(jobs, running(jobs, f"old{i}").id, 1)
    seen: list[str] = []
    jobs.db.conn.set_trace_callback(seen.append)
    try:
        submit(jobs, "new")
    finally:
        jobs.db.conn.set_trace_callback(None)
    count = next(sql for sql in seen if "COUNT(*)" in sql)
    plan = " | ".join(r[3] for r in jobs.db.execute(f"EXPLAIN QUERY PLAN {count}"))
    assert "USING INDEX jobs_user_active" in plan, plan
    assert "SCAN jobs" not in plan, plan
    # Under both limits no row is read for the verdict.
    assert not any("ORDER BY COALESCE" in sql for sql in seen)


def test_idempotency_key_returns_same_job(jobs: store.Store) -> None:
    first, created = jobs.submit(new("j1", key="k"), LIMITS)
    again, created_again = jobs.submit(new("j2", key="k"), LIMITS)
    assert created and not created_again
    assert again.id == first.id == "j1"
    assert jobs.get("j2") is None
    # Same key, other user: a new job.
    other, created_other = jobs.submit(new("j3", user="bob", key="k"), LIMITS)
    assert created_other and other.id == "j3"


def test_idempotent_retry_is_not_rate_limited(jobs: store.Store) -> None:
    limits = ratelimit.Limits(submits=1, window=60.0, active=1)
    jobs.submit(new("j1", key="k"), limits)
    job, created = jobs.submit(new("j2", key="k"), limits)
    assert job.id == "j1" and not created


# ---- transitions -----------------------------------------------------------------------


def test_dispatch_increments_attempt(jobs: store.Store) -> None:
    job = running(jobs)
    assert job.status is Status.RUNNING
    assert (job.attempt, job.node, job.gpus) == (1, "node-a", (0, 1))
    assert transitions(jobs, "j1")[-1] == ("pending", "running", "dispatched")
    assert jobs.events("j1")[-1]["attempt"] == 1


def test_dispatch_twice_refused(jobs: store.Store) -> None:
    running(jobs)
    with pytest.raises(errors.TransitionError):
        jobs.dispatch("j1", "node-b", [2])
    job = jobs.get("j1")
    assert job is not None and (job.attempt, job.node) == (1, "node-a")
    assert len(jobs.events("j1")) == 2


def test_mark_started(jobs: store.Store) -> None:
    running(jobs)
    job = jobs.mark_started("j1", 1, at=1234.5)
    assert job.status is Status.RUNNING and job.started_at == 1234.5
    assert transitions(jobs, "j1")[-1] == ("running", "running", "started")
    with pytest.raises(errors.TransitionError):
        jobs.mark_started("j1", 2, at=1.0)
    assert jobs.get("j1").started_at == 1234.5  # type: ignore[union-attr]


def test_finish(jobs: store.Store, clock: Clock) -> None:
    running(jobs)
    clock.now += 10
    job = finish(jobs, "j1", 1)
    assert job.status is Status.COMPLETED
    assert (job.exit_code, job.stdout, job.stderr) == (0, b"out", b"err")
    assert job.completed_at == clock.now and job.reason == "exit_code"
    assert transitions(jobs, "j1")[-1] == ("running", "completed", "exit_code")


def test_a_job_without_its_output(jobs: store.Store) -> None:
    running(jobs)
    finish(jobs, "j1", 1)
    whole, meta = jobs.get("j1"), jobs.get("j1", output=False)
    assert (whole.stdout, whole.stderr) == (b"out", b"err")  # type: ignore[union-attr]
    assert (meta.stdout, meta.stderr) == (b"", b"")  # type: ignore[union-attr]
    assert msgspec.structs.replace(whole, stdout=b"", stderr=b"") == meta  # the rest alike


def test_finish_with_stale_attempt_changes_nothing(jobs: store.Store) -> None:
    running(jobs)
    before = jobs.get("j1")
    with pytest.raises(errors.TransitionError, match="attempt"):
        finish(jobs, "j1", 0)
    with pytest.raises(errors.TransitionError):
        finish(jobs, "j1", 2)
    assert jobs.get("j1") == before
    assert len(jobs.events("j1")) == 2


def test_unknown_job(jobs: store.Store) -> None:
    with pytest.raises(errors.TransitionError, match="no such job"):
        jobs.dispatch("ghost", "node-a", [0])
    assert jobs.events("ghost") == []


@pytest.mark.parametrize("status", [Status.COMPLETED, Status.FAILED, Status.CANCELLED])
def test_terminal_states_are_never_left(jobs: store.Store, status: Status) -> None:
    running(jobs)
    finish(jobs, "j1", 1, status)
    done = jobs.get("j1")
    attempts = [
        lambda: finish(jobs, "j1", 1),
        lambda: jobs.cancel_pending("j1"),
        lambda: jobs.force_cancel("j1", 1, "x"),
        lambda: jobs.request_cancel("j1", 1),
        lambda: jobs.dispatch("j1", "node-b", [0]),
        lambda: jobs.mark_started("j1", 1, 5.0),
        lambda: jobs.requeue("j1", 1, "lost", max_retries=5),
        lambda: jobs.requeue("j1", 1, "lost", max_retries=0),
    ]
    for attempt in attempts:
        with pytest.raises(errors.TransitionError):
            attempt()
    assert jobs.get("j1") == done
    assert len(jobs.events("j1")) == 3


def test_cancel_pending(jobs: store.Store, clock: Clock) -> None:
    submit(jobs, "j1")
    clock.now += 3
    job = jobs.cancel_pending("j1")
    assert job.status is Status.CANCELLED
    assert job.reason == Reason.CANCELLED_BY_USER.value and job.completed_at == clock.now
    assert transitions(jobs, "j1") == [
        (None, "pending", "submitted"), ("pending", "cancelled", "cancelled_by_user"),
    ]


def test_cancel_pending_refuses_running(jobs: store.Store) -> None:
    running(jobs)
    with pytest.raises(errors.TransitionError):
        jobs.cancel_pending("j1")
    assert jobs.get("j1").status is Status.RUNNING  # type: ignore[union-attr]


def test_request_cancel(jobs: store.Store) -> None:
    running(jobs)
    job = jobs.request_cancel("j1", 1)
    assert job.status is Status.RUNNING and job.cancel_requested
    assert transitions(jobs, "j1")[-1] == ("running", "running", "cancel_requested")
    with pytest.raises(errors.TransitionError):
        jobs.request_cancel("j1", 7)


def test_request_cancel_refuses_pending(jobs: store.Store) -> None:
    submit(jobs, "j1")
    with pytest.raises(errors.TransitionError):
        jobs.request_cancel("j1", 0)


def test_force_cancel(jobs: store.Store) -> None:
    running(jobs)
    with pytest.raises(errors.TransitionError):
        jobs.force_cancel("j1", 2, "stale")
    job = jobs.force_cancel("j1", 1, "host unreachable")
    assert job.status is Status.CANCELLED and job.reason == "cancelled_by_user"
    assert jobs.events("j1")[-1]["detail"] == "host unreachable"
    assert len(jobs.events("j1")) == 3


def test_requeue_goes_back_to_pending(jobs: store.Store) -> None:
    running(jobs)
    jobs.mark_started("j1", 1, 1.0)
    jobs.request_cancel("j1", 1)
    job = jobs.requeue("j1", 1, "host lost", max_retries=2)
    assert job.status is Status.PENDING
    assert (job.retries, job.attempt, job.node, job.gpus, job.started_at) == (1, 1, None, (), None)
    assert transitions(jobs, "j1")[-1] == ("running", "pending", "requeued")
    # The next dispatch is a new attempt; the old one is fenced off.
    job, code, config = jobs.dispatch("j1", "node-b", [3])
    assert job.attempt == 2 and (code, config) == (b"print(1)", b"a: 1")
    with pytest.raises(errors.TransitionError):
        finish(jobs, "j1", 1)


def test_requeue_stale_attempt(jobs: store.Store) -> None:
    running(jobs)
    with pytest.raises(errors.TransitionError):
        jobs.requeue("j1", 0, "lost", max_retries=2)
    assert jobs.get("j1").status is Status.RUNNING  # type: ignore[union-attr]


def test_requeue_fails_after_max_retries(jobs: store.Store, clock: Clock) -> None:
    running(jobs)
    for attempt in (1, 2):
        assert jobs.requeue("j1", attempt, "lost", max_retries=2).status is Status.PENDING
        jobs.dispatch("j1", "node-a", [0])
    clock.now += 7
    job = jobs.requeue("j1", 3, "lost again", max_retries=2)
    assert job.status is Status.FAILED
    assert (job.reason, job.detail, job.retries) == ("node_lost", "lost again", 2)
    assert job.completed_at == clock.now
    assert transitions(jobs, "j1")[-1] == ("running", "failed", "node_lost")


def test_requeue_uncounted(jobs: store.Store) -> None:
    running(jobs)
    job = jobs.requeue("j1", 1, "never sent", max_retries=0, count=False)
    assert job.status is Status.PENDING and job.retries == 0


def test_every_transition_writes_one_event(jobs: store.Store) -> None:
    submit(jobs, "j1")
    steps = [
        lambda: jobs.dispatch("j1", "n", [0]),
        lambda: jobs.mark_started("j1", 1, 1.0),
        lambda: jobs.request_cancel("j1", 1),
        lambda: jobs.requeue("j1", 1, "lost", 5),
        lambda: jobs.dispatch("j1", "n", [0]),
        lambda: jobs.requeue("j1", 2, "unsent", 5, count=False),
        lambda: jobs.dispatch("j1", "n", [0]),
        lambda: finish(jobs, "j1", 3, Status.FAILED),
    ]
    for n, step in enumerate(steps, start=2):
        step()
        assert len(jobs.events("j1")) == n
    assert [e["attempt"] for e in jobs.events("j1")] == [0, 1, 1, 1, 1, 2, 2, 3, 3]
    assert row_count(jobs, "job_events") == len(steps) + 1


# ---- reads -------------------------------------------------------------------------------


def test_list_for_user_newest_first_with_paging(jobs: store.Store, clock: Clock) -> None:
    for i in range(5):
        clock.now += 1
        submit(jobs, f"a{i}")
        submit(jobs, f"b{i}", user="bob")
    page1 = jobs.list_for_user("alice", limit=2, before=None)
    assert [s.job_id for s in page1] == ["a4", "a3"]
    page2 = jobs.list_for_user("alice", limit=2, before=page1[-1].seq)
    assert [s.job_id for s in page2] == ["a2", "a1"]
    page3 = jobs.list_for_user("alice", limit=2, before=page2[-1].seq)
    assert [s.job_id for s in page3] == ["a0"]
    assert jobs.list_for_user("alice", limit=2, before=page3[-1].seq) == []
    assert page1[0].status == "pending" and page1[0].competition_id == "comp"
    assert jobs.list_for_user("nobody", limit=10, before=None) == []


def test_queue_lists_pending_jobs_in_submission_order(jobs: store.Store) -> None:
    for i in range(4):
        submit(jobs, f"j{i}")
    jobs.dispatch("j0", "n", [0])
    jobs.cancel_pending("j2")
    queue = jobs.queue()
    assert [q.id for q in queue] == ["j1", "j3"]
    assert queue[0].gpu_count == 1 and queue[0].time_limit > 0


def test_by_status(jobs: store.Store) -> None:
    for i in range(3):
        submit(jobs, f"j{i}")
    jobs.dispatch("j1", "n", [0])
    assert [j.id for j in jobs.by_status(Status.PENDING)] == ["j0", "j2"]
    assert [j.id for j in jobs.by_status(Status.PENDING, limit=1)] == ["j0"]
    assert [j.id for j in jobs.by_status(Status.RUNNING)] == ["j1"]


def test_node_ids_first_call(jobs: store.Store) -> None:
    assert jobs.node_ids(["a", "b"]) == {"a": 0, "b": 1}
    assert jobs.node_ids([]) == {"a": 0, "b": 1}


def test_node_ids_stable_across_calls(jobs: store.Store) -> None:
    assert jobs.node_ids(["a", "b"]) == {"a": 0, "b": 1}
    assert jobs.node_ids(["a", "b"]) == {"a": 0, "b": 1}
    assert jobs.node_ids(["b", "c", "a"]) == {"a": 0, "b": 1, "c": 2}


def test_node_ids_new_names_appended(jobs: store.Store) -> None:
    jobs.node_ids(["a", "b"])
    assert jobs.node_ids(["c"]) == {"a": 0, "b": 1, "c": 2}


def test_node_ids_survive_reopen(tmp_path: pathlib.Path, clock: Clock) -> None:
    path = tmp_path / "jobs.sqlite"
    first = database.open_database(path)
    assert store.Store(first, clock).node_ids(["a", "b"]) == {"a": 0, "b": 1}
    first.conn.close()
    second = database.open_database(path)
    try:
        assert store.Store(second, clock).node_ids(["a", "b"]) == {"a": 0, "b": 1}
    finally:
        second.conn.close()
