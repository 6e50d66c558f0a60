"""The NVIDIA Container Toolkit check (agent/toolkit.py) and how admins see it."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest
from gpujobq.agent import toolkit

CTK = "NVIDIA Container Toolkit CLI version 1.17.8\ncommit: f202b80a9b9d\n"
CLI = "cli-version: 1.19.1\nlib-version: 1.19.1\nbuild date: 2026-07-01T10:11:12+00:00\n"


@pytest.mark.parametrize(("text", "version"), [
    (CTK, (1, 17, 8)), (CLI, (1, 19, 1)), ("version v1.20.0-rc.1", (1, 20, 0)),
    ("command not found", None), ("", None),
])
def test_parse(text: str, version: tuple[int, int, int] | None) -> None:
    assert toolkit.parse(text) == version


def test_warning() -> None:
    assert toolkit.warning((1, 19, 1)) is None
    assert toolkit.warning((2, 0, 0)) is None
    old = toolkit.warning((1, 17, 8))
    assert old is not None and "1.17.8 has known container escapes" in old
    assert "upgrade to 1.19.1 or later" in old
    unknown = toolkit.warning(None)
    assert unknown is not None and "version unknown" in unknown


def _fake(folder: pathlib.Path, name: str, output: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\n")  # printf: a builtin, no PATH
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_installed_asks_nvidia_ctk_then_nvidia_container_cli(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert toolkit.installed() is None  # neither installed
    _fake(tmp_path, "nvidia-container-cli", CLI)
    assert toolkit.installed() == (1, 19, 1)
    _fake(tmp_path, "nvidia-ctk", CTK)
    assert toolkit.installed() == (1, 17, 8)
    assert os.environ["PATH"] == str(tmp_path)
