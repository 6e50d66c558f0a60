from __future__ import annotations

import pathlib

import pytest
from gpujobq.protocol import inventory
from gpujobq.protocol.inventory import InventoryError
from gpujobq.protocol.messages import GPU, Mount

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
    assert host.declared_gpus() == (GPU(index=0, virtual=True), GPU(index=1, virtual=True))


def test_defaults(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, f"hosts:\n  - {{name: h1, address: x, host_key: {KEY}}}\n")
    inv = inventory.load(path)
    host = inv.hosts[0]
    assert (host.port, host.user, host.gpus, host.labels, host.drain, host.virtual) == (
        8022, "gpujobq", None, {}, False, False
    )
    assert host.declared_gpus() is None  # left to the agent's discovery
    assert (host.host_key, host.host_key_file) == (KEY, None)
    assert inv.defaults == inventory.Defaults()
    assert inv.competitions == {}


def test_empty_file_is_no_hosts(tmp_path: pathlib.Path) -> None:
    assert inventory.load(write(tmp_path, "")).hosts == ()


def test_missing_file(tmp_path: pathlib.Path) -> None:
    refused(tmp_path / "nope.yaml")


def test_typo_in_host_names_its_path(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, f"hosts:\n  - {{name: h1, address: x, host_key: {KEY}, prot: 22}}\n")
    assert "$.hosts[0].prot" in refused(path)


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


# ---- loads(), the schema's newer parts -----------------------------------------------------


def one_host(extra: str = "") -> bytes:
    """An inventory with one host h1; `extra` is added inside its mapping."""
    return f"hosts:\n  - {{name: h1, address: a, host_key: {KEY}{extra}}}\n".encode()


def loads_refused(raw: bytes | str) -> str:
    with pytest.raises(InventoryError) as info:
        inventory.loads(raw.encode() if isinstance(raw, str) else raw, "inv.yaml")
    message = str(info.value)
    assert message.startswith("inv.yaml: ")
    return message


def test_loads_bytes() -> None:
    inv = inventory.loads(one_host(", gpus: 1"))
    assert isinstance(inv, inventory.Inventory)
    assert [h.name for h in inv.hosts] == ["h1"]
    assert inventory.loads(b"") == inventory.Inventory()
    assert inventory.loads("\ufeffhosts: []\n".encode()).hosts == ()  # a BOM is fine


@pytest.mark.parametrize(
    "raw",
    [b"hosts: [\n", b"\xff\xfe", b"- a\n- b\n", b"hosts: {}\n"],
    ids=["bad-yaml", "not-utf8", "top-level-list", "hosts-mapping"],
)
def test_loads_refuses_with_its_label(raw: bytes) -> None:
    loads_refused(raw)


def test_loads_default_label() -> None:
    with pytest.raises(InventoryError, match=r"^inventory: "):
        inventory.loads(b"hostz: []\n")


def test_host_lookup() -> None:
    inv = inventory.loads(
        f"hosts:\n  - {{name: h1, address: a, host_key: {KEY}}}\n"
        f"  - {{name: h2, address: b, host_key: {KEY}}}\n".encode())
    assert inv.host("h2") is inv.hosts[1]
    assert inv.host("h3") is None


def test_gpus_as_a_count() -> None:
    host = inventory.loads(one_host(", gpus: 3")).hosts[0]
    assert host.gpus == 3
    assert host.declared_gpus() == (GPU(index=0), GPU(index=1), GPU(index=2))


def test_gpus_count_of_zero_is_no_gpus_not_discovery() -> None:
    host = inventory.loads(one_host(", gpus: 0")).hosts[0]
    assert host.declared_gpus() == ()


def test_gpus_as_a_list_of_indexes() -> None:
    host = inventory.loads(one_host(", gpus: [0, 2, 5]")).hosts[0]
    assert host.declared_gpus() == (GPU(index=0), GPU(index=2), GPU(index=5))


def test_gpus_mixed_list_with_mappings() -> None:
    gpus = "[0, {index: 1, uuid: GPU-b}, {index: 2, virtual: false}, {index: 3, virtual: true}]"
    host = inventory.loads(one_host(f", gpus: {gpus}")).hosts[0]
    assert host.gpus is not None and not isinstance(host.gpus, int)
    assert host.gpus[1] == inventory.GPUSpec(index=1, uuid="GPU-b")
    assert host.gpus[1].virtual is None  # as the host says
    assert host.declared_gpus() == (
        GPU(index=0), GPU(index=1, uuid="GPU-b"), GPU(index=2), GPU(index=3, virtual=True))


def test_host_level_virtual() -> None:
    host = inventory.loads(one_host(", gpus: 2, virtual: true")).hosts[0]
    assert host.declared_gpus() == (GPU(index=0, virtual=True), GPU(index=1, virtual=True))
    gpus = "[0, {index: 1, uuid: GPU-b}, {index: 2, virtual: false}]"
    host = inventory.loads(one_host(f", gpus: {gpus}, virtual: true")).hosts[0]
    # A GPU's own `virtual` wins over the host's.
    assert [(g.index, g.uuid, g.virtual) for g in host.declared_gpus() or ()] == [
        (0, None, True), (1, "GPU-b", True), (2, None, False)]
    # virtual without gpus: still discovery.
    assert inventory.loads(one_host(", virtual: true")).hosts[0].declared_gpus() is None


def test_gpus_up_to_1024() -> None:
    host = inventory.loads(one_host(", gpus: 1024")).hosts[0]
    assert len(host.declared_gpus() or ()) == 1024


@pytest.mark.parametrize(
    "gpus",
    ["-1", "1025", "true", "'2'", "[-1]", "[{uuid: GPU-a}]", "[{index: 0, virtual: 1}]",
     "{index: 0}", "[0.5]"],
)
def test_bad_gpus(gpus: str) -> None:
    assert "$.hosts[0].gpus" in loads_refused(one_host(f", gpus: {gpus}"))


@pytest.mark.parametrize(
    "gpus",
    ["[0, {index: 0}]", "[1, 1]", "[{index: 2, uuid: GPU-a}, {index: 2, uuid: GPU-b}]"],
)
def test_duplicate_gpu_index_in_any_form(gpus: str) -> None:
    message = loads_refused(one_host(f", gpus: {gpus}"))
    assert "$.hosts[0].gpus: a GPU index appears more than once" in message


def test_duplicate_gpu_uuid() -> None:
    gpus = "[{index: 0, uuid: GPU-a}, {index: 1, uuid: GPU-a}]"
    message = loads_refused(one_host(f", gpus: {gpus}"))
    assert "$.hosts[0].gpus: a GPU uuid appears more than once" in message
    # Different uuids, or none at all, are fine.
    inventory.loads(one_host(", gpus: [{index: 0, uuid: GPU-a}, {index: 1, uuid: GPU-b}]"))
    inventory.loads(one_host(", gpus: [{index: 0}, {index: 1}]"))


def two_hosts(first: str, second: str) -> bytes:
    return (f"hosts:\n  - {{name: h1, host_key: {KEY}, {first}}}\n"
            f"  - {{name: h2, host_key: {KEY}, {second}}}\n").encode()


@pytest.mark.parametrize(
    ("first", "second", "endpoint"),
    [
        ("address: a", "address: a", "a:8022"),
        ("address: a, port: 22", "address: a, port: 22", "a:22"),
        ("address: a, port: 8022", "address: a", "a:8022"),
    ],
)
def test_duplicate_address_and_port(first: str, second: str, endpoint: str) -> None:
    assert f"{endpoint} is the address of two hosts" in loads_refused(two_hosts(first, second))


def test_same_address_on_other_ports_or_same_port_elsewhere_is_fine() -> None:
    inv = inventory.loads(two_hosts("address: a, port: 22", "address: a, port: 23"))
    assert [(h.address, h.port) for h in inv.hosts] == [("a", 22), ("a", 23)]
    inventory.loads(two_hosts("address: a", "address: b"))


def test_duplicate_host_name_via_loads() -> None:
    raw = two_hosts("address: a", "address: b").replace(b"name: h2", b"name: h1")
    assert "host name 'h1' appears more than once" in loads_refused(raw)


def test_typo_in_competition_names_its_path() -> None:
    message = loads_refused("competitions:\n  c1: {time_cp: 60}\n")
    assert "time_cp" in message
    # Which competition: with many of them, `$.competitions[...]` would not say.
    assert "$.competitions.c1.time_cp" in message


def test_typo_in_defaults_names_its_path() -> None:
    assert "$.defaults.imgae" in loads_refused("defaults: {imgae: x}\n")


def test_bad_unknown_competitions_value() -> None:
    message = loads_refused("defaults: {unknown_competitions: maybe}\n")
    assert "$.defaults.unknown_competitions" in message and "maybe" in message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("competitions:\n  ../c1: {}\n", "$.competitions"),
        ("competitions:\n  c1: {gpus: 0}\n", ".gpus"),
        ("competitions:\n  c1: {time_cap: 0}\n", ".time_cap"),
        (f"competitions:\n  c1: {{time_cap: {30 * 24 * 3600 + 1}}}\n", ".time_cap"),
        ("competitions:\n  c1: {network: 'yes'}\n", ".network"),
        ("competitions:\n  c1: {labels: {gpu: 100}}\n", ".labels"),
        ("competitions:\n  c1: {labels: {'': a}}\n", ".labels"),
        (f"competitions:\n  c1: {{labels: {{{'k' * 64}: a}}}}\n", ".labels"),
        ("competitions:\n  c1: {mounts: [{source: /a, target: /b, ro: true}]}\n", "[0].ro"),
        ("competitions:\n  c1: {mounts: [{source: /a}]}\n", "target"),
        ("competitions:\n  c1: {mounts: [{source: /a, target: /}]}\n", "[0].target"),
        ("defaults: {max_gpus: 0}\n", "$.defaults.max_gpus"),
        ("defaults: {time_cap: -1}\n", "$.defaults.time_cap"),
        ("defaults: {mounts: null}\n", "$.defaults.mounts"),
    ],
)
def test_wrong_profile_values(text: str, where: str) -> None:
    assert where in loads_refused(text)


def test_profile_defaults_when_nothing_is_said() -> None:
    inv = inventory.loads(b"")
    assert inv.profile("anything") == inventory.Profile(
        image=inventory.DEFAULT_IMAGE, gpus=1, max_gpus=8, time_cap=inventory.DEFAULT_TIME_CAP,
        network=False, mounts=(), labels={})


PROFILES = """\
defaults:
  image: img:1
  gpus: 2
  max_gpus: 4
  time_cap: 600
  network: true
  mounts: [{source: /srv/shared, target: /data}]
  labels: {gpu: a100}
competitions:
  c1: {image: img:2, time_cap: 60, network: false, labels: {}}
  c2: {max_gpus: 16, gpus: 3, mounts: []}
  c3: {}
"""


def test_profile_defaults_fill_unset_competition_fields() -> None:
    inv = inventory.loads(PROFILES.encode())
    shared = (inventory.DataMount(source="/srv/shared", target="/data"),)
    assert inv.profile("c1") == inventory.Profile(
        image="img:2", gpus=2, max_gpus=4, time_cap=60.0, network=False, mounts=shared,
        labels={})  # false and {} are said: they are not "unset"
    assert inv.profile("c2") == inventory.Profile(
        image="img:1", gpus=3, max_gpus=16, time_cap=600.0, network=True, mounts=(),
        labels={"gpu": "a100"})
    assert inv.profile("c3") == inventory.Profile(
        image="img:1", gpus=2, max_gpus=4, time_cap=600.0, network=True, mounts=shared,
        labels={"gpu": "a100"})


def test_unknown_competition_gets_the_defaults() -> None:
    inv = inventory.loads(PROFILES.encode())
    assert inv.defaults.unknown_competitions == "allow"
    assert inv.profile("nope") == inv.profile("c3") == inv.profile_of_job("nope")


def test_unknown_competitions_refused() -> None:
    inv = inventory.loads(PROFILES.replace("  gpus: 2\n", "  gpus: 2\n"
                                           "  unknown_competitions: refuse\n").encode())
    assert inv.defaults.unknown_competitions == "refuse"
    assert inv.profile("nope") is None
    c1 = inv.profile("c1")
    assert c1 is not None and c1.image == "img:2"
    # A job already queued for a competition since removed still runs, on the defaults.
    assert inv.profile_of_job("nope") == inv.profile("c3")


@pytest.mark.parametrize(
    ("text", "where", "gpus", "cap"),
    [
        ("competitions:\n  c1: {gpus: 4, max_gpus: 2}\n", "$.competitions.c1", 4, 2),
        ("competitions:\n  c1: {gpus: 9}\n", "$.competitions.c1", 9, 8),
        ("defaults: {gpus: 4}\ncompetitions:\n  c1: {max_gpus: 2}\n", "$.competitions.c1", 4,
         2),
        ("defaults: {max_gpus: 2}\ncompetitions:\n  c1: {gpus: 3}\n", "$.competitions.c1", 3,
         2),
        ("defaults: {gpus: 9}\n", "$.defaults", 9, 8),
        ("defaults: {gpus: 3, max_gpus: 2}\n", "$.defaults", 3, 2),
    ],
)
def test_gpus_above_max_gpus(text: str, where: str, gpus: int, cap: int) -> None:
    message = loads_refused(text)
    assert f"{where}: gpus ({gpus}) is above max_gpus ({cap})" in message


@pytest.mark.parametrize(
    "text",
    [
        "competitions:\n  c1: {gpus: 8}\n",
        "competitions:\n  c1: {gpus: 12, max_gpus: 16}\n",
        "defaults: {gpus: 12, max_gpus: 16}\n",
        "defaults: {gpus: 4}\ncompetitions:\n  c1: {gpus: 1, max_gpus: 2}\n",
    ],
)
def test_gpus_up_to_max_gpus(text: str) -> None:
    inventory.loads(text.encode())


def mounts(where: str, *pairs: tuple[str, str]) -> str:
    items = ", ".join(f"{{source: '{s}', target: '{t}'}}" for s, t in pairs)
    if where == "defaults":
        return f"defaults:\n  mounts: [{items}]\n"
    return f"competitions:\n  c1:\n    mounts: [{items}]\n"


def test_mounts() -> None:
    inv = inventory.loads(mounts("c1", ("/srv/data/c1", "/data"), ("/srv/x", "/opt/x")).encode())
    got = inv.profile("c1")
    assert got is not None
    assert got.mounts == (inventory.DataMount(source="/srv/data/c1", target="/data"),
                          inventory.DataMount(source="/srv/x", target="/opt/x"))
    assert got.mounts[0].wire() == Mount(source="/srv/data/c1", target="/data")


@pytest.mark.parametrize("where", ["defaults", "c1"])
@pytest.mark.parametrize(
    ("source", "target", "field"),
    [
        ("data", "/data", "source"),
        ("./data", "/data", "source"),
        ("/srv/../etc", "/data", "source"),
        ("/srv/data/", "/data", "source"),
        ("/srv/./data", "/data", "source"),
        ("/srv//data", "/data", "source"),
        ("/srv/data", "data", "target"),
        ("/srv/data", "/data/", "target"),
        ("/srv/data", "/a/../data", "target"),
    ],
)
def test_mount_paths_must_be_absolute_and_normalised(
    where: str, source: str, target: str, field: str
) -> None:
    message = loads_refused(mounts(where, ("/srv/ok", "/ok"), (source, target)))
    prefix = "$.defaults" if where == "defaults" else "$.competitions.c1"
    assert f"{prefix}.mounts[1].{field}: must be an absolute, normalised path" in message


@pytest.mark.parametrize("where", ["defaults", "c1"])
@pytest.mark.parametrize(
    "target",
    ["/job", "/job/data", "/output", "/output/x", "/tmp", "/tmp/x", "/proc", "/proc/sys",
     "/sys", "/sys/fs", "/dev", "/dev/shm"],
)
def test_reserved_mount_targets(where: str, target: str) -> None:
    message = loads_refused(mounts(where, ("/srv/data", target)))
    prefix = "$.defaults" if where == "defaults" else "$.competitions.c1"
    assert f"{prefix}.mounts[0].target: {target} is reserved" in message


@pytest.mark.parametrize("target", ["//job", "//tmp/x", "//proc"])
def test_reserved_mount_targets_with_a_double_slash(target: str) -> None:
    # POSIX normpath keeps a leading "//", but the container sees /job, /tmp, /proc.
    assert "$.competitions.c1.mounts[0].target" in loads_refused(
        mounts("c1", ("/srv/data", target)))


@pytest.mark.parametrize(
    "target", ["/data", "/jobs", "/output2", "/tmpdata", "/processed", "/sysdata", "/devdata"]
)
def test_mount_targets_that_only_start_like_reserved_ones_are_fine(target: str) -> None:
    got = inventory.loads(mounts("c1", ("/srv/data", target)).encode()).profile("c1")
    assert got is not None and got.mounts[0].target == target


@pytest.mark.parametrize("where", ["defaults", "c1"])
def test_duplicate_mount_targets(where: str) -> None:
    message = loads_refused(mounts(where, ("/srv/a", "/data"), ("/srv/b", "/data")))
    prefix = "$.defaults" if where == "defaults" else "$.competitions.c1"
    assert f"{prefix}.mounts: a target appears more than once" in message


def test_same_source_twice_or_target_in_defaults_and_competition_is_fine() -> None:
    text = mounts("c1", ("/srv/a", "/data"), ("/srv/a", "/data2"))
    text = "defaults:\n  mounts: [{source: /srv/d, target: /data}]\n" + text
    got = inventory.loads(text.encode()).profile("c1")
    assert got is not None and [m.target for m in got.mounts] == ["/data", "/data2"]
