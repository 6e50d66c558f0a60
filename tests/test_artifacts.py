"""Artifacts: what a job leaves in $GPUJOBQ_OUTPUT is listed and downloaded by its owner
(GET /api/artifacts/{job_id} and /{name}), against a real controller and agent (process
runtime; tests/test_docker.py checks /output of a container the same way)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
import requests

from tests.cluster import Cluster, User, running

WRITER = """\
import os, pathlib
out = pathlib.Path(os.environ["GPUJOBQ_OUTPUT"])
(out / "metrics.json").write_text('{"acc": 0.93}')
(out / "plots").mkdir()
(out / "plots" / "loss curve.png").write_bytes(bytes(range(256)) * 4)
(out / "index.html").write_text("<script>alert(1)</script>")
os.symlink("/etc/passwd", out / "passwd")
print("done")
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running(tmp_path_factory.mktemp("artifacts"), gpus=2, submit_limit=100) as c:
        yield c


@pytest.fixture
def user(cluster: Cluster) -> User:
    return cluster.user()


def test_files_are_listed_and_downloaded_exactly(cluster: Cluster, user: User) -> None:
    body = cluster.submit(user, WRITER).json()
    assert body["status"] == "completed", body
    job_id = body["job_id"]
    listed = cluster.get(user, "artifacts", job_id)
    assert listed.status_code == 200, listed.text
    assert listed.json() == {
        "job_id": job_id, "status": "completed", "final": True,
        "files": [{"name": "index.html", "size": 25}, {"name": "metrics.json", "size": 13},
                  {"name": "plots/loss curve.png", "size": 1024}],
    }
    # The link to a host file is not followed: it is named as skipped.
    status = cluster.get(user, "status", job_id).json()
    assert status["detail"] == "skipped in output: passwd"

    got = cluster.get(user, "artifacts", f"{job_id}/plots/{urllib.parse.quote('loss curve.png')}")
    assert got.status_code == 200
    assert got.content == bytes(range(256)) * 4
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"] == (
        "attachment; filename=\"loss curve.png\"; filename*=UTF-8''loss%20curve.png")

    # A job's HTML is never rendered on the controller's origin.
    page = cluster.get(user, "artifacts", f"{job_id}/index.html")
    assert page.content == b"<script>alert(1)</script>"
    assert page.headers["content-type"] == "application/octet-stream"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["content-security-policy"] == "sandbox"
    assert page.headers["content-disposition"].startswith("attachment;")


def test_a_job_that_has_not_ended_has_none_yet(cluster: Cluster, user: User) -> None:
    code = ("import os, pathlib, time\n"
            "pathlib.Path(os.environ['GPUJOBQ_OUTPUT'], 'early').write_text('x')\n"
            "print('written', flush=True)\ntime.sleep(60)\n")
    job_id = cluster.submit(user, code, wait=False).json()["job_id"]
    with httpx.stream("GET", f"{cluster.url}/api/logs/{job_id}", params={"follow": "true"},
                      headers=user.headers, timeout=30) as r:  # until it has printed
        next(line for line in r.iter_lines() if '"text":"written\\n"' in line)
    listed = cluster.get(user, "artifacts", job_id).json()
    assert (listed["status"], listed["final"], listed["files"]) == ("running", False, [])
    assert cluster.cancel(user, job_id).status_code == 200
    ended = cluster.wait_status(user, job_id, {"cancelled"})
    assert ended["status"] == "cancelled"
    # What a cancelled job left is kept too.
    listed = cluster.get(user, "artifacts", job_id).json()
    assert (listed["final"], listed["files"]) == (True, [{"name": "early", "size": 1}])


def test_caps_on_count_leave_the_rest_named(cluster: Cluster, user: User) -> None:
    code = ("import os, pathlib\nout = pathlib.Path(os.environ['GPUJOBQ_OUTPUT'])\n"
            "for i in range(1005):\n    (out / f'f{i:04d}').write_text(str(i))\n")
    job_id = cluster.submit(user, code).json()["job_id"]
    names = [f["name"] for f in cluster.get(user, "artifacts", job_id).json()["files"]]
    assert names == [f"f{i:04d}" for i in range(1000)]
    detail = cluster.get(user, "status", job_id).json()["detail"]
    assert detail == "skipped in output: f1000, f1001, f1002, f1003, f1004"


def test_a_name_a_result_cannot_carry_is_named_not_fatal(cluster: Cluster,
                                                          user: User) -> None:
    code = ("import os\nout = os.fsencode(os.environ['GPUJOBQ_OUTPUT'])\n"
            "open(os.path.join(out, b'bad\\xffname'), 'w').write('x')\n"
            "open(os.path.join(out, b'fine'), 'w').write('ok')\n")
    body = cluster.submit(user, code).json()
    assert body["status"] == "completed", body
    listed = cluster.get(user, "artifacts", body["job_id"]).json()
    assert listed["files"] == [{"name": "fine", "size": 2}]
    status = cluster.get(user, "status", body["job_id"]).json()
    assert status["detail"] == "skipped in output: bad\\xffname"


def test_refusals_name_the_problem(cluster: Cluster, user: User) -> None:
    job_id = cluster.submit(user, "print(1)").json()["job_id"]
    other = cluster.user()

    def get(who: User, path: str, **params: str) -> requests.Response:
        return requests.get(f"{cluster.url}/api/artifacts/{path}", headers=who.headers,
                            params=params, timeout=30)

    missing = get(user, f"{job_id}/nope.txt")
    assert missing.status_code == 404
    assert missing.json() == {"detail": f"Job {job_id} has no artifact named 'nope.txt'"}
    assert get(other, job_id).json() == {"detail": "Job not found"}
    assert get(other, f"{job_id}/x").status_code == 404
    assert get(user, "job_nope").status_code == 404
    assert get(user, job_id, user_id=other.name).json() == {
        "detail": "Token does not belong to specified user_id"}
    no_token = requests.get(f"{cluster.url}/api/artifacts/{job_id}", timeout=30)
    assert no_token.status_code == 401
    assert set(no_token.json()) == {"detail"}
