"""What every job runtime offers the agent, and the outcome it reports."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Protocol

import msgspec
from gpujobq.protocol import messages


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    reason: str  # a states.Reason value
    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    detail: str = ""
    files: tuple[messages.OutputFile, ...] = ()


class Reporter(Protocol):
    """What a runtime tells the agent while a job runs."""

    def started(self) -> None: ...

    def output(self, stream: str, data: bytes) -> None:
        """The next bytes of ``stream`` ("stdout" or "stderr"); call on the event loop."""
        ...


class Runtime(Protocol):
    name: str
    isolated: bool

    async def run(
        self,
        job: messages.RunJob,
        workdir: pathlib.Path,
        cancel: asyncio.Event,
        report: Reporter,
    ) -> Outcome:
        """Run the job prepared in ``workdir`` until it exits, times out or ``cancel`` is set.

        Tells ``report`` when the program is running and what it prints as it prints it.
        """
        ...

    async def release(self, job_id: str, attempt: int) -> None:
        """Free what the job held on the host, once its result is stored."""
        ...


def exit_status(returncode: int) -> int:
    """A process's exit code as a shell reports it (128 + signal for a signal death)."""
    return 128 - returncode if returncode < 0 else returncode
