"""Server-sent events, parsed as the HTML standard says (the /api/logs stream).

Pure: ``Lines`` cuts a response's bytes into lines, ``Parser`` turns lines into events.
Cutting bytes (one search per line, lines decoded whole) rather than text keeps a
follower cheap: an output event carries up to 1 MiB on one line.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Event(msgspec.Struct, frozen=True):
    event: str  # the event's type; "message" when the server named none
    data: str  # its data lines, joined by "\n"
    id: str | None = None

    def json(self) -> Any:
        """The data as JSON (every event of /api/logs carries one JSON object)."""
        return msgspec.json.decode(self.data)


class Lines:
    """Bytes in any chunks, lines out without their endings (CRLF, LF or a lone CR), as
    UTF-8 text (invalid bytes read as U+FFFD; no character holds a CR or LF byte, so a
    line decodes alone). Each byte is searched once and copied once, into its line."""

    def __init__(self) -> None:
        self._parts: list[memoryview] = []  # the unfinished line, as it came
        self._after_cr = False  # the last chunk ended with a CR: an LF now belongs to it

    def feed(self, chunk: bytes) -> list[str]:
        view, size = memoryview(chunk), len(chunk)
        pos = 1 if self._after_cr and chunk[:1] == b"\n" else 0
        self._after_cr = False
        lines = []
        while pos < size:
            lf = chunk.find(b"\n", pos)
            cr = chunk.find(b"\r", pos, size if lf < 0 else lf)
            if cr >= 0:  # a CR first: CRLF, or a CR alone
                end = cr
                after = cr + 2 if cr + 1 < size and chunk[cr + 1] == 0x0A else cr + 1
                self._after_cr = after == size and cr + 1 == size
            elif lf >= 0:
                end, after = lf, lf + 1
            else:
                self._parts.append(view[pos:])
                break
            self._parts.append(view[pos:end])
            line = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            lines.append(str(line, "utf-8", "replace"))
            self._parts.clear()
            pos = after
        return lines


class Parser:
    """Collects fields until a blank line ends an event."""

    def __init__(self) -> None:
        self._kind = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Event | None:
        """The event this line completes, if it is the blank line that ends one."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # a comment: the server's keepalive
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._kind = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the standard says.
        return None

    def _dispatch(self) -> Event | None:
        kind, data, self._kind, self._data = self._kind, self._data, "", []
        if not data:  # an event without data is dropped (its type is reset)
            return None
        return Event(event=kind or "message", data="\n".join(data), id=self._id)
