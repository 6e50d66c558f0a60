"""Jobs in hardened containers, against a real dockerd: hostile solutions end with a
clear status and reason, the host is unaffected, and the next job runs normally."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import Iterator

import docker
import pytest
from gpujobq.agent import containers, spool
from gpujobq.protocol import messages

from tests import cluster as cluster_mod
from tests.cluster import Cluster, User, live_output_while_running
from tests.docker_support import IMAGE, require_docker

MiB = 1 << 20
AGENT = ("--runtime", "docker", "--memory", str(256 * MiB), "--pids", "64", "--cpus", "1",
         "--tmp-size", str(16 * MiB), "--output-size", str(16 * MiB))
COMPETITIONS = """competitions:
  ghost:
    image: gpujobq-missing:never-built
  with-data:
    mounts: [{{source: {data}, target: /data}}]
"""


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_docker()
    root = tmp_path_factory.mktemp("docker")
    data = root / "data"
    data.mkdir(mode=0o755)
    (data / "train.csv").write_text("x,y\n1,2\n")
    data.chmod(0o755)
    extra = COMPETITIONS.format(data=data)
    with cluster_mod.running(root, agent_args=AGENT, inventory_extra=extra) as c:
        yield c


@pytest.fixture
def user(dc: Cluster) -> User:
    return dc.user()


def leftover_containers(settle: float = 10.0) -> list[str]:
    """gpujobq containers still there once the agent had time to remove finished ones.

    The agent removes a container right after it stored and sent the result, so the
    answer to a submit can arrive a moment before the removal.
    """
    client = docker.from_env()
    deadline = time.monotonic() + settle
    while True:
        names = [c.attrs.get("Names", ["?"])[0].lstrip("/") for c in client.containers.list(
            all=True, sparse=True, filters={"label": "gpujobq.job"})]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.05)


def check_healthy_after(dc: Cluster) -> None:
    """The next job on the same agent runs normally, and no container is left behind."""
    body = dc.submit(dc.user(), "print('next job ok')").json()
    assert (body["status"], body["stdout"]) == ("completed", "next job ok\n")
    assert leftover_containers() == []


def reason(dc: Cluster, user: User, job_id: str) -> str:
    return str(dc.get(user, "status", job_id).json()["reason"])


def test_health_reports_the_docker_runtime(dc: Cluster) -> None:
    import requests

    health = requests.get(f"{dc.url}/api/health", timeout=10).json()
    assert health["agents"]["node0"]["runtime"] == "docker"


def test_a_plain_job_in_a_container(dc: Cluster, user: User) -> None:
    code = (
        "import os\n"
        "print(os.getuid(), os.getgid(), os.getcwd(), os.environ['CUDA_VISIBLE_DEVICES'])\n"
        "print(open('config.yaml').read().strip().splitlines()[0])\n"
        "open('/output/result.json', 'w').write('{\"acc\": 1}')\n"
    )
    body = dc.submit(user, code).json()
    assert body["status"] == "completed", body
    first, second = body["stdout"].splitlines()[:2]
    uid, gid, cwd, gpus = first.split()
    assert (uid, gid, cwd) == ("65534", "65534", "/job")
    assert gpus in {"0", "1"}
    assert second == "competition_id: test"
    files = dc._db.execute("SELECT name, data FROM job_files WHERE job_id = ?",
                           [body["job_id"]]).fetchall()
    assert files == [("result.json", b'{"acc": 1}')]
    listed = dc.get(user, "artifacts", body["job_id"]).json()
    assert listed["files"] == [{"name": "result.json", "size": 10}]
    got = dc.get(user, "artifacts", f"{body['job_id']}/result.json")
    assert got.content == b'{"acc": 1}'
    assert leftover_containers() == []


def test_output_is_live_while_the_container_runs(dc: Cluster, user: User) -> None:
    live_output_while_running(dc, user)


def test_no_network(dc: Cluster, user: User) -> None:
    code = (
        "import os, socket\n"
        "print(sorted(os.listdir('/sys/class/net')))\n"
        "print(socket.getaddrinfo('localhost', 80)[0][4][0] in ('127.0.0.1', '::1'),\n"
        "      socket.gethostbyname(socket.gethostname()))  # torchrun --standalone needs\n"
        "s = socket.socket()\n"
        "s.settimeout(2)\n"
        f"s.connect(('127.0.0.1', {dc.port}))  # the controller's port on the host\n"
    )
    body = dc.submit(user, code).json()
    assert body["stdout"] == "['lo']\nTrue 127.0.1.1\n"
    assert body["status"] == "failed"
    assert "ConnectionRefusedError" in body["stderr"]
    check_healthy_after(dc)


def test_fork_bomb(dc: Cluster, user: User) -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    body = dc.submit(user, code, expected_time=2).json()
    assert body["status"] == "failed"
    assert reason(dc, user, body["job_id"]) == "timeout"
    check_healthy_after(dc)


def test_memory_past_the_limit(dc: Cluster, user: User) -> None:
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n"
    body = dc.submit(user, code).json()
    assert body["status"] == "failed"
    assert reason(dc, user, body["job_id"]) == "oom"
    assert body["exit_code"] == 137
    check_healthy_after(dc)


def test_filling_tmp(dc: Cluster, user: User) -> None:
    code = (
        "import itertools\n"
        "for i in itertools.count():\n"
        "    with open(f'/tmp/fill{i}', 'wb') as fh:\n"
        "        fh.write(b'x' * (4 << 20))\n"
    )
    body = dc.submit(user, code).json()
    assert body["status"] == "failed"
    assert reason(dc, user, body["job_id"]) == "exit_code"
    assert "No space left on device" in body["stderr"]
    check_healthy_after(dc)


def test_filling_the_output_folder(dc: Cluster, user: User) -> None:
    code = (
        "import itertools, time\n"
        "for i in itertools.count():\n"
        "    with open(f'/output/part{i}', 'wb') as fh:\n"
        "        fh.write(b'x' * (4 << 20))\n"
        "    time.sleep(0.05)\n"
    )
    body = dc.submit(user, code).json()
    assert body["status"] == "failed"
    assert reason(dc, user, body["job_id"]) == "output_limit"
    stored = dc._db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM job_files WHERE job_id = ?",
                            [body["job_id"]]).fetchone()[0]
    assert stored <= 16 * MiB
    check_healthy_after(dc)


def test_one_big_output_file_hits_the_file_size_limit(dc: Cluster, user: User) -> None:
    code = "with open('/output/big', 'wb') as fh:\n    fh.write(b'x' * (32 << 20))\n"
    body = dc.submit(user, code).json()
    assert body["status"] == "failed"
    assert "File too large" in body["stderr"]
    check_healthy_after(dc)


def test_a_gigabyte_on_stdout(dc: Cluster, user: User) -> None:
    code = (
        "import sys\n"
        "chunk = b'y' * (1 << 20)\n"
        "for _ in range(1024):\n"
        "    sys.stdout.buffer.write(chunk)\n"
    )
    body = dc.submit(user, code).json()
    assert body["status"] == "failed"
    assert reason(dc, user, body["job_id"]) == "output_limit"
    assert "[gpujobq: output truncated:" in body["stdout"]
    assert len(body["stdout"]) < 2 * MiB
    check_healthy_after(dc)


def test_sleeping_forever(dc: Cluster, user: User) -> None:
    body = dc.submit(user, "import time\ntime.sleep(10**6)\n", expected_time=1).json()
    assert body["status"] == "failed"
    assert reason(dc, user, body["job_id"]) == "timeout"
    check_healthy_after(dc)


def test_writing_the_root_filesystem(dc: Cluster, user: User) -> None:
    code = (
        "for path in ('/etc/evil', '/usr/bin/evil', '/job/solution.py', '/evil'):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('WROTE', path)\n"
        "    except OSError as exc:\n"
        "        print('denied', path, exc.errno)\n"
    )
    body = dc.submit(user, code).json()
    assert body["status"] == "completed"
    assert "WROTE" not in body["stdout"]
    assert body["stdout"].count("denied") == 4
    check_healthy_after(dc)


def test_setuid_mount_chroot(dc: Cluster, user: User) -> None:
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "attempts = {\n"
        "    'setuid': lambda: os.setuid(0),\n"
        "    'setgid': lambda: os.setgid(0),\n"
        "    'chroot': lambda: os.chroot('/tmp'),\n"
        "    'mount': lambda: libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None) == 0 or\n"
        "             (_ for _ in ()).throw(OSError(ctypes.get_errno(), 'mount')),\n"
        "}\n"
        "for name, attempt in attempts.items():\n"
        "    try:\n"
        "        attempt()\n"
        "        print('ALLOWED', name)\n"
        "    except OSError as exc:\n"
        "        print('denied', name, exc.errno)\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
        "print(open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0])\n"
    )
    body = dc.submit(user, code).json()
    assert body["status"] == "completed", body
    lines = body["stdout"].splitlines()
    assert "ALLOWED" not in body["stdout"]
    assert lines[:4] == ["denied setuid 1", "denied setgid 1", "denied chroot 1",
                         "denied mount 1"]
    assert lines[4:] == ["0000000000000000", "1"]  # no capabilities; no new privileges
    check_healthy_after(dc)


def test_environment_holds_no_secrets(dc: Cluster, user: User) -> None:
    code = "import json, os\nprint(json.dumps(dict(os.environ)))\n"
    body = dc.submit(user, code).json()
    env = json.loads(body["stdout"])
    assert user.token not in body["stdout"]
    allowed = {"PATH", "HOME", "LANG", "HOSTNAME", "PYTHONUNBUFFERED", "GPUJOBQ_JOB_ID",
               "GPUJOBQ_ATTEMPT", "GPUJOBQ_OUTPUT", "NVIDIA_VISIBLE_DEVICES",
               "NVIDIA_DRIVER_CAPABILITIES", "CUDA_VISIBLE_DEVICES"}
    assert set(env) <= allowed, set(env) - allowed
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"  # virtual GPUs: no device at all
    check_healthy_after(dc)


def test_symlink_to_a_host_file_in_the_output(dc: Cluster, user: User,
                                              tmp_path: pathlib.Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("HOST SECRET")
    secret.chmod(0o644)
    code = (
        "import os\n"
        f"os.symlink({str(secret)!r}, '/output/leak')\n"
        "os.symlink('/etc/shadow', '/output/shadow')\n"
        "os.mkfifo('/output/fifo')\n"
        "os.makedirs('/output/d')\n"
        "os.symlink('/', '/output/d/root')\n"
        "open('/output/ok.txt', 'w').write('fine')\n"
    )
    body = dc.submit(user, code).json()
    assert body["status"] == "completed", body
    files = dc._db.execute("SELECT name, data FROM job_files WHERE job_id = ?",
                           [body["job_id"]]).fetchall()
    assert files == [("ok.txt", b"fine")]
    assert "HOST SECRET" not in json.dumps(dc.get(user, "status", body["job_id"]).json())
    check_healthy_after(dc)


def test_missing_image_is_a_clear_infra_error(dc: Cluster, user: User) -> None:
    body = dc.submit(user, "print(1)", competition_id="ghost").json()
    assert body["status"] == "failed"
    status = dc.get(user, "status", body["job_id"]).json()
    assert status["reason"] == "infra_error"
    assert "gpujobq-missing:never-built" in status["detail"]
    check_healthy_after(dc)


def test_a_real_gpu_on_a_daemon_without_nvidia(tmp_path: pathlib.Path) -> None:
    require_docker()
    gpu = "      - {index: 0, uuid: GPU-00000000-0000-0000-0000-000000000000}"
    with cluster_mod.running(tmp_path, agent_args=AGENT, gpu_specs=gpu) as c:
        user = c.user()
        body = c.submit(user, "print(1)").json()
        assert body["status"] == "failed"
        status = c.get(user, "status", body["job_id"]).json()
        assert status["reason"] == "infra_error"
        assert "docker start failed" in status["detail"]
        assert "device driver" in status["detail"]
        assert leftover_containers() == []


class Quiet:
    def started(self) -> None: ...
    def output(self, stream: str, data: bytes) -> None: ...


async def test_a_repeated_run_of_one_attempt_never_starts_a_second_container(
    tmp_path: pathlib.Path,
) -> None:
    require_docker()
    rt = containers.DockerRuntime(docker.from_env(), host="idem-test", default_image=IMAGE,
                                  limits=containers.Limits(memory=256 * MiB, cpus=1))
    run = messages.RunJob(
        job_id="idem", attempt=1, time_limit=30, grace=1, config=b"a: 1\n",
        code=b"import time\nopen('/output/runs', 'a').write('x')\ntime.sleep(1)\nprint('done')",
    )
    workdir = spool.Spool(tmp_path / "spool").prepare(run)
    try:
        first, second = await asyncio.gather(
            rt.run(run, workdir, asyncio.Event(), Quiet()),
            rt.run(run, workdir, asyncio.Event(), Quiet()),
        )
    finally:
        await rt.release("idem", 1)
    assert first.reason == second.reason == "exit_code"
    assert first.stdout == second.stdout == b"done\n"
    assert [(f.name, f.data) for f in first.files] == [("runs", b"x")]
    assert leftover_containers() == []


def test_competition_data_is_mounted_read_only(dc: Cluster, user: User) -> None:
    code = (
        "import errno\n"
        "print(open('/data/train.csv').read(), end='')\n"
        "try:\n"
        "    open('/data/new.csv', 'w')\n"
        "except OSError as e:\n"
        "    print('write refused:', errno.errorcode[e.errno])\n"
    )
    r = dc.submit(user, code, competition_id="with-data")
    body = r.json()
    assert (r.status_code, body["exit_code"]) == (200, 0), body
    assert body["stdout"] == "x,y\n1,2\nwrite refused: EROFS\n"
    check_healthy_after(dc)
