"""Sweep files: validation messages, safe loading, expansion of the product, what is skipped and dropped."""

from __future__ import annotations

import pytest

from fusiontune.harness.sweep import SweepError, expand, load_sweep, parse_sweep
from fusiontune.passes.fusions import FUSION_FLAGS, PASSES
from fusiontune.passes.platform import Platform

CPU = Platform(vendor="cpu")


def sweep(**overrides) -> str:
    import yaml

    data = {"name": "t", "model": {"preset": "tiny", "quant": "fp8-static"}, "tp": [1], "num_tokens": [1, 16],
            "pass_config": {"fuse_norm_quant": [False, True], "fuse_act_quant": [False, True]}}
    data.update(overrides)
    return yaml.safe_dump(data)


def test_the_smoke_sweep_expands_to_baseline_plus_three_per_tp(tmp_path):
    spec, text = load_sweep("sweeps/smoke-cpu.yaml")
    plan = expand(spec, CPU)
    assert [c.tp for c in plan.configs] == [1] * 5 + [2] * 5
    assert [c.is_baseline for c in plan.configs if c.tp == 1] == [True, False, False, False, False]
    # The baseline again, last: the noise floor. Same config, its own id.
    again = plan.configs[4]
    assert again.baseline_repeat and again.config_id == f"{plan.configs[0].config_id}-again"
    assert again.resolved == plan.configs[0].resolved and again.label == "all fusions off (baseline), again"
    baseline = plan.configs[0].resolved
    assert not any(baseline[f] for f in ("fuse_norm_quant", "fuse_act_quant"))
    assert [why for _, _, why in plan.dropped] == ["same effective config as 'all fusions off (baseline)'"] * 2
    assert len({c.config_id for c in plan.configs}) == 10
    once = expand(parse_sweep(sweep(measure={"baseline_twice": False})), CPU)
    assert not any(c.baseline_repeat for c in once.configs)
    assert "smoke-cpu" in text


def test_a_threshold_of_a_fusion_that_is_off_makes_no_new_config():
    changes = {"pass_config": {"fuse_rope_kvcache": [False, True], "rope_kvcache_fusion_max_token_num": [16, 256]},
               "measure": {"baseline_twice": False}}
    plan = expand(parse_sweep(sweep(**changes)), CPU)
    labels = [c.label for c in plan.configs]
    assert "fuse_rope_kvcache=off rope_kvcache_fusion_max_token_num=256" not in labels
    assert sum("fuse_rope_kvcache=on" in label for label in labels) == 2
    assert any("same effective config as 'fuse_rope_kvcache=off rope_kvcache_fusion_max_token_num=16'" in why
               for _, _, why in plan.dropped)


def test_num_runs_measures_every_config_again_after_all_first_runs():
    plan = expand(parse_sweep(sweep(measure={"runs": 3})), CPU)
    labels = [c.label for c in plan.configs]
    firsts = labels[1:4]
    assert not any("(run" in label for label in firsts)
    assert labels == (["all fusions off (baseline)"] + firsts + [f"{l} (run 2)" for l in firsts]
                      + [f"{l} (run 3)" for l in firsts] + ["all fusions off (baseline), again"])
    assert [c.run for c in plan.configs] == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 1]
    assert len({c.config_id for c in plan.configs}) == len(plan.configs)  # each run its own rows, resumable


def test_tp_defaults_to_one():
    data = {"name": "t", "model": {"preset": "tiny"}, "num_tokens": [4]}
    spec = parse_sweep(__import__("yaml").safe_dump(data))
    assert spec.tp == [1] and {c.tp for c in expand(spec, CPU).configs} == {1}


def test_scalars_are_fixed_and_lists_swept():
    plan = expand(parse_sweep(sweep(pass_config={"fuse_norm_quant": True, "fuse_act_quant": [False, True]})), CPU)
    labels = [c.label for c in plan.configs]
    assert labels == ["all fusions off (baseline)", "fuse_act_quant=off", "fuse_act_quant=on",
                      "all fusions off (baseline), again"]
    assert all(c.resolved["fuse_norm_quant"] for c in plan.configs[1:3])


def test_a_fusion_with_nothing_to_match_is_dropped_with_the_reason():
    plan = expand(parse_sweep(sweep(model={"preset": "tiny", "quant": "none"})), CPU)
    assert [c.is_baseline or c.baseline_repeat for c in plan.configs] == [True, True]
    reasons = " ".join(why for _, _, why in plan.dropped)
    assert "no-op: fuse_norm_quant has no pattern for quant=none" in reasons


def test_an_unshardable_tp_size_is_skipped_for_that_tp_only():
    plan = expand(parse_sweep(sweep(tp=[1, 3])), CPU)
    assert {c.tp for c in plan.configs} == {1}
    assert plan.skipped and all(s.tp == 3 for s in plan.skipped)
    assert "TP=3 cannot shard num_heads=4" in plan.skipped[0].reason


def test_per_group_128_on_hidden_2880_is_skipped_but_64_runs():
    model = {"preset": "gpt-oss-20b", "quant": "fp8-per-group", "num_layers": 1}
    plan = expand(parse_sweep(sweep(model=model)), CPU)
    assert not plan.configs and "needs hidden_size (qkv input)=2880 to be a multiple of 128" in plan.skipped[0].reason
    plan = expand(parse_sweep(sweep(model={**model, "group_size": 64})), CPU)
    assert len(plan.configs) == 5 and not plan.skipped  # baseline, 3 configs, baseline again


def test_every_fusion_has_a_pass_that_loads():
    from fusiontune.passes.config import resolve
    from fusiontune.passes.manager import PassManager

    thresholds = {"fi_allreduce_fusion_max_size_mb": 1.0, "sp_min_token_num": 1024}  # none by default on CPU
    config = resolve({**{flag: True for flag in FUSION_FLAGS}, "eliminate_noops": True, **thresholds}, 0, CPU)
    manager = PassManager(config)
    assert [flag for flag, _ in manager.passes] == [spec.flag for spec in PASSES]
    # one class per flag, each a GraphPass naming the flag it implements, and no class without an entry
    from fusiontune.passes.base import GraphPass
    from fusiontune.passes.manager import PASS_CLASSES

    assert sorted(PASS_CLASSES) == sorted(spec.flag for spec in PASSES)
    assert all(issubclass(cls, GraphPass) and cls.flag == flag for flag, cls in PASS_CLASSES.items())


def test_each_fusion_names_its_ops_kernel_and_bench_cases_and_they_exist():
    """From a fusion's entry in passes/fusions.py to everything below its pass: the ops it swaps in are defined,
    its CUDA kernel's file is there, and bench-kernels (or bench-kernels --tp) has the cases it names."""
    from pathlib import Path

    import torch

    import fusiontune.kernels  # noqa: F401 (defines the ops)
    from fusiontune.harness import bench_collectives, bench_kernels

    root = Path(__file__).resolve().parents[1]
    benches = {case.name for case in bench_kernels.cases()} | {case.name for case in bench_collectives.cases()}
    for spec in PASSES:
        if spec.kind == "cleanup":
            continue
        assert spec.ops, spec.flag
        missing = [op for op in spec.ops if not hasattr(torch.ops.fusiontune, op)]
        assert not missing, (spec.flag, missing)
        assert spec.kernel is None or (root / spec.kernel).is_file(), (spec.flag, spec.kernel)
        assert set(spec.bench) <= benches, (spec.flag, set(spec.bench) - benches)
        assert spec.bench or spec.flag == "enable_sp", spec.flag  # SP fuses nothing to time alone


@pytest.mark.slow
def test_every_fusiontune_op_is_an_explicit_inductor_fallback_once_a_manager_exists():
    """So Inductor never takes its implicit-fallback path, whose log line torch 2.11 formats eagerly (minutes for
    an op at the end of a large graph: passes/manager.py). In a fresh process: compiles elsewhere in the suite
    register implicit fallbacks too."""
    import subprocess
    import sys

    script = (
        "from torch._inductor import lowering\n"
        "from fusiontune.kernels.library import OP_CATEGORY, overload\n"
        "from fusiontune.passes.config import resolve\n"
        "from fusiontune.passes.manager import PassManager\n"
        "from fusiontune.passes.platform import Platform\n"
        "PassManager(resolve({}, 0, Platform()))\n"
        "print(sorted(n for n in OP_CATEGORY if overload(n) not in lowering.lowerings))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"preset": "tiny", "quantt": "fp8-static"}}, "model.quantt: unknown key; allowed keys here: preset, quant"),
        ({"model": {"preset": "llama"}}, "model.preset: Input should be 'gpt-oss-20b', 'llama-3.1-70b', 'llama-3.1-8b', 'qwen3-8b' or 'tiny'"),
        ({"model": {"preset": "tiny", "quant": "int4"}}, "model.quant: Input should be 'none', 'fp8-static'"),
        ({"pass_config": {"fuse_norm_quantt": True}}, "unknown PassConfig field 'fuse_norm_quantt' (did you mean fuse_norm_quant?)"),
        ({"tp": [0, 2]}, "tp: Value error, every TP size must be an integer >= 1"),
        ({"num_tokens": []}, "num_tokens: List should have at least 1 item"),
        ({"optimization_level": 5}, "optimization_level: Input should be 0, 1, 2 or 3"),
        ({"measure": {"repeats": 0}}, "measure.repeats: Input should be greater than or equal to 1"),
        ({"name": "../escape"}, "name: String should match pattern"),
        ({"colour": "red"}, "colour: unknown key; allowed keys here: name, model, tp"),
        ({"collectives": {"allreduce": "mpi"}}, "collectives.allreduce: Input should be 'auto', 'symm-mem' or 'nccl'"),
        ({"collectives": {"backend": "nccl"}}, "collectives.backend: unknown key; allowed keys here: allreduce, "
                                               "allreduce_backend"),
        # values PassConfig refuses in every config: refused as the file is read, not a sweep of skipped configs
        ({"pass_config": {"fuse_norm_quant": []}}, "fuse_norm_quant: an empty list sweeps nothing"),
        ({"pass_config": {"sp_min_token_num": -5}}, "sp_min_token_num: -5 is not allowed (input should be greater "
                                                    "than 0)"),
        ({"pass_config": {"fi_allreduce_fusion_max_size_mb": [1, 0]}}, "fi_allreduce_fusion_max_size_mb: 0 is not"),
        ({"pass_config": {"rope_kvcache_fusion_max_token_num": 1.5}}, "rope_kvcache_fusion_max_token_num: 1.5 is "
                                                                      "not allowed (input should be a valid integer"),
        ({"variants": [{"sp_min_token_num": 0}]}, "variants.0: Value error, sp_min_token_num: 0 is not allowed"),
    ],
)
def test_validation_errors_name_the_key_and_the_allowed_values(change, message):
    with pytest.raises(SweepError) as info:
        parse_sweep(sweep(**change))
    assert message in str(info.value)


def test_missing_keys_and_non_mappings():
    with pytest.raises(SweepError, match="model: required key is missing"):
        parse_sweep("name: x\nnum_tokens: [1]\n")
    with pytest.raises(SweepError, match="a sweep file is a mapping"):
        parse_sweep("- just\n- a list\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        parse_sweep("name: [unclosed\n")


def test_yaml_is_loaded_safely():
    with pytest.raises(SweepError, match="not valid YAML"):
        parse_sweep("name: !!python/object/apply:os.system ['echo pwned']\nmodel: {preset: tiny}\nnum_tokens: [1]\n")


def test_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(SweepError, match="cannot read sweep file"):
        load_sweep(tmp_path / "missing.yaml")


def test_the_issue_4_cpu_sweeps_plan_every_fusion_they_name():
    spec, _ = load_sweep("sweeps/fusions-cpu.yaml")
    plan = expand(spec, CPU)
    assert not plan.skipped
    at_tp2 = [c for c in plan.configs if c.tp == 2]
    assert any(c.resolved["fuse_allreduce_rms"] and c.resolved["enable_qk_norm_rope_fusion"] for c in at_tp2)
    assert all("TP=1 has none" in why for label, tp, why in plan.dropped if "fuse_allreduce_rms=on" in label)
    spec, _ = load_sweep("sweeps/padding-cpu.yaml")
    plan = expand(spec, CPU)
    assert not plan.skipped and any(c.resolved["fuse_act_padding"] for c in plan.configs)
    assert plan.model.pads_mlp_input and plan.model.mlp_input_size == 3072


H100 = Platform(vendor="cuda", capability=90)


def test_variants_lay_their_fields_over_each_combination_and_label_what_they_set():
    changes = {"pass_config": {"fuse_norm_quant": False, "fuse_act_quant": False, "fuse_rope_kvcache": [False, True]},
               "variants": [{}, {"fuse_norm_quant": True}, {"fuse_norm_quant": True, "fuse_act_quant": True}],
               "measure": {"baseline_twice": False}}
    plan = expand(parse_sweep(sweep(**changes)), CPU)
    labels = [c.label for c in plan.configs]
    assert labels == ["all fusions off (baseline)",  # then each combination, its variants in order
                      "fuse_rope_kvcache=off fuse_norm_quant=on",
                      "fuse_rope_kvcache=off fuse_act_quant=on fuse_norm_quant=on", "fuse_rope_kvcache=on",
                      "fuse_rope_kvcache=on fuse_norm_quant=on",
                      "fuse_rope_kvcache=on fuse_act_quant=on fuse_norm_quant=on"]  # (safe_dump sorts keys)
    both = plan.configs[-1].resolved
    assert both["fuse_norm_quant"] and both["fuse_act_quant"] and both["fuse_rope_kvcache"]
    # the empty variant with rope off is the baseline itself
    assert [why for _, _, why in plan.dropped] == ["same effective config as 'all fusions off (baseline)'"]
    with pytest.raises(SweepError, match=r"variants\.0: .*unknown PassConfig field 'fuse_norm_qaunt'"):
        parse_sweep(sweep(variants=[{"fuse_norm_qaunt": True}]))


def test_the_issue_7_sweeps_plan_each_fusion_alone_and_all_together_on_the_h100():
    expected = {"llama8b-fp8-static": 5, "llama8b-fp8-per-group": 4, "qwen3-8b": 3, "gpt-oss-20b": 3}
    for name, fused in expected.items():
        spec, _ = load_sweep(f"sweeps/single-gpu-{name}.yaml")
        plan = expand(spec, H100)
        assert not plan.skipped and not plan.dropped, (name, plan.dropped)
        assert len(plan.configs) == fused + 2, name  # and all-off first and last
        for config in plan.configs[1:-1]:
            on = {flag for flag in FUSION_FLAGS if config.resolved[flag]}
            assert on == {k for k, v in config.pass_config.items() if v is True}, (name, config.label)


def test_a_level_default_with_nothing_to_match_is_switched_off_not_a_no_op():
    # O2 on an H100 switches norm + quant on by default; a bf16 model has nothing for it to match, so the config
    # runs without it (it used to be dropped as a no-op, and every bf16 sweep with it)
    plan = expand(parse_sweep(sweep(model={"preset": "tiny", "qk_norm": True},
                                    pass_config={"enable_qk_norm_rope_fusion": [False, True]})), H100)
    fused = [c for c in plan.configs if c.resolved["enable_qk_norm_rope_fusion"]]
    assert len(fused) == 1 and not fused[0].resolved["fuse_norm_quant"] and not plan.dropped[1:]
    assert fused[0].pass_config["fuse_norm_quant"] is False  # the workers resolve these fields: they must agree


def test_the_issue_8_sweeps_plan_every_collective_fusion_at_tp_2_4_8_on_an_h200_box():
    h200 = Platform(vendor="cuda", capability=90, flashinfer=True)
    for name in ("llama8b-bf16", "llama8b-fp8-static", "llama70b-bf16", "llama70b-fp8-static"):
        spec, _ = load_sweep(f"sweeps/multi-gpu-{name}.yaml")
        plan = expand(spec, h200)
        # {} (the level's single-GPU fusions alone) is all-off itself in a bf16 model: dropped as a duplicate there
        bf16 = name.endswith("bf16")
        assert not plan.skipped and [d[0] for d in plan.dropped] == (["as configured"] * 3 if bf16 else []), \
            (name, plan.skipped, plan.dropped)
        for tp in (2, 4, 8):
            configs = plan.configs_for(tp)
            assert len(configs) == (6 if bf16 else 7), (name, tp)  # all-off, ({},) 4 variants, all-off again
            everything = configs[-2].resolved
            assert everything["fuse_allreduce_rms"] and everything["enable_sp"] and everything["fuse_gemm_comms"]


def test_the_collective_implementations_are_part_of_a_tp_config_but_not_of_tp_1():
    """Two runs with another all-reduce measured other things at TP > 1 (compare must not match them); at TP=1 there
    is no collective, and the single-GPU results keep their ids."""
    ids = {}
    for allreduce in ("auto", "nccl"):
        plan = expand(parse_sweep(sweep(tp=[1, 2], collectives={"allreduce": allreduce})))
        ids[allreduce] = {c.tp: c.config_id for c in plan.configs if c.is_baseline}
    assert ids["auto"][1] == ids["nccl"][1] and ids["auto"][2] != ids["nccl"][2]


def test_the_collectives_check_sweep_plans_the_fused_allreduce_and_asynctp_at_tp_2_and_4():
    spec, _ = load_sweep("sweeps/gpu-check-collectives.yaml")
    plan = expand(spec, Platform(vendor="cuda", capability=90))
    assert not plan.skipped and not plan.dropped
    for tp in (2, 4):
        labels = [c.label for c in plan.configs_for(tp)]
        assert labels[0] == "all fusions off (baseline)" and labels[-1].endswith(", again") and len(labels) == 5
        fused = [c.resolved for c in plan.configs_for(tp)[1:4]]
        assert [r["fuse_allreduce_rms"] for r in fused] == [False, True, False]
        assert [r["fuse_gemm_comms"] for r in fused] == [False, False, True] and fused[2]["enable_sp"]
        assert all(r["fuse_norm_quant"] and r["fuse_act_quant"] for r in fused)


def test_the_flashinfer_check_plans_the_same_configs_as_ours_with_flashinfer_s_kernel():
    """gpu-check-allreduce-flashinfer.yaml is gpu-check-allreduce-norm.yaml with the fused op run by FlashInfer: the
    same labels and PassConfigs at TP 2 and 4, other config ids (compare must not match a row of one with the
    other's)."""
    h200 = Platform(vendor="cuda", capability=90, flashinfer=True)
    ours, theirs = (expand(load_sweep(f"sweeps/gpu-check-allreduce-{name}.yaml")[0], h200)
                    for name in ("norm", "flashinfer"))
    assert (ours.spec.collectives.allreduce_backend, theirs.spec.collectives.allreduce_backend) == ("auto", "flashinfer")
    for tp in (2, 4):
        pairs = list(zip(ours.configs_for(tp), theirs.configs_for(tp), strict=True))
        assert [(a.label, a.resolved) for a, _ in pairs] == [(b.label, b.resolved) for _, b in pairs]
        assert all(a.config_id != b.config_id for a, b in pairs)
        assert [b.resolved["fuse_allreduce_rms"] for _, b in pairs] == [False, False, True, False]


def test_a_paired_sweep_times_every_config_but_all_off_against_all_off():
    """measure.paired: each config's job carries all-off's PassConfig (all-off again too: the A/A pair); all-off's
    first measurement, the reference, is not paired; without the option no job is."""
    from fusiontune.harness.launcher import job_for

    for paired in (True, False):
        plan = expand(parse_sweep(sweep(tp=[1, 2], measure={"paired": paired},
                                        pass_config={"fuse_norm_quant": [False, True]})))
        for config in plan.configs:
            baseline = next(c for c in plan.configs_for(config.tp) if c.is_baseline)
            want = dict(baseline.pass_config) if paired and not config.is_baseline else None
            assert job_for(plan, config).paired_with == want, (paired, config.label)
        assert any(job_for(plan, c).paired_with for c in plan.configs if c.baseline_repeat) == paired


def test_values_a_user_did_not_mean_are_refused_not_coerced():
    for text, field in (('tp: "2"', "tp"), ("model: {preset: tiny, num_layers: 2.5}", "model.num_layers"),
                        ("measure: {profile: 1}", "measure.profile"),
                        ('pass_config: {fuse_norm_quant: "yes"}', "pass_config.fuse_norm_quant")):
        lines = {"name": "name: x", "model": "model: {preset: tiny}", "num_tokens": "num_tokens: [1]"}
        lines[text.split(":")[0]] = text
        with pytest.raises(SweepError, match=field.replace(".", r"\.")):
            parse_sweep("\n".join(lines.values()) + "\n")


def test_a_union_field_gets_one_line_and_a_file_too_large_is_refused(tmp_path):
    with pytest.raises(SweepError) as info:
        parse_sweep('name: x\nmodel: {preset: tiny}\nnum_tokens: [1]\ncluster: {groups: "many"}\n')
    assert str(info.value).splitlines()[1:] == ["  cluster.groups: 'many' is not a valid value (allowed: 'auto' or int)"]
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 * 1024 * 1024) + "\n")
    with pytest.raises(SweepError, match="a sweep file is at most 1048576 bytes"):
        load_sweep(huge)
