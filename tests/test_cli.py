"""What an admin types: the controller's user/token commands, `make up`'s script, units."""

from __future__ import annotations

import configparser
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import requests
from gpujobq.agent import __main__ as agent_main
from gpujobq.controller import __main__ as controller_main

from tests import cluster as cluster_mod

BIN = pathlib.Path(sys.executable).parent


def admin(cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpujobq.controller", *args], cwd=cwd,
                          env=cluster_mod.env(), capture_output=True, text=True, timeout=60)


def test_user_and_token_commands_share_the_project_database(tmp_path: pathlib.Path) -> None:
    with cluster_mod.running(tmp_path / "c") as c:
        # `cd project && gpujobq-controller user add NAME`, no flags: var/gpujobq.db there.
        project = tmp_path / "project"
        (project / "var").mkdir(parents=True)
        (project / "var" / "gpujobq.db").symlink_to(c.db_path)
        added = admin(project, "user", "add", "carol")
        assert added.returncode == 0, added.stderr
        token = added.stdout.strip()
        assert re.fullmatch(r"gjq_[A-Za-z0-9_-]{40,}", token)
        headers = {"Authorization": f"Bearer {token}"}
        jobs = requests.get(f"{c.url}/api/jobs", params={"user_id": "carol"}, headers=headers,
                            timeout=10)
        assert (jobs.status_code, jobs.json()) == (200, [])

        second = admin(project, "token", "issue", "carol").stdout.strip()
        assert second != token
        listing = admin(project, "token", "list", "carol").stdout
        assert token not in listing and second not in listing
        ids = re.findall(r"^([0-9a-f]{12}) +carol .* active$", listing, flags=re.M)
        assert len(ids) == 2
        revoked = admin(project, "token", "revoke", ids[0])
        assert revoked.returncode == 0
        assert "revoked" in admin(project, "token", "list", "carol").stdout
        answers = [
            requests.get(f"{c.url}/api/jobs", params={"user_id": "carol"}, timeout=10,
                         headers={"Authorization": f"Bearer {t}"}).status_code
            for t in (token, second)
        ]
        assert answers == [401, 200]
        assert admin(project, "token", "revoke", ids[0]).returncode == 1
        bad = admin(project, "user", "add", "../evil")
        assert bad.returncode == 1 and "user id" in bad.stderr
        assert admin(project, "token", "issue", "nobody").returncode == 1


def test_make_up_script(tmp_path: pathlib.Path) -> None:
    if not (BIN / "gpujobq-controller").exists():
        pytest.skip("console scripts are not installed beside this interpreter")
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    for script in ("up.sh", "build-job-image.sh"):
        shutil.copy(cluster_mod.ROOT / "scripts" / script, project / "scripts" / script)
    port, agent_port = cluster_mod.free_port(), cluster_mod.free_port()
    inventory = (cluster_mod.ROOT / "inventory.yaml").read_text()
    (project / "inventory.yaml").write_text(inventory.replace("port: 8022", f"port: {agent_port}"))
    env = {**cluster_mod.env(), "GPUJOBQ_BIN": str(BIN), "GPUJOBQ_PORT": str(port),
           "GPUJOBQ_AGENT_PORT": str(agent_port)}

    def up() -> tuple[subprocess.Popen[str], list[str]]:
        proc = subprocess.Popen(["bash", "scripts/up.sh"], cwd=project, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not lines or "Ctrl-C" not in lines[-1]:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        return proc, lines

    def down(proc: subprocess.Popen[str]) -> None:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(30) == 0

    proc, lines = up()
    try:
        submit = next(line.strip() for line in lines if line.strip().startswith("curl -X POST"))
        listing = next(line.strip() for line in lines if "api/jobs?user_id=demo" in line)
        assert re.search(r'-H "Authorization: Bearer gjq_[^"]+"', submit)
        run = subprocess.run([*shlex.split(submit), "-s"], cwd=project, capture_output=True,
                             text=True, timeout=60)
        body = json.loads(run.stdout)
        assert body["status"] == "completed"
        assert body["stdout"].startswith("Hello from GPU")
        # The printed admin command works as printed, from the project folder, no token.
        nodes = next(line.strip() for line in lines if line.strip().endswith("controller nodes"))
        fleet = subprocess.run(shlex.split(nodes.replace(".venv/bin", str(BIN))), cwd=project,
                               env=env, capture_output=True, text=True, timeout=60)
        assert fleet.returncode == 0, fleet.stderr
        assert re.search(r"^local +up +127\.0\.0\.1:\d+ ", fleet.stdout, re.M), fleet.stdout
        # So does the gpujobq line, with the client settings it wrote.
        cli = next(line.strip() for line in lines if "bin/gpujobq submit" in line)
        assignment, *argv = shlex.split(cli)
        name, value = assignment.split("=", 1)
        argv[0] = argv[0].replace(".venv/bin", str(BIN), 1)
        run = subprocess.run(argv, cwd=project, env={**env, name: value},
                             capture_output=True, text=True, timeout=60)
        assert (run.returncode, run.stdout.startswith("Hello from GPU")) == (0, True), run
        cli_job = re.search(r"job (\S+) submitted", run.stderr).group(1)  # type: ignore[union-attr]
        assert (project / "var/demo/gpujobq.yaml").stat().st_mode & 0o077 == 0
        assert re.search(r"The web board .*: http://127\.0\.0\.1:\d+/$",
                         "".join(lines), re.M)
        first_token = re.search(r"Bearer (gjq_[^\"]+)", submit).group(1)
    finally:
        down(proc)
    assert subprocess.run(["pgrep", "-f", str(project)], capture_output=True).returncode == 1

    proc, lines = up()  # a second run keeps the first one's data, with a fresh token
    try:
        listing = next(line.strip() for line in lines if "api/jobs?user_id=demo" in line)
        assert first_token not in listing
        run = subprocess.run([*shlex.split(listing), "-s"], capture_output=True, text=True,
                             timeout=60)
        jobs = json.loads(run.stdout)
        assert [j["job_id"] for j in jobs] == [cli_job, body["job_id"]]
    finally:
        down(proc)


@pytest.mark.parametrize("unit", ["gpujobq-controller", "gpujobq-agent"])
def test_systemd_units_start_a_real_command(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(cluster_mod.ROOT / "systemd" / f"{unit}.service")
    service = parser["Service"]
    argv = shlex.split(service["ExecStart"])
    assert pathlib.PurePath(argv[0]).name == unit
    assert service["NoNewPrivileges"] == "yes"
    assert service["User"] != "root"
    main = controller_main if unit == "gpujobq-controller" else agent_main
    args = main._parser().parse_args(argv[1:])  # every flag in the unit exists
    assert args.func.__name__ == "_serve"


def test_gpu_check_script_runs_end_to_end_in_self_test_mode() -> None:
    """scripts/gpu-check on virtual GPUs (no NVML, no torch): the real device run's path,
    from start-up to cancel and timeout checks, does not rot between GPU sessions."""
    run = subprocess.run(
        [sys.executable, str(cluster_mod.ROOT / "scripts" / "gpu-check"), "--python",
         sys.executable, "--install", "never", "--selftest-virtual", "2"],
        capture_output=True, text=True, timeout=240, env=cluster_mod.env())
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "RESULT: PASS (SELF-TEST" in run.stdout
    assert "0 failed" in run.stdout


def test_admin_commands_mint_a_token_only_for_a_local_controller(tmp_path: pathlib.Path) -> None:
    # Refused before any connection is tried: a minted admin token never travels.
    far = admin(tmp_path, "nodes", "--url", "http://192.0.2.10:8001")
    assert far.returncode == 1
    assert "is not on this machine: pass an admin's --token" in far.stderr
    # A participant who happens to be called gpujobq-admin is never made an admin.
    assert admin(tmp_path, "user", "add", "gpujobq-admin").returncode == 0
    port = cluster_mod.free_port()
    taken = admin(tmp_path, "reload", "--url", f"http://127.0.0.1:{port}")
    assert taken.returncode == 1
    assert "user gpujobq-admin exists and is not an admin" in taken.stderr
    # With an admin of its own, a stopped controller is named as such.
    (tmp_path / "var" / "gpujobq.db").unlink()
    down = admin(tmp_path, "nodes", "--url", f"http://127.0.0.1:{port}")
    assert down.returncode == 1 and "is the controller running?" in down.stderr
