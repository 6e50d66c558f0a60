"""The fleet as the controller sees it: one Node per inventory host.

A node joins what the admin declared (inventory.yaml) with what its agent reports
(hello: GPUs found by NVML; heartbeats; GPUs held back as dirty). It is
* up: connected and heard from within the heartbeat timeout, not drained;
* drained: up, but `drain: true` or removed from the inventory (takes no new jobs);
* down: not connected, or silent past the heartbeat timeout (no new jobs; its running
  jobs are handled as node loss once it has been down for `node_lost_after`).
"""

from __future__ import annotations

import asyncio
import math

from gpujobq.controller import agents, scheduler
from gpujobq.protocol import inventory, messages

State = scheduler.HostState


def resolve_gpus(
    declared: tuple[messages.GPU, ...] | None, hello: messages.Hello | None
) -> tuple[tuple[messages.GPU, ...], list[str]]:
    """The GPUs jobs may be given on a host, and every mismatch found, in words.

    Virtual GPUs are taken as declared. Real ones are checked against what NVML found:
    one declared but not found (or with another UUID) is held out; one found but not
    declared is reported and left alone. Without NVML the declaration is trusted.
    """
    if hello is None:
        return declared or (), []
    found = {g.index: g for g in hello.gpus}
    if declared is None:
        if hello.nvml:
            return tuple(found.values()), []
        return (), ["no GPUs declared and NVML is unavailable on the host: it gets no jobs"]
    usable: list[messages.GPU] = []
    problems: list[str] = []
    real = [g for g in declared if not g.virtual]
    if real and not hello.nvml:
        problems.append("NVML is unavailable on the host: declared GPUs are not verified")
    for gpu in declared:
        if gpu.virtual or not hello.nvml:
            usable.append(gpu)
            continue
        there = found.get(gpu.index)
        if there is None:
            problems.append(f"GPU {gpu.index} is declared but the host has no such GPU")
        elif gpu.uuid and gpu.uuid != there.uuid:
            problems.append(f"GPU {gpu.index} is declared as {gpu.uuid} but the host's is "
                            f"{there.uuid}")
        else:
            usable.append(there)
    if hello.nvml:
        # A virtual slot does not declare the real GPU at its index: a job on that slot
        # in the process runtime would see that GPU, so it is reported too.
        real_indexes = {g.index for g in real}
        for index, gpu in sorted(found.items()):
            if index not in real_indexes:
                problems.append(f"GPU {index} ({gpu.uuid or gpu.name}) is on the host but "
                                "not declared: it gets no jobs")
    return tuple(usable), problems


class Node:
    def __init__(self, host: inventory.Host, link: agents.Link) -> None:
        self.host = host
        self.link = link
        self.task: asyncio.Task[None] | None = None
        self.removing = False  # gone from the inventory: drains, then goes
        self.last_heard: float | None = None  # dispatcher clock, last message of any kind
        self.lease_sent = -math.inf  # when the last Lease went to its agent
        self.hello: messages.Hello | None = None
        self.dirty: tuple[messages.DirtyGPU, ...] = ()
        self.gpus: tuple[messages.GPU, ...] = ()
        self.problems: list[str] = []
        self.refresh()

    @property
    def name(self) -> str:
        return self.host.name

    def refresh(self) -> None:
        """Recompute the usable GPUs from the declaration and the last hello."""
        self.gpus, self.problems = resolve_gpus(self.host.declared_gpus(), self.hello)
        if self.hello is not None:
            self.problems.extend(self.hello.warnings)
        if self.hello is not None and self.hello.version != messages.PROTOCOL_VERSION:
            self.problems.append(
                f"its agent speaks protocol {self.hello.version}, the controller "
                f"{messages.PROTOCOL_VERSION}: upgrade it (an older agent ignores newer fields "
                "such as data mounts)")

    def known_gpus(self) -> tuple[messages.GPU, ...] | None:
        """The host's GPUs as far as they are known (None: left to discovery, not yet seen)."""
        if self.hello is None and self.host.gpus is None:
            return None
        return self.gpus

    def silent(self, now: float, timeout: float) -> bool:
        return self.last_heard is not None and now - self.last_heard > timeout

    def state(self, now: float, timeout: float) -> State:
        if not self.link.connected or self.silent(now, timeout):
            return "down"
        if self.host.drain or self.removing:
            return "drained"
        return "up"

    def down_since(self, now: float, timeout: float) -> float | None:
        """Since when the host has been down (the earliest sign), or None if it is not."""
        signs = []
        if not self.link.connected:
            signs.append(self.link.down_since if self.link.down_since is not None else now)
            if self.last_heard is not None:
                signs.append(self.last_heard)
        elif self.silent(now, timeout):
            assert self.last_heard is not None
            signs.append(self.last_heard)
        return min(signs) if signs else None

    def view(self, now: float, timeout: float) -> scheduler.HostView:
        return scheduler.HostView(name=self.name, gpus=self.gpus, labels=self.host.labels,
                                  state=self.state(now, timeout))

    def dirty_busy(self) -> scheduler.Busy | None:
        if not self.dirty:
            return None
        return scheduler.Busy(host=self.name, gpus=tuple(d.index for d in self.dirty),
                              ends_by=math.inf, expected_end=math.inf)
