"""What running jobs have printed, and the requests waiting for news of a job.

In memory only: live output comes again from the agent after a controller restart
(Attach), and waiters are requests of this process.
"""

from __future__ import annotations

import asyncio
import contextlib

from gpujobq.protocol import messages


class LiveOutput:
    """What a running attempt has printed so far (the head of each stream), in memory."""

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.streams = {"stdout": bytearray(), "stderr": bytearray()}

    def add(self, msg: messages.Output) -> None:
        buf = self.streams.get(msg.stream)
        if buf is not None and msg.offset == len(buf):  # in order; gaps wait for Exited
            buf += msg.data


class Watchers:
    """Lets requests sleep until their job is notified (it ended, or printed: the
    dispatcher keeps one set per kind of news)."""

    def __init__(self) -> None:
        self._events: dict[str, list[asyncio.Event]] = {}

    def notify(self, job_id: str) -> None:
        for event in self._events.pop(job_id, []):
            event.set()

    def notify_all(self) -> None:
        """Wake every waiter (the controller is stopping: they answer with what they have)."""
        for job_id in list(self._events):
            self.notify(job_id)

    async def wait(self, job_id: str, timeout: float) -> bool:
        """Sleep until the job is notified (True) or ``timeout`` passes (False)."""
        return await self.wait_armed(job_id, self.arm(job_id), timeout)

    def arm(self, job_id: str) -> asyncio.Event:
        """Register now, wait later (wait_armed): a notice in between is not lost."""
        event = asyncio.Event()
        self._events.setdefault(job_id, []).append(event)
        return event

    async def wait_armed(self, job_id: str, event: asyncio.Event, timeout: float) -> bool:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
            return event.is_set()
        finally:
            self.disarm(job_id, event)

    def disarm(self, job_id: str, event: asyncio.Event) -> None:
        waiting = self._events.get(job_id)
        if waiting and event in waiting:
            waiting.remove(event)
            if not waiting:
                del self._events[job_id]
