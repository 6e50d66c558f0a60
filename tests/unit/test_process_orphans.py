"""Job processes that outlived a killed agent: recorded by the runtime, killed at start.

Real processes in their own sessions, as the process runtime starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import msgspec
import pytest
from gpujobq.agent import process, spool
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason


def run(job_id: str = "job1", attempt: int = 1, code: bytes = b"") -> messages.RunJob:
    return messages.RunJob(job_id=job_id, attempt=attempt, code=code, config=b"",
                           time_limit=30.0, grace=1.0)


def job_env(job_id: str = "job1", attempt: int = 1) -> dict[str, str]:
    return {"PATH": os.defpath, "GPUJOBQ_JOB_ID": job_id, "GPUJOBQ_ATTEMPT": str(attempt)}


def alive(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def store(tmp_path: pathlib.Path) -> spool.Spool:
    return spool.Spool(tmp_path / "spool")


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Process groups a test started: killed at the end whatever happened."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def spawn(started: list[int], *argv: str, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, start_new_session=True, env=env or job_env(),
                            stdout=subprocess.PIPE)
    started.append(proc.pid)  # its own group: pgid == pid
    return proc


def recorded(store: spool.Spool, proc: subprocess.Popen[bytes], job_id: str = "job1",
             attempt: int = 1) -> pathlib.Path:
    """An attempt folder holding the record of ``proc``'s group, as the runtime writes it."""
    store.prepare(run(job_id, attempt))
    folder = store.folder(job_id, attempt)
    process.record_group(folder, proc.pid)
    return folder


def test_record_names_the_group_and_its_start_time(store: spool.Spool,
                                                   started: list[int]) -> None:
    proc = spawn(started, "sleep", "300")
    folder = recorded(store, proc)
    rec = msgspec.json.decode((folder / spool.PROCESS).read_bytes(), type=process.Record)
    assert rec.pgid == proc.pid == os.getpgid(proc.pid)
    stat = pathlib.Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert rec.start == int(stat[19])
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["job", "output", spool.PROCESS, spool.RUN])
    proc.kill()
    proc.wait()


def test_kills_a_leftover_group_and_drops_its_attempt(store: spool.Spool,
                                                      started: list[int]) -> None:
    proc = spawn(started, "sh", "-c", "sleep 300 & echo $!; wait")
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    folder = recorded(store, proc, "job1", 3)
    assert alive(proc.pid) and alive(child)
    assert process.kill_leftovers(store) == [("job1", 3)]
    assert proc.wait(5) == -signal.SIGKILL
    assert not alive(child)  # the whole group, not only its leader
    assert not folder.exists()
    assert store.recover() == []


def test_kills_members_left_after_the_leader_exited(store: spool.Spool,
                                                    started: list[int]) -> None:
    proc = spawn(started, "sh", "-c", "sleep 300 & echo $!")
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    folder = recorded(store, proc)
    assert proc.wait(5) == 0  # the leader is gone; its child still runs in its group
    assert os.getpgid(child) == proc.pid and alive(child)
    assert process.kill_leftovers(store) == [("job1", 1)]
    assert not alive(child)
    assert not folder.exists()


def test_leaderless_group_without_the_jobs_marks_is_spared(store: spool.Spool,
                                                           started: list[int]) -> None:
    # What a group made under a reused number looks like: not this job's environment.
    proc = spawn(started, "sh", "-c", "sleep 300 & echo $!", env=job_env("other", 1))
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    folder = recorded(store, proc, "job1", 1)
    proc.wait(5)
    assert process.kill_leftovers(store) == []
    assert alive(child)
    assert not folder.exists()  # the record is stale either way: the attempt is lost


@pytest.mark.parametrize("field", ["start", "boot"])
def test_reused_pid_is_not_killed(store: spool.Spool, started: list[int], field: str) -> None:
    proc = spawn(started, "sleep", "300")
    folder = recorded(store, proc)
    path = folder / spool.PROCESS
    rec = msgspec.json.decode(path.read_bytes(), type=process.Record)
    # The same PID, but another process: it started at another time, or in another boot.
    other = {"start": rec.start - 1} if field == "start" else {"boot": "another-boot"}
    path.write_bytes(msgspec.json.encode(msgspec.structs.replace(rec, **other)))
    assert process.kill_leftovers(store) == []
    assert alive(proc.pid)
    assert not folder.exists()


def test_attempt_with_a_result_is_untouched(store: spool.Spool, started: list[int]) -> None:
    proc = spawn(started, "sleep", "300")
    folder = recorded(store, proc)
    exited = messages.Exited(job_id="job1", attempt=1, at=1.0, reason="exit_code", exit_code=0)
    store.store_result(exited)
    before = sorted(p.name for p in folder.iterdir())
    assert process.kill_leftovers(store) == []
    assert alive(proc.pid)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert store.recover() == [exited]


def test_record_of_a_process_gone_is_cleaned_up(store: spool.Spool,
                                                started: list[int]) -> None:
    proc = spawn(started, "sleep", "300")
    folder = recorded(store, proc)
    proc.kill()
    proc.wait()
    assert process.kill_leftovers(store) == []
    assert not folder.exists()


def test_unreadable_record_is_cleaned_up(store: spool.Spool) -> None:
    store.prepare(run())
    (store.folder("job1", 1) / spool.PROCESS).write_bytes(b"{not json")
    assert process.kill_leftovers(store) == []
    assert not store.folder("job1", 1).exists()


def test_attempts_without_a_record_are_left_to_recover(store: spool.Spool) -> None:
    store.prepare(run("job1", 1))
    (store.root / "notes.txt").write_text("keep me")
    assert process.kill_leftovers(store) == []
    assert store.folder("job1", 1).exists()
    assert store.recover() == []
    assert [p.name for p in store.root.iterdir()] == ["notes.txt"]


class _Reporter:
    def started(self) -> None:
        pass

    def output(self, stream: str, data: bytes) -> None:
        pass


async def test_runtime_records_the_group_while_the_job_runs(store: spool.Spool) -> None:
    job = run(code=b"import subprocess, time\nsubprocess.Popen(['sleep', '300'])\n"
                   b"time.sleep(300)\n")
    workdir = store.prepare(job)
    path = store.folder("job1", 1) / spool.PROCESS
    cancel = asyncio.Event()
    task = asyncio.create_task(
        process.ProcessRuntime(sys.executable).run(job, workdir, cancel, _Reporter()))
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline and not task.done(), "no record written"
            await asyncio.sleep(0.02)
        rec = msgspec.json.decode(path.read_bytes(), type=process.Record)
        assert alive(rec.pgid) and os.getpgid(rec.pgid) == rec.pgid
    finally:
        cancel.set()
        outcome = await asyncio.wait_for(task, 15)
    assert outcome.reason == Reason.CANCELLED_BY_USER
    assert not path.exists()  # the group is gone: nothing for the next start to kill
    assert process.kill_leftovers(store) == []
    assert store.folder("job1", 1).exists()
