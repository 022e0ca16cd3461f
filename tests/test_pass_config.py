"""PassConfig: level defaults as the reference page states them, user precedence, thresholds, cache keys."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fusiontune.passes.config import PassConfig, PassConfigError, resolve
from fusiontune.passes.fusions import FUSION_FLAGS, PASSES
from fusiontune.passes.manager import PassManager
from fusiontune.passes.platform import Platform

H100_TP2 = Platform(vendor="cuda", capability=90, tp_size=2, hidden_size=8192, flashinfer=True, quant="fp8-static")
CPU = Platform(vendor="cpu", hidden_size=4096)
ROCM = Platform(vendor="rocm", aiter=True, hidden_size=2880)

# vLLM's PassConfig field names (vllm/config/compilation.py): a tuned config must be accepted by vLLM unchanged.
VLLM_FIELDS = {
    "fuse_norm_quant", "fuse_act_quant", "fuse_attn_quant", "eliminate_noops", "enable_sp", "fuse_gemm_comms",
    "fuse_allreduce_rms", "enable_qk_norm_rope_fusion", "fuse_act_padding", "fuse_rope_kvcache",
    "rope_kvcache_fusion_max_token_num", "fi_allreduce_fusion_max_size_mb", "sp_min_token_num",
}


def on(level, platform, **user):
    return {k for k, v in resolve(user, level, platform).values.items() if v is True}


def test_field_names_are_vllms():
    assert set(PassConfig.model_fields) == VLLM_FIELDS
    assert set(resolve({}, 2, H100_TP2).vllm_pass_config()) <= VLLM_FIELDS


def test_o0_switches_everything_off():
    assert on(0, H100_TP2) == set()
    assert on(0, ROCM) == set()


def test_o1_enables_quant_fusions_only_with_custom_kernels():
    assert on(1, CPU) == {"eliminate_noops", "fuse_norm_quant", "fuse_act_quant"}
    inductor_only = CPU.with_(custom_ops=frozenset())
    resolved = resolve({}, 1, inductor_only)
    assert not resolved.fuse_norm_quant and "Inductor" in resolved.reasons["fuse_norm_quant"]
    assert resolve({}, 1, inductor_only.with_(quant="nvfp4")).fuse_act_quant  # FP4 quant is always custom


def test_allreduce_rms_needs_o2_hopper_tp_and_flashinfer():
    assert "fuse_allreduce_rms" not in on(1, H100_TP2)
    assert "fuse_allreduce_rms" in on(2, H100_TP2)
    assert "fuse_allreduce_rms" in on(2, H100_TP2.with_(capability=100))
    for missing in ({"tp_size": 1}, {"capability": 80}, {"flashinfer": False}, {"vendor": "rocm"}):
        resolved = resolve({}, 2, H100_TP2.with_(**missing))
        assert not resolved.fuse_allreduce_rms, missing
        assert resolved.reasons["fuse_allreduce_rms"].startswith("O2, but")


def test_rocm_only_fusions():
    assert "fuse_rope_kvcache" in on(2, ROCM) and "fuse_rope_kvcache" not in on(1, ROCM)
    assert "fuse_act_padding" in on(1, ROCM)
    assert "fuse_act_padding" not in on(1, ROCM.with_(hidden_size=4096))
    assert "fuse_act_padding" not in on(1, ROCM.with_(aiter_triton_gemm=True))
    assert not ({"fuse_rope_kvcache", "fuse_act_padding"} & on(3, H100_TP2))


def test_o3_equals_o2_and_off_by_default_fusions_stay_off():
    for platform in (H100_TP2, CPU, ROCM):
        assert resolve({}, 3, platform).values == resolve({}, 2, platform).values
        assert not ({"fuse_attn_quant", "enable_qk_norm_rope_fusion", "enable_sp", "fuse_gemm_comms"} & on(3, platform))


def test_user_fields_win_over_level_defaults():
    resolved = resolve({"fuse_norm_quant": False, "enable_qk_norm_rope_fusion": True}, 2, H100_TP2)
    assert resolved.fuse_norm_quant is False and resolved.enable_qk_norm_rope_fusion is True
    assert resolved.reasons["fuse_norm_quant"] == "set by the user"
    assert resolved.explicit == {"fuse_norm_quant", "enable_qk_norm_rope_fusion"}
    assert resolve({"fuse_norm_quant": True}, 0, CPU).fuse_norm_quant is True
    assert resolve({"fi_allreduce_fusion_max_size_mb": 3.5}, 2, H100_TP2).fi_allreduce_fusion_max_size_mb == 3.5


@pytest.mark.parametrize("capability, bounds", [(90, {2: 64, 4: 2, 8: 0.5}), (100, {2: 64, 4: 32, 8: 1})])
def test_the_fused_bound_is_vllm_0_33s_and_says_so(capability, bounds):
    """vLLM 0.33's hand table (allreduce_rms_fusion.py) for SM90 and SM100 at TP 2 / 4 / 8."""
    for tp, mb in bounds.items():
        resolved = resolve({}, 2, H100_TP2.with_(capability=capability, tp_size=tp))
        assert resolved.fi_allreduce_fusion_max_size_mb == mb
        assert resolved.reasons["fi_allreduce_fusion_max_size_mb"].startswith(f"vLLM 0.33's table for sm{capability}")
    assert resolve({}, 2, H100_TP2.with_(capability=100, tp_size=16)).fi_allreduce_fusion_max_size_mb == 64
    assert resolve({}, 2, H100_TP2.with_(capability=90, tp_size=16)).fi_allreduce_fusion_max_size_mb is None


def test_thresholds_follow_vllms_tables():
    assert resolve({}, 2, H100_TP2).fi_allreduce_fusion_max_size_mb == 64
    assert resolve({}, 2, H100_TP2.with_(tp_size=4)).fi_allreduce_fusion_max_size_mb == 2
    assert resolve({}, 2, H100_TP2.with_(capability=100, tp_size=4)).fi_allreduce_fusion_max_size_mb == 32
    assert "(vLLM 0.31)" in resolve({}, 2, H100_TP2).reasons["sp_min_token_num"]
    # 8 MiB per GPU x TP over (hidden x 2 bytes): 16 MiB / 16 KiB = 1024 tokens.
    assert resolve({}, 2, H100_TP2).sp_min_token_num == 1024
    assert resolve({}, 2, H100_TP2.with_(tp_size=4)).sp_min_token_num == 2048
    assert resolve({}, 2, H100_TP2.with_(hidden_size=4096)).sp_min_token_num is None
    assert resolve({}, 2, CPU).rope_kvcache_fusion_max_token_num == 256


def test_asynctp_switches_sp_on_unless_the_user_said_no():
    resolved = resolve({"fuse_gemm_comms": True}, 2, H100_TP2)
    assert resolved.enable_sp and "requires" in resolved.reasons["enable_sp"]
    with pytest.raises(PassConfigError, match="fuse_gemm_comms=true requires enable_sp=true"):
        resolve({"fuse_gemm_comms": True, "enable_sp": False}, 2, H100_TP2)


def test_a_threshold_without_a_value_here_needs_the_user():
    with pytest.raises(PassConfigError, match="set sp_min_token_num explicitly"):
        resolve({"enable_sp": True}, 2, H100_TP2.with_(hidden_size=4096))
    assert resolve({"enable_sp": True, "sp_min_token_num": 512}, 2, H100_TP2.with_(hidden_size=4096)).enable_sp


def test_bad_fields_are_rejected_by_name():
    with pytest.raises(ValidationError, match="fuse_norm_quantt"):
        PassConfig(fuse_norm_quantt=True)
    with pytest.raises(ValidationError, match="sp_min_token_num"):
        PassConfig(sp_min_token_num=-1)
    with pytest.raises(PassConfigError, match="optimization_level"):
        resolve({}, 4, CPU)


def test_every_field_says_why():
    for name, value, source, why in resolve({"fuse_act_quant": False}, 2, H100_TP2).explain():
        assert why, name
        assert source == ("user" if name == "fuse_act_quant" else "O2 default")
    sources = {name: source for name, _, source, _ in resolve({"fuse_gemm_comms": True}, 2, H100_TP2).explain()}
    assert sources["enable_sp"] == "requirement" and sources["fuse_gemm_comms"] == "user"


def test_cache_uuid_changes_with_the_effective_config():
    base = PassManager(resolve({"fuse_norm_quant": True, "fuse_act_quant": False}, 2, CPU))
    same = PassManager(resolve({"fuse_norm_quant": True, "fuse_act_quant": False}, 2, CPU))
    other = PassManager(resolve({"fuse_norm_quant": False, "fuse_act_quant": False}, 2, CPU))
    assert base.uuid() == same.uuid() != other.uuid()
    assert len({PassManager(resolve({f: True}, 0, CPU)).uuid() for f in ("fuse_norm_quant", "fuse_act_quant")}) == 2


def test_the_fusion_table_is_complete():
    assert set(FUSION_FLAGS) == {p.flag for p in PASSES if p.kind == "fusion"}
    assert len(FUSION_FLAGS) == 9  # the reference page's Quick Reference rows
    for spec in PASSES:
        assert spec.token_range in ("always", "low", "high") and spec.fuses and spec.title
