"""Live-log events (logs._Sent): byte offsets stay true when a character is split."""

from __future__ import annotations

import json

from gpujobq.controller import logs


def parse(event: bytes) -> tuple[str, dict[str, object]]:
    head, data = event.decode().split("\r\n")[:2]
    return head.removeprefix("event: "), json.loads(data.removeprefix("data: "))


def test_a_split_character_comes_whole_at_its_own_offset() -> None:
    sent = logs._Sent()
    whole = "a€b".encode()  # € is 3 bytes: offsets 1..3
    first = [parse(e) for e in sent.events("stdout", whole[:2])]
    second = [parse(e) for e in sent.events("stdout", whole[2:])]
    assert first == [("output", {"stream": "stdout", "offset": 0, "text": "a"})]
    assert second == [("output", {"stream": "stdout", "offset": 1, "text": "€b"})]
    # Splicing by offset (in bytes) rebuilds the stream exactly.
    got = b""
    for _, data in first + second:
        got = got[:data["offset"]] + str(data["text"]).encode()  # type: ignore[index]
    assert got == whole


def test_an_event_is_one_data_line_whatever_the_output_holds() -> None:
    (event,) = logs._Sent().events("stderr", b"line 1\r\nline 2\n\x00")
    assert event.count(b"\n") == 3 and event.endswith(b"\r\n\r\n")
    assert parse(event)[1]["text"] == "line 1\r\nline 2\n\x00"
