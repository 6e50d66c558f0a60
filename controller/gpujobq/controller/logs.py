"""Live logs: a job's output as server-sent events, history first, then as it comes.

Events (each ``data`` is one JSON object):

    output   {"stream": "stdout"|"stderr", "offset": N, "size": M, "text": "..."}
             the stream's bytes from byte ``offset`` to ``offset + size``, as UTF-8 text
             (a character split between two batches comes whole in the second, whose
             offset is where it starts; invalid bytes read as U+FFFD, so ``size``, not
             the text's length, says where the next event starts)
    restart  {"attempt": N}   the job went back to the queue and runs again: its output
                              starts over from offset 0
    end      {"status": ..., "exit_code": ..., "reason": ...}   the job has ended; the
             stream closes. When the output passed the stored cap, the stored copy keeps
             its head and tail: the last ``output`` events restart at the offset where it
             differs from what was sent.

Without ``follow`` the stream holds what there is now and closes (with ``end`` if the
job has ended). Any number of followers cost one wake-up each per batch of output
(agents batch output every 0.2 s); nobody polls.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator

import msgspec
from gpujobq.controller import dispatcher as dispatcher_mod
from gpujobq.controller import service as service_mod
from gpujobq.controller import store
from gpujobq.protocol.states import TERMINAL
from litestar.response import Stream

STREAMS = ("stdout", "stderr")
CHUNK = 1 << 20  # bytes of output per event at most (the agents' pieces are as large)
KEEPALIVE = 15.0  # seconds between comments on a quiet stream (proxies close idle ones)


class _Sent:
    """What one follower has been sent of one attempt's streams."""

    def __init__(self) -> None:
        self.offsets = dict.fromkeys(STREAMS, 0)
        self.decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAMS}
        # What was sent, to compare at the end: the pieces themselves (no copy).
        self.head: dict[str, list[bytes]] = {s: [] for s in STREAMS}

    def events(self, stream: str, data: bytes, final: bool = False
               ) -> list[bytes]:
        """Events for ``data``, the stream's bytes from the current offset on."""
        out = []
        for start in range(0, len(data), CHUNK):
            piece = data[start:start + CHUNK]
            last = final and start + CHUNK >= len(data)
            decoder = self.decoders[stream]
            # The text starts with the bytes of a character the previous piece split.
            held = len(decoder.getstate()[0])
            text = decoder.decode(piece, final=last)
            held_after = len(decoder.getstate()[0])
            out.append(_event("output", {"stream": stream,
                                         "offset": self.offsets[stream] - held,
                                         "size": held + len(piece) - held_after,
                                         "text": text}))
            self.offsets[stream] += len(piece)
            self.head[stream].append(piece)
        return out


def _event(kind: str, data: object) -> bytes:
    # One data line: JSON holds no raw line breaks (msgspec escapes them).
    return b"".join((b"event: ", kind.encode(), b"\r\ndata: ", msgspec.json.encode(data),
                     b"\r\n\r\n"))  # one copy of a large payload, not three


KEEPALIVE_COMMENT = b": waiting\r\n\r\n"


def response(svc: service_mod.JobService, job: store.Job, wait: bool) -> Stream:
    """The events of ``follow`` as an HTTP response (uncached, unbuffered by proxies)."""
    return Stream(follow(svc, job, wait), media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def follow(svc: service_mod.JobService, job: store.Job, wait: bool
                 ) -> AsyncIterator[bytes]:
    """The job's output so far, then (``wait``) as it comes, until the job ends."""
    d: dispatcher_mod.Dispatcher = svc.dispatcher
    sent, attempt = _Sent(), job.attempt
    while True:
        bell = d.changes.arm(job.id)  # before looking: a change meanwhile still wakes us
        try:
            fresh = svc.store.get(job.id, output=False)
            if fresh is None:  # pruned meanwhile
                return
            job = fresh
            if job.attempt != attempt:
                if attempt > 0:  # it ran before (a first dispatch is no restart)
                    yield _event("restart", {"attempt": job.attempt})
                sent, attempt = _Sent(), job.attempt
            if job.status in TERMINAL:
                job = svc.store.get(job.id) or job  # now with its stored output
                for stream in STREAMS:
                    for event in _ending(sent, stream, job):
                        yield event
                yield _event("end", {"status": job.status.value, "exit_code": job.exit_code,
                                     "reason": job.reason})
                return
            live = d.live.get(job.id)
            if live is not None and live.attempt == job.attempt:
                for stream in STREAMS:
                    for new in live.streams[stream].pieces_since(sent.offsets[stream]):
                        for event in sent.events(stream, new):
                            yield event
            if not wait or svc.stopping:
                return
            if not await d.changes.wait_armed(job.id, bell, KEEPALIVE):
                yield KEEPALIVE_COMMENT
        finally:
            d.changes.disarm(job.id, bell)


def _ending(sent: _Sent, stream: str, job: store.Job) -> list[bytes]:
    """The rest of a stream from its stored copy (which may cut the middle out)."""
    stored = job.stdout if stream == "stdout" else job.stderr
    head = b"".join(sent.head[stream])
    if stored.startswith(head):
        rest = stored[len(head):]
    else:  # the stored copy differs from what was sent live: resend from where it does
        same = next((i for i, (a, b) in enumerate(zip(head, stored, strict=False)) if a != b),
                    min(len(head), len(stored)))
        sent.offsets[stream] = same
        sent.decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        rest = stored[same:]
    return sent.events(stream, rest, final=True) if rest else []
