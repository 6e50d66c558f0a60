"""The admin's view of the fleet: hosts, their state, their GPUs and the job on each.

Served by GET /api/admin/nodes and printed by `gpujobq-controller nodes`.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec
from gpujobq.controller import dispatcher as dispatcher_mod
from gpujobq.controller import results
from gpujobq.protocol.states import Status


class GPUReply(msgspec.Struct):
    index: int
    uuid: str | None
    name: str
    memory: int
    virtual: bool
    state: str  # free, busy (a job runs on it), held (a job given up on may still run), dirty
    job_id: str | None = None
    user_id: str | None = None
    attempt: int | None = None
    detail: str | None = None


class HostReply(msgspec.Struct):
    name: str
    node_id: int | None
    address: str
    port: int
    state: str  # up, drained, down
    connected: bool
    removing: bool  # gone from the inventory; leaves once nothing of it runs
    drain: bool
    labels: dict[str, str]
    runtime: str | None
    last_heard: str | None
    down_since: str | None
    error: str | None  # the link's last error
    problems: list[str]  # mismatches between declared and discovered GPUs
    gpus: list[GPUReply]


class InventoryReply(msgspec.Struct):
    path: str
    loaded_at: str | None
    error: str | None  # the last reload's error; the last good inventory is in use


class FleetReply(msgspec.Struct):
    inventory: InventoryReply
    hosts: list[HostReply]


class ReloaderLike(Protocol):
    path: Any
    error: str | None
    loaded_at: float | None


def describe(
    disp: dispatcher_mod.Dispatcher, reloader: ReloaderLike, node_ids: dict[str, int]
) -> FleetReply:
    now, wall = disp.mono(), disp.clock()
    timeout = disp.settings.heartbeat_timeout

    def when(t: float | None) -> str | None:  # monotonic -> wall-clock ISO time
        return None if t is None else results.iso(wall - (now - t))

    running = [j for j in disp.store.by_status(Status.RUNNING) if j.node is not None]
    hosts = []
    for name, node in sorted(disp.nodes.items()):
        gpus = {g.index: GPUReply(index=g.index, uuid=g.uuid, name=g.name, memory=g.memory,
                                  virtual=g.virtual, state="free")
                for g in node.gpus}

        for (job_id, attempt), (host, indexes) in disp.lingering.items():
            if host == name:
                for i in indexes:
                    g = _at(gpus, i)
                    g.state, g.job_id, g.attempt = "held", job_id, attempt
                    g.detail = "a job given up on may still run here"
        for dirty in node.dirty:
            g = _at(gpus, dirty.index)
            g.state, g.detail = "dirty", dirty.detail
        for job in running:
            if job.node == name:
                for i in job.gpus:
                    g = _at(gpus, i)
                    g.state, g.job_id, g.user_id, g.attempt = "busy", job.id, job.user_id, \
                        job.attempt
        hello = node.hello
        hosts.append(HostReply(
            name=name, node_id=node_ids.get(name), address=node.host.address,
            port=node.host.port, state=node.state(now, timeout), connected=node.link.connected,
            removing=node.removing, drain=node.host.drain, labels=dict(node.host.labels),
            runtime=hello.runtime if hello else None, last_heard=when(node.last_heard),
            down_since=when(node.down_since(now, timeout)), error=node.link.last_error,
            problems=list(node.problems), gpus=[gpus[i] for i in sorted(gpus)],
        ))
    return FleetReply(
        inventory=InventoryReply(path=str(reloader.path), loaded_at=results.iso(
            reloader.loaded_at), error=reloader.error),
        hosts=hosts,
    )


def _at(gpus: dict[int, GPUReply], index: int) -> GPUReply:
    """The entry of a GPU; one not offered to jobs (no longer declared) gets one too."""
    if index not in gpus:
        gpus[index] = GPUReply(index=index, uuid=None, name="", memory=0, virtual=False,
                               state="free")
    return gpus[index]


def table(fleet: dict[str, Any]) -> str:
    """The fleet as text for a terminal (from the JSON of /api/admin/nodes)."""
    lines = []
    inv = fleet["inventory"]
    lines.append(f"inventory {inv['path']} (loaded {inv['loaded_at']})")
    if inv["error"]:
        lines.append(f"  LAST RELOAD FAILED, previous inventory in use: {inv['error']}")
    lines.append(f"{'HOST':<16}{'STATE':<10}{'ADDRESS':<22}{'RUNTIME':<9}{'GPU':<5}"
                 f"{'GPU STATE':<11}JOB")
    for h in fleet["hosts"]:
        state = h["state"] + ("*" if h["removing"] else "")
        head = f"{h['name']:<16}{state:<10}{h['address'] + ':' + str(h['port']):<22}" \
               f"{h['runtime'] or '-':<9}"
        if not h["gpus"]:
            lines.append(head + "-")
        for k, g in enumerate(h["gpus"]):
            job = f"{g['job_id']} ({g['user_id']})" if g["user_id"] else (g["job_id"] or "")
            if g["detail"] and g["state"] == "dirty":
                job = g["detail"]
            lines.append((head if k == 0 else " " * len(head)) +
                         f"{g['index']:<5}{g['state']:<11}{job}".rstrip())
        for problem in h["problems"]:
            lines.append(f"  ! {h['name']}: {problem}")
        if h["error"] and h["state"] == "down":
            lines.append(f"  ! {h['name']}: {h['error']}")
    if any(h["removing"] for h in fleet["hosts"]):
        lines.append("* removed from the inventory: leaves once its jobs end")
    return "\n".join(lines)
