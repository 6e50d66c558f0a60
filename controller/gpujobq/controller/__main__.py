"""gpujobq-controller: serve the API, and the admin commands (users, tokens, keys).

Every setting is a flag (--wait-cap 120) or an environment variable (GPUJOBQ_WAIT_CAP);
the defaults point into the project folder, so admin commands run there with no flags
use the same database as `make up`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import logging
import os
import pathlib
import sqlite3
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import msgspec
from gpujobq.controller import accounts, database, errors, fleetview, results
from gpujobq.controller.settings import Settings
from gpujobq.protocol import inventory, sshkeys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TurnLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, written once per turn of the event loop: the access log has a line per
    request, and the lines of one turn go out in one write() instead of one each.
    Outside a running loop (start, shutdown, another thread) lines go out at once."""

    def __init__(self, fd: int | None = None) -> None:
        super().__init__(open(sys.stderr.fileno() if fd is None else fd, "w",
                              buffering=1 << 16, closefd=False, encoding="utf-8",
                              errors="backslashreplace"))
        self._due = False

    def flush(self) -> None:
        if self._due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()
            return
        self._due = True
        loop.call_soon(self._write)

    def _write(self) -> None:
        self._due = False
        super().flush()

    def close(self) -> None:
        self._due = False
        super().flush()
        super().close()


# uvicorn's own loggers in the same format as ours, to stderr: each line has its time,
# and a plain formatter costs a third of uvicorn's access formatter (which copies every
# record to colour it), on every request.
UVICORN_LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": LOG_FORMAT}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                            "stream": "ext://sys.stderr"},
                 "per_turn": {"()": TurnLogHandler, "formatter": "plain"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.error": {"level": "INFO"},
        "uvicorn.access": {"handlers": ["per_turn"], "level": "INFO", "propagate": False},
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = _settings(args)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)  # it logs every channel at INFO
    accounts.redact_logs()
    try:
        return int(args.func(settings, args) or 0)
    except errors.ControllerError as exc:
        print(f"gpujobq-controller: {exc.detail}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    for field in msgspec.structs.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        kind = type(field.default)
        common.add_argument(flag, dest=field.name, type=kind, default=None,
                            help=f"default {field.default} (env GPUJOBQ_{field.name.upper()})")

    p = argparse.ArgumentParser(prog="gpujobq-controller", description=__doc__)
    sub = p.add_subparsers(required=True)
    sub.add_parser("serve", parents=[common], help="run the HTTP API").set_defaults(func=_serve)
    sub.add_parser("keygen", parents=[common], help="create the controller's SSH client key"
                   ).set_defaults(func=_keygen)

    user = sub.add_parser("user", help="users").add_subparsers(required=True)
    add = user.add_parser("add", parents=[common], help="create a user and print a new token")
    add.add_argument("name")
    add.add_argument("--days", type=_days, help="token lifetime (default --token-days)")
    add.add_argument("--admin", action="store_true",
                     help="may see and run the fleet (nodes, reload); makes an existing user one")
    add.set_defaults(func=_user_add)
    user.add_parser("list", parents=[common], help="list users (admin, disabled, tokens)"
                    ).set_defaults(func=_user_list)
    dis = user.add_parser("disable", parents=[common],
                          help="refuse all of a user's tokens from now on (jobs are left alone)")
    dis.add_argument("name")
    dis.set_defaults(func=_user_disable)
    en = user.add_parser("enable", parents=[common], help="accept a disabled user's tokens again")
    en.add_argument("name")
    en.set_defaults(func=_user_enable)

    token = sub.add_parser("token", help="tokens").add_subparsers(required=True)
    issue = token.add_parser("issue", parents=[common], help="print a new token for a user")
    issue.add_argument("name")
    issue.add_argument("--days", type=_days, help="token lifetime (default --token-days)")
    issue.set_defaults(func=_token_issue)
    ls = token.add_parser("list", parents=[common], help="list tokens (never their values)")
    ls.add_argument("name", nargs="?")
    ls.set_defaults(func=_token_list)
    rv = token.add_parser("revoke", parents=[common], help="revoke a token by its id")
    rv.add_argument("token_id")
    rv.set_defaults(func=_token_revoke)

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", help="the running controller (default http://HOST:PORT of "
                                      "the settings)")
    remote.add_argument("--token", default=os.environ.get("GPUJOBQ_TOKEN"),
                        help="an admin's token (env GPUJOBQ_TOKEN); left out, a one-minute "
                             "token of the local admin user is made in the database")
    nodes = sub.add_parser("nodes", parents=[common, remote],
                           help="list hosts, their state, GPUs and the job on each GPU")
    nodes.add_argument("--json", action="store_true", help="print the API's JSON")
    nodes.set_defaults(func=_nodes)
    rl = sub.add_parser("reload", parents=[common, remote],
                        help="reload inventory.yaml now (same as SIGHUP) and say what changed")
    rl.set_defaults(func=_reload)
    job = sub.add_parser("job", help="any user's jobs (admin)").add_subparsers(required=True)
    jc = job.add_parser("cancel", parents=[common, remote], help="cancel jobs of any user")
    jc.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    jc.set_defaults(func=_job_action, action="cancel")
    jr = job.add_parser("requeue", parents=[common, remote],
                        help="put jobs back in the queue: a running one is stopped first "
                             "(no retry counted), a finished one runs again")
    jr.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    jr.set_defaults(func=_job_action, action="requeue")

    bk = sub.add_parser("backup", parents=[common],
                        help="write a consistent copy of the database while it is in use")
    bk.add_argument("dest", type=pathlib.Path, help="the copy (written to DEST.tmp, renamed)")
    bk.add_argument("--force", action="store_true", help="replace an existing DEST")
    bk.set_defaults(func=_backup)
    pr = sub.add_parser("prune", parents=[common],
                        help="delete result records (*.jsonl in --results-dir) older than N days")
    pr.add_argument("--results-days", type=_days, required=True, metavar="N",
                    help="remove records last written more than N days ago")
    pr.set_defaults(func=_prune)
    return p


def _settings(args: argparse.Namespace) -> Settings:
    values = {}
    for field in msgspec.structs.fields(Settings):
        value = getattr(args, field.name, None)
        if value is None and f"GPUJOBQ_{field.name.upper()}" in os.environ:
            value = os.environ[f"GPUJOBQ_{field.name.upper()}"]
        if value is not None:
            values[field.name] = value
    return msgspec.convert(values, Settings, strict=False)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn
    from gpujobq.controller import app

    try:
        application = app.create_app(settings)
        # Migrate, or refuse a newer schema, before serving: a clear error and exit 2.
        database.open_database(settings.database).close()
    except (inventory.InventoryError, errors.SchemaError, sqlite3.Error, OSError,
            ValueError) as exc:
        print(f"gpujobq-controller: cannot start: {exc}", file=sys.stderr)
        return 2

    class Server(uvicorn.Server):
        """On SIGTERM/SIGINT, before uvicorn drains connections: refuse new jobs and let
        waiting submits answer with their job id (202) instead of being cut off."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            svc = getattr(application.state, "service", None)
            loop = getattr(application.state, "loop", None)
            if svc is not None and loop is not None:
                loop.call_soon_threadsafe(svc.stop)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(application, host=settings.host, port=settings.port,
                            timeout_graceful_shutdown=5, log_level="info",
                            log_config=UVICORN_LOGGING)
    accounts.redact_logs("uvicorn", "uvicorn.error", "uvicorn.access")  # their own handlers
    # LOG_FORMAT shows no caller, thread or process: not looking them up for each record
    # (the access log writes one per request) is the logging module's documented saving.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # What exists by now (modules, the app and its routes) lives as long as the process:
    # kept out of the collector's sight, it is not walked again by every full collection
    # (on B8, the collector's time fell from ~0.55 to ~0.29 s over the run).
    gc.freeze()
    Server(config).run()
    return 0


def _keygen(settings: Settings, args: argparse.Namespace) -> int:
    sshkeys.ensure_private_key(settings.client_key, comment="gpujobq-controller")
    print(pathlib.Path(f"{settings.client_key}.pub").read_text().strip())
    return 0


def _user_add(settings: Settings, args: argparse.Namespace) -> int:
    db = database.open_database(settings.database)
    now = time.time()
    created = accounts.add_user(db, args.name, now, admin=args.admin)
    token = accounts.issue_token(db, args.name, now, _lifetime(settings, args))
    print(f"# user {args.name} {'created' if created else 'exists'}; new token:", file=sys.stderr)
    print(token)
    return 0


def _user_list(settings: Settings, args: argparse.Namespace) -> int:
    db = database.open_database(settings.database)
    print(f"{'USER':<24}{'ROLE':<8}{'STATE':<10}{'TOKENS':<8}CREATED")
    for u in accounts.list_users(db, time.time()):
        state = "disabled" if u.disabled_at else "active"
        role = "admin" if u.admin else "user"
        print(f"{u.id:<24}{role:<8}{state:<10}{u.active_tokens:<8}{_when(u.created_at)}")
    return 0


def _user_disable(settings: Settings, args: argparse.Namespace) -> int:
    db = database.open_database(settings.database)
    accounts.set_disabled(db, args.name, time.time())
    active = [r[0] for r in db.execute(
        "SELECT id FROM jobs WHERE user_id = ? AND status IN ('pending', 'running')"
        " ORDER BY seq", [args.name])]
    print(f"disabled {args.name}: its tokens are refused from now on")
    if active:
        print(f"its {len(active)} active job(s) go on; to stop them: gpujobq-controller job "
              f"cancel {' '.join(active)}")
    return 0


def _user_enable(settings: Settings, args: argparse.Namespace) -> int:
    db = database.open_database(settings.database)
    accounts.set_disabled(db, args.name, None)
    print(f"enabled {args.name}")
    return 0


def _token_issue(settings: Settings, args: argparse.Namespace) -> int:
    db = database.open_database(settings.database)
    print(accounts.issue_token(db, args.name, time.time(), _lifetime(settings, args)))
    return 0


def _lifetime(settings: Settings, args: argparse.Namespace) -> float:
    return float(args.days) if args.days is not None else settings.token_days


def _token_list(settings: Settings, args: argparse.Namespace) -> int:
    db = database.open_database(settings.database)
    now = time.time()
    print(f"{'ID':<14}{'USER':<20}{'CREATED':<22}{'EXPIRES':<22}STATE")
    for t in accounts.list_tokens(db, args.name):
        state = "revoked" if t.revoked_at else ("expired" if t.expires_at <= now else "active")
        print(f"{t.id:<14}{t.user_id:<20}{_when(t.created_at):<22}{_when(t.expires_at):<22}{state}")
    return 0


def _token_revoke(settings: Settings, args: argparse.Namespace) -> int:
    db = database.open_database(settings.database)
    if not accounts.revoke_token(db, args.token_id, time.time()):
        raise errors.NotFound(f"no active token with id {args.token_id!r}")
    print(f"revoked {args.token_id}")
    return 0


LOCAL_ADMIN = "gpujobq-admin"  # the user admin commands on the controller host act as


def _call(settings: Settings, args: argparse.Namespace, method: str, path: str) -> Any:
    """One admin API call to the running controller; the decoded JSON answer."""
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/") + path
    token, minted = args.token, None
    if not token:
        # Only for a controller on this machine: a minted admin token never travels.
        host = urllib.parse.urlsplit(url).hostname or ""
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise errors.ControllerError(
                f"{url} is not on this machine: pass an admin's --token (or GPUJOBQ_TOKEN)")
        db = database.open_database(settings.database)
        now = time.time()
        if not accounts.add_user(db, LOCAL_ADMIN, now) and not accounts.is_admin(db, LOCAL_ADMIN):
            raise errors.ControllerError(
                f"user {LOCAL_ADMIN} exists and is not an admin: pass an admin's --token")
        accounts.add_user(db, LOCAL_ADMIN, now, admin=True)
        token = accounts.issue_token(db, LOCAL_ADMIN, now, days=60 / 86400)
        minted = accounts.token_id(db, token)
    request = urllib.request.Request(url, method=method,
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        # A cancel of a running job waits for the agent: up to grace + 5 s.
        with urllib.request.urlopen(request, timeout=settings.grace + 30) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read() or b"{}").get("detail", exc.reason)
        except (ValueError, AttributeError):
            detail = exc.reason
        raise errors.ControllerError(f"{url}: {exc.code} {detail}") from exc
    except urllib.error.URLError as exc:
        raise errors.ControllerError(f"{url}: is the controller running? {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # a timeout, a reset, an answer that is not JSON
        raise errors.ControllerError(f"{url}: {exc or type(exc).__name__}") from exc
    finally:
        if minted:
            accounts.revoke_token(db, minted, time.time())


def _nodes(settings: Settings, args: argparse.Namespace) -> int:
    fleet = _call(settings, args, "GET", "/api/admin/nodes")
    print(json.dumps(fleet, indent=2) if args.json else fleetview.table(fleet))
    return 0


def _reload(settings: Settings, args: argparse.Namespace) -> int:
    answer = _call(settings, args, "POST", "/api/admin/reload")
    print("inventory reloaded: " + ("; ".join(answer["changes"]) or "no changes"))
    return 0


def _job_action(settings: Settings, args: argparse.Namespace) -> int:
    """Each job in turn; all are tried, and the exit status says whether any failed."""
    failed = 0
    for job_id in args.job_ids:
        try:
            answer = _call(settings, args, "POST",
                           f"/api/admin/{args.action}/{urllib.parse.quote(job_id, safe='')}")
        except errors.ControllerError as exc:
            print(f"{job_id}: {exc.detail}", file=sys.stderr)
            failed += 1
            continue
        print(f"{answer['job_id']}: {answer['status']}")
    return 1 if failed else 0


def _backup(settings: Settings, args: argparse.Namespace) -> int:
    size = database.backup(settings.database, args.dest, force=args.force)
    print(f"{args.dest} {size} bytes (integrity_check ok)")
    return 0


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not days > 0 or days == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of days")
    return days


def _prune(settings: Settings, args: argparse.Namespace) -> int:
    folder = settings.results_dir
    try:
        removed = results.prune(folder, args.results_days, time.time())
    except OSError as exc:
        raise errors.ControllerError(f"cannot prune {folder}: {exc}") from exc
    for name in removed:
        print(folder / name)
    print(f"removed {len(removed)} result record(s) older than {args.results_days:g} days "
          f"from {folder}", file=sys.stderr)
    return 0


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


if __name__ == "__main__":
    sys.exit(main())
