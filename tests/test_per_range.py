"""The per-range plan: each size's fastest measured config beyond noise, and the PassConfig that runs it."""

from __future__ import annotations

import pandas as pd
import pytest

from fusiontune.harness.export import _composed
from fusiontune.harness.per_range import best_single, range_plan

WEIGHTS = {1: 0.5, 64: 0.3, 1024: 0.2}


def rows(config_id: str, latencies: list[float], active: list[str], **flags) -> list[dict]:
    return [{"config_id": config_id, "label": config_id, "tp": 1, "status": "ok", "num_tokens": n,
             "latency_ms": ms, "is_baseline": config_id == "base", "baseline_repeat": False,
             "active_passes": ",".join(["eliminate_noops", *passes.split()]), "model_dtype": "bfloat16",
             "model_hidden_size": 4096, **flags}
            for n, ms, passes in zip(WEIGHTS, latencies, active)]


def table(*configs) -> pd.DataFrame:
    return pd.DataFrame([row for config in configs for row in config])


BASE = rows("base", [1.0, 1.0, 10.0], ["", "", ""])
# norm + quant everywhere, RoPE + KV cache allowed at every size: fast when small, RoPE + KV cache hurts at 1024
BOTH = rows("both", [0.90, 0.90, 10.2], ["fuse_norm_quant fuse_rope_kvcache"] * 3, fuse_norm_quant=True,
            fuse_rope_kvcache=True)
NORM = rows("norm", [0.95, 0.95, 9.5], ["fuse_norm_quant"] * 3, fuse_norm_quant=True)


def test_each_size_takes_its_fastest_config_and_a_low_fusion_gets_its_threshold():
    frame = table(BASE, BOTH, NORM)
    assert best_single(frame, WEIGHTS, 1) == ("norm", pytest.approx((0.475 + 0.285 + 1.9) / 2.8))
    plan = range_plan(frame, WEIGHTS, {1: 0.01, 64: 0.01, 1024: 0.01}, 1)
    assert [s["config_id"] for s in plan["sizes"]] == ["both", "both", "norm"]
    assert [s["departs"] for s in plan["sizes"]] == [True, True, False]
    assert plan["expected_ratio"] == pytest.approx((0.45 + 0.27 + 1.9) / 2.8)
    assert plan["expressible"] and plan["pass_config"]["fuse_norm_quant"] is True
    assert plan["pass_config"]["fuse_rope_kvcache"] is True
    assert plan["pass_config"]["rope_kvcache_fusion_max_token_num"] == 64  # the largest size where it pays
    assert plan["gain_over_single"] == pytest.approx(2.66 / 2.62 - 1)
    assert _composed(plan, floor=0.01) and not _composed(plan, floor=0.02) and not _composed(plan, floor=None)


def test_a_size_keeps_the_best_single_config_unless_another_beats_it_beyond_noise():
    plan = range_plan(table(BASE, BOTH, NORM), WEIGHTS, {1: 0.06, 64: 0.06, 1024: 0.01}, 1)
    assert [s["config_id"] for s in plan["sizes"]] == ["norm"] * 3 and not plan["departs"]
    assert not _composed(plan, floor=0.0)


def test_a_fusion_that_vllm_runs_everywhere_but_pays_only_at_some_sizes_is_not_expressible():
    worse_when_large = rows("norm", [0.9, 0.9, 10.5], ["fuse_norm_quant"] * 3, fuse_norm_quant=True)
    plan = range_plan(table(BASE, worse_when_large), WEIGHTS, {n: 0.01 for n in WEIGHTS}, 1)
    assert plan["single"]["config_id"] == "base"  # on every size together, norm + quant loses
    assert [s["config_id"] for s in plan["sizes"]] == ["norm", "norm", "base"]
    assert not plan["expressible"] and plan["pass_config"]["fuse_norm_quant"] is False
    assert "fuse_norm_quant pays at num_tokens 1, 64 only" in plan["notes"][0]
    assert not _composed(plan, floor=0.0)


def test_an_allreduce_bound_is_written_as_the_tensor_size_in_mb():
    fused = rows("ar", [0.8, 0.9, 10.5], ["fuse_allreduce_rms", "fuse_allreduce_rms", ""], fuse_allreduce_rms=True)
    plan = range_plan(table(BASE, fused), WEIGHTS, {n: 0.01 for n in WEIGHTS}, 1)
    assert plan["pass_config"]["fi_allreduce_fusion_max_size_mb"] == pytest.approx(64 * 4096 * 2 / 2**20)


def test_the_same_passes_at_a_size_are_no_reason_to_leave_the_best_config():
    # RoPE + KV cache bounded at 64 is outside its range at 1024: there both configs run norm + quant alone, and
    # the one measured faster (0.5 ms, beyond the floor) was only luckier
    bounded = rows("bounded", [0.90, 0.90, 9.0], ["fuse_norm_quant fuse_rope_kvcache"] * 2 + ["fuse_norm_quant"],
                   fuse_norm_quant=True, fuse_rope_kvcache=True)
    plan = range_plan(table(BASE, bounded, NORM), WEIGHTS, {n: 0.01 for n in WEIGHTS}, 1, single_id="norm")
    assert [s["config_id"] for s in plan["sizes"]] == ["bounded", "bounded", "norm"]
    # a config with other passes there, slower than the lucky one but beyond noise faster than the best, wins
    act = rows("act", [1.0, 1.0, 9.2], ["fuse_norm_quant fuse_act_quant"] * 3, fuse_norm_quant=True,
               fuse_act_quant=True)
    plan = range_plan(table(BASE, bounded, NORM, act), WEIGHTS, {n: 0.01 for n in WEIGHTS}, 1, single_id="norm")
    assert [s["config_id"] for s in plan["sizes"]] == ["bounded", "bounded", "act"]


def test_sp_and_asynctp_starting_at_different_sizes_cannot_share_sp_min_token_num():
    sp = rows("sp", [1.0, 0.9, 9.0], ["", "enable_sp", "enable_sp"], enable_sp=True)
    both = rows("both", [1.0, 0.95, 8.0], ["", "enable_sp", "enable_sp fuse_gemm_comms"], enable_sp=True,
                fuse_gemm_comms=True)
    plan = range_plan(table(BASE, sp, both), WEIGHTS, {n: 0.01 for n in WEIGHTS}, 1, single_id="sp")
    assert [s["config_id"] for s in plan["sizes"]] == ["sp", "sp", "both"]
    assert plan["pass_config"]["sp_min_token_num"] == 64 and plan["pass_config"]["enable_sp"] is True
    assert not plan["expressible"] and plan["pass_config"]["fuse_gemm_comms"] is False
    assert "fuse_gemm_comms pays from 1024 tokens, but sp_min_token_num is already 64" in " ".join(plan["notes"])
