"""The agent's lease: jobs stop once the controller has been silent past it."""

from __future__ import annotations

import asyncio
import pathlib

from gpujobq.agent import core, spool
from gpujobq.protocol import messages

from tests.unit.test_agent_gpus import BlockingRuntime, run_job


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_silence_past_the_lease_stops_jobs_and_reports_them_lost(
        tmp_path: pathlib.Path) -> None:
    mono = Clock()
    agent = core.Agent(host="h", runtime=BlockingRuntime(), spool=spool.Spool(tmp_path),
                       lease=30, monotonic=mono)
    sent: list[messages.Up] = []
    agent.attach(sent.append)
    agent.handle(messages.Lease(seconds=10))  # the controller's value wins
    agent.handle(run_job((messages.GPU(index=0, virtual=True),)))
    await asyncio.sleep(0.05)
    mono.now += 9
    agent.handle(messages.Lease(seconds=10))  # renewed: silence starts again
    mono.now += 9
    assert agent.check_lease() == []
    mono.now += 2
    assert agent.check_lease() == [("job1", 1)]
    assert agent.check_lease() == []  # once
    await asyncio.wait_for(agent.jobs[("job1", 1)].task, 5)  # type: ignore[arg-type]
    (exited,) = [m for m in sent if isinstance(m, messages.Exited)]
    assert (exited.reason, exited.exit_code) == ("node_lost", None)
    assert exited.detail == ("stopped by the agent: no word from the controller for 11 s "
                             "(lease 10 s)")
    # The result is kept for the controller like any other.
    assert [(h.job_id, h.finished) for h in agent.held()] == [("job1", True)]


async def test_a_spool_the_agent_cannot_write_is_a_platform_failure(
        tmp_path: pathlib.Path) -> None:
    store = spool.Spool(tmp_path)
    agent = core.Agent(host="h", runtime=BlockingRuntime(), spool=store)
    sent: list[messages.Up] = []
    agent.attach(sent.append)
    store.folder("job1", 1).write_text("in the way")  # a file where the folder must go
    agent.handle(run_job(()))
    await asyncio.wait_for(agent.jobs[("job1", 1)].task, 5)  # type: ignore[arg-type]
    (exited,) = [m for m in sent if isinstance(m, messages.Exited)]
    assert exited.reason == "node_lost" and exited.detail.startswith("agent spool: ")
