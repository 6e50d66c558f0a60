"""B10: a job's output, live, from the job to a follower, against a raw asyncssh channel."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import time

import asyncssh
from gpujobq.client import Client
from gpujobq.controller import agents
from gpujobq.protocol import sshkeys

from tests.bench import system
from tests.bench.stats import Figure, median
from tests.cluster import Agent, env, free_port

SIZE = 64 << 20  # bytes the job prints
JOB = f"""import sys, time
print(repr(time.time()), file=sys.stderr, flush=True)
line = b"x" * 1023 + b"\\n"
for _ in range({SIZE // 1024}):
    sys.stdout.buffer.write(line)
sys.stdout.flush()
time.sleep(30)  # still running: the follower reads live output, not the final result
""".encode()


def _follow(port: int, user: str, token: str, pids: dict[str, int]
            ) -> tuple[float, dict[str, float]]:
    """Submit the job and follow its live log with gpujobq's own client (what `gpujobq
    logs -f` reads: GET /api/logs?follow=true, server-sent events) until all its output
    has come; MB/s from the job's first line, and the CPU seconds each process spent
    from the submit until then (the job's own counted with its agent's)."""
    began, done = None, None
    before = _cpu(pids)
    config = f"competition_id: bench\nproject_id: bench\nuser_id: {user}\n" \
             "expected_time: 10\n"
    with Client(f"http://127.0.0.1:{port}", token) as client:
        job = client.submit(JOB, config.encode())["job_id"]
        events = client.logs(job, follow=True)
        for event in events:
            if event.event != "output":
                continue
            data = event.json()
            if data["stream"] == "stderr" and began is None:
                began = float(data["text"].split()[0])
            elif data["stream"] == "stdout" and data["offset"] + len(data["text"]) >= SIZE:
                done = time.time()  # ASCII: characters are bytes
                used = {k: v - before.get(k, 0.0) for k, v in _cpu(pids).items()}
                break
        events.close()
        client.cancel(job)
    assert began is not None and done is not None
    return SIZE / 2**20 / (done - began), used


async def _raw(port: int, host_key: pathlib.Path, client_key: pathlib.Path,
               sender: int, tuned: bool = False) -> tuple[float, dict[str, float]]:
    """The same bytes on one exec channel; ``tuned``: with the job channel's window and
    packet size instead of asyncssh's defaults."""
    channel = dict(window=agents.CHANNEL_WINDOW, max_pktsize=agents.CHANNEL_PACKET) \
        if tuned else {}
    async with asyncssh.connect(
            "127.0.0.1", port, username="bench", client_keys=[str(client_key)],
            known_hosts=([str(host_key) + ".pub"], [], []), encryption_algs=agents._CIPHERS,
            config=[], agent_path=None) as conn:
        before = _cpu({"raw sender": sender}, "raw receiver")
        t0 = time.perf_counter()
        proc = await conn.create_process(str(SIZE), encoding=None, **channel)
        got = 0
        while chunk := await proc.stdout.read(1 << 20):
            got += len(chunk)
        took = time.perf_counter() - t0
        used = {k: v - before[k] for k, v in _cpu({"raw sender": sender}, "raw receiver").items()}
        assert got == SIZE, got
        return SIZE / 2**20 / took, used


def b10(root: pathlib.Path, trials: int) -> Figure:
    ctl = system.Controller(root / "ctl", output_cap=2 * SIZE, active_limit=100,
                            submit_limit=1_000_000)
    agent = Agent(root, "node0", "127.0.0.2", ctl.public_key.read_bytes(),
                  ["--runtime", "process"])
    ctl.write_inventory(
        f"hosts:\n  - name: node0\n    address: 127.0.0.2\n    port: {agent.port}\n"
        f"    host_key_file: {agent.host_key}.pub\n    gpus:\n"
        "      - {index: 0, virtual: true}\n")
    raw_key = root / "raw_host_key"
    sshkeys.ensure_private_key(raw_key, comment="bench raw")
    sshkeys.authorize(root / "raw_authorized", ctl.public_key.read_bytes())
    raw_port = free_port()
    raw = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.rawssh", str(raw_port), str(raw_key),
         str(root / "raw_authorized")], stdout=subprocess.PIPE,
        env={**env(), "PYTHONPATH": f"{system.ROOT}{os.pathsep}{env()['PYTHONPATH']}"})
    assert raw.stdout is not None and raw.stdout.readline().strip() == b"ready"
    agent.start()
    ours, base, tuned = [], [], []
    cpu: dict[str, list[float]] = {}
    try:
        ctl.start(agents=1)
        (user, token), = ctl.users(1)
        pids = {"controller": ctl.proc.pid, "agent and job": agent.proc.pid}  # type: ignore[union-attr]
        for _ in range(trials):
            _settle(pids)
            rate, used = _follow(ctl.port, user, token, pids)  # type: ignore[arg-type]
            _settle(pids)  # the cancelled job's result is stored before the baseline runs
            raw_rate, used_raw = asyncio.run(_raw(raw_port, raw_key, ctl.client_key, raw.pid))
            tuned.append(asyncio.run(
                _raw(raw_port, raw_key, ctl.client_key, raw.pid, tuned=True))[0])
            ours.append(rate)
            base.append(raw_rate)
            for k, v in {**used, **used_raw}.items():
                cpu.setdefault(k, []).append(v)
    finally:
        system.stop(raw)
        agent.stop()
        ctl.stop()
    ratio = median(ours) / median(base)
    return Figure(
        "B10", "log streaming, job -> follower, MB/s",
        f"{median(ours):.0f} MB/s", f"raw asyncssh channel {median(base):.0f} MB/s",
        f"{ratio:.2f}x", ">= 0.4x", ratio >= 0.4,
        [f"{trials} trials: a process-runtime job prints {SIZE >> 20} MiB; the follower "
         "reads GET /api/logs?follow=true (server-sent events) with gpujobq's own client "
         "(what `gpujobq logs -f` runs) until all of it has "
         "come, timed from the job's first line; baseline: the same bytes written on one "
         "exec channel of an asyncssh server (same ciphers) and read by an asyncssh client; "
         "output_cap raised to "
         f"{2 * SIZE >> 20} MiB; the job channel uses {agents.CHANNEL_PACKET >> 10} KiB "
         f"packets and a {agents.CHANNEL_WINDOW >> 20} MiB window, the baseline asyncssh's "
         f"defaults (32 KiB, 2 MiB); a raw channel with the job channel's settings: "
         f"{median(tuned):.0f} MB/s ({median(ours) / median(tuned):.2f}x)",
         _bound(cpu, median(ours), median(base))])


def _cpu(pids: dict[str, int], here: str = "follower") -> dict[str, float]:
    """CPU seconds used so far by each process with its descendants, and by this one
    (as ``here``)."""
    used = {k: system.family_cpu(pid) for k, pid in pids.items()}
    used[here] = time.process_time()
    return used


def _settle(pids: dict[str, int], quiet: float = 0.5, limit: float = 60.0) -> None:
    """Wait until these processes have used no CPU for ``quiet`` seconds: what one
    trial left to do (storing a 64 MiB result) must not slow the next measurement."""
    deadline = time.monotonic() + limit
    last = _cpu(pids)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = _cpu(pids)
        if all(now[k] - last[k] < 0.02 for k in pids):
            return
        last = now


def _bound(cpu: dict[str, list[float]], ours: float, base: float) -> str:
    """What the CPU each process spent says about the rate this machine allows."""
    per = {k: median(v) for k, v in cpu.items()}
    mine = {k: v for k, v in per.items() if not k.startswith("raw")}
    raw = {k: v for k, v in per.items() if k.startswith("raw")}
    cores = os.cpu_count() or 1
    size = SIZE / 2**20

    def parts(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.2f} s" for k, v in d.items())

    return (f"CPU per {SIZE >> 20} MiB: {parts(mine)} (all {sum(mine.values()):.2f} s: "
            f"{cores} cores allow at most {cores * size / sum(mine.values()):.0f} MB/s); "
            f"baseline: {parts(raw)} (all {sum(raw.values()):.2f} s); CPU per MB, ours "
            f"against the baseline: {sum(mine.values()) / sum(raw.values()):.1f}x")
