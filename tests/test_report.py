"""The report's rules: speedup only where the config ran, agreed with the baseline, and its fusions fired."""

from __future__ import annotations

import re

import numpy as np
import pytest
import pandas as pd

from fusiontune.harness.analysis import speedups
from fusiontune.harness.report import write_report
from fusiontune.harness.results import RunFolder, redact


def row(label, num_tokens, latency, status="ok", baseline=False, norm=False, matches=0):
    return {"sweep": "t", "label": label, "config_id": label.split(",")[0], "is_baseline": baseline, "tp": 1, "num_tokens": num_tokens,
            "latency_ms": latency, "latency_ms_p10": latency * 0.9, "latency_ms_p90": latency * 1.1,
            "status": status, "error": "" if status == "ok" else "boom", "fuse_norm_quant": norm,
            "fuse_act_quant": False, "matches_fuse_norm_quant": matches, "matches_fuse_act_quant": 0,
            "max_abs_err": 0.0, "device": "cpu"}


ROWS = [
    row("base", 1, 2.0, baseline=True), row("base", 8, 4.0, baseline=True),
    row("fused", 1, 1.6, norm=True, matches=4), row("fused", 8, 5.0, norm=True, matches=4),
    row("unfired", 1, 1.0, norm=True, matches=0),
    row("wrong", 1, 0.5, status="incorrect", norm=True, matches=4),
    row("crashed", 8, float("nan"), status="failed"),
]


def test_speedup_is_baseline_over_config_and_withheld_otherwise():
    table = speedups(pd.DataFrame(ROWS)).set_index(["label", "num_tokens"])
    assert table.loc[("fused", 1), "speedup"] == 2.0 / 1.6
    assert table.loc[("fused", 8), "speedup"] == 4.0 / 5.0
    assert table.loc[("base", 1), "speedup"] == 1.0
    for key, note in [(("unfired", 1), "did not fire: fuse_norm_quant"), (("wrong", 1), "incorrect"),
                      (("crashed", 8), "failed")]:
        assert pd.isna(table.loc[key, "speedup"]) and table.loc[key, "note"] == note


def test_a_fusion_outside_its_num_tokens_range_is_named_not_counted_as_unfired():
    """A "low" fusion compiled out of the large-num_tokens graph: no match there is by design, not a failure."""
    base = row("base", 4096, 4.0, baseline=True)
    both = {**row("both", 4096, 3.0, norm=True, matches=4), "fuse_act_quant": True, "matches_fuse_act_quant": 0,
            "active_passes": "eliminate_noops,fuse_norm_quant"}
    only_low = {**row("low only", 4096, 4.1), "fuse_act_quant": True, "active_passes": "eliminate_noops"}
    table = speedups(pd.DataFrame([base, both, only_low])).set_index("label")
    assert table.loc["both", "speedup"] == 4.0 / 3.0 and table.loc["both", "note"] == "outside its range: fuse_act_quant"
    assert pd.isna(table.loc["low only", "speedup"])
    assert table.loc["low only", "note"] == "outside the num_tokens range of fuse_act_quant"


def test_a_fusion_whose_op_ran_no_fused_kernel_at_a_size_gets_no_speedup_for_it():
    """fuse_attn_quant fired, but from attention.SDPA_QUANT_MIN_TOKENS its op runs cuDNN's attention and then the
    quant kernel (faster there than our fused kernel): alone it has no speedup at that size, and beside another
    fusion the speedup stands with a note that it is the other fusion's."""
    from fusiontune.kernels.attention import OUR_FUSED_KERNEL, SDPA_THEN_QUANT

    def attn(label, num_tokens, used, **extra):
        return {**row(label, num_tokens, 3.0, **extra), "fuse_attn_quant": True, "matches_fuse_attn_quant": 4,
                "attention_used": used}

    rows = [row("base", 64, 4.0, baseline=True), row("base", 4096, 4.0, baseline=True),
            attn("attn", 64, OUR_FUSED_KERNEL), attn("attn", 4096, SDPA_THEN_QUANT),
            attn("attn+norm", 4096, SDPA_THEN_QUANT, norm=True, matches=4)]
    table = speedups(pd.DataFrame(rows)).set_index(["label", "num_tokens"])
    assert table.loc[("attn", 64), "speedup"] == 4.0 / 3.0 and table.loc[("attn", 64), "note"] == ""
    assert pd.isna(table.loc[("attn", 4096), "speedup"])
    assert table.loc[("attn", 4096), "note"] == (
        "ran no fused kernel (unfused kernels are faster at this size): fuse_attn_quant")
    assert table.loc[("attn+norm", 4096), "speedup"] == 4.0 / 3.0
    assert table.loc[("attn+norm", 4096), "note"].startswith("ran no fused kernel at this size: fuse_attn_quant")


def test_sp_off_at_a_size_that_does_not_split_over_tp_says_why():
    base = {**row("base", 4097, 4.0, baseline=True), "tp": 2}
    sp = {**row("sp", 4097, 4.1), "tp": 2, "enable_sp": True, "matches_enable_sp": 0,
          "active_passes": "eliminate_noops", "compile_range": ">=2048/indivisible"}
    table = speedups(pd.DataFrame([base, sp])).set_index("label")
    assert pd.isna(table.loc["sp", "speedup"])
    assert table.loc["sp", "note"] == "off, num_tokens does not split over TP: enable_sp"


def test_report_files(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append(ROWS)
    md, png = write_report(tmp_path)
    text = md.read_text()
    assert "| fused | 1 | 1.600 (1.440-1.760) | - | 1.250x | fuse_norm_quant=4 |" in text
    assert "did not fire: fuse_norm_quant" in text and "## Failed or incorrect" in text
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG" and "![speedup heatmap" in text
    page = (tmp_path / "report.html").read_text()  # one file: every figure inlined
    assert page.count("<img") == 2 and "data:image/png;base64," in page and "src=\"heatmap.png\"" not in page
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page)
    assert cells[cells.index("fused"):cells.index("fused") + 3] == ["fused", "1", "1.600 (1.440-1.760)"]
    assert "<h2>TP=1</h2>" in page and "<figcaption>speedup heatmap" in page


def test_rows_survive_a_torn_last_line_and_the_next_row_starts_its_own(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append(ROWS[:2])
    with folder.rows_path.open("a") as f:
        f.write('{"label": "half a ro')
    assert len(folder.rows()) == 2
    folder.append(ROWS[2:3])
    assert [r["label"] for r in folder.rows()] == ["base", "base", "fused"]


def noisy_sweep(again_1: float, again_8: float):
    """Baseline at 2.0 and 4.0 ms with a tight CI, measured again at ``again_*``; a config 3% faster."""
    ci = {"latency_ms_ci_low": 0.999, "latency_ms_ci_high": 1.001}
    rows = [{**row("base", n, ms, baseline=True), **{k: v * ms for k, v in ci.items()}} for n, ms in ((1, 2.0), (8, 4.0))]
    rows += [{**row("base, again", n, ms), "baseline_repeat": True} for n, ms in ((1, again_1), (8, again_8))]
    rows += [row("fused", n, ms / 1.03, norm=True, matches=4) for n, ms in ((1, 2.0), (8, 4.0))]
    return rows


def test_noise_floor_is_the_baselines_drift_or_its_ci_and_labels_small_speedups():
    table = speedups(pd.DataFrame(noisy_sweep(again_1=2.1, again_8=4.0))).set_index(["label", "num_tokens"])
    # At 1 token the two all-off medians differ by 5%: a 3% speedup is within noise, but still shown.
    assert abs(table.loc[("fused", 1), "noise_floor"] - 0.05) < 1e-9
    assert table.loc[("fused", 1), "speedup"] == 2.0 / (2.0 / 1.03)
    assert table.loc[("fused", 1), "note"].startswith("within noise (+/-5.0%)")
    # At 8 they agree: the floor is the CI half-width (0.1%), and 3% is a speedup.
    assert abs(table.loc[("fused", 8), "noise_floor"] - 0.001) < 1e-9 and table.loc[("fused", 8), "note"] == ""


def test_report_shows_the_noise_floor_and_the_kernel_breakdown(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append(noisy_sweep(again_1=2.1, again_8=4.0))
    kernels = [{"config_id": cid, "label": cid, "tp": 1, "num_tokens": n, "rank": 0, "measured_at": 1.0,
                "category": cat, "op": "x", "kernel": "k", "us_per_forward": us, "calls_per_forward": 1.0}
               for cid, cats in (("base", {"rms_norm": 5, "quant": 4, "gemm": 20}),
                                 ("fused", {"fused rms+quant": 6, "gemm": 20}))
               for n in (1, 8) for cat, us in cats.items()]
    folder.append_kernels(kernels)
    md, _ = write_report(tmp_path)
    text = md.read_text()
    assert "| 1 | 2.0000 | 2.1000 | 5.00% | +/-0.10% | 5.00% |" in text
    assert "within noise (+/-5.0%)" in text and "## Where the time goes" in text
    assert (tmp_path / "kernels.png").read_bytes()[:4] == b"\x89PNG"


def test_credentials_are_redacted():
    assert redact("ray://alice:s3cret@head:10001") == "ray://alice:***@head:10001"
    assert redact("postgresql://u:pw@db/optuna?token=abc") == "postgresql://u:***@db/optuna?token=***"
    assert redact("auto") == "auto"


def test_compare_flags_slower_beyond_noise_broken_and_unfired_and_fails_ci(tmp_path):
    import subprocess

    from fusiontune.harness.compare import agreement, compare, regressions

    before = noisy_sweep(again_1=2.0, again_8=4.04)  # floors: 0.1% at 1 token (the CI), 1% at 8
    after = [dict(r) for r in before]
    for r in after:
        if r["label"] == "fused" and r["num_tokens"] == 1:
            r["latency_ms"] *= 1.05  # slower, beyond 0.1%
        if r["label"] == "fused" and r["num_tokens"] == 8:
            r["latency_ms"] *= 1.005  # within the 1% floor
    after.append({**row("crashed", 1, 1.0), "config_id": "crashed"})
    before.append({**row("crashed", 1, 1.0), "config_id": "crashed"})
    after[-1].update(status="failed", latency_ms=float("nan"))
    before.append({**row("lost", 1, 1.9, norm=True, matches=4), "config_id": "lost"})
    after.append({**row("lost", 1, 1.9, norm=True, matches=0), "config_id": "lost"})  # same speed, nothing fused
    for name, rows in (("a", before), ("b", after)):
        RunFolder(tmp_path / name).append(rows)
    result = compare(tmp_path / "a", tmp_path / "b").set_index(["label", "num_tokens"])
    assert result.loc[("fused", 1), "verdict"] == "slower"
    assert result.loc[("fused", 8), "verdict"] == "within noise"
    assert result.loc[("crashed", 1), "verdict"] == "broke (failed)"
    assert result.loc[("lost", 1), "verdict"] == "stopped firing (fuse_norm_quant)"
    assert len(regressions(result.reset_index())) == 3
    agreed = agreement(result.reset_index())
    assert agreed.inside == agreed.rows - 1
    assert result.loc[("fused", 8), "speedup_b"] < result.loc[("fused", 8), "speedup_a"]
    cli = subprocess.run(["fusiontune", "compare", str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True,
                         text=True, env={**__import__("os").environ, "COLUMNS": "200"})
    assert cli.returncode == 1 and "slower" in cli.stdout and "broke (failed)" in cli.stdout
    same = subprocess.run(["fusiontune", "compare", str(tmp_path / "a"), str(tmp_path / "a")], capture_output=True)
    assert same.returncode == 0


def test_a_decode_sweep_gets_the_pareto_plot_and_its_frontier(tmp_path):
    from fusiontune.harness.figures import _frontier

    points = np.array([[100.0, 100.0], [50.0, 400.0], [60.0, 300.0], [40.0, 350.0], [90.0, 90.0]])
    assert _frontier(points).tolist() == [[50.0, 400.0], [60.0, 300.0], [100.0, 100.0]]  # dominated ones dropped
    rows = [{**r, "model_decode_context": 1024} for r in ROWS]
    RunFolder(tmp_path).append(rows)
    md, _ = write_report(tmp_path)
    assert "![decode throughput per sequence against per GPU](pareto.png)" in md.read_text()
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    RunFolder(tmp_path / "prefill").append(ROWS)  # prefill: tokens/s per sequence means nothing, no plot
    write_report(tmp_path / "prefill")
    assert not (tmp_path / "prefill" / "pareto.png").exists()


def test_runs_of_a_config_are_pooled_and_their_spread_bounds_what_counts_as_a_speedup(tmp_path):
    from fusiontune.harness.analysis import pooled_runs

    rows = noisy_sweep(again_1=2.0, again_8=4.0)  # a tight floor (0.1%): only the spread between runs is wide
    rows = [{**r, "run": 1} for r in rows]
    # run 2 of "fused": 1 token 3% faster again; 8 tokens 0.5% faster, so runs there disagree by 2.5%
    rows += [{**row("fused-run2, (run 2)", 1, 2.0 / 1.03, norm=True, matches=4), "run": 2,
              "label": "fused (run 2)", "config_id": "fused-run2"},
             {**row("fused-run2", 8, 4.0 / 1.005, norm=True, matches=4), "run": 2, "label": "fused (run 2)",
              "config_id": "fused-run2"}]
    pooled = pooled_runs(speedups(pd.DataFrame(rows))).set_index("num_tokens")
    assert list(pooled["runs"]) == [2, 2] and set(pooled["base_label"]) == {"fused"}
    assert abs(pooled.at[1, "run_spread"]) < 1e-12 and pooled.at[1, "beyond_noise"]
    assert abs(pooled.at[8, "latency_ms"] - (4.0 / 1.03 + 4.0 / 1.005) / 2) < 1e-12
    assert abs(pooled.at[8, "run_spread"] - (1.03 / 1.005 - 1)) < 1e-12
    assert not pooled.at[8, "beyond_noise"]  # 1.7% faster pooled, inside the 2.5% the runs disagree by
    folder = RunFolder(tmp_path)
    folder.append(rows)
    md, _ = write_report(tmp_path)
    assert "| fused | 8 | 2 |" in md.read_text() and "(within noise)" in md.read_text()
    assert pooled_runs(speedups(pd.DataFrame(noisy_sweep(2.0, 4.0)))).empty  # one run: nothing to pool


def test_a_fusion_with_no_pattern_for_the_model_is_not_counted_as_unfired():
    # norm + quant on (a level default) in a bf16 model matches nothing and cannot: the speedup of the fusion
    # being measured stands; in an FP8 model the same 0 matches withhold it
    bf16 = [{**r, "model_quant": "none"} for r in ROWS[:2] + [row("fused", 1, 1.6, norm=True, matches=0)]]
    assert speedups(pd.DataFrame(bf16)).set_index(["label", "num_tokens"]).loc[("fused", 1), "speedup"] == 2.0 / 1.6
    fp8 = [{**r, "model_quant": "fp8-static"} for r in bf16]
    table = speedups(pd.DataFrame(fp8)).set_index(["label", "num_tokens"])
    assert pd.isna(table.loc[("fused", 1), "speedup"]) and "did not fire" in table.loc[("fused", 1), "note"]


def with_ci(r, half=0.001, cv=0.005):
    return {**r, "latency_ms_ci_low": r["latency_ms"] * (1 - half), "latency_ms_ci_high": r["latency_ms"] * (1 + half),
            "latency_ms_cv": cv}


def test_a_speedup_is_claimed_only_when_its_interval_excludes_one():
    base = [with_ci(row("base", n, 2.0, baseline=True)) for n in (1, 8)]
    again = [with_ci({**row("base, again", n, 2.0), "baseline_repeat": True}) for n in (1, 8)]
    tight = with_ci(row("fused", 1, 2.0 / 1.03, norm=True, matches=4))  # 3% faster, CI +/-0.1%
    wide = with_ci(row("fused", 8, 2.0 / 1.03, norm=True, matches=4), half=0.05)  # 3% faster, CI +/-5%
    table = speedups(pd.DataFrame(base + again + [tight, wide])).set_index(["label", "num_tokens"])
    assert table.loc[("fused", 1), "verdict"] == "faster"
    assert table.loc[("fused", 1), "ci_low"] > 1.02 and table.loc[("fused", 1), "ci_high"] < 1.04
    assert table.loc[("fused", 8), "verdict"] == "within noise"
    assert table.loc[("fused", 8), "ci_low"] < 1 < table.loc[("fused", 8), "ci_high"]
    assert table.loc[("fused", 8), "note"] == "within noise (its interval covers 1)"
    assert table.loc[("base", 1), "verdict"] == "" and table.loc[("base, again", 1), "verdict"] == ""
    slow = with_ci(row("fused", 1, 2.0 * 1.03, norm=True, matches=4))
    assert speedups(pd.DataFrame(base + again + [slow])).set_index("label").loc["fused", "verdict"] == "slower"


def test_a_machine_under_load_claims_nothing_and_lower_clocks_are_said():
    """The CPU smoke sweep on a busy machine: repeats scattering by 50-160% (CV) are no evidence of a 13x speedup.
    Nor is a config that ran at lower SM clocks than all-off, or a median that never settled (the config's or
    all-off's): each is labelled and never claimed."""
    base = [with_ci(row("base", 1, 13.0, baseline=True), half=0.4, cv=1.6)]
    fused = with_ci(row("fused", 1, 1.0, norm=True, matches=4), half=0.2, cv=0.5)
    table = speedups(pd.DataFrame(base + [fused])).set_index("label")
    assert table.loc["fused", "verdict"] == "too noisy" and table.loc["fused", "note"] == "too noisy to claim (CV 160%)"
    base = [{**with_ci(row("base", 1, 2.0, baseline=True)), "gpu_sm_clock_mhz": 1980.0}]
    hot = {**with_ci(row("fused", 1, 1.8, norm=True, matches=4)), "gpu_sm_clock_mhz": 1700.0}
    table = speedups(pd.DataFrame(base + [hot])).set_index("label")
    assert table.loc["fused", "verdict"] == "lower clocks"
    assert table.loc["fused", "note"] == "lower SM clock than all-off (1700 against 1980 MHz), not claimed"
    clear = with_ci(row("fused", 1, 1.0, norm=True, matches=4))  # 2x, a tight interval: a claim when settled
    settled = [{**base[0], "settled": True}, {**clear, "settled": True}]
    assert speedups(pd.DataFrame(settled)).set_index("label").loc["fused", "verdict"] == "faster"
    for who, rows in (("the config", [settled[0], {**clear, "settled": False}]),
                      ("all-off", [{**base[0], "settled": False}, {**clear, "settled": True}])):
        table = speedups(pd.DataFrame(rows)).set_index("label")
        assert table.loc["fused", "verdict"] == "not settled", who
        assert table.loc["fused", "note"].startswith(f"not settled ({who}:"), table.loc["fused", "note"]


def test_a_busy_host_withholds_a_host_bound_claim_and_not_a_graph_replay():
    """Another process kept 1.5 CPUs busy while the config was timed: a CPU (wall clock) timing waits on the host,
    so its 2x is not claimed; a CUDA-graph replay does not, so the same numbers are."""
    base = [{**with_ci(row("base", 1, 2.0, baseline=True)), "host_other_cpus": 0.1}]
    fused = {**with_ci(row("fused", 1, 1.0, norm=True, matches=4)), "host_other_cpus": 1.5}
    for timing, verdict in (("wall clock", "busy host"), ("cuda-graph (2 input copies)", "faster")):
        rows = [{**r, "timing": timing} for r in base + [fused]]
        table = speedups(pd.DataFrame(rows)).set_index("label")
        assert table.loc["fused", "verdict"] == verdict, timing
    assert table.loc["fused", "note"] == ""
    rows = [{**r, "timing": "wall clock"} for r in base + [fused]]
    note = speedups(pd.DataFrame(rows)).set_index("label").loc["fused", "note"]
    assert note == "busy host (1.5 CPUs of other work while timing), not claimed"
    quiet = [{**r, "timing": "wall clock", "host_other_cpus": 0.2} for r in base + [fused]]
    assert speedups(pd.DataFrame(quiet)).set_index("label").loc["fused", "verdict"] == "faster"


def test_speedups_are_written_as_data_beside_the_report(tmp_path):
    RunFolder(tmp_path).append(noisy_sweep(again_1=2.1, again_8=4.0))
    write_report(tmp_path)
    data = pd.read_parquet(tmp_path / "speedups.parquet").set_index("num_tokens")
    assert list(data.columns) == ["config_id", "label", "tp", "speedup", "ci_low", "ci_high", "verdict", "note"]
    assert set(data["label"]) == {"fused"}  # all-off has no speedup of its own
    assert data.loc[1, "verdict"] == "within noise" and data.loc[8, "verdict"] == "faster"


def test_compare_judges_speedups_so_another_machine_of_the_kind_compares(tmp_path):
    """Run B on a machine 10% slower throughout: every latency moved, no speedup did. Exit 0, and every speedup
    lies inside the other run's interval."""
    import subprocess

    from fusiontune.harness.compare import agreement, compare, regressions

    before = [with_ci(r) for r in noisy_sweep(again_1=2.0, again_8=4.0)]
    after = [{**r, "latency_ms": r["latency_ms"] * 1.1, "latency_ms_ci_low": r["latency_ms_ci_low"] * 1.1,
              "latency_ms_ci_high": r["latency_ms_ci_high"] * 1.1} for r in before]
    for name, rows in (("a", before), ("b", after)):
        RunFolder(tmp_path / name).append(rows)
    result = compare(tmp_path / "a", tmp_path / "b").set_index(["label", "num_tokens"])
    assert set(result["verdict"]) == {"within noise", "baseline"} and regressions(result.reset_index()).empty
    assert ((result["change"] - 0.1).abs() < 1e-9).all()
    cli = subprocess.run(["fusiontune", "compare", str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True,
                         text=True, env={**__import__("os").environ, "COLUMNS": "200"})
    assert cli.returncode == 0 and "all-off latency moved by +10.00% to +10.00%" in cli.stdout
    agreed = agreement(result.reset_index())
    assert agreed.rows > 0 and agreed.inside == agreed.joint == agreed.rows
    assert f"{agreed.rows} of {agreed.rows} speedups agree within their joint 95% uncertainty" in cli.stdout


def test_compare_judges_unsettled_rows_and_calls_a_change_only_beyond_the_family_wise_joint_interval(tmp_path):
    """Paired rows on two machines: unsettled ones (honest intervals, only wide) are compared, not set aside. A gap
    just outside each other's intervals but inside their joint uncertainty is noise; a gap far beyond it is slower."""
    from fusiontune.harness.compare import agreement, compare, family_z

    def run(speedups_by_label):
        base = [with_ci(row("base", 1, 2.0, baseline=True))]
        return base + [with_ci({**row(label, 1, 2.0 / s, norm=True, matches=4), "config_id": label,
                                "paired_speedup": s, "paired_ci_low": s - half, "paired_ci_high": s + half,
                                "settled": settled})
                       for label, (s, half, settled) in speedups_by_label.items()]

    a = run({"wide": (1.050, 0.020, False), "near": (1.050, 0.010, True), "far": (1.080, 0.005, True)})
    b = run({"wide": (1.032, 0.020, False), "near": (1.038, 0.010, True), "far": (1.040, 0.005, True)})
    for name, rows in (("a", a), ("b", b)):
        RunFolder(tmp_path / name).append(rows)
    result = compare(tmp_path / "a", tmp_path / "b")
    verdicts = result.set_index("label")["verdict"]
    assert verdicts["wide"] == "within noise"  # not settled in both; 0.018 apart, inside +/-0.028 joint
    assert verdicts["near"] == "within noise"  # each outside the other's +/-0.010, inside the joint +/-0.014
    assert verdicts["far"] == "slower"  # 0.04 apart against +/-0.007
    agreed = agreement(result)
    assert (agreed.inside, agreed.joint, agreed.rows) == (1, 2, 3)
    assert 2.3 < family_z(3) < 2.5 and family_z(1) == pytest.approx(1.96, abs=0.01)


def test_a_paired_row_is_judged_by_its_own_interval_and_its_a_a_check_says_whether_it_covers_one():
    """measure.paired: the run's all-off drifted 10% between its two measurements (a floor no unpaired 5% could
    pass), but the config alternated with all-off in rounds: its own interval decides. All-off again, paired with
    all-off, is the A/A check."""
    base = [with_ci(row("base", 1, 2.0, baseline=True))]
    again = [with_ci({**row("base, again", 1, 2.2), "baseline_repeat": True, "paired_speedup": 0.998,
                      "paired_ci_low": 0.99, "paired_ci_high": 1.01})]
    fused = with_ci({**row("fused", 1, 2.1, norm=True, matches=4), "paired_speedup": 1.05, "paired_ci_low": 1.04,
                     "paired_ci_high": 1.06})
    table = speedups(pd.DataFrame(base + again + [fused])).set_index("label")
    assert table.loc["fused", "speedup"] == 1.05 and table.loc["fused", "verdict"] == "faster"
    assert (table.loc["fused", "ci_low"], table.loc["fused", "ci_high"]) == (1.04, 1.06)
    assert table.loc["base, again", "note"] == "the A/A check, paired with all-off: 0.998 [0.990-1.010], covers 1"
    unsure = {**fused, "paired_ci_low": 0.99}
    assert speedups(pd.DataFrame(base + again + [unsure])).set_index("label").loc["fused", "verdict"] == \
        "within noise"
    unpaired = with_ci(row("fused", 1, 2.0 / 1.05, norm=True, matches=4))  # the same 5% against a 10% floor
    assert speedups(pd.DataFrame(base + again + [unpaired])).set_index("label").loc["fused", "verdict"] == \
        "within noise"


def test_the_report_says_which_kernels_all_off_ran_size_by_size(tmp_path):
    """A speedup is only as strong as its baseline: the report names the attention and all-reduce that all-off
    ran (rows record them), sizes with the same kernel spanned."""
    used = {1: "fusiontune triton", 8: "fusiontune triton", 256: "sdpa (cudnn first)", 4096: "sdpa (cudnn first)"}
    rows = [{**row("base", n, 2.0, baseline=True), "attention_used": kernel, "allreduce_used": "",
             "gemm_used": "cublaslt fp8 (row-wise scales)"} for n, kernel in used.items()]
    rows += [{**row("fused", n, 1.9, norm=True, matches=4), "attention_used": "other"} for n in used]
    RunFolder(tmp_path).append(rows)
    md, _ = write_report(tmp_path)
    assert ("All-off ran (what every speedup here is against): attention: fusiontune triton at 1-8 tokens, "
            "sdpa (cudnn first) at 256-4096 tokens; FP8 GEMM: cublaslt fp8 (row-wise scales) at 1-4096 tokens."
            ) in md.read_text()


def test_the_report_names_the_power_limit_the_gpus_ran_under(tmp_path):
    """Two machines of one kind differ when one is capped: the report's device line says the enforced limit, and
    says so when it changed during the run."""
    rows = [{**r, "gpu_power_limit_w": 700.0} for r in noisy_sweep(again_1=2.0, again_8=4.0)]
    RunFolder(tmp_path / "a").append(rows)
    md, _ = write_report(tmp_path / "a")
    assert "Device: cpu, power limit 700 W." in md.read_text()
    rows[-1]["gpu_power_limit_w"] = 600.0
    RunFolder(tmp_path / "b").append(rows)
    md, _ = write_report(tmp_path / "b")
    assert "power limit 600-700 W (it changed during the run)" in md.read_text()
