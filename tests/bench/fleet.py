"""B3, B8, B9: the full path through 100 instant agents (gpujobq-agent simulate)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator

from tests.bench import load, system
from tests.bench.api import OPEN_LIMITS
from tests.bench.stats import Figure, median, ms, p99

AGENTS, GPUS = 100, 8
USERS = 1_000
CODE = b"print('hello')\n"
TERMINAL = "('completed', 'failed', 'cancelled')"


@contextlib.contextmanager
def _fleet(root: pathlib.Path) -> Iterator[tuple[system.Controller, system.Simulated]]:
    ctl = system.Controller(root / "ctl", **OPEN_LIMITS)
    sim = system.Simulated(_scratch(root) / "agents", ctl.public_key, AGENTS, GPUS,
                           "--instant-stdout", "done {job_id}")
    ctl.write_inventory(sim.start())
    try:
        with system.started(sim, ctl):
            ctl.start(agents=AGENTS)
            yield ctl, sim
    finally:
        shutil.rmtree(sim.root, ignore_errors=True)


def _scratch(root: pathlib.Path) -> pathlib.Path:
    """Where the simulated agents keep their spools: in memory where the machine has a
    tmpfs. On a real fleet each agent writes its own host's disk; here 100 of them would
    share this one, and the controller's disk (its database, its records) is what B3
    and B8 measure."""
    shm = pathlib.Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return pathlib.Path(tempfile.mkdtemp(prefix="gpujobq-bench-", dir=shm))
    return root


class Drain:
    """n jobs submitted over HTTP by many users, until every one has ended."""

    def __init__(self, ctl: system.Controller, users: list[tuple[str, str]], n: int,
                 concurrency: int = 16, sim: system.Simulated | None = None) -> None:
        self.ctl = ctl
        reqs = [load.submit(name, token, CODE) for name, token in users]
        pids = {"controller": ctl.proc.pid}  # type: ignore[union-attr]
        if sim is not None:
            pids["agents"] = sim.proc.pid  # type: ignore[union-attr]
        loop = ctl.proc.pid  # type: ignore[union-attr]  # its event loop: the main thread
        cpu0 = {k: system.family_cpu(p) for k, p in pids.items()}
        cpu0["load generator"] = time.process_time()
        loop0 = system.cpu_seconds(loop, loop)
        t0 = time.time()
        run = asyncio.run(load.hammer("127.0.0.1", ctl.port, iter(reqs * (n // len(reqs) + 1)),
                                      concurrency=concurrency, total=n))
        self.submitted = time.time() - t0
        self.statuses = run.statuses()
        self.ids = [load.body_json(r)["job_id"] for r in run.replies if r.status == 202]
        self.first = min(r.sent_at for r in run.replies)
        db = sqlite3.connect(ctl.db_path)
        try:
            deadline = time.monotonic() + 120 + n / 100
            while True:
                ended = db.execute(
                    f"SELECT count(*) FROM jobs WHERE status IN {TERMINAL} AND id IN "
                    f"(SELECT value FROM json_each(?))", [_json(self.ids)]).fetchone()[0]
                if ended == len(self.ids) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            rows = db.execute(
                "SELECT status, attempt, created_at, completed_at, CAST(stdout AS TEXT) = "
                "'done ' || id FROM jobs WHERE id IN (SELECT value FROM json_each(?))",
                [_json(self.ids)]).fetchall()
        finally:
            db.close()
        # CPU seconds per job of each process: what bounds the rate on this machine.
        cpu1 = {k: system.family_cpu(p) for k, p in pids.items()}
        cpu1["load generator"] = time.process_time()
        self.cpu = {k: (cpu1[k] - cpu0[k]) / max(1, n) for k in cpu0}
        self.loop_cpu = (system.cpu_seconds(loop, loop) - loop0) / max(1, n)
        self.completed = sum(1 for r in rows if r[0] == "completed" and r[4])
        self.lost = len(self.ids) - self.completed
        self.retried = sum(1 for r in rows if r[1] > 1)
        done = [r for r in rows if r[3] is not None]
        self.last = max(r[3] for r in done) if done else self.first
        self.latency = [r[3] - r[2] for r in done]  # accepted -> result stored
        self.drain = self.last - self.first
        self.rate = len(self.ids) / self.drain if self.drain > 0 else 0.0
        records = list((ctl.root / "results").glob("*.jsonl"))
        self.records = len(records)


def _json(ids: list[str]) -> str:
    import json

    return json.dumps(ids)


def _duplicates(ctl: system.Controller) -> int:
    """Result records beyond one per finished job (a job recorded twice)."""
    import json

    seen: dict[str, int] = {}
    for path in (ctl.root / "results").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            job = json.loads(line).get("job_id")
            seen[job] = seen.get(job, 0) + 1
    return sum(n - 1 for n in seen.values() if n > 1)


def _bound(runs: list[Drain], ctl: system.Controller) -> str:
    """What the CPU each process spent per job says about the rate this machine allows,
    and what creating one file costs here (a result record is one file per job)."""
    cpu = {k: median([r.cpu[k] for r in runs]) for k in runs[0].cpu}
    loop = median([r.loop_cpu for r in runs])
    total = sum(cpu.values())
    cores = os.cpu_count() or 1
    parts = ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in cpu.items())
    disk, memory = _file_cost(ctl.root), _file_cost(pathlib.Path("/dev/shm"))
    return (f"CPU per job: {parts}; all together {total * 1000:.2f} ms, so {cores} cores "
            f"allow at most {cores / total:,.0f} jobs/s here. The controller's event loop "
            f"(one thread, so one core at most) spent {loop * 1000:.2f} ms of it: "
            f"{1 / loop:,.0f} jobs/s with a core of its own; the rest is its threads, "
            f"mostly writing the result records. Creating, writing and fsyncing a small "
            f"file costs {disk * 1000:.2f} ms of CPU on this machine's disk "
            f"({memory * 1000:.3f} ms in tmpfs)")


def _file_cost(where: pathlib.Path, n: int = 300) -> float:
    """CPU seconds to create, write, fsync and close one small new file in ``where``."""
    if not (where.is_dir() and os.access(where, os.W_OK)):
        return float("nan")
    folder = pathlib.Path(tempfile.mkdtemp(prefix="gpujobq-files-", dir=where))
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        t0 = sum(os.times()[:2])
        for i in range(n):
            fd = os.open(folder / f"u{i}_c_20260101T000000.000000Z.jsonl", flags, 0o640)
            os.write(fd, b'{"job_id": "..."}\n' * 8)
            os.fsync(fd)
            os.close(fd)
        return (sum(os.times()[:2]) - t0) / n
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def b3(root: pathlib.Path, trials: int, jobs: int) -> Figure:
    with _fleet(root) as (ctl, sim):
        users = ctl.users(USERS)
        Drain(ctl, users, 500)  # warm-up: connections, caches
        runs = [Drain(ctl, users, jobs, sim=sim) for _ in range(trials)]
        dup = _duplicates(ctl)
    rates = [r.rate for r in runs]
    lat = [x for r in runs for x in r.latency]
    lost = sum(r.lost for r in runs)
    submit_rate = median([jobs / r.submitted for r in runs])
    return Figure(
        "B3", f"jobs/s, full path, {AGENTS} instant agents x {GPUS} GPUs",
        f"{median(rates):,.0f} jobs/s (worst {min(rates):,.0f})",
        "Slurm: 500/s (published)", f"{median(rates) / 500:.2f}x Slurm", ">= 1,000 jobs/s",
        median(rates) >= 1000 and lost == 0 and dup == 0,
        [f"{trials} trials x {jobs:,} jobs from {USERS:,} users over 16 connections "
         f"(wait=false), timed from the first submit sent to the last result stored; "
         f"accepted -> result stored: median {ms(median(lat))}, p99 {ms(p99(lat))}; "
         f"submits alone ran at {submit_rate:,.0f}/s; lost {lost}, duplicate records {dup}; "
         f"limits raised (submit_limit, active_limit 1,000,000)", _bound(runs, ctl)])


def b8(root: pathlib.Path, jobs: int) -> Figure:
    goal = 20.0 if jobs <= 20_000 else 100.0
    with _fleet(root) as (ctl, sim):
        users = ctl.users(USERS)
        run = Drain(ctl, users, jobs, sim=sim)
        dup = _duplicates(ctl)
    met = run.drain <= goal and run.lost == 0 and dup == 0
    return Figure(
        "B8", f"{jobs:,} jobs over {AGENTS} instant agents: drain, lost, duplicated",
        f"{run.drain:.1f} s, {run.lost} lost, {dup} duplicated", "—",
        f"{run.rate:,.0f} jobs/s", f"<= {goal:.0f} s, 0, 0", met,
        [f"{jobs:,} submits (wait=false) from {USERS:,} users over 16 connections, from the "
         f"first submit to the last result stored; statuses {run.statuses}; "
         f"{run.retried} jobs needed a second attempt; {run.records:,} record files",
         _bound([run], ctl)])


def b9(root: pathlib.Path, trials: int) -> Figure:
    with _fleet(root) as (ctl, _):
        ctl.stop()
        first = []
        for _ in range(trials):  # a first start: a fresh database each time
            for f in ctl.root.glob("gpujobq.db*"):
                f.unlink()
            first.append(ctl.start(agents=AGENTS))
            ctl.stop()
        users = ctl.users(USERS)
        restart = []
        ctl.start(agents=AGENTS)
        for _ in range(trials):
            Drain(ctl, users, 2_000)  # something to reconcile: held results, acks
            ctl.stop()
            restart.append(ctl.start(agents=AGENTS))
    return Figure(
        "B9", f"controller restart, {AGENTS} agents all reconnected and reconciled",
        f"{median(restart):.2f} s (worst {max(restart):.2f} s)",
        f"first start {median(first):.2f} s", f"{median(restart) / median(first):.2f}x",
        "<= 2 s", max(restart) <= 2.0,
        [f"{trials} trials: process start to /api/health showing all {AGENTS} agents "
         "connected (hello answered, held jobs reconciled); the restart follows 2,000 jobs"])
