"""Controller <-> agent messages.

Frozen, tagged msgspec Structs; one union per direction. Decoding tolerates unknown
fields so controller and agents can be upgraded one at a time. Every job message
carries ``job_id`` and ``attempt``: the agent names a job's process or container from
both (a repeated RunJob is a no-op) and the controller ignores observations whose
attempt is not the job's current one (fencing).
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 2  # 2: GPUs found by NVML, dirty GPUs, data mounts, held GPUs


class Msg(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    pass


class GPU(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU a job may be given: its index on the host and, for real devices, its UUID."""

    index: int
    uuid: str | None = None
    virtual: bool = False
    name: str = ""  # as NVML names it ("NVIDIA H100 80GB HBM3"); "" when not discovered
    memory: int = 0  # bytes, as NVML reports; 0 when not discovered


class Mount(msgspec.Struct, frozen=True, kw_only=True):
    """A host folder the job sees read-only at ``target`` (a competition's data)."""

    source: str
    target: str


class DirtyGPU(msgspec.Struct, frozen=True, kw_only=True):
    """A GPU the agent holds back: processes are still on it after its job ended."""

    index: int
    pids: tuple[int, ...] = ()
    detail: str = ""


# ---- controller -> agent -------------------------------------------------------------


class RunJob(Msg, tag="run", frozen=True, kw_only=True):
    job_id: str
    attempt: int
    code: bytes
    config: bytes  # config.yaml as the job sees it (token removed)
    gpus: tuple[GPU, ...] = ()
    competition_id: str = ""
    image: str = ""  # container image; "" means the agent's default
    network: bool = False  # containers get no network unless the competition allows it
    mounts: tuple[Mount, ...] = ()  # read-only data folders
    time_limit: float  # seconds of wall time before the job is stopped
    grace: float = 10.0  # seconds between SIGTERM and SIGKILL
    output_cap: int = 1 << 20  # bytes kept per stream


class Cancel(Msg, tag="cancel", frozen=True, kw_only=True):
    job_id: str
    attempt: int


class Ack(Msg, tag="ack", frozen=True, kw_only=True):
    """The controller has stored this attempt's result: the agent may drop its spool."""

    job_id: str
    attempt: int


class Lease(Msg, tag="lease", frozen=True, kw_only=True):
    """The controller is there. An agent that hears nothing from it for ``seconds`` stops
    the jobs it runs (and reports them lost): the controller requeues them only after
    the lease and a margin, so one job never runs twice at once across a partition."""

    seconds: float


class Attach(Msg, tag="attach", frozen=True, kw_only=True):
    """Send a running job's live output again from these offsets (what the controller has:
    0 after a controller restart)."""

    job_id: str
    attempt: int
    stdout: int = 0
    stderr: int = 0


Down = RunJob | Cancel | Ack | Lease | Attach


# ---- agent -> controller -------------------------------------------------------------


class Started(Msg, tag="started", frozen=True, kw_only=True):
    job_id: str
    attempt: int
    at: float


class Output(Msg, tag="output", frozen=True, kw_only=True):
    """Live output while a job runs: the next bytes of a stream's kept head.

    ``offset`` is where ``data`` starts in that stream; the whole capped output comes
    again with Exited, so a lost Output costs only liveness.
    """

    job_id: str
    attempt: int
    stream: str  # "stdout" or "stderr"
    offset: int
    data: bytes


class OutputFile(msgspec.Struct, frozen=True, kw_only=True):
    """A regular file the job left in its output folder (path relative to it)."""

    name: str
    data: bytes


class Exited(Msg, tag="exited", frozen=True, kw_only=True):
    job_id: str
    attempt: int
    at: float
    reason: str  # a states.Reason value
    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    detail: str = ""  # for infra errors: what went wrong, in words
    files: tuple[OutputFile, ...] = ()
    dirty: tuple[DirtyGPU, ...] = ()  # the host's held-back GPUs, checked after this job


class HeldJob(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    attempt: int
    finished: bool
    gpus: tuple[int, ...] = ()  # GPU indexes it runs on: taken while it is not finished


class Heartbeat(Msg, tag="heartbeat", frozen=True, kw_only=True):
    at: float
    jobs: tuple[HeldJob, ...] = ()
    dirty: tuple[DirtyGPU, ...] = ()  # GPUs held back: not to be given to a job


Up = Started | Output | Exited | Heartbeat


class Hello(msgspec.Struct, frozen=True, kw_only=True):
    """Answer to the agent's ``hello`` verb."""

    version: int = PROTOCOL_VERSION
    host: str
    runtime: str
    gpus: tuple[GPU, ...] = ()  # what NVML found (empty where there is no NVML)
    nvml: bool = False  # whether the agent could ask NVML at all
    jobs: tuple[HeldJob, ...] = ()
    dirty: tuple[DirtyGPU, ...] = ()
    warnings: tuple[str, ...] = ()  # for admins, e.g. an NVIDIA toolkit with known CVEs


class ProtocolError(Exception):
    """A peer sent something that is not a valid message."""
