from __future__ import annotations

from gpujobq.controller.scheduler import Queued, free_gpus, place
from gpujobq.protocol.messages import GPU


def gpus(*indexes: int) -> list[GPU]:
    return [GPU(index=i) for i in indexes]


def test_empty_inputs() -> None:
    assert place([], {}) == []
    assert place([], {"a": gpus(0)}) == []
    assert place([Queued("j1")], {}) == []
    assert place([Queued("j1")], {"a": []}) == []
    assert free_gpus({}, {}) == {}


def test_fifo_order() -> None:
    out = place([Queued("j1"), Queued("j2"), Queued("j3")], {"a": gpus(0, 1)})
    assert [a.job_id for a in out] == ["j1", "j2"]
    assert [a.gpus for a in out] == [(GPU(index=0),), (GPU(index=1),)]


def test_spreads_to_host_with_most_free_gpus() -> None:
    out = place([Queued("j1"), Queued("j2"), Queued("j3")], {"a": gpus(0), "b": gpus(0, 1, 2)})
    # b has 3 free -> j1; then b has 2 -> j2; then a and b have 1 each: first one wins.
    assert [a.host for a in out] == ["b", "b", "a"]


def test_strict_fifo_stops_at_a_job_that_does_not_fit() -> None:
    queue = [Queued("small1"), Queued("big", gpus=4), Queued("small2")]
    out = place(queue, {"a": gpus(0, 1, 2), "b": gpus(0)})
    assert [a.job_id for a in out] == ["small1"]


def test_multi_gpu_job_on_one_host() -> None:
    out = place([Queued("big", gpus=2)], {"a": gpus(0), "b": gpus(3, 5)})
    assert len(out) == 1
    assert out[0].host == "b" and [g.index for g in out[0].gpus] == [3, 5]


def test_no_gpu_given_twice() -> None:
    free = {"a": gpus(0, 1, 2), "b": gpus(0, 1)}
    out = place([Queued(f"j{i}") for i in range(10)], free)
    assert len(out) == 5
    given = [(a.host, g.index) for a in out for g in a.gpus]
    assert len(given) == len(set(given)) == 5


def test_place_does_not_mutate_input() -> None:
    free = {"a": gpus(0, 1)}
    place([Queued("j1")], free)
    assert free == {"a": gpus(0, 1)}


def test_free_gpus_removes_busy() -> None:
    hosts = {"a": gpus(0, 1, 2), "b": gpus(0, 1)}
    free = free_gpus(hosts, {"a": {1}, "c": {0}})
    assert free == {"a": gpus(0, 2), "b": gpus(0, 1)}
    assert free_gpus(hosts, {"b": {0, 1}})["b"] == []
