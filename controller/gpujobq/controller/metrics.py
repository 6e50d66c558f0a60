"""Prometheus metrics of the controller, served by GET /metrics without a token.

Nothing exported names a user or a job: labels are host names (the admin's inventory),
GPU and host states, final statuses and reasons, and route templates. State (the queue,
the fleet) is read when Prometheus scrapes; events (a job starts or ends, an agent
connects, a 429) are counted as they happen. Each app has its own registry, never the
process-wide default one.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from gpujobq.controller import dispatcher as dispatcher_mod
from gpujobq.controller import fleetview, store
from gpujobq.protocol.states import Reason
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.enums import MediaType
from litestar.types import Scope
from prometheus_client import CollectorRegistry, Counter, Histogram, exposition
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

# fleetview.describe's GPU states, and as the board shows them: a down host's GPUs are
# "down", a drained host's free ones "drained" (neither can take a job).
GPU_STATES = ("free", "busy", "held", "dirty", "drained", "down")
HOST_STATES = ("up", "drained", "down")
REASONS = frozenset(r.value for r in Reason)
# Seconds. Waits and runs go from seconds to a day; a dispatch from milliseconds (the
# process runtime) to seconds (a container start).
LONG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
SHORT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

class Metrics(dispatcher_mod.Observer):
    """The app's registry: event metrics, fed by the dispatcher, and the state read at
    scrape time from ``state`` (the app's: its service and reloader)."""

    def __init__(self, state: State) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.waits = Histogram(
            "gpujobq_job_wait_seconds", "From submission to the start of an attempt "
            "(a requeued job's counts from its submission)", buckets=LONG_BUCKETS, registry=r)
        self.runs = Histogram(
            "gpujobq_job_run_seconds", "From start to end of jobs that ended, by final status",
            ["status"], buckets=LONG_BUCKETS, registry=r)
        self.latency = Histogram(
            "gpujobq_dispatch_latency_seconds", "From the dispatcher placing a job on a host "
            "to the agent's report that it started", buckets=SHORT_BUCKETS, registry=r)
        self.ended = Counter("gpujobq_jobs_ended", "Jobs that reached a final status, by "
                             "status and reason", ["status", "reason"], registry=r)
        self.limited = Counter("gpujobq_rate_limited", "HTTP 429 answers (submission limits), "
                               "by route", ["route"], registry=r)
        self.connects = Counter("gpujobq_agent_connects", "Times the link to a host's agent "
                                "came up (first connection and reconnections)", ["host"],
                                registry=r)
        r.register(StateCollector(lambda: _source(state)))

    # ---- dispatcher.Observer -------------------------------------------------------------

    def job_started(self, job: store.Job, waited: float, latency: float | None) -> None:
        self.waits.observe(max(0.0, waited))
        if latency is not None:
            self.latency.observe(max(0.0, latency))

    def job_ended(self, job: store.Job) -> None:
        reason = job.reason if job.reason in REASONS else "other"
        self.ended.labels(job.status.value, reason).inc()
        if job.started_at is not None and job.completed_at is not None:
            self.runs.labels(job.status.value).observe(max(0.0, job.completed_at - job.started_at))

    def agent_connected(self, host: str) -> None:
        self.connects.labels(host).inc()


@dataclasses.dataclass(frozen=True)
class Source:
    """What the state metrics are read from."""

    dispatcher: dispatcher_mod.Dispatcher
    reloader: fleetview.ReloaderLike
    clock: Callable[[], float]


def _source(state: State) -> Source:
    return Source(state.service.dispatcher, state.reloader, state.service.clock)


class StateCollector:
    """The queue and the fleet as they are when scraped. A part that cannot be read is
    left out (and logged) rather than failing the whole scrape."""

    def __init__(self, source: Callable[[], Source]) -> None:
        self.source = source

    def collect(self) -> list[Metric]:
        families: list[Metric] = []
        failures = 0
        for part in (queue_families, fleet_families):
            try:
                families += part(self.source())
            except Exception:
                log.exception("metrics: %s could not be read", part.__name__)
                failures += 1
        families.append(GaugeMetricFamily(
            "gpujobq_scrape_errors", "Parts of this scrape that could not be read (see the "
            "controller's log); their metrics are missing", value=failures))
        return families


def queue_families(source: Source) -> list[Metric]:
    pending, running, oldest = source.dispatcher.store.queue_stats()
    waited = max(0.0, source.clock() - oldest) if oldest is not None else 0.0
    return [
        GaugeMetricFamily("gpujobq_queue_depth", "Jobs waiting to run (pending)", value=pending),
        GaugeMetricFamily("gpujobq_jobs_running", "Jobs placed on a host and not ended yet",
                          value=running),
        GaugeMetricFamily("gpujobq_queue_oldest_wait_seconds", "How long the first job in "
                          "the queue has waited since submission (0 when none waits)",
                          value=waited),
    ]


def fleet_families(source: Source) -> list[Metric]:
    return fleet_metrics(fleetview.describe(source.dispatcher, source.reloader, {}))


def fleet_metrics(fleet: fleetview.FleetReply) -> list[Metric]:
    """Per host: GPUs by state, the host's state, whether its agent is connected."""
    gpus = GaugeMetricFamily(
        "gpujobq_gpus", "GPUs by host and state: free (can take a job now), busy (a job runs "
        "on it), held (a job given up on may still run), dirty (held back by the agent's "
        "checks), drained (free, on a drained host), down (its host is down)",
        labels=["host", "state"])
    hosts = GaugeMetricFamily(
        "gpujobq_host_state", "1 for the host's state (up, drained or down), 0 for the others",
        labels=["host", "state"])
    connected = GaugeMetricFamily(
        "gpujobq_agent_connected", "1 while the SSH link to the host's agent is up",
        labels=["host"])
    for host in fleet.hosts:
        counts = collections.Counter(_shown(host.state, g.state) for g in host.gpus)
        for state in GPU_STATES:
            gpus.add_metric([host.name, state], counts[state])
        for state in HOST_STATES:
            hosts.add_metric([host.name, state], float(host.state == state))
        connected.add_metric([host.name], float(host.connected))
    reload_failed = GaugeMetricFamily(
        "gpujobq_inventory_reload_failed", "1 when the last reload of inventory.yaml failed "
        "(the last good inventory stays in use)", value=float(fleet.inventory.error is not None))
    return [gpus, hosts, connected, reload_failed]


def _shown(host: str, gpu: str) -> str:
    if host == "down":
        return "down"
    return "drained" if host == "drained" and gpu == "free" else gpu


def count_refusal(exc: Exception, scope: Scope) -> None:
    """An after_exception hook: count the 429s, by route template (a bounded set)."""
    if getattr(exc, "status_code", None) != 429:
        return
    metrics = getattr(Litestar.from_scope(scope).state, "metrics", None)
    if isinstance(metrics, Metrics):
        metrics.limited.labels(scope.get("path_template", "unrouted")).inc()


@get("/metrics", media_type=MediaType.TEXT, summary="Prometheus metrics",
     response_description="Prometheus text exposition format; metric names begin gpujobq_")
async def scrape(request: Request[Any, Any, Any]) -> Response[bytes]:
    """No token needed (Prometheus scrapes it): queue depth, running jobs, GPUs per host
    and state, hosts' states, agent connections, job wait and run times, dispatch
    latency, 429 answers. No user names or job ids."""
    metrics: Metrics = request.app.state.metrics
    # As a header: a text/ media type would get a second charset appended.
    return Response(exposition.generate_latest(metrics.registry), media_type=MediaType.TEXT,
                    headers={"content-type": exposition.CONTENT_TYPE_LATEST})
