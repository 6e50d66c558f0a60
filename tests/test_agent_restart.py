"""An agent killed outright (SIGKILL) leaves its process-runtime jobs running; on start it
kills them before it serves, so the requeued attempt never runs beside the old one."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import time

from tests import cluster as cluster_mod

# Attempt 1 writes "PID CHILD_PID" to PIDS and sleeps; attempt 2 finishes at once.
JOB = """\
import os, subprocess, sys, time
if os.environ['GPUJOBQ_ATTEMPT'] == '2':
    print('attempt 2')
    sys.exit(0)
child = subprocess.Popen(['sleep', '300'])
open(PIDS + '.tmp', 'w').write(f'{os.getpid()} {child.pid}')
os.rename(PIDS + '.tmp', PIDS)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for(check: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_restart_after_sigkill_kills_orphaned_job_then_requeues(tmp_path: pathlib.Path) -> None:
    pids_file = tmp_path / "pids"
    code = f"PIDS = {str(pids_file)!r}\n" + JOB
    pids: list[int] = []
    with cluster_mod.running(tmp_path / "cluster") as c:
        try:
            user = c.user()
            job_id = c.submit(user, code, wait=False).json()["job_id"]
            c.wait_status(user, job_id, {"running"})
            wait_for(pids_file.exists, "the job wrote its PIDs", 15)
            pids = [int(p) for p in pids_file.read_text().split()]
            record = c.agents[0].dir / "spool" / f"{job_id}-a1" / "process.json"
            assert record.exists()

            c.agents[0].stop(signal.SIGKILL)
            assert all(alive(p) for p in pids), "the job should outlive a SIGKILLed agent"
            c.agents[0].start()
            wait_for(lambda: not any(alive(p) for p in pids), "the orphans are gone", 10)

            final = c.wait_status(user, job_id, {"completed", "failed"}, timeout=60)
            assert (final["status"], final["attempt"]) == ("completed", 2)
            assert c.get(user, "results", job_id).json()["stdout"] == "attempt 2\n"
            events = c._db.execute(
                "SELECT to_status, reason FROM job_events WHERE job_id = ? ORDER BY id",
                [job_id],
            ).fetchall()
            assert ("pending", "requeued") in events
            assert events[-1] == ("completed", "exit_code")
            assert f"job {job_id} attempt 1 outlived the agent" in c.log("node0")
        finally:
            for pid in pids:  # never leave a sleeping orphan behind a failed test
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
