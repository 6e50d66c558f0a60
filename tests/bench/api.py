"""B4-B7: the controller's HTTP API under load, against bare Litestar routes."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import time

from tests.bench import load, system
from tests.bench.stats import Figure, median, ms, p99

# A host no agent answers: submitted jobs stay queued (pending), as on a full fleet.
DOWN_HOST = """hosts:
  - name: busy
    address: 127.0.0.1
    port: 9
    host_key_file: {key}
    gpus:
""" + "".join(f"      - {{index: {i}, virtual: true}}\n" for i in range(8))

# Rate limits raised so they are not what is measured (stated in the table).
OPEN_LIMITS = {"submit_limit": 1_000_000, "active_limit": 1_000_000}
CODE = b"print('hello')\n"


def _controller(root: pathlib.Path, **settings: object) -> system.Controller:
    c = system.Controller(root, **{**OPEN_LIMITS, **settings})
    # Any key will do: nothing answers there.
    c.write_inventory(DOWN_HOST.replace("{key}", str(c.public_key)))
    return c


def _submits(users: list[tuple[str, str]]) -> list[bytes]:
    return [load.submit(name, token, CODE) for name, token in users]


def _cycle(reqs: list[bytes]):
    i = 0

    def nxt() -> bytes:
        nonlocal i
        i += 1
        return reqs[i % len(reqs)]

    return nxt


def b4_b5_b7(root: pathlib.Path, trials: int, seconds: float, concurrency: int = 8
             ) -> list[Figure]:
    """Status GETs (B4), submits (B5) and memory per queued job (B7), on one controller."""
    ctl = _controller(root / "ctl")
    bare = system.Bare(root / "bare")
    users = ctl.users(200)
    ctl.start()
    with system.started(ctl, bare):
        port = ctl.port
        before = system.rss(ctl.proc.pid)  # type: ignore[union-attr]
        # B5: submits accepted per second, against a bare multipart route.
        ours5, bare5, queued = [], [], 0
        bare_req = load.multipart("/bare/submit", {
            "code": ("solution.py", CODE),
            "config_file": ("config.yaml", b"competition_id: bench\nuser_id: u\n")})
        cpu5 = {"ours": 0.0, "bare": 0.0}
        for _ in range(trials):
            used = system.family_cpu(ctl.proc.pid)  # type: ignore[union-attr]
            run = asyncio.run(load.hammer("127.0.0.1", port, _cycle(_submits(users)),
                                          concurrency=concurrency, duration=seconds))
            cpu5["ours"] += (system.family_cpu(ctl.proc.pid) - used) / len(run.replies)  # type: ignore[union-attr]
            assert set(run.statuses()) == {202}, run.statuses()
            queued += len(run.replies)
            ours5.append(run.rate(202))
            used = system.family_cpu(bare.proc.pid)
            base = asyncio.run(load.hammer("127.0.0.1", bare.port, lambda: bare_req,
                                           concurrency=concurrency, duration=seconds))
            cpu5["bare"] += (system.family_cpu(bare.proc.pid) - used) / len(base.replies)
            bare5.append(base.rate(202))
        commit = _durable_commit(root / "commit.db")
        time.sleep(2)  # let the dispatcher's passes settle
        # B7: memory per queued job (everything queued: its host never answers).
        grown = system.rss(ctl.proc.pid) - before  # type: ignore[union-attr]
        per_job = grown / queued
        # B4: authenticated status GETs of queued jobs (position, estimate: the full reply).
        ids = _job_ids(ctl.db_path, users)
        gets = [load.get(f"/api/status/{job}?user_id={name}", token)
                for (name, token), job in zip(users, ids, strict=True)]
        ours4, bare4, lat4 = [], [], []
        for _ in range(trials):
            run = asyncio.run(load.hammer("127.0.0.1", port, _cycle(gets),
                                          concurrency=concurrency, duration=seconds))
            assert set(run.statuses()) == {200}, run.statuses()
            ours4.append(run.rate(200))
            lat4 += run.latencies(200)
            base = asyncio.run(load.hammer("127.0.0.1", bare.port, lambda: load.get("/bare"),
                                           concurrency=concurrency, duration=seconds))
            bare4.append(base.rate(200))
    r4, r5 = median(ours4) / median(bare4), median(ours5) / median(bare5)
    note = (f"{concurrency} keep-alive connections, {trials} trials x {seconds:g} s; "
            f"{len(users)} users; limits raised (submit_limit, active_limit 1,000,000)")
    return [
        Figure("B4", "authenticated status GETs/s, p99",
               f"{median(ours4):,.0f}/s, p99 {ms(p99(lat4))}", f"{median(bare4):,.0f}/s",
               f"{r4:.2f}x", ">= 0.5x; p99 <= 10 ms", r4 >= 0.5 and p99(lat4) <= 0.010,
               [note + f"; {queued:,} jobs queued"]),
        Figure("B5", "multipart submits accepted/s (wait=false)",
               f"{median(ours5):,.0f}/s", f"{median(bare5):,.0f}/s", f"{r5:.2f}x", ">= 0.5x",
               r5 >= 0.5, [note + "; every submit on disk before its answer (its group's "
                           "COMMIT, then the WAL fdatasynced by the controller's helper "
                           "process)",
                           f"server CPU per request: ours {cpu5['ours'] / trials * 1e3:.2f} ms "
                           f"(HTTP, token, form, config.yaml, limits, the job's row and "
                           f"event; the sync helper's CPU included), the bare route "
                           f"{cpu5['bare'] / trials * 1e3:.2f} ms (HTTP and form only); a "
                           f"durable COMMIT on this disk takes {commit * 1e3:.2f} ms (median "
                           f"of 200, one row each, synchronous=FULL): one sync is shared by "
                           f"the submits that arrive while the one before it runs"]),
        Figure("B7", "controller memory per queued job",
               f"{per_job:,.0f} B/job", f"{before / 2**20:.0f} MiB empty",
               f"{queued:,} jobs: +{grown / 2**20:.1f} MiB", "<= 1 KiB", per_job <= 1024,
               ["RSS growth of the controller over the B5 submits, all left queued"]),
    ]


def _durable_commit(path: pathlib.Path, n: int = 200) -> float:
    """Median seconds of a one-row COMMIT in WAL mode with synchronous=FULL (an fsync)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (x)")
        took = []
        for i in range(n):
            t0 = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", [i])
            db.execute("COMMIT")
            took.append(time.perf_counter() - t0)
        return median(took)
    finally:
        db.close()


def _job_ids(db_path: pathlib.Path, users: list[tuple[str, str]]) -> list[str]:
    db = sqlite3.connect(db_path)
    try:
        return [db.execute("SELECT id FROM jobs WHERE user_id = ? ORDER BY seq LIMIT 1",
                           [name]).fetchone()[0] for name, _ in users]
    finally:
        db.close()


def _fill(db_path: pathlib.Path, rows: int, users: int) -> None:
    """``rows`` finished jobs spread over ``users`` users, inserted in bulk."""
    db = sqlite3.connect(db_path)
    with db:
        db.execute(
            """WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?)
            INSERT INTO jobs (id, user_id, competition_id, project_id, expected_time,
                time_limit, status, reason, attempt, node, gpus, recorded, created_at,
                started_at, completed_at, exit_code, stdout, stderr, code, config)
            SELECT printf('fill-%08d', i), printf('f%05d', i % ?), 'bench', 'bench', 10, 20,
                'completed', 'exit_code', 1, 'busy', '[0]', 1, 1.7e9 + i, 1.7e9 + i,
                1.7e9 + i, 0, x'6f6b0a', x'', x'7072696e742829', x'' FROM n""",
            [rows, users])
    db.close()


PAGE = 100  # jobs per /api/jobs page read by B6


def b6(root: pathlib.Path, trials: int, requests: int, big: int, concurrency: int = 1
       ) -> Figure:
    """Status and jobs-list p99 with ``big`` job rows, against the same with 1k rows."""
    results: dict[int, list[float]] = {}
    for rows in (1_000, big):
        ctl = _controller(root / f"rows{rows}")
        # Every user has at least a full page (100 jobs), so that both runs answer the same
        # requests (a 100-job page and a status), and only the table's size differs.
        n = min(100, rows // PAGE)
        users = ctl.users(n, prefix="f")
        _fill(ctl.db_path, rows, n)
        ctl.start()
        with system.started(ctl):
            ids = _job_ids(ctl.db_path, users)
            reqs = []
            for (name, token), job in zip(users, ids, strict=True):
                reqs.append(load.get(f"/api/status/{job}?user_id={name}", token))
                reqs.append(load.get(f"/api/jobs?user_id={name}&limit={PAGE}", token))
            lat: list[float] = []
            for _ in range(trials):
                run = asyncio.run(load.hammer("127.0.0.1", ctl.port, _cycle(reqs),
                                              concurrency=concurrency, total=requests))
                assert set(run.statuses()) == {200}, run.statuses()
                lat += run.latencies(200)
            results[rows] = lat
    small, large = p99(results[1_000]), p99(results[big])
    ratio = large / small
    return Figure(
        "B6", f"status / jobs list with {big:,} job rows, p99",
        f"p99 {ms(large)} (median {ms(median(results[big]))})",
        f"1k rows: p99 {ms(small)}", f"{ratio:.2f}x", "<= 5 ms, <= 2x",
        large <= 0.005 and ratio <= 2,
        [f"{concurrency} connection (one request at a time: how long a request takes, not "
         f"how long it queues; B4 has p99 under load), {trials} x {requests:,} requests, "
         f"half status, half a {PAGE}-job page of /api/jobs; 100 users with {big // 100:,} "
         f"jobs each, against 1,000 rows over 10 users ({PAGE} each: full pages too)"])
