"""The dispatcher: places queued jobs on agents and turns what agents report into state.

The controller decides (desired state), the agents report (observed state). Every
report is applied through the store's guarded transitions, fenced by attempt: a stale
attempt's report changes nothing. ``run_once`` is one step of the loop, for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import math
import pathlib
import time
from collections.abc import Callable, Iterator

from gpujobq.controller import (
    agents,
    commits,
    crashpoints,
    database,
    errors,
    fleet,
    results,
    scheduler,
    store,
)
from gpujobq.controller import live as live_mod
from gpujobq.controller.settings import Settings
from gpujobq.protocol import inventory as inventory_mod
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason, Status, final_status

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between passes when nothing wakes the loop
# A job dispatched this long ago that its agent's heartbeat does not list was lost on the
# way (or refused): it is requeued.
UNHELD_AFTER = 30.0
LEASE_RENEW = 5.0  # seconds between Lease messages to each agent
RECORDS_EVERY = 30.0  # seconds between looks for result records still to write
PLAN_MAX_AGE = 5.0  # seconds a status may show the positions and estimates of a plan


LinkFactory = Callable[[inventory_mod.Host, agents.Handler], agents.Link]


class Observer:
    """Told of job and agent events once they are committed (the metrics listen). These
    defaults do nothing; an observer runs on the event loop and must be cheap."""

    def job_started(self, job: store.Job, waited: float, latency: float | None) -> None:
        """An attempt started: ``waited`` seconds after submission, ``latency`` after it
        was dispatched (None when not dispatched by this controller)."""

    def job_ended(self, job: store.Job) -> None:
        """The job reached a terminal status."""

    def agent_connected(self, host: str) -> None:
        """The link to a host's agent came up (again)."""


class Dispatcher:
    def __init__(
        self,
        *,
        store: store.Store,
        settings: Settings,
        inventory: inventory_mod.Inventory,
        link_factory: LinkFactory,
        clock: Callable[[], float],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.link_factory = link_factory
        self.inventory = inventory_mod.Inventory()
        self.nodes: dict[str, fleet.Node] = {}
        # Wall-clock time is for records; liveness and scheduling use a monotonic clock
        # (the links' too), so a clock step never marks healthy hosts down.
        self.clock = clock
        self.mono = monotonic  # the links' down_since is time.monotonic too
        self.plan = scheduler.Plan([], {})
        self._plan_fresh = False  # False: the queue changed since the plan was made
        self._plan_at = -math.inf  # monotonic, when it was made
        self.watchers = live_mod.Watchers()  # woken when a job ends (submit-and-wait)
        # Woken when a job starts, prints, runs again or ends (log followers).
        self.changes = live_mod.Watchers()
        self.live: dict[str, live_mod.LiveOutput] = {}
        # Attempts the controller gave up on (cancelled or requeued while their host was
        # away) that may still run there: their GPUs stay taken until the agent reports
        # them ended or no longer held. (job_id, attempt) -> (host, GPU indexes)
        self.lingering: dict[tuple[str, int], tuple[str, tuple[int, ...]]] = {}
        self.dispatched_at: dict[str, float] = {}  # monotonic, when the RunJob left
        self.started_seen: dict[str, float] = {}  # monotonic, when Started arrived
        self.observer = Observer()  # the app's metrics replace it
        self._wake = asyncio.Event()
        # The last pass found no GPU free (_full), when it began (_pass_at, monotonic), and
        # whether anything since may have freed one (_freed): see futile().
        self._full, self._pass_at, self._freed = False, -math.inf, True
        # Bumped whenever hosts, their GPUs or labels may have changed (inventory, hello).
        self.fleet_version = 0
        self._running = False
        self._records_checked = -math.inf
        self._stopped: set[asyncio.Task[None]] = set()  # link tasks cancelled, not yet done
        # Inside _batch(): what must wait for its COMMIT (messages to agents, records,
        # waking waiters); None outside.
        self._after_commit: list[Callable[[], None]] | None = None
        self._to_record: list[store.Job] = []
        self._bursts: list[tuple[agents.Link, list[messages.Up]]] = []  # reports to store
        self._storing: list[tuple[agents.Link, list[messages.Up]]] = []  # being stored
        # Within one agent's burst being stored: the attempts its Exited messages end
        # (normally), and the Started of those seen so far: (at, monotonic when seen).
        self._ending: set[tuple[str, int]] = set()
        self._starting: dict[tuple[str, int], tuple[float, float]] = {}
        # The event loop's writes share one transaction per turn: submits, reports,
        # dispatches and notes of written records (see commits.GroupCommit).
        self.commits = commits.GroupCommit(store.db)
        # Ended jobs' result records: written off the loop, then their waiters woken.
        self.recorder = results.Recorder(
            pathlib.Path(settings.results_dir), store, self.commits, self._ended_notify)
        self.apply_inventory(inventory)

    @property
    def links(self) -> dict[str, agents.Link]:
        return {name: node.link for name, node in self.nodes.items()}

    # ---- the inventory -----------------------------------------------------------------

    def apply_inventory(self, inv: inventory_mod.Inventory) -> list[str]:
        """Make the fleet match a (new) inventory; returns what changed, in words.

        All new links are made first, so an error (a host key that cannot be read)
        changes nothing. A host gone from the inventory drains: it takes no new jobs and
        leaves once nothing of it runs. A host whose address or key changed reconnects;
        the jobs it runs go on.
        """
        candidates = {h.name: self.link_factory(h, self) for h in inv.hosts}
        _refuse_shared_keys(inv, candidates, self.nodes)
        made = {
            name: link for name, link in candidates.items()
            if name not in self.nodes or _endpoint(self.nodes[name].link) != _endpoint(link)
        }
        changes = []
        for host in inv.hosts:
            node = self.nodes.get(host.name)
            if node is None:
                node = self.nodes[host.name] = fleet.Node(host, made[host.name])
                self._start(node)
                changes.append(f"added host {host.name}")
                continue
            if host.name in made:
                self._stop(node)
                node.link = made[host.name]
                node.last_heard = None
                self._start(node)
                changes.append(f"reconnecting to host {host.name} at {host.address}:{host.port}")
            if node.removing:
                changes.append(f"host {host.name} is back in the inventory")
            elif host.drain != node.host.drain:
                changes.append(f"host {host.name} {'drains' if host.drain else 'undrained'}")
            elif host != node.host and host.name not in made:
                changes.append(f"host {host.name} changed")
            node.host, node.removing = host, False
            node.refresh()
        listed = {h.name for h in inv.hosts}
        for name, node in self.nodes.items():
            if name not in listed and not node.removing:
                node.removing = True
                changes.append(f"host {name} removed: it drains, then goes")
        self.inventory = inv
        self.fleet_version += 1
        self.wake()
        return changes

    def _start(self, node: fleet.Node) -> None:
        if self._running:
            node.task = asyncio.create_task(node.link.run(), name=f"link {node.name}")

    def _stop(self, node: fleet.Node) -> None:
        if node.task is not None:
            node.task.cancel()
            self._stopped.add(node.task)
            node.task.add_done_callback(self._stopped.discard)
            node.task = None

    def _retire(self, running: list[store.Job]) -> None:
        """Let hosts removed from the inventory go once nothing of theirs runs.

        A removed host that stays down past node_lost_after goes even with attempts
        given up on still listed there: nothing will ever report them ended.
        """
        now = self.mono()
        occupied = {j.node for j in running}
        for name, node in list(self.nodes.items()):
            if not node.removing or name in occupied:
                continue
            since = node.down_since(now, self.settings.heartbeat_timeout)
            lost = since is not None and now - since > self.lost_after
            if not lost and any(h == name for h, _ in self.lingering.values()):
                continue
            for key in [k for k, (h, _) in self.lingering.items() if h == name]:
                del self.lingering[key]
            self._stop(node)
            del self.nodes[name]
            self.fleet_version += 1
            log.info("host %s left the fleet", name)

    def node_of(self, link: agents.Link) -> fleet.Node | None:
        """The node a link serves, if it is still that node's link (not a replaced one)."""
        node = self.nodes.get(link.name)
        return node if node is not None and node.link is link else None

    # ---- batches ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """The writes inside share one COMMIT (the group's, inside a group transaction);
        what must follow the COMMIT (telling an agent, writing a result record, answering
        a waiter) runs once it is done, and not at all if it fails. Synchronous: no await
        inside."""
        if self._after_commit is not None:
            yield
            return
        self._after_commit = []
        try:
            with database.batch(self.store.db):
                yield
            later, to_record = self._after_commit, self._to_record
        finally:
            self._after_commit, self._to_record = None, []
        self.commits.after(lambda: self._committed(later, to_record))

    def _committed(self, later: list[Callable[[], None]], to_record: list[store.Job]) -> None:
        if to_record:
            self.recorder.record_then_notify(to_record)
        for action in later:
            try:  # one failing (a requeue on a full disk) must not keep the rest back
                action()
            except Exception:
                log.exception("an action after a commit failed")

    def _later(self, action: Callable[[], None]) -> None:
        if self._after_commit is None:
            # At once, unless writes it may follow from are still on their way to disk.
            self.commits.after(action)
        else:
            self._after_commit.append(action)

    # ---- the loop ------------------------------------------------------------------------

    def wake(self, *, frees: bool = True) -> None:
        """A pass soon. ``frees=False``: what happened cannot free a GPU (a submit), so
        while the last pass found none free, none runs for it (see ``futile``)."""
        if frees:
            self._freed = True
        self._wake.set()

    def futile(self) -> bool:
        """Whether a pass now would place nothing without looking: the last one found no
        GPU free, nothing since could have freed one, and it was less than a TICK ago (the
        checks a pass makes on the way, leases and lost hosts, wait at most that long).
        On a full fleet, a flood of submits then costs no pass each (one reads every
        running job)."""
        return self._full and not self._freed and self.mono() - self._pass_at < TICK

    async def run(self) -> None:
        """Supervised: a failing pass is logged and the loop goes on. Runs the links too."""
        self._running = self.recorder.running = True
        for node in self.nodes.values():
            self._start(node)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), TICK)
                woken = self._wake.is_set()
                self._wake.clear()
                if woken and self.futile():
                    self._plan_fresh = False  # the queue changed: positions are worked out anew
                    continue
                began = time.perf_counter()
                try:
                    # With the submits and reports of this turn: one COMMIT for all.
                    self.commits.flush_with(functools.partial(self.run_once, woken))
                except Exception:
                    log.exception("dispatcher pass failed; retrying")
                # A pass reads the queue; under a flood of submits and results, a pass per
                # wake would take the whole event loop from the API. Resting as long as the
                # pass took keeps passes to at most half of it (and costs an idle fleet ~0).
                await asyncio.sleep(time.perf_counter() - began)
        finally:
            self._running = self.recorder.running = False
            for node in self.nodes.values():
                self._stop(node)
            await asyncio.gather(*self._stopped, *self.recorder.writing,
                                 return_exceptions=True)
            self.recorder.close()

    def run_once(self, woken: bool = True) -> int:
        """Requeue jobs of lost hosts, then place what fits; returns jobs dispatched.

        ``woken``: something happened (a submit, a report, a host); False for the
        once-a-TICK pass."""
        now = self.mono()
        self._pass_at, self._freed = now, False
        if now - self._records_checked >= RECORDS_EVERY:
            self._records_checked = now
            self.recorder.record_missing()
        self._drop_silent()
        self._renew_leases()
        running = self.store.by_status(Status.RUNNING)
        if self._requeue_lost(running):
            running = self.store.by_status(Status.RUNNING)
        self._retire(running)
        self._full = not self._room(running)
        if self._full:
            # Nothing can start: no need to read and order the whole queue. Positions and
            # estimates are worked out again when a status asks for them: after a change,
            # or once the plan is PLAN_MAX_AGE old (estimates move with time).
            if woken:
                self._plan_fresh = False
            return 0
        # Only what starts now: positions and estimates (a forecast over the queue, the
        # dearest part) are worked out when a status or the board asks for them.
        self.plan = self._plan(running, estimates=False)
        self._plan_fresh, self._plan_at = False, now
        with self._batch():
            for assignment in self.plan.assignments:
                self._dispatch(assignment)
        return len(self.plan.assignments)

    def _room(self, running: list[store.Job]) -> bool:
        """Whether an up host has a GPU that nothing holds (a cheap bound: the plan
        decides what fits)."""
        now = self.mono()
        taken: dict[str, set[int]] = {}
        for job in running:
            if job.node is not None:
                taken.setdefault(job.node, set()).update(job.gpus)
        for host, gpus in self.lingering.values():
            taken.setdefault(host, set()).update(gpus)
        for node in self.nodes.values():
            if node.state(now, self.settings.heartbeat_timeout) != "up":
                continue
            held = taken.get(node.name, set()) | {d.index for d in node.dirty}
            if any(g.index not in held for g in node.gpus):
                return True
        return False

    def queued(self, row: store.QueuedRow) -> scheduler.Queued:
        profile = self.inventory.profile_of_job(row.competition_id)
        return scheduler.Queued(
            job_id=row.id, user_id=row.user_id, gpus=row.gpu_count, labels=profile.labels,
            time_limit=row.time_limit + self.settings.grace, expected_time=row.expected_time,
        )

    def _plan(self, running: list[store.Job], extra: tuple[scheduler.Queued, ...] = (),
              estimates: bool = True) -> scheduler.Plan:
        """The scheduler's plan, on the monotonic clock; estimates come back as wall time.
        ``extra``: jobs not in the store, queued after it (``probe``)."""
        now, wall = self.mono(), self.clock()
        timeout = self.settings.heartbeat_timeout
        busy = []
        for job in running:
            if job.node is None:
                continue
            # When it started, as this controller saw it (an agent's clock may be off);
            # after a controller restart, from the stored start; not started yet: now.
            start = self.started_seen.get(job.id)
            if start is None:
                start = now - max(0.0, wall - job.started_at) if job.started_at else now
            busy.append(scheduler.Busy(
                host=job.node, gpus=job.gpus, user_id=job.user_id,
                ends_by=start + job.time_limit + self.settings.grace,
                expected_end=start + job.expected_time))
        for host, gpus in self.lingering.values():
            busy.append(scheduler.Busy(host=host, gpus=gpus))
        busy += [b for n in self.nodes.values() if (b := n.dirty_busy()) is not None]
        hosts = [n.view(now, timeout) for n in self.nodes.values()]
        queue = [*(self.queued(row) for row in self.store.queue()), *extra]
        plan = scheduler.plan(queue, hosts, busy, now, estimates=estimates)
        for job_id, w in plan.waiting.items():
            if w.estimated_start is not None:
                plan.waiting[job_id] = scheduler.Waiting(
                    w.position, w.reason, wall + (w.estimated_start - now))
        return plan

    def waiting(self, job: store.Job) -> scheduler.Waiting | None:
        """Where a pending job stands: position, pending reason, estimated start."""
        if job.status is not Status.PENDING:
            return None
        if self._plan_stale() or job.id not in self.plan.waiting:
            # Submitted since the last pass: plan again (placing nothing here).
            fresh = self._replan()
            if any(a.job_id == job.id for a in fresh.assignments):
                self.wake()  # the next pass starts it
                return scheduler.Waiting(0, "starting", self.clock())
        return self.plan.waiting.get(job.id)

    def next_to_start(self, limit: int) -> list[str]:
        """The first ``limit`` pending jobs' ids, in the order they are to start."""
        if self._plan_stale():
            self._replan()
        first = heapq.nsmallest(limit, self.plan.waiting.items(), key=lambda w: w[1].position)
        return [job_id for job_id, _ in first]

    def _plan_stale(self) -> bool:
        return not self._plan_fresh or self.mono() - self._plan_at > PLAN_MAX_AGE

    def _replan(self) -> scheduler.Plan:
        """Positions and estimates again, placing nothing; the fresh plan."""
        fresh = self._plan(self.store.by_status(Status.RUNNING))
        self.plan = scheduler.Plan(self.plan.assignments, fresh.waiting)
        self._plan_fresh, self._plan_at = True, self.mono()
        return fresh

    def probe(self, gpus: int = 1) -> scheduler.Waiting:
        """Where a job asking ``gpus`` GPUs (no labels, no known time limit) of a user with
        nothing queued would stand if submitted now; position 0: it would start at once.
        Changes nothing, but plans the whole queue: callers keep the answer a while."""
        probe = scheduler.Queued(job_id="", gpus=gpus)  # no stored job has an empty id
        plan = self._plan(self.store.by_status(Status.RUNNING), (probe,))
        if any(a.job_id == "" for a in plan.assignments):
            return scheduler.Waiting(0, "starting", self.clock())
        return plan.waiting[""]

    @property
    def lost_after(self) -> float:
        """How long a host must be down before its jobs are requeued: never within the
        lease its agent may still be running them under."""
        return max(self.settings.node_lost_after,
                   self.settings.lease + self.settings.lease_margin)

    def _renew_leases(self) -> None:
        now = self.mono()
        every = min(LEASE_RENEW, self.settings.lease / 3)
        for node in self.nodes.values():
            if node.link.connected and now - node.lease_sent >= every:
                node.lease_sent = now
                self._send(node.link, messages.Lease(seconds=self.settings.lease))

    def _drop_silent(self) -> None:
        """A connected host silent past the heartbeat timeout is down: reconnect to it."""
        now = self.mono()
        for node in self.nodes.values():
            if node.link.connected and node.silent(now, self.settings.heartbeat_timeout):
                log.warning("host %s: no heartbeat for %.0f s; marked down, reconnecting",
                            node.name, now - (node.last_heard or now))
                node.link.drop(f"no heartbeat for {now - (node.last_heard or now):.0f} s")

    def _dispatch(self, assignment: scheduler.Assignment) -> None:
        crashpoints.reach("before_dispatch")
        job, code, config = self.store.dispatch(
            assignment.job_id, assignment.host, [g.index for g in assignment.gpus]
        )
        self._later(lambda: crashpoints.reach("after_dispatch"))  # stored, not sent yet
        self.dispatched_at[job.id] = self.mono()
        profile = self.inventory.profile_of_job(job.competition_id)
        run = messages.RunJob(
            job_id=job.id,
            attempt=job.attempt,
            code=code,
            config=config,
            gpus=assignment.gpus,
            competition_id=job.competition_id,
            image=profile.image,
            network=profile.network,
            mounts=tuple(m.wire() for m in profile.mounts),
            time_limit=job.time_limit,
            grace=self.settings.grace,
            output_cap=self.settings.output_cap,
        )
        link = self.nodes[assignment.host].link

        def send() -> None:  # only once the job is stored as running there
            try:
                link.send(run)
            except agents.LinkDown as exc:
                log.info("job %s not sent: %s; back to the queue", job.id, exc)
                self.store.requeue(job.id, job.attempt, str(exc), self.settings.max_retries,
                                   count=False)

        self._later(send)

    def _requeue_lost(self, running: list[store.Job]) -> bool:
        """Requeue the running jobs of hosts gone too long (or gone from the inventory)."""
        now = self.mono()
        requeued = False
        for job in running:
            node = self.nodes.get(job.node or "")
            since = node.down_since(now, self.settings.heartbeat_timeout) if node else None
            if node is None:
                why = f"host {job.node} is no longer in the inventory"
            elif since is not None and now - since > self.lost_after:
                why = f"node lost: host {job.node} down for {now - since:.0f} s"
            else:
                continue
            self._requeue(job, why)
            requeued = True
        return requeued

    def _requeue(self, job: store.Job, why: str, count: bool = True) -> None:
        self._linger(job)
        try:
            if job.cancel_requested:  # the user wanted it stopped: never run it again
                job = self.store.force_cancel(job.id, job.attempt, f"cancelled; {why}")
            else:
                job = self.store.requeue(job.id, job.attempt, why, self.settings.max_retries,
                                         count=count)
        except errors.TransitionError:
            return
        log.warning("job %s: %s; now %s", job.id, why, job.status)
        self.live.pop(job.id, None)
        job_id = job.id
        self._later(lambda: self.changes.notify(job_id))
        if job.status is not Status.PENDING:
            self._finished(job)

    # ---- cancel ----------------------------------------------------------------------

    def cancel(self, job: store.Job, by_admin: str | None = None) -> store.Job:
        """Cancel a pending job at once; ask the agent to stop a running one."""
        who = f"cancelled by admin {by_admin}" if by_admin else None
        if job.status is Status.PENDING:
            job = self.store.cancel_pending(job.id, who or "cancelled by the user")
            self._finished(job)
            return job
        if job.status is not Status.RUNNING:
            raise errors.Conflict(f"Job already finished with status {job.status}")
        node = self.nodes.get(job.node or "")
        try:
            if node is None:
                raise agents.LinkDown(f"host {job.node} is not in the inventory")
            job = self.store.request_cancel(job.id, job.attempt, who)
            node.link.send(messages.Cancel(job_id=job.id, attempt=job.attempt))
        except agents.LinkDown as exc:
            # Its host is unreachable: the job is cancelled here, and the agent is told to
            # stop it when it reconnects (reconcile cancels attempts the controller dropped).
            self._linger(job)
            job = self.store.force_cancel(job.id, job.attempt,
                                          f"{who or 'cancelled'} while {exc}")
            self._finished(job)
        return job

    def requeue_by_admin(self, job: store.Job, admin: str) -> store.Job:
        """An admin's requeue: a running job is stopped and goes back to the queue as a
        new attempt (no retry counted); a finished one runs again. Refused (409) for a
        pending job, a job being cancelled, and while an attempt of it may still run on
        a host that cannot be told to stop (one job never runs twice at once)."""
        why = f"requeued by admin {admin}"
        if job.status is Status.PENDING:
            raise errors.Conflict("Job is pending already")
        if job.status is Status.RUNNING and job.cancel_requested:
            raise errors.Conflict("Job is being cancelled; requeue it once it has ended")
        for (job_id, attempt), (host, _) in self.lingering.items():
            if job_id == job.id:
                raise errors.Conflict(
                    f"Attempt {attempt} of this job may still run on host {host}, which has "
                    "not confirmed it stopped; try again once it has")
        if job.status is Status.RUNNING:
            node = self.nodes.get(job.node or "")
            if node is None or node.state(self.mono(), self.settings.heartbeat_timeout) == "down":
                raise errors.Conflict(
                    f"Its host {job.node} is unreachable, so the job cannot be stopped there; "
                    f"it is requeued by itself if the host stays down "
                    f"{self.lost_after:g} s")
            self._linger(job)  # its GPUs stay taken until the agent says it stopped
            old_attempt = job.attempt
            job = self.store.requeue(job.id, old_attempt, why, self.settings.max_retries,
                                     count=False)
            self._send(node.link, messages.Cancel(job_id=job.id, attempt=old_attempt))
            for table in (self.live, self.dispatched_at, self.started_seen):
                table.pop(job.id, None)
        else:
            job = self.store.rerun(job.id, why)
        log.warning("job %s: %s", job.id, why)
        self.wake()
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
        node = self.node_of(link)
        if node is None:
            return
        node.hello, node.dirty, node.last_heard = hello, hello.dirty, self.mono()
        self.observer.agent_connected(link.name)
        node.refresh()
        self.fleet_version += 1  # its GPUs are known now (or changed)
        node.lease_sent = self.mono()
        self._send(link, messages.Lease(seconds=self.settings.lease))
        for problem in node.problems:
            log.warning("host %s: %s", node.name, problem)
        held = {(h.job_id, h.attempt): h for h in hello.jobs}
        for job in self.store.by_status(Status.RUNNING):
            if job.node != link.name:
                continue
            entry = held.get((job.id, job.attempt))
            if entry is None:
                self._requeue(job, f"agent {link.name} no longer holds it (agent restarted)")
            elif job.cancel_requested and not entry.finished:
                self._send(link, messages.Cancel(job_id=job.id, attempt=job.attempt))
            elif not entry.finished:
                # Re-attach to its live output from what this controller has (nothing,
                # after a restart).
                live = self.live.get(job.id)
                if live is None or live.attempt != job.attempt:
                    live = self.live[job.id] = live_mod.LiveOutput(job.attempt)
                self._send(link, messages.Attach(
                    job_id=job.id, attempt=job.attempt, stdout=len(live.streams["stdout"]),
                    stderr=len(live.streams["stderr"])))
        for (job_id, attempt), entry in held.items():
            job = self.store.get(job_id)
            ours = (
                job is not None and job.status is Status.RUNNING
                and job.node == link.name and job.attempt == attempt
            )
            if not ours and not entry.finished:
                # Not (or no longer) ours, but running there: stop it, and keep its GPUs
                # taken until the agent says it ended (this survives a controller restart).
                self._send(link, messages.Cancel(job_id=job_id, attempt=attempt))
                self.lingering.setdefault((job_id, attempt), (link.name, entry.gpus))
        self._forget_ended(link.name, hello.jobs)
        self.wake()

    def on_disconnected(self, link: agents.Link) -> None:
        if self.node_of(link) is not None:
            log.warning("agent %s disconnected", link.name)
        self.wake()

    def on_messages(self, link: agents.Link, msgs: list[messages.Up]) -> None:
        """A burst of reports from one agent. Stored with the group's next COMMIT: with
        the other agents' bursts, the submits and the pass of the same turn of the event
        loop, in one transaction."""
        if not self._bursts:
            if all(type(msg) is messages.Output for msg in msgs):
                # Only live output (a job printing fast), and nothing of this agent's
                # waits to be stored before it: kept in memory, no transaction.
                self._live_only(link, msgs)
                return
            self.commits.call(self._store_bursts, self._bursts_not_stored)
        self._bursts.append((link, msgs))

    def _live_only(self, link: agents.Link, msgs: list[messages.Up]) -> None:
        if (node := self.node_of(link)) is not None:
            node.last_heard = self.mono()
            for msg in msgs:
                self._output(msg)  # type: ignore[arg-type]

    def _store_bursts(self) -> None:
        """Inside a transaction: every burst received so far, each under a savepoint of
        its own (a report that cannot be stored undoes that agent's burst, and what was
        to follow it, not the others'). Its agent is reconnected once the rest is
        committed, and so sends it again."""
        bursts, self._bursts = self._bursts, []
        self._storing = bursts
        failed: dict[int, tuple[agents.Link, BaseException]] = {}
        with self._batch():
            for link, msgs in bursts:
                assert self._after_commit is not None
                marks = len(self._after_commit), len(self._to_record)
                # A job that started and ended within the burst (an instant job, a
                # script that fails at once) is stored by one UPDATE, not two.
                self._ending = {(m.job_id, m.attempt) for m in msgs
                                if type(m) is messages.Exited and m.reason not in _REQUEUES}
                try:
                    with database.write(self.store.db):
                        for msg in msgs:
                            self.on_message(link, msg)
                except Exception as exc:
                    log.exception("could not store a burst of %d reports from %s",
                                  len(msgs), link.name)
                    del self._after_commit[marks[0]:], self._to_record[marks[1]:]
                    failed[id(link)] = (link, exc)
                finally:
                    self._ending = set()
                    self._starting.clear()
        for link, exc in failed.values():  # once the others' reports are committed
            self.commits.after(functools.partial(
                link.drop, f"its reports could not be stored: {exc}"))
        self.commits.after(bursts.clear)  # committed: none of them waits any longer

    def _bursts_not_stored(self, exc: BaseException) -> None:
        """The transaction that was to hold them failed (its BEGIN, or the COMMIT on a
        full disk): every agent in it reconnects, and so sends its unacknowledged results
        again."""
        # Those it was storing, and those it never reached (BEGIN failed): all wait on
        # no other write, so none may stay behind.
        bursts = self._storing + self._bursts
        self._storing, self._bursts = [], []
        log.error("could not store %d agent reports: %s", sum(len(m) for _, m in bursts), exc)
        for link in {id(link): link for link, _ in bursts}.values():
            link.drop(f"its reports could not be stored: {exc}")

    def on_message(self, link: agents.Link, msg: messages.Up) -> None:
        node = self.node_of(link)
        if node is None:
            return  # a link the inventory replaced: its reports are stale
        node.last_heard = self.mono()
        if self._after_commit is None:
            with self._batch():
                self.on_message(link, msg)
            return
        try:
            match msg:
                case messages.Started() if (msg.job_id, msg.attempt) in self._ending:
                    # Stored with its Exited, further on in this burst (see _exited).
                    self._starting[(msg.job_id, msg.attempt)] = (msg.at, self.mono())
                case messages.Started():
                    job = self.store.mark_started(msg.job_id, msg.attempt, msg.at)
                    self._started(job, self.mono())
                    self.live[msg.job_id] = live_mod.LiveOutput(msg.attempt)
                    self._later(lambda: self.changes.notify(msg.job_id))
                case messages.Output():
                    self._output(msg)
                case messages.Exited():
                    self._exited(link, msg)
                case messages.Heartbeat():
                    self._heartbeat(link, msg)
        except errors.TransitionError as exc:
            log.info("ignored a stale report: %s", exc)

    def _started(self, job: store.Job, seen: float) -> None:
        """An attempt's start is stored: what the metrics and the planner keep of it."""
        self.started_seen[job.id] = seen
        sent = self.dispatched_at.get(job.id)
        latency = None if sent is None else seen - sent
        waited = self.clock() - job.created_at
        self._later(lambda: self.observer.job_started(job, waited, latency))

    def _output(self, msg: messages.Output) -> None:
        live = self.live.get(msg.job_id)
        if live is not None and live.attempt == msg.attempt:
            live.add(msg)
            self.changes.notify(msg.job_id)

    def _heartbeat(self, link: agents.Link, beat: messages.Heartbeat) -> None:
        self._set_dirty(link, beat.dirty)
        self._forget_ended(link.name, beat.jobs)
        held = {(h.job_id, h.attempt) for h in beat.jobs}
        now = self.mono()
        running = self.store.by_status(Status.RUNNING)
        ours = {(j.id, j.attempt) for j in running if j.node == link.name}
        for h in beat.jobs:
            if not h.finished and h.gpus and (h.job_id, h.attempt) not in ours:
                # Something the controller does not run there holds GPUs: they are taken.
                self.lingering.setdefault((h.job_id, h.attempt), (link.name, h.gpus))
        for job in running:
            sent = self.dispatched_at.get(job.id)
            if (job.node == link.name and (job.id, job.attempt) not in held
                    and sent is not None and now - sent > UNHELD_AFTER):
                self._requeue(job, f"agent {link.name} does not hold it")

    def _set_dirty(self, link: agents.Link, dirty: tuple[messages.DirtyGPU, ...]) -> None:
        node = self.node_of(link)
        if node is None or node.dirty == dirty:
            return
        for gpu in dirty:
            if gpu not in node.dirty:
                log.warning("host %s: GPU %d held back: %s", node.name, gpu.index, gpu.detail)
        node.dirty = dirty
        self.wake()

    def _exited(self, link: agents.Link, msg: messages.Exited) -> None:
        self._set_dirty(link, msg.dirty)
        self.lingering.pop((msg.job_id, msg.attempt), None)
        try:
            reason = Reason(msg.reason)
        except ValueError:
            reason = Reason.INFRA_ERROR
        if reason.value in _REQUEUES:
            job = self.store.get(msg.job_id, output=False)  # a running job has none stored
            if (
                job is not None and job.status is Status.RUNNING
                and job.attempt == msg.attempt and job.node == link.name
            ):
                if reason is Reason.NODE_LOST:
                    # Its agent stopped it: the controller was out of reach past the lease.
                    self._requeue(job, f"node lost: {msg.detail}")
                else:
                    # The agent would not start it (its GPUs were not free there): back to
                    # the queue, no retry counted; those GPUs wait for its next heartbeat.
                    self._requeue(job, f"refused by agent {link.name}: {msg.detail}",
                                  count=False)
                self._send(link, messages.Ack(job_id=msg.job_id, attempt=msg.attempt))
                return
        else:
            start = self._starting.pop((msg.job_id, msg.attempt), None)
            try:  # only while that attempt runs there: else stale, or stored before
                job = self.store.finish(
                    msg.job_id, msg.attempt, node=link.name,
                    status=final_status(reason, msg.exit_code),
                    reason=reason.value, exit_code=msg.exit_code,
                    stdout=msg.stdout, stderr=msg.stderr, detail=msg.detail or None,
                    at=msg.at, files=[(f.name, f.data) for f in msg.files],
                    started_at=None if start is None else start[0],
                )
            except errors.TransitionError:
                pass
            else:
                if start is not None:
                    self._started(job, start[1])
                self._finished(job)
                self._later(lambda: crashpoints.reach("before_ack"))  # stored, not acked yet
        # Stored now (or stale, or stored before): the agent may drop its copy.
        self._send(link, messages.Ack(job_id=msg.job_id, attempt=msg.attempt))
        self.wake()

    def live_output(self, job: store.Job) -> tuple[bytes, bytes]:
        """stdout and stderr so far of a running job (the stored ones once it ended)."""
        live = self.live.get(job.id)
        if job.status is not Status.RUNNING or live is None or live.attempt != job.attempt:
            return job.stdout, job.stderr
        return live.streams["stdout"].since(0), live.streams["stderr"].since(0)

    def _finished(self, job: store.Job) -> None:
        self._later(lambda: self.observer.job_ended(job))
        self.live.pop(job.id, None)
        self.dispatched_at.pop(job.id, None)
        self.started_seen.pop(job.id, None)
        self.wake()
        if self._after_commit is not None:
            self._to_record.append(job)
        else:
            self.recorder.record_then_notify([job])

    def _ended_notify(self, job_id: str) -> None:
        """A job's end is stored and its record written (or left for later): wake whoever
        waits on it (submit-and-wait) or follows its log."""
        self.watchers.notify(job_id)
        self.changes.notify(job_id)

    def _send(self, link: agents.Link, msg: messages.Down) -> None:
        def send() -> None:
            try:
                link.send(msg)
            except agents.LinkDown as exc:
                log.info("could not send %s: %s", type(msg).__name__, exc)

        self._later(send)


# Exited reasons that put the job back in the queue instead of ending it.
_REQUEUES = frozenset({Reason.NODE_LOST.value, Reason.REQUEUED.value})


def _endpoint(link: agents.Link) -> tuple[object, ...]:
    """What a link is made from: a change to any of it means a new connection."""
    return (link.address, link.port, link.user, link.fingerprint)


def _refuse_shared_keys(inv: inventory_mod.Inventory, links: dict[str, agents.Link],
                        nodes: dict[str, fleet.Node]) -> None:
    """One agent is one host: two names for the same host key would cancel each other's
    jobs. A host being removed still counts until it has left (rename = remove, wait,
    add)."""
    owner: dict[str, str] = {}
    leaving = {n: node.link for n, node in nodes.items() if n not in links}
    for name, link in [*links.items(), *leaving.items()]:
        other = owner.setdefault(link.fingerprint, name)
        if other != name:
            still = " (still draining out of the fleet)" if name in leaving else ""
            raise inventory_mod.InventoryError(
                f"hosts {other} and {name}{still} have the same host key: one agent "
                "cannot be two hosts")
