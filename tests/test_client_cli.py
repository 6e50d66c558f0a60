"""The `gpujobq` command as a user runs it, against a real cluster (real uvicorn, a real
agent running jobs as local processes, real SQLite): submit streams the output and exits
with the job's code, the pending line while the only GPU is busy, squeue-like tables,
--json, cancel, logs -f, Ctrl-C, the config file, clear errors, a controller restart.

Jobs that must stay running wait for a gate file the test creates: nothing here sleeps.
"""

from __future__ import annotations

import json
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from gpujobq.client import api

from tests import cluster as cluster_mod
from tests.cluster import Cluster, User

EXE = pathlib.Path(sys.executable).parent / "gpujobq"
COMMAND = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "gpujobq.client"]
HEADER = re.compile(r"^ID +ST +COMPETITION +NODE +TIME +REASON$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
GATED = """import os, sys, time
print('first', flush=True)
while not os.path.exists({gate!r}):  # the test opens the gate
    time.sleep(0.02)
print('second', flush=True)
print('to stderr', file=sys.stderr, flush=True)
sys.exit({code})
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # One GPU: a job holding it makes the next one wait.
    with cluster_mod.running(tmp_path_factory.mktemp("cli"), gpus=1, active_limit=50,
                             submit_limit=1000) as c:
        yield c


@pytest.fixture
def user(cluster: Cluster) -> Iterator[User]:
    user = cluster.user()
    yield user
    # A failed test must not leave the only GPU taken for the next one.
    for job in cluster.get(user, "jobs").json():
        if job["status"] in ("pending", "running"):
            cluster.cancel(user, job["job_id"])


class Gq:
    """Runs `gpujobq` as the user would: server and token in the environment, a home of
    its own (no config file unless a test writes one), in a folder with the job files."""

    def __init__(self, cluster: Cluster, user: User, folder: pathlib.Path) -> None:
        self.cluster, self.user, self.folder = cluster, user, folder
        self.env = {**cluster_mod.env(), "HOME": str(folder / "home"),
                    "GPUJOBQ_SERVER": cluster.url, "GPUJOBQ_TOKEN": user.token}
        self.env.pop("XDG_CONFIG_HOME", None)

    def job(self, code: str, name: str = "solution.py", **fields: Any) -> pathlib.Path:
        """solution.py (as ``name``) and a config.yaml beside it."""
        config = {"competition_id": "cli-test", "project_id": "demo",
                  "user_id": self.user.name, "expected_time": 30, **fields}
        (self.folder / "config.yaml").write_text(
            "".join(f"{k}: {v}\n" for k, v in config.items()))
        (self.folder / name).write_text(code)
        return self.folder / name

    def gate(self, name: str = "gate") -> pathlib.Path:
        return self.folder / name

    def __call__(self, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*COMMAND, *args], cwd=self.folder, env=env or self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str) -> Running:
        return Running([*COMMAND, *args], self.folder, self.env)

    def submit_held(self, code: int = 0, **fields: Any) -> str:
        """A job that prints 'first' and holds the GPU until its gate opens; its id."""
        self.job(GATED.format(gate=str(self.gate()), code=code), **fields)
        done = self("submit", "--no-wait", "solution.py", "config.yaml")
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


class Running:
    """A `gpujobq` command still running: its lines as they come, without sleeping."""

    def __init__(self, command: list[str], cwd: pathlib.Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines: dict[str, queue.Queue[str | None]] = {"stdout": queue.Queue(),
                                                           "stderr": queue.Queue()}
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.readers = [threading.Thread(target=self._read, args=(name, pipe), daemon=True)
                        for name, pipe in (("stdout", self.proc.stdout),
                                           ("stderr", self.proc.stderr))]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str, pipe: Any) -> None:
        for line in pipe:
            self.lines[name].put(line.decode())
        self.lines[name].put(None)

    def expect(self, stream: str, needle: str, timeout: float = 30) -> str:
        """The first line from here on of ``stream`` that holds ``needle``."""
        while True:
            try:
                line = self.lines[stream].get(timeout=timeout)
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"no {needle!r} in {stream}: {self.seen}")
            self.seen[stream].append(line)
            if needle in line:
                return line

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Exit status, and all of stdout and stderr."""
        code = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(timeout)
        for name, lines in self.lines.items():
            while (line := lines.get(timeout=timeout)) is not None:  # its reader's end
                self.seen[name].append(line)
        return code, "".join(self.seen["stdout"]), "".join(self.seen["stderr"])


@pytest.fixture
def gq(cluster: Cluster, user: User, tmp_path: pathlib.Path) -> Gq:
    return Gq(cluster, user, tmp_path)


def clean(stderr: str) -> None:
    """A user-facing error: one message, no traceback."""
    assert "Traceback" not in stderr and stderr.startswith("gpujobq: "), stderr


# ---- submit --------------------------------------------------------------------------


def test_submit_streams_the_output_live_and_exits_with_the_jobs_code(gq: Gq) -> None:
    gq.job(GATED.format(gate=str(gq.gate()), code=3))
    run = gq.start("submit", "solution.py", "config.yaml")
    job_id = run.expect("stderr", "submitted").split()[2]
    run.expect("stdout", "first")  # printed while the job still runs: it waits for the gate
    gq.gate().touch()
    code, stdout, stderr = run.finish()
    assert code == 3
    assert stdout == "first\nsecond\n"
    assert stderr.splitlines() == [
        f"gpujobq: job {job_id} submitted", f"gpujobq: job {job_id} running on node0",
        "to stderr", f"gpujobq: job {job_id} failed with exit code 3"]


def test_no_wait_prints_only_the_id_and_logs_follow_to_the_end(gq: Gq) -> None:
    job_id = gq.submit_held(code=0)
    assert UUID.match(job_id)
    follow = gq.start("logs", "-f", job_id)
    assert follow.expect("stdout", "first") == "first\n"
    gq.gate().touch()
    code, stdout, stderr = follow.finish()
    assert (code, stdout, stderr) == (0, "first\nsecond\n", "to stderr\n")
    again = gq("logs", job_id)  # without -f: what there is, once
    assert (again.returncode, again.stdout, again.stderr) == (0, "first\nsecond\n",
                                                              "to stderr\n")


def test_json_logs_follow_exits_with_the_jobs_code(gq: Gq) -> None:
    job_id = gq.submit_held(code=3)
    gq.gate().touch()
    done = gq("logs", "-f", "--json", job_id)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 3, done.stderr
    assert events[-1] == {"event": "end", "data": {"status": "failed", "exit_code": 3,
                                                   "reason": "exit_code"}}
    assert gq("logs", "--json", job_id).returncode == 0  # without -f: what there is


def test_artifacts_are_listed_and_fetched(gq: Gq, tmp_path: pathlib.Path) -> None:
    gq.job("import os, pathlib\nout = pathlib.Path(os.environ['GPUJOBQ_OUTPUT'])\n"
           "(out / 'plots').mkdir()\n(out / 'plots' / 'loss.csv').write_text('1,0.5\\n')\n"
           "(out / 'model.bin').write_bytes(bytes(range(256)))\n")
    done = gq("submit", "solution.py", "config.yaml")
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"job (\S+) submitted", done.stderr).group(1)  # type: ignore[union-attr]
    listed = gq("artifacts", job_id)
    assert (listed.returncode, listed.stdout.split()) == (
        0, ["NAME", "SIZE", "model.bin", "256", "plots/loss.csv", "6"])
    fetched = gq("artifacts", job_id, "-o", str(tmp_path / "got"))
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "got" / "model.bin").read_bytes() == bytes(range(256))
    assert (tmp_path / "got" / "plots" / "loss.csv").read_text() == "1,0.5\n"
    one = gq("artifacts", "--json", job_id, "model.bin", "-o", str(tmp_path / "one"))
    assert json.loads(one.stdout) == [str(tmp_path / "one" / "model.bin")]
    missing = gq("artifacts", job_id, "nope.txt")
    assert (missing.returncode, missing.stderr) == (
        2, f"gpujobq: job {job_id} has no artifact named nope.txt\n")


def test_a_waiting_job_shows_its_place_in_the_queue(gq: Gq) -> None:
    holder = gq.submit_held()
    gq.job("print('my turn')", name="next.py")
    run = gq.start("submit", "next.py", "config.yaml")
    waiting = run.expect("stderr", "pending")
    # stderr is no terminal here: one line, repeated only when the position changes
    assert re.fullmatch(r"gpujobq: pending: waiting for a free GPU; position 1, "
                        r"start ~\d\d:\d\d:\d\d \(in \d+s\)\n", waiting), waiting
    job_id = run.seen["stderr"][0].split()[2]

    table = gq("jobs")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert HEADER.match(lines[0]), lines
    assert re.fullmatch(rf"{job_id} +PD +cli-test +- +0:00 +waiting for a free GPU; "
                        r"position 1, start ~.*", lines[1]), lines
    assert re.fullmatch(rf"{holder} +R +cli-test +node0 +0:0\d +-", lines[2]), lines
    status = gq("status", "--json", job_id)
    assert json.loads(status.stdout)["queue_position"] == 1

    gq.gate().touch()
    code, stdout, stderr = run.finish()
    assert (code, stdout) == (0, "my turn\n")
    assert stderr.count("pending") == 1  # (it may end before a poll sees it running)


def test_json_submit_prints_only_the_result(gq: Gq) -> None:
    gq.job("import sys\nprint('{\"score\": 1}')\nsys.exit(4)\n")
    done = gq("submit", "--json", "solution.py", "config.yaml")
    assert done.returncode == 4
    result = json.loads(done.stdout)
    assert result == {"job_id": result["job_id"], "status": "failed",
                      "stdout": '{"score": 1}\n', "stderr": "", "exit_code": 4}
    no_wait = gq("submit", "--json", "--no-wait", "solution.py", "config.yaml")
    assert json.loads(no_wait.stdout)["status"] in ("pending", "running")


def test_a_job_past_its_time_limit_exits_124(gq: Gq) -> None:
    gq.job("import time\nprint('start', flush=True)\ntime.sleep(60)\n", expected_time=0.5)
    done = gq("submit", "solution.py", "config.yaml")
    assert (done.returncode, done.stdout) == (124, "start\n")
    assert done.stderr.endswith("failed: ran past its time limit\n")


def test_ctrl_c_detaches_and_the_job_goes_on(gq: Gq) -> None:
    gq.job(GATED.format(gate=str(gq.gate()), code=0))
    run = gq.start("submit", "solution.py", "config.yaml")
    job_id = run.expect("stderr", "submitted").split()[2]
    run.expect("stdout", "first")
    run.proc.send_signal(signal.SIGINT)
    code, _, stderr = run.finish()
    assert code == 130
    assert f"  follow it: gpujobq logs -f {job_id}\n  cancel it: gpujobq cancel {job_id}\n" \
        in stderr
    clean(stderr)
    assert json.loads(gq("status", "--json", job_id).stdout)["status"] == "running"

    follow = gq.start("logs", "-f", job_id)
    follow.expect("stdout", "first")
    cancelled = gq("cancel", job_id)
    assert (cancelled.returncode, cancelled.stdout) == (0, f"{job_id} cancelled\n")
    code, stdout, stderr = follow.finish()
    assert (code, stdout) == (143, "first\n")
    assert stderr == f"gpujobq: job {job_id} cancelled\n"
    again = gq("cancel", job_id)
    assert again.returncode == 2
    assert again.stderr == f"gpujobq: {job_id}: Job already finished with status cancelled\n"


# ---- tables and JSON ------------------------------------------------------------------


def test_status_and_jobs_tables_and_their_json(gq: Gq, cluster: Cluster, user: User) -> None:
    ids = {}
    for name, code in (("ok", "print('fine')"), ("bad", "import sys\nsys.exit(3)")):
        gq.job(code, competition_id=f"comp-{name}")
        done = gq("submit", "solution.py", "config.yaml")
        ids[name] = done.stderr.split()[2]
    ids["gone"] = held = gq.submit_held(competition_id="comp-gone")
    assert gq("cancel", held).returncode == 0

    status = gq("status", ids["ok"], ids["bad"], ids["gone"])
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert HEADER.match(lines[0])
    assert re.fullmatch(rf"{ids['ok']} +CD +comp-ok +node0 +0:0\d +exit 0", lines[1]), lines
    assert re.fullmatch(rf"{ids['bad']} +F +comp-bad +node0 +0:0\d +exit 3", lines[2]), lines
    assert re.fullmatch(rf"{ids['gone']} +CA +comp-gone +node0 +0:0\d +cancelled_by_user",
                        lines[3]), lines

    listed = gq("jobs")
    assert listed.stdout.splitlines()[1:] == [lines[3], lines[2], lines[1]]  # newest first
    as_json = [json.loads(line) for line in gq("status", "--json", ids["bad"],
                                                ids["ok"]).stdout.splitlines()]
    assert [(j["job_id"], j["status"], j["exit_code"]) for j in as_json] == [
        (ids["bad"], "failed", 3), (ids["ok"], "completed", 0)]
    rows = json.loads(gq("jobs", "--json").stdout)
    assert [(r["job_id"], r["competition_id"], r["node"]) for r in rows] == [
        (ids["gone"], "comp-gone", "node0"), (ids["bad"], "comp-bad", "node0"),
        (ids["ok"], "comp-ok", "node0")]
    one = gq("jobs", "--limit", "1")
    assert one.stdout.splitlines()[1:] == [lines[3]]
    assert one.stderr == "gpujobq: the newest 1 jobs shown; --all for every one\n"
    assert gq("jobs", "--all").stdout == listed.stdout

    results = gq("results", ids["ok"])
    assert (results.stdout, results.stderr) == ("fine\n", "")
    assert json.loads(gq("results", "--json", ids["bad"]).stdout)["exit_code"] == 3

    # The Python client: pages by cursor, and the same answers.
    with api.Client(cluster.url, user.token) as client:
        assert [j["job_id"] for j in client.iter_jobs(page=1)] == [
            ids["gone"], ids["bad"], ids["ok"]]
        assert client.jobs(limit=2).next_cursor is not None
        assert client.results(ids["ok"])["stdout"] == "fine\n"
        events = list(client.logs(ids["bad"]))
        assert [e.event for e in events] == ["end"]
        with pytest.raises(api.ApiError) as caught:
            client.status("no-such-job")
        assert (caught.value.status, caught.value.detail) == (404, "Job not found")


# ---- configuration and errors ------------------------------------------------------------


def test_the_config_file(gq: Gq, user: User, cluster: Cluster) -> None:
    no_env = {k: v for k, v in gq.env.items() if not k.startswith("GPUJOBQ_")}
    default = pathlib.Path(no_env["HOME"]) / ".config" / "gpujobq" / "config.yaml"
    default.parent.mkdir(parents=True)
    default.write_text(f"server: {cluster.url}\ntoken: {user.token}\n")
    default.chmod(0o600)
    done = gq("jobs", env=no_env)
    assert (done.returncode, done.stderr) == (0, "")
    assert HEADER.match(done.stdout)

    default.chmod(0o644)
    warned = gq("jobs", env=no_env)
    assert warned.returncode == 0
    assert warned.stderr == (f"gpujobq: warning: {default} holds a token and is readable by "
                             f"others (mode 0644); run: chmod 600 {default}\n")

    other = gq.folder / "elsewhere.yaml"
    other.write_text(f"server: {cluster.url.removeprefix('http://')}\ntoken: wrong\n")
    other.chmod(0o600)
    refused = gq("jobs", env={**no_env, "GPUJOBQ_CONFIG": str(other)})
    assert refused.returncode == 2
    assert refused.stderr == ("gpujobq: Invalid or expired token (HTTP 401); the token is from "
                              f"{other}\n")
    # The environment wins over the file, --config over GPUJOBQ_CONFIG.
    env_token = gq("jobs", env={**no_env, "GPUJOBQ_CONFIG": str(other),
                                "GPUJOBQ_TOKEN": user.token})
    assert env_token.returncode == 0, env_token.stderr
    assert gq("--config", str(default), "jobs",
              env={**no_env, "GPUJOBQ_CONFIG": str(other)}).returncode == 0
    typo = gq.folder / "typo.yaml"
    typo.write_text("sever: x\n")
    bad = gq("--config", str(typo), "jobs", env=no_env)
    assert bad.returncode == 2 and "unknown field `sever`" in bad.stderr


def test_errors_are_one_clear_line(gq: Gq, user: User) -> None:
    bare = {k: v for k, v in gq.env.items() if not k.startswith("GPUJOBQ_")}
    cases = [
        (("jobs",), {"GPUJOBQ_TOKEN": "gjq_not_a_token"},
         "gpujobq: Invalid or expired token (HTTP 401); the token is from $GPUJOBQ_TOKEN\n"),
        (("status", "no-such-job"), {}, "gpujobq: no-such-job: Job not found\n"),
        (("results", "no-such-job"), {}, "gpujobq: Job not found (HTTP 404)\n"),
        (("submit", "missing.py", "config.yaml"), {},
         "gpujobq: cannot read missing.py: No such file or directory\n"),
    ]
    gq.job("print(1)")
    for args, env, message in cases:
        done = gq(*args, env={**gq.env, **env})
        assert (done.returncode, done.stderr) == (2, message), args
    port = cluster_mod.free_port()
    down = gq("jobs", env={**gq.env, "GPUJOBQ_SERVER": f"http://127.0.0.1:{port}"})
    assert down.returncode == 2
    assert down.stderr.startswith(f"gpujobq: cannot reach http://127.0.0.1:{port}: ")
    assert down.stderr.endswith("(is the server running?)\n")
    missing = gq("jobs", env=bare)
    assert missing.returncode == 2
    assert missing.stderr.startswith("gpujobq: no server and token configured: set "
                                     "GPUJOBQ_SERVER and GPUJOBQ_TOKEN")
    (gq.folder / "config.yaml").write_text(f"user_id: someone-else\n{gq.folder.name}: 1\n")
    refused = gq("submit", "solution.py", "config.yaml")
    assert refused.returncode == 2 and refused.stderr.startswith("gpujobq: config.yaml")
    for done in (down, missing, refused):
        clean(done.stderr)
    assert requests.get(f"{gq.cluster.url}/api/jobs", headers=user.headers,
                        timeout=10).json() == []  # nothing was submitted


def test_a_requeued_job_prints_its_output_again_from_the_start(gq: Gq,
                                                              cluster: Cluster) -> None:
    admin = cluster.user("admin", admin=True)
    gq.job(GATED.format(gate=str(gq.gate()), code=0))
    run = gq.start("submit", "solution.py", "config.yaml")
    job_id = run.expect("stderr", "submitted").split()[2]
    run.expect("stdout", "first")
    r = requests.post(f"{cluster.url}/api/admin/requeue/{job_id}", headers=admin.headers,
                      timeout=30)
    assert r.status_code == 200, r.text
    run.expect("stderr", "runs again; its output starts over")
    run.expect("stdout", "first")  # the second attempt's own output
    gq.gate().touch()
    code, stdout, _ = run.finish()
    assert (code, stdout) == (0, "first\nfirst\nsecond\n")


def test_submit_rides_out_a_controller_restart(gq: Gq, cluster: Cluster) -> None:
    gq.job(GATED.format(gate=str(gq.gate()), code=0))
    run = gq.start("submit", "solution.py", "config.yaml")
    run.expect("stdout", "first")
    cluster_mod._stop(cluster.proc)
    cluster.start_controller()
    gq.gate().touch()
    code, stdout, stderr = run.finish(timeout=90)
    assert (code, stdout) == (0, "first\nsecond\n")  # nothing printed twice
    assert "; trying again\n" in stderr  # it saw the server go, and came back
    assert "Traceback" not in stderr and stderr.endswith("to stderr\n")
