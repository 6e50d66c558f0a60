"""The agent's GPU hygiene: GPUs found by NVML, and GPUs held back while processes linger.

A fake NVML probe and a fake runtime drive a real Agent over a real spool.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable

import pytest
from gpujobq.agent import core, runtime, spool
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason

H100 = "NVIDIA H100 80GB HBM3"
MEMORY = 85_520_809_984


def real_gpu(index: int) -> messages.GPU:
    return messages.GPU(index=index, uuid=f"GPU-{index:08x}-aaaa-bbbb-cccc-{index:012x}",
                        name=H100, memory=MEMORY)


class FakeProbe:
    """Stands in for gpus.Probe: GPUs and their processes as the test sets them."""

    def __init__(self, count: int = 2, *, available: bool = True) -> None:
        self._available = available
        self.found = tuple(real_gpu(i) for i in range(count))
        self.pids: dict[int, tuple[int, ...]] = {}
        self.errors: dict[int, Exception] = {}
        self.calls: list[int] = []  # every index processes() was asked about
        self.discovered = 0

    @property
    def available(self) -> bool:
        return self._available

    def discover(self) -> tuple[messages.GPU, ...]:
        self.discovered += 1
        return self.found

    def processes(self, index: int) -> tuple[int, ...]:
        self.calls.append(index)
        if index in self.errors:
            raise self.errors[index]
        return self.pids.get(index, ())


class FakeRuntime:
    """Stands in for a job runtime: the job "runs" and calls ``on_end`` as it ends."""

    name = "fake"
    isolated = False

    def __init__(self) -> None:
        self.on_end: Callable[[messages.RunJob], None] | None = None
        self.ran: list[messages.RunJob] = []
        self.released: list[tuple[str, int]] = []

    async def run(self, job: messages.RunJob, workdir: pathlib.Path, cancel: asyncio.Event,
                  report: runtime.Reporter) -> runtime.Outcome:
        self.ran.append(job)
        report.started()
        await asyncio.sleep(0)
        if self.on_end is not None:
            self.on_end(job)
        return runtime.Outcome(reason=Reason.EXIT_CODE, exit_code=0, stdout=b"done\n")

    async def release(self, job_id: str, attempt: int) -> None:
        self.released.append((job_id, attempt))


@pytest.fixture(autouse=True)
def quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "SETTLE", 0.4)


@pytest.fixture
def probe() -> FakeProbe:
    return FakeProbe()


@pytest.fixture
def fake_runtime() -> FakeRuntime:
    return FakeRuntime()


def make_agent(tmp_path: pathlib.Path, probe: FakeProbe | None,
               fake_runtime: FakeRuntime | None = None) -> core.Agent:
    return core.Agent(host="gpu1", runtime=fake_runtime or FakeRuntime(),
                      spool=spool.Spool(tmp_path / "spool"), probe=probe, clock=lambda: 123.0)


def run_job(gpus: tuple[messages.GPU, ...], job_id: str = "job1",
            attempt: int = 1) -> messages.RunJob:
    return messages.RunJob(job_id=job_id, attempt=attempt, code=b"print('hi')\n",
                           config=b"user_id: alice\n", gpus=gpus, time_limit=30.0)


async def finish(agent: core.Agent, run: messages.RunJob,
                 sent: list[messages.Up]) -> messages.Exited:
    """Run the job to its end; the Exited it reported."""
    agent.handle(run)
    task = agent.jobs[(run.job_id, run.attempt)].task
    assert task is not None
    await asyncio.wait_for(task, timeout=10)
    exits = [m for m in sent if isinstance(m, messages.Exited)]
    assert len(exits) == 1
    return exits[0]


def attached(agent: core.Agent) -> list[messages.Up]:
    sent: list[messages.Up] = []
    agent.attach(sent.append)
    return sent


# ---- what the agent says in hello --------------------------------------------------------


def test_hello_lists_discovered_gpus(tmp_path: pathlib.Path, probe: FakeProbe) -> None:
    agent = make_agent(tmp_path, probe)
    hello = agent.hello()
    assert hello.nvml is True
    assert hello.gpus == probe.found
    assert [(g.index, g.name, g.memory, g.virtual) for g in hello.gpus] == [
        (0, H100, MEMORY, False), (1, H100, MEMORY, False)]
    assert hello.host == "gpu1" and hello.runtime == "fake"
    assert hello.dirty == ()
    assert sorted(probe.calls) == [0, 1]  # every GPU was checked at start


def test_hello_without_probe(tmp_path: pathlib.Path) -> None:
    hello = make_agent(tmp_path, None).hello()
    assert hello.nvml is False
    assert hello.gpus == ()
    assert hello.dirty == ()


def test_hello_with_unavailable_probe(tmp_path: pathlib.Path) -> None:
    probe = FakeProbe(available=False)
    probe.pids[0] = (4242,)
    agent = make_agent(tmp_path, probe)
    hello = agent.hello()
    assert hello.nvml is False
    assert hello.gpus == ()
    assert hello.dirty == ()
    assert probe.discovered == 0 and probe.calls == []  # NVML is never asked
    assert agent.heartbeat().dirty == ()


def test_gpu_busy_at_start_is_dirty_in_hello(tmp_path: pathlib.Path, probe: FakeProbe) -> None:
    probe.pids[1] = (4242, 4343)
    hello = make_agent(tmp_path, probe).hello()
    assert [d.index for d in hello.dirty] == [1]
    dirty = hello.dirty[0]
    assert dirty.pids == (4242, 4343)
    assert "4242" in dirty.detail and "4343" in dirty.detail
    assert hello.gpus == probe.found  # still listed: held back, not hidden


def test_gpu_busy_at_start_is_given_back_once_clean(tmp_path: pathlib.Path,
                                                    probe: FakeProbe) -> None:
    probe.pids[0] = (4242,)
    agent = make_agent(tmp_path, probe)
    assert [d.index for d in agent.heartbeat().dirty] == [0]
    del probe.pids[0]
    assert agent.heartbeat().dirty == ()
    assert agent.hello().dirty == ()


# ---- after a job ----------------------------------------------------------------------


async def test_clean_job_leaves_no_dirty_gpu(tmp_path: pathlib.Path, probe: FakeProbe,
                                             fake_runtime: FakeRuntime) -> None:
    agent = make_agent(tmp_path, probe, fake_runtime)
    sent = attached(agent)
    probe.calls.clear()
    exited = await finish(agent, run_job((probe.found[0],)), sent)
    assert exited.dirty == ()
    assert exited.reason == Reason.EXIT_CODE and exited.exit_code == 0
    assert probe.calls == [0]  # checked once, found clean: no waiting
    assert fake_runtime.released == [("job1", 1)]


async def test_lingering_process_makes_gpu_dirty(tmp_path: pathlib.Path, probe: FakeProbe,
                                                 fake_runtime: FakeRuntime) -> None:
    agent = make_agent(tmp_path, probe, fake_runtime)
    sent = attached(agent)

    def leave_process(job: messages.RunJob) -> None:
        probe.pids[1] = (31337,)

    fake_runtime.on_end = leave_process
    probe.calls.clear()
    exited = await finish(agent, run_job((probe.found[1],)), sent)

    assert [d.index for d in exited.dirty] == [1]
    dirty = exited.dirty[0]
    assert dirty.pids == (31337,)
    assert "31337" in dirty.detail
    # It waited for the GPU to let go before saying so: checked more than once.
    assert probe.calls.count(1) >= 2
    assert 0 not in probe.calls  # the job's GPUs only
    # The result kept in the spool says the same (it is resent after a restart).
    assert spool.Spool(tmp_path / "spool").recover()[0].dirty == exited.dirty

    # Heartbeats keep holding it back while the process is there...
    for _ in range(3):
        beat = agent.heartbeat()
        assert [(d.index, d.pids) for d in beat.dirty] == [(1, (31337,))]
    assert [d.index for d in agent.hello().dirty] == [1]
    # ...and give it back once it is gone.
    del probe.pids[1]
    assert agent.heartbeat().dirty == ()
    assert agent.hello().dirty == ()
    assert agent.heartbeat().dirty == ()


async def test_dirty_gpu_detail_follows_its_processes(tmp_path: pathlib.Path,
                                                      probe: FakeProbe) -> None:
    probe.pids[0] = (100,)
    agent = make_agent(tmp_path, probe)
    probe.pids[0] = (100, 200)
    beat = agent.heartbeat()
    assert beat.dirty[0].pids == (100, 200)
    assert "100" in beat.dirty[0].detail and "200" in beat.dirty[0].detail
    probe.pids[0] = (200,)
    beat = agent.heartbeat()
    assert beat.dirty[0].pids == (200,)
    assert "100" not in beat.dirty[0].detail


async def test_process_gone_within_settle_window_is_clean(
        tmp_path: pathlib.Path, probe: FakeProbe, fake_runtime: FakeRuntime) -> None:
    agent = make_agent(tmp_path, probe, fake_runtime)
    sent = attached(agent)

    def exit_slowly(job: messages.RunJob) -> None:
        probe.pids[0] = (31337,)
        asyncio.get_running_loop().call_later(0.1, probe.pids.pop, 0)

    fake_runtime.on_end = exit_slowly
    probe.calls.clear()
    exited = await finish(agent, run_job((probe.found[0],)), sent)

    assert exited.dirty == ()
    assert probe.calls.count(0) >= 2  # it was seen busy at first, and waited for it
    assert agent.heartbeat().dirty == ()
    assert agent.hello().dirty == ()


async def test_exited_carries_every_held_back_gpu(tmp_path: pathlib.Path, probe: FakeProbe,
                                                  fake_runtime: FakeRuntime) -> None:
    probe.pids[0] = (4242,)  # left from before the agent started
    agent = make_agent(tmp_path, probe, fake_runtime)
    sent = attached(agent)
    exited = await finish(agent, run_job((probe.found[1],)), sent)
    assert [(d.index, d.pids) for d in exited.dirty] == [(0, (4242,))]


async def test_multi_gpu_job_reports_only_the_dirty_ones(
        tmp_path: pathlib.Path, fake_runtime: FakeRuntime) -> None:
    probe = FakeProbe(count=4)
    agent = make_agent(tmp_path, probe, fake_runtime)
    sent = attached(agent)

    def leave_processes(job: messages.RunJob) -> None:
        probe.pids[3] = (7,)
        probe.pids[1] = (5, 6)

    fake_runtime.on_end = leave_processes
    probe.calls.clear()
    exited = await finish(agent, run_job(probe.found[1:]), sent)
    assert [(d.index, d.pids) for d in exited.dirty] == [(1, (5, 6)), (3, (7,))]
    assert set(probe.calls) == {1, 2, 3}


# ---- virtual GPUs and NVML errors ------------------------------------------------------


async def test_virtual_gpus_are_never_checked(tmp_path: pathlib.Path, probe: FakeProbe,
                                              fake_runtime: FakeRuntime) -> None:
    agent = make_agent(tmp_path, probe, fake_runtime)
    sent = attached(agent)

    def busy_everywhere(job: messages.RunJob) -> None:
        probe.pids.update({0: (1,), 1: (2,)})

    fake_runtime.on_end = busy_everywhere
    probe.calls.clear()
    virtual = (messages.GPU(index=0, virtual=True), messages.GPU(index=1, virtual=True))
    exited = await finish(agent, run_job(virtual), sent)
    assert probe.calls == []
    assert exited.dirty == ()
    assert agent.heartbeat().dirty == ()
    assert probe.calls == []


async def test_virtual_gpus_beside_real_ones(tmp_path: pathlib.Path, probe: FakeProbe,
                                             fake_runtime: FakeRuntime) -> None:
    agent = make_agent(tmp_path, probe, fake_runtime)
    sent = attached(agent)
    probe.calls.clear()
    gpus = (messages.GPU(index=0, virtual=True), probe.found[1])
    exited = await finish(agent, run_job(gpus), sent)
    assert exited.dirty == ()
    assert probe.calls == [1]


async def test_virtual_gpus_without_nvml(tmp_path: pathlib.Path,
                                         fake_runtime: FakeRuntime) -> None:
    agent = make_agent(tmp_path, None, fake_runtime)
    sent = attached(agent)
    exited = await finish(agent, run_job((messages.GPU(index=0, virtual=True),)), sent)
    assert exited.dirty == ()
    assert agent.heartbeat().dirty == ()


async def test_nvml_error_after_job_makes_gpu_dirty(tmp_path: pathlib.Path, probe: FakeProbe,
                                                    fake_runtime: FakeRuntime) -> None:
    agent = make_agent(tmp_path, probe, fake_runtime)
    sent = attached(agent)

    def lose_gpu(job: messages.RunJob) -> None:
        probe.errors[0] = RuntimeError("GPU is lost")

    fake_runtime.on_end = lose_gpu
    exited = await finish(agent, run_job((probe.found[0],)), sent)
    assert [d.index for d in exited.dirty] == [0]
    assert exited.dirty[0].detail.startswith("NVML:")
    assert "GPU is lost" in exited.dirty[0].detail
    assert exited.dirty[0].pids == ()
    assert exited.reason == Reason.EXIT_CODE  # the job itself is not to blame

    assert [d.index for d in agent.heartbeat().dirty] == [0]  # still cannot check it
    del probe.errors[0]
    assert agent.heartbeat().dirty == ()


def test_nvml_error_at_start_makes_gpu_dirty(tmp_path: pathlib.Path, probe: FakeProbe) -> None:
    probe.errors[1] = OSError("Unknown Error")
    hello = make_agent(tmp_path, probe).hello()
    assert [d.index for d in hello.dirty] == [1]
    assert hello.dirty[0].detail.startswith("NVML:")
    assert "Unknown Error" in hello.dirty[0].detail


# ---- kept results sent again -----------------------------------------------------------


async def test_resent_result_does_not_undo_a_newer_dirty_report(
        tmp_path: pathlib.Path, probe: FakeProbe) -> None:
    """A kept result sent again must not tell the controller a dirty GPU is clean.

    The controller takes every Exited's ``dirty`` as the host's held-back GPUs: a result
    stored while GPU 0 was clean, resent after GPU 0 went dirty, would free GPU 0 for
    scheduling until the next heartbeat, though no check found it clean.
    """
    first = make_agent(tmp_path, probe)
    sent = attached(first)
    exited = await finish(first, run_job((probe.found[0],)), sent)
    assert exited.dirty == ()  # GPU 0 was clean when the job ended; the result is not acked

    probe.pids[0] = (4242,)  # e.g. a process left from before the agent restarted
    second = make_agent(tmp_path, probe)
    assert [d.index for d in second.hello().dirty] == [0]
    resent = attached(second)
    assert [m.job_id for m in resent if isinstance(m, messages.Exited)] == ["job1"]
    for msg in resent:
        if isinstance(msg, messages.Exited | messages.Heartbeat):
            assert [d.index for d in msg.dirty] == [0], msg


class BlockingRuntime(FakeRuntime):
    """A job that runs until cancelled."""

    async def run(self, job: messages.RunJob, workdir: pathlib.Path, cancel: asyncio.Event,
                  report: runtime.Reporter) -> runtime.Outcome:
        self.ran.append(job)
        report.started()
        await cancel.wait()
        return runtime.Outcome(reason=Reason.CANCELLED_BY_USER, exit_code=None)


async def test_a_run_on_a_gpu_still_in_use_is_refused_not_started(tmp_path: pathlib.Path,
                                                                  probe: FakeProbe) -> None:
    blocking = BlockingRuntime()
    agent = make_agent(tmp_path, probe, blocking)
    sent = attached(agent)
    agent.handle(run_job((real_gpu(0),), job_id="old"))
    await asyncio.sleep(0.05)
    assert [h.gpus for h in agent.held()] == [(0,)]
    refused = await finish(agent, run_job((real_gpu(0), real_gpu(1)), job_id="new"), sent)
    assert (refused.job_id, refused.reason) == ("new", "requeued")
    assert refused.detail == "GPU 0 is still in use by job old attempt 1"
    assert [r.job_id for r in blocking.ran] == ["old"]  # the new one never started
    # A dirty GPU is refused the same way.
    probe.pids[1] = (99,)
    agent.check_gpus([1])
    sent.clear()
    refused = await finish(agent, run_job((real_gpu(1),), job_id="other"), sent)
    assert refused.reason == "requeued" and refused.detail.startswith("GPU 1 is held back")
    agent.handle(messages.Cancel(job_id="old", attempt=1))
    await asyncio.wait_for(agent.jobs[("old", 1)].task, timeout=10)  # type: ignore[arg-type]
