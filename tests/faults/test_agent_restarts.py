"""Docker agents restart under running jobs: containers outlive the agent and are adopted.

Killed (SIGKILL) or restarted (SIGTERM, as `systemctl restart` does), the agent finds
its containers by label when it starts again and carries on: the job ends as attempt
1 with all its output, whether it was still running or had ended while no agent was
there. Nothing is left behind.
"""

from __future__ import annotations

import pathlib
import signal
import time
from collections.abc import Iterator

import docker
import pytest

from tests import cluster as cluster_mod
from tests.cluster import Cluster
from tests.docker_support import require_docker

MiB = 1 << 20
AGENT = ("--runtime", "docker", "--memory", str(256 * MiB), "--pids", "64", "--cpus", "1")
CODE = ("import os, time\nprint('attempt', os.environ['GPUJOBQ_ATTEMPT'], flush=True)\n"
        "time.sleep({})\nprint('done')\n")


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_docker()
    with cluster_mod.running(tmp_path_factory.mktemp("adopt"), agent_args=AGENT) as c:
        yield c
        # After every scenario: nothing stuck, the database sound.
        assert c._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', "
                             "'running')").fetchone()[0] == 0
    assert docker.from_env().containers.list(all=True, filters={"label": "gpujobq.job"}) == []


def running_job(c: Cluster, seconds: float) -> tuple[cluster_mod.User, str]:
    user = c.user()
    job_id = c.submit(user, CODE.format(seconds), wait=False).json()["job_id"]
    deadline = time.monotonic() + 30
    while "attempt 1" not in c.get(user, "results", job_id).json()["stdout"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return user, job_id


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_an_agent_restart_mid_job_adopts_the_container(dc: Cluster, sig: int) -> None:
    user, job_id = running_job(dc, 4)
    dc.agents[0].stop(sig)
    time.sleep(1)
    dc.agents[0].start()
    final = dc.wait_status(user, job_id, {"completed", "failed", "cancelled"}, timeout=60)
    assert (final["status"], final["attempt"]) == ("completed", 1), final
    assert dc.get(user, "results", job_id).json()["stdout"] == "attempt 1\ndone\n"
    assert "adopted its container" in dc.log("node0")


def test_a_job_that_ended_while_its_agent_was_down_is_collected(dc: Cluster) -> None:
    user, job_id = running_job(dc, 1)
    dc.agents[0].stop(signal.SIGKILL)
    time.sleep(3)  # the container exits with no agent watching
    dc.agents[0].start()
    final = dc.wait_status(user, job_id, {"completed", "failed", "cancelled"}, timeout=60)
    assert (final["status"], final["attempt"]) == ("completed", 1), final
    assert dc.get(user, "results", job_id).json()["stdout"] == "attempt 1\ndone\n"


def test_a_time_limit_runs_on_across_the_restart(dc: Cluster) -> None:
    user = dc.user()
    # expected_time 2: a 4 s limit, counted from the container's start, not the adoption.
    job_id = dc.submit(user, CODE.format(30), wait=False, expected_time=2).json()["job_id"]
    dc.wait_status(user, job_id, {"running"})
    time.sleep(1)
    dc.agents[0].stop(signal.SIGKILL)
    dc.agents[0].start()
    began = time.monotonic()
    final = dc.wait_status(user, job_id, {"completed", "failed", "cancelled"}, timeout=60)
    assert (final["status"], final["reason"], final["attempt"]) == ("failed", "timeout", 1)
    assert time.monotonic() - began < 15


def test_leftovers_of_unknown_attempts_are_removed(dc: Cluster, tmp_path: pathlib.Path) -> None:
    client = docker.from_env()
    client.containers.create("gpujobq-job:bookworm", ["sleep", "60"], name="gpujobq-stray-a1",
                             labels={"gpujobq.job": "stray", "gpujobq.attempt": "1",
                                     "gpujobq.host": "node0"})
    dc.agents[0].stop(signal.SIGTERM)
    dc.agents[0].start()
    dc.wait_ready()
    assert client.containers.list(all=True, filters={"name": "gpujobq-stray-a1"}) == []
