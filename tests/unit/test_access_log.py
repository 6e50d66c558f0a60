"""The controller's access log handler: the lines of one turn of the event loop go out
together when the turn ends; outside a running loop, each at once."""

from __future__ import annotations

import asyncio
import logging
import os

from gpujobq.controller.__main__ import TurnLogHandler


def _readable(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, message, None, None)


def test_lines_of_a_turn_go_out_together_when_it_ends() -> None:
    read, write = os.pipe()
    handler = TurnLogHandler(write)
    handler.setFormatter(logging.Formatter("%(message)s"))

    async def turn() -> bytes:
        for n in range(3):
            handler.handle(_record(f"GET /api/status/{n} 200"))
        assert _readable(read) == b""  # still this turn: nothing written yet
        await asyncio.sleep(0)  # the turn ends
        return _readable(read)

    try:
        assert asyncio.run(turn()) == b"".join(
            f"GET /api/status/{n} 200\n".encode() for n in range(3))
        handler.handle(_record("no loop: at once"))
        assert _readable(read) == b"no loop: at once\n"

        async def closed_mid_turn() -> bytes:
            handler.handle(_record("written by close"))
            handler.close()  # logging shuts down before the turn ends
            return _readable(read)

        assert asyncio.run(closed_mid_turn()) == b"written by close\n"
    finally:
        os.close(read)
        os.close(write)
