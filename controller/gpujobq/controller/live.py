"""What running jobs have printed, and the requests waiting for news of a job.

In memory only: live output comes again from the agent after a controller restart
(Attach), and waiters are requests of this process.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib

from gpujobq.protocol import messages

SMALL = 64 << 10  # pieces up to this size are joined (many small writes, few objects)


class Printed:
    """One stream's bytes so far, kept as the pieces they came in: a large piece is
    never copied to be stored, and a follower that has read up to the last piece gets
    the next one as it is."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.starts: list[int] = []  # each piece's offset in the stream
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes) -> None:
        if self.pieces and len(self.pieces[-1]) + len(data) <= SMALL:
            self.pieces[-1] += data
        else:
            self.pieces.append(data)
            self.starts.append(self.size)
        self.size += len(data)

    def since(self, offset: int) -> bytes:
        """The bytes from ``offset`` to the end."""
        parts = self.pieces_since(offset)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pieces_since(self, offset: int) -> list[bytes]:
        """The bytes from ``offset`` to the end, as the pieces they are kept in (a piece
        read from its start is the piece itself, not a copy)."""
        if offset >= self.size:
            return []
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        return [self.pieces[i][offset - self.starts[i]:], *self.pieces[i + 1:]]


class LiveOutput:
    """What a running attempt has printed so far (the head of each stream), in memory."""

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.streams = {"stdout": Printed(), "stderr": Printed()}

    def add(self, msg: messages.Output) -> None:
        printed = self.streams.get(msg.stream)
        if printed is not None and msg.offset == len(printed):  # in order; gaps wait
            printed.append(msg.data)  # for Exited


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
