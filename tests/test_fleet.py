"""Many hosts: three real agents on 127.0.0.2-4 with 1, 2 and 4 GPUs behind one controller.

Placement and pinning, the pending reasons, the admin's view, and inventory operations
done the admin's way: editing inventory.yaml (picked up by polling or SIGHUP) while
jobs run. Each test leaves the inventory as it found it.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests import cluster as cluster_mod
from tests.cluster import Cluster, User

# Competitions that pin jobs to hosts by label (every test host has `name: <host>`), a
# short time cap, and the default for everything else.
COMPETITIONS = """
competitions:
  on-node0: {labels: {name: node0}}
  on-node1: {labels: {name: node1}}
  on-node2: {labels: {name: node2}}
  on-node3: {labels: {name: node3}}
  not-node2: {labels: {pool: small}}
  short: {time_cap: 3}
"""
POOL = {"labels": {"pool": "small"}}  # node0 and node1 form the pool `small`

# Prints the GPUs it was given, then sleeps (seconds from the first argument of format).
SHOW_GPUS = ("import os, time\nprint(os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
             "time.sleep({})\n")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("fleet"), gpus=[1, 2, 4], inventory_extra=COMPETITIONS,
                heartbeat_timeout=2, node_lost_after=2, lease=3, lease_margin=1,
                inventory_poll=0.2)
    c.write_inventory(node0=POOL, node1=POOL)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def admin(fleet: Cluster) -> User:
    return fleet.user("admin", admin=True)


@pytest.fixture
def restore(fleet: Cluster, admin: User) -> Iterator[None]:
    """Put the three-host inventory back after a test that edits it."""
    yield
    fleet.write_inventory(fleet.agents[:3], node0=POOL, node1=POOL)
    r = requests.post(f"{fleet.url}/api/admin/reload", headers=admin.headers, timeout=30)
    assert r.status_code == 200, r.text
    fleet.wait_nodes(admin, lambda hosts: set(hosts) == {"node0", "node1", "node2"} and all(
        h["state"] == "up" for h in hosts.values()))


def submit(c: Cluster, code: str, competition: str = "test", gpus: int | None = None,
           **kw: Any) -> tuple[User, str]:
    user = c.user()
    extra = {"gpus": gpus} if gpus is not None else {}
    r = c.submit(user, code, wait=False, competition_id=competition, **extra, **kw)
    assert r.status_code == 202, r.text
    return user, r.json()["job_id"]


def status(c: Cluster, user: User, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = c.get(user, "status", job_id).json()
    return body


def finish(c: Cluster, user: User, job_id: str, timeout: float = 30) -> dict[str, Any]:
    return c.wait_status(user, job_id, {"completed", "failed", "cancelled"}, timeout)


# ---- placement and pinning -----------------------------------------------------------


def test_jobs_fill_the_fleet_exactly_and_see_only_their_gpus(fleet: Cluster,
                                                             admin: User) -> None:
    jobs = [submit(fleet, SHOW_GPUS.format(2), gpus=n) for n in (4, 2, 1)]
    running = [fleet.wait_status(u, j, {"running"}) for u, j in jobs]
    assert [(s["node"], len(s["gpus"])) for s in running] == [
        ("node2", 4), ("node1", 2), ("node0", 1)]
    # Every GPU of the fleet is taken, each by exactly one job, as the admin sees it.
    view = fleet.nodes(admin)
    on_gpus = {(h["name"], g["index"]): g["job_id"] for h in view["hosts"] for g in h["gpus"]}
    assert Counter(on_gpus.values()) == {jobs[0][1]: 4, jobs[1][1]: 2, jobs[2][1]: 1}
    # One more job waits, and says why, where, and when it should start.
    late_user, late = submit(fleet, SHOW_GPUS.format(0), expected_time=5)
    waiting = status(fleet, late_user, late)
    assert waiting["status"] == "pending"
    assert waiting["pending_reason"] == "waiting for a free GPU"
    assert waiting["queue_position"] == 1
    assert waiting["estimated_start"] is not None
    for (user, job_id), first in zip(jobs, running, strict=True):
        done = finish(fleet, user, job_id)
        assert done["status"] == "completed"
        out = fleet.get(user, "results", job_id).json()["stdout"]
        assert out == ",".join(str(i) for i in first["gpus"]) + "\n"
    assert finish(fleet, late_user, late)["status"] == "completed"
    assert status(fleet, late_user, late)["pending_reason"] is None


def test_a_job_no_host_could_ever_run_is_refused(fleet: Cluster) -> None:
    user = fleet.user()
    r = fleet.submit(user, "print(1)", gpus=5)
    assert r.status_code == 400
    assert r.json() == {"detail": "No host can ever run this job: no host has 5 GPUs"}
    r = fleet.submit(user, "print(1)", gpus=2, competition_id="on-node0")
    assert r.status_code == 400
    assert r.json()["detail"] == "No host can ever run this job: no host has 2 GPUs with " \
                                 "name=node0"


def test_a_refusal_follows_the_fleet(fleet: Cluster, admin: User, restore: None) -> None:
    """The verdict is kept between submits, and given again once the fleet changes."""
    user = fleet.user()
    for _ in range(2):
        r = fleet.submit(user, "print(1)", gpus=2, competition_id="on-node0", wait=False)
        assert r.status_code == 400, r.text
    before = fleet.gpu_counts["node0"]
    fleet.gpu_counts["node0"] = 2
    try:
        fleet.write_inventory(fleet.agents[:3], node0=POOL, node1=POOL)
    finally:
        fleet.gpu_counts["node0"] = before
    r = requests.post(f"{fleet.url}/api/admin/reload", headers=admin.headers, timeout=30)
    assert r.status_code == 200, r.text
    r = fleet.submit(user, "print(1)", gpus=2, competition_id="on-node0", wait=False)
    assert r.status_code == 202, r.text
    assert finish(fleet, user, r.json()["job_id"])["status"] == "completed"


def test_competition_time_cap(fleet: Cluster) -> None:
    user, job_id = submit(fleet, "print(1)", competition="short", expected_time=100)
    assert status(fleet, user, job_id)["time_limit"] == 3
    user, job_id = submit(fleet, "print(1)", expected_time=100)
    assert status(fleet, user, job_id)["time_limit"] == 200


# ---- the admin's view ------------------------------------------------------------------


def test_admin_view_needs_an_admin(fleet: Cluster, admin: User) -> None:
    user = fleet.user()
    for method, path in (("GET", "nodes"), ("POST", "reload")):
        r = requests.request(method, f"{fleet.url}/api/admin/{path}", headers=user.headers,
                             timeout=30)
        assert (r.status_code, r.json()) == (403, {"detail": "This needs an admin token"})
    r = requests.get(f"{fleet.url}/api/admin/nodes", timeout=30)
    assert r.status_code == 401
    view = fleet.nodes(admin)
    hosts = {h["name"]: h for h in view["hosts"]}
    assert {n: (h["state"], len(h["gpus"]), h["runtime"]) for n, h in hosts.items()} == {
        "node0": ("up", 1, "process"), "node1": ("up", 2, "process"),
        "node2": ("up", 4, "process")}
    assert hosts["node1"]["address"] == "127.0.0.3"
    heard = dt.datetime.fromisoformat(hosts["node2"]["last_heard"]).replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - heard).total_seconds()) < 10  # heartbeats: 1 s
    assert hosts["node2"]["down_since"] is None
    assert hosts["node0"]["labels"] == {"name": "node0", "pool": "small"}
    assert view["inventory"]["error"] is None


def test_nodes_command_prints_the_fleet(fleet: Cluster, admin: User) -> None:
    user, job_id = submit(fleet, SHOW_GPUS.format(3), competition="on-node1")
    fleet.wait_status(user, job_id, {"running"})
    out = subprocess.run(
        [sys.executable, "-m", "gpujobq.controller", "nodes", "--url", fleet.url,
         "--token", admin.token], capture_output=True, text=True, env=cluster_mod.env(),
        check=True, timeout=30).stdout
    lines = out.splitlines()
    assert any(line.startswith("node2") and " up " in line for line in lines)
    assert any(job_id in line and user.name in line and "busy" in line for line in lines)
    # On the controller host an admin needs no token: a short-lived one is made and revoked.
    out = subprocess.run(
        [sys.executable, "-m", "gpujobq.controller", "nodes", "--json", "--url", fleet.url,
         "--database", str(fleet.db_path)], capture_output=True, text=True,
        env=cluster_mod.env(), check=True, timeout=30).stdout
    assert '"node0"' in out
    finish(fleet, user, job_id)


# ---- inventory operations --------------------------------------------------------------


def test_drain_and_undrain_by_editing_the_inventory(fleet: Cluster, admin: User,
                                                   restore: None) -> None:
    runner, running = submit(fleet, SHOW_GPUS.format(2), competition="on-node2")
    fleet.wait_status(runner, running, {"running"})
    fleet.write_inventory(fleet.agents[:3], node0=POOL, node1=POOL, node2={"drain": "true"})
    fleet.wait_nodes(admin, lambda h: h["node2"]["state"] == "drained")
    big_user, big = submit(fleet, SHOW_GPUS.format(0), gpus=4)
    small_user, small = submit(fleet, SHOW_GPUS.format(0))
    assert finish(fleet, small_user, small)["node"] in {"node0", "node1"}
    waiting = status(fleet, big_user, big)
    assert (waiting["status"], waiting["pending_reason"]) == (
        "pending", "all eligible hosts drained")
    # The job that was running there finishes normally.
    assert finish(fleet, runner, running)["status"] == "completed"
    fleet.write_inventory(fleet.agents[:3], node0=POOL, node1=POOL)
    assert finish(fleet, big_user, big)["node"] == "node2"


def test_a_broken_edit_keeps_the_last_good_inventory(fleet: Cluster, admin: User,
                                                     restore: None) -> None:
    fleet.inventory.write_text(fleet.inventory.read_text().replace("port:", "prot:", 1))
    view = fleet.wait_nodes(admin, lambda h: True)
    deadline = time.monotonic() + 10
    while view["inventory"]["error"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
        view = fleet.nodes(admin)
    assert "$.hosts[0].prot" in view["inventory"]["error"]
    assert all(h["state"] == "up" for h in view["hosts"]) and len(view["hosts"]) == 3
    r = requests.post(f"{fleet.url}/api/admin/reload", headers=admin.headers, timeout=30)
    assert r.status_code == 400
    assert "the last good one stays" in r.json()["detail"]
    assert "$.hosts[0].prot" in r.json()["detail"]
    user, job_id = submit(fleet, "print('still running jobs')")
    assert finish(fleet, user, job_id)["status"] == "completed"


def test_add_a_host_then_remove_one_that_is_busy(fleet: Cluster, admin: User,
                                                 restore: None) -> None:
    extra = fleet.agents[3] if len(fleet.agents) > 3 else fleet.add_agent(1)
    extra.start()
    fleet.write_inventory(fleet.agents[:4], node0=POOL, node1=POOL)
    assert fleet.proc is not None
    fleet.proc.send_signal(signal.SIGHUP)  # (polling would see it too: see the SIGHUP test)
    fleet.wait_nodes(admin, lambda h: "node3" in h and h["node3"]["state"] == "up")
    user, job_id = submit(fleet, "print('on the new host')", competition="on-node3")
    done = finish(fleet, user, job_id)
    assert (done["status"], done["node"]) == ("completed", "node3")
    # Remove node0 while a job runs there: it drains, the job ends well, then it goes.
    user, job_id = submit(fleet, SHOW_GPUS.format(2), competition="on-node0")
    fleet.wait_status(user, job_id, {"running"})
    fleet.write_inventory([fleet.agents[1], fleet.agents[2], extra], node1=POOL)
    view = fleet.wait_nodes(admin, lambda h: h["node0"]["removing"])
    assert {h["name"]: h["state"] for h in view["hosts"]}["node0"] == "drained"
    assert finish(fleet, user, job_id)["status"] == "completed"
    fleet.wait_nodes(admin, lambda h: "node0" not in h)
    extra.stop()


def test_unknown_competitions_can_be_refused(fleet: Cluster, restore: None,
                                             admin: User) -> None:
    fleet.write_inventory(fleet.agents[:3], node0=POOL, node1=POOL,
                          extra=COMPETITIONS + "defaults: {unknown_competitions: refuse}\n")
    r = requests.post(f"{fleet.url}/api/admin/reload", headers=admin.headers, timeout=30)
    assert r.status_code == 200, r.text
    user = fleet.user()
    r = fleet.submit(user, "print(1)", competition_id="nope")
    assert r.status_code == 400
    assert r.json()["detail"] == ("Unknown competition_id 'nope' (this server runs: not-node2, "
                                  "on-node0, on-node1, on-node2, on-node3, short)")
    assert fleet.submit(user, "print(1)", competition_id="short").status_code == 200


# ---- host health -----------------------------------------------------------------------


def test_a_host_that_stops_answering_is_down_and_its_job_moves(fleet: Cluster,
                                                               admin: User) -> None:
    code = ("import os, time\nprint('attempt', os.environ['GPUJOBQ_ATTEMPT'], flush=True)\n"
            "time.sleep(600 if os.environ['GPUJOBQ_ATTEMPT'] == '1' else 0)\n")
    user, job_id = submit(fleet, code, competition="not-node2")
    first = fleet.wait_status(user, job_id, {"running"})
    agent = next(a for a in fleet.agents if a.name == first["node"])
    other = "node1" if agent.name == "node0" else "node0"
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGSTOP)  # alive, but silent: no heartbeats, no answers
    try:
        fleet.wait_nodes(admin, lambda h: h[agent.name]["state"] == "down")
        done = finish(fleet, user, job_id, timeout=60)
        assert (done["status"], done["attempt"], done["node"]) == ("completed", 2, other)
        assert fleet.get(user, "results", job_id).json()["stdout"] == "attempt 2\n"
        events = fleet._db.execute(
            "SELECT to_status, reason, detail FROM job_events WHERE job_id = ? ORDER BY id",
            [job_id]).fetchall()
        assert any(e[1] == "requeued" and "node lost" in e[2] for e in events), events
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    # Back: up again, and the attempt given up on (it would sleep 600 s) is stopped there
    # (by its lease running out, or the controller's cancel), which frees its GPU.
    fleet.wait_nodes(admin, lambda h: h[agent.name]["state"] == "up", timeout=60)
    fleet.wait_nodes(admin, lambda h: all(g["state"] == "free" for g in h[agent.name]["gpus"]),
                     timeout=30)
    log = fleet.log(agent.name)
    assert f"cancelling job {job_id} attempt 1" in log or f"job {job_id} attempt 1: stopped " \
        "by the agent: no word from the controller" in log


def test_pending_reason_when_the_only_eligible_host_is_down(fleet: Cluster,
                                                           admin: User) -> None:
    agent = fleet.agents[1]
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        fleet.wait_nodes(admin, lambda h: h["node1"]["state"] == "down")
        user, job_id = submit(fleet, "print(1)", competition="on-node1")
        body = status(fleet, user, job_id)
        assert (body["pending_reason"], body["estimated_start"]) == (
            "all eligible hosts down", None)
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    assert finish(fleet, user, job_id, timeout=60)["status"] == "completed"


def test_sighup_reloads_at_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With polling far off, SIGHUP alone applies an edit (`systemctl reload`)."""
    root = tmp_path_factory.mktemp("sighup")
    with cluster_mod.running(root, inventory_poll=3600) as c:
        admin = c.user("admin", admin=True)
        c.write_inventory(node0={"drain": "true"})
        time.sleep(0.5)
        assert c.nodes(admin)["hosts"][0]["state"] == "up"  # not polled
        assert c.proc is not None
        c.proc.send_signal(signal.SIGHUP)
        c.wait_nodes(admin, lambda h: h["node0"]["state"] == "drained", timeout=10)
