"""Crash points for the fault suite: kill the controller at a chosen place in its work.

``GPUJOBQ_CRASH_AT=after_commit`` (or ``before_dispatch``, ``after_dispatch``,
``before_record``, ``before_ack``) makes the controller exit at once, as a SIGKILL
would, the first time it reaches that point. Unset (always, in production) it costs a
string comparison.
"""

from __future__ import annotations

import os

POINTS = ("after_commit", "before_dispatch", "after_dispatch", "before_record", "before_ack")
_armed = os.environ.get("GPUJOBQ_CRASH_AT", "")


def reach(point: str) -> None:
    assert point in POINTS, point
    if _armed == point:
        os._exit(137)  # no cleanup, no flush: what a kill -9 leaves behind
