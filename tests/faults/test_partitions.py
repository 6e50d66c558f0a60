"""Partitions and frozen agents, shorter and longer than the lease.

node0 is reached through a TCP proxy the test controls (on loopback): cutting it stops
every byte both ways, as a broken network does, without closing anything. Or node0's
agent is frozen with SIGSTOP. Shorter than the lease: nothing visible, the job finishes
as attempt 1. Longer: the agent stops the job itself, the controller requeues it on
node1 only after the lease and its margin, and the old attempt's late report changes
nothing.
"""

from __future__ import annotations

import pathlib
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster import Cluster, User

LEASE, MARGIN = 6.0, 1.0
POOL = {"labels": {"pool": "all"}}
COMPETITIONS = "competitions:\n  pool: {labels: {pool: all}}\n"
# Attempt 1 runs 8 s (long enough to be caught by the fault); a rerun finishes at once.
CODE = ("import os, time\na = os.environ['GPUJOBQ_ATTEMPT']\nprint('attempt', a, flush=True)\n"
        "time.sleep(8 if a == '1' else 0)\nprint('done', a)\n")


class Proxy:
    """A TCP relay on loopback whose flow the test can cut and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self.stopped:
                self.flowing.wait()
                ready, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in ready:
                    if not self.flowing.is_set():
                        break  # cut: leave the bytes where they are
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        self.stopped = True
        self.flowing.set()
        self.listener.close()


@pytest.fixture
def pair(tmp_path: pathlib.Path) -> Iterator[tuple[Cluster, Proxy]]:
    c = Cluster(tmp_path, agents=2, gpus=1, inventory_extra=COMPETITIONS, heartbeat_timeout=2,
                lease=LEASE, lease_margin=MARGIN, node_lost_after=1)
    proxy = Proxy((c.agents[0].address, c.agents[0].port))
    c.write_inventory(node0={**POOL, "address": "127.0.0.1", "port": proxy.port},
                      node1=POOL)
    try:
        yield c.start(), proxy
    finally:
        c.stop()
        proxy.close()


def start_on_node0(c: Cluster) -> tuple[User, str]:
    user = c.user()
    job_id = c.submit(user, CODE, wait=False, competition_id="pool").json()["job_id"]
    running = c.wait_status(user, job_id, {"running"})
    assert running["node"] == "node0"
    deadline = time.monotonic() + 10
    while "attempt 1" not in c.get(user, "results", job_id).json()["stdout"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return user, job_id


def outcome(c: Cluster, user: User, job_id: str) -> dict[str, Any]:
    final = c.wait_status(user, job_id, {"completed", "failed", "cancelled"}, timeout=60)
    final["stdout"] = c.get(user, "results", job_id).json()["stdout"]
    final["events"] = [e[0] for e in c._db.execute(
        "SELECT reason FROM job_events WHERE job_id = ? ORDER BY id", [job_id])]
    # After every scenario: nothing stuck, the database sound.
    assert c._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert c._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', "
                         "'running')").fetchone()[0] == 0
    return final


def invisible(final: dict[str, Any]) -> None:
    assert (final["status"], final["attempt"], final["node"]) == ("completed", 1, "node0")
    assert final["stdout"] == "attempt 1\ndone 1\n"
    assert "requeued" not in final["events"]


def moved(c: Cluster, final: dict[str, Any], fault_began: float) -> None:
    assert (final["status"], final["attempt"], final["node"]) == ("completed", 2, "node1")
    assert final["stdout"] == "attempt 2\ndone 2\n"
    assert final["events"].count("requeued") == 1
    started = c._db.execute(
        "SELECT at FROM job_events WHERE reason = 'requeued' ORDER BY id DESC").fetchone()[0]
    # Never before the lease and its margin: node0 may still have been running it.
    assert started - fault_began >= LEASE + MARGIN - 1.5
    assert len(list(c.results_dir.glob("*.jsonl"))) == 1


def test_partition_shorter_than_the_lease_is_invisible(pair: tuple[Cluster, Proxy]) -> None:
    c, proxy = pair
    user, job_id = start_on_node0(c)
    proxy.flowing.clear()
    time.sleep(2.5)
    proxy.flowing.set()
    invisible(outcome(c, user, job_id))


def test_partition_longer_than_the_lease_moves_the_job(pair: tuple[Cluster, Proxy]) -> None:
    c, proxy = pair
    user, job_id = start_on_node0(c)
    began = time.time()
    proxy.flowing.clear()
    time.sleep(LEASE + MARGIN + 4)
    proxy.flowing.set()
    final = outcome(c, user, job_id)
    moved(c, final, began)
    # node0 stopped attempt 1 itself when its lease ran out; its report, arriving after
    # the partition, was acknowledged and changed nothing.
    deadline = time.monotonic() + 30
    while "stopped by the agent: no word from the controller" not in c.log("node0"):
        assert time.monotonic() < deadline, c.log("node0")[-2000:]
        time.sleep(0.2)
    spool = c.agents[0].dir / "spool"
    while any(spool.glob("*/result.msgpack")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert outcome(c, user, job_id)["attempt"] == 2


def test_agent_frozen_shorter_than_the_lease_is_invisible(pair: tuple[Cluster, Proxy]) -> None:
    c, _ = pair
    user, job_id = start_on_node0(c)
    agent = c.agents[0].proc
    assert agent is not None
    agent.send_signal(signal.SIGSTOP)
    time.sleep(2.5)
    agent.send_signal(signal.SIGCONT)
    invisible(outcome(c, user, job_id))


def test_agent_frozen_longer_than_the_lease_moves_the_job(pair: tuple[Cluster, Proxy]) -> None:
    c, _ = pair
    user, job_id = start_on_node0(c)
    agent = c.agents[0].proc
    assert agent is not None
    began = time.time()
    agent.send_signal(signal.SIGSTOP)
    try:
        time.sleep(LEASE + MARGIN + 4)
    finally:
        agent.send_signal(signal.SIGCONT)
    moved(c, outcome(c, user, job_id), began)
