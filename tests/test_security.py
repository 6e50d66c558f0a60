"""Tokens, roles and object-level access against a real controller: what a participant
can reach with their token, what an admin can do to anyone's job, and what never leaks."""

from __future__ import annotations

import hashlib
import itertools
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import pytest
import requests
from gpujobq.controller import accounts

from tests import cluster as cluster_mod
from tests.cluster import Cluster, User

TOKEN = re.compile(r"gjq_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")
SLEEP = "import time\nprint('started', flush=True)\ntime.sleep({})\n"


def admin_cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """gpujobq-controller against the running test controller and its database."""
    return subprocess.run(
        [sys.executable, "-m", "gpujobq.controller", *args, "--database", str(c.db_path),
         "--port", str(c.port)],
        env=cluster_mod.env(), capture_output=True, text=True, timeout=60)


def call(c: Cluster, method: str, path: str, user: User | None, **params: Any
         ) -> requests.Response:
    headers = user.headers if user else {}
    return requests.request(method, f"{c.url}{path}", headers=headers, params=params,
                            timeout=30)


# ---- tokens ------------------------------------------------------------------------------


def test_tokens_are_random_and_only_their_digest_is_stored(cluster: Cluster) -> None:
    user = cluster.user()
    tokens = [accounts.issue_token(cluster._db, user.name, time.time(), days=1)
              for _ in range(20)] + [user.token]
    assert all(TOKEN.fullmatch(t) for t in tokens)
    assert len(set(tokens)) == len(tokens)
    # 43 URL-safe base64 characters: 256 random bits behind a 12-hex-digit public id.
    assert all(len(t[17:]) == 43 for t in tokens)
    stored = {r[0] for r in cluster._db.execute(
        "SELECT hash FROM tokens WHERE user_id = ?", [user.name])}
    assert stored == {hashlib.sha256(t.encode()).hexdigest() for t in tokens}
    for name in ("gpujobq.db", "gpujobq.db-wal"):
        data = (cluster.db_path.parent / name).read_bytes()
        assert not any(t.encode() in data for t in tokens)


def test_a_near_miss_token_is_refused(cluster: Cluster) -> None:
    user = cluster.user()
    good = user.token
    flip = "A" if good[-1] != "A" else "B"
    variants = [
        good[:-1] + flip,  # right id, wrong secret
        good[:17] + "0" * 43,
        good.upper(),
        good + "x",
        good[:-1],
        "gjq_000000000000_" + good[-43:],  # the secret under an id that does not exist
    ]
    for token in variants:
        r = requests.get(f"{cluster.url}/api/jobs", timeout=10,
                         headers={"Authorization": f"Bearer {token}"})
        assert (r.status_code, r.json()) == (401, {"detail": "Invalid or expired token"}), token
    assert cluster.get(user, "jobs").status_code == 200


def test_user_and_token_commands_work_on_a_running_controller(cluster: Cluster) -> None:
    name = f"carol-{time.time_ns() % 10**9}"
    added = admin_cli(cluster, "user", "add", name)
    assert added.returncode == 0, added.stderr
    first = added.stdout.strip()
    assert TOKEN.fullmatch(first)
    carol = User(name, first)
    assert cluster.get(carol, "jobs").status_code == 200

    # Rotation: a second token works alongside the first until the first is revoked.
    second = admin_cli(cluster, "token", "issue", name, "--days", "2").stdout.strip()
    listing = admin_cli(cluster, "token", "list", name).stdout
    assert first not in listing and second not in listing
    ids = re.findall(rf"^([0-9a-f]{{12}}) +{name} .* active$", listing, flags=re.M)
    assert ids == [first[4:16], second[4:16]]  # the public id is part of the token
    assert admin_cli(cluster, "token", "revoke", ids[0]).returncode == 0
    assert cluster.get(carol, "jobs").status_code == 401
    assert cluster.get(User(name, second), "jobs").status_code == 200

    users = admin_cli(cluster, "user", "list").stdout
    assert re.search(rf"^{name} +user +active +1 ", users, flags=re.M), users

    # Disabled: every token refused at once, with the guide's message; enabled: back.
    pending = cluster.submit(User(name, second), SLEEP.format(0), wait=False)
    job_id = pending.json()["job_id"]
    disabled = admin_cli(cluster, "user", "disable", name)
    assert disabled.returncode == 0, disabled.stderr
    r = cluster.get(User(name, second), "jobs")
    assert (r.status_code, r.json()) == (401, {"detail": "Invalid or expired token"})
    assert re.search(rf"^{name} +user +disabled ", admin_cli(cluster, "user", "list").stdout,
                     flags=re.M)
    assert admin_cli(cluster, "user", "enable", name).returncode == 0
    assert cluster.get(User(name, second), "jobs").status_code == 200
    assert cluster.wait_status(User(name, second), job_id, {"completed"})["status"] == "completed"

    missing = admin_cli(cluster, "user", "disable", "nobody-here")
    assert (missing.returncode, "no user 'nobody-here'" in missing.stderr) == (1, True)
    zero = admin_cli(cluster, "token", "issue", name, "--days", "0")
    assert (zero.returncode, "'0' is not a positive number of days" in zero.stderr) == (2, True)


def test_expired_tokens_are_refused(cluster: Cluster) -> None:
    user = cluster.user()
    old = accounts.issue_token(cluster._db, user.name, time.time() - 2 * 86400, days=1)
    r = requests.get(f"{cluster.url}/api/jobs", headers={"Authorization": f"Bearer {old}"},
                     timeout=10)
    assert (r.status_code, r.json()) == (401, {"detail": "Invalid or expired token"})


def test_a_token_never_reaches_jobs_logs_results_or_the_database(cluster: Cluster) -> None:
    user = cluster.user()
    code = (
        "import os, pathlib\n"
        "print(sorted(os.environ.items()))\n"
        "print(pathlib.Path('/proc/self/environ').read_bytes())\n"
        "for p in pathlib.Path('.').rglob('*'):\n"
        "    if p.is_file():\n"
        "        print(p, p.read_bytes()[:100000])\n"
        "print(open('config.yaml').read() if os.path.exists('config.yaml') else '')\n"
    )
    # The token rides in the header and in config.yaml (the guide's example puts it there).
    r = cluster.submit(user, code)
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    out = r.json()["stdout"]
    assert "competition_id" in out  # the job did read its config.yaml
    assert user.token not in out
    # Refused submissions whose config.yaml holds the token: the errors name the problem
    # and where, never the text around it, so logs stay clean as well.
    files = {"code": ("s.py", "print(1)")}
    for config, status in [
        (f"user_id: {user.name}\ntoken: {user.token} x: y\n", 400),
        (f"user_id: {user.name}\ntoken: [{user.token}\n", 400),
        (f"user_id: {user.name}\ntoken: {user.token}\nexpected_time: soon\n", 422),
        (f"competition_id: c\nproject_id: p\nuser_id: {user.name}\nexpected_time: 1\n"
         f"token: {user.token}x\n", 403),
    ]:
        bad = requests.post(f"{cluster.url}/api/submit", headers=user.headers, timeout=10,
                            files={**files, "config_file": ("c.yaml", config)})
        assert bad.status_code == status, bad.text
        assert user.token not in bad.text
    # Sent where it does not belong (a path, a query string): the access log masks it.
    for path in (f"/api/status/{user.token}", f"/api/jobs?token={user.token}",
                 f"/api/nothing/{user.token}"):
        requests.get(f"{cluster.url}{path}", headers=user.headers, timeout=10)
    # Also after the record is written: nothing under the cluster's folder holds it.
    cluster.wait_status(user, r.json()["job_id"], {"completed"})
    time.sleep(0.5)
    secret = user.token.encode()
    found = [p for p in cluster.root.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert found == []


# ---- object-level access -----------------------------------------------------------------


def _job_routes(cluster: Cluster) -> list[tuple[str, str]]:
    """Every (method, path) of the app that takes a job id, from its own OpenAPI schema."""
    schema = requests.get(f"{cluster.url}/schema/openapi.json", timeout=10).json()
    routes = [(method.upper(), path) for path, item in schema["paths"].items()
              if "{job_id}" in path for method in item if method != "parameters"]
    return sorted(routes)


def _at(path: str, job_id: str) -> str:
    return path.replace("{job_id}", job_id).replace("{name}", "out.txt")


def test_the_walk_covers_every_route_with_a_job_id(cluster: Cluster) -> None:
    assert _job_routes(cluster) == [
        ("GET", "/api/admin/logs/{job_id}"),
        ("GET", "/api/artifacts/{job_id}"), ("GET", "/api/artifacts/{job_id}/{name}"),
        ("GET", "/api/logs/{job_id}"),
        ("GET", "/api/results/{job_id}"), ("GET", "/api/status/{job_id}"),
        ("POST", "/api/admin/cancel/{job_id}"), ("POST", "/api/admin/requeue/{job_id}"),
        ("POST", "/api/cancel/{job_id}"),
    ]


def _median_ms(cluster: Cluster, method: str, path: str, user: User, ids: list[str],
               **params: Any) -> list[float]:
    """Interleaved timings (ms) of the same request for each id, so noise hits all alike."""
    samples: list[list[float]] = [[] for _ in ids]
    with requests.Session() as s:
        s.headers.update(user.headers)
        for _ in range(25):
            for i, job_id in enumerate(ids):
                started = time.perf_counter()
                s.request(method, f"{cluster.url}{_at(path, job_id)}", params=params,
                          timeout=30)
                samples[i].append((time.perf_counter() - started) * 1000)
    return [statistics.median(s) for s in samples]


def test_another_users_job_is_the_same_404_as_a_missing_one_everywhere(
        cluster: Cluster) -> None:
    users = [cluster.user("owner"), cluster.user("other"), cluster.user("third")]
    jobs = {}
    for u in users:
        r = cluster.submit(u, SLEEP.format(60), wait=False)
        assert r.status_code == 202, r.text
        jobs[u.name] = r.json()["job_id"]
    missing = "00000000-0000-4000-8000-000000000000"
    routes = _job_routes(cluster)
    try:
        for owner, other in itertools.permutations(users, 2):
            for method, path in routes:
                for params in ({}, {"user_id": other.name}):
                    theirs = call(cluster, method, _at(path, jobs[owner.name]), other,
                                  **params)
                    absent = call(cluster, method, _at(path, missing), other,
                                  **params)
                    expected = ((403, {"detail": "This needs an admin token"})
                                if "/admin/" in path else (404, {"detail": "Job not found"}))
                    assert (theirs.status_code, theirs.json()) == expected, (method, path)
                    assert (absent.status_code, absent.json()) == expected, (method, path)
                    assert ({k: v for k, v in theirs.headers.items() if k.lower() != "date"}
                            == {k: v for k, v in absent.headers.items() if k.lower() != "date"})
        # Timing: the other user's job answers in the same time class as no job at all.
        owner, other = users[0], users[1]
        for method, path in routes:
            if method == "POST":
                # A POST that found the job would act on it (cancel: timed below on a
                # finished job); admin routes refuse a non-admin before any lookup.
                continue
            mine_ms, absent_ms = _median_ms(cluster, method, path, other,
                                            [jobs[owner.name], missing], user_id=other.name)
            assert abs(mine_ms - absent_ms) < max(2.0, 0.5 * absent_ms), \
                (method, path, mine_ms, absent_ms)
        # Nothing of the owners' changed, and they still see their own jobs.
        for u in users:
            body = cluster.get(u, "status", jobs[u.name]).json()
            assert body["status"] in ("pending", "running")
    finally:
        for u in users:
            cluster.cancel(u, jobs[u.name])


def test_cancel_timing_for_another_users_job_matches_a_missing_one(cluster: Cluster) -> None:
    """POST cancel measured on jobs that are already finished (409 for the owner), so the
    requests act on nothing: other's finished job vs missing, as the other user."""
    owner, other = cluster.user("owner"), cluster.user("other")
    job_id = cluster.submit(owner, "print(1)").json()["job_id"]
    assert cluster.cancel(owner, job_id).status_code == 409
    mine_ms, absent_ms = _median_ms(cluster, "POST", "/api/cancel/{job_id}", other,
                                    [job_id, "00000000-0000-4000-8000-000000000000"],
                                    user_id=other.name)
    assert abs(mine_ms - absent_ms) < max(2.0, 0.5 * absent_ms), (mine_ms, absent_ms)


# ---- admins ------------------------------------------------------------------------------


ADMIN_GETS = ["/api/admin/nodes", "/api/admin/users"]
ADMIN_POSTS = ["/api/admin/reload", "/api/admin/cancel/x", "/api/admin/requeue/x"]


def test_admin_endpoints_need_an_admin(cluster: Cluster) -> None:
    user = cluster.user()
    for method, path in [*(("GET", p) for p in ADMIN_GETS), *(("POST", p) for p in ADMIN_POSTS)]:
        r = call(cluster, method, path, None)
        assert (r.status_code, r.json()) == (401, {"detail": "Invalid or expired token"})
        r = call(cluster, method, path, user)
        assert (r.status_code, r.json()) == (403, {"detail": "This needs an admin token"})


def test_admin_lists_users_without_their_tokens(cluster: Cluster) -> None:
    admin, user = cluster.user("admin", admin=True), cluster.user()
    r = call(cluster, "GET", "/api/admin/users", admin)
    assert r.status_code == 200
    rows = {u["user_id"]: u for u in r.json()}
    assert rows[user.name] == {**rows[user.name], "admin": False, "disabled": False,
                               "active_tokens": 1}
    assert rows[admin.name]["admin"] is True
    assert user.token not in r.text and "hash" not in r.text


def test_admin_cancels_and_requeues_any_job(cluster: Cluster) -> None:
    admin, bob = cluster.user("admin", admin=True), cluster.user("bob")
    # A running job, requeued: stopped, back in the queue with no retry counted, run again.
    job_id = cluster.submit(bob, SLEEP.format(2), wait=False).json()["job_id"]
    cluster.wait_status(bob, job_id, {"running"})
    r = call(cluster, "POST", f"/api/admin/requeue/{job_id}", admin)
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("pending", "running")
    done = cluster.wait_status(bob, job_id, {"completed", "failed", "cancelled"}, timeout=60)
    assert (done["status"], done["attempt"]) == ("completed", 2)
    assert cluster.get(bob, "results", job_id).json()["stdout"] == "started\n"

    # A finished job, requeued: it runs again from the start.
    r = call(cluster, "POST", f"/api/admin/requeue/{job_id}", admin)
    assert r.status_code == 200, r.text
    done = cluster.wait_status(bob, job_id, {"completed", "failed", "cancelled"}, timeout=60)
    assert (done["status"], done["attempt"]) == ("completed", 3)

    # A pending job cannot be requeued; a missing one is 404.
    blocker = cluster.submit(bob, SLEEP.format(60), wait=False).json()["job_id"]
    cluster.wait_status(bob, blocker, {"running"})
    r = call(cluster, "POST", "/api/admin/requeue/no-such-job", admin)
    assert (r.status_code, r.json()) == (404, {"detail": "Job not found"})

    # Cancel by an admin: the owner sees it cancelled, noted as the admin's doing.
    r = call(cluster, "POST", f"/api/admin/cancel/{blocker}", admin)
    assert (r.status_code, r.json()["status"]) == (200, "cancelled"), r.text
    events = cluster._db.execute(
        "SELECT detail FROM job_events WHERE job_id = ? AND detail IS NOT NULL", [blocker])
    assert any(f"admin {admin.name}" in (d[0] or "") for d in events)
    assert cluster.get(bob, "status", blocker).json()["status"] == "cancelled"
    r = call(cluster, "POST", f"/api/admin/cancel/{blocker}", admin)
    assert r.status_code == 409


def test_admin_job_commands(cluster: Cluster) -> None:
    bob = cluster.user("bob")
    job_id = cluster.submit(bob, SLEEP.format(60), wait=False).json()["job_id"]
    cluster.wait_status(bob, job_id, {"running"})
    requeued = admin_cli(cluster, "job", "requeue", job_id)
    assert requeued.returncode == 0, requeued.stderr
    assert re.fullmatch(rf"{job_id}: (pending|running)\n", requeued.stdout)
    body = cluster.wait_status(bob, job_id, {"running"})
    assert body["attempt"] == 2
    cancelled = admin_cli(cluster, "job", "cancel", job_id, "nope")
    assert cancelled.returncode == 1  # one of the two was not found
    assert f"{job_id}: cancelled" in cancelled.stdout
    assert "nope:" in cancelled.stderr and "404 Job not found" in cancelled.stderr
    # The minted admin token is gone again.
    assert not any(t.revoked_at is None and t.expires_at > time.time()
                   for t in accounts.list_tokens(cluster._db, "gpujobq-admin"))


@pytest.mark.parametrize("path", ["/api/jobs", "/api/status/x", "/api/results/x"])
def test_an_admin_token_is_a_user_token_on_user_endpoints(cluster: Cluster, path: str) -> None:
    """Admins act on others' jobs only through /api/admin: elsewhere they are a user."""
    admin, bob = cluster.user("admin", admin=True), cluster.user("bob")
    r = call(cluster, "GET", path, admin, user_id=bob.name)
    assert (r.status_code, r.json()) == (403, {"detail": "Token does not belong to specified "
                                                         "user_id"})
