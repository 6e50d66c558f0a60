"""Submission limits under concurrency, against a real controller and SQLite file.

The semantics (README, "Limits"): per user, at most 1 active job and 5 accepted
submissions in any sliding 60-second window; input is validated first, and a refused
submission (any 4xx, 429 included) does not count.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.cluster import Cluster

SLEEP = "import time\ntime.sleep({})\n"


def _check_refusal(r: requests.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["detail"].startswith("Too Many Requests: ")
    assert int(r.headers["Retry-After"]) >= 1


def test_fifty_concurrent_submits_exactly_one_accepted(cluster: Cluster) -> None:
    user = cluster.user()
    barrier = threading.Barrier(50)

    def one(_: int) -> requests.Response:
        barrier.wait()
        return cluster.submit(user, SLEEP.format(60), wait=False)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    for r in answers:
        if r.status_code == 202:
            cluster.cancel(user, r.json()["job_id"])
    assert sorted(r.status_code for r in answers) == [202] + [429] * 49
    for r in answers:
        if r.status_code == 429:
            _check_refusal(r)
            assert "active job" in r.json()["detail"]
    jobs = cluster.get(user, "jobs").json()
    assert [j["job_id"] for j in jobs] == [r.json()["job_id"] for r in answers
                                           if r.status_code == 202]


def test_a_minute_of_hammering_never_gets_more_than_five_in_a_window(
        cluster: Cluster) -> None:
    """Four clients submit as fast as they can for 65 s; jobs end at once, so only the
    sliding window holds them back."""
    user = cluster.user()
    stop = time.monotonic() + 65
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def hammer() -> None:
        with requests.Session() as s:
            while time.monotonic() < stop:
                fields = {"competition_id": "test", "project_id": "p", "user_id": user.name,
                          "expected_time": 1}
                r = s.post(f"{cluster.url}/api/submit?wait=false", headers=user.headers,
                           files={"code": ("s.py", "pass"), "config_file": ("c.yaml",
                                                                            str(fields))},
                           timeout=30)
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 429:
                    _check_refusal(r)
                else:
                    assert r.status_code == 202, r.text

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = sorted(r[0] for r in cluster._db.execute(
        "SELECT created_at FROM jobs WHERE user_id = ?", [user.name]))
    assert set(codes) <= {202, 429}, codes  # no 5xx, nothing else
    assert codes[202] == len(created)
    # Five at once, then the sixth only when the first leaves the window.
    assert 6 <= len(created) <= 10, created
    for i, start in enumerate(created):
        assert sum(1 for t in created[i:] if t < start + 60) <= 5
    assert created[5] - created[0] >= 60
    print(f"65 s of hammering: {codes[202]} accepted, {codes[429]} refused with 429")
