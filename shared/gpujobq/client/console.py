"""The CLI's terminal: job output to stdout/stderr as it comes, and messages on stderr.

A live status line (a job waiting in the queue) is one rewritten line on a terminal; when
stderr is not a terminal (a log file, CI) a line is written only when what it says
changes, so logs stay short.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Hashable
from typing import BinaryIO, TextIO

PROG = "gpujobq"


class Console:
    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.live = self.err.isatty()
        self._shown = False  # a status line is on screen (terminal only)
        self._last: Hashable = None

    def status(self, line: str, key: Hashable = None) -> None:
        """Show ``line`` as the current status; ``key``: what must change for a non-terminal
        to get a new line (default: the line itself)."""
        key = line if key is None else key
        if self.live:
            width = max(20, shutil.get_terminal_size().columns - 1)
            self.err.write("\r\x1b[K" + line[:width])
            self.err.flush()
            self._shown = True
        elif key != self._last:
            self.note(line)
        self._last = key

    def clear(self) -> None:
        """Take the status line off the screen."""
        if self._shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._shown = False
        self._last = None

    def note(self, message: str) -> None:
        """A message for the user on stderr: "gpujobq: ..."."""
        self.clear()
        self.err.write(f"{PROG}: {message}\n")
        self.err.flush()

    def write(self, stream: str, data: bytes) -> None:
        """Job output, as it was printed, to our own stdout or stderr."""
        self.clear()
        target = self.out if stream == "stdout" else self.err
        _binary(target).write(data)
        target.flush()

    def print(self, text: str) -> None:
        """A result for stdout (a table, JSON)."""
        self.clear()
        self.out.write(text + "\n")
        self.out.flush()


def _binary(stream: TextIO) -> BinaryIO:
    stream.flush()
    buffer: BinaryIO | None = getattr(stream, "buffer", None)
    if buffer is None:
        raise TypeError(f"{stream!r} takes no bytes")
    return buffer
