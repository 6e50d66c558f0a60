"""dockerd restarts under a running job: a clear outcome, no orphan, nothing stuck.

Without live-restore, a daemon restart kills every container. The agent sees the
daemon go away, reports the attempt lost (a platform failure), and the controller runs
the job again once the daemon is back; the dead container is removed when it can be.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import docker
import pytest

from tests import cluster as cluster_mod
from tests.docker_support import require_docker

MiB = 1 << 20
AGENT = ("--runtime", "docker", "--memory", str(256 * MiB), "--pids", "64", "--cpus", "1")
CODE = ("import os, time\nprint('attempt', os.environ['GPUJOBQ_ATTEMPT'], flush=True)\n"
        "time.sleep(60 if os.environ['GPUJOBQ_ATTEMPT'] == '1' else 0)\nprint('done')\n")


def restart_dockerd(tmp_path: pathlib.Path) -> None:
    """Stop the daemon as an admin's `systemctl restart docker` would, and start it again
    with the same command line."""
    pid = int(subprocess.run(["pidof", "dockerd"], capture_output=True, text=True,
                             check=True).stdout.split()[0])
    argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while pathlib.Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.1)
    with open(tmp_path / "dockerd.log", "ab") as log:
        subprocess.Popen([a.decode() for a in argv], stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    while True:
        try:
            docker.from_env().ping()
            return
        except Exception:
            assert time.monotonic() < deadline, (tmp_path / "dockerd.log").read_text()[-2000:]
            time.sleep(0.2)


def test_a_dockerd_restart_under_a_job_is_a_platform_failure(tmp_path: pathlib.Path) -> None:
    require_docker()
    if subprocess.run(["pidof", "dockerd"], capture_output=True).returncode != 0:
        pytest.skip("dockerd is not a process this test can restart (a remote daemon?)")
    with cluster_mod.running(tmp_path / "c", agent_args=AGENT) as c:
        user = c.user()
        job_id = c.submit(user, CODE, wait=False).json()["job_id"]
        deadline = time.monotonic() + 30
        while "attempt 1" not in c.get(user, "results", job_id).json()["stdout"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        restart_dockerd(tmp_path)
        final = c.wait_status(user, job_id, {"completed", "failed", "cancelled"}, timeout=90)
        # Attempt 1 was lost with the daemon (one retry counted); runs sent while the
        # daemon was still away were handed back unstarted (not counted).
        assert final["status"] == "completed" and final["attempt"] >= 2, final
        out = c.get(user, "results", job_id).json()["stdout"]
        assert out == f"attempt {final['attempt']}\ndone\n"
        retries = c._db.execute("SELECT retries FROM jobs WHERE id = ?", [job_id]).fetchone()
        assert retries == (1,)
        events = c._db.execute("SELECT reason, detail FROM job_events WHERE job_id = ?"
                               " ORDER BY id", [job_id]).fetchall()
        assert any(r == "requeued" and "docker daemon went away" in (d or "")
                   for r, d in events), events
        # The killed container is removed once the daemon answers again.
        client = docker.from_env()
        deadline = time.monotonic() + 30
        while client.containers.list(all=True, filters={"label": "gpujobq.job"}):
            assert time.monotonic() < deadline, "a container was left behind"
            time.sleep(0.2)
        assert c._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
