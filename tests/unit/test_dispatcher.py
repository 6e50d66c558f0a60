"""The dispatcher's decisions, stepped with run_once against a real SQLite store."""

from __future__ import annotations

import pathlib

import pytest
from gpujobq.controller import agents, database, dispatcher, ratelimit, settings, store
from gpujobq.protocol import messages
from gpujobq.protocol.states import Status

LIMITS = ratelimit.Limits(submits=100, window=60, active=100)
GPUS = (messages.GPU(index=0, virtual=True), messages.GPU(index=1, virtual=True))


class FakeLink:
    """Stands in for agents.Link: records what the dispatcher sends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connected = True
        self.down_since: float | None = None
        self.sent: list[messages.Down] = []

    def send(self, msg: messages.Down) -> None:
        if not self.connected:
            raise agents.LinkDown("down")
        self.sent.append(msg)


class World:
    def __init__(self, tmp: pathlib.Path) -> None:
        self.now = 1000.0
        self.store = store.Store(database.open_database(tmp / "db.sqlite"), lambda: self.now)
        self.settings = settings.Settings(results_dir=tmp / "results", node_lost_after=60,
                                          max_retries=1)
        self.d = dispatcher.Dispatcher(
            store=self.store, settings=self.settings,
            hosts={"a": dispatcher.HostState(GPUS, drain=False)}, clock=lambda: self.now,
        )
        self.link = FakeLink("a")
        self.d.links["a"] = self.link  # type: ignore[assignment]

    def submit(self, job_id: str) -> store.Job:
        new = store.NewJob(id=job_id, user_id="u", competition_id="c", project_id="p",
                           expected_time=5, time_limit=10, code=b"print(1)", config=b"x: 1\n")
        return self.store.submit(new, LIMITS)[0]

    def exited(self, job_id: str, attempt: int, exit_code: int = 0) -> messages.Exited:
        return messages.Exited(job_id=job_id, attempt=attempt, at=self.now, reason="exit_code",
                               exit_code=exit_code, stdout=b"out")


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
    w.d.hosts["a"] = dispatcher.HostState(GPUS, drain=True)
    assert w.d.run_once() == 0


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
    assert w.link.sent == [messages.Cancel(job_id="ghost", attempt=3)]


def test_a_gpu_given_up_on_stays_taken_until_the_agent_lets_go(w: World) -> None:
    w.d.hosts["a"] = dispatcher.HostState(GPUS[:1], drain=False)
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
