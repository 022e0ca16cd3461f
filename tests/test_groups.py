"""How many TP groups run at once (harness/groups.py): whole groups per node, and what cluster.groups asks for
made concrete."""

from __future__ import annotations

from fusiontune.harness.groups import group_capacity, groups_to_use


def test_group_capacity_counts_whole_groups_per_node():
    nodes = [{"Alive": True, "Resources": {"GPU": 8.0, "CPU": 64.0}},
             {"Alive": True, "Resources": {"GPU": 6.0, "CPU": 64.0}},
             {"Alive": False, "Resources": {"GPU": 8.0, "CPU": 64.0}}]
    assert group_capacity(4, True, nodes) == 2 + 1  # STRICT_PACK: no group spans two nodes
    assert group_capacity(8, True, nodes) == 1
    assert group_capacity(2, False, nodes) == 64


def test_groups_to_use(monkeypatch):
    from fusiontune.harness import groups

    monkeypatch.setattr(groups, "group_capacity", lambda tp, use_gpu: 4)
    assert groups_to_use(1, True, "auto", jobs=10) == 4
    assert groups_to_use(1, False, "auto", jobs=10) == 1  # CPU groups would share cores: one unless asked
    assert groups_to_use(1, False, 3, jobs=10) == 3
    assert groups_to_use(1, True, 8, jobs=10) == 4  # never more than fit
    assert groups_to_use(1, True, "auto", jobs=2) == 2  # nor more than there is work for
