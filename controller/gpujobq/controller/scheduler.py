"""Placement, as a pure function: (queued jobs, hosts, busy GPUs, now) -> a plan.

One global queue for the whole fleet. The plan says which queued jobs start now and on
which GPUs, and, for every job left waiting, its place in the queue, why it waits and
when it is expected to start.

* Order: submission order, made fair between users: a user's k-th waiting job ranks
  after every other user's (k-1)-th, counting jobs they already run. With the default
  limit of one active job per user this is plain FIFO.
* A job goes to an up, undrained host that has all the labels its competition asks for
  and enough free GPUs; of those, the one it fills best (fewest GPUs left over), so
  large hosts stay whole for multi-GPU jobs. It gets the lowest free indexes.
* No starvation: a job that does not fit anywhere reserves the eligible host where
  enough GPUs free up soonest (from the time limits of what runs there). Later jobs
  may use that host's free GPUs only when they are certain to end before then, or when
  GPUs are left over for it ("backfill"); they never delay it.
* Estimates replay the queue on each host's GPUs using the expected times of what runs
  and what waits ahead.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import msgspec
from gpujobq.protocol.messages import GPU

HostState = Literal["up", "drained", "down"]
FORECAST_DEPTH = 2000  # waiting jobs beyond this get no estimated start


class Queued(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    user_id: str = ""
    gpus: int = 1
    labels: dict[str, str] = {}  # the host must have all of these
    time_limit: float = math.inf  # it is stopped after this many seconds
    expected_time: float = 0.0


class HostView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    gpus: tuple[GPU, ...]  # the GPUs jobs may be given (declared and present; dirty ones
    # come in as Busy with no known end)
    labels: dict[str, str] = {}
    state: HostState = "up"


class Busy(msgspec.Struct, frozen=True, kw_only=True):
    """GPUs taken on a host: by a running job, or by something that may still run."""

    host: str
    gpus: tuple[int, ...]
    user_id: str | None = None
    ends_by: float = math.inf  # it is certain to be over by then (inf: unknown)
    expected_end: float = math.inf  # when it is expected to be over


class Assignment(msgspec.Struct, frozen=True):
    job_id: str
    host: str
    gpus: tuple[GPU, ...]


class Waiting(msgspec.Struct, frozen=True):
    position: int  # 1 = the next to start
    reason: str  # the pending_reason: why it has not started
    estimated_start: float | None  # None: not known (no host can run it soon)


class Plan(msgspec.Struct, frozen=True):
    assignments: list[Assignment]
    waiting: dict[str, Waiting]


def gpus_phrase(n: int) -> str:
    return "a free GPU" if n == 1 else f"{n} free GPUs on one host"


def _labels_phrase(labels: dict[str, str]) -> str:
    return " with " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) if labels else ""


def why_never(job: Queued, hosts: Iterable[HostView]) -> str | None:
    """Why no host of the fleet could ever run this job, or None if one could."""
    return None if any(_eligible(job, h) for h in hosts) else _no_host(job)


def _no_host(job: Queued) -> str:
    plural = "s" if job.gpus != 1 else ""
    return f"no host has {job.gpus} GPU{plural}{_labels_phrase(job.labels)}"


def _eligible(job: Queued, host: HostView) -> bool:
    return len(host.gpus) >= job.gpus and all(
        host.labels.get(k) == v for k, v in job.labels.items())


def fair_order(queue: Sequence[Queued], busy: Iterable[Busy]) -> list[Queued]:
    """Submission order, with each user's k-th job after every other user's (k-1)-th."""
    seen: Counter[str] = Counter(b.user_id for b in busy if b.user_id is not None)
    ranked = []
    for seq, job in enumerate(queue):
        ranked.append((seen[job.user_id], seq, job))
        seen[job.user_id] += 1
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [job for _, _, job in ranked]


class _Reservation:
    def __init__(self, shadow: float, spare: int) -> None:
        self.shadow = shadow  # when enough GPUs will be free for the job that waits
        self.spare = spare  # GPUs free then beyond what that job needs


def plan(
    queue: Sequence[Queued], hosts: Sequence[HostView], busy: Sequence[Busy], now: float,
    *, estimates: bool = True,
) -> Plan:
    """Who starts now where, and for each job left waiting: position, reason, estimate
    (``estimates=False``: none, for a pass that only places jobs)."""
    order = fair_order(queue, busy)
    taken: dict[str, dict[int, Busy]] = {}
    for b in busy:
        for index in b.gpus:
            taken.setdefault(b.host, {})[index] = b
    free = {h.name: _free_gpus(h, taken.get(h.name)) for h in hosts}
    up = [h for h in hosts if h.state == "up"]
    by_free = _FreeHosts(up, free)
    eligible_cache: dict[tuple[int, tuple[tuple[str, str], ...]], list[HostView]] = {}
    up_cache: dict[tuple[int, tuple[tuple[str, str], ...]], list[HostView]] = {}
    names_cache: dict[tuple[int, tuple[tuple[str, str], ...]], set[str]] = {}

    def eligible(job: Queued) -> list[HostView]:
        key = (job.gpus, tuple(sorted(job.labels.items())))
        if key not in eligible_cache:
            eligible_cache[key] = [h for h in hosts if _eligible(job, h)]
        return eligible_cache[key]

    def eligible_up(job: Queued) -> list[HostView]:
        """The eligible hosts that are up, by name (the best fit's tie-break)."""
        key = (job.gpus, tuple(sorted(job.labels.items())))
        if key not in up_cache:
            up_cache[key] = sorted((h for h in eligible(job) if h.state == "up"),
                                   key=lambda h: h.name)
        return up_cache[key]

    def eligible_names(job: Queued) -> set[str]:
        key = (job.gpus, tuple(sorted(job.labels.items())))
        if key not in names_cache:
            names_cache[key] = {h.name for h in eligible_up(job)}
        return names_cache[key]

    reservations: dict[str, _Reservation] = {}
    assignments: list[Assignment] = []
    unplaced: list[tuple[Queued, str]] = []
    free_total = sum(len(free[h.name]) for h in up)  # GPUs free on up hosts, as placed
    all_reserved: set[tuple[int, tuple[tuple[str, str], ...]]] = set()  # keys with no host
    # left to reserve (reservations only grow within a plan)
    blocked: dict[tuple[int, tuple[tuple[str, str], ...]], str | None] = {}
    for job in order:
        hosts_for_job = eligible(job)
        key = (job.gpus, tuple(sorted(job.labels.items())))
        if key not in blocked:  # the same for every job of a kind, within a plan
            blocked[key] = _blocked(job, hosts_for_job)
        reason = blocked[key]
        if reason is None:
            # A deep queue on a full fleet skips the search: nothing can fit.
            name = None if job.gpus > free_total else _best_fit(
                job, eligible_names(job), by_free, reservations, now)
            if name is not None:
                free_total -= job.gpus
                _charge(reservations.get(name), job, now)
                got, free[name] = free[name][: job.gpus], free[name][job.gpus:]
                by_free.took(name, len(got) + len(free[name]), len(free[name]))
                assignments.append(Assignment(job.job_id, name, tuple(got)))
                started = Busy(host=name, gpus=tuple(g.index for g in got),
                               user_id=job.user_id, ends_by=now + job.time_limit,
                               expected_end=now + job.expected_time)
                taken.setdefault(name, {}).update(dict.fromkeys(started.gpus, started))
                continue
            if key not in all_reserved:
                _reserve(job, hosts_for_job, free, taken, reservations)
                if all(h.name in reservations for h in eligible_up(job)):
                    all_reserved.add(key)
            reason = f"waiting for {gpus_phrase(job.gpus)}"
        unplaced.append((job, reason))

    starts = _forecast(unplaced, eligible, taken, now) if estimates else {}
    waiting = {
        job.job_id: Waiting(i, reason, starts.get(job.job_id))
        for i, (job, reason) in enumerate(unplaced, start=1)
    }
    return Plan(assignments, waiting)


def _free_gpus(host: HostView, taken: dict[int, Busy] | None) -> list[GPU]:
    """The host's GPUs that nothing holds, lowest index first."""
    gpus = host.gpus if not taken else [g for g in host.gpus if g.index not in taken]
    return sorted(gpus, key=_INDEX)


_INDEX = operator.attrgetter("index")


class _FreeHosts:
    """The up hosts grouped by how many GPUs they have free, each group in name order:
    a job's best fit is in the smallest group that can hold it, so a placement looks at
    a few hosts, not the whole fleet."""

    def __init__(self, up: list[HostView], free: dict[str, list[GPU]]) -> None:
        self.groups: dict[int, list[str]] = {}
        for name in sorted(h.name for h in up):
            self.groups.setdefault(len(free[name]), []).append(name)

    def fitting(self, gpus: int) -> Iterator[list[str]]:
        """The groups with at least ``gpus`` free, fewest first."""
        return (self.groups[n] for n in sorted(self.groups) if n >= gpus)

    def took(self, name: str, had: int, left: int) -> None:
        group = self.groups[had]
        del group[bisect.bisect_left(group, name)]
        if not group:
            del self.groups[had]
        bisect.insort(self.groups.setdefault(left, []), name)


def _best_fit(job: Queued, eligible: set[str], by_free: _FreeHosts,
              reservations: dict[str, _Reservation], now: float) -> str | None:
    """Of the up hosts the job may use now, the one it fills best: fewest GPUs left over,
    then one no other job reserves, then the first by name."""
    for group in by_free.fitting(job.gpus):
        reserved = None  # the first in the group that a reservation lets it use
        for name in group:
            if name not in eligible:
                continue
            res = reservations.get(name)
            if res is None:
                return name
            if reserved is None and _may_use(res, job, now):
                reserved = name
        if reserved is not None:
            return reserved
    return None


def _blocked(job: Queued, hosts_for_job: list[HostView]) -> str | None:
    """Why the job cannot start on any host as the fleet stands, beyond busy GPUs."""
    if not hosts_for_job:
        return _no_host(job)
    states = {h.state for h in hosts_for_job}
    if "up" in states:
        return None
    if states == {"drained"}:
        return "all eligible hosts drained"
    if states == {"down"}:
        return "all eligible hosts down"
    return "all eligible hosts drained or down"


def _may_use(res: _Reservation | None, job: Queued, now: float) -> bool:
    return res is None or now + job.time_limit <= res.shadow or job.gpus <= res.spare


def _charge(res: _Reservation | None, job: Queued, now: float) -> None:
    if res is not None and now + job.time_limit > res.shadow:
        res.spare -= job.gpus  # it may still run when the reserved job is due


def _reserve(
    job: Queued,
    hosts_for_job: list[HostView],
    free: dict[str, list[GPU]],
    taken: dict[str, dict[int, Busy]],
    reservations: dict[str, _Reservation],
) -> None:
    """Hold the eligible host where the job could start soonest for it (one per host)."""
    best: tuple[float, str, int] | None = None
    for host in hosts_for_job:
        if host.state != "up" or host.name in reservations:
            continue
        free_now = {g.index for g in free[host.name]}
        times = sorted(
            -math.inf if g.index in free_now
            else taken.get(host.name, {}).get(g.index, Busy(host="", gpus=())).ends_by
            for g in host.gpus
        )
        shadow = times[job.gpus - 1]
        if math.isinf(shadow) and shadow > 0:
            continue  # it never frees up for sure: reserving would hold nothing back
        spare = sum(1 for t in times if t <= shadow) - job.gpus
        if best is None or (shadow, host.name) < best[:2]:
            best = (shadow, host.name, spare)
    if best is not None:
        reservations[best[1]] = _Reservation(best[0], best[2])


def _forecast(
    unplaced: list[tuple[Queued, str]],
    eligible: Callable[[Queued], list[HostView]],
    taken: dict[str, dict[int, Busy]],
    now: float,
) -> dict[str, float]:
    """When each waiting job is expected to start: replay the queue on expected times.

    Each up host is a sorted list of the times its GPUs come free; a job takes the
    earliest `gpus` of them on the host where the last of those is soonest.
    """
    free_at: dict[str, list[float]] = {}
    out: dict[str, float] = {}
    for job, _ in unplaced[:FORECAST_DEPTH]:
        best: tuple[float, str] | None = None
        for host in eligible(job):
            if host.state != "up":
                continue
            slots = free_at.get(host.name)
            if slots is None:
                on = taken.get(host.name, {})
                slots = free_at[host.name] = sorted(
                    max(now, on[g.index].expected_end) if g.index in on else now
                    for g in host.gpus)
            start = slots[job.gpus - 1]
            if best is None or (start, host.name) < best:
                best = (start, host.name)
        if best is None or math.isinf(best[0]):
            continue
        start, name = best
        slots = free_at[name]
        del slots[: job.gpus]
        for _ in range(job.gpus):
            bisect.insort(slots, start + job.expected_time)
        out[job.job_id] = start
    return out
