"""inventory.yaml: the admin's file of agent hosts, their GPUs, and competition profiles.

Decoded strictly: a typo fails loudly with its path (``$.hosts[0].prot``). The full
reference is docs/inventory.md.
"""

from __future__ import annotations

import pathlib
import posixpath
import re
from typing import Annotated, Any, Literal

import msgspec
from gpujobq.protocol import jobconfig, yamlsafe
from gpujobq.protocol.messages import GPU, Mount


class InventoryError(ValueError):
    pass


class GPUSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    index: Annotated[int, msgspec.Meta(ge=0)]
    uuid: str | None = None
    # A virtual GPU is a scheduling slot with no device behind it: machines without
    # NVIDIA hardware can run the whole system. None: as the host says.
    virtual: bool | None = None


# A host's `gpus`: a count (indexes 0..n-1), or a list of indexes and/or {index, uuid,
# virtual} mappings; left out, the host offers the GPUs its agent discovers with NVML.
GPUList = Annotated[int, msgspec.Meta(ge=0, le=1024)] | tuple[
    Annotated[int, msgspec.Meta(ge=0)] | GPUSpec, ...]
Labels = dict[Annotated[str, msgspec.Meta(min_length=1, max_length=63)], str]


class Host(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: jobconfig.Ident
    address: Annotated[str, msgspec.Meta(min_length=1)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8022
    user: str = "gpujobq"
    # The agent's public host key, pinned: either the key itself ("ssh-ed25519 AAAA...")
    # or a file holding it (relative to the inventory's folder).
    host_key: str | None = None
    host_key_file: str | None = None
    gpus: GPUList | None = None
    virtual: bool = False  # every GPU of this host is a scheduling slot, no device
    labels: Labels = {}
    drain: bool = False

    def declared_gpus(self) -> tuple[GPU, ...] | None:
        """The GPUs the admin declared, or None when the agent's discovery decides."""
        if self.gpus is None:
            return None
        if isinstance(self.gpus, int):
            return tuple(GPU(index=i, virtual=self.virtual) for i in range(self.gpus))
        out = []
        for item in self.gpus:
            if isinstance(item, int):
                out.append(GPU(index=item, virtual=self.virtual))
            else:
                virtual = self.virtual if item.virtual is None else item.virtual
                out.append(GPU(index=item.index, uuid=item.uuid, virtual=virtual))
        return tuple(out)


DEFAULT_IMAGE = "gpujobq-job:bookworm"
DEFAULT_TIME_CAP = 6 * 3600.0

Seconds = Annotated[float, msgspec.Meta(gt=0, le=jobconfig.MAX_EXPECTED_TIME)]
GPUCount = Annotated[int, msgspec.Meta(ge=1, le=1024)]


class DataMount(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A host folder a competition's jobs see read-only (a dataset)."""

    source: Annotated[str, msgspec.Meta(min_length=2)]
    target: Annotated[str, msgspec.Meta(min_length=2)]

    def wire(self) -> Mount:
        return Mount(source=self.source, target=self.target)


class Competition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-competition settings; a field left out takes the `defaults` value."""

    image: str | None = None
    gpus: GPUCount | None = None  # GPUs per job when config.yaml names none
    max_gpus: GPUCount | None = None  # the most GPUs one job may ask for
    time_cap: Seconds | None = None  # the most seconds any job may run
    network: bool | None = None  # a container normally gets no network at all
    mounts: tuple[DataMount, ...] | None = None
    labels: Labels | None = None  # a job runs only on hosts with all these labels


class Defaults(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The profile of every competition, and all of it for one not listed."""

    image: str = DEFAULT_IMAGE
    gpus: GPUCount = 1
    max_gpus: GPUCount = 8
    time_cap: Seconds = DEFAULT_TIME_CAP
    network: bool = False
    mounts: tuple[DataMount, ...] = ()
    labels: Labels = {}
    # A competition_id not under `competitions`: run it with these defaults ("allow"),
    # or refuse it at submit ("refuse").
    unknown_competitions: Literal["allow", "refuse"] = "allow"


class Profile(msgspec.Struct, frozen=True):
    """What a competition's jobs get: its settings with the defaults filled in."""

    image: str
    gpus: int
    max_gpus: int
    time_cap: float
    network: bool
    mounts: tuple[DataMount, ...]
    labels: dict[str, str]


class Inventory(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    hosts: tuple[Host, ...] = ()
    defaults: Defaults = Defaults()
    competitions: dict[jobconfig.Ident, Competition] = {}

    def profile(self, competition_id: str) -> Profile | None:
        """The competition's settings; None if it is not listed and unknown ones are refused."""
        if competition_id not in self.competitions and self.defaults.unknown_competitions == (
                "refuse"):
            return None
        return self.profile_of_job(competition_id)

    def profile_of_job(self, competition_id: str) -> Profile:
        """The settings a queued job runs with (the defaults if its competition went away)."""
        comp = self.competitions.get(competition_id) or Competition()
        d = self.defaults

        return Profile(
            image=pick(comp.image, d.image),
            gpus=pick(comp.gpus, d.gpus),
            max_gpus=pick(comp.max_gpus, d.max_gpus),
            time_cap=pick(comp.time_cap, d.time_cap),
            network=pick(comp.network, d.network),
            mounts=pick(comp.mounts, d.mounts),
            labels=pick(comp.labels, d.labels),
        )

    def host(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name == name), None)


def pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def load(path: pathlib.Path) -> Inventory:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InventoryError(f"{path}: {exc.strerror}") from exc
    return loads(raw, str(path))


def loads(raw: bytes, where: str = "inventory") -> Inventory:
    try:
        data = yamlsafe.load(raw, max_bytes=4 << 20)
        inv = msgspec.convert(data or {}, Inventory, strict=True)
    except yamlsafe.YAMLError as exc:
        raise InventoryError(f"{where}: {exc}") from exc
    except msgspec.ValidationError as exc:
        raise InventoryError(f"{where}: {_with_path(_which_competition(data, exc))}") from exc
    _check(where, inv)
    return inv


_UNKNOWN = re.compile(r"Object contains unknown field `(.+)` - at `(.+)`")


def _which_competition(data: Any, exc: msgspec.ValidationError) -> str:
    """msgspec writes a mapping's key as `[...]`: name the competition at fault."""
    message = str(exc)
    if "$.competitions[...]" not in message or not isinstance(data, dict):
        return message
    for name, comp in (data.get("competitions") or {}).items():
        try:
            msgspec.convert(comp, Competition, strict=True)
        except msgspec.ValidationError as inner:
            text = str(inner)
            if " - at `$" in text:
                return text.replace(" - at `$", f" - at `$.competitions.{name}", 1)
            return f"{text} - at `$.competitions.{name}`"
    return message


def _with_path(message: str) -> str:
    """msgspec names an unknown field's parent; an admin wants the typo's own path."""
    match = _UNKNOWN.fullmatch(message)
    if match:
        return f"unknown field `{match[2]}.{match[1]}`"
    return message


# Where the container has its own things: a data mount may not go there.
RESERVED = ("/job", "/output", "/tmp", "/proc", "/sys", "/dev")


def _check(path: str, inv: Inventory) -> None:
    names = [h.name for h in inv.hosts]
    for name in {n for n in names if names.count(n) > 1}:
        raise InventoryError(f"{path}: host name {name!r} appears more than once")
    endpoints = [(h.address, h.port) for h in inv.hosts]
    for addr, port in {e for e in endpoints if endpoints.count(e) > 1}:
        raise InventoryError(f"{path}: {addr}:{port} is the address of two hosts")
    for i, host in enumerate(inv.hosts):
        where = f"{path}: $.hosts[{i}]"
        if (host.host_key is None) == (host.host_key_file is None):
            raise InventoryError(f"{where}: give exactly one of host_key and host_key_file")
        gpus = host.declared_gpus() or ()
        indexes = [g.index for g in gpus]
        if len(set(indexes)) != len(indexes):
            raise InventoryError(f"{where}.gpus: a GPU index appears more than once")
        uuids = [g.uuid for g in gpus if g.uuid]
        if len(set(uuids)) != len(uuids):
            raise InventoryError(f"{where}.gpus: a GPU uuid appears more than once")
    profiles = {"defaults": inv.defaults, **{f"competitions.{k}": v
                                             for k, v in inv.competitions.items()}}
    for name, prof in profiles.items():
        where = f"{path}: $.{name}"
        for j, mount in enumerate(prof.mounts or ()):
            for field in ("source", "target"):
                value = getattr(mount, field)
                # normpath keeps a leading "//" (POSIX allows it a meaning): refuse it.
                if (not value.startswith("/") or value.startswith("//")
                        or posixpath.normpath(value) != value):
                    raise InventoryError(
                        f"{where}.mounts[{j}].{field}: must be an absolute, normalised path")
            if any(mount.target == r or mount.target.startswith(r + "/") for r in RESERVED):
                raise InventoryError(f"{where}.mounts[{j}].target: {mount.target} is reserved")
        targets = [m.target for m in prof.mounts or ()]
        if len(set(targets)) != len(targets):
            raise InventoryError(f"{where}.mounts: a target appears more than once")
    d = inv.defaults
    for cid, comp in inv.competitions.items():
        gpus = comp.gpus if comp.gpus is not None else d.gpus
        cap = comp.max_gpus if comp.max_gpus is not None else d.max_gpus
        if gpus > cap:
            raise InventoryError(
                f"{path}: $.competitions.{cid}: gpus ({gpus}) is above max_gpus ({cap})")
    if d.gpus > d.max_gpus:
        raise InventoryError(f"{path}: $.defaults: gpus ({d.gpus}) is above max_gpus "
                             f"({d.max_gpus})")


def host_key_text(inventory_path: pathlib.Path, host: Host) -> str:
    """The pinned public key of a host, read from the inventory or the file it names."""
    if host.host_key is not None:
        return host.host_key
    assert host.host_key_file is not None
    key_path = inventory_path.parent / host.host_key_file
    try:
        return key_path.read_text().strip()
    except OSError as exc:
        raise InventoryError(f"host {host.name}: host_key_file {key_path}: {exc.strerror}") from exc
