"""The pieces a benchmark starts: the real controller, simulated agents, a bare app."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from gpujobq.controller import accounts, database
from gpujobq.protocol import sshkeys

from tests.cluster import _stop as stop
from tests.cluster import env, free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: pathlib.Path,
               ready: Any = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited: {log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            with urllib.request.urlopen(url, timeout=5) as r:
                if ready is None or ready(json.loads(r.read())):
                    return
        time.sleep(0.02)
    raise TimeoutError(f"{url} not ready: {log.read_text()[-3000:]}")


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU seconds (user and system) of a process, or of one of its threads (the main
    thread's id is the process id)."""
    stat = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = pathlib.Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family(pid: int) -> list[int]:
    """A process and its descendants now alive (the controller's WAL sync helper)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in pathlib.Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return found


def family_cpu(pid: int) -> float:
    """CPU seconds of a process and of its descendants now alive."""
    return sum(cpu_seconds(p) for p in family(pid))


class Controller:
    """The real controller (`python -m gpujobq.controller serve`) on a fresh folder."""

    def __init__(self, root: pathlib.Path, **settings: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.db_path = root / "gpujobq.db"
        self.inventory = root / "inventory.yaml"
        self.client_key = root / "controller" / "id_ed25519"
        sshkeys.ensure_private_key(self.client_key, comment="bench controller")
        self.port: int | None = None
        self.settings = {"grace": 1, **settings}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "controller.log"

    @property
    def public_key(self) -> pathlib.Path:
        return pathlib.Path(f"{self.client_key}.pub")

    def write_inventory(self, hosts: str, extra: str = "") -> None:
        tmp = self.inventory.with_suffix(".tmp")
        tmp.write_text(hosts + extra)
        tmp.replace(self.inventory)

    def start(self, agents: int | None = None, timeout: float = 60) -> float:
        """Start it; returns seconds until it answers (and, with ``agents``, until that
        many agents are connected)."""
        if self.port is None:  # chosen late: simulated agents take ports too
            self.port = free_port()
        args = ["--database", str(self.db_path),
                "--inventory", str(self.inventory), "--results-dir", str(self.root / "results"),
                "--client-key", str(self.client_key), "--backoff-max", "1"]
        for key, value in self.settings.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpujobq.controller", "serve", *args,
             "--port", str(self.port)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env())

        def ready(health: dict[str, Any]) -> bool:
            up = sum(1 for a in health["agents"].values() if a["connected"])
            return agents is None or up >= agents

        _wait_http(f"{self.url}/api/health", self.proc, self.log, ready, timeout)
        return time.perf_counter() - t0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop(self.proc, sig)

    def users(self, n: int, prefix: str = "u") -> list[tuple[str, str]]:
        """n users with a token each, written straight into the database."""
        db = database.open_database(self.db_path)
        now = time.time()
        out = []
        try:
            for i in range(n):
                name = f"{prefix}{i:05d}"
                accounts.add_user(db, name, now)
                out.append((name, accounts.issue_token(db, name, now, days=1)))
        finally:
            db.close()
        return out


class Simulated:
    """`gpujobq-agent simulate`: many instant agents in one process."""

    def __init__(self, root: pathlib.Path, controller_key: pathlib.Path, count: int,
                 gpus: int, *extra: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        sshkeys.authorize(root / "authorized_keys", controller_key.read_bytes())
        self.inventory = root / "hosts.yaml"
        self.log = root / "simulate.log"
        self.args = ["--count", str(count), "--gpus", str(gpus), "--dir", str(root),
                     "--authorized-keys", str(root / "authorized_keys"),
                     "--inventory-out", str(self.inventory), *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> str:
        """Start them; returns the inventory's hosts section."""
        self.inventory.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpujobq.agent", "simulate", *self.args],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env())
        deadline = time.monotonic() + timeout
        while not self.inventory.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"simulate did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return self.inventory.read_text()

    def stop(self) -> None:
        stop(self.proc)


class Bare:
    """The baseline: a bare Litestar app on the same uvicorn settings (tests.bench.bare)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.port = free_port()
        self.log = root / "bare.log"
        root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.bare", str(self.port)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            env={**env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{env()['PYTHONPATH']}"})
        _wait_http(f"http://127.0.0.1:{self.port}/bare", self.proc, self.log)

    def stop(self) -> None:
        stop(self.proc)


@contextlib.contextmanager
def started(*things: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.stop()
