"""The baseline app: bare Litestar routes on uvicorn, configured as the controller is.

GET /bare answers a small JSON object; POST /bare/submit reads a multipart form's parts
and answers 202. No auth, no database: what the framework itself costs.
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn
from litestar import Litestar, Request, Response, get, post


@get("/bare")
async def bare() -> dict[str, Any]:
    return {"job_id": "00000000-0000-0000-0000-000000000000", "status": "completed",
            "node_id": 1, "created_at": "2026-01-01T00:00:00Z"}


@post("/bare/submit", status_code=202)
async def bare_submit(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    form = await request.form()
    sizes = {name: len(await value.read()) for name, value in form.items()}
    return Response({"job_id": "00000000-0000-0000-0000-000000000000", "status": "pending",
                     "sizes": sizes}, status_code=202)


def main() -> None:
    app = Litestar([bare, bare_submit])
    # As gpujobq.controller.__main__ configures uvicorn (same loop, parser, log level).
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")


if __name__ == "__main__":
    main()
