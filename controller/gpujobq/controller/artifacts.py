"""A job's artifacts: the files it left in its output folder ($GPUJOBQ_OUTPUT, /output in
a container), listed and downloaded by the job's owner.

The agent reads them back when the job ends (agent/outputs.py: regular files only, links
never followed, size and count capped; what was left behind is named in the job's
detail) and they are stored with the result. A job that has not ended has none yet.

The job chose every name and every byte, and the web board shares this origin: a file is
always sent as an attachment of type application/octet-stream that the browser may not
sniff or render, so an "index.html" artifact can never run script beside a user's token.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import msgspec
from gpujobq.controller import errors
from gpujobq.controller.api import (
    AUTHED,
    SECURITY,
    ApiOperation,
    error_responses,
    service_of,
    user_of,
)
from gpujobq.protocol.states import TERMINAL
from litestar import Request, Response, get
from litestar.openapi import ResponseSpec


class ArtifactItem(msgspec.Struct):
    name: str  # the path below the output folder, "/"-separated
    size: int  # bytes


class ArtifactsReply(msgspec.Struct):
    job_id: str
    status: str
    final: bool  # the job has ended: the list will not change (until an admin reruns it)
    files: list[ArtifactItem]


@get("/api/artifacts/{job_id:str}", operation_class=ApiOperation, security=SECURITY,
     responses=error_responses(400, 403, 404, *AUTHED))
async def list_artifacts(
    request: Request[Any, Any, Any], job_id: str, user_id: str | None = None
) -> ArtifactsReply:
    """The files the job left in its output folder, by name, with their sizes. Empty until
    the job has ended; files over the caps are named in the job's `detail`."""
    svc = service_of(request)
    job = svc.job_of(job_id, user_of(request, user_id), output=False)
    return ArtifactsReply(
        job_id=job.id, status=job.status.value, final=job.status in TERMINAL,
        files=[ArtifactItem(name=name, size=size) for name, size in svc.store.file_sizes(job.id)],
    )


@get("/api/artifacts/{job_id:str}/{name:path}", operation_class=ApiOperation,
     security=SECURITY, media_type="application/octet-stream",
     responses={200: ResponseSpec(bytes, media_type="application/octet-stream",
                                  generate_examples=False,
                                  description="The file's bytes, as an attachment"),
                **error_responses(400, 403, 404, *AUTHED)})
async def download_artifact(
    request: Request[Any, Any, Any], job_id: str, name: str, user_id: str | None = None
) -> Response[bytes]:
    """One file of the job's output folder, as an attachment (`name` as listed)."""
    svc = service_of(request)
    job = svc.job_of(job_id, user_of(request, user_id), output=False)
    name = name.removeprefix("/")
    data = svc.store.file(job.id, name)
    if data is None:
        raise errors.NotFound(f"Job {job.id} has no artifact named {name!r}")
    return Response(data, media_type="application/octet-stream", headers={
        "Content-Disposition": attachment(name),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    })


def attachment(name: str) -> str:
    """Content-Disposition for a job-chosen path: its last part, ASCII-safe, and the exact
    name in RFC 5987 form for browsers that read it."""
    base = name.rsplit("/", 1)[-1]
    plain = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_"
                    for c in base) or "artifact"
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{urllib.parse.quote(base)}"


ROUTES = [list_artifacts, download_artifact]
