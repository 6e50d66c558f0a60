"""inventory.yaml: the admin's file of agent hosts and their GPUs.

Decoded strictly: a typo fails loudly with its path (``$.hosts[0].prot``).
"""

from __future__ import annotations

import pathlib
from typing import Annotated

import msgspec
from gpujobq.protocol import jobconfig, yamlsafe
from gpujobq.protocol.messages import GPU


class InventoryError(ValueError):
    pass


class GPUSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    index: Annotated[int, msgspec.Meta(ge=0)]
    uuid: str | None = None
    # A virtual GPU is a scheduling slot with no device behind it: machines without
    # NVIDIA hardware can run the whole system.
    virtual: bool = False

    def wire(self) -> GPU:
        return GPU(index=self.index, uuid=self.uuid, virtual=self.virtual)


class Host(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: jobconfig.Ident
    address: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8022
    user: str = "gpujobq"
    # The agent's public host key, pinned: either the key itself ("ssh-ed25519 AAAA...")
    # or a file holding it (relative to the inventory's folder).
    host_key: str | None = None
    host_key_file: str | None = None
    gpus: tuple[GPUSpec, ...] = ()
    labels: dict[str, str] = {}
    drain: bool = False


DEFAULT_IMAGE = "gpujobq-job:bookworm"


class Competition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-competition settings; unset fields fall back to the defaults."""

    image: str | None = None
    network: bool = False  # a container normally gets no network at all


class Defaults(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    image: str = DEFAULT_IMAGE


class Inventory(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    hosts: tuple[Host, ...] = ()
    defaults: Defaults = Defaults()
    competitions: dict[jobconfig.Ident, Competition] = {}

    def image_for(self, competition_id: str) -> str:
        comp = self.competitions.get(competition_id)
        return (comp.image if comp and comp.image else None) or self.defaults.image

    def network_for(self, competition_id: str) -> bool:
        comp = self.competitions.get(competition_id)
        return bool(comp and comp.network)


def load(path: pathlib.Path) -> Inventory:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InventoryError(f"{path}: {exc.strerror}") from exc
    try:
        data = yamlsafe.load(raw, max_bytes=4 << 20)
        inv = msgspec.convert(data or {}, Inventory, strict=True)
    except (yamlsafe.YAMLError, msgspec.ValidationError) as exc:
        raise InventoryError(f"{path}: {exc}") from exc
    _check(path, inv)
    return inv


def _check(path: pathlib.Path, inv: Inventory) -> None:
    names = [h.name for h in inv.hosts]
    for name in {n for n in names if names.count(n) > 1}:
        raise InventoryError(f"{path}: host name {name!r} appears more than once")
    for i, host in enumerate(inv.hosts):
        where = f"{path}: $.hosts[{i}]"
        if (host.host_key is None) == (host.host_key_file is None):
            raise InventoryError(f"{where}: give exactly one of host_key and host_key_file")
        indexes = [g.index for g in host.gpus]
        if len(set(indexes)) != len(indexes):
            raise InventoryError(f"{where}.gpus: a GPU index appears more than once")


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
