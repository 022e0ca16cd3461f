"""Tune files and the tuner: validation that names the bad key, the workload arithmetic, and a small study through
Ray that dedupes configs, keeps its state in SQLite and resumes from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
import yaml

from fusiontune.harness.results import RunFolder
from fusiontune.harness.sweep import SweepError
from fusiontune.harness.tune_spec import TuneSpec, bin_trace, expected_ratio, first_size, load_tune, workload_weights
from fusiontune.harness.tuner import Tuner, grid_size

pytestmark = pytest.mark.xdist_group("ray")  # starts Ray; one Ray at a time: tests/conftest.py

BASE = {"name": "t", "model": {"preset": "tiny", "quant": "fp8-static", "num_layers": 1}, "num_tokens": [1, 16],
        "optimization_level": 0,  # every fusion off unless searched: a trial with all off is the baseline
        "workload": {"histogram": {1: 3, 16: 1}},
        "search": {"fusions": ["fuse_norm_quant", "fuse_rope_kvcache"],
                   "thresholds": {"rope_kvcache_fusion_max_token_num": [1, 256]}},
        "measure": {"warmup": 1, "repeats": 5, "max_repeats": 5, "profile": False},
        "study": {"trials": 6, "seed": 3, "confirm": 2}}


def write(tmp_path, **changes):
    data = {**BASE, **changes}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change, message", [
    ({"search": {"fusions": ["fuse_everything"]}}, "unknown fusion fuse_everything"),
    ({"search": {"thresholds": {"sp_min_tokens": [1]}}}, "unknown threshold 'sp_min_tokens'"),
    ({"search": {}}, "name at least one fusion or threshold"),
    ({"workload": {"histogram": {1: 1, 64: 1}}}, "num_tokens [64] are not measured"),
    ({"workload": {}}, "exactly one of histogram"),
    ({"pass_config": {"fuse_norm_quant": True}}, "both fixed in pass_config and searched"),
    ({"study": {"trials": 0}}, "study.trials"),
    ({"study": {"trails": 5}}, "study.trails: unknown key; allowed keys here: trials, seed, storage"),
    ({"pass_config": {"fuse_norm_qaunt": True}}, "unknown PassConfig field 'fuse_norm_qaunt' (did you mean"),
    ({"search": {"thresholds": {"rope_kvcache_fusion_max_token_num": [64, -1]}}},
     "rope_kvcache_fusion_max_token_num: -1 is not allowed (input should be greater than 0)"),
])
def test_bad_tune_files_name_the_key(tmp_path, change, message):
    with pytest.raises(SweepError) as error:
        load_tune(write(tmp_path, **change))
    assert message in str(error.value) and "invalid tune file" in str(error.value)


def test_a_trace_is_binned_up_to_the_next_measured_size(tmp_path):
    steps = pd.Series([1, 1, 2, 16, 17, 100, 5000])
    assert bin_trace(steps, [1, 16, 128]) == {1: 2.0, 16: 2.0, 128: 3.0}  # 5000 > 128 counts toward 128
    (tmp_path / "steps.csv").write_text("num_tokens\n" + "\n".join(map(str, steps)) + "\n")
    spec, _ = load_tune(write(tmp_path, num_tokens=[1, 16, 128], workload={"trace": "steps.csv"}))
    weights = workload_weights(spec, tmp_path)
    assert weights == pytest.approx({1: 2 / 7, 16: 2 / 7, 128: 3 / 7})


def test_expected_ratio_weighs_sizes_by_steps_and_their_baseline_time():
    baseline, weights = {1: 2.0, 16: 10.0}, {1: 0.75, 16: 0.25}
    assert expected_ratio({1: 1.0, 16: 10.0}, baseline, weights) == pytest.approx((0.75 + 2.5) / (1.5 + 2.5))
    assert math.isinf(expected_ratio({1: 1.0}, baseline, weights))  # a size that failed
    assert first_size(weights, baseline) == 16  # 0.25 x 10 ms outweighs 0.75 x 2 ms


def test_grid_size():
    # the threshold matters only with RoPE + KV cache on: 2 x (off, on at 1, on at 256)
    assert grid_size(TuneSpec(**BASE)) == 2 * 3


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("sweeps").glob("tune-multi-gpu-*.yaml")))
def test_the_search_draws_only_configs_that_can_run_and_differ(tmp_path, path):
    """The collective tunes (each shape, quant and TP size): AsyncTP requires sequence parallelism, and each
    threshold matters only with its fusion on. Every point the study can draw plans to a config, and no two points
    plan to the same one."""
    from fusiontune.harness.sweep import PlannedConfig, plan_config
    from fusiontune.harness.tuner import grid_points, suggest
    from fusiontune.harness.tune_spec import trial_fields

    spec, _ = load_tune(path)
    points = grid_points(spec)
    # all-reduce fusion (off, or on at each bound) x (SP off, or on at each start with AsyncTP off or on), where
    # SP is searched (vLLM 0.32 and later have none: the tune fixes it off)
    searched, thresholds = set(spec.search.fusions), spec.search.thresholds
    sp_points = 1 + len(thresholds.get("sp_min_token_num", [])) * (2 if "fuse_gemm_comms" in searched else 1)
    assert len(points) == (1 + len(thresholds["fi_allreduce_fusion_max_size_mb"])) * (
        sp_points if "enable_sp" in searched else 1)
    tuner = Tuner(spec, RunFolder(tmp_path / "run"))
    effective = set()
    for point in points:
        assert point.get("fuse_gemm_comms") is None or point["enable_sp"]
        assert ("sp_min_token_num" in point) == point.get("enable_sp", False)
        assert ("fi_allreduce_fusion_max_size_mb" in point) == point["fuse_allreduce_rms"]
        planned = plan_config(trial_fields(spec, point), "p", spec.tp, tuner.plan.model, spec.optimization_level,
                              tuner.platform, collectives=spec.collectives)
        assert isinstance(planned, PlannedConfig), (point, planned)
        effective.add(planned.effective)
    assert len(effective) == len(points)
    # the sampler draws the same way: 40 random trials, every one a grid point
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(40):
        trial = study.ask()
        assert suggest(trial, spec) in points
        study.tell(trial, 1.0)
    # a fusion whose required pass is fixed off is not drawn at all
    fixed = TuneSpec(**{**spec.model_dump(), "pass_config": {"enable_sp": False},
                        "search": {"fusions": ["fuse_gemm_comms", "fuse_allreduce_rms"],
                                   "thresholds": {"sp_min_token_num": [256]}}})
    assert grid_points(fixed) == [{"fuse_allreduce_rms": False}, {"fuse_allreduce_rms": True}]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    spec, _ = load_tune(write(tmp))
    folder = RunFolder(tmp / "run")
    told = []
    try:
        summary = Tuner(spec, folder, on_trial=told.append).run()
        resumed = Tuner(spec, folder, trials=9, on_trial=told.append).run()
        grid = Tuner(spec, RunFolder(tmp / "grid"), grid=True).run()
    finally:
        ray.shutdown()
    return spec, folder, summary, resumed, told, grid


@pytest.mark.slow
def test_the_study_measures_each_config_once_and_reports_the_best(tuned):
    spec, folder, summary, _, told, _ = tuned
    first = told[:6]
    assert summary["trials"] == 6 and summary["best"] is not None
    # the study starts from every searched fusion on, the threshold at its PassConfig default
    assert first[0]["params"] == {"fuse_norm_quant": True, "fuse_rope_kvcache": True,
                                  "rope_kvcache_fusion_max_token_num": 256}
    # the two best configs are measured again in the run's last minutes, and the pick is made among those
    assert [c["expected_ratio"] for c in summary["confirmed"]] == sorted(c["expected_ratio"]
                                                                          for c in summary["confirmed"])
    assert 1 <= len(summary["confirmed"]) <= 2 and summary["best"]["config_id"].endswith("-confirm")
    assert summary["best"]["expected_ratio"] == summary["confirmed"][0]["expected_ratio"]
    # and says which fusions to run at each size, against its best config
    plan = summary["per_range"]
    assert [s["num_tokens"] for s in plan["sizes"]] == [1, 16]
    assert plan["single"]["config_id"] == summary["best"]["config_id"]
    assert plan["expected_ratio"] <= plan["single"]["expected_ratio"] + 1e-12
    # Every told trial that ran, or took an earlier one's value, has a finite value; an all-off trial is the
    # baseline (1.0 by definition) and is not measured again.
    for trial in first:
        if trial["state"] == "COMPLETE":
            assert math.isfinite(trial["value"]) and trial["value"] > 0
        if trial["state"] == "COMPLETE" and not any(trial["params"][f] for f in spec.search.fusions):
            assert trial["value"] == 1.0 and not trial["measured"]
    measured = [t for t in first if t["measured"] and t["state"] in ("COMPLETE", "PRUNED")]
    assert summary["evaluations"] <= len(measured)
    written = json.loads((folder.path / "tune.json").read_text())  # by the resumed run, the last to finish
    assert written["best"]["pass_config"] == tuned[3]["best"]["pass_config"] and written["trials"] == 9
    table = folder.table()
    assert table["label"].str.startswith("trial ").any() and (table["status"] == "ok").all()
    assert table["baseline_repeat"].any()  # the baseline again, last: the noise floor


@pytest.mark.slow
def test_a_second_run_resumes_the_study_from_its_storage(tuned):
    spec, folder, summary, resumed, told, _ = tuned
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{folder.path / 'study.db'}")
    assert len(study.trials) == resumed["trials"] == 9
    assert [t["trial"] for t in told[6:]] == [6, 7, 8]  # only the missing trials ran
    assert study.best_value <= summary["best"]["study_value"]  # more trials, never a worse best value
    # each run picks among its own re-measurements, whatever the study's values from earlier runs say
    assert resumed["best"]["expected_ratio"] == resumed["confirmed"][0]["expected_ratio"]
    # 9 trials over 6 distinct configs (the threshold is drawn only with RoPE + KV cache on), the all-off one
    # being the baseline: at least 3 trials reuse a value instead of measuring.
    assert resumed["evaluations"] <= 5 and sum(not t["measured"] for t in told) >= 3


@pytest.mark.slow
def test_the_grid_runs_every_point_and_measures_each_distinct_config_once(tuned):
    _, _, _, _, _, grid = tuned
    # 6 points (the threshold is drawn only with RoPE + KV cache on); all-off is the baseline: 5 to measure.
    assert grid["mode"] == "grid" and grid["trials"] == 6 and grid["evaluations"] == 5
    assert grid["pruned"] == 0 and grid["failed"] == 0 and grid["noise_floor"] is not None


@pytest.mark.slow
def test_export_writes_thresholds_for_the_device_and_shape_and_vllm_flags(tuned, tmp_path):
    from fusiontune.harness.export import ExportError, export_tuned, find_thresholds
    from fusiontune.passes.config import PassConfig

    _, folder, _, resumed, _, _ = tuned
    try:  # a pick that does not beat all-off beyond the noise floor is refused, unless forced
        export_tuned(folder.path, tmp_path / "thresholds")
        refused = ""
    except ExportError as exc:
        refused = str(exc)
    path = export_tuned(folder.path, tmp_path / "thresholds", force=True)
    assert path == tmp_path / "thresholds" / "cpu" / "tp1-hidden256-fp8-static.json"
    data = json.loads(path.read_text())
    beats = data["evidence"]["expected_speedup"] - 1 > (data["evidence"]["noise_floor"] or 0)
    assert (not refused) == beats and (beats or "does not beat all fusions off beyond noise" in refused)
    assert set(data["pass_config"]) <= set(PassConfig.model_fields)  # only names vLLM's PassConfig accepts
    from fusiontune.passes.vllm_versions import NEWEST, release

    assert data["vllm"]["version"] == NEWEST and not set(data["pass_config"]) & release(NEWEST).removed
    assert data["vllm"]["compilation_config"] == {"pass_config": data["pass_config"]}
    flags = data["vllm"]["flags"].split()
    assert flags[0] == "-O0" and f"-cc.pass_config.fuse_norm_quant={data['pass_config']['fuse_norm_quant']}" in flags
    evidence = data["evidence"]
    assert evidence["expected_speedup"] == pytest.approx(resumed["best"]["expected_speedup"])
    assert [row["num_tokens"] for row in evidence["per_num_tokens"]] == [1, 16]
    assert evidence["noise_floor"] is not None and evidence["study"] == "t"

    # The loader takes the nearest hidden size, and says so.
    wider = path.with_name("tp1-hidden4096-fp8-static.json")
    wider.write_text(path.read_text())
    taken, _, note = find_thresholds("cpu (2 cores, 2 threads)", 1, 300, "fp8-static", tmp_path / "thresholds")
    assert taken == path and "tuned at hidden 256, the nearest to 300 of 2 file(s)" in note
    assert find_thresholds("cpu", 1, 3000, "fp8-static", tmp_path / "thresholds")[0] == wider
    with pytest.raises(ExportError, match="devices there: cpu"):
        find_thresholds("NVIDIA H100 80GB HBM3", 1, 4096, "fp8-static", tmp_path / "thresholds")
    with pytest.raises(ExportError, match="not a tune run"):
        export_tuned(tmp_path, tmp_path / "thresholds")
    with pytest.raises(ExportError, match="no such run folder"):
        export_tuned(tmp_path / "missing", tmp_path / "thresholds")
    assert not (tmp_path / "missing").exists()  # nothing created on the way to failing


@pytest.mark.slow
def test_the_report_of_a_tune_run_shows_the_study(tuned):
    from fusiontune.harness.report import write_report

    _, folder, _, resumed, _, _ = tuned
    md, _ = write_report(folder.path)
    text = md.read_text()
    assert "## Tuning" in text and f"{resumed['trials']} trials" in text and "![tune-history]" in text
    assert (folder.path / "tune-history.png").read_bytes()[:4] == b"\x89PNG"
    assert "trial " in (folder.path / "report.html").read_text()


@pytest.mark.slow
def test_a_stopped_tune_is_summarised_from_its_study_measuring_nothing(tuned, tmp_path):
    """A tune stopped before its end (a time limit) writes no tune.json: ``summarize`` writes it from the study,
    its best the study's lowest value marked unconfirmed, with no row added."""
    import shutil

    spec, folder, _, resumed, _, _ = tuned
    copy = RunFolder(shutil.copytree(folder.path, tmp_path / "run"))
    (copy.path / "tune.json").unlink()
    rows = len(copy.rows())
    summary = Tuner(spec, copy).summarize()
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{copy.path / 'study.db'}")
    assert summary["best"]["expected_ratio"] == study.best_value and summary["trials"] == len(study.trials)
    assert summary["unconfirmed"] and "confirmed" not in summary and not resumed["unconfirmed"]
    assert json.loads((copy.path / "tune.json").read_text())["best"] == summary["best"]
    assert len(copy.rows()) == rows


@pytest.mark.slow
def test_a_study_measured_on_another_kind_of_machine_is_not_resumed_here(tuned, tmp_path):
    """A study's values compare only within one kind of machine: a tune resumed where its folder's rows came from
    another kind of device (an H100's study resumed on an H200) stops before recording anything or running a
    trial, as ``run --resume`` does."""
    import shutil

    from fusiontune.harness.launcher import OtherMachine

    spec, folder, _, resumed, _, _ = tuned
    copy = RunFolder(shutil.copytree(folder.path, tmp_path / "run"))
    journal = copy.path / "rows.jsonl"
    journal.write_text("".join(json.dumps({**json.loads(line), "device": "NVIDIA H200"}) + "\n"
                               for line in journal.read_text().splitlines()))
    rows = len(copy.rows())
    try:
        with pytest.raises(OtherMachine, match="TP=1 rows measured on NVIDIA H200"):
            Tuner(spec, copy, trials=12).run()
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{copy.path / 'study.db'}")
    assert len(copy.rows()) == rows and len(study.trials) == resumed["trials"]
