"""Behaviour that needs its own controller: the wait cap, restarts, reconnects."""

from __future__ import annotations

import pathlib
import signal

from tests import cluster as cluster_mod

SLEEP = "import time\nprint('start', flush=True)\ntime.sleep({})\nprint('end')\n"


def test_waiting_submit_past_the_cap_is_202(tmp_path: pathlib.Path) -> None:
    with cluster_mod.running(tmp_path, wait_cap=0.5) as c:
        user = c.user()
        r = c.submit(user, SLEEP.format(3))
        assert r.status_code == 202
        body = r.json()
        assert body["status"] in {"pending", "running"}
        assert body["exit_code"] is None
        done = c.wait_status(user, body["job_id"], {"completed"})
        assert done["status"] == "completed"


def test_controller_restart_keeps_jobs_and_finishes_running_ones(tmp_path: pathlib.Path) -> None:
    with cluster_mod.running(tmp_path) as c:
        user = c.user()
        done = c.submit(user, "print('before')").json()
        running = c.submit(user, SLEEP.format(2), wait=False).json()["job_id"]
        c.wait_status(user, running, {"running"})
        cluster_mod._stop(c.proc)
        c.start_controller()
        assert c.get(user, "results", done["job_id"]).json() == done
        final = c.wait_status(user, running, {"completed", "failed"})
        assert (final["status"], final["attempt"]) == ("completed", 1)
        assert c.get(user, "results", running).json()["stdout"] == "start\nend\n"


def test_agent_restart_requeues_its_running_job(tmp_path: pathlib.Path) -> None:
    with cluster_mod.running(tmp_path) as c:
        user = c.user()
        code = (
            "import os, time\n"
            "print('attempt', os.environ['GPUJOBQ_ATTEMPT'], flush=True)\n"
            "time.sleep(1 if os.environ['GPUJOBQ_ATTEMPT'] == '2' else 60)\n"
        )
        job_id = c.submit(user, code, wait=False).json()["job_id"]
        c.wait_status(user, job_id, {"running"})
        c.agents[0].stop(signal.SIGTERM)
        c.agents[0].start()
        final = c.wait_status(user, job_id, {"completed", "failed"}, timeout=60)
        assert (final["status"], final["attempt"]) == ("completed", 2)
        assert c.get(user, "results", job_id).json()["stdout"] == "attempt 2\n"
        events = c._db.execute(
            "SELECT to_status, reason FROM job_events WHERE job_id = ? ORDER BY id", [job_id]
        ).fetchall()
        assert ("pending", "requeued") in events
        assert events[-1] == ("completed", "exit_code")


def test_jobs_queue_fifo_when_gpus_are_busy(tmp_path: pathlib.Path) -> None:
    with cluster_mod.running(tmp_path, gpus=1) as c:
        users = [c.user() for _ in range(3)]
        ids = [c.submit(u, SLEEP.format(0.3), wait=False).json()["job_id"] for u in users]
        second = c.get(users[1], "status", ids[1]).json()
        assert second["status"] == "pending"
        finals = [c.wait_status(u, j, {"completed"}) for u, j in zip(users, ids, strict=True)]
        starts = [f["started_at"] for f in finals]
        assert starts == sorted(starts)
        events = c._db.execute(
            "SELECT job_id FROM job_events WHERE reason = 'dispatched' ORDER BY id"
        ).fetchall()
        assert [e[0] for e in events] == ids


def test_job_events_tell_the_whole_story(tmp_path: pathlib.Path) -> None:
    with cluster_mod.running(tmp_path) as c:
        user = c.user()
        job_id = c.submit(user, "print(1)").json()["job_id"]
        rows = c._db.execute(
            "SELECT from_status, to_status, reason FROM job_events WHERE job_id = ? ORDER BY id",
            [job_id],
        ).fetchall()
        assert rows == [
            (None, "pending", "submitted"),
            ("pending", "running", "dispatched"),
            ("running", "running", "started"),
            ("running", "completed", "exit_code"),
        ]
