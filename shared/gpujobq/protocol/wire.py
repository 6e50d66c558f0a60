"""Framing on an SSH channel: a 4-byte big-endian length, then a msgpack message."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from gpujobq.protocol import messages

MAX_FRAME = 256 << 20  # a RunJob carries the code; an Exited carries capped output
_LEN = struct.Struct(">I")

log = logging.getLogger(__name__)
T = TypeVar("T")
_encoder = msgspec.msgpack.Encoder()
_down = msgspec.msgpack.Decoder(messages.Down)
_up = msgspec.msgpack.Decoder(messages.Up)


def frame(msg: Any) -> bytearray:
    """The message, length-prefixed: encoded in place after the header (no copy of a
    large body to prepend it)."""
    buf = bytearray(_LEN.size)
    _encoder.encode_into(msg, buf, _LEN.size)
    _LEN.pack_into(buf, 0, len(buf) - _LEN.size)
    return buf


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


def decode_down(body: bytes | memoryview) -> messages.Down:
    return _decode(_down, body)


def decode_up(body: bytes | memoryview) -> messages.Up:
    return _decode(_up, body)


def decode_hello(body: bytes) -> messages.Hello:
    return _decode(msgspec.msgpack.Decoder(messages.Hello), body)


def _decode(decoder: msgspec.msgpack.Decoder[Any], body: bytes | memoryview) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise messages.ProtocolError(str(exc)) from exc


async def read_frame(reader: asyncio.StreamReader | Any) -> bytes | None:
    """The next frame's body, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise messages.ProtocolError("stream ended inside a frame header") from exc
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise messages.ProtocolError(f"frame of {size} bytes is over the {MAX_FRAME} limit")
    try:
        return bytes(await reader.readexactly(size))
    except asyncio.IncompleteReadError as exc:
        raise messages.ProtocolError("stream ended inside a frame") from exc


class Frames:
    """Frames from a byte stream read in chunks of any size: feed() returns the bodies
    of every frame completed so far (so a burst of messages is handled together)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        return self.decoded(data, bytes)

    def decoded(self, data: bytes, decode: Callable[[memoryview], T]
                ) -> list[T | messages.ProtocolError]:
        """feed(), each body decoded straight from the buffer (no copy of it first); a
        body ``decode`` cannot read is there as its ProtocolError."""
        self._buf += data
        out: list[T | messages.ProtocolError] = []
        start = 0
        with memoryview(self._buf) as view:
            while len(view) - start >= _LEN.size:
                (size,) = _LEN.unpack_from(view, start)
                if size > MAX_FRAME:
                    raise messages.ProtocolError(
                        f"frame of {size} bytes is over the {MAX_FRAME} limit")
                end = start + _LEN.size + size
                if len(view) < end:
                    break
                with view[start + _LEN.size:end] as body:
                    try:
                        out.append(decode(body))
                    except messages.ProtocolError as exc:
                        out.append(exc)
                start = end
        del self._buf[:start]
        return out

    @property
    def partial(self) -> bool:
        """Whether bytes of an unfinished frame are waiting."""
        return bool(self._buf)


JOIN_UP_TO = 256 << 10  # an Outbox joins a turn's frames into one write up to this size


class Outbox:
    """Frames sent in one turn of the event loop leave in one write.

    On an SSH channel every write is a packet of its own: encrypted, MACed and sent with
    a syscall. Under load many small messages (RunJob, Ack, Started, Exited) are sent
    in the same turn; together they cost one packet's overhead instead of one each.
    Nothing waits longer than the rest of the current turn. A write that fails (the
    channel is closing) is logged: the connection's own end handles what was lost.
    """

    def __init__(self, write: Callable[[bytes | bytearray], object], name: str) -> None:
        self._write = write
        self._name = name
        self._parts: list[bytearray] = []

    def send(self, msg: Any) -> None:
        if not self._parts:
            asyncio.get_running_loop().call_soon(self.flush)
        self._parts.append(frame(msg))

    def flush(self) -> None:
        parts, self._parts = self._parts, []
        if not parts:
            return
        try:
            if len(parts) == 1 or sum(map(len, parts)) > JOIN_UP_TO:
                for part in parts:  # large ones (live output) are not copied to be joined
                    self._write(part)
            else:
                self._write(b"".join(parts))
        except Exception as exc:  # a closing channel raises several kinds
            log.info("%s: %d message(s) not sent: %s", self._name, len(parts), exc)
