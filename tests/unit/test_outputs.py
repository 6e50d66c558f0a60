"""Reading a job's output folder back: caps, names a result cannot carry, bounded walks."""

from __future__ import annotations

import os
import pathlib

import pytest
from gpujobq.agent import outputs


def test_files_within_the_caps_and_the_rest_named(tmp_path: pathlib.Path) -> None:
    for i in range(25):
        (tmp_path / f"f{i:02d}").write_bytes(b"x" * i)
    files, detail = outputs.collect(tmp_path, cap=1000, max_files=3)
    assert [(f.name, f.data) for f in files] == [("f00", b""), ("f01", b"x"), ("f02", b"xx")]
    names = ", ".join(f"f{i:02d}" for i in range(3, 23))
    assert detail == f"skipped in output: {names} and 2 more"


def test_a_name_that_is_not_utf8_is_named_escaped_not_carried(tmp_path: pathlib.Path) -> None:
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xffname"), "wb") as fh:
        fh.write(b"data")
    (tmp_path / "good").write_text("ok")
    files, detail = outputs.collect(tmp_path)
    assert [f.name for f in files] == ["good"]
    assert detail == "skipped in output: bad\\xffname"


def test_the_walk_stops_after_max_entries(tmp_path: pathlib.Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "MAX_ENTRIES", 5)
    for i in range(8):
        (tmp_path / f"e{i}").touch()
    files, detail = outputs.collect(tmp_path)
    assert [f.name for f in files] == [f"e{i}" for i in range(5)]
    assert detail == "output read no further than 5 names"
