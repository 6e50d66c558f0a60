"""Watching a job from the command line: its place in the queue while it waits, then its
output as it comes until it ends, riding out a server that restarts meanwhile.

Polling is only for the queue position (every POLL seconds; the output is not delayed by
it: the log stream starts with the history). A broken log stream is opened again, with
backoff, for up to GIVE_UP seconds without the server; the follower keeps anything from
being printed twice.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import TypeVar

from gpujobq.client import api, display, follower
from gpujobq.client.console import Console

T = TypeVar("T")
POLL = 2.0  # seconds between status checks of a pending job (the status line's refresh)
RECONNECT_MAX = 10.0  # longest wait between tries to reach the server again
GIVE_UP = 300.0  # seconds in a row without the server before giving up


def wait_to_start(client: api.Client, job_id: str, con: Console) -> api.StatusReply:
    """Poll the job's status while it waits, showing its place in the queue."""
    while True:
        state = patiently(lambda: client.status(job_id), con)
        if state["status"] != "pending":
            con.clear()
            if state["status"] == "running":
                con.note(f"job {job_id} running on {state.get('node') or '?'}")
            return state
        now = dt.datetime.now(dt.UTC)
        con.status(display.pending_line(state, now),
                   key=(state.get("queue_position"), state.get("pending_reason")))
        time.sleep(POLL)


def follow(client: api.Client, job_id: str, con: Console, attempt: int | None,
           quiet: bool = False) -> follower.End:
    """Write the job's output as it comes until it ends; reconnect when the stream breaks
    (the server restarting), printing nothing twice."""
    out, patience, again = follower.Follower(attempt), Patience(con), False
    while True:
        try:
            if again:  # a new stream: did the job start over while we were away?
                _check_attempt(client.status(job_id), out, con)
            end = _stream(client, job_id, out, con, patience, quiet)
            if end is not None:
                return end
            patience.failed(api.Unreachable("the log stream closed before the job ended"))
        except (api.Unreachable, api.ApiError) as exc:
            patience.failed(exc)
        again = True


def _check_attempt(state: api.StatusReply, out: follower.Follower, con: Console) -> None:
    if state.get("attempt") == out.attempt:
        return
    if not out.attempt:  # it was pending (attempt 0): this is its first start, no restart
        out.attempt = state.get("attempt")
        return
    if any(out.written.values()):  # (a first start after a pending job is none)
        con.note(f"job {state['job_id']} runs again (attempt {state.get('attempt')}); "
                 "its output starts over")
    out.restart(state.get("attempt"))


def _stream(client: api.Client, job_id: str, out: follower.Follower, con: Console,
            patience: Patience, quiet: bool) -> follower.End | None:
    """One stream of /api/logs: the job's end, or None when it closed before that."""
    for event in client.logs(job_id, follow=True):
        patience.ok()
        if event.event == "restart":
            con.note(f"job {job_id} was requeued and runs again; its output starts over")
        for write in out.feed(event):
            if not quiet:
                con.write(write.stream, write.data)
        if out.end is not None:
            return out.end
    return None


class Patience:
    """Waiting out a server that is away: unreachable or unavailable (5xx), backing off,
    for up to GIVE_UP seconds in a row. A refusal (4xx) is final."""

    def __init__(self, con: Console) -> None:
        self.con = con
        self.ok()

    def ok(self) -> None:
        self.since: float | None = None
        self.pause = 0.5

    def failed(self, problem: api.ClientError) -> None:
        """Wait before the next try, or raise ``problem`` when it is final."""
        if isinstance(problem, api.ApiError):
            if problem.status < 500:
                raise problem
            self.pause = max(self.pause, problem.retry_after or 0)
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since > GIVE_UP:
            raise problem
        self.con.status(f"{problem}; trying again", key=str(problem))
        time.sleep(min(self.pause, RECONNECT_MAX))
        self.pause = min(self.pause * 2, RECONNECT_MAX)


def patiently(call: Callable[[], T], con: Console) -> T:
    """``call()``, tried again while the server is away (see Patience)."""
    patience = Patience(con)
    while True:
        try:
            return call()
        except (api.Unreachable, api.ApiError) as exc:
            patience.failed(exc)
