"""The agent's state: the jobs it holds, and what it tells the controller about them.

The controller decides; the agent reports. Messages down (RunJob, Cancel, Ack) are
applied idempotently; messages up (Started, Exited, Heartbeat) go to the current
controller channel, and results wait in the spool until acked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gpujobq.agent import runtime as runtime_mod
from gpujobq.agent import spool as spool_mod
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason

log = logging.getLogger(__name__)

Key = tuple[str, int]
Sender = Callable[[messages.Up], None]


LIVE_FLUSH = 0.2  # seconds live output may wait to be batched into one message


class _Held:
    def __init__(self) -> None:
        self.cancel = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.result: messages.Exited | None = None


class _Reporter:
    """A running job's reports: Started at once, output batched into Output messages."""

    def __init__(self, agent: Agent, run: messages.RunJob) -> None:
        self.agent = agent
        self.run = run
        self.pending: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.sent = {"stdout": 0, "stderr": 0}
        self.timer: asyncio.TimerHandle | None = None

    def started(self) -> None:
        self.agent._report(messages.Started(
            job_id=self.run.job_id, attempt=self.run.attempt, at=self.agent.clock()))

    def output(self, stream: str, data: bytes) -> None:
        self.pending[stream] += data
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(LIVE_FLUSH, self.flush)

    def flush(self) -> None:
        self.timer = None
        for stream, data in self.pending.items():
            if data:
                self.agent._report(messages.Output(
                    job_id=self.run.job_id, attempt=self.run.attempt, stream=stream,
                    offset=self.sent[stream], data=bytes(data)))
                self.sent[stream] += len(data)
                data.clear()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Agent:
    def __init__(
        self,
        *,
        host: str,
        runtime: runtime_mod.Runtime,
        spool: spool_mod.Spool,
        gpus: tuple[messages.GPU, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.runtime = runtime
        self.spool = spool
        self.gpus = gpus
        self.clock = clock
        self.jobs: dict[Key, _Held] = {}
        self._send: Sender | None = None
        for exited in spool.recover():
            held = _Held()
            held.result = exited
            self.jobs[(exited.job_id, exited.attempt)] = held

    # ---- the controller's channel ----------------------------------------------------

    def attach(self, send: Sender) -> None:
        """A controller channel opened: from now on reports go there; resend kept results."""
        self._send = send
        for held in list(self.jobs.values()):
            if held.result is not None:
                send(held.result)

    def detach(self, send: Sender) -> None:
        if self._send is send:
            self._send = None

    def _report(self, msg: messages.Up) -> None:
        if self._send is None:
            return  # kept in the spool (results) or superseded by the next heartbeat
        try:
            self._send(msg)
        except Exception:  # a broken channel must not break the job
            log.warning("could not send %s for a job; channel broken", type(msg).__name__)

    def hello(self) -> messages.Hello:
        return messages.Hello(
            host=self.host, runtime=self.runtime.name, gpus=self.gpus, jobs=self.held()
        )

    def held(self) -> tuple[messages.HeldJob, ...]:
        return tuple(
            messages.HeldJob(job_id=j, attempt=a, finished=h.result is not None)
            for (j, a), h in self.jobs.items()
        )

    def heartbeat(self) -> messages.Heartbeat:
        return messages.Heartbeat(at=self.clock(), jobs=self.held())

    # ---- messages down -----------------------------------------------------------------

    def handle(self, msg: messages.Down) -> None:
        match msg:
            case messages.RunJob():
                self._run(msg)
            case messages.Cancel(job_id=job_id, attempt=attempt):
                held = self.jobs.get((job_id, attempt))
                if held is not None:
                    held.cancel.set()
            case messages.Ack(job_id=job_id, attempt=attempt):
                held = self.jobs.get((job_id, attempt))
                if held is not None and held.result is not None:
                    del self.jobs[(job_id, attempt)]
                    self.spool.drop(job_id, attempt)

    def _run(self, run: messages.RunJob) -> None:
        key = (run.job_id, run.attempt)
        held = self.jobs.get(key)
        if held is not None:  # a repeat: never a second process; resend a kept result
            if held.result is not None:
                self._report(held.result)
            return
        for (job_id, attempt), other in self.jobs.items():
            if job_id == run.job_id and attempt < run.attempt:
                other.cancel.set()  # the controller moved on to a newer attempt
        held = self.jobs[key] = _Held()
        held.task = asyncio.create_task(self._execute(run, held), name=f"job {run.job_id}")

    async def _execute(self, run: messages.RunJob, held: _Held) -> None:
        outcome = await self._outcome(run, held)
        exited = messages.Exited(
            job_id=run.job_id,
            attempt=run.attempt,
            at=self.clock(),
            reason=outcome.reason,
            exit_code=outcome.exit_code,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            detail=outcome.detail,
            files=outcome.files,
        )
        try:
            self.spool.store_result(exited)
        except OSError:
            log.exception("could not store the result of job %s", run.job_id)
        held.result = exited
        self._report(exited)
        try:
            await self.runtime.release(run.job_id, run.attempt)
        except Exception:
            log.exception("could not release what job %s held", run.job_id)

    async def _outcome(self, run: messages.RunJob, held: _Held) -> runtime_mod.Outcome:
        try:
            workdir = self.spool.prepare(run)
        except (OSError, spool_mod.SpoolError) as exc:
            return runtime_mod.Outcome(
                reason=Reason.INFRA_ERROR, exit_code=None, detail=f"spool: {exc}"
            )

        reporter = _Reporter(self, run)
        try:
            return await self.runtime.run(run, workdir, held.cancel, reporter)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("runtime failed on job %s", run.job_id)
            return runtime_mod.Outcome(reason=Reason.INFRA_ERROR, exit_code=None, detail=str(exc))
        finally:
            reporter.close()  # the Exited that follows carries all of the output

    async def shutdown(self) -> None:
        """Stop every running job without reporting it (agent exit).

        Their spool folders hold no result, so after a restart the controller finds
        them missing and requeues them: a platform failure, not the user's.
        """
        tasks = [h.task for h in self.jobs.values() if h.task and not h.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
