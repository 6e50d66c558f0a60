from __future__ import annotations

import asyncio
import random
import re

import pytest
from gpujobq.agent import capture
from gpujobq.agent.capture import CappedBuffer

MARKER = re.compile(rb"\n\[gpujobq: output truncated: (\d+) of (\d+) bytes omitted here\]\n")


def fed(cap: int, *chunks: bytes) -> bytes:
    buffer = CappedBuffer(cap)
    for chunk in chunks:
        buffer.feed(chunk)
    return buffer.value()


def data(n: int) -> bytes:
    return random.Random(n).randbytes(n)


@pytest.mark.parametrize("size", [0, 1, 99, 100])
def test_under_or_at_cap_keeps_everything(size: int) -> None:
    payload = data(size)
    assert fed(100, payload) == payload
    assert MARKER.search(fed(100, payload)) is None


def test_over_cap_keeps_head_and_tail() -> None:
    payload = bytes(range(256)) * 4  # 1024 bytes
    out = fed(100, payload)
    match = MARKER.search(out)
    assert match is not None
    assert out[: match.start()] == payload[:50]
    assert out[match.end() :] == payload[-50:]
    assert (int(match[1]), int(match[2])) == (1024 - 100, 1024)


def test_one_byte_over_cap() -> None:
    payload = data(101)
    out = fed(100, payload)
    assert out == payload[:50] + MARKER.search(out)[0] + payload[-50:]  # type: ignore[index]
    assert b"1 of 101 bytes omitted" in out


def test_odd_cap_gives_head_the_extra_byte() -> None:
    payload = data(50)
    out = fed(7, payload)
    match = MARKER.search(out)
    assert match is not None
    assert out[: match.start()] == payload[:4] and out[match.end() :] == payload[-3:]
    assert int(match[1]) == 43


@pytest.mark.parametrize("cap", [0, 1])
def test_tiny_caps(cap: int) -> None:
    assert fed(cap, b"") == b""
    out = fed(cap, b"abcdef")
    match = MARKER.search(out)
    assert match is not None
    assert out[: match.start()] == b"abcdef"[:cap] and out[match.end() :] == b""
    assert (int(match[1]), int(match[2])) == (6 - cap, 6)


@pytest.mark.parametrize("cap", [0, 1, 2, 7, 100, 1000, 3 * capture.CHUNK])
def test_small_chunks_equal_one_big_chunk(cap: int) -> None:
    payload = data(5 * capture.CHUNK + 123)
    one = fed(cap, payload)
    rng = random.Random(cap)
    chunks, i = [], 0
    while i < len(payload):
        n = rng.choice([1, 7, 100, 4096, capture.CHUNK, 3 * capture.CHUNK])
        chunks.append(payload[i : i + n])
        i += n
    assert fed(cap, *chunks) == one
    assert fed(cap, *(payload[i : i + 1000] for i in range(0, len(payload), 1000))) == one


def test_total_counts_everything() -> None:
    buffer = CappedBuffer(10)
    for _ in range(1000):
        buffer.feed(b"x" * 100)
    assert buffer.total == 100_000
    # Memory stays bounded however much is fed.
    assert buffer._head_size + len(buffer._tail) <= 10 + 2 * 5 + capture.CHUNK


async def test_drain_reads_to_eof() -> None:
    reader = asyncio.StreamReader()
    payload = data(3 * capture.CHUNK)
    reader.feed_data(payload)
    reader.feed_eof()
    buffer = CappedBuffer(len(payload))
    await capture.drain(reader, buffer)
    assert buffer.value() == payload


def test_job_pipes_hold_a_mebibyte_where_the_kernel_allows() -> None:
    import fcntl
    import os

    read, write = capture.pipe()
    try:
        size = fcntl.fcntl(write, fcntl.F_GETPIPE_SZ)
        limit = int(open("/proc/sys/fs/pipe-max-size").read())
        assert size == min(capture.PIPE_SIZE, limit) or size == 65536  # over quota: default
    finally:
        os.close(read)
        os.close(write)
