"""A job's stdout and stderr rebuilt from its live-log events, and what its end means.

Pure. The stream of /api/logs gives each piece of output at its byte offset; a follower
writes every byte position of a stream at most once, so history that is sent again (a
reconnect starts from offset 0; the stored copy of a capped stream is resent from where
it differs) is not printed twice. A ``restart`` event (the job runs again after a
platform failure) starts both streams over.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec
from gpujobq.client import sse

STREAMS = ("stdout", "stderr")

# Exit statuses for endings that are not the job's own exit (documented in the README).
TIMEOUT = 124  # ran past its time limit, as timeout(1) exits
PLATFORM = 125  # stopped or never run for another reason: output_limit, node_lost, infra_error
OOM = 137  # killed for memory: 128 + SIGKILL, as docker and the kernel's OOM killer give
CANCELLED = 143  # cancelled: 128 + SIGTERM, what the job was stopped with


class Write(NamedTuple):
    stream: str  # "stdout" or "stderr"
    data: bytes


class End(msgspec.Struct, frozen=True):
    """The ``end`` event: the job has ended."""

    status: str
    exit_code: int | None
    reason: str | None


class Follower:
    def __init__(self, attempt: int | None = None) -> None:
        self.attempt = attempt  # the attempt whose output is being written, where known
        self.written = dict.fromkeys(STREAMS, 0)  # bytes written so far, per stream
        self.end: End | None = None

    def restart(self, attempt: int | None) -> None:
        """The job runs again: its output starts over at offset 0."""
        self.attempt = attempt
        self.written = dict.fromkeys(STREAMS, 0)

    def feed(self, event: sse.Event) -> list[Write]:
        """What to write for this event (nothing for anything but new output)."""
        if event.event == "restart":
            self.restart(msgspec.convert(event.json(), dict[str, int]).get("attempt"))
        elif event.event == "end":
            self.end = msgspec.json.decode(event.data, type=End)
        elif event.event == "output":
            return self._output(event)
        return []

    def _output(self, event: sse.Event) -> list[Write]:
        piece = msgspec.json.decode(event.data, type=_Output)
        if piece.stream not in self.written:
            return []
        data = piece.text.encode()
        # The stream bytes the text stands for: the server's count (an invalid byte reads
        # as U+FFFD, three bytes in UTF-8), or the text's own length from older servers.
        size = len(data) if piece.size is None else piece.size
        skip = self.written[piece.stream] - piece.offset  # stream bytes already written
        if skip >= size:
            return []
        if skip > 0:
            data = data[skip:]  # exact unless the overlap itself holds invalid bytes
        self.written[piece.stream] = piece.offset + size
        return [Write(piece.stream, data)]


class _Output(msgspec.Struct, frozen=True):
    stream: str
    offset: int
    text: str
    size: int | None = None


def exit_status(end: End) -> int:
    """The exit status of `gpujobq submit` (and `logs -f`) for a job that ended so."""
    if end.status == "completed":
        return 0
    if end.reason == "timeout":
        return TIMEOUT
    if end.reason == "oom":
        return OOM
    if end.status == "cancelled":
        return CANCELLED
    if end.reason == "exit_code" and end.exit_code is not None and 0 < end.exit_code < 256:
        return end.exit_code
    return PLATFORM
