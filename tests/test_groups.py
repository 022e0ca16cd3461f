"""How many TP groups run at once (harness/groups.py): whole groups per node, what cluster.groups asks for made
concrete, and the one scheduling loop (GroupPool.drive) that sweeps and tunes share."""

from __future__ import annotations

import pytest

from fusiontune.harness.groups import GroupPool, Outcome, group_capacity, groups_to_use

pytestmark = pytest.mark.xdist_group("ray")  # starts Ray; one Ray at a time: tests/conftest.py


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


class StreamsOneSizeThenDies:
    """A rank that streams one size (8 tokens) of a batch and then ends, as in a segfault, two seconds later (time
    for its item to reach the driver's process, even on a loaded machine)."""

    def __init__(self, rank, tp, threads, device):
        pass

    def rendezvous_address(self):
        return ""

    def init_process_group(self, init_method):
        return "cpu (a stand-in rank)"

    def time_together(self, jobs):
        import os
        import time
        from types import SimpleNamespace

        yield [SimpleNamespace(num_tokens=8) for _ in jobs]
        time.sleep(2)
        os._exit(1)


def test_a_size_streamed_while_the_driver_was_busy_survives_the_ranks_death():
    """Ray drops a streamed item the caller had not taken when its actor dies (2.60: the death's error comes in
    its place), and the driver's loop can be busy elsewhere for seconds (forming a group, reading logs): the pool
    takes each item as it arrives, so the sizes a dying batch finished are kept."""
    import sys
    import time

    import ray

    from fusiontune.harness.launcher import init_ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    init_ray(None)
    try:
        pool = GroupPool(1, False, 1, timeout_s=120, worker_cls=StreamsOneSizeThenDies)
        pool.submit(["job a", "job b"], "the batch")
        time.sleep(6)  # busy elsewhere: the rank streams its size, then dies, before the driver looks
        first = pool.next_done()
        assert first.partial and first.error == "", first.error
        assert [[[r.num_tokens for r in sizes] for sizes in jobs] for jobs in first.per_rank] == [[[8], [8]]]
        last = pool.next_done()
        assert last.per_rank is None and "died" in last.error.lower() and last.measured == [8]
        pool.shutdown()
    finally:
        ray.shutdown()
