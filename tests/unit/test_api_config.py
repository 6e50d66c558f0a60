"""The submit route keeps parsed config.yaml files (a pure function of the bytes)."""

from __future__ import annotations

import pytest
from gpujobq.controller import api
from gpujobq.protocol import jobconfig

RAW = b"competition_id: c\nproject_id: p\nuser_id: alice\nexpected_time: 10\n"


def test_the_same_file_is_parsed_once() -> None:
    api._parsed.cache_clear()
    first = api._config(RAW)
    assert api._config(bytes(RAW)) is first  # equal bytes: the kept parse
    assert api._parsed.cache_info().hits == 1
    assert first == jobconfig.parse(RAW)


def test_a_file_with_a_token_or_a_refusal_is_never_kept() -> None:
    api._parsed.cache_clear()
    with_token = RAW + b"token: gjq_x\n"
    assert api._config(with_token).token == "gjq_x"
    assert api._parsed.cache_info().currsize == 0
    for _ in range(2):
        with pytest.raises(jobconfig.ConfigError):
            api._config(b"competition_id: c\n")
    assert api._parsed.cache_info().currsize == 0
