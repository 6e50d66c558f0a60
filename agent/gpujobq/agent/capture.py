"""Capped capture of a job's output stream.

The stream is always drained (a job must never block on a full pipe), but only the
first and the last ``cap // 2`` bytes are kept: results usually come first or last, and
a traceback is at the end. What was dropped in between is named by a marker line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable

CHUNK = 256 << 10  # bytes read at once
# A job's output pipe holds this much (the kernel's default is 64 KiB): a job printing
# fast goes on writing while the agent sends what it read, instead of waiting on it.
PIPE_SIZE = 1 << 20


class CappedBuffer:
    """``live`` is called with each piece of the kept head as it arrives."""

    def __init__(self, cap: int, live: Callable[[bytes], None] | None = None) -> None:
        self.cap = cap
        self.live = live
        self.total = 0
        # The head as the pieces it came in (joined once, by value()): a job printing
        # fast costs no copy here.
        self._head: list[bytes] = []
        self._head_size = 0
        self._tail = bytearray()

    def feed(self, data: bytes) -> None:
        if type(data) is not bytes:  # kept by reference: never a buffer its owner reuses
            data = bytes(data)
        self.total += len(data)
        room = self.cap - (self.cap // 2) - self._head_size
        if room > 0:
            head = data if len(data) <= room else data[:room]  # no copy in the usual case
            if head:
                self._head.append(head)
                self._head_size += len(head)
                if self.live is not None:
                    self.live(head)
            data = data[len(head):]
        if data:
            keep = self.cap // 2
            self._tail += data
            if len(self._tail) > 2 * keep + CHUNK:
                del self._tail[: len(self._tail) - keep]

    def value(self) -> bytes:
        keep = self.cap // 2
        tail = bytes(self._tail[-keep:]) if keep else b""
        dropped = self.total - self._head_size - len(tail)
        if dropped <= 0:
            return b"".join((*self._head, self._tail))
        marker = (
            f"\n[gpujobq: output truncated: {dropped} of {self.total} bytes omitted here]\n"
        ).encode()
        return b"".join((*self._head, marker, tail))


async def drain(stream: asyncio.StreamReader, buffer: CappedBuffer) -> None:
    while chunk := await stream.read(CHUNK):
        buffer.feed(chunk)


def pipe() -> tuple[int, int]:
    """(read end, write end) of a new pipe, PIPE_SIZE large where the kernel allows it
    (an unprivileged user past its pipe quota keeps the default)."""
    read, write = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read, write


async def reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A stream over a pipe's read end (which it then owns); close the transport when done."""
    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader(limit=PIPE_SIZE, loop=loop)
    file = os.fdopen(fd, "rb", 0)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream, loop=loop), file)
    except BaseException:
        file.close()
        raise
    return stream, transport
