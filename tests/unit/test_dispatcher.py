"""The dispatcher's decisions, stepped with run_once against a real SQLite store."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3

import msgspec
import pytest
from gpujobq.controller import agents, database, dispatcher, errors, ratelimit, settings, store
from gpujobq.protocol import inventory, messages
from gpujobq.protocol.states import Status

LIMITS = ratelimit.Limits(submits=100, window=60, active=100)
GPUS = (messages.GPU(index=0, virtual=True), messages.GPU(index=1, virtual=True))


class FakeLink:
    """Stands in for agents.Link: records what the dispatcher sends."""

    def __init__(self, name: str, address: str = "", port: int = 8022, user: str = "gpujobq",
                 fingerprint: str = "") -> None:
        self.name = name
        self.address = address
        self.port = port
        self.user = user
        self.fingerprint = fingerprint or f"key of {name}"
        self.connected = True
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.dropped: list[str] = []
        self.sent: list[messages.Down] = []
        self.leases: list[messages.Lease] = []  # kept apart: they come every few seconds

    def drop(self, why: str) -> None:
        self.dropped.append(why)

    def send(self, msg: messages.Down) -> None:
        if not self.connected:
            raise agents.LinkDown("down")
        if isinstance(msg, messages.Lease):
            self.leases.append(msg)
        else:
            self.sent.append(msg)


class World:
    def __init__(self, tmp: pathlib.Path) -> None:
        self.now = 1000.0
        self.store = store.Store(database.open_database(tmp / "db.sqlite"), lambda: self.now)
        self.settings = settings.Settings(results_dir=tmp / "results", node_lost_after=60,
                                          lease=50, lease_margin=5,
                                          max_retries=1)
        self.made: list[FakeLink] = []
        self.d = dispatcher.Dispatcher(
            store=self.store, settings=self.settings, inventory=inv(host("a", 2)),
            link_factory=self.make_link, clock=lambda: self.now, monotonic=lambda: self.now,
        )
        self.link = self.d.nodes["a"].link

    def make_link(self, h: inventory.Host, handler: agents.Handler) -> FakeLink:
        link = FakeLink(h.name, h.address, h.port, h.user, h.host_key or "")
        self.made.append(link)
        return link

    def submit(self, job_id: str, user: str = "u", gpus: int = 1, competition: str = "c",
               expected_time: float = 5, time_limit: float = 10) -> store.Job:
        new = store.NewJob(id=job_id, user_id=user, competition_id=competition, project_id="p",
                           expected_time=expected_time, time_limit=time_limit,
                           code=b"print(1)", config=b"x: 1\n", gpu_count=gpus)
        return self.store.submit(new, LIMITS)[0]

    def runs(self, link: FakeLink | None = None) -> list[messages.RunJob]:
        return [m for m in (link or self.link).sent if isinstance(m, messages.RunJob)]

    def exited(self, job_id: str, attempt: int, exit_code: int = 0) -> messages.Exited:
        return messages.Exited(job_id=job_id, attempt=attempt, at=self.now, reason="exit_code",
                               exit_code=exit_code, stdout=b"out")


def host(name: str, gpus: int, address: str = "", **kw: object) -> dict[str, object]:
    return {"name": name, "address": address or f"10.0.0.{ord(name[0])}",
            "host_key": f"key of {name}",
            "gpus": [{"index": i, "virtual": True} for i in range(gpus)], **kw}


def inv(*hosts: dict[str, object], **extra: object) -> inventory.Inventory:
    return msgspec.convert({"hosts": list(hosts), **extra}, inventory.Inventory)


@pytest.fixture
def w(tmp_path: pathlib.Path) -> World:
    return World(tmp_path)


def test_dispatches_fifo_onto_free_gpus(w: World) -> None:
    for name in ("j1", "j2", "j3"):
        w.submit(name)
    assert w.d.run_once() == 2
    runs = [m for m in w.link.sent if isinstance(m, messages.RunJob)]
    assert [(r.job_id, r.attempt, r.gpus[0].index) for r in runs] == [("j1", 1, 0), ("j2", 1, 1)]
    assert runs[0].time_limit == 10 and runs[0].code == b"print(1)"
    assert w.store.get("j3").status is Status.PENDING
    assert w.d.run_once() == 0


def test_result_frees_the_gpu_and_is_acked(w: World, tmp_path: pathlib.Path) -> None:
    w.submit("j1")
    w.d.run_once()
    w.d.on_message(w.link, w.exited("j1", 1))  # type: ignore[arg-type]
    job = w.store.get("j1")
    assert (job.status, job.stdout) == (Status.COMPLETED, b"out")
    assert w.link.sent[-1] == messages.Ack(job_id="j1", attempt=1)
    assert len(list((tmp_path / "results").glob("u_c_*.jsonl"))) == 1


def test_stale_attempt_is_acked_but_changes_nothing(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    w.d.on_message(w.link, w.exited("j1", 7, exit_code=1))  # type: ignore[arg-type]
    assert w.store.get("j1").status is Status.RUNNING
    assert w.link.sent[-1] == messages.Ack(job_id="j1", attempt=7)


def test_no_dispatch_to_a_disconnected_or_drained_host(w: World) -> None:
    w.submit("j1")
    w.link.connected = False
    assert w.d.run_once() == 0
    w.link.connected = True
    w.d.apply_inventory(inv(host("a", 2, drain=True)))
    assert w.d.run_once() == 0
    assert w.d.waiting(w.store.get("j1")).reason == "all eligible hosts drained"
    w.d.apply_inventory(inv(host("a", 2)))
    assert w.d.run_once() == 1


def test_lost_host_requeues_then_fails_node_lost(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    w.link.connected, w.link.down_since = False, w.now
    w.now += 30
    w.d.run_once()
    assert w.store.get("j1").status is Status.RUNNING  # not yet: 60 s grace
    w.now += 31
    w.d.run_once()
    assert w.store.get("j1").status is Status.PENDING
    w.link.connected, w.link.down_since = True, None
    w.d.run_once()
    assert w.store.get("j1").attempt == 2
    w.link.connected, w.link.down_since = False, w.now
    w.now += 61
    w.d.run_once()
    job = w.store.get("j1")
    assert (job.status, job.reason) == (Status.FAILED, "node_lost")


def test_a_cancelled_job_on_a_lost_host_is_not_run_again(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    w.d.cancel(w.store.get("j1"))
    assert w.link.sent[-1] == messages.Cancel(job_id="j1", attempt=1)
    w.link.connected, w.link.down_since = False, w.now
    w.now += 61
    w.d.run_once()
    assert w.store.get("j1").status is Status.CANCELLED


def test_cancel_while_the_host_is_down_is_immediate(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    w.link.connected = False
    job = w.d.cancel(w.store.get("j1"))
    assert (job.status, job.reason) == (Status.CANCELLED, "cancelled_by_user")


def test_reconcile_on_connect(w: World) -> None:
    w.submit("j1")
    w.submit("j2")
    w.d.run_once()
    hello = messages.Hello(host="a", runtime="process", jobs=(
        messages.HeldJob(job_id="j2", attempt=1, finished=False),
        messages.HeldJob(job_id="ghost", attempt=3, finished=False),
    ))
    w.link.sent.clear()
    w.d.on_connected(w.link, hello)  # type: ignore[arg-type]
    assert w.store.get("j1").status is Status.PENDING  # the agent lost it: requeued
    assert w.store.get("j2").status is Status.RUNNING
    # The running one is re-attached from the output this controller has (none yet).
    assert w.link.sent == [messages.Attach(job_id="j2", attempt=1, stdout=0, stderr=0),
                           messages.Cancel(job_id="ghost", attempt=3)]


def test_a_gpu_given_up_on_stays_taken_until_the_agent_lets_go(w: World) -> None:
    w.d.apply_inventory(inv(host("a", 1)))
    w.submit("j1")
    w.d.run_once()
    w.link.connected = False
    w.d.cancel(w.store.get("j1"))  # cancelled here; the agent may still be running it
    w.link.connected = True
    w.submit("j2")
    hello = messages.Hello(host="a", runtime="process", jobs=(
        messages.HeldJob(job_id="j1", attempt=1, finished=False),))
    w.d.on_connected(w.link, hello)  # type: ignore[arg-type]
    assert w.link.sent[-1] == messages.Cancel(job_id="j1", attempt=1)
    assert w.d.run_once() == 0  # the old attempt still holds GPU 0
    w.d.on_message(w.link, messages.Heartbeat(at=w.now, jobs=()))  # type: ignore[arg-type]
    assert w.d.run_once() == 1
    assert w.store.get("j2").status is Status.RUNNING


def test_a_job_its_agent_never_took_is_requeued(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    beat = messages.Heartbeat(at=w.now, jobs=())
    w.now += 5
    w.d.on_message(w.link, beat)  # type: ignore[arg-type]
    assert w.store.get("j1").status is Status.RUNNING  # may still be on its way
    w.now += dispatcher.UNHELD_AFTER
    w.d.on_message(w.link, beat)  # type: ignore[arg-type]
    assert w.store.get("j1").status is Status.PENDING
    assert w.store.get("j1").retries == 1


# ---- the fleet: several hosts, reloads, health ---------------------------------------


def test_global_queue_places_on_any_host_with_enough_gpus(w: World) -> None:
    w.d.apply_inventory(inv(host("a", 2), host("b", 4)))
    b = w.made[-1]
    w.submit("big", user="u1", gpus=4)
    w.submit("small", user="u2", gpus=1)
    w.submit("pair", user="u3", gpus=2)
    assert w.d.run_once() == 2
    assert [(r.job_id, [g.index for g in r.gpus]) for r in w.runs(b)] == [("big", [0, 1, 2, 3])]
    on_a = {r.job_id: [g.index for g in r.gpus] for r in w.runs()}
    assert on_a == {"small": [0]}
    pair = w.store.get("pair")
    assert pair.status is Status.PENDING
    assert w.d.waiting(pair).reason == "waiting for 2 free GPUs on one host"


def test_status_position_reason_and_estimate(w: World) -> None:
    w.submit("r1", user="u1", expected_time=100, time_limit=200)
    w.submit("r2", user="u2", expected_time=100, time_limit=200)
    w.submit("q1", user="u3", expected_time=50)
    w.submit("q2", user="u4", expected_time=50)
    w.d.run_once()
    q1, q2 = w.d.waiting(w.store.get("q1")), w.d.waiting(w.store.get("q2"))
    assert (q1.position, q1.reason) == (1, "waiting for a free GPU")
    assert q2.position == 2
    assert q1.estimated_start == w.now + 100 and q2.estimated_start == w.now + 100
    w.submit("q3", user="u5")  # submitted since the last pass: planned on demand
    assert w.d.waiting(w.store.get("q3")).position == 3
    assert w.d.waiting(w.store.get("r1")) is None


def test_removed_host_drains_then_leaves(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    w.d.apply_inventory(inv())
    assert "a" in w.d.nodes and w.d.nodes["a"].removing
    w.submit("j2", user="u2")
    assert w.d.run_once() == 0  # takes no new job
    assert w.d.waiting(w.store.get("j2")).reason == "all eligible hosts drained"
    w.d.on_message(w.link, w.exited("j1", 1))  # type: ignore[arg-type]
    w.d.run_once()
    assert "a" not in w.d.nodes
    assert w.store.get("j1").status is Status.COMPLETED


def test_host_back_in_the_inventory_before_it_left_stays(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    w.d.apply_inventory(inv())
    w.d.apply_inventory(inv(host("a", 2)))
    assert not w.d.nodes["a"].removing and w.d.nodes["a"].link is w.link


def test_new_address_means_a_new_link_and_the_old_ones_reports_are_ignored(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    changes = w.d.apply_inventory(inv(host("a", 2, address="10.9.9.9")))
    assert changes == ["reconnecting to host a at 10.9.9.9:8022"]
    new = w.d.nodes["a"].link
    assert new is not w.link and new.address == "10.9.9.9"
    w.d.on_message(w.link, w.exited("j1", 1))  # type: ignore[arg-type]
    assert w.store.get("j1").status is Status.RUNNING
    w.d.on_message(new, w.exited("j1", 1))
    assert w.store.get("j1").status is Status.COMPLETED


def test_a_bad_host_key_changes_nothing(w: World) -> None:
    def failing(h: inventory.Host, handler: agents.Handler) -> FakeLink:
        raise inventory.InventoryError(f"host {h.name}: bad host key")

    w.d.link_factory = failing  # type: ignore[assignment]
    with pytest.raises(inventory.InventoryError):
        w.d.apply_inventory(inv(host("a", 2), host("b", 2)))
    assert list(w.d.nodes) == ["a"] and w.d.inventory.hosts[0].name == "a"


def test_silent_host_is_down_then_its_jobs_are_node_lost(w: World) -> None:
    w.d.apply_inventory(inv(host("a", 1), host("b", 1)))
    b = w.made[-1]
    w.submit("j1")
    w.d.run_once()
    assert w.store.get("j1").node == "a"
    beat = messages.Heartbeat(at=w.now)
    w.d.on_message(w.link, beat)  # type: ignore[arg-type]
    w.d.on_message(b, beat)  # type: ignore[arg-type]
    w.now += w.settings.heartbeat_timeout + 1
    w.d.on_message(b, beat)  # type: ignore[arg-type]
    w.d.run_once()
    assert w.link.dropped  # a host that went silent is reconnected to
    assert w.d.nodes["a"].state(w.now, w.settings.heartbeat_timeout) == "down"
    assert w.store.get("j1").status is Status.RUNNING  # not lost yet
    w.now += w.settings.node_lost_after
    w.d.on_message(b, beat)  # type: ignore[arg-type]
    w.d.run_once()
    job = w.store.get("j1")
    assert (job.status, job.node, job.attempt) == (Status.RUNNING, "b", 2)
    events = w.store.events("j1")
    assert any(e["reason"] == "requeued" and "node lost" in e["detail"] for e in events)


def test_dirty_gpus_are_held_back(w: World) -> None:
    dirty = (messages.DirtyGPU(index=0, pids=(42,), detail="process 42"),)
    w.d.on_message(w.link, messages.Heartbeat(at=w.now, dirty=dirty))  # type: ignore[arg-type]
    w.submit("j1")
    w.submit("j2", user="u2")
    assert w.d.run_once() == 1
    assert [g.index for g in w.runs()[0].gpus] == [1]
    w.d.on_message(w.link, messages.Heartbeat(at=w.now))  # type: ignore[arg-type]
    assert w.d.run_once() == 1
    assert [g.index for g in w.runs()[1].gpus] == [0]


def test_competition_profile_reaches_the_job(w: World) -> None:
    w.d.apply_inventory(inv(host("a", 2, labels={"gpu": "a100"}), host("b", 2), competitions={
        "c": {"image": "img:1", "network": True, "labels": {"gpu": "a100"},
              "mounts": [{"source": "/srv/data/c", "target": "/data"}]}}))
    w.submit("j1")
    w.d.run_once()
    (run,) = w.runs()
    assert (run.image, run.network) == ("img:1", True)
    assert run.mounts == (messages.Mount(source="/srv/data/c", target="/data"),)
    w.submit("j2", user="u2", gpus=2)
    w.d.run_once()
    assert w.d.waiting(w.store.get("j2")).reason == "waiting for 2 free GPUs on one host"


def test_after_a_controller_restart_gpus_of_unknown_attempts_stay_taken(w: World) -> None:
    # A fresh controller knows nothing of j0 attempt 1, still running on GPU 0 there.
    w.submit("j2")
    hello = messages.Hello(host="a", runtime="process", jobs=(
        messages.HeldJob(job_id="j0", attempt=1, finished=False, gpus=(0,)),))
    w.d.on_connected(w.link, hello)  # type: ignore[arg-type]
    assert w.link.sent[-1] == messages.Cancel(job_id="j0", attempt=1)
    w.d.run_once()
    assert [g.index for g in w.runs()[0].gpus] == [1]
    # A heartbeat may also reveal such an attempt; once it ended, the GPU is free again.
    w.submit("j3", user="u3")
    beat = messages.Heartbeat(at=w.now, jobs=(
        messages.HeldJob(job_id="j0", attempt=1, finished=False, gpus=(0,)),
        messages.HeldJob(job_id="j2", attempt=1, finished=False, gpus=(1,))))
    w.d.on_message(w.link, beat)  # type: ignore[arg-type]
    assert w.d.run_once() == 0
    w.d.on_message(w.link, messages.Heartbeat(at=w.now, jobs=beat.jobs[1:]))  # type: ignore
    assert w.d.run_once() == 1


def test_a_run_the_agent_refuses_goes_back_to_the_queue_without_a_retry(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    refusal = messages.Exited(job_id="j1", attempt=1, at=w.now, reason="requeued",
                              exit_code=None, detail="GPU 0 is still in use by job x")
    w.d.on_message(w.link, refusal)  # type: ignore[arg-type]
    job = w.store.get("j1")
    assert (job.status, job.retries) == (Status.PENDING, 0)
    assert w.link.sent[-1] == messages.Ack(job_id="j1", attempt=1)
    w.d.run_once()
    again = w.runs()[-1]
    assert (again.attempt, [g.index for g in again.gpus]) == (2, [1])  # not GPU 0 for now


def test_a_removed_host_that_stays_down_leaves_anyway(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    w.link.connected, w.link.down_since = False, w.now
    w.d.apply_inventory(inv())
    w.now += w.settings.node_lost_after + 1
    w.d.run_once()  # j1 is requeued; its attempt may still run on the dead host
    w.d.run_once()
    assert "a" not in w.d.nodes and not w.d.lingering
    assert w.d.waiting(w.store.get("j1")).reason == "no host has 1 GPU"


def test_two_names_for_one_agent_are_refused(w: World) -> None:
    twin = host("b", 2)
    twin["host_key"] = "key of a"
    with pytest.raises(inventory.InventoryError, match="hosts a and b have the same host key"):
        w.d.apply_inventory(inv(host("a", 2), twin))
    # A rename: while the old name drains out, the new one is refused too.
    w.submit("j1")
    w.d.run_once()
    with pytest.raises(inventory.InventoryError, match="still draining"):
        w.d.apply_inventory(inv(twin))
    assert list(w.d.nodes) == ["a"] and not w.d.nodes["a"].removing


def test_a_new_host_key_means_a_new_link(w: World) -> None:
    rekeyed = host("a", 2)
    rekeyed["host_key"] = "new key of a"
    assert w.d.apply_inventory(inv(rekeyed)) == [
        f"reconnecting to host a at {rekeyed['address']}:8022"]
    assert w.d.nodes["a"].link.fingerprint == "new key of a"


def test_leases_are_renewed_and_a_lost_report_requeues(w: World) -> None:
    w.d.run_once()
    assert w.link.leases == [messages.Lease(seconds=50)]
    w.now += dispatcher.LEASE_RENEW - 1
    w.d.run_once()
    assert len(w.link.leases) == 1
    w.now += 1
    w.d.run_once()
    assert len(w.link.leases) == 2
    # A host is written off only after the lease and its margin, whatever node_lost_after says.
    w.settings.node_lost_after = 1
    assert w.d.lost_after == 55
    # The agent stopped a job on its own (lease ran out): a platform failure, retried.
    w.submit("j1")
    w.d.run_once()
    lost = messages.Exited(job_id="j1", attempt=1, at=w.now, reason="node_lost",
                           exit_code=None, detail="no word from the controller for 51 s")
    w.d.on_message(w.link, lost)  # type: ignore[arg-type]
    job = w.store.get("j1")
    assert (job.status, job.retries) == (Status.PENDING, 1)
    assert w.link.sent[-1] == messages.Ack(job_id="j1", attempt=1)


def test_a_record_a_crash_kept_from_being_written_is_written_once(
        w: World, tmp_path: pathlib.Path) -> None:
    w.submit("j1")
    w.d.run_once()
    w.d.recorder._record_all = lambda jobs: 0  # type: ignore[method-assign]  # crashed first
    w.d.on_message(w.link, w.exited("j1", 1))  # type: ignore[arg-type]
    del w.d.recorder._record_all
    assert [j.id for j in w.store.unrecorded()] == ["j1"]
    assert w.d.recorder.record_missing() == 1
    assert w.d.recorder.record_missing() == 0
    records = list((tmp_path / "results").glob("u_c_*.jsonl"))
    assert len(records) == 1
    # Written again after a crash between the write and its note: still one record.
    w.store.db.execute("UPDATE jobs SET recorded = 0")
    assert w.d.recorder.record_missing() == 1
    assert list((tmp_path / "results").glob("u_c_*.jsonl")) == records


# ---- an admin's requeue ------------------------------------------------------------------


def test_admin_requeue_stops_the_attempt_and_runs_the_job_again(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    job = w.d.requeue_by_admin(w.store.get("j1"), "root")
    assert (job.status, job.retries) == (Status.PENDING, 0)  # no retry counted
    assert w.link.sent[-1] == messages.Cancel(job_id="j1", attempt=1)
    assert w.d.run_once() == 1
    again = w.store.get("j1")
    assert (again.status, again.attempt, again.gpus) == (Status.RUNNING, 2, (1,))  # GPU 0 held
    # The stopped attempt's report changes nothing and frees its GPU.
    w.d.on_message(w.link, w.exited("j1", 1, exit_code=1))  # type: ignore[arg-type]
    assert w.store.get("j1").status is Status.RUNNING
    assert w.d.lingering == {}
    w.d.on_message(w.link, w.exited("j1", 2))  # type: ignore[arg-type]
    assert w.store.get("j1").status is Status.COMPLETED


def test_admin_requeue_of_a_finished_job_runs_it_again(w: World, tmp_path: pathlib.Path
                                                        ) -> None:
    w.submit("j1")
    w.d.run_once()
    w.d.on_message(w.link, messages.Exited(  # type: ignore[arg-type]
        job_id="j1", attempt=1, at=w.now, reason="exit_code", exit_code=3, stdout=b"first",
        files=(messages.OutputFile(name="out.txt", data=b"x"),)))
    assert w.store.get("j1").status is Status.FAILED
    job = w.d.requeue_by_admin(w.store.get("j1"), "root")
    assert (job.status, job.stdout, job.exit_code, job.reason, job.completed_at) == \
        (Status.PENDING, b"", None, None, None)
    assert w.store.files("j1") == []
    w.now += 1
    w.d.run_once()
    w.d.on_message(w.link, w.exited("j1", 2))  # type: ignore[arg-type]
    assert (w.store.get("j1").status, w.store.get("j1").stdout) == (Status.COMPLETED, b"out")
    records = sorted((tmp_path / "results").glob("u_c_*.jsonl"))
    assert len(records) == 2  # one per run; neither replaced


def test_admin_requeue_refusals(w: World) -> None:
    w.submit("j1")
    with pytest.raises(errors.Conflict, match="pending already"):
        w.d.requeue_by_admin(w.store.get("j1"), "root")
    w.d.run_once()
    # The user's cancel is on its way: a requeue must not undo it.
    w.d.cancel(w.store.get("j1"))
    with pytest.raises(errors.Conflict, match="being cancelled"):
        w.d.requeue_by_admin(w.store.get("j1"), "root")
    assert w.store.get("j1").cancel_requested

    w.submit("j2")
    w.d.run_once()
    w.link.connected, w.link.down_since = False, w.now
    with pytest.raises(errors.Conflict, match="host a is unreachable"):
        w.d.requeue_by_admin(w.store.get("j2"), "root")
    assert w.store.get("j2").status is Status.RUNNING
    # Cancelled while its host is down, it may still run there: no rerun until it stops.
    cancelled = w.d.cancel(w.store.get("j2"), by_admin="root")
    assert cancelled.status is Status.CANCELLED
    with pytest.raises(errors.Conflict, match="may still run on host a"):
        w.d.requeue_by_admin(w.store.get("j2"), "root")
    events = w.store.events("j2")
    assert any("cancelled by admin root" in (e["detail"] or "") for e in events)
    w.link.connected = True
    w.d.on_message(w.link, messages.Heartbeat(at=w.now, jobs=()))  # type: ignore[arg-type]
    assert w.d.requeue_by_admin(w.store.get("j2"), "root").status is Status.PENDING


def running_on_two_hosts(w: World) -> tuple[FakeLink, list[str], list[str]]:
    """Hosts a (2 GPUs) and b (1), three users' jobs running on them: b's link and the
    jobs on a and on b."""
    w.d.apply_inventory(inv(host("a", 2), host("b", 1)))
    link_b = w.d.nodes["b"].link
    for job_id, user in (("j1", "u1"), ("j2", "u2"), ("j3", "u3")):
        w.submit(job_id, user=user)
    w.d.run_once()
    return link_b, [r.job_id for r in w.runs()], [r.job_id for r in w.runs(link_b)]


def store_bursts(w: World) -> None:
    """Store the bursts received so far now, as the group's flush does."""
    w.d.commits.flush_with(w.d._store_bursts)


def test_a_burst_that_cannot_be_stored_spoils_no_other_agents_burst(w: World) -> None:
    link_b, on_a, on_b = running_on_two_hosts(w)
    bad = msgspec.structs.replace(w.exited(on_a[0], 1), exit_code=2**63)  # cannot be bound
    w.d._bursts = [(w.link, [w.exited(on_a[1], 1), bad]), (link_b, [w.exited(on_b[0], 1)])]
    store_bursts(w)
    assert w.store.get(on_b[0]).status is Status.COMPLETED  # stored, acked, link kept
    assert messages.Ack(job_id=on_b[0], attempt=1) in link_b.sent and not link_b.dropped
    # a's whole burst is undone (its good report too) and a reconnects to send it again.
    assert {w.store.get(j).status for j in on_a} == {Status.RUNNING}
    assert not any(isinstance(m, messages.Ack) for m in w.link.sent)
    assert len(w.link.dropped) == 1


async def test_bursts_of_one_turn_are_stored_with_its_submits_in_one_commit(
        w: World) -> None:
    """Agents' bursts queue in the group like submits: one transaction and one COMMIT for
    all that arrived in the turn, acks sent after it."""
    link_b, on_a, on_b = running_on_two_hosts(w)
    sql: list[str] = []
    w.store.db.conn.set_trace_callback(sql.append)
    limits = ratelimit.Limits(submits=100, window=60, active=100)
    new = store.NewJob(id="j4", user_id="u4", competition_id="c", project_id="p",
                       expected_time=5, time_limit=10, code=b"1", config=b"x: 1\n")
    submitted = asyncio.ensure_future(w.d.commits.run(lambda: w.store.submit_within(new, limits)))
    w.d.on_messages(w.link, [w.exited(j, 1) for j in on_a])
    w.d.on_messages(link_b, [w.exited(on_b[0], 1)])
    assert not w.link.sent[len(on_a):] and not sql  # nothing before the COMMIT
    job, created = await submitted
    w.store.db.conn.set_trace_callback(None)
    assert created and job.status is Status.PENDING
    first = sql[:sql.index("COMMIT") + 1]  # then the notes of the records written
    assert [s for s in first if s.startswith("BEGIN")] == ["BEGIN IMMEDIATE"]
    assert sum(s.startswith("INSERT INTO jobs ") for s in first) == 1
    assert sum(s.startswith("UPDATE jobs SET status") for s in first) == 3
    assert {w.store.get(j).status for j in on_a + on_b} == {Status.COMPLETED}
    assert messages.Ack(job_id=on_b[0], attempt=1) in link_b.sent
    assert not w.link.dropped and not link_b.dropped
    # Stored: a later failure reconnects only the agents of its own reports.
    w.d._bursts_not_stored(OSError("a later failure"))
    assert not w.link.dropped and not link_b.dropped


async def test_a_failed_commit_of_queued_bursts_reconnects_their_agents(w: World) -> None:
    """The COMMIT fails (the write lock is held past the timeout, as a full disk fails
    it): nothing is stored or acked, and each agent reconnects to send its results again."""
    link_b, on_a, on_b = running_on_two_hosts(w)
    other = sqlite3.connect(w.settings.results_dir.parent / "db.sqlite", timeout=0)
    other.execute("BEGIN IMMEDIATE")
    w.store.db.conn.execute("PRAGMA busy_timeout = 0")
    try:
        w.d.on_messages(w.link, [w.exited(j, 1) for j in on_a])
        w.d.on_messages(link_b, [w.exited(on_b[0], 1)])
        await asyncio.sleep(0)  # the group's turn
    finally:
        other.rollback()
        other.close()
    assert {w.store.get(j).status for j in on_a + on_b} == {Status.RUNNING}
    assert not any(isinstance(m, messages.Ack) for m in w.link.sent + link_b.sent)
    assert len(w.link.dropped) == 1 and len(link_b.dropped) == 1


def test_a_start_and_end_in_one_burst_are_stored_as_two_separate_ones_would_be(
        w: World, tmp_path: pathlib.Path) -> None:
    """Started then Exited in one burst (an instant job, a script that fails at once):
    one UPDATE, the same row, events and record as when they come apart."""
    w.d.apply_inventory(inv(host("a", 2)))
    w.submit("apart", user="u1")
    w.submit("together", user="u2")
    w.d.run_once()
    started = {j: messages.Started(job_id=j, attempt=1, at=w.now - 1)
               for j in ("apart", "together")}
    w.d._bursts = [(w.link, [started["apart"]])]
    store_bursts(w)
    w.d._bursts = [(w.link, [w.exited("apart", 1)])]
    store_bursts(w)
    updates: list[str] = []
    w.store.db.conn.set_trace_callback(
        lambda sql: updates.append(sql) if sql.startswith("UPDATE jobs SET status") else None)
    w.d._bursts = [(w.link, [started["together"], w.exited("together", 1)])]
    store_bursts(w)
    w.store.db.conn.set_trace_callback(None)
    assert len(updates) == 1
    a, t = w.store.get("apart"), w.store.get("together")
    same = ("status", "reason", "exit_code", "stdout", "started_at", "completed_at", "attempt")
    assert [getattr(a, f) for f in same] == [getattr(t, f) for f in same]
    assert t.started_at == w.now - 1
    shape = [(e["from_status"], e["to_status"], e["reason"]) for e in w.store.events("apart")]
    assert shape == [(e["from_status"], e["to_status"], e["reason"])
                     for e in w.store.events("together")]
    assert messages.Ack(job_id="together", attempt=1) in w.link.sent
    assert w.d.started_seen == {} and "together" not in w.d.live
    assert len(list((tmp_path / "results").glob("u2_c_*.jsonl"))) == 1


def test_a_start_whose_end_in_the_burst_is_stale_stores_nothing(w: World) -> None:
    w.submit("j1")
    w.d.run_once()
    w.d._bursts = [(w.link, [messages.Started(job_id="j1", attempt=7, at=w.now),
                             w.exited("j1", 7)])]
    store_bursts(w)
    job = w.store.get("j1")
    assert (job.status, job.started_at) == (Status.RUNNING, None)
    assert messages.Ack(job_id="j1", attempt=7) in w.link.sent


def test_on_a_full_fleet_a_submit_costs_no_pass_until_a_gpu_may_be_free(w: World) -> None:
    for name in ("j1", "j2"):
        w.submit(name)
    assert w.d.run_once() == 2  # both GPUs taken
    assert not w.d.futile()  # that pass still had room
    assert w.d.run_once() == 0  # this one found none
    w.submit("j3")
    w.d.wake(frees=False)  # what a submit does
    assert w.d.futile()
    w.now += 0.5
    assert w.d.futile()
    # A job ends: its GPU is free, the next pass is not skipped and starts j3.
    w.d.on_message(w.link, w.exited("j1", 1))  # type: ignore[arg-type]
    assert not w.d.futile()
    assert w.d.run_once() == 1
    assert [r.job_id for r in w.runs()] == ["j1", "j2", "j3"]
    # Full again: skipped, but never longer than a TICK (leases, lost hosts).
    assert w.d.run_once() == 0
    w.submit("j4")
    w.d.wake(frees=False)
    assert w.d.futile()
    w.now += dispatcher.TICK
    assert not w.d.futile()


@pytest.mark.parametrize("event", ["connected", "inventory", "admin requeue"])
def test_what_may_free_a_gpu_ends_the_skipping(w: World, event: str) -> None:
    for name in ("j1", "j2", "j3"):
        w.submit(name)
    w.d.run_once()
    w.d.run_once()
    w.d.wake(frees=False)
    assert w.d.futile()
    if event == "connected":
        hello = messages.Hello(host="a", runtime="process", gpus=GPUS, jobs=(
            messages.HeldJob(job_id="j1", attempt=1, finished=False),
            messages.HeldJob(job_id="j2", attempt=1, finished=False)))
        w.d.on_connected(w.link, hello)  # type: ignore[arg-type]
    elif event == "inventory":
        w.d.apply_inventory(inv(host("a", 2), host("b", 1)))
    else:
        w.d.requeue_by_admin(w.store.get("j1"), "root")
    assert not w.d.futile()
