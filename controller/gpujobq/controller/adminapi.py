"""Admin routes (/api/admin/...): an admin's token, or 403. The fleet, the inventory, any
user's jobs, and the users themselves."""

from __future__ import annotations

from typing import Any

import msgspec
from gpujobq.controller import accounts, errors, fleetview, logs, results
from gpujobq.controller.api import (
    AUTHED,
    SECURITY,
    ApiOperation,
    CancelReply,
    error_responses,
    path_id,
    service_of,
    user_of,
)
from gpujobq.protocol import inventory
from litestar import Request, get, post
from litestar.response import Stream


class UserItem(msgspec.Struct):
    user_id: str
    admin: bool
    disabled: bool
    active_tokens: int
    created_at: str | None


class ReloadReply(msgspec.Struct):
    status: str
    changes: list[str]  # what the new inventory changed, one line each


# Every admin route: 401 for a bad token, 403 for a token that is not an admin's.
ADMIN = (403, *AUTHED)


def _admin(request: Request[Any, Any, Any]) -> str:
    user = user_of(request, None)
    if not accounts.is_admin(service_of(request).store.db, user):
        raise errors.Forbidden("This needs an admin token")
    return user


@get("/api/admin/nodes", operation_class=ApiOperation, security=SECURITY,
     responses=error_responses(*ADMIN))
async def nodes(request: Request[Any, Any, Any]) -> fleetview.FleetReply:
    """The fleet: each host's state, GPUs and the jobs on them; the inventory's state."""
    _admin(request)
    svc = service_of(request)
    return fleetview.describe(svc.dispatcher, request.app.state.reloader,
                              request.app.state.node_ids)


@post("/api/admin/reload", status_code=200, operation_class=ApiOperation, security=SECURITY,
      responses=error_responses(400, *ADMIN))
async def reload(request: Request[Any, Any, Any]) -> ReloadReply:
    """Reload inventory.yaml now: the changes, or 400 with the error (the old one stays)."""
    _admin(request)
    try:
        changes = request.app.state.reloader.reload()
    except inventory.InventoryError as exc:
        raise errors.BadRequest(f"inventory not reloaded (the last good one stays): {exc}") \
            from exc
    return ReloadReply(status="reloaded", changes=changes)


@post("/api/admin/cancel/{job_id:path}", status_code=200, operation_class=ApiOperation,
      security=SECURITY, responses=error_responses(404, 409, *ADMIN))
async def cancel_any(request: Request[Any, Any, Any], job_id: str) -> CancelReply:
    """Cancel any user's job (the same as the user's own cancel, noted as the admin's)."""
    admin = _admin(request)
    svc = service_of(request)
    job = await svc.cancel(svc.any_job(path_id(job_id)), by_admin=admin)
    return CancelReply(job_id=job.id, status=job.status.value, reason=job.reason)


@post("/api/admin/requeue/{job_id:path}", status_code=200, operation_class=ApiOperation,
      security=SECURITY, responses=error_responses(404, 409, *ADMIN))
async def requeue_any(request: Request[Any, Any, Any], job_id: str) -> CancelReply:
    """Put any user's job back in the queue: a running one is stopped first (no retry
    counted), a finished one runs again from the start. A pending job is 409."""
    admin = _admin(request)
    svc = service_of(request)
    job = svc.dispatcher.requeue_by_admin(svc.any_job(path_id(job_id)), admin)
    return CancelReply(job_id=job.id, status=job.status.value, reason=job.reason)


@get("/api/admin/logs/{job_id:path}", operation_class=ApiOperation, security=SECURITY,
     responses=error_responses(400, 404, *ADMIN), media_type="text/event-stream")
async def logs_any(request: Request[Any, Any, Any], job_id: str, follow: bool = False
                   ) -> Stream:
    """Any user's job's output, as /api/logs gives it to its owner (the web board's admin
    view follows it)."""
    _admin(request)
    svc = service_of(request)
    return logs.response(svc, svc.any_job(path_id(job_id), output=False), follow)


@get("/api/admin/users", operation_class=ApiOperation, security=SECURITY,
     responses=error_responses(*ADMIN))
async def users(request: Request[Any, Any, Any]) -> list[UserItem]:
    """Every user, with how many unrevoked, unexpired tokens each has."""
    _admin(request)
    svc = service_of(request)
    return [
        UserItem(user_id=u.id, admin=u.admin, disabled=u.disabled_at is not None,
                 active_tokens=u.active_tokens, created_at=results.iso(u.created_at))
        for u in accounts.list_users(svc.store.db, svc.clock())
    ]


ROUTES = [nodes, reload, cancel_any, requeue_any, logs_any, users]
