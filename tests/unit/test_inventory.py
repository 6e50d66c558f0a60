from __future__ import annotations

import pathlib

import pytest
from gpujobq.protocol import inventory
from gpujobq.protocol.inventory import InventoryError
from gpujobq.protocol.messages import GPU

REPO_INVENTORY = pathlib.Path(__file__).resolve().parents[2] / "inventory.yaml"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample host"


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def refused(path: pathlib.Path) -> str:
    with pytest.raises(InventoryError) as info:
        inventory.load(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_repo_inventory_loads() -> None:
    inv = inventory.load(REPO_INVENTORY)
    assert [h.name for h in inv.hosts] == ["local"]
    host = inv.hosts[0]
    assert host.address == "127.0.0.1" and host.port == 8022
    assert [(g.index, g.virtual) for g in host.gpus] == [(0, True), (1, True)]
    assert host.gpus[0].wire() == GPU(index=0, virtual=True)


def test_defaults(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, f"hosts:\n  - {{name: h1, address: x, host_key: {KEY}}}\n")
    inv = inventory.load(path)
    host = inv.hosts[0]
    assert (host.port, host.user, host.gpus, host.labels, host.drain) == (
        8022, "gpujobq", (), {}, False
    )


def test_empty_file_is_no_hosts(tmp_path: pathlib.Path) -> None:
    assert inventory.load(write(tmp_path, "")).hosts == ()


def test_missing_file(tmp_path: pathlib.Path) -> None:
    refused(tmp_path / "nope.yaml")


def test_typo_in_host_names_its_path(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, f"hosts:\n  - {{name: h1, address: x, host_key: {KEY}, prot: 22}}\n")
    message = refused(path)
    assert "prot" in message and "$.hosts[0]" in message


def test_typo_in_gpu_names_its_path(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        f"hosts:\n  - {{name: a, address: x, host_key: {KEY}}}\n"
        f"  - {{name: b, address: x, host_key: {KEY}, gpus: [{{index: 0, virtaul: true}}]}}\n",
    )
    message = refused(path)
    assert "virtaul" in message and "$.hosts[1].gpus[0]" in message


def test_typo_at_top_level(tmp_path: pathlib.Path) -> None:
    assert "hostz" in refused(write(tmp_path, "hostz: []\n"))


@pytest.mark.parametrize(
    "host",
    [
        f"{{name: h1, address: x, host_key: {KEY}, port: 0}}",
        f"{{name: h1, address: x, host_key: {KEY}, port: '22'}}",
        f"{{name: ../h1, address: x, host_key: {KEY}}}",
        f"{{name: h1, address: x, host_key: {KEY}, gpus: [{{index: -1}}]}}",
        "{name: h1, host_key: k}",
    ],
    ids=["port-0", "port-str", "bad-name", "negative-index", "no-address"],
)
def test_wrong_values(tmp_path: pathlib.Path, host: str) -> None:
    assert "$.hosts[0]" in refused(write(tmp_path, f"hosts:\n  - {host}\n"))


def test_duplicate_host_names(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        f"hosts:\n  - {{name: h1, address: a, host_key: {KEY}}}\n"
        f"  - {{name: h1, address: b, host_key: {KEY}}}\n",
    )
    assert "'h1' appears more than once" in refused(path)


def test_duplicate_gpu_indexes(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        f"hosts:\n  - {{name: h1, address: a, host_key: {KEY}}}\n"
        f"  - {{name: h2, address: b, host_key: {KEY}, gpus: [{{index: 0}}, {{index: 0}}]}}\n",
    )
    message = refused(path)
    assert "$.hosts[1].gpus" in message and "more than once" in message


@pytest.mark.parametrize(
    "keys", [f"host_key: {KEY}, host_key_file: k.pub", ""], ids=["both", "neither"]
)
def test_exactly_one_host_key(tmp_path: pathlib.Path, keys: str) -> None:
    path = write(tmp_path, f"hosts:\n  - {{name: h1, address: a, {keys}}}\n")
    message = refused(path)
    assert "$.hosts[0]" in message and "exactly one of host_key and host_key_file" in message


def test_duplicate_yaml_key(tmp_path: pathlib.Path) -> None:
    refused(write(tmp_path, "hosts: []\nhosts: []\n"))


def test_host_key_text_inline(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, f"hosts:\n  - {{name: h1, address: a, host_key: {KEY}}}\n")
    host = inventory.load(path).hosts[0]
    assert inventory.host_key_text(path, host) == KEY


def test_host_key_text_reads_relative_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "h1.pub").write_text(f"  {KEY}\n\n")
    path = write(tmp_path, "hosts:\n  - {name: h1, address: a, host_key_file: keys/h1.pub}\n")
    host = inventory.load(path).hosts[0]
    assert inventory.host_key_text(path, host) == KEY


def test_host_key_text_missing_file(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "hosts:\n  - {name: h1, address: a, host_key_file: gone.pub}\n")
    host = inventory.load(path).hosts[0]
    with pytest.raises(InventoryError, match=r"gone\.pub"):
        inventory.host_key_text(path, host)
