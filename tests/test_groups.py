"""How many TP groups run at once (harness/groups.py): whole groups per node, what cluster.groups asks for made
concrete, and the one scheduling loop (GroupPool.drive) that sweeps and tunes share."""

from __future__ import annotations

from fusiontune.harness.groups import GroupPool, Outcome, group_capacity, groups_to_use


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


class TwoGroups:
    """GroupPool's scheduling loop over two fake groups: jobs end in the order they started."""

    drive = GroupPool.drive

    def __init__(self):
        self.running, self.started = [], []

    def has_room(self):
        return len(self.running) < 2

    def pending(self):
        return bool(self.running)

    def submit(self, job, tag):
        self.running.append(tag)
        self.started.append(tag)

    def next_done(self):
        return Outcome(self.running.pop(0), None)


def test_drive_runs_a_finished_jobs_next_stage_first_and_asks_until_the_source_has_no_more():
    asks = iter([["a"], [], ["b"], ["c"], None])  # [] : asked, but nothing to run (a trial that reused a value)
    told = []

    def ask():
        jobs = next(asks)
        return None if jobs is None else [(None, tag) for tag in jobs]

    def tell(outcome):
        told.append(outcome.tag)
        return [(None, outcome.tag + "2")] if outcome.tag == "a" else []

    pool = TwoGroups()
    pool.drive(ask, tell)
    assert pool.started == ["a", "b", "a2", "c"]  # a's next stage before c, once a group is free
    assert sorted(told) == ["a", "a2", "b", "c"] and not pool.running
