"""The web board: the page at / (static files in ./board) and its data, GET /api/board.

Without a token the board shows what anyone on the network may see: hosts, the state of
each GPU, how many jobs wait and run, and the expected wait for a new job; never a user
name or a job id (the guide promises that nobody sees others' jobs). A user's token adds
that user's own jobs and the GPUs they run on; an admin's token adds every active job,
with its user, and who runs on which GPU.
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any

import msgspec
from gpujobq.controller import accounts, errors, fleetview, results, scheduler, store
from gpujobq.controller import dispatcher as dispatcher_mod
from gpujobq.controller.api import (
    AUTHED,
    BEARER,
    ApiOperation,
    error_responses,
    service_of,
    user_of,
    where_it_waits,
)
from gpujobq.protocol.states import Status
from litestar import Request, Response, get

RECENT = 10  # finished jobs of a user the board lists, besides the active ones
ADMIN_PENDING = 200  # pending jobs an admin's board lists (the first in the queue)
FORECAST_MAX_AGE = 2.0  # seconds the expected wait is kept: many browsers poll the board
# No token needed; a token, when sent, must be good (401 otherwise).
OPTIONAL_SECURITY: list[dict[str, list[str]]] = [{}, {BEARER: []}]

BOARD_DIR = pathlib.Path(__file__).with_name("board")
ASSETS = {"board.js": "text/javascript", "board.css": "text/css"}  # Litestar adds the charset
# The page runs only its own script and style and talks only to this controller.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


class BoardGPU(msgspec.Struct):
    index: int
    name: str
    state: str  # free, busy, held (a job given up on may still run), dirty (held back)
    mine: bool  # one of the token's user's jobs runs on it
    job_id: str | None  # the job on it: only the token's user's own, or any for an admin
    user_id: str | None  # whose job it is: admins only


class BoardHost(msgspec.Struct):
    name: str
    state: str  # up, drained (takes no new jobs), down
    gpus: list[BoardGPU]


class BoardJob(msgspec.Struct):
    job_id: str
    user_id: str
    status: str
    competition_id: str
    node: str | None
    gpus: list[int]
    queue_position: int | None  # 1 = the next to start; None unless pending
    estimated_start: str | None
    pending_reason: str | None
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    reason: str | None


class QueueSummary(msgspec.Struct):
    pending: int  # jobs waiting
    running: int
    # When a 1-GPU job (no labels) of a user with nothing queued, submitted now, is
    # expected to start, and in how many seconds (0: at once); None when no host can
    # run it soon (wait_reason says why).
    expected_start: str | None
    expected_wait: float | None
    wait_reason: str | None


class BoardReply(msgspec.Struct):
    now: str | None
    user_id: str | None  # the token's user; None without a token
    admin: bool
    queue: QueueSummary
    hosts: list[BoardHost]
    jobs: list[BoardJob]  # the token's user's active jobs and newest ones, newest first
    active: list[BoardJob]  # admins: every running job and the first pending ones


# ---- what each viewer may see (pure) --------------------------------------------------


def board_hosts(fleet: fleetview.FleetReply, user: str | None, admin: bool
                ) -> list[BoardHost]:
    """The fleet as a viewer may see it: job ids of the user's own jobs (any for an
    admin), users for an admin; without a token neither."""
    return [BoardHost(name=h.name, state=h.state, gpus=[_gpu(g, user, admin) for g in h.gpus])
            for h in fleet.hosts]


def _gpu(g: fleetview.GPUReply, user: str | None, admin: bool) -> BoardGPU:
    mine = user is not None and g.user_id == user
    return BoardGPU(index=g.index, name=g.name, state=g.state, mine=mine,
                    job_id=g.job_id if admin or mine else None,
                    user_id=g.user_id if admin else None)


def queue_summary(pending: int, running: int, new_job: scheduler.Waiting, now: float
                  ) -> QueueSummary:
    """The counts, and the wait of a new job from where the planner would put it."""
    start = new_job.estimated_start
    if start is None:
        return QueueSummary(pending=pending, running=running, expected_start=None,
                            expected_wait=None, wait_reason=new_job.reason)
    start = max(start, now)
    return QueueSummary(pending=pending, running=running, expected_start=results.iso(start),
                        expected_wait=round(start - now, 1),
                        wait_reason=None if new_job.position == 0 else new_job.reason)


# ---- the shell --------------------------------------------------------------------------


class _Forecast:
    """The planner's answer for a new job, kept FORECAST_MAX_AGE seconds: it plans the
    whole queue, and every open board asks every few seconds."""

    def __init__(self) -> None:
        self.at = -math.inf
        self.value: scheduler.Waiting | None = None

    def get(self, disp: dispatcher_mod.Dispatcher) -> scheduler.Waiting:
        now = disp.mono()
        if self.value is None or now - self.at > FORECAST_MAX_AGE:
            self.value, self.at = disp.probe(), now
        return self.value


def _forecast(request: Request[Any, Any, Any]) -> _Forecast:
    state = request.app.state
    if state.get("board_forecast") is None:
        state.board_forecast = _Forecast()
    forecast: _Forecast = state.board_forecast
    return forecast


def _viewer(request: Request[Any, Any, Any]) -> tuple[str | None, bool]:
    """(user, admin): (None, False) without an Authorization header; 401 for a bad one."""
    if "authorization" not in request.headers:
        return None, False
    user = user_of(request, None)
    return user, accounts.is_admin(service_of(request).store.db, user)


def _board_job(disp: dispatcher_mod.Dispatcher, job: store.Job) -> BoardJob:
    waiting = disp.waiting(job)
    return BoardJob(
        job_id=job.id, user_id=job.user_id, status=job.status.value,
        competition_id=job.competition_id, node=job.node, gpus=list(job.gpus),
        **where_it_waits(waiting),
        created_at=results.iso(job.created_at), started_at=results.iso(job.started_at),
        completed_at=results.iso(job.completed_at), reason=job.reason,
    )


@get("/api/board", operation_class=ApiOperation, security=OPTIONAL_SECURITY,
     responses=error_responses(*AUTHED))
async def board(request: Request[Any, Any, Any]) -> Response[BoardReply]:
    """The web board's data; no token needed. Without one: hosts, GPU states and the
    queue, with no user names or job ids. A user's token adds that user's active and
    newest jobs and marks the GPUs they run on; an admin's adds every active job (running,
    and the first pending ones) and who runs on each GPU. A bad token is 401."""
    svc = service_of(request)
    disp = svc.dispatcher
    user, admin = _viewer(request)
    fleet = fleetview.describe(disp, request.app.state.reloader, request.app.state.node_ids)
    pending, running, _ = svc.store.queue_stats()
    now = svc.clock()
    jobs: list[BoardJob] = []
    active: list[BoardJob] = []
    if user is not None:
        jobs = [_board_job(disp, j) for j in svc.store.recent_for_user(user, RECENT)]
    if admin:
        # Running ones first, then the queue in the order it starts (fair, not by age).
        waiting = (svc.store.get(job_id, output=False)
                   for job_id in disp.next_to_start(ADMIN_PENDING))
        active = [_board_job(disp, j) for j in (
            *svc.store.by_status(Status.RUNNING),
            *(j for j in waiting if j is not None and j.status is Status.PENDING))]
    reply = BoardReply(
        now=results.iso(now), user_id=user, admin=admin,
        queue=queue_summary(pending, running, _forecast(request).get(disp), now),
        hosts=board_hosts(fleet, user, admin), jobs=jobs, active=active,
    )
    # Private to the token once there is one; a live view in any case.
    return Response(reply, headers={"Cache-Control": "no-store"})


# ---- the page ---------------------------------------------------------------------------


@functools.cache
def _file(name: str) -> bytes:
    return (BOARD_DIR / name).read_bytes()


@get("/", include_in_schema=False)
async def page() -> Response[bytes]:
    """The board (plain HTML, JS and CSS shipped in the package; nothing from elsewhere)."""
    return Response(_file("index.html"), media_type="text/html", headers=PAGE_HEADERS)


@get("/board/{name:str}", include_in_schema=False)
async def asset(name: str) -> Response[bytes]:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise errors.NotFound("Not found")
    return Response(_file(name), media_type=media_type, headers=PAGE_HEADERS)


ROUTES = [page, asset, board]
