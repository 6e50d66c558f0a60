"""Live logs: GET /api/logs/{job_id} as server-sent events, against a real controller and
agent (process runtime): history, then live output, then the end; many followers; a
requeued job's restart; refusals in the guide's shape."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests

from tests.cluster import Cluster, User, running


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running(tmp_path_factory.mktemp("logs"), gpus=2, active_limit=50,
                 submit_limit=100) as c:
        yield c


@pytest.fixture
def user(cluster: Cluster) -> User:
    return cluster.user()


def events(cluster: Cluster, user: User, job_id: str, follow: bool = True,
           timeout: float = 60) -> list[tuple[float, str, Any]]:
    """(arrival time, event, data) of each event until the stream closes."""
    out: list[tuple[float, str, Any]] = []
    kind, data = "message", []
    with httpx.stream("GET", f"{cluster.url}/api/logs/{job_id}",
                      params={"user_id": user.name, "follow": str(follow).lower()},
                      headers=user.headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                out.append((time.monotonic(), kind, json.loads("\n".join(data))))
                kind, data = "message", []
    return out


def text(evs: list[tuple[float, str, Any]], stream: str = "stdout") -> str:
    """The stream as a follower rebuilds it from offsets."""
    got = ""
    for _, kind, data in evs:
        if kind == "restart":
            got = ""
        elif kind == "output" and data["stream"] == stream:
            got = got[:data["offset"]] + data["text"]  # ASCII here: offsets are characters
    return got


def test_follow_gives_history_then_live_output_then_the_end(cluster: Cluster,
                                                            user: User) -> None:
    code = ("import sys, time\nprint('first', flush=True)\n"
            "print('oops', file=sys.stderr, flush=True)\ntime.sleep(2)\nprint('second')\n")
    job_id = cluster.submit(user, code, wait=False).json()["job_id"]
    deadline = time.monotonic() + 30
    while text(events(cluster, user, job_id, follow=False)) != "first\n":  # history now
        assert time.monotonic() < deadline
        time.sleep(0.05)
    evs = events(cluster, user, job_id)
    assert text(evs) == "first\nsecond\n"
    assert text(evs, "stderr") == "oops\n"
    first = next(t for t, kind, d in evs if kind == "output" and "first" in d["text"])
    end_at, kind, end = evs[-1]
    assert kind == "end"
    assert end == {"status": "completed", "exit_code": 0, "reason": "exit_code"}
    assert end_at - first > 1.0  # 'first' came while the job still ran: live, not at the end


def test_without_follow_it_is_what_there_is_now(cluster: Cluster, user: User) -> None:
    code = "import time\nprint('so far', flush=True)\ntime.sleep(30)\n"
    job_id = cluster.submit(user, code, wait=False).json()["job_id"]
    deadline = time.monotonic() + 30
    while text(evs := events(cluster, user, job_id, follow=False)) != "so far\n":
        assert time.monotonic() < deadline, evs
        time.sleep(0.1)
    assert all(kind != "end" for _, kind, _ in evs)  # it still runs
    assert cluster.cancel(user, job_id).json()["status"] == "cancelled"
    evs = events(cluster, user, job_id, follow=False)
    assert evs[-1][1:] == ("end", {"status": "cancelled", "exit_code": 143,  # SIGTERM
                                   "reason": "cancelled_by_user"})


def test_many_followers_see_the_same_stream(cluster: Cluster, user: User) -> None:
    code = ("import time\nfor i in range(5):\n    print('line', i, flush=True)\n"
            "    time.sleep(0.3)\n")
    job_id = cluster.submit(user, code, wait=False).json()["job_id"]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        seen = list(pool.map(lambda _: events(cluster, user, job_id), range(20)))
    want = "".join(f"line {i}\n" for i in range(5))
    assert all(text(evs) == want for evs in seen)
    assert all(evs[-1][1] == "end" for evs in seen)


def test_a_requeued_job_restarts_its_stream(cluster: Cluster, user: User) -> None:
    admin = cluster.user("admin", admin=True)
    code = "import time\nprint('try', flush=True)\ntime.sleep(30)\n"
    job_id = cluster.submit(user, code, wait=False).json()["job_id"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        follower = pool.submit(events, cluster, user, job_id)
        deadline = time.monotonic() + 30
        while text(events(cluster, user, job_id, follow=False)) != "try\n":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = requests.post(f"{cluster.url}/api/admin/requeue/{job_id}", headers=admin.headers,
                          timeout=30)
        assert r.status_code == 200, r.text
        cluster.wait_status(user, job_id, {"running"})
        while (status := cluster.get(user, "status", job_id).json())["attempt"] != 2:
            time.sleep(0.1)
        while text(events(cluster, user, job_id, follow=False)) != "try\n":
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        cluster.cancel(user, job_id)
        evs = follower.result(timeout=60)
    kinds = [kind for _, kind, _ in evs]
    assert ("restart", {"attempt": 2}) in [(k, d) for _, k, d in evs]
    assert kinds.index("restart") < len(kinds) - 1 and kinds[-1] == "end"
    assert text(evs) == "try\n"  # the second attempt's output, from offset 0 again


def test_refusals_name_the_problem(cluster: Cluster, user: User) -> None:
    job_id = cluster.submit(user, "print(1)").json()["job_id"]
    other = cluster.user()
    url = f"{cluster.url}/api/logs/{job_id}"
    r = requests.get(url, params={"user_id": other.name}, headers=other.headers, timeout=30)
    assert (r.status_code, r.json()) == (404, {"detail": "Job not found"})
    r = requests.get(url, params={"user_id": other.name}, headers=user.headers, timeout=30)
    assert r.status_code == 403 and "detail" in r.json()
    r = requests.get(url, params={"user_id": user.name}, timeout=30)
    assert (r.status_code, r.json()) == (401, {"detail": "Invalid or expired token"})
    r = requests.get(url, params={"user_id": user.name, "follow": "maybe"},
                     headers=user.headers, timeout=30)
    assert r.status_code == 400 and "follow" in r.json()["detail"]


def test_an_admin_reads_any_users_log(cluster: Cluster, user: User) -> None:
    admin = cluster.user("admin", admin=True)
    job_id = cluster.submit(user, "print('theirs')").json()["job_id"]
    url = f"{cluster.url}/api/admin/logs/{job_id}"
    r = requests.get(url, headers=admin.headers, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith(
        'event: output\r\ndata: {"stream":"stdout","offset":0,"size":7,"text":"theirs\\n"}'
        '\r\n\r\n')
    assert r.text.endswith('event: end\r\ndata: {"status":"completed","exit_code":0,'
                           '"reason":"exit_code"}\r\n\r\n')
    r = requests.get(url, headers=user.headers, timeout=30)
    assert (r.status_code, r.json()) == (403, {"detail": "This needs an admin token"})
    r = requests.get(f"{cluster.url}/api/admin/logs/nope", headers=admin.headers, timeout=30)
    assert (r.status_code, r.json()) == (404, {"detail": "Job not found"})


def test_the_schema_declares_the_event_stream(cluster: Cluster) -> None:
    schema = requests.get(f"{cluster.url}/schema/openapi.json", timeout=30).json()
    op = schema["paths"]["/api/logs/{job_id}"]["get"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert {p["name"] for p in op["parameters"]} >= {"job_id", "user_id", "follow"}
