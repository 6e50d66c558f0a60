from __future__ import annotations

import asyncio
import struct

import msgspec
import pytest
from gpujobq.protocol import messages, wire
from gpujobq.protocol.messages import GPU, HeldJob, ProtocolError

DOWN = [
    messages.RunJob(
        job_id="j1", attempt=2, code=b"print(1)\x00\xff", config=b"a: 1\n",
        gpus=(GPU(index=0, uuid="GPU-x"), GPU(index=3, virtual=True)),
        competition_id="c", time_limit=12.5, grace=3.0, output_cap=1234,
    ),
    messages.Cancel(job_id="j1", attempt=2),
    messages.Ack(job_id="j1", attempt=2),
]
UP = [
    messages.Started(job_id="j1", attempt=1, at=1.5),
    messages.Exited(
        job_id="j1", attempt=1, at=2.5, reason="exit_code", exit_code=0,
        stdout=b"out", stderr=b"err", detail="",
    ),
    messages.Exited(job_id="j1", attempt=1, at=2.5, reason="oom", exit_code=None),
    messages.Heartbeat(at=3.0, jobs=(HeldJob(job_id="j1", attempt=1, finished=True),)),
    messages.Heartbeat(at=3.0),
]


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


@pytest.mark.parametrize("msg", DOWN, ids=lambda m: type(m).__name__)
async def test_down_round_trip(msg: messages.Down) -> None:
    reader = reader_of(wire.frame(msg))
    body = await wire.read_frame(reader)
    assert body is not None
    assert wire.decode_down(body) == msg
    assert await wire.read_frame(reader) is None


@pytest.mark.parametrize("msg", UP, ids=lambda m: type(m).__name__)
async def test_up_round_trip(msg: messages.Up) -> None:
    body = await wire.read_frame(reader_of(wire.frame(msg)))
    assert body is not None and wire.decode_up(body) == msg


async def test_many_frames_in_one_stream() -> None:
    reader = reader_of(b"".join(wire.frame(m) for m in UP))
    got = []
    while (body := await wire.read_frame(reader)) is not None:
        got.append(wire.decode_up(body))
    assert got == UP


def test_hello_round_trip() -> None:
    hello = messages.Hello(
        host="h1", runtime="process", gpus=(GPU(index=0),),
        jobs=(HeldJob(job_id="j", attempt=1, finished=False),),
    )
    decoded = wire.decode_hello(wire.encode(hello))
    assert decoded == hello and decoded.version == messages.PROTOCOL_VERSION


def test_frame_header_is_big_endian_length() -> None:
    framed = wire.frame(DOWN[1])
    assert struct.unpack(">I", framed[:4])[0] == len(framed) - 4


async def test_clean_eof_returns_none() -> None:
    assert await wire.read_frame(reader_of(b"")) is None


@pytest.mark.parametrize("cut", [1, 3, 4, 5], ids=lambda c: f"cut-{c}")
async def test_truncated_frame(cut: int) -> None:
    framed = wire.frame(DOWN[0])
    with pytest.raises(ProtocolError):
        await wire.read_frame(reader_of(framed[:cut]))


async def test_truncated_last_frame_after_good_one() -> None:
    framed = wire.frame(DOWN[1])
    reader = reader_of(framed + framed[:-1])
    assert await wire.read_frame(reader) is not None
    with pytest.raises(ProtocolError):
        await wire.read_frame(reader)


async def test_oversize_length_header() -> None:
    # The header alone must be refused: no body is read (the reader never gets EOF).
    reader = reader_of(struct.pack(">I", wire.MAX_FRAME + 1), eof=False)
    with pytest.raises(ProtocolError, match="limit"):
        await asyncio.wait_for(wire.read_frame(reader), 5)


def test_unknown_fields_are_tolerated() -> None:
    up = msgspec.msgpack.encode(
        {"type": "started", "job_id": "j1", "attempt": 1, "at": 1.0, "new_field": [1, 2]}
    )
    assert wire.decode_up(up) == messages.Started(job_id="j1", attempt=1, at=1.0)
    down = msgspec.msgpack.encode({"type": "ack", "job_id": "j1", "attempt": 4, "extra": {}})
    assert wire.decode_down(down) == messages.Ack(job_id="j1", attempt=4)


@pytest.mark.parametrize(
    "value",
    [
        {"type": "explode", "job_id": "j1", "attempt": 1},
        {"job_id": "j1", "attempt": 1},
        {"type": "ack", "job_id": "j1"},
        {"type": "ack", "job_id": "j1", "attempt": "1"},
        [1, 2, 3],
    ],
    ids=["unknown-tag", "no-tag", "missing-field", "wrong-type", "not-a-map"],
)
def test_invalid_messages(value: object) -> None:
    body = msgspec.msgpack.encode(value)
    with pytest.raises(ProtocolError):
        wire.decode_down(body)
    with pytest.raises(ProtocolError):
        wire.decode_up(body)


def test_garbage_bytes() -> None:
    with pytest.raises(ProtocolError):
        wire.decode_up(b"\xc1\xc1\xc1")
    with pytest.raises(ProtocolError):
        wire.decode_hello(b"")


def test_directions_do_not_mix() -> None:
    with pytest.raises(ProtocolError):
        wire.decode_up(wire.encode(DOWN[1]))
    with pytest.raises(ProtocolError):
        wire.decode_down(wire.encode(UP[0]))


async def test_messages_of_one_turn_leave_in_one_write_in_order() -> None:
    writes: list[bytes] = []
    outbox = wire.Outbox(lambda data: writes.append(bytes(data)), "test")
    for msg in DOWN:
        outbox.send(msg)
    assert writes == []  # nothing before the turn ends
    await asyncio.sleep(0)
    assert len(writes) == 1
    assert [wire.decode_down(b) for b in wire.Frames().feed(writes[0])] == DOWN
    outbox.send(DOWN[2])  # a later turn: a write of its own
    await asyncio.sleep(0)
    assert [wire.decode_down(b) for b in wire.Frames().feed(writes[1])] == [DOWN[2]]


async def test_a_failing_write_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def closed(data: bytes | bytearray) -> None:
        raise BrokenPipeError("channel closed")

    outbox = wire.Outbox(closed, "agent a1")
    outbox.send(DOWN[1])
    outbox.send(DOWN[2])
    with caplog.at_level("INFO"):
        await asyncio.sleep(0)
    assert "agent a1: 2 message(s) not sent: channel closed" in caplog.text


def test_decoded_frames_across_chunks_with_an_unreadable_one() -> None:
    stream = b"".join([wire.frame(UP[0]), wire.frame(UP[1]), bytes(wire.frame(b"\xc1")),
                       wire.frame(UP[3])])
    frames = wire.Frames()
    got: list[object] = []
    for i in range(0, len(stream), 7):  # chunks that split headers and bodies
        got += frames.decoded(stream[i:i + 7], wire.decode_up)
    assert not frames.partial
    assert got[:2] == UP[:2] and got[3] == UP[3]
    assert isinstance(got[2], ProtocolError)
    # What was decoded owns its bytes: the buffer is reused after.
    frames.decoded(wire.frame(UP[4]), wire.decode_up)
    assert got[1].stdout == b"out"  # type: ignore[union-attr]
