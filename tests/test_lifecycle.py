"""Behaviour that needs its own controller: the wait cap, restarts, reconnects."""

from __future__ import annotations

import pathlib
import signal
import time

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


def test_sigterm_answers_waiting_submits_with_their_job_id(tmp_path: pathlib.Path) -> None:
    import concurrent.futures

    with cluster_mod.running(tmp_path) as c:
        user = c.user()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(c.submit, user, SLEEP.format(4))
            deadline = time.monotonic() + 20
            while not c._db.execute("SELECT 1 FROM jobs WHERE user_id = ? AND status = "
                                    "'running'", [user.name]).fetchone():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.proc is not None
            c.proc.send_signal(signal.SIGTERM)
            answer = waiting.result(timeout=10)
        assert answer.status_code == 202
        body = answer.json()
        assert body["status"] == "running" and body["exit_code"] is None
        # uvicorn re-raises the signal once it has shut down cleanly (systemd counts a stop
        # by SIGTERM as a success)
        assert c.proc.wait(10) in (0, -signal.SIGTERM)
        # The job went on while the controller was away; the next one collects it.
        c.start_controller()
        final = c.wait_status(user, body["job_id"], {"completed", "failed"})
        assert (final["status"], final["attempt"]) == ("completed", 1)
        assert c._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_after_a_controller_restart_live_output_is_there_again(tmp_path: pathlib.Path) -> None:
    with cluster_mod.running(tmp_path) as c:
        user = c.user()
        code = "import time\nprint('first', flush=True)\ntime.sleep(4)\nprint('last')\n"
        job_id = c.submit(user, code, wait=False).json()["job_id"]
        deadline = time.monotonic() + 20
        while c.get(user, "results", job_id).json()["stdout"] != "first\n":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cluster_mod._stop(c.proc)
        c.start_controller()
        # The new controller re-attached to the running job's output from offset 0.
        while True:
            body = c.get(user, "results", job_id).json()
            if body["stdout"] == "first\n":
                break
            assert body["status"] == "running" and time.monotonic() < deadline, body
            time.sleep(0.05)
        assert body["status"] == "running"
        c.wait_status(user, job_id, {"completed"})
        assert c.get(user, "results", job_id).json()["stdout"] == "first\nlast\n"
