"""The systemd units: `systemd-analyze verify` finds nothing to say about them, their key
hardening stays, and their exposure stays within what docs/systemd.md records.

No systemd runs as PID 1 where these tests run: `verify` checks a copy of the unit in a
scratch root (systemd's own units, the unit, its programs), `security --offline=true`
reads the unit file alone.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "systemd.md"
UNITS = {"gpujobq-controller": "gpujobq", "gpujobq-agent": "gpujobq-agent"}  # unit: user
INSTALLED = pathlib.PurePosixPath("/opt/gpujobq/bin")  # where the units expect the package
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop",
             "ExecStopPost")


@pytest.fixture(scope="module")
def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("GPUJOBQ_CI"):
            pytest.fail("systemd-analyze is missing: CI must install systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


def unit_path(unit: str) -> pathlib.Path:
    return ROOT / "systemd" / f"{unit}.service"


def directives(unit: str, section: str = "Service") -> dict[str, list[str]]:
    """Every value of each directive of a section, in order (a key may repeat)."""
    found: dict[str, list[str]] = {}
    current = None
    for raw in unit_path(unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{unit}: continued lines are not parsed here"
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def programs(unit: str) -> list[pathlib.PurePosixPath]:
    """The program of each Exec* line, without systemd's prefixes (-, @, :, +, !)."""
    found = []
    for key, values in directives(unit).items():
        if key in EXEC_KEYS:
            for value in values:
                found.append(pathlib.PurePosixPath(shlex.split(value)[0].lstrip("-@:+!")))
    return found


def entry_point(name: str) -> pathlib.Path:
    """The package's console script: beside this interpreter, else on PATH."""
    beside = pathlib.Path(sys.executable).parent / name
    found = beside if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed beside {sys.executable} nor on PATH: "
                    "install the package (make venv)")
    return pathlib.Path(found)


def systemd_units() -> pathlib.Path:
    for folder in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if (pathlib.Path(folder) / "multi-user.target").exists():
            return pathlib.Path(folder)
    pytest.fail("systemd's own units (multi-user.target) are not installed")


def recorded_exposure() -> dict[str, float]:
    """The exposure table of docs/systemd.md: unit -> score."""
    rows = re.findall(r"^\| `(gpujobq-[a-z]+)\.service` \| (\d+\.\d) \|", DOC.read_text(),
                      flags=re.M)
    return {unit: float(score) for unit, score in rows}


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_without_a_word(unit: str, analyze: str,
                                      tmp_path: pathlib.Path) -> None:
    """`systemd-analyze verify` on the unit as shipped, in a root where its programs exist:
    gpujobq's from this installation, the others (/bin/kill) from this host."""
    root = tmp_path / "root"
    shutil.copytree(systemd_units(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit_path(unit), root / "etc/systemd/system")
    assert programs(unit)[0] == INSTALLED / unit  # ExecStart comes first in both units
    for program in programs(unit):
        source = (entry_point(program.name) if program.parent == INSTALLED
                  else pathlib.Path(program))
        assert source.is_file() and os.access(source, os.X_OK), f"{unit}: {program} missing"
        target = root / program.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    run = subprocess.run([analyze, "verify", f"--root={root}", f"{unit}.service"],
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_verify_would_catch_a_bad_unit(analyze: str, tmp_path: pathlib.Path) -> None:
    """The check above is not vacuous: a typo in a directive, or a program that is not
    there, makes verify speak (a typo alone still exits 0)."""
    root = tmp_path / "root"
    shutil.copytree(systemd_units(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    text = unit_path("gpujobq-agent").read_text().replace("ProtectProc=", "ProtectProcs=")
    (root / "etc/systemd/system/gpujobq-agent.service").write_text(text)
    run = subprocess.run([analyze, "verify", f"--root={root}", "gpujobq-agent.service"],
                         capture_output=True, text=True, timeout=120)
    assert "Unknown key 'ProtectProcs'" in run.stderr
    assert "/opt/gpujobq/bin/gpujobq-agent is not executable" in run.stderr
    assert run.returncode != 0


@pytest.mark.parametrize("unit", UNITS)
def test_exposure_stays_within_the_documented_score(unit: str, analyze: str) -> None:
    recorded = recorded_exposure()
    assert sorted(recorded) == sorted(UNITS), f"{DOC} must list one score per unit"
    run = subprocess.run([analyze, "security", "--offline=true", "--no-pager",
                          str(unit_path(unit))], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    found = re.search(rf"Overall exposure level for {unit}\.service: (\d+\.\d)", run.stdout)
    assert found, run.stdout[-2000:]
    version = subprocess.run([analyze, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.split("\n", 1)[0]
    assert float(found.group(1)) <= recorded[unit], (
        f"{unit}: exposure {found.group(1)} measured with {version}, {DOC.name} records "
        f"{recorded[unit]}: harden the unit again, or measure and record the new score\n"
        + run.stdout)


@pytest.mark.parametrize("unit", UNITS)
def test_key_hardening_is_in_place(unit: str) -> None:
    d = directives(unit)
    user = UNITS[unit]
    assert d["User"] == [user] and d["Group"] == [user]  # dedicated, never root
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["PrivateTmp"] == ["yes"]
    assert d["ProtectHome"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""]  # empty: no capability at all
    assert "AmbientCapabilities" not in d
    assert d["RestrictNamespaces"] == ["yes"]
    assert d["SystemCallFilter"][0] == "@system-service"
    assert d["StateDirectory"] == [user]
    # Only the agent reaches dockerd, and that is its only extra group.
    assert d.get("SupplementaryGroups", []) == (["docker"] if unit == "gpujobq-agent" else [])
