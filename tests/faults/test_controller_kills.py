"""SIGKILL the controller 20 times while 200 jobs of 200 users flow through docker agents.

Nothing may be lost or stored twice: every accepted job ends completed with its own
output, one job and one result record per submission, no container left behind, and
the database intact. Clients retry lost answers with their Idempotency-Key.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import random
import signal
import threading
import time

import docker
import requests

from tests.cluster import Cluster, User
from tests.docker_support import require_docker

JOBS = 200
KILLS = 20
MiB = 1 << 20
AGENT = ("--runtime", "docker", "--memory", str(256 * MiB), "--pids", "64", "--cpus", "1")


def submit_until_accepted(c: Cluster, user: User, i: int, deadline: float) -> str:
    config = {"competition_id": "faults", "project_id": "p", "user_id": user.name,
              "expected_time": 60}
    code = f"print('job {i} done')\n"
    while True:
        assert time.monotonic() < deadline, f"job {i} never accepted"
        try:
            r = requests.post(
                f"{c.url}/api/submit?wait=false",
                headers={**user.headers, "Idempotency-Key": f"job-{i}"},
                files={"code": ("solution.py", code), "config_file": ("c.yaml", str(config))},
                timeout=10)
        except requests.RequestException:
            time.sleep(0.2)  # the controller is down: try again, same key
            continue
        if r.status_code in (200, 202):
            job_id: str = r.json()["job_id"]
            return job_id
        assert r.status_code >= 500, r.text
        time.sleep(0.2)


def test_controller_killed_20_times_while_200_jobs_flow(tmp_path: pathlib.Path) -> None:
    require_docker()
    c = Cluster(tmp_path, agents=2, gpus=2, agent_args=AGENT)
    rng = random.Random(5)
    started = time.monotonic()
    kills: list[float] = []
    try:
        c.start()
        users = [c.user(f"f{i}") for i in range(JOBS)]
        deadline = time.monotonic() + 400
        done = threading.Event()

        def killer() -> None:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.3, 2.5))
                assert c.proc is not None
                c.proc.send_signal(signal.SIGKILL)
                c.proc.wait()
                kills.append(time.monotonic() - started)
                c.start_controller()
            done.set()

        chaos = threading.Thread(target=killer)
        chaos.start()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: submit_until_accepted(c, users[i], i, deadline),
                                range(JOBS)))
        chaos.join(timeout=300)
        assert done.is_set(), "the killer did not finish"

        # Every job ends, exactly once, with its own output.
        while True:
            left = c._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running')").fetchone()[0]
            if left == 0:
                break
            assert time.monotonic() < deadline, f"{left} jobs never finished"
            time.sleep(0.2)
        rows = c._db.execute("SELECT id, user_id, status, stdout, attempt FROM jobs").fetchall()
        assert len(rows) == JOBS and {r[0] for r in rows} == set(ids)  # 0 lost, 0 extra
        by_user = {r[1]: r for r in rows}
        for i, user in enumerate(users):
            _, _, status, stdout, _ = by_user[user.name]
            assert (status, stdout) == ("completed", f"job {i} done\n".encode()), (i, status)
        records = list(c.results_dir.glob("*.jsonl"))
        assert len(records) == JOBS  # one result record each, never two
        assert c._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        reruns = sum(1 for r in rows if r[4] > 1)
        print(f"\n{JOBS} jobs, {len(kills)} controller SIGKILLs, 0 lost, 0 duplicate results, "
              f"{reruns} jobs ran again after a kill, {time.monotonic() - started:.0f} s")
    finally:
        c.stop()
    leftover = docker.from_env().containers.list(
        all=True, filters={"label": "gpujobq.job"})
    assert leftover == []
