"""Load-testing tools against a real controller: `simulate` and `serve --runtime instant`.

`gpujobq-agent simulate` runs as an admin runs it (a subprocess with its own host keys,
spools and SSH servers) and a real controller on uvicorn reads the inventory it
writes. Nothing runs on the agents' side: the instant runtime answers every job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import pathlib
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import asyncssh
import pytest
from gpujobq.agent import instant, simulate
from gpujobq.protocol import inventory, messages, sshkeys, wire

from tests import cluster as cluster_mod

READY = re.compile(r"simulating (\d+) agents on (\S+) ports (\d+)-(\d+); inventory: (.+)")


class Simulation:
    """`gpujobq-agent simulate` as a subprocess, authorized for one controller key."""

    def __init__(self, root: pathlib.Path, controller_pub: bytes, *args: str) -> None:
        self.root = root
        self.inventory = root / "simulated.yaml"
        authorized = root / "authorized_keys"
        sshkeys.authorize(authorized, controller_pub)
        self.log = open(root / "simulate.log", "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpujobq.agent", "simulate", "--dir", str(root / "sim"),
             "--authorized-keys", str(authorized), "--inventory-out", str(self.inventory),
             *args],
            stdout=subprocess.PIPE, stderr=self.log, env=cluster_mod.env(),
        )

    def ready(self, timeout: float = 30) -> re.Match[str]:
        """The line it prints once every agent listens and the inventory is written."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        match = READY.fullmatch(line.strip())
        assert match, f"not ready: {line!r}\n{self.logs()[-3000:]}"
        return match

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def logs(self) -> str:
        return (self.root / "simulate.log").read_text(errors="replace")


@pytest.fixture
def loaded(tmp_path: pathlib.Path) -> Iterator[tuple[cluster_mod.Cluster, Simulation]]:
    """A real controller and 20 simulated agents of 2 virtual GPUs, each job 'done {job_id}'."""
    sim_root = tmp_path / "agents"
    sim_root.mkdir()
    cluster = cluster_mod.Cluster(tmp_path / "controller", agents=0,
                                  inventory=sim_root / "simulated.yaml",
                                  active_limit=5, submit_limit=10)
    pub = pathlib.Path(f"{cluster.client_key}.pub").read_bytes()
    sim = Simulation(sim_root, pub, "--count", "20", "--gpus", "2", "--heartbeat", "1",
                     "--instant-stdout", "done {job_id}")
    try:
        match = sim.ready()
        assert match[1] == "20" and match[2] == "127.0.0.1"
        assert pathlib.Path(match[5]) == sim.inventory
        cluster.start()
        yield cluster, sim
    finally:
        cluster.stop()
        assert sim.stop() == 0, sim.logs()[-3000:]


def test_a_controller_runs_many_jobs_on_simulated_agents(
        loaded: tuple[cluster_mod.Cluster, Simulation]) -> None:
    cluster, sim = loaded
    inv = inventory.load(sim.inventory)
    assert [h.name for h in inv.hosts] == [f"sim{i:03d}" for i in range(20)]
    assert all(h.declared_gpus() == tuple(messages.GPU(index=i, virtual=True) for i in (0, 1))
               for h in inv.hosts)
    admin = cluster.user("admin", admin=True)
    fleet = cluster.nodes(admin)
    assert {h["runtime"] for h in fleet["hosts"]} == {"instant"}

    users = [cluster.user() for _ in range(12)]

    def submit_five(user: cluster_mod.User) -> list[tuple[cluster_mod.User, str]]:
        jobs = []
        for _ in range(5):
            r = cluster.submit(user, "raise SystemExit(1)\n", wait=False)  # never run
            assert r.status_code == 202, r.text
            jobs.append((user, r.json()["job_id"]))
        return jobs

    with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
        jobs = [job for batch in pool.map(submit_five, users) for job in batch]
    assert len(jobs) == 60

    hosts = set()
    for user, job_id in jobs:
        status = cluster.wait_status(user, job_id, {"completed", "failed", "cancelled"})
        assert (status["status"], status["reason"]) == ("completed", "exit_code"), status
        hosts.add(status["node"])
        result = cluster.get(user, "results", job_id).json()
        assert (result["exit_code"], result["stdout"], result["stderr"]) == (
            0, f"done {job_id}", ""), result
    assert len(hosts) > 1, hosts
    assert hosts <= {h.name for h in inv.hosts}


def test_serve_with_the_instant_runtime(tmp_path: pathlib.Path) -> None:
    args = ("--runtime", "instant", "--instant-stdout", "hi {job_id} #{attempt}\\n",
            "--instant-stderr", "e", "--instant-exit-code", "3")
    with cluster_mod.running(tmp_path, agent_args=args) as cluster:
        admin = cluster.user("admin", admin=True)
        assert [h["runtime"] for h in cluster.nodes(admin)["hosts"]] == ["instant"]
        user = cluster.user()
        r = cluster.submit(user, "print('never run')\n")
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["status"], body["exit_code"], body["stderr"]) == ("failed", 3, "e")
        assert body["stdout"] == f"hi {body['job_id']} #1\\n"  # the "\n" stays literal
        assert "jobs are NOT run" in cluster.log("node0")


def test_auto_never_chooses_the_instant_runtime() -> None:
    from gpujobq.agent import __main__ as agent_main

    args = agent_main._parser().parse_args(["serve"])
    assert args.runtime == "auto"
    assert not isinstance(agent_main._runtime(args), instant.InstantRuntime)
    args = agent_main._parser().parse_args(["serve", "--runtime", "instant"])
    assert isinstance(agent_main._runtime(args), instant.InstantRuntime)


async def test_simulated_agents_each_have_their_own_host_key_and_name(
        tmp_path: pathlib.Path) -> None:
    client_key = sshkeys.ensure_private_key(tmp_path / "controller", "controller")
    sshkeys.authorize(tmp_path / "authorized_keys", client_key.export_public_key())
    base = cluster_mod.free_port("127.0.0.9")
    options = simulate.Options(count=3, gpus=1, listen="127.0.0.9", base_port=base,
                               dir=tmp_path / "sim", authorized_keys=tmp_path / "authorized_keys",
                               name_prefix="load-")
    began = time.monotonic()
    sims = await simulate.start(options, instant.InstantRuntime())
    try:
        assert time.monotonic() - began < 5
        assert [s.port for s in sims] == [base, base + 1, base + 2]
        inv = inventory.loads(simulate.inventory_text(options, sims).encode())
        assert len({inventory.host_key_text(tmp_path, h) for h in inv.hosts}) == 3
        for host in inv.hosts:
            hello = await _hello(host, client_key, inventory.host_key_text(tmp_path, host))
            assert (hello.host, hello.runtime, hello.gpus, hello.nvml) == (
                host.name, "instant", (), False)
        assert [h.name for h in inv.hosts] == ["load-000", "load-001", "load-002"]
    finally:
        await simulate.stop(sims)
    keys = _public_keys(sims)
    # A second start reuses the host keys, so a controller's pinned inventory still holds.
    again = await simulate.start(options, instant.InstantRuntime())
    try:
        assert [s.host_key for s in again] == [s.host_key for s in sims]
        assert _public_keys(again) == keys
    finally:
        await simulate.stop(again)


def _public_keys(sims: list[simulate.Simulated]) -> list[bytes]:
    return [pathlib.Path(f"{s.host_key}.pub").read_bytes() for s in sims]


async def _hello(host: inventory.Host, client_key: asyncssh.SSHKey, pinned: str
                 ) -> messages.Hello:
    """The agent's `hello`, asked with the host key pinned as the controller pins it."""
    async with asyncssh.connect(
        host.address, host.port, username="gpujobq", client_keys=[client_key],
        known_hosts=([asyncssh.import_public_key(pinned)], [], []), agent_path=None, config=[],
    ) as conn:
        done = await asyncio.wait_for(conn.run("hello", encoding=None), 10)
        assert isinstance(done.stdout, bytes)
        return wire.decode_hello(done.stdout)


def test_simulate_refuses_without_authorized_keys(tmp_path: pathlib.Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpujobq.agent", "simulate", "--dir", str(tmp_path)],
        capture_output=True, text=True, env=cluster_mod.env(), timeout=30)
    assert done.returncode == 2
    assert "authorized_keys is missing" in done.stderr
