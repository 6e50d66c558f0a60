"""The web board's pure parts: what each viewer may see of the fleet, the queue summary,
and the planner's answer for a job not yet submitted (Dispatcher.probe)."""

from __future__ import annotations

import pathlib

import pytest
from gpujobq.controller import boardapi, fleetview, scheduler
from gpujobq.protocol.states import Status

from tests.unit.test_dispatcher import World, host, inv


@pytest.fixture
def w(tmp_path: pathlib.Path) -> World:
    return World(tmp_path)


def fleet() -> fleetview.FleetReply:
    def gpu(index: int, state: str = "free", job: str | None = None,
            user: str | None = None) -> fleetview.GPUReply:
        return fleetview.GPUReply(index=index, uuid=None, name="H100", memory=0, virtual=False,
                                  state=state, job_id=job, user_id=user)

    def node(name: str, state: str, gpus: list[fleetview.GPUReply]) -> fleetview.HostReply:
        return fleetview.HostReply(
            name=name, node_id=0, address="10.0.0.1", port=22, state=state, connected=True,
            removing=False, drain=False, labels={}, runtime="process", last_heard=None,
            down_since=None, error=None, problems=[], gpus=gpus)

    return fleetview.FleetReply(
        inventory=fleetview.InventoryReply(path="inventory.yaml", loaded_at=None, error=None),
        hosts=[node("a", "up", [gpu(0, "busy", "job-ann", "ann"), gpu(1, "busy", "job-bob", "bob"),
                                gpu(2, "held", "job-old"), gpu(3)]),
               node("b", "drained", [gpu(0)])])


def gpus_of(hosts: list[boardapi.BoardHost]) -> list[tuple[str, int, str, bool, str | None,
                                                           str | None]]:
    return [(h.name, g.index, g.state, g.mine, g.job_id, g.user_id) for h in hosts
            for g in h.gpus]


def test_without_a_token_no_job_and_no_user_is_shown() -> None:
    assert gpus_of(boardapi.board_hosts(fleet(), None, admin=False)) == [
        ("a", 0, "busy", False, None, None), ("a", 1, "busy", False, None, None),
        ("a", 2, "held", False, None, None), ("a", 3, "free", False, None, None),
        ("b", 0, "free", False, None, None)]
    assert [h.state for h in boardapi.board_hosts(fleet(), None, admin=False)] == ["up",
                                                                                  "drained"]


def test_a_user_sees_only_their_own_job() -> None:
    shown = gpus_of(boardapi.board_hosts(fleet(), "ann", admin=False))
    assert shown[:3] == [("a", 0, "busy", True, "job-ann", None),
                         ("a", 1, "busy", False, None, None),
                         ("a", 2, "held", False, None, None)]


def test_an_admin_sees_every_job_and_user() -> None:
    shown = gpus_of(boardapi.board_hosts(fleet(), "root", admin=True))
    assert shown[:3] == [("a", 0, "busy", False, "job-ann", "ann"),
                         ("a", 1, "busy", False, "job-bob", "bob"),
                         ("a", 2, "held", False, "job-old", None)]


def test_queue_summary_waits() -> None:
    now = 1_000_000.0
    at_once = boardapi.queue_summary(0, 1, scheduler.Waiting(0, "starting", now), now)
    assert (at_once.expected_wait, at_once.wait_reason) == (0.0, None)
    later = boardapi.queue_summary(
        3, 4, scheduler.Waiting(4, "waiting for a free GPU", now + 90.04), now)
    assert (later.pending, later.running, later.expected_wait) == (3, 4, 90.0)
    assert later.wait_reason == "waiting for a free GPU"
    assert later.expected_start == "1970-01-12T13:48:10"
    never = boardapi.queue_summary(2, 0, scheduler.Waiting(3, "all eligible hosts down", None),
                                   now)
    assert (never.expected_start, never.expected_wait) == (None, None)
    assert never.wait_reason == "all eligible hosts down"


def test_probe_starts_at_once_on_a_free_gpu_and_dispatches_nothing(w: World) -> None:
    w.submit("r1", expected_time=100, time_limit=200)
    w.d.run_once()
    assert w.d.probe() == scheduler.Waiting(0, "starting", w.now)
    assert len(w.runs()) == 1  # only r1: the probe was never sent anywhere


def test_probe_waits_behind_the_queue(w: World) -> None:
    w.submit("r1", user="u1", expected_time=100, time_limit=200)
    w.submit("r2", user="u2", expected_time=40, time_limit=200)
    w.submit("q1", user="u3", expected_time=50)
    w.d.run_once()
    probe = w.d.probe()
    # q1 takes the GPU free at +40 and ends at +90, before the other one frees at +100.
    assert (probe.position, probe.reason) == (2, "waiting for a free GPU")
    assert probe.estimated_start == w.now + 90
    assert w.d.waiting(w.store.get("q1")).position == 1  # the real queue is untouched
    assert w.d.run_once() == 0


def test_next_to_start_is_the_fair_order_not_the_submission_order(w: World) -> None:
    w.submit("r1", user="u1", expected_time=100, time_limit=200)
    w.submit("r2", user="u2", expected_time=100, time_limit=200)
    w.d.run_once()  # both GPUs taken
    w.submit("a1", user="u1")
    w.submit("a2", user="u1")
    w.submit("b1", user="u3")  # u3 has nothing running: before u1, who has r1 running
    assert w.d.run_once() == 0  # the pass a submit wakes: no room, the plan is redone
    assert w.d.next_to_start(10) == ["b1", "a1", "a2"]
    assert w.d.next_to_start(2) == ["b1", "a1"]


def test_probe_on_a_drained_fleet_has_no_estimate(w: World) -> None:
    w.d.apply_inventory(inv(host("a", 2, drain=True)))
    probe = w.d.probe(gpus=2)
    assert (probe.position, probe.reason, probe.estimated_start) == (
        1, "all eligible hosts drained", None)


def test_recent_for_user_keeps_active_jobs_past_the_window(w: World) -> None:
    w.submit("old-pending", user="ann")  # no pass runs: it stays pending
    for i in range(5):
        w.submit(f"done-{i}", user="ann")
        w.store.cancel_pending(f"done-{i}")
    w.submit("other", user="bob")
    jobs = w.store.recent_for_user("ann", 2)
    assert [j.id for j in jobs] == ["done-4", "done-3", "old-pending"]
    assert all(j.stdout == b"" for j in jobs)
    assert w.store.queue_stats()[:2] == (2, 0)
    assert w.store.get("old-pending").status is Status.PENDING
