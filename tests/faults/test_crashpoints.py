"""The controller dies at each crash point; a restart recovers the job exactly once.

Real processes: an agent on 127.0.0.2, a controller started with GPUJOBQ_CRASH_AT set,
which exits as a SIGKILL would (no cleanup) the first time it reaches that point, then
started again without it. The client retries its submit with the same Idempotency-Key,
as a careful client does after a lost answer.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import pytest
import requests

from tests import cluster as cluster_mod
from tests.cluster import Cluster, User

CODE = "import os\nprint('ran attempt', os.environ['GPUJOBQ_ATTEMPT'])\n"


def submit(c: Cluster, user: User, key: str) -> requests.Response:
    config = {"competition_id": "faults", "project_id": "p", "user_id": user.name,
              "expected_time": 30}
    return requests.post(
        f"{c.url}/api/submit?wait=false", headers={**user.headers, "Idempotency-Key": key},
        files={"code": ("solution.py", CODE), "config_file": ("config.yaml", str(config))},
        timeout=10)


def died(c: Cluster, timeout: float = 20) -> int:
    assert c.proc is not None
    deadline = time.monotonic() + timeout
    while c.proc.poll() is None:
        assert time.monotonic() < deadline, "the controller did not reach its crash point"
        time.sleep(0.05)
    return c.proc.returncode


def check_consistent(c: Cluster) -> None:
    """Nothing stuck, and the database is sound."""
    assert c._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stuck = c._db.execute(
        "SELECT id, status FROM jobs WHERE status IN ('pending', 'running')").fetchall()
    assert stuck == []


@pytest.mark.parametrize("point", ["after_commit", "before_dispatch", "after_dispatch",
                                   "before_record", "before_ack"])
def test_a_crash_at_each_point_is_recovered(tmp_path: pathlib.Path, point: str) -> None:
    c = Cluster(tmp_path)
    c.controller_env = {"GPUJOBQ_CRASH_AT": point}
    try:
        c.start()
        user = c.user()
        try:
            first: dict[str, Any] | None = submit(c, user, "k1").json()
        except requests.RequestException:
            first = None  # the answer was lost with the controller
        assert point != "after_commit" or first is None  # it died before answering
        assert died(c) == 137
        c.controller_env = {}
        c.start_controller()
        again = submit(c, user, "k1")  # the client's retry
        assert again.status_code in (200, 202), again.text
        job_id = again.json()["job_id"]
        if first is not None:
            assert job_id == first["job_id"]
        jobs = c._db.execute("SELECT id FROM jobs WHERE user_id = ?", [user.name]).fetchall()
        assert jobs == [(job_id,)]  # exactly one job, whatever the client saw
        final = c.wait_status(user, job_id, {"completed", "failed", "cancelled"})
        assert final["status"] == "completed", final
        out = c.get(user, "results", job_id).json()["stdout"]
        assert out == f"ran attempt {final['attempt']}\n"
        # One result record; the agent dropped its copy once the controller had it.
        assert len(list(c.results_dir.glob(f"{user.name}_faults_*.jsonl"))) == 1
        spool = c.agents[0].dir / "spool"
        deadline = time.monotonic() + 15
        while any(spool.glob("*/result.msgpack")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(spool.glob("*/result.msgpack"))
        check_consistent(c)
    finally:
        c.stop()


def test_crash_points_are_named_in_one_place() -> None:
    from gpujobq.controller import crashpoints

    source = "\n".join(
        p.read_text() for p in (cluster_mod.ROOT / "controller").rglob("*.py"))
    for point in crashpoints.POINTS:
        assert f'crashpoints.reach("{point}")' in source
