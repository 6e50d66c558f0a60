"""Job ids: UUIDs laid out as version 7, so that later jobs sort later in every index."""

import itertools
import time
import uuid

from gpujobq.controller.service import new_job_id


def test_job_ids_are_version_7_uuids() -> None:
    job_id = new_job_id()
    parsed = uuid.UUID(job_id)
    assert str(parsed) == job_id  # the canonical 36-character form
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_job_ids_carry_the_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    job_id = new_job_id()
    after = time.time_ns() // 1_000_000
    assert before <= uuid.UUID(job_id).int >> 80 <= after


def test_later_ids_sort_later_and_none_repeat() -> None:
    ids = []
    for _ in range(5):
        ids += [new_job_id() for _ in range(200)]
        time.sleep(0.002)  # the next batch falls in a later millisecond
    assert len(set(ids)) == len(ids)
    batches = [ids[i:i + 200] for i in range(0, len(ids), 200)]
    for earlier, later in itertools.pairwise(batches):
        assert max(earlier) < min(later)
