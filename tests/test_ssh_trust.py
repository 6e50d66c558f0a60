"""SSH trust between the controller and its agents, with real processes on 127.0.0.x.

Every host's key is pinned in inventory.yaml (there is no trust on first use: a host
without a pinned key is refused when the inventory loads, tests/unit/test_inventory.py).
The agent side (unknown client keys, no shell, no forwarding, no SFTP) is in
tests/test_agent_ssh.py.
"""

from __future__ import annotations

import pathlib
import time

from gpujobq.protocol import sshkeys

from tests import cluster as cluster_mod
from tests.cluster import Cluster


def _spool_entries(c: Cluster) -> list[str]:
    spool = c.agents[0].dir / "spool"
    return sorted(p.name for p in spool.iterdir()) if spool.exists() else []


def test_an_agent_whose_host_key_changed_gets_nothing(tmp_path: pathlib.Path) -> None:
    with cluster_mod.running(tmp_path / "c", heartbeat_timeout=2) as c:
        admin, user = c.user("admin", admin=True), c.user()
        agent = c.agents[0]
        before = _spool_entries(c)
        # The host comes back with another key (a reinstall, or someone else answering
        # on its address): the pinned key no longer matches.
        agent.stop()
        for path in (agent.host_key, pathlib.Path(f"{agent.host_key}.pub")):
            path.unlink()
        sshkeys.ensure_private_key(agent.host_key, comment="impostor")
        agent.start()
        fleet = c.wait_nodes(admin, lambda hosts: hosts[agent.name]["state"] == "down"
                             and "host key" in (hosts[agent.name]["error"] or "").lower())
        assert not fleet["hosts"][0]["connected"]

        job_id = c.submit(user, "print('ran')", wait=False).json()["job_id"]
        time.sleep(3)
        status = c.get(user, "status", job_id).json()
        assert (status["status"], status["attempt"]) == ("pending", 0)
        assert status["pending_reason"] == "all eligible hosts down"
        assert _spool_entries(c) == before  # nothing reached the agent
        assert job_id not in agent.dir.joinpath("agent.log").read_text()

        # The admin checks the new key and pins it: the job runs.
        c.write_inventory()  # host_key_file is the agent's (new) public key
        done = c.wait_status(user, job_id, {"completed", "failed"}, timeout=30)
        assert done["status"] == "completed"
        assert c.get(user, "results", job_id).json()["stdout"] == "ran\n"
