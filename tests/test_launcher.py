"""Faults through Ray, two TP groups at once: a config that hangs, one that kills its worker and one that raises
are each recorded ``failed`` with their error, their groups are replaced (seeded with the baseline's outputs),
and the rest of the sweep, the baseline's repeat included, still runs and checks out."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray

from fusiontune.harness.launcher import run_plan
from fusiontune.harness.results import RunFolder
from fusiontune.harness.sweep import expand, parse_sweep
from fusiontune.harness.worker import TPWorker

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray at a time: tests/conftest.py
SWEEP = """
name: faults
model: {preset: tiny, quant: fp8-static, num_layers: 1}
num_tokens: [1, 8]
pass_config: {fuse_norm_quant: [false, true], fuse_act_quant: [false, true], fuse_rope_kvcache: [false, true]}
measure: {warmup: 1, repeats: 5, max_repeats: 5, profile: false, paired: false}  # a job per config
cluster: {groups: 2}
"""


class FaultyWorker(TPWorker):
    """Fails the way real configs do, chosen by the config: hangs, dies, or raises out of ``run``."""

    def run(self, job):
        fields = job.pass_config
        if fields.get("fuse_rope_kvcache") and not fields.get("fuse_act_quant"):
            if fields.get("fuse_norm_quant"):
                time.sleep(3600)  # a hang (a deadlocked collective, a kernel that never returns)
            os._exit(1)  # the worker process dies (a segfault, the OOM killer)
        if fields.get("fuse_rope_kvcache") and fields.get("fuse_norm_quant"):
            raise RuntimeError("boom: a bug outside the per-size error handling")
        return super().run(job)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    plan = expand(parse_sweep(SWEEP))
    folder = RunFolder(tmp_path_factory.mktemp("faults"))
    folder.write_manifest(SWEEP, "faults.yaml", {})
    try:
        run_plan(plan, folder, config_timeout_s=40, worker_cls=FaultyWorker)
    finally:
        ray.shutdown()
    return plan, folder


def test_each_fault_is_recorded_with_its_error_and_the_sweep_goes_on(faulty_run):
    plan, folder = faulty_run
    table = folder.table().set_index(["label", "num_tokens"])
    assert len(table) == len(plan.configs) * 2 == 9 * 2
    error = table["error"].astype(str)

    def status(label):
        return set(table.loc[label, "status"])

    hang = "fuse_norm_quant=on fuse_act_quant=off fuse_rope_kvcache=on"
    died = "fuse_norm_quant=off fuse_act_quant=off fuse_rope_kvcache=on"
    raised = "fuse_norm_quant=on fuse_act_quant=on fuse_rope_kvcache=on"
    assert status(hang) == {"failed"} and error[(hang, 1)].startswith("timed out: the config ran past 40 s")
    assert status(died) == {"failed"} and ("ActorDiedError" in error[(died, 1)] or "RayActorError" in error[(died, 1)])
    assert status(raised) == {"failed"} and "boom: a bug outside" in error[(raised, 8)]
    others = table[~table.index.get_level_values("label").isin([hang, died, raised])]
    assert len(others) == 6 * 2 and (others["status"] == "ok").all(), others[["status", "error"]]
    # The baseline's repeat ran on some group after the faults, with the baseline's outputs: bit-identical.
    again = table.loc["all fusions off (baseline), again"]
    assert (again["max_abs_err"] == 0).all()


def test_two_groups_shared_the_work_and_every_config_left_a_log(faulty_run):
    plan, folder = faulty_run
    manifest = __import__("json").loads(folder.manifest_path.read_text())
    assert manifest["groups"] == {"1": 2}
    logs = {p.name: p.read_text() for p in (folder.path / "logs").iterdir()}
    assert len(logs) == len(plan.configs)
    hang_log = next(text for name, text in logs.items() if "fuse_norm_quant=on_fuse_act_quant=off_fuse_rope_kvcache=on" in name)
    assert "failed: timed out" in hang_log
    ok_log = next(text for name, text in logs.items() if name.startswith("tp1-fuse_norm_quant=on_fuse_act_quant=on_"
                                                                         "fuse_rope_kvcache=off"))
    assert "num_tokens=8: range" in ok_log and "matches {" in ok_log


def test_a_local_ray_listens_on_loopback_only():
    """A local run's Ray registers its node, and so binds its servers, at 127.0.0.1: Ray would otherwise swap in
    the host's reachable IP and listen on every interface. What it sets to ask for that is put back after."""
    from ray._private import ray_constants

    from fusiontune.harness import launcher

    before = ray_constants.ENABLE_RAY_CLUSTER, {key: os.environ.get(key) for key in launcher.LOOPBACK_ONLY}
    ray.shutdown()
    launcher.init_ray(None)
    try:
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
        assert ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()) == "127.0.0.1"
    finally:
        ray.shutdown()
    assert (ray_constants.ENABLE_RAY_CLUSTER, {key: os.environ.get(key) for key in launcher.LOOPBACK_ONLY}) == before
