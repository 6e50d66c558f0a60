"""Placement, as a pure function: (queued jobs, free GPUs per host) -> assignments.

One global FIFO queue: a job goes to any eligible host that has a free GPU, in order
of submission. Hosts with more free GPUs are preferred, spreading load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
from gpujobq.protocol.messages import GPU


class Queued(msgspec.Struct, frozen=True):
    job_id: str
    gpus: int = 1


class Assignment(msgspec.Struct, frozen=True):
    job_id: str
    host: str
    gpus: tuple[GPU, ...]


def place(queue: Sequence[Queued], free: Mapping[str, Sequence[GPU]]) -> list[Assignment]:
    """Assign queued jobs, oldest first, while some host has the GPUs they need."""
    left = {host: list(gpus) for host, gpus in free.items()}
    out: list[Assignment] = []
    for job in queue:
        fitting = [h for h, gpus in left.items() if len(gpus) >= job.gpus]
        if not fitting:
            # Strict FIFO: a job that does not fit holds back the ones behind it,
            # so a big job is never starved by a stream of small ones.
            break
        host = max(fitting, key=lambda h: len(left[h]))
        taken, left[host] = left[host][: job.gpus], left[host][job.gpus :]
        out.append(Assignment(job_id=job.job_id, host=host, gpus=tuple(taken)))
    return out


def free_gpus(
    hosts: Mapping[str, Sequence[GPU]], busy: Mapping[str, set[int]]
) -> dict[str, list[GPU]]:
    """Each host's GPUs less those held by running jobs."""
    return {
        host: [g for g in gpus if g.index not in busy.get(host, set())]
        for host, gpus in hosts.items()
    }
