"""Server-sent events, parsed line by line as the HTML standard says (the /api/logs stream).

Pure: feed it the lines of a response (without their line endings), get whole events.
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
