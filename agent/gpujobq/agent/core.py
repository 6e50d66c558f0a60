"""The agent's state: the jobs it holds, and what it tells the controller about them.

The controller decides; the agent reports. Messages down (RunJob, Cancel, Ack) are
applied idempotently; messages up (Started, Exited, Heartbeat) go to the current
controller channel, and results wait in the spool until acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import msgspec
from gpujobq.agent import runtime as runtime_mod
from gpujobq.agent import spool as spool_mod
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason

log = logging.getLogger(__name__)

Key = tuple[str, int]
Sender = Callable[[messages.Up], None]


LIVE_FLUSH = 0.2  # seconds live output may wait to be batched into one message
OUTPUT_PIECE = 1 << 20  # bytes of output per message at most
# A job writing in bulk (reads this large) has what it wrote last sent once it pauses
# this long, not LIVE_FLUSH later; small prints are still batched for LIVE_FLUSH.
BULK_READ = 64 << 10
BULK_PAUSE = 0.01
# After a job on real GPUs ends, how long its GPUs may take to let go of its processes
# before they are reported dirty and held back.
SETTLE = 3.0
DEFAULT_LEASE = 120.0  # seconds without a word from the controller before jobs stop


class GPUProbe(Protocol):
    """What the agent asks of NVML (gpus.Probe)."""

    @property
    def available(self) -> bool: ...
    def discover(self) -> tuple[messages.GPU, ...]: ...
    def processes(self, index: int) -> tuple[int, ...]: ...


class _Held:
    def __init__(self, gpus: tuple[int, ...] = ()) -> None:
        self.cancel = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.result: messages.Exited | None = None
        self.gpus = gpus  # indexes of the GPUs (or virtual slots) it was given
        self.lost = ""  # why the agent stopped it on its own (the lease ran out)
        self.reporter: _Reporter | None = None  # while it runs


class _Reporter:
    """A running job's reports: Started at once, output batched into Output messages."""

    def __init__(self, agent: Agent, run: messages.RunJob) -> None:
        self.agent = agent
        self.run = run
        # Printed, not sent yet: the pieces as they came (joined once, when sent).
        self.pending: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.pending_size = dict.fromkeys(self.pending, 0)
        # Everything sent so far (the kept head of each stream, so at most output_cap), as
        # the pieces sent: a controller that reconnects asks for it again from the offset
        # it has.
        self.history: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.sent = dict.fromkeys(self.history, 0)  # bytes of each stream sent
        self.timer: asyncio.TimerHandle | None = None  # LIVE_FLUSH after the first pending
        self.pause: asyncio.TimerHandle | None = None  # BULK_PAUSE after the last bulk read

    def started(self) -> None:
        self.agent._report(messages.Started(
            job_id=self.run.job_id, attempt=self.run.attempt, at=self.agent.clock()))

    def output(self, stream: str, data: bytes) -> None:
        self.pending[stream].append(data)
        self.pending_size[stream] += len(data)
        if self.pending_size[stream] >= OUTPUT_PIECE:  # a full piece goes at once
            self.flush()
            return
        loop = asyncio.get_running_loop()
        if self.timer is None:
            self.timer = loop.call_later(LIVE_FLUSH, self.flush)
        if len(data) >= BULK_READ:
            if self.pause is not None:
                self.pause.cancel()
            self.pause = loop.call_later(BULK_PAUSE, self.flush)

    def flush(self) -> None:
        self.close()
        for stream, parts in self.pending.items():
            if parts:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                parts.clear()
                self.pending_size[stream] = 0
                self.history[stream] += self._send(stream, self.sent[stream], data)
                self.sent[stream] += len(data)

    def _send(self, stream: str, offset: int, data: bytes) -> list[bytes]:
        """Send ``data`` (the stream's bytes from ``offset``); returns the pieces sent."""
        # In pieces: the controller hands each on as soon as it has it, instead of
        # waiting for one frame as large as everything printed in LIVE_FLUSH.
        pieces = [data] if len(data) <= OUTPUT_PIECE else [
            data[start:start + OUTPUT_PIECE] for start in range(0, len(data), OUTPUT_PIECE)]
        for piece in pieces:
            self.agent._report(messages.Output(
                job_id=self.run.job_id, attempt=self.run.attempt, stream=stream,
                offset=offset, data=piece))
            offset += len(piece)
        return pieces

    def resend(self, offsets: dict[str, int]) -> None:
        """Output again from the offsets the controller has, then what is pending."""
        for stream, start in offsets.items():
            if 0 <= start < self.sent[stream]:
                self._send(stream, start, b"".join(self.history[stream])[start:])
        self.flush()

    def close(self) -> None:
        for timer in (self.timer, self.pause):
            if timer is not None:
                timer.cancel()
        self.timer = self.pause = None


class Agent:
    def __init__(
        self,
        *,
        host: str,
        runtime: runtime_mod.Runtime,
        spool: spool_mod.Spool,
        probe: GPUProbe | None = None,
        clock: Callable[[], float] = time.time,
        lease: float = DEFAULT_LEASE,
        monotonic: Callable[[], float] = time.monotonic,
        keep: frozenset[Key] = frozenset(),
    ) -> None:
        self.host = host
        self.runtime = runtime
        self.spool = spool
        self.probe = probe if probe is not None and probe.available else None
        self.gpus = self.probe.discover() if self.probe else ()
        self.dirty: dict[int, messages.DirtyGPU] = {}
        self.warnings: list[str] = []  # told to the controller in every hello
        self.clock = clock
        self.mono = monotonic
        self.lease = lease  # until the controller says otherwise (Lease)
        self.last_word = monotonic()  # when the controller was last heard from
        self.check_gpus(g.index for g in self.gpus)  # anything left from before we started
        self.jobs: dict[Key, _Held] = {}
        self._send: Sender | None = None
        for exited in spool.recover(keep=keep):
            held = _Held()
            held.result = exited
            self.jobs[(exited.job_id, exited.attempt)] = held

    # ---- the controller's channel ----------------------------------------------------

    def attach(self, send: Sender) -> None:
        """A controller channel opened: from now on reports go there; resend kept results."""
        self._send = send
        self.last_word = self.mono()
        for held in list(self.jobs.values()):
            if held.result is not None:
                send(self._fresh(held.result))

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
            host=self.host, runtime=self.runtime.name, gpus=self.gpus,
            nvml=self.probe is not None, jobs=self.held(), dirty=self.dirty_gpus(),
            warnings=tuple(self.warnings),
        )

    # ---- GPU hygiene -------------------------------------------------------------------

    def check_gpus(self, indexes: Iterable[int]) -> list[int]:
        """Ask NVML whether processes are left on these GPUs; returns the dirty ones."""
        if self.probe is None:
            return []
        indexes = list(indexes)
        for index in indexes:
            try:
                pids = self.probe.processes(index)
            except Exception as exc:  # NVML errors: a GPU we cannot check is not handed out
                self.dirty[index] = messages.DirtyGPU(index=index, detail=f"NVML: {exc}")
                continue
            if pids:
                if index not in self.dirty:
                    log.warning("GPU %d held back: processes %s still on it", index, pids)
                self.dirty[index] = messages.DirtyGPU(
                    index=index, pids=pids,
                    detail=f"process(es) {', '.join(map(str, pids))} still on the GPU")
            elif self.dirty.pop(index, None) is not None:
                log.info("GPU %d is clean again", index)
        return [i for i in indexes if i in self.dirty]

    def _fresh(self, result: messages.Exited) -> messages.Exited:
        """A kept result as it is sent again: with the host's dirty GPUs of now, not of then."""
        return msgspec.structs.replace(result, dirty=self.dirty_gpus())

    def dirty_gpus(self) -> tuple[messages.DirtyGPU, ...]:
        return tuple(self.dirty[i] for i in sorted(self.dirty))

    async def _settle(self, gpus: tuple[messages.GPU, ...]) -> None:
        """Wait (up to SETTLE s) for a finished job's GPUs to be free of processes."""
        indexes = [g.index for g in gpus if not g.virtual]
        if self.probe is None or not indexes:
            return
        for _ in range(int(SETTLE / 0.2)):
            if not self.check_gpus(indexes):
                return
            await asyncio.sleep(0.2)
        self.check_gpus(indexes)

    def held(self) -> tuple[messages.HeldJob, ...]:
        return tuple(
            messages.HeldJob(job_id=j, attempt=a, finished=h.result is not None, gpus=h.gpus)
            for (j, a), h in self.jobs.items()
        )

    def heartbeat(self) -> messages.Heartbeat:
        self.check_gpus(list(self.dirty))  # a held-back GPU is given back once clean
        return messages.Heartbeat(at=self.clock(), jobs=self.held(), dirty=self.dirty_gpus())

    # ---- messages down -----------------------------------------------------------------

    def handle(self, msg: messages.Down) -> None:
        self.last_word = self.mono()
        match msg:
            case messages.Lease(seconds=seconds):
                self.lease = seconds
            case messages.Attach(job_id=job_id, attempt=attempt):
                held = self.jobs.get((job_id, attempt))
                if held is not None and held.reporter is not None and held.result is None:
                    held.reporter.resend({"stdout": msg.stdout, "stderr": msg.stderr})
            case messages.RunJob():
                self._run(msg)
            case messages.Cancel(job_id=job_id, attempt=attempt):
                held = self.jobs.get((job_id, attempt))
                if held is not None and held.result is None:
                    log.info("cancelling job %s attempt %d at the controller's request",
                             job_id, attempt)
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
                self._report(self._fresh(held.result))
            return
        for (job_id, attempt), other in self.jobs.items():
            if job_id == run.job_id and attempt < run.attempt:
                other.cancel.set()  # the controller moved on to a newer attempt
        gpus = tuple(g.index for g in run.gpus)
        held = self.jobs[key] = _Held(gpus)
        clash = self._gpu_clash(run, gpus)
        if clash:
            # Never two jobs on one GPU, whatever the controller believes: hand it back.
            log.warning("job %s refused: %s", run.job_id, clash)
            held.task = asyncio.create_task(self._refuse(run, held, clash))
            return
        held.task = asyncio.create_task(self._execute(run, held), name=f"job {run.job_id}")

    def adopt(self, run: messages.RunJob, workdir: pathlib.Path) -> None:
        """Carry on with a job whose container outlived the previous agent."""
        held = self.jobs[(run.job_id, run.attempt)] = _Held(tuple(g.index for g in run.gpus))
        held.task = asyncio.create_task(self._execute(run, held, workdir),
                                        name=f"job {run.job_id}")

    def _gpu_clash(self, run: messages.RunJob, gpus: tuple[int, ...]) -> str:
        for index in gpus:
            if index in self.dirty:
                return f"GPU {index} is held back: {self.dirty[index].detail}"
            for (job_id, attempt), other in self.jobs.items():
                if other.result is None and index in other.gpus and (
                        job_id, attempt) != (run.job_id, run.attempt):
                    return f"GPU {index} is still in use by job {job_id} attempt {attempt}"
        return ""

    async def _refuse(self, run: messages.RunJob, held: _Held, why: str) -> None:
        held.gpus = ()  # it never took them
        exited = messages.Exited(job_id=run.job_id, attempt=run.attempt, at=self.clock(),
                                 reason=Reason.REQUEUED, exit_code=None, detail=why,
                                 dirty=self.dirty_gpus())
        with contextlib.suppress(OSError):
            self.spool.store_result(exited)
        held.result = exited
        self._report(exited)

    def check_lease(self) -> list[Key]:
        """Stop every running job once the controller has been silent past the lease.

        Past it, the controller may requeue them elsewhere: running on would mean two
        copies at once. They are reported lost (a platform failure, retried)."""
        silent = self.mono() - self.last_word
        if silent <= self.lease:
            return []
        stopped = []
        for key, held in self.jobs.items():
            if held.result is None and not held.lost and held.task is not None:
                held.lost = (f"stopped by the agent: no word from the controller for "
                             f"{silent:.0f} s (lease {self.lease:.0f} s)")
                log.warning("job %s attempt %d: %s", key[0], key[1], held.lost)
                held.cancel.set()
                stopped.append(key)
        return stopped

    async def watch_lease(self, interval: float = 1.0) -> None:
        """Every second: the lease, and the runtime's own chores (if it has any)."""
        chores = getattr(self.runtime, "housekeeping", None)
        while True:
            await asyncio.sleep(interval)
            self.check_lease()
            if chores is not None:
                try:
                    await chores()
                except Exception:
                    log.exception("runtime housekeeping failed")

    async def _execute(self, run: messages.RunJob, held: _Held,
                       workdir: pathlib.Path | None = None) -> None:
        outcome = await self._outcome(run, held, workdir)
        if held.lost:
            outcome = runtime_mod.Outcome(
                reason=Reason.NODE_LOST, exit_code=None, stdout=outcome.stdout,
                stderr=outcome.stderr, detail=held.lost)
        # The controller frees the job's GPUs when it hears Exited: check them first.
        await self._settle(run.gpus)
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
            dirty=self.dirty_gpus(),
        )
        try:
            await self._store(exited)
        except OSError:
            log.exception("could not store the result of job %s", run.job_id)
        except (msgspec.EncodeError, ValueError) as exc:
            # Something the job made that the result cannot carry (outputs.py keeps such
            # file names out): send the result without its files rather than none.
            log.exception("job %s: result not encodable, sent without files", run.job_id)
            exited = msgspec.structs.replace(
                exited, files=(), detail=f"{exited.detail}; output files dropped: {exc}"
                .removeprefix("; "))
            with contextlib.suppress(OSError):
                await self._store(exited)
        held.result = exited
        self._report(exited)
        try:
            await self.runtime.release(run.job_id, run.attempt)
        except Exception:
            log.exception("could not release what job %s held", run.job_id)

    async def _store(self, exited: messages.Exited) -> None:
        """Keep a result in the spool until acked: written and fsynced off the event
        loop, so the other jobs' reports go on. A runtime whose results need no fsync
        (``synced_results = False``: instant) has it written on the loop: a write to the
        page cache costs less than the hand-off to a thread and back."""
        if getattr(self.runtime, "synced_results", True):
            await asyncio.to_thread(self.spool.store_result, exited)
        else:
            self.spool.store_result(exited, sync=False)

    async def _outcome(self, run: messages.RunJob, held: _Held,
                       workdir: pathlib.Path | None) -> runtime_mod.Outcome:
        try:
            workdir = workdir or self.spool.prepare(
                run, files=getattr(self.runtime, "reads_files", True))
        except (OSError, spool_mod.SpoolError) as exc:
            # The host's disk, not the job: a platform failure, retried (within the
            # retry budget) where there is room.
            log.error("job %s: cannot prepare its spool folder: %s", run.job_id, exc)
            return runtime_mod.Outcome(
                reason=Reason.NODE_LOST, exit_code=None, detail=f"agent spool: {exc}"
            )

        reporter = held.reporter = _Reporter(self, run)
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
