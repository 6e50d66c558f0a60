"""The instant runtime: for load-testing a controller. It runs NOTHING.

Every job "starts" and exits at once with the output and exit code the admin gave the
agent (`--instant-stdout`, `--instant-stderr`, `--instant-exit-code`); its code is never
read. The agent around it is the real one (spool, results kept until acked, the SSH
protocol), so a controller sees the whole life of each job at no cost: no process, no
container, no sleep. Chosen only with `--runtime instant` (and by `simulate`), never by
`auto`.

``{job_id}`` and ``{attempt}`` in the output are replaced per job, so a load test can
check that each result is its own. Nothing else in the text is interpreted (``\\n``
stays two characters).
"""

from __future__ import annotations

import asyncio
import functools
import pathlib

from gpujobq.agent import capture, runtime
from gpujobq.protocol import messages
from gpujobq.protocol.states import Reason

WARNING = "runtime 'instant': jobs are NOT run, they end at once (for load testing only)"


class InstantRuntime:
    name = "instant"
    isolated = False
    reads_files = False  # its spool folder only keeps the result until acked
    # Its results are what it was told to print: one lost to a power cut before its ack
    # (the controller then requeues the job) costs a rerun of nothing, so they are kept
    # in the spool without an fsync each (core.Agent._store).
    synced_results = False

    def __init__(self, stdout: str = "", stderr: str = "", exit_code: int = 0) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.exit_code = exit_code

    async def run(
        self,
        job: messages.RunJob,
        workdir: pathlib.Path,
        cancel: asyncio.Event,
        report: runtime.Reporter,
    ) -> runtime.Outcome:
        report.started()
        return runtime.Outcome(
            reason=Reason.EXIT_CODE, exit_code=self.exit_code,
            stdout=_report(job, report, "stdout", self.stdout),
            stderr=_report(job, report, "stderr", self.stderr))

    async def release(self, job_id: str, attempt: int) -> None:
        return None  # it held nothing


def _report(job: messages.RunJob, report: runtime.Reporter, stream: str, text: str) -> bytes:
    """Report the stream's text as the job's output; returns what a result keeps of it."""
    # Capped like a real job's output, so a large text meets the same limits.
    buffer = capture.CappedBuffer(job.output_cap, functools.partial(report.output, stream))
    if text:
        buffer.feed(fill(text, job))
    return buffer.value()


def fill(text: str, job: messages.RunJob) -> bytes:
    """The admin's text for this job: its placeholders replaced, as UTF-8."""
    text = text.replace("{job_id}", job.job_id).replace("{attempt}", str(job.attempt))
    return text.encode()
