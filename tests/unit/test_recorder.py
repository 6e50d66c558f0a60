"""results.Recorder: one writer thread, in rounds; every job's waiters hear once its
record is on disk, and every record is noted as written."""

from __future__ import annotations

import asyncio
import pathlib
import threading

from gpujobq.controller import commits, database, results, store

from tests.unit.test_store import Clock, finish, running


def ended(jobs: store.Store, n: int) -> list[store.Job]:
    return [finish(jobs, f"j{i}", running(jobs, f"j{i}").attempt) for i in range(n)]


def recorder_of(tmp_path: pathlib.Path, heard: list[str]
                ) -> tuple[store.Store, results.Recorder]:
    """A store and its recorder, telling ``heard`` of each job whose record is written."""
    db = database.open_database(tmp_path / "jobs.sqlite")
    jobs = store.Store(db, Clock())
    return jobs, results.Recorder(tmp_path / "results", jobs, commits.GroupCommit(db),
                                  heard.append)


def test_jobs_that_end_while_a_round_is_written_go_together_in_the_next(
        tmp_path: pathlib.Path) -> None:
    heard: list[str] = []
    jobs, recorder = recorder_of(tmp_path, heard)
    done = ended(jobs, 5)
    rounds: list[list[str]] = []
    threads: set[str] = set()
    first_round_began, first_round_may_end = threading.Event(), threading.Event()
    put_all = recorder._put_all

    def watched(entries: list[results.Entry]) -> list[str]:
        rounds.append([e.job_id for e in entries])
        threads.add(threading.current_thread().name)
        if len(rounds) == 1:
            first_round_began.set()
            assert first_round_may_end.wait(10)
        return put_all(entries)

    recorder._put_all = watched  # type: ignore[method-assign]

    async def main() -> None:
        recorder.running = True
        recorder.record_then_notify(done[:1])
        assert await asyncio.to_thread(first_round_began.wait, 10)
        for job in done[1:]:  # one turn of the loop each
            recorder.record_then_notify([job])
            await asyncio.sleep(0)
        assert len(recorder.writing) == 1  # one writer at a time
        first_round_may_end.set()
        await asyncio.gather(*recorder.writing)
        assert not recorder.writing
        await asyncio.sleep(0)  # the group writes the notes of what was written
        recorder.close()

    asyncio.run(main())
    assert rounds == [["j0"], ["j1", "j2", "j3", "j4"]]
    assert len(threads) == 1 and threads != {threading.current_thread().name}
    assert sorted(heard) == [f"j{i}" for i in range(5)]
    assert len(list((tmp_path / "results").glob("*.jsonl"))) == 5
    assert jobs.unrecorded() == []
    assert recorder.record_missing() == 0
    jobs.db.conn.close()


def test_a_job_ending_after_the_writer_finished_starts_a_writer_of_its_own(
        tmp_path: pathlib.Path) -> None:
    heard: list[str] = []
    jobs, recorder = recorder_of(tmp_path, heard)
    done = ended(jobs, 2)

    async def main() -> None:
        recorder.running = True
        for job in done:
            recorder.record_then_notify([job])
            await asyncio.gather(*recorder.writing)
            assert not recorder.writing
        await asyncio.sleep(0)  # the group writes the notes of what was written
        recorder.close()

    asyncio.run(main())
    assert heard == ["j0", "j1"]
    assert jobs.unrecorded() == []
    jobs.db.conn.close()
