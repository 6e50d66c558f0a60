"""The fleet as the controller sees it: usable GPUs from inventory + hello, and node state."""

from __future__ import annotations

import math

import msgspec
import pytest
from gpujobq.controller import fleet, scheduler
from gpujobq.protocol import inventory, messages

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"
GIB = 1 << 30
TIMEOUT = 30.0


def uuid(index: int) -> str:
    return f"GPU-{index:08x}-1111-2222-3333-{index:012x}"


def nvml_gpu(index: int, name: str = H100, memory: int = 80 * GIB) -> messages.GPU:
    return messages.GPU(index=index, uuid=uuid(index), name=name, memory=memory)


def hello(*gpus: messages.GPU, nvml: bool = True,
          dirty: tuple[messages.DirtyGPU, ...] = ()) -> messages.Hello:
    return messages.Hello(host="h1", runtime="docker", gpus=gpus, nvml=nvml, dirty=dirty)


def host(**kw: object) -> inventory.Host:
    return msgspec.convert({"name": "h1", "address": "10.0.0.1", "host_key": "k", **kw},
                           inventory.Host)


def declared(**kw: object) -> tuple[messages.GPU, ...] | None:
    return host(**kw).declared_gpus()


# ---- resolve_gpus -----------------------------------------------------------------------


def test_no_hello_yet_trusts_the_declaration() -> None:
    gpus = declared(gpus=[{"index": 0, "uuid": uuid(0)}, 1])
    assert gpus is not None
    assert fleet.resolve_gpus(gpus, None) == (gpus, [])
    assert fleet.resolve_gpus(None, None) == ((), [])
    assert fleet.resolve_gpus((), None) == ((), [])


def test_undeclared_gpus_come_from_nvml() -> None:
    found = (nvml_gpu(0), nvml_gpu(1, A100, 40 * GIB))
    usable, problems = fleet.resolve_gpus(None, hello(*found))
    assert usable == found
    assert [(g.index, g.uuid, g.name, g.memory) for g in usable] == [
        (0, uuid(0), H100, 80 * GIB), (1, uuid(1), A100, 40 * GIB)]
    assert problems == []


def test_undeclared_gpus_without_nvml() -> None:
    usable, problems = fleet.resolve_gpus(None, hello(nvml=False))
    assert usable == ()
    assert len(problems) == 1
    assert "NVML is unavailable" in problems[0] and "no jobs" in problems[0]


def test_virtual_gpus_taken_as_declared_whatever_nvml_says() -> None:
    gpus = declared(gpus=3, virtual=True)
    assert gpus is not None and all(g.virtual for g in gpus)
    # NVML finds no GPUs, or has no NVML at all: no matter.
    for answer in (hello(), hello(nvml=False)):
        assert fleet.resolve_gpus(gpus, answer) == (gpus, [])
    # Real GPUs it finds are still used as declared, but reported: nothing declares them.
    usable, problems = fleet.resolve_gpus(gpus, hello(nvml_gpu(0), nvml_gpu(7)))
    assert usable == gpus
    assert problems == [f"GPU {i} ({uuid(i)}) is on the host but not declared: it gets no jobs"
                        for i in (0, 7)]


def test_virtual_gpu_beside_real_ones() -> None:
    gpus = declared(gpus=[{"index": 0, "virtual": True}, {"index": 1, "uuid": uuid(1)}])
    assert gpus is not None
    usable, problems = fleet.resolve_gpus(gpus, hello(nvml_gpu(1)))
    assert usable == (messages.GPU(index=0, virtual=True), nvml_gpu(1))
    assert problems == []
    _, problems = fleet.resolve_gpus(gpus, hello(nvml_gpu(0), nvml_gpu(1)))
    assert len(problems) == 1 and problems[0].startswith("GPU 0 (") and "not declared" in \
        problems[0]


def test_declared_real_gpus_without_nvml_are_trusted() -> None:
    gpus = declared(gpus=[{"index": 0, "uuid": uuid(0)}, 1])
    assert gpus is not None
    usable, problems = fleet.resolve_gpus(gpus, hello(nvml=False))
    assert usable == gpus
    assert problems == ["NVML is unavailable on the host: declared GPUs are not verified"]


def test_declared_gpu_the_host_lacks_is_held_out() -> None:
    gpus = declared(gpus=[0, 1, 5])
    assert gpus is not None
    usable, problems = fleet.resolve_gpus(gpus, hello(nvml_gpu(0), nvml_gpu(1)))
    assert [g.index for g in usable] == [0, 1]
    assert problems == ["GPU 5 is declared but the host has no such GPU"]


def test_uuid_mismatch_is_held_out() -> None:
    gpus = declared(gpus=[{"index": 0, "uuid": uuid(0)}, {"index": 1, "uuid": "GPU-elsewhere"}])
    assert gpus is not None
    usable, problems = fleet.resolve_gpus(gpus, hello(nvml_gpu(0), nvml_gpu(1)))
    assert usable == (nvml_gpu(0),)
    assert len(problems) == 1
    assert problems[0].startswith("GPU 1 ")
    assert "GPU-elsewhere" in problems[0] and uuid(1) in problems[0]


def test_found_but_undeclared_gpu_gets_no_jobs() -> None:
    gpus = declared(gpus=[0])
    assert gpus is not None
    usable, problems = fleet.resolve_gpus(gpus, hello(nvml_gpu(0), nvml_gpu(1)))
    assert usable == (nvml_gpu(0),)
    assert problems == [f"GPU 1 ({uuid(1)}) is on the host but not declared: it gets no jobs"]


def test_found_but_undeclared_gpu_without_uuid_named_by_name() -> None:
    gpus = declared(gpus=[0])
    assert gpus is not None
    odd = messages.GPU(index=1, name=A100, memory=40 * GIB)
    _, problems = fleet.resolve_gpus(gpus, hello(nvml_gpu(0), odd))
    assert problems == [f"GPU 1 ({A100}) is on the host but not declared: it gets no jobs"]


def test_usable_gpus_carry_what_nvml_found() -> None:
    gpus = declared(gpus=[{"index": 0, "uuid": uuid(0)}, 1])
    assert gpus is not None
    assert gpus[1].uuid is None and gpus[0].name == "" and gpus[0].memory == 0
    found = (nvml_gpu(0), nvml_gpu(1, A100, 40 * GIB))
    usable, problems = fleet.resolve_gpus(gpus, hello(*found))
    assert usable == found
    assert [(g.name, g.memory) for g in usable] == [(H100, 80 * GIB), (A100, 40 * GIB)]
    assert usable[1].uuid == uuid(1)  # learnt from NVML where none was declared
    assert problems == []


def test_every_problem_is_reported() -> None:
    gpus = declared(gpus=[{"index": 0, "uuid": "GPU-other"}, 3])
    assert gpus is not None
    usable, problems = fleet.resolve_gpus(gpus, hello(nvml_gpu(0), nvml_gpu(1)))
    assert usable == ()
    assert len(problems) == 3
    assert problems[0].startswith("GPU 0 is declared as GPU-other")
    assert problems[1] == "GPU 3 is declared but the host has no such GPU"
    assert problems[2].startswith("GPU 1 (") and "not declared" in problems[2]


# ---- Node -------------------------------------------------------------------------------


class FakeLink:
    """What a Node reads of its agents.Link."""

    def __init__(self, *, connected: bool = True, down_since: float | None = None) -> None:
        self.connected = connected
        self.down_since = down_since
        self.last_error: str | None = None


def node(link: FakeLink | None = None, **kw: object) -> fleet.Node:
    return fleet.Node(host(**kw), link or FakeLink())  # type: ignore[arg-type]


def test_node_before_any_hello() -> None:
    n = node(gpus=2, virtual=True, labels={"gpu": "h100"})
    assert n.name == "h1"
    assert n.hello is None and n.problems == []
    assert n.known_gpus() == (messages.GPU(index=0, virtual=True),
                              messages.GPU(index=1, virtual=True))
    assert n.view(1000.0, TIMEOUT) == scheduler.HostView(
        name="h1", gpus=n.gpus, labels={"gpu": "h100"}, state="up")


def test_known_gpus_left_to_discovery() -> None:
    n = node()  # no `gpus`: the agent's NVML decides
    assert n.known_gpus() is None
    assert n.gpus == ()
    n.hello = hello(nvml_gpu(0), nvml_gpu(1))
    n.refresh()
    assert n.known_gpus() == (nvml_gpu(0), nvml_gpu(1))
    assert n.problems == []


def test_known_gpus_discovery_without_nvml() -> None:
    n = node()
    n.hello = hello(nvml=False)
    n.refresh()
    assert n.known_gpus() == ()
    assert len(n.problems) == 1
    assert n.view(0.0, TIMEOUT).gpus == ()


def test_refresh_follows_the_hello() -> None:
    n = node(gpus=[0, 1])
    n.hello = hello(nvml_gpu(0))
    n.refresh()
    assert n.gpus == (nvml_gpu(0),)
    assert n.problems == ["GPU 1 is declared but the host has no such GPU"]
    assert n.view(0.0, TIMEOUT).gpus == (nvml_gpu(0),)
    n.hello = hello(nvml_gpu(0), nvml_gpu(1))
    n.refresh()
    assert n.gpus == (nvml_gpu(0), nvml_gpu(1))
    assert n.problems == []


@pytest.mark.parametrize(("drain", "removing", "state"), [
    (False, False, "up"), (True, False, "drained"), (False, True, "drained"),
    (True, True, "drained"),
])
def test_state_of_connected_node(drain: bool, removing: bool, state: str) -> None:
    n = node(gpus=1, drain=drain)
    n.removing = removing
    n.last_heard = 1000.0
    assert n.state(1000.0 + TIMEOUT, TIMEOUT) == state
    assert n.view(1000.0, TIMEOUT).state == state


@pytest.mark.parametrize("drain", [False, True])
def test_state_down_when_not_connected(drain: bool) -> None:
    link = FakeLink(connected=False, down_since=900.0)
    n = node(link, gpus=1, drain=drain)
    assert n.state(1000.0, TIMEOUT) == "down"
    n.last_heard = 999.0
    assert n.state(1000.0, TIMEOUT) == "down"
    link.connected = True
    assert n.state(1000.0, TIMEOUT) == ("drained" if drain else "up")


def test_state_down_when_silent_past_timeout() -> None:
    n = node(gpus=1)
    assert n.state(1e9, TIMEOUT) == "up"  # never heard yet: not silent
    n.last_heard = 1000.0
    assert not n.silent(1000.0 + TIMEOUT, TIMEOUT)
    assert n.state(1000.0 + TIMEOUT, TIMEOUT) == "up"
    assert n.silent(1000.1 + TIMEOUT, TIMEOUT)
    assert n.state(1000.1 + TIMEOUT, TIMEOUT) == "down"
    n.host = host(gpus=1, drain=True)
    assert n.state(1000.1 + TIMEOUT, TIMEOUT) == "down"  # down wins over drained
    assert n.view(1000.1 + TIMEOUT, TIMEOUT).state == "down"


def test_down_since_when_up() -> None:
    n = node(gpus=1)
    assert n.down_since(1000.0, TIMEOUT) is None
    n.last_heard = 990.0
    assert n.down_since(1000.0, TIMEOUT) is None


def test_down_since_silent_host() -> None:
    n = node(gpus=1)
    n.last_heard = 900.0
    assert n.down_since(1000.0, TIMEOUT) == 900.0


def test_down_since_disconnected_picks_the_earliest_sign() -> None:
    link = FakeLink(connected=False, down_since=950.0)
    n = node(link, gpus=1)
    assert n.down_since(1000.0, TIMEOUT) == 950.0  # never heard: the link's word
    n.last_heard = 940.0
    assert n.down_since(1000.0, TIMEOUT) == 940.0  # silent before the link broke
    n.last_heard = 960.0
    assert n.down_since(1000.0, TIMEOUT) == 950.0  # heard from after? the link still broke
    link.down_since = None
    assert n.down_since(1000.0, TIMEOUT) == 960.0
    n.last_heard = None
    assert n.down_since(1000.0, TIMEOUT) == 1000.0  # no sign at all: down from now


def test_dirty_busy() -> None:
    n = node(gpus=4)
    assert n.dirty_busy() is None
    n.dirty = (messages.DirtyGPU(index=1, pids=(7,), detail="process(es) 7 still on the GPU"),
               messages.DirtyGPU(index=3, detail="NVML: lost"))
    busy = n.dirty_busy()
    assert busy == scheduler.Busy(host="h1", gpus=(1, 3), ends_by=math.inf,
                                  expected_end=math.inf)
    assert busy.user_id is None


def test_dirty_gpus_are_kept_from_a_plan() -> None:
    n = node(gpus=2, virtual=True)
    n.dirty = (messages.DirtyGPU(index=0, pids=(7,)),)
    busy = n.dirty_busy()
    assert busy is not None
    queue = [scheduler.Queued(job_id="a", expected_time=60.0), scheduler.Queued(job_id="b")]
    plan = scheduler.plan(queue, [n.view(0.0, TIMEOUT)], [busy], 0.0)
    assert [(a.job_id, [g.index for g in a.gpus]) for a in plan.assignments] == [("a", [1])]
    # b waits for a's GPU: the dirty one frees up at no known time.
    assert plan.waiting["b"].estimated_start == 60.0


def test_an_agents_warnings_are_among_the_hosts_problems() -> None:
    n = node(gpus=[0])
    n.hello = messages.Hello(host="h1", runtime="docker", gpus=(nvml_gpu(0),), nvml=True,
                             warnings=("NVIDIA Container Toolkit 1.17.8 has known container "
                                       "escapes: upgrade",))
    n.refresh()
    assert n.problems == ["NVIDIA Container Toolkit 1.17.8 has known container escapes: "
                          "upgrade"]
    assert [g.index for g in n.gpus] == [0]  # a warning, not a reason to hold GPUs out
