"""The dispatcher: places queued jobs on agents and turns what agents report into state.

The controller decides (desired state), the agents report (observed state). Every
report is applied through the store's guarded transitions, fenced by attempt: a stale
attempt's report changes nothing. ``run_once`` is one step of the loop, for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import Callable, Mapping

from gpujobq.controller import agents, errors, results, scheduler, store
from gpujobq.controller.settings import Settings
from gpujobq.protocol import inventory as inventory_mod
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason, Status, final_status

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between passes when nothing wakes the loop
# A job dispatched this long ago that its agent's heartbeat does not list was lost on the
# way (or refused): it is requeued.
UNHELD_AFTER = 30.0


class HostState:
    """What the dispatcher knows of one inventory host."""

    def __init__(self, gpus: tuple[messages.GPU, ...], drain: bool) -> None:
        self.gpus = gpus
        self.drain = drain


class LiveOutput:
    """What a running attempt has printed so far (the head of each stream), in memory."""

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.streams = {"stdout": bytearray(), "stderr": bytearray()}

    def add(self, msg: messages.Output) -> None:
        buf = self.streams.get(msg.stream)
        if buf is not None and msg.offset == len(buf):  # in order; gaps wait for Exited
            buf += msg.data


class Watchers:
    """Lets a waiting request sleep until its job reaches a terminal state."""

    def __init__(self) -> None:
        self._events: dict[str, list[asyncio.Event]] = {}

    def notify(self, job_id: str) -> None:
        for event in self._events.pop(job_id, []):
            event.set()

    async def wait(self, job_id: str, timeout: float) -> None:
        event = asyncio.Event()
        self._events.setdefault(job_id, []).append(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            waiting = self._events.get(job_id)
            if waiting and event in waiting:
                waiting.remove(event)
                if not waiting:
                    del self._events[job_id]


class Dispatcher:
    def __init__(
        self,
        *,
        store: store.Store,
        settings: Settings,
        hosts: Mapping[str, HostState],
        clock: Callable[[], float],
        inventory: inventory_mod.Inventory | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.inventory = inventory or inventory_mod.Inventory()
        self.hosts = dict(hosts)
        self.links: dict[str, agents.Link] = {}
        self.clock = clock
        self.watchers = Watchers()
        self.live: dict[str, LiveOutput] = {}
        # Attempts the controller gave up on (cancelled or requeued while their host was
        # away) that may still run there: their GPUs stay taken until the agent reports
        # them ended or no longer held. (job_id, attempt) -> (host, GPU indexes)
        self.lingering: dict[tuple[str, int], tuple[str, tuple[int, ...]]] = {}
        self.dispatched_at: dict[str, float] = {}
        self._wake = asyncio.Event()

    # ---- the loop ------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Supervised: a failing pass is logged and the loop goes on."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)
            self._wake.clear()
            try:
                self.run_once()
            except Exception:
                log.exception("dispatcher pass failed; retrying")

    def run_once(self) -> int:
        """Requeue jobs of lost hosts, then place what fits; returns jobs dispatched."""
        running = self.store.by_status(Status.RUNNING)
        if self._requeue_lost(running):
            running = self.store.by_status(Status.RUNNING)
        busy: dict[str, set[int]] = {}
        for job in running:
            if job.node is not None:
                busy.setdefault(job.node, set()).update(job.gpus)
        for host, gpus in self.lingering.values():
            busy.setdefault(host, set()).update(gpus)
        usable = {
            name: host.gpus
            for name, host in self.hosts.items()
            if not host.drain and name in self.links and self.links[name].connected
        }
        free = scheduler.free_gpus(usable, busy)
        slots = sum(len(g) for g in free.values())
        if not slots:
            return 0
        queue = [scheduler.Queued(j.id) for j in self.store.by_status(Status.PENDING, slots)]
        placed = scheduler.place(queue, free)
        for assignment in placed:
            self._dispatch(assignment)
        return len(placed)

    def _dispatch(self, assignment: scheduler.Assignment) -> None:
        job = self.store.dispatch(
            assignment.job_id, assignment.host, [g.index for g in assignment.gpus]
        )
        self.dispatched_at[job.id] = self.clock()
        code, config = self.store.payload(job.id)
        run = messages.RunJob(
            job_id=job.id,
            attempt=job.attempt,
            code=code,
            config=config,
            gpus=assignment.gpus,
            competition_id=job.competition_id,
            image=self.inventory.image_for(job.competition_id),
            network=self.inventory.network_for(job.competition_id),
            time_limit=job.time_limit,
            grace=self.settings.grace,
            output_cap=self.settings.output_cap,
        )
        try:
            self.links[assignment.host].send(run)
        except agents.LinkDown as exc:
            log.info("job %s not sent: %s; back to the queue", job.id, exc)
            self.store.requeue(job.id, job.attempt, str(exc), self.settings.max_retries,
                               count=False)

    def _requeue_lost(self, running: list[store.Job]) -> bool:
        """Requeue the running jobs of hosts gone too long (or gone from the inventory)."""
        now = self.clock()
        requeued = False
        for job in running:
            link = self.links.get(job.node or "")
            if link is None:
                why = f"host {job.node} is no longer in the inventory"
            elif (
                link.down_since is not None
                and now - link.down_since > self.settings.node_lost_after
            ):
                why = f"host {job.node} unreachable for {now - link.down_since:.0f} s"
            else:
                continue
            self._requeue(job, why)
            requeued = True
        return requeued

    def _requeue(self, job: store.Job, why: str) -> None:
        self._linger(job)
        try:
            if job.cancel_requested:  # the user wanted it stopped: never run it again
                job = self.store.force_cancel(job.id, job.attempt, f"cancelled; {why}")
            else:
                job = self.store.requeue(job.id, job.attempt, why, self.settings.max_retries)
        except errors.TransitionError:
            return
        log.warning("job %s: %s; now %s", job.id, why, job.status)
        self.live.pop(job.id, None)
        if job.status is not Status.PENDING:
            self._finished(job)

    # ---- cancel ----------------------------------------------------------------------

    def cancel(self, job: store.Job) -> store.Job:
        """Cancel a pending job at once; ask the agent to stop a running one."""
        if job.status is Status.PENDING:
            job = self.store.cancel_pending(job.id)
            self._finished(job)
            return job
        if job.status is not Status.RUNNING:
            raise errors.Conflict(f"Job already finished with status {job.status}")
        link = self.links.get(job.node or "")
        try:
            if link is None:
                raise agents.LinkDown(f"host {job.node} is not in the inventory")
            job = self.store.request_cancel(job.id, job.attempt)
            link.send(messages.Cancel(job_id=job.id, attempt=job.attempt))
        except agents.LinkDown as exc:
            # Its host is unreachable: the job is cancelled here, and the agent is told to
            # stop it when it reconnects (reconcile cancels attempts the controller dropped).
            self._linger(job)
            job = self.store.force_cancel(job.id, job.attempt, f"cancelled while {exc}")
            self._finished(job)
        return job

    # ---- what agents report (agents.Handler) -----------------------------------------

    def _linger(self, job: store.Job) -> None:
        if job.node is not None and job.gpus:
            self.lingering[(job.id, job.attempt)] = (job.node, job.gpus)

    def _forget_ended(self, host: str, jobs: tuple[messages.HeldJob, ...]) -> None:
        """Free the GPUs of lingering attempts the agent no longer runs."""
        running = {(h.job_id, h.attempt) for h in jobs if not h.finished}
        for key, (where, _) in list(self.lingering.items()):
            if where == host and key not in running:
                del self.lingering[key]

    def on_connected(self, link: agents.Link, hello: messages.Hello) -> None:
        held = {(h.job_id, h.attempt): h for h in hello.jobs}
        for job in self.store.by_status(Status.RUNNING):
            if job.node != link.name:
                continue
            entry = held.get((job.id, job.attempt))
            if entry is None:
                self._requeue(job, f"agent {link.name} no longer holds it (agent restarted)")
            elif job.cancel_requested and not entry.finished:
                self._send(link, messages.Cancel(job_id=job.id, attempt=job.attempt))
        for (job_id, attempt), entry in held.items():
            job = self.store.get(job_id)
            ours = (
                job is not None and job.status is Status.RUNNING
                and job.node == link.name and job.attempt == attempt
            )
            if not ours and not entry.finished:
                self._send(link, messages.Cancel(job_id=job_id, attempt=attempt))
        self._forget_ended(link.name, hello.jobs)
        self.wake()

    def on_disconnected(self, link: agents.Link) -> None:
        log.warning("agent %s disconnected", link.name)
        self.wake()

    def on_message(self, link: agents.Link, msg: messages.Up) -> None:
        try:
            match msg:
                case messages.Started():
                    self.store.mark_started(msg.job_id, msg.attempt, msg.at)
                    self.live[msg.job_id] = LiveOutput(msg.attempt)
                case messages.Output():
                    live = self.live.get(msg.job_id)
                    if live is not None and live.attempt == msg.attempt:
                        live.add(msg)
                case messages.Exited():
                    self._exited(link, msg)
                case messages.Heartbeat():
                    self._heartbeat(link, msg)
        except errors.TransitionError as exc:
            log.info("ignored a stale report: %s", exc)

    def _heartbeat(self, link: agents.Link, beat: messages.Heartbeat) -> None:
        self._forget_ended(link.name, beat.jobs)
        held = {(h.job_id, h.attempt) for h in beat.jobs}
        now = self.clock()
        for job in self.store.by_status(Status.RUNNING):
            sent = self.dispatched_at.get(job.id)
            if (job.node == link.name and (job.id, job.attempt) not in held
                    and sent is not None and now - sent > UNHELD_AFTER):
                self._requeue(job, f"agent {link.name} does not hold it")

    def _exited(self, link: agents.Link, msg: messages.Exited) -> None:
        self.lingering.pop((msg.job_id, msg.attempt), None)
        job = self.store.get(msg.job_id)
        if (
            job is not None and job.status is Status.RUNNING
            and job.attempt == msg.attempt and job.node == link.name
        ):
            try:
                reason = Reason(msg.reason)
            except ValueError:
                reason = Reason.INFRA_ERROR
            job = self.store.finish(
                job.id, msg.attempt,
                status=final_status(reason, msg.exit_code),
                reason=reason.value, exit_code=msg.exit_code,
                stdout=msg.stdout, stderr=msg.stderr, detail=msg.detail or None, at=msg.at,
                files=[(f.name, f.data) for f in msg.files],
            )
            self._finished(job)
        # Stored now (or stale, or stored before): the agent may drop its copy.
        self._send(link, messages.Ack(job_id=msg.job_id, attempt=msg.attempt))
        self.wake()

    def live_output(self, job: store.Job) -> tuple[bytes, bytes]:
        """stdout and stderr so far of a running job (the stored ones once it ended)."""
        live = self.live.get(job.id)
        if job.status is not Status.RUNNING or live is None or live.attempt != job.attempt:
            return job.stdout, job.stderr
        return bytes(live.streams["stdout"]), bytes(live.streams["stderr"])

    def _finished(self, job: store.Job) -> None:
        self.live.pop(job.id, None)
        self.dispatched_at.pop(job.id, None)
        try:
            results.write(pathlib.Path(self.settings.results_dir), job)
        except OSError:
            log.exception("could not write the result record of job %s", job.id)
        self.watchers.notify(job.id)
        self.wake()

    @staticmethod
    def _send(link: agents.Link, msg: messages.Down) -> None:
        try:
            link.send(msg)
        except agents.LinkDown as exc:
            log.info("could not send %s: %s", type(msg).__name__, exc)
