"""The metrics: the dispatcher's events and state as exported, stepped on a fake clock
against a real SQLite store (the dispatcher tests' World); a scrape that cannot read a
part; one registry per app."""

from __future__ import annotations

import pathlib
import types
from typing import Any

import pytest
from gpujobq.controller import errors, metrics
from gpujobq.protocol import messages
from litestar import Litestar
from litestar.datastructures import State
from prometheus_client import exposition
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_dispatcher import World, host, inv


def samples(m: metrics.Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = exposition.generate_latest(m.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(m: metrics.Metrics, name: str, **labels: str) -> float:
    return samples(m)[(name, frozenset(labels.items()))]


def app_state(w: World, error: str | None = None) -> State:
    reloader = types.SimpleNamespace(path="inventory.yaml", error=error, loaded_at=None)
    service = types.SimpleNamespace(dispatcher=w.d, clock=lambda: w.now)
    return State({"service": service, "reloader": reloader})


@pytest.fixture
def w(tmp_path: pathlib.Path) -> World:
    return World(tmp_path)


def test_a_job_s_wait_latency_and_run_are_observed_and_the_state_follows(w: World) -> None:
    m = metrics.Metrics(app_state(w))
    w.d.observer = m
    for name in ("j1", "j2", "j3"):
        w.submit(name)
    w.now += 3  # queued 3 s
    assert w.d.run_once() == 2  # host a has 2 GPUs: j3 waits
    w.now += 0.5  # then 0.5 s until the agent says it started
    started = messages.Started(job_id="j1", attempt=1, at=w.now)
    w.d.on_message(w.link, started)  # type: ignore[arg-type]
    assert value(m, "gpujobq_job_wait_seconds_sum") == pytest.approx(3.5)
    assert value(m, "gpujobq_dispatch_latency_seconds_sum") == pytest.approx(0.5)
    assert value(m, "gpujobq_queue_depth") == 1
    assert value(m, "gpujobq_queue_oldest_wait_seconds") == pytest.approx(3.5)
    assert value(m, "gpujobq_jobs_running") == 2
    assert value(m, "gpujobq_gpus", host="a", state="busy") == 2
    assert value(m, "gpujobq_gpus", host="a", state="free") == 0
    assert value(m, "gpujobq_host_state", host="a", state="up") == 1

    w.now += 7
    w.d.on_message(w.link, w.exited("j1", 1, exit_code=2))  # type: ignore[arg-type]
    assert value(m, "gpujobq_job_run_seconds_sum", status="failed") == pytest.approx(7)
    assert value(m, "gpujobq_jobs_ended_total", status="failed", reason="exit_code") == 1
    w.d.cancel(w.store.get("j3"))  # never started: ended, but no run time
    assert value(m, "gpujobq_jobs_ended_total", status="cancelled",
                 reason="cancelled_by_user") == 1
    assert ("gpujobq_job_run_seconds_count", frozenset({("status", "cancelled")})) \
        not in samples(m)
    assert value(m, "gpujobq_queue_depth") == 0
    assert value(m, "gpujobq_scrape_errors") == 0


def test_agent_connections_are_counted_per_host(w: World) -> None:
    m = metrics.Metrics(app_state(w))
    w.d.observer = m
    hello = messages.Hello(host="a", runtime="process")
    w.d.on_connected(w.link, hello)  # type: ignore[arg-type]
    w.d.on_connected(w.link, hello)  # type: ignore[arg-type]
    assert value(m, "gpujobq_agent_connects_total", host="a") == 2
    w.link.connected = False
    assert value(m, "gpujobq_agent_connected", host="a") == 0
    assert value(m, "gpujobq_host_state", host="a", state="down") == 1
    # A down host's GPUs can take no job: they count as down, not free.
    assert (value(m, "gpujobq_gpus", host="a", state="down"),
            value(m, "gpujobq_gpus", host="a", state="free")) == (2, 0)


def test_a_drained_hosts_free_gpus_count_as_drained(w: World) -> None:
    m = metrics.Metrics(app_state(w))
    w.d.on_connected(w.link, messages.Hello(host="a", runtime="process"))  # type: ignore[arg-type]
    w.submit("j1")
    w.d.run_once()  # j1 takes one GPU
    w.d.apply_inventory(inv(host("a", 2, drain=True)))
    assert {s: value(m, "gpujobq_gpus", host="a", state=s)
            for s in ("free", "busy", "drained")} == {"free": 0, "busy": 1, "drained": 1}


def test_a_failed_reload_shows(w: World) -> None:
    m = metrics.Metrics(app_state(w, error="hosts[0].gpus: bad"))
    assert value(m, "gpujobq_inventory_reload_failed") == 1


def test_a_part_that_cannot_be_read_is_left_out_not_a_failed_scrape(
    w: World, caplog: pytest.LogCaptureFixture,
) -> None:
    m = metrics.Metrics(State({}))  # no service, no reloader: every part fails
    got = samples(m)
    assert got[("gpujobq_scrape_errors", frozenset())] == 2
    assert not any(name == "gpujobq_queue_depth" for name, _ in got)
    assert "could not be read" in caplog.text


def test_each_app_has_its_own_registry(w: World) -> None:
    one, two = metrics.Metrics(app_state(w)), metrics.Metrics(app_state(w))
    one.agent_connected("a")
    assert value(one, "gpujobq_agent_connects_total", host="a") == 1
    assert ("gpujobq_agent_connects_total", frozenset({("host", "a")})) not in samples(two)


def test_only_429s_are_counted_by_route_template(w: World) -> None:
    app = Litestar(route_handlers=[])
    app.state.metrics = m = metrics.Metrics(app_state(w))
    scope: Any = {"litestar_app": app, "path_template": "/api/submit"}
    metrics.count_refusal(errors.RateLimited("Too Many Requests"), scope)
    metrics.count_refusal(errors.Forbidden("no"), scope)
    assert value(m, "gpujobq_rate_limited_total", route="/api/submit") == 1
