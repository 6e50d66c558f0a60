"""Live-log events (logs._Sent): byte offsets stay true when a character is split."""

from __future__ import annotations

import json

from gpujobq.controller import logs
from gpujobq.controller.live import Printed


def parse(event: bytes) -> tuple[str, dict[str, object]]:
    head, data = event.decode().split("\r\n")[:2]
    return head.removeprefix("event: "), json.loads(data.removeprefix("data: "))


def test_a_split_character_comes_whole_at_its_own_offset() -> None:
    sent = logs._Sent()
    whole = "a€b".encode()  # € is 3 bytes: offsets 1..3
    first = [parse(e) for e in sent.events("stdout", whole[:2])]
    second = [parse(e) for e in sent.events("stdout", whole[2:])]
    assert first == [("output", {"stream": "stdout", "offset": 0, "size": 1, "text": "a"})]
    assert second == [("output", {"stream": "stdout", "offset": 1, "size": 4, "text": "€b"})]
    # Splicing by offset (in bytes) rebuilds the stream exactly.
    got = b""
    for _, data in first + second:
        got = got[:data["offset"]] + str(data["text"]).encode()  # type: ignore[index]
    assert got == whole


def test_size_counts_stream_bytes_where_invalid_ones_read_as_one_character() -> None:
    sent = logs._Sent()
    events = [parse(e)[1] for e in sent.events("stdout", b"\xff\xfeab\n")]
    events += [parse(e)[1] for e in sent.events("stdout", b"next\n")]
    assert events == [{"stream": "stdout", "offset": 0, "size": 5, "text": "\ufffd\ufffdab\n"},
                      {"stream": "stdout", "offset": 5, "size": 5, "text": "next\n"}]


def test_an_event_is_one_data_line_whatever_the_output_holds() -> None:
    (event,) = logs._Sent().events("stderr", b"line 1\r\nline 2\n\x00")
    assert event.count(b"\n") == 3 and event.endswith(b"\r\n\r\n")
    assert parse(event)[1]["text"] == "line 1\r\nline 2\n\x00"


def test_printed_keeps_pieces_and_gives_any_suffix() -> None:
    printed = Printed()
    pieces = [b"a" * 10, b"", b"b" * 100_000, b"c" * 5, b"d" * 70_000, b"e"]
    for piece in pieces:
        printed.append(piece)
    whole = b"".join(pieces)
    assert len(printed) == len(whole)
    for offset in (0, 1, 10, 11, 99_999, 100_010, 100_015, 170_014, 170_015, len(whole), 10**9):
        assert printed.since(offset) == whole[offset:], offset
    # Small pieces are joined while they stay small; a large one is kept as it came,
    # and handed on as it is.
    assert [len(p) for p in printed.pieces] == [10, 100_000, 5, 70_000, 1]
    printed.append(b"g" * 7)
    assert [len(p) for p in printed.pieces] == [10, 100_000, 5, 70_000, 8]
    whole += b"g" * 7
    big = b"f" * 200_000
    printed.append(big)
    assert printed.since(len(whole)) is big
