"""PassConfig resolves once, on the hardware the workers run on, and the workers compile exactly that: a config's
id, label and duplicate check describe the config that ran (issue 18). Two set-ups used to break: a GPU box with
``cluster.device: cpu`` planned for its GPU while the ranks resolved for CPUs, and a CPU-only head joining a GPU
cluster planned for CPUs."""

from __future__ import annotations

import pytest

from fusiontune.harness.launcher import job_for, workers_platform
from fusiontune.harness.sweep import expand, parse_sweep
from fusiontune.harness.worker import planned_platform
from fusiontune.passes.platform import Platform

H200 = Platform(vendor="cuda", capability=90, flashinfer=True)
SWEEP = """
name: p
model: {preset: tiny}
tp: [2]
num_tokens: [1, 64]
optimization_level: 2
variants: [{}]
cluster: {device: %s}
"""


@pytest.fixture
def on_an_h200_box(monkeypatch):
    monkeypatch.setattr(Platform, "detect", classmethod(lambda cls, *args, **kwargs: H200))


def test_a_gpu_box_run_on_cpus_is_planned_for_cpus(on_an_h200_box):
    assert workers_platform("cpu", None) == H200.on_cpu()
    assert workers_platform("auto", None) == H200  # a local run: the workers are this machine's
    on_cpus = expand(parse_sweep(SWEEP % "cpu"), workers_platform("cpu", None))
    on_gpus = expand(parse_sweep(SWEEP % "auto"), workers_platform("auto", None))
    # O2 turns the fused all-reduce on for an H200 at TP=2 and not on CPUs: the level's config ({}) is a config of
    # its own on the GPUs, and all-off itself on CPUs (dropped there)
    assert [c.resolved["fuse_allreduce_rms"] for c in on_gpus.configs if not c.is_baseline] == [True, False]
    assert not any(c.resolved["fuse_allreduce_rms"] for c in on_cpus.configs)
    assert [why for _, _, why in on_cpus.dropped] == ["same effective config as 'all fusions off (baseline)'"]
    job = job_for(on_cpus, on_cpus.configs[0])
    assert (job.platform.vendor, job.platform.tp_size, job.platform.flashinfer) == ("cpu", 2, False)


def test_a_rank_resolves_on_the_planned_platform_or_refuses_the_job():
    here = Platform(vendor="cpu", tp_size=2)
    assert planned_platform(None, here) is here  # a job made by hand: this rank's own
    planned = here.with_(hidden_size=256)
    assert planned_platform(planned, here) is planned
    with pytest.raises(RuntimeError, match="planned for cuda sm90 with FlashInfer, but this rank runs on cpu: plan "
                                           "where the workers run"):
        planned_platform(H200, here)


def test_the_plan_says_what_it_was_planned_for(on_an_h200_box):
    from typer.testing import CliRunner

    from fusiontune.cli import app

    result = CliRunner().invoke(app, ["run", "sweeps/smoke-cpu.yaml", "--dry-run"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "planned for cuda sm90 with FlashInfer" in result.output, result.output
