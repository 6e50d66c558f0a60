"""HTTP routes: thin. Decode, call the service, encode. Errors become {"detail": ...}."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Annotated, Any

import msgspec
from gpujobq.controller import database, errors, forms, logs, results, scheduler, service, store
from gpujobq.protocol import jobconfig
from gpujobq.protocol.states import TERMINAL
from litestar import Request, Response, get, post
from litestar.enums import ParamType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIFormat,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.openapi.spec import Parameter as OpenAPIParameter
from litestar.params import Parameter
from litestar.response import Stream

log = logging.getLogger(__name__)

FORBIDDEN = "Token does not belong to specified user_id"
MAX_PAGE = 500


class SubmitReply(msgspec.Struct):
    job_id: str
    status: str
    stdout: str
    stderr: str
    exit_code: int | None


class StatusReply(msgspec.Struct):
    job_id: str
    status: str
    node_id: int | None
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    reason: str | None
    detail: str | None
    node: str | None
    attempt: int
    gpus: list[int]  # the GPU indexes it runs on (on `node`); [] until it starts
    gpu_count: int  # GPUs it asked for
    queue_position: int | None  # 1 = the next to start; None unless pending
    estimated_start: str | None  # from the expected_time of the jobs ahead and running
    pending_reason: str | None  # why it still waits; None unless pending
    time_limit: float
    competition_id: str  # as /api/jobs lists it (the `gpujobq` CLI's tables show it)
    exit_code: int | None  # once it has ended, as /api/results has it


class JobItem(msgspec.Struct):
    job_id: str
    status: str
    competition_id: str
    created_at: str | None


class CancelReply(msgspec.Struct):
    job_id: str
    status: str
    reason: str | None


class AgentHealth(msgspec.Struct):
    connected: bool
    runtime: str | None  # what the agent said it runs jobs with; None before it said
    error: str | None  # why the link is down, if it is


class HealthReply(msgspec.Struct):
    status: str
    agents: dict[str, AgentHealth]


class ErrorReply(msgspec.Struct):
    """Every error's body, in the guide's shape."""

    detail: str


# ---- OpenAPI: what the handlers do that Litestar cannot see from their signatures --------

BEARER = "BearerToken"
SECURITY: list[dict[str, list[str]]] = [{BEARER: []}]
ERROR_TEXT = {
    400: "Malformed request: a parameter, the form or config.yaml",
    401: "Invalid or expired token (or none)",
    403: "The token belongs to someone else than the user_id named, or is not an admin's",
    404: "Job not found (or not the token's user's)",
    409: "The job's state does not allow it",
    413: "Too large: the request, solution.py or config.yaml",
    422: "config.yaml is well formed but a value is not allowed",
    429: "Too many submissions in the window, or too many active jobs: see Retry-After",
    503: "Storage full or not writable, or the server is stopping: see Retry-After",
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """The errors a route answers, each with the {"detail": ...} body."""
    return {
        code: ResponseSpec(data_container=ErrorReply, description=ERROR_TEXT[code],
                           generate_examples=False)
        for code in codes
    }


# Every route that reads a token (and so the database): 401, and 503 when storage fails.
AUTHED = (401, 503)
RETRY_AFTER = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER, minimum=0), required=True,
    description="Seconds to wait before trying again",
)
NEXT_CURSOR = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.STRING, pattern=r"^[0-9]{1,18}$"),
    description="Present when there are older jobs: pass it as `cursor` for the next page",
)
IDEMPOTENCY_KEY = OpenAPIParameter(
    name="Idempotency-Key", param_in=ParamType.HEADER, required=False,
    description="A retry with the same key returns the first submission's job",
    schema=Schema(type=OpenAPIType.STRING, min_length=1, max_length=200,
                  pattern=r"^[!-~]([ -~]{0,198}[!-~])?$"),
)
SUBMIT_FORM = RequestBody(
    required=True,
    description="The guide's two files: -F code=@solution.py -F config_file=@config.yaml",
    content={"multipart/form-data": OpenAPIMediaType(schema=Schema(
        type=OpenAPIType.OBJECT,
        required=["code", "config_file"],
        properties={
            "code": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY,
                           description="solution.py: the Python program to run (not blank)"),
            "config_file": Schema(
                type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY,
                description="config.yaml (YAML, JSON or a Python dict's repr): "
                            "competition_id, project_id, user_id (the token's), expected_time "
                            "(seconds), optional token and gpus"),
        },
        additional_properties=False,  # any other field is answered 400
    ))},
)


@dataclasses.dataclass
class ApiOperation(Operation):
    """Declares the Retry-After header every 429 and 503 answer carries."""

    def __post_init__(self) -> None:
        for code, response in (self.responses or {}).items():
            if code in ("429", "503") and isinstance(response, OpenAPIResponse):
                response.headers = {"Retry-After": RETRY_AFTER}


@dataclasses.dataclass
class SubmitOperation(ApiOperation):
    """The form the handler reads itself (so Litestar sees no body), and Idempotency-Key."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.request_body = SUBMIT_FORM
        self.parameters = [*(self.parameters or []), IDEMPOTENCY_KEY]


@dataclasses.dataclass
class JobsOperation(ApiOperation):
    """The jobs page's X-Next-Cursor header."""

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.headers = {**(ok.headers or {}), "X-Next-Cursor": NEXT_CURSOR}


def openapi_config() -> OpenAPIConfig:
    """The schema at /schema/openapi.json, with the bearer token the routes take."""
    return OpenAPIConfig(
        title="gpujobq", version="0.1.0", use_handler_docstrings=True,
        components=Components(security_schemes={BEARER: SecurityScheme(
            type="http", scheme="bearer",
            description="The user's token: Authorization: Bearer TOKEN")}),
    )


def service_of(request: Request[Any, Any, Any]) -> service.JobService:
    svc: service.JobService = request.app.state.service
    return svc


def _token(request: Request[Any, Any, Any]) -> str | None:
    scheme, _, value = (forms.header(request, b"authorization") or "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def user_of(request: Request[Any, Any, Any], claimed: str | None) -> str:
    """The token's user; 401 for a bad token, 403 when ``claimed`` is someone else."""
    user = service_of(request).authenticate(_token(request))
    if claimed is not None and claimed != user:
        raise errors.Forbidden(FORBIDDEN)
    return user


def path_id(path: str) -> str:
    # Routes take the rest of the path, so an id with a slash in it reaches the same
    # "Job not found" as any other unknown id.
    return path.removeprefix("/")


def _result(request: Request[Any, Any, Any], job: store.Job) -> SubmitReply:
    """The guide's result shape; for a running job, what it has printed so far."""
    stdout, stderr = service_of(request).dispatcher.live_output(job)
    return SubmitReply(
        job_id=job.id, status=job.status.value, stdout=results.text(stdout),
        stderr=results.text(stderr), exit_code=job.exit_code,
    )


KEEP_CONFIGS = 4096  # parsed config.yaml files kept, at most 4 KiB each


def _config(raw: bytes) -> jobconfig.JobConfig:
    """config.yaml parsed. A user sends the same file submission after submission, and
    parsing YAML costs more than the rest of a submit's checks together (~60 us), so the
    result is kept: it depends on the bytes alone (JobConfig is frozen). Not for a file
    holding a token (no token stays in memory as text) or a large one."""
    if len(raw) > 4096 or b"token" in raw:
        return jobconfig.parse(raw)
    return _parsed(raw)


@functools.lru_cache(maxsize=KEEP_CONFIGS)
def _parsed(raw: bytes) -> jobconfig.JobConfig:
    return jobconfig.parse(raw)  # a refusal raises: never kept


FORM_FIELDS = ("code", "config_file")
SUBMIT_QUERY = ("wait",)


def _only_known(request: Request[Any, Any, Any], form: dict[str, list[bytes]]) -> None:
    """Nothing else may ride along: a submission cannot set status, node, attempt...."""
    for name in form:
        if name not in FORM_FIELDS:
            raise errors.BadRequest(
                f"Unknown form field '{name}': a submission has only 'code' and 'config_file'")
    for name in request.query_params:
        if name not in SUBMIT_QUERY:
            raise errors.BadRequest(
                f"Unknown query parameter '{name}': /api/submit takes only 'wait'")


@post("/api/submit", status_code=200, operation_class=SubmitOperation, security=SECURITY,
      responses={202: ResponseSpec(SubmitReply, generate_examples=False, description=(
          "Accepted, not finished yet (wait=false, or the server's wait cap passed): "
          "the job's state so far")),
          **error_responses(400, 403, 413, 422, 429, *AUTHED)})
async def submit(request: Request[Any, Any, Any], wait: bool = True) -> Response[SubmitReply]:
    """Run solution.py as config.yaml says. Answers with the result (200) once the job
    has finished, or at once with wait=false (202)."""
    svc = service_of(request)
    user = user_of(request, None)
    form = await forms.read(request)
    _only_known(request, form)
    limits = svc.settings
    code = forms.part(form, "code", limits.max_code, "code (solution.py)")
    raw_config = forms.part(form, "config_file", limits.max_config, "config_file (config.yaml)")
    if not code.strip():
        raise errors.BadRequest("Form field 'code' is empty")
    try:
        config = _config(raw_config)
    except jobconfig.ConfigError as exc:
        raise (errors.BadRequest if exc.malformed else errors.Unprocessable)(str(exc)) from exc
    if config.user_id != user:
        raise errors.Forbidden(FORBIDDEN)
    if config.token is not None and config.token != _token(request):
        raise errors.Forbidden("The token in config.yaml does not match the Authorization header")
    key = forms.header(request, b"idempotency-key")
    if key is not None and not (0 < len(key) <= 200 and key.isprintable()):
        raise errors.BadRequest("Idempotency-Key must be 1-200 printable characters")
    job = await svc.submit(config, code, key)
    if wait:
        job = await svc.wait(job, svc.settings.wait_cap)
    return Response(_result(request, job), status_code=200 if job.status in TERMINAL else 202)


@get("/api/status/{job_id:path}", operation_class=ApiOperation, security=SECURITY,
     responses=error_responses(400, 403, 404, *AUTHED))
async def status(
    request: Request[Any, Any, Any], job_id: str, user_id: str | None = None
) -> StatusReply:
    svc = service_of(request)
    job = svc.job_of(path_id(job_id), user_of(request, user_id), output=False)
    node_ids = request.app.state.node_ids
    waiting = svc.dispatcher.waiting(job)
    return StatusReply(
        job_id=job.id, status=job.status.value,
        node_id=node_ids.get(job.node) if job.node else None,
        created_at=results.iso(job.created_at), started_at=results.iso(job.started_at),
        completed_at=results.iso(job.completed_at), reason=job.reason, detail=job.detail,
        node=job.node,
        attempt=job.attempt, gpus=list(job.gpus), gpu_count=job.gpu_count,
        **where_it_waits(waiting), time_limit=job.time_limit,
        competition_id=job.competition_id, exit_code=job.exit_code,
    )


def where_it_waits(waiting: scheduler.Waiting | None) -> dict[str, Any]:
    """queue_position, estimated_start, pending_reason: as /api/status and the board
    show them (None for a job that does not wait)."""
    return {
        "queue_position": waiting.position if waiting else None,
        "estimated_start": results.iso(waiting.estimated_start) if waiting else None,
        "pending_reason": waiting.reason if waiting else None,
    }


@get("/api/results/{job_id:path}", operation_class=ApiOperation, security=SECURITY,
     responses=error_responses(400, 403, 404, *AUTHED))
async def result(
    request: Request[Any, Any, Any], job_id: str, user_id: str | None = None
) -> SubmitReply:
    svc = service_of(request)
    return _result(request, svc.job_of(path_id(job_id), user_of(request, user_id)))


@get("/api/jobs", operation_class=JobsOperation, security=SECURITY,
     responses=error_responses(400, 403, *AUTHED))
async def jobs(
    request: Request[Any, Any, Any],
    user_id: str | None = None,
    # Checked by the handler (its own messages); declared for the schema only.
    limit: Annotated[int, Parameter(schema_extra={"minimum": 1, "maximum": MAX_PAGE})] = 100,
    cursor: Annotated[str | None, Parameter(schema_extra={"pattern": r"^[0-9]{1,18}$"})] = None,
) -> Response[list[JobItem]]:
    """The token's user's jobs, newest first; X-Next-Cursor leads to the next page."""
    svc = service_of(request)
    user = user_of(request, user_id)
    if not 1 <= limit <= MAX_PAGE:
        raise errors.BadRequest(f"limit must be between 1 and {MAX_PAGE}")
    before = None
    if cursor is not None:
        if not (cursor.isascii() and cursor.isdecimal()) or len(cursor) > 18:
            raise errors.BadRequest("Invalid cursor: pass the X-Next-Cursor of a previous page")
        before = int(cursor)
    page = svc.store.list_for_user(user, limit + 1, before)
    headers = {}
    if len(page) > limit:
        page = page[:limit]
        headers["X-Next-Cursor"] = str(page[-1].seq)
    body = [
        JobItem(job_id=j.job_id, status=j.status, competition_id=j.competition_id,
                created_at=results.iso(j.created_at))
        for j in page
    ]
    return Response(body, headers=headers)


@post("/api/cancel/{job_id:path}", status_code=200, operation_class=ApiOperation,
      security=SECURITY, responses=error_responses(400, 403, 404, 409, *AUTHED))
async def cancel(
    request: Request[Any, Any, Any], job_id: str, user_id: str | None = None
) -> CancelReply:
    svc = service_of(request)
    job = await svc.cancel(svc.job_of(path_id(job_id), user_of(request, user_id)))
    return CancelReply(job_id=job.id, status=job.status.value, reason=job.reason)


@get("/api/logs/{job_id:path}", operation_class=ApiOperation, security=SECURITY,
     responses=error_responses(400, 403, 404, *AUTHED), media_type="text/event-stream")
async def job_logs(
    request: Request[Any, Any, Any], job_id: str, user_id: str | None = None,
    follow: bool = False,
) -> Stream:
    """The job's output as server-sent events: `output` {stream, offset, size, text} for what it
    has printed, `restart` {attempt} when it runs again, `end` {status, exit_code, reason}
    when it has ended. With follow=true the stream stays open until the job ends."""
    svc = service_of(request)
    job = svc.job_of(path_id(job_id), user_of(request, user_id))
    return logs.response(svc, job, follow)


@get("/api/health")
async def health(request: Request[Any, Any, Any]) -> HealthReply:
    """No token needed: the controller is up, and which agents it reaches."""
    links = service_of(request).dispatcher.links
    return HealthReply(
        status="ok",
        agents={
            name: AgentHealth(
                connected=link.connected,
                runtime=link.hello.runtime if link.hello else None,
                error=link.last_error,
            )
            for name, link in links.items()
        },
    )


ROUTES = [submit, status, result, jobs, cancel, job_logs, health]


def error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Every error, in the guide's shape: {"detail": "..."}."""
    headers: dict[str, str] = {}
    if database.storage_failure(exc):
        # The write was rolled back (database.write); reads go on working meanwhile.
        log.error("%s %s -> 503, storage failure: %s", request.method, request.url.path, exc)
        exc = errors.Unavailable(errors.STORAGE_UNAVAILABLE, headers={"Retry-After": "30"})
    if isinstance(exc, errors.ControllerError):
        code, detail, headers = exc.status_code, exc.detail, exc.headers
        log.info("%s %s -> %d %s", request.method, request.url.path, code, detail)
    elif isinstance(exc, ValidationException):
        code, detail = 400, _validation_detail(exc)
    elif isinstance(exc, HTTPException):
        code, detail = exc.status_code, exc.detail
        if code == 413:
            limit = service_of(request).settings.max_upload
            detail = f"Request body too large: at most {limit} bytes"
        headers = dict(exc.headers or {})
    else:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        code, detail = 500, "Internal server error"
    return Response({"detail": detail}, status_code=code, headers=headers)


def _validation_detail(exc: ValidationException) -> str:
    problems = [
        f"{e.get('key', '?')}: {e.get('message', 'invalid')}"
        for e in (exc.extra if isinstance(exc.extra, list) else [])
        if isinstance(e, dict)
    ]
    return "Invalid request" + (f" ({'; '.join(problems)})" if problems else "")
