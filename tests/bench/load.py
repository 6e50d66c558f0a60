"""A lean HTTP/1.1 load generator: keep-alive connections, prebuilt requests.

Python HTTP clients spend more CPU per request than the server under test; on a
2-core machine that would measure the client. This one writes prebuilt request bytes
and reads back just the status line, headers and Content-Length body.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int
    body: bytes
    latency: float  # seconds from the first byte written to the last byte read
    sent_at: float  # time.time() when it was sent


@dataclass
class Run:
    replies: list[Reply] = field(default_factory=list)
    elapsed: float = 0.0

    def rate(self, status: int | None = None) -> float:
        n = sum(1 for r in self.replies if status is None or r.status == status)
        return n / self.elapsed if self.elapsed else 0.0

    def latencies(self, status: int | None = None) -> list[float]:
        return [r.latency for r in self.replies if status is None or r.status == status]

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.replies:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def get(path: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n{auth}\r\n".encode()


def multipart(path: str, parts: dict[str, tuple[str, bytes]], token: str | None = None,
              headers: dict[str, str] | None = None) -> bytes:
    """A POST with a multipart/form-data body: {field: (filename, data)}."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
        f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        + data + b"\r\n"
        for name, (filename, data) in parts.items()
    ) + f"--{boundary}--\r\n".encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\n{auth}{extra}"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def submit(user: str, token: str, code: bytes, *, wait: bool = False,
           competition: str = "bench", expected_time: float = 10) -> bytes:
    config = (f"competition_id: {competition}\nproject_id: bench\nuser_id: {user}\n"
              f"expected_time: {expected_time}\n").encode()
    return multipart("/api/submit" + ("" if wait else "?wait=false"),
                     {"code": ("solution.py", code), "config_file": ("config.yaml", config)},
                     token=token)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def request(self, raw: bytes) -> Reply:
        sent_at, t0 = time.time(), time.perf_counter()
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        return Reply(status, body, time.perf_counter() - t0, sent_at)

    def close(self) -> None:
        self.writer.close()


async def hammer(host: str, port: int, requests: Iterator[bytes] | Callable[[], bytes], *,
                 concurrency: int, total: int | None = None,
                 duration: float | None = None) -> Run:
    """Send requests on ``concurrency`` keep-alive connections until ``total`` are
    answered or ``duration`` seconds pass (whichever is given; both: the first)."""
    source = requests if not callable(requests) else iter(requests, None)
    counter = itertools.count()
    run = Run()
    deadline = time.perf_counter() + duration if duration else None

    async def worker() -> None:
        conn = await Connection.open(host, port)
        try:
            while True:
                if total is not None and next(counter) >= total:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                try:
                    raw = next(source)  # type: ignore[arg-type]
                except StopIteration:
                    return
                run.replies.append(await conn.request(raw))
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.elapsed = time.perf_counter() - t0
    return run


def body_json(reply: Reply) -> Any:
    return json.loads(reply.body)
