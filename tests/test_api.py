"""The guide's five endpoints against a real controller, agent and SQLite file."""

from __future__ import annotations

import json
import re
import time

import requests

from tests.cluster import Cluster, User, live_output_while_running

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")
SLEEP = "import time\nprint('start', flush=True)\ntime.sleep({})\nprint('end')\n"


def test_submit_waits_and_returns_the_result(cluster: Cluster, user: User) -> None:
    r = cluster.submit(user, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["job_id", "status", "stdout", "stderr", "exit_code"]
    assert body["status"] == "completed"
    assert body["stdout"] == "out\n"
    assert body["stderr"] == "err\n"
    assert body["exit_code"] == 0


def test_failing_code_is_failed_with_its_exit_code(cluster: Cluster, user: User) -> None:
    body = cluster.submit(user, "raise SystemExit(3)").json()
    assert (body["status"], body["exit_code"]) == ("failed", 3)
    body = cluster.submit(cluster.user(), "import nonexistent_module_x").json()
    assert body["status"] == "failed"
    assert "ModuleNotFoundError" in body["stderr"]


def test_wait_false_answers_202_at_once_and_the_job_runs(cluster: Cluster, user: User) -> None:
    r = cluster.submit(user, SLEEP.format(0.5), wait=False)
    assert r.status_code == 202
    body = r.json()
    assert body["status"] == "pending"
    assert body["exit_code"] is None
    done = cluster.wait_status(user, body["job_id"], {"completed"})
    assert done["reason"] == "exit_code"


def test_status_has_the_guides_fields(cluster: Cluster, user: User) -> None:
    job_id = cluster.submit(user, "print(1)").json()["job_id"]
    r = cluster.get(user, "status", job_id)
    assert r.status_code == 200
    body = r.json()
    for key in ("job_id", "status", "node_id", "created_at", "started_at", "completed_at"):
        assert key in body
    assert body["job_id"] == job_id
    assert body["status"] == "completed"
    assert body["node_id"] == 0
    assert body["node"] == "node0"
    assert body["reason"] == "exit_code"
    for key in ("created_at", "started_at", "completed_at"):
        assert ISO.match(body[key]), body[key]
    assert body["created_at"] <= body["started_at"] <= body["completed_at"]


def test_results_endpoint(cluster: Cluster, user: User) -> None:
    job_id = cluster.submit(user, "print('{\"acc\": 0.9}')").json()["job_id"]
    r = cluster.get(user, "results", job_id)
    assert r.status_code == 200
    assert r.json() == {"job_id": job_id, "status": "completed", "stdout": '{"acc": 0.9}\n',
                        "stderr": "", "exit_code": 0}


def test_output_is_live_while_the_job_runs(cluster: Cluster, user: User) -> None:
    live_output_while_running(cluster, user)


def test_jobs_lists_newest_first_and_pages_by_cursor(cluster: Cluster, user: User) -> None:
    ids = [cluster.submit(user, f"print({i})").json()["job_id"] for i in range(4)]
    r = cluster.get(user, "jobs")
    assert r.status_code == 200
    listed = r.json()
    assert [j["job_id"] for j in listed] == ids[::-1]
    assert set(listed[0]) == {"job_id", "status", "competition_id", "created_at"}
    assert listed[0]["competition_id"] == "test"
    assert ISO.match(listed[0]["created_at"])
    assert "X-Next-Cursor" not in r.headers

    first = cluster.get(user, "jobs", limit=3)
    assert [j["job_id"] for j in first.json()] == ids[:0:-1]
    cursor = first.headers["X-Next-Cursor"]
    rest = cluster.get(user, "jobs", limit=3, cursor=cursor)
    assert [j["job_id"] for j in rest.json()] == [ids[0]]
    assert "X-Next-Cursor" not in rest.headers

    for bad in ("abc", "\u00b2", "-1", "1" * 30):
        assert cluster.get(user, "jobs", cursor=bad).status_code == 400
    assert cluster.get(user, "jobs", limit=0).status_code == 400
    assert cluster.get(user, "jobs", limit="x").status_code == 400
    assert "detail" in cluster.get(user, "jobs", limit="x").json()


def test_jobs_of_a_new_user_is_an_empty_list(cluster: Cluster, user: User) -> None:
    r = cluster.get(user, "jobs")
    assert (r.status_code, r.json()) == (200, [])


def _occupy_all_gpus(cluster: Cluster) -> list[tuple[User, str]]:
    holders = []
    for _ in range(2):
        u = cluster.user("holder")
        job_id = cluster.submit(u, SLEEP.format(60), wait=False).json()["job_id"]
        cluster.wait_status(u, job_id, {"running"})
        holders.append((u, job_id))
    return holders


def test_cancel_pending_job(cluster: Cluster, user: User) -> None:
    holders = _occupy_all_gpus(cluster)
    try:
        job_id = cluster.submit(user, "print('never')", wait=False).json()["job_id"]
        status = cluster.get(user, "status", job_id).json()
        assert status["status"] == "pending"
        assert status["queue_position"] == 1
        r = cluster.cancel(user, job_id)
        assert r.status_code == 200
        assert r.json() == {"job_id": job_id, "status": "cancelled",
                            "reason": "cancelled_by_user"}
    finally:
        for u, jid in holders:
            cluster.cancel(u, jid)
    result = cluster.get(user, "results", job_id).json()
    assert result["status"] == "cancelled"
    assert result["stdout"] == ""


def test_cancel_running_job_kills_its_process_group(cluster: Cluster, user: User) -> None:
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(os.getpid(), child.pid, flush=True)\n"
        "open('pids.tmp', 'w').write(f'{os.getpid()} {child.pid}')\n"
        "os.rename('pids.tmp', 'pids')\n"
        "time.sleep(60)\n"
    )
    job_id = cluster.submit(user, code, wait=False).json()["job_id"]
    pid_file = cluster.agents[0].dir / "spool" / f"{job_id}-a1" / "job" / "pids"
    deadline = time.monotonic() + 15
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    pids = [int(p) for p in pid_file.read_text().split()]
    assert all(_alive(p) for p in pids)
    r = cluster.cancel(user, job_id)
    assert r.status_code == 200
    assert r.json() == {"job_id": job_id, "status": "cancelled", "reason": "cancelled_by_user"}
    body = cluster.get(user, "results", job_id).json()
    assert body["status"] == "cancelled"
    assert [int(p) for p in body["stdout"].split()] == pids
    for pid in pids:
        assert not _alive(pid), f"process {pid} survived the cancel"
    assert cluster.cancel(user, job_id).status_code == 409


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_cancel_finished_job_is_409(cluster: Cluster, user: User) -> None:
    job_id = cluster.submit(user, "print(1)").json()["job_id"]
    r = cluster.cancel(user, job_id)
    assert r.status_code == 409
    assert r.json() == {"detail": "Job already finished with status completed"}


def test_time_limit_stops_the_job(cluster: Cluster, user: User) -> None:
    # expected_time 1 s -> limit 2 s; the job ignores SIGTERM, so SIGKILL after the grace.
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('working', flush=True)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    body = cluster.submit(user, code, expected_time=1).json()
    elapsed = time.monotonic() - started
    assert body["status"] == "failed"
    assert body["stdout"] == "working\n"
    assert body["exit_code"] == 128 + 9
    assert 2 <= elapsed < 20
    status = cluster.get(user, "status", body["job_id"]).json()
    assert status["reason"] == "timeout"
    assert status["time_limit"] == 2.0


def test_output_that_is_not_utf8(cluster: Cluster, user: User) -> None:
    code = "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe\\x80 end\\n')\n"
    body = cluster.submit(user, code).json()
    assert body["status"] == "completed"
    assert body["stdout"] == "ok \ufffd\ufffd\ufffd end\n"


def test_output_is_capped_with_a_marker(cluster: Cluster, user: User) -> None:
    code = (
        "import sys\n"
        "sys.stdout.write('HEAD\\n' + 'x' * (3 << 20) + '\\nTAIL\\n')\n"
    )
    body = cluster.submit(user, code).json()
    assert body["status"] == "completed"
    out = body["stdout"]
    assert out.startswith("HEAD\n")
    assert out.endswith("TAIL\n")
    assert "[gpujobq: output truncated:" in out
    assert len(out) < (1 << 20) + 200


def test_a_disconnecting_waiter_does_not_stop_the_job(cluster: Cluster, user: User) -> None:
    try:
        cluster.submit(user, SLEEP.format(1.5), timeout=0.5)
        raise AssertionError("expected the client to time out")
    except requests.Timeout:
        pass
    job_id = cluster.get(user, "jobs").json()[0]["job_id"]
    done = cluster.wait_status(user, job_id, {"completed", "failed", "cancelled"})
    assert done["status"] == "completed"
    assert cluster.get(user, "results", job_id).json()["stdout"] == "start\nend\n"


def test_rate_limit_five_per_minute(cluster: Cluster, user: User) -> None:
    for _ in range(5):
        assert cluster.submit(user, "print(1)").json()["status"] == "completed"
    r = cluster.submit(user, "print(1)")
    assert r.status_code == 429
    assert "5 submissions per minute" in r.json()["detail"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_second_active_job_is_429(cluster: Cluster, user: User) -> None:
    first = cluster.submit(user, SLEEP.format(30), wait=False).json()["job_id"]
    try:
        r = cluster.submit(user, "print(2)")
        assert r.status_code == 429
        assert "active job" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        cluster.cancel(user, first)


def test_refused_submissions_do_not_count(cluster: Cluster, user: User) -> None:
    for _ in range(6):
        r = cluster.submit(user, "print(1)", expected_time=-1)
        assert r.status_code == 422
    for _ in range(5):
        assert cluster.submit(user, "print(1)").status_code == 200


def test_idempotency_key_returns_the_same_job(cluster: Cluster, user: User) -> None:
    files = {"code": ("solution.py", "print(7)"),
             "config_file": ("config.yaml", f"competition_id: c\nproject_id: p\n"
                                            f"user_id: {user.name}\nexpected_time: 5\n")}
    headers = {**user.headers, "Idempotency-Key": "retry-1"}
    a = requests.post(f"{cluster.url}/api/submit", headers=headers, files=files, timeout=30)
    b = requests.post(f"{cluster.url}/api/submit", headers=headers, files=files, timeout=30)
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()
    assert len(cluster.get(user, "jobs").json()) == 1


def test_job_sees_its_gpus_and_a_config_without_the_token(cluster: Cluster, user: User) -> None:
    code = (
        "import os\n"
        "print(os.environ['CUDA_VISIBLE_DEVICES'])\n"
        "print(open('config.yaml').read())\n"
        "print(sorted(k for k in os.environ if 'TOKEN' in k.upper() or 'SSH' in k.upper()))\n"
    )
    body = cluster.submit(user, code).json()
    lines = body["stdout"].splitlines()
    assert lines[0] in {"0", "1"}
    assert f"user_id: {user.name}" in body["stdout"]
    assert "token" not in body["stdout"]
    assert user.token not in body["stdout"]
    assert lines[-1] == "[]"


def test_result_record_file(cluster: Cluster, user: User) -> None:
    body = cluster.submit(user, "print('rec')", competition_id="cifar10").json()
    files = sorted(cluster.results_dir.glob(f"{user.name}_cifar10_*.jsonl"))
    assert len(files) == 1
    assert re.fullmatch(rf"{user.name}_cifar10_\d{{8}}T\d{{6}}\.\d{{6}}Z\.jsonl", files[0].name)
    record = json.loads(files[0].read_text())
    assert record["job_id"] == body["job_id"]
    assert record["stdout"] == "rec\n"
    assert record["status"] == "completed"
    assert files[0].read_text().count("\n") == 1
