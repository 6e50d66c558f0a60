"""What the API asks of the controller: submit, look up, wait, cancel."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from gpujobq.controller import (
    accounts,
    crashpoints,
    dispatcher,
    errors,
    ratelimit,
    scheduler,
    store,
)
from gpujobq.controller.settings import Settings
from gpujobq.protocol import jobconfig
from gpujobq.protocol.states import TERMINAL, Status

NOT_FOUND = "Job not found"  # the same for unknown, malformed and other users' ids


class JobService:
    def __init__(
        self,
        *,
        store: store.Store,
        dispatcher: dispatcher.Dispatcher,
        settings: Settings,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.settings = settings
        self.clock = clock
        self.stopping = False  # set on SIGTERM: no new jobs, waiters answer at once
        self.commits = dispatcher.commits
        self._authenticate = accounts.Authenticator(store.db)
        # _runnable's verdicts: (GPUs, labels) -> (dispatcher.fleet_version, why never)
        self._never: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[int, str | None]] = {}
        self.limits = ratelimit.Limits(
            submits=settings.submit_limit, window=settings.submit_window,
            active=settings.active_limit,
        )

    def authenticate(self, token: str | None) -> str:
        user = self._authenticate(token, self.clock()) if token else None
        if user is None:
            raise errors.Unauthorized("Invalid or expired token")
        return user

    def stop(self) -> None:
        """Graceful stop begins: refuse new submissions, let every waiter answer now."""
        self.stopping = True
        self.dispatcher.watchers.notify_all()
        self.dispatcher.changes.notify_all()  # log followers end their streams

    async def submit(
        self, config: jobconfig.JobConfig, code: bytes, idempotency_key: str | None
    ) -> store.Job:
        if self.stopping:
            raise errors.Unavailable("Server is shutting down; submit again in a moment",
                                     headers={"Retry-After": "5"})
        if idempotency_key is not None:
            # A retry gets its job back, even if the inventory changed in between.
            earlier = self.store.by_idempotency_key(config.user_id, idempotency_key)
            if earlier is not None:
                return earlier
        inv = self.dispatcher.inventory
        profile = inv.profile(config.competition_id)
        if profile is None:
            known = ", ".join(sorted(inv.competitions)) or "none"
            raise errors.BadRequest(
                f"Unknown competition_id '{config.competition_id}' (this server runs: {known})")
        gpus = config.gpus or profile.gpus
        if gpus > profile.max_gpus:
            raise errors.BadRequest(
                f"gpus: {gpus} requested, but a job of competition "
                f"'{config.competition_id}' may use at most {profile.max_gpus}")
        self._runnable(scheduler.Queued(job_id="", gpus=gpus, labels=profile.labels))
        new = store.NewJob(
            id=new_job_id(),
            user_id=config.user_id,
            competition_id=config.competition_id,
            project_id=config.project_id,
            expected_time=config.expected_time,
            time_limit=min(config.expected_time * self.settings.time_limit_factor,
                           profile.time_cap),
            code=code,
            config=jobconfig.for_job(config),
            gpu_count=gpus,
            idempotency_key=idempotency_key,
        )
        # Submits that arrive together share one durable commit (see GroupCommit).
        job, created = await self.commits.run(lambda: self.store.submit_within(new, self.limits))
        if created:
            crashpoints.reach("after_commit")
            self.dispatcher.wake(frees=False)
        return job

    def _runnable(self, job: scheduler.Queued) -> None:
        """Refuse a job that no host of the fleet could ever run (drained or down count).
        The verdict for a (GPUs, labels) is kept until the fleet changes."""
        key = (job.gpus, tuple(sorted(job.labels.items())))
        kept = self._never.get(key)
        if kept is None or kept[0] != self.dispatcher.fleet_version:
            kept = self._never[key] = (self.dispatcher.fleet_version, self._why_never(job))
        if kept[1] is not None:
            raise errors.BadRequest(f"No host can ever run this job: {kept[1]}")

    def _why_never(self, job: scheduler.Queued) -> str | None:
        views = []
        for node in self.dispatcher.nodes.values():
            if node.removing:
                continue
            gpus = node.known_gpus()
            if gpus is None:
                return None  # a host whose GPUs are not known yet might run it
            views.append(scheduler.HostView(name=node.name, gpus=gpus, labels=node.host.labels))
        return scheduler.why_never(job, views)

    def job_of(self, job_id: str, user_id: str, *, output: bool = True) -> store.Job:
        job = self.store.get(job_id, output=output)
        if job is None or job.user_id != user_id:
            raise errors.NotFound(NOT_FOUND)
        return job

    async def wait(self, job: store.Job, timeout: float) -> store.Job:
        """The job once terminal, or as it is after ``timeout`` seconds."""
        if job.status not in TERMINAL and not self.stopping:
            await self.dispatcher.watchers.wait(job.id, timeout)
        fresh = self.store.get(job.id)
        assert fresh is not None
        return fresh

    def any_job(self, job_id: str, *, output: bool = True) -> store.Job:
        """For admins: any user's job."""
        job = self.store.get(job_id, output=output)
        if job is None:
            raise errors.NotFound(NOT_FOUND)
        return job

    async def cancel(self, job: store.Job, by_admin: str | None = None) -> store.Job:
        if job.status in TERMINAL:
            raise errors.Conflict(f"Job already finished with status {job.status}")
        job = self.dispatcher.cancel(job, by_admin)
        if job.status is Status.RUNNING:
            # The agent stops it: SIGTERM, then SIGKILL after the grace period.
            job = await self.wait(job, self.settings.grace + 5.0)
        return job


def new_job_id() -> str:
    """A job's id: a UUID laid out as version 7 (RFC 9562), the time in milliseconds
    first, then 74 random bits. IDs made later sort later, so every index keyed by job id
    (the jobs table's, its events') grows at its end instead of taking a write on a
    random page for each job."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # the RFC's variant
    h = f"{value:032x}"  # laid out as str(uuid.UUID(int=value)), without its checks
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
