"""The controller's exceptions; the HTTP edge maps each to a status in one table."""

from __future__ import annotations


class ControllerError(Exception):
    status_code = 500

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(ControllerError):
    status_code = 400


class Unauthorized(ControllerError):
    status_code = 401


class Forbidden(ControllerError):
    status_code = 403


class NotFound(ControllerError):
    status_code = 404


class Conflict(ControllerError):
    status_code = 409


class TooLarge(ControllerError):
    status_code = 413


class Unprocessable(ControllerError):
    status_code = 422


class RateLimited(ControllerError):
    status_code = 429


class TransitionError(ControllerError):
    """A guarded state change found the job in another state (or another attempt)."""

    status_code = 409


class Unavailable(ControllerError):
    """The server cannot do it now (its storage is full or not writable); retry later."""

    status_code = 503


class SchemaError(ControllerError):
    """The database's schema cannot be used by this version of gpujobq."""


STORAGE_UNAVAILABLE = (
    "Server storage is full or not writable; nothing was stored. Try again later."
)
