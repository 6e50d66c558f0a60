"""gpujobq: submit a job and watch it run; list, inspect and cancel your jobs.

The server and your token come from GPUJOBQ_SERVER and GPUJOBQ_TOKEN, or from
~/.config/gpujobq/config.yaml (server: ..., token: ...); never from the command line.

exit status of `submit` and `logs -f`: the job's own exit code; 124 time limit, 137 out
of memory, 143 cancelled, 125 any other failure of the job without an exit code of its
own; 130 Ctrl-C (the job goes on); 2 gpujobq could not do what was asked (config, files,
server refused or unreachable). Every other command: 0, or 2 on error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import msgspec
from gpujobq.client import api, config, display, follower, watch
from gpujobq.client.console import Console

FAILED = 2  # gpujobq itself could not do what was asked
INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
DETAILS_AT_ONCE = 8  # /api/status calls in flight for one `jobs` table


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    con = Console()
    settings = None
    try:
        settings = config.load(os.environ, args.config, warn=con.note)
        with api.Client(settings.server, settings.token) as client:
            code: int = args.run(client, args, con)
            return code
    except config.ConfigError as exc:
        con.note(str(exc))
    except api.ClientError as exc:
        con.note(_describe(exc, settings))
    except msgspec.MsgspecError as exc:  # an event of the log stream that is not the API's
        con.note(f"unexpected answer from the server: {exc}")
    except KeyboardInterrupt:
        con.clear()
        return INTERRUPTED
    except BrokenPipeError:  # `gpujobq logs ID | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILED
    return FAILED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpujobq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=pathlib.Path, metavar="PATH",
                   help="config file with server: and token: (default $GPUJOBQ_CONFIG, "
                        "else ~/.config/gpujobq/config.yaml)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print machine-readable JSON (only) to stdout")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    s = sub.add_parser("submit", parents=[common], help="submit solution.py with its "
                       "config.yaml, show its place in the queue, then its output live")
    s.add_argument("solution", type=pathlib.Path, metavar="SOLUTION.py")
    s.add_argument("config_file", type=pathlib.Path, metavar="CONFIG.yaml")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.set_defaults(run=_submit)

    st = sub.add_parser("status", parents=[common], help="jobs' state, node, time, reason")
    st.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    st.set_defaults(run=_status)

    r = sub.add_parser("results", parents=[common],
                       help="a job's stdout and stderr (so far, while it runs)")
    r.add_argument("job_id", metavar="JOB_ID")
    r.set_defaults(run=_results)

    j = sub.add_parser("jobs", parents=[common], help="your jobs, newest first")
    j.add_argument("--limit", type=_positive, default=20, metavar="N",
                   help="show the newest N (default 20)")
    j.add_argument("--all", action="store_true", help="show every job")
    j.set_defaults(run=_jobs)

    c = sub.add_parser("cancel", parents=[common], help="cancel jobs")
    c.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    c.set_defaults(run=_cancel)

    a = sub.add_parser("artifacts", parents=[common],
                       help="files a job left in its output folder: list, or -o DIR to fetch")
    a.add_argument("job_id", metavar="JOB_ID")
    a.add_argument("names", nargs="*", metavar="NAME", help="only these files")
    a.add_argument("-o", "--output", type=pathlib.Path, metavar="DIR",
                   help="download them into DIR (made if missing), keeping their folders")
    a.set_defaults(run=_artifacts)

    lg = sub.add_parser("logs", parents=[common], help="a job's output (-f: until it ends)")
    lg.add_argument("job_id", metavar="JOB_ID")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="keep printing until the job ends; exit with its exit status")
    lg.set_defaults(run=_logs)
    return p


def _positive(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


# ---- submit --------------------------------------------------------------------------


def _submit(client: api.Client, args: argparse.Namespace, con: Console) -> int:
    code, config_yaml = _read(args.solution), _read(args.config_file)
    job = client.submit(code, config_yaml, wait=False)
    job_id = job["job_id"]
    if args.no_wait:
        con.print(_json(job) if args.json else job_id)
        return 0
    con.note(f"job {job_id} submitted")
    try:
        state = watch.wait_to_start(client, job_id, con)
        end = watch.follow(client, job_id, con, state.get("attempt"), quiet=args.json)
    except KeyboardInterrupt:
        con.note(f"detached; job {job_id} goes on.\n"
                 f"  follow it: gpujobq logs -f {job_id}\n"
                 f"  cancel it: gpujobq cancel {job_id}")
        return INTERRUPTED
    return _finish(client, job_id, end, con, args.json)


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise api.ClientError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _finish(client: api.Client, job_id: str, end: follower.End, con: Console,
            as_json: bool) -> int:
    if as_json:
        con.print(_json(client.results(job_id)))
    if end.status != "completed":
        con.note(display.ending(job_id, end.status, end.exit_code, end.reason))
    return follower.exit_status(end)


# ---- the other commands --------------------------------------------------------------


def _status(client: api.Client, args: argparse.Namespace, con: Console) -> int:
    found, failed = _each(args.job_ids, client.status, con)
    if args.json:
        for state in found:
            con.print(_json(state))
    elif found:
        con.print(display.jobs_table(found, dt.datetime.now(dt.UTC)))
    return FAILED if failed else 0


def _results(client: api.Client, args: argparse.Namespace, con: Console) -> int:
    answer = client.results(args.job_id)
    if args.json:
        con.print(_json(answer))
    else:
        con.write("stdout", answer["stdout"].encode())
        con.write("stderr", answer["stderr"].encode())
    return 0


def _jobs(client: api.Client, args: argparse.Namespace, con: Console) -> int:
    limit = None if args.all else args.limit
    items = list(client.iter_jobs(None if limit is None else limit + 1))
    more = limit is not None and len(items) > limit
    rows = _with_details(client, items[:limit])
    if args.json:
        con.print(_json(rows))
    else:
        con.print(display.jobs_table(rows, dt.datetime.now(dt.UTC)))
        if more:
            con.note(f"the newest {limit} jobs shown; --all for every one")
    return 0


def _with_details(client: api.Client, items: list[api.JobItem]) -> list[dict[str, Any]]:
    """Each listed job with its /api/status fields (node, times, reason), a few at once.
    A job gone meanwhile keeps what the list said."""

    def detail(item: api.JobItem) -> dict[str, Any]:
        try:
            return {**item, **client.status(item["job_id"])}
        except api.ApiError as exc:
            if exc.status != 404:
                raise
            return dict(item)

    with concurrent.futures.ThreadPoolExecutor(DETAILS_AT_ONCE) as pool:
        return list(pool.map(detail, items))


def _cancel(client: api.Client, args: argparse.Namespace, con: Console) -> int:
    done, failed = _each(args.job_ids, client.cancel, con)
    for answer in done:
        con.print(_json(answer) if args.json else f"{answer['job_id']} {answer['status']}")
    return FAILED if failed else 0


def _artifacts(client: api.Client, args: argparse.Namespace, con: Console) -> int:
    listed = client.artifacts(args.job_id)
    files = listed["files"]
    if args.names:
        known = {f["name"] for f in files}
        missing = [n for n in args.names if n not in known]
        if missing:
            con.note(f"job {args.job_id} has no artifact named {', '.join(missing)}")
            return FAILED
        files = [f for f in files if f["name"] in args.names]
    if not listed["final"]:
        con.note(f"job {args.job_id} is {listed['status']}: its files are kept when it ends")
    if args.output is None:
        con.print(_json(listed) if args.json else display.artifacts_table(files))
        return 0
    saved = []
    for item in files:
        target = _inside(args.output, item["name"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.artifact(args.job_id, item["name"]))
        saved.append(str(target))
        if not args.json:
            con.print(str(target))
    if args.json:
        con.print(_json(saved))
    return 0


def _inside(folder: pathlib.Path, name: str) -> pathlib.Path:
    """Where a job-chosen name lands below ``folder``; never outside it."""
    parts = pathlib.PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise api.BadAnswer(f"refusing to write an artifact named {name!r}")
    return folder.joinpath(*parts)


def _logs(client: api.Client, args: argparse.Namespace, con: Console) -> int:
    if args.json:  # the events as they come; -f exits as without --json (no reconnect)
        end = None
        for event in client.logs(args.job_id, follow=args.follow):
            con.print(_json({"event": event.event, "data": event.json()}))
            if event.event == "end":
                end = msgspec.json.decode(event.data, type=follower.End)
        if not args.follow:
            return 0
        return follower.exit_status(end) if end is not None else FAILED
    if not args.follow:
        once = follower.Follower()
        for event in client.logs(args.job_id):
            for write in once.feed(event):
                con.write(write.stream, write.data)
        return 0
    # The attempt it is at (a 404 here, before any stream); Ctrl-C: main() exits 130.
    attempt = client.status(args.job_id).get("attempt")
    end = watch.follow(client, args.job_id, con, attempt)
    return _finish(client, args.job_id, end, con, as_json=False)


def _each(job_ids: list[str], call: Callable[[str], Any], con: Console
          ) -> tuple[list[Any], int]:
    """``call`` for each id; a refusal for one is reported and the others still go."""
    answers, failed = [], 0
    for job_id in job_ids:
        try:
            answers.append(call(job_id))
        except api.ApiError as exc:
            if exc.status not in (404, 409):  # not about this job: the same for every one
                raise
            con.note(f"{job_id}: {exc.detail}")
            failed += 1
    return answers, failed


# ---- helpers -------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _describe(exc: api.ClientError, settings: config.Settings | None) -> str:
    if not isinstance(exc, api.ApiError):
        return str(exc)
    text = f"{exc.detail} (HTTP {exc.status})"
    if exc.status == 401 and settings is not None:
        text += f"; the token is from {settings.token_from}"
    if exc.retry_after is not None and "retry in" not in exc.detail:  # (said it already)
        text += f"; try again in {exc.retry_after:g} s"
    return text


if __name__ == "__main__":
    sys.exit(main())
