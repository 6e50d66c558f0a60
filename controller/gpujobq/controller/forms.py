"""What /api/submit reads from a request: a header or two, and the form's parts, each
without the general machinery that costs more than the submit's own work (docs/design.md,
"The controller's event loop")."""

from __future__ import annotations

from typing import Any

import multipart  # type: ignore[import-untyped]
from gpujobq.controller import errors
from litestar import Request
from litestar.datastructures import UploadFile


def header(request: Request[Any, Any, Any], name: bytes) -> str | None:
    """One request header (``name`` lowercase, as the server hands them over), read
    from the ASGI scope: ``request.headers`` builds a mapping of them all first, a few
    per cent of a submit or a status read, for the one or two a route looks at."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


MAX_PARTS = 16  # a submission has two; more is refused while parsing


async def read(request: Request[Any, Any, Any]) -> dict[str, list[bytes]]:
    """The submission's form: each field's values, as the bytes sent.

    multipart/form-data (what curl -F and the guide's Python example send) is parsed
    here from the body in one go: the body is capped (request_max_body_size) and already
    in memory, and Litestar's own form reading writes each part to a temporary file
    object, closed again, which cost a third of a submit's HTTP handling (B5). Any other
    body (a urlencoded form) is read by Litestar, to be refused by field name."""
    kind, options = multipart.parse_options_header(header(request, b"content-type") or "")
    if kind != "multipart/form-data" or not options.get("boundary"):
        form = await request.form()
        return {name: [await v.read() if isinstance(v, UploadFile) else str(v).encode()
                       for v in form.getall(name)] for name in form}
    body = await request.body()
    fields: dict[str, list[bytes]] = {}
    try:
        with multipart.PushMultipartParser(options["boundary"],
                                           max_segment_count=MAX_PARTS) as parser:
            name, chunks = "", []
            for event in parser.parse(body):
                if isinstance(event, multipart.MultipartSegment):
                    name, chunks = event.name, []
                elif event is not None:
                    chunks.append(event)
                else:
                    fields.setdefault(name, []).append(b"".join(chunks))
            if not parser.closed:
                list(parser.parse(b""))  # end of input: a truncated form raises
    except multipart.ParserLimitReached as exc:
        raise errors.BadRequest(f"A submission's form has at most {MAX_PARTS} parts") from exc
    except multipart.ParserError as exc:
        raise errors.BadRequest("Invalid multipart/form-data") from exc
    return fields


def part(form: dict[str, list[bytes]], name: str, limit: int, what: str) -> bytes:
    values = form.get(name, [])
    if not values:
        raise errors.BadRequest(f"Missing form field '{name}' (send it with -F '{name}=@FILE')")
    if len(values) > 1:
        raise errors.BadRequest(f"Form field '{name}' is sent {len(values)} times; send it once")
    data = values[0]
    if len(data) > limit:
        raise errors.TooLarge(f"{what} is too large: {len(data)} bytes, at most {limit}")
    return data
