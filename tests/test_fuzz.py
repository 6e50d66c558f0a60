"""Schemathesis against the controller's own OpenAPI schema (/schema/openapi.json).

Every operation gets at least CASES generated requests against a real controller and
agent: schema-valid and schema-violating ones (schemathesis' positive and negative
modes), sent as an admin, as a plain user and with generated credentials, some aimed at
real jobs and some carrying valid config.yaml files, so that success paths answer too.
Every answer goes through schemathesis' response checks; the test wants no server error
and no failed check, and prints the counts as a Markdown table for the docs.

Hypothesis is derandomized: the same code and schema generate the same requests.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis.auths import AuthStorage
from schemathesis.checks import CHECKS, load_all_checks

from tests import cluster as cluster_mod

CASES = 1000
WORKERS = 2
OPERATIONS = {
    "POST /api/submit", "GET /api/status/{job_id}", "GET /api/results/{job_id}",
    "GET /api/jobs", "POST /api/cancel/{job_id}", "GET /api/health",
    "GET /api/admin/nodes", "POST /api/admin/reload", "POST /api/admin/cancel/{job_id}",
    "POST /api/admin/requeue/{job_id}", "GET /api/admin/users", "GET /api/logs/{job_id}",
    "GET /api/admin/logs/{job_id}", "GET /api/artifacts/{job_id}",
    "GET /api/artifacts/{job_id}/{name}", "GET /metrics", "GET /api/board",
}
# Every check schemathesis has runs on every answer, but one: a schema-valid submission
# is still refused (400/403/422) when its config.yaml, a file in the form, does not parse
# or names another user, which a schema cannot say about a file's content. Some checks
# have nothing to look at here: missing_required_header and unsupported_method judge the
# coverage phase's cases, allow_header_conformance OPTIONS answers, use_after_free and
# ensure_resource_availability stateful sequences, object_level_authorization
# identities configured in schemathesis.
NOT_FOR_SUBMIT = ("positive_data_acceptance",)

pytestmark = pytest.mark.timeout(600)


class Token:
    """A schemathesis auth provider: always this user's token. Cases that test a missing
    or broken Authorization header (negative mode) keep theirs."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return self.token

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@dataclasses.dataclass
class Tally:
    cases: int = 0
    modes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    who: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    statuses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster_mod.Cluster]:
    """A cluster of its own: the fuzz reloads the inventory, requeues and cancels jobs and
    uses up rate limits. A waiting submit answers within 5 s (it is 270 s by default)."""
    root: pathlib.Path = tmp_path_factory.mktemp("fuzz")
    with cluster_mod.running(root, wait_cap=5) as c:
        yield c


# Noise the server must ignore (or, on /api/submit, refuse with 400): query parameters
# and headers no operation declares. An operation with no inputs (/api/health) varies
# only by these.
NOISE_NAME = st.from_regex(r"\Ax-fuzz-[a-z0-9]{1,8}\Z")
NOISE_VALUE = st.from_regex(r"\A([!-~]([ -~]{0,38}[!-~])?)?\Z")  # what a header may hold
NOISE = st.fixed_dictionaries({
    "query": st.dictionaries(NOISE_NAME, NOISE_VALUE, max_size=2),
    "headers": st.dictionaries(NOISE_NAME, NOISE_VALUE, max_size=2),
})
# solution.py for the submissions that get through: generated text (a SyntaxError, most
# often) or a line that prints.
CODE = st.one_of(st.text(min_size=1, max_size=200).filter(str.strip),
                 st.builds("print({!r})".format, st.text(max_size=20)))
ID = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")


def valid_config(user: cluster_mod.User) -> st.SearchStrategy[bytes]:
    """config.yaml files the server accepts for this user, in the guide's three forms."""
    fields = st.fixed_dictionaries(
        {"competition_id": ID, "project_id": ID, "user_id": st.just(user.name),
         # Short: a generated solution.py runs for real, within 2x this.
         "expected_time": st.floats(min_value=0.2, max_value=2.0)},
        optional={"token": st.just(user.token), "gpus": st.integers(1, 2)},
    )
    render = st.sampled_from([json.dumps, str, lambda d: "".join(
        f"{k}: {json.dumps(v)}\n" for k, v in d.items())])
    return st.tuples(render, fields).map(lambda rf: rf[0](rf[1]).encode())


def strategy(op: Any, who: dict[str, cluster_mod.User | None],
             job_ids: list[str]) -> st.SearchStrategy[tuple[str, schemathesis.Case]]:
    """Cases for one operation: each identity, both modes, plus ones aimed at real jobs
    (and at the user's own job list, and with a valid config.yaml) to reach success."""
    branches = []
    for name, user in who.items():
        auth = AuthStorage(providers=[Token(user.token)]) if user else None
        aimed: list[dict[str, Any]] = [{}]
        if "{job_id}" in op.path:
            aimed += [{"path_parameters": {"job_id": job_id}} for job_id in job_ids]
        if op.path == "/api/jobs" and user is not None:
            aimed.append({"query": {"user_id": user.name}})
        for mode in schemathesis.GenerationMode:
            for fixed in aimed:
                branches.append(op.as_strategy(mode, auth_storage=auth, **fixed).map(
                    lambda case, name=name: (name, case)))
        if op.path == "/api/submit" and user is not None:
            # Submissions that pass every check, so jobs run (and limits answer 429).
            branches.append(st.tuples(CODE, valid_config(user)).flatmap(
                lambda files, auth=auth: op.as_strategy(
                    schemathesis.GenerationMode.POSITIVE, auth_storage=auth,
                    body={"code": files[0], "config_file": files[1]}),
            ).map(lambda case, name=name: (name, case)))
    return st.one_of(branches)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a worker needs to fuzz one operation (picklable)."""

    schema_url: str
    label: str
    who: dict[str, cluster_mod.User | None]
    job_ids: list[str]


def fuzz(target: Target) -> Tally:
    """CASES cases for one operation, every answer checked; failures are collected."""
    schema = schemathesis.openapi.from_url(target.schema_url)
    op = next(r.ok() for r in schema.get_all_operations() if r.ok().label == target.label)
    load_all_checks()
    excluded = CHECKS.get_by_names(list(NOT_FOR_SUBMIT)) if op.path == "/api/submit" else []
    session = requests.Session()
    tally = Tally()

    @hypothesis.settings(
        max_examples=CASES, derandomize=True, deadline=None, database=None,
        phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(drawn=strategy(op, target.who, target.job_ids), noise=NOISE)
    def run(drawn: tuple[str, schemathesis.Case], noise: dict[str, dict[str, str]]) -> None:
        who, case = drawn
        response = case.call(session=session, params=noise["query"], headers=noise["headers"],
                             timeout=30)
        tally.cases += 1
        tally.who[who] += 1
        tally.modes[case.meta.generation.mode.value if case.meta else "?"] += 1
        tally.statuses[response.status_code] += 1
        try:
            case.validate_response(response, headers=noise["headers"], excluded_checks=excluded)
        except BaseExceptionGroup as group:
            curl = case.as_curl_command(headers=dict(response.request.headers))
            tally.failures.extend(
                f"{failure.title} [{response.status_code}]: {failure}\n{curl}"
                for failure in group.exceptions)

    started = time.monotonic()
    run()
    tally.seconds = time.monotonic() - started
    return tally


def markdown(tallies: dict[str, Tally]) -> str:
    load_all_checks()
    lines = [
        f"schemathesis {schemathesis.__version__}, hypothesis {hypothesis.__version__} "
        f"(derandomized); {sum(t.cases for t in tallies.values())} cases, "
        f"{sum(t.statuses[s] for t in tallies.values() for s in t.statuses if s >= 500)} "
        f"server errors, {sum(len(t.failures) for t in tallies.values())} failed checks",
        f"checks: {', '.join(CHECKS.get_all_names())} ({', '.join(NOT_FOR_SUBMIT)} not on "
        "POST /api/submit)",
        "",
        "| operation | cases | positive / negative | admin / user / generated auth "
        "| statuses seen | s |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for label, t in tallies.items():
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(t.statuses.items()))
        lines.append(
            f"| `{label}` | {t.cases} | {t.modes['positive']} / {t.modes['negative']} "
            f"| {t.who['admin']} / {t.who['user']} / {t.who['generated']} "
            f"| {statuses} | {t.seconds:.0f} |")
    return "\n".join(lines)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    fuzz_cluster: cluster_mod.Cluster,
) -> None:
    c = fuzz_cluster
    admin, user = c.user("fuzz-admin", admin=True), c.user("fuzz-user")
    # Real jobs to aim at: one finished job each (the fuzz cancels and requeues them).
    job_ids = []
    for owner in (admin, user):
        r = c.submit(owner, "print('hello')", expected_time=2)
        assert r.status_code == 200, r.text
        job_ids.append(r.json()["job_id"])

    url = f"{c.url}/schema/openapi.json"
    labels = [r.ok().label for r in schemathesis.openapi.from_url(url).get_all_operations()]
    assert OPERATIONS <= set(labels), sorted(OPERATIONS - set(labels))
    who: dict[str, cluster_mod.User | None] = {"admin": admin, "user": user, "generated": None}
    # Generating cases is what takes the time (the server answers in a few ms): two
    # operations at a time. Forked: the workers need nothing but the targets.
    with concurrent.futures.ProcessPoolExecutor(
            WORKERS, mp_context=multiprocessing.get_context("fork")) as pool:
        results = pool.map(fuzz, [Target(url, label, who, job_ids) for label in labels])
        tallies = dict(zip(labels, results, strict=True))

    print("\n" + markdown(tallies) + "\n")
    for label, t in tallies.items():
        assert t.cases >= CASES, (label, t.cases)
        assert not [s for s in t.statuses if s >= 500], (label, t.statuses)
        if label != "GET /api/health":
            assert set(t.statuses) - {401}, f"{label}: no token was ever accepted"
    failures = [f"{label} ({len(t.failures)} failed checks, the first ones):\n" +
                "\n\n".join(t.failures[:3]) for label, t in tallies.items() if t.failures]
    assert not failures, "\n\n".join(failures)
