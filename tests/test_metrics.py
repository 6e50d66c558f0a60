"""GET /metrics against a real controller and agent (process runtime): read without a
token, gauges that follow jobs through the queue and the fleet, histograms and counters
that count what happened, an agent's connection going down and back, and no user name
or job id anywhere in the exposition."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any

import requests
from prometheus_client import exposition
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster, running

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]


def scrape(cluster: Cluster) -> Scrape:
    r = requests.get(f"{cluster.url}/metrics", timeout=30)  # no Authorization header
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == exposition.CONTENT_TYPE_LATEST, r.headers
    return Scrape(r.text)


def scrape_until(cluster: Cluster, check: Callable[[Scrape], bool], timeout: float = 30) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(cluster)
        if check(got):
            return got
        assert time.monotonic() < deadline, got.text
        time.sleep(0.05)


def gated(gate: pathlib.Path, exit_code: int = 0) -> str:
    """A job that runs until the test creates ``gate``, then exits with ``exit_code``."""
    return (f"import os, sys, time\nwhile not os.path.exists({str(gate)!r}):\n"
            f"    time.sleep(0.02)\nprint('done')\nsys.exit({exit_code})\n")


def test_metrics_follow_jobs_agents_and_refusals(tmp_path: pathlib.Path) -> None:
    with running(tmp_path / "c", agents=1, gpus=1) as c:
        alice, bob = c.user("alice"), c.user("bob")
        node = c.agents[0].name
        first = scrape(c)
        assert first("gpujobq_queue_depth") == 0
        assert first("gpujobq_jobs_running") == 0
        assert first("gpujobq_gpus", host=node, state="free") == 1
        assert first("gpujobq_gpus", host=node, state="busy") == 0
        assert first("gpujobq_host_state", host=node, state="up") == 1
        assert first("gpujobq_agent_connected", host=node) == 1
        assert first("gpujobq_agent_connects_total", host=node) == 1
        assert first("gpujobq_job_wait_seconds_count") == 0
        assert first("gpujobq_scrape_errors") == 0

        gate = tmp_path / "gate"
        a = c.submit(alice, gated(gate), wait=False, expected_time=60)
        assert a.status_code == 202, a.text
        running_now = scrape_until(c, lambda m: m("gpujobq_dispatch_latency_seconds_count") == 1)
        assert running_now("gpujobq_jobs_running") == 1
        assert running_now("gpujobq_gpus", host=node, state="busy") == 1
        assert running_now("gpujobq_gpus", host=node, state="free") == 0
        assert running_now("gpujobq_job_wait_seconds_count") == 1

        b = c.submit(bob, gated(gate, exit_code=3), wait=False, expected_time=60)
        assert b.status_code == 202, b.text
        refused = c.submit(alice, "print(1)", wait=False)  # one active job per user
        assert refused.status_code == 429, refused.text
        waiting = scrape(c)
        assert waiting("gpujobq_queue_depth") == 1
        assert waiting("gpujobq_queue_oldest_wait_seconds") >= 0
        assert waiting("gpujobq_rate_limited_total", route="/api/submit") == 1

        gate.touch()
        ids = [a.json()["job_id"], b.json()["job_id"]]
        assert c.wait_status(alice, ids[0], {"completed", "failed"})["status"] == "completed"
        assert c.wait_status(bob, ids[1], {"completed", "failed"})["status"] == "failed"
        done = scrape_until(c, lambda m: m("gpujobq_jobs_running") == 0)
        assert done("gpujobq_queue_depth") == 0
        assert done("gpujobq_gpus", host=node, state="free") == 1
        assert done("gpujobq_job_wait_seconds_count") == 2
        assert done("gpujobq_dispatch_latency_seconds_count") == 2
        assert done("gpujobq_job_run_seconds_count", status="completed") == 1
        assert done("gpujobq_job_run_seconds_count", status="failed") == 1
        assert done("gpujobq_jobs_ended_total", status="completed", reason="exit_code") == 1
        assert done("gpujobq_jobs_ended_total", status="failed", reason="exit_code") == 1
        for secret in (alice.name, bob.name, *ids):
            assert secret not in done.text

        c.agents[0].stop()
        down = scrape_until(c, lambda m: m("gpujobq_agent_connected", host=node) == 0)
        assert down("gpujobq_host_state", host=node, state="down") == 1
        assert down("gpujobq_gpus", host=node, state="free") == 0
        c.agents[0].start()
        back = scrape_until(c, lambda m: m("gpujobq_agent_connected", host=node) == 1)
        assert back("gpujobq_agent_connects_total", host=node) == 2
        assert back("gpujobq_host_state", host=node, state="up") == 1


def test_metrics_route_is_in_the_openapi_schema_without_a_token(tmp_path: pathlib.Path) -> None:
    with running(tmp_path / "c", agents=1, gpus=1) as c:
        schema: dict[str, Any] = requests.get(f"{c.url}/schema/openapi.json", timeout=30).json()
    op = schema["paths"]["/metrics"]["get"]
    assert "security" not in op
    assert "no token" in op["description"].lower()
    ok = op["responses"]["200"]
    assert "text/plain" in ok["content"]
    assert "Prometheus" in ok["description"]
