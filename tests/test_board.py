"""The web board: GET /api/board and the page at /, against a real controller and two real
agents (process runtime), the page driven in headless Chromium (Debian's `chromium`).

The scene: host node1 drained; alice and bob each run a job that prints what the test
writes to its control file (and ends on "exit"); alice and carol each have one waiting.
Screenshots go to test-artifacts/ (GPUJOBQ_TEST_ARTIFACTS elsewhere).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.cluster import ROOT, Cluster, User, running

pytestmark = pytest.mark.timeout(300)

ARTIFACTS = pathlib.Path(os.environ.get("GPUJOBQ_TEST_ARTIFACTS") or ROOT / "test-artifacts")
WAIT_MS = 20_000  # how long the page may take to show a change (it polls every 2 s)

# The job: prints each new line of its control file; "exit" ends it.
CONTROLLED = """\
import pathlib, sys, time
ctl = pathlib.Path({path!r})
print("started", flush=True)
done = 0
while True:
    lines = ctl.read_text().splitlines() if ctl.exists() else []
    for line in lines[done:]:
        if line == "exit":
            sys.exit(0)
        print(line, flush=True)
    done = len(lines)
    time.sleep(0.05)
"""


@dataclasses.dataclass
class Scene:
    c: Cluster
    admin: User
    alice: User
    bob: User
    carol: User
    jobs: dict[str, str]  # name (a1, a2, b1, c1) -> job id
    controls: dict[str, pathlib.Path]  # job id -> its control file

    def say(self, job_id: str, line: str) -> None:
        """Append a line to a job's control file, whole (a reader never sees half)."""
        ctl = self.controls[job_id]
        tmp = ctl.with_suffix(".tmp")
        tmp.write_text((ctl.read_text() if ctl.exists() else "") + line + "\n")
        tmp.replace(ctl)

    def secrets(self) -> list[str]:
        """What the public view must never show: user names, job ids (and the end of one
        that the page shows)."""
        names = [u.name for u in (self.admin, self.alice, self.bob, self.carol)]
        return names + [j for job in self.jobs.values() for j in (job, job[-8:])]


def build_scene(c: Cluster, root: pathlib.Path) -> Scene:
    admin = c.user("admin", admin=True)
    c.write_inventory(node1={"drain": "true"})
    r = requests.post(f"{c.url}/api/admin/reload", headers=admin.headers, timeout=30)
    assert r.status_code == 200, r.text
    c.wait_nodes(admin, lambda hosts: hosts["node1"]["state"] == "drained")
    scene = Scene(c, admin, c.user("alice"), c.user("bob"), c.user("carol"), {}, {})
    for name, user in (("a1", scene.alice), ("b1", scene.bob), ("a2", scene.alice),
                       ("c1", scene.carol)):
        ctl = root / f"control-{name}"
        r = c.submit(user, CONTROLLED.format(path=str(ctl)), wait=False, expected_time=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        scene.jobs[name], scene.controls[job_id] = job_id, ctl
        if name in ("a1", "b1"):  # node0's two GPUs; a2 and c1 then wait
            c.wait_status(user, job_id, {"running"})
    return scene


def end_all(scene: Scene) -> None:
    for job_id in scene.controls:
        scene.say(job_id, "exit")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """Shared by the API tests, which only read."""
    root = tmp_path_factory.mktemp("board")
    with running(root, agents=2, gpus=2, active_limit=3) as c:
        s = build_scene(c, root)
        yield s
        end_all(s)


@pytest.fixture
def own_scene(tmp_path: pathlib.Path) -> Iterator[Scene]:
    """A scene of its own for the browser test, which ends jobs."""
    with running(tmp_path, agents=2, gpus=2, active_limit=3) as c:
        s = build_scene(c, tmp_path)
        yield s
        end_all(s)


def board(scene: Scene, user: User | None = None) -> dict[str, Any]:
    r = requests.get(f"{scene.c.url}/api/board", headers=user.headers if user else {},
                     timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body: dict[str, Any] = r.json()
    return body


def states(hosts: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    return {(h["name"], g["index"]): g["state"] for h in hosts for g in h["gpus"]}


# ---- /api/board ---------------------------------------------------------------------


def test_public_board_shows_the_fleet_and_queue_but_no_user_or_job(scene: Scene) -> None:
    r = requests.get(f"{scene.c.url}/api/board", timeout=30)
    assert r.status_code == 200, r.text
    assert not [s for s in scene.secrets() if s in r.text]
    body = r.json()
    assert (body["user_id"], body["admin"], body["jobs"], body["active"]) == (None, False, [],
                                                                               [])
    assert {h["name"]: h["state"] for h in body["hosts"]} == {"node0": "up", "node1": "drained"}
    assert states(body["hosts"]) == {("node0", 0): "busy", ("node0", 1): "busy",
                                     ("node1", 0): "free", ("node1", 1): "free"}
    fleet = scene.c.nodes(scene.admin)["hosts"]
    assert states(fleet) == states(body["hosts"])
    assert all(g["job_id"] is None and g["user_id"] is None and not g["mine"]
               for h in body["hosts"] for g in h["gpus"])
    queue = body["queue"]
    assert (queue["pending"], queue["running"]) == (2, 2)
    # A new user's job would come after carol's and before alice's second (fair order):
    # it waits for the second running job to end (expected 60 s after it started).
    assert queue["wait_reason"] == "waiting for a free GPU"
    assert 0 < queue["expected_wait"] <= 60


def test_a_users_board_has_their_jobs_and_gpus_only(scene: Scene) -> None:
    body = board(scene, scene.alice)
    assert (body["user_id"], body["admin"], body["active"]) == (scene.alice.name, False, [])
    jobs = {j["job_id"]: j for j in body["jobs"]}
    a1, a2 = scene.jobs["a1"], scene.jobs["a2"]
    assert list(jobs) == [a2, a1]  # newest first
    assert jobs[a1]["status"] == "running" and jobs[a1]["node"] == "node0"
    status = scene.c.get(scene.alice, "status", a2).json()
    assert jobs[a2]["status"] == "pending"
    assert jobs[a2]["queue_position"] == status["queue_position"] == 2  # behind carol's
    assert jobs[a2]["estimated_start"] == status["estimated_start"] is not None
    assert jobs[a2]["pending_reason"] == "waiting for a free GPU"
    mine = [(h["name"], g["index"], g["job_id"]) for h in body["hosts"] for g in h["gpus"]
            if g["mine"]]
    assert mine == [("node0", jobs[a1]["gpus"][0], a1)]
    others = [scene.bob.name, scene.carol.name, scene.jobs["b1"], scene.jobs["c1"]]
    text = str(body)
    assert not [s for s in others if s in text]


def test_an_admins_board_has_everyone(scene: Scene) -> None:
    body = board(scene, scene.admin)
    assert body["admin"] is True
    active = {j["job_id"]: (j["user_id"], j["status"], j["queue_position"])
              for j in body["active"]}
    assert active == {
        scene.jobs["a1"]: (scene.alice.name, "running", None),
        scene.jobs["b1"]: (scene.bob.name, "running", None),
        scene.jobs["c1"]: (scene.carol.name, "pending", 1),
        scene.jobs["a2"]: (scene.alice.name, "pending", 2),
    }
    on_gpus = {(g["job_id"], g["user_id"]) for h in body["hosts"] for g in h["gpus"]
               if g["state"] == "busy"}
    assert on_gpus == {(scene.jobs["a1"], scene.alice.name), (scene.jobs["b1"], scene.bob.name)}


@pytest.mark.parametrize("authorization", ["Bearer nope", "Bearer ", "Basic YTpi", ""])
def test_a_bad_token_is_refused(scene: Scene, authorization: str) -> None:
    r = requests.get(f"{scene.c.url}/api/board", headers={"Authorization": authorization},
                     timeout=30)
    assert r.status_code == 401
    assert r.json() == {"detail": "Invalid or expired token"}


def test_the_page_and_its_files(scene: Scene) -> None:
    url = scene.c.url
    page = requests.get(f"{url}/", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    # No inline script or handler: the CSP would block them.
    assert not re.search(r"<script(?![^>]*\bsrc=)|\son[a-z]+\s*=", page.text, re.I)
    for name, kind in (("board.js", "text/javascript"), ("board.css", "text/css")):
        r = requests.get(f"{url}/board/{name}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert r.headers["x-content-type-options"] == "nosniff"
    script = requests.get(f"{url}/board/board.js", timeout=30).text
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(",
                         script)  # data reaches the page as text only
    for path in ("board/nope.js", "board/index.html", "board/%2e%2e%2fboardapi.py"):
        missing = requests.get(f"{url}/{path}", timeout=30)
        assert missing.status_code == 404 and set(missing.json()) == {"detail"}, path
    schema = requests.get(f"{url}/schema/openapi.json", timeout=30).json()
    assert "/api/board" in schema["paths"]
    assert not {"/", "/board/{name}"} & set(schema["paths"])


# ---- the page in Chromium -------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("GPUJOBQ_CI"):
            pytest.fail("chromium is missing: CI must install it (.ci/run does)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True)
        yield b
        b.close()


def screenshot(page: Page, name: str) -> pathlib.Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"board-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (path, len(data))
    return path


def wait_grid(page: Page, want: dict[tuple[str, int], str]) -> None:
    """Until the page's cells show these states (host, index -> state)."""
    expected = sorted(f"{h}/{i}/{s}" for (h, i), s in want.items())
    page.wait_for_function(
        """want => JSON.stringify([...document.querySelectorAll('.gpu')].map(
             e => `${e.dataset.host}/${e.dataset.index}/${e.dataset.state}`).sort())
           === JSON.stringify(want)""", arg=expected, timeout=WAIT_MS)


def shown_states(body: dict[str, Any]) -> dict[tuple[str, int], str]:
    """The page's cell states for a /api/board answer: a drained host's free GPUs read
    drained, a down host's GPUs down."""
    out = {}
    for h in body["hosts"]:
        for g in h["gpus"]:
            state = g["state"]
            if h["state"] == "down":
                state = "down"
            elif h["state"] == "drained" and state == "free":
                state = "drained"
            out[(h["name"], g["index"])] = state
    return out


def wait_text(page: Page, selector: str, text: str) -> None:
    """Until the element's text is exactly this."""
    page.wait_for_function("([sel, want]) => document.querySelector(sel).textContent === want",
                           arg=[selector, text], timeout=WAIT_MS)


def sign_in(page: Page, user: User) -> None:
    page.fill("#token", user.token)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#who")).to_contain_text(user.name, timeout=WAIT_MS)


def test_the_board_in_chromium(own_scene: Scene, browser: Browser) -> None:
    s, url = own_scene, own_scene.c.url
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text
            else None)
    elsewhere: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(url + "/") else elsewhere.append(r.url))
    try:
        public_view(page, s, url)
        users_view_with_a_live_log(page, s)
        admin_view(page, s)
        live_refresh(page, s)
        files_of_an_ended_job(page, s)
        narrow_screen(browser, s, url)
    finally:
        context.close()
    assert not problems, problems
    assert not elsewhere, elsewhere  # nothing fetched from anywhere but the controller


def public_view(page: Page, s: Scene, url: str) -> None:
    """(a) Hosts and GPU states as /api/board and /api/admin/nodes say; the queue; no
    user name or job id anywhere in the page."""
    page.goto(f"{url}/")
    body = board(s)
    assert states(body["hosts"]) == states(s.c.nodes(s.admin)["hosts"])
    want = shown_states(body)
    assert want == {("node0", 0): "busy", ("node0", 1): "busy",
                    ("node1", 0): "drained", ("node1", 1): "drained"}
    wait_grid(page, want)
    expect(page.locator("#q-pending")).to_have_text("2")
    expect(page.locator("#q-running")).to_have_text("2")
    expect(page.locator("#q-wait")).to_contain_text("≈")
    expect(page.locator(".host[data-host=node1] .badge")).to_have_text("drained")
    assert page.locator("#mine").is_hidden() and page.locator("#all").is_hidden()
    html, text = page.content(), page.inner_text("body")
    assert not [x for x in s.secrets() if x in html or x in text]
    screenshot(page, "public")


def users_view_with_a_live_log(page: Page, s: Scene) -> None:
    """(b) Alice's token: her jobs with position and estimated start; her running job's
    output appears as it prints."""
    a1, a2 = s.jobs["a1"], s.jobs["a2"]
    sign_in(page, s.alice)
    rows = page.locator("#jobs tbody tr")
    expect(rows).to_have_count(2, timeout=WAIT_MS)
    pending = page.locator(f"#jobs tr[data-job='{a2}']")
    expect(pending.locator("td").nth(1)).to_have_text("pending")
    expect(pending.locator("td").nth(2)).to_have_text("2")  # behind carol's
    expect(pending.locator("td").nth(3)).to_contain_text("in ")  # an estimated start
    running_row = page.locator(f"#jobs tr[data-job='{a1}']")
    expect(running_row.locator("td").nth(1)).to_have_text("running")
    expect(page.locator(".gpu.mine")).to_have_count(1)
    assert s.bob.name not in page.inner_text("body")

    running_row.click()
    log = page.locator("#log-text")
    expect(page.locator("#log-job")).to_have_text(a1)
    wait_text(page, "#log-text", "started\n")
    s.say(a1, "epoch 1: loss 0.42")
    wait_text(page, "#log-text", "started\nepoch 1: loss 0.42\n")
    s.say(a1, "epoch 2: loss 0.17 <b>not markup</b>")
    expect(log).to_contain_text("epoch 2: loss 0.17 <b>not markup</b>", timeout=WAIT_MS)
    assert page.locator("#log-text b").count() == 0  # text, never HTML
    assert s.c.get(s.alice, "status", a1).json()["status"] == "running"  # live, not at the end
    screenshot(page, "user-log")


def admin_view(page: Page, s: Scene) -> None:
    """(c) An admin's token: everyone's jobs, with their users."""
    page.click("#forget")
    expect(page.locator("#mine")).to_be_hidden(timeout=WAIT_MS)
    expect(page.locator("#log")).to_be_hidden()
    sign_in(page, s.admin)
    active = page.locator("#active tbody tr")
    expect(active).to_have_count(4, timeout=WAIT_MS)
    for name, user in (("b1", s.bob), ("c1", s.carol), ("a1", s.alice)):
        row = page.locator(f"#active tr[data-job='{s.jobs[name]}']")
        expect(row.locator("td").nth(1)).to_have_text(user.name)
    expect(page.locator(".gpu[data-host=node0][data-state=busy]")).to_have_count(2)
    expect(page.locator("#hosts")).to_contain_text(s.bob.name)
    b1 = s.jobs["b1"]  # bob's: an admin follows it through /api/admin/logs
    page.locator(f"#active tr[data-job='{b1}']").click()
    expect(page.locator("#log-job")).to_have_text(b1)
    wait_text(page, "#log-text", "started\n")
    screenshot(page, "admin")


def live_refresh(page: Page, s: Scene) -> None:
    """(d) A job ends: the grid changes without a reload. The waiting jobs are cancelled
    first, so the freed GPU stays free."""
    for name, user in (("a2", s.alice), ("c1", s.carol)):
        assert s.c.cancel(user, s.jobs[name]).json()["status"] == "cancelled"
    page.evaluate("window.__stillTheSamePage = true")
    b1 = s.jobs["b1"]
    gpu = page.locator(f".gpu[data-host=node0]:has-text('{b1[-8:]}')")
    expect(gpu).to_have_attribute("data-state", "busy", timeout=WAIT_MS)
    index = int(gpu.get_attribute("data-index") or "-1")
    s.say(b1, "exit")
    s.c.wait_status(s.bob, b1, {"completed"})
    expect(page.locator(f".gpu[data-host=node0][data-index='{index}']")).to_have_attribute(
        "data-state", "free", timeout=WAIT_MS)
    expect(page.locator("#q-running")).to_have_text("1")
    expect(page.locator("#q-pending")).to_have_text("0")
    expect(page.locator(f"#active tr[data-job='{b1}']")).to_have_count(0)
    assert page.evaluate("window.__stillTheSamePage") is True
    screenshot(page, "after-job-ended")


def files_of_an_ended_job(page: Page, s: Scene) -> None:
    """A finished job's log lists the files it wrote; one downloads with the token."""
    code = ("import os, pathlib\nout = pathlib.Path(os.environ['GPUJOBQ_OUTPUT'])\n"
            "(out / 'plots').mkdir()\n(out / 'plots' / 'loss.csv').write_text('1,0.5\\n')\n"
            "print('done')\n")
    body = s.c.submit(s.alice, code)
    assert body.json()["status"] == "completed", body.text
    job_id = body.json()["job_id"]
    page.click("#forget")
    sign_in(page, s.alice)
    page.locator(f"#jobs tr[data-job='{job_id}']").click(timeout=WAIT_MS)
    files = page.locator("#log-files-list li")
    expect(files).to_have_count(1, timeout=WAIT_MS)
    expect(files).to_have_text("plots/loss.csv 6 B")
    with page.expect_download(timeout=WAIT_MS) as download:
        files.locator("button").click()
    assert download.value.suggested_filename == "loss.csv"
    assert pathlib.Path(download.value.path()).read_text() == "1,0.5\n"
    screenshot(page, "files")


def narrow_screen(browser: Browser, s: Scene, url: str) -> None:
    """A phone's width: nothing wider than the screen but the tables' own scroll box."""
    context = browser.new_context(viewport={"width": 375, "height": 800})
    try:
        page = context.new_page()
        page.goto(f"{url}/")
        wait_grid(page, shown_states(board(s)))
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        screenshot(page, "narrow")
    finally:
        context.close()
