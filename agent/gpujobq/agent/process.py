"""The process runtime: the job is a child process of the agent. NOT isolated.

For trusted and development hosts only: the job runs as the agent's user with the
host's filesystem and network. It has its own session and process group, so a time
limit or a cancel stops everything it started. A competition's data mounts are not
remapped: the job reads them at their host path (`source`), and nothing makes them
read-only here.

Each running job's process group is recorded in its attempt's spool folder
(`process.json`) and the record is removed once the group is gone. An agent that was
killed leaves its jobs running; on start, `kill_leftovers` kills those groups, so the
attempt the controller requeues is never a second copy beside the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pathlib
import signal
import time
from typing import NamedTuple

import msgspec
from gpujobq.agent import capture, outputs, runtime
from gpujobq.agent import spool as spool_mod
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason

log = logging.getLogger(__name__)

# After the job's main process is gone, how long its pipes may stay open (held by
# something that left its process group) before the agent stops reading them.
PIPE_LINGER = 5.0
# How long kill_leftovers waits for a SIGKILLed group to be gone.
LEFTOVER_WAIT = 5.0


class ProcessRuntime:
    name = "process"
    isolated = False

    def __init__(self, python: str) -> None:
        self.python = python

    async def run(
        self,
        job: messages.RunJob,
        workdir: pathlib.Path,
        cancel: asyncio.Event,
        report: runtime.Reporter,
    ) -> runtime.Outcome:
        (out_fd, out_w), (err_fd, err_w) = capture.pipe(), capture.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "solution.py",
                cwd=workdir,
                env=self._environment(job, workdir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(out_fd)
            os.close(err_fd)
            return runtime.Outcome(
                reason=Reason.INFRA_ERROR, exit_code=None, detail=f"could not start: {exc}"
            )
        finally:
            os.close(out_w)  # the job holds them now
            os.close(err_w)
        fds = [out_fd, err_fd]  # read ends not yet handed over to a stream
        pipes: list[asyncio.BaseTransport] = []
        try:
            return await self._watch(proc, job, workdir, cancel, report, fds, pipes)
        finally:
            for fd in fds:
                os.close(fd)
            for pipe in pipes:
                pipe.close()

    async def _watch(
        self, proc: asyncio.subprocess.Process, job: messages.RunJob, workdir: pathlib.Path,
        cancel: asyncio.Event, report: runtime.Reporter, fds: list[int],
        pipes: list[asyncio.BaseTransport],
    ) -> runtime.Outcome:
        streams = []
        while fds:
            stream, pipe = await capture.reader(fds.pop(0))  # it owns the fd from here on
            streams.append(stream)
            pipes.append(pipe)
        stdout, stderr = streams
        folder = workdir.parent  # SPOOL/<job_id>-a<attempt>/, see spool.py
        try:
            record_group(folder, proc.pid)
        except OSError as exc:
            # Unrecorded, it would outlive an agent crash unseen: do not run it at all.
            _kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            return runtime.Outcome(reason=Reason.INFRA_ERROR, exit_code=None,
                                   detail=f"could not record the job's process: {exc}")
        report.started()
        out, err = (
            capture.CappedBuffer(job.output_cap, functools.partial(report.output, name))
            for name in ("stdout", "stderr")
        )
        readers = [
            asyncio.create_task(capture.drain(stdout, out)),
            asyncio.create_task(capture.drain(stderr, err)),
        ]
        try:
            reason = await self._supervise(proc, job, cancel)
        finally:
            _kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            forget_group(folder)  # only now: a record outlives an agent killed before here
            _, pending = await asyncio.wait(readers, timeout=PIPE_LINGER)
            for task in pending:
                task.cancel()
        assert proc.returncode is not None
        files, left_behind = await asyncio.to_thread(outputs.collect, folder / "output")
        return runtime.Outcome(
            reason=reason,
            exit_code=runtime.exit_status(proc.returncode),
            stdout=out.value(),
            stderr=err.value(),
            detail=left_behind,
            files=files,
        )

    async def _supervise(
        self, proc: asyncio.subprocess.Process, job: messages.RunJob, cancel: asyncio.Event
    ) -> Reason:
        exited = asyncio.create_task(proc.wait())
        cancelled = asyncio.create_task(cancel.wait())
        try:
            await asyncio.wait(
                {exited, cancelled}, timeout=job.time_limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            cancelled.cancel()
        if exited.done():
            return Reason.EXIT_CODE
        reason = Reason.CANCELLED_BY_USER if cancel.is_set() else Reason.TIMEOUT
        _kill_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), job.grace)
        return reason

    async def release(self, job_id: str, attempt: int) -> None:
        return None  # the process and its group are gone once run() returns

    def _environment(self, job: messages.RunJob, workdir: pathlib.Path) -> dict[str, str]:
        # A fresh environment: nothing of the agent's (keys, tokens) reaches the job.
        return {
            "PATH": os.defpath + ":/usr/local/bin",
            "HOME": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            # NVML's (and the inventory's) numbering, not CUDA's fastest-first default.
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(_device_name(g) for g in job.gpus),
            "GPUJOBQ_JOB_ID": job.job_id,
            "GPUJOBQ_ATTEMPT": str(job.attempt),
            # Its artifacts: SPOOL/<job_id>-a<attempt>/output/ (see spool.py), not capped
            # while it runs here; what is read back is (outputs.py).
            "GPUJOBQ_OUTPUT": str(workdir.parent / "output"),
        }


def _device_name(gpu: messages.GPU) -> str:
    return gpu.uuid if gpu.uuid and not gpu.virtual else str(gpu.index)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# ---- the record of a job's process group, and what an agent start does with it ----------


class Record(msgspec.Struct, frozen=True):
    pgid: int  # the job's main process, leader of its own session and group
    start: int  # its start time, /proc/PID/stat field 22 (clock ticks since boot)
    boot: str  # /proc/sys/kernel/random/boot_id: start times count again from each boot


class _Stat(NamedTuple):
    state: str
    pgrp: int
    start: int


def record_group(folder: pathlib.Path, pid: int) -> None:
    """Note in an attempt folder that ``pid`` leads the job's process group (atomically)."""
    stat = _stat(pid)
    if stat is None:
        # It has ended and been reaped already (a job that exits at once): the group's
        # end is handled by the runtime as it stops the job; nothing to record.
        return
    tmp = folder / (spool_mod.PROCESS + ".tmp")
    tmp.write_bytes(msgspec.json.encode(Record(pgid=pid, start=stat.start, boot=_boot_id())))
    # No fsync: the record guards against the agent dying, not the host; a host that
    # goes down takes the job's processes with it.
    os.replace(tmp, folder / spool_mod.PROCESS)


def forget_group(folder: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        (folder / spool_mod.PROCESS).unlink(missing_ok=True)


def kill_leftovers(
    spool: spool_mod.Spool, wait: float = LEFTOVER_WAIT
) -> list[tuple[str, int]]:
    """Kill the job processes an earlier agent left running; returns their (job, attempt).

    Call at agent start, before the spool is recovered. Every attempt with a process
    record and no stored result is dropped from the spool: its result is lost, and the
    controller requeues it (a platform failure) since the agent's hello does not list it.
    Attempts with a stored result are left as they are.
    """
    killed: list[tuple[str, int]] = []
    for job_id, attempt, folder in spool.unfinished():
        path = folder / spool_mod.PROCESS
        if not path.exists():
            continue
        try:
            rec = msgspec.json.decode(path.read_bytes(), type=Record)
            leftover = _leftover(rec, job_id, attempt)
        except (OSError, msgspec.DecodeError) as exc:
            log.error("job %s attempt %d: unreadable process record: %s", job_id, attempt, exc)
            leftover = False
        if leftover:
            log.warning("job %s attempt %d outlived the agent (process group %d): killing it; "
                        "the attempt is lost and will be requeued", job_id, attempt, rec.pgid)
            _kill_group(rec.pgid, signal.SIGKILL)
            left = _wait_gone(rec.pgid, wait)
            if left:
                log.error("job %s attempt %d: processes %s still there after SIGKILL",
                          job_id, attempt, left)
            killed.append((job_id, attempt))
        spool.drop(job_id, attempt)
    return killed


def _leftover(rec: Record, job_id: str, attempt: int) -> bool:
    """Whether the recorded group still has processes, and they are certainly the job's."""
    if rec.boot != _boot_id():
        return False  # the host rebooted since: nothing of that job runs
    leader = _stat(rec.pgid)
    if leader is not None and leader.start != rec.start:
        # The PID was reused, which the kernel does only once no process has the number
        # as its PID, group or session: nothing of the job is left.
        return False
    members = _members(rec.pgid)
    if leader is not None:
        return bool(members)  # a leader can leave neither its session nor its group
    # The leader is gone. Members of a group with its number may be the job's, or of a
    # group made since under the reused number: kill only if one carries the job's marks.
    return any(_carries(pid, job_id, attempt) for pid in members)


def _wait_gone(pgid: int, wait: float) -> list[int]:
    """Wait (bounded) until the group has no live process; returns those still there."""
    deadline = time.monotonic() + wait
    while (left := _members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def _stat(pid: int) -> _Stat | None:
    try:
        data = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    return _Stat(state=fields[0].decode(), pgrp=int(fields[2]), start=int(fields[19]))


def _members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None and stat.pgrp == pgid and stat.state not in ("Z", "X"):
                found.append(int(name))
    return found


def _carries(pid: int, job_id: str, attempt: int) -> bool:
    """Whether the process's environment names this job and attempt (see _environment)."""
    try:
        env = set(pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return False
    return {f"GPUJOBQ_JOB_ID={job_id}".encode(), f"GPUJOBQ_ATTEMPT={attempt}".encode()} <= env


def _boot_id() -> str:
    return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
