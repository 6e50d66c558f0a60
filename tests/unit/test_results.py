"""Result records: never outside their folder, never over another file, never through a
link (results.write)."""

from __future__ import annotations

import pathlib

import msgspec
import pytest
from gpujobq.controller import results, store
from gpujobq.protocol.states import Status

DONE = 1_790_000_000.25  # the completion time names the record
NAME = "alice_c1_20260921T141320.250000Z.jsonl"


def job(job_id: str = "j1", user: str = "alice", competition: str = "c1") -> store.Job:
    return store.Job(
        id=job_id, user_id=user, competition_id=competition, project_id="p",
        expected_time=1, time_limit=2, status=Status.COMPLETED, reason="exit_code",
        detail=None, attempt=1, retries=0, node="n", gpus=(0,), cancel_requested=False,
        created_at=DONE - 5, started_at=DONE - 4, completed_at=DONE, exit_code=0,
        stdout=b"out", stderr=b"", seq=1, gpu_count=1)


def record(path: pathlib.Path) -> dict[str, object]:
    return msgspec.json.decode(path.read_bytes())  # type: ignore[no-any-return]


def test_a_record_is_one_json_line_named_by_user_competition_and_time(
        tmp_path: pathlib.Path) -> None:
    path = results.write(tmp_path / "results", job())
    assert path == tmp_path / "results" / NAME
    assert path.read_bytes().count(b"\n") == 1
    assert record(path)["job_id"] == "j1"


def test_a_link_in_the_way_is_never_followed(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (folder / NAME).symlink_to(outside)
    path = results.write(folder, job())
    assert path.name == NAME.replace(".jsonl", "_j1.jsonl")
    assert outside.read_text() == "keep me"
    assert (folder / NAME).is_symlink()


def test_a_dangling_link_is_not_created_through(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    target = tmp_path / "created-elsewhere"
    (folder / NAME).symlink_to(target)
    results.write(folder, job())
    assert not target.exists()


def test_another_jobs_record_is_never_overwritten(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "results"
    first = results.write(folder, job("j1"))
    second = results.write(folder, job("j2"))  # the same user, competition and time
    assert (record(first)["job_id"], record(second)["job_id"]) == ("j1", "j2")
    # Every name taken by others: refused, nothing overwritten.
    for taken in ("_j3.jsonl", "_j3_1.jsonl"):
        (folder / NAME.replace(".jsonl", taken)).write_text("someone else's\n")
    with pytest.raises(FileExistsError):
        results.write(folder, job("j3"))
    assert record(first)["job_id"] == "j1"
    assert (folder / NAME.replace(".jsonl", "_j3.jsonl")).read_text() == "someone else's\n"


def test_a_rerun_writes_a_record_of_its_own(tmp_path: pathlib.Path) -> None:
    """An admin's rerun ends as a later attempt of the same job: both records stay, even
    with the same completion time, and writing the rerun's again keeps one."""
    folder = tmp_path / "results"
    first = results.write(folder, job())
    again = msgspec.structs.replace(job(), attempt=2, exit_code=1, status=Status.FAILED)
    second = results.write(folder, again)
    assert second.name == NAME.replace(".jsonl", "_j1.jsonl")
    assert (record(first)["attempt"], record(second)["attempt"]) == (1, 2)
    assert results.write(folder, again) == second
    third = msgspec.structs.replace(job(), attempt=3)
    assert results.write(folder, third).name == NAME.replace(".jsonl", "_j1_3.jsonl")
    assert len(list(folder.iterdir())) == 3


def test_writing_again_after_a_crash_keeps_one_record(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "results"
    assert results.write(folder, job()) == results.write(folder, job())
    assert [p.name for p in folder.iterdir()] == [NAME]


@pytest.mark.parametrize("user", ["../up", "a/b", "", ".hidden", "x\n", "ü"])
def test_unsafe_name_parts_are_refused(tmp_path: pathlib.Path, user: str) -> None:
    with pytest.raises(ValueError, match="unsafe name part"):
        results.write(tmp_path / "results", job(user=user))
    assert not (tmp_path / "results").exists() or list((tmp_path / "results").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name != "results"] == []
