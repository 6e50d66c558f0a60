"""The client's pure parts: SSE parsing, rebuilding output from log events, exit statuses,
squeue-like tables and times, where the server and token come from."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import pathlib
import re
from typing import Any

import httpx
import pytest
from gpujobq.client import api, cli, config, display, follower, sse, watch
from gpujobq.client.console import Console

UTC = dt.UTC
NOW = dt.datetime(2025, 11, 6, 10, 30, 0, tzinfo=UTC)


# ---- SSE ------------------------------------------------------------------------------


def parse(text: str) -> list[sse.Event]:
    parser = sse.Parser()
    return [e for line in text.splitlines() if (e := parser.feed(line)) is not None]


def test_sse_events_as_the_server_frames_them() -> None:
    stream = ('event: output\r\ndata: {"stream":"stdout","offset":0,"text":"hi\\n"}\r\n\r\n'
              ": waiting\r\n\r\n"
              'event: end\r\ndata: {"status":"completed","exit_code":0,"reason":"exit_code"}'
              "\r\n\r\n")
    events = parse(stream)
    assert [e.event for e in events] == ["output", "end"]  # the keepalive is no event
    assert events[0].json() == {"stream": "stdout", "offset": 0, "text": "hi\n"}


def test_sse_fields_follow_the_standard() -> None:
    events = parse("data:first\ndata:  second\nid: 7\n\n"  # one leading space is dropped
                   "event: lonely\n\n"  # no data: no event, and its type is forgotten
                   "data\nretry: 10\nfoo: bar\n\n")
    assert events == [sse.Event("message", "first\n second", "7"),
                      sse.Event("message", "", "7")]


def test_sse_lines_end_at_crlf_lf_or_cr_wherever_the_chunks_are_cut() -> None:
    raw = "event: output\r\ndata: é€😀\r\rlone\nlf\r\n\r\nlast\r".encode()
    want = ["event: output", "data: é€😀", "", "lone", "lf", "", "last"]
    for cut in range(len(raw) + 1):
        for step in (1, 2, 3, len(raw) or 1):
            lines = sse.Lines()
            got = lines.feed(raw[:cut])
            for i in range(cut, len(raw), step):
                got += lines.feed(raw[i:i + step])
            assert got == want, (cut, step)


def test_sse_lines_read_bad_bytes_as_replacement_characters() -> None:
    assert sse.Lines().feed(b"data: \xff\xfeok\n") == ["data: \ufffd\ufffdok"]


# ---- following output ------------------------------------------------------------------


def output(stream: str, offset: int, text: str, size: int | None = None) -> sse.Event:
    data: dict[str, object] = {"stream": stream, "offset": offset, "text": text}
    if size is not None:
        data["size"] = size
    return sse.Event("output", json.dumps(data))


def test_invalid_bytes_do_not_shift_what_follows() -> None:
    # b"\xffabc\n" arrives as "\ufffdabc\n": 5 stream bytes, 7 bytes of UTF-8.
    f = follower.Follower()
    assert written(f, output("stdout", 0, "\ufffdabc\n", 5), output("stdout", 5, "second\n", 7),
                   output("stdout", 0, "\ufffdabc\nsecond\n", 12)) == [
        ("stdout", "\ufffdabc\n".encode()), ("stdout", b"second\n")]


def test_a_first_start_after_pending_is_no_restart() -> None:
    f = follower.Follower(0)  # followed while pending; then a reconnect finds attempt 1
    written(f, output("stdout", 0, "a\n"))
    con = Console(io.TextIOWrapper(io.BytesIO()), io.StringIO())
    watch._check_attempt({"job_id": "j", "attempt": 1}, f, con)  # type: ignore[typeddict-item]
    assert (f.attempt, f.written["stdout"]) == (1, 2)  # nothing to print again
    watch._check_attempt({"job_id": "j", "attempt": 2}, f, con)  # type: ignore[typeddict-item]
    assert (f.attempt, f.written["stdout"]) == (2, 0)  # a real restart starts over


def written(f: follower.Follower, *events: sse.Event) -> list[tuple[str, bytes]]:
    return [tuple(w) for e in events for w in f.feed(e)]  # type: ignore[misc]


def test_each_byte_is_written_once_when_history_is_sent_again() -> None:
    f = follower.Follower(attempt=1)
    assert written(f, output("stdout", 0, "one\n"), output("stderr", 0, "warn\n"),
                   output("stdout", 4, "two\n")) == [
        ("stdout", b"one\n"), ("stderr", b"warn\n"), ("stdout", b"two\n")]
    # A reconnect starts from 0 again, in other pieces: only what is new comes through.
    assert written(f, output("stdout", 0, "one\ntw"), output("stdout", 6, "o\nthree\n"),
                   output("stderr", 0, "warn\n")) == [("stdout", b"three\n")]
    assert f.written == {"stdout": 14, "stderr": 5}


def test_offsets_are_bytes_and_a_split_character_comes_whole() -> None:
    f = follower.Follower()
    got = written(f, output("stdout", 0, "a"), output("stdout", 1, "€b"),  # € is 3 bytes
                  output("stdout", 0, "a€"), output("stdout", 4, "bc"))
    assert b"".join(data for _, data in got) == "a€bc".encode()


def test_a_restart_starts_the_output_over_and_the_end_is_kept() -> None:
    f = follower.Follower(attempt=1)
    written(f, output("stdout", 0, "try\n"))
    assert written(f, sse.Event("restart", '{"attempt": 2}'), output("stdout", 0, "try\n")) == [
        ("stdout", b"try\n")]
    assert f.attempt == 2 and f.end is None
    written(f, sse.Event("end", '{"status": "failed", "exit_code": 3, "reason": "exit_code"}'))
    assert f.end == follower.End("failed", 3, "exit_code")


@pytest.mark.parametrize(("status", "exit_code", "reason", "expected"), [
    ("completed", 0, "exit_code", 0),
    ("failed", 3, "exit_code", 3),
    ("failed", 1, "exit_code", 1),
    ("failed", 143, "timeout", follower.TIMEOUT),
    ("failed", None, "timeout", 124),
    ("failed", 137, "oom", 137),
    ("cancelled", 143, "cancelled_by_user", 143),
    ("cancelled", None, "cancelled_by_user", 143),
    ("failed", None, "node_lost", follower.PLATFORM),
    ("failed", None, "infra_error", 125),
    ("failed", 137, "output_limit", 125),
    ("failed", 300, "exit_code", 125),  # not an exit status a shell could give
])
def test_exit_status(status: str, exit_code: int | None, reason: str, expected: int) -> None:
    assert follower.exit_status(follower.End(status, exit_code, reason)) == expected


# ---- tables and times ------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0:00"), (59.9, "0:59"), (61, "1:01"), (3600, "1:00:00"), (86400 + 3661, "1-01:01:01"),
    (-5, "0:00")])
def test_duration_is_squeues(seconds: float, text: str) -> None:
    assert display.duration(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (-3, "now"), (0, "now"), (45, "in 45s"), (120, "in 2m"), (3900, "in 1h05m"),
    (5 * 86400, "in 5d")])
def test_relative(seconds: float, text: str) -> None:
    assert display.relative(seconds) == text


def test_clock_shows_the_date_only_when_it_is_not_today() -> None:
    assert display.clock(NOW + dt.timedelta(minutes=2), NOW, UTC) == "10:32:00"
    assert display.clock(NOW + dt.timedelta(days=1), NOW, UTC) == "2025-11-07 10:30"
    assert display.parse_time("2025-11-06T10:30:00") == NOW  # the API's times are UTC


def job(**fields: Any) -> dict[str, Any]:
    return {"job_id": "j1", "competition_id": "cifar", "node": None, "started_at": None,
            "completed_at": None, "reason": None, "exit_code": None, **fields}


def test_rows_say_state_node_time_and_reason() -> None:
    pending = job(job_id="p", status="pending", queue_position=3, pending_reason=
                  "waiting for a free GPU", estimated_start="2025-11-06T10:32:00")
    running = job(job_id="r", status="running", node="node0", started_at="2025-11-06T10:28:55")
    done = job(job_id="d", status="failed", node="node1", started_at="2025-11-06T09:00:00",
               completed_at="2025-11-06T10:01:02", reason="exit_code", exit_code=3)
    stopped = job(job_id="c", status="cancelled", reason="cancelled_by_user")
    timed_out = job(job_id="t", status="failed", reason="timeout", exit_code=143)
    assert display.jobs_table([pending, running, done, stopped, timed_out], NOW, UTC) == "\n".join([
        "ID  ST  COMPETITION  NODE      TIME  REASON",
        "p   PD  cifar        -         0:00  waiting for a free GPU; position 3, "
        "start ~10:32:00 (in 2m)",
        "r   R   cifar        node0     1:05  -",
        "d   F   cifar        node1  1:01:02  exit 3",
        "c   CA  cifar        -         0:00  cancelled_by_user",
        "t   F   cifar        -         0:00  timeout",
    ])
    assert display.row(job(status="completed", reason="exit_code", exit_code=0), NOW)[1:] == [
        "CD", "cifar", "-", "0:00", "exit 0"]


def test_the_pending_line() -> None:
    assert display.pending_line(job(status="pending", queue_position=1,
                                    pending_reason="waiting for a free GPU",
                                    estimated_start=None), NOW) == (
        "pending: waiting for a free GPU; position 1")
    assert display.pending_line(job(status="pending"), NOW) == "pending"


def test_how_a_job_ended_in_words() -> None:
    assert display.ending("j", "failed", 3, "exit_code") == "job j failed with exit code 3"
    assert display.ending("j", "failed", 143, "timeout") == "job j failed: ran past its time limit"
    assert display.ending("j", "cancelled", 143, "cancelled_by_user") == "job j cancelled"


# ---- the console -----------------------------------------------------------------------


def test_without_a_terminal_a_status_line_is_written_only_when_it_changes() -> None:
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    con = Console(io.TextIOWrapper(io.BytesIO()), err)
    assert not con.live
    for line, key in [("pending: position 2 (in 2m)", 2), ("pending: position 2 (in 1m)", 2),
                      ("pending: position 1 (in 1m)", 1)]:
        con.status(line, key=key)
    con.write("stderr", "out€\n".encode())
    err.flush()
    assert err.buffer.getvalue().decode() == (
        "gpujobq: pending: position 2 (in 2m)\ngpujobq: pending: position 1 (in 1m)\nout€\n")


def test_on_a_terminal_the_status_line_is_rewritten_in_place() -> None:
    leader, follower_fd = os.openpty()
    with open(follower_fd, "w", encoding="utf-8") as tty:
        con = Console(io.TextIOWrapper(io.BytesIO()), tty)
        assert con.live
        con.status("pending: position 2")
        con.status("pending: position 1")
        con.note("job j running on node0")
        raw = b""
        while not raw.endswith(b"\r\n"):  # a pty may hand the writes over in parts
            raw += os.read(leader, 4096)
    os.close(leader)
    got = raw.decode()
    assert got == ("\r\x1b[Kpending: position 2\r\x1b[Kpending: position 1\r\x1b[K"
                   "gpujobq: job j running on node0\r\n")  # the terminal adds \r


# ---- configuration ---------------------------------------------------------------------


def write(path: pathlib.Path, text: str, mode: int = 0o600) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_environment_wins_over_the_file(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "gpujobq" / "config.yaml", "server: files.example:8001\ntoken: from-file\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert config.load(env) == config.Settings("http://files.example:8001", "from-file",
                                               str(tmp_path / "gpujobq" / "config.yaml"))
    env |= {"GPUJOBQ_TOKEN": "from-env"}
    got = config.load(env)
    assert (got.server, got.token, got.token_from) == (
        "http://files.example:8001", "from-env", "$GPUJOBQ_TOKEN")


def test_the_default_file_is_under_home(tmp_path: pathlib.Path) -> None:
    assert config.default_path({"HOME": "/home/ann"}) == pathlib.Path(
        "/home/ann/.config/gpujobq/config.yaml")
    path = write(tmp_path / "c.yaml", "server: https://q.example/\ntoken: t\n")
    got = config.load({"GPUJOBQ_CONFIG": str(path), "HOME": "/nonexistent"})
    assert got.server == "https://q.example"


def test_missing_settings_say_what_to_do(tmp_path: pathlib.Path) -> None:
    with pytest.raises(config.ConfigError, match=r"no server and token configured: set "
                       r"GPUJOBQ_SERVER and GPUJOBQ_TOKEN, or write 'server:' and 'token:' "):
        config.load({"HOME": str(tmp_path)})
    with pytest.raises(config.ConfigError, match="no token configured"):
        config.load({"HOME": str(tmp_path), "GPUJOBQ_SERVER": "h:1"})
    with pytest.raises(config.ConfigError, match=r"config file .*nope\.yaml does not exist"):
        config.load({"GPUJOBQ_SERVER": "h:1", "GPUJOBQ_TOKEN": "t"}, tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "message"), [
    ("sever: h:1\n", "unknown field `sever`"),
    ("server: [1]\n", "Expected `str | null`, got `array` - at `server`"),
    ("- a\n", "Expected `object`, got `array`"),
    ("server: 'h\n", "not valid YAML"),
])
def test_a_bad_config_file_names_the_problem(tmp_path: pathlib.Path, text: str,
                                             message: str) -> None:
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(config.ConfigError, match=re.escape(str(path))) as caught:
        config.load({}, path)
    assert message in str(caught.value)


def test_a_token_file_others_can_read_draws_a_warning(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "c.yaml", "server: h:1\ntoken: t\n", mode=0o644)
    warnings: list[str] = []
    assert config.load({}, path, warn=warnings.append).token == "t"
    assert warnings == [f"warning: {path} holds a token and is readable by others (mode 0644); "
                        f"run: chmod 600 {path}"]
    path.chmod(0o600)
    warnings.clear()
    config.load({}, path, warn=warnings.append)
    assert warnings == []
    write(path, "server: h:1\n", mode=0o644)  # no token in it: nothing to protect
    config.load({"GPUJOBQ_TOKEN": "t"}, path, warn=warnings.append)
    assert warnings == []


@pytest.mark.parametrize(("server", "url"), [
    ("127.0.0.1:8001", "http://127.0.0.1:8001"), ("https://q.example/", "https://q.example"),
    (" http://h:1/prefix/ ", "http://h:1/prefix")])
def test_server_urls(server: str, url: str) -> None:
    assert config.base_url(server) == url


@pytest.mark.parametrize("server", ["ftp://h", "http://", "http://h:1/?x=1"])
def test_bad_server_urls(server: str) -> None:
    with pytest.raises(config.ConfigError, match="server"):
        config.base_url(server)


def test_a_token_a_header_cannot_carry_is_refused() -> None:
    with pytest.raises(config.ConfigError, match="the token in \\$GPUJOBQ_TOKEN holds"):
        config.load({"GPUJOBQ_SERVER": "h:1", "GPUJOBQ_TOKEN": "a b"})


# ---- reading answers -------------------------------------------------------------------


def client_answering(status: int, body: bytes, **headers: str) -> api.Client:
    transport = httpx.MockTransport(lambda _: httpx.Response(status, content=body,
                                                             headers=headers))
    return api.Client("http://q.example", "t", transport=transport)


def test_a_refusal_keeps_the_detail_and_retry_after() -> None:
    with pytest.raises(api.ApiError) as caught:
        client_answering(429, b'{"detail": "Too many submissions"}',
                         **{"Retry-After": "42"}).status("x")
    assert (caught.value.status, caught.value.detail, caught.value.retry_after) == (
        429, "Too many submissions", 42.0)


def test_an_answer_that_is_not_the_apis_is_named_so() -> None:
    with pytest.raises(api.BadAnswer, match="is this a gpujobq server"):
        client_answering(404, b"<html>nope</html>").status("x")
    with pytest.raises(api.BadAnswer, match="unexpected answer"):
        client_answering(200, b'{"job_id": 1}').status("x")
    with pytest.raises(api.BadAnswer, match="unexpected answer"):
        client_answering(200, b"<html>").results("x")


def test_answers_keep_fields_the_client_does_not_know() -> None:
    body = {"job_id": "x", "status": "pending", "node_id": None, "created_at": None,
            "started_at": None, "completed_at": None, "brand_new": [1]}
    assert client_answering(200, json.dumps(body).encode()).status("x") == body


def test_a_refusal_in_words() -> None:
    settings = config.Settings("http://h:1", "t", "$GPUJOBQ_TOKEN")
    busy = "Too Many Requests: at most 1 active job(s) (pending or running) per user"
    assert cli._describe(api.ApiError(429, busy, 42.0), settings) == (
        f"{busy} (HTTP 429); try again in 42 s")
    said = "Too Many Requests: at most 5 submissions per minute; retry in 7 s"
    assert cli._describe(api.ApiError(429, said, 7.0), settings) == f"{said} (HTTP 429)"
    assert cli._describe(api.ApiError(401, "Invalid or expired token"), settings) == (
        "Invalid or expired token (HTTP 401); the token is from $GPUJOBQ_TOKEN")
    assert cli._describe(api.Unreachable("cannot reach http://h:1"), None) == (
        "cannot reach http://h:1")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "..", "", "."])
def test_an_artifact_name_never_leaves_the_folder(name: str, tmp_path: pathlib.Path) -> None:
    with pytest.raises(api.BadAnswer):
        cli._inside(tmp_path, name)
    assert cli._inside(tmp_path, "plots/loss.csv") == tmp_path / "plots" / "loss.csv"
