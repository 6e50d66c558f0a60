"""B1, B2: what the controller adds to a job's start and to a submit-and-wait, against
the bare runtime (a docker run of the same job, or a bare subprocess without docker)."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys
import time

from tests.bench import load, system
from tests.bench.stats import Figure, median, ms, p99, signed_ms
from tests.cluster import Agent

IMAGE = "gpujobq-job:bookworm"
STAMP = "import time; print(repr(time.time()), flush=True)\n"


def _docker() -> object | None:
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
        client.images.get(IMAGE)
        return client
    except Exception:
        return None


def _bare(client: object | None) -> tuple[float, float]:
    """(seconds to the job's first line, seconds to its end) for one bare run."""
    t0 = time.time()
    if client is not None:
        out = client.containers.run(IMAGE, ["python3", "-c", STAMP], remove=True,  # type: ignore[attr-defined]
                                    network_disabled=True)
    else:
        out = subprocess.run([sys.executable, "-c", STAMP], capture_output=True,
                             check=True).stdout
    end = time.time()
    return float(out.decode().split()[0]) - t0, end - t0


def b1_b2(root: pathlib.Path, trials: int) -> list[Figure]:
    client = _docker()
    runtime = "docker" if client is not None else "process"
    ctl = system.Controller(root / "ctl", active_limit=100, submit_limit=1_000_000)
    agent = Agent(root, "node0", "127.0.0.2", ctl.public_key.read_bytes(),
                  ["--runtime", runtime])
    ctl.write_inventory(
        f"hosts:\n  - name: node0\n    address: 127.0.0.2\n    port: {agent.port}\n"
        f"    host_key_file: {agent.host_key}.pub\n    gpus:\n"
        "      - {index: 0, virtual: true}\n      - {index: 1, virtual: true}\n")
    agent.start()
    with system.started(agent, ctl):
        ctl.start(agents=1)
        (user, token), = ctl.users(1)
        req = load.submit(user, token, STAMP.encode(), wait=True)
        ours_start, ours_total, bare_start, bare_total = [], [], [], []

        async def submit_and_wait() -> tuple[float, float]:
            conn = await load.Connection.open("127.0.0.1", ctl.port)  # type: ignore[arg-type]
            try:
                reply = await conn.request(req)
            finally:
                conn.close()
            body = load.body_json(reply)
            assert reply.status == 200 and body["status"] == "completed", body
            return float(body["stdout"].split()[0]) - reply.sent_at, reply.latency

        for i in range(trials + 2):  # two warm-ups each: caches, image layers, first fork
            start, total = asyncio.run(submit_and_wait())
            b_start, b_total = _bare(client)
            if i >= 2:
                ours_start.append(start)
                ours_total.append(total)
                bare_start.append(b_start)
                bare_total.append(b_total)
    add_med = median(ours_start) - median(bare_start)
    add_p99 = p99(ours_start) - p99(bare_start)
    ratio = median(ours_total) / median(bare_total)
    base = ("`docker run` of the same job (docker SDK, image " + IMAGE + ")"
            if client is not None else "a bare subprocess of the same job")
    note = (f"runtime measured: {runtime}; {trials} trials, alternating; job start = the "
            f"time the job's first line prints; baseline {base}")
    return [
        Figure("B1", f"submit -> job start, beyond the {runtime} runtime's own start",
               f"{signed_ms(add_med)} median, {signed_ms(add_p99)} p99",
               f"{ms(median(bare_start))} median, {ms(p99(bare_start))} p99",
               f"{median(ours_start) / median(bare_start):.2f}x",
               "<= +50 ms median, <= +150 ms p99", add_med <= 0.050 and add_p99 <= 0.150,
               [note + f"; ours: {ms(median(ours_start))} median, {ms(p99(ours_start))} p99"]),
        Figure("B2", f"submit-and-wait of a trivial job ({runtime})",
               f"{ms(median(ours_total))} median, {ms(p99(ours_total))} p99",
               f"{ms(median(bare_total))} median", f"{ratio:.2f}x", "<= 1.2x", ratio <= 1.2,
               [note + "; ours = POST /api/submit (wait) until the reply"]),
    ]
