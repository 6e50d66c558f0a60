"""The process runtime: the job is a child process of the agent. NOT isolated.

For trusted and development hosts only: the job runs as the agent's user with the
host's filesystem and network. It has its own session and process group, so a time
limit or a cancel stops everything it started. A competition's data mounts are not
remapped: the job reads them at their host path (`source`), and nothing makes them
read-only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pathlib
import signal

from gpujobq.agent import capture, runtime
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason

# After the job's main process is gone, how long its pipes may stay open (held by
# something that left its process group) before the agent stops reading them.
PIPE_LINGER = 5.0


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
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "solution.py",
                cwd=workdir,
                env=self._environment(job, workdir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            return runtime.Outcome(
                reason=Reason.INFRA_ERROR, exit_code=None, detail=f"could not start: {exc}"
            )
        report.started()
        out, err = (
            capture.CappedBuffer(job.output_cap, functools.partial(report.output, name))
            for name in ("stdout", "stderr")
        )
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.create_task(capture.drain(proc.stdout, out)),
            asyncio.create_task(capture.drain(proc.stderr, err)),
        ]
        try:
            reason = await self._supervise(proc, job, cancel)
        finally:
            _kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            _, pending = await asyncio.wait(readers, timeout=PIPE_LINGER)
            for task in pending:
                task.cancel()
        assert proc.returncode is not None
        return runtime.Outcome(
            reason=reason,
            exit_code=runtime.exit_status(proc.returncode),
            stdout=out.value(),
            stderr=err.value(),
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
        }


def _device_name(gpu: messages.GPU) -> str:
    return gpu.uuid if gpu.uuid and not gpu.virtual else str(gpu.index)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
