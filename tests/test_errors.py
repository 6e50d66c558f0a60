"""Every error of the guide, and bad input: clear {"detail": ...} answers, nothing lost."""

from __future__ import annotations

import time

import pytest
import requests
from gpujobq.controller import accounts

from tests.cluster import Cluster, User

GOOD = "competition_id: c\nproject_id: p\nuser_id: {user}\nexpected_time: 5\n"


def post(cluster: Cluster, user: User, config: str | bytes, *, code: str = "print(1)",
         ctype: str = "application/x-yaml", headers: dict[str, str] | None = None
         ) -> requests.Response:
    return requests.post(
        f"{cluster.url}/api/submit",
        headers=headers if headers is not None else user.headers,
        files={"code": ("solution.py", code), "config_file": ("config.yaml", config, ctype)},
        timeout=30,
    )


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer nope", "Basic abc", "bearer x"])
def test_bad_tokens_are_401_on_every_endpoint(cluster: Cluster, user: User,
                                               header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    job_id = cluster.submit(user, "print(1)").json()["job_id"]
    answers = [
        post(cluster, user, GOOD.format(user=user.name), headers=headers),
        requests.get(f"{cluster.url}/api/status/{job_id}", headers=headers, timeout=10),
        requests.get(f"{cluster.url}/api/results/{job_id}", headers=headers, timeout=10),
        requests.get(f"{cluster.url}/api/jobs", headers=headers, timeout=10),
        requests.post(f"{cluster.url}/api/cancel/{job_id}", headers=headers, timeout=10),
    ]
    for r in answers:
        assert r.status_code == 401
        assert r.json() == {"detail": "Invalid or expired token"}


def test_expired_and_revoked_tokens_are_401(cluster: Cluster, user: User) -> None:
    db = cluster._db
    expired = accounts.issue_token(db, user.name, time.time() - 10 * 86400, days=1)
    fresh = accounts.issue_token(db, user.name, time.time(), days=1)
    token_id = accounts.list_tokens(db, user.name)[-1].id
    assert accounts.revoke_token(db, token_id, time.time())
    for token in (expired, fresh):
        r = requests.get(f"{cluster.url}/api/jobs", params={"user_id": user.name},
                         headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert (r.status_code, r.json()) == (401, {"detail": "Invalid or expired token"})
    assert cluster.get(user, "jobs").status_code == 200  # the first token still works


def test_user_id_of_someone_else_is_403(cluster: Cluster, user: User) -> None:
    other = cluster.user()
    r = post(cluster, user, GOOD.format(user=other.name))
    assert r.status_code == 403
    assert r.json() == {"detail": "Token does not belong to specified user_id"}
    job_id = cluster.submit(user, "print(1)").json()["job_id"]
    for what in ("status", "results"):
        r = requests.get(f"{cluster.url}/api/{what}/{job_id}", params={"user_id": other.name},
                         headers=user.headers, timeout=10)
        assert r.status_code == 403
        assert r.json() == {"detail": "Token does not belong to specified user_id"}
    r = requests.get(f"{cluster.url}/api/jobs", params={"user_id": other.name},
                     headers=user.headers, timeout=10)
    assert r.status_code == 403


def test_token_in_config_must_match_the_bearer(cluster: Cluster, user: User) -> None:
    r = post(cluster, user, GOOD.format(user=user.name) + "token: somebody-elses\n")
    assert r.status_code == 403
    assert "token in config.yaml" in r.json()["detail"]


@pytest.mark.parametrize(
    "job_id", ["0000", "not-a-uuid", "a b", "\u00fc", "%00", "x" * 300, "..%2Fetc"]
)
def test_unknown_and_malformed_ids_are_the_same_404(cluster: Cluster, user: User,
                                                    job_id: str) -> None:
    for what in ("status", "results"):
        r = cluster.get(user, what, job_id)
        assert r.status_code == 404
        assert r.json() == {"detail": "Job not found"}
    assert cluster.cancel(user, job_id).json() == {"detail": "Job not found"}


def test_another_users_job_is_the_same_404(cluster: Cluster, user: User) -> None:
    job_id = cluster.submit(user, "print('secret')").json()["job_id"]
    intruder = cluster.user()
    for r in (cluster.get(intruder, "status", job_id), cluster.get(intruder, "results", job_id),
              cluster.cancel(intruder, job_id)):
        assert r.status_code == 404
        assert r.json() == {"detail": "Job not found"}
        assert job_id not in r.text
    assert cluster.get(intruder, "jobs").json() == []


@pytest.mark.parametrize(
    ("config", "status", "words"),
    [
        ("competition_id: c\nproject_id: p\nuser_id: {user}\n", 422, "expected_time"),
        (GOOD + "gpu: 1\n", 422, "unknown field `gpu`"),
        (GOOD + "gpus: 8\n", 400, "No host can ever run this job: no host has 8 GPUs"),
        (GOOD + "gpus: 9\n", 400, "gpus: 9 requested, but a job of competition 'c' may use at "
                                  "most 8"),
        (GOOD + "gpus: 0\n", 422, "gpus"),
        ("competition_id: c\nproject_id: p\nuser_id: {user}\nexpected_time: soon\n", 422,
         "expected_time"),
        ("competition_id: c\nproject_id: p\nuser_id: {user}\nexpected_time: 0\n", 422,
         "expected_time"),
        ("competition_id: [1]\nproject_id: p\nuser_id: {user}\nexpected_time: 1\n", 422,
         "competition_id"),
        ("competition_id: ../x\nproject_id: p\nuser_id: {user}\nexpected_time: 1\n", 422,
         "competition_id"),
        ("competition_id: c\ncompetition_id: d\nproject_id: p\nuser_id: {user}\n"
         "expected_time: 1\n", 400, "duplicate key"),
        ("a: &x [1]\nb: *x\n", 400, "anchors are not allowed"),
        (GOOD + "b: *x\n", 400, "aliases are not allowed"),
        (GOOD + "x: !!python/object/apply:os.system ['touch /tmp/pwned']\n", 400,
         "tags are not allowed"),
        (GOOD + "x: !!binary aGk=\n", 400, "tags are not allowed"),
        ("competition_id: !custom c\nproject_id: p\nuser_id: {user}\nexpected_time: 1\n",
         400, "tags are not allowed"),
        ("competition_id: c\nproject_id: p\nuser_id: {user}\nexpected_time: .nan\n", 422,
         "expected_time"),
        ("competition_id: c\nproject_id: p\nuser_id: {user}\nexpected_time: .inf\n", 422,
         "expected_time"),
        ("competition_id: c\nproject_id: p\nuser_id: {user}\nexpected_time: -5\n", 422,
         "expected_time"),
        ("competition_id: c\nproject_id: p\nuser_id: {user}\nexpected_time: 1e9\n", 422,
         "expected_time"),
        ("competition_id: c\nproject_id: p\nuser_id: {user}\nexpected_time: true\n", 422,
         "expected_time"),
        ("competition_id: c\nproject_id: " + "p" * 65 + "\nuser_id: {user}\n"
         "expected_time: 1\n", 422, "project_id"),
        ("competition_id: c\nproject_id: 'p\\n'\nuser_id: {user}\nexpected_time: 1\n", 422,
         "project_id"),
        ("competition_id: c\nproject_id: p/../q\nuser_id: {user}\nexpected_time: 1\n", 422,
         "project_id"),
        # What only the server sets cannot be sent.
        (GOOD + "status: completed\n", 422, "unknown field `status`"),
        (GOOD + "node: node-a\n", 422, "unknown field `node`"),
        (GOOD + "attempt: 7\n", 422, "unknown field `attempt`"),
        (GOOD + "time_limit: 99999\n", 422, "unknown field `time_limit`"),
        ("{{unclosed", 400, "not valid YAML"),
        ("- a list\n", 400, "mapping"),
        ("[" * 30000, 400, "nested too deeply"),
        ("", 400, "mapping"),
    ],
)
def test_bad_configs_name_the_problem(cluster: Cluster, user: User, config: str, status: int,
                                      words: str) -> None:
    r = post(cluster, user, config.format(user=user.name))
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert cluster.get(user, "jobs").json() == []


def test_config_as_json_and_any_content_type(cluster: Cluster, user: User) -> None:
    import json

    cfg = {"competition_id": "c", "project_id": "p", "user_id": user.name, "expected_time": 5}
    for ctype in ("application/json", "application/octet-stream", "text/plain"):
        r = post(cluster, user, json.dumps(cfg), ctype=ctype)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "completed"


def test_config_not_utf8_is_400(cluster: Cluster, user: User) -> None:
    r = post(cluster, user, b"\xff\xfe\x00")
    assert r.status_code == 400
    assert "UTF-8" in r.json()["detail"]


def test_missing_parts_and_empty_code(cluster: Cluster, user: User) -> None:
    r = requests.post(f"{cluster.url}/api/submit", headers=user.headers,
                      files={"code": ("solution.py", "print(1)")}, timeout=10)
    assert r.status_code == 400
    assert "config_file" in r.json()["detail"]
    r = requests.post(f"{cluster.url}/api/submit", headers=user.headers,
                      data={"x": "1"}, timeout=10)
    assert r.status_code == 400
    assert "code" in r.json()["detail"]
    r = requests.post(f"{cluster.url}/api/submit", headers=user.headers, data=b"{}",
                      timeout=10)
    assert r.status_code == 400
    assert post(cluster, user, GOOD.format(user=user.name), code="  \n").status_code == 400


def test_too_large_upload_is_413(cluster: Cluster, user: User) -> None:
    r = post(cluster, user, GOOD.format(user=user.name), code="#" * (3 << 20))
    assert r.status_code == 413
    assert r.json() == {"detail": "Request body too large: at most 2097152 bytes"}


def test_each_part_has_its_own_cap(cluster: Cluster, user: User) -> None:
    r = post(cluster, user, GOOD.format(user=user.name), code="#" * ((1 << 20) + 1))
    assert (r.status_code, r.json()) == (413, {
        "detail": "code (solution.py) is too large: 1048577 bytes, at most 1048576"})
    config = GOOD.format(user=user.name) + "#" * (64 << 10)
    r = post(cluster, user, config)
    assert r.status_code == 413
    assert r.json()["detail"].startswith("config_file (config.yaml) is too large: ")
    assert post(cluster, user, GOOD.format(user=user.name), code="#" * (1 << 20)
                ).status_code == 200  # at the cap is fine
    assert len(cluster.get(user, "jobs").json()) == 1


def test_billion_laughs_is_refused_at_once(cluster: Cluster, user: User) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    started = time.monotonic()
    r = post(cluster, user, "\n".join(lines) + "\n")
    assert time.monotonic() - started < 1.0
    assert (r.status_code, "anchors are not allowed" in r.json()["detail"]) == (400, True)


def test_only_the_two_form_fields_and_wait(cluster: Cluster, user: User) -> None:
    config = GOOD.format(user=user.name)
    base = {"code": ("s.py", "print(1)"), "config_file": ("c.yaml", config)}
    cases = [
        ({"data": {"status": "completed"}}, "", "Unknown form field 'status'"),
        ({"data": {"node": "node-a"}}, "", "Unknown form field 'node'"),
        ({}, "?attempt=3", "Unknown query parameter 'attempt'"),
        ({}, "?wait=false&user_id=x", "Unknown query parameter 'user_id'"),
    ]
    for extra, query, words in cases:
        r = requests.post(f"{cluster.url}/api/submit{query}", headers=user.headers,
                          files=base, timeout=10, **extra)
        assert (r.status_code, words in r.json()["detail"]) == (400, True), r.text
    twice = [("code", ("s.py", "print(1)")), ("code", ("t.py", "print(2)")),
             ("config_file", ("c.yaml", config))]
    r = requests.post(f"{cluster.url}/api/submit", headers=user.headers, files=twice,
                      timeout=10)
    assert r.json() == {"detail": "Form field 'code' is sent 2 times; send it once"}
    assert cluster.get(user, "jobs").json() == []


def test_a_broken_or_overlong_multipart_form_is_400(cluster: Cluster, user: User) -> None:
    config = GOOD.format(user=user.name).encode()
    part = (b"--B\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"f\"\r\n\r\n"
            b"%s\r\n")
    whole = part % (b"code", b"print(1)") + part % (b"config_file", config) + b"--B--\r\n"
    headers = {**user.headers, "Content-Type": "multipart/form-data; boundary=B"}

    def send(body: bytes) -> requests.Response:
        return requests.post(f"{cluster.url}/api/submit?wait=false", headers=headers,
                             data=body, timeout=10)

    assert send(whole).status_code == 202  # the same form, whole, is taken
    r = send(whole[:-12])  # cut inside the last part
    assert (r.status_code, r.json()) == (400, {"detail": "Invalid multipart/form-data"})
    r = send(part % (b"code", b"print(1)") * 17 + b"--B--\r\n")
    assert (r.status_code, r.json()) == (
        400, {"detail": "A submission's form has at most 16 parts"})
    assert len(cluster.get(user, "jobs").json()) == 1


def test_unknown_route_and_method(cluster: Cluster, user: User) -> None:
    r = requests.get(f"{cluster.url}/api/nothing", timeout=10)
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    r = requests.get(f"{cluster.url}/api/submit", headers=user.headers, timeout=10)
    assert r.status_code == 405
    assert set(r.json()) == {"detail"}


def test_bad_wait_parameter_is_400(cluster: Cluster, user: User) -> None:
    r = requests.post(f"{cluster.url}/api/submit?wait=maybe", headers=user.headers,
                      files={"code": ("s.py", "print(1)"),
                             "config_file": ("c.yaml", GOOD.format(user=user.name))}, timeout=10)
    assert r.status_code == 400
    assert "wait" in r.json()["detail"]
    assert cluster.get(user, "jobs").json() == []
