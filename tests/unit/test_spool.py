from __future__ import annotations

import pathlib

import pytest
from gpujobq.agent.spool import RESULT, Spool, SpoolError
from gpujobq.protocol import messages


def run(job_id: str = "job1", attempt: int = 1) -> messages.RunJob:
    return messages.RunJob(
        job_id=job_id, attempt=attempt, code=b"print('hi')\n", config=b"user_id: alice\n",
        time_limit=10.0,
    )


def exited(job_id: str = "job1", attempt: int = 1) -> messages.Exited:
    return messages.Exited(
        job_id=job_id, attempt=attempt, at=5.0, reason="exit_code", exit_code=3,
        stdout=b"out\x00", stderr=b"err",
    )


@pytest.fixture
def spool(tmp_path: pathlib.Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_prepare_writes_job_files(spool: Spool) -> None:
    work = spool.prepare(run())
    assert work == spool.root / "job1-a1" / "job"
    assert (work / "solution.py").read_bytes() == b"print('hi')\n"
    assert (work / "config.yaml").read_bytes() == b"user_id: alice\n"


def test_prepared_modes_do_not_depend_on_the_umask(spool: Spool) -> None:
    import os
    import stat

    old = os.umask(0o077)
    try:
        work = spool.prepare(run())
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode)
            for p in (work, work / "solution.py", work / "config.yaml", work.parent / "output")}
    assert mode == {"job": 0o755, "solution.py": 0o644, "config.yaml": 0o644, "output": 0o777}


def test_prepare_without_files_keeps_only_the_attempts_folder(spool: Spool) -> None:
    work = spool.prepare(run(), files=False)
    assert work.parent.is_dir() and not work.exists()
    spool.store_result(exited())
    assert [e.job_id for e in spool.recover()] == ["job1"]


def test_prepare_again_starts_fresh(spool: Spool) -> None:
    work = spool.prepare(run())
    (work / "leftover.txt").write_text("x")
    work = spool.prepare(run())
    assert sorted(p.name for p in work.iterdir()) == ["config.yaml", "solution.py"]


def test_store_result_and_recover(spool: Spool) -> None:
    spool.prepare(run("job1", 1))
    spool.prepare(run("job2", 4))
    spool.store_result(exited("job1", 1))
    spool.store_result(exited("job2", 4))
    assert (spool.root / "job1-a1" / RESULT).exists()
    assert not (spool.root / "job1-a1" / (RESULT + ".tmp")).exists()
    # A restarted agent reads the same spool.
    assert Spool(spool.root).recover() == [exited("job1", 1), exited("job2", 4)]


def test_recover_drops_unfinished_folders(spool: Spool) -> None:
    spool.prepare(run("done", 1))
    spool.store_result(exited("done", 1))
    spool.prepare(run("running", 2))
    broken = spool.root / "broken-a1"
    broken.mkdir()
    (broken / RESULT).write_bytes(b"\xc1 not msgpack")
    assert spool.recover() == [exited("done", 1)]
    assert sorted(p.name for p in spool.root.iterdir()) == ["done-a1"]


def test_recover_ignores_foreign_entries(spool: Spool) -> None:
    (spool.root / "notes.txt").write_text("keep me")
    (spool.root / "not-a-job").mkdir()
    assert spool.recover() == []
    assert (spool.root / "notes.txt").exists() and (spool.root / "not-a-job").exists()


def test_drop(spool: Spool) -> None:
    spool.prepare(run())
    spool.store_result(exited())
    spool.drop("job1", 1)
    assert not (spool.root / "job1-a1").exists()
    spool.drop("job1", 1)  # twice is fine
    assert spool.recover() == []


@pytest.mark.parametrize("job_id", ["../x", "..", "a/b", "", "/abs", "a.b", "x" * 65, "a\nb"])
def test_escaping_job_ids_refused(spool: Spool, job_id: str) -> None:
    with pytest.raises(SpoolError):
        spool.folder(job_id, 1)
    with pytest.raises(SpoolError):
        spool.prepare(run(job_id))
    with pytest.raises(SpoolError):
        spool.store_result(exited(job_id))
    with pytest.raises(SpoolError):
        spool.drop(job_id, 1)
    assert list(spool.root.iterdir()) == []
    assert list(spool.root.parent.iterdir()) == [spool.root]


def test_negative_attempt_refused(spool: Spool) -> None:
    with pytest.raises(SpoolError):
        spool.folder("job1", -1)
