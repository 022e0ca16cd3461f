"""num_tokens ranges from the enabled passes' thresholds: where the model is split, and which passes each part
compiles with."""

from __future__ import annotations

from fusiontune.passes.config import resolve
from fusiontune.passes.platform import Platform
from fusiontune.passes.ranges import compile_ranges, range_for

HOPPER_TP4 = Platform(vendor="cuda", capability=90, tp_size=4, hidden_size=8192, quant="fp8-static", flashinfer=True)


def test_low_and_high_passes_split_the_model_in_three():
    config = resolve({"fuse_gemm_comms": True, "enable_qk_norm_rope_fusion": True}, 2, HOPPER_TP4)  # SP comes with it
    ranges = compile_ranges(config)
    # fi_allreduce 2 MB at TP=4 on sm90 = 128 tokens of 8192 bf16; SP from 8 MB per GPU x 4 = 2048 tokens.
    assert [r.label for r in ranges] == ["1-128", "129-2047", ">=2048"]
    low, middle, high = ranges
    assert {"fuse_allreduce_rms", "enable_qk_norm_rope_fusion", "fuse_norm_quant"} <= set(low.active)
    assert not {"enable_sp", "fuse_gemm_comms"} & set(low.active)
    assert not {"fuse_allreduce_rms", "enable_qk_norm_rope_fusion", "enable_sp"} & set(middle.active)
    assert {"enable_sp", "fuse_gemm_comms", "fuse_norm_quant"} <= set(high.active)
    assert "outside its num_tokens range (1-128)" in low.config.reasons["enable_sp"]
    assert range_for(ranges, 128) is low and range_for(ranges, 129) is middle and range_for(ranges, 4096) is high


def test_user_thresholds_move_the_splits():
    config = resolve({"fi_allreduce_fusion_max_size_mb": 8, "enable_sp": True, "sp_min_token_num": 1024}, 2,
                     HOPPER_TP4)
    assert [r.label for r in compile_ranges(config)] == ["1-512", "513-1023", ">=1024"]


def test_no_range_bound_no_split():
    config = resolve({"enable_qk_norm_rope_fusion": True}, 2, Platform(hidden_size=4096, quant="fp8-static"))
    (only,) = compile_ranges(config)
    assert only.label == ">=1" and "enable_qk_norm_rope_fusion" in only.active and only.config is config


def test_a_size_that_does_not_split_over_tp_runs_its_range_without_sp():
    ranges = compile_ranges(resolve({"fuse_gemm_comms": True}, 2, HOPPER_TP4))
    high = ranges[-1]
    assert range_for(ranges, 4096, tp_size=4) is high
    odd = range_for(ranges, 4097, tp_size=4)
    assert odd.label == ">=2048/indivisible" and odd.low == high.low
    assert not {"enable_sp", "fuse_gemm_comms"} & set(odd.active) and "fuse_norm_quant" in odd.active
    assert odd.config.reasons["enable_sp"] == "num_tokens=4097 does not split over TP=4"
    assert range_for(ranges, 7, tp_size=4) is ranges[0]  # no SP in the low range: nothing to switch off


def test_sequence_parallelism_takes_the_allreduces_where_both_apply():
    """vLLM runs SP before the all-reduce fusion: in a range where both apply SP rewrites every all-reduce, so the
    range compiles without the all-reduce fusion (not counted as an enabled pass that never fired). A size there
    that does not split over TP runs without SP, and with the all-reduce fusion back."""
    config = resolve({"fuse_allreduce_rms": True, "fi_allreduce_fusion_max_size_mb": 64, "enable_sp": True,
                      "sp_min_token_num": 1024}, 2, HOPPER_TP4)
    ranges = compile_ranges(config)  # 64 MB of 8192 bf16 = 4096 tokens
    low, both, high = ranges
    assert [r.label for r in ranges] == ["1-1023", "1024-4096", ">=4097"]
    assert "fuse_allreduce_rms" in low.active and "enable_sp" not in low.active
    assert "enable_sp" in both.active and "fuse_allreduce_rms" not in both.active
    assert "enable_sp takes its matches" in both.config.reasons["fuse_allreduce_rms"]
    assert "outside its num_tokens range" in high.config.reasons["fuse_allreduce_rms"]
    odd = range_for(ranges, 1026, tp_size=4)
    assert "fuse_allreduce_rms" in odd.active and "enable_sp" not in odd.active
    assert odd.config.reasons["enable_sp"] == "num_tokens=1026 does not split over TP=4"


def test_the_pass_manager_runs_sp_and_asynctp_before_the_allreduce_fusion():
    from fusiontune.passes.fusions import PASSES

    order = [spec.flag for spec in PASSES]
    assert order.index("enable_sp") < order.index("fuse_gemm_comms") < order.index("fuse_allreduce_rms")
    assert order.index("fuse_norm_quant") < order.index("enable_sp")  # both match the fused norm + quant op
