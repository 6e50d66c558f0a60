"""How an agent batches a running job's output into Output messages."""

from __future__ import annotations

import asyncio

from gpujobq.agent import core
from gpujobq.protocol import messages


class _Agent:
    """What a reporter asks of its agent: a clock and somewhere to send reports."""

    def __init__(self) -> None:
        self.sent: list[messages.Output] = []

    def clock(self) -> float:
        return 0.0

    def _report(self, msg: messages.Up) -> None:
        if isinstance(msg, messages.Output):
            self.sent.append(msg)


def reporter() -> tuple[core._Reporter, _Agent]:
    agent = _Agent()
    run = messages.RunJob(job_id="j", attempt=1, code=b"", config=b"", time_limit=10.0)
    return core._Reporter(agent, run), agent  # type: ignore[arg-type]


async def test_small_prints_are_batched_for_live_flush() -> None:
    rep, agent = reporter()
    for i in range(3):
        rep.output("stdout", b"line %d\n" % i)
        await asyncio.sleep(core.BULK_PAUSE * 2)  # pauses do not send small prints
    assert agent.sent == []
    await asyncio.sleep(core.LIVE_FLUSH)
    assert [m.data for m in agent.sent] == [b"".join(b"line %d\n" % i for i in range(3))]
    rep.close()


async def test_a_bulk_writer_that_pauses_is_sent_at_once() -> None:
    rep, agent = reporter()
    rep.output("stdout", b"x" * core.BULK_READ)
    rep.output("stdout", b"tail\n")  # its last, small write
    await asyncio.sleep(core.BULK_PAUSE * 5)
    assert [(m.offset, len(m.data)) for m in agent.sent] == [(0, core.BULK_READ + 5)]
    rep.close()


async def test_a_full_piece_goes_without_waiting() -> None:
    rep, agent = reporter()
    rep.output("stderr", b"e" * (core.OUTPUT_PIECE + 1))
    assert [(m.stream, m.offset, len(m.data)) for m in agent.sent] == [
        ("stderr", 0, core.OUTPUT_PIECE), ("stderr", core.OUTPUT_PIECE, 1)]
    rep.close()
