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


def _follow(port: int, user: str, token: str) -> float:
    """Submit the job and follow its live log with gpujobq's own client (what `gpujobq
    logs -f` reads: GET /api/logs?follow=true, server-sent events) until all its output
    has come; MB/s from the job's first line."""
    began, done = None, None
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
                break
        events.close()
        client.cancel(job)
    assert began is not None and done is not None
    return SIZE / 2**20 / (done - began)


async def _raw(port: int, host_key: pathlib.Path, client_key: pathlib.Path) -> float:
    async with asyncssh.connect(
            "127.0.0.1", port, username="bench", client_keys=[str(client_key)],
            known_hosts=([str(host_key) + ".pub"], [], []), encryption_algs=agents._CIPHERS,
            config=[], agent_path=None) as conn:
        t0 = time.perf_counter()
        proc = await conn.create_process(str(SIZE), encoding=None)
        got = 0
        while chunk := await proc.stdout.read(1 << 20):
            got += len(chunk)
        assert got == SIZE, got
        return SIZE / 2**20 / (time.perf_counter() - t0)


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
    ours, base = [], []
    try:
        ctl.start(agents=1)
        (user, token), = ctl.users(1)
        for _ in range(trials):
            ours.append(_follow(ctl.port, user, token))  # type: ignore[arg-type]
            base.append(asyncio.run(_raw(raw_port, raw_key, ctl.client_key)))
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
         f"{2 * SIZE >> 20} MiB"])
