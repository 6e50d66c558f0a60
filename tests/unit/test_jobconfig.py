from __future__ import annotations

import json
import math

import msgspec
import pytest
import yaml
from gpujobq.protocol import jobconfig, yamlsafe
from gpujobq.protocol.jobconfig import ConfigError, JobConfig

FIELDS = {
    "competition_id": "comp-1",
    "project_id": "proj_1",
    "user_id": "alice",
    "expected_time": 300,
    "token": "secret",
}
EXPECTED = JobConfig(
    competition_id="comp-1", project_id="proj_1", user_id="alice",
    expected_time=300.0, token="secret",
)


def as_yaml(**changes: object) -> bytes:
    fields = {**FIELDS, **changes}
    return yaml.safe_dump({k: v for k, v in fields.items() if v is not ...}).encode()


def refused(raw: bytes) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        jobconfig.parse(raw)
    return info.value


# ---- accepted forms ------------------------------------------------------------------


def test_yaml_form() -> None:
    raw = (
        b'competition_id: "comp-1"\nproject_id: proj_1\nuser_id: alice\n'
        b"expected_time: 300  # seconds\ntoken: secret\n"
    )
    assert jobconfig.parse(raw) == EXPECTED


def test_json_form() -> None:
    assert jobconfig.parse(json.dumps(FIELDS).encode()) == EXPECTED


def test_python_dict_str_form() -> None:
    assert jobconfig.parse(str(FIELDS).encode()) == EXPECTED


def test_token_is_optional_and_float_accepted() -> None:
    config = jobconfig.parse(as_yaml(token=..., expected_time=1.5))
    assert config.token is None and config.expected_time == 1.5


def test_utf8_bom_accepted() -> None:
    assert jobconfig.parse(b"\xef\xbb\xbf" + as_yaml()) == EXPECTED


def test_json_exponent_number() -> None:
    raw = b'{"competition_id": "c", "project_id": "p", "user_id": "u", "expected_time": 1e3}'
    assert jobconfig.parse(raw).expected_time == 1000.0


# ---- schema errors (malformed False, the message names the field) ---------------------


def test_unknown_field() -> None:
    exc = refused(as_yaml(gpu=2))
    assert not exc.malformed
    assert "gpu" in str(exc)


def test_gpus_field() -> None:
    assert jobconfig.parse(as_yaml(gpus=2)).gpus == 2
    assert jobconfig.parse(as_yaml()).gpus is None
    for bad in (0, -1, 1.5, "2", True):
        assert "gpus" in str(refused(as_yaml(gpus=bad)))
    job_sees = jobconfig.for_job(jobconfig.parse(as_yaml(gpus=2)))
    assert b"gpus: 2" in job_sees
    assert b"gpus" not in jobconfig.for_job(jobconfig.parse(as_yaml()))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expected_time", "300"),
        ("expected_time", True),
        ("user_id", 5),
        ("project_id", None),
        ("token", 123),
        ("competition_id", ["a"]),
    ],
)
def test_wrong_type(field: str, value: object) -> None:
    exc = refused(as_yaml(**{field: value}))
    assert not exc.malformed
    assert field in str(exc)


@pytest.mark.parametrize("field", ["competition_id", "project_id", "user_id", "expected_time"])
def test_missing_field(field: str) -> None:
    exc = refused(as_yaml(**{field: ...}))
    assert not exc.malformed
    assert field in str(exc)


@pytest.mark.parametrize(
    "value", [0, -1, -0.5, math.inf, -math.inf, math.nan, jobconfig.MAX_EXPECTED_TIME + 1]
)
def test_bad_expected_time(value: float) -> None:
    exc = refused(as_yaml(expected_time=value))
    assert not exc.malformed
    assert "expected_time" in str(exc)


def test_max_expected_time_accepted() -> None:
    config = jobconfig.parse(as_yaml(expected_time=jobconfig.MAX_EXPECTED_TIME))
    assert config.expected_time == jobconfig.MAX_EXPECTED_TIME


@pytest.mark.parametrize("field", ["competition_id", "project_id", "user_id"])
@pytest.mark.parametrize(
    "value", ["../x", "a/b", "", "x" * 65, ".hidden", "-dash", "a b", "a\\b", "é"]
)
def test_bad_ids(field: str, value: str) -> None:
    exc = refused(as_yaml(**{field: value}))
    assert not exc.malformed
    assert field in str(exc)
    assert not jobconfig.valid_id(value)


@pytest.mark.parametrize("value", ["a", "x" * 64, "A.b_c-9", "9lives"])
def test_good_ids(value: str) -> None:
    assert jobconfig.parse(as_yaml(user_id=value)).user_id == value
    assert jobconfig.valid_id(value)


def test_id_with_trailing_newline_rejected() -> None:
    assert not jobconfig.valid_id("alice\n")
    exc = refused(as_yaml(user_id="alice\n"))
    assert "user_id" in str(exc)


# ---- malformed documents (malformed True) ----------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"competition_id: [unclosed\n",
        b"a: b: c\n",
        b"\tkey: value\n",
        b"- a\n- b\n",
        b"just a string\n",
        b"42\n",
        b"",
        b"a: 1\na: 2\n",
        b"{user_id: a, 'user_id': b}",
        b"base: &x {a: 1}\nother: *x\n",
        b"\xff\xfe\x00a",
        b"user_id: caf\xe9\n",
        b"a: " + b"x" * (64 << 10) + b"\n",
    ],
    ids=[
        "unclosed", "bad-mapping", "tab", "list", "scalar", "int", "empty", "dup-keys",
        "dup-keys-quoted", "alias", "utf16", "latin1", "oversize",
    ],
)
def test_malformed(raw: bytes) -> None:
    assert refused(raw).malformed


def test_duplicate_key_in_full_config_is_malformed() -> None:
    raw = as_yaml() + b"user_id: mallory\n"
    assert refused(raw).malformed


# ---- for_job ----------------------------------------------------------------------------


def test_for_job_drops_token() -> None:
    out = jobconfig.for_job(EXPECTED)
    assert b"secret" not in out and b"token" not in out
    assert yaml.safe_load(out) == {
        "competition_id": "comp-1", "project_id": "proj_1", "user_id": "alice",
        "expected_time": 300.0,
    }


def test_for_job_keeps_the_text_of_configs_without_a_token_only() -> None:
    plain = msgspec.structs.replace(EXPECTED, token=None)
    assert jobconfig.for_job(plain) is jobconfig.for_job(plain)  # rendered once
    kept = jobconfig._kept.cache_info().currsize
    assert jobconfig.for_job(EXPECTED) == jobconfig.for_job(plain)  # the job sees the same
    assert jobconfig._kept.cache_info().currsize == kept  # the token's config is not kept


def test_for_job_round_trips_through_parse() -> None:
    assert jobconfig.parse(jobconfig.for_job(EXPECTED)) == JobConfig(
        competition_id="comp-1", project_id="proj_1", user_id="alice", expected_time=300.0
    )


# ---- yamlsafe directly ---------------------------------------------------------------------


def test_yamlsafe_loads_safe_types() -> None:
    assert yamlsafe.load(b"a: 1\nb: [x, 2.5, true, null]\nc: {d: e}\n") == {
        "a": 1, "b": ["x", 2.5, True, None], "c": {"d": "e"},
    }
    assert yamlsafe.load("a: 1") == {"a": 1}
    assert yamlsafe.load(b"") is None


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\na: 2\n",
        "outer:\n  a: 1\n  a: 2\n",
        "- {k: 1, k: 2}\n",
        "x: &anchor 1\ny: *anchor\n",
        "a: !!python/object/apply:os.system ['true']\n",
        "a: [unclosed\n",
    ],
    ids=["dup", "nested-dup", "dup-in-list", "alias", "python-tag", "syntax"],
)
def test_yamlsafe_refuses(text: str) -> None:
    with pytest.raises(yamlsafe.YAMLError):
        yamlsafe.load(text)


def test_yamlsafe_size_cap() -> None:
    raw = b"a: " + b"x" * 97
    assert yamlsafe.load(raw, max_bytes=100) == {"a": "x" * 97}
    with pytest.raises(yamlsafe.YAMLError, match="larger than 99 bytes"):
        yamlsafe.load(raw, max_bytes=99)


def test_yamlsafe_non_utf8() -> None:
    with pytest.raises(yamlsafe.YAMLError, match="UTF-8"):
        yamlsafe.load(b"a: \xff\n")


def test_yamlsafe_error_is_one_line() -> None:
    with pytest.raises(yamlsafe.YAMLError) as info:
        yamlsafe.load("a: 1\na: 2\n")
    assert "\n" not in str(info.value)
    assert str(info.value) == "duplicate key (line 2, column 1)"


@pytest.mark.parametrize("text", [
    "a: 1\ntoken: gjq_SECRET x: y\n", "a: !gjq_SECRET 1", "a: !gjq_SECRET!y 1",
    "a: &gjq_SECRET 1", "gjq_SECRET: 1\ngjq_SECRET: 2", 'a: "gjq_SECRET\\q"',
    "a: *gjq_SECRET", "{gjq_SECRET: [1, 2}",
    "%TAG !gjq_SECRET! tag:x,2000:\n---\na: !gjq_SECRET!y 1",
    "a: 'gjq_SECRET", "- gjq_SECRET\n  - x: {",
])
def test_yamlsafe_errors_never_quote_the_input(text: str) -> None:
    """A config line may hold a token, and error details are logged."""
    with pytest.raises(yamlsafe.YAMLError) as info:
        yamlsafe.load(text)
    assert "SECRET" not in str(info.value)
    assert "line " in str(info.value)


def test_dump_flat_reads_back_as_written_by_both_loaders() -> None:
    tricky = {"a": "comp-1", "b": "123", "c": "yes", "d": "1e3", "e": "0x1F", "f": "null",
              "g": "1.5", "h": "~", "i": "a.b", "j": "on", "k": "2024-01-01", "l": "x: y",
              "m": 300.0, "n": 1e-05, "o": 2, "p": True, "q": None, "r": 'say "hi"\n'}
    out = yamlsafe.dump_flat(tricky)
    assert yaml.safe_load(out) == tricky  # what a job's own yaml.safe_load sees
    assert yamlsafe.load(out) == tricky
    assert "a: comp-1\n" in out and 'b: "123"\n' in out  # plain where plain reads back


@pytest.mark.parametrize("text", [
    "- " * 100 + "x",
    "".join("  " * i + "a:\n" for i in range(100)) + "  " * 100 + "b",
    "[" * 100 + "]" * 100,
], ids=["block-seq", "block-map", "flow"])
def test_yamlsafe_refuses_deep_nesting_of_every_kind(text: str) -> None:
    with pytest.raises(yamlsafe.YAMLError, match="nested too deeply"):
        yamlsafe.load(text)
