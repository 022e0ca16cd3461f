"""measure.paired through Ray, two TP groups: the configs of a TP size go out in one batch per group, each timed in
shared rounds with all-off, and each size's rows are written as the batch streams them. A batch that dies keeps the
sizes it finished; the rest run again one config at a time, so that only the config at fault is recorded as failed
and the others are still measured, paired."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import ray

from fusiontune.harness.launcher import batches, run_plan
from fusiontune.harness.results import RunFolder
from fusiontune.harness.roles import Role
from fusiontune.harness.sweep import PlannedConfig, expand, parse_sweep
from fusiontune.harness.worker import TPWorker

pytestmark = pytest.mark.xdist_group("ray")  # starts Ray; one Ray at a time: tests/conftest.py

SWEEP = """
name: batches
model: {preset: tiny, quant: fp8-static, num_layers: 1}
num_tokens: [1, 8]
pass_config: {fuse_norm_quant: [false, true], fuse_act_quant: [false, true]}
measure: {warmup: 1, repeats: 5, max_repeats: 5, profile: false, paired: true}
cluster: {groups: 2}
"""
BOTH = "fuse_norm_quant=on fuse_act_quant=on"


def _config(name: str, run: int = 1, role: Role = Role.CONFIG) -> PlannedConfig:
    return PlannedConfig(name, name, 1, {}, {}, role=role, run=run)


def test_batches_split_each_run_over_the_groups_with_the_aa_pair_last():
    configs = [_config("a"), _config("b"), _config("c"), _config("a2", 2), _config("b2", 2),
               _config("again", role=Role.BASELINE_AGAIN)]
    names = [[c.config_id for c in batch] for batch in batches(configs, 2)]
    assert names == [["a", "c"], ["b"], ["a2", "again"], ["b2"]]
    assert [[c.config_id for c in b] for b in batches(configs[:2], 4)] == [["a"], ["b"]]
    assert batches([], 2) == []
    # measure.batch_size: no batch holds more, so more batches than groups
    assert [[c.config_id for c in b] for b in batches(configs[:3], 1, 2)] == [["a", "c"], ["b"]]
    assert [len(b) for b in batches(configs[:3], 1, 1)] == [1, 1, 1]


class DiesTogether(TPWorker):
    """Dies (the process ends, as in a segfault) once it has streamed its first size (8 tokens: largest first)
    when the config with both fusions is timed beside others, and raises when it runs alone: the fault belongs to
    that config, at the sizes after the first. It dies once the driver has written that size's rows (to
    ``journal``), so what is tested is what the launcher does with a dead batch, not how fast the driver is (a
    step in flight when its rank dies: test_groups.py)."""

    journal: Path | None = None  # the run's rows.jsonl, set before the run (the class travels by value)

    def time_together(self, jobs):
        faulty = any(j.pass_config.get("fuse_norm_quant") and j.pass_config.get("fuse_act_quant") for j in jobs)
        if faulty and len(jobs) == 1:
            raise RuntimeError("boom: the config at fault")
        for step in super().time_together(jobs):
            yield step
            if faulty:
                written = time.monotonic() + 60
                while f'"label": "{BOTH}"' not in self.journal.read_text() and time.monotonic() < written:
                    time.sleep(0.1)
                os._exit(1)


@pytest.fixture(scope="module")
def batched_run(tmp_path_factory):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    plan = expand(parse_sweep(SWEEP))
    folder = RunFolder(tmp_path_factory.mktemp("batches"))
    folder.write_manifest(SWEEP, "batches.yaml", {})
    DiesTogether.journal = folder.rows_path
    reported = []  # (config, num_tokens) as on_rows hears of them: the CLI's progress by size
    try:
        run_plan(plan, folder, config_timeout_s=120, worker_cls=DiesTogether,
                 on_rows=lambda config, rows: reported.extend((config.config_id, r["num_tokens"]) for r in rows))
    finally:
        ray.shutdown()
    folder.reported = reported
    return plan, folder


@pytest.mark.slow
def test_a_dead_batch_runs_again_one_by_one_and_only_its_faulty_config_fails(batched_run):
    plan, folder = batched_run
    table = folder.table().set_index(["label", "num_tokens"])
    assert len(table) == len(plan.configs) * 2 == 5 * 2
    # 8 tokens came from the batch before it died, timed with the others; 1 token failed when run alone
    assert table.loc[(BOTH, 8), "status"] == "ok" and table.loc[(BOTH, 1), "status"] == "failed"
    assert "boom: the config at fault" in str(table.loc[(BOTH, 1), "error"])
    others = table.drop(index=BOTH, level="label")
    assert (others["status"] == "ok").all(), others[["status", "error"]]
    timed = table[~table["is_baseline"].astype(bool) & (table["status"] == "ok")]
    assert timed["paired_speedup"].notna().all() and (timed["paired_rounds"] >= 3).all()
    journal = [row for row in folder.rows() if row["label"] == BOTH]
    assert [row["num_tokens"] for row in journal] == [8, 1]  # each size once: nothing measured twice
    # every (config, size) reported once as its row was written, the batch's first size before the batch died
    assert sorted(folder.reported) == sorted((row["config_id"], row["num_tokens"]) for row in folder.rows())
    assert len(set(folder.reported)) == len(folder.reported) == 10
    # all-off again, paired with all-off: the same graph, bit-identical outputs
    assert (table.loc["all fusions off (baseline), again", "max_abs_err"] == 0).all()
    logs = {p.name: p.read_text() for p in (folder.path / "logs").iterdir()}
    batch_logs = [text for name, text in logs.items() if "-together-" in name]
    assert len(batch_logs) == 2
    assert any("the batch failed, so its configs run one at a time" in text for text in batch_logs)
    assert any("in rounds with all-off (2 configs)" in text for text in batch_logs)
    reruns = [text for name, text in logs.items() if "-together-" not in name and "num_tokens [1]" in text]
    assert len(reruns) == 1  # the faulty config's batch-mate, at the size it had left (the faulty one's rerun
    # raised: its group was torn down, and its log is the error)
