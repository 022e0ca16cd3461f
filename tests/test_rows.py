"""How the launcher turns the ranks' results for one config into rows: statuses, the slowest rank's time,
errors kept, and skipped rows for configs that cannot run."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from fusiontune.harness.rows import SCHEMA_VERSION, checked, rows_for, skipped_rows
from fusiontune.harness.sweep import expand, parse_sweep
from fusiontune.harness.jobs import RankResult
from fusiontune.passes.platform import Platform

PLAN = expand(parse_sweep("name: t\nmodel: {preset: tiny, quant: fp8-static}\ntp: [2, 3]\nnum_tokens: [1, 8]\n"
                          "pass_config: {fuse_norm_quant: [false, true]}\n"), Platform())
CONFIG = next(c for c in PLAN.configs if c.resolved["fuse_norm_quant"])


def result(n, times, err=0.0, tol=0.1, error="", norm=4):
    return RankResult(n, times_ms=times, max_abs_err=err, tolerance=tol, error=error,
                      matches={"fuse_norm_quant": norm}, resolved=CONFIG.resolved)


def test_ok_rows_take_the_slowest_rank_per_repeat():
    per_rank = [[result(1, [1.0, 5.0, 1.0]), result(8, [2.0, 2.0, 2.0])],
                [result(1, [3.0, 1.0, 3.0]), result(8, [2.0, 2.0, 2.0])]]
    rows = rows_for(PLAN, CONFIG, per_rank, device="cpu")
    assert [r["num_tokens"] for r in rows] == [1, 8]
    assert rows[0]["latency_ms"] == 3.0 and rows[0]["repeats"] == 3  # max per repeat: 3, 5, 3
    assert rows[0]["status"] == "ok" and rows[0]["matches_fuse_norm_quant"] == 4
    assert rows[0]["fuse_norm_quant"] is True and rows[0]["tp"] == 2 and rows[0]["model_name"] == "tiny"


def test_beyond_tolerance_on_any_rank_is_incorrect():
    per_rank = [[result(1, [1.0]), result(8, [1.0])], [result(1, [1.0], err=0.5), result(8, [1.0])]]
    rows = rows_for(PLAN, CONFIG, per_rank)
    assert rows[0]["status"] == "incorrect" and rows[0]["max_abs_err"] == 0.5
    assert rows[1]["status"] == "ok"


def test_a_size_that_failed_is_failed_with_its_error():
    per_rank = [[result(1, [], error="RuntimeError: out of memory"), result(8, [1.0])]] * 2
    rows = rows_for(PLAN, CONFIG, per_rank)
    assert rows[0]["status"] == "failed" and "out of memory" in rows[0]["error"]
    assert math.isnan(rows[0]["latency_ms"]) and rows[1]["status"] == "ok"


def test_a_config_whose_actors_died_fails_every_size():
    rows = rows_for(PLAN, CONFIG, None, error="RayActorError: the actor died unexpectedly")
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("actor died" in r["error"] for r in rows)


def test_unshardable_tp_becomes_skipped_rows():
    rows = skipped_rows(PLAN)
    assert {r["tp"] for r in rows} == {3} and len(rows) == 3 * 2  # baseline and two configs, 2 sizes each
    assert all(r["status"] == "skipped" and "TP=3 cannot shard num_heads=4" in r["error"] for r in rows)


def test_every_row_names_its_schema_and_a_column_of_the_wrong_type_is_caught():
    per_rank = [[result(1, [1.0]), result(8, [2.0])]] * 2
    rows = rows_for(PLAN, CONFIG, per_rank, device="cpu") + skipped_rows(PLAN)
    assert {r["schema_version"] for r in rows} == {SCHEMA_VERSION}
    for column, value in (("tp", "two"), ("status", "fine"), ("matches_fuse_norm_quant", None),
                          ("latency_ms", "fast")):
        with pytest.raises(ValidationError, match=column):
            checked(dict(rows[0], **{column: value}))
    bare = {k: v for k, v in rows[0].items() if k != "config_id"}
    with pytest.raises(ValidationError, match="config_id"):
        checked(bare)


def test_a_paired_row_gets_its_speedup_over_the_rounds_beside_the_plain_median():
    """measure.paired: each rank's config and all-off times, round by round; the slowest rank per repeat for both,
    then each round's all-off / config ratio. Unpaired rows have no paired columns."""
    config = ([1.0] * 5 + [2.0] * 5 + [1.0] * 5) * 2  # the machine slowed down in rounds 2 and 5, for both alike
    base = ([1.2] * 5 + [2.4] * 5 + [1.2] * 5) * 2
    per_rank = [[RankResult(1, times_ms=config, paired_base_ms=base, tolerance=0.1, resolved=CONFIG.resolved,
                            matches={"fuse_norm_quant": 4})]] * 2
    plan = expand(parse_sweep("name: t\nmodel: {preset: tiny, quant: fp8-static}\ntp: 2\nnum_tokens: [1]\n"
                              "pass_config: {fuse_norm_quant: [false, true]}\n"), Platform())
    (row,) = rows_for(plan, CONFIG, per_rank)
    assert row["paired_rounds"] == 6 and row["paired_speedup"] == pytest.approx(1.2) and row["settled"]
    assert row["paired_ci_low"] == pytest.approx(1.2) and row["paired_ci_high"] == pytest.approx(1.2)
    assert row["paired_baseline_ms"] == 1.2 and row["latency_ms"] == 1.0
    (plain,) = rows_for(plan, CONFIG, [[result(1, [1.0, 1.0])]] * 2)
    assert "paired_speedup" not in plain


def test_a_group_reports_its_slowest_clock_lowest_power_limit_hottest_gpu_and_busiest_host():
    ranks = []
    for clock, limit, temp in ((1980.0, 700.0, 60.0), (1700.0, 600.0, 70.0)):
        one = result(1, [1.0, 1.0])
        one.gpu = {"gpu_sm_clock_mhz": clock, "gpu_power_limit_w": limit, "gpu_temp_c": temp}
        ranks.append([one])
    ranks[0][0].host_other_cpus, ranks[1][0].host_other_cpus = 0.25, float("nan")  # one host could not say
    row = rows_for(PLAN, CONFIG, ranks, device="cuda")[0]
    assert (row["gpu_sm_clock_mhz"], row["gpu_power_limit_w"], row["gpu_temp_c"]) == (1700.0, 600.0, 70.0)
    assert row["host_other_cpus"] == 0.25  # the busiest host that could
