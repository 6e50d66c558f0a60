"""A small typed client of the gpujobq HTTP API: the user guide's routes and /api/logs.

Answers are the server's JSON objects, checked against the TypedDicts below and returned
whole (fields a newer server adds are kept). Every failure is a ``ClientError``: an
``ApiError`` when the server refused (with its ``detail`` and any ``Retry-After``),
``Unreachable`` when it could not be talked to, ``BadAnswer`` when it answered something
that is not this API.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any, NamedTuple, NotRequired, TypedDict

import httpx
import msgspec
from gpujobq.client import sse

TIMEOUT = 30.0  # seconds to connect, and for an answer (a cancel waits for the agent)
STREAM_READ_TIMEOUT = 60.0  # a live stream sends a keepalive every 15 s; 60 s quiet is dead
MAX_PAGE = 500  # the server's largest page of /api/jobs


class SubmitReply(TypedDict):
    """POST /api/submit and GET /api/results."""

    job_id: str
    status: str
    stdout: str
    stderr: str
    exit_code: int | None


class StatusReply(TypedDict):
    job_id: str
    status: str
    node_id: int | None
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    reason: NotRequired[str | None]
    detail: NotRequired[str | None]
    node: NotRequired[str | None]
    attempt: NotRequired[int]
    gpus: NotRequired[list[int]]
    queue_position: NotRequired[int | None]
    estimated_start: NotRequired[str | None]
    pending_reason: NotRequired[str | None]
    time_limit: NotRequired[float]
    competition_id: NotRequired[str]
    exit_code: NotRequired[int | None]


class ArtifactItem(TypedDict):
    name: str  # a "/"-separated path below the job's output folder
    size: int


class ArtifactsReply(TypedDict):
    """GET /api/artifacts/{job_id}: the files the job left in its output folder."""

    job_id: str
    status: str
    final: bool  # the job has ended: the list will not change
    files: list[ArtifactItem]


class JobItem(TypedDict):
    job_id: str
    status: str
    competition_id: str
    created_at: str | None


class CancelReply(TypedDict):
    job_id: str
    status: str
    reason: NotRequired[str | None]


class Page(NamedTuple):
    items: list[JobItem]
    next_cursor: str | None  # pass it as ``cursor`` for the next (older) page


class ClientError(Exception):
    """Anything that kept a call from getting its answer; ``str()`` says what."""


class ApiError(ClientError):
    """The server refused: an HTTP error status and the ``detail`` of its body."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class Unreachable(ClientError):
    """No answer: refused, timed out, or the connection broke."""


class BadAnswer(ClientError):
    """An answer that is not the API's (a proxy's page, a different service)."""


class Client:
    """``Client("http://127.0.0.1:8001", token)``; use it as a context manager or close()."""

    def __init__(self, server: str, token: str, *, timeout: float = TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.server, timeout=timeout, transport=transport,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "gpujobq-cli"},
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- the routes ----------------------------------------------------------------

    def submit(self, code: bytes, config: bytes, *, wait: bool = False) -> SubmitReply:
        """Queue solution.py with its config.yaml. ``wait``: answer once the job has ended
        (the server gives up after its wait cap and answers with the job so far)."""
        files = {"code": ("solution.py", code, "text/x-python"),
                 "config_file": ("config.yaml", config, "application/x-yaml")}
        timeout = httpx.Timeout(self.timeout, read=None) if wait else self.timeout
        answer = self._call("POST", "/api/submit", params={"wait": _flag(wait)}, files=files,
                            timeout=timeout)
        reply: SubmitReply = _typed(answer, SubmitReply)
        return reply

    def status(self, job_id: str) -> StatusReply:
        reply: StatusReply = _typed(self._call("GET", _job_path("status", job_id)), StatusReply)
        return reply

    def results(self, job_id: str) -> SubmitReply:
        """stdout, stderr and exit code; for a running job, what it has printed so far."""
        reply: SubmitReply = _typed(self._call("GET", _job_path("results", job_id)), SubmitReply)
        return reply

    def jobs(self, limit: int = 100, cursor: str | None = None) -> Page:
        """One page of the token's user's jobs, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        answer = self._call("GET", "/api/jobs", params=params)
        items: list[JobItem] = _typed(answer, list[JobItem])
        return Page(items, answer.headers.get("x-next-cursor"))

    def iter_jobs(self, limit: int | None = None, page: int = MAX_PAGE) -> Iterator[JobItem]:
        """The user's jobs, newest first, ``page`` at a time (at most ``limit``)."""
        cursor, left = None, limit
        while left is None or left > 0:
            got = self.jobs(page if left is None else min(left, page), cursor)
            yield from got.items
            if left is not None:
                left -= len(got.items)
            if got.next_cursor is None or not got.items:
                return
            cursor = got.next_cursor

    def cancel(self, job_id: str) -> CancelReply:
        reply: CancelReply = _typed(self._call("POST", _job_path("cancel", job_id)), CancelReply)
        return reply

    def artifacts(self, job_id: str) -> ArtifactsReply:
        reply: ArtifactsReply = _typed(self._call("GET", _job_path("artifacts", job_id)),
                                       ArtifactsReply)
        return reply

    def artifact(self, job_id: str, name: str) -> bytes:
        """One file of the job's output folder (``name`` as ``artifacts`` lists it)."""
        path = f"{_job_path('artifacts', job_id)}/{urllib.parse.quote(name, safe='/')}"
        return self._call("GET", path).content

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[sse.Event]:
        """The job's output as events (``output``, ``restart``, ``end``). ``follow``: until
        the job ends. Close the iterator (or leave the loop) to hang up."""
        timeout = httpx.Timeout(self.timeout, read=STREAM_READ_TIMEOUT)
        request = self._http.build_request(
            "GET", _job_path("logs", job_id), params={"follow": _flag(follow)},
            timeout=timeout)
        try:
            response = self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(self.server, exc) from exc
        try:
            if response.is_error:
                response.read()
                _raise_for(response)
            lines, parser = sse.Lines(), sse.Parser()
            for chunk in response.iter_bytes():
                for line in lines.feed(chunk):
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.HTTPError as exc:
            raise _unreachable(self.server, exc) from exc
        finally:
            response.close()

    # ---- plumbing --------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.server, exc) from exc
        if response.is_error:
            _raise_for(response)
        return response


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _job_path(route: str, job_id: str) -> str:
    return f"/api/{route}/{urllib.parse.quote(job_id, safe='')}"


def _typed(response: httpx.Response, kind: Any) -> Any:
    """The answer's JSON, whole, once it is known to have the fields ``kind`` needs."""
    try:
        data = msgspec.json.decode(response.content)
        msgspec.convert(data, kind, strict=True)
    except msgspec.MsgspecError as exc:
        raise BadAnswer(f"unexpected answer from {response.request.url}: {exc}") from exc
    return data


def _raise_for(response: httpx.Response) -> None:
    try:
        body = response.json()
        detail = body["detail"] if isinstance(body, dict) else None
    except ValueError:
        detail = None
    if not isinstance(detail, str):
        detail = f"HTTP {response.status_code} {response.reason_phrase}".strip()
        if response.status_code < 500:
            raise BadAnswer(f"{detail} from {response.request.url} (is this a gpujobq "
                            "server?)")
    raise ApiError(response.status_code, detail, _retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _unreachable(server: str, exc: httpx.HTTPError) -> ClientError:
    if isinstance(exc, httpx.TimeoutException):
        return Unreachable(f"no answer from {server} in time ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return Unreachable(f"cannot reach {server}: {exc} (is the server running?)")
    if isinstance(exc, httpx.TransportError):
        return Unreachable(f"lost the connection to {server}: {exc or type(exc).__name__}")
    return ClientError(f"{server}: {exc}")
