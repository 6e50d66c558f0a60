"""A real gpujobq on loopback for tests: agents on 127.0.0.x, a controller on uvicorn.

Each piece is the real program started as a subprocess (`python -m gpujobq.agent
serve`, `python -m gpujobq.controller serve`) with fresh keys, a fresh SQLite file and
an inventory naming the agents' pinned host keys.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import requests
from gpujobq.controller import accounts, database
from gpujobq.protocol import sshkeys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTHONPATH = os.pathsep.join(str(ROOT / p) for p in ("shared", "controller", "agent"))


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBQ_")}
    e["PYTHONPATH"] = PYTHONPATH + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


class User:
    def __init__(self, name: str, token: str) -> None:
        self.name = name
        self.token = token

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Agent:
    def __init__(self, root: pathlib.Path, name: str, address: str, controller_pub: bytes,
                 agent_args: list[str]) -> None:
        self.name = name
        self.agent_args = agent_args
        self.address = address
        self.dir = root / f"agent-{name}"
        self.host_key = self.dir / "ssh_host_ed25519_key"
        sshkeys.ensure_private_key(self.host_key, comment=f"test agent {name}")
        sshkeys.authorize(self.dir / "authorized_keys", controller_pub)
        self.port = free_port(address)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.dir / "agent.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpujobq.agent", "serve", "--name", self.name,
             "--listen", self.address, "--port", str(self.port),
             "--host-key", str(self.host_key),
             "--authorized-keys", str(self.dir / "authorized_keys"),
             "--spool", str(self.dir / "spool"), "--python", sys.executable,
             "--heartbeat", "1", *self.agent_args],
            stdout=log, stderr=subprocess.STDOUT, env=env(),
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.proc, sig)


class Cluster:
    """``gpus``: GPUs of every agent, or a list with one count per agent.

    ``inventory``: a file written elsewhere (by `gpujobq-agent simulate`) that the
    controller reads instead, for agents the cluster does not start (use ``agents=0``).
    """

    def __init__(self, root: pathlib.Path, agents: int = 1, gpus: int | list[int] = 2,
                 agent_args: tuple[str, ...] = ("--runtime", "process"), gpu_specs: str = "",
                 inventory_extra: str = "", inventory: pathlib.Path | None = None,
                 **settings: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.db_path = root / "gpujobq.db"
        self.results_dir = root / "results"
        self.client_key = root / "controller" / "id_ed25519"
        sshkeys.ensure_private_key(self.client_key, comment="test controller")
        self.agent_args = list(agent_args)
        self.agents: list[Agent] = []
        counts = gpus if isinstance(gpus, list) else [gpus] * agents
        self.gpu_counts: dict[str, int] = {}
        for count in counts:
            self.add_agent(count)
        self.gpu_specs = gpu_specs
        self.inventory_extra = inventory_extra
        self.inventory = inventory or root / "inventory.yaml"
        if inventory is None:
            self.write_inventory()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = {"grace": 1, **settings}
        self.proc: subprocess.Popen[bytes] | None = None
        self.controller_env: dict[str, str] = {}  # e.g. a crash point for the next start
        self._db = database.open_database(self.db_path)

    def add_agent(self, gpus: int) -> Agent:
        """A new agent on the next loopback address (not in the inventory until written)."""
        pub = pathlib.Path(f"{self.client_key}.pub").read_bytes()
        n = len(self.agents)
        agent = Agent(self.root, f"node{n}", f"127.0.0.{n + 2}", pub, self.agent_args)
        self.agents.append(agent)
        self.gpu_counts[agent.name] = gpus
        return agent

    def host_entry(self, agent: Agent, labels: dict[str, str] | None = None,
                   address: str | None = None, port: int | None = None, **extra: Any) -> str:
        """One host of the inventory; every host has the label ``name: <its name>``.

        ``address``/``port`` reach the agent another way (through a test proxy)."""
        labels = {"name": agent.name, **(labels or {})}
        lines = [
            f"  - name: {agent.name}",
            f"    address: {address or agent.address}",
            f"    port: {port or agent.port}",
            f"    host_key_file: {agent.host_key}.pub",
            "    labels: {" + ", ".join(f"{k}: {v}" for k, v in labels.items()) + "}",
            "    gpus:",
            *([self.gpu_specs] if self.gpu_specs else
              (f"      - {{index: {i}, virtual: true}}"
               for i in range(self.gpu_counts[agent.name]))),
            *(f"    {key}: {value}" for key, value in extra.items()),
        ]
        return "\n".join(lines) + "\n"

    def write_inventory(self, agents: list[Agent] | None = None, extra: str | None = None,
                        **per_host: dict[str, Any]) -> None:
        """inventory.yaml with these agents (default: all), ``per_host`` fields by name."""
        chosen = self.agents if agents is None else agents
        text = "hosts:\n" + "".join(
            self.host_entry(a, **per_host.get(a.name, {})) for a in chosen)
        text += self.inventory_extra if extra is None else extra
        tmp = self.inventory.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.inventory)  # atomic, as an admin's editor or deploy tool would

    def start(self) -> Cluster:
        for agent in self.agents:
            agent.start()
        self.start_controller()
        return self

    def controller_args(self) -> list[str]:
        args = ["--port", str(self.port), "--database", str(self.db_path),
                "--inventory", str(self.inventory), "--results-dir", str(self.results_dir),
                "--client-key", str(self.client_key), "--backoff-max", "1"]
        for key, value in self.settings.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        return args

    def start_controller(self) -> None:
        log = open(self.root / "controller.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpujobq.controller", "serve", *self.controller_args()],
            stdout=log, stderr=subprocess.STDOUT, env={**env(), **self.controller_env},
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"controller exited: {self.log('controller')[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                health = requests.get(f"{self.url}/api/health", timeout=2).json()
                if all(a["connected"] for a in health["agents"].values()):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"cluster not ready: {self.log('controller')[-3000:]}")

    def stop(self) -> None:
        _stop(self.proc)
        for agent in self.agents:
            agent.stop()
        self._db.close()

    def log(self, which: str) -> str:
        path = self.root / f"{which}.log"
        if which.startswith("node"):
            path = self.root / f"agent-{which}" / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- helpers for tests ---------------------------------------------------------

    def user(self, prefix: str = "u", admin: bool = False) -> User:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        accounts.add_user(self._db, name, time.time(), admin=admin)
        return User(name, accounts.issue_token(self._db, name, time.time(), days=1))

    def nodes(self, admin: User) -> dict[str, Any]:
        r = requests.get(f"{self.url}/api/admin/nodes", headers=admin.headers, timeout=30)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def wait_nodes(self, admin: User, check: Any, timeout: float = 30) -> dict[str, Any]:
        """/api/admin/nodes once ``check(hosts by name)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            fleet = self.nodes(admin)
            if check({h["name"]: h for h in fleet["hosts"]}):
                return fleet
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet never got there: {fleet}")
            time.sleep(0.1)

    def submit(
        self,
        user: User,
        code: str | bytes,
        *,
        wait: bool = True,
        expected_time: float = 30,
        timeout: float = 60,
        **config: Any,
    ) -> requests.Response:
        fields = {"competition_id": "test", "project_id": "demo", "user_id": user.name,
                  "expected_time": expected_time, "token": user.token, **config}
        return requests.post(
            f"{self.url}/api/submit" + ("" if wait else "?wait=false"),
            headers=user.headers,
            files={"code": ("solution.py", code, "text/x-python"),
                   "config_file": ("config.yaml", str(fields), "application/x-yaml")},
            timeout=timeout,
        )

    def get(self, user: User, what: str, job_id: str = "", **params: Any) -> requests.Response:
        path = f"{self.url}/api/{what}" + (f"/{job_id}" if job_id else "")
        return requests.get(path, headers=user.headers,
                            params={"user_id": user.name, **params}, timeout=30)

    def cancel(self, user: User, job_id: str) -> requests.Response:
        return requests.post(f"{self.url}/api/cancel/{job_id}", headers=user.headers,
                             params={"user_id": user.name}, timeout=30)

    def wait_status(
        self, user: User, job_id: str, statuses: set[str], timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body: dict[str, Any] = self.get(user, "status", job_id).json()
            if body["status"] in statuses:
                return body
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {body}")
            time.sleep(0.05)


def live_output_while_running(cluster: Cluster, user: User) -> None:
    """/api/results shows what a running job has printed so far, then the whole result."""
    code = ("import sys, time\nprint('first', flush=True)\n"
            "print('warn', file=sys.stderr, flush=True)\ntime.sleep(2)\nprint('last')\n")
    job_id = cluster.submit(user, code, wait=False).json()["job_id"]
    deadline = time.monotonic() + 30
    while True:
        body = cluster.get(user, "results", job_id).json()
        if body["stdout"] == "first\n" and body["stderr"] == "warn\n":
            break
        assert time.monotonic() < deadline and body["status"] in {"pending", "running"}, body
        time.sleep(0.05)
    assert body["status"] == "running"
    assert body["exit_code"] is None
    final = cluster.wait_status(user, job_id, {"completed", "failed"})
    assert final["status"] == "completed"
    assert cluster.get(user, "results", job_id).json()["stdout"] == "first\nlast\n"


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running(root: pathlib.Path, **kwargs: Any) -> Iterator[Cluster]:
    cluster = Cluster(root, **kwargs)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
