"""Placement as a pure function: plan(queue, hosts, busy, now) -> Plan."""

from __future__ import annotations

import math
import random

import pytest
from gpujobq.controller import scheduler
from gpujobq.controller.scheduler import (
    Assignment,
    Busy,
    HostState,
    HostView,
    Plan,
    Queued,
    Waiting,
    fair_order,
    gpus_phrase,
    plan,
    why_never,
)
from gpujobq.protocol.messages import GPU

INF = math.inf


def host(
    name: str,
    n: int = 0,
    *,
    indexes: tuple[int, ...] | None = None,
    labels: dict[str, str] | None = None,
    state: HostState = "up",
) -> HostView:
    """A host with GPUs 0..n-1 (or the given indexes, in that order)."""
    idx = tuple(range(n)) if indexes is None else indexes
    gpus = tuple(GPU(index=i, uuid=f"GPU-{name}-{i}") for i in idx)
    return HostView(name=name, gpus=gpus, labels=labels or {}, state=state)


def job(
    job_id: str,
    user: str | None = None,
    *,
    gpus: int = 1,
    labels: dict[str, str] | None = None,
    limit: float = INF,
    expected: float = 0.0,
) -> Queued:
    """A queued job; by default its user is its own (one job per user: plain FIFO)."""
    return Queued(job_id=job_id, user_id=job_id if user is None else user, gpus=gpus,
                  labels=labels or {}, time_limit=limit, expected_time=expected)


def busy(
    host_name: str,
    *gpus: int,
    user: str | None = None,
    ends_by: float = INF,
    expected_end: float = INF,
) -> Busy:
    return Busy(host=host_name, gpus=gpus, user_id=user, ends_by=ends_by,
                expected_end=expected_end)


def placed(p: Plan) -> dict[str, tuple[str, tuple[int, ...]]]:
    """job_id -> (host, GPU indexes), in assignment order."""
    return {a.job_id: (a.host, tuple(g.index for g in a.gpus)) for a in p.assignments}


def reasons(p: Plan) -> dict[str, str]:
    return {job_id: w.reason for job_id, w in p.waiting.items()}


def ids(jobs: list[Queued]) -> list[str]:
    return [j.job_id for j in jobs]


# ---- basics ------------------------------------------------------------------------------


def test_empty_inputs() -> None:
    assert plan([], [], [], 0.0) == Plan([], {})
    assert plan([], [host("a", 2)], [busy("a", 0)], 0.0) == Plan([], {})
    assert plan([job("j1")], [], [], 0.0) == Plan(
        [], {"j1": Waiting(1, "no host has 1 GPU", None)})
    assert plan([job("j1")], [host("a", 0)], [], 0.0).waiting["j1"].reason == (
        "no host has 1 GPU")


def test_gpus_phrase() -> None:
    assert gpus_phrase(1) == "a free GPU"
    assert gpus_phrase(2) == "2 free GPUs on one host"
    assert gpus_phrase(8) == "8 free GPUs on one host"


def test_fifo_by_submission_when_users_differ() -> None:
    queue = [job("c", expected=30.0), job("a", expected=10.0), job("b")]  # not name order
    p = plan(queue, [host("h", 2)], [], 0.0)
    assert list(placed(p)) == ["c", "a"]
    assert [a.host for a in p.assignments] == ["h", "h"]
    assert p.waiting == {"b": Waiting(1, "waiting for a free GPU", 10.0)}


def test_assignment_carries_the_hosts_gpu_records() -> None:
    h = host("h", 2)
    p = plan([job("j1", gpus=2)], [h], [], 0.0)
    assert p.assignments == [Assignment("j1", "h", h.gpus)]
    assert p.assignments[0].gpus[1].uuid == "GPU-h-1"


def test_job_goes_to_any_eligible_host_with_enough_free_gpus() -> None:
    hosts = [host("a", 2), host("b", 2), host("c", 1)]
    taken = [busy("a", 0, 1), busy("b", 1)]
    p = plan([job("j1"), job("j2"), job("j3")], hosts, taken, 0.0)
    assert placed(p) == {"j1": ("b", (0,)), "j2": ("c", (0,))}
    assert reasons(p) == {"j3": "waiting for a free GPU"}


def test_multi_gpu_job_needs_all_its_gpus_on_one_host() -> None:
    hosts = [host("a", 2), host("b", 2), host("c", 3)]
    p = plan([job("big", gpus=3), job("two", gpus=2)], hosts, [busy("c", 2)], 0.0)
    # Six GPUs are free, but no host has three free: big waits; two fits a whole host.
    assert placed(p) == {"two": ("a", (0, 1))}
    assert reasons(p) == {"big": "waiting for 3 free GPUs on one host"}


def test_busy_gpus_are_never_given_and_unknown_busy_is_harmless() -> None:
    # Busy on a host not in the list, or on an index the host does not offer (a GPU
    # held out), changes nothing for the others.
    taken = [busy("a", 1), busy("gone", 0), busy("a", 7)]
    p = plan([job("j1"), job("j2"), job("j3")], [host("a", 3)], taken, 0.0)
    assert placed(p) == {"j1": ("a", (0,)), "j2": ("a", (2,))}
    assert list(p.waiting) == ["j3"]


def test_drained_and_down_hosts_get_no_jobs() -> None:
    hosts = [host("d", 4, state="drained"), host("x", 4, state="down"), host("u", 1)]
    p = plan([job("j1"), job("j2")], hosts, [], 0.0)
    assert placed(p) == {"j1": ("u", (0,))}
    assert reasons(p) == {"j2": "waiting for a free GPU"}


def test_a_job_that_cannot_start_does_not_block_jobs_behind_it_without_known_ends() -> None:
    # Nothing running has a known end, so there is nothing to reserve: the 1-GPU job
    # behind the 2-GPU job runs now rather than leave a GPU idle.
    p = plan([job("two", gpus=2), job("one")], [host("a", 2)], [busy("a", 0)], 0.0)
    assert placed(p) == {"one": ("a", (1,))}
    assert reasons(p) == {"two": "waiting for 2 free GPUs on one host"}


# ---- best fit ----------------------------------------------------------------------------


def test_best_fit_keeps_the_large_host_whole_for_a_later_multi_gpu_job() -> None:
    # "a" would come first by name; the 1-GPU job still goes to the host it fills.
    hosts = [host("a", 4), host("z", 2)]
    p = plan([job("one"), job("four", gpus=4)], hosts, [busy("z", 0)], 0.0)
    assert placed(p) == {"one": ("z", (1,)), "four": ("a", (0, 1, 2, 3))}
    assert p.waiting == {}


def test_best_fit_picks_fewest_gpus_left_over() -> None:
    hosts = [host("a", 3), host("b", 2), host("c", 5), host("d", 1)]
    p = plan([job("two", gpus=2)], hosts, [], 0.0)
    assert placed(p) == {"two": ("b", (0, 1))}


def test_best_fit_tie_goes_to_first_name() -> None:
    p = plan([job("j1")], [host("b", 2), host("a", 2)], [], 0.0)
    assert placed(p) == {"j1": ("a", (0,))}


def test_lowest_free_indexes_are_used() -> None:
    p = plan([job("one"), job("two", gpus=2)], [host("a", 6)], [busy("a", 0, 2)], 0.0)
    assert placed(p) == {"one": ("a", (1,)), "two": ("a", (3, 4))}
    p = plan([job("two", gpus=2)], [host("a", indexes=(3, 5, 7, 9))], [busy("a", 5)], 0.0)
    assert placed(p) == {"two": ("a", (3, 7))}


def test_lowest_free_indexes_even_when_host_lists_gpus_out_of_order() -> None:
    # An inventory may declare `gpus: [2, 0, 1]`, and a hello lists what NVML found in
    # its own order; the job still gets the lowest free index.
    p = plan([job("one"), job("two", gpus=2)], [host("a", indexes=(2, 0, 1))], [], 0.0)
    assert placed(p) == {"one": ("a", (0,)), "two": ("a", (1, 2))}


# ---- fairness between users --------------------------------------------------------------


def test_fair_order_is_fifo_with_one_job_per_user() -> None:
    queue = [job("c"), job("a"), job("b"), job("d")]
    assert ids(fair_order(queue, [])) == ["c", "a", "b", "d"]
    # Running jobs of users with nothing queued, or of no user, change nothing.
    running = [busy("h", 0, user="zed"), busy("h", 1, user=None)]
    assert ids(fair_order(queue, running)) == ["c", "a", "b", "d"]


def test_fair_order_interleaves_users() -> None:
    queue = [job("a1", "A"), job("a2", "A"), job("a3", "A"),
             job("b1", "B"), job("b2", "B"), job("c1", "C")]
    assert ids(fair_order(queue, [])) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_fair_order_counts_running_jobs() -> None:
    running = [busy("h", 0, user="A"), busy("h", 1, user="A"), busy("h", 2, user="B")]
    queue = [job("a1", "A"), job("b1", "B"), job("c1", "C"), job("b2", "B")]
    # ranks: a1 2, b1 1, c1 0, b2 2 (ties by submission)
    assert ids(fair_order(queue, running)) == ["c1", "b1", "a1", "b2"]


def test_fair_order_does_not_count_busy_without_a_user() -> None:
    running = [busy("h", 0), busy("h", 1), busy("h", 2)]
    assert ids(fair_order([job("a1", "A"), job("b1", "B")], running)) == ["a1", "b1"]


def test_many_queued_jobs_of_one_user_do_not_hold_back_another_users_later_job() -> None:
    queue = [job("a1", "A"), job("a2", "A"), job("a3", "A"), job("b1", "B")]
    p = plan(queue, [host("h", 2)], [], 0.0)
    assert list(placed(p)) == ["a1", "b1"]
    assert {k: w.position for k, w in p.waiting.items()} == {"a2": 1, "a3": 2}


def test_running_jobs_of_one_user_do_not_hold_back_another_users_later_job() -> None:
    queue = [job("a2", "A"), job("b1", "B")]
    p = plan(queue, [host("h", 2)], [busy("h", 0, user="A")], 0.0)
    assert placed(p) == {"b1": ("h", (1,))}
    assert p.waiting["a2"].position == 1
    # The same busy GPU with no user on it: plain FIFO.
    p = plan(queue, [host("h", 2)], [busy("h", 0)], 0.0)
    assert placed(p) == {"a2": ("h", (1,))}


def test_waiting_positions_follow_the_fair_order() -> None:
    # B's second job ranks after C's first, though C submitted last.
    queue = [job("b1", "B"), job("b2", "B"), job("c1", "C")]
    p = plan(queue, [host("h", 1)], [], 0.0)
    assert placed(p) == {"b1": ("h", (0,))}
    assert {k: w.position for k, w in p.waiting.items()} == {"c1": 1, "b2": 2}


# ---- labels ------------------------------------------------------------------------------


def test_job_with_labels_goes_only_to_hosts_with_all_of_them() -> None:
    hosts = [
        host("a", 4, labels={"gpu": "h100"}),
        host("b", 4, labels={"gpu": "a100"}),
        host("c", 4, labels={"gpu": "a100", "zone": "x", "rack": "7"}),
    ]
    want = {"gpu": "a100", "zone": "x"}
    p = plan([job("j1", labels=want, gpus=4), job("j2", labels=want)], hosts, [], 0.0)
    assert placed(p) == {"j1": ("c", (0, 1, 2, 3))}
    assert reasons(p) == {"j2": "waiting for a free GPU"}


def test_label_value_must_match() -> None:
    p = plan([job("j1", labels={"gpu": "a100"})], [host("a", 1, labels={"gpu": "A100"})], [],
             0.0)
    assert placed(p) == {}
    assert reasons(p) == {"j1": "no host has 1 GPU with gpu=a100"}


def test_job_without_labels_may_use_a_labelled_host() -> None:
    p = plan([job("j1")], [host("a", 1, labels={"gpu": "a100"})], [], 0.0)
    assert placed(p) == {"j1": ("a", (0,))}


# ---- pending reasons ---------------------------------------------------------------------


def test_reason_waiting_for_a_free_gpu() -> None:
    p = plan([job("j1")], [host("a", 1)], [busy("a", 0)], 0.0)
    assert reasons(p) == {"j1": "waiting for a free GPU"}


def test_reason_waiting_for_n_free_gpus_on_one_host() -> None:
    hosts = [host("a", 2), host("b", 2)]
    p = plan([job("j1", gpus=2)], hosts, [busy("a", 0), busy("b", 1)], 0.0)
    assert reasons(p) == {"j1": "waiting for 2 free GPUs on one host"}


@pytest.mark.parametrize(
    ("states", "reason"),
    [
        (("drained",), "all eligible hosts drained"),
        (("drained", "drained"), "all eligible hosts drained"),
        (("down",), "all eligible hosts down"),
        (("down", "down"), "all eligible hosts down"),
        (("drained", "down"), "all eligible hosts drained or down"),
    ],
)
def test_reason_when_no_eligible_host_is_up(states: tuple[HostState, ...], reason: str) -> None:
    # Up hosts that are too small, or lack the label, do not count.
    hosts = [host(f"h{i}", 2, state=s) for i, s in enumerate(states)]
    p = plan([job("j1", gpus=2)], [*hosts, host("small", 1)], [], 0.0)
    assert p.waiting == {"j1": Waiting(1, reason, None)}
    hosts = [host(f"h{i}", 1, state=s, labels={"gpu": "a100"}) for i, s in enumerate(states)]
    other = host("other", 2, labels={"gpu": "h100"})
    p = plan([job("j1", labels={"gpu": "a100"})], [*hosts, other], [], 0.0)
    assert p.waiting == {"j1": Waiting(1, reason, None)}


def test_one_up_eligible_host_means_waiting_not_drained() -> None:
    hosts = [host("d", 2, state="drained"), host("x", 2, state="down"), host("u", 2)]
    p = plan([job("j1", gpus=2)], hosts, [busy("u", 0)], 0.0)
    assert reasons(p) == {"j1": "waiting for 2 free GPUs on one host"}


def test_reason_no_host_has_enough_gpus() -> None:
    hosts = [host("a", 4), host("b", 4, state="drained")]
    p = plan([job("j1", gpus=8)], hosts, [], 0.0)
    assert reasons(p) == {"j1": "no host has 8 GPUs"}
    assert p.waiting["j1"].estimated_start is None


def test_reason_no_host_has_labels() -> None:
    hosts = [host("a", 4, labels={"gpu": "h100"}), host("b", 1, labels={"zone": "x"})]
    p = plan([job("j1", labels={"gpu": "a100"})], hosts, [], 0.0)
    assert reasons(p) == {"j1": "no host has 1 GPU with gpu=a100"}
    p = plan([job("j1", gpus=2, labels={"zone": "x", "gpu": "h100"})], hosts, [], 0.0)
    assert reasons(p) == {"j1": "no host has 2 GPUs with gpu=h100, zone=x"}


# ---- why_never ---------------------------------------------------------------------------


def test_why_never() -> None:
    hosts = [host("a", 2, labels={"gpu": "a100"}), host("b", 4, state="down")]
    assert why_never(job("j"), hosts) is None
    assert why_never(job("j", gpus=4), hosts) is None  # down now, but it could run there
    assert why_never(job("j", gpus=2, labels={"gpu": "a100"}), hosts) is None
    assert why_never(job("j", gpus=5), hosts) == "no host has 5 GPUs"
    assert why_never(job("j", gpus=3, labels={"gpu": "a100"}), hosts) == (
        "no host has 3 GPUs with gpu=a100")
    assert why_never(job("j", labels={"gpu": "h100"}), hosts) == (
        "no host has 1 GPU with gpu=h100")
    assert why_never(job("j", labels={"b": "2", "a": "1"}), []) == (
        "no host has 1 GPU with a=1, b=2")
    assert why_never(job("j"), iter(hosts)) is None  # any iterable


def test_why_never_ignores_what_is_busy() -> None:
    hosts = [host("a", 1, state="drained")]
    assert why_never(job("j"), hosts) is None
    assert plan([job("j")], hosts, [busy("a", 0)], 0.0).waiting["j"].reason == (
        "all eligible hosts drained")


# ---- backfill and reservations -----------------------------------------------------------


def test_short_job_may_backfill_a_reserved_host_long_job_may_not() -> None:
    hosts = [host("a", 4)]
    taken = [busy("a", 0, 1, 2, ends_by=100.0, expected_end=80.0)]
    queue = [job("big", gpus=4, limit=50.0), job("long", limit=101.0), job("short", limit=100.0)]
    p = plan(queue, hosts, taken, 0.0)
    # short ends by 100 for sure (0 + 100 <= 100): it cannot delay big.
    assert placed(p) == {"short": ("a", (3,))}
    assert reasons(p) == {"big": "waiting for 4 free GPUs on one host",
                          "long": "waiting for a free GPU"}
    assert [p.waiting["big"].position, p.waiting["long"].position] == [1, 2]


def test_backfill_window_shrinks_as_time_passes() -> None:
    hosts = [host("a", 4)]
    taken = [busy("a", 0, 1, 2, ends_by=100.0)]
    queue = [job("big", gpus=4), job("short", limit=60.0)]
    assert placed(plan(queue, hosts, taken, 40.0)) == {"short": ("a", (3,))}
    assert placed(plan(queue, hosts, taken, 41.0)) == {}


def test_long_job_may_use_gpus_spare_beyond_the_reservation() -> None:
    hosts = [host("a", 6)]
    taken = [busy("a", 0, 1, 2, ends_by=100.0)]
    # At 100, six GPUs are free and big needs four: two are spare for long jobs.
    queue = [job("big", gpus=4), job("l1"), job("l2"), job("l3"), job("short", limit=10.0)]
    p = plan(queue, hosts, taken, 0.0)
    assert placed(p) == {"l1": ("a", (3,)), "l2": ("a", (4,)), "short": ("a", (5,))}
    assert reasons(p) == {"big": "waiting for 4 free GPUs on one host",
                          "l3": "waiting for a free GPU"}


def test_reservation_is_due_when_enough_gpus_free_not_all() -> None:
    taken = [busy("a", 0, ends_by=50.0), busy("a", 1, ends_by=100.0),
             busy("a", 2, ends_by=200.0)]
    queue = [job("two", gpus=2), job("j60", limit=60.0), job("j50", limit=50.0)]
    p = plan(queue, [host("a", 4)], taken, 0.0)
    # GPU 3 now and GPU 0 at 50 make two: j60 would still hold GPU 3 then.
    assert placed(p) == {"j50": ("a", (3,))}
    assert list(p.waiting) == ["two", "j60"]


def test_jobs_started_in_the_same_pass_count_for_the_reservation() -> None:
    # j1 starts now and ends by 30; big then waits for all four GPUs, due at 30.
    queue = [job("j1", limit=30.0), job("big", gpus=4), job("ok", limit=20.0),
             job("late", limit=40.0)]
    p = plan(queue, [host("a", 4)], [], 0.0)
    assert placed(p) == {"j1": ("a", (0,)), "ok": ("a", (1,))}
    assert list(p.waiting) == ["big", "late"]


def test_reservation_goes_to_the_host_that_frees_up_first() -> None:
    hosts = [host("a", 4), host("b", 4)]
    taken = [busy("a", 0, 1, 2, ends_by=200.0), busy("b", 0, 1, 2, ends_by=100.0)]
    queue = [job("big", gpus=4), job("mid", limit=150.0), job("short", limit=50.0),
             job("long")]
    p = plan(queue, hosts, taken, 0.0)
    # b is held for big from 100: mid (ends by 150) must use a; short fits b's window.
    assert placed(p) == {"mid": ("a", (3,)), "short": ("b", (3,))}
    assert reasons(p)["long"] == "waiting for a free GPU"


def test_backfill_prefers_an_unreserved_host_when_the_fit_is_equal() -> None:
    hosts = [host("a", 4), host("b", 2)]
    taken = [busy("a", 0, 1, 2, ends_by=100.0), busy("b", 0)]
    queue = [job("big", gpus=4), job("short", limit=10.0)]
    p = plan(queue, hosts, taken, 0.0)
    # Both a and b have one GPU free and short may use either: b keeps a's window open.
    assert placed(p) == {"short": ("b", (1,))}


def test_no_reservation_when_nothing_has_a_known_end() -> None:
    taken = [busy("a", 0, 1, 2)]  # ends_by inf: holding the host back would gain nothing
    p = plan([job("big", gpus=4), job("long")], [host("a", 4)], taken, 0.0)
    assert placed(p) == {"long": ("a", (3,))}
    assert p.waiting["big"] == Waiting(1, "waiting for 4 free GPUs on one host", None)


def test_one_reservation_per_host() -> None:
    hosts = [host("a", 4), host("b", 4)]
    taken = [busy("a", 0, 1, 2, ends_by=100.0), busy("b", 0, 1, 2, ends_by=200.0)]
    queue = [job("big1", gpus=4), job("big2", gpus=4), job("long")]
    p = plan(queue, hosts, taken, 0.0)
    # big1 holds a, big2 holds b: the long job may use neither.
    assert placed(p) == {}
    p = plan([*queue, job("short", limit=150.0)], hosts, taken, 0.0)
    assert placed(p) == {"short": ("b", (3,))}


def test_reservation_only_on_up_hosts() -> None:
    hosts = [host("a", 4, state="drained"), host("b", 4)]
    taken = [busy("a", 0, 1, 2, ends_by=10.0), busy("b", 0, 1, 2, ends_by=INF)]
    # a frees up first but takes no jobs; b never frees up for sure: nothing is held.
    p = plan([job("big", gpus=4), job("long")], hosts, taken, 0.0)
    assert placed(p) == {"long": ("b", (3,))}


def run_stream(reserve: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Two 4-GPU hosts, a steady stream of 1-GPU jobs and one 4-GPU job at t=50.

    Each step: finish jobs due, submit, plan, start what the plan says. Returns start
    times; checks that no GPU is ever given twice along the way.
    """
    if not reserve:
        monkeypatch.setattr(scheduler, "_reserve", lambda *args: None)
    rng = random.Random(1234)
    hosts = [host("a", 4), host("b", 4)]
    running: dict[str, tuple[Busy, float]] = {}  # job_id -> (its Busy, when it ends)
    queue: list[Queued] = []
    started: dict[str, float] = {}
    for step in range(400):
        now = float(step)
        running = {k: v for k, v in running.items() if v[1] > now}
        if step < 300:
            limit = float(rng.randint(5, 40))
            queue.append(job(f"s{step}", f"u{step % 3}", limit=limit, expected=limit / 2))
        if step == 50:
            queue.append(job("big", "v", gpus=4, limit=20.0, expected=10.0))
        p = plan(queue, hosts, [b for b, _ in running.values()], now)
        by_id = {q.job_id: q for q in queue}
        if "big" in p.waiting:
            assert p.waiting["big"].reason == "waiting for 4 free GPUs on one host"
        for a in p.assignments:
            q = by_id[a.job_id]
            b = busy(a.host, *(g.index for g in a.gpus), user=q.user_id,
                     ends_by=now + q.time_limit, expected_end=now + q.expected_time)
            used = {(r.host, i) for r, _ in running.values() for i in r.gpus}
            assert not used & {(b.host, i) for i in b.gpus}
            running[q.job_id] = (b, now + rng.randint(1, int(q.time_limit)))
            started[q.job_id] = now
        queue = [q for q in queue if q.job_id not in started]
    return started


def test_multi_gpu_job_is_not_starved_by_a_stream_of_small_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = run_stream(True, monkeypatch)
    # Every job that runs ends within its limit (40 s at most), so the host big holds
    # is whole by then.
    assert "big" in started and started["big"] <= 50 + 40
    # Small jobs kept starting while big waited (backfill) and after it.
    assert any(50 <= t < started["big"] for k, t in started.items() if k != "big")
    assert any(t > started["big"] for t in started.values())


def test_without_reservations_the_stream_starves_the_multi_gpu_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The control for the test above: the same stream, with _reserve switched off.
    started = run_stream(False, monkeypatch)
    assert started.get("big", INF) > 50 + 40


# ---- positions and estimates -------------------------------------------------------------


def test_positions_are_1_to_n_over_waiting_jobs_in_plan_order() -> None:
    queue = [job("a1", "A"), job("a2", "A"), job("a3", "A"), job("b1", "B"),
             job("b2", "B"), job("x", gpus=9)]
    p = plan(queue, [host("h", 1)], [], 0.0)
    assert placed(p) == {"a1": ("h", (0,))}
    # plan order: a1 b1 x a2 b2 a3, less a1 which started
    assert {k: w.position for k, w in p.waiting.items()} == {
        "b1": 1, "x": 2, "a2": 3, "b2": 4, "a3": 5}
    assert list(p.waiting) == ["b1", "x", "a2", "b2", "a3"]


def test_estimates_from_running_jobs_and_jobs_ahead() -> None:
    taken = [busy("a", 0, expected_end=50.0), busy("a", 1, expected_end=80.0)]
    queue = [job("j1", expected=30.0), job("j2", expected=10.0),
             job("j3", gpus=2, expected=5.0), job("j4", expected=1.0)]
    p = plan(queue, [host("a", 2)], taken, 10.0)
    # j1 at 50 on GPU 0 (till 80); j2 at 80 (till 90); j3 needs both: 90; j4 after j3.
    assert {k: w.estimated_start for k, w in p.waiting.items()} == {
        "j1": 50.0, "j2": 80.0, "j3": 90.0, "j4": 95.0}
    assert [w.position for w in p.waiting.values()] == [1, 2, 3, 4]


def test_estimate_is_never_before_now() -> None:
    # The running job was expected to end at 5 but still runs at 10.
    p = plan([job("j1")], [host("a", 1)], [busy("a", 0, expected_end=5.0)], 10.0)
    assert p.waiting["j1"].estimated_start == 10.0


def test_estimate_counts_jobs_started_in_this_plan() -> None:
    p = plan([job("j1", expected=30.0), job("j2")], [host("a", 1)], [], 100.0)
    assert placed(p) == {"j1": ("a", (0,))}
    assert p.waiting["j2"].estimated_start == 130.0


def test_estimate_uses_the_host_free_soonest() -> None:
    hosts = [host("a", 1), host("b", 1), host("c", 1, state="drained")]
    taken = [busy("a", 0, expected_end=100.0), busy("b", 0, expected_end=40.0)]
    p = plan([job("j1", expected=5.0), job("j2")], hosts, taken, 0.0)
    assert p.waiting["j1"].estimated_start == 40.0
    assert p.waiting["j2"].estimated_start == 45.0


def test_estimate_respects_labels() -> None:
    hosts = [host("a", 1, labels={"gpu": "a100"}), host("b", 1)]
    taken = [busy("a", 0, expected_end=100.0), busy("b", 0, expected_end=40.0)]
    p = plan([job("j1", labels={"gpu": "a100"})], hosts, taken, 0.0)
    assert p.waiting["j1"].estimated_start == 100.0


def test_estimate_none_when_it_depends_on_an_unknown_end() -> None:
    hosts = [host("a", 2)]
    taken = [busy("a", 0), busy("a", 1, expected_end=50.0)]  # GPU 0: dirty, say
    p = plan([job("two", gpus=2), job("one", expected=5.0), job("one2")], hosts, taken, 0.0)
    assert p.waiting["two"].estimated_start is None
    assert p.waiting["one"].estimated_start == 50.0
    assert p.waiting["one2"].estimated_start == 55.0


def test_estimate_none_when_no_up_host_can_run_it() -> None:
    hosts = [host("big", 4, state="down"), host("small", 1)]
    taken = [busy("small", 0, expected_end=10.0)]
    p = plan([job("four", gpus=4), job("eight", gpus=8), job("one")], hosts, taken, 0.0)
    assert p.waiting["four"] == Waiting(1, "all eligible hosts down", None)
    assert p.waiting["eight"] == Waiting(2, "no host has 8 GPUs", None)
    assert p.waiting["one"] == Waiting(3, "waiting for a free GPU", 10.0)


def test_estimates_stop_at_forecast_depth() -> None:
    depth = scheduler.FORECAST_DEPTH
    queue = [job(f"j{i}", expected=1.0) for i in range(depth + 1)]
    p = plan(queue, [host("a", 1)], [busy("a", 0, expected_end=0.0)], 0.0)
    assert p.waiting[f"j{depth - 1}"].estimated_start == depth - 1
    assert p.waiting[f"j{depth}"].estimated_start is None
    assert p.waiting[f"j{depth}"].position == depth + 1


# ---- properties over random fleets -------------------------------------------------------

LABEL_POOL = [("gpu", "a100"), ("gpu", "h100"), ("zone", "x")]


def random_case(
    rng: random.Random, *, known_ends: bool = True
) -> tuple[list[Queued], list[HostView], list[Busy], float]:
    now = rng.uniform(0, 1000)
    hosts: list[HostView] = []
    states: list[HostState] = ["up", "up", "up", "drained", "down"]
    for i in range(rng.randint(0, 5)):
        indexes = tuple(sorted(rng.sample(range(12), rng.randint(0, 8))))
        labels = dict(rng.sample(LABEL_POOL, rng.randint(0, 2)))
        hosts.append(host(f"h{i}", indexes=indexes, labels=labels, state=rng.choice(states)))
    taken: list[Busy] = []
    for h in hosts:
        free = [g.index for g in h.gpus]
        rng.shuffle(free)
        while free and rng.random() < 0.6:
            k = rng.randint(1, len(free))
            use, free = free[:k], free[k:]
            ends = now + rng.uniform(-5, 100) if known_ends and rng.random() < 0.7 else INF
            expected = now + rng.uniform(-5, 100) if rng.random() < 0.8 else INF
            taken.append(busy(h.name, *use, user=rng.choice([None, "u0", "u1", "u2"]),
                              ends_by=ends, expected_end=expected))
    if rng.random() < 0.3:
        taken.append(busy("elsewhere", 0, 1, user="u0"))
    queue = []
    for k in range(rng.randint(0, 15)):
        limit = rng.uniform(1, 200) if known_ends and rng.random() < 0.7 else INF
        queue.append(Queued(
            job_id=f"j{k}", user_id=rng.choice(["u0", "u1", "u2", "u3"]),
            gpus=rng.choice([1, 1, 1, 2, 3, 4, 8]),
            labels=dict(rng.sample(LABEL_POOL, rng.choice([0, 0, 0, 1]))),
            time_limit=limit, expected_time=rng.uniform(0, 100)))
    return queue, hosts, taken, now


def free_after(
    hosts: list[HostView], taken: list[Busy], p: Plan
) -> dict[str, set[int]]:
    used = {(b.host, i) for b in taken for i in b.gpus}
    used |= {(a.host, g.index) for a in p.assignments for g in a.gpus}
    return {h.name: {g.index for g in h.gpus} - {i for n, i in used if n == h.name}
            for h in hosts}


def eligible(j: Queued, h: HostView) -> bool:
    return len(h.gpus) >= j.gpus and all(h.labels.get(k) == v for k, v in j.labels.items())


def check_plan(
    queue: list[Queued], hosts: list[HostView], taken: list[Busy], now: float, p: Plan
) -> None:
    by_host = {h.name: h for h in hosts}
    by_job = {j.job_id: j for j in queue}
    busy_now = {(b.host, i) for b in taken for i in b.gpus}
    given: set[tuple[str, int]] = set()
    for a in p.assignments:
        j, h = by_job[a.job_id], by_host[a.host]
        assert h.state == "up"
        assert len(a.gpus) == j.gpus
        assert all(g in h.gpus for g in a.gpus)  # the host's own GPU records
        assert all(h.labels.get(k) == v for k, v in j.labels.items())
        mine = {(a.host, g.index) for g in a.gpus}
        assert len(mine) == j.gpus
        assert not mine & busy_now
        assert not mine & given
        given |= mine
    for name in by_host:
        assert len({i for n, i in given if n == name}) <= len(by_host[name].gpus)
    started = [a.job_id for a in p.assignments]
    assert len(set(started)) == len(started)
    assert not set(started) & set(p.waiting)
    assert set(started) | set(p.waiting) == set(by_job)
    order = ids(fair_order(queue, taken))
    assert started == [k for k in order if k in set(started)]
    assert list(p.waiting) == [k for k in order if k in p.waiting]
    assert [w.position for w in p.waiting.values()] == list(range(1, len(p.waiting) + 1))
    left = free_after(hosts, taken, p)
    for k, w in p.waiting.items():
        j = by_job[k]
        never = why_never(j, hosts)
        if w.reason.startswith("no host has"):
            assert w.reason == never
            assert w.estimated_start is None
        else:
            assert never is None
        if w.reason.startswith("all eligible hosts"):
            assert not any(eligible(j, h) and h.state == "up" for h in hosts)
            assert w.estimated_start is None
        if w.reason.startswith("waiting for"):
            assert w.reason == f"waiting for {gpus_phrase(j.gpus)}"
            up = [h for h in hosts if h.state == "up" and eligible(j, h)]
            assert up
            # Free GPUs it could use are held only for a job ahead of it.
            for h in up:
                if len(left[h.name]) >= j.gpus:
                    assert any(eligible(by_job[o], h)
                               and ow.reason.startswith("waiting for")
                               for o, ow in p.waiting.items() if ow.position < w.position)
        if w.estimated_start is not None:
            assert now <= w.estimated_start < INF


@pytest.mark.parametrize("seed", range(10))
def test_random_plans_are_consistent(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        queue, hosts, taken, now = random_case(rng)
        check_plan(queue, hosts, taken, now, plan(queue, hosts, taken, now))


@pytest.mark.parametrize("seed", range(5))
def test_without_known_ends_no_free_gpu_is_left_that_a_waiting_job_could_use(
    seed: int,
) -> None:
    rng = random.Random(1000 + seed)
    for _ in range(100):
        queue, hosts, taken, now = random_case(rng, known_ends=False)
        p = plan(queue, hosts, taken, now)
        check_plan(queue, hosts, taken, now, p)
        left = free_after(hosts, taken, p)
        for k in p.waiting:
            j = next(q for q in queue if q.job_id == k)
            assert not any(h.state == "up" and eligible(j, h) and len(left[h.name]) >= j.gpus
                           for h in hosts)


def test_plan_is_deterministic_and_leaves_its_inputs_alone() -> None:
    rng = random.Random(99)
    queue, hosts, taken, now = random_case(rng)
    copies = (list(queue), list(hosts), list(taken))
    assert plan(queue, hosts, taken, now) == plan(queue, hosts, taken, now)
    assert (queue, hosts, taken) == copies


def test_best_fit_is_the_fullest_usable_host_then_unreserved_then_by_name() -> None:
    """_best_fit against the rule written out as a sort, on random fleets, as placements
    take GPUs one after another (the hosts regrouped by what they have left)."""
    from gpujobq.controller.scheduler import _best_fit, _FreeHosts, _may_use, _Reservation

    rng = random.Random(7)
    for _ in range(500):
        names = rng.sample([f"h{i:02d}" for i in range(30)], rng.randint(1, 12))
        hosts = [HostView(name=n, gpus=tuple(GPU(index=i) for i in range(8))) for n in names]
        free = {h.name: list(h.gpus[:rng.randint(0, 8)]) for h in hosts}
        reservations = {n: _Reservation(rng.choice([50.0, 500.0]), rng.randint(0, 3))
                        for n in names if rng.random() < 0.3}
        eligible = {n for n in names if rng.random() < 0.8}  # the job's labels rule some out
        by_free = _FreeHosts(hosts, free)
        for _ in range(4):
            job = Queued(job_id="j", gpus=rng.randint(1, 4),
                         time_limit=rng.choice([10.0, 100.0]))
            fits = [n for n in eligible if len(free[n]) >= job.gpus
                    and _may_use(reservations.get(n), job, 0.0)]
            expected = min(fits, key=lambda n: (len(free[n]) - job.gpus,
                                                n in reservations, n), default=None)
            assert _best_fit(job, eligible, by_free, reservations, 0.0) == expected
            if expected is not None:
                had = len(free[expected])
                free[expected] = free[expected][job.gpus:]
                by_free.took(expected, had, len(free[expected]))


def test_a_pass_without_estimates_places_and_ranks_the_same() -> None:
    """The dispatcher's passes skip the forecast; nothing else may change."""
    rng = random.Random(11)
    for _ in range(200):
        hosts = [host(f"h{i}", rng.randint(1, 4), labels={"t": rng.choice("ab")},
                      state=rng.choice(["up", "up", "up", "drained", "down"]))
                 for i in range(rng.randint(1, 6))]
        taken = [busy(h.name, 0, user="x", ends_by=rng.choice([50.0, 200.0, INF]),
                      expected_end=30.0) for h in hosts if rng.random() < 0.5]
        queue = [job(f"j{k}", rng.choice("uvw"), gpus=rng.randint(1, 3),
                     labels=rng.choice([{}, {"t": "a"}]), limit=rng.choice([10.0, 100.0]),
                     expected=5.0) for k in range(rng.randint(0, 30))]
        full = plan(queue, hosts, taken, 0.0)
        bare = plan(queue, hosts, taken, 0.0, estimates=False)
        assert bare.assignments == full.assignments
        assert {k: (w.position, w.reason) for k, w in bare.waiting.items()} == \
            {k: (w.position, w.reason) for k, w in full.waiting.items()}
        assert all(w.estimated_start is None for w in bare.waiting.values())
