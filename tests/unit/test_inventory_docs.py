"""The inventories the docs show are valid ones."""

from __future__ import annotations

import pathlib
import re

from gpujobq.protocol import inventory

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_reference_example_loads() -> None:
    text = (ROOT / "docs" / "inventory.md").read_text()
    (example,) = re.findall(r"## A full example\n\n```yaml\n(.*?)```", text, re.S)
    inv = inventory.loads(example.encode())
    assert [h.name for h in inv.hosts] == ["gpu-a1", "gpu-b1", "laptop"]
    assert len(inv.hosts[0].declared_gpus() or ()) == 8
    assert inv.profile("unlisted") is None  # unknown_competitions: refuse
    llm = inv.profile("llm-finetune")
    assert llm is not None and (llm.gpus, llm.time_cap, llm.labels) == (2, 43200, {"gpu": "a100"})


def test_the_shipped_inventory_loads() -> None:
    inv = inventory.load(ROOT / "inventory.yaml")
    assert [g.virtual for g in inv.hosts[0].declared_gpus() or ()] == [True, True]
    profile = inv.profile("anything")
    assert profile is not None and profile.time_cap == inventory.DEFAULT_TIME_CAP
