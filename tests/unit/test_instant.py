"""The instant runtime: every job ends at once with the admin's output and exit code.

The runtime is driven directly (its reports recorded) and inside a real Agent over a
real spool, as `serve --runtime instant` and `simulate` run it.
"""

from __future__ import annotations

import asyncio
import pathlib
import threading

import pytest
from gpujobq.agent import core, instant, runtime, spool
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason, Status, final_status


class Recorder:
    """What a runtime tells the agent, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def started(self) -> None:
        self.calls.append(("started", b""))

    def output(self, stream: str, data: bytes) -> None:
        self.calls.append((stream, data))


def run_job(job_id: str = "job1", attempt: int = 1, output_cap: int = 1 << 20
            ) -> messages.RunJob:
    return messages.RunJob(job_id=job_id, attempt=attempt, code=b"raise SystemExit(3)\n",
                           config=b"", time_limit=60, output_cap=output_cap)


async def run(rt: instant.InstantRuntime, job: messages.RunJob, tmp_path: pathlib.Path
              ) -> tuple[runtime.Outcome, Recorder]:
    report = Recorder()
    outcome = await rt.run(job, tmp_path, asyncio.Event(), report)
    return outcome, report


async def test_a_job_ends_at_once_with_the_configured_output(tmp_path: pathlib.Path) -> None:
    rt = instant.InstantRuntime(stdout="done {job_id} attempt {attempt}\\n", stderr="warn")
    outcome, report = await run(rt, run_job("abc123", 2), tmp_path)
    # The code is never run: its SystemExit(3) changes nothing. "\n" stays literal.
    assert outcome == runtime.Outcome(
        reason=Reason.EXIT_CODE, exit_code=0,
        stdout=b"done abc123 attempt 2\\n", stderr=b"warn")
    assert final_status(Reason(outcome.reason), outcome.exit_code) is Status.COMPLETED
    assert report.calls == [("started", b""), ("stdout", b"done abc123 attempt 2\\n"),
                            ("stderr", b"warn")]


async def test_each_job_gets_its_own_output(tmp_path: pathlib.Path) -> None:
    rt = instant.InstantRuntime(stdout="{job_id}/{attempt} {job_id}")
    first, _ = await run(rt, run_job("a1", 1), tmp_path)
    second, _ = await run(rt, run_job("b2", 3), tmp_path)
    assert (first.stdout, second.stdout) == (b"a1/1 a1", b"b2/3 b2")


async def test_other_braces_and_text_are_left_alone(tmp_path: pathlib.Path) -> None:
    rt = instant.InstantRuntime(stdout="{} {job} {{job_id}} é")
    outcome, _ = await run(rt, run_job("j"), tmp_path)
    assert outcome.stdout == "{} {job} {j} é".encode()


async def test_no_output_configured_reports_none(tmp_path: pathlib.Path) -> None:
    outcome, report = await run(instant.InstantRuntime(), run_job(), tmp_path)
    assert (outcome.stdout, outcome.stderr, outcome.exit_code) == (b"", b"", 0)
    assert report.calls == [("started", b"")]


async def test_the_configured_exit_code_fails_the_job(tmp_path: pathlib.Path) -> None:
    outcome, _ = await run(instant.InstantRuntime(exit_code=7), run_job(), tmp_path)
    assert (outcome.reason, outcome.exit_code) == (Reason.EXIT_CODE, 7)
    assert final_status(Reason(outcome.reason), outcome.exit_code) is Status.FAILED


async def test_output_is_capped_like_a_real_jobs(tmp_path: pathlib.Path) -> None:
    rt = instant.InstantRuntime(stdout="x" * 100)
    outcome, report = await run(rt, run_job(output_cap=20), tmp_path)
    assert outcome.stdout.startswith(b"x" * 10) and outcome.stdout.endswith(b"x" * 10)
    assert b"80 of 100 bytes omitted" in outcome.stdout
    assert report.calls[1] == ("stdout", b"x" * 10)  # the kept head, as it is live


async def test_release_holds_nothing(tmp_path: pathlib.Path) -> None:
    assert await instant.InstantRuntime().release("job1", 1) is None


async def test_in_a_real_agent_the_controller_hears_started_and_exited(
        tmp_path: pathlib.Path) -> None:
    agent = core.Agent(host="h", runtime=instant.InstantRuntime(stdout="done {job_id}"),
                       spool=spool.Spool(tmp_path))
    assert agent.hello().runtime == "instant"
    sent: list[messages.Up] = []
    agent.attach(sent.append)
    agent.handle(run_job("job7", 1))
    await asyncio.wait_for(agent.jobs[("job7", 1)].task, 5)  # type: ignore[arg-type]
    started, exited = sent
    assert isinstance(started, messages.Started) and isinstance(exited, messages.Exited)
    assert (exited.reason, exited.exit_code, exited.stdout) == ("exit_code", 0, b"done job7")
    # Kept in the spool until acked, as any result.
    assert [h.finished for h in agent.held()] == [True]
    agent.handle(messages.Ack(job_id="job7", attempt=1))
    assert agent.held() == () and _empty(tmp_path)


class Synced(instant.InstantRuntime):
    """As a runtime that runs jobs (process, docker): results fsynced each."""

    synced_results = True


async def test_its_results_are_kept_on_the_loop_without_an_fsync(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A result it reports was given, not made: kept in the spool (renamed into place,
    read back after a restart) but not fsynced, and written on the event loop rather than
    handed to a thread. A runtime that runs jobs keeps each result fsynced, off the loop."""
    stores: list[tuple[str, bool]] = []
    fsyncs: list[str] = []
    store_result = spool.Spool.store_result

    def watched(self: spool.Spool, exited: messages.Exited, *, sync: bool = True) -> None:
        stores.append((threading.current_thread().name, sync))
        store_result(self, exited, sync=sync)

    monkeypatch.setattr(spool.Spool, "store_result", watched)
    monkeypatch.setattr(spool.os, "fsync", lambda fd: fsyncs.append(
        threading.current_thread().name))
    loop_thread = threading.current_thread().name
    for name, rt in (("instant", instant.InstantRuntime()), ("synced", Synced())):
        agent = core.Agent(host="h", runtime=rt, spool=spool.Spool(tmp_path / name))
        agent.attach(lambda msg: None)
        agent.handle(run_job("job7", 1))
        await asyncio.wait_for(agent.jobs[("job7", 1)].task, 5)  # type: ignore[arg-type]
        assert [e.job_id for e in spool.Spool(tmp_path / name).recover()] == ["job7"]
    (instant_thread, instant_sync), (synced_thread, synced_sync) = stores
    assert (instant_thread, instant_sync) == (loop_thread, False)
    assert synced_thread != loop_thread and synced_sync
    assert fsyncs == [synced_thread]


def _empty(folder: pathlib.Path) -> bool:
    return not any(folder.iterdir())
